"""Kernel feature probing runs once per boot: its outcome is kept in the run
directory under a name made of the boot id, the probe object's digest, the
credentials and the BTF path; a corrupt or foreign file is ignored."""
from __future__ import annotations

import json
import os

import pytest

from pytest_nettrace.kernel import capabilities

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loads BPF programs)")


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(capabilities, "RUN_DIR", str(tmp_path))
    return tmp_path


def _loads(monkeypatch) -> list:
    tried = []
    real = capabilities._try_program
    monkeypatch.setattr(capabilities, "_try_program", lambda prog, *a, **kw: tried.append(prog) or real(prog, *a, **kw))
    return tried


def _same(a, b) -> bool:
    names = ("privileged", "btf", "ringbuf", "tracepoint", "tp_btf", "fentry", "kprobe")
    return all(getattr(a, n) == getattr(b, n) for n in names) and a.reasons == b.reasons


def test_probing_runs_once_per_boot(run_dir, monkeypatch):
    tried = _loads(monkeypatch)
    first = capabilities.detect()
    assert len(tried) == 4
    [cached] = run_dir.glob("features-*.json")
    assert set(json.loads(cached.read_text())) == {"tp_btf", "tracepoint", "fentry", "kprobe"}
    again = capabilities.detect()
    assert len(tried) == 4, "probed again within the same boot"
    assert _same(first, again)
    other = capabilities.detect("/proc/self/../../sys/kernel/btf/vmlinux")  # the same file, named otherwise
    assert len(tried) == 4 and _same(first, other)


@pytest.mark.parametrize("spoil", ["garbage", "wrong keys", "not root's", "writable by others", "symlink"])
def test_a_corrupt_or_foreign_cache_file_is_ignored(run_dir, monkeypatch, spoil):
    truth = capabilities.detect()
    [cached] = run_dir.glob("features-*.json")
    lie = json.dumps({"tp_btf": "EPERM: a lie", "tracepoint": None, "fentry": None, "kprobe": None})
    cached.unlink()
    if spoil == "garbage":
        cached.write_text("{not json")
    elif spoil == "wrong keys":
        cached.write_text(json.dumps({"tp_btf": None}))
    elif spoil == "symlink":
        (run_dir / "elsewhere.json").write_text(lie)
        cached.symlink_to(run_dir / "elsewhere.json")
    else:
        cached.write_text(lie)
        if spoil == "not root's":
            os.chown(cached, 65534, 65534)
        else:
            os.chmod(cached, 0o666)
    tried = _loads(monkeypatch)
    got = capabilities.detect()
    assert len(tried) == 4 and _same(truth, got)

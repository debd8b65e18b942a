"""Kernel feature probing runs once per boot: its outcome is kept in the run
directory under a name made of the boot id, the probe object's digest, the
credentials and the BTF path; a corrupt or foreign file is ignored. So are
the answers the probes ask the kernel's BTF (enum values, tracepoint
arguments): a process whose questions were answered before does not parse it.
A directory others can write is neither read nor written."""
from __future__ import annotations

import json
import os

import pytest

from pytest_nettrace.kernel import capabilities, symbols
from pytest_nettrace.kernel import libbpf as lb

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


def _spoil(cached, spoil: str, lie: str, misshapen: str) -> None:
    """Put in place of a cache file what must not be believed: garbage, the
    wrong shape, or a lie in a file that is not root's, that others can
    write, or that is a link."""
    cached.unlink()
    if spoil == "garbage":
        cached.write_text("{not json")
    elif spoil in ("wrong keys", "wrong shape"):
        cached.write_text(misshapen)
    elif spoil == "symlink":
        (cached.parent / "elsewhere.json").write_text(lie)
        cached.symlink_to(cached.parent / "elsewhere.json")
    else:
        cached.write_text(lie)
        if spoil == "not root's":
            os.chown(cached, 65534, 65534)
        else:
            os.chmod(cached, 0o666)


@pytest.mark.parametrize("spoil", ["garbage", "wrong keys", "not root's", "writable by others", "symlink"])
def test_a_corrupt_or_foreign_cache_file_is_ignored(run_dir, monkeypatch, spoil):
    truth = capabilities.detect()
    [cached] = run_dir.glob("features-*.json")
    lie = json.dumps({"tp_btf": "EPERM: a lie", "tracepoint": None, "fentry": None, "kprobe": None})
    _spoil(cached, spoil, lie, json.dumps({"tp_btf": None}))
    tried = _loads(monkeypatch)
    got = capabilities.detect()
    assert len(tried) == 4 and _same(truth, got)


QUESTIONS = (("enum", "skb_drop_reason"), ("enum", "bpf_attach_type"), ("enum", "no_such_enum_xyz"),
             ("tracepoint_args", "kfree_skb"), ("tracepoint_args", "inet_sock_set_state"),
             ("tracepoint_args", "no_such_tracepoint_xyz"))


def _ask(k) -> list:
    return [getattr(k, what)(name) for what, name in QUESTIONS]


def _parses(monkeypatch) -> list:
    parsed = []
    real = lb.KernelBtf
    monkeypatch.setattr(lb, "KernelBtf", lambda *a: parsed.append(a) or real(*a))
    return parsed


def test_btf_answers_are_kept_for_the_boot(run_dir, monkeypatch):
    truth = lb.KernelBtf()
    expected = [truth.enum("skb_drop_reason"), truth.enum("bpf_attach_type"), {},
                truth.tracepoint_arg_count("kfree_skb"), truth.tracepoint_arg_count("inet_sock_set_state"), None]
    truth.close()
    assert expected[0] and expected[3] and expected[4], "this kernel's BTF lacks what the test asks"
    assert _ask(capabilities.detect()) == expected
    [kept] = run_dir.glob("btf-*.json")
    parsed = _parses(monkeypatch)
    again = capabilities.detect()
    assert _ask(again) == expected
    assert parsed == [], "the kernel BTF was parsed again for answers kept this boot"
    assert again.tp_btf and again.btf
    assert again.tracepoint_args("tcp_send_reset") is not None and len(parsed) == 1, "a new question parses it"


@pytest.mark.parametrize("spoil", ["garbage", "wrong shape", "not root's", "writable by others", "symlink"])
def test_corrupt_or_foreign_btf_answers_are_ignored(run_dir, monkeypatch, spoil):
    expected = _ask(capabilities.detect())
    [kept] = run_dir.glob("btf-*.json")
    lie = json.dumps({"enums": {"skb_drop_reason": [[2, "A_LIE"]]}, "tracepoint_args": {"kfree_skb": 99}})
    _spoil(kept, spoil, lie, json.dumps({"enums": [], "tracepoint_args": {"kfree_skb": "x"}}))
    parsed = _parses(monkeypatch)
    assert _ask(capabilities.detect()) == expected
    assert len(parsed) == 1


def test_a_run_directory_others_can_write_is_not_used(run_dir, monkeypatch):
    """On a shared machine another user could plant answers (or links) there."""
    tried = _loads(monkeypatch)
    run_dir.chmod(0o777)
    truth = capabilities.detect()
    answers = _ask(truth)
    assert list(run_dir.iterdir()) == [], "wrote its cache where others can write"
    run_dir.chmod(0o755)
    _ask(capabilities.detect())
    assert len(list(run_dir.glob("features-*.json"))) == 1 and len(list(run_dir.glob("btf-*.json"))) == 1
    run_dir.chmod(0o777)  # the same files, in a directory others could have written them to
    tried.clear()
    parsed = _parses(monkeypatch)
    again = capabilities.detect()
    assert _same(again, truth) and _ask(again) == answers
    assert len(tried) == 4 and len(parsed) == 1, "believed files in a directory others can write"


def test_function_addresses_from_a_foreign_cache_file_are_ignored(tmp_path, monkeypatch):
    monkeypatch.setattr(symbols, "RUN_DIR", str(tmp_path))
    truth = symbols.function_ranges(("call_timer_fn",))
    [kept] = tmp_path.glob("ksyms-*.json")
    kept.write_text(json.dumps({"call_timer_fn": [1, 2]}))
    os.chown(kept, 65534, 65534)
    assert symbols.function_ranges(("call_timer_fn",)) == truth


def test_function_addresses_are_kept_from_other_users(tmp_path, monkeypatch):
    # kernel addresses give away the kernel's randomized base, which
    # kptr_restrict hides from other users in /proc/kallsyms
    monkeypatch.setattr(symbols, "RUN_DIR", str(tmp_path))
    tmp_path.chmod(0o755)
    truth = symbols.function_ranges(("call_timer_fn",))
    [kept] = tmp_path.glob("ksyms-*.json")
    assert kept.stat().st_mode & 0o777 == 0o600
    kept.chmod(0o644)  # as an older version wrote it
    assert symbols.function_ranges(("call_timer_fn",)) == truth
    assert kept.stat().st_mode & 0o777 == 0o600

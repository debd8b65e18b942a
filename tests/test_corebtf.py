"""The minimal CO-RE BTF (pytest_nettrace/kernel/corebtf.py): made once per boot,
used only when relocating against it changes no instruction."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from pytest_nettrace.kernel import corebtf
from pytest_nettrace.kernel.capabilities import object_path

needs_bpftool = pytest.mark.skipif(shutil.which("bpftool") is None,
                                   reason="bpftool (Debian package bpftool) is not installed")


@needs_bpftool
def test_made_checked_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv("NETTRACE_FULL_BTF", raising=False)  # ci/vm-test's guest sets it for its own sessions
    monkeypatch.setattr(corebtf, "RUN_DIR", str(tmp_path))
    obj = object_path("nettrace.bpf.o")
    assert corebtf.minimal_btf(obj) is None, "not made yet: the full BTF is used"
    path = corebtf.prepare(obj)
    assert path and path.startswith(str(tmp_path)) and os.path.getsize(path) < 100_000
    assert os.path.getsize(path) < os.path.getsize(corebtf.KERNEL_BTF) / 50
    assert corebtf.check(obj, path) is None

    def must_not_run(*args, **kwargs):
        raise AssertionError("a made BTF is reused as it is: no bpftool, no check")

    monkeypatch.setattr(corebtf, "check", must_not_run)
    monkeypatch.setattr(corebtf.subprocess, "run", must_not_run)
    assert corebtf.minimal_btf(obj) == path  # its cost: bench/bench_attach.py
    assert sorted(p.name for p in tmp_path.iterdir()) == [os.path.basename(path), os.path.basename(path) + ".lock"]


@needs_bpftool
def test_a_btf_missing_types_is_refused(tmp_path):
    # a minimal BTF made for the small capability probe lacks most types the
    # probes relocate against: relocations differ, so it must not be used
    other = tmp_path / "caps.btf"
    subprocess.run(["bpftool", "gen", "min_core_btf", corebtf.KERNEL_BTF, str(other), object_path("caps.bpf.o")],
                   check=True, capture_output=True)
    why = corebtf.check(object_path("nettrace.bpf.o"), str(other))
    assert why == "relocations against it differ from those against the full BTF"


def test_no_bpftool_or_another_btf_means_the_full_btf(tmp_path, monkeypatch):
    monkeypatch.setattr(corebtf, "RUN_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    assert corebtf.prepare(object_path("nettrace.bpf.o")) is None
    assert corebtf.prepare_in_background(object_path("nettrace.bpf.o")) is None
    assert corebtf.prepare(object_path("nettrace.bpf.o"), btf_path="/tmp/some-other.btf") is None
    assert list(tmp_path.iterdir()) == []


@needs_bpftool
def test_first_engine_of_a_boot_makes_it_for_the_next(tmp_path, monkeypatch):
    from pytest_nettrace.kernel.engine import Engine
    from pytest_nettrace.probes.registry import all_probes
    monkeypatch.delenv("NETTRACE_FULL_BTF", raising=False)
    monkeypatch.setattr(corebtf, "RUN_DIR", str(tmp_path))
    obj = object_path("nettrace.bpf.o")
    engine = Engine(probes=all_probes(), background=False)  # full BTF: nothing made yet
    engine.close()
    deadline = time.monotonic() + 120  # made in the background: seconds, minutes under emulation (ci/vm-test)
    while not corebtf.minimal_btf(obj) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert corebtf.minimal_btf(obj)
    engine = Engine(probes=all_probes(), background=False)  # this one relocates against it
    assert engine.describe() and all(st.plan for st in engine.status.values())
    engine.close()


@needs_bpftool
def test_partial_files_of_makers_that_died_are_removed(tmp_path, monkeypatch):
    """The maker runs in a daemon thread, which the interpreter's exit stops
    where it is (or the process is killed): its partial file stays. The next
    maker removes those nobody's lock covers, and keeps one being made."""
    import fcntl
    monkeypatch.delenv("NETTRACE_FULL_BTF", raising=False)
    monkeypatch.setattr(corebtf, "RUN_DIR", str(tmp_path))
    obj = object_path("nettrace.bpf.o")
    boot = corebtf.boot_id()
    dead = tmp_path / f"core-{boot}-0000000000000000.btf"
    busy = tmp_path / f"core-{boot}-1111111111111111.btf"
    for made in (dead, busy):
        (tmp_path / (made.name + ".lock")).touch()
        (tmp_path / (made.name + ".4242.tmp")).write_bytes(b"partial")
    with open(tmp_path / (busy.name + ".lock")) as held:
        fcntl.flock(held, fcntl.LOCK_EX)   # its maker is at work
        path = corebtf.prepare(obj)
        assert path is not None
        mine = os.path.basename(path)
        (tmp_path / (mine + ".4243.tmp")).write_bytes(b"partial")   # one of its own, abandoned
        os.unlink(path)
        assert corebtf.prepare(obj) == path
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
    assert left == [busy.name + ".4242.tmp"]


@needs_bpftool
def test_a_thread_that_finds_it_being_made_leaves_the_makers_file(tmp_path, monkeypatch):
    """Each Engine() of a process that finds no minimal BTF starts a maker;
    one that loses the lock to another thread of the same process used to
    remove the winner's partial file (same name: same pid), whose check then
    failed and marked the BTF unusable for the whole boot."""
    import threading
    monkeypatch.delenv("NETTRACE_FULL_BTF", raising=False)
    monkeypatch.setattr(corebtf, "RUN_DIR", str(tmp_path))
    obj = object_path("nettrace.bpf.o")
    checking = threading.Event()
    go_on = threading.Event()
    real_check = corebtf.check

    def slow_check(object_file: str, candidate: str, btf_path: str = corebtf.KERNEL_BTF):
        checking.set()
        go_on.wait(60)   # the other thread's attempt happens here
        return real_check(object_file, candidate, btf_path)

    monkeypatch.setattr(corebtf, "check", slow_check)
    made = []
    maker = threading.Thread(target=lambda: made.append(corebtf.prepare(obj)))
    maker.start()
    assert checking.wait(120)
    assert corebtf.prepare(obj) is None   # being made: the caller uses the full BTF this time
    go_on.set()
    maker.join(120)
    assert made and made[0] is not None, [p.name for p in tmp_path.iterdir()]
    assert not any(p.name.endswith(".unusable") for p in tmp_path.iterdir())

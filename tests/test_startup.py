"""Start-up: which processes of a session keep probes attached. An xdist
controller prints the session header (loading the probes once, to say how
they attach on this kernel) but runs no test; its workers load their own.
Observed from outside the engine: the BPF program and link descriptors a
process holds, as /proc/<pid>/fdinfo lists them."""
from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loads BPF programs)")

SUITE = '''
import os


def bpf_fds(pid):
    held = []
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = f.read()
        except OSError:
            continue
        if "prog_tag:" in info or "link_id:" in info:
            held.append(fd)
    return held


def test_only_the_workers_hold_probes(nettrace):
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
        assert b"pytest" in f.read(), "the worker's parent is not the controller"
    assert bpf_fds(os.getpid()), "this worker's own probes are not visible this way"
    assert bpf_fds(os.getppid()) == [], "the controller keeps probes attached"
'''


def test_an_xdist_controller_keeps_no_probes_attached(pytester):
    pytester.makepyfile(test_held=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "1", "-rA")
    out = result.stdout.str()
    assert "nettrace: probes: " in out, "the header no longer says how the probes attach"
    result.assert_outcomes(passed=1)

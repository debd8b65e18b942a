"""When a probe's best plan fails to load or attach, the engine moves that
probe (and only it) to its next plan. The failing probe is found from the
failing step itself — the attach call that raised, or the probe whose plan
does not load alone — never from libbpf's message text. Real kernel."""
from __future__ import annotations

import struct

import pytest

from pytest_nettrace.kernel.capabilities import features
from pytest_nettrace.kernel.engine import Engine
from pytest_nettrace.probes.base import Plan
from pytest_nettrace.probes.conn import ConnProbe
from pytest_nettrace.probes.rst import RstProbe
from pytest_nettrace.probes.sysctl import SysctlProbe


class _SysctlBadCgroup(SysctlProbe):
    def plans(self, kernel):
        real = super().plans(kernel)
        return [Plan("cgroup_sysctl (no such cgroup)", ["sysctl_write"],
                     cgroups={"sysctl_write": "/nonexistent-nettrace-cgroup"})] + real


class _RstUnloadable(RstProbe):
    """Its first plan uses fentry programs, which this kernel refuses to load."""

    def plans(self, kernel):
        return [Plan("tp_btf+fentry", ["rst_send_tp", "rst_v4_fentry", "rst_v6_fentry", "rst_recv_tp"],
                     config={"rst_cfg": struct.pack("<IIQQ", 1, 0, 0, 0)})] + super().plans(kernel)


# 1: one object; 2: the programs verified by two threads (SplitObject)
LOAD_PARTS = pytest.mark.parametrize("parts", [1, 2], ids=["one-object", "split"])


@LOAD_PARTS
def test_an_attach_failure_moves_only_its_probe_to_the_next_plan(parts):
    if not SysctlProbe().plans(features()):
        pytest.skip(f"no sysctl plan on this kernel: {SysctlProbe().unavailable_reason(features())}")
    engine = Engine(probes=[_SysctlBadCgroup(), ConnProbe()], background=False, load_parts=parts)
    try:
        st = engine.status["sysctl"]
        assert st.mechanism == "cgroup_sysctl+sys_exit", st.failures
        assert len(st.failures) == 1 and "nonexistent-nettrace-cgroup" in st.failures[0]
        assert engine.status["conn"].plan is not None and not engine.status["conn"].failures
    finally:
        engine.close()


@LOAD_PARTS
def test_a_load_failure_moves_only_its_probe_to_the_next_plan(parts):
    k = features()
    if k.fentry:
        pytest.skip("this kernel loads fentry programs: no plan here that fails to load")
    engine = Engine(probes=[_RstUnloadable(), ConnProbe()], background=False, load_parts=parts)
    try:
        st = engine.status["rst"]
        assert st.plan is not None and st.mechanism != "tp_btf+fentry", st.failures
        assert len(st.failures) == 1 and st.failures[0].startswith("tp_btf+fentry: ")
        # libbpf's own words, though the engine's first load keeps no log (a
        # plan loaded alone does): which program, and what the kernel said
        assert "prog 'rst_v4_fentry'" in st.failures[0] or "prog 'rst_v6_fentry'" in st.failures[0], st.failures
        assert engine.status["conn"].plan is not None and not engine.status["conn"].failures
    finally:
        engine.close()

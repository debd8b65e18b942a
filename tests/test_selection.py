"""Choosing the probes of a session (`--nettrace-probes`, ini `nettrace_probes`):
fewer probes, and a clear error for a kind whose probe was left out."""
from __future__ import annotations

import pytest

from pytest_nettrace.selection import kinds_of, probe_names, select

SUITE = '''
import pytest
from pytest_nettrace import NettraceError

def test_rst_still_works(netns, nettrace):
    nettrace.assert_no_rst()
    nettrace.assert_address_not_deleted()

def test_left_out_kind_is_named(netns, nettrace):
    with pytest.raises(NettraceError, match=r"packet events are not available: probe 'packet' not loaded "
                                            r"in this session \\(nettrace_probes = "):
        nettrace.packets()

@pytest.mark.nettrace(forbid=["drop"])
def test_gate_on_a_left_out_kind(netns):
    pass
'''


def test_select_names_exclusions_and_errors():
    every = probe_names()
    assert select("all") == (every, [])
    assert select("") == (every, [])
    assert select("rst, netchange") == (["netchange", "rst"], [n for n in every if n not in ("netchange", "rst")])
    loaded, left = select("-packet -syscall")
    assert "packet" not in loaded and set(left) == {"packet", "syscall"}
    assert set(kinds_of(["netchange"])) == {"addr", "link", "route", "neigh", "rule", "nexthop", "nft"}
    with pytest.raises(ValueError, match="unknown probe 'pakcet' in nettrace_probes; probes: conn, "):
        select("-pakcet")
    with pytest.raises(ValueError, match="leaves no probe"):
        select("rst -rst")


@pytest.mark.parametrize("how", ["option", "ini"])
def test_session_with_some_probes(pytester, how):
    pytester.makepyfile(test_some=SUITE)
    args = ["-p", "no:cacheprovider", "-rA"]
    if how == "option":
        args.append("--nettrace-probes=rst,netchange")   # (with '=': a value may start with '-')
    else:
        pytester.makeini("[pytest]\nnettrace_probes = -conn -drop -nftrace -packet -retransmit -syscall -sysctl "
                         "-traffic\n")
    result = pytester.runpytest_subprocess(*args)
    out = result.stdout.str()
    assert "nettrace: probes: netchange=" in out and ", rst=" in out and "drop=" not in out
    assert "not loaded (nettrace_probes): conn, drop, nftrace, packet, retransmit, syscall, sysctl, traffic" in out
    result.assert_outcomes(passed=2, skipped=1)  # (ini nettrace_unavailable = error makes it an error)
    assert "nettrace gate cannot be enforced: drop: probe 'drop' not loaded in this session" in out
    (line,) = [ln for ln in out.splitlines() if "gate cannot be enforced" in ln]
    assert "on this kernel" not in line   # it was left out, the kernel has it


def test_unknown_probe_is_a_usage_error(pytester):
    pytester.makepyfile(test_x="def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nettrace-probes=rst,rts")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "unknown probe 'rts' in nettrace_probes" in result.stderr.str()
    assert "Traceback" not in result.stderr.str()

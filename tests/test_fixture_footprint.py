"""Issue 14: a suite of a thousand traced tests must not grow with the test
count. What a finished test leaves in the process is its report's small
tally, never its trace, its events or its capture's sockets."""
from __future__ import annotations

INNER = """
import gc, weakref
from pytest_nettrace.events import Event

traces = []

def test_traced(make_netns, nettrace):
    a, b = make_netns(), make_netns()
    a.add_veth("eth0", b, "eth0", addresses=["10.0.0.1/24"], peer_addresses=["10.0.0.2/24"])
    nettrace.assert_no_rst()
    assert nettrace.events("addr")          # events were decoded and held while it ran
    traces.append(weakref.ref(nettrace))

def test_after():
    gc.collect()
    assert traces and traces[0]() is None, gc.get_referrers(traces[0]())
    kept = [o for o in gc.get_objects() if isinstance(o, Event)]
    assert kept == [], kept[:5]
"""


def test_a_finished_test_keeps_no_trace_and_no_events(pytester):
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=2)
    # the session summary is still made, from each test's tally
    assert "2 traced tests" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*1 traced test; events: *addr*"])

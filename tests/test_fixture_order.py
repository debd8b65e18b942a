"""Item 5: "watched from its creation" holds whatever the fixture order — a
fixture that builds the topology with `make_netns` before `nettrace` is set
up is seen whole — and where a namespace could only be watched late, the gap
is reported as lost events, never silently absent."""
from __future__ import annotations

import pytest

import subprocess
import sys

from pytest_nettrace import EventsLost, NothingWatched


@pytest.fixture
def topology(make_netns):
    a, b = make_netns(), make_netns()
    a.add_veth("eth0", b, "eth0", addresses=["10.0.0.1/24"], peer_addresses=["10.0.0.2/24"])
    return a, b


def test_topology_built_before_nettrace_is_seen(topology, nettrace):
    a, b = topology
    assert set(nettrace.watched) == {a.inode, b.inode}
    nettrace.assert_any("addr", action="added", address="10.0.0.1/24", dev="eth0", netns=a.inode)
    nettrace.assert_any("addr", action="added", address="10.0.0.2/24", dev="eth0", netns=b.inode)
    assert nettrace.lost() == 0


def test_nettrace_asked_for_late_reports_the_gap(make_netns, request):
    ns = make_netns()
    ns.add_dummy("d0", "192.0.2.1/24")
    trace = request.getfixturevalue("nettrace")   # after the namespace was made and changed
    assert trace.lost("addr") >= 1
    with pytest.raises(EventsLost, match="(?s)watched only after their creation.*" + ns.name):
        trace.assert_address_not_deleted()


REFUSED_ON_HOST = [sys.executable, "-c", "import socket; socket.socket().connect_ex(('127.0.0.1', 9))"]


def test_negative_assertions_refuse_to_pass_when_nothing_is_watched(nettrace):
    """A test that forgot `netns`: its RST happens in the host's namespace,
    which nothing watches; `assert_no_rst()` passed, whatever happened."""
    subprocess.run(REFUSED_ON_HOST, check=True)
    assert nettrace.watched == {}
    for negative in (nettrace.assert_no_rst, nettrace.assert_no_drops, nettrace.assert_no_packet,
                     nettrace.assert_address_not_deleted, lambda: nettrace.assert_none("conn"),
                     lambda: nettrace.assert_traffic(max_packets=0)):
        with pytest.raises(NothingWatched, match="watches no network namespace"):
            negative()
    assert nettrace.rst() == []   # reading is fine: the list is what it is
    nettrace.watch_host()
    nettrace.assert_no_syscall(name="listen")   # watched now: the assertion is sound

"""Root-free: a published event never changes. A decoder that learns more
later (who accepted a connection; that two netlink records raced) hands out
a new event superseding the earlier one, which stays as it was."""
from __future__ import annotations

import ipaddress

from pytest_nettrace.kernel import wire
from pytest_nettrace.probes.conn import ACCEPTED, ESTABLISHED, ConnEvent, ConnProbe
from pytest_nettrace.probes.netchange import AddrEvent

NS = 4026532000


def _conn_record(action: int, pid: int, comm: bytes) -> bytes:
    return wire.CONN_EVENT.pack(
        h=dict(ts=1_000_000 + action, netns=NS, kind=wire.Kind.CONN, pid=pid, tid=pid, ppid=1, comm=comm,
               pcomm=b"bash"),
        sk=0xffff8880dead0000, action=action, family=4, oldstate=3, newstate=1, has_birth=1, sport=9, dport=40000,
        saddr=bytes([10, 0, 0, 1]) + bytes(12), daddr=bytes([10, 0, 0, 2]) + bytes(12))


def test_corrected_is_a_new_event_and_the_earlier_stays():
    ev = AddrEvent(None, (), "process", action="deleted", pid=5, comm="ip", cause="netlink",
                   address=ipaddress.ip_interface("10.0.0.1/24"), timestamp=1, netns=NS)
    new = ev.corrected(pid=None, comm=None, cause="unknown")
    assert (ev.pid, ev.comm, ev.cause, ev.supersedes) == (5, "ip", "netlink", None)
    assert (new.pid, new.comm, new.cause, new.supersedes) == (None, None, "unknown", ev)
    assert type(new) is AddrEvent and new.address == ev.address and new.timestamp == ev.timestamp
    assert "supersedes" not in new.as_dict()


def test_accept_learned_after_establishment_is_a_correction():
    from pytest_nettrace.events import Header
    probe = ConnProbe()
    first = _conn_record(ESTABLISHED, 0, b"swapper/0")
    [established] = probe.decode(first, Header(first))
    assert isinstance(established, ConnEvent) and established.action == "accept" and established.pid is None
    second = _conn_record(ACCEPTED, 4242, b"server")
    [accepted] = probe.decode(second, Header(second))
    assert accepted.supersedes is established and (accepted.pid, accepted.comm) == (4242, "server")
    assert established.pid is None and established.comm is None   # what a test already holds is unchanged
    assert (accepted.action, accepted.state, accepted.sport) == ("accept", "ESTABLISHED", 9)

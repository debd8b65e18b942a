"""Root-free: a published event never changes. A decoder that learns more
later (who accepted a connection; that two netlink records raced) hands out
a new event superseding the earlier one, which stays as it was."""
from __future__ import annotations

import ipaddress

import pytest


from pytest_nettrace.events import NO_STACK, Header
from pytest_nettrace.kernel import wire
from pytest_nettrace.probes.conn import ACCEPTED, CLOSE, ESTABLISHED, ConnDecoder, ConnEvent
from pytest_nettrace.probes.netchange import AddrEvent
from pytest_nettrace.probes.rst import RstEvent
from records import record

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

    decoder = ConnDecoder()   # pure: records in, events out
    first = _conn_record(ESTABLISHED, 0, b"swapper/0")
    [established] = decoder.decode(first, Header(first))
    assert isinstance(established, ConnEvent) and established.action == "accept" and established.pid is None
    second = _conn_record(ACCEPTED, 4242, b"server")
    [accepted] = decoder.decode(second, Header(second))
    assert accepted.supersedes is established and (accepted.pid, accepted.comm) == (4242, "server")
    assert established.pid is None and established.comm is None   # what a test already holds is unchanged
    assert (accepted.action, accepted.state, accepted.sport) == ("accept", "ESTABLISHED", 9)



def test_accept_of_a_connection_reset_before_it_is_still_one_accept():
    """Established, reset by the peer (closed) and only then accept()ed: the
    accept's record names who took it, as a correction of the one accept."""
    decoder = ConnDecoder()
    events = []
    for action, pid, comm in ((ESTABLISHED, 0, b"swapper/0"), (CLOSE, 0, b"swapper/0"), (ACCEPTED, 4242, b"server")):
        rec = _conn_record(action, pid, comm)
        events += decoder.decode(rec, Header(rec))
    established, closed, accepted = events
    assert (established.action, closed.action, accepted.action) == ("accept", "close", "accept")
    assert accepted.supersedes is established and (accepted.pid, accepted.comm) == (4242, "server")
    # the socket's address, reused by the next connection, starts afresh
    rec = _conn_record(ESTABLISHED, 0, b"swapper/0")
    [again] = decoder.decode(rec, Header(rec))
    assert again.supersedes is None and again.pid is None

def test_an_event_is_immutable_and_its_fields_are_its_annotations():
    from pytest_nettrace.events import Event
    from pytest_nettrace.probes.registry import kinds
    ev = RstEvent(None, (), "softirq", sport=1, dport=2)
    for attempt in (lambda: setattr(ev, "sport", 2), lambda: setattr(ev, "sprot", 2), lambda: delattr(ev, "sport"),
                    lambda: setattr(ev, "_values", ())):
        with pytest.raises(AttributeError, match="immutable"):
            attempt()
    assert (ev.sport, ev.dport, ev.reason) == (1, 2, None)
    with pytest.raises(TypeError, match="no field 'sprot'"):
        RstEvent(None, (), "softirq", sprot=1)
    with pytest.raises(TypeError, match="declare fields as annotations"):
        type("Bad", (Event,), {"FIELDS": Event.FIELDS + ("x",)})
    for info in kinds().values():   # FIELDS: the annotations, base first (less WITHOUT), then DERIVED
        cls, declared = info.event_type, []
        for klass in reversed(cls.__mro__):
            declared += [f for f, t in vars(klass).get("__annotations__", {}).items()
                         if not f.startswith("_") and "ClassVar" not in str(t) and f not in declared
                         and f not in cls.EXTRA and f not in cls.WITHOUT and f not in vars(klass).get("__slots__", ())]
        derived = [f for klass in reversed(cls.__mro__) for f in vars(klass).get("DERIVED", ())
                   if f not in cls.WITHOUT]
        assert set(cls.FIELDS) == {"kind"} | set(declared) | set(derived), cls
        assert [f for f in cls.FIELDS if f in declared] == declared, cls
    # copies and pickles are the same event, still immutable
    import copy
    import pickle
    back = pickle.loads(pickle.dumps(ev))
    assert back.as_dict() == ev.as_dict() == copy.copy(ev).as_dict()
    with pytest.raises(AttributeError):
        back.sport = 3


def test_of_takes_the_fields_in_declaration_order():
    hdr = Header(record(wire.RST_EVENT, wire.Kind.RST))
    ev = RstEvent.of(hdr, NO_STACK, "softirq", "sent", "reply", 4, None, 1, None, 2, "CLOSE", None)
    assert (ev.direction, ev.origin, ev.family, ev.sport, ev.dport, ev.state) == ("sent", "reply", 4, 1, 2, "CLOSE")
    with pytest.raises(TypeError, match="takes its 9 own fields"):
        RstEvent.of(hdr, NO_STACK, "softirq", "sent")


def test_a_live_watch_shows_a_correction_in_place_of_what_it_corrects():
    """`nettrace watch` holds each event half a second: a correction arriving
    meanwhile replaces it (one line, the corrected one); one arriving later
    is shown as itself."""
    from pytest_nettrace.cli import Settling

    def addr(ts: int) -> AddrEvent:
        return AddrEvent(None, (), "process", action="added", pid=5, comm="ip", cause="netlink",
                         address=ipaddress.ip_interface(f"10.0.0.{ts}/24"), timestamp=ts, netns=NS)

    first, second, third = addr(1), addr(2), addr(3)
    settling = Settling(hold=0.5)
    assert settling.feed([first, second], now=10.0) == []        # held
    fixed = second.corrected(pid=None, cause="unknown")
    again = fixed.corrected(cause="kernel")
    assert settling.feed([fixed, again], now=10.2) == []
    assert settling.feed([third], now=10.5) == [first, again]    # in place of second, once
    late = first.corrected(cause="unknown")                      # first was shown already
    assert settling.feed([late], now=10.7) == []
    assert settling.feed([], now=11.0) == [third]
    assert settling.flush() == [late] and settling.flush() == []

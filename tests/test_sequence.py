"""nettrace.expect_sequence: the matcher on synthetic events (root-free), then
the real thing: addresses, connections and resets made by real processes."""
from __future__ import annotations

import ipaddress
import subprocess
import sys

import pytest

from pytest_nettrace import EventsLost, forbid, ref, step
from pytest_nettrace.kernel.engine import Engine
from pytest_nettrace.probes.conn import ConnEvent
from pytest_nettrace.probes.netchange import AddrEvent
from pytest_nettrace.probes.registry import all_probes
from pytest_nettrace.probes.rst import RstEvent
from pytest_nettrace.sequence import build, explain, match
from pytest_nettrace.trace import Trace

VIP = "10.0.0.100"


def addr(ts, action, address=VIP + "/24", comm="keepalived", netns=1):
    return AddrEvent(None, (), "process", timestamp=ts, netns=netns, pid=100, comm=comm, action=action,
                     address=ipaddress.ip_interface(address), dev="eth0")


def conn(ts, action, sport, dport=7000, pid=200):
    return ConnEvent(None, (), "process", timestamp=ts, netns=1, pid=pid, comm="client", action=action,
                     saddr=ipaddress.ip_address("10.0.0.50"), sport=sport,
                     daddr=ipaddress.ip_address(VIP), dport=dport)


def rst(ts, sport, dport=7000, direction="sent"):
    return RstEvent(None, (), "softirq", timestamp=ts, netns=1, pid=None, direction=direction,
                    saddr=ipaddress.ip_address("10.0.0.50"), sport=sport,
                    daddr=ipaddress.ip_address(VIP), dport=dport)


FAILOVER = [
    step("addr", action="deleted", address=VIP, as_="vip_gone"),
    step("addr", action="added", address=VIP, as_="vip_back"),
    forbid("rst", between=("vip_gone", "vip_back")),
]


# -- construction: every mistake is an error naming it ----------------------

@pytest.mark.parametrize("make, message", [
    (lambda: step("adr"), "unknown event kind 'adr'"),
    (lambda: step("addr", acton="deleted"), "unknown filter 'acton' for 'addr'"),
    (lambda: step("addr", action="delted"), "unknown action 'delted'"),
    (lambda: step("addr", address="10.0.0.300"), "invalid address '10.0.0.300'"),
    (lambda: step("conn", bind={"port": "sprt"}), "unknown field 'sprt' of 'conn'"),
    (lambda: step("rst", sprt=ref("port")), "unknown filter 'sprt' for 'rst'"),
    (lambda: forbid("rts", between=("a", "b")), "unknown event kind 'rts'"),
    (lambda: forbid("rst", between="a"), "two step names"),
    (lambda: build([step("rst", sport=ref("port"))]), "refers to ref('port'), which no earlier step binds"),
    (lambda: build([step("rst", sport=ref("port")), step("conn", bind={"port": "sport"})]),
     "which no earlier step binds"),
    (lambda: build([step("addr", as_="a"), forbid("rst", between=("a", "b"))]), "no step is named 'b'"),
    (lambda: build([step("addr", as_="a"), step("addr", as_="b"), forbid("rst", between=("b", "a"))]),
     "must come before"),
    (lambda: build([step("addr", as_="a"), step("addr", as_="a")]), "two steps are named 'a'"),
    (lambda: build([forbid("rst", between=("a", "b"))]), "at least one step"),
    (lambda: build([step("conn", bind=["sport"]), step("conn", bind=["sport"])]), "'sport' is bound twice"),
])
def test_mistakes_are_errors_naming_them(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()


# -- matching ------------------------------------------------------------------

def test_steps_match_in_time_order_with_others_between():
    events = [addr(1, "added", "10.0.0.1/24"), addr(2, "deleted"), conn(3, "connect", 40000),
              addr(4, "added")]
    out = match(build(FAILOVER), events)
    assert out.matched is not None
    assert [e.timestamp for e in out.matched] == [2, 4]
    assert out.matched["vip_back"].timestamp == 4


def test_order_matters():
    out = match(build(FAILOVER), [addr(1, "added"), addr(2, "deleted")])
    assert out.matched is None and out.failed_step == 1
    assert [e.timestamp for e in out.partial] == [2]


def test_a_forbidden_event_between_fails_and_is_named():
    out = match(build(FAILOVER), [addr(1, "deleted"), rst(2, 40000), addr(3, "added")])
    assert out.matched is None and out.failed_step == 1
    f, bad, end = out.violation
    assert (f.kind, bad.timestamp, end.timestamp) == ("rst", 2, 3)


def test_a_forbidden_kind_outside_the_window_is_fine():
    out = match(build(FAILOVER), [rst(1, 40000), addr(2, "deleted"), addr(3, "added"), rst(4, 40000)])
    assert out.matched is not None


def test_binding_carries_a_field_to_later_steps():
    seq = build([step("conn", action="connect", bind={"port": "sport"}),
                 step("rst", sport=ref("port")),
                 step("conn", action="close", sport=ref("port"))])
    # another connection's reset and close come first: they must not count
    events = [conn(1, "connect", 40000), conn(2, "connect", 40001), rst(3, 40001), conn(4, "close", 40001),
              rst(5, 40000), conn(6, "close", 40000)]
    out = match(seq, events)
    assert [e.timestamp for e in out.matched] == [1, 5, 6]
    assert out.matched.bound == {"port": 40000}


def test_backtracks_to_the_binding_that_works():
    # the first connect's port never sees a reset; the second's does
    seq = build([step("conn", action="connect", bind={"port": "sport"}), step("rst", sport=ref("port"))])
    out = match(seq, [conn(1, "connect", 40000), conn(2, "connect", 40001), rst(3, 40001)])
    assert out.matched.bound == {"port": 40001}


def test_bound_addresses_compare_as_addresses():
    seq = build([step("conn", action="connect", bind={"client": "saddr"}), step("rst", saddr=ref("client"))])
    assert match(seq, [conn(1, "connect", 1), rst(2, 1)]).matched is not None


def test_forbid_with_a_reference():
    seq = build([step("conn", action="connect", bind=["sport"], as_="open"),
                 step("conn", action="close", sport=ref("sport"), as_="closed"),
                 forbid("rst", sport=ref("sport"), between=("open", "closed"))])
    assert match(seq, [conn(1, "connect", 7), rst(2, 8), conn(3, "close", 7)]).matched is not None
    out = match(seq, [conn(1, "connect", 7), rst(2, 7), conn(3, "close", 7)])
    assert out.matched is None and out.violation[1].sport == 7


def test_a_later_window_without_the_forbidden_event_does_not_hide_the_broken_one():
    # the first failover reset something; the second did not. The forbids
    # judge the earliest story, never steer the choice: matched by the
    # second, "no reset during a failover" passed over the first one's reset
    events = [addr(1, "deleted"), rst(2, 1), addr(3, "added"), addr(4, "deleted"), addr(5, "added")]
    out = match(build(FAILOVER), events)
    assert out.matched is None and out.failed_step == 1
    assert out.violation is not None and out.violation[1].timestamp == 2
    assert [e.timestamp for e in out.partial] == [1]


def test_since_leaves_earlier_events_out():
    out = match(build(FAILOVER), [addr(1, "deleted"), addr(3, "added")], since=1)
    assert out.matched is None and out.failed_step == 0


def test_one_event_meets_one_step_only():
    seq = build([step("addr", action="deleted"), step("addr", action="deleted")])
    assert match(seq, [addr(1, "deleted")]).matched is None
    assert match(seq, [addr(1, "deleted"), addr(2, "deleted")]).matched is not None


def test_explain_says_what_met_each_step_and_what_did_not():
    seq = build([step("conn", action="connect", bind={"port": "sport"}, as_="open"),
                 step("rst", sport=ref("port")),
                 step("conn", action="close", sport=ref("port"))])
    out = match(seq, [conn(1, "connect", 40000), rst(2, 40001)])
    lines = explain(seq, out, lambda e: f"<{e.kind}@{e.timestamp}>")
    text = "\n".join(lines)
    assert "1. conn action='connect' as 'open' binding port=sport\n     met by: <conn@1>" in text
    assert "2. rst sport=ref('port')\n     NOT MET (with port=40000)" in text
    assert "3. conn action='close', sport=ref('port')\n     (not reached)" in text
    assert all(len(line) <= 100 for t in lines for line in t.splitlines())


# -- the real kernel ---------------------------------------------------------

SERVER = """
import socket
s = socket.socket(); s.bind(("10.0.0.1", 8080)); s.listen(); print("ready", flush=True)
c, _ = s.accept(); c.recv(1); print("got", flush=True); c.recv(1)
"""


def test_address_deleted_then_added_back_with_no_reset_between(netns, nettrace):
    netns.add_dummy("eth0", "10.0.0.1/24")
    netns.run(["ip", "addr", "del", "10.0.0.1/24", "dev", "eth0"], check=True)
    back = netns.run(["ip", "addr", "add", "10.0.0.1/24", "dev", "eth0"], check=True)
    m = nettrace.expect_sequence(
        step("addr", action="deleted", address="10.0.0.1/24", comm="ip", as_="gone", bind={"dev": "dev"}),
        step("addr", action="added", address="10.0.0.1/24", dev=ref("dev"), as_="back"),
        forbid("rst", between=("gone", "back")),
    )
    assert m["back"].pid == back.pid and m["gone"].timestamp < m["back"].timestamp


def test_connection_reset_on_its_own_port(make_netns, nettrace):
    """connect binds the client's port; the server's kernel then resets that
    very connection (its listener is gone), and the close follows."""
    server, client = make_netns(), make_netns()
    server.add_veth("eth0", client, "eth0", addresses=["10.0.0.1/24"], peer_addresses=["10.0.0.2/24"])
    daemon = server.popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert daemon.stdout.readline() == "ready\n"
    c = client.socket()
    c.connect(("10.0.0.1", 8080))
    c.sendall(b"x")
    assert daemon.stdout.readline() == "got\n"
    daemon.kill()  # its socket closes with nothing unread: FIN; our next segment gets a RST
    daemon.wait()
    c.sendall(b"y")
    m = nettrace.expect_sequence(
        step("conn", action="connect", dport=8080, bind={"port": "sport"}, as_="open"),
        step("rst", direction="received", dport=ref("port"), as_="reset"),
        step("conn", action="close", sport=ref("port")),
        timeout=5,
    )
    assert m.bound["port"] == c.getsockname()[1]
    assert m["open"].netns == client.inode and m["reset"].netns == client.inode


def test_failure_names_the_step_and_shows_what_met_the_others(netns, nettrace):
    netns.add_dummy("eth0", "10.0.0.1/24")
    netns.run(["ip", "addr", "del", "10.0.0.1/24", "dev", "eth0"], check=True)
    with pytest.raises(AssertionError) as exc:
        nettrace.expect_sequence(
            step("addr", action="deleted", address="10.0.0.1", as_="gone"),
            step("addr", action="added", address="10.0.0.1", as_="back"),
            timeout=0.2,
        )
    text = str(exc.value)
    assert text.startswith("sequence not met within 0.2s: step 2 (back) of 2 (addr) did not happen")
    assert "met by: " in text and 'ip addr del 10.0.0.1/24 dev eth0' in text
    assert "NOT MET" in text
    assert "network events (time since test start):" in text
    assert ">>" in text  # the event that met step 1 is marked in the timeline


def test_failure_names_the_forbidden_event(make_netns, nettrace):
    a, b = make_netns(), make_netns()
    a.add_veth("eth0", b, "eth0", addresses=["10.0.0.1/24"], peer_addresses=["10.0.0.2/24"])
    a.run(["ip", "addr", "add", "10.0.0.100/24", "dev", "eth0"], check=True)
    b.run([sys.executable, "-c", "import socket\ntry: socket.create_connection(('10.0.0.1', 9))\n"
           "except OSError: pass"], check=True)
    a.run(["ip", "addr", "del", "10.0.0.100/24", "dev", "eth0"], check=True)
    with pytest.raises(AssertionError) as exc:
        nettrace.expect_sequence(
            step("addr", action="added", address="10.0.0.100", as_="up"),
            step("addr", action="deleted", address="10.0.0.100", as_="down"),
            forbid("rst", between=("up", "down")),
            timeout=0.2,
        )
    text = str(exc.value)
    assert "a forbidden rst event came between 'up' and 'down'" in text
    assert "but forbidden before it (no rst (any) between 'up' and 'down'): " in text
    assert "first offending event:" in text and "RST sent" in text


def test_losses_make_a_forbid_fail(make_netns):
    """A one-page ring buffer, not drained while resets flood it: an rst
    event was lost and could have been in the window, so a forbid fails."""
    ns = make_netns()
    engine = Engine(ringbuf_size=4096, background=False,
                    probes=[p for p in all_probes() if p.name in ("netchange", "rst")])
    try:
        trace = Trace(engine, "tiny")
        trace.watch(ns)
        for argv in (["ip", "link", "add", "eth0", "type", "veth", "peer", "eth1"],
                     ["ip", "addr", "add", "10.0.0.1/24", "dev", "eth0"],
                     ["ip", "addr", "del", "10.0.0.1/24", "dev", "eth0"],
                     ["ip", "addr", "add", "10.0.0.1/24", "dev", "eth0"]):
            ns.run(argv, check=True)
            trace.events()  # drained as it goes: these fit
        assert trace.lost() == 0
        seq = [step("addr", action="deleted", as_="gone"),
               step("addr", action="added", address="10.0.0.1", as_="back")]
        trace.expect_sequence(*seq, forbid("rst", between=("gone", "back")))
        ns.run([sys.executable, "-c", "import socket\nfor _ in range(200):\n    s = socket.socket()\n"
                "    try: s.connect(('127.0.0.1', 9))\n    except OSError: pass\n    s.close()"], check=True)
        assert trace.lost("rst") > 0
        with pytest.raises(EventsLost, match=r"cannot assert no rst \(any\) between 'gone' and 'back': "
                                             r"\d+ rst events lost"):
            trace.expect_sequence(*seq, forbid("rst", between=("gone", "back")))
        trace.expect_sequence(*seq)  # without a forbid, losses do not matter
        trace.close()
    finally:
        engine.close()


def test_an_unavailable_or_mistyped_step_fails_before_waiting(nettrace):
    with pytest.raises(TypeError, match="takes step"):
        nettrace.expect_sequence("addr")


def test_a_bound_address_is_that_address_not_its_subnet():
    """An addr event's address carries its prefix (10.0.0.1/24); a filter's
    prefix means the subnet, so ref("ip") was met by neighbour 10.0.0.2."""
    import ipaddress
    from pytest_nettrace.probes.netchange import NeighEvent
    added = AddrEvent(None, (), "process", timestamp=1, netns=1, action="added",
                      address=ipaddress.ip_interface("10.0.0.1/24"))

    def neigh(ts: int, ip: str) -> NeighEvent:
        return NeighEvent(None, (), "softirq", timestamp=ts, netns=1, action="added", address=ipaddress.ip_address(ip))

    seq = build([step("addr", action="added", bind={"ip": "address"}), step("neigh", address=ref("ip"))])
    assert match(seq, [added, neigh(2, "10.0.0.2")]).matched is None
    assert [e.timestamp for e in match(seq, [added, neigh(2, "10.0.0.2"), neigh(3, "10.0.0.1")]).matched] == [1, 3]


def test_background_events_break_no_forbid_unless_named():
    """A fresh veth's link-scope multicast drops are background: they failed
    forbid('drop') and assert_none('drop') while gates and assert_no_drops
    left them out. All count them only where a filter names them."""
    import ipaddress
    from pytest_nettrace.probes.drop import DropEvent
    chatter = DropEvent(None, (), "softirq", timestamp=2, netns=1, reason="NOT_SPECIFIED", family=6,
                        daddr=ipaddress.ip_address("ff02::16"), location=None, length=90)
    assert chatter.background
    seq = build([step("addr", action="deleted", as_="gone"), forbid("drop", between=("gone", "back")),
                 step("addr", action="added", as_="back")])
    events = [addr(1, "deleted"), chatter, addr(3, "added")]
    assert match(seq, events).matched is not None
    named = build([step("addr", action="deleted", as_="gone"),
                   forbid("drop", reason="NOT_SPECIFIED", between=("gone", "back")),
                   step("addr", action="added", as_="back")])
    assert match(named, events).violation is not None

"""Packet capture per test (issue 5, tcpdump): AF_PACKET in each watched
namespace, header summaries as events, a pcapng that tcpdump reads back."""
from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time

import pytest

from pytest_nettrace import EventsLost
from pytest_nettrace.netns import NamespaceFactory
from traffic import clean_exchange, connect_refused, echo_once, script


@pytest.fixture
def pair(make_netns):
    server, client = make_netns(), make_netns()
    server.add_veth("eth0", client, "eth0", addresses=["10.0.0.1/24"], peer_addresses=["10.0.0.2/24"])
    return server, client


def tcp_exchange(server, port=8080):
    lst = server.socket()
    lst.bind(("10.0.0.1", port))
    lst.listen()
    t = threading.Thread(target=echo_once, args=(lst,))
    t.start()
    return lst, t


def test_handshake_flags_on_both_sides(pair, nettrace):
    server, client = pair
    lst, t = tcp_exchange(server)
    client.run(clean_exchange("10.0.0.1", 8080), check=True)
    t.join(5)
    lst.close()
    syn = nettrace.assert_packet(flags="S", dport=8080, netns=client.inode, direction="out")
    assert str(syn.saddr) == "10.0.0.2" and syn.dev == "eth0" and syn.proto == "tcp"
    seen = nettrace.packets(flags="S", dport=8080, netns=server.inode, direction="in")
    assert [e.seq for e in seen] == [syn.seq]
    synack = nettrace.assert_packet(tcp_flags="SA", sport=8080, netns=server.inode, direction="out")
    assert synack.flags == "S." and synack.ack == syn.seq + 1 and synack.tcp_flags == "AS"
    data = nettrace.packets(flags="P.", dport=8080, netns=client.inode)
    assert [(e.payload, e.payload_len) for e in data] == [(b"ping", 4)]
    assert nettrace.packets(flags=["F.", "FP."], netns=client.inode, direction="out")
    nettrace.assert_no_packet(tcp_flags=lambda f: f is not None and "R" in f)
    assert "Flags [S.], seq" in nettrace.tcpdump(flags="S.")


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump")
def test_pcap_reads_back_with_tcpdump(pair, nettrace):
    server, client = pair
    client.run(connect_refused("10.0.0.1", 9), check=True)
    path = nettrace.pcap_path
    assert path.endswith(".pcapng")
    out = subprocess.run(["tcpdump", "-nn", "-r", path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any("10.0.0.2." in ln and "> 10.0.0.1.9: Flags [S]" in ln for ln in lines), lines
    assert any("10.0.0.1.9 > 10.0.0.2." in ln and "Flags [R.]" in ln for ln in lines), lines
    # one pcap, both namespaces: the SYN leaves the client and reaches the server
    assert sum("> 10.0.0.1.9: Flags [S]" in ln for ln in lines) == 2
    # the pcap holds what was captured when it was written; IPv6 multicast
    # (MLD, DAD) may arrive any time after
    assert 0 < len(lines) <= len(nettrace.packets())


def test_capture_is_ready_before_the_body(netns, nettrace):
    # the very first packet of the test, sent at once
    netns.run(connect_refused("127.0.0.1", 9), check=True)
    (syn,) = nettrace.packets(flags="S", dport=9)
    assert syn.dev == "lo" and syn.direction == "in"  # loopback: counted once, as tcpdump does
    nettrace.assert_packet(flags="R.", sport=9)


def test_other_namespaces_are_not_captured(netns, nettrace):
    with NamespaceFactory() as f:
        other = f.create()
        other.run(connect_refused("127.0.0.1", 9), check=True)
        assert nettrace.packets() == []
        nettrace.assert_no_packet()


def test_udp_and_arp_summaries(pair, nettrace):
    server, client = pair
    client.run(script("""
        import socket
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"hello", ("10.0.0.1", 5353))
    """), check=True)
    udp = nettrace.assert_packet(proto="udp", dport=5353, netns=server.inode)
    assert udp.payload == b"hello" and udp.payload_len == 5 and udp.length == 14 + 20 + 8 + 5
    assert udp.family == 4
    arp = nettrace.assert_packet(proto="arp", netns=client.inode, direction="out")
    assert str(arp.daddr) == "10.0.0.1"
    icmp = nettrace.assert_packet(proto="icmp", netns=client.inode, direction="in")   # port unreachable
    assert icmp.icmp_type == 3
    # the ICMP message's length (its header and the quoted datagram), as tcpdump prints it
    assert icmp.payload_len == icmp.length - 14 - 20 == 8 + 20 + 8 + 5
    assert icmp.describe().endswith(f"ICMP type 3, length {icmp.payload_len}")


def _packet_sockets(ns):
    """(protocol, running) of each packet socket in `ns`, as /proc/net/packet lists them."""
    lines = ns.run(["cat", "/proc/net/packet"], check=True).stdout.splitlines()[1:]
    return sorted((int(f[3], 16), f[5] == "1") for f in map(str.split, lines))


def _closed_soon(ns, within: float = 2.0) -> list:
    """_packet_sockets(ns) once none is left, or as they are after `within`
    seconds: a capture at its cap closes its sockets in the background
    (each close waits for a grace period; the drain thread would wait)."""
    deadline = time.monotonic() + within
    while (left := _packet_sockets(ns)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


# the ring from the start (as the capture was until issue 14), or once the traffic asks for it
RING_FROM_START = pytest.mark.parametrize("ring_after", [0, None], ids=["ring-at-once", "ring-on-demand"])


@RING_FROM_START
def test_capture_stops_at_the_cap_and_says_so(netns, nettrace, monkeypatch, ring_after):
    import pytest_nettrace.probes.packet as packet
    monkeypatch.setattr(packet, "MAX_PACKETS", 3)
    if ring_after is not None:   # the trace started before the test body: watch again with it
        monkeypatch.setattr(packet, "RING_AFTER", ring_after)
        with NamespaceFactory() as f:
            netns = f.create()
            nettrace.watch(netns)
            _fills_the_cap(netns, nettrace)
        return
    _fills_the_cap(netns, nettrace)


def _fills_the_cap(netns, nettrace):
    netns.run(script("""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(10):
            s.sendto(b"x", ("127.0.0.1", 9))
    """), check=True)
    assert len(nettrace.packets()) == 3
    with pytest.raises(EventsLost, match=r"packet events lost"):
        nettrace.assert_no_packet(proto="tcp")
    # past the cap the capture no longer taps the devices (the kernel would
    # clone every packet sent for it): its sockets are closed
    assert _closed_soon(netns) == []
    netns.run(script("""
        import socket
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", 9))
    """), check=True)
    assert len(nettrace.packets()) == 3, "nothing more is kept"
    assert nettrace.lost("packet") > 0
    with pytest.raises(EventsLost, match=r"packet events lost"):
        nettrace.assert_no_packet(proto="tcp")


def test_the_captures_own_copies_are_no_drops(nettrace, monkeypatch):
    """At the cap the capture's sockets close and the kernel frees the frames
    still queued on them (QUEUE_PURGE, in the namespace): its own copies,
    never the network's packets, so no drop (an iperf3 run reported ~1,000)."""
    import pytest_nettrace.probes.packet as packet
    monkeypatch.setattr(packet, "MAX_PACKETS", 50)
    with NamespaceFactory() as f:
        ns = f.create()
        nettrace.watch(ns)   # with MAX_PACKETS below RING_AFTER: the queue socket alone
        with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
            sink.bind(("127.0.0.1", 0))
            ns.run(script(f"""
                import socket
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                for _ in range(200):
                    s.sendto(b"x", ("127.0.0.1", {sink.getsockname()[1]}))
            """), check=True)
            assert len(nettrace.packets()) == 50 and nettrace.lost("packet") > 0   # at the cap: closed
            assert _closed_soon(ns) == []
            assert nettrace.drop_summary().total() == 0, nettrace.drop_summary().text()
            nettrace.assert_no_drops(include_unspecified=True)


def test_unknown_filters_and_bad_addresses(nettrace):
    with pytest.raises(ValueError, match="unknown filter 'port' for 'packet' events"):
        nettrace.packets(port=80)
    with pytest.raises(ValueError, match="invalid saddr"):
        nettrace.packets(saddr="10.0.0.999")


def test_drops_make_negative_assertions_fail(netns, nettrace, monkeypatch):
    """A tiny ring, flooded faster than anything reads it: the kernel's drop
    counter reaches the assertion."""
    import pytest_nettrace.probes.packet as packet
    with NamespaceFactory() as f:
        other = f.create()
        monkeypatch.setattr(packet, "RING_FRAMES", 16)
        monkeypatch.setattr(packet, "RING_AFTER", 0)
        nettrace.watch(other)
        # the ring is set up in the background: until it takes over, the
        # (large) queue socket would hold the whole flood
        deadline = time.monotonic() + 30
        while _packet_sockets(other) != [(3, True), (3, True)] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _packet_sockets(other) == [(3, True), (3, True)], "the ring never took over"
        other.run(script("""
            import socket
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for _ in range(2000):
                s.sendto(b"x" * 1000, ("127.0.0.1", 9))
        """), check=True)
        assert nettrace.lost("packet") > 0
        with pytest.raises(EventsLost, match=r"\d+ packet events lost"):
            nettrace.assert_no_packet(dport=4242)


def test_a_quiet_namespace_gets_no_ring_a_busy_one_does(netns, nettrace):
    """Issue 14: the ring (8 MiB the kernel allocates and zeroes, another
    socket to make and close) is set up only when a namespace's traffic asks
    for it; a few packets stay with the queue socket, alone. /proc/net/packet
    is the kernel's own list: the ring's socket exists only once wanted, and
    is bound (hooked) only once it took over."""
    netns.run(connect_refused("127.0.0.1", 9), check=True)
    nettrace.assert_packet(flags="R.", sport=9)
    assert _packet_sockets(netns) == [(3, True)]   # ETH_P_ALL: the queue's, alone
    netns.run(script("""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(200):
            s.sendto(b"x", ("127.0.0.1", 9))
    """), check=True)
    assert len(nettrace.packets(proto="udp", dport=9)) == 200
    deadline = time.monotonic() + 30
    while _packet_sockets(netns) != [(3, True), (3, True)] and time.monotonic() < deadline:
        nettrace.packets()
        time.sleep(0.01)
    assert _packet_sockets(netns) == [(3, True), (3, True)]   # the ring's socket joined the group
    nettrace.assert_no_packet(proto="udp", dport=10)   # nothing was lost on the way


def test_the_rings_handover_leaves_the_queue_to_batched_reads_and_keeps_the_order():
    """A burst queued before the capture's ring exists: the handover to the
    ring reads none of it under the capture's lock (read there at once,
    thousands of frames kept the drain thread waiting while the event ring
    overflowed); the drain's reads take it a batch at a time, and a test's
    read gets the queued frames, then the ring's, in the order sent."""
    from pytest_nettrace.probes.packet import QUEUE_BATCH, PacketProbe
    burst, after = 3000, 100
    sender = """
        import socket, sys
        first, n, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(first, first + n):
            s.sendto(b"%06d" % i, ("127.0.0.1", port))
    """
    probe = PacketProbe()
    with NamespaceFactory() as f:
        ns = f.create()
        with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
            sink.bind(("127.0.0.1", 0))
            port = str(sink.getsockname()[1])
            probe.watch(ns.inode, ns.path)
            try:
                ns.run(script(sender) + ["0", str(burst), port], check=True)
                cap = probe._captures[ns.inode]
                assert probe.poll() is True            # a batch read, more left; the ring is wanted
                assert cap._ready.wait(10) and cap.ring is not None
                assert len(cap.pending) <= QUEUE_BATCH    # the handover read nothing (lo: each frame twice, one kept)
                ns.run(script(sender) + [str(burst), str(after), port], check=True)   # into the ring
                while probe.poll():
                    pass
                frames = probe.take(ns.inode)
            finally:
                probe.close()
    sent = [int(fr.ethernet[42:48]) for fr in frames if fr.ethernet[36:38] == int(port).to_bytes(2, "big")]
    assert sent == list(range(burst + after))

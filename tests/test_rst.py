"""TCP resets (issue 3): real traffic in real namespaces, real probes."""
from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import socket
import subprocess
import time

import pytest

from pytest_nettrace import EventsLost
from pytest_nettrace.kernel.engine import Engine
from pytest_nettrace.probes.registry import all_probes
from pytest_nettrace.netns import NamespaceFactory
from pytest_nettrace.trace import Trace

from traffic import (INJECT_RST, clean_exchange_over, connect_refused, linger_abort, script, tcpdump_start,
                     tcpdump_stop)



@pytest.mark.smoke
def test_connect_to_closed_port_rst_from_softirq(pair, nettrace):
    server, client, fam, a, b = pair
    r = client.run(connect_refused(a, 9), check=True)
    assert r.stdout.strip() == "refused"
    ev = nettrace.assert_rst(direction="sent", dport=lambda p: p > 1024, sport=9)
    assert ev.family == (4 if fam == socket.AF_INET else 6)
    assert str(ev.saddr) == a and str(ev.daddr) == b
    assert ev.origin == "reply" and ev.state == "CLOSE"
    assert ev.context == "softirq"
    assert ev.pid is None and ev.comm is None, "a softirq RST must not blame the interrupted task"
    assert ev.netns == server.inode
    assert ev.reason in (None, "NO_SOCKET")
    assert any(f.startswith(("tcp_v4_send_reset", "tcp_v6_send_reset")) for f in ev.stack), ev.stack
    # the client saw it arrive
    got = nettrace.assert_rst(direction="received", netns=client.inode)
    assert got.saddr == ev.saddr and got.sport == 9


@pytest.mark.smoke
def test_linger_zero_close_is_active_rst_by_that_process(pair, nettrace):
    server, client, fam, a, b = pair
    lst = server.socket(fam)
    lst.bind((a, 0))
    lst.listen()
    port = lst.getsockname()[1]
    r = client.run(linger_abort(a, port), check=True)
    local_port = int(r.stdout)
    ev = nettrace.assert_rst(direction="sent", origin="active", sport=local_port)
    assert ev.pid == r.pid and ev.tid == r.pid
    assert ev.comm == os.path.basename(r.argv[0])[:15]
    assert ev.context == "process" and ev.uid == os.geteuid()
    assert str(ev.saddr) == b and ev.dport == port
    assert ev.reason is None or ev.reason.isupper()  # the kernel's name, e.g. TCP_STATE
    assert ev.ppid == os.getpid()
    lst.close()


@pytest.mark.smoke
def test_clean_close_sends_no_rst(pair, nettrace):
    server, client, fam, a, b = pair
    clean_exchange_over(server, client, fam, a)
    nettrace.assert_no_rst()
    assert nettrace.rst() == []


def test_rst_in_unwatched_namespace_is_not_seen(netns, nettrace):
    with NamespaceFactory() as other_factory:  # not the test's own: not watched
        other = other_factory.create()
        other.run(connect_refused("127.0.0.1", 9), check=True)
        netns.run(connect_refused("127.0.0.1", 9), check=True)
        seen = nettrace.rst(direction="sent")
        assert len(seen) == 1 and seen[0].netns == netns.inode
        assert nettrace.rst(netns=other.inode) == []


def test_watch_adds_a_namespace(nettrace):
    with NamespaceFactory() as f:
        other = f.create()
        nettrace.watch(other)
        other.run(connect_refused("127.0.0.1", 9), check=True)
        assert nettrace.assert_rst(netns=other.inode).sport == 9


def test_failed_assert_no_rst_shows_timeline_and_stack(netns, nettrace):
    netns.run(connect_refused("127.0.0.1", 9), check=True)
    with pytest.raises(AssertionError) as info:
        nettrace.assert_no_rst(direction="sent")
    text = str(info.value)
    assert "expected no rst events matching direction='sent', saw 1" in text
    assert ">>" in text and "RST sent (reply) 127.0.0.1:9 >" in text
    assert "kernel stack:" in text and "tcp_v4_send_reset+0x" in text
    assert netns.name in text
    assert all(len(line) <= 100 for line in text.splitlines())


def test_assert_rst_times_out_with_a_clear_failure(netns, nettrace):
    with pytest.raises(AssertionError, match="timed out after 0.1s waiting for a rst event matching dport=1"):
        nettrace.assert_rst(timeout=0.1, dport=1)


def test_unknown_filter_and_kind_are_usage_errors(nettrace):
    with pytest.raises(ValueError, match="unknown filter 'dprot' for 'rst' events; valid: .*dport"):
        nettrace.rst(dprot=80)
    with pytest.raises(ValueError, match="unknown event kind 'rest'; valid kinds: .*rst"):
        nettrace.events("rest")
    with pytest.raises(ValueError, match="invalid daddr '10.0.0.300'"):
        nettrace.rst(daddr="10.0.0.300")


def test_forced_loss_makes_assert_no_rst_fail(make_netns):
    """A one-page ring buffer, not drained while a flood happens: loss is counted
    in the kernel and the negative assertion refuses to pass."""
    ns = make_netns()
    engine = Engine(probes=all_probes(), ringbuf_size=4096, background=False)
    try:
        trace = Trace(engine, "tiny")
        trace.watch(ns)
        ns.run(connect_refused("127.0.0.1", 9)[:-1] + [
            "import socket\nfor _ in range(200):\n    s = socket.socket()\n"
            "    try: s.connect(('127.0.0.1', 9))\n    except OSError: pass\n    s.close()"], check=True)
        assert trace.lost("rst") > 0
        with pytest.raises(EventsLost, match=r"\d+ rst events lost"):
            trace.assert_no_rst(dport=4242)  # matches nothing that was delivered
        trace.close()
    finally:
        engine.close()


def test_records_past_the_traces_limit_are_counted_lost_not_kept(netns, nettrace):
    """A connection storm or a flood in a test would make a trace keep
    everything: past its limit, records are counted, not kept, and count as
    lost for every kind that comes as records, so negative assertions fail
    (kinds with sources of their own, the capture, are not affected)."""
    trace = Trace(nettrace.engine, "limited", max_records=20)
    try:
        trace.watch(netns)
        netns.run(connect_refused("127.0.0.1", 9, times=100), check=True)
        assert trace.lost("rst") > 0 and trace.records_dropped > 0
        assert trace.lost("conn") == trace.lost("syscall") == trace.records_dropped
        assert trace.lost("packet") == 0
        assert len(trace.rst()) + len(trace.connections()) + len(trace.syscalls()) <= 20
        with pytest.raises(EventsLost, match=r"records past this trace's limit of 20\s+were not kept\s+"
                                             r"\(nettrace_max_records"):
            trace.assert_no_rst(dport=4242)   # matches nothing that was kept
        with pytest.raises(AssertionError, match=r"records past this trace's\s+limit of 20"):
            trace.assert_rst(dport=4242, timeout=0.1)
    finally:
        trace.close()
    with pytest.raises(ValueError, match="max_records must be 0"):
        Trace(nettrace.engine, "bad", max_records=-1)


def test_closed_trace_is_a_clear_error(netns, nettrace):
    nettrace.close()
    with pytest.raises(Exception, match="closed at the end of its test"):
        nettrace.rst()


def test_a_record_the_decoder_fails_on_counts_as_lost(netns, nettrace, monkeypatch):
    """A decoder bug must not let a negative assertion pass."""
    probe = nettrace.engine.status["rst"].probe
    monkeypatch.setattr(probe.decoder, "decode", lambda buf, hdr: 1 / 0)
    netns.run(connect_refused("127.0.0.1", 9), check=True)
    with pytest.raises(EventsLost, match=r"\d+ rst events lost"):
        nettrace.assert_no_rst()


def test_a_negative_assertion_drains_the_ring_once(netns, nettrace, monkeypatch):
    """assert_no_rst() reads the events (which drains) and then the loss
    counters, without draining again: counters read after that read cover
    every event it could have missed (test_reliability: a flooded ring
    still fails it, with the count)."""
    import threading
    engine = nettrace.engine
    real, drains = engine.drain, []

    def drain() -> int:
        if threading.current_thread() is threading.main_thread():   # not the drain thread's
            drains.append(1)
        return real()

    monkeypatch.setattr(engine, "drain", drain)
    nettrace.assert_no_rst()
    assert len(drains) == 1


RESET_SERVER = """
    import socket, threading
    def listener(port):
        lst = socket.socket()
        lst.bind(("10.0.0.1", port))
        lst.listen()
        return lst
    hold, unread = listener(8001), listener(8002)
    def serve_hold():      # the client aborts these (SO_LINGER 0): read until the reset
        while True:
            conn, _ = hold.accept()
            try:
                while conn.recv(4096):
                    pass
            except ConnectionResetError:
                pass
            conn.close()
    def serve_unread():    # closed with the client's data unread: the kernel resets them
        while True:
            conn, _ = unread.accept()
            conn.recv(1, socket.MSG_PEEK)
            conn.close()
    for serve in (serve_hold, serve_unread):
        threading.Thread(target=serve, daemon=True).start()
    print("ready", flush=True)
    input()
"""

RESET_CLIENT = """
    import socket, struct
    for _ in range({n}):   # aborted
        s = socket.create_connection(("10.0.0.1", 8001))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    for _ in range({n}):   # reset by the server
        s = socket.create_connection(("10.0.0.1", 8002))
        s.sendall(b"never read")
        try:
            s.recv(1)
        except ConnectionResetError:
            pass
        s.close()
"""


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump (ci/apt-packages.txt)")
def test_every_reset_on_the_wire_is_an_event_on_both_sides(make_netns, nettrace, tmp_path):
    """tcpdump on each end of the veth: every RST segment it saw is one event
    in that namespace (sent by one side, received by the other), with the
    segment's own addresses and ports — refused connects, aborts, and data
    left unread."""
    server, client = make_netns(), make_netns()
    server.add_veth("eth0", client, "eth0", addresses=["10.0.0.1/24"], peer_addresses=["10.0.0.2/24"])
    n = 4
    dumps = {}
    for ns in (server, client):
        path = tmp_path / f"{ns.inode}.pcap"
        dump = ns.popen(["tcpdump", "-Z", "root", "-nn", "-i", "eth0", "-U", "--immediate-mode", "-w", str(path),
                         "tcp[tcpflags] & tcp-rst != 0"], stderr=subprocess.PIPE, text=True)
        assert "listening on" in dump.stderr.readline()
        dumps[ns] = (dump, path)
    daemon = server.popen(script(RESET_SERVER), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout.readline().strip() == "ready"
        # refused: the server's kernel answers each SYN with a reset
        client.run(connect_refused("10.0.0.1", 9, times=n), check=True)
        client.run(script(RESET_CLIENT.format(n=n)), check=True)
        # each tcpdump has written what it saw (-U) once its file stops growing
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_rst_lines(path) != 3 * n for _, path in dumps.values()):
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        daemon.stdin.close()
        daemon.wait(5)
        for dump, _ in dumps.values():
            dump.send_signal(signal.SIGINT)
            dump.communicate(timeout=10)
    for ns, (_, path) in dumps.items():
        wire = sorted(_rst_lines(path, parse=True))
        ours = sorted((str(e.saddr), e.sport, str(e.daddr), e.dport) for e in nettrace.rst(netns=ns.inode))
        assert len(wire) == 3 * n, wire
        assert ours == wire, (ns, nettrace.rst(netns=ns.inode))
    assert nettrace.lost("rst") == 0
    directions = sorted(e.direction for e in nettrace.rst(netns=client.inode))
    assert directions == ["received"] * 2 * n + ["sent"] * n


def _rst_lines(path, parse: bool = False):
    """The RST segments in a tcpdump file: their count, or (src, sport, dst, dport) each."""
    if not path.exists():
        return [] if parse else 0
    out = subprocess.run(["tcpdump", "-nn", "-r", str(path)], capture_output=True, text=True).stdout
    segs = [(m[1], int(m[2]), m[3], int(m[4])) for m in
            re.finditer(r"IP (\S+)\.(\d+) > (\S+)\.(\d+): Flags \[[^\]]*R", out)]
    return segs if parse else len(segs)


def _capture_rsts(ns, path):
    return tcpdump_start(ns, path, "(tcp[tcpflags] & tcp-rst != 0) or (ip6 and ip6[6] == 6 and ip6[53] & 4 != 0)")


def _veth_pair(make_netns):
    server, client = make_netns(), make_netns()
    server.add_veth("eth0", client, "eth0", addresses=["10.0.0.1/24"], peer_addresses=["10.0.0.2/24"])
    return server, client


def _inject_rst(ns, src, dst, sport, dport, seq):
    ns.run(script(INJECT_RST) + [src, dst, str(sport), str(dport), str(seq)], check=True)


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump (ci/apt-packages.txt)")
def test_rst_killing_a_time_wait_socket_is_received(make_netns, nettrace, tmp_path):
    """tcp_receive_reset fires only for full sockets: an in-window RST that
    kills a TIME_WAIT socket (RFC 1337 assassination) is one received event
    all the same, named by the state it hit, as tcpdump saw it arrive."""
    server, client = _veth_pair(make_netns)
    lst = server.socket(socket.AF_INET)
    lst.bind(("10.0.0.1", 8080))
    lst.listen()
    conn = client.socket(socket.AF_INET)
    conn.connect(("10.0.0.1", 8080))
    peer, _ = lst.accept()
    cport = conn.getsockname()[1]
    conn.close()                     # the client closes first: TIME_WAIT on its side
    assert peer.recv(1) == b""
    peer.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "TIME-WAIT" not in client.run(["ss", "-tanH"], check=True).stdout:
        time.sleep(0.05)
    fin = [e for e in nettrace.packets(netns=client.inode, direction="in", sport=8080) if "F" in (e.tcp_flags or "")]
    seq = (fin[-1].seq + 1) & 0xFFFFFFFF            # the TIME_WAIT socket's rcv_nxt: in window
    dump = _capture_rsts(client, tmp_path / "c.pcap")
    try:
        _inject_rst(server, "10.0.0.1", "10.0.0.2", 8080, cport, seq)
    finally:
        tcpdump_stop(dump)
    assert "TIME-WAIT" not in client.run(["ss", "-tanH"], check=True).stdout, "the kernel acted on the RST"
    assert _rst_lines(tmp_path / "c.pcap", parse=True) == [("10.0.0.1", 8080, "10.0.0.2", cport)]
    got = nettrace.rst(netns=client.inode)
    assert [(e.direction, str(e.saddr), e.sport, e.dport, e.state) for e in got] == [
        ("received", "10.0.0.1", 8080, cport, "TIME_WAIT")], got
    assert got[0].context == "softirq" and got[0].pid is None
    with pytest.raises(AssertionError, match="RST received 10.0.0.1:8080 > 10.0.0.2:\\d+ state TIME_WAIT"):
        nettrace.assert_no_rst(netns=client.inode)
    lst.close()


def test_rst_reaching_an_orphan_in_fin_wait2_is_received(pair, nettrace):
    """A closed socket waiting for its peer's FIN is a time-wait sock in
    FIN_WAIT2: the peer's abort reaches it with no tcp_receive_reset."""
    server, client, fam, a, b = pair
    lst = server.socket(fam)
    lst.bind((a, 0))
    lst.listen()
    conn = client.socket(fam)
    conn.connect((a, lst.getsockname()[1]))
    peer, _ = lst.accept()
    cport = conn.getsockname()[1]
    conn.close()
    assert peer.recv(1) == b""       # its FIN arrived; ours is never sent
    deadline = time.monotonic() + 5  # and its ACK made the client's socket a FIN_WAIT2 orphan
    while time.monotonic() < deadline and "FIN-WAIT-2" not in client.run(["ss", "-tanH"], check=True).stdout:
        time.sleep(0.05)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()                     # an abort: RST to the orphan
    got = nettrace.assert_rst(direction="received", netns=client.inode)
    assert (str(got.saddr), got.dport, got.state) == (a, cport, "FIN_WAIT2")
    time.sleep(0.2)
    assert len(nettrace.rst(netns=client.inode)) == 1, "one RST, one event"
    lst.close()


def test_rst_to_no_socket_is_received_once(make_netns, nettrace):
    """A RST that reaches TCP for no socket kills nothing and is answered by
    nothing: a received event still, one, in state CLOSE (no socket)."""
    server, client = _veth_pair(make_netns)
    _inject_rst(client, "10.0.0.2", "10.0.0.1", 5555, 7, 1)
    got = nettrace.assert_rst(direction="received", netns=server.inode)
    assert (str(got.saddr), got.sport, got.dport, got.state) == ("10.0.0.2", 5555, 7, "CLOSE")
    time.sleep(0.2)
    assert len(nettrace.rst()) == 1, "a RST is never answered, and is one event"

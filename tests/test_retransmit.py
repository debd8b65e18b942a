"""TCP retransmissions (issue 5): loss made with nftables rules (no netem here)."""
from __future__ import annotations

import errno
import socket
import struct
import threading
import time

import pytest

from pytest_nettrace.kernel.capabilities import features

from traffic import byte_sink, byte_source, clean_exchange, echo_once



def lose_incoming(ns, match: str, first: int = 1) -> None:
    """Drop the first `first` packets matching `match` on arrival in ns.
    (On arrival: a local output drop is reported to TCP, which just sends
    again later instead of retransmitting.)"""
    ns.run(["nft", "-f", "-"], check=True, input=f"""
        table inet lossy {{
            chain in {{
                type filter hook input priority 0;
                {match} numgen inc mod {first + 1000} < {first} drop
            }}
        }}
    """)


def echo_server(ns, fam: int, host: str):
    lst = ns.socket(fam)
    lst.bind((host, 0))
    lst.listen()
    t = threading.Thread(target=echo_once, args=(lst,), daemon=True)
    t.start()
    return lst, t


def test_lost_data_segment_is_retransmitted(pair, nettrace):
    server, client, fam, a, b = pair
    lst, t = echo_server(server, fam, a)
    port = lst.getsockname()[1]
    lose_incoming(server, f"tcp dport {port} tcp flags & psh == psh", first=2)
    r = client.run(clean_exchange(a, port), check=True)
    t.join(10)
    lst.close()
    first = nettrace.assert_retransmit(dport=port, state="ESTABLISHED")
    assert first.type in ("retransmit", "loss_probe") and first.count == 1
    assert str(first.saddr) == b and str(first.daddr) == a and first.netns == client.inode
    # Lost twice, the segment is normally sent a third time by the RTO timer
    # and reported as #2. Under load (seen once in ~15 runs of the suite at
    # -n 2) the kernel got it through with no second report (no event was
    # lost); the counting is checked whenever the kernel reports it.
    again = nettrace.retransmits(dport=port, seq=first.seq)
    assert [e.count for e in again] == list(range(1, len(again) + 1))
    if len(again) >= 2:
        second = again[1]
        assert second.total_retrans > first.total_retrans
        assert second.pid is None, "timer retransmits run in softirq: nobody to blame"
    assert nettrace.assert_drop(reason="NETFILTER_DROP", dport=port).netns == server.inode
    nettrace.assert_no_retransmits(dport=port, type="syn")
    with pytest.raises(AssertionError, match="expected no retransmit events"):
        nettrace.assert_no_retransmits()
    assert r.returncode == 0


def test_lost_syn_is_a_syn_retransmit(pair, nettrace):
    server, client, fam, a, b = pair
    lst, t = echo_server(server, fam, a)
    port = lst.getsockname()[1]
    lose_incoming(server, f"tcp dport {port} tcp flags & (syn|ack) == syn")
    client.run(clean_exchange(a, port), check=True)
    t.join(10)
    lst.close()
    ev = nettrace.assert_retransmit(type="syn", dport=port)
    assert ev.state == "SYN_SENT" and ev.count == 1 and ev.netns == client.inode
    assert any(f.startswith("tcp_retransmit_timer") for f in ev.stack), ev.stack


def test_lost_synack_is_a_synack_retransmit(pair, nettrace):
    server, client, fam, a, b = pair
    lst, t = echo_server(server, fam, a)
    port = lst.getsockname()[1]
    lose_incoming(client, f"tcp sport {port} tcp flags & (syn|ack) == syn|ack")
    client.run(clean_exchange(a, port), check=True)
    t.join(10)
    lst.close()
    ev = nettrace.assert_retransmit(type="synack")
    assert ev.netns == server.inode and ev.sport == port and str(ev.saddr) == a and str(ev.daddr) == b
    # The request's timer and the client's repeated SYN may both resend it, on two
    # CPUs at about the same instant (seen under load): the count starts at 1 and
    # grows by one per resend, whichever was stamped first.
    counts = sorted(e.total_retrans for e in nettrace.retransmits(type="synack", sport=port))
    assert counts == list(range(1, len(counts) + 1))


def test_clean_exchange_retransmits_nothing(pair, nettrace):
    server, client, fam, a, b = pair
    lst, t = echo_server(server, fam, a)
    client.run(clean_exchange(a, lst.getsockname()[1]), check=True)
    t.join(10)
    lst.close()
    nettrace.assert_accepted()
    nettrace.assert_no_retransmits()
    nettrace.assert_no_drops()
    assert nettrace.retransmits() == []


def test_unknown_filter_is_a_usage_error(nettrace):
    with pytest.raises(ValueError, match="unknown filter 'cnt' for 'retransmit' events; valid: .*count"):
        nettrace.retransmits(cnt=1)


def _failed_attempts_traced() -> bool:
    """tcp_retransmit_skb fires for failed attempts too, with their `err` (6.14+)."""
    return (features().tracepoint_args("tcp_retransmit_skb") or 0) >= 3


def _untraced_segments(events) -> int:
    """The segments each socket's total_retrans grew by beyond its events' own
    `segs` (from 0, an active open's): what the kernel counted with no event."""
    last: dict = {}
    grown = 0
    for e in events:
        key = (e.saddr, e.sport, e.daddr, e.dport)
        grown += e.total_retrans - last.get(key, 0) - e.segs
        last[key] = e.total_retrans
    return grown


def _tcp_mib(ns) -> dict:
    """The namespace's TCP counters as nstat reads them (Tcp: and TcpExt:)."""
    out = {}
    for path, prefix in (("/proc/net/snmp", "Tcp:"), ("/proc/net/netstat", "TcpExt:")):
        rows = [line.split() for line in ns.run(["cat", path], check=True).stdout.splitlines()
                if line.startswith(prefix)]
        out.update(zip(rows[0][1:], map(int, rows[1][1:])))
    return out


def test_retransmitted_segments_add_up_to_the_kernels_count(pair, nettrace):
    """Under loss, the segments of the sender's retransmit events add
    up to its namespace's TcpRetransSegs (nstat), and those of the events
    that did not go out (`err`) to TCPRetransFail; before 6.14 those are no
    events. One event can carry many segments: a GSO-sized skb of the write
    queue sent again whole."""
    server, client, _fam, a, _b = pair
    # loss on arrival, so the sender retransmits (a local output drop would be
    # reported to TCP, which sends again without retransmitting). One data
    # packet in 16, not a random 3%: 8 MiB can be ~130 GSO-sized packets, and
    # a random 3% lost none of them about once in 50 runs.
    server.run(["nft", "-f", "-"], check=True, input="""
        table inet lossy {
            chain in {
                type filter hook input priority 0;
                tcp dport 8000 meta length > 200 numgen inc mod 16 == 7 drop
            }
        }
    """)
    nbytes = 8 << 20
    before = _tcp_mib(client)
    sink = server.popen(byte_sink(a, 8000), stdout=-1, text=True)
    assert sink.stdout.readline().strip() == "ready"
    client.run(byte_source(a, 8000, nbytes), check=True, timeout=60)
    assert int(sink.stdout.readline()) == nbytes
    sink.wait(5)
    after = _tcp_mib(client)
    retrans = after["RetransSegs"] - before["RetransSegs"]
    failed = after["TCPRetransFail"] - before["TCPRetransFail"]
    traced = _failed_attempts_traced()
    ours = nettrace.retransmits(netns=client.inode)
    assert nettrace.lost("retransmit") == 0
    assert retrans > 0, "no retransmission: the test proves nothing"
    missing = (retrans if traced else retrans - failed) - sum(e.segs for e in ours)
    # 6.18 here, about once in 700 runs: segments the kernel counts with neither
    # the tracepoint firing nor a packet reaching the device (bpftrace on both);
    # the socket's next event shows them as a total_retrans jump. Only that
    # shortfall, all of it, is let pass, and said.
    if missing and missing == _untraced_segments(ours) - (0 if traced else failed):
        pytest.xfail(f"the kernel counted {missing} retransmitted segments without tcp_retransmit_skb firing "
                     "(README, retransmit: seen as a total_retrans jump)")
    assert missing == 0, [(e.type, e.seq, e.segs, e.total_retrans, e.err) for e in ours]
    assert sum(e.segs for e in ours if e.err) == (failed if traced else 0)


def _tcp_info(sock) -> tuple:
    """(tcpi_backoff, tcpi_total_retrans): RTO attempts since the last ACK
    that advanced, and the retransmitted segments the kernel counted (ss's
    `retrans`)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return info[4], struct.unpack_from("<I", info, 100)[0]


def _stalled_connection(server, client, fam, a):
    """A connection whose next data the server drops on arrival, so the client
    retransmits it: (client socket, port, the server's reader thread and its
    byte count). The client's first bytes got through (an RTT sample: RTO
    200 ms, not the initial 1 s)."""
    lst = server.socket(fam)
    lst.bind((a, 0))
    lst.listen()
    port = lst.getsockname()[1]
    got = [0]

    def read_all():
        conn, _ = lst.accept()
        while chunk := conn.recv(1 << 16):
            got[0] += len(chunk)
        conn.close()
        lst.close()

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    c = client.socket(fam)
    c.connect((a, port))
    c.sendall(b"x" * 1000)
    deadline = time.monotonic() + 5
    while got[0] < 1000 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.run(["nft", "-f", "-"], check=True, input=f"""
        table inet lossy {{
            chain in {{ type filter hook input priority 0; tcp dport {port} meta length > 200 drop; }}
        }}
    """)
    return c, port, reader, got


def _wait_backoff(sock, n: int) -> None:
    deadline = time.monotonic() + 10
    while _tcp_info(sock)[0] < n:
        assert time.monotonic() < deadline, "the retransmission timer did not back off"
        time.sleep(0.02)


def test_a_counted_retransmission_dropped_on_output_is_one_with_its_error(pair, nettrace):
    """6.14+: the kernel counts a retransmission (TcpRetransSegs, the socket's
    total_retrans) before sending it; when the send then fails — here
    netfilter drops it on output, -EPERM — it is still a retransmission, with
    that `err` (TcpExtTCPRetransFail counts those segments too)."""
    if not _failed_attempts_traced():
        pytest.skip("before 6.14 tcp_retransmit_skb fires only for retransmissions that went out")
    server, client, fam, a, _b = pair
    before = _tcp_mib(client)
    c, port, reader, got = _stalled_connection(server, client, fam, a)
    c.sendall(b"y" * 3000)
    # the data left (and was lost): from now on the client's own output fails
    nettrace.assert_drop(reason="NETFILTER_DROP", dport=port)
    client.run(["nft", "-f", "-"], check=True, input=f"""
        table inet block {{
            chain out {{ type filter hook output priority 0; tcp dport {port} drop; }}
        }}
    """)
    _wait_backoff(c, 2)
    server.run(["nft", "delete", "table", "inet", "lossy"], check=True)
    client.run(["nft", "delete", "table", "inet", "block"], check=True)
    c.shutdown(socket.SHUT_WR)
    reader.join(10)
    assert got[0] == 4000
    total_retrans = _tcp_info(c)[1]
    c.close()
    after = _tcp_mib(client)
    ours = nettrace.retransmits(netns=client.inode, dport=port)
    failed = [e for e in ours if e.err]
    assert failed and {e.err for e in failed} == {-errno.EPERM}, [(e.seq, e.err) for e in ours]
    assert "not sent: -EPERM" in failed[0].describe()
    assert sum(e.segs for e in ours) == after["RetransSegs"] - before["RetransSegs"] == total_retrans
    assert sum(e.segs for e in failed) == after["TCPRetransFail"] - before["TCPRetransFail"]
    assert [e.total_retrans for e in ours] == sorted({e.total_retrans for e in ours})
    nettrace.assert_no_retransmits(dport=port, err=1)
    with pytest.raises(AssertionError, match="expected no retransmit events"):
        nettrace.assert_no_retransmits(dport=port, err=-errno.EPERM)


def test_an_attempt_that_failed_before_the_kernel_counted_it_is_none(pair, nettrace):
    """An attempt stopped by a check before the kernel counts it (no route
    to the peer: -EHOSTUNREACH, as a copy still in the host's queues is
    -EBUSY) is no retransmission: the socket's total_retrans stays, and no
    event comes."""
    server, client, fam, a, _b = pair
    c, port, reader, got = _stalled_connection(server, client, fam, a)
    c.sendall(b"y" * 3000)
    nettrace.assert_drop(reason="NETFILTER_DROP", dport=port)
    prefix = f"{a}/{128 if fam == socket.AF_INET6 else 32}"
    client.run(["ip", "route", "add", "unreachable", prefix], check=True)
    counted = _tcp_info(c)[1]   # a tail loss probe may have gone out before the route went
    seen = len(nettrace.retransmits(dport=port))
    _wait_backoff(c, 2)
    assert _tcp_info(c)[1] == counted, "the kernel counted attempts without a route"
    assert len(nettrace.retransmits(dport=port)) == seen
    client.run(["ip", "route", "del", "unreachable", prefix], check=True)
    server.run(["nft", "delete", "table", "inet", "lossy"], check=True)
    c.shutdown(socket.SHUT_WR)
    reader.join(10)
    assert got[0] == 4000
    ours = nettrace.retransmits(netns=client.inode, dport=port)
    assert sum(e.segs for e in ours) == _tcp_info(c)[1] and not [e for e in ours if e.err]
    c.close()

"""Probe calls the kernel skipped count as lost.

A tracing program (tp_btf) is not run on a CPU that is already running it:
a call in a process's context (any socket's state change on the machine),
interrupted by a softirq that hits the same tracepoint (a watched server
socket closing from FIN_WAIT2 on the peer's FIN), skips the softirq's call
and its event, and the kernel counts it only in the program's
recursion_misses (bpf_prog_info). Seen here: a full `pytest -n 2 tests/`
run under load left netchange_tp with 8 such misses, reported nowhere, so
negative assertions could pass on events never recorded."""
from __future__ import annotations

import struct
import subprocess
import sys
import time

import pytest

from pytest_nettrace import EventsLost
from pytest_nettrace.kernel import libbpf as lb
from pytest_nettrace.kernel import wire


def test_the_kernel_reports_each_attached_programs_misses(nettrace):
    misses = nettrace.engine.program_misses()
    # every program of every probe's plan (their names differ by kernel: tp_btf, fentry, kprobe)
    attached = {p for st in nettrace.engine.status.values() if st.plan for p in st.plan.programs}
    assert set(misses) == attached, (sorted(attached - set(misses)), sorted(set(misses) - attached))
    assert all(isinstance(n, int) and n >= 0 for n in misses.values()), misses


def test_a_skipped_probe_call_makes_negative_assertions_fail(netns, nettrace, monkeypatch):
    nettrace.assert_none("conn", dport=4242)   # nothing lost yet: sound
    nettrace.assert_none("retransmit", dport=4242)
    real = getattr(lb, "prog_recursion_misses", lambda fd: 0)
    # from here on every program says it skipped 3 more calls than it did
    monkeypatch.setattr(lb, "prog_recursion_misses", lambda fd: (real(fd) or 0) + 3, raising=False)
    assert nettrace.lost("conn") >= 3
    assert nettrace.lost("retransmit") >= 3
    for kind in ("conn", "retransmit"):
        with pytest.raises(EventsLost, match=rf"\b\d+ {kind} events lost"):
            nettrace.assert_none(kind, dport=4242)
    with pytest.raises(EventsLost):
        nettrace.assert_no_retransmits(dport=4242)


def test_misses_before_a_namespace_was_watched_do_not_count(netns, make_netns, nettrace, monkeypatch):
    real = lb.prog_recursion_misses
    monkeypatch.setattr(lb, "prog_recursion_misses", lambda fd: (real(fd) or 0) + 5)
    time.sleep(0.06)   # a watch reuses a reading of the last 50 ms: a miss just before it would count too
    later = nettrace.watch(make_netns())
    assert not nettrace.engine.missed(later)                    # its watch began after them
    assert nettrace.engine.missed(netns.inode).get(wire.Kind.CONN, 0) >= 5   # watched before them


def test_skipped_calls_of_the_netlink_monitor_program_count_only_for_its_sockets(netns, nettrace, monkeypatch):
    """netchange_tp runs on sk_data_ready, for every socket of the machine:
    nearly every call the kernel skips is another socket's (under load a
    run of the netchange tests lost 2-5 events this way, in tests that
    changed nothing at the time). The probe finds its own skipped calls
    instead: its monitor socket's receive memory grew by more than the
    program saw queued there."""
    engine = nettrace.engine
    plan = engine.status["netchange"].plan
    assert plan is not None and plan.own_misses
    real = engine.program_misses
    # the monitor program (and one other: conn's) says it skipped 3 more calls than it did
    bumped = set(plan.own_misses) | {p for p in engine.status["conn"].plan.programs}
    monkeypatch.setattr(engine, "program_misses",
                        lambda kind_ids=None: {p: n + 3 * (p in bumped) for p, n in real(kind_ids).items()})
    time.sleep(0.06)   # past the 50 ms a reading is reused
    assert nettrace.lost("conn") >= 3            # other programs' misses still count
    assert nettrace.lost("addr") == 0            # the monitor socket saw all that was queued on it
    nettrace.assert_none("addr", action="deleted")


def test_a_notification_the_program_did_not_see_is_lost(netns, nettrace):
    """A skipped call for the monitor socket itself, simulated: the socket
    leaves the program's map while a change is notified (the program then
    ignores it, as if its call was skipped), and comes back."""
    probe = nettrace.engine.status["netchange"].probe
    socks_fd = probe._socks_fd                                   # (the test's way in: no kernel skip on demand)
    key = wire.NC_SOCK_KEY.struct.pack(netns.inode, probe._monitors[netns.inode].portid)
    value = lb.map_lookup(socks_fd, key, wire.NC_SOCK.size)
    assert value is not None
    nettrace.assert_none("addr", address="10.9.9.9")
    lb.map_delete(socks_fd, key)
    try:
        netns.run(["ip", "addr", "add", "10.9.9.9/32", "dev", "lo"], check=True)
        time.sleep(0.05)
    finally:
        lb.map_update(socks_fd, key, value)
    assert nettrace.lost("addr") >= 1
    with pytest.raises(EventsLost, match=r"\b\d+ addr events lost"):
        nettrace.assert_none("addr", address="10.9.9.9")



CONNECTIONS = r"""
import os, socket, sys
n = int(sys.argv[1])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(4096)
port = srv.getsockname()[1]
print(port, flush=True)
if os.fork() == 0:   # the server: a process of its own (a thread's GIL waits overflowed the backlog)
    for _ in range(n):
        srv.accept()[0].close()
    os._exit(0)
srv.close()
for _ in range(n):
    socket.create_connection(("127.0.0.1", port)).close()
os.wait()
print("done", flush=True)
"""


@pytest.mark.nettrace(max_records=0)   # ~7 records a connection: more than a test's default
def test_state_changes_the_kernel_skipped_the_connection_program_for_are_still_events(netns, nettrace):
    """At ~30k connections a second, a softirq state change (a SYN, a FIN)
    lands while conn_state_tp runs on the same CPU for a process's own
    (connect, close): the kernel skipped 24-350 calls in 1.5 s here (up to
    1% of connections), each a lost event. conn_state_nested takes exactly
    those: none is counted lost now (a first version, a flag set while
    conn_state_tp ran, still lost a fifth of them; one that kept the last
    four calls took some twice)."""
    n = 20000
    netns.run(["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"], check=True)
    proc = netns.popen([sys.executable, "-c", CONNECTIONS, str(n)], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "done" and proc.wait(60) == 0
    covered_fd = nettrace.engine._obj.map_fd("conn_covered")   # (the test's way in: made-up-for calls)
    covered = struct.unpack("<Q", lb.map_lookup(covered_fd, struct.pack("<I", 0), 8) or bytes(8))[0]
    skipped = nettrace.engine.missed(netns.inode).get(wire.Kind.CONN, 0)
    assert skipped == 0, f"{skipped} conn events skipped by the kernel and not made up for ({covered} were)"
    connects = nettrace.events("conn", action="connect", dport=port)
    lost = nettrace.lost("conn")   # (the ring may still overflow: counted, and then not a pass)
    assert n - lost <= len(connects) <= n, (len(connects), lost)
    # (Not compared: the closes. With another pytest session running the
    # packet and netchange tests meanwhile, 0.1-0.6% of the client sockets'
    # closes reached neither program, with no skipped call counted, in 1 run
    # in ~6 (their sockets closed: none left in FIN-WAIT-2); the code before
    # conn_state_nested missed as many beyond what it counted. Unexplained.)

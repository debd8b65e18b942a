"""Network system calls of the test's processes (issue 5, strace -e trace=network):
real programs in real namespaces, traced by tp_btf sys_enter/sys_exit."""
from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from traffic import connect_refused, script

RECVFROM_NR = {"x86_64": 45, "aarch64": 207}[os.uname().machine]


@pytest.fixture
def pair(make_netns):
    server, client = make_netns(), make_netns()
    server.add_veth("eth0", client, "eth0", addresses=["10.0.0.1/24"], peer_addresses=["10.0.0.2/24"])
    return server, client


def serve_once(port: int) -> list:
    """argv: a TCP server answering one connection, with SO_REUSEADDR."""
    return script(f"""
        import socket
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("10.0.0.1", {port}))
        s.listen(5)
        print("ready", flush=True)
        c, peer = s.accept()
        c.sendall(c.recv(100).upper())
        c.shutdown(socket.SHUT_WR)
        c.close()
        s.close()
    """)


def talk(port: int) -> list:
    return script(f"""
        import socket
        s = socket.create_connection(("10.0.0.1", {port}))
        s.sendall(b"hello")
        assert s.recv(100) == b"HELLO"
        s.close()
    """)


def test_refused_connect_shows_errno_and_address(pair, nettrace):
    server, client = pair
    r = client.run(connect_refused("10.0.0.1", 9), check=True)
    (ev,) = nettrace.syscalls(name="connect", pid=r.pid)
    assert ev.errno == "ECONNREFUSED" and ev.ret == -111
    assert str(ev.address) == "10.0.0.1" and ev.port == 9 and ev.family == 4 and ev.sockaddr_family == "AF_INET"
    assert ev.comm == os.path.basename(r.argv[0])[:15] and ev.tid == r.pid and ev.netns == client.inode
    assert 0 < ev.duration < 5
    line = nettrace.strace(pid=r.pid).splitlines()
    assert re.fullmatch(r"socket\(AF_INET, SOCK_STREAM\|SOCK_CLOEXEC, IPPROTO_IP\) = (\d+) <\d\.\d{6}>",
                        line[0]), line
    fd = re.search(r"= (\d+)", line[0]).group(1)
    assert re.fullmatch(rf"connect\({fd}, \{{AF_INET, 10\.0\.0\.1:9\}}, 16\) = -1 ECONNREFUSED "
                        r"\(Connection refused\) <\d\.\d{6}>", line[1]), line
    nettrace.assert_syscall(name="connect", errno="ECONNREFUSED", address="10.0.0.1")


def test_server_and_client_calls_are_decoded(pair, nettrace):
    server, client = pair
    srv = server.popen(serve_once(8080), stdout=subprocess.PIPE, text=True)
    assert srv.stdout.readline().strip() == "ready"
    cli = client.run(talk(8080), check=True)
    srv.wait(5)
    names = [e.name for e in nettrace.syscalls(pid=srv.pid)]
    for expected in ("socket", "setsockopt", "bind", "listen", "accept4", "recvfrom", "sendto",
                     "shutdown", "close"):
        assert expected in names, (expected, names)
    (opt,) = nettrace.syscalls(pid=srv.pid, name="setsockopt")
    assert (opt.level, opt.option, opt.value, opt.ret) == ("SOL_SOCKET", "SO_REUSEADDR", 1, 0)
    assert re.match(r"setsockopt\(\d+, SOL_SOCKET, SO_REUSEADDR, \[1\], 4\) = 0", opt.strace())
    (acc,) = nettrace.syscalls(pid=srv.pid, name="accept4")
    assert str(acc.address) == "10.0.0.2" and acc.ret > 2
    (bind,) = nettrace.syscalls(pid=srv.pid, name="bind")
    assert (str(bind.address), bind.port) == ("10.0.0.1", 8080)
    (shut,) = nettrace.syscalls(pid=srv.pid, name="shutdown")
    assert "SHUT_WR" in shut.args
    sent = nettrace.syscalls(pid=cli.pid, name="sendto")
    assert [e.ret for e in sent] == [5]
    text = nettrace.strace()
    assert f"[pid {srv.pid}] listen(" in text and f"[pid {cli.pid}] connect(" in text


def test_only_sockets_are_closed(netns, nettrace):
    r = netns.run(script("""
        import os, socket
        os.close(os.open("/dev/null", os.O_RDONLY))
        r, w = os.pipe(); os.close(r); os.close(w)
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        print(s.fileno()); s.close()
    """), check=True)
    closes = nettrace.syscalls(pid=r.pid, name="close")
    assert [(e.fd, e.ret) for e in closes] == [(int(r.stdout), 0)]


def test_children_are_traced_outsiders_are_not(netns, nettrace):
    # a child of the test's process, and a process in the host's namespace
    r = netns.run(script(f"""
        import subprocess
        subprocess.run({connect_refused("127.0.0.1", 9)!r}, check=True)
    """), check=True)
    outside = subprocess.run(connect_refused("127.0.0.1", 9), capture_output=True, text=True, check=True)
    assert outside.stdout.strip() == "refused"
    (ev,) = nettrace.syscalls(name="connect")
    assert ev.ppid == r.pid and ev.pid != r.pid and ev.parent_comm
    sock = netns.socket()     # pytest's own helper thread in the namespace: not the test's process
    sock.close()
    assert nettrace.syscalls(pid=os.getpid()) == []


def test_no_network_calls_is_assertable(netns, nettrace):
    netns.run(script("print(1)"), check=True)
    nettrace.assert_no_syscall(name="connect")
    netns.run(connect_refused("127.0.0.1", 9), check=True)
    with pytest.raises(AssertionError, match="expected no syscall events matching name='connect', saw 1"):
        nettrace.assert_no_syscall(name="connect")
    with pytest.raises(ValueError, match="unknown filter 'syscall' for 'syscall' events"):
        nettrace.syscalls(syscall="connect")
    with pytest.raises(ValueError, match="invalid address"):
        nettrace.syscalls(address="not-an-ip")


def test_ipv6_and_unix_addresses(netns, nettrace):
    r = netns.run(script("""
        import socket
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.sendto(b"x", ("::1", 9))
        u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        u.bind("\\0nettrace-test")
    """), check=True)
    (send,) = nettrace.syscalls(pid=r.pid, name="sendto")
    assert (str(send.address), send.port, send.family, send.sockaddr_family) == ("::1", 9, 6, "AF_INET6")
    assert "{AF_INET6, [::1]:9}, 28) = 1" in send.strace()
    (bind,) = nettrace.syscalls(pid=r.pid, name="bind")
    assert bind.path == "@nettrace-test" and bind.family is None and bind.sockaddr_family == "AF_UNIX"


def test_recorded_again_after_the_engine_had_nothing_to_watch(netns_factory):
    """The host-wide programs return at once while nothing is watched (a
    count the engine keeps in the kernel): watching again must bring them
    back, and a call made while idle must not show up later."""
    from pytest_nettrace.kernel.engine import Engine
    from pytest_nettrace.trace import Trace
    from pytest_nettrace.probes.syscall import SyscallProbe
    engine = Engine(background=False, probes=[SyscallProbe()])
    try:
        ns = netns_factory.create()
        idle = ns.run(connect_refused("127.0.0.1", 9), check=True)
        for _ in range(2):  # watched, unwatched (idle), watched again
            trace = Trace(engine, "t")
            trace.watch(ns)
            r = ns.run(connect_refused("127.0.0.1", 9), check=True)
            assert [e.pid for e in trace.syscalls(name="connect")] == [r.pid]
            assert not trace.syscalls(pid=idle.pid)
            trace.close()
    finally:
        engine.close()


def test_a_call_entered_before_the_watch_is_not_reported_with_another_calls_arguments(netns_factory):
    """The call in flight is kept per thread. One whose exit came while
    nothing was watched stays there; the thread's next call, entered while
    nothing was watched, keeps nothing. When that call returns under a new
    watch, the stale entry (another call's arguments) must not become its
    event: only what was entered under the watch is reported."""
    from pytest_nettrace.kernel.engine import Engine
    from pytest_nettrace.trace import Trace
    from pytest_nettrace.probes.syscall import SyscallProbe
    engine = Engine(background=False, probes=[SyscallProbe()])
    ns = netns_factory.create()
    proc = ns.popen(script("""
        import socket, sys
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 7001))
        print("ready", flush=True)
        for size in (101, 102, 103):   # one recvfrom each, told apart by size
            u.recvfrom(size)
            print("got", flush=True)
            sys.stdin.readline()
    """), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        def datagram() -> None:
            ns.run(script("""
                import socket
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", 7001))
            """), check=True)
            assert proc.stdout.readline() == "got\n"

        def resume() -> None:
            proc.stdin.write("\n")
            proc.stdin.flush()

        first = Trace(engine, "first")
        first.watch(ns)
        assert proc.stdout.readline() == "ready\n"
        time.sleep(0.2)        # recvfrom(101) entered, watched
        first.close()          # nothing watched
        datagram()             # recvfrom(101) returns unwatched: its entry stays
        resume()
        time.sleep(0.2)        # recvfrom(102) entered unwatched: nothing kept
        second = Trace(engine, "second")
        second.watch(ns)
        datagram()             # recvfrom(102) returns watched
        resume()
        time.sleep(0.2)        # recvfrom(103) entered watched
        datagram()
        calls = second.syscalls(pid=proc.pid, name="recvfrom")
        assert [c.strace().split(", ")[2] for c in calls] == ["103"], [c.strace() for c in calls]
        second.close()
    finally:
        proc.kill()
        proc.wait()
        engine.close()


def test_a_call_a_signal_interrupted_is_named_as_strace_names_it(netns, nettrace, tmp_path):
    """A blocking recvfrom interrupted by a handled signal: the kernel's exit
    says ERESTARTSYS (Python then calls again, PEP 475); strace prints
    `= ? ERESTARTSYS (To be restarted if SA_RESTART is set)`."""
    log = tmp_path / "strace.out"
    r = netns.run(["strace", "-f", "-qq", "-e", "trace=recvfrom", "-o", str(log)] + script("""
        import os, signal, socket, threading, time
        print(os.getpid(), flush=True)
        signal.signal(signal.SIGALRM, lambda *a: None)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        wake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        main = threading.get_native_id()

        def interrupt():
            # once the main thread blocks in recvfrom (a timer alone fired
            # before it got there on a slow emulated machine)
            while open(f"/proc/self/task/{main}/syscall").read().split()[0] != str(RECVFROM):
                time.sleep(0.01)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)
            time.sleep(0.2)
            wake.sendto(b"x", u.getsockname())

        threading.Thread(target=interrupt).start()
        u.recv(10)
    """.replace("RECVFROM", str(RECVFROM_NR))), check=True)
    interrupted = nettrace.syscalls(pid=int(r.stdout.split()[0]), name="recvfrom", errno="ERESTARTSYS")
    assert len(interrupted) == 1 and interrupted[0].ret == -512
    theirs = [line for line in log.read_text().splitlines() if "ERESTARTSYS" in line]
    assert len(theirs) == 1 and theirs[0].endswith("= ? ERESTARTSYS (To be restarted if SA_RESTART is set)")
    assert interrupted[0].result() == "? ERESTARTSYS (To be restarted if SA_RESTART is set)"

"""Network system calls against strace, an independent observer of the same
process: `strace -f -e trace=network` of a threaded workload, call by call
(thread, name, result) against `nettrace.syscalls()`."""
from __future__ import annotations

import re
import shutil
from collections import defaultdict

import pytest

from traffic import script

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (ci/apt-packages.txt)")

WORKLOAD = """
    import os, socket, threading
    print(os.getpid(), flush=True)

    def udp(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        for i in range(n):
            s.sendto(b"x%d" % i, s.getsockname())
            s.recvfrom(100)
        s.close()

    def tcp():
        l = socket.socket(socket.AF_INET6)
        l.bind(("::1", 0))
        l.listen()
        c = socket.socket(socket.AF_INET6)
        c.connect(l.getsockname()[:2])
        a, _ = l.accept()
        c.sendall(b"hello")
        a.recv(5)
        a.getpeername()
        c.shutdown(socket.SHUT_WR)
        for s in (a, c, l):
            s.close()
        r = socket.socket()
        try:
            r.connect(("127.0.0.1", 9))
        except ConnectionRefusedError:
            pass
        r.close()

    threads = [threading.Thread(target=udp, args=(20,)) for _ in range(3)] + [threading.Thread(target=tcp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = socket.socketpair()
    a.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
"""

_CALL = re.compile(r"^(\d+)\s+(\w+)\(")
_RESULT = re.compile(r"= (-?\d+)(?: (E[A-Z0-9]+) \([^)]*\))?$")


def _strace_calls(text: str):
    """tid -> [(name, result)] from `strace -f` output (with unfinished/resumed pairs)."""
    calls = defaultdict(list)
    pending = {}
    for line in text.splitlines():
        m = re.match(r"^(\d+)\s+<\.\.\. (\w+) resumed>", line)
        if m:
            tid, name = int(m.group(1)), m.group(2)
            pending.pop(tid, None)
        else:
            m = _CALL.match(line)
            if not m:
                continue   # signals, exits
            tid, name = int(m.group(1)), m.group(2)
            if line.endswith("<unfinished ...>"):
                pending[tid] = name
                calls[tid].append([name, None])
                continue
            calls[tid].append([name, None])
        r = _RESULT.search(line)
        assert r, line
        for entry in reversed(calls[tid]):
            if entry[0] == name and entry[1] is None:
                entry[1] = r.group(2) if int(r.group(1)) < 0 else int(r.group(1))
                break
    return {tid: [tuple(c) for c in cs] for tid, cs in calls.items()}


def test_syscalls_match_strace_call_by_call(netns, nettrace, tmp_path):
    log = tmp_path / "strace.out"
    r = netns.run(["strace", "-f", "-qq", "-e", "trace=network", "-o", str(log)] + script(WORKLOAD), check=True)
    pid = int(r.stdout.split()[0])
    theirs = _strace_calls(log.read_text())
    ours = defaultdict(list)
    for ev in nettrace.syscalls(pid=pid):
        if ev.name != "close":          # strace's "network" class has no close()
            ours[ev.tid].append((ev.name, ev.errno if ev.ret < 0 else ev.ret))
    assert nettrace.lost("syscall") == 0
    total = sum(len(v) for v in theirs.values())
    assert total >= 150 and len(theirs) >= 5, theirs     # the workload ran, in 5 threads
    assert dict(ours) == theirs


SOCKOPTS = """
    import os, socket, struct
    print(os.getpid(), flush=True)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 200000))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo\\0")
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"cubic")
    s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    s.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
    s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
    s.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
    s.getsockopt(socket.SOL_IP, socket.IP_TTL, 2)
    r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    r.setsockopt(255, 1, struct.pack("I", ~(1 | 1 << 3 | 1 << 11 | 1 << 12) & 0xffffffff))   # SOL_RAW, ICMP_FILTER
    r.setsockopt(255, 1, struct.pack("I", 1 | 1 << 8 | 1 << 20))
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, b"x")
    except OSError:
        pass
    try:
        s.getsockopt(socket.SOL_TCP, 9999, 4)
    except OSError:
        pass
"""


def test_socket_options_are_written_as_strace_writes_them(netns, nettrace, tmp_path):
    """set/getsockopt, argument for argument as `strace` prints them: ints,
    a linger, a device name, bytes it quotes, ICMP filters, the length a
    getsockopt returned ("[16 => 3]"), failures."""
    log = tmp_path / "strace.out"
    netns.run(["ip", "link", "set", "lo", "up"], check=True)
    r = netns.run(["strace", "-qq", "-e", "trace=setsockopt,getsockopt", "-o", str(log)] + script(SOCKOPTS),
                  check=True)
    theirs = [re.sub(r" \(.*\)$", "", " ".join(ln.split())) for ln in log.read_text().splitlines()]
    ours = [re.sub(r"( \(.*\))? <[\d.]+>$", "", " ".join(ln.split()))
            for ln in nettrace.strace(int(r.stdout.split()[0])).splitlines() if "sockopt(" in ln]
    assert nettrace.lost("syscall") == 0
    assert len(theirs) == 15, theirs
    assert ours == theirs


ADDRESS_LENGTHS = """
    import os, socket
    print(os.getpid(), flush=True)
    for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        l = socket.socket(fam)
        l.bind((host, 0))
        l.listen()
        c = socket.create_connection(l.getsockname()[:2])
        a, _ = l.accept()
        a.getpeername()
        c.getsockname()
        u = socket.socket(fam, socket.SOCK_DGRAM)
        u.bind((host, 0))
        u.sendto(b"x", u.getsockname())
        u.recvfrom(10)
        for s in (a, c, l, u):
            s.close()
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    x.send(b"hi")
    y.recvfrom(10)                      # an unnamed sender: [110 => 0]
    path = "\\0nettrace-%d" % os.getpid()
    l = socket.socket(socket.AF_UNIX)
    l.bind(path)
    l.listen()
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    l.accept()                          # [110 => 2]
"""
_LENGTH = re.compile(r"\[(\d+)(?: => (\d+))?\]|, (NULL|0x[0-9a-f]+)(?=\)|, SOCK)")


def test_address_lengths_are_value_result_as_strace_writes_them(netns, nettrace, tmp_path):
    """accept, getsockname, getpeername and recvfrom: the room the caller
    gave and what the kernel returned, `[110 => 2]` as strace writes it."""
    calls = ("accept", "accept4", "getsockname", "getpeername", "recvfrom")
    log = tmp_path / "strace.out"
    r = netns.run(["strace", "-qq", "-e", "trace=" + ",".join(calls), "-o", str(log)] + script(ADDRESS_LENGTHS),
                  check=True)
    theirs = [(line.split("(", 1)[0], _LENGTH.findall(line)[-1][:2]) for line in log.read_text().splitlines()
              if line.startswith(calls)]
    ours = [(e.name, _LENGTH.findall(e.strace())[-1][:2]) for e in nettrace.syscalls(pid=int(r.stdout.split()[0]))
            if e.name in calls]
    assert len(theirs) >= 13 and ("recvfrom", ("110", "0")) in theirs and ("accept4", ("110", "2")) in theirs
    assert ours == theirs

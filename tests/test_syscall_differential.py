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

"""Real TCP traffic for the tests, run as separate processes inside namespaces
(so events carry those processes' pids), or from this process for speed."""
from __future__ import annotations

import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

PYTHON = sys.executable


def script(body: str) -> list:
    """argv running `body` in a fresh Python."""
    return [PYTHON, "-c", textwrap.dedent(body)]


def connect_refused(host: str, port: int, times: int = 1) -> list:
    """argv: connect to a closed port `times` times (the kernel answers each with a RST)."""
    fam = "AF_INET6" if ":" in host else "AF_INET"
    return script(f"""
        import socket
        for _ in range({times}):
            s = socket.socket(socket.{fam})
            try:
                s.connect(({host!r}, {port}))
            except ConnectionRefusedError:
                print("refused")
            s.close()
    """)


def byte_source(host: str, port: int, nbytes: int) -> list:
    """argv: connect to host:port, send `nbytes` (big sends: GSO-sized
    segments), shut down, wait for the peer's close."""
    return script(f"""
        import socket
        s = socket.create_connection(({host!r}, {port}))
        s.sendall(b"x" * {nbytes})
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
        s.close()
    """)


def byte_sink(host: str, port: int) -> list:
    """argv: listen on host:port, print "ready", read one connection to its
    end, print how many bytes it read."""
    fam = "AF_INET6" if ":" in host else "AF_INET"
    return script(f"""
        import socket
        lst = socket.socket(socket.{fam})
        lst.bind(({host!r}, {port}))
        lst.listen()
        print("ready", flush=True)
        conn, _ = lst.accept()
        n = 0
        while True:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            n += len(chunk)
        conn.close()
        print(n, flush=True)
    """)


def linger_abort(host: str, port: int) -> list:
    """argv: connect to a listening server, then close with SO_LINGER 0 (active RST)."""
    fam = "AF_INET6" if ":" in host else "AF_INET"
    return script(f"""
        import socket, struct
        s = socket.socket(socket.{fam})
        s.connect(({host!r}, {port}))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        print(s.getsockname()[1], flush=True)
        s.close()
    """)


def clean_exchange(host: str, port: int) -> list:
    """argv: connect, send, read the echo, shut down cleanly."""
    return script(f"""
        import socket
        s = socket.create_connection(({host!r}, {port}))
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
        s.close()
    """)


def echo_once(listener: socket.socket) -> None:
    """Serve one connection: echo until EOF, then close cleanly."""
    conn, _ = listener.accept()
    with conn:
        while True:
            data = conn.recv(4096)
            if not data:
                break
            conn.sendall(data)


def linger_zero(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def clean_exchange_over(server, client, fam: int, addr: str) -> int:
    """A listener in `server` and one clean echo exchange from a process in
    `client`; returns the server port."""
    lst = server.socket(fam)
    lst.bind((addr, 0))
    lst.listen()
    port = lst.getsockname()[1]
    t = threading.Thread(target=echo_once, args=(lst,))
    t.start()
    client.run(clean_exchange(addr, port), check=True)
    t.join(5)
    lst.close()
    return port


def tcpdump_start(ns, path, filt: str, dev: str = "eth0"):
    """tcpdump writing what matches `filt` on `dev` in `ns` to `path`, packet by
    packet, once it says it is listening."""
    dump = ns.popen(["tcpdump", "-Z", "root", "-nn", "-i", dev, "-U", "--immediate-mode", "-w", str(path), filt],
                    stderr=subprocess.PIPE, text=True)
    assert "listening on" in dump.stderr.readline()
    return dump


def tcpdump_stop(dump) -> None:
    """Stop it after what is in flight arrived (its file is then complete)."""
    time.sleep(0.3)
    dump.send_signal(signal.SIGINT)
    dump.communicate(timeout=10)


# A RST with the given ends and sequence number, sent from a raw socket (argv: src dst sport dport seq)
INJECT_RST = """
    import socket, struct, sys
    src, dst, sport, dport, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x04, 0, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    data = pseudo + tcp
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    s = (s >> 16) + (s & 0xFFFF)
    s = ~(s + (s >> 16)) & 0xFFFF
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    raw.sendto(tcp[:16] + struct.pack("!H", s) + tcp[18:], (dst, 0))
"""

"""Real TCP traffic for the tests, run as separate processes inside namespaces
(so events carry those processes' pids), or from this process for speed."""
from __future__ import annotations

import socket
import struct
import sys
import textwrap
import threading

PYTHON = sys.executable


def script(body: str) -> list:
    """argv running `body` in a fresh Python."""
    return [PYTHON, "-c", textwrap.dedent(body)]


def connect_refused(host: str, port: int) -> list:
    """argv: connect to a closed port (the kernel answers with a RST)."""
    fam = "AF_INET6" if ":" in host else "AF_INET"
    return script(f"""
        import socket
        s = socket.socket(socket.{fam})
        try:
            s.connect(({host!r}, {port}))
        except ConnectionRefusedError:
            print("refused")
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

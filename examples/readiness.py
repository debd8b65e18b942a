"""Waiting for a daemon to be ready by polling something real.

Network *events* need no polling: `nettrace.wait_for(kind, ...)` returns as
soon as the kernel reports one. These two are for what the kernel does not
report: a socket that starts listening, a line in a daemon's log.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest


def wait_for_listener(ns, port: int, timeout: float = 10.0) -> None:
    """Until a TCP socket in `ns` listens on `port` (asked to `ss`, so that no
    probe connection is made: a refused one would itself be a RST)."""
    deadline = time.monotonic() + timeout
    while not ns.run(["ss", "-Hltn", f"sport = :{port}"], check=True).stdout.strip():
        if time.monotonic() > deadline:
            pytest.fail(f"nothing listens on TCP port {port} in {ns.name} after {timeout:g}s")
        time.sleep(0.05)


def wait_for_log(log: Path, text: str, timeout: float = 10.0) -> str:
    """Until the daemon's log file has a line containing `text`; returns that line."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        for line in lines:
            if text in line:
                return line
        if time.monotonic() > deadline:
            tail = "\n".join(lines[-20:]) or "(empty)"
            pytest.fail(f"{log.name} has no line with {text!r} after {timeout:g}s; it ends with:\n{tail}")
        time.sleep(0.05)

"""Synthetic ring records for the root-free tests, built from the wire
contract (pytest_nettrace/kernel/wire.py) as the BPF programs fill them."""
from __future__ import annotations

import ipaddress
from typing import Any, List, Sequence

from pytest_nettrace.events import Event
from pytest_nettrace.kernel import wire
from pytest_nettrace.kernel.records import RecordDecoder

NETNS = 4026531999


def header(kind: int, *, flags: int = 0, pid: int = 42, comm: bytes = b"curl", stack: Sequence[int] = (),
           ts: int = 1_000_000) -> dict:
    return dict(ts=ts, netns=NETNS, kind=kind, flags=flags, pid=pid, tid=pid, uid=0, ppid=1, comm=comm,
                pcomm=b"bash", stack_len=len(stack) * 8)


def addr(text: str) -> bytes:
    """struct in6_addr-sized field: IPv4 in the first 4 bytes."""
    return ipaddress.ip_address(text).packed.ljust(16, b"\0")


def record(layout: wire.Record, kind: int, *, flags: int = 0, stack: Sequence[int] = (), pid: int = 42,
           comm: bytes = b"curl", ts: int = 1_000_000, **fields: Any) -> bytes:
    return layout.pack(h=header(kind, flags=flags, pid=pid, comm=comm, stack=stack, ts=ts), stack=list(stack),
                       **fields)


def decode(probe: Any, *recs: bytes) -> List[Event]:
    """What the engine's decoder makes of these records."""
    dec = RecordDecoder()
    dec.add(probe)
    out: List[Event] = []
    for rec in recs:
        out += dec.decode(rec)
    return out

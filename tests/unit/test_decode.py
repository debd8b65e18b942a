"""Decoding, root-free on synthetic records: a test that reads one kind
decodes only that kind's records; a flood's repeated stack is symbolised and
judged (process / softirq) once; at close only kinds whose decoder needs the
watched namespace are decoded, the rest when (if ever) read."""
from __future__ import annotations

import struct
import time

import pytest

from pytest_nettrace import events as events_mod
from pytest_nettrace.events import Header
from pytest_nettrace.kernel.wire import HEADER, NT_MAX_STACK, RST_EVENT, STACK_BYTES, Kind
from pytest_nettrace.probes.conn import ConnDecoder, ConnProbe
from pytest_nettrace.probes.rst import RstDecoder, RstProbe
from pytest_nettrace.trace import Trace

NETNS = 4026530000
NT_KIND_RST = Kind.RST
_RST_BODY = RST_EVENT.body
STACK = (0xffffffff81000100, 0xffffffff81000200, 0xffffffff81000300)


def rst_record(ts: int, stack=STACK) -> bytes:
    hdr = HEADER.pack(ts, NETNS, NT_KIND_RST, 0, 42, 42, 0, 1, b"curl", b"bash", len(stack) * 8, 0)
    loopback = bytes([127, 0, 0, 1]) + bytes(12)
    body = _RST_BODY.pack(0, 2, 7, 0, 0, 80, 43210, loopback, loopback)
    trailer = struct.pack(f"<{NT_MAX_STACK}Q", *(list(stack) + [0] * (NT_MAX_STACK - len(stack))))
    return hdr + body + trailer


def other_record(ts: int, kind_id: int) -> bytes:
    """A record of another kind that no decoder should ever see here."""
    return HEADER.pack(ts, NETNS, kind_id, 0, 1, 1, 0, 0, b"x", b"y", 0, 0) + bytes(STACK_BYTES)


class Engine:
    """The engine's side of a Trace, without the kernel: real probes decode;
    every decode is counted by kind id."""

    def __init__(self) -> None:
        self.probes = {p.kind_id: p for p in (RstProbe(), ConnProbe())}
        self.decoded: dict = {}
        self.left_out: dict = {}
        self.status: dict = {}  # no probe attached beyond these decoders

    def decode(self, rec: bytes):
        hdr = Header(rec)
        self.decoded[hdr.kind] = self.decoded.get(hdr.kind, 0) + 1
        probe = self.probes.get(hdr.kind)
        return probe.decoder.decode(rec, hdr) if probe and hdr.kind == NT_KIND_RST else []

    def decode_all(self, kind_id: int, recs):
        return [event for rec in recs for event in self.decode(rec)]

    def decode_needs_watch(self, kind_id: int) -> bool:
        probe = self.probes.get(kind_id)
        return probe is None or probe.decoder.needs_watch

    def probe_available(self, name):
        return None

    def drain(self) -> int:
        return 0

    def watch(self, netns, sink, path=None) -> None:
        self.sink = sink

    def unwatch(self, netns) -> None:
        pass

    def lost(self, netns, misses=None):
        return {}

    def program_misses(self, kind_ids=None):
        return {}

    def lost_elsewhere(self, netns, kind=None):
        return {}


@pytest.fixture
def trace():
    engine = Engine()
    tr = Trace(engine, "t")
    tr.watch(NETNS)
    yield tr
    tr.close()


@pytest.fixture(autouse=True)
def _any_inode(monkeypatch):
    monkeypatch.setattr("pytest_nettrace.trace.netns_ref", lambda ns: (ns, None))


def test_reading_one_kind_decodes_only_that_kind(trace):
    conn_id = ConnProbe.kind_id
    trace.engine.sink([rst_record(10), other_record(11, conn_id), rst_record(12), other_record(13, conn_id)])
    assert [e.timestamp for e in trace.rst()] == [10, 12]
    assert trace.engine.decoded == {NT_KIND_RST: 2}, "reading rst decoded another kind"
    trace.assert_none("rst", dport=1)
    assert trace.engine.decoded == {NT_KIND_RST: 2}
    trace.all_events()
    assert trace.engine.decoded == {NT_KIND_RST: 2, conn_id: 2}


def test_close_decodes_only_kinds_whose_decoder_needs_the_namespace(trace):
    conn_id = ConnProbe.kind_id
    assert ConnDecoder.needs_watch and not RstDecoder.needs_watch
    trace.engine.sink([rst_record(10), other_record(11, conn_id)])
    trace.close()
    assert trace.engine.decoded == {conn_id: 1}
    assert [e.kind for e in trace.all_events()] == ["rst"], "a stateless kind is decoded when read, after close"


def test_a_repeated_stack_is_symbolised_and_judged_once(trace, monkeypatch):
    judged, symbolised = [], []
    real, real_symbolize = events_mod.context_of, events_mod.symbolize
    monkeypatch.setattr(events_mod, "context_of", lambda frames, guess="process": judged.append(1) or
                        real(frames, guess))
    monkeypatch.setattr(events_mod, "symbolize", lambda addrs: symbolised.append(1) or real_symbolize(addrs))
    monkeypatch.setattr(events_mod, "_stacks", {})
    n = 20_000
    trace.engine.sink([rst_record(i) for i in range(n)])
    t0 = time.process_time()
    got = trace.rst()
    cpu = time.process_time() - t0
    assert len(got) == n and len(judged) == 1 and len(symbolised) == 1
    assert got[0].stack == got[-1].stack and got[0].stack is not got[-1].stack  # each event its own list
    print(f"decoded {n / cpu / 1e3:.0f}k rst events per CPU-second")  # a figure, not a test (bench/ decides)


def test_a_changed_symbol_table_makes_contexts_judged_again(monkeypatch):
    from pytest_nettrace.kernel import symbols
    judged = []
    real = events_mod.context_of
    monkeypatch.setattr(events_mod, "context_of", lambda frames, guess="process": judged.append(1) or
                        real(frames, guess))
    monkeypatch.setattr(events_mod, "_stacks", {})
    rec = rst_record(1)
    decoder = RstDecoder()
    decoder.decode(rec, Header(rec))
    decoder.decode(rec, Header(rec))
    assert len(judged) == 1
    symbols.invalidate()  # new trampolines: names may have moved
    decoder.decode(rec, Header(rec))
    assert len(judged) == 2

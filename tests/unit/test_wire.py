"""The wire contract (pytest_nettrace/kernel/wire.py) against the shipped
objects' BTF: every layout Python reads has the size and member offsets of
its C struct, on every architecture shipped. Root-free: bpftool reads the
object file, no kernel involved."""
from __future__ import annotations

import json
import struct
import shutil
import subprocess
from pathlib import Path
from typing import Dict

import pytest

from pytest_nettrace.kernel import wire
from pytest_nettrace.probes.registry import PROBE_CLASSES, all_probes

OBJECTS = sorted((Path(wire.__file__).parent.parent / "bpf").glob("*/nettrace.bpf.o"))
BPFTOOL = shutil.which("bpftool") or next((p for p in ("/usr/sbin/bpftool", "/sbin/bpftool")
                                           if Path(p).exists()), None)


def btf_structs(obj: Path) -> Dict[str, dict]:
    out = subprocess.run([BPFTOOL, "-j", "btf", "dump", "file", str(obj), "format", "raw"],
                         capture_output=True, text=True, check=True).stdout
    return {t["name"]: t for t in json.loads(out)["types"] if t["kind"] == "STRUCT" and t.get("name")}


@pytest.fixture(scope="module", params=OBJECTS, ids=lambda p: p.parent.name)
def structs(request):
    if BPFTOOL is None:
        pytest.skip("bpftool not installed: it reads the objects' BTF (apt install bpftool)")
    return btf_structs(request.param)


def test_objects_are_shipped():
    assert {p.parent.name for p in OBJECTS} == {"x86", "arm64"}


@pytest.mark.parametrize("layout", wire.LAYOUTS, ids=lambda layout: layout.cname)
def test_layout_matches_btf(structs, layout):
    assert layout.cname in structs, (
        f"struct {layout.cname} is not in the object's BTF: keep it there (NT_WIRE in its .bpf.c)")
    t = structs[layout.cname]
    c_offsets = {m["name"]: m["bits_offset"] // 8 for m in t["members"]}
    assert layout.offsets == c_offsets, f"struct {layout.cname}: Python's member offsets differ from C's"
    assert layout.size == t["size"], f"struct {layout.cname}: {layout.size} bytes in Python, {t['size']} in C"


@pytest.mark.parametrize("layout", [m[1] for lay in wire.LAYOUTS for m in lay.members if isinstance(m[1], wire.Layout)],
                         ids=lambda layout: layout.cname)
def test_nested_layouts_are_checked_too(layout):
    assert layout in wire.LAYOUTS


def test_every_ring_record_is_declared():
    """Each probe that writes ring records names their layouts, and every
    record layout belongs to exactly one probe's kind."""
    records = [r for r in wire.LAYOUTS if isinstance(r, wire.Record)]
    owned = [r for probe in all_probes() for r in probe.decoder.records]
    assert sorted(r.cname for r in owned) == sorted(r.cname for r in records)
    assert sorted(cls.kind_id for cls in PROBE_CLASSES) == sorted(wire.Kind), "one probe per kind id"


def test_record_bodies_start_after_the_header():
    for rec in (r for r in wire.LAYOUTS if isinstance(r, wire.Record)):
        assert rec.body_offset == wire.HEADER.size
        assert rec.offsets.get("stack", rec.size) >= rec.body_offset + rec.body.size


def test_kind_ids_match_the_c_enum():
    header = (Path(__file__).parents[2] / "bpf" / "nettrace.h")
    if not header.exists():
        pytest.skip("bpf/ sources not present (installed package)")
    text = header.read_text()
    for kind in wire.Kind:
        assert f"NT_KIND_{kind.name} = {kind.value}," in text
    assert f"#define NT_F_KTHREAD {wire.NT_F_KTHREAD:#x}" in text
    assert f"#define NT_MAX_STACK {wire.NT_MAX_STACK} " in text
    netchange = (header.parent / "netchange.h").read_text()
    assert f"#define NC_F_QUEUED_BY {wire.NC_F_QUEUED_BY:#x}" in netchange
    assert f"#define NC_F_NFT {wire.NC_F_NFT:#x} " in netchange
    conn = (header.parent / "conn.h").read_text()
    assert f"#define CONN_F_SOFTIRQ {wire.CONN_F_SOFTIRQ:#x} " in conn
    assert f"#define CONN_F_STACK {wire.CONN_F_STACK:#x} " in conn
    sysctl = (header.parent / "sysctl.h").read_text()
    assert f"#define SY_F_RESULT {wire.SY_F_RESULT:#x} " in sysctl


def _span(records, lead: int = 16):
    """A span as RingBuffer.read_spans copies it: each record behind its
    8-byte ring header, 8-byte aligned, `lead` bytes into the ring's pages."""
    data, starts = bytearray(lead), []
    for rec in records:
        starts.append(len(data) >> 2)
        data += struct.pack("<II", len(rec), 0) + rec + bytes(-len(rec) % 8)
    return bytes(data), starts, 0


def test_a_delivery_is_the_records_of_its_namespaces_in_ring_order():
    from pytest_nettrace.kernel.records import Delivery
    from pytest_nettrace.kernel.ringbuf import records

    def rec(netns: int, ts: int, size: int) -> bytes:
        head = wire.HEADER.pack(ts, netns, wire.Kind.RST, 0, 1, 1, 0, 1, b"a", b"b", 0, 0)
        return head + bytes(i % 256 for i in range(size - len(head)))

    first = [rec(1, 1, 504), rec(2, 2, 264), rec(1, 3, 73)]
    second = [rec(2, 4, 560), rec(1, 5, 72)]
    spans = [_span(first), _span(second, lead=8)]
    assert records(spans) == first + second
    assert list(Delivery(spans, frozenset({1}))) == [first[0], first[2], second[1]]
    assert list(Delivery(spans, frozenset({1, 2}))) == first + second
    assert list(Delivery(spans, frozenset({3}))) == []
    # its length counts without reading a record: every record of its spans (a trace's limit, an upper bound)
    assert len(Delivery(spans, frozenset({1}))) == len(Delivery(spans, frozenset({3}))) == 5

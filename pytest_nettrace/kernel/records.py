"""Ring records to Events: the decoding side of the shared ring buffer, with
no kernel involved (tests feed it synthetic records built from kernel/wire.py).

A record whose decoder fails, or whose length is not its layout's size,
becomes no event but counts as lost for its kind and namespace: a negative
assertion on that kind then fails instead of passing on what was not read."""
from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING, AbstractSet, Callable, Dict, Iterable, Iterator, List, Set, Tuple, TypeVar

from ..events import Event, Header
from .probe import Decoder
from .ringbuf import Span
from .wire import HEADER, NT_HDR

if TYPE_CHECKING:
    from .probe import Probe

log = logging.getLogger("pytest_nettrace")
T = TypeVar("T")


_u32 = struct.Struct("<I")
_RING_HDR = 8  # struct bpf_ringbuf_hdr before each record in a span
_NETNS_AT = _RING_HDR + NT_HDR.offsets["netns"]


class Delivery:
    """One drain's records of some namespaces, still in the copies the ring
    reader made (RingBuffer.read_spans): iterating makes each record a bytes
    object, in the thread that reads, when it reads. The drain thread only
    found where the records start (a bytes object per record was most of a
    drain's cost)."""

    __slots__ = ("_spans", "_netns")

    def __init__(self, spans: List[Span], netns: AbstractSet[int]) -> None:
        self._spans = spans
        self._netns = netns

    def __len__(self) -> int:
        """Its records, of any namespace the drain routed (an upper bound of
        what iterating yields: counted without reading a record)."""
        return sum(len(starts) for _, starts, _ in self._spans)

    def __iter__(self) -> Iterator[bytes]:
        unpack, netns = _u32.unpack_from, self._netns
        for data, starts, base in self._spans:
            for at in starts:
                at = (at - base) << 2
                if unpack(data, at + _NETNS_AT)[0] in netns:
                    yield data[at + _RING_HDR: at + _RING_HDR + unpack(data, at)[0]]


class RecordDecoder:
    """Decodes the records of the probes it was given (their `decoder`), by nt_hdr.kind."""

    def __init__(self) -> None:
        self._decoders: Dict[int, Tuple[str, "Decoder"]] = {}   # kind id -> (probe name, its decoder)
        self.errors = 0                                     # records no event came of, for any reason
        self._undecodable: Dict[int, Dict[int, int]] = {}   # netns -> kind id -> records
        self._reported: Set[str] = set()

    def add(self, probe: "Probe") -> None:
        self._decoders[probe.kind_id] = (probe.name, probe.decoder)

    def decode(self, rec: bytes) -> List[Event]:
        """The events `rec` stands for (see Decoder.decode)."""
        found = self._checked(rec)
        if found is None:
            return []
        hdr, name, decoder = found
        return self._guarded(name, decoder.decode, rec, hdr)

    def _guarded(self, name: str, read: "Callable[[bytes, Header], List[T]]", rec: bytes, hdr: Header) -> List[T]:
        """read(rec, hdr) — a decoder's decode or count — or, when it raises, nothing."""
        try:
            return read(rec, hdr)
        except Exception:  # a decoder bug must not take the test down with it...
            log.exception("cannot decode %s record", name)
            self._undecodable_record(hdr, None)  # ...nor let a negative assertion pass
            return []

    def decode_all(self, kind_id: int, recs: Iterable[bytes]) -> List[Event]:
        """decode() of each of these records of one kind, in order, with the
        kind's decoder and layout looked up once: a flood's records of a
        decoder with one layout skip the per-record checks but its length."""
        found = self._decoders.get(kind_id)
        if found is None or len(found[1].records) != 1 or type(found[1]).layout is not Decoder.layout:
            return [event for rec in recs for event in self.decode(rec)]   # no decoder, or a layout per record
        name, decoder = found
        size, decode = decoder.records[0].size, decoder.decode
        out: List[Event] = []
        for rec in recs:
            if len(rec) != size:
                out.extend(self.decode(rec))   # says why it cannot be decoded
                continue
            out.extend(self._guarded(name, decode, rec, Header(rec)))
        return out

    def count(self, rec: bytes) -> List[str]:
        """The kinds of the new events `rec` stands for, not made (see Decoder.count)."""
        found = self._checked(rec)
        if found is None:
            return []
        hdr, name, decoder = found
        return self._guarded(name, decoder.count, rec, hdr)

    def _checked(self, rec: bytes) -> "Tuple[Header, str, Decoder] | None":
        """(header, probe name, decoder) of a record its decoder can read;
        None, counted as undecodable, for any other."""
        if len(rec) < HEADER.size:
            self.errors += 1  # not even a header: no namespace to charge it to
            return None
        hdr = Header(rec)
        found = self._decoders.get(hdr.kind)
        if found is None:
            self._undecodable_record(hdr, f"record of unknown kind {hdr.kind}")
            return None
        name, decoder = found
        layout = decoder.layout(hdr)
        if layout is None:
            self._undecodable_record(hdr, f"{name} writes no ring records, got one of {len(rec)} bytes")
            return None
        if len(rec) != layout.size:
            # C and Python disagree on the layout (a stale object): decoding would read garbage
            self._undecodable_record(hdr, f"{len(rec)}-byte {name} record, struct {layout.cname} "
                                          f"has {layout.size}")
            return None
        return hdr, name, decoder

    def _undecodable_record(self, hdr: Header, why: "str | None") -> None:
        if why is not None and why not in self._reported:  # once: a stale object repeats it per record
            self._reported.add(why)
            log.error("cannot decode record: %s", why)
        self.errors += 1
        per_kind = self._undecodable.setdefault(hdr.netns, {})
        per_kind[hdr.kind] = per_kind.get(hdr.kind, 0) + 1

    def lost(self, netns: int) -> Dict[int, int]:
        """Records of `netns` no event came of, by kind id."""
        return dict(self._undecodable.get(netns, {}))

    def forget(self, netns: int) -> None:
        self._undecodable.pop(netns, None)

    def carries(self, kind_id: int) -> bool:
        """Whether events of `kind_id` come as ring records."""
        found = self._decoders.get(kind_id)
        return found is not None and bool(found[1].records)

    def needs_watch(self, kind_id: int) -> bool:
        """Whether records of `kind_id` must be decoded while their namespace is watched."""
        found = self._decoders.get(kind_id)
        return found is None or found[1].needs_watch

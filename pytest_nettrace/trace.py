"""`Trace`: the object behind the `nettrace` fixture — one test's view of the
kernel's events, limited to the namespaces it watches, with sound assertions."""
from __future__ import annotations

import errno
import fcntl
import gc
import os
import struct
import threading
import time
from typing import (TYPE_CHECKING, Any, Dict, FrozenSet, Iterable, List, Literal, Optional, Sequence, Set, Tuple,
                    Type, TypeVar, Union, overload)

from . import sequence
from .errors import EventsLost, NettraceError, NothingWatched
from .events import Event, check_filters, check_timeout, describe_filters, matches, news
from .kernel.engine import Engine
from .kernel.records import Delivery
from .kind_methods import KindMethods
from .probes.context import KindApi, Snapshot, TraceContext
from .probes.registry import API_CLASSES, check_filters_any_kind, kind_info, kinds
from .report.captures import capture_path
from .report.timeline import render_failure, seed_line
from .report.view import TraceView

if TYPE_CHECKING:
    from .probes.conn import ConnEvent
    from .probes.drop import DropEvent
    from .probes.netchange import AddrEvent, LinkEvent, NeighEvent, NexthopEvent, NftEvent, RouteEvent, RuleEvent
    from .probes.nftrace import NftVerdictEvent
    from .probes.packet import PacketEvent
    from .probes.retransmit import RetransmitEvent
    from .probes.rst import RstEvent
    from .probes.syscall import SyscallEvent
    from .probes.sysctl import SysctlEvent

# The kinds' names, for a type checker: the generic methods return the
# kind's event class for a literal kind, and a misspelt kind is a type error
# (tests/unit/test_typing.py checks this list against the registry).
KindName = Literal["addr", "conn", "drop", "link", "neigh", "nexthop", "nft", "nftrace", "packet", "retransmit",
                   "route", "rst", "rule", "syscall", "sysctl"]

A = TypeVar("A", bound=KindApi)
_kind_of = struct.Struct("<H").unpack_from
NamespaceLike = Union[int, str, Any]  # an inode, a path / netns name, or an object with .inode


def netns_ref(ns: NamespaceLike) -> Tuple[int, Optional[str]]:
    """(inode, a path that opens it) of a Namespace, an inode, a /run/netns
    name, a path, or a pid given as "pid:1234"."""
    if isinstance(ns, bool):
        raise TypeError(f"not a network namespace: {ns!r}")
    if isinstance(ns, int):
        path = _path_of_inode(ns)
        if path is None:  # else every assertion on it would pass, seeing nothing
            raise ValueError(f"no network namespace has inode {ns} (none in /run/netns or /proc/*/ns/net)")
        return ns, path
    inode = getattr(ns, "inode", None)
    if isinstance(inode, int):
        if getattr(ns, "closed", False) is True:
            raise ValueError(f"network namespace {getattr(ns, 'name', inode)} is already removed")
        return inode, getattr(ns, "path", None)
    if isinstance(ns, str):
        if ns.startswith("pid:"):
            path = f"/proc/{ns[4:]}/ns/net"
        else:
            path = ns if "/" in ns else f"/run/netns/{ns}"
        try:
            return _netns_inode(path), path
        except FileNotFoundError:
            raise ValueError(f"no network namespace {ns!r} (looked at {path})") from None
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise ValueError(f"{ns!r} is not a network namespace ({path} is another file)") from None
            raise ValueError(f"cannot open network namespace {ns!r} ({path}: {e.strerror})") from None
    raise TypeError(f"not a network namespace: {ns!r} (give a Namespace, an inode, a name or a path)")


_NS_GET_NSTYPE = 0xB703   # ioctl on an nsfs file: its namespace's CLONE_NEW* type
_CLONE_NEWNET = 0x40000000


def _netns_inode(path: str) -> int:
    """The inode of the network namespace at `path`; OSError (EINVAL) when
    it is another file, or another kind of namespace."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            kind = fcntl.ioctl(fd, _NS_GET_NSTYPE)
        except OSError:
            kind = -1   # not a namespace at all (ENOTTY)
        if kind != _CLONE_NEWNET:
            raise OSError(errno.EINVAL, "not a network namespace")
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _path_of_inode(inode: int) -> Optional[str]:
    """A path that opens the namespace with this inode, if one can be found."""
    candidates = ["/proc/self/ns/net"]
    try:
        candidates += [f"/run/netns/{n}" for n in os.listdir("/run/netns")]
    except OSError:
        pass
    for path in candidates:
        try:
            if os.stat(path).st_ino == inode:
                return path
        except OSError:
            continue
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                    return f"/proc/{pid}/ns/net"
            except OSError:
                continue
    return None


class _Context:
    """The TraceContext a trace gives its kinds' query classes."""

    def __init__(self, trace: "Trace") -> None:
        self._trace = trace

    @property
    def name(self) -> str:
        return self._trace.name

    @property
    def engine(self) -> Engine:
        return self._trace.engine

    @property
    def closed(self) -> bool:
        return self._trace.closed

    @property
    def watched(self) -> Dict[int, str]:
        return self._trace.watched

    def label(self, inode: int) -> str:
        return self._trace.label(inode)

    def watch(self, ns: Any, label: Optional[str] = None) -> int:
        return self._trace.watch(ns, label)

    def check_open(self) -> None:
        self._trace._check_open()

    def validate(self, kind: str, filters: Dict[str, Any]) -> Dict[str, Any]:
        return self._trace._validate(kind, filters)

    def events(self, kind: str, **filters: Any) -> List[Event]:
        return self._trace.select(kind, **filters)

    def all_events(self) -> List[Event]:
        return self._trace.all_events()

    def wait_for(self, kind: str, timeout: float = 2.0, **filters: Any) -> Event:
        return self._trace._wait_for(kind, timeout, filters)

    def assert_none(self, kind: str, **filters: Any) -> None:
        self._trace._assert_none(kind, filters)

    def sync(self, kind: Optional[str] = None) -> None:
        self._trace._sync()
        if kind is not None:
            self._trace._decode_pending((kind_info(kind).kind_id,))

    def wait(self, timeout: float) -> None:
        with self._trace._cond:
            self._trace._cond.wait(timeout)

    def publish(self, events: Iterable[Event]) -> None:
        self._trace._publish(events)

    def lost(self, kind: Optional[str] = None) -> int:
        return self._trace.lost(kind)

    def assert_nothing_lost(self, kind: str, filters: Dict[str, Any]) -> None:
        self._trace._assert_nothing_lost(kind, filters)

    def assert_watching(self, kind: str, filters: Dict[str, Any]) -> None:
        self._trace._assert_watching(kind, filters)

    def fail(self, headline: str, kind: Optional[str], filters: Dict[str, Any],
             offending: Sequence[Event]) -> str:
        return self._trace._failure(headline, kind, filters, offending)

    def snapshot(self) -> Snapshot:
        return self._trace.snapshot()

    def capture_path(self) -> str:
        return self._trace.new_capture_path()


# What one test's trace keeps at most, in the plugin (nettrace_max_records):
# ~110 MiB and ~1 s of decoding at the end of the test at the most (a
# connection storm: 50k connections in 1.3 s made 500k records, 150 MiB
# undecoded, 6 s and 600 MiB to decode). A test that needs more says so.
DEFAULT_MAX_RECORDS = 100_000


class Trace(KindMethods):
    """The `nettrace` fixture: events seen in the watched namespaces since
    the test started, and each kind's listings and assertions (`rst()`,
    `assert_no_rst()`, `assert_address_deleted()`, …), defined next to the
    kind's decoder in pytest_nettrace/probes/ and exposed here one by one.

    Reading (`events`, `wait_for`, assertions) first drains the kernel's ring
    buffer, so anything that happened before the call is included."""

    def __init__(self, engine: Engine, name: str = "", max_records: Optional[int] = None) -> None:
        """`max_records`: how many ring records (about one event each) this
        trace keeps at most; later ones are counted, not kept, and count as
        lost for every kind that comes as records (so negative assertions
        fail instead of passing on what was not kept). None or 0: no limit.
        What a connection storm or a datagram flood in a test would
        otherwise keep grows without bound: ~0.3 KiB a record undecoded,
        ~0.8 KiB decoded, ~12 µs each to decode at the end of the test."""
        if max_records is not None and max_records < 0:
            raise ValueError(f"max_records must be 0 (no limit) or more, not {max_records}")
        self.engine = engine
        self.name = name
        self.max_records = max_records or None
        self.records_dropped = 0   # past max_records: counted, not kept
        self._records_kept = 0
        self.start_ns = time.monotonic_ns()
        self._events: List[Event] = []
        # records not decoded yet, in ring order: as they arrived (batches,
        # made bytes objects when first read), then by kind id (reading one
        # kind decodes only its own)
        self._arrived: List[Iterable[bytes]] = []
        self._raw: Dict[int, List[bytes]] = {}
        self._watched: Dict[int, str] = {}     # inode -> label
        # namespaces this trace began watching after their creation, which
        # it was meant to see whole: what happened before is unknown
        self.watched_late: Dict[int, str] = {}
        self._cond = threading.Condition()
        self._closed = False
        # kinds the test read or asserted on ("*": all); the session summary
        # lists tests that saw e.g. RSTs without ever looking at them
        self.queried: Set[str] = set()
        # kind ids whose records are counted from here on, not decoded
        # (count_unread), and what they counted: kind -> new events
        self._count_only: FrozenSet[int] = frozenset()
        self.counted: Dict[str, int] = {}
        ctx: TraceContext = _Context(self)
        self._apis: Dict[Type[KindApi], KindApi] = {cls: cls(ctx) for cls in API_CLASSES}

    def kind_api(self, api: Type[A]) -> A:
        """This trace's instance of a kind's query class (e.g. `RstApi`),
        through which `Trace` exposes the kind's methods."""
        found = self._apis[api]
        assert isinstance(found, api)
        return found

    # -- scope -------------------------------------------------------------
    def watch(self, ns: NamespaceLike, label: Optional[str] = None, *, late: bool = False) -> int:
        """Also record events from namespace `ns`; returns its inode. `late`:
        the namespace should have been watched from its creation; its earlier
        events count as lost (one per kind), so negative assertions fail."""
        self._check_open()
        inode, path = netns_ref(ns)
        if inode not in self._watched:
            self.engine.watch(inode, self._sink, path)
            self._watched[inode] = (label or getattr(ns, "name", None)
                                    or (ns if isinstance(ns, str) else f"netns:{inode}"))
            if late:
                self.watched_late[inode] = self._watched[inode]
        return inode

    def watch_host(self) -> int:
        """Also record events from the namespace pytest itself runs in."""
        return self.watch(os.stat("/proc/self/ns/net").st_ino, "host")

    @property
    def watched(self) -> Dict[int, str]:
        return dict(self._watched)

    def label(self, inode: int) -> str:
        return self._watched.get(inode, f"netns:{inode}")

    def _sink(self, records: Delivery) -> None:
        """Raw ring records of the watched namespaces (a batch). Runs in the
        drain thread, which must keep up with bursts: the batch is only queued
        here, split, sorted by kind and decoded when the test reads."""
        with self._cond:
            if self.max_records is not None:
                n = len(records)   # (an upper bound: counting exactly would read every record here)
                if self.records_dropped or self._records_kept + n > self.max_records:
                    self.records_dropped += n
                    self._cond.notify_all()
                    return
                self._records_kept += n
            self._arrived.append(records)
            self._cond.notify_all()

    def _publish(self, events: Iterable[Event]) -> None:
        """Events of the sources outside the ring buffer (packet capture,
        nftables trace), made by their own decoders."""
        with self._cond:
            self._events.extend(events)
            self._cond.notify_all()

    def _decode_pending(self, kind_ids: "Optional[Iterable[int]]" = None, *, settle: bool = False) -> None:
        """Decode the records of these kind ids (all: None) in arrival order
        (probes keep per-namespace state, e.g. interface names, that follows
        the order of their own events; each probe has one kind id). Those of
        the kinds count_unread() chose are counted instead, when all are
        read or when only their losses are wanted (`settle`); asked for by
        name, they cannot be had."""
        with self._cond:
            arrived, self._arrived = self._arrived, []
            raw = self._raw
            for batch in arrived:
                for rec in batch:
                    kid = _kind_of(rec, 12)[0]  # nt_hdr.kind
                    queue = raw.get(kid)
                    if queue is None:
                        raw[kid] = [rec]
                    else:
                        queue.append(rec)
            # Events hold no cycles, but building many of them sets off the
            # cyclic collector again and again over everything already kept
            # (~20 % of decoding a flood): it waits until the batch is done.
            paused = gc.isenabled()
            if paused:
                gc.disable()
            decode_all, keep = self.engine.decode_all, self._events.append   # per event: no lookups
            try:
                for kid in (list(raw) if kind_ids is None else kind_ids):
                    if kid in self._count_only:
                        if kind_ids is not None and not settle:
                            raise NettraceError(f"{', '.join(k for k, i in kinds().items() if i.kind_id == kid)} "
                                                "events of this trace were counted, not decoded, once its test "
                                                "passed (count_unread)")
                        self._count(raw.pop(kid, ()))
                        continue
                    queue = raw.pop(kid, None)
                    if not queue:
                        continue
                    for event in decode_all(kid, queue):
                        if event.supersedes is not None:  # a correction of an earlier event
                            self._correct(event)
                        else:
                            keep(event)
            finally:
                if paused:
                    gc.enable()

    def _count(self, queue: Iterable[bytes]) -> None:
        count, counted = self.engine.count, self.counted
        for rec in queue:
            for kind in count(rec):
                counted[kind] = counted.get(kind, 0) + 1

    def count_unread(self) -> None:
        """From now on, the records of the probes none of whose kinds the test
        read, asserted on, or must be told about (an alarm kind: Event.ALARM)
        are counted, not decoded: a passing test's report needs only how many
        events of each kind it saw (`counted`), and decoding what nobody reads
        was most of a trace's cost at the end of a test."""
        if "*" in self.queried:
            return
        wanted = {info.kind_id for kind, info in kinds().items() if kind in self.queried or info.event_type.ALARM}
        with self._cond:
            self._count_only = frozenset(info.kind_id for info in kinds().values()
                                         if info.kind_id not in wanted and self.engine.carries_records(info.kind_id))

    def _correct(self, event: Event) -> None:
        """`event` takes the place of the one it supersedes (a published event
        never changes: whoever holds the earlier keeps what it saw); kept as
        a new fact when the earlier one is no longer here."""
        old = event.supersedes
        for i in range(len(self._events) - 1, -1, -1):  # corrections follow closely
            if self._events[i] is old:
                self._events[i] = event
                return
        self._events.append(event)

    def _pending_kinds(self) -> List[int]:
        """Kind ids with records not decoded yet."""
        self._decode_pending(())  # sort what arrived, decode nothing
        with self._cond:
            return list(self._raw)

    # -- reading -----------------------------------------------------------
    def _sync(self) -> None:
        self._check_open()
        self.engine.drain()
        for api in self._apis.values():  # kinds with sources of their own (packets, verdicts)
            api.pull()

    def files(self) -> Dict[str, str]:
        """The files the kinds have written for this trace so far (e.g. "pcap"),
        without draining or writing one."""
        return {what: path for api in self._apis.values() for what, path in api.files().items()}

    def all_events(self) -> List[Event]:
        """Every event so far, in time order, without draining."""
        self._decode_pending()
        with self._cond:
            return sorted(self._events, key=lambda e: e.timestamp)

    @overload
    def events(self, kind: Literal["addr"], **filters: Any) -> List["AddrEvent"]: ...

    @overload
    def events(self, kind: Literal["conn"], **filters: Any) -> List["ConnEvent"]: ...

    @overload
    def events(self, kind: Literal["drop"], **filters: Any) -> List["DropEvent"]: ...

    @overload
    def events(self, kind: Literal["link"], **filters: Any) -> List["LinkEvent"]: ...

    @overload
    def events(self, kind: Literal["neigh"], **filters: Any) -> List["NeighEvent"]: ...

    @overload
    def events(self, kind: Literal["nexthop"], **filters: Any) -> List["NexthopEvent"]: ...

    @overload
    def events(self, kind: Literal["nft"], **filters: Any) -> List["NftEvent"]: ...

    @overload
    def events(self, kind: Literal["nftrace"], **filters: Any) -> List["NftVerdictEvent"]: ...

    @overload
    def events(self, kind: Literal["packet"], **filters: Any) -> List["PacketEvent"]: ...

    @overload
    def events(self, kind: Literal["retransmit"], **filters: Any) -> List["RetransmitEvent"]: ...

    @overload
    def events(self, kind: Literal["route"], **filters: Any) -> List["RouteEvent"]: ...

    @overload
    def events(self, kind: Literal["rst"], **filters: Any) -> List["RstEvent"]: ...

    @overload
    def events(self, kind: Literal["rule"], **filters: Any) -> List["RuleEvent"]: ...

    @overload
    def events(self, kind: Literal["syscall"], **filters: Any) -> List["SyscallEvent"]: ...

    @overload
    def events(self, kind: Literal["sysctl"], **filters: Any) -> List["SysctlEvent"]: ...

    @overload
    def events(self, kind: None = ..., **filters: Any) -> List[Event]: ...

    def events(self, kind: Optional[str] = None, **filters: Any) -> List[Any]:
        """Events in time order; `kind` and attribute filters narrow them.

        A filter value may be a value, a list of values, or a predicate."""
        return self.select(kind, **filters)

    def select(self, kind: Optional[str] = None, **filters: Any) -> List[Event]:
        """events() for a kind known at run time (a str: typed as Event)."""
        filters = self._validate(kind, filters)
        self._sync()
        if kind is None:
            return [e for e in self.all_events() if matches(e, filters)]
        self._decode_pending((kind_info(kind).kind_id,))
        with self._cond:
            found = [e for e in self._events if e.kind == kind]
        return [e for e in sorted(found, key=lambda e: e.timestamp) if matches(e, filters)]

    @overload
    def wait_for(self, kind: Literal["addr"], timeout: float = ..., **filters: Any) -> "AddrEvent": ...

    @overload
    def wait_for(self, kind: Literal["conn"], timeout: float = ..., **filters: Any) -> "ConnEvent": ...

    @overload
    def wait_for(self, kind: Literal["drop"], timeout: float = ..., **filters: Any) -> "DropEvent": ...

    @overload
    def wait_for(self, kind: Literal["link"], timeout: float = ..., **filters: Any) -> "LinkEvent": ...

    @overload
    def wait_for(self, kind: Literal["neigh"], timeout: float = ..., **filters: Any) -> "NeighEvent": ...

    @overload
    def wait_for(self, kind: Literal["nexthop"], timeout: float = ..., **filters: Any) -> "NexthopEvent": ...

    @overload
    def wait_for(self, kind: Literal["nft"], timeout: float = ..., **filters: Any) -> "NftEvent": ...

    @overload
    def wait_for(self, kind: Literal["nftrace"], timeout: float = ..., **filters: Any) -> "NftVerdictEvent": ...

    @overload
    def wait_for(self, kind: Literal["packet"], timeout: float = ..., **filters: Any) -> "PacketEvent": ...

    @overload
    def wait_for(self, kind: Literal["retransmit"], timeout: float = ..., **filters: Any) -> "RetransmitEvent": ...

    @overload
    def wait_for(self, kind: Literal["route"], timeout: float = ..., **filters: Any) -> "RouteEvent": ...

    @overload
    def wait_for(self, kind: Literal["rst"], timeout: float = ..., **filters: Any) -> "RstEvent": ...

    @overload
    def wait_for(self, kind: Literal["rule"], timeout: float = ..., **filters: Any) -> "RuleEvent": ...

    @overload
    def wait_for(self, kind: Literal["syscall"], timeout: float = ..., **filters: Any) -> "SyscallEvent": ...

    @overload
    def wait_for(self, kind: Literal["sysctl"], timeout: float = ..., **filters: Any) -> "SysctlEvent": ...

    def wait_for(self, kind: str, timeout: float = 2.0, **filters: Any) -> Any:
        """The first matching event, waiting up to `timeout` seconds for it."""
        return self._wait_for(kind, timeout, filters)

    def _wait_for(self, kind: str, timeout: float, filters: Dict[str, Any]) -> Event:
        self._validate(kind, filters)
        deadline = time.monotonic() + check_timeout(timeout)
        while True:
            found = self.select(kind, **filters)
            if found:
                return found[0]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(self._failure(
                    f"timed out after {timeout:g}s waiting for a {kind} event matching {describe_filters(filters)}"
                    + self._limit_note(), kind, filters, []))
            with self._cond:
                self._cond.wait(min(left, 0.02))

    def lost(self, kind: Optional[str] = None) -> int:
        """Events of `kind` (or any kind) the kernel could not deliver to this test."""
        self._sync()
        return self._lost_so_far(kind)

    def _lost_so_far(self, kind: Optional[str]) -> int:
        """lost() without draining first: after a read that drained, the
        counters read now cover every event it could have missed."""
        ids = {kind_info(kind).kind_id} if kind else None
        self._decode_pending(ids, settle=True)  # some losses show only when records are decoded
        total = 0
        misses = self.engine.program_misses(ids)   # read once for every namespace
        for inode in self._watched:
            for kid, n in self.engine.lost(inode, misses).items():
                if ids is None or kid in ids:
                    total += n
            for k, n in self.engine.lost_elsewhere(inode, kind).items():
                if kind is None or k == kind:
                    total += n
            if inode in self.watched_late:
                total += 1 if kind is not None else len(kinds())
        if self.records_dropped and (ids is None or any(self.engine.carries_records(k) for k in ids)):
            total += self.records_dropped
        return total

    # -- generic assertions -----------------------------------------------
    def assert_none(self, kind: KindName, **filters: Any) -> None:
        """Fail if any `kind` event matching filters happened — or may have been lost."""
        self._assert_none(kind, filters)

    def _assert_none(self, kind: str, filters: Dict[str, Any]) -> None:
        found = news(self.select(kind, **filters), filters)
        if found:
            raise AssertionError(self._failure(
                f"expected no {kind} events matching {describe_filters(filters)}, saw {len(found)}",
                kind, filters, found))
        self._assert_nothing_lost(kind, filters, drained=True)   # events() just drained

    @overload
    def assert_any(self, kind: Literal["addr"], timeout: float = ..., **filters: Any) -> "AddrEvent": ...

    @overload
    def assert_any(self, kind: Literal["conn"], timeout: float = ..., **filters: Any) -> "ConnEvent": ...

    @overload
    def assert_any(self, kind: Literal["drop"], timeout: float = ..., **filters: Any) -> "DropEvent": ...

    @overload
    def assert_any(self, kind: Literal["link"], timeout: float = ..., **filters: Any) -> "LinkEvent": ...

    @overload
    def assert_any(self, kind: Literal["neigh"], timeout: float = ..., **filters: Any) -> "NeighEvent": ...

    @overload
    def assert_any(self, kind: Literal["nexthop"], timeout: float = ..., **filters: Any) -> "NexthopEvent": ...

    @overload
    def assert_any(self, kind: Literal["nft"], timeout: float = ..., **filters: Any) -> "NftEvent": ...

    @overload
    def assert_any(self, kind: Literal["nftrace"], timeout: float = ..., **filters: Any) -> "NftVerdictEvent": ...

    @overload
    def assert_any(self, kind: Literal["packet"], timeout: float = ..., **filters: Any) -> "PacketEvent": ...

    @overload
    def assert_any(self, kind: Literal["retransmit"], timeout: float = ..., **filters: Any) -> "RetransmitEvent": ...

    @overload
    def assert_any(self, kind: Literal["route"], timeout: float = ..., **filters: Any) -> "RouteEvent": ...

    @overload
    def assert_any(self, kind: Literal["rst"], timeout: float = ..., **filters: Any) -> "RstEvent": ...

    @overload
    def assert_any(self, kind: Literal["rule"], timeout: float = ..., **filters: Any) -> "RuleEvent": ...

    @overload
    def assert_any(self, kind: Literal["syscall"], timeout: float = ..., **filters: Any) -> "SyscallEvent": ...

    @overload
    def assert_any(self, kind: Literal["sysctl"], timeout: float = ..., **filters: Any) -> "SysctlEvent": ...

    def assert_any(self, kind: str, timeout: float = 2.0, **filters: Any) -> Any:
        """The first `kind` event matching filters; fails with the timeline if none comes."""
        return self._wait_for(kind, timeout, filters)

    def expect_sequence(self, *items: "sequence.Step | sequence.Forbid", timeout: float = 2.0,
                        since: "Event | int | None" = None) -> "sequence.SequenceMatch":
        """Events meeting `step(...)`s in this order (others may come between),
        bindings carried forward, no `forbid(...)` broken, within `timeout`
        seconds for the whole; returns the steps' events. With `since` (an
        event or a CLOCK_MONOTONIC ns timestamp) only later events count.

        A forbid is sound: if events of its kind may have been lost, it fails
        with EventsLost."""
        seq = sequence.build(items)
        for kind in seq.kinds:
            self._validate(kind, {})  # filters were checked by step()/forbid()
        after = since.timestamp if isinstance(since, Event) else since
        deadline = time.monotonic() + timeout
        while True:
            self._sync()
            outcome = sequence.match(seq, self.all_events(), after)
            if outcome.matched is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0 or outcome.violation is not None:   # a broken forbid is final
                raise AssertionError(self._sequence_failure(seq, outcome, timeout))
            with self._cond:
                self._cond.wait(min(left, 0.02))
        for f, _, _ in seq.forbids:
            lost = self.lost(f.kind)
            if lost:
                raise EventsLost(self._sequence_failure(
                    seq, outcome, timeout,
                    f"cannot assert {f.describe()}: {lost} {f.kind} events lost ({self.loss_causes()}); "
                    f"the expectation would not be sound"))
        return outcome.matched

    def _sequence_failure(self, seq: "sequence.Expectation", outcome: "sequence.Outcome", timeout: float,
                          headline: Optional[str] = None) -> str:
        offending: List[Event] = []
        if headline is None:
            i = outcome.failed_step or 0
            if outcome.violation:
                f, bad, _ = outcome.violation
                offending = [bad]
                headline = (f"sequence not met within {timeout:g}s: a forbidden {f.kind} event came between "
                            f"{f.between[0]!r} and {f.between[1]!r}")
            else:
                headline = (f"sequence not met within {timeout:g}s: {seq.label(i)} of {len(seq.steps)} "
                            f"({seq.steps[i].kind}) did not happen")
        view = self.snapshot()
        details = ["steps:"] + sequence.explain(seq, outcome, lambda e: seed_line(e, view))
        return render_failure(view, headline, seq.kinds, offending, details,
                              highlight=list(outcome.partial) + offending
                              + ([outcome.violation[2]] if outcome.violation else []))

    def _assert_watching(self, kind: str, filters: Dict[str, Any]) -> None:
        """A negative assertion needs somewhere to look: with no namespace
        watched it would pass whatever happened."""
        if not self._watched:
            raise NothingWatched(
                f"cannot assert that no {kind} event matching {describe_filters(filters)} happened: this test "
                f"watches no network namespace, so it would pass whatever happened (a test's namespaces come "
                f"from the netns / make_netns fixtures; the one pytest runs in is watched by "
                f"nettrace.watch_host() or @pytest.mark.nettrace(watch_host=True))")

    def _assert_nothing_lost(self, kind: str, filters: Dict[str, Any], drained: bool = False) -> None:
        self._assert_watching(kind, filters)
        lost = self._lost_so_far(kind) if drained else self.lost(kind)
        if lost:
            raise EventsLost(self._failure(
                f"cannot assert that no {kind} event matching {describe_filters(filters)} happened: "
                f"{lost} {kind} events lost ({self.loss_causes()}); the assertion would not be sound",
                kind, filters, []))

    # -- helpers -----------------------------------------------------------
    def loss_causes(self) -> str:
        """What can have lost this trace's events, for a message that says
        some were: the usual causes, and those particular to it."""
        causes = ("a full ring buffer or socket, a race, a probe call the kernel skipped (the probe was already "
                  "running on that CPU), or an undecodable record")
        if self.watched_late:
            causes += (f"; watched only after their creation, so their first events are unknown: "
                       f"{', '.join(self.watched_late.values())}")
        return causes + self._limit_note()

    def _limit_note(self) -> str:
        if not self.records_dropped:
            return ""
        return (f"; {self.records_dropped} records past this trace's limit of {self.max_records} were not kept "
                f"(nettrace_max_records, or @pytest.mark.nettrace(max_records=...)): of any kind, unread, so each "
                f"kind counts them all as possibly its own")

    def _validate(self, kind: Optional[str], filters: Dict[str, Any]) -> Dict[str, Any]:
        """The filters as events compare with them; usage errors for bad ones."""
        if kind is None:
            self.queried.add("*")
            return check_filters_any_kind(filters)
        info = kind_info(kind)
        self.queried.add(kind)
        filters = check_filters(info.event_type, filters)
        why = self.engine.probe_available(info.probe)
        if why:
            where = "" if info.probe in self.engine.left_out else " on this kernel"
            raise NettraceError(f"{kind} events are not available{where}: {why}")
        return filters

    def _failure(self, headline: str, kind: Optional[str], filters: Dict[str, Any],
                 offending: Iterable[Event]) -> str:
        view = self.snapshot()
        text = render_failure(view, headline, kind, list(offending))
        self._last_failure = (text, max((e.timestamp for e in view.events), default=view.start_ns))
        return text

    def failure_shown_until(self, message: str) -> Optional[int]:
        """When `message` holds this trace's last failure text (its
        timeline): the time of the last event that timeline showed."""
        last = getattr(self, "_last_failure", None)
        return last[1] if last is not None and last[0] in message else None

    def snapshot(self, nodeid: str = "") -> TraceView:
        """A frozen view of this trace for reports: its losses (read first,
        which drains), events and namespaces as they are now."""
        return TraceView.of(self, nodeid, kinds())

    def new_capture_path(self) -> str:
        """Where this trace's pcapng is written: the process's capture
        directory, whose passing tests' files the plugin removes at teardown
        (pytest_nettrace.report.captures); `nettrace watch` chooses its own."""
        return capture_path(self.name or "capture")

    def take(self) -> List[Event]:
        """Every event so far, in time order, forgotten by the trace from here
        on (`nettrace watch` runs for days): later reads see only later events."""
        self._decode_pending()
        with self._cond:
            events, self._events = sorted(self._events, key=lambda e: e.timestamp), []
        return events

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise NettraceError("this nettrace was closed at the end of its test; events are no longer recorded")

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.engine.drain()
            for api in self._apis.values():
                api.pull()
            # while the probes still know the namespaces; the others may wait
            # until (if ever) they are read
            self._decode_pending([kid for kid in self._pending_kinds() if self.engine.decode_needs_watch(kid)],
                                 settle=True)
        finally:
            for inode in list(self._watched):
                self.engine.unwatch(inode)
            self._closed = True
            for api in self._apis.values():
                api.finish()

"""The one thing reports read: a frozen snapshot of a test's trace.

`TraceView.of(trace)` asks the trace once (its losses, which drains the
ring, then its events); everything that renders — failure messages, the
report section, JSON lines, JUnit properties, the CLI's output — reads the
view and never the trace, so rendering never drains and never changes what
it shows."""
from __future__ import annotations

import dataclasses
from collections import Counter
from types import MappingProxyType
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Protocol, Tuple

from ..events import Event


class Observed(Protocol):
    """What a view is taken from (a Trace)."""

    start_ns: int

    @property
    def closed(self) -> bool: ...

    @property
    def watched(self) -> Dict[int, str]: ...

    def lost(self, kind: Optional[str] = None) -> int: ...

    def all_events(self) -> List[Event]: ...

    def files(self) -> Dict[str, str]: ...


@dataclasses.dataclass(frozen=True, eq=False)
class TraceView:
    """A test's events, losses, watched namespaces and files, as they were
    when the view was taken; `dataclasses.replace` makes a changed copy."""

    start_ns: int
    events: Tuple[Event, ...] = ()
    labels: Mapping[int, str] = dataclasses.field(default_factory=dict)   # watched namespace inode -> label
    lost_total: Optional[int] = 0        # None: unknown (the test closed the trace itself)
    lost_by_kind: Mapping[str, int] = dataclasses.field(default_factory=dict)   # the kinds that lost events
    queried: FrozenSet[str] = frozenset()    # kinds the test read or asserted on ("*": all)
    nodeid: str = ""
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)   # what -> path: "pcap", "events file", …
    highlight: Tuple[Event, ...] = ()    # events to mark (a gate's offending events)
    late: Mapping[int, str] = dataclasses.field(default_factory=dict)   # watched only after their creation
    shown_until: Optional[int] = None    # the failure's message showed the timeline up to this event's time
    # kind -> events counted, not decoded: kinds a passing test never read (Trace.count_unread)
    counted: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # read-only copies: a view handed to a reporter cannot be changed under another
        for name in ("labels", "lost_by_kind", "late", "files", "counted"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        for name in ("events", "highlight"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "queried", frozenset(self.queried))

    @classmethod
    def of(cls, trace: Observed, nodeid: str = "", kinds: Iterable[str] = ()) -> "TraceView":
        """Snapshot `trace`. When it is still open, its losses are read first
        (which drains the ring, so the events up to now are in); when it lost
        some, so are those of each of `kinds` (the kinds it may have lost)."""
        lost_total: Optional[int] = None
        lost_by_kind: Dict[str, int] = {}
        if not trace.closed:
            lost_total = trace.lost()
            if lost_total:
                for kind in kinds:
                    n = trace.lost(kind)
                    if n:
                        lost_by_kind[kind] = n
        # the files written so far (a capture is written as packets are
        # read, which lost() just did): the view names them, it writes none
        events = tuple(trace.all_events())
        return cls(start_ns=trace.start_ns, events=events, labels=trace.watched,
                   lost_total=lost_total, lost_by_kind=lost_by_kind, counted=getattr(trace, "counted", {}),
                   queried=frozenset(getattr(trace, "queried", ())), nodeid=nodeid,
                   files=trace.files(), late=getattr(trace, "watched_late", {}))

    def replace(self, **changes: Any) -> "TraceView":
        return dataclasses.replace(self, **changes)

    # -- derived -------------------------------------------------------------
    def label(self, inode: int) -> str:
        return self.labels.get(inode, f"netns:{inode}")

    def counts(self) -> Dict[str, int]:
        """Events by kind: those in `events` and those only `counted`."""
        return dict(sorted((Counter(e.kind for e in self.events) + Counter(self.counted)).items()))

    def lost(self, kind: Optional[str] = None) -> int:
        """Events of `kind` (any: None) the test may have missed (0 when unknown)."""
        if kind is None:
            return self.lost_total or 0
        return self.lost_by_kind.get(kind, 0)

    def unasserted(self) -> List[str]:
        """Alarm kinds (Event.ALARM) this test saw, not as background, but
        never read or asserted on."""
        if "*" in self.queried:
            return []
        seen: Dict[str, None] = {}
        for e in self.events:
            if type(e).ALARM and not e.background and e.kind not in self.queried:
                seen[e.kind] = None
        return sorted(seen)

    def lost_line(self, kinds: Iterable[str] = ()) -> str:
        """`lost events: N`, with the count of each of `kinds` (default: those
        that lost some)."""
        if self.lost_total is None:
            return "lost events: unknown (the test closed its trace)"
        shown = list(kinds) or list(self.lost_by_kind)
        by_kind = ", ".join(f"{k}: {self.lost(k)}" for k in shown) if self.lost_total else ""
        return f"lost events: {self.lost_total}" + (f" ({by_kind})" if by_kind else "")

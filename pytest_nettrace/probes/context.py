"""What a kind's query class (the `nettrace` methods of one probe, e.g.
`RstApi`) gets from the trace it serves: `TraceContext`, a small typed
contract. The `Trace` (pytest_nettrace/trace.py) implements it and exposes
each kind's methods as its own; a query class never sees the Trace itself.

Also the types that make those methods checkable: `Filter[T]` (what a filter
keyword accepts) and `CommonFilters` (the fields every kind has), from which
each kind declares its own filters as a TypedDict."""
from __future__ import annotations

import sys
from typing import (TYPE_CHECKING, Any, Callable, Collection, Dict, Generic, Iterable, List, Mapping, Optional,
                    Protocol, Sequence, Tuple, Type, TypedDict, TypeVar, Union, cast, overload)

from ..events import Event

if TYPE_CHECKING:
    from ..kernel.engine import Engine

T = TypeVar("T")
# A filter keyword takes a value, a collection of values (any of them), a
# predicate, or None ("the field is absent").
Filter = Union[T, Collection[T], Callable[[Any], bool], None]
# Address fields take text ("10.0.0.1", "10.0.0.0/24") or ipaddress objects.
AddressFilter = Filter[Any]


class CommonFilters(TypedDict, total=False):
    """Filters every kind takes (Event's common fields)."""

    timestamp: Filter[int]
    netns: Filter[int]
    pid: Filter[int]
    tid: Filter[int]
    comm: Filter[str]
    uid: Filter[int]
    ppid: Filter[int]
    parent_comm: Filter[str]
    context: Filter[str]


class TcpFlowFilters(CommonFilters, total=False):
    """Filters of the TCP kinds (rst, retransmit, conn): the flow and its state."""

    family: Filter[Union[int, str]]
    saddr: AddressFilter
    sport: Filter[int]
    daddr: AddressFilter
    dport: Filter[int]
    state: Filter[str]


class Snapshot(Protocol):
    """A trace frozen at one moment, for rendering (the Trace gives a
    report.view.TraceView): reading it never drains or changes anything."""

    @property
    def start_ns(self) -> int: ...

    @property
    def labels(self) -> Mapping[int, str]:
        """Watched namespace inode -> label."""

    @property
    def events(self) -> Tuple[Event, ...]:
        """In time order."""

    def label(self, inode: int) -> str: ...

    def lost(self, kind: Optional[str] = None) -> int: ...


class TraceContext(Protocol):
    """The trace as a kind's query class sees it."""

    @property
    def name(self) -> str:
        """The test's node id ("" if none)."""

    @property
    def engine(self) -> "Engine":
        """The engine the probes run in (a probe's status, its tables)."""

    @property
    def closed(self) -> bool:
        """The test ended: nothing is recorded any more."""

    @property
    def watched(self) -> Dict[int, str]:
        """Watched namespaces: inode -> label."""

    def label(self, inode: int) -> str:
        """The label of a namespace (inode)."""

    def watch(self, ns: Any, label: Optional[str] = None) -> int:
        """Also watch `ns` (as Trace.watch); returns its inode."""

    def check_open(self) -> None:
        """Raise NettraceError once the trace is closed."""

    def validate(self, kind: str, filters: Dict[str, Any]) -> Dict[str, Any]:
        """The filters as events compare with them; a usage error for a bad
        one, or when the kind's probe is not available."""

    def events(self, kind: str, **filters: Any) -> List[Event]:
        """The kind's matching events since the test started, in time order
        (reads what the kernel has first)."""

    def all_events(self) -> List[Event]:
        """Every event so far, in time order, without reading the kernel."""

    def wait_for(self, kind: str, timeout: float = 2.0, **filters: Any) -> Event:
        """The first matching event, waiting up to `timeout`; fails with the timeline."""

    def assert_none(self, kind: str, **filters: Any) -> None:
        """No matching event happened — and none may have been lost."""

    def sync(self, kind: Optional[str] = None) -> None:
        """Read what the kernel and the kinds' own sources hold now (and
        decode `kind`'s records)."""

    def wait(self, timeout: float) -> None:
        """Sleep until something arrives or `timeout` seconds pass."""

    def publish(self, events: Iterable[Event]) -> None:
        """Add the events a kind's own source made, outside the ring buffer
        (captured packets, nftables verdicts)."""

    def lost(self, kind: Optional[str] = None) -> int:
        """Events of `kind` (any: None) the test may have missed."""

    def assert_nothing_lost(self, kind: str, filters: Dict[str, Any]) -> None:
        """Raise EventsLost (with the timeline) when `kind` events may have been missed."""

    def assert_watching(self, kind: str, filters: Dict[str, Any]) -> None:
        """Raise NothingWatched when no namespace is watched: a negative
        assertion about `kind` would then pass whatever happened."""

    def fail(self, headline: str, kind: Optional[str], filters: Dict[str, Any],
             offending: Sequence[Event]) -> str:
        """A failure's message: the headline, the timeline with `offending`
        marked, the losses, the first offending event's stack."""

    def snapshot(self) -> Snapshot:
        """The trace now, frozen, for rendering (reads the kernel first)."""

    def capture_path(self) -> str:
        """A new file for this trace's captures (the plugin keeps failing tests' ones)."""


class KindApi:
    """Base of a kind's query class: `nettrace` methods over a TraceContext.

    `pull` and `finish` are for kinds with sources of their own (a packet
    capture, a netlink listener): the trace calls `pull` whenever the test
    reads, and `finish` once it closes, after a last `pull`."""

    def __init__(self, ctx: TraceContext) -> None:
        self.ctx = ctx

    def pull(self) -> None:
        """Hand over to the trace (`ctx.publish`) what the kind's own sources hold."""

    def finish(self) -> None:
        """The trace closed: release what `pull` used."""

    def files(self) -> Dict[str, str]:
        """The files this kind has written for the trace so far, what -> path
        (for reports: reading it writes nothing)."""
        return {}


# -- how the Trace exposes each kind's methods (pytest_nettrace/kind_methods.py) --

A = TypeVar("A", bound=KindApi)
Q = TypeVar("Q", bound=KindApi)
R = TypeVar("R")
if TYPE_CHECKING:
    from typing_extensions import Concatenate, ParamSpec
    P = ParamSpec("P")
elif sys.version_info >= (3, 10):
    from typing import ParamSpec
    P = ParamSpec("P")
else:  # only annotations use it (strings, never evaluated)
    P = TypeVar("P")


class KindApis(Protocol):
    """What holds one query object per kind (the Trace)."""

    def kind_api(self, api: Type[A]) -> A:
        """The instance of query class `api` serving this trace."""


class _KindMember:
    """A query class's member, read on the trace's instance of that class."""

    def __init__(self, func: Callable[..., Any]) -> None:
        owner, _, self.name = func.__qualname__.rpartition(".")
        self.api: Type[KindApi] = getattr(sys.modules[func.__module__], owner)
        self.__doc__ = func.__doc__

    def _read(self, obj: KindApis) -> Any:
        return getattr(obj.kind_api(self.api), self.name)


class Delegate(_KindMember, Generic[Q, P, R]):
    """`assert_rst = Delegate(RstApi.assert_rst)` on the Trace's class: the
    kind's method, called on the trace's instance of its query class, with
    its full signature for type checkers (a misspelt method or a filter of
    the wrong type is an error in the user's test)."""

    def __init__(self, func: "Callable[Concatenate[Q, P], R]") -> None:
        super().__init__(func)

    @overload
    def __get__(self, obj: None, owner: type) -> "Delegate[Q, P, R]": ...

    @overload
    def __get__(self, obj: KindApis, owner: type) -> "Callable[P, R]": ...

    def __get__(self, obj: Optional[KindApis], owner: type) -> Any:
        return self if obj is None else self._read(obj)


class DelegateProperty(_KindMember, Generic[Q, R]):
    """`pcap_path = DelegateProperty(PacketApi.pcap_path)`: the kind's
    property, read on the trace's instance of its query class. (Type
    checkers see a property read on its class as its getter, which types
    this; at run time it is the property.)"""

    def __init__(self, prop: "Callable[[Q], R]") -> None:
        getter = cast(property, prop).fget
        assert getter is not None
        super().__init__(getter)

    @overload
    def __get__(self, obj: None, owner: type) -> "DelegateProperty[Q, R]": ...

    @overload
    def __get__(self, obj: KindApis, owner: type) -> R: ...

    def __get__(self, obj: Optional[KindApis], owner: type) -> Any:
        return self if obj is None else self._read(obj)

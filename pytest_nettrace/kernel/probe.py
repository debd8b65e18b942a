"""What the engine loads: a probe's kernel plan (`Probe`: how it attaches on
a given kernel, and the state it keeps beside the kernel) and its decoder
(`Decoder`: ring-buffer records to events, pure). The probes themselves
(pytest_nettrace/probes/) subclass both; the engine gets them from its
caller and never imports the probes room."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Dict, List, Optional, Protocol, Tuple, Type

from ..events import Event, Header
from .wire import Record

if TYPE_CHECKING:
    from .capabilities import KernelFeatures
    from .libbpf import LoadedMaps


@dataclass
class Plan:
    """One way to attach a probe: the programs to load and what to call it."""

    mechanism: str                         # e.g. "tp_btf", "tp_btf+fentry"
    programs: List[str]
    config: Dict[str, bytes] = field(default_factory=dict)  # const volatile var -> value
    notes: List[str] = field(default_factory=list)
    cgroups: Dict[str, str] = field(default_factory=dict)  # cgroup program -> the cgroup v2 directory it attaches to
    # programs whose calls the kernel skipped (recursion misses) the probe's
    # lost() finds itself, exactly; the others' count for every kind of the
    # probe in every watched namespace
    own_misses: List[str] = field(default_factory=list)
    # program -> an array map (one u64) counting its skipped calls that
    # another program of the plan made up for: those are not lost
    covered: Dict[str, str] = field(default_factory=dict)


class Decoder:
    """A probe's ring records to immutable events: bytes in, events out, no
    kernel (tests feed it synthetic records built with kernel/wire.py). What
    it keeps across records (a connection's two halves, a thread's last
    write) is per namespace, dropped by `forget`. This base has no records:
    any record of its kind is rejected as undecodable."""

    # the layouts of its ring records (kernel/wire.py)
    records: ClassVar[Tuple[Record, ...]] = ()
    # It needs what the probe's watch() set up and unwatch() drops (sockets,
    # per-namespace state): a trace decodes its records before unwatching.
    # False: they may stay raw until read, even after the test.
    needs_watch: ClassVar[bool] = True

    def layout(self, hdr: Header) -> Optional[Record]:
        """The layout of the record `hdr` heads (one probe may write several,
        told apart by header flags)."""
        return self.records[0] if self.records else None

    def decode(self, buf: bytes, hdr: Header) -> List[Event]:
        """The events a ring record (of one of `records`, length checked)
        stands for: usually one (possibly a correction superseding an
        earlier event, `Event.corrected`); none when it is no change; several
        when it holds a batch (nftables)."""
        raise NotImplementedError(f"{type(self).__name__} has no ring records")

    def count(self, buf: bytes, hdr: Header) -> List[str]:
        """The kinds of the new events (not corrections) decode() would make
        of this record, as decode() would keep its state and losses: a
        passing test's report needs only how many there were of kinds it
        never read. This default decodes; a decoder whose events cost more to
        make than to tell apart says so cheaper."""
        return [e.kind for e in self.decode(buf, hdr) if e.supersedes is None]

    def forget(self, netns: int) -> None:
        """`netns` is no longer watched: drop what was kept for it."""


class Wakeups(Protocol):
    """Descriptors whose new data wakes the engine's drain, which then polls
    every probe (a capture's sockets: without them a probe's own source was
    read only when ring records came, or every 0.2 s)."""

    def wake_on(self, fd: int) -> None: ...

    def stop_waking_on(self, fd: int) -> None:
        """Before `fd` closes."""


class _NoWakeups:
    def wake_on(self, fd: int) -> None:
        pass

    def stop_waking_on(self, fd: int) -> None:
        pass


class Probe:
    """Base class: subclasses set the class attributes and implement plans;
    a probe with ring records sets its `decoder`."""

    name: ClassVar[str]                    # "rst"
    kind_id: ClassVar[int]                 # enum nt_kind value of its records (wire.Kind)
    event_types: ClassVar[Dict[str, Type[Event]]]  # public kind name -> Event class
    # its records to events (the engine's RecordDecoder calls it); this
    # default has no records
    decoder: Decoder = Decoder()
    # set by the engine that loads the probe
    wakeups: Wakeups = _NoWakeups()

    def plans(self, kernel: "KernelFeatures") -> List[Plan]:
        """Ways to attach on this kernel, best first; empty if none can work."""
        raise NotImplementedError

    def unavailable_reason(self, kernel: "KernelFeatures") -> str:
        return "no attach mechanism available on this kernel"

    # Hooks for probes that keep state outside the kernel (sockets, maps).
    def attached(self, obj: "LoadedMaps") -> None:
        """Called once the object is loaded: look up the probe's own maps."""

    def reset(self, netns: int) -> None:
        """A namespace is about to be watched, before the kernel's programs
        see it: forget what an earlier namespace with the same inode left
        (deleted later, it could take the new namespace's first counts)."""

    def watch(self, netns: int, path: Optional[str]) -> None:
        """A namespace starts being watched; `path` opens it (may be None)."""

    def unwatch(self, netns: int) -> None:
        """A namespace stops being watched."""

    def poll(self) -> bool:
        """Called before every drain of the ring buffer. True: it left work
        for the next (a batch at a time), which then comes without a pause."""
        return False

    def lost(self, netns: int) -> Dict[str, int]:
        """Events lost outside the ring buffer, by public kind."""
        return {}

    def close(self) -> None:
        """Release whatever the hooks above acquired."""

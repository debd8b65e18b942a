"""What the engine loads: a probe's plans (how it attaches on a given kernel)
and its decoder from ring-buffer records to events. The probes themselves
(pytest_nettrace/probes/) subclass Probe; the engine gets them from its
caller and never imports the probes room."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Dict, List, Optional, Tuple, Type

from ..events import Event, Header
from .wire import Record

if TYPE_CHECKING:
    from .capabilities import KernelFeatures
    from .libbpf import BpfObject


@dataclass
class Plan:
    """One way to attach a probe: the programs to load and what to call it."""

    mechanism: str                         # e.g. "tp_btf", "tp_btf+fentry"
    programs: List[str]
    config: Dict[str, bytes] = field(default_factory=dict)  # const volatile var -> value
    notes: List[str] = field(default_factory=list)
    cgroups: Dict[str, str] = field(default_factory=dict)  # cgroup program -> the cgroup v2 directory it attaches to


class Probe:
    """Base class: subclasses set the class attributes and implement plans/decode."""

    name: ClassVar[str]                    # "rst"
    kind_id: ClassVar[int]                 # enum nt_kind value of its records (wire.Kind)
    # the layouts of its ring records (kernel/wire.py); none: it has no
    # ring records, and any record of its kind is rejected as undecodable
    records: ClassVar[Tuple[Record, ...]] = ()
    event_types: ClassVar[Dict[str, Type[Event]]]  # public kind name -> Event class
    # Its decoder needs what watch() set up and unwatch() drops (sockets,
    # per-namespace state): a trace decodes its records before unwatching.
    # False: they may stay raw until read, even after the test.
    decode_needs_watch: ClassVar[bool] = True

    def plans(self, kernel: "KernelFeatures") -> List[Plan]:
        """Ways to attach on this kernel, best first; empty if none can work."""
        raise NotImplementedError

    def decode(self, buf: bytes, hdr: Header) -> List[Event]:
        """The events a ring record (of one of `records`, length checked)
        stands for: usually one (possibly a correction superseding an
        earlier event, `Event.corrected`); none when it is no change; several
        when it holds a batch (nftables)."""
        raise NotImplementedError(f"{self.name} has no ring records")

    def record_layout(self, hdr: Header) -> Optional[Record]:
        """The layout of the record `hdr` heads (one probe may write several,
        told apart by header flags)."""
        return self.records[0] if self.records else None

    def unavailable_reason(self, kernel: "KernelFeatures") -> str:
        return "no attach mechanism available on this kernel"

    # Hooks for probes that keep state outside the kernel (sockets, maps).
    def attached(self, obj: "BpfObject") -> None:
        """Called once the object is loaded: look up the probe's own maps."""

    def watch(self, netns: int, path: Optional[str]) -> None:
        """A namespace starts being watched; `path` opens it (may be None)."""

    def unwatch(self, netns: int) -> None:
        """A namespace stops being watched."""

    def poll(self) -> None:
        """Called before every drain of the ring buffer."""

    def lost(self, netns: int) -> Dict[str, int]:
        """Events lost outside the ring buffer, by public kind."""
        return {}

    def close(self) -> None:
        """Release whatever the hooks above acquired."""

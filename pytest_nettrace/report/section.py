"""What a test's trace leaves behind for reports: a snapshot taken before the
trace closes (`TraceRecord`), its "network events" report section, its
per-test files, and the session-wide tally (`SessionSummary`)."""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Set

from . import jsonl
from .captures import file_stem
from ..events import Event
from ..probes.registry import kinds
from .timeline import WIDTH, focus, is_background, render_timeline

if TYPE_CHECKING:
    from ..trace import Trace

SECTION = "network events"
# Kinds that usually mean trouble: a test that saw them without looking is listed.
ALARM_KINDS = ("rst", "drop")
MAX_LISTED = 20  # tests named per line of the session summary


@dataclass
class TraceRecord:
    """One test's events and losses, kept after its trace is closed."""

    nodeid: str
    start_ns: int
    events: List[Event]
    labels: Dict[int, str]
    lost_total: Optional[int]            # None: unknown (the test closed the trace itself)
    lost_by_kind: Dict[str, int]
    queried: Set[str]
    pcap_path: Optional[str] = None
    events_file: Optional[str] = None
    highlight: List[Event] = field(default_factory=list)

    @classmethod
    def capture(cls, trace: "Trace", nodeid: str) -> "TraceRecord":
        """Snapshot `trace`; drains the ring first when the trace is still open."""
        lost_total: Optional[int] = None
        lost_by_kind: Dict[str, int] = {}
        if not trace.closed:
            lost_total = trace.lost()  # drains: events up to now are in all_events()
            if lost_total:
                for kind in kinds():
                    n = trace.lost(kind)
                    if n:
                        lost_by_kind[kind] = n
        return cls(nodeid=nodeid, start_ns=trace.start_ns, events=trace.all_events(),
                   labels=trace.watched, lost_total=lost_total, lost_by_kind=lost_by_kind,
                   queried=set(getattr(trace, "queried", ())),
                   pcap_path=getattr(trace, "pcap_path", None))

    # -- what timeline.render_timeline needs from a trace -------------------
    def label(self, inode: int) -> str:
        return self.labels.get(inode, f"netns:{inode}")

    # -- derived ------------------------------------------------------------
    def counts(self) -> Dict[str, int]:
        return dict(sorted(Counter(e.kind for e in self.events).items()))

    def unasserted(self) -> List[str]:
        """Alarm kinds this test saw but never read or asserted on."""
        if "*" in self.queried:
            return []
        seen = {e.kind for e in self.events if not is_background(e, None)}
        return [k for k in ALARM_KINDS if k in seen and k not in self.queried]

    def lost_line(self) -> str:
        if self.lost_total is None:
            return "lost events: unknown (the test closed its trace)"
        by_kind = ", ".join(f"{k}: {n}" for k, n in self.lost_by_kind.items())
        return f"lost events: {self.lost_total}" + (f" ({by_kind})" if by_kind else "")

    def section(self) -> str:
        """The "network events" report section (lines ≤ 100 columns, but for long paths)."""
        where = ", ".join(f"{label} ({inode})" for inode, label in self.labels.items()) or "none"
        n = len(self.events)
        # as in assertion failures: packets, syscalls and unnamed frees are counted, not listed
        shown, hidden = focus(self.events, None, self.highlight)
        out = [f"{n} event{'s' if n != 1 else ''} in the watched namespaces: {where}",
               "time since test start, kind, process, what happened [namespace]:",
               render_timeline(self, shown, self.highlight)]  # type: ignore[arg-type]
        if hidden:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(hidden.items()))
            out.append(textwrap.fill(f"   (not shown: {counts}; in the events file / nettrace.events())",
                                     WIDTH, subsequent_indent="    "))
        out.append(self.lost_line())
        # paths on lines of their own: a terminal wraps them, but they stay whole
        if self.events_file:
            out.append(f"events file:\n    {self.events_file}")
        if self.pcap_path:
            out.append(f"pcap:\n    {self.pcap_path}")
        return "\n".join(out)

    def summary(self) -> Dict[str, Any]:
        """Plain data for the session summary; travels on the report (xdist-safe)."""
        return {"counts": self.counts(), "lost": self.lost_total or 0, "unasserted": self.unasserted()}

    def properties(self) -> List[tuple]:
        """JUnit XML properties (`item.user_properties`)."""
        props: List[tuple] = [("nettrace_events", len(self.events))]
        props += [(f"nettrace_events.{k}", n) for k, n in self.counts().items()]
        props.append(("nettrace_lost", "unknown" if self.lost_total is None else self.lost_total))
        if self.events_file:
            props.append(("nettrace_events_file", self.events_file))
        if self.pcap_path:
            props.append(("nettrace_pcap", self.pcap_path))
        return props


# -- per-test files -----------------------------------------------------------

def events_path(directory: str, nodeid: str) -> str:
    """Where `--nettrace-report=directory` puts the events of test `nodeid`."""
    return os.path.join(directory, file_stem(nodeid) + ".jsonl")


#: Mode of the files --nettrace-report writes (they hold packet payloads and
#: command lines); --nettrace-report-mode changes it.
DEFAULT_FILE_MODE = 0o600


class ReportDirError(ValueError):
    """--nettrace-report names something that cannot be the report directory."""


def prepare_dir(path: str, file_mode: int = DEFAULT_FILE_MODE) -> str:
    """Create the report directory if needed (mode: `file_mode` plus search
    permission wherever it grants reading, so 0700 by default); return its
    real path. An existing non-directory is a ReportDirError."""
    dir_mode = file_mode | ((file_mode & 0o444) >> 2)
    try:
        os.makedirs(path, mode=dir_mode)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ReportDirError(f"--nettrace-report={path}: cannot create it: {exc.strerror or exc}") from None
    if not os.path.isdir(path):
        raise ReportDirError(f"--nettrace-report={path}: exists and is not a directory")
    return os.path.realpath(path)


def _write_file(directory: str, name: str, write: Any, mode: int) -> str:
    """Write `name` in `directory` as a new file (made with O_EXCL under a
    random name, then renamed over `name`): whatever someone planted at
    `name` (a symlink, a hard link) is replaced, never written through."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".nettrace-", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
        final = os.path.join(directory, name)
        os.replace(tmp, final)
        return final
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_files(record: TraceRecord, directory: str, mode: int = DEFAULT_FILE_MODE) -> None:
    """`<stem>.jsonl` with every event, and a copy of the pcap, in `directory`
    (files of `mode`); sets record.events_file / record.pcap_path to the
    written paths."""
    stem = file_stem(record.nodeid)

    def events(f: Any) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8")
        jsonl.write_events(text, record.events)
        text.flush()
        text.detach()  # f is closed by its owner

    record.events_file = _write_file(directory, stem + ".jsonl", events, mode)
    pcap = record.pcap_path
    if pcap and os.path.isfile(pcap) and os.path.dirname(os.path.abspath(pcap)) != os.path.abspath(directory):
        def copy(f: Any) -> None:
            with open(pcap, "rb") as src:
                shutil.copyfileobj(src, f)

        name = os.path.basename(pcap_copy_path(directory, record.nodeid, pcap))
        record.pcap_path = _write_file(directory, name, copy, mode)


def pcap_copy_path(directory: str, nodeid: str, pcap: str) -> str:
    """Where `--nettrace-report=directory` copies the capture of test `nodeid`."""
    return events_path(directory, nodeid)[:-len(".jsonl")] + (os.path.splitext(pcap)[1] or ".pcap")


# -- the whole run -------------------------------------------------------------

class SessionSummary:
    """Counts across every traced test (fed from reports, so xdist workers' too)."""

    def __init__(self) -> None:
        self.tests = 0
        self.counts: Counter = Counter()
        self.lost = 0
        self.lossy_tests: List[str] = []
        self.unasserted: Dict[str, List[str]] = {}

    def add(self, nodeid: str, data: Dict[str, Any]) -> None:
        self.tests += 1
        self.counts.update(data.get("counts", {}))
        lost = data.get("lost", 0)
        if lost:
            self.lost += lost
            self.lossy_tests.append(nodeid)
        if data.get("unasserted"):
            self.unasserted[nodeid] = list(data["unasserted"])

    def lines(self) -> List[str]:
        if not self.tests:
            return []
        per_kind = ", ".join(f"{k} {n}" for k, n in sorted(self.counts.items())) or "none"
        out = [f"{self.tests} traced test{'s' if self.tests != 1 else ''}; events: {per_kind}",
               f"lost events: {self.lost}" + (f" in {', '.join(self.lossy_tests[:5])}"
                                              + (" ..." if len(self.lossy_tests) > 5 else "")
                                              if self.lost else "")]
        if self.unasserted:
            out.append(f"{len(self.unasserted)} test{'s' if len(self.unasserted) != 1 else ''} saw these "
                       "events without reading or asserting on them:")
            listed = sorted(self.unasserted.items())
            out += [f"  {nodeid}: {', '.join(ks)}" for nodeid, ks in listed[:MAX_LISTED]]
            if len(listed) > MAX_LISTED:
                out.append(f"  ... and {len(listed) - MAX_LISTED} more")
        return out


def sections_of(reports: Iterable[Any]) -> List[tuple]:
    """(nodeid, text) of every report carrying a network events section."""
    return [(r.nodeid, text) for r in reports for name, text in r.sections if name == SECTION]

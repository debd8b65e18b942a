"""What a test's trace leaves behind for reports, read from its TraceView:
the "network events" report section, where its per-test files go, and the
session-wide tally (`SessionSummary`)."""
from __future__ import annotations

import os
from collections import Counter
from typing import Any, Dict, List, Set

from .captures import file_stem
from .timeline import focus, not_shown, render_timeline, wrap
from .view import TraceView

SECTION = "network events"
MAX_LISTED = 20  # tests named per line of the session summary


def section_text(view: TraceView) -> str:
    """The "network events" report section (lines ≤ 100 columns, but for long paths)."""
    where = ", ".join(f"{label} ({inode})" for inode, label in view.labels.items()) or "none"
    n = len(view.events) + sum(view.counted.values())
    headline = f"{n} event{'s' if n != 1 else ''} in the watched namespaces: {where}"
    events = view.events
    if view.shown_until is not None:
        # the failure's message already listed the timeline up to it: not twice
        events = tuple(e for e in events if e.timestamp > view.shown_until)
    # as in assertion failures: high-volume kinds and background events are counted, not listed
    shown, hidden = focus(events, None, view.highlight)
    if view.shown_until is not None:
        headline += "; the failure's message above lists them up to the failure" + (
            "; since then:" if shown else "; none since")
    out = [wrap(headline)]
    if shown or view.shown_until is None:
        out += ["time since test start, kind, process, what happened [namespace]:",
                render_timeline(view, shown, view.highlight)]
    if hidden:
        out.append(not_shown(hidden, "in the events file / nettrace.events()"))
    if view.counted:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(view.counted.items()))
        out.append(wrap(f"   (counted, not decoded: {counts}; the test had passed without reading them "
                        "when its trace closed)"))
    out.append(view.lost_line())
    # paths on lines of their own: a terminal wraps them, but they stay whole
    out += [f"{what}:\n    {path}" for what, path in sorted(view.files.items())]
    return "\n".join(out)


def summary(view: TraceView) -> Dict[str, Any]:
    """Plain data for the session summary; travels on the report (xdist-safe)."""
    return {"counts": view.counts(), "lost": view.lost_total or 0, "lost_kinds": sorted(view.lost_by_kind),
            "unasserted": view.unasserted()}


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


def pcap_copy_path(directory: str, nodeid: str, pcap: str) -> str:
    """Where `--nettrace-report=directory` copies the capture of test `nodeid`."""
    return events_path(directory, nodeid)[:-len(".jsonl")] + (os.path.splitext(pcap)[1] or ".pcap")


# -- the whole run -------------------------------------------------------------

class SessionSummary:
    """Counts across every traced test (fed from reports, so xdist workers' too)."""

    def __init__(self) -> None:
        self.tests = 0
        self.counts: Counter[str] = Counter()
        self.lost = 0
        self.lossy_tests: List[str] = []
        self.lost_kinds: Set[str] = set()   # the kinds that lost some (a drop past its detail budget is one)
        self.unasserted: Dict[str, List[str]] = {}

    def add(self, nodeid: str, data: Dict[str, Any]) -> None:
        self.tests += 1
        self.counts.update(data.get("counts", {}))
        lost = data.get("lost", 0)
        if lost:
            self.lost += lost
            self.lossy_tests.append(nodeid)
            self.lost_kinds.update(data.get("lost_kinds", ()))
        if data.get("unasserted"):
            self.unasserted[nodeid] = list(data["unasserted"])

    def lines(self) -> List[str]:
        if not self.tests:
            return []
        per_kind = ", ".join(f"{k} {n}" for k, n in sorted(self.counts.items())) or "none"
        kinds = f" ({', '.join(sorted(self.lost_kinds))})" if self.lost and self.lost_kinds else ""
        out = [f"{self.tests} traced test{'s' if self.tests != 1 else ''}; events: {per_kind}",
               f"lost events: {self.lost}{kinds}" + (f" in {', '.join(self.lossy_tests[:5])}"
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

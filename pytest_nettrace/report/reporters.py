"""The reporter seam: every report format is one `Reporter` over a frozen
TraceView (never a Trace: a reporter cannot drain the ring or change what
another one sees).

A format overrides the hooks it needs; each has a do-nothing default:

- `section(view)`: a (title, text) section in the test's pytest report;
- `properties(view)`: JUnit XML properties (`item.user_properties`);
- `files(view, directory)` + `write(view, what, out)`: the files it puts in
  `--nettrace-report=DIR` (what -> path, then each file's bytes);
- `live(view)`: lines for `nettrace watch` (the view holds the events that
  just arrived); the command picks a live format by `name`.

`register()` adds one (the built-ins: the section, JSON lines, the pcap copy,
JUnit properties, and the seed's one-liners for the command)."""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from typing import Any, BinaryIO, Callable, ClassVar, Dict, Iterable, List, Optional, Tuple

from . import jsonl
from .section import SECTION, events_path, pcap_copy_path, section_text
from .timeline import seed_line
from .view import TraceView


class Reporter:
    """One report format over a TraceView; override what it gives."""

    name: ClassVar[str] = ""

    def section(self, view: TraceView) -> Optional[Tuple[str, str]]:
        return None

    def properties(self, view: TraceView) -> List[Tuple[str, Any]]:
        return []

    def files(self, view: TraceView, directory: str) -> Dict[str, str]:
        return {}

    def write(self, view: TraceView, what: str, out: BinaryIO) -> None:
        raise NotImplementedError(f"{type(self).__name__} names a file {what!r} but does not write it")

    def live(self, view: TraceView) -> Iterable[str]:
        return ()


class NetworkEventsSection(Reporter):
    """The "network events" section: the timeline, losses, file paths."""

    name = "section"

    def section(self, view: TraceView) -> Optional[Tuple[str, str]]:
        return SECTION, section_text(view)


class JsonLines(Reporter):
    """Every event as a JSON object per line (report/jsonl.py): the events
    file of --nettrace-report, and `nettrace watch --json`."""

    name = "json"

    def files(self, view: TraceView, directory: str) -> Dict[str, str]:
        return {"events file": events_path(directory, view.nodeid)}

    def write(self, view: TraceView, what: str, out: BinaryIO) -> None:
        text = io.TextIOWrapper(out, encoding="utf-8")
        jsonl.write_events(text, view.events)
        text.flush()
        text.detach()  # `out` is closed by its owner

    def live(self, view: TraceView) -> Iterable[str]:
        return [jsonl.event_json(e) for e in view.events]


class PcapCopy(Reporter):
    """A copy of the test's packet capture next to its events file."""

    name = "pcap"

    def files(self, view: TraceView, directory: str) -> Dict[str, str]:
        pcap = view.files.get("pcap")
        if not pcap or not os.path.isfile(pcap) \
                or os.path.dirname(os.path.abspath(pcap)) == os.path.abspath(directory):
            return {}
        return {"pcap": pcap_copy_path(directory, view.nodeid, pcap)}

    def write(self, view: TraceView, what: str, out: BinaryIO) -> None:
        with open(view.files["pcap"], "rb") as src:
            shutil.copyfileobj(src, out)


class JUnitProperties(Reporter):
    """Counts, losses and file paths as JUnit XML properties."""

    name = "junit"

    def properties(self, view: TraceView) -> List[Tuple[str, Any]]:
        counts = view.counts()
        props: List[Tuple[str, Any]] = [("nettrace_events", sum(counts.values()))]
        props += [(f"nettrace_events.{k}", n) for k, n in counts.items()]
        props.append(("nettrace_lost", "unknown" if view.lost_total is None else view.lost_total))
        props += [(f"nettrace_{what.replace(' ', '_')}", path) for what, path in sorted(view.files.items())]
        return props


class SeedLines(Reporter):
    """`nettrace watch`'s default output: one line per event, in the words
    of the SystemTap script this project grew from."""

    name = "text"

    def live(self, view: TraceView) -> Iterable[str]:
        return [seed_line(e, view) for e in view.events]


REPORTERS: List[Reporter] = [NetworkEventsSection(), JsonLines(), PcapCopy(), JUnitProperties(), SeedLines()]


def register(reporter: Reporter) -> Reporter:
    """Add a report format (after the built-ins); returns it."""
    if any(r.name == reporter.name for r in REPORTERS):
        raise ValueError(f"a reporter named {reporter.name!r} is already registered")
    REPORTERS.append(reporter)
    return reporter


def unregister(reporter: Reporter) -> None:
    REPORTERS.remove(reporter)


def by_name(name: str) -> Reporter:
    for r in REPORTERS:
        if r.name == name:
            return r
    raise ValueError(f"no reporter named {name!r}; registered: {', '.join(r.name for r in REPORTERS)}")


# -- running them over one view ------------------------------------------------

def sections(view: TraceView) -> List[Tuple[str, str]]:
    return [s for s in (r.section(view) for r in REPORTERS) if s is not None]


def properties(view: TraceView) -> List[Tuple[str, Any]]:
    return [p for r in REPORTERS for p in r.properties(view)]


def planned(view: TraceView, directory: str) -> TraceView:
    """`view` with its files where `write_files` will put them (a section
    rendered before the files are written names them)."""
    files = dict(view.files)
    for r in REPORTERS:
        files.update(r.files(view, directory))
    return view.replace(files=files)


def write_files(view: TraceView, directory: str, mode: int) -> TraceView:
    """Every reporter's files in `directory` (files of `mode`); returns `view`
    with their paths."""
    files = dict(view.files)
    for r in REPORTERS:
        for what, path in r.files(view, directory).items():
            def write(out: BinaryIO, r: Reporter = r, what: str = what) -> None:
                r.write(view, what, out)
            files[what] = _write_file(path, write, mode)
    return view.replace(files=files)


def _write_file(path: str, write: Callable[[BinaryIO], None], mode: int) -> str:
    """Write `path` as a new file (made with O_EXCL under a random name in
    its directory, then renamed over it): whatever someone planted at `path`
    (a symlink, a hard link) is replaced, never written through."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".nettrace-", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
        return path
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise

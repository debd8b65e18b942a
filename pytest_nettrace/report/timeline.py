"""Text renderings of a test's events: the timeline, and assertion failures
(headline, timeline with the offending events marked, losses, the stack)."""
from __future__ import annotations

import datetime
import textwrap
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

from ..events import Event

if TYPE_CHECKING:
    from ..trace import Trace

WIDTH = 100
MAX_ROWS = 40


def wall_clock(ts_ns: int) -> datetime.datetime:
    """CLOCK_MONOTONIC ns (as BPF stamps events) → local wall-clock time."""
    offset = time.time_ns() - time.monotonic_ns()
    return datetime.datetime.fromtimestamp((ts_ns + offset) / 1e9)


def seed_time(ts_ns: int) -> str:
    """`Tue 08:01:30.963`, as delip.stp printed it."""
    dt = wall_clock(ts_ns)
    return dt.strftime("%a %H:%M:%S.") + f"{dt.microsecond // 1000:03d}"


def row(event: Event, start_ns: int, ns_label: str, mark: bool = False) -> str:
    offset = (event.timestamp - start_ns) / 1e6
    head = f"{'>>' if mark else '  '} {offset:+10.3f}ms "
    text = f"{event.summary()} [{ns_label}]"
    return textwrap.fill(text, WIDTH, initial_indent=head, subsequent_indent=" " * len(head))


def render_timeline(trace: "Trace", events: Sequence[Event], highlight: Sequence[Event] = ()) -> str:
    if not events:
        return "   (no events in the watched namespaces)"
    marked = {id(e) for e in highlight}
    rows = list(events)
    skipped = 0
    if len(rows) > MAX_ROWS:
        # keep the marked events and their neighbourhood, drop the rest visibly
        keep = set()
        for i, e in enumerate(rows):
            if id(e) in marked:
                keep.update(range(max(0, i - 3), min(len(rows), i + 4)))
        if len(keep) < MAX_ROWS:
            keep.update(range(len(rows) - (MAX_ROWS - len(keep)), len(rows)))
        skipped = len(rows) - len(keep)
        rows = [e for i, e in enumerate(rows) if i in keep]
    lines = [row(e, trace.start_ns, trace.label(e.netns), id(e) in marked) for e in rows]
    if skipped:
        lines.append(f"   ... {skipped} more events not shown")
    return "\n".join(lines)


# High-volume views that would bury the story unless they are what was asserted on.
_BACKGROUND_KINDS = ("packet", "syscall")


Kinds = Union[None, str, Tuple[str, ...]]


def _kinds(kind: Kinds) -> Tuple[str, ...]:
    return (kind,) if isinstance(kind, str) else tuple(kind or ())


def is_background(event: Event, kind: Kinds) -> bool:
    """Events that would bury the story unless they are what was asserted on
    (`kind`: one kind or several): packets, syscalls, and what a probe calls
    background (Event.background, e.g. drops that are not failures)."""
    if event.kind in _kinds(kind):
        return False
    return event.kind in _BACKGROUND_KINDS or event.background


def focus(events: List[Event], kind: Kinds, offending: Sequence[Event]):
    """(events to show, {kind: count} left out) for a failure's timeline."""
    marked = {id(e) for e in offending}
    shown: List[Event] = []
    hidden: Dict[str, int] = {}
    for e in events:
        if id(e) in marked or not is_background(e, kind):
            shown.append(e)
        else:
            key = "background drop" if e.kind == "drop" else e.kind
            hidden[key] = hidden.get(key, 0) + 1
    return shown, hidden


def render_failure(trace: "Trace", headline: str, kind: Kinds, filters: Dict[str, Any],
                   offending: List[Event], details: Sequence[str] = (),
                   highlight: Optional[Sequence[Event]] = None) -> str:
    """The headline, `details` (lines kept as they are), the timeline with
    `highlight` (default: the offending events) marked, losses, and the first
    offending event with its stack."""
    marked = list(offending if highlight is None else highlight)
    out = [_wrap(headline), *details]
    names = ", ".join(f"{label} ({inode})" for inode, label in trace.watched.items()) or "none"
    out.append(_wrap(f"watched namespaces: {names}"))
    shown, hidden = focus(trace.all_events(), kind, marked)
    out.append("network events (time since test start):")
    out.append(render_timeline(trace, shown, marked))
    if hidden:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(hidden.items()))
        out.append(f"   (not shown: {counts}; nettrace.events() lists them)")
    lost = {k: trace.lost(k) for k in _kinds(kind)}
    lost_total = trace.lost()
    out.append(f"lost events: {lost_total}" + (f" ({', '.join(f'{k}: {n}' for k, n in lost.items())})"
                                               if lost_total else ""))
    if offending:
        first = offending[0]
        out.append(_wrap(f"first offending event: {seed_line(first, trace)}"))
        if first.stack:
            out.append("kernel stack:")
            out.extend(f"    {frame}" for frame in first.stack)
        else:
            out.append("kernel stack: (not captured)")
    return "\n".join(out)


def _wrap(text: str) -> str:
    return textwrap.fill(text, WIDTH, subsequent_indent="    ", break_on_hyphens=False)


def seed_line(event: Event, trace: Optional["Trace"] = None) -> str:
    """The seed's one-liner: time, actor, what happened, where."""
    where = f" (netns {trace.label(event.netns)})" if trace else ""
    return f"{seed_time(event.timestamp)} {event.actor()} {event.describe()}{where}{event.how(full=True)}"

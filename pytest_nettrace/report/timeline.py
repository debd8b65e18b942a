"""Text renderings of a test's events, over a frozen TraceView: the one line
wrapper, the timeline, and assertion failures (headline, timeline with the
offending events marked, losses, the stack)."""
from __future__ import annotations

import textwrap
from typing import Dict, List, Optional, Protocol, Sequence, Set, Tuple, Union

from ..events import Event, wall_clock
from .view import TraceView

__all__ = ["wall_clock"]  # defined with the events (probes use it too), used here

WIDTH = 100
MAX_ROWS = 40


def seed_time(ts_ns: int) -> str:
    """`Tue 08:01:30.963`, as delip.stp printed it."""
    dt = wall_clock(ts_ns)
    return dt.strftime("%a %H:%M:%S.") + f"{dt.microsecond // 1000:03d}"


def wrap(text: str, indent: int = 4) -> str:
    """`text` in lines of at most WIDTH columns (a path or other long word
    stays whole), continuation lines indented by `indent`."""
    return textwrap.fill(text, WIDTH, subsequent_indent=" " * indent, break_on_hyphens=False)


def row(event: Event, start_ns: int, ns_label: str, mark: bool = False) -> str:
    offset = (event.timestamp - start_ns) / 1e6
    head = f"{'>>' if mark else '  '} {offset:+10.3f}ms "
    # the command line too: which `ip` it was is often the answer
    text = f"{event.kind:<6} {event.actor()} {event.describe()}{event.how(full=True)} [{ns_label}]"
    return textwrap.fill(text, WIDTH, initial_indent=head, subsequent_indent=" " * len(head))


def render_timeline(view: TraceView, events: Sequence[Event], highlight: Sequence[Event] = ()) -> str:
    if not events:
        return "   (no events in the watched namespaces)"
    marked = {id(e) for e in highlight}
    rows = list(events)
    skipped = 0
    if len(rows) > MAX_ROWS:
        # keep the marked events and their neighbourhood, drop the rest visibly
        keep: Set[int] = set()
        for i, e in enumerate(rows):
            if id(e) in marked:
                keep.update(range(max(0, i - 3), min(len(rows), i + 4)))
        if len(keep) < MAX_ROWS:
            keep.update(range(len(rows) - (MAX_ROWS - len(keep)), len(rows)))
        skipped = len(rows) - len(keep)
        rows = [e for i, e in enumerate(rows) if i in keep]
    lines = [row(e, view.start_ns, view.label(e.netns), id(e) in marked) for e in rows]
    if skipped:
        lines.append(f"   ... {skipped} more events not shown")
    return "\n".join(lines)


Kinds = Union[None, str, Tuple[str, ...]]


def kinds_of(kind: Kinds) -> Tuple[str, ...]:
    return (kind,) if isinstance(kind, str) else tuple(kind or ())


def is_background(event: Event, kind: Kinds) -> bool:
    """Events that would bury the story unless they are what was asserted on
    (`kind`: one kind or several): those of high-volume kinds
    (Event.HIGH_VOLUME: packets, syscalls), and those their kind calls
    background (Event.background, e.g. drops that are not failures)."""
    if event.kind in kinds_of(kind):
        return False
    return type(event).HIGH_VOLUME or event.background


def hidden_name(event: Event) -> str:
    """How a left-out event is counted: by kind for a high-volume kind,
    else as a background one of its kind ("background drop")."""
    return event.kind if type(event).HIGH_VOLUME else f"background {event.kind}"


def focus(events: Sequence[Event], kind: Kinds, offending: Sequence[Event]) -> Tuple[List[Event], Dict[str, int]]:
    """(events to show, {kind: count} left out) for a failure's timeline."""
    marked = {id(e) for e in offending}
    shown: List[Event] = []
    hidden: Dict[str, int] = {}
    for e in events:
        if id(e) in marked or not is_background(e, kind):
            shown.append(e)
        else:
            key = hidden_name(e)
            hidden[key] = hidden.get(key, 0) + 1
    return shown, hidden


def not_shown(hidden: Dict[str, int], where: str) -> str:
    """The line counting what a timeline left out, and `where` to find it."""
    counts = ", ".join(f"{n} {k}" for k, n in sorted(hidden.items()))
    return wrap(f"   (not shown: {counts}; {where})")


def render_failure(view: TraceView, headline: str, kind: Kinds, offending: Sequence[Event],
                   details: Sequence[str] = (), highlight: Optional[Sequence[Event]] = None) -> str:
    """The headline, `details` (lines kept as they are), the timeline with
    `highlight` (default: the offending events) marked, losses, and the first
    offending event with its stack. Reads only `view`: it never drains."""
    marked = list(offending if highlight is None else highlight)
    out = [wrap(headline), *details]
    names = ", ".join(f"{label} ({inode})" for inode, label in view.labels.items()) or "none"
    out.append(wrap(f"watched namespaces: {names}"))
    shown, hidden = focus(view.events, kind, marked)
    out.append("network events (time since test start):")
    out.append(render_timeline(view, shown, marked))
    if hidden:
        out.append(not_shown(hidden, "nettrace.events() lists them"))
    out.append(view.lost_line(kinds_of(kind)))
    if offending:
        first = offending[0]
        out.append(wrap(f"first offending event: {seed_line(first, view)}"))
        if first.stack:
            out.append("kernel stack:")
            out.extend(f"    {frame}" for frame in first.stack)
        else:
            out.append("kernel stack: (not captured)")
    return "\n".join(out)


class Labels(Protocol):
    """Anything naming namespaces: a TraceView (or a Trace)."""

    def label(self, inode: int) -> str: ...


def seed_line(event: Event, where: Optional[Labels] = None) -> str:
    """The seed's one-liner: time, actor, what happened, where."""
    ns = f" (netns {where.label(event.netns)})" if where is not None else ""
    return f"{seed_time(event.timestamp)} {event.actor()} {event.describe()}{ns}{event.how(full=True)}"

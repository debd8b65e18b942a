"""Events as JSON lines: one object per event, the fields of `Event.as_dict()`.

Used by `--nettrace-report=DIR` (one file per test) and `nettrace watch --json`.
Each field is written as its declared type says (`Event.TYPES`: addresses
as strings, bytes — a packet's payload — as hex), the stack a list of
"func+0xoff" strings; drops add `background`; anything else a future probe
puts in an undeclared field that JSON cannot hold becomes its str(). `read_events` reads
a file back into events, with their attributes; `select_events` filters them
as `nettrace.events()` does."""
from __future__ import annotations

import json
from typing import IO, Any, Dict, Iterable, List, Optional, cast

from ..events import Event, check_filters, matches
from ..probes.registry import check_filters_any_kind, kind_info


def event_json(event: Event) -> str:
    """One line (no newline) for `event`."""
    return json.dumps(event.as_dict(), default=str, separators=(",", ":"))


def jsonable(event: Event) -> Dict[str, Any]:
    """What reading `event_json(event)` back gives: `as_dict()` in JSON's types."""
    return cast(Dict[str, Any], json.loads(event_json(event)))


def write_events(out: IO[str], events: Iterable[Event]) -> int:
    """Write one line per event; returns how many."""
    n = 0
    for event in events:
        out.write(event_json(event) + "\n")
        n += 1
    return n


def read_events(path: str) -> List[Event]:
    """The events of a JSON-lines events file, in file (= time) order: each
    of its kind's class (`ev.address`, `ev.pid`, …), as the test saw it."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [kind_info(row["kind"]).event_type.from_dict(row) for row in rows]


def select_events(events: Iterable[Event], kind: Optional[str] = None, **filters: Any) -> List[Event]:
    """The events of `kind` matching filters, checked as `nettrace.events()`
    checks them (an unknown filter or value is an error, not an empty list)."""
    filters = check_filters(kind_info(kind).event_type, filters) if kind else check_filters_any_kind(filters)
    return [e for e in events if (kind is None or e.kind == kind) and matches(e, filters)]

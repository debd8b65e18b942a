"""Events as JSON lines: one object per event, the fields of `Event.as_dict()`.

Used by `--nettrace-report=DIR` (one file per test) and `nettrace watch --json`.
Addresses are strings, the stack is a list of "func+0xoff" strings; anything
else a future probe puts in a field that JSON cannot hold becomes its str()."""
from __future__ import annotations

import json
from typing import IO, Any, Dict, Iterable, List

from .events import Event


def event_json(event: Event) -> str:
    """One line (no newline) for `event`."""
    return json.dumps(event.as_dict(), default=str, separators=(",", ":"))


def jsonable(event: Event) -> Dict[str, Any]:
    """What reading `event_json(event)` back gives: `as_dict()` in JSON's types."""
    return json.loads(event_json(event))


def write_events(out: IO[str], events: Iterable[Event]) -> int:
    """Write one line per event; returns how many."""
    n = 0
    for event in events:
        out.write(event_json(event) + "\n")
        n += 1
    return n


def read_events(path: str) -> List[Dict[str, Any]]:
    """The objects of a JSON-lines events file, in file (= time) order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]

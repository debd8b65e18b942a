"""Every probe the engine loads, and the public event kinds they produce.
Adding a probe: bpf/<probe>.bpf.c + bpf/<probe>.h + probes/<probe>.py, and one line here."""
from __future__ import annotations

import functools
from typing import Dict, List, NamedTuple, Type

from ..events import Event
from .base import Probe
from .netchange import NetChangeProbe
from .rst import RstProbe

PROBE_CLASSES: List[Type[Probe]] = [RstProbe, NetChangeProbe]


class KindInfo(NamedTuple):
    probe: str          # probe name, as in Engine.status
    kind_id: int        # enum nt_kind of its records: the loss counter to check
    event_type: Type[Event]


def all_probes() -> List[Probe]:
    return [cls() for cls in PROBE_CLASSES]


@functools.lru_cache(maxsize=None)
def kinds() -> Dict[str, KindInfo]:
    """Public kind name -> what produces it."""
    out: Dict[str, KindInfo] = {}
    for cls in PROBE_CLASSES:
        for kind, ev in cls.event_types.items():
            out[kind] = KindInfo(cls.name, cls.kind_id, ev)
    return out


def kind_info(kind: str) -> KindInfo:
    """KindInfo of `kind`; a ValueError listing the valid kinds otherwise."""
    try:
        return kinds()[kind]
    except KeyError:
        raise ValueError(f"unknown event kind {kind!r}; valid kinds: {', '.join(sorted(kinds()))}") from None

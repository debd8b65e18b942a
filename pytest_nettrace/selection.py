"""Which probes a session loads (`--nettrace-probes` / ini `nettrace_probes`):
fewer probes attach faster and cost the traffic less; a kind whose probe is
left out raises a clear error when a test asks for it."""
from __future__ import annotations

from typing import List, Sequence, Tuple

from .probes import registry


def probe_names() -> List[str]:
    return [cls.name for cls in registry.PROBE_CLASSES]


def select(spec: str) -> Tuple[List[str], List[str]]:
    """(loaded, left out) probe names for a spec such as "all",
    "rst, netchange" or "-packet -syscall"; ValueError names a bad word."""
    known = probe_names()
    words = [w for w in spec.replace(",", " ").split() if w]
    if not words or words == ["all"]:
        return known, []
    keep = [w for w in words if not w.startswith("-") and w != "all"]
    drop = [w[1:] for w in words if w.startswith("-")]
    for name in keep + drop:
        if name not in known:
            raise ValueError(f"unknown probe {name!r} in nettrace_probes; probes: {', '.join(known)}")
    chosen = [n for n in known if (n in keep or not keep or "all" in words) and n not in drop]
    if not chosen:
        raise ValueError(f"nettrace_probes = {spec!r} leaves no probe")
    return chosen, [n for n in known if n not in chosen]


def kinds_of(names: Sequence[str]) -> List[str]:
    """Public event kinds the named probes deliver."""
    out: List[str] = []
    for cls in registry.PROBE_CLASSES:
        if cls.name in names:
            out.extend(cls.event_types)
    return out

"""Every probe the engine loads, and the public event kinds they produce.

Probes are found, not listed: each module in this package that defines
`PROBE` (its Probe class) and optionally `API` (a mixin of `nettrace` methods)
is one. Adding a probe is bpf/<probe>.bpf.c + bpf/<probe>.h + probes/<probe>.py.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any, Dict, List, NamedTuple, Tuple, Type

from ..events import Event, check_filters
from .base import Probe
from .context import KindApi


def _modules() -> List[Any]:
    pkg = importlib.import_module(__package__)
    mods = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name in ("base", "registry") or info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__package__}.{info.name}")
        if hasattr(mod, "PROBE"):
            mods.append(mod)
    return mods


_MODULES = _modules()
PROBE_CLASSES: List[Type[Probe]] = [m.PROBE for m in _MODULES]
# each kind's query class (KindApi), which the Trace instantiates and exposes
API_CLASSES: Tuple[Type[KindApi], ...] = tuple(m.API for m in _MODULES if hasattr(m, "API"))


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


def check_filters_any_kind(filters: Dict[str, Any]) -> Dict[str, Any]:
    """Filters of `events()` without a kind: a value is good if some kind
    with that field accepts it (and compared as that kind stores it)."""
    types = [info.event_type for info in kinds().values()]
    out: Dict[str, Any] = {}
    for name, value in filters.items():
        having = [t for t in types if name in t.FIELDS]
        if not having:
            fields = sorted({f for t in types for f in t.FIELDS})
            raise ValueError(f"unknown filter {name!r}; valid: {', '.join(fields)}")
        errors = []
        for t in having:
            try:
                out[name] = check_filters(t, {name: value})[name]
                break
            except ValueError as e:
                errors.append(str(e))
        else:
            raise ValueError(errors[0])
    return out

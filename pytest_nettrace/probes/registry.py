"""Every probe the engine loads, and the public event kinds they produce.

`PROBES` lists them, one line each: the module pytest_nettrace/probes/<name>.py
defines `PROBE` (its Probe class) and `API` (its query class, a KindApi).
The Trace's methods for them are generated from this list into
pytest_nettrace/kind_methods.py:

    python -m pytest_nettrace.probes          # rewrite it
    python -m pytest_nettrace.probes --check  # exit 1 if stale
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type

from ..events import Event, check_filters
from .base import Probe
from .context import KindApi

PROBES = (
    "conn",
    "drop",
    "netchange",
    "nftrace",
    "packet",
    "retransmit",
    "rst",
    "syscall",
    "sysctl",
    "traffic",
)

_MODULES = [importlib.import_module(f"{__package__}.{name}") for name in PROBES]
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
    if not isinstance(kind, str):  # a list of kinds would fail later as "unhashable type"
        raise ValueError(f"an event kind is one name, got {type(kind).__name__} {kind!r}; "
                         f"valid kinds: {', '.join(sorted(kinds()))}")
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


# -- the Trace's methods, generated --------------------------------------------

KIND_METHODS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kind_methods.py")


def public_methods(api: Type[KindApi]) -> List[str]:
    """The query class's own public methods and properties, in source order."""
    import inspect   # (the generator's alone: not on the way to attached probes)
    return [name for name, member in vars(api).items()
            if not name.startswith("_") and name not in vars(KindApi)
            and (inspect.isfunction(member) or isinstance(member, property))]


def kind_methods_source() -> str:
    """pytest_nettrace/kind_methods.py as the registry says it should be."""
    lines = [
        '"""Every probe kind\'s `nettrace` methods, as `Trace` (which subclasses',
        "`KindMethods`) exposes them, each typed with its query class's signature.",
        "",
        "GENERATED from the registry (pytest_nettrace/probes/registry.py) by",
        "`python -m pytest_nettrace.probes`: do not edit. The unit layer",
        'fails when it is stale."""',
        "from __future__ import annotations",
        "",
    ]
    imports = [(api.__module__.rsplit(".", 1)[1], api.__name__) for api in API_CLASSES]
    lines += [f"from .probes.{module} import {name}" for module, name in imports]
    lines += ["from .probes.context import Delegate, DelegateProperty", "", "", "class KindMethods:",
              '    """Each kind\'s query methods (defined in pytest_nettrace/probes/<kind>.py)."""']
    for api in API_CLASSES:
        lines += ["", f"    # {api.__module__.rsplit('.', 1)[1]}: {api.__name__}"]
        for name in public_methods(api):
            wrapper = "DelegateProperty" if isinstance(vars(api)[name], property) else "Delegate"
            lines.append(f"    {name} = {wrapper}({api.__name__}.{name})")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m pytest_nettrace.probes",
                                     description="Write the Trace's per-kind methods from the registry.")
    parser.add_argument("--check", action="store_true", help="exit 1 if kind_methods.py is stale; write nothing")
    args = parser.parse_args(argv)
    wanted = kind_methods_source()
    try:
        with open(KIND_METHODS_FILE) as f:
            current: Optional[str] = f.read()
    except FileNotFoundError:
        current = None
    if current == wanted:
        return 0
    if args.check:
        print(f"{KIND_METHODS_FILE} is stale: run python -m pytest_nettrace.probes", file=sys.stderr)
        return 1
    with open(KIND_METHODS_FILE, "w") as f:
        f.write(wanted)
    print(f"wrote {KIND_METHODS_FILE}")
    return 0

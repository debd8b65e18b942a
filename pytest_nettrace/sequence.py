"""Ordered, correlated expectations: `nettrace.expect_sequence(step(...), ...)`.

A sequence is steps matched in time order (other events may come between
them), each a kind plus filters; a step can bind fields of the event it
matched (`bind={"port": "sport"}`) for later steps to refer to
(`dport=ref("port")`), and `forbid(kind, between=("a", "b"), ...)` says what
must not happen between the events two named steps matched.

Everything is checked when the objects are built, with the filter validation
of `assert_any` / `assert_none`: a typo in a kind, a filter, an action, an
address, a step name or a binding is a ValueError naming it. The matcher
(`match`) is pure: it takes events and returns the steps' events or why not.
"""
from __future__ import annotations

import ipaddress

import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from .events import Event, check_filters, describe_filters, matches, news
from .probes.registry import kind_info

__all__ = ["Ref", "Step", "Forbid", "Expectation", "SequenceMatch", "Outcome", "ref", "step", "forbid",
           "build", "match", "explain"]


@dataclass(frozen=True)
class Ref:
    """A value bound by an earlier step (`ref("port")`), compared as the filter would compare it."""

    name: str

    def __repr__(self) -> str:
        return f"ref({self.name!r})"


def ref(name: str) -> Ref:
    """The value an earlier step bound under `name` (`step(..., bind={name: field})`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"ref() takes the name of a binding, not {name!r}")
    return Ref(name)


def _split_filters(kind: str, filters: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Ref]]:
    """Validate filters for `kind` (as assert_any does); return (plain, refs)."""
    info = kind_info(kind)  # ValueError naming an unknown kind
    refs = {k: v for k, v in filters.items() if isinstance(v, Ref)}
    # as the events store them (`family="AF_INET6"` -> 6)
    plain = check_filters(info.event_type, {k: v for k, v in filters.items() if not isinstance(v, Ref)})
    for name in refs:
        if name not in info.event_type.FIELDS:
            raise ValueError(f"unknown filter {name!r} for {kind!r} events; valid: "
                             f"{', '.join(info.event_type.FIELDS)}")
    return plain, refs


def _describe(plain: Mapping[str, Any], refs: Mapping[str, Ref]) -> str:
    parts = [describe_filters(dict(plain))] if plain else []
    parts += [f"{k}={r!r}" for k, r in refs.items()]
    return ", ".join(parts) or "(any)"


@dataclass(frozen=True)
class Step:
    """One expected event: `kind` with filters, optionally named (`as_`) and binding fields."""

    kind: str
    filters: Mapping[str, Any]
    refs: Mapping[str, Ref]
    name: Optional[str] = None
    bind: Mapping[str, str] = field(default_factory=dict)  # binding name -> field of the event

    def describe(self) -> str:
        out = f"{self.kind} {_describe(self.filters, self.refs)}"
        if self.name:
            out += f" as {self.name!r}"
        if self.bind:
            out += " binding " + ", ".join(f"{n}={f}" for n, f in self.bind.items())
        return out


@dataclass(frozen=True)
class Forbid:
    """No `kind` event matching filters between the events of steps `between[0]` and `between[1]`."""

    kind: str
    filters: Mapping[str, Any]
    refs: Mapping[str, Ref]
    between: Tuple[str, str]

    def describe(self) -> str:
        first, last = self.between
        return f"no {self.kind} {_describe(self.filters, self.refs)} between {first!r} and {last!r}"


def step(kind: str, *, as_: Optional[str] = None, bind: Union[Mapping[str, str], Sequence[str], None] = None,
         **filters: Any) -> Step:
    """An expected event of `kind` matching `filters` (values, lists, predicates or `ref(name)`).

    `as_` names the step (for `forbid(between=...)` and the result);
    `bind={"port": "sport"}` keeps the matched event's `sport` as `port` for
    later steps (`bind=["sport"]` keeps it under its own name)."""
    plain, refs = _split_filters(kind, filters)
    if as_ is not None and (not isinstance(as_, str) or not as_):
        raise ValueError(f"a step's name (as_=) must be a non-empty string, not {as_!r}")
    if bind is None:
        binding: Dict[str, str] = {}
    elif isinstance(bind, Mapping):
        binding = dict(bind)
    elif isinstance(bind, str):
        binding = {bind: bind}
    else:
        binding = {f: f for f in bind}
    fields = kind_info(kind).event_type.FIELDS
    for name, fld in binding.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"a binding name must be a non-empty string, not {name!r}")
        if fld not in fields:
            raise ValueError(f"cannot bind {name!r} to unknown field {fld!r} of {kind!r} events; valid: "
                             f"{', '.join(fields)}")
    return Step(kind, plain, refs, as_, binding)


def forbid(kind: str, *, between: Tuple[str, str], **filters: Any) -> Forbid:
    """No `kind` event matching `filters` may happen between the events matched
    by the steps named `between[0]` and `between[1]` (exclusive)."""
    plain, refs = _split_filters(kind, filters)
    if (not isinstance(between, (tuple, list)) or len(between) != 2
            or not all(isinstance(b, str) and b for b in between)):
        raise ValueError(f"forbid(between=...) takes two step names, e.g. between=('start', 'done'); got {between!r}")
    return Forbid(kind, plain, refs, (between[0], between[1]))


@dataclass(frozen=True)
class Expectation:
    """Validated steps and forbids (built by `build`)."""

    steps: Tuple[Step, ...]
    forbids: Tuple[Tuple[Forbid, int, int], ...]  # (forbid, index of its first step, of its last)

    @property
    def kinds(self) -> Tuple[str, ...]:
        seen: Dict[str, None] = {}
        for s in self.steps:
            seen[s.kind] = None
        for f, _, _ in self.forbids:
            seen[f.kind] = None
        return tuple(seen)

    def label(self, i: int) -> str:
        s = self.steps[i]
        return f"step {i + 1}" + (f" ({s.name})" if s.name else "")


def build(items: Sequence[Union[Step, Forbid]]) -> Expectation:
    """Check that names, bindings and references fit together; ValueError naming what does not."""
    steps: List[Step] = []
    forbids: List[Forbid] = []
    for it in items:
        if isinstance(it, Step):
            steps.append(it)
        elif isinstance(it, Forbid):
            forbids.append(it)
        else:
            raise TypeError(f"expect_sequence takes step(...) and forbid(...), not {it!r}")
    if not steps:
        raise ValueError("expect_sequence needs at least one step(...)")
    names: Dict[str, int] = {}
    bound_at: Dict[str, int] = {}
    for i, s in enumerate(steps):
        for r in s.refs.values():
            if r.name not in bound_at:
                raise ValueError(f"step {i + 1} ({s.kind}) refers to {r!r}, which no earlier step binds"
                                 + (f"; bound: {', '.join(bound_at)}" if bound_at else ""))
        if s.name is not None:
            if s.name in names:
                raise ValueError(f"two steps are named {s.name!r}")
            names[s.name] = i
        for b in s.bind:
            if b in bound_at:
                raise ValueError(f"{b!r} is bound twice (steps {bound_at[b] + 1} and {i + 1})")
            bound_at[b] = i
    placed = []
    for f in forbids:
        for n in f.between:
            if n not in names:
                raise ValueError(f"forbid({f.kind!r}, between={f.between!r}): no step is named {n!r}"
                                 + (f"; named steps: {', '.join(names)}" if names else " (name steps with as_=)"))
        first, last = names[f.between[0]], names[f.between[1]]
        if first >= last:
            raise ValueError(f"forbid({f.kind!r}, between={f.between!r}): step {f.between[0]!r} must come "
                             f"before step {f.between[1]!r}")
        for r in f.refs.values():
            if r.name not in bound_at or bound_at[r.name] > last:
                raise ValueError(f"forbid({f.kind!r}, between={f.between!r}) refers to {r!r}, which no step "
                                 f"up to {f.between[1]!r} binds")
        placed.append((f, first, last))
    return Expectation(tuple(steps), tuple(placed))


# -- matching ----------------------------------------------------------------

@dataclass(frozen=True)
class SequenceMatch:
    """The events that met the steps, in step order: `m[0]`, `m["vip_gone"]`,
    `m.bound["port"]`, `list(m)`."""

    events: Tuple[Event, ...]
    names: Mapping[str, int]
    bound: Mapping[str, Any]

    def __getitem__(self, key: Union[int, str]) -> Event:
        if isinstance(key, str):
            if key not in self.names:
                raise KeyError(f"no step is named {key!r}; named steps: {', '.join(self.names) or 'none'}")
            return self.events[self.names[key]]
        return self.events[key]

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)


@dataclass(frozen=True)
class Outcome:
    """What `match` found: a full match, or the furthest it got and why it stopped."""

    matched: Optional[SequenceMatch]
    partial: Tuple[Event, ...]          # events of the steps met, in the best attempt
    bound: Mapping[str, Any]            # bindings of that attempt
    failed_step: Optional[int]          # index of the step not met (None: all met)
    # (forbid, the forbidden event, the event that met the failed step): what ruled the best attempt out
    violation: Optional[Tuple[Forbid, Event, Event]] = None


# Enough for any sequence a test writes; a pathological one stops with its best attempt.
_MAX_TRIES = 200_000


def _resolve(refs: Mapping[str, Ref], bound: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: _as_filter(bound[r.name]) for k, r in refs.items()}


def _as_filter(value: Any) -> Any:
    """A bound value as a filter naming that same value: an address with its
    prefix (an addr event's 10.0.0.1/24) is that address, where the prefix
    given in a filter means the subnet (ref("ip") met any neighbour in it)."""
    if isinstance(value, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        return value.ip
    return value


def _fits(ev: Event, kind: str, plain: Mapping[str, Any], resolved: Mapping[str, Any]) -> bool:
    # a bound value is compared as a filter with that value would compare it
    return ev.kind == kind and matches(ev, plain) and matches(ev, resolved)


def match(seq: Expectation, events: Sequence[Event], since: Optional[int] = None) -> Outcome:
    """The earliest assignment of events (in time order, each step after the
    previous one) that meets every step, judged by the forbids; else the
    furthest attempt. The forbids do not steer the choice: an address
    deleted between its addition and its release fails the story even when
    a later re-addition would leave a clean window (choosing that one made
    "never removed in between" pass). `since`: only events with a later
    timestamp count."""
    wanted = set(seq.kinds)  # the others cannot meet a step nor break a forbid
    evs = [e for e in events if e.kind in wanted and (since is None or e.timestamp > since)]
    n = len(seq.steps)
    chosen: List[int] = []
    best: Dict[str, Any] = {"depth": -1, "events": (), "bound": {}}
    tries = 0

    def record(depth: int, bound: Dict[str, Any]) -> None:
        # the attempt that got furthest
        if depth > best["depth"]:
            best.update(depth=depth, events=tuple(evs[i] for i in chosen[:depth]), bound=dict(bound))

    def violated(k: int, bound: Dict[str, Any]) -> Optional[Tuple[Forbid, Event, Event]]:
        """A forbid whose window closes at step k, broken by the events chosen."""
        for f, a, b in seq.forbids:
            if b != k:
                continue
            resolved = _resolve(f.refs, bound)
            # as assert_none and gates count: background events only where named
            for e in news((e for e in evs[chosen[a] + 1:chosen[b]] if _fits(e, f.kind, f.filters, resolved)),
                          {**f.filters, **resolved}):
                return f, e, evs[chosen[b]]
        return None

    def search(k: int, start: int, bound: Dict[str, Any]) -> bool:
        nonlocal tries
        if k == n:
            return True
        s = seq.steps[k]
        resolved = _resolve(s.refs, bound)
        for i in range(start, len(evs)):
            tries += 1
            if tries > _MAX_TRIES:
                return False
            e = evs[i]
            if not _fits(e, s.kind, s.filters, resolved):
                continue
            chosen.append(i)
            nb = dict(bound)
            for name, fld in s.bind.items():
                nb[name] = getattr(e, fld, None)
            record(k + 1, nb)
            if search(k + 1, i + 1, nb):
                return True
            chosen.pop()
        record(k, bound)
        return False

    if search(0, 0, {}):
        bound = dict(best["bound"])
        for k in range(n):
            bad = violated(k, bound)
            if bad:   # final: the earliest story broke a forbid
                return Outcome(None, tuple(evs[i] for i in chosen[:k]), bound, k, bad)
        got = tuple(evs[i] for i in chosen)
        names = {s.name: i for i, s in enumerate(seq.steps) if s.name}
        m = SequenceMatch(got, names, bound)
        return Outcome(m, got, m.bound, None)
    depth = max(best["depth"], 0)
    return Outcome(None, best["events"], best["bound"], depth)


def explain(seq: Expectation, outcome: Outcome, line: Callable[[Event], str], width: int = 100) -> List[str]:
    """Lines saying which event met each step (`line(event)` renders one),
    which step was not met and why, and the forbids; wrapped to `width`."""
    rows: List[Tuple[str, str]] = []  # (text, indent of its continuation lines)
    for i, s in enumerate(seq.steps):
        rows.append((f"  {i + 1}. {s.describe()}", "       "))
        if i < len(outcome.partial):
            rows.append((f"     met by: {line(outcome.partial[i])}", "         "))
        elif i == outcome.failed_step and outcome.violation:
            f, bad, end = outcome.violation
            rows.append((f"     met by: {line(end)}", "         "))
            rows.append((f"     but forbidden before it ({f.describe()}): {line(bad)}", "         "))
        elif i == outcome.failed_step:
            refs = ", ".join(f"{r.name}={outcome.bound.get(r.name)!r}" for r in s.refs.values())
            rows.append(("     NOT MET" + (f" (with {refs})" if refs else ""), "         "))
        else:
            rows.append(("     (not reached)", "         "))
    for f, _, _ in seq.forbids:
        rows.append((f"  forbidden: {f.describe()}", "      "))
    return [textwrap.fill(text, width, subsequent_indent=indent, break_on_hyphens=False) for text, indent in rows]

"""Forbidden-event gates: `@pytest.mark.nettrace(forbid=[...])`,
`--nettrace-forbid` and ini `nettrace_forbid`.

A rule is `kind` (every event of that kind) or `kind:action` (only events
whose `action` field has that value, e.g. `addr:deleted`). Rules are parsed
and validated before any test runs, so a typo is a usage error rather than a
gate that silently never matches."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

from ..events import Event, news
from ..probes.registry import kinds
from .timeline import seed_line, wrap

if TYPE_CHECKING:
    from ..kernel.engine import Engine


class Checked(Protocol):
    """What a gate reads of a test's trace (the Trace, seen from below)."""

    @property
    def engine(self) -> "Engine": ...

    def select(self, kind: Optional[str] = None, **filters: Any) -> List[Event]: ...

    def lost(self, kind: Optional[str] = None) -> int: ...

    def label(self, inode: int) -> str: ...

    def loss_causes(self) -> str: ...

MARKER_ARGS = ("forbid", "watch_host", "nft_trace", "max_records")


class GateSpecError(ValueError):
    """A forbid rule or marker argument that cannot be right; the message names it."""


@dataclass(frozen=True)
class ForbidRule:
    """Events of `kind` (with `action`, when given) must not happen."""

    kind: str
    action: Optional[str] = None

    def filters(self) -> Dict[str, Any]:
        return {"action": self.action} if self.action else {}

    def __str__(self) -> str:
        return f"{self.kind}:{self.action}" if self.action else self.kind


@dataclass
class GateSpec:
    """What one test's gate checks: forbidden events, whether to watch the
    host, and whether to trace nftables' verdicts in its namespaces."""

    forbid: List[ForbidRule] = field(default_factory=list)
    watch_host: bool = False
    nft_trace: bool = False
    max_records: Optional[int] = None   # the trace's record limit, for this test (None: the ini's; 0: none)
    # the rules a marker put on this test (or its class, module): it asked
    # for them, so they must be checkable; a suite-wide rule also covers
    # tests with no network of their own
    marked: Tuple[ForbidRule, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.forbid) or self.watch_host or self.nft_trace

    def merged(self, other: "GateSpec") -> "GateSpec":
        rules = list(self.forbid) + [r for r in other.forbid if r not in self.forbid]
        # markers are merged closest first (a test's, then its class's, its
        # module's): the closest one that sets a limit decides
        limit = self.max_records if self.max_records is not None else other.max_records
        marked = self.marked + tuple(r for r in other.marked if r not in self.marked)
        return GateSpec(rules, self.watch_host or other.watch_host, self.nft_trace or other.nft_trace, limit,
                        marked)


def actions_of(kind: str) -> Optional[Tuple[str, ...]]:
    """Valid `action` values of `kind` (an event class may declare them as
    `ACTIONS`); None if its events have no action field or do not say."""
    ev = kinds()[kind].event_type
    declared = getattr(ev, "ACTIONS", None)
    if declared and "action" in ev.FIELDS:
        return tuple(declared)
    return None


def parse_rule(word: str, where: str) -> ForbidRule:
    """`rst` or `addr:deleted` → ForbidRule; GateSpecError naming the bad word otherwise."""
    kind, sep, action = word.strip().partition(":")
    known = kinds()
    if kind not in known:
        inside = f" in {word!r}" if word.strip() != kind else ""
        raise GateSpecError(f"{where}: unknown event kind {kind!r}{inside}; "
                            f"valid kinds: {', '.join(sorted(known))}")
    if not sep:
        return ForbidRule(kind)
    ev = known[kind].event_type
    if "action" not in ev.FIELDS:
        raise GateSpecError(f"{where}: {kind!r} events have no action, so {word!r} cannot match; "
                            f"use plain {kind!r}")
    valid = actions_of(kind)
    if valid is None:
        # a typo would make a gate that never fires: only known actions are accepted
        raise GateSpecError(f"{where}: {kind!r} events do not declare their actions (an `ACTIONS` tuple "
                            f"on {ev.__name__}), so {word!r} cannot be checked; use plain {kind!r}")
    if action not in valid:
        raise GateSpecError(f"{where}: unknown action {action!r} for {kind!r} in {word!r}; "
                            f"valid actions: {', '.join(valid)}")
    return ForbidRule(kind, action)


def split_words(value: Any, where: str) -> List[str]:
    """Rules from "rst,addr:deleted", "rst addr:deleted" or a list of strings."""
    if isinstance(value, str):
        return [w for w in re.split(r"[,\s]+", value) if w]
    if isinstance(value, (list, tuple, set, frozenset)):
        words: List[str] = []
        for v in value:
            if not isinstance(v, str):
                raise GateSpecError(f"{where}: forbid entries must be strings like 'rst' or "
                                    f"'addr:deleted', got {v!r}")
            words.extend(split_words(v, where))
        return words
    raise GateSpecError(f"{where}: forbid must be a list of kinds like ['rst', 'addr:deleted'], got {value!r}")


def parse_rules(value: Any, where: str) -> List[ForbidRule]:
    rules: List[ForbidRule] = []
    for word in split_words(value, where):
        rule = parse_rule(word, where)
        if rule not in rules:
            rules.append(rule)
    return rules


def parse_marker(args: Sequence[Any], kwargs: Mapping[str, Any], where: str) -> GateSpec:
    """The GateSpec of one `@pytest.mark.nettrace(...)`."""
    if args:
        raise GateSpecError(f"{where}: @pytest.mark.nettrace takes keyword arguments only "
                            f"({', '.join(MARKER_ARGS)}), got positional {args!r}")
    bad = [k for k in kwargs if k not in MARKER_ARGS]
    if bad:
        raise GateSpecError(f"{where}: unknown @pytest.mark.nettrace argument {bad[0]!r}; "
                            f"valid: {', '.join(MARKER_ARGS)}")
    for flag in ("watch_host", "nft_trace"):
        if not isinstance(kwargs.get(flag, False), bool):
            raise GateSpecError(f"{where}: {flag} must be True or False, got {kwargs[flag]!r}")
    limit = kwargs.get("max_records")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise GateSpecError(f"{where}: max_records must be a whole number of records, 0 for no limit, "
                            f"got {limit!r}")
    rules = parse_rules(kwargs.get("forbid", []), where)
    return GateSpec(rules, kwargs.get("watch_host", False), kwargs.get("nft_trace", False), limit, tuple(rules))



def unavailable(trace: Checked, rules: Iterable[ForbidRule]) -> List[str]:
    """Why rules cannot be checked: their probe was left out of the session
    (nettrace_probes) or cannot run on this kernel."""
    out = []
    for rule in rules:
        probe = kinds()[rule.kind].probe
        why = trace.engine.probe_available(probe)
        if why:
            where = "" if probe in trace.engine.left_out else "not possible on this kernel: "
            out.append(f"{rule}: {where}{why}")
    return out


@dataclass
class Violation:
    """Why a gate failed: the message, and the events to mark in the timeline."""

    message: str
    offending: List[Event]


def nothing_watched(rules: Sequence[ForbidRule]) -> Violation:
    """A marker's gate on a test that watched no namespace: it would pass
    whatever happened, like a negative assertion with nothing watched."""
    return Violation(f"nettrace gate (forbid={', '.join(map(str, rules))}) cannot be checked: this test watches "
                     "no network namespace, so it would pass whatever happened (a test's namespaces come from the "
                     "netns / make_netns fixtures; the one pytest runs in is watched with "
                     "@pytest.mark.nettrace(watch_host=True))", [])


def check(trace: Checked, rules: Sequence[ForbidRule], timeline_shown: bool = True) -> Optional[Violation]:
    """None when no forbidden event happened and none can have been lost.
    `timeline_shown`: the report gets a 'network events' section (not under
    --nettrace-show=none), which the message then points to.

    Sound like `assert_none`: a rule whose kind lost events fails with the count."""
    lines: List[str] = []
    offending: List[Event] = []
    for rule in rules:
        # background events (drops that are not failures, as assert_no_drops
        # judges them: fresh veths' multicast, purged FINs) trip no gate
        # unless the rule names their particulars
        filters = rule.filters()
        found = news(trace.select(rule.kind, **filters), filters)
        if found:
            lines.append(f"  {rule}: {len(found)} event{'s' if len(found) != 1 else ''}")
            offending.extend(found)
            continue
        lost = trace.lost(rule.kind)
        if lost:
            lines.append(f"  {rule}: cannot be ruled out: {lost} {rule.kind} events lost ({trace.loss_causes()})")
    if not lines:
        return None
    offending.sort(key=lambda e: e.timestamp)
    out = ["nettrace gate: forbidden events in this test "
           f"(forbid={', '.join(str(r) for r in rules)}):"] + lines
    for ev in offending[:10]:
        out.append(wrap(f"  {seed_line(ev, trace)}", indent=6))
    if len(offending) > 10:
        out.append(f"  ... and {len(offending) - 10} more")
    if offending:
        stack = offending[0].stack
        out.append("kernel stack of the first:" if stack else "kernel stack of the first: (not captured)")
        out.extend(f"    {frame}" for frame in stack)
    if timeline_shown:
        out.append("the timeline is in the 'network events' section")
    return Violation("\n".join(out), offending)

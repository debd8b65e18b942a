"""`nettrace`: the probes outside pytest.

    nettrace watch [--netns NAME|PATH|PID]... [--host] [--json] [KIND[:ACTION]...]
    nettrace capabilities

`watch` prints events as they happen, in the words of the SystemTap script
this project grew from, until Ctrl-C or SIGTERM; every BPF link is detached
on the way out."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Callable, List, Optional, Sequence, TextIO, Tuple

from .kernel.capabilities import DEFAULT_BTF, features
from .kernel.engine import DEFAULT_RINGBUF, Engine
from .errors import NettraceError
from .events import Event
from .report.gates import ForbidRule, GateSpecError, parse_rules
from .probes.base import Probe
from .probes.registry import all_probes, kinds
from .report import reporters
from .report.view import TraceView
from .trace import Trace

PROG = "nettrace"


class UsageProblem(Exception):
    """Something the user can fix; printed as one line, exit status 2."""


class LiveTrace(Trace):
    """A Trace that forgets what it has handed out: a watch may run for days."""

    announce: Optional[Callable[[str], None]] = None   # told the capture's path as it is made

    def new_capture_path(self) -> str:
        """The capture outlives the command: its path is said when it is
        made (a watch SIGKILLed never says it at its end) and at the end."""
        path = os.path.join(tempfile.mkdtemp(prefix="nettrace-watch-"), "watch.pcapng")
        if self.announce is not None:
            self.announce(path)
        return path


class Settling:
    """Holds each event `hold` seconds before it is shown, so that a
    correction following within them (an accept's task, which arrives when
    accept() returns; a sysctl write's result) takes its place instead of
    printing as a second line. A correction of an event already shown is
    shown."""

    def __init__(self, hold: float = 0.5) -> None:
        self.hold = hold
        self._held: List[Tuple[float, Event]] = []   # (when taken, event), in time order

    def feed(self, events: List[Event], now: float) -> List[Event]:
        """The events to show at `now` (monotonic seconds): those held long
        enough, each replaced by its correction when one is among `events`
        (a poll's take(), which already merged its own corrections)."""
        where = {id(e): i for i, (_, e) in enumerate(self._held)}
        for event in events:
            i = where.get(id(event.supersedes)) if event.supersedes is not None else None
            if i is None:
                self._held.append((now, event))
            else:
                self._held[i] = (self._held[i][0], event)
                where[id(event)] = i   # a correction of that correction, later in this poll
        n = 0
        while n < len(self._held) and now - self._held[n][0] >= self.hold:
            n += 1
        ready, self._held = [e for _, e in self._held[:n]], self._held[n:]
        return ready

    def flush(self) -> List[Event]:
        """What is still held (at the end)."""
        ready, self._held = [e for _, e in self._held], []
        return ready


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Kernel network events, live (root needed).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    w = sub.add_parser("watch", help="print events as they happen until Ctrl-C",
                       description="Print network events in the given namespaces as they happen, until "
                       "Ctrl-C. With no --netns, watches the namespace nettrace runs in.")
    w.add_argument("--netns", action="append", default=[], metavar="NAME|PATH|PID",
                   help="a namespace to watch: a name in /run/netns, a path (/proc/PID/ns/net), "
                   "or a process id; repeatable")
    w.add_argument("--host", action="store_true", help="also watch the namespace nettrace runs in")
    w.add_argument("--json", action="store_true", help="one JSON object per line (Event.as_dict fields)")
    w.add_argument("--btf", default=DEFAULT_BTF, help=f"kernel BTF for CO-RE (default {DEFAULT_BTF})")
    w.add_argument("kinds", nargs="*", metavar="KIND",
                   help="only these kinds, optionally with an action: rst addr:deleted ... "
                   f"(kinds: {', '.join(sorted(kinds()))}; default: all but "
                   f"{', '.join(_high_volume())})")
    c = sub.add_parser("capabilities", help="what this kernel offers and which mechanism each probe uses")
    c.add_argument("--btf", default=DEFAULT_BTF, help=f"kernel BTF for CO-RE (default {DEFAULT_BTF})")
    return p


def _high_volume() -> List[str]:
    """Kinds watched only when asked for (Event.HIGH_VOLUME: packets, syscalls)."""
    return sorted(k for k, info in kinds().items() if info.event_type.HIGH_VOLUME)


def _namespace_arg(value: str) -> str:
    """A PID becomes "pid:N" (what trace.netns_ref takes); names and paths stay."""
    return f"pid:{value}" if value.isdigit() else value


def _selector(rules: Sequence[ForbidRule]) -> Callable[[Event], bool]:
    if not rules:
        return lambda e: True
    return lambda e: any(e.kind == r.kind and (r.action is None or getattr(e, "action", None) == r.action)
                         for r in rules)


def _require_privileges(btf: str, command: str) -> None:
    k = features(btf)
    if not k.privileged:
        raise NettraceError(f"{command} needs root (or CAP_BPF and CAP_PERFMON) to attach BPF probes; "
                            f"try: sudo {PROG} {command}")
    k.require()


class _Stop:
    """Set by SIGINT/SIGTERM; the loop polls it (handlers only flip a flag)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: Optional[int] = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.signal = signum
        self.event.set()


def watch(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        rules = parse_rules(args.kinds, "nettrace watch")
    except GateSpecError as e:
        raise UsageProblem(str(e).replace("nettrace watch: ", "")) from None
    stop = _Stop()
    stop.install()  # before attaching: a Ctrl-C during setup still detaches
    _require_privileges(args.btf, "watch")
    wanted = _selector(rules)

    reporter = reporters.by_name("json" if args.json else "text")

    def show(events: List[Event]) -> None:
        view = TraceView(start_ns=trace.start_ns, events=tuple(e for e in events if wanted(e)), labels=trace.watched)
        for line in reporter.live(view):
            out.write(line + "\n")
        out.flush()

    engine = Engine(btf_path=args.btf, ringbuf_size=DEFAULT_RINGBUF, background=False,
                    probes=_probes_for(rules))
    try:
        trace = LiveTrace(engine, "watch")

        def announce(path: str) -> None:
            err.write(f"{PROG}: writing packets to {path}\n")
            err.flush()
        trace.announce = announce
        for ns in args.netns:
            try:
                trace.watch(_namespace_arg(ns), label=ns)
            except (ValueError, TypeError) as e:
                raise UsageProblem(str(e)) from None
        if args.host or not args.netns:
            trace.watch_host()
        for rule in rules:
            why = engine.probe_available(kinds()[rule.kind].probe)
            if why:
                raise UsageProblem(f"{rule.kind} events are not available on this kernel: {why}")
        where = ", ".join(f"{label} ({inode})" for inode, label in trace.watched.items())
        what = ", ".join(map(str, rules)) or "all kinds"
        err.write(f"{PROG}: watching {where} for {what} ({engine.describe()}); Ctrl-C to stop\n")
        err.flush()
        reported_lost = 0
        settling = Settling()
        while not stop.event.is_set():
            engine.wait(0.2)
            lost = trace.lost()  # drains the ring (and whatever probes queue elsewhere)
            show(settling.feed(trace.take(), time.monotonic()))
            if lost > reported_lost:
                err.write(f"{PROG}: {lost - reported_lost} events lost (ring buffer full)\n")
                err.flush()
                reported_lost = lost
        trace.close()  # drains what is left
        show(settling.feed(trace.take(), time.monotonic()) + settling.flush())
        pcap = getattr(trace, "pcap_path", None)
    finally:
        engine.close()  # detaches every BPF link
    if pcap:
        err.write(f"{PROG}: packets written to {pcap}\n")
    err.write(f"{PROG}: stopped ({signal.Signals(stop.signal).name if stop.signal else 'done'})\n")
    return 0


def _probes_for(rules: Sequence[ForbidRule]) -> List[Probe]:
    """The probes producing the asked-for kinds; without kinds, every probe
    but the high-volume views (packets, syscalls), which must be asked for."""
    wanted = {r.kind for r in rules} or set(kinds()) - set(_high_volume())
    names = {kinds()[k].probe for k in wanted}
    return [p for p in all_probes() if p.name in names]


def capabilities(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    import platform
    _require_privileges(args.btf, "capabilities")
    k = features(args.btf)
    out.write(f"kernel {platform.release()}: {k.summary()}\n")
    for line in k.missing():
        out.write(f"  missing {line}\n")
    engine = Engine(btf_path=args.btf, background=False, probes=all_probes())
    try:
        out.write(f"probes: {engine.describe()} (attached in {engine.attach_seconds * 1e3:.0f} ms)\n")
        for name, st in engine.status.items():
            kinds_of = ", ".join(sorted(st.probe.event_types)) or "(no events)"
            out.write(f"  {name}: {st.mechanism}; kinds: {kinds_of}\n")
            for failure in st.failures:
                out.write(f"    fell back from {failure}\n")
            if st.unavailable:
                out.write(f"    unavailable: {st.unavailable}\n")
            for note in st.plan.notes if st.plan is not None else ():
                out.write(f"    {note}\n")
        out.write(f"CO-RE relocation against: {engine.core_btf or args.btf}"
                  f"{' (minimal BTF, made once per boot)' if engine.core_btf else ''}\n")
    finally:
        engine.close()
    return 0


def main(argv: Optional[List[str]] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Console entry point (`nettrace`, `python -m pytest_nettrace`); returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "watch":
            return watch(args, out, err)
        return capabilities(args, out, err)
    except UsageProblem as e:
        err.write(f"{PROG}: {e}\n")
        return 2
    except NettraceError as e:
        err.write(f"{PROG}: {e}\n")
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed
        return 130
    except BrokenPipeError:  # `nettrace watch | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

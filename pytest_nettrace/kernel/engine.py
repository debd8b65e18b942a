"""The BPF engine: loads every probe once per process, keeps them attached,
and routes their events to whoever watches the namespace they happened in.

Per test, the only kernel work is adding and removing namespace inodes in the
scope map; the probes drop every event from a namespace not in it."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import struct
import threading
import time
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple, Union

from . import libbpf as lb
from .capabilities import DEFAULT_BTF, KernelFeatures, features, object_path
from . import corebtf
from ..errors import ProbeLoadError, UnsupportedKernel
from ..events import Event
from ..runtime import RUN_DIR, boot_id, read_cached, write_cached
from .records import Delivery, RecordDecoder
from .wire import HEADER, NT_MAX_KINDS, NT_SCOPE
from .probe import Plan, Probe
from . import symbols
from .ringbuf import RingBuffer

log = logging.getLogger("pytest_nettrace")

OBJECT = "nettrace.bpf.o"
DEFAULT_RINGBUF = 8 << 20
# The drain thread's pause after a drain that found records (see _drain_loop),
# at most, and the fill rate it is sized against: the fastest the probes have
# been seen to write on a 2-vCPU machine was ~0.1 GB/s (bench_events, unpaced:
# 180k 512-byte RST records a second), a tenth of it.
DRAIN_PAUSE = 0.005
_FILL_RATE = 1 << 30  # bytes/s
_SCOPE_VALUE = NT_SCOPE.struct
_NO_LOSSES = (0,) * NT_MAX_KINDS
_u32 = struct.Struct("<I")
_u64 = struct.Struct("<Q")

Sink = Callable[[Delivery], None]  # receives raw records of its namespaces, in order


_INITIAL_PID_NS = 0xEFFFFFFC  # PROC_PID_INIT_INO: the initial pid namespace's fixed inode


def _own_pid_namespace() -> int:
    """The inode of this process's pid namespace, 0 for the initial one:
    events name processes by the pids this process sees (a container's own,
    not the host's)."""
    inode = os.stat("/proc/self/ns/pid").st_ino
    return 0 if inode == _INITIAL_PID_NS else inode


class ProbeStatus:
    """How one probe ended up attached (or why not)."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.plans: List[Plan] = []
        self.plan: Optional[Plan] = None
        self.failures: List[str] = []   # why better plans were not used
        self.unavailable: Optional[str] = None

    @property
    def mechanism(self) -> str:
        return self.plan.mechanism if self.plan else "unavailable"


class LoadCosts:
    """Each program's load time (mostly the kernel's verifier) on this boot,
    measured by the last split load and kept in RUN_DIR: what balances the
    next process's load threads. Named by the boot, the object's content and
    the BTF it is relocated against: the verifier's work changes with each."""

    def __init__(self, obj_path: str, btf_path: str) -> None:
        self.name: Optional[str] = None
        self.known: Dict[str, float] = {}
        boot, digest = boot_id(), corebtf.object_digest(obj_path)
        if not boot or not digest or os.geteuid() != 0:
            return
        key = f"{boot}\0{digest}\0{btf_path}"
        self.name = f"loadcost-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
        raw = read_cached(RUN_DIR, self.name)
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {}
        if isinstance(data, dict):
            self.known = {k: float(v) for k, v in data.items()
                          if isinstance(k, str) and isinstance(v, (int, float)) and v >= 0}

    def save(self, measured: Dict[str, float]) -> None:
        """Keep `measured` (merged over what was known) when it adds a program."""
        if self.name is None or not set(measured) - set(self.known):
            return
        self.known.update(measured)
        write_cached(RUN_DIR, self.name, json.dumps(self.known).encode())


def ring_size_refused(size: int) -> Optional[str]:
    """Why the kernel refuses an event ring of `size` bytes (a power of two),
    found by making one and closing it at once; None if it takes it or if
    this process cannot make maps at all (then the probes are unavailable
    anyway, with their own reason)."""
    if size >= 1 << 32:
        return "more than the kernel's 32-bit map size allows"
    try:
        fd = lb.map_create(lb.BPF_MAP_TYPE_RINGBUF, "nt_ring_probe", 0, 0, size)
    except (ProbeLoadError, UnsupportedKernel) as e:
        err = getattr(e, "errno", None)
        return f"the kernel refuses a ring of that size ({e})" if err in (errno.EINVAL, errno.E2BIG,
                                                                         errno.ENOMEM) else None
    os.close(fd)
    return None


class Engine:
    """All probes of one process; see module docstring."""

    def __init__(self, *, btf_path: str = DEFAULT_BTF, ringbuf_size: int = DEFAULT_RINGBUF,
                 probes: Sequence[Probe], background: bool = True,
                 mechanisms: Optional[Dict[str, str]] = None, left_out: Optional[Dict[str, str]] = None,
                 load_parts: Optional[int] = None) -> None:
        """`probes`: what to load (pytest_nettrace.probes.registry.all_probes()
        for every one). `mechanisms` forces a probe's mechanism, e.g. {"rst": "tp_btf+kprobe"}
        (used to exercise fallback paths on kernels that have them); a forced
        mechanism the kernel lacks makes that probe unavailable, with the reason.
        `left_out` says why probes not in `probes` were not loaded (e.g. the
        session's nettrace_probes), for the errors of tests that ask for them.
        `load_parts`: how many threads verify the programs (default: the
        CPUs this process may run on, at most 4; 1 loads one object)."""
        if ringbuf_size < 4096 or ringbuf_size & (ringbuf_size - 1):
            raise ValueError(f"ring buffer size {ringbuf_size} must be a power of two >= 4096")
        self.kernel: KernelFeatures = features(btf_path)
        self.kernel.require()
        self.btf_path = btf_path
        self.ringbuf_size = ringbuf_size
        self.forced = dict(mechanisms or {})
        self.status: Dict[str, ProbeStatus] = {p.name: ProbeStatus(p) for p in probes}
        self.left_out: Dict[str, str] = dict(left_out or {})  # probe name -> why it was not loaded
        self.core_btf: Optional[str] = None  # the minimal BTF CO-RE used, if any
        self.load_parts = load_parts if load_parts is not None else min(len(os.sched_getaffinity(0)), 4)
        self.records = RecordDecoder()
        self._sinks: Dict[int, Sink] = {}
        self._routes: Dict[Sink, FrozenSet[int]] = {}  # each sink's namespaces
        self._lock = threading.RLock()
        self._obj: Optional[Union[lb.BpfObject, lb.SplitObject]] = None
        # attached programs that can miss calls (see program_misses): fd, and the
        # kind ids of the probes whose plans use it
        self._miss_progs: Dict[str, int] = {}
        self._covered: Dict[str, int] = {}   # program -> fd of its Plan.covered map
        self._prog_kinds: Dict[str, Set[int]] = {}
        self._miss_base: Dict[int, Dict[str, int]] = {}  # netns -> program -> misses when its watch began
        self._misses_read: Tuple[float, Dict[str, int]] = (-1.0, {})   # when program_misses() last read, what
        self.attach_seconds = 0.0
        t0 = time.perf_counter()
        self._scopes_fd = lb.map_create(lb.BPF_MAP_TYPE_HASH, "nt_scopes", 4, _SCOPE_VALUE.size, 4096,
                                         lb.BPF_F_NO_PREALLOC)  # as bpf/nettrace.h says why
        self._events_fd = lb.map_create(lb.BPF_MAP_TYPE_RINGBUF, "nt_events", 0, 0, ringbuf_size)
        self._pidns_fd = lb.map_create(lb.BPF_MAP_TYPE_ARRAY, "nt_pidns", 4, 8, 1)
        self._watching_fd = lb.map_create(lb.BPF_MAP_TYPE_ARRAY, "nt_watching", 4, 4, 1)
        lb.map_update(self._pidns_fd, struct.pack("<I", 0), struct.pack("<II", _own_pid_namespace(), 0))
        try:
            self._ring = RingBuffer(self._events_fd, ringbuf_size, min_len=HEADER.size)
            self._load()
        except BaseException:
            self.close()
            raise
        self.attach_seconds = time.perf_counter() - t0
        symbols.invalidate()  # our programs' trampolines are new symbols
        self._stop = threading.Event()
        # at that rate a pause fills at most a quarter of the ring
        self._pause = min(DRAIN_PAUSE, ringbuf_size / 4 / _FILL_RATE)
        self._backlog = False   # a probe left work at the last drain (Probe.poll)
        self._thread: Optional[threading.Thread] = None
        if background:
            # Keep the ring buffer empty while tests run, so bursts don't overflow it.
            self._thread = threading.Thread(target=self._drain_loop, name="nettrace-drain", daemon=True)
            self._thread.start()

    # -- loading -------------------------------------------------------------
    def _load(self) -> None:
        unknown = set(self.forced) - set(self.status)
        if unknown:
            raise ValueError(f"unknown probe {sorted(unknown)[0]!r} in mechanisms; probes: {', '.join(self.status)}")
        for st in self.status.values():
            st.plans = list(st.probe.plans(self.kernel))
            want = self.forced.get(st.probe.name)
            if want is not None:
                offered = [p.mechanism for p in st.plans]
                st.plans = [p for p in st.plans if p.mechanism == want]
                if not st.plans:
                    st.unavailable = (f"mechanism {want!r} forced but not possible on this kernel "
                                      f"(possible: {', '.join(offered) or 'none'}; "
                                      f"fentry: {self.kernel.why('fentry')}, kprobe: {self.kernel.why('kprobe')})")
                    continue
            if not st.plans:
                st.unavailable = st.probe.unavailable_reason(self.kernel)
        # CO-RE against a checked minimal BTF when one can be had (about half
        # the load time goes into relocating against the full one)
        core_btf = self.core_btf = corebtf.minimal_btf(object_path(OBJECT), self.btf_path)
        costs = LoadCosts(object_path(OBJECT), core_btf or self.btf_path)
        # Try the best plan of every probe in one object; when a program fails,
        # move only its probe to its next plan and try again.
        while True:
            active = [st for st in self.status.values() if st.plans and st.unavailable is None]
            if not active:
                break
            obj = self._object(active, core_btf, costs.known)
            culprit: Optional[ProbeStatus] = None
            try:
                try:
                    obj.load(explain=False)
                except ProbeLoadError as quiet:
                    # libbpf's error names the program only in its log text:
                    # find the probe by loading each plan alone instead, with
                    # the log kept for the reason
                    culprit, why = self._load_culprit(active, core_btf)
                    raise why or quiet from None
                attached = set()  # a program two plans share is attached once
                for st in active:
                    culprit = st
                    for prog in st.plans[0].programs:
                        if prog not in attached:
                            obj.attach(prog, cgroup=st.plans[0].cgroups.get(prog))
                            attached.add(prog)
            except ProbeLoadError as e:
                obj.close()
                if culprit is None:
                    raise
                culprit.failures.append(f"{culprit.plans[0].mechanism}: {e}")
                culprit.plans.pop(0)
                if not culprit.plans:
                    culprit.unavailable = "; ".join(culprit.failures)
                continue
            self._obj = obj
            fds = obj.program_fds()
            for st in active:
                for prog in st.plans[0].programs:
                    if prog in fds:
                        self._miss_progs[prog] = fds[prog]
                        if prog in st.plans[0].covered:
                            self._covered[prog] = obj.map_fd(st.plans[0].covered[prog])
                        kinds = self._prog_kinds.setdefault(prog, set())
                        if prog not in st.plans[0].own_misses:
                            kinds.add(st.probe.kind_id)
            if isinstance(obj, lb.SplitObject):
                costs.save(obj.costs())
            for st in active:
                st.plan = st.plans[0]
                self.records.add(st.probe)
                st.probe.wakeups = self._ring
                st.probe.attached(obj)
            if core_btf is None:  # for the sessions after this one
                corebtf.prepare_in_background(object_path(OBJECT), self.btf_path)
            return

    def _object(self, active: List[ProbeStatus], core_btf: Optional[str],
                costs: Optional[Dict[str, float]] = None) -> Union[lb.BpfObject, lb.SplitObject]:
        """The object, opened with the current plan of each of `active`; split
        over `load_parts` threads when `costs` (each program's guessed load
        time) is given and there is more than one."""
        obj: Union[lb.BpfObject, lb.SplitObject]
        if costs is not None and self.load_parts > 1:
            obj = lb.SplitObject(object_path(OBJECT), core_btf or self.btf_path, self.load_parts, costs)
        else:
            obj = lb.BpfObject(object_path(OBJECT), core_btf or self.btf_path)
        try:
            obj.reuse_map("nt_scopes", self._scopes_fd)
            obj.reuse_map("nt_events", self._events_fd)
            obj.reuse_map("nt_pidns", self._pidns_fd)
            obj.reuse_map("nt_watching", self._watching_fd)
            enabled: Dict[str, bool] = {}
            for st in active:
                plan = st.plans[0]
                for prog in plan.programs:
                    enabled[prog] = True
                for var, value in plan.config.items():
                    obj.set_rodata(var, value)
            obj.set_autoload(enabled)
        except BaseException:
            obj.close()
            raise
        return obj

    def _load_culprit(self, active: List[ProbeStatus],
                      core_btf: Optional[str]) -> Tuple[Optional[ProbeStatus], Optional[ProbeLoadError]]:
        """The first probe whose current plan does not load on its own (the
        feature probed, as libbpf-tools choose a fallback), and why; if each
        loads alone, no probe and why all together do not."""
        for group in [[st] for st in active] + [active]:
            try:
                obj = self._object(group, core_btf)
            except ProbeLoadError as e:
                return (group[0] if len(group) == 1 else None), e
            try:
                obj.load()
            except ProbeLoadError as e:
                return (group[0] if len(group) == 1 else None), e
            finally:
                obj.close()
        return None, None

    def describe(self) -> str:
        """One line for the pytest header."""
        parts = []
        for name, st in self.status.items():
            parts.append(f"{name}={st.mechanism}")
        return ", ".join(parts)

    def probe_available(self, name: str) -> Optional[str]:
        """None if probe `name` is attached, else why it is not."""
        st = self.status.get(name)
        if st is None:
            return self.left_out.get(name, f"unknown probe {name!r}")
        return None if st.plan else (st.unavailable or "not attached")

    # -- scope ---------------------------------------------------------------
    def _attached_probes(self) -> List[Probe]:
        return [st.probe for st in self.status.values() if st.plan]

    def watch(self, netns: int, sink: Sink, path: Optional[str] = None) -> None:
        """Deliver events from namespace `netns` to `sink`; start counting its losses.
        `path` (e.g. /run/netns/NAME) lets probes open the namespace."""
        with self._lock:
            if netns not in self._sinks:
                for probe in self._attached_probes():
                    probe.reset(netns)
            self._sinks[netns] = sink
            self._route()
            self._miss_base[netns] = self._recent_misses()   # before the scope: a miss from then on counts
            # since: CLOCK_MONOTONIC, bpf_ktime_get_ns()'s clock
            lb.map_update(self._scopes_fd, _u32.pack(netns), _SCOPE_VALUE.pack(*_NO_LOSSES, time.monotonic_ns()))
            lb.map_update(self._watching_fd, _u32.pack(0), _u32.pack(len(self._sinks)))
            for probe in self._attached_probes():
                probe.watch(netns, path)

    def unwatch(self, netns: int) -> None:
        with self._lock:
            for probe in self._attached_probes():
                probe.unwatch(netns)
            lb.map_delete(self._scopes_fd, _u32.pack(netns))
            self._miss_base.pop(netns, None)
            self._sinks.pop(netns, None)
            self._route()
            lb.map_update(self._watching_fd, _u32.pack(0), _u32.pack(len(self._sinks)))
            self.records.forget(netns)

    def _route(self) -> None:
        routes: Dict[Sink, Set[int]] = {}
        for netns, sink in self._sinks.items():
            routes.setdefault(sink, set()).add(netns)
        self._routes = {sink: frozenset(ns) for sink, ns in routes.items()}

    def lost(self, netns: int, misses: Optional[Dict[str, int]] = None) -> Dict[int, int]:
        """Events the kernel could not deliver for `netns`, by kind id;
        `misses`: program_misses() read once for several namespaces."""
        raw = lb.map_lookup(self._scopes_fd, _u32.pack(netns), _SCOPE_VALUE.size)
        lost = _SCOPE_VALUE.unpack(raw)[:NT_MAX_KINDS] if raw is not None else ()
        out = {k: n for k, n in enumerate(lost) if n}
        for kind_id, n in self.records.lost(netns).items():
            out[kind_id] = out.get(kind_id, 0) + n
        for kind_id, n in self.missed(netns, misses).items():
            out[kind_id] = out.get(kind_id, 0) + n
        return out

    def program_misses(self, kind_ids: Optional[Set[int]] = None) -> Dict[str, int]:
        """Each attached program's recursion misses so far (those the kernel
        does not report on: none), less those another program made up for
        (Plan.covered); ~0.1 ms (a syscall a program). `kind_ids`: only the
        programs whose misses count for those kinds (an assertion on one
        kind reads a few programs, not all)."""
        progs = self._miss_progs if kind_ids is None else {
            p: fd for p, fd in self._miss_progs.items() if self._prog_kinds.get(p, set()) & kind_ids}
        out = {}
        # what other programs made up for, read first: a skipped call counts
        # before it is made up for, so this order never counts fewer lost
        covered = {prog: _u64.unpack(lb.map_lookup(fd, _u32.pack(0), 8) or bytes(8))[0]
                   for prog, fd in self._covered.items() if prog in progs}
        for prog, fd in progs.items():
            n = lb.prog_recursion_misses(fd)
            if n is not None:
                out[prog] = n - covered.get(prog, 0)
        if kind_ids is None:
            self._misses_read = (time.monotonic(), out)
        return out

    def _recent_misses(self) -> Dict[str, int]:
        """program_misses(), or what it read in the last 50 ms: a watch's
        starting point may be a little early (a miss just before the watch
        then counts for it too: more lost, never less)."""
        read_at, misses = self._misses_read
        return misses if time.monotonic() - read_at < 0.05 else self.program_misses()

    def missed(self, netns: int, misses: Optional[Dict[str, int]] = None) -> Dict[int, int]:
        """Calls of the probes' programs the kernel skipped since `netns` was
        watched, by kind id. A tracing program is not run when the CPU is
        already running it: one running in a process's context (say a
        state change of any socket on the machine) and interrupted by a
        softirq that hits the same tracepoint (a watched socket closing on
        a FIN) skips the softirq's call, and its event, counting it only in
        the program's recursion_misses. Which namespace that call was for is
        not known: every watched namespace counts it, for every kind of the
        probes that use the program."""
        base = self._miss_base.get(netns)
        if base is None:
            return {}
        out: Dict[int, int] = {}
        for prog, n in (self.program_misses() if misses is None else misses).items():
            delta = n - base.get(prog, 0)
            if delta > 0:
                for kind_id in self._prog_kinds.get(prog, ()):
                    out[kind_id] = out.get(kind_id, 0) + delta
        return out

    def lost_elsewhere(self, netns: int, kind: Optional[str] = None) -> Dict[str, int]:
        """Events lost outside the ring buffer (e.g. a full monitor socket), by
        kind; `kind`: asked only of the probe that makes it."""
        out: Dict[str, int] = {}
        for probe in self._attached_probes():
            if kind is not None and kind not in probe.event_types:
                continue
            for name, n in probe.lost(netns).items():
                out[name] = out.get(name, 0) + n
        return out

    # -- events --------------------------------------------------------------
    def drain(self) -> int:
        """Route every record committed so far to its trace; returns how many.
        The shared ring comes first: it is what overflows under a burst; the
        probes' own sources (sockets, captures) have buffers of their own."""
        with self._lock:
            ring = self._ring
            spans = ring.read_spans()
            if ring.short:  # not even a header: no namespace to charge it to
                self.records.errors += ring.short
                ring.short = 0
            if spans:
                # each sink gets what is in the copies, limited to the
                # namespaces it watches now: a namespace no longer watched
                # (its records still in the ring) reaches nobody
                for sink, netns in self._routes.items():
                    sink(Delivery(spans, netns))
            # a probe that left work (a batch at a time) is polled again at once
            self._backlog = any([probe.poll() for probe in self._attached_probes()])
            return sum(len(starts) for _, starts, _ in spans)

    def decode(self, rec: bytes) -> List[Event]:
        """The events a raw record stands for (see RecordDecoder)."""
        return self.records.decode(rec)

    def decode_all(self, kind_id: int, recs: Iterable[bytes]) -> List[Event]:
        """The events of these raw records of one kind, in order (see RecordDecoder)."""
        return self.records.decode_all(kind_id, recs)

    def count(self, rec: bytes) -> List[str]:
        """The kinds of the new events a raw record stands for, not made (see RecordDecoder)."""
        return self.records.count(rec)

    def carries_records(self, kind_id: int) -> bool:
        """Whether events of `kind_id` reach traces as ring records (a sink's)."""
        return self.records.carries(kind_id)

    def decode_needs_watch(self, kind_id: int) -> bool:
        """Whether records of `kind_id` must be decoded while their namespace is watched."""
        return self.records.needs_watch(kind_id)

    def _drain_loop(self) -> None:
        # After a drain that found records, pause before the next: records
        # then arrive in batches. The kernel wakes the reader for a record
        # submitted while the reader had caught up (an irq_work: a self-IPI,
        # microseconds in a VM, charged to the probe that submitted) and
        # each wakeup costs a drain here; at connection rates, draining as
        # records came doubled the probes' cost per connection. A drain that
        # took an eighth of the ring or more (a flood) is followed at once.
        # A probe's own source (a capture's socket, Probe.wakeups) wakes it
        # too, and is read in batches the same way.
        ring, stop, pause, flood = self._ring, self._stop, self._pause, self.ringbuf_size // 8
        while not stop.is_set():
            try:
                if self._backlog or ring.wait(0.2):
                    before = ring.consumed
                    self.drain()
                    if not self._backlog and ring.consumed - before < flood:
                        stop.wait(pause)
            except (OSError, ValueError):
                if self._stop.is_set():
                    return
                raise

    def wait(self, timeout: float) -> None:
        """Sleep until the kernel submits something or timeout passes."""
        self._ring.wait(timeout)

    # -- teardown ------------------------------------------------------------
    def close(self) -> None:
        """Detach everything (idempotent)."""
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
            if self._ring is not None:
                self._ring.wake()
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(1.0)
        with self._lock:
            for st in getattr(self, "status", {}).values():
                st.probe.close()
            if self._obj is not None:
                self._obj.close()
                self._obj = None
            ring = getattr(self, "_ring", None)
            if ring is not None:
                ring.close()
                self._ring = None  # type: ignore[assignment]  # closed: never read again
            for attr in ("_scopes_fd", "_events_fd", "_pidns_fd", "_watching_fd"):
                fd = getattr(self, attr, -1)
                if fd >= 0:
                    os.close(fd)
                    setattr(self, attr, -1)

"""pytest plugin entry point (`pytest11: nettrace`): options, header, fixtures,
report sections, forbidden-event gates and the session summary."""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
import platform
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, NoReturn, Optional, Tuple, TypeVar

import pytest

from .report import captures, gates
from .netns import daemons
from .kernel.capabilities import DEFAULT_BTF, features
from .kernel.engine import DEFAULT_RINGBUF, Engine, ring_size_refused
from .errors import LeftAlone, NamespaceError, NettraceError
from .report.gates import GateSpec, GateSpecError
from .netns.namespace import Namespace, NamespaceFactory, cleanup_stale, dummy_supported
from .report import reporters
from .report.section import DEFAULT_FILE_MODE, SECTION, ReportDirError, SessionSummary, prepare_dir, summary
from .report.view import TraceView
from .probes.registry import all_probes
from .selection import select as select_probes
from .trace import DEFAULT_MAX_RECORDS, Trace


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nettrace", "network namespaces and kernel probes")
    group.addoption("--nettrace-btf", default=None, metavar="PATH",
                    help=f"kernel BTF used for CO-RE relocation (default {DEFAULT_BTF})")
    group.addoption("--nettrace-report", default=None, metavar="DIR",
                    help="write each traced test's events (JSON lines) and pcap into DIR "
                    "(created 0700 if missing; files 0600: they hold payloads and command lines)")
    group.addoption("--nettrace-report-mode", default=None, metavar="OCTAL",
                    help="mode of the --nettrace-report files, e.g. 0644 (default 0600); a directory "
                    "it creates gets search permission where the mode grants reading")
    group.addoption("--nettrace-show", default=None, choices=SHOW_CHOICES,
                    help="which tests get a 'network events' report section: failed (default; "
                    "all with -v), all, none")
    group.addoption("--nettrace-forbid", action="append", default=None, metavar="KINDS",
                    help="fail every test in which one of these events happened, e.g. "
                    "'rst,addr:deleted' (every test is traced; overrides ini nettrace_forbid)")
    group.addoption("--nettrace-probes", default=None, metavar="PROBES",
                    help="which probes to load: 'all' (default), names ('rst,netchange') or "
                    "exclusions ('-packet,-syscall'); overrides ini nettrace_probes")
    parser.addini("nettrace_btf", "kernel BTF used for CO-RE relocation", default=DEFAULT_BTF)
    parser.addini("nettrace_probes", "which probes to load: 'all', names ('rst, netchange') or "
                  "exclusions ('-packet, -syscall')", default="all")
    parser.addini("nettrace_forbid", "events no test may cause, e.g. 'rst, addr:deleted' "
                  "(every test is traced)", default="")
    parser.addini("nettrace_unavailable", "when probes cannot run (no root, no BTF): 'skip' the tests "
                  "that use the nettrace fixture, or 'error'", default="skip")
    parser.addini("nettrace_ringbuf_size", "bytes of the kernel->user event ring (power of two)",
                  default=str(DEFAULT_RINGBUF))
    parser.addini("nettrace_max_records", "events (ring records) one test's trace keeps at most; later ones "
                  "count as lost, so negative assertions fail (0: no limit)", default=str(DEFAULT_MAX_RECORDS))


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SIGNALS_OURS] = _interrupts_installed(config)
    config.addinivalue_line("markers", "stock_kernel: needs what only stock distro kernels have "
                            "(kprobes, fentry, the dummy driver); run in the VM stage (ci/vm-test)")
    mode = config.getini("nettrace_unavailable")
    if mode not in ("skip", "error"):
        raise pytest.UsageError(f"nettrace_unavailable = {mode!r}: use 'skip' or 'error'")
    config.addinivalue_line("markers", "nettrace(forbid=[], watch_host=False, nft_trace=False, max_records=None): "
                            "trace this test (even without the nettrace fixture); fail it at teardown if a "
                            "forbidden event ('rst', 'addr:deleted', ...) happened; watch_host also watches "
                            "the namespace pytest runs in; nft_trace says which nftables rule dropped "
                            "each packet in the test's namespaces; max_records overrides nettrace_max_records")
    spec = config.getoption("nettrace_probes") or config.getini("nettrace_probes")
    try:
        loaded, left_out = select_probes(spec)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    config.stash[_ENGINE] = EngineHolder(
        btf_path=config.getoption("nettrace_btf") or config.getini("nettrace_btf"),
        ringbuf_size=_ringbuf_size(config.getini("nettrace_ringbuf_size")),
        on_unavailable=mode, probes=loaded,
        left_out={n: f"probe {n!r} not loaded in this session (nettrace_probes = {spec!r})" for n in left_out})
    captures.start_session()
    config.stash[_CAPTURING] = True   # balanced at unconfigure, which runs even if configure failed before
    if hasattr(config, "workerinput"):  # an xdist worker: it will need the probes
        config.stash[_ENGINE].preload()
    settings = ReportSettings.from_config(config)
    config.stash[_SETTINGS] = settings
    config.pluginmanager.register(SessionReporter(settings), "nettrace-session-reporter")


def _ringbuf_size(raw: str) -> int:
    try:
        size = int(raw, 0)
    except ValueError:
        raise pytest.UsageError(f"nettrace_ringbuf_size = {raw!r} is not a number") from None
    if size < 4096 or size & (size - 1):
        raise pytest.UsageError(f"nettrace_ringbuf_size = {size}: must be a power of two >= 4096")
    refused = ring_size_refused(size)
    if refused:
        raise pytest.UsageError(f"nettrace_ringbuf_size = {size}: {refused}")
    return size


# -- SIGINT and SIGTERM: teardown always finishes ---------------------------------

def _interrupts_installed(config: pytest.Config) -> List[int]:
    """SIGTERM (CI cancelling a job, `timeout`) ends the run like Ctrl-C:
    pytest's interrupted path runs the fixtures' teardown, which removes what
    the tests made; the default action would kill the process on the spot.
    SIGINT keeps raising KeyboardInterrupt, through this handler: an xdist
    controller passes either on to its workers at once, and a worker takes
    the same interrupt delivered more than once as one (see _raise_interrupt).
    The signals whose handler was installed (not those someone else handles)."""
    if threading.current_thread() is not threading.main_thread() or _raise_interrupt in (
            signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)):
        return []   # (an inline pytester run inside a session that has them: the session's stay)
    global _role
    # (xdist registers its controller after this runs: its option says it)
    _role = "worker" if hasattr(config, "workerinput") else (
        "controller" if getattr(config.option, "numprocesses", None) else "")
    installed: List[int] = []
    for sig, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
        if signal.getsignal(sig) is default and (sig == signal.SIGTERM or _role):
            signal.signal(sig, _raise_interrupt)
            installed.append(sig)
    return installed


def _interrupts_restored(installed: List[int]) -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in installed:
            if signal.getsignal(sig) is _raise_interrupt:
                signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)


# "controller": an xdist controller, whose workers run the tests; "worker": one of them
_role = ""
# An xdist worker gets one interrupt up to three times: from its process
# group (Ctrl-C), from its controller (which passes on what it gets alone,
# e.g. `timeout`'s SIGTERM), and from execnet, which SIGINTs a worker still
# busy 5 s after the controller asked it to exit. Those are one interrupt:
# taken once, they never cut the teardown the first one started (a worker's
# teardown that hangs is ended by its controller, which kills it after 10 s).
_interrupted = False


def _raise_interrupt(signum: int, frame: object) -> None:
    global _interrupted
    if _role == "worker" and _interrupted:
        return
    _interrupted = True
    if _role == "controller":
        _interrupt_workers(signum)
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _interrupt_workers(signum: int) -> None:
    """The controller's signal to its xdist workers (its children that
    execnet started), which then tear down at once: when the controller
    alone got it, xdist asked them to exit and execnet interrupted them 5 s
    later, leaving their teardown less than 5 s before the kill. The same
    signal: a worker started in the background has SIGINT ignored."""
    me = str(os.getpid()).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            if stat[stat.rindex(b")") + 2:].split()[1] != me:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if _EXECNET_WORKER not in f.read():
                    continue
            os.kill(int(entry), signum)
        except (OSError, ValueError, IndexError):
            continue


# how execnet starts a popen gateway (xdist's worker): `python -u -c <this>`
_EXECNET_WORKER = b"import sys;exec(eval(sys.stdin.readline()))"


class _InterruptedAgain(KeyboardInterrupt):
    """A second SIGINT/SIGTERM during a teardown the first one started."""


@contextmanager
def _signals_deferred(interrupted: bool = False) -> Iterator[None]:
    """SIGINT/SIGTERM wait until the block is done, then act: an interrupt in
    the middle of a teardown would drop the fixtures' remaining finalizers
    (pytest forgets them), leaving namespaces and daemons behind. A second
    one interrupts at once; `interrupted`: the run already was (the block is
    the teardown the first one started)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: List[int] = []

    def defer(signum: int, frame: object) -> None:
        if _role == "worker" and (pending or interrupted or _interrupted):
            return   # the same interrupt again (see _raise_interrupt)
        if pending or interrupted:  # asked twice: a teardown that hangs must stay interruptible
            raise _InterruptedAgain(f"signal {signal.Signals(signum).name} (again, during teardown)")
        pending.append(signum)

    previous: Dict[int, Any] = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, defer)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), pending[0])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: Optional[pytest.Item]) -> Iterator[None]:
    with _signals_deferred():
        return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Iterator[None]:
    # after an interrupt, the interrupted test's fixtures are torn down here
    try:
        with _signals_deferred(interrupted=exitstatus == pytest.ExitCode.INTERRUPTED):
            return (yield)
    except _InterruptedAgain as again:
        # the run ends as interrupted already: one line, not a traceback
        print(f"nettrace: teardown stopped by {again}: the next session's stale cleanup removes "
              f"what it left", file=sys.stderr)
        return None


def pytest_unconfigure(config: pytest.Config) -> None:
    _interrupts_restored(config.stash.get(_SIGNALS_OURS, []))  # an inline pytester run leaves the outer one's
    holder = config.stash.get(_ENGINE, None)
    if holder is not None:
        holder.close()
    if config.stash.get(_CAPTURING, False):
        captures.finish_session()  # what no failed test keeps goes, then the directory if empty


def pytest_sessionstart(session: pytest.Session) -> None:
    # Captures that failed tests of ended runs left go; namespaces of runs
    # that died (SIGKILLed worker, crash) are removed here.
    captures.remove_stale()
    if os.geteuid() != 0:
        return
    # What it leaves alone is said in one line each, on the terminal: as
    # warnings here they would turn into an INTERNALERROR under -W error.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LeftAlone)
        cleanup_stale()
    notes = [f"nettrace: stale cleanup: {w.message}" for w in caught if issubclass(w.category, LeftAlone)]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for note in notes:
        if reporter is not None:
            reporter.write_line(note, yellow=True)
        else:
            print(note, file=sys.stderr)


def pytest_report_header(config: pytest.Config) -> List[str]:
    lines = []
    holder: EngineHolder = config.stash[_ENGINE]
    k = features(holder.btf_path)
    lines.append(f"nettrace: kernel {platform.release()}: {k.summary()}")
    if os.geteuid() == 0:
        try:
            real = dummy_supported()
            lines.append("nettrace: dummy driver available" if real else
                         "nettrace: no dummy driver loaded, add_dummy() uses a veth stand-in (kind 'veth-standin'); "
                         "loading it would add dummy0 to the host: `modprobe dummy numdummies=0` allows it")
        except OSError as exc:
            lines.append(f"nettrace: cannot probe the dummy driver ({exc})")
    engine, why = holder.try_get()
    if engine is None:
        lines.append(f"nettrace: probes unavailable: {why}")
    else:
        lines.append(f"nettrace: probes: {engine.describe()} (attached in {engine.attach_seconds * 1e3:.0f} ms)")
        for name, st in engine.status.items():
            for failure in st.failures:
                lines.append(f"nettrace:   {name}: fell back from {failure}")
            if st.plan is None and st.unavailable:
                lines.append(f"nettrace:   {name} unavailable: {st.unavailable}")
            for note in st.plan.notes if st.plan is not None else ():
                lines.append(f"nettrace:   {name}: {note}")
        if engine.left_out:
            lines.append(f"nettrace:   not loaded (nettrace_probes): {', '.join(engine.left_out)}")
    if config.pluginmanager.has_plugin("dsession"):
        # an xdist controller runs no test (its workers load their own): its
        # probes, kept attached, would only cost every process on the host
        holder.close()
    return lines


def _load_threads() -> int:
    """Threads to verify the programs with: the CPUs this process may use,
    shared by the xdist workers (which all load theirs at start-up), at most 4."""
    try:
        workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    except ValueError:
        workers = 1
    return max(1, min(4, len(os.sched_getaffinity(0)) // workers))


class EngineHolder:
    """The process's one Engine: loaded on first use (or in the background
    from configure on, so loading overlaps collection), kept for the session."""

    def __init__(self, btf_path: str, ringbuf_size: int, on_unavailable: str,
                 probes: Optional[List[str]] = None, left_out: Optional[Dict[str, str]] = None) -> None:
        self.btf_path = btf_path
        self.ringbuf_size = ringbuf_size
        self.on_unavailable = on_unavailable
        self.probes = probes
        self.left_out = left_out or {}
        self._engine: Optional[Engine] = None
        self._error: Optional[str] = None
        self._lock = threading.Lock()
        self._loader: Optional[threading.Thread] = None

    def preload(self) -> None:
        """Start loading the probes now, in a thread (ctypes releases the GIL)."""
        if os.geteuid() != 0 or self._loader is not None:
            return
        self._loader = threading.Thread(target=self.try_get, name="nettrace-load", daemon=True)
        self._loader.start()

    def try_get(self) -> "tuple[Optional[Engine], Optional[str]]":
        with self._lock:
            if self._engine is None and self._error is None:
                try:
                    chosen = all_probes()
                    if self.probes is not None:
                        chosen = [p for p in chosen if p.name in self.probes] or all_probes()
                    self._engine = Engine(btf_path=self.btf_path, ringbuf_size=self.ringbuf_size,
                                          probes=chosen, left_out=self.left_out, load_parts=_load_threads())
                except NettraceError as e:
                    self._error = str(e)
            return self._engine, self._error

    def get(self) -> Engine:
        """The engine, or skip/fail the test with the one-line reason."""
        engine, why = self.try_get()
        if engine is None:
            self.refuse(f"nettrace probes unavailable: {why}")
        assert engine is not None  # refuse() skipped or failed the test
        return engine

    def refuse(self, msg: str) -> NoReturn:
        """Skip or fail the test (ini nettrace_unavailable) because probes cannot do their job."""
        if self.on_unavailable == "error":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)

    def close(self) -> None:
        if self._loader is not None:
            self._loader.join()
        if self._engine is not None:
            self._engine.close()
            self._engine = None


_ENGINE = pytest.StashKey[EngineHolder]()


@pytest.fixture
def netns_factory(request: pytest.FixtureRequest) -> Iterator[NamespaceFactory]:
    """The factory behind `netns` and `make_netns`; removes all its namespaces after the test.

    In a test that uses `nettrace`, the trace starts here, before the first
    namespace exists: a fixture that builds its topology with `make_netns`
    before `nettrace` is set up is still watched from the start."""
    factory = NamespaceFactory()
    try:
        # (without probes, the `nettrace` fixture itself says why, in its turn)
        if "nettrace" in request.fixturenames and request.config.stash[_ENGINE].try_get()[0] is not None:
            _start_trace(request, factory)
        yield factory
    finally:
        try:
            trace = request.node.stash.get(TRACE_KEY, None)
            if trace is not None and not trace.closed and request.node.stash.get(_VIEW, None) is None:
                trace.close()  # the `nettrace` fixture itself never ran (its setup failed or skipped)
        finally:
            factory.close()


@pytest.fixture
def netns(request: pytest.FixtureRequest, netns_factory: NamespaceFactory) -> Namespace:
    """A fresh network namespace, loopback up, removed after the test."""
    return _create_or_refuse(request.config, netns_factory)


@pytest.fixture
def make_netns(request: pytest.FixtureRequest, netns_factory: NamespaceFactory) -> Callable[[], Namespace]:
    """`make_netns()` returns another fresh namespace; all are removed after the test."""
    return lambda: _create_or_refuse(request.config, netns_factory)


def _create_or_refuse(config: pytest.Config, factory: NamespaceFactory) -> Namespace:
    """A namespace; where this process may not make one (no root), the test is
    skipped (or failed: ini nettrace_unavailable) with one line, as for probes."""
    try:
        return factory.create()
    except NamespaceError as e:
        if not e.unprivileged:
            raise
        why = str(e)
    config.stash[_ENGINE].refuse(f"network namespaces unavailable: {why}")  # outside: no chained traceback
    raise AssertionError("refuse() returns only by raising")


# -- daemons in one line -----------------------------------------------------

_D = TypeVar("_D")


def _daemon(request: pytest.FixtureRequest, start: Callable[[], _D]) -> _D:
    """start(); a daemon that is not installed skips the test (or fails it,
    with ini nettrace_unavailable = error) naming the package to install."""
    try:
        return start()
    except daemons.DaemonNotInstalled as exc:
        why = str(exc)
    # outside the except: one message, not chained to the DaemonNotInstalled
    if request.config.getini("nettrace_unavailable") == "error":
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


@pytest.fixture
def dbus_system_bus(request: pytest.FixtureRequest, netns: Namespace,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[daemons.SystemBus]:
    """A private D-Bus system bus in the `netns` namespace.

    Name: dbus_system_bus
    Scope: function
    Depends: netns, tmp_path_factory
    Gives: a `SystemBus`: `.address`, `.env` ({"DBUS_SYSTEM_BUS_ADDRESS": ...}
    for clients), `.run(argv, ...)` (Namespace.run with the bus set),
    `.process`, `.log`. dbus-daemon listens on an abstract socket of the
    namespace, so only its programs reach it; it allows everything. Stopped
    after the test. For a bus in another namespace:
    `pytest_nettrace.netns.daemons.start_system_bus(ns, workdir)`.

    Example::

        def test_bus(dbus_system_bus):
            r = dbus_system_bus.run(["busctl", "--system", "list"], check=True)
            assert "org.freedesktop.DBus" in r.stdout
    """
    bus = _daemon(request, lambda: daemons.start_system_bus(netns, tmp_path_factory.mktemp("dbus")))
    try:
        yield bus
    finally:
        bus.stop()


@pytest.fixture
def networkmanager(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[Callable[..., daemons.NetworkManager]]:
    """Start NetworkManager in a namespace: `nm = networkmanager(ns, profiles=DIR)`.

    Name: networkmanager
    Scope: function
    Depends: tmp_path_factory (and netns, when no namespace is given)
    Gives: a function `networkmanager(ns=None, *, profiles=None, config="",
    bus=None, log_level="INFO")` that starts NetworkManager in `ns` (default:
    the `netns` namespace) with the keyfile profiles of directory `profiles`
    (copied, made root's 0600), on `bus` (default: a new private system bus
    in `ns`), and returns once it has started. The `NetworkManager` it
    returns has `.nmcli(*args, check=True)` bound to it, `.profiles`, `.log`,
    `.bus`, `.process`. Its state (/run/NetworkManager,
    /var/lib/NetworkManager, /etc/NetworkManager) is private; /sys shows
    the namespace's devices (read-only: no udev needed); no DNS, hostname
    or polkit handling. Everything started is stopped after the test. Not
    installed: the test is skipped (error with nettrace_unavailable = error).

    Example::

        def test_profile_applies(netns, networkmanager, nettrace, tmp_path):
            netns.add_dummy("eth1")
            (tmp_path / "lab.nmconnection").write_text(LAB_PROFILE)
            nm = networkmanager(netns, profiles=tmp_path)
            nm.nmcli("connection", "up", "lab")
            nettrace.assert_any("addr", action="added", address="10.2.0.1/24", comm="NetworkManager")
    """
    started: List[daemons.NetworkManager] = []

    def start(ns: Optional[Namespace] = None, *, profiles: "str | os.PathLike[str] | None" = None, config: str = "",
              bus: Optional[daemons.SystemBus] = None, log_level: str = "INFO") -> daemons.NetworkManager:
        where = ns if ns is not None else request.getfixturevalue("netns")
        nm = _daemon(request, lambda: daemons.start_networkmanager(
            where, tmp_path_factory.mktemp("networkmanager"), profiles=profiles, bus=bus, config=config,
            log_level=log_level))
        started.append(nm)
        return nm

    try:
        yield start
    finally:
        for nm in reversed(started):
            nm.stop()


@pytest.fixture
def systemd_networkd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[Callable[..., daemons.Networkd]]:
    """Start systemd-networkd in a namespace: `networkd = systemd_networkd(ns, config=DIR)`.

    Name: systemd_networkd
    Scope: function
    Depends: tmp_path_factory (and netns, when no namespace is given)
    Gives: a function `systemd_networkd(ns=None, *, config=None, bus=None)`
    that starts systemd-networkd in `ns` (default: the `netns` namespace)
    with the .network/.netdev files of directory `config` (copied) as its
    only configuration, on `bus` (default: a new private system bus), and
    returns once it reported ready. No systemd as PID 1 is needed. The
    `Networkd` it returns has `.networkctl(*args)`, `.reload()`,
    `.wait_configured(ifname)`, `.config` (the copy: edit, then `reload()`),
    `.log`, `.process`. Stopped after the test. Not installed: skipped
    (error with nettrace_unavailable = error).

    Example::

        def test_network_file(netns, systemd_networkd, nettrace, tmp_path):
            netns.add_dummy("eth1")
            (tmp_path / "10-eth1.network").write_text(
                "[Match]\\nName=eth1\\n[Network]\\nAddress=10.3.0.1/24\\nIPv6AcceptRA=no\\n")
            networkd = systemd_networkd(netns, config=tmp_path)
            networkd.wait_configured("eth1")
            nettrace.assert_any("addr", action="added", address="10.3.0.1/24", comm="systemd-networkd")

    (Without `IPv6AcceptRA=no` the link stays "configuring", waiting for a
    router advertisement that no test network sends.)
    """
    started: List[daemons.Networkd] = []

    def start(ns: Optional[Namespace] = None, *, config: "str | os.PathLike[str] | None" = None,
              bus: Optional[daemons.SystemBus] = None) -> daemons.Networkd:
        where = ns if ns is not None else request.getfixturevalue("netns")
        nd = _daemon(request, lambda: daemons.start_networkd(
            where, tmp_path_factory.mktemp("networkd"), config=config, bus=bus))
        started.append(nd)
        return nd

    try:
        yield start
    finally:
        for nd in reversed(started):
            nd.stop()


def _start_trace(request: pytest.FixtureRequest, factory: NamespaceFactory) -> Trace:
    """The test's trace, watching every namespace of `factory` from now on."""
    holder = request.config.stash[_ENGINE]
    engine = holder.get()
    item = request.node
    gate = item.stash.get(_GATE, GateSpec())
    limit = request.config.stash[_SETTINGS].max_records if gate.max_records is None else gate.max_records
    trace = Trace(engine, item.nodeid, max_records=limit)
    item.stash[TRACE_KEY] = trace
    try:
        if gate.watch_host:
            trace.watch_host()
        for ns in factory.namespaces:  # made before the trace (nettrace asked for late): say so
            _watch(trace, ns, gate, late=True)
        missing = gates.unavailable(trace, gate.forbid)
        if missing:
            holder.refuse(f"nettrace gate cannot be enforced: {'; '.join(missing)}")
    except BaseException:
        trace.close()
        raise
    factory.add_listener(lambda ns: None if trace.closed else _watch(trace, ns, gate))
    return trace


@pytest.fixture
def nettrace(request: pytest.FixtureRequest, netns_factory: NamespaceFactory) -> Iterator[Trace]:
    """Kernel events of this test: every namespace it creates through `netns` /
    `make_netns` is watched from its creation on, whatever the fixture order;
    `nettrace.watch()` adds more."""
    trace = request.node.stash.get(TRACE_KEY, None)
    if trace is None or trace.closed:
        trace = _start_trace(request, netns_factory)
    item = request.node
    try:
        yield trace
    finally:
        _finish_trace(item, trace, item.stash.get(_GATE, GateSpec()), request.config.stash[_SETTINGS])


def _watch(trace: Trace, ns: Namespace, gate: GateSpec, late: bool = False) -> None:
    trace.watch(ns, late=late)
    if gate.nft_trace:
        trace.trace_nft(ns)


def _finish_trace(item: pytest.Item, trace: Trace, gate: GateSpec, settings: "ReportSettings") -> None:
    """End of a test's trace: check its gate, keep what reports need, write its files."""
    violation: Optional[gates.Violation] = None
    try:
        # what the test looked at, and the kinds its gate forbids (a gate
        # asserts on them), not every kind the gate's check itself reads
        queried = set(getattr(trace, "queried", ())) | {rule.kind for rule in gate.forbid}
        if gate.forbid:
            if trace.closed:
                violation = gates.Violation(
                    f"nettrace gate (forbid={', '.join(map(str, gate.forbid))}) cannot be checked: "
                    "the test closed its trace, so lost events are unknown", [])
            elif gate.marked and not trace.watched:
                violation = gates.nothing_watched(gate.marked)
            else:
                violation = gates.check(trace, gate.forbid, timeline_shown=settings.show != "none")
        if violation is None and not item.stash.get(_FAILED, False) and not settings.report_dir \
                and settings.show != "all":
            trace.count_unread()   # nothing will show the kinds it never read: their number is enough
        view = trace.snapshot(item.nodeid).replace(queried=queried)  # loss counters vanish on close
    finally:
        trace.close()
    capture = getattr(trace, "pcap_path", None)  # final once capture stopped
    view = view.replace(events=trace.all_events(), counted=trace.counted,  # close drained the last ones
                        files={**view.files, "pcap": capture} if capture else view.files,
                        highlight=violation.offending if violation is not None else ())
    if settings.report_dir:
        view = reporters.write_files(view, settings.report_dir, settings.report_mode)
    # a failed test's capture stays where its report says; a passing test's
    # goes (kept by --nettrace-report, which has copied it)
    failed = violation is not None or item.stash.get(_FAILED, False)
    if settings.report_dir or not failed:
        captures.discard(capture)
        if view.files.get("pcap") == capture:
            view = view.replace(files={k: v for k, v in view.files.items() if k != "pcap"})
    else:
        captures.keep(capture)
    item.user_properties.extend(reporters.properties(view))
    item.stash[_VIEW] = view
    if violation is not None:
        pytest.fail(violation.message, pytrace=False)


@pytest.fixture(autouse=True)
def _nettrace_gated(request: pytest.FixtureRequest) -> None:
    """Marked tests, and every test under a suite-wide gate, are traced even
    without asking for `nettrace`; autouse so the trace starts before their
    other fixtures."""
    if request.node.stash.get(_GATE, None) is not None:
        request.getfixturevalue("nettrace")


TRACE_KEY = pytest.StashKey[Trace]()


# -- gates: parsed at collection, so a bad word stops the run before any test -----

@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """Give each collected test its gate (marker + suite rules); a bad marker
    makes its module a collection error naming the bad word (a UsageError
    raised in an xdist worker would crash it instead)."""
    outcome: Any = yield
    rep: pytest.CollectReport = outcome.get_result()
    if not rep.passed:
        return
    suite = collector.config.stash[_SETTINGS].suite_gate
    errors = []
    for item in rep.result:
        if not isinstance(item, pytest.Item):
            continue
        marks = list(item.iter_markers("nettrace"))
        if not marks and not suite.forbid:
            continue
        gate = GateSpec(list(suite.forbid))
        try:
            for mark in marks:
                gate = gate.merged(gates.parse_marker(mark.args, mark.kwargs, item.nodeid))
        except GateSpecError as e:
            errors.append(str(e))
            continue
        item.stash[_GATE] = gate
    if errors:
        rep.outcome = "failed"
        rep.longrepr = "\n".join(errors)
        rep.result = []


# -- reports --------------------------------------------------------------------

SHOW_CHOICES = ("failed", "all", "none")


@dataclass
class ReportSettings:
    """What the options ask of reports and gates, read once per process."""

    report_dir: Optional[str]
    show: str                        # "failed" | "all" | "none"
    suite_gate: GateSpec
    report_mode: int = DEFAULT_FILE_MODE
    max_records: int = 0             # a test's trace keeps at most this many records (0: no limit)

    @classmethod
    def from_config(cls, config: pytest.Config) -> "ReportSettings":
        show = config.getoption("nettrace_show") or ("all" if config.getoption("verbose") > 0 else "failed")
        forbid_opt = config.getoption("nettrace_forbid")
        try:
            if forbid_opt is not None:  # the command line overrides the ini file
                rules = gates.parse_rules(forbid_opt, "--nettrace-forbid")
            else:
                rules = gates.parse_rules(config.getini("nettrace_forbid"), "ini nettrace_forbid")
        except GateSpecError as e:
            raise pytest.UsageError(str(e)) from None
        raw_mode = config.getoption("nettrace_report_mode")
        mode = DEFAULT_FILE_MODE
        if raw_mode is not None:
            try:
                mode = int(raw_mode, 8)
            except ValueError:
                mode = -1
            if not 0 <= mode <= 0o777:
                raise pytest.UsageError(f"--nettrace-report-mode={raw_mode}: not a file mode (octal, e.g. 0644)")
        report_dir = config.getoption("nettrace_report")
        if report_dir:
            try:
                report_dir = prepare_dir(os.path.join(str(config.invocation_params.dir), report_dir), mode)
            except ReportDirError as e:
                raise pytest.UsageError(str(e)) from None
        raw_limit = config.getini("nettrace_max_records")
        try:
            limit = int(raw_limit)
        except ValueError:
            limit = -1
        if limit < 0:
            raise pytest.UsageError(f"nettrace_max_records = {raw_limit!r}: a whole number of records (0: no limit)")
        return cls(report_dir, show, GateSpec(rules), mode, limit)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    rep: pytest.TestReport = outcome.get_result()
    trace = item.stash.get(TRACE_KEY, None)
    if trace is None:
        return
    if rep.failed:
        item.stash[_FAILED] = True  # its capture is kept
    settings = item.config.stash[_SETTINGS]
    show = settings.show
    if rep.when == "teardown":
        # the fixture finished: the record is complete and the trace closed.
        # The item lives as long as the session: what the report needs is
        # taken here and the trace and its view let go (a suite's memory
        # must not grow with its test count).
        view = item.stash.get(_VIEW, None)
        if _VIEW in item.stash:
            del item.stash[_VIEW]
        if TRACE_KEY in item.stash:
            del item.stash[TRACE_KEY]
        if view is None:
            return
        rep.nettrace = summary(view)  # type: ignore[attr-defined]  # xdist carries report attributes
        if rep.failed and show != "none":
            rep.sections.extend(reporters.sections(view))
        return
    # setup / call: before fixture teardown, the trace is still open (drained here)
    if (rep.failed and show != "none") or (rep.when == "call" and show == "all"):
        view = trace.snapshot(item.nodeid)
        if rep.failed and call.excinfo is not None:   # its message has the timeline: the section adds the rest
            view = view.replace(shown_until=trace.failure_shown_until(str(call.excinfo.value)))
        if settings.report_dir:  # written at teardown, with the events still to come
            view = reporters.planned(view, settings.report_dir)
        elif rep.passed:
            view = view.replace(files={k: v for k, v in view.files.items() if k != "pcap"})  # removed at teardown
        rep.sections.extend(reporters.sections(view))


class SessionReporter:
    """Collects every traced test's tally (from reports, so xdist workers' too)
    and writes the end-of-session summary."""

    def __init__(self, settings: ReportSettings) -> None:
        self.settings = settings
        self.summary = SessionSummary()
        self.passed_sections: List[Tuple[str, str]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = getattr(report, "nettrace", None)
        if report.when == "teardown" and data:
            self.summary.add(report.nodeid, data)
        elif report.when == "call" and report.passed and self.settings.show == "all":
            self.passed_sections += [(report.nodeid, text) for name, text in report.sections if name == SECTION]

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        tr = terminalreporter
        if self.passed_sections:
            tr.write_sep("-", "nettrace: network events of passed tests")
            for nodeid, text in self.passed_sections:
                tr.write_line(nodeid)
                tr.write_line(text)
        lines = self.summary.lines()
        if lines:
            tr.write_sep("-", "nettrace summary")
            for line in lines:
                tr.write_line(line)


_SETTINGS = pytest.StashKey[ReportSettings]()
_SIGNALS_OURS = pytest.StashKey[List[int]]()  # the signals whose handler this config installed
_GATE = pytest.StashKey[GateSpec]()          # per item: marker + suite-wide rules
_VIEW = pytest.StashKey[TraceView]()         # per item: its trace's last view, kept after close
_FAILED = pytest.StashKey[bool]()            # per item: setup or call failed
_CAPTURING = pytest.StashKey[bool]()         # per config: counted in captures' sessions

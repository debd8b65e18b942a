"""pytest plugin entry point (`pytest11: nettrace`): options, header, fixtures."""

from __future__ import annotations

import os
import platform
from typing import Callable, Iterator, Optional

import pytest

from .capabilities import DEFAULT_BTF, features
from .engine import DEFAULT_RINGBUF, Engine
from .errors import NettraceError
from .netns import Namespace, NamespaceFactory, cleanup_stale, dummy_supported
from .trace import Trace


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nettrace", "network namespaces and kernel probes")
    group.addoption("--nettrace-btf", default=None, metavar="PATH",
                    help=f"kernel BTF used for CO-RE relocation (default {DEFAULT_BTF})")
    parser.addini("nettrace_btf", "kernel BTF used for CO-RE relocation", default=DEFAULT_BTF)
    parser.addini("nettrace_unavailable", "when probes cannot run (no root, no BTF): 'skip' the tests "
                  "that use the nettrace fixture, or 'error'", default="skip")
    parser.addini("nettrace_ringbuf_size", "bytes of the kernel->user event ring (power of two)",
                  default=str(DEFAULT_RINGBUF))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stock_kernel: needs what only stock distro kernels have "
                            "(kprobes, fentry, the dummy driver); run in the VM stage (ci/vm-test)")
    mode = config.getini("nettrace_unavailable")
    if mode not in ("skip", "error"):
        raise pytest.UsageError(f"nettrace_unavailable = {mode!r}: use 'skip' or 'error'")
    config.stash[_ENGINE] = EngineHolder(
        btf_path=config.getoption("nettrace_btf") or config.getini("nettrace_btf"),
        ringbuf_size=_ringbuf_size(config.getini("nettrace_ringbuf_size")),
        on_unavailable=mode)


def _ringbuf_size(raw: str) -> int:
    try:
        size = int(raw, 0)
    except ValueError:
        raise pytest.UsageError(f"nettrace_ringbuf_size = {raw!r} is not a number") from None
    if size < 4096 or size & (size - 1):
        raise pytest.UsageError(f"nettrace_ringbuf_size = {size}: must be a power of two >= 4096")
    return size


def pytest_unconfigure(config: pytest.Config) -> None:
    holder = config.stash.get(_ENGINE, None)
    if holder is not None:
        holder.close()


def pytest_sessionstart(session: pytest.Session) -> None:
    # Namespaces of runs that died (SIGKILLed worker, crash) are removed here.
    if os.geteuid() == 0:
        cleanup_stale()


def pytest_report_header(config: pytest.Config) -> list:
    lines = []
    holder: EngineHolder = config.stash[_ENGINE]
    k = features(holder.btf_path)
    lines.append(f"nettrace: kernel {platform.release()}: {k.summary()}")
    if os.geteuid() == 0:
        try:
            real = dummy_supported()
            lines.append("nettrace: dummy driver available" if real else
                         "nettrace: no dummy driver, add_dummy() uses a veth stand-in (kind 'veth-standin')")
        except OSError as exc:
            lines.append(f"nettrace: cannot probe the dummy driver ({exc})")
    engine, why = holder.try_get()
    if engine is None:
        lines.append(f"nettrace: probes unavailable: {why}")
    else:
        lines.append(f"nettrace: probes: {engine.describe()} (attached in {engine.attach_seconds * 1e3:.0f} ms)")
        for name, st in engine.status.items():
            for failure in st.failures:
                lines.append(f"nettrace:   {name}: fell back from {failure[:160]}")
    return lines


class EngineHolder:
    """The process's one Engine: loaded on first use, kept for the session."""

    def __init__(self, btf_path: str, ringbuf_size: int, on_unavailable: str) -> None:
        self.btf_path = btf_path
        self.ringbuf_size = ringbuf_size
        self.on_unavailable = on_unavailable
        self._engine: Optional[Engine] = None
        self._error: Optional[str] = None

    def try_get(self) -> "tuple[Optional[Engine], Optional[str]]":
        if self._engine is None and self._error is None:
            try:
                self._engine = Engine(btf_path=self.btf_path, ringbuf_size=self.ringbuf_size)
            except NettraceError as e:
                self._error = str(e)
        return self._engine, self._error

    def get(self) -> Engine:
        """The engine, or skip/fail the test with the one-line reason."""
        engine, why = self.try_get()
        if engine is None:
            msg = f"nettrace probes unavailable: {why}"
            if self.on_unavailable == "error":
                pytest.fail(msg, pytrace=False)
            pytest.skip(msg)
        return engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


_ENGINE = pytest.StashKey[EngineHolder]()


@pytest.fixture
def netns_factory() -> Iterator[NamespaceFactory]:
    """The factory behind `netns` and `make_netns`; removes all its namespaces after the test."""
    factory = NamespaceFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def netns(netns_factory: NamespaceFactory) -> Namespace:
    """A fresh network namespace, loopback up, removed after the test."""
    return netns_factory.create()


@pytest.fixture
def make_netns(netns_factory: NamespaceFactory) -> Callable[[], Namespace]:
    """`make_netns()` returns another fresh namespace; all are removed after the test."""
    return netns_factory.create


@pytest.fixture
def nettrace(request: pytest.FixtureRequest, netns_factory: NamespaceFactory) -> Iterator[Trace]:
    """Kernel events of this test: every namespace it creates through `netns` /
    `make_netns` is watched from its creation on; `nettrace.watch()` adds more."""
    engine = request.config.stash[_ENGINE].get()
    trace = Trace(engine, request.node.nodeid)
    for ns in netns_factory.namespaces:
        trace.watch(ns)
    netns_factory.add_listener(lambda ns: None if trace.closed else trace.watch(ns))
    request.node.stash[TRACE_KEY] = trace
    try:
        yield trace
    finally:
        trace.close()


TRACE_KEY = pytest.StashKey[Trace]()

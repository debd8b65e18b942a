"""The fallback mechanisms (fentry, kprobe) and the real dummy driver: only
stock kernels have them. Here they skip with the kernel's reason; ci/vm-test
runs them in a stock Debian kernel (`-m stock_kernel`)."""
from __future__ import annotations

import pytest

from pytest_nettrace.kernel.capabilities import features
from pytest_nettrace.kernel.engine import Engine
from pytest_nettrace.probes.registry import all_probes
from pytest_nettrace.netns import KIND_DUMMY, NamespaceFactory, dummy_supported
from pytest_nettrace.trace import Trace

from traffic import connect_refused, linger_abort

pytestmark = pytest.mark.stock_kernel

FALLBACKS = [("rst", "tp_btf+fentry", "fentry"), ("rst", "tp_btf+kprobe", "kprobe"),
             ("netchange", "fentry", "fentry"), ("netchange", "kprobe", "kprobe")]


def _engine_with(probe: str, mechanism: str, feature: str) -> Engine:
    k = features()
    if not getattr(k, feature):
        pytest.skip(f"NOT EXERCISED on this kernel: {probe} via {mechanism} needs {feature} "
                    f"({k.why(feature)}); ci/vm-test runs it on Debian 6.1 and 6.12 (ci/test.sh kernel matrix)")
    engine = Engine(probes=all_probes(), mechanisms={probe: mechanism}, background=False)
    assert engine.status[probe].mechanism == mechanism, engine.status[probe].failures
    return engine


@pytest.mark.parametrize("probe,mechanism,feature", FALLBACKS, ids=[f"{p}-{m}" for p, m, _ in FALLBACKS])
def test_fallback_mechanism_sees_real_events(probe, mechanism, feature):
    engine = _engine_with(probe, mechanism, feature)
    try:
        with NamespaceFactory() as f:
            ns = f.create()
            trace = Trace(engine, "fallback")
            trace.watch(ns)
            if probe == "rst":
                ns.run(connect_refused("127.0.0.1", 9), check=True)
                ev = trace.assert_rst(direction="sent", origin="reply", sport=9)
                assert ev.context == "softirq" and ev.pid is None
                lst = ns.socket()
                lst.bind(("127.0.0.1", 0))
                lst.listen()
                r = ns.run(linger_abort("127.0.0.1", lst.getsockname()[1]), check=True)
                assert trace.assert_rst(origin="active", direction="sent").pid == r.pid
                # one event per reset, not one per mechanism
                assert len(trace.rst(direction="sent", origin="reply", sport=9)) == 1
            else:
                ns.add_dummy("dummy0", "192.168.0.1/24", "2001::1/128")
                r = ns.run(["ip", "addr", "del", "192.168.0.1/24", "dev", "dummy0"], check=True)
                ev = trace.assert_address_deleted("192.168.0.1/24", dev="dummy0", by_pid=r.pid)
                assert ev.cause == "netlink" and ev.cmdline == "ip addr del 192.168.0.1/24 dev dummy0"
                r6 = ns.run(["ip", "link", "set", "dummy0", "down"], check=True)
                ev6 = trace.assert_address_deleted("2001::1/128")
                assert ev6.cause == "kernel" and ev6.pid == r6.pid
                # which link a request names is read from its system call: a veth's peer is not it
                ns.run(["ip", "link", "add", "v0", "type", "veth", "peer", "v1"], check=True)
                rv = ns.run(["ip", "link", "del", "v0"], check=True)
                gone = {e.dev: (e.cause, e.pid) for e in (trace.wait_for("link", action="deleted", dev=dev)
                                                          for dev in ("v0", "v1"))}
                assert gone == {"v0": ("netlink", rv.pid), "v1": ("kernel", rv.pid)}, gone
            trace.close()
    finally:
        engine.close()


def test_forcing_an_unavailable_mechanism_says_why():
    k = features()
    missing = next((f for f in ("kprobe", "fentry") if not getattr(k, f)), None)
    if missing is None:
        pytest.skip("this kernel has both kprobes and fentry: nothing unavailable to force")
    engine = Engine(probes=all_probes(), mechanisms={"rst": f"tp_btf+{missing}"}, background=False)
    try:
        why = engine.probe_available("rst")
        assert why and f"mechanism 'tp_btf+{missing}' forced but not possible" in why
    finally:
        engine.close()


def test_real_dummy_driver():
    if not dummy_supported():
        pytest.skip("NOT EXERCISED on this kernel: no dummy driver (no module, not built in); "
                    "ci/vm-test runs it on Debian 6.1 and 6.12 (ci/test.sh kernel matrix)")
    with NamespaceFactory() as f:
        ns = f.create()
        link = ns.add_dummy("dummy0", "192.168.0.1/24", "2001::1/128")
        assert link.kind == KIND_DUMMY
        got = {str(a) for a in ns.addresses("dummy0")}
        assert {"192.168.0.1/24", "2001::1/128"} <= got

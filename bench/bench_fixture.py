"""Fixture cost: the reference topology (bench_topology.py: 2 namespaces +
veth, IPv4+IPv6, up, torn down), and what the `nettrace` fixture adds to a
test that uses it but does nothing.

    sudo .venv/bin/python bench/bench_fixture.py [--quick]

Per-test overhead is measured two ways:
  * in-process: a Trace created, watching 0 or 2 namespaces, closed (what the
    fixture does around a test, the engine being attached once per session);
  * whole pytest runs: 200 empty tests using `nettrace` against 200 empty
    tests without it, in subprocesses (median of 3 each; the difference
    includes the one-time engine attach, also shown amortised-out).
Targets: topology <= 15 ms; per-test overhead <= 2 ms.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from _common import ROOT, median, need_root, p90, verdict
from bench_topology import build_and_tear_down

TOPOLOGY_MS, PER_TEST_MS = 15.0, 2.0


def topology(runs: int) -> float:
    for _ in range(10):
        build_and_tear_down()
    times = [build_and_tear_down() for _ in range(runs)]
    m = median(times)
    print(f"fixture: topology (2 netns + veth, v4+v6, up, torn down): median {m:.2f} ms, p90 {p90(times):.2f} ms "
          f"over {runs} runs; target <= {TOPOLOGY_MS:.0f} ms: {verdict(m <= TOPOLOGY_MS)}")
    return m


def trace_cycle(runs: int) -> float:
    from pytest_nettrace.engine import Engine
    from pytest_nettrace.netns import NamespaceFactory
    from pytest_nettrace.trace import Trace

    engine = Engine()
    try:
        bare = []
        for _ in range(runs):
            t0 = time.perf_counter()
            Trace(engine, "t").close()
            bare.append((time.perf_counter() - t0) * 1e3)
        watched = []
        with NamespaceFactory() as factory:
            a, b = factory.create(), factory.create()
            for _ in range(runs):
                t0 = time.perf_counter()
                tr = Trace(engine, "t")
                tr.watch(a)
                tr.watch(b)
                tr.close()
                watched.append((time.perf_counter() - t0) * 1e3)
    finally:
        engine.close()
    print(f"fixture: Trace create+close, nothing watched: median {median(bare):.3f} ms; "
          f"watching 2 namespaces (create, watch, close): median {median(watched):.2f} ms "
          f"(p90 {p90(watched):.2f}) over {runs} runs")
    return median(watched)


LOOP_TIMER = """
import time, pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session):
    t0 = time.perf_counter()
    yield
    with open("loop_seconds", "w") as f:
        f.write(repr(time.perf_counter() - t0))
"""


def pytest_runs(n: int, reps: int) -> float:
    """ms per test that `nettrace` adds, from the test loop's own timing
    (pytest startup, identical on both sides, is left out: it is noise here)."""
    with tempfile.TemporaryDirectory(prefix="nettrace-bench-") as d:
        with open(os.path.join(d, "pytest.ini"), "w") as f:
            f.write("[pytest]\n")
        with open(os.path.join(d, "conftest.py"), "w") as f:
            f.write(LOOP_TIMER)
        for name, arg in (("with", ", nettrace"), ("without", "")):
            with open(os.path.join(d, f"test_{name}.py"), "w") as f:
                f.write(f"import pytest\n\n@pytest.mark.parametrize('i', range({n}))\n"
                        f"def test_{name}(i{arg}):\n    pass\n")

        def run(target: str) -> tuple:
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                                target], cwd=d, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if r.returncode != 0:
                raise RuntimeError(f"pytest {target} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
            with open(os.path.join(d, "loop_seconds")) as f:
                return wall, float(f.read())

        with_, without = [], []
        for _ in range(reps):  # interleaved against load drift
            with_.append(run("test_with.py"))
            without.append(run("test_without.py"))
    loop_w, loop_wo = median(x[1] for x in with_), median(x[1] for x in without)
    wall_w, wall_wo = median(x[0] for x in with_), median(x[0] for x in without)
    per_test = (loop_w - loop_wo) / n * 1e3
    print(f"fixture: pytest, {n} empty tests, {reps} runs each: test loop with `nettrace` median {loop_w:.3f} s, "
          f"without {loop_wo:.3f} s (whole runs {wall_w:.2f} s vs {wall_wo:.2f} s; the engine attaches at "
          f"startup on both sides, for the header)")
    print(f"fixture: per-test overhead of `nettrace` (no namespace, nothing done): {per_test:.3f} ms")
    return per_test


def main() -> None:
    need_root()
    quick = "--quick" in sys.argv
    sys.path.insert(0, ROOT)
    topology(50 if quick else 200)
    cycle = trace_cycle(50 if quick else 200)
    per_test = pytest_runs(200, 3 if quick else 5)
    ok = per_test <= PER_TEST_MS
    print(f"fixture: per-test overhead target <= {PER_TEST_MS:.0f} ms: {verdict(ok)} "
          f"(pytest runs {per_test:.2f} ms/test; in-process Trace cycle {cycle:.2f} ms with 2 namespaces)")


if __name__ == "__main__":
    main()

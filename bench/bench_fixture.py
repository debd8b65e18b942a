"""Fixture cost: the reference topology (bench_topology.py: 2 namespaces +
veth, IPv4+IPv6, up, torn down), and what the `nettrace` fixture adds to a
test that makes two namespaces joined by a veth and asserts no RST.

    sudo .venv/bin/python bench/bench_fixture.py [--quick]
    sudo .venv/bin/python bench/bench_fixture.py --soak 1000   # only the whole runs, 1000 tests, one round
    sudo .venv/bin/python bench/bench_fixture.py --by-probe [--quick]   # what each probe adds per test

Per-test overhead is measured two ways:
  * in-process: a Trace created, watching 0 or 2 namespaces, closed (what the
    fixture does around a test, the engine being attached once per session);
  * whole pytest runs: 200 such tests with `nettrace` (every default probe)
    against the same 200 with `netns` only, in subprocesses, interleaved
    (median of 3 each): the test loop's time and CPU after the first test
    (the first also loads the probes and the kernel's symbol table, once per
    process: printed apart), RSS a quarter of the way and at the end (flat:
    no growth with the test count), and the time from the last test to the
    process's exit (no stall).
Targets: topology <= 15 ms; per test <= 3 ms, RSS flat, no exit stall.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from _common import ROOT, median, need_root, p90, result, verdict
from bench_topology import build_and_tear_down

TOPOLOGY_MS, PER_TEST_MS = 15.0, 3.0


def topology(runs: int) -> float:
    for _ in range(10):
        build_and_tear_down()
    times = [build_and_tear_down() for _ in range(runs)]
    m = median(times)
    print(f"fixture: topology (2 netns + veth, v4+v6, up, torn down): median {m:.2f} ms, p90 {p90(times):.2f} ms "
          f"over {runs} runs; target <= {TOPOLOGY_MS:.0f} ms: {verdict(m <= TOPOLOGY_MS)}")
    ip = ip_commands(max(5, runs // 5))
    print(f"fixture: the same with `ip` commands (kernel-selftests style): median {ip:.2f} ms")
    result("topology: 2 netns + veth, v4+v6, up, torn down (<= 15 ms)", f"{m:.1f} ms (p90 {p90(times):.1f})",
           f"`ip` commands {ip:.1f} ms", m <= TOPOLOGY_MS)
    return m


def ip_commands(runs: int) -> float:
    """The reference topology built and removed with `ip`, one command a step."""
    a, b = f"nt-bench-{os.getpid()}-a", f"nt-bench-{os.getpid()}-b"
    steps = [["netns", "add", a], ["netns", "add", b],
             ["link", "add", "veth0", "netns", a, "type", "veth", "peer", "name", "veth1", "netns", b],
             ["-n", a, "addr", "add", "10.0.0.1/24", "dev", "veth0"],
             ["-n", a, "addr", "add", "2001:db8::1/64", "dev", "veth0", "nodad"],
             ["-n", b, "addr", "add", "10.0.0.2/24", "dev", "veth1"],
             ["-n", b, "addr", "add", "2001:db8::2/64", "dev", "veth1", "nodad"],
             ["-n", a, "link", "set", "lo", "up"], ["-n", b, "link", "set", "lo", "up"],
             ["-n", a, "link", "set", "veth0", "up"], ["-n", b, "link", "set", "veth1", "up"],
             ["netns", "del", a], ["netns", "del", b]]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        try:
            for step in steps:
                subprocess.run(["ip", *step], check=True, capture_output=True)
        finally:  # ours only, by name, whatever failed
            for ns in (a, b):
                if os.path.exists(f"/run/netns/{ns}"):
                    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        times.append((time.perf_counter() - t0) * 1e3)
    return median(times)


def trace_cycle(runs: int) -> float:
    from pytest_nettrace.kernel.engine import Engine
    from pytest_nettrace.probes.registry import all_probes
    from pytest_nettrace.netns import NamespaceFactory
    from pytest_nettrace.trace import Trace

    engine = Engine(probes=all_probes())
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
import json, os, resource, time, pytest

def _rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

_seen = {"n": 0, "rss_quarter": None, "first": None}

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    _seen["n"] += 1
    if _seen["n"] == 1:  # the first test also loads the probes, once per process
        _seen["first"] = (time.perf_counter(), time.process_time())
    if _seen["n"] == max(1, item.session.testscollected // 4):
        _seen["rss_quarter"] = _rss_mib()

@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session):
    t0 = time.perf_counter()
    c0 = time.process_time()
    yield
    t1, c1 = time.perf_counter(), time.process_time()
    f0, fc0 = _seen["first"]
    with open("loop.json", "w") as f:
        json.dump({"seconds": t1 - t0, "cpu": c1 - c0, "first": f0 - t0, "first_cpu": fc0 - c0,
                   "steady": t1 - f0, "steady_cpu": c1 - fc0,
                   "rss_quarter": _seen["rss_quarter"], "rss_end": _rss_mib(), "end": time.time()}, f)
"""

# the README's pattern: two namespaces joined by a veth; "with" adds the
# nettrace fixture (every default probe) and one negative assertion
TEST = """import pytest

@pytest.mark.parametrize('i', range({n}))
def test_{name}(i, make_netns{arg}):
    a, b = make_netns(), make_netns()
    a.add_veth("eth0", b, "eth0", addresses=["10.0.0.1/24"], peer_addresses=["10.0.0.2/24"])
{body}"""


class _Runs:
    """A directory of generated tests (`TEST`, with and without `nettrace`)
    and the loop timer; `run` times one pytest process over one file."""

    def __init__(self, n: int) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="nettrace-bench-")
        self.dir = self._tmp.name
        with open(os.path.join(self.dir, "pytest.ini"), "w") as f:
            f.write("[pytest]\n")
        with open(os.path.join(self.dir, "conftest.py"), "w") as f:
            f.write(LOOP_TIMER)
        for name, arg, body in (("with", ", nettrace", "    nettrace.assert_no_rst()\n"),
                                ("without", "", "")):
            with open(os.path.join(self.dir, f"test_{name}.py"), "w") as f:
                f.write(TEST.format(n=n, name=name, arg=arg, body=body))

    def run(self, target: str, probes: "str | None" = None) -> dict:
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", target]
        if probes is not None:
            argv += ["--nettrace-probes", probes]
        t0 = time.perf_counter()
        r = subprocess.run(argv, cwd=self.dir, capture_output=True, text=True)
        wall, exited = time.perf_counter() - t0, time.time()
        if r.returncode != 0:
            raise RuntimeError(f"pytest {target} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        with open(os.path.join(self.dir, "loop.json")) as f:
            out = json.load(f)
        out["wall"], out["after_loop"] = wall, exited - out["end"]
        return out

    def __enter__(self) -> "_Runs":
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()


def pytest_runs(n: int, reps: int) -> dict:
    """What `nettrace` adds to a test with two namespaces and a veth, from the
    test loop's own timing (pytest startup, identical on both sides, is left
    out), with the process's CPU, its RSS a quarter of the way and at the end,
    and the time from the loop's end to the process's exit."""
    runs: dict = {"with": [], "without": []}
    with _Runs(n) as r:
        for _ in range(reps):  # interleaved against load drift
            runs["with"].append(r.run("test_with.py"))
            runs["without"].append(r.run("test_without.py"))
    m = {side: {k: median(r[k] for r in rs) for k in ("seconds", "cpu", "first", "first_cpu", "steady", "steady_cpu",
                                                       "rss_quarter", "rss_end", "after_loop", "wall")}
         for side, rs in runs.items()}
    w, wo = m["with"], m["without"]
    # per test: the loop after the first test (which also loads the probes
    # and the kernel's symbol table, once per process: start-up, shown apart)
    per_test = (w["steady"] - wo["steady"]) / (n - 1) * 1e3
    cpu_per_test = (w["steady_cpu"] - wo["steady_cpu"]) / (n - 1) * 1e3
    first = (w["first"] - wo["first"]) * 1e3
    whole = (w["wall"] - wo["wall"]) / n * 1e3
    for side in ("with", "without"):
        x = m[side]
        print(f"fixture: {n} tests (2 netns + veth) {side:7s} nettrace: loop {x['seconds']:.2f} s "
              f"(CPU {x['cpu']:.2f} s; first test {x['first'] * 1e3:.0f} ms), RSS {x['rss_quarter']:.0f} MiB at 1/4 "
              f"-> {x['rss_end']:.0f} MiB at the end, loop end to exit {x['after_loop'] * 1e3:.0f} ms, "
              f"whole run {x['wall']:.2f} s")
    print(f"fixture: per test, nettrace over netns only: {per_test:.2f} ms in the loop after the first test "
          f"(CPU {cpu_per_test:.2f} ms); the first test +{first:.0f} ms (loading the probes); "
          f"{whole:.2f} ms a test over the whole run (startup and exit included)")
    growth = w["rss_end"] - w["rss_quarter"]
    result("per test: 2 netns + veth + all probes vs netns only (<= 3 ms)",
           f"+{per_test:.1f} ms (CPU +{cpu_per_test:.1f}); first test +{first:.0f} ms; whole run +{whole:.1f} ms",
           f"netns only {wo['steady'] / (n - 1) * 1e3:.1f} ms/test", per_test <= PER_TEST_MS)
    result(f"RSS flat over {n} tests, no exit stall",
           f"+{growth:.0f} MiB (1/4 -> end), exit {w['after_loop'] * 1e3:.0f} ms",
           f"netns only: +{wo['rss_end'] - wo['rss_quarter']:.0f} MiB, exit {wo['after_loop'] * 1e3:.0f} ms",
           growth <= 0.1 * w["rss_end"] + 5 and w["after_loop"] - wo["after_loop"] <= 0.1)
    return m


def by_probe(n: int, reps: int) -> None:
    """What each probe costs per test, as what leaving it out saves: the
    same tests with every probe, with every probe but one, with the `rst`
    probe alone (the test asserts no RST: the trace's own floor), against
    `netns` only; CPU per test after the first, median of `reps` interleaved
    rounds. A figure, no goal: where the per-test cost is, and what a suite's
    `nettrace_probes` can save."""
    from pytest_nettrace.probes.registry import PROBES
    others = [p for p in PROBES if p != "rst"]
    configs = [("netns only", "test_without.py", None), ("all", "test_with.py", "all"),
               ("rst", "test_with.py", "rst")] + \
        [(p, "test_with.py", ",".join(q for q in PROBES if q != p)) for p in others]
    cpu: dict = {name: [] for name, _, _ in configs}
    with _Runs(n) as r:
        for _ in range(reps):
            for name, target, probes in configs:
                cpu[name].append(r.run(target, probes)["steady_cpu"] / (n - 1) * 1e3)
    ms = {name: median(v) for name, v in cpu.items()}
    base, every = ms["netns only"], ms["all"]
    saved = sorted(((every - ms[p], p) for p in others), reverse=True)
    print(f"by probe: {n} tests (2 netns + veth), CPU per test after the first, median of {reps}; "
          f"netns only {base:.2f} ms, every probe +{every - base:.2f} ms, rst alone +{ms['rst'] - base:.2f} ms")
    for d, p in saved:
        print(f"by probe:   without {p:<10} {d:+.2f} ms saved")
    print(f"by probe:   the savings add up to {sum(d for d, _ in saved):.2f} ms of the "
          f"{every - ms['rst']:.2f} ms every probe costs over rst alone")
    result("per test, by probe: CPU saved by leaving one out",
           ", ".join(f"{p} {d:.2f} ms" for d, p in saved[:4]),
           f"every probe +{every - base:.2f} ms, rst alone +{ms['rst'] - base:.2f} ms over netns only", None)


def main() -> None:
    need_root()
    quick = "--quick" in sys.argv
    sys.path.insert(0, ROOT)
    if "--soak" in sys.argv:  # issue 14's "1,000 such tests without memory growth or an exit stall"
        pytest_runs(int(sys.argv[sys.argv.index("--soak") + 1]), 1)
        return
    if "--by-probe" in sys.argv:
        by_probe(100 if quick else 200, 2 if quick else 3)
        return
    trace_cycle(50 if quick else 200)
    topology(50 if quick else 200)
    pytest_runs(100 if quick else 200, 2 if quick else 3)


if __name__ == "__main__":
    main()

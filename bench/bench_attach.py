"""Attach cost: every probe loaded and attached in-process (a fresh
`Engine(background=False)`, then `close()`); and from `exec` to every probe
attached (a new Python process importing the package, detecting the kernel's
features and attaching), against bpftrace attaching empty programs to the
same tracepoints (bench/_bpftrace.py) — time to attached and time to exit
apart: bpftrace's exit (detaching classic tracepoints) is slow, its attach
is what a user waits for.

    sudo .venv/bin/python bench/bench_attach.py [runs]

Kernel feature detection (`capabilities.features()`) runs once per process
and is cached, so it is timed on its own (first call), apart from attaching.
The fresh process runs with its bytecode compiled (as a pip-installed package
is; a checkout run with PYTHONDONTWRITEBYTECODE would compile every module on
every start, ~70 ms here), in a scratch PYTHONPYCACHEPREFIX, warmed by one
untimed run; it reports its own import, feature-detection and load+attach
times, and `python -c pass` in the same run gives the interpreter's floor.
The in-process figure is the plugin's way (the programs verified by as many
threads as the process has CPUs, up to 4); the same with one thread (one
libbpf object) runs interleaved with it, as its baseline, with the CPU each
takes. Target: attach median <= 30 ms. CO-RE relocation runs against the minimal
BTF made once per boot (pytest_nettrace/kernel/corebtf.py); that one-time cost and
the attach time against the full kernel BTF are printed apart.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import _bpftrace
from _common import median, need_root, p90, result

TARGET_MS, CLOSE_MS = 30.0, 10.0

ATTACH = ("import time; t0 = time.perf_counter(); "
          "from pytest_nettrace.kernel.engine import Engine; from pytest_nettrace.probes.registry import all_probes; "
          "from pytest_nettrace.kernel.capabilities import features; t1 = time.perf_counter(); features(); "
          "t2 = time.perf_counter(); e = Engine(probes=all_probes(), background=False); t3 = time.perf_counter(); "
          "print('attached', (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, flush=True); e.close()")


def exec_to_attached(runs: int) -> tuple:
    """(ms from exec to "attached", ms from exec to exit, [(import, features,
    load+attach) ms as the process timed them], ms of `python -c pass`) of
    fresh processes, interleaved with the bare interpreter's start."""
    attached, exited, parts, bare = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="nettrace-bench-pyc-") as pyc:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = pyc
        for i in range(runs + 1):
            t0 = time.perf_counter()
            p = subprocess.Popen([sys.executable, "-c", ATTACH], stdout=subprocess.PIPE, text=True, env=env)
            assert p.stdout is not None
            line = p.stdout.readline().split()
            t1 = time.perf_counter()
            p.communicate()
            if not line or line[0] != "attached" or p.returncode:
                raise RuntimeError(f"attach in a fresh process failed ({p.returncode})")
            t2 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
            t3 = time.perf_counter()
            if i == 0:
                continue  # the warm-up: bytecode written
            attached.append((t1 - t0) * 1e3)
            exited.append((t2 - t0) * 1e3)
            parts.append(tuple(float(x) for x in line[1:4]))
            bare.append((t3 - t2) * 1e3)
    return attached, exited, parts, bare


def bpftrace_runs(runs: int, program: str, wrapper: float) -> tuple:
    """(ms to attached, ms from SIGINT to exit), the private-mount wrapper's cost taken off."""
    attached, exits = [], []
    for _ in range(runs):
        p, ms = _bpftrace.start(program)
        attached.append(ms - wrapper)
        exits.append(_bpftrace.stop(p)[0])
    return attached, exits


def kernel_btf_parse_ms(n: int = 7) -> float:
    """What libbpf spends reading and parsing the kernel's whole BTF (~5 MB):
    once per libbpf object with tp_btf programs, to find each program's
    attach point (libbpf 1.1 takes it from nowhere else), so once per
    verifying thread. Median of n, in ms."""
    from pytest_nettrace.kernel.libbpf import libbpf
    lib = libbpf()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        btf = lib.btf__load_vmlinux_btf()
        times.append((time.perf_counter() - t) * 1e3)
        lib.btf__free(btf)
    return median(times)


def main() -> None:
    need_root()
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    from pytest_nettrace.kernel import capabilities
    from pytest_nettrace.kernel.engine import Engine
    from pytest_nettrace.probes.registry import all_probes
    t1 = time.perf_counter()
    capabilities.features()
    detect_ms = (time.perf_counter() - t1) * 1e3

    import os
    import tempfile
    from pytest_nettrace.kernel import corebtf
    from pytest_nettrace.kernel.capabilities import object_path
    with tempfile.TemporaryDirectory() as scratch:  # the once-per-boot cost, apart
        real_dir, corebtf.RUN_DIR = corebtf.RUN_DIR, scratch
        t = time.perf_counter()
        made = corebtf.prepare(object_path("nettrace.bpf.o"))
        core_ms = (time.perf_counter() - t) * 1e3
        corebtf.RUN_DIR = real_dir

    def timed(n: int, one_object: bool = False) -> tuple:
        """Engine() and close() n times; with the programs verified by one
        thread (one libbpf object) on every other run when one_object."""
        Engine(probes=all_probes(), background=False).close()  # warm: page cache, libbpf loaded, per-boot caches made
        attach, close, cpu, single, single_cpu, mech, threads = [], [], [], [], [], "", 1
        for i in range(n * (2 if one_object else 1)):
            alone = one_object and i % 2 == 1
            s, sc = time.perf_counter(), time.process_time()
            # as the plugin: with its drain thread
            engine = Engine(probes=all_probes(), load_parts=1 if alone else None)
            m, mc = time.perf_counter(), time.process_time()
            engine.close()
            e = time.perf_counter()
            (single if alone else attach).append((m - s) * 1e3)
            (single_cpu if alone else cpu).append((mc - sc) * 1e3)
            if not alone:
                close.append((e - m) * 1e3)
                mech = engine.describe()
                threads = engine.load_parts
        return attach, close, mech, cpu, single, single_cpu, threads

    os.environ["NETTRACE_FULL_BTF"] = "1"
    full = timed(max(5, runs // 2))[0]
    del os.environ["NETTRACE_FULL_BTF"]
    attach, close, mech, cpu, single, single_cpu, threads = timed(runs, one_object=True)
    ours_attached, ours_exited, parts, bare = exec_to_attached(max(5, runs // 2))
    why_not = _bpftrace.available()
    if why_not is None:
        tps = _bpftrace.engine_tracepoints()
        wrapper = _bpftrace.wrapper_ms()
        bt_attached, bt_exit = bpftrace_runs(5, _bpftrace.empty_program(tps), wrapper)

    btf_ms = kernel_btf_parse_ms()
    a, c = median(attach), median(close)
    print(f"attach: probes {mech}")
    # (this process's own import is not timed: it may run without bytecode; see the fresh process's below)
    print(f"attach: kernel feature detection (first call in this process; per boot: cached) {detect_ms:.1f} ms")
    print(f"attach: Engine() load+attach median {a:.1f} ms (p90 {p90(attach):.1f}; CPU {median(cpu):.1f} ms, "
          f"the programs verified by {threads} threads), close median {c:.1f} ms (p90 {p90(close):.1f}), over {runs} "
          f"runs; verified by one thread (one libbpf object), interleaved: median {median(single):.1f} ms "
          f"(CPU {median(single_cpu):.1f} ms)")
    print(f"attach: of it, libbpf reading the kernel's BTF for the tp_btf attach points, once per verifying "
          f"thread: {btf_ms:.1f} ms (the rest: the kernel's verifier, maps, links)")
    if made:
        print(f"attach: CO-RE against the minimal BTF (made and checked once per boot: {core_ms:.0f} ms); "
              f"against the full kernel BTF: median {median(full):.1f} ms")
    else:
        print("attach: no minimal BTF (bpftool missing or check failed): full kernel BTF used")
    oa = median(ours_attached)
    print(f"attach: exec to every probe attached (fresh Python process): median {oa:.0f} ms, "
          f"to exit {median(ours_exited):.0f} ms, over {len(ours_attached)} runs; of it, as the process "
          f"timed it: import {median(p[0] for p in parts):.0f} ms, feature detection "
          f"{median(p[1] for p in parts):.0f} ms, load+attach {median(p[2] for p in parts):.0f} ms; "
          f"`python -c pass` {median(bare):.0f} ms")
    if why_not is None:
        ba = median(bt_attached)
        print(f"attach: bpftrace, empty programs on the same {len(tps)} tracepoints: exec to attached median "
              f"{ba:.0f} ms (private-mount wrapper's {wrapper:.0f} ms taken off), SIGINT to exit median "
              f"{median(bt_exit):.0f} ms")
        baseline, ok = f"bpftrace {ba:.0f} ms (exit {median(bt_exit):.0f} ms)", oa <= ba
    else:
        baseline, ok = f"bpftrace: {why_not}", None
    result("exec to all probes attached (<= bpftrace's attach)", f"{oa:.0f} ms", baseline, ok)
    result("in-process attach, Engine() (<= 30 ms)", f"{a:.1f} ms ({threads} threads verifying)",
           (f"full BTF {median(full):.1f} ms; " if made else "") + f"one thread {median(single):.1f} ms; "
           f"libbpf's parse of the kernel BTF {btf_ms:.1f} ms a thread",
           a <= TARGET_MS)
    result("Engine.close() (<= 10 ms)", f"{c:.1f} ms", "-", c <= CLOSE_MS)


if __name__ == "__main__":
    main()

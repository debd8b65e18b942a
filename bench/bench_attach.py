"""Attach cost: every probe loaded and attached in-process (a fresh
`Engine(background=False)`, then `close()`), against bpftrace attaching the
same tracepoints and exiting.

    sudo .venv/bin/python bench/bench_attach.py [runs]

Kernel feature detection (`capabilities.features()`) runs once per process
and is cached, so it is timed on its own (first call), apart from attaching.
Target: attach median <= 30 ms. CO-RE relocation runs against the minimal
BTF made once per boot (pytest_nettrace/corebtf.py); that one-time cost and
the attach time against the full kernel BTF are printed apart.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

from _common import median, need_root, p90, verdict

BPFTRACE = ("tracepoint:tcp:tcp_send_reset, tracepoint:tcp:tcp_receive_reset, "
            "tracepoint:sock:sk_data_ready { } BEGIN { exit(); }")
TARGET_MS = 30.0


def bpftrace_runs(runs: int) -> list:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(["bpftrace", "-e", BPFTRACE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    need_root()
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    t0 = time.perf_counter()
    from pytest_nettrace import capabilities
    from pytest_nettrace.engine import Engine
    t1 = time.perf_counter()
    capabilities.features()
    detect_ms = (time.perf_counter() - t1) * 1e3
    import_ms = (t1 - t0) * 1e3

    import os
    import tempfile
    from pytest_nettrace import corebtf
    from pytest_nettrace.capabilities import object_path
    with tempfile.TemporaryDirectory() as scratch:  # the once-per-boot cost, apart
        real_dir, corebtf.RUN_DIR = corebtf.RUN_DIR, scratch
        t = time.perf_counter()
        made = corebtf.prepare(object_path("nettrace.bpf.o"))
        core_ms = (time.perf_counter() - t) * 1e3
        corebtf.RUN_DIR = real_dir

    def timed(n: int) -> tuple:
        Engine(background=False).close()  # warm: page cache, libbpf loaded, per-boot caches made
        attach, close, mech = [], [], ""
        for _ in range(n):
            s = time.perf_counter()
            engine = Engine(background=False)
            m = time.perf_counter()
            engine.close()
            e = time.perf_counter()
            attach.append((m - s) * 1e3)
            close.append((e - m) * 1e3)
            mech = engine.describe()
        return attach, close, mech

    os.environ["NETTRACE_FULL_BTF"] = "1"
    full, _, _ = timed(max(5, runs // 2))
    del os.environ["NETTRACE_FULL_BTF"]
    attach, close, mech = timed(runs)
    bt = bpftrace_runs(5) if shutil.which("bpftrace") else []

    a = median(attach)
    print(f"attach: probes {mech}")
    print(f"attach: import {import_ms:.1f} ms, kernel feature detection (first call, cached after) {detect_ms:.1f} ms")
    print(f"attach: Engine() load+attach median {a:.1f} ms (p90 {p90(attach):.1f}), close median "
          f"{median(close):.1f} ms, over {runs} runs")
    if made:
        print(f"attach: CO-RE against the minimal BTF (made and checked once per boot: {core_ms:.0f} ms); "
              f"against the full kernel BTF: median {median(full):.1f} ms")
    else:
        print("attach: no minimal BTF (bpftool missing or check failed): full kernel BTF used")
    if bt:
        b = median(bt)
        print(f"attach: bpftrace same tracepoints, start to exit: median {b:.0f} ms over {len(bt)} runs "
              f"-> in-process attach is {b / a:.0f}x faster")
    else:
        print("attach: bpftrace not installed, no comparison")
    print(f"attach: target <= {TARGET_MS:.0f} ms: {verdict(a <= TARGET_MS)} ({a:.1f} ms)")


if __name__ == "__main__":
    main()

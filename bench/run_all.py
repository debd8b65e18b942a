"""Run every benchmark, one after the other, then print one table: each goal
of issue 14, the figure measured, the baseline measured in the same run, and
the verdict.

    sudo .venv/bin/python bench/run_all.py            # everything (~9 min)
    sudo .venv/bin/python bench/run_all.py --quick    # fewer runs, no suite scaling or per-probe split (~4 min)
    sudo .venv/bin/python bench/run_all.py attach conn   # a subset, by name

Figures depend on the machine and on its load: the machine line comes first
and last. Each script prints its details as it goes; its table rows are the
lines it prints as `RESULT {json}`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from _common import machine, need_root

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = {
    "fixture": ["bench_fixture.py"],
    "probes": ["bench_fixture.py", "--by-probe"],
    "conn": ["bench_conn.py"],
    "host": ["bench_host.py"],
    "overhead": ["bench_overhead.py"],
    "events": ["bench_events.py"],
    "attach": ["bench_attach.py"],
    "suite": ["bench_suite.py"],
}
QUICK = {"attach": ["10"], "events": ["--quick"], "overhead": ["4", "2"], "fixture": ["--quick"], "probes": ["--quick"],
         "conn": ["3", "1.5"], "host": ["3"]}


def table(rows: list) -> str:
    head = ("goal", "figure", "baseline (same run)", "verdict")
    cells = [head] + [(r["goal"], r["figure"], r["baseline"], r["verdict"]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(4)).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> int:
    need_root()
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    quick = "--quick" in sys.argv
    names = args or [n for n in BENCHES if not (quick and n in ("suite", "probes"))]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        sys.exit(f"run_all: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    print(f"machine: {machine()}", flush=True)
    failed, rows = [], []
    for name in names:
        argv = [sys.executable, os.path.join(HERE, BENCHES[name][0]), *BENCHES[name][1:],
                *(QUICK.get(name, []) if quick else [])]
        t0, c0 = time.perf_counter(), os.times()
        with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as p:
            for line in p.stdout:
                if line.startswith("RESULT "):
                    rows.append(json.loads(line[7:]))
                else:
                    print(line, end="", flush=True)
        c1 = os.times()
        cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
        print(f"({name}: {time.perf_counter() - t0:.0f} s wall, {cpu:.0f} s CPU)", flush=True)
        if p.returncode:
            failed.append(name)
            rows.append({"goal": f"{name}: the benchmark failed", "figure": f"exit {p.returncode}",
                         "baseline": "-", "verdict": "FAILED"})
    print()
    print(table(rows))
    print(f"machine after: {machine()}")
    if failed:
        print(f"run_all: failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Suite scaling: the plugin's own tests under `-n 1` vs `-n 2` (pytest-xdist).

    sudo .venv/bin/python bench/bench_suite.py [extra pytest args]

The long reliability variants only run with --nettrace-long, so they are out.
Other people's test runs on the same machine skew these figures the most.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from _common import ROOT, need_root


def run(workers: int, extra: list) -> tuple:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "tests/", "-q", "-p", "no:cacheprovider",
                        "-n", str(workers), *extra], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in r.stdout.splitlines() if re.search(r"\b(passed|failed|error)", ln)]
    # a failure in a timing run is news too: name it
    failed = [ln for ln in r.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
    for ln in failed:
        print(f"suite:   -n {workers}: {ln}")
    return wall, (lines[-1].strip("= ") if lines else f"exit {r.returncode}")


def main() -> None:
    need_root()
    extra = sys.argv[1:]
    results = {}
    for n in (1, 2):
        results[n] = run(n, extra)
        print(f"suite: pytest tests/ -n {n}: {results[n][0]:.1f} s ({results[n][1]})")
    print(f"suite: -n 2 speedup over -n 1: {results[1][0] / results[2][0]:.2f}x on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()

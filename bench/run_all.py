"""Run every benchmark, one after the other, and print their figures.

    sudo .venv/bin/python bench/run_all.py            # everything (~5 min)
    sudo .venv/bin/python bench/run_all.py --quick    # fewer runs, no suite scaling (~1 min)
    sudo .venv/bin/python bench/run_all.py attach events   # a subset, by name

Figures depend on the machine and on its load: the machine line comes first.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from _common import machine, need_root

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = {
    "attach": ["bench_attach.py"],
    "events": ["bench_events.py"],
    "overhead": ["bench_overhead.py"],
    "fixture": ["bench_fixture.py"],
    "suite": ["bench_suite.py"],
}
QUICK = {"attach": ["10"], "events": ["--quick"], "overhead": ["3", "2"], "fixture": ["--quick"]}


def main() -> int:
    need_root()
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    quick = "--quick" in sys.argv
    names = args or [n for n in BENCHES if not (quick and n == "suite")]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        sys.exit(f"run_all: unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    print(f"machine: {machine()}", flush=True)
    failed = []
    for name in names:
        argv = [sys.executable, os.path.join(HERE, BENCHES[name][0]), *(QUICK.get(name, []) if quick else [])]
        t0 = time.perf_counter()
        rc = subprocess.run(argv).returncode
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
        if rc:
            failed.append(name)
    print(f"machine after: {machine()}")
    if failed:
        print(f"run_all: failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared by the benchmark scripts: root check, medians, the machine line."""
from __future__ import annotations

import os
import platform
import statistics
import sys
from typing import Iterable, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def need_root() -> None:
    if os.geteuid() != 0:
        sys.exit(f"{os.path.basename(sys.argv[0])}: needs root (BPF and namespaces): run with sudo")


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def p90(values: Iterable[float]) -> float:
    v: List[float] = sorted(values)
    return v[max(0, int(len(v) * 0.9) - 1)]


def machine() -> str:
    """One line: kernel, CPUs, memory, load — benchmark figures depend on all four."""
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) // (1 << 20)
    except (OSError, ValueError, IndexError):
        pass
    load = os.getloadavg()[0]
    return (f"Linux {platform.release()}, {os.cpu_count()} x {cpu}, {mem} GiB, "
            f"Python {platform.python_version()}, load {load:.2f}")


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def result(goal: str, figure: str, baseline: str, ok: "bool | None") -> None:
    """One row of run_all.py's table (ok None: no verdict, a figure only)."""
    import json
    print("RESULT " + json.dumps({"goal": goal, "figure": figure, "baseline": baseline,
                                  "verdict": "-" if ok is None else verdict(ok)}), flush=True)

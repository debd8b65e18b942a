"""bpftrace as the baseline tracer: empty programs on the tracepoints the
engine's probes use.

The engine attaches `tp_btf` programs, which need no tracefs. bpftrace (as
packaged, 0.17) attaches classic tracepoints, which it finds in tracefs; on a
machine where tracefs is not mounted it is run in a private mount namespace
(`unshare -m`, propagation private) with tracefs mounted there only: the
host's mount table is never changed, and the mount goes with the process.
That wrapper's own cost is measured (`wrapper_ms`) and taken off bpftrace's
times.
"""
from __future__ import annotations

import os
import signal
import shutil
import subprocess
import time
from typing import List, Optional, Tuple

TRACEFS = "/sys/kernel/tracing"


def available() -> Optional[str]:
    """None when bpftrace can run here, else why not."""
    if not shutil.which("bpftrace"):
        return "bpftrace not installed"
    if not shutil.which("unshare"):
        return "unshare (util-linux) not installed"
    return None


def _tracefs_mounted() -> bool:
    return os.path.exists(os.path.join(TRACEFS, "events"))


def argv(program: str) -> List[str]:
    """bpftrace -e PROGRAM, line-buffered, with tracefs at hand."""
    return _with_tracefs(["bpftrace", "-B", "line", "-e", program])


def _with_tracefs(cmd: List[str]) -> List[str]:
    if _tracefs_mounted():
        return cmd
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount -t tracefs nodev {TRACEFS} && exec "$@"', "sh", *cmd]


def wrapper_ms(runs: int = 5) -> float:
    """What the private-mount wrapper alone costs (0 when tracefs is mounted)."""
    if _tracefs_mounted():
        return 0.0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(_with_tracefs(["true"]), check=True)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def engine_tracepoints() -> List[str]:
    """category:name of every tracepoint the default engine attaches (tp_btf
    programs), found in tracefs inside the same kind of private mount."""
    from _hooks import engine_hooks
    names = sorted(set(engine_hooks()))
    script = " ".join(f"ls -d {TRACEFS}/events/*/{n};" for n in names)
    if _tracefs_mounted():
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout
    else:
        out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                              f"mount -t tracefs nodev {TRACEFS} && {script}"],
                             capture_output=True, text=True).stdout
    found = []
    for line in out.split():
        parts = line.rstrip("/").split("/")
        found.append(f"{parts[-2]}:{parts[-1]}")
    missing = set(names) - {f.split(":")[1] for f in found}
    if missing:
        raise RuntimeError(f"tracepoints not found in tracefs: {', '.join(sorted(missing))}")
    return found


def empty_program(tracepoints: List[str]) -> str:
    """Empty actions on every tracepoint; a line once everything is attached
    (bpftrace fires BEGIN after attaching the other probes)."""
    probes = ", ".join(f"tracepoint:{tp}" for tp in tracepoints)
    return f'{probes} {{ }} BEGIN {{ printf("attached\\n"); }}'


def start(program: str) -> Tuple[subprocess.Popen, float]:
    """bpftrace running PROGRAM, and ms from exec to its "attached" line."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv(program), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        if line.strip() == "attached":
            return p, (time.perf_counter() - t0) * 1e3
    p.wait()
    raise RuntimeError(f"bpftrace exited ({p.returncode}) before attaching: {program[:120]}")


def stop(p: subprocess.Popen) -> Tuple[float, float]:
    """(ms from SIGINT to exit, CPU seconds bpftrace used over its life)."""
    t0 = time.perf_counter()
    while True:
        # again every 0.5 s: a SIGINT landing just before bpftrace blocks in
        # its event loop is not noticed until the next event. os.kill, not
        # send_signal: that polls first, reaping an exited bpftrace before
        # wait4 could read its CPU (ChildProcessError); unreaped, the pid
        # stays this one's
        os.kill(p.pid, signal.SIGINT)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            pid, _, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.005)
        if pid:
            break
    p.returncode = 0
    p.stdout.close()
    return (time.perf_counter() - t0) * 1e3, ru.ru_utime + ru.ru_stime

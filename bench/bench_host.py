"""What an attached engine costs the host's other processes: CPU per
syscall of a process in the host's namespace (not watched), with no engine,
with the engine attached and nothing watched, and with the engine attached
and one (other) namespace watched, interleaved; medians.

    sudo .venv/bin/python bench/bench_host.py [rounds]

Two workloads: `dd bs=1` (read/write: syscalls no probe wants) and a Python
loop of getsockopt (one the syscall probe records when the caller's
namespace is watched). The engine's `sys_enter`/`sys_exit` programs run for
every syscall on the host, whatever the namespace.
"""
from __future__ import annotations

import subprocess
import sys

from _common import median, need_root, result

N_DD = 500_000            # bytes: 2 syscalls each
N_SOCKOPT = 300_000
SOCKOPT = ("import socket, sys\ns = socket.socket()\ng = s.getsockopt\n"
           "for _ in range(int(sys.argv[1])):\n    g(socket.SOL_SOCKET, socket.SO_TYPE)\n")


def cpu_of(argv) -> float:
    """CPU seconds the child used."""
    import os
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = status
    return ru.ru_utime + ru.ru_stime


def workloads() -> dict:
    return {
        "dd": (cpu_of(["dd", "if=/dev/zero", "of=/dev/null", "bs=1", f"count={N_DD}"]), 2 * N_DD),
        "getsockopt": (cpu_of([sys.executable, "-c", SOCKOPT, str(N_SOCKOPT)]), N_SOCKOPT),
    }


def main() -> None:
    need_root()
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    from pytest_nettrace.kernel.engine import Engine
    from pytest_nettrace.probes.registry import all_probes
    from pytest_nettrace.netns import NamespaceFactory
    from pytest_nettrace.trace import Trace

    modes = ("none", "idle", "watching")
    ns_per = {m: {"dd": [], "getsockopt": []} for m in modes}
    with NamespaceFactory() as factory:
        other = factory.create()
        workloads()  # warm
        for i in range(rounds):
            for mode in modes[i % 3:] + modes[:i % 3]:
                engine = trace = None
                if mode != "none":
                    engine = Engine(probes=all_probes())
                    if mode == "watching":
                        trace = Trace(engine, "host")
                        trace.watch(other)
                try:
                    for name, (cpu, calls) in workloads().items():
                        ns_per[mode][name].append(cpu / calls * 1e9)
                finally:
                    if trace is not None:
                        trace.close()
                    if engine is not None:
                        engine.close()
    print(f"host: CPU per syscall of a process outside the watched namespaces, {rounds} interleaved rounds")
    extra = {}
    for name in ("dd", "getsockopt"):
        base = median(ns_per["none"][name])
        for m in ("idle", "watching"):
            extra[(m, name)] = median(ns_per[m][name]) - base
        print(f"host: {name:10s} none {base:6.0f} ns/syscall; engine attached, nothing watched "
              f"+{extra[('idle', name)]:.0f} ns; one other namespace watched +{extra[('watching', name)]:.0f} ns")
    result("host's other processes: CPU per syscall added",
           f"read/write +{extra[('idle', 'dd')]:.0f} ns idle, +{extra[('watching', 'dd')]:.0f} ns watching; "
           f"getsockopt +{extra[('idle', 'getsockopt')]:.0f}/+{extra[('watching', 'getsockopt')]:.0f} ns",
           f"none: {median(ns_per['none']['dd']):.0f} / {median(ns_per['none']['getsockopt']):.0f} ns", None)


if __name__ == "__main__":
    main()

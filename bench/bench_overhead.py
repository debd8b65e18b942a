"""Overhead on the traced traffic: TCP throughput (iperf3) between two
namespaces joined by a veth, with every probe attached and both namespaces
watched, against no probes at all. Runs alternate (with, without, with, ...)
so drifting machine load hits both sides alike; medians are compared.

    sudo .venv/bin/python bench/bench_overhead.py [pairs] [seconds]

Target: throughput with probes >= 97 % of without.
"""
from __future__ import annotations

import json
import shutil
import sys
import time

from _common import median, need_root, result, verdict

TARGET = 0.97


def iperf(server, client, addr: str, seconds: float) -> float:
    """Gbit/s received by the server in one iperf3 run."""
    srv = server.popen(["iperf3", "-s", "-1", "-B", addr], stdout=-1, stderr=-1, text=True)
    try:
        for _ in range(100):  # until the server listens
            r = client.run(["iperf3", "-c", addr, "-t", f"{seconds:g}", "-J"], timeout=seconds + 30)
            if r.returncode == 0:
                received = json.loads(r.stdout).get("end", {}).get("sum_received")
                if received:  # a run against a server still starting has no summary
                    return received["bits_per_second"] / 1e9
            time.sleep(0.02)
        raise RuntimeError(f"iperf3 client failed: {r.stderr.strip() or r.stdout[-300:]}")
    finally:
        try:
            srv.wait(5)
        except Exception:
            srv.kill()
            srv.wait()


def main() -> None:
    need_root()
    if not shutil.which("iperf3"):
        sys.exit("bench_overhead: iperf3 not installed")
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
    from pytest_nettrace.kernel.engine import Engine
    from pytest_nettrace.probes.registry import all_probes
    from pytest_nettrace.netns import NamespaceFactory
    from pytest_nettrace.trace import Trace

    with NamespaceFactory() as factory:
        a, b = factory.create(), factory.create()
        a.add_veth("veth0", b, "veth1", ["10.0.0.1/24"], ["10.0.0.2/24"])
        iperf(b, a, "10.0.0.2", 1.0)  # warm up (ARP, page cache)
        with_probes, without = [], []
        events = 0
        for i in range(pairs):
            for traced in ((True, False) if i % 2 == 0 else (False, True)):
                if traced:
                    engine = Engine(probes=all_probes())
                    trace = Trace(engine, "overhead")
                    trace.watch(a)
                    trace.watch(b)
                    try:
                        with_probes.append(iperf(b, a, "10.0.0.2", seconds))
                        events += len(trace.events())
                    finally:
                        trace.close()
                        engine.close()
                else:
                    without.append(iperf(b, a, "10.0.0.2", seconds))
    w, wo = median(with_probes), median(without)
    ratio = w / wo
    print(f"overhead: iperf3 TCP over veth between 2 namespaces, {seconds:g} s runs, {pairs} alternating pairs")
    print(f"overhead: without probes median {wo:.2f} Gbit/s ({', '.join(f'{x:.2f}' for x in without)})")
    print(f"overhead: with all probes + both namespaces watched median {w:.2f} Gbit/s "
          f"({', '.join(f'{x:.2f}' for x in with_probes)}); {events} events recorded")
    result(f"bulk TCP throughput, all probes vs none (>= 0.97x, {pairs} pairs)", f"{ratio:.2f}x",
           f"none {wo:.1f} Gbit/s (runs {min(without):.1f}-{max(without):.1f})", ratio >= TARGET)
    print(f"overhead: with/without = {ratio * 100:.1f} %; target >= {TARGET * 100:.0f} %: {verdict(ratio >= TARGET)}")


if __name__ == "__main__":
    main()

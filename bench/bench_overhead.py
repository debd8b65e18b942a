"""Overhead on the traced traffic: TCP throughput (iperf3) between two
namespaces joined by a veth, with every probe attached and both namespaces
watched, against no probes at all; beside them, in the same run, two other
observers of the same traffic: tcpdump capturing each namespace's veth to
a file (as the packet capture does: 10,000 packets each, 4,096 bytes a
packet, kept, then it stops), and bpftrace with *empty* programs on the engine's tracepoints
(bench/_bpftrace.py); every probe but the packet capture, to split the
cost; and the floor of attaching at all: an empty program on each tp_btf
hook the engine uses (bench/_hooks.py). Modes rotate round by round (none, probes, nocapture, tcpdump,
bpftrace; then probes, nocapture, ...) so drifting machine load hits all
alike; medians are compared.

    sudo .venv/bin/python bench/bench_overhead.py [rounds] [seconds]

Target: probes >= 0.97 x the throughput of none. Both ends of iperf3 are
CPU-bound (a veth has no wire: each byte costs CPU only), so every
CPU-millisecond a tracer spends comes off the throughput; on a shared
machine the wall throughput swings with other people's load, so the verdict
is taken on bytes per CPU-second (iperf3's two processes, with the softirq
work the kernel charges them, plus the tracer's own CPU during the run) and
the wall ratio is printed next to it.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import _bpftrace
import _hooks
from _common import median, need_root, result, verdict

TARGET = 0.97
CAPTURE_CAP = "10000"   # packets per namespace, as probes/packet.py's MAX_PACKETS
CAPTURE_SNAPLEN = "4096"  # as probes/packet.py's SNAPLEN


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


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _proc_cpu(pid: int) -> float:
    """CPU seconds of a running (or exited, not yet reaped) process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _reap(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
    p.wait()


def main() -> None:
    need_root()
    if not shutil.which("iperf3"):
        sys.exit("bench_overhead: iperf3 not installed")
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
    from pytest_nettrace.kernel.engine import Engine
    from pytest_nettrace.probes.registry import all_probes
    from pytest_nettrace.netns import NamespaceFactory
    from pytest_nettrace.trace import Trace

    why_not = _bpftrace.available()
    tps = _bpftrace.engine_tracepoints() if why_not is None else []
    hooks = _hooks.engine_hooks()   # "hooks": the floor, empty programs on the engine's own tp_btf hooks
    modes = (["none", "probes", "nocapture", "hooks"] + (["tcpdump"] if shutil.which("tcpdump") else [])
             + (["bpftrace"] if tps else []))
    gbit = {m: [] for m in modes}
    cpu_gb = {m: [] for m in modes}   # CPU seconds per GB received
    events = 0
    with NamespaceFactory() as factory, tempfile.TemporaryDirectory(prefix="nettrace-bench-") as tmp:
        a, b = factory.create(), factory.create()
        a.add_veth("veth0", b, "veth1", ["10.0.0.1/24"], ["10.0.0.2/24"])
        iperf(b, a, "10.0.0.2", 1.0)  # warm up (ARP, page cache)
        for i in range(rounds):
            order = modes[i % len(modes):] + modes[:i % len(modes)]
            for mode in order:
                tracers = []
                engine = trace = None
                if mode in ("probes", "nocapture"):
                    engine = Engine(probes=[p for p in all_probes() if mode == "probes" or p.name != "packet"])
                    trace = Trace(engine, "overhead")
                    trace.watch(a)
                    trace.watch(b)
                elif mode == "tcpdump":
                    for ns, dev in ((a, "veth0"), (b, "veth1")):
                        argv = ["tcpdump", "-i", dev, "-n", "-Z", "root", "-s", CAPTURE_SNAPLEN, "-c", CAPTURE_CAP,
                                "-w", os.path.join(tmp, f"{dev}.pcap")]
                        p = ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                        p.stderr.readline()  # "listening on ...": capturing
                        tracers.append(p)
                elif mode == "bpftrace":
                    tracers.append(_bpftrace.start(_bpftrace.empty_program(tps))[0])
                empty = _hooks.EmptyPrograms(hooks) if mode == "hooks" else None
                try:
                    t0 = [_proc_cpu(p.pid) for p in tracers]
                    c0, s0 = _children_cpu(), time.process_time()
                    g = iperf(b, a, "10.0.0.2", seconds)
                    c1, s1 = _children_cpu(), time.process_time()
                    # the tracer's CPU during the run: the drain thread here, the tracers' processes there
                    tracer = sum(_proc_cpu(p.pid) for p in tracers) - sum(t0) + (s1 - s0)
                    if trace is not None:
                        events += len(trace.events())
                finally:
                    if empty is not None:
                        empty.close()
                    if trace is not None:
                        trace.close()
                    if engine is not None:
                        engine.close()
                    for p in tracers:
                        if mode == "bpftrace":
                            _bpftrace.stop(p)
                        else:
                            _reap(p)
                            p.stderr.close()
                    for dev in ("veth0", "veth1") if mode == "tcpdump" else ():
                        path = os.path.join(tmp, f"{dev}.pcap")
                        if os.path.getsize(path) < 10 << 20:  # 10,000 packets, many of them full slots
                            raise RuntimeError(f"tcpdump kept only {os.path.getsize(path)} bytes on {dev}")
                        os.unlink(path)
                gbit[mode].append(g)
                cpu_gb[mode].append(((c1 - c0) + tracer) / (g * seconds / 8))
    wo = median(gbit["none"])

    def wall(mode: str) -> float:
        return median(gbit[mode]) / wo

    def per_cpu(mode: str) -> float:
        return median(cpu_gb["none"]) / median(cpu_gb[mode])

    print(f"overhead: iperf3 TCP over veth between 2 namespaces, {seconds:g} s runs, {rounds} rounds, interleaved")
    for m in modes:
        print(f"overhead: {m:9s} median {median(gbit[m]):6.2f} Gbit/s ({wall(m):.2f}x), "
              f"CPU {median(cpu_gb[m]) * 1e3:5.0f} ms/GB ({per_cpu(m):.2f}x)  "
              f"(runs: {', '.join(f'{x:.1f}' for x in gbit[m])})")
    print(f"overhead: {events} events recorded with probes (all, and all but the capture)")
    ratio = per_cpu("probes")
    parts = [f"all but the packet capture {per_cpu('nocapture'):.2f}x (wall {wall('nocapture'):.2f}x)",
             f"the engine's {len(hooks)} tp_btf hooks with empty programs {per_cpu('hooks'):.2f}x"]
    if "tcpdump" in gbit:
        parts.append(f"tcpdump on both veths {per_cpu('tcpdump'):.2f}x (wall {wall('tcpdump'):.2f}x)")
    if tps:
        parts.append(f"bpftrace empty ({len(tps)} tps) {per_cpu('bpftrace'):.2f}x (wall {wall('bpftrace'):.2f}x)")
    else:
        parts.append(f"bpftrace: {why_not}")
    parts.append(f"none {wo:.1f} Gbit/s, {median(cpu_gb['none']) * 1e3:.0f} ms CPU/GB")
    result(f"bulk TCP throughput per CPU-second, all probes vs none (>= 0.97x, {rounds} rounds)",
           f"{ratio:.2f}x (wall {wall('probes'):.2f}x)", "; ".join(parts), ratio >= TARGET)
    print(f"overhead: probes/none = {ratio * 100:.1f} % per CPU-second, {wall('probes') * 100:.1f} % wall; "
          f"target >= {TARGET * 100:.0f} %: {verdict(ratio >= TARGET)}")


if __name__ == "__main__":
    main()

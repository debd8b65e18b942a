"""Time the reference topology: two namespaces joined by a veth pair with
IPv4 and IPv6 addresses, up, then torn down. Prints median and p90.

    python bench/bench_topology.py [runs]

Needs root. Target: median <= 15 ms.
"""

from __future__ import annotations

import statistics
import sys
import time

from pytest_nettrace.netns import NamespaceFactory


def build_and_tear_down() -> float:
    start = time.perf_counter()
    factory = NamespaceFactory()
    a, b = factory.create(), factory.create()
    a.add_veth("veth0", b, "veth1", ["10.0.0.1/24", "2001:db8::1/64"], ["10.0.0.2/24", "2001:db8::2/64"])
    factory.close()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    for _ in range(10):  # warm up imports, caches and the /run/netns mount
        build_and_tear_down()
    times = sorted(build_and_tear_down() for _ in range(runs))
    median = statistics.median(times)
    p90 = times[int(len(times) * 0.9) - 1]
    print(f"topology (2 netns + veth, IPv4+IPv6, up, torn down): median {median:.2f} ms, p90 {p90:.2f} ms"
          f" over {runs} runs")


if __name__ == "__main__":
    main()

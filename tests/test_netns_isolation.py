"""Every netlink operation lands in the namespace, never on the host.

pyroute2 0.9's sync IPRoute opens its socket lazily *per calling thread*;
these tests pin down that our layer does not inherit that hazard.
"""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
from netns_helpers import host_network_state, ip_json

from pytest_nettrace.netns import Namespace, NamespaceFactory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _exercise(a: Namespace, b: Namespace) -> None:
    a.add_veth("veth0", b, "veth1", ["10.0.0.1/24", "2001:db8::1/64"], ["10.0.0.2/24", "2001:db8::2/64"])
    a.add_dummy("d0", "192.168.7.1/24")
    a.add_bridge("br0", ports=["d0"])
    a.add_address("veth0", "10.0.1.1/24")
    a.del_address("veth0", "10.0.1.1/24")
    a.set_down("veth0")
    a.set_up("veth0")
    a.ipr.route("add", dst="10.50.0.0/16", gateway="10.0.0.2")
    a.run(["ip", "addr", "add", "10.0.2.1/24", "dev", "veth0"], check=True)


def test_host_links_addresses_routes_unchanged() -> None:
    before = host_network_state()
    with NamespaceFactory() as factory:
        _exercise(factory.create(), factory.create())
        during = host_network_state()
    assert during == before
    assert host_network_state() == before


def test_helpers_called_from_other_threads_stay_in_the_namespace(netns: Namespace) -> None:
    before = host_network_state()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            netns.add_dummy(f"t{i}", f"10.6.{i}.1/24")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(link["ifname"] for link in ip_json(netns, "link")) == ["lo", "t0", "t1", "t2", "t3"]
    assert host_network_state() == before


def test_helpers_work_inside_a_running_event_loop(netns: Namespace) -> None:
    async def main() -> None:
        netns.add_dummy("d0", "10.7.0.1/24")
        assert "10.7.0.1/24" in [str(a) for a in netns.addresses("d0")]

    asyncio.run(main())


def test_ipr_from_another_thread_refuses_instead_of_reaching_the_host(netns: Namespace) -> None:
    # pyroute2 0.9 would open a fresh socket in the calling thread's (host)
    # namespace; bound with use_socket= it raises instead.
    ipr = netns.ipr
    outcome: list[object] = []

    def other_thread() -> None:
        try:
            outcome.append(list(ipr.link("dump")))
        except RuntimeError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert isinstance(outcome[0], RuntimeError)


def test_pyroute2_sync_iproute_opens_a_socket_per_thread() -> None:
    """Documents the pyroute2 0.9 behaviour the design works around."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        main_sock = ipr.asyncore.socket
        seen: list[object] = []
        thread = threading.Thread(target=lambda: seen.append(ipr.asyncore.socket))
        thread.start()
        thread.join()
        assert seen[0] is not main_sock

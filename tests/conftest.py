import socket

import pytest

pytest_plugins = ["pytester"]


# -- reliability harness (tests/test_reliability*.py) -------------------------

def pytest_addoption(parser):
    parser.addoption("--nettrace-long", action="store_true", default=False,
                     help="run the long variants of the reliability tests (200-test leak suite, longer floods)")


# Two namespaces joined by a veth, once over IPv4 and once over IPv6: the tests
# of every TCP probe run both.
FAMILIES = [pytest.param((socket.AF_INET, "10.0.0.1", "10.0.0.2", 24), id="ipv4"),
            pytest.param((socket.AF_INET6, "fd00::1", "fd00::2", 64), id="ipv6")]


@pytest.fixture(params=FAMILIES)
def pair(request, make_netns):
    """Two namespaces joined by a veth: (server ns, client ns, family, server addr, client addr)."""
    fam, a, b, plen = request.param
    server, client = make_netns(), make_netns()
    server.add_veth("eth0", client, "eth0", addresses=[f"{a}/{plen}"], peer_addresses=[f"{b}/{plen}"])
    return server, client, fam, a, b

"""NetworkManager gate: loading a profile and changing it leaves the other
interfaces alone.

NetworkManager runs in the test's namespace (the `networkmanager` fixture:
private D-Bus, private state, /sys of the namespace) with the profiles of
examples/networkmanager/. eth0 is configured outside NetworkManager (as by
ifupdown or cloud-init) and carries an established TCP connection; the lab
profile configures eth1, then is renumbered with nmcli. Neither eth0's
address nor the connection may be touched. The kernel attributes eth1's
changes to NetworkManager itself, not to nmcli: nmcli only asks over D-Bus.
"""
from __future__ import annotations

from pathlib import Path

import pytest

PROFILES = Path(__file__).parent / "networkmanager"


@pytest.fixture
def nm_host(make_netns, networkmanager):
    """(host ns, uplink ns, NetworkManager in host ns).
    eth0 (10.1.0.1) leads to uplink ns (10.1.0.2), eth1 to a lab ns (10.2.0.254)."""
    host, uplink, lab = make_netns(), make_netns(), make_netns()
    host.add_veth("eth0", uplink, "eth0", addresses=["10.1.0.1/24"], peer_addresses=["10.1.0.2/24"])
    host.add_veth("eth1", lab, "eth0", peer_addresses=["10.2.0.254/24"])
    return host, uplink, networkmanager(host, profiles=PROFILES)


def test_nmcli_on_eth1_leaves_eth0_alone(nm_host, nettrace):
    host, uplink, nm = nm_host
    # An established connection over eth0, e.g. the SSH session of whoever runs nmcli.
    listener = uplink.socket()
    listener.bind(("10.1.0.2", 22))
    listener.listen()
    session = host.socket()
    session.connect(("10.1.0.2", 22))
    peer, _ = listener.accept()

    # The profile does not autoconnect: until `up`, eth1 has no address from NetworkManager.
    nettrace.assert_none("addr", action="added", address="10.2.0.1/24")
    nm.nmcli("connection", "up", "lab")
    nettrace.wait_for("addr", timeout=10, action="added", address="10.2.0.1/24", dev="eth1", comm="NetworkManager")
    # Renumber the lab network: NetworkManager replaces eth1's address.
    nm.nmcli("connection", "modify", "lab", "ipv4.addresses", "10.2.0.2/24")
    nm.nmcli("device", "reapply", "eth1")
    nettrace.assert_address_deleted("10.2.0.1/24", dev="eth1", by_comm="NetworkManager", timeout=10)
    assert [str(a) for a in host.addresses("eth1")] == ["10.2.0.2/24"]

    # The gate: eth0 and its connection were left alone.
    nettrace.assert_address_not_deleted(dev="eth0")
    session.sendall(b"still here")
    assert peer.recv(100) == b"still here"
    nettrace.assert_no_rst()

"""systemd-networkd gate: applying a .network file changes only its interface.

systemd-networkd runs in the test's namespace (the `systemd_networkd`
fixture: no systemd as PID 1, a private D-Bus, only the .network files of
examples/networkd/). eth0 is configured by someone else and carries an
established TCP connection; networkd configures eth1, then its
configuration changes and is reloaded. The story is checked as one ordered
expectation: eth1's address is added by networkd, replaced on reload (the
new one added, the old one deleted), and between the two nothing happens to
eth0.
"""
from __future__ import annotations

from pathlib import Path

from pytest_nettrace import forbid, step

CONFIG = Path(__file__).parent / "networkd"


def test_networkd_reload_touches_only_its_interface(make_netns, systemd_networkd, nettrace):
    host, uplink, lab = make_netns(), make_netns(), make_netns()
    host.add_veth("eth0", uplink, "eth0", addresses=["10.1.0.1/24"], peer_addresses=["10.1.0.2/24"])
    host.add_veth("eth1", lab, "eth0", peer_addresses=["10.4.0.254/24"])
    listener = uplink.socket()
    listener.bind(("10.1.0.2", 22))
    listener.listen()
    session = host.socket()
    session.connect(("10.1.0.2", 22))
    peer, _ = listener.accept()

    networkd = systemd_networkd(host, config=CONFIG)
    networkd.wait_configured("eth1")
    # The lab is renumbered: edit the .network file, reload, reconfigure.
    network = networkd.config / "20-lab.network"
    network.write_text(network.read_text().replace("10.4.0.1/24", "10.4.0.2/24"))
    networkd.reload()
    networkd.networkctl("reconfigure", "eth1")

    nettrace.expect_sequence(
        step("addr", action="added", address="10.4.0.1/24", dev="eth1", comm="systemd-networkd", as_="applied"),
        step("addr", action="added", address="10.4.0.2/24", dev="eth1", comm="systemd-networkd", as_="renumbered"),
        forbid("addr", action="deleted", dev="eth0", between=("applied", "renumbered")),
        forbid("rst", between=("applied", "renumbered")),
        timeout=10,
    )
    # Replaced: networkd deleted the old address, and it stayed gone (reconfigure
    # deletes and re-adds what is still configured, so the deletion alone says little).
    nettrace.assert_address_deleted("10.4.0.1/24", dev="eth1", by_comm="systemd-networkd")
    assert "10.4.0.1/24" not in [str(a) for a in host.addresses("eth1")]
    session.sendall(b"still here")
    assert peer.recv(100) == b"still here"
    nettrace.assert_address_not_deleted(dev="eth0")
    nettrace.assert_no_rst()

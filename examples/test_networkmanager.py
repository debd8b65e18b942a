"""NetworkManager gate: changing one connection leaves the others alone.

NetworkManager runs in the test's namespace with a private D-Bus. eth0 is
configured outside NetworkManager (as by ifupdown or cloud-init) and carries
an established TCP connection; `nmcli` (re)configures eth1. Neither eth0's
address nor the connection may be touched. The kernel attributes eth1's
changes to NetworkManager itself, not to nmcli: nmcli only asks over D-Bus.
"""
from __future__ import annotations

import time

import pytest

# A system bus of our own: anyone may own names and call anything on it.
BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/> <allow own="*"/> <allow send_destination="*"/> <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

# Profiles in tmp_path; no DNS handling (resolv.conf is the host's).
NM_CONF = """
[main]
plugins=keyfile
no-auto-default=*
dns=none
rc-manager=unmanaged
[keyfile]
path={profiles}
"""

# NetworkManager in a mount namespace of its own, where /sys shows this
# network namespace's devices and is read-only (NetworkManager then runs as in
# a container: no waiting for udev), and its state directories are private.
NM_START = """
mount -t sysfs -o ro sysfs /sys
mount -t tmpfs tmpfs /run/NetworkManager
mount -t tmpfs tmpfs /var/lib/NetworkManager
exec "$@"
"""


@pytest.fixture
def nm_host(make_netns, networkmanager, tmp_path):
    """(host ns, uplink ns, nmcli argv prefix): NetworkManager running in host ns.
    eth0 (10.1.0.1) leads to uplink ns (10.1.0.2), eth1 to a lab ns (10.2.0.254)."""
    host, uplink, lab = make_netns(), make_netns(), make_netns()
    host.add_veth("eth0", uplink, "eth0", addresses=["10.1.0.1/24"], peer_addresses=["10.1.0.2/24"])
    host.add_veth("eth1", lab, "eth0", peer_addresses=["10.2.0.254/24"])

    bus = tmp_path / "system_bus_socket"
    (tmp_path / "bus.conf").write_text(BUS_CONF.format(socket=bus))
    host.popen(["dbus-daemon", "--nofork", "--config-file", str(tmp_path / "bus.conf")])
    wait_for_path(bus)
    with_bus = ["env", f"DBUS_SYSTEM_BUS_ADDRESS=unix:path={bus}"]

    profiles = tmp_path / "profiles"
    profiles.mkdir(mode=0o700)
    (tmp_path / "nm.conf").write_text(NM_CONF.format(profiles=profiles))
    host.popen(with_bus + ["unshare", "--mount", "--propagation", "slave", "sh", "-ec", NM_START, "nm-start",
                           networkmanager, "--no-daemon", f"--config={tmp_path}/nm.conf",
                           f"--config-dir={tmp_path}/none"])
    host.run(with_bus + ["nm-online", "--wait-for-startup", "--quiet", "--timeout=20"], check=True)
    return host, uplink, with_bus + ["nmcli", "--wait", "20"]


def wait_for_path(path, timeout=10.0):
    """Until `path` exists (here: dbus-daemon's socket)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout:g}s")
        time.sleep(0.02)


def test_nmcli_on_eth1_leaves_eth0_alone(nm_host, nettrace):
    host, uplink, nmcli = nm_host
    # An established connection over eth0, e.g. the SSH session of whoever runs nmcli.
    listener = uplink.socket()
    listener.bind(("10.1.0.2", 22))
    listener.listen()
    session = host.socket()
    session.connect(("10.1.0.2", 22))
    peer, _ = listener.accept()

    host.run(nmcli + ["connection", "add", "type", "ethernet", "ifname", "eth1", "con-name", "lab",
                      "ipv4.method", "manual", "ipv4.addresses", "10.2.0.1/24", "ipv6.method", "disabled"], check=True)
    host.run(nmcli + ["connection", "up", "lab"], check=True)
    nettrace.wait_for("addr", timeout=10, action="added", address="10.2.0.1/24", dev="eth1", comm="NetworkManager")
    # Renumber the lab network: NetworkManager replaces eth1's address.
    host.run(nmcli + ["connection", "modify", "lab", "ipv4.addresses", "10.2.0.2/24"], check=True)
    host.run(nmcli + ["device", "reapply", "eth1"], check=True)
    nettrace.assert_address_deleted("10.2.0.1/24", dev="eth1", by_comm="NetworkManager", timeout=10)

    # The gate: eth0 and its connection were left alone.
    nettrace.assert_address_not_deleted(dev="eth0")
    session.sendall(b"still here")
    assert peer.recv(100) == b"still here"
    nettrace.assert_no_rst()

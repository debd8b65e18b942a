"""DHCP address lifecycle: dnsmasq leases an address to busybox udhcpc.

The client applies the lease with `ip` from its hook script
(udhcpc-hook.sh). The address must stay while the lease is valid, renewals
included, and go when the client releases it, removed by that hook's `ip`.
"""
from __future__ import annotations

import ipaddress
import signal
from pathlib import Path

import pytest

from pytest_nettrace import forbid, ref, step

HOOK = Path(__file__).parent / "udhcpc-hook.sh"

POOL = ipaddress.ip_network("10.9.0.0/24")


@pytest.fixture
def lan(make_netns, tmp_path, dnsmasq):
    """(server ns, client ns): a veth between them, dnsmasq serving 10.9.0.100-199."""
    server, client = make_netns(), make_netns()
    server.add_veth("eth0", client, "eth0", addresses=["10.9.0.1/24"])
    server.popen([dnsmasq, "--no-daemon", "--conf-file=/dev/null", "--port=0", "--user=root",
                  "--interface=eth0", "--bind-interfaces", "--dhcp-authoritative",
                  "--dhcp-range=10.9.0.100,10.9.0.199,255.255.255.0,10m",
                  f"--dhcp-leasefile={tmp_path}/leases", f"--pid-file={tmp_path}/dnsmasq.pid"])
    return server, client


def start_udhcpc(client, busybox):
    # -f foreground, -R release the lease on exit, -T 1: retry DISCOVER every
    # second (dnsmasq may still be starting when the first one goes out)
    return client.popen([busybox, "udhcpc", "-f", "-R", "-T", "1", "-t", "10", "-i", "eth0",
                         "-s", str(HOOK)])


def test_lease_kept_while_valid_and_removed_on_release(lan, busybox, nettrace):
    server, client = lan
    udhcpc = start_udhcpc(client, busybox)

    # The lease is applied: the hook's `ip` adds an address from the pool.
    bound = nettrace.wait_for("addr", timeout=15, action="added", netns=client.inode, dev="eth0",
                              address=lambda a: a.ip in POOL)
    # Renew (what udhcpc does by itself at half the lease time): the hook
    # refreshes the address (a change: its lifetimes); it must never be
    # removed and re-added.
    udhcpc.send_signal(signal.SIGUSR1)
    nettrace.wait_for("addr", timeout=10, action="changed", address=bound.address,
                      timestamp=lambda t: t > bound.timestamp)
    assert bound.address in client.addresses("eth0")
    # Stopping the client releases the lease (-R): the hook's `ip` removes it.
    udhcpc.terminate()
    udhcpc.wait(timeout=10)

    # The lifecycle, in order, about the one leased address.
    life = nettrace.expect_sequence(
        step("addr", action="added", netns=client.inode, dev="eth0", address=lambda a: a.ip in POOL,
             comm="ip", bind={"lease": "address"}, as_="bound"),
        step("addr", action="changed", address=ref("lease"), comm="ip", as_="renewed"),
        step("addr", action="deleted", address=ref("lease"), comm="ip", as_="released"),
        forbid("addr", action="deleted", address=ref("lease"), between=("bound", "released")),
    )
    assert all("udhcpc-hook" in ev.parent_comm for ev in life)
    assert life.bound["lease"] not in client.addresses("eth0")

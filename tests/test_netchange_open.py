"""Wrong answers found against `ip monitor` and strace and not fixed yet:
each a reproducer that fails today, marked xfail(strict), so that a fix
shows as an XPASS failure and the mark goes with it."""
from __future__ import annotations

import subprocess
import threading
import time

import pytest


def _mon(ns):
    proc = ns.popen(["ip", "-o", "monitor", "link", "address"], stdout=subprocess.PIPE, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(ln.rstrip("\n") for ln in proc.stdout), daemon=True).start()
    time.sleep(0.5)
    return proc, lines


@pytest.mark.xfail(strict=True, reason="a veth's peer, deleted by the kernel with the end the request named, "
                                       "is said to be the request's own (cause netlink)")
def test_a_veth_peer_deleted_with_its_other_end_is_the_kernels_doing(make_netns, nettrace):
    """`ip link del v0` names v0 (strace: one RTM_DELLINK, ifname v0); the
    kernel deletes its peer v1, in the other namespace, with it — as it
    deletes a macvlan on top ("kernel", "follows a change of another
    link"). The plugin said v1's down and deletion were asked for over
    netlink."""
    a, b = make_netns(), make_netns()
    a.add_veth("v0", b, "v1", peer_addresses=["10.2.0.2/24"])
    r = a.run(["ip", "link", "del", "v0"], check=True)
    own = nettrace.assert_any("link", action="deleted", dev="v0", netns=a.inode)
    assert (own.pid, own.cause) == (r.pid, "netlink")
    peer = [(e.action, e.cause) for e in nettrace.link_changes(dev="v1", netns=b.inode, pid=r.pid)]
    assert peer == [("down", "kernel"), ("deleted", "kernel")], peer


@pytest.mark.xfail(strict=True, reason="IPv6 coming back when the MTU is raised to 1280 or more is called "
                                       "'link up', though the link never went down")
def test_ipv6_back_with_the_mtu_is_no_link_up(make_netns, nettrace):
    a, b = make_netns(), make_netns()
    a.add_veth("v0", b, "v1")
    a.run(["ip", "link", "set", "v0", "mtu", "1200"], check=True)
    proc, lines = _mon(a)
    try:
        r = a.run(["ip", "link", "set", "v0", "mtu", "1500"], check=True)
        time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(5)
    # the observer: v0 stayed UP all along (no link line without UP)
    links = [ln for ln in lines if ": v0@" in ln and "mtu" in ln]
    assert links and all(",UP" in ln for ln in links), links
    back = nettrace.events("route", pid=r.pid, dev="v0")
    assert back, "the multicast and link-local routes come back"
    assert {e.detail for e in back} & {"link up"} == set(), [(str(e.dst), e.detail) for e in back]

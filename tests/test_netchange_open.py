"""Wrong answers found against `ip monitor` and strace and not fixed yet:
each a reproducer that fails today, marked xfail(strict), so that a fix
shows as an XPASS failure and the mark goes with it."""
from __future__ import annotations

import pytest


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

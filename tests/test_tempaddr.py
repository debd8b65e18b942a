"""IPv6 privacy extensions: `ip addr add … mngtmpaddr` with use_tempaddr=2
makes the kernel create a temporary address from it, and deleting that
address deletes its temporary ones. The request named only the
mngtmpaddr address (strace: one RTM_NEWADDR / RTM_DELADDR, for it); the
temporary address is the kernel's doing, on that task's behalf — as
ip monitor shows it, with "temporary". The plugin said cause "netlink":
a program asked for it."""
from __future__ import annotations

import re
import shutil

import pytest


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_temporary_addresses_are_the_kernels_doing(netns, nettrace, tmp_path):
    netns.add_dummy("d0")
    netns.run(["sysctl", "-qw", "net.ipv6.conf.d0.use_tempaddr=2", "net.ipv6.conf.d0.accept_dad=0"], check=True)
    log = tmp_path / "strace"
    netns.run(["strace", "-f", "-o", str(log), "-e", "trace=sendmsg", "-s", "256",
                     "ip", "addr", "add", "2001:db8:1::1/64", "dev", "d0", "mngtmpaddr", "nodad"], check=True)
    assert len(re.findall(r"RTM_NEWADDR", log.read_text())) == 1   # the request: one address
    temp = nettrace.wait_for("addr", action="added", address=lambda a: str(a).startswith("2001:db8:1:0:")
                             and str(a) != "2001:db8:1::1/64")
    public = nettrace.wait_for("addr", action="added", address="2001:db8:1::1/64")
    assert temp.flags & 0x01 and temp.pid == public.pid   # IFA_F_TEMPORARY, by the same task
    assert netns.run(["ip", "-6", "addr", "show", "dev", "d0", "temporary"], check=True).stdout.count("inet6") == 1
    assert public.cause == "netlink"
    assert temp.cause == "kernel", temp.describe()
    assert temp.detail == "temporary address (IPv6 privacy extensions)"
    addr = str(temp.address)

    gone = netns.run(["ip", "addr", "del", "2001:db8:1::1/64", "dev", "d0"], check=True)
    deleted = nettrace.assert_address_deleted(addr, by_pid=gone.pid)
    assert nettrace.assert_address_deleted("2001:db8:1::1/64", by_pid=gone.pid).cause == "netlink"
    assert "temporary" not in netns.run(["ip", "-6", "addr", "show", "dev", "d0"], check=True).stdout
    assert deleted.cause == "kernel", deleted.describe()
    assert deleted.detail == "removed with the address it was made from (IPv6 privacy extensions)"
    nettrace.assert_none("addr", action="deleted", cause="netlink", address=addr)

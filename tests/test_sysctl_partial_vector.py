"""A write of fewer numbers than a vector sysctl holds (tcp_rmem's three,
ip_local_port_range's two): the kernel sets those and keeps the others
(proc_dointvec stops at the end of the input), so writing the numbers it
already has changes nothing. `changed` said True: the read-back, an
independent observer, shows the setting as it was."""
from __future__ import annotations

import pytest

from test_netconfig import needs_sysctl_probe


@pytest.mark.parametrize("setting,written", [
    ("net/ipv4/tcp_rmem", "4096 131072"),
    ("net/ipv4/tcp_wmem", "4096"),
    ("net/ipv4/ip_local_port_range", "32768"),
])
def test_a_partial_vector_write_of_the_same_numbers_changes_nothing(netns, nettrace, setting, written):
    needs_sysctl_probe(nettrace)
    path = f"/proc/sys/{setting}"
    before = netns.run(["cat", path], check=True).stdout.split()
    assert before[:len(written.split())] == written.split(), before   # the same leading numbers
    r = netns.run(["sh", "-c", f"echo {written} > {path}"], check=True)
    assert netns.run(["cat", path], check=True).stdout.split() == before   # nothing changed
    (w,) = nettrace.sysctl_writes(pid=r.pid)
    assert (w.ret, w.error) == (len(written) + 1, None)
    assert w.changed is False, (w.old, w.new)


def test_a_partial_vector_write_of_other_numbers_is_a_change(netns, nettrace):
    needs_sysctl_probe(nettrace)
    path = "/proc/sys/net/ipv4/tcp_wmem"
    before = netns.run(["cat", path], check=True).stdout.split()
    r = netns.run(["sh", "-c", f"echo 8192 > {path}"], check=True)
    assert netns.run(["cat", path], check=True).stdout.split() == ["8192"] + before[1:]
    (w,) = nettrace.sysctl_writes(pid=r.pid)
    assert w.changed is True

"""A write of fewer numbers than a vector sysctl holds (tcp_rmem's three,
ip_local_port_range's two): the kernel sets those and keeps the others
(proc_dointvec stops at the end of the input), so writing the numbers it
already has changes nothing. `changed` said True: the read-back, an
independent observer, shows the setting as it was."""
from __future__ import annotations

import shutil
import sys

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


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("value", ["1 abc", "1\nabc"])
def test_what_the_kernel_did_not_take_is_no_change(netns, nettrace, tmp_path, value):
    """A number followed by what is not one: the kernel takes the number and
    stops there; write() returns the bytes it took (strace: 2, of 5), the
    rest is left unwritten. Over the same number it changes nothing."""
    needs_sysctl_probe(nettrace)
    path = "/proc/sys/net/ipv4/ip_forward"
    netns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
    log = tmp_path / "strace"
    netns.run(["strace", "-o", str(log), "-e", "trace=write", sys.executable, "-c",
                   f"import os; os.write(os.open({path!r}, os.O_WRONLY), {value.encode()!r})"], check=True)
    (line,) = [ln for ln in log.read_text().splitlines() if ln.startswith("write(3,")]
    assert line.endswith("= 2"), line                                     # the observer: 2 bytes taken
    assert netns.run(["cat", path], check=True).stdout.strip() == "1"      # and the setting as it was
    w = nettrace.sysctl_writes(name="net.ipv4.ip_forward")[-1]
    assert (w.new, w.ret, w.error) == (value.rstrip("\n"), 2, None)
    assert w.changed is False, (w.old, w.new, w.ret)

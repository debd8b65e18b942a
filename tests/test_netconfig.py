"""Who changed the rest of the network configuration (issue 15, part 2):
neighbour entries and policy-routing rules, attributed to real `ip`
processes, with `ip monitor` as the independent observer."""
from __future__ import annotations

import ipaddress
import os
import re
import select
import shutil
import subprocess
import sys
import time

import pytest

from traffic import script


class IpMonitor:
    """`ip monitor OBJECTS` running in a namespace; lines as it printed them."""

    def __init__(self, ns, *objects: str) -> None:
        self.proc = ns.popen(["ip", "monitor", *objects], stdout=subprocess.PIPE)
        self.fd = self.proc.stdout.fileno()
        self.lines: list = []
        self._partial = b""

    def readable(self, timeout: float) -> bool:
        return bool(select.select([self.fd], [], [], timeout)[0])

    def read(self, until, timeout: float = 5.0) -> list:
        """Lines until one matches `until` (a regex)."""
        deadline = time.monotonic() + timeout
        while not any(re.search(until, line) for line in self.lines):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"ip monitor never printed {until!r}; it printed {self.lines}")
            if self.readable(left):
                *done, self._partial = (self._partial + os.read(self.fd, 1 << 16)).split(b"\n")
                self.lines.extend(line.decode() for line in done)
        return self.lines


def monitor_ready(ns, *objects: str) -> IpMonitor:
    """An `ip monitor` known to be subscribed: it saw a marker rule come and go
    (re-made until it does: there is nothing else to wait on)."""
    mon = IpMonitor(ns, *objects, "rule")
    for _ in range(100):
        ns.run(["ip", "rule", "add", "pref", "31999", "lookup", "199"], check=True)
        ns.run(["ip", "rule", "del", "pref", "31999"], check=True)
        if mon.readable(0.05):
            mon.read(r"^Deleted 31999:")
            mon.lines.clear()
            return mon
    raise AssertionError("ip monitor never saw the marker rule")


@pytest.fixture
def pair(make_netns):
    a, b = make_netns(), make_netns()
    a.add_veth("eth0", b, "eth0", addresses=["10.0.0.1/24", "fd00::1/64"],
               peer_addresses=["10.0.0.2/24", "fd00::2/64"])
    return a, b


def resolve(ns, *hosts: str) -> None:
    """Send a datagram to each host, so the kernel resolves its neighbour entry."""
    ns.run(script(f"""
        import socket
        for host in {list(hosts)!r}:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            socket.socket(fam, socket.SOCK_DGRAM).sendto(b"x", (host, 9))
    """), check=True)


# -- neighbours ---------------------------------------------------------------

@pytest.mark.smoke
def test_ip_neigh_add_and_del_attributed(pair, nettrace):
    a, _ = pair
    mon = monitor_ready(a, "neigh")
    add = a.run(["ip", "neigh", "add", "10.0.0.9", "lladdr", "02:00:00:00:00:09", "dev", "eth0"], check=True)
    rm = a.run(["ip", "neigh", "del", "10.0.0.9", "dev", "eth0"], check=True)
    added = nettrace.assert_any("neigh", action="added", address="10.0.0.9")
    assert (added.pid, added.comm, added.cause) == (add.pid, "ip", "netlink")
    # as the kernel saw it when the entry was added: ip had parsed the
    # lladdr in place by then (its argv shows "02 00 00 ...")
    assert added.cmdline.startswith("ip neigh add 10.0.0.9 lladdr 02")
    assert (added.dev, added.lladdr, added.state, added.family) == ("eth0", "02:00:00:00:00:09", "PERMANENT", 4)
    assert added.ifindex == a.link("eth0").index and added.netns == a.inode
    assert any(f.startswith("neigh_add") for f in added.stack), added.stack
    gone = nettrace.assert_any("neigh", action="deleted", address="10.0.0.9")
    assert (gone.pid, gone.cause, gone.user) == (rm.pid, "netlink", "root")
    assert "deleted neigh 10.0.0.9 dev eth0 lladdr 02:00:00:00:00:09" in gone.summary()
    # ip monitor saw the same two changes
    lines = mon.read(r"^Deleted 10\.0\.0\.9 ")
    assert any(line.startswith("10.0.0.9 dev eth0 lladdr 02:00:00:00:00:09 PERMANENT") for line in lines), lines
    with pytest.raises(AssertionError, match="neigh.*10.0.0.9"):
        nettrace.assert_neighbour_not_deleted("10.0.0.9")
    nettrace.assert_neighbour_not_deleted("10.0.0.2")


def test_who_flushed_the_arp_cache(pair, nettrace):
    a, _ = pair
    resolve(a, "10.0.0.2", "fd00::2")
    learned = nettrace.wait_for("neigh", address="10.0.0.2", state="REACHABLE")
    assert learned.cause == "kernel" and learned.background, (learned.detail, learned.stack)
    nettrace.wait_for("neigh", address="fd00::2", state="REACHABLE")
    mon = monitor_ready(a, "neigh")
    r = a.run(["ip", "neigh", "flush", "dev", "eth0"], check=True)  # both families
    v4 = nettrace.assert_any("neigh", action="deleted", address="10.0.0.2", dev="eth0")
    v6 = nettrace.assert_any("neigh", action="deleted", address="fd00::2", dev="eth0")
    assert (v4.pid, v4.comm, v4.cmdline, v4.cause) == (r.pid, "ip", "ip neigh flush dev eth0", "netlink")
    assert (v6.pid, v6.family, v6.cause) == (r.pid, 6, "netlink")
    assert not v4.background
    lines = mon.read(r"^Deleted fd00::2 ")
    assert any(line.startswith("Deleted 10.0.0.2 dev eth0") for line in lines), lines


def test_link_down_flushes_neighbours_cause_kernel(pair, nettrace):
    a, _ = pair
    resolve(a, "10.0.0.2")
    nettrace.wait_for("neigh", address="10.0.0.2", state="REACHABLE")
    r = a.run(["ip", "link", "set", "eth0", "down"], check=True)
    ev = nettrace.assert_any("neigh", action="deleted", address="10.0.0.2")
    assert (ev.cause, ev.detail) == ("kernel", "link down"), ev.stack
    assert ev.pid == r.pid, "the task that triggered it"


def test_neigh_change_keeps_the_old_state(pair, nettrace):
    a, _ = pair
    a.run(["ip", "neigh", "add", "10.0.0.7", "lladdr", "02:00:00:00:00:07", "dev", "eth0"], check=True)
    r = a.run(["ip", "neigh", "replace", "10.0.0.7", "lladdr", "02:00:00:00:00:08", "dev", "eth0",
               "nud", "stale"], check=True)
    ev = nettrace.assert_any("neigh", action="changed", address="10.0.0.7")
    assert (ev.pid, ev.old_state, ev.state, ev.lladdr) == (r.pid, "PERMANENT", "STALE", "02:00:00:00:00:08")
    assert "PERMANENT -> STALE" in ev.describe()
    with pytest.raises(ValueError, match="unknown action 'flushed' for 'neigh' events; valid: added, changed"):
        nettrace.assert_none("neigh", action="flushed")


# -- policy-routing rules -----------------------------------------------------

@pytest.mark.smoke
def test_ip_rule_add_and_del_attributed(netns, nettrace):
    mon = monitor_ready(netns)
    add = netns.run(["ip", "rule", "add", "from", "10.1.0.0/16", "fwmark", "0x10/0xff", "lookup", "100",
                     "pref", "100"], check=True)
    add6 = netns.run(["ip", "-6", "rule", "add", "to", "2001:db8::/32", "iif", "lo", "table", "300",
                      "pref", "200"], check=True)
    rm = netns.run(["ip", "rule", "del", "pref", "100"], check=True)
    ev = nettrace.assert_any("rule", action="added", priority=100)
    assert (ev.pid, ev.comm, ev.cause) == (add.pid, "ip", "netlink")
    assert ev.src == ipaddress.ip_network("10.1.0.0/16") and ev.dst is None
    assert (ev.table, ev.fwmark, ev.fwmask, ev.rule_action, ev.family) == (100, 0x10, 0xFF, "lookup", 4)
    assert ev.describe() == "added rule 100: from 10.1.0.0/16 fwmark 0x10/0xff lookup 100"
    assert any(f.startswith(("fib_nl_newrule", "fib_newrule")) for f in ev.stack), ev.stack
    v6 = nettrace.assert_any("rule", family=6, dst="2001:db8::/32")
    assert (v6.pid, v6.iif, v6.table, v6.priority) == (add6.pid, "lo", 300, 200)
    gone = nettrace.assert_any("rule", action="deleted", src="10.1.0.0/16")
    assert (gone.pid, gone.cmdline, gone.cause) == (rm.pid, "ip rule del pref 100", "netlink")
    lines = mon.read(r"^Deleted 100:")
    assert any(re.match(r"100:\s+from 10\.1\.0\.0/16 fwmark 0x10/0xff lookup 100", line) for line in lines), lines
    assert any(re.match(r"200:\s+from all to 2001:db8::/32 iif lo lookup 300", line) for line in lines), lines


def test_main_table_rule_deleted_is_caught(netns, nettrace):
    # the classic: a script deletes the rule that sends everything to main
    r = netns.run(["ip", "rule", "del", "pref", "32766"], check=True)
    ev = nettrace.assert_any("rule", action="deleted", table="main")
    assert ev.pid == r.pid and ev.describe() == "deleted rule 32766: from all lookup main"
    with pytest.raises(AssertionError, match="expected no rule events"):
        nettrace.assert_none("rule", action="deleted")


@pytest.mark.nettrace(forbid=["neigh:deleted", "rule:deleted"])
def test_gate_words_for_the_new_kinds_pass_when_nothing_is_deleted(pair, nettrace):
    a, _ = pair
    a.run(["ip", "rule", "add", "pref", "10", "lookup", "10"], check=True)
    a.run(["ip", "neigh", "add", "10.0.0.8", "lladdr", "02:00:00:00:00:08", "dev", "eth0"], check=True)
    assert [e.comm for e in nettrace.rule_changes()] == ["ip"]
    assert nettrace.neighbour_changes(action="added", address="10.0.0.8")[0].pid is not None


def test_json_fields_of_the_new_kinds(netns, nettrace):
    netns.add_dummy("d0", "10.3.0.1/24")
    netns.run(["ip", "neigh", "add", "10.3.0.5", "lladdr", "02:00:00:00:00:05", "dev", "d0"], check=True)
    netns.run(["ip", "rule", "add", "to", "10.9.0.0/16", "prohibit", "pref", "5"], check=True)
    n = nettrace.neighbour_changes(address="10.3.0.5")[0].as_dict()
    assert n["address"] == "10.3.0.5" and n["state"] == "PERMANENT" and n["cause"] == "netlink"
    r = nettrace.rule_changes()[0].as_dict()
    assert r["dst"] == "10.9.0.0/16" and r["rule_action"] == "prohibit" and r["comm"] == "ip"


# -- sysctl writes ------------------------------------------------------------

def needs_sysctl_probe(nettrace):
    why = nettrace.engine.probe_available("sysctl")
    if why:
        pytest.skip(f"sysctl probe unavailable: {why}")


@pytest.mark.smoke
def test_disable_ipv6_write_attributed_and_is_the_cause_of_the_deletion(netns, nettrace):
    needs_sysctl_probe(nettrace)
    netns.add_dummy("v0", "2001:db8::5/64")
    r = netns.run(["sysctl", "-w", "net.ipv6.conf.v0.disable_ipv6=1"], check=True)
    assert r.stdout.strip() == "net.ipv6.conf.v0.disable_ipv6 = 1"  # sysctl's own account
    w = nettrace.assert_any("sysctl", name="net.ipv6.conf.v0.disable_ipv6")
    assert (w.pid, w.comm, w.user, w.old, w.new, w.dev, w.changed) == (r.pid, "sysctl", "root", "0", "1", "v0", True)
    assert w.cmdline.startswith("sysctl -w net.ipv6.conf.v0.disable_ipv6")  # (sysctl splits its argv at "=")
    assert w.netns == netns.inode and w.describe() == "wrote net.ipv6.conf.v0.disable_ipv6=1 (was 0)"
    ev = nettrace.assert_address_deleted("2001:db8::5/64", dev="v0")
    assert (ev.pid, ev.comm, ev.cause) == (r.pid, "sysctl", "sysctl"), (ev.cause, ev.detail, ev.stack)
    assert ev.detail == "net.ipv6.conf.v0.disable_ipv6=1", "the link never went down"
    assert "by a sysctl write (net.ipv6.conf.v0.disable_ipv6=1)" in ev.summary()
    assert nettrace.link_changes(action="down") == []


@pytest.mark.parametrize("dad", [0, 1], ids=["accept_dad=0", "accept_dad=1"])
def test_reenabling_ipv6_names_the_setting_on_what_the_dad_worker_announces(netns, nettrace, dad):
    """disable_ipv6=0 re-creates the link-local address; the kernel's DAD
    worker announces it after the write returned: still that write's doing,
    named as the routes it made at once are."""
    needs_sysctl_probe(nettrace)
    netns.add_dummy("v0")
    netns.run(["sysctl", "-qw", f"net.ipv6.conf.v0.accept_dad={dad}"], check=True)
    netns.run(["sysctl", "-w", "net.ipv6.conf.v0.disable_ipv6=1"], check=True)
    r = netns.run(["sysctl", "-w", "net.ipv6.conf.v0.disable_ipv6=0"], check=True)
    route = nettrace.assert_any("route", action="added", dst="fe80::/64", pid=r.pid)
    link_local = nettrace.wait_for("addr", action="added", address=lambda a: a.ip.is_link_local, timeout=5,
                                   timestamp=lambda t: t > route.timestamp)
    assert link_local.announced_by == "addrconf_dad_work"
    for ev in (route, link_local):
        assert (ev.pid, ev.cause, ev.detail) == (r.pid, "sysctl", "net.ipv6.conf.v0.disable_ipv6=0"), ev.describe()


def test_shell_write_to_proc_sys_net_attributed(netns, nettrace):
    needs_sysctl_probe(nettrace)
    netns.add_dummy("eth0")
    path = "/proc/sys/net/ipv4/conf/eth0/rp_filter"
    r = netns.run(["sh", "-c", f"echo 2 > {path}; echo 2 > {path}; cat {path}"], check=True)
    assert r.stdout.strip() == "2"  # read back: the value the kernel kept
    first, again = nettrace.sysctl_writes(name="net.ipv4.conf.eth0.rp_filter")
    assert (first.pid, first.comm, first.old, first.new, first.changed) == (r.pid, "sh", "0", "2", True)
    assert (again.old, again.new, again.changed) == ("2", "2", False)
    assert first.cmdline == f"sh -c echo 2 > {path}; echo 2 > {path}; cat {path}"
    assert first.stack == [] and first.context == "process"
    nettrace.assert_none("sysctl", name="net.ipv4.conf.eth0.forwarding")


def test_a_write_by_sendfile_or_splice_has_its_own_result(netns, nettrace, tmp_path):
    """proc's files take splice_write: sendfile() and splice() write a
    sysctl too. Their results were taken from the thread's next write(2)
    (the log line after them): a refused 300 read as written."""
    needs_sysctl_probe(nettrace)
    r = netns.run(script("""
        import os
        def source(text):
            fd = os.memfd_create("sysctl-value")   # (a VM's /tmp may take no O_TMPFILE)
            os.write(fd, text)
            return fd
        ttl = os.open("/proc/sys/net/ipv4/ip_default_ttl", os.O_WRONLY)
        try:
            os.sendfile(ttl, source(b"300\\n"), 0, 4)
        except OSError as e:
            print("sendfile", e.errno, flush=True)
        os.write(1, b"a log line of 24 bytes.\\n")
        r, w = os.pipe()
        os.write(w, b"1\\n")
        fwd = os.open("/proc/sys/net/ipv4/ip_forward", os.O_WRONLY)
        print("splice", os.splice(r, fwd, 2), flush=True)
        os.write(1, b"another log line, longer.\\n")
    """), check=True)
    assert "sendfile 22" in r.stdout and "splice 2" in r.stdout, r.stdout
    ttl = nettrace.sysctl_writes(name="net.ipv4.ip_default_ttl")
    fwd = nettrace.sysctl_writes(name="net.ipv4.ip_forward")
    assert [(w.new, w.error, w.changed) for w in ttl] == [("300", "EINVAL", False)], ttl
    assert [(w.new, w.ret, w.error) for w in fwd] == [("1", 2, None)], fwd


def test_sysctl_writes_are_scoped_to_the_writers_namespace(make_netns, nettrace):
    needs_sysctl_probe(nettrace)
    a = make_netns()
    outside = subprocess.run(["ip", "netns", "add", f"{a.name}-unwatched"], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", f"{a.name}-unwatched", "sysctl", "-qw",
                        "net.ipv4.ip_forward=1"], check=True)
        r = a.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
    finally:
        subprocess.run(["ip", "netns", "del", f"{a.name}-unwatched"], check=True)
    assert outside.returncode == 0
    (w,) = nettrace.sysctl_writes()
    assert (w.pid, w.name, w.new, w.dev) == (r.pid, "net.ipv4.ip_forward", "1", None)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace (Debian package strace) is not installed")
def test_a_restarted_write_is_one_event(make_netns, nettrace):
    # net.ipv4.ip_forward's handler restarts the write syscall while another
    # task holds the RTNL lock; the hook runs once per restart. strace shows
    # the restarts (ERESTARTNOINTR); each sysctl run must still be one event.
    needs_sysctl_probe(nettrace)
    a, b = make_netns(), make_netns()
    # a longer name written on one CPU leaves its end in that CPU's scratch
    # buffer: a restart that moves CPUs must still be one event (two on 6.1)
    if os.cpu_count() > 1:
        a.run(["taskset", "-c", "0", "sysctl", "-qw", "net.ipv4.conf.default.accept_source_route=0"], check=True)
    b.popen(["sh", "-c", "while :; do ip link add d0 type veth peer name d1; ip link del d0; done"])
    runs = restarts = 0
    while not restarts and runs < 300:
        runs += 1
        r = a.run(["strace", "-f", "-e", "trace=write", "sysctl", "-qw", f"net.ipv4.ip_forward={runs % 2}"],
                  check=True)
        restarts += r.stderr.count("ERESTARTNOINTR")
    if not restarts:
        pytest.skip(f"no restarted write in {runs} tries (the RTNL lock was never contended)")
    writes = nettrace.sysctl_writes(name="net.ipv4.ip_forward")
    assert len(writes) == runs, (runs, restarts, [w.describe() for w in writes])
    # each with the result of its last run, not the restart's ERESTARTNOINTR
    assert {(w.ret, w.error) for w in writes} == {(2, None)}
    assert [(w.old, w.new) for w in writes[-2:]] == [(str(runs % 2), str((runs - 1) % 2)),
                                                      (str((runs - 1) % 2), str(runs % 2))][-len(writes):]


def test_two_writes_of_the_same_value_by_one_thread_are_two_events(netns, nettrace):
    # the shell's builtin echo: one thread, two opens, two writes of "0", which it already is
    needs_sysctl_probe(nettrace)
    path = "/proc/sys/net/ipv4/ip_forward"
    r = netns.run(["sh", "-c", f"echo 0 > {path}; echo 0 > {path}"], check=True)
    writes = nettrace.sysctl_writes(name="net.ipv4.ip_forward", pid=r.pid)
    assert [(w.old, w.new) for w in writes] == [("0", "0"), ("0", "0")]
    assert writes[0].tid == writes[1].tid


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace (Debian package strace) is not installed")
def test_each_writes_result_is_what_strace_saw_it_return(netns, nettrace, tmp_path):
    """The hook runs before the kernel takes a value, which it may refuse:
    each event's ret/error is what its write syscall returned, as strace -y
    shows it on the /proc/sys file, and a refused write changed nothing."""
    needs_sysctl_probe(nettrace)
    conf = "/proc/sys/net/ipv4"
    log = tmp_path / "strace.out"
    r = netns.run(["strace", "-f", "-qq", "-y", "-e", "trace=write,writev,pwrite64", "-o", str(log), "sh", "-c",
                   f"echo abc > {conf}/ip_forward; echo 1 > {conf}/ip_forward; "
                   f"sysctl -qw net.ipv4.ip_default_ttl=300 net.ipv4.ip_default_ttl=65 net.ipv4.tcp_syncookies=0; "
                   f"cat {conf}/ip_forward {conf}/ip_default_ttl"])
    assert r.stdout.split() == ["1", "65"]   # what the kernel kept
    theirs = []
    for line in log.read_text().splitlines():
        m = re.search(r"write\(\d+</proc/sys/([^>]+)>.* = (-?\d+)(?: (E[A-Z0-9]+))?", line)
        if m:
            theirs.append((m[1].replace("/", "."), int(m[2]) if int(m[2]) >= 0 else None, m[3]))
    assert len(theirs) >= 5, log.read_text()   # (sysctl(8) may try a refused value twice)
    writes = nettrace.sysctl_writes()
    assert [(w.name, w.ret if w.error is None else None, w.error) for w in writes] == theirs
    assert {(w.name, w.new, w.changed) for w in writes if w.error} == {
        ("net.ipv4.ip_forward", "abc", False), ("net.ipv4.ip_default_ttl", "300", False)}
    assert writes[0].describe() == "failed to write net.ipv4.ip_forward=abc: EINVAL (was 0)"
    assert writes[0].ret == -22 and writes[1].changed and writes[1].ret == 2
    nettrace.assert_none("sysctl", name="net.ipv4.ip_default_ttl", new="300", changed=True)


def test_a_write_past_the_start_of_the_file_is_not_called_a_change(netns, nettrace):
    """A second write() on one open file, or a pwrite at an offset: under
    kernel.sysctl_writes_strict=1 most numeric settings ignore what comes
    past the start (IPv6's hop_limit kept the first value): the event says
    where it wrote, and not that it changed anything."""
    needs_sysctl_probe(nettrace)
    netns.add_dummy("eth1")
    hop_limit, ttl = "/proc/sys/net/ipv6/conf/eth1/hop_limit", "/proc/sys/net/ipv4/ip_default_ttl"
    r = netns.run(script(f"""
        import os
        for path in ({hop_limit!r}, {ttl!r}):
            fd = os.open(path, os.O_WRONLY)
            os.write(fd, b"33")
            os.write(fd, b"44\\n")
            os.close(fd)
            fd = os.open(path, os.O_WRONLY)
            os.pwrite(fd, b"55\\n", 5)
            os.close(fd)
            print(open(path).read().strip())
    """), check=True)
    kept = r.stdout.split()
    assert kept[0] == "33"   # hop_limit ignored what came past the start
    hop = nettrace.sysctl_writes(name="net.ipv6.conf.eth1.hop_limit")
    assert [(w.new, w.offset, w.changed, w.ret) for w in hop] == [
        ("33", 0, True, 2), ("44", 2, None, 3), ("55", 5, None, 3)]
    assert hop[1].describe().startswith("wrote net.ipv6.conf.eth1.hop_limit=44 at offset 2 (was ")
    nettrace.assert_none("sysctl", name="net.ipv6.conf.eth1.hop_limit", changed=True, new="44")
    # 6.18's u8 handler leaves the file's position at 0: there the second write
    # is one at the start, and the kernel took it; the offset says which
    ttl = nettrace.sysctl_writes(name="net.ipv4.ip_default_ttl")
    second = ttl[1]
    assert (second.new, second.changed, kept[1]) in (("44", True, "44"), ("44", None, "33")), (second, kept)
    assert (second.offset == 0) == (kept[1] == "44")
    assert all(w.changed is None for w in ttl + hop if w.offset)


@pytest.mark.nettrace(forbid=["sysctl"])
def test_gate_word_sysctl_passes_without_writes(netns, nettrace):
    needs_sysctl_probe(nettrace)
    netns.run(["sysctl", "-n", "net.ipv4.ip_forward"], check=True)  # a read is not a write
    assert nettrace.sysctl_writes() == []


def test_disable_ipv6_cause_without_the_sysctl_probe(pytester):
    # a kernel or host without the cgroup sysctl hook: the deletion is still a
    # sysctl write's doing (told from the stack), only the value is unknown
    pytester.makepyfile("""
        def test_it(netns, nettrace):
            netns.add_dummy("v0", "2001:db8::5/64")
            r = netns.run(["sysctl", "-qw", "net.ipv6.conf.v0.disable_ipv6=1"], check=True)
            ev = nettrace.assert_address_deleted("2001:db8::5/64")
            assert (ev.pid, ev.cause, ev.detail) == (r.pid, "sysctl", "a write to disable_ipv6"), ev.stack
            try:
                nettrace.sysctl_writes()
            except Exception as e:
                assert "sysctl" in str(e) and "nettrace_probes" in str(e), e
            else:
                raise AssertionError("asking for a left-out kind must fail")
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", "--nettrace-probes=-sysctl")
    result.assert_outcomes(passed=1)


# -- nftables rulesets ----------------------------------------------------------

needs_nft = pytest.mark.skipif(shutil.which("nft") is None, reason="nft (Debian package nftables) is not installed")


class NftMonitor(IpMonitor):
    """`nft -a monitor` in a namespace, known to be subscribed (it saw a
    marker table come and go)."""

    def __init__(self, ns) -> None:
        self.proc = ns.popen(["nft", "-a", "monitor"], stdout=subprocess.PIPE)
        self.fd = self.proc.stdout.fileno()
        self.lines = []
        self._partial = b""
        for _ in range(100):
            ns.run(["nft", "add table ip nt_marker; delete table ip nt_marker"], check=True)
            if self.readable(0.05):
                self.read(r"^delete table ip nt_marker")
                self.read(r"^# new generation")
                self.lines.clear()
                return
        raise AssertionError("nft monitor never saw the marker table")


def by(pid: int) -> str:
    """How `nft monitor` names the process that committed: the kernel puts its
    pid in the initial pid namespace there, which inside a container is not
    the one events show (and cannot be mapped once the process is gone)."""
    initial = os.stat("/proc/self/ns/pid").st_ino == 0xEFFFFFFC  # PROC_PID_INIT_INO
    return str(pid) if initial else r"\d+"


@pytest.mark.smoke
@needs_nft
def test_nft_ruleset_changes_attributed_with_handle_and_text(netns, nettrace):
    mon = NftMonitor(netns)
    since = time.monotonic_ns()
    t = netns.run(["nft", "add table inet filter"], check=True)
    c = netns.run(["nft", "add chain inet filter input { type filter hook input priority 0; policy accept; }"],
                  check=True)
    r = netns.run(["nft", "add rule inet filter input ip saddr 10.0.0.2 tcp dport 22 counter drop"], check=True)
    table = nettrace.assert_any("nft", object="table", action="added", timestamp=lambda ts: ts > since)
    assert (table.pid, table.comm, table.cause, table.family, table.table) == (t.pid, "nft", "netlink", "inet",
                                                                                "filter")
    chain = nettrace.assert_any("nft", object="chain", chain="input", timestamp=lambda ts: ts > since)
    assert chain.pid == c.pid and chain.text == "type filter hook input priority 0; policy accept;"
    rule = nettrace.assert_any("nft", object="rule", action="added", table="filter", chain="input")
    assert (rule.pid, rule.handle, rule.user) == (r.pid, 2, "root")
    assert rule.text == "ip saddr 10.0.0.2 tcp dport 22 counter packets 0 bytes 0 drop"
    assert rule.cmdline == "nft add rule inet filter input ip saddr 10.0.0.2 tcp dport 22 counter drop"
    assert any(f.startswith("nf_tables_commit") or f.startswith("nfnetlink_rcv_batch") for f in rule.stack)
    # nft monitor printed the same rule, and the pid of the process that committed it
    lines = mon.read(rf"^# new generation \d+ by process {by(r.pid)} ")
    assert f"add rule inet filter input {rule.text} # handle 2" in lines, lines
    assert rule.describe() == f"add rule inet filter input {rule.text} # handle 2"
    assert any(re.search(rf"by process {by(t.pid)} \(nft\)", line) for line in lines), lines


@needs_nft
def test_nft_flush_ruleset_in_a_post_install_script_attributed(netns, nettrace, tmp_path):
    netns.run(["nft", "add table inet filter; add chain inet filter input { type filter hook input priority 0; }; "
                      "add rule inet filter input tcp dport 22 accept; "
                      "add set inet filter blocked { type ipv4_addr; elements = { 10.0.0.7 } }"], check=True)
    mon = NftMonitor(netns)
    postinst = tmp_path / "postinst"
    postinst.write_text("#!/bin/sh\nnft flush ruleset\n")
    postinst.chmod(0o755)
    since = time.monotonic_ns()  # (after the monitor's marker)
    r = netns.run([str(postinst)], check=True)
    gone = nettrace.events("nft", action="deleted", timestamp=lambda ts: ts > since)
    assert [(e.object, e.name or e.handle) for e in gone] == [
        ("rule", 2), ("set", "blocked"), ("chain", "input"), ("table", "filter")], [e.summary() for e in gone]
    nft_pid = gone[0].pid
    assert all(e.pid == nft_pid and e.comm == "nft" and e.cmdline == "nft flush ruleset" for e in gone)
    assert gone[0].ppid == r.pid and gone[0].parent_comm == "postinst"
    assert gone[0].text == "tcp dport 22 accept"
    lines = mon.read(rf"^# new generation \d+ by process {by(nft_pid)} \(nft\)")
    assert "delete table inet filter # handle 1" in lines and "delete rule inet filter input handle 2" in lines
    added = nettrace.assert_any("nft", object="element", action="added")
    assert (added.set, added.text) == ("blocked", "10.0.0.7")
    with pytest.raises(AssertionError, match="expected no nft events"):
        nettrace.assert_none("nft", action="deleted", object="table", table="filter")
    with pytest.raises(ValueError, match="unknown action 'flushed' for 'nft' events; valid: added, deleted"):
        nettrace.assert_none("nft", action="flushed")
    with pytest.raises(ValueError, match="unknown object 'tabel' for 'nft' events; valid: table, chain, rule"):
        nettrace.assert_none("nft", object="tabel")


@needs_nft
def test_gate_nft_deleted_names_who_flushed(pytester):
    pytester.makepyfile("""
        import pytest

        @pytest.mark.nettrace(forbid=["nft:deleted"])
        def test_it(netns, nettrace):
            netns.run(["nft", "add table ip t; add chain ip t c"], check=True)
            netns.run(["nft", "flush ruleset"], check=True)
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1, errors=1)  # a gate fails the test's teardown
    out = result.stdout.str()
    assert "forbidden events in this test (forbid=nft:deleted)" in out and "nft:deleted: 2 events" in out, out
    assert re.search(r"nft\(\d+\) uid 0 \[parent python\S*\(\d+\)\] delete chain ip t c # handle 1", out), out


@needs_nft
def test_nft_json_fields(netns, nettrace):
    netns.run(["nft", "add table ip t; add chain ip t c; add rule ip t c oifname \"eth0\" meta nftrace set 1"],
              check=True)
    d = nettrace.assert_any("nft", object="rule").as_dict()
    assert (d["object"], d["family"], d["table"], d["chain"], d["handle"]) == ("rule", "ip", "t", "c", 2)
    assert d["text"] == 'oifname "eth0" meta nftrace set 1' and d["comm"] == "nft" and d["cause"] == "netlink"


# -- which nftables rule dropped a packet ----------------------------------------

SEND_UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 4242))
s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
"""


def counters(ns) -> dict:
    """handle -> packets of each rule with a counter, as `nft -a list ruleset` shows them."""
    out = ns.run(["nft", "-a", "list", "ruleset"], check=True).stdout
    return {int(h): int(p) for p, h in re.findall(r"counter packets (\d+) bytes \d+ .*# handle (\d+)", out)}


@pytest.mark.smoke
@needs_nft
@pytest.mark.nettrace(nft_trace=True)
def test_drop_joined_to_the_rule_that_decided_it(pair, nettrace):
    a, b = pair
    b.run(["nft", "add table inet filter; add chain inet filter input { type filter hook input priority 0; }; "
                  "add rule inet filter input udp dport 53 counter accept; "
                  "add rule inet filter input ip saddr 10.0.0.1 udp dport 9 counter drop"], check=True)
    a.run([sys.executable, "-c", SEND_UDP, "10.0.0.2", "9"], check=True)
    drop = nettrace.wait_for("drop", netns=b.inode, reason="NETFILTER_DROP", dport=9)
    verdict = nettrace.dropped_by(drop)
    assert verdict is not None, nettrace.events("nftrace")
    assert (verdict.table, verdict.chain, verdict.handle, verdict.family, verdict.policy) == (
        "filter", "input", 3, "inet", False)
    assert verdict.rule == "ip saddr 10.0.0.1 udp dport 9 counter drop"
    assert (str(verdict.saddr), verdict.sport, verdict.dport, verdict.ip_proto) == ("10.0.0.1", 4242, 9, "udp")
    assert verdict.timestamp == drop.timestamp and verdict.netns == b.inode
    assert "dropped by rule inet filter input handle 3: ip saddr 10.0.0.1" in verdict.summary()
    # nft's own counters agree: that rule, not the other, matched one packet
    assert counters(b) == {2: 0, 3: 1}
    assert nettrace.assert_any("nftrace", handle=3) is verdict
    d = verdict.as_dict()
    assert d["drop"] == drop.location and d["rule"] == verdict.rule and d["saddr"] == "10.0.0.1"
    # the plugin's own tracing table is in the ruleset while the test runs, in the background
    ours = nettrace.nft_changes(table="nettrace_trace")
    assert ours and all(e.background and e.pid == os.getpid() for e in ours)


@needs_nft
def test_policy_drop_and_the_tracing_table_removed_afterwards(pytester):
    name = f"nt-nftrace-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "nft",
                        "add table ip t; add chain ip t out { type filter hook output priority 0; policy drop; }"],
                       check=True)
        pytester.makepyfile(f"""
            import subprocess

            def test_it(nettrace):
                nettrace.trace_nft("{name}")
                out = subprocess.run(["ip", "netns", "exec", "{name}", "nft", "list", "tables"],
                                     capture_output=True, text=True, check=True).stdout
                assert "table inet nettrace_trace" in out
                subprocess.run(["ip", "netns", "exec", "{name}", "ip", "link", "set", "lo", "up"], check=True)
                subprocess.run(["ip", "netns", "exec", "{name}", "python3", "-c",
                                "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                                ".sendto(b'x', ('127.0.0.1', 7))"])
                v = nettrace.wait_for("nftrace", dport=7)
                assert v.policy and v.handle is None and (v.table, v.chain, v.family) == ("t", "out", "ip")
                assert v.describe().startswith("dropped by policy of ip t out")
                assert v.drop is not None and v.comm == "python3", "sent by python3, dropped in its context"
        """)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
        result.assert_outcomes(passed=1)
        out = subprocess.run(["ip", "netns", "exec", name, "nft", "list", "tables"], capture_output=True,
                             text=True, check=True).stdout
        assert out.split("\n")[:1] == ["table ip t"] and "nettrace_trace" not in out, out
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@needs_nft
@pytest.mark.nettrace(nft_trace=True)
def test_tracing_survives_a_ruleset_flush(netns, nettrace):
    # the tracing table is owned by the plugin's socket: `nft flush ruleset`
    # leaves it (and the test's own view of the flush is unchanged: it succeeds)
    netns.run(["nft", "flush ruleset"], check=True)
    assert netns.run(["nft", "list", "tables"], check=True).stdout.split() == ["table", "inet", "nettrace_trace"]
    netns.run(["nft", "add table ip t; add chain ip t out { type filter hook output priority 0; }; "
                      "add rule ip t out udp dport 7 drop"], check=True)
    netns.run([sys.executable, "-c", SEND_UDP, "127.0.0.1", "7"])
    v = nettrace.wait_for("nftrace", dport=7)
    assert (v.table, v.chain, v.handle, v.rule) == ("t", "out", 2, "udp dport 7 drop")
    assert v.drop is not None and v.pid == v.drop.pid and v.comm == os.path.basename(sys.executable)[:15]


@needs_nft
def test_tracing_table_goes_with_a_killed_session(pytester):
    name = f"nt-nftkill-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        pytester.makepyfile(f"""
            import os, signal, subprocess

            def test_killed(nettrace):
                nettrace.trace_nft("{name}")
                out = subprocess.run(["ip", "netns", "exec", "{name}", "nft", "list", "tables"],
                                     capture_output=True, text=True).stdout
                assert "nettrace_trace" in out
                os.kill(os.getpid(), signal.SIGKILL)
        """)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
        assert result.ret == -9 or result.ret not in (0, 1), result.ret  # killed mid-test
        out = subprocess.run(["ip", "netns", "exec", name, "nft", "list", "tables"], capture_output=True,
                             text=True, check=True).stdout
        assert "nettrace_trace" not in out, out
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_trace_nft_refuses_the_host_ruleset(nettrace):
    with pytest.raises(Exception, match="does not add rules to the host's own ruleset"):
        nettrace.trace_nft("/proc/self/ns/net")


@pytest.mark.parametrize("change, detail", [
    ("addr del 10.0.0.1/24 dev eth0", "the link's last IPv4 address was removed"),
    ("link set eth0 address 02:00:00:00:00:77", "the link's hardware address changed"),
    ("link set eth0 arp off", "the link's NOARP flag changed (arp on/off)"),   # the same flush, no new address
])
def test_neighbours_flushed_by_other_changes_than_a_link_down_say_which(make_netns, nettrace, change, detail):
    """The kernel flushes a link's neighbour entries when it goes down, but
    also when its last IPv4 address goes or its hardware address changes:
    the link stays up, and the entry's deletion says what did it."""
    a, b = make_netns(), make_netns()
    a.add_veth("eth0", b, "eth0", addresses=["10.0.0.1/24"], peer_addresses=["10.0.0.2/24"])
    a.run(["ip", "neigh", "add", "10.0.0.9", "lladdr", "02:00:00:00:00:09", "dev", "eth0", "nud", "stale"],
          check=True)
    r = a.run(["ip"] + change.split(), check=True)
    ev = nettrace.assert_any("neigh", action="deleted", address="10.0.0.9")
    assert (ev.cause, ev.detail, ev.pid) == ("kernel", detail, r.pid)
    assert nettrace.link_changes(action="down", netns=a.inode) == []


NFT_RULES = [
    "meta length > 500 drop", "udp dport 53 meta length < 100 accept", "meta skuid 1000 drop",
    "tcp flags syn drop", "tcp flags & (syn|ack) == syn drop", "tcp dport 1001 reject with tcp reset",
    "ip6 nexthdr icmpv6 icmpv6 type echo-request accept", "icmp type echo-request accept", "reject",
    "reject with icmpx type admin-prohibited", "meta nfproto ipv4 reject with icmp type host-unreachable",
    "ip protocol udp drop", "ip saddr 10.0.0.0/8 tcp dport 22 counter accept", "iifname \"lo\" accept",
    "ct state established,related accept", "ip daddr 192.168.4.0/23 drop", "ip6 saddr 2001:db8::/33 drop",
    "tcp dport 1024-65535 accept", "limit rate 5/second accept", "limit rate over 10/minute burst 20 packets drop",
    "quota over 10 mbytes drop", 'log prefix "web: " level info', "ct mark 0x00000001 accept",
    "ct status dnat accept", "meta pkttype broadcast drop", "th dport 53 accept", "meta l4proto { tcp, udp } accept",
    "tcp dport { 22, 80, 1000-2000 } accept", "ip saddr { 10.0.0.0/8, 192.168.1.1 } drop",
    "tcp dport vmap { 80 : accept, 443 : drop }", "tcp dport vmap @ports", "ip saddr . tcp dport @pairs drop",
]


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (ci/apt-packages.txt)")
def test_rule_text_is_what_nft_list_prints(netns, nettrace):
    """Each rule's `text` is the line `nft list chain` prints for it: ranges
    on host-order values (meta length), masked flags, reject's answers,
    ICMP types, a protocol match written by hand, port ranges, limits,
    quotas, ct marks and status, anonymous sets and verdict maps inline,
    named maps and concatenations."""
    netns.run(["nft", "add table inet fw; add chain inet fw c { type filter hook input priority 0; }; "
               "add map inet fw ports { type inet_service : verdict; }; "
               "add set inet fw pairs { type ipv4_addr . inet_service; }"], check=True)
    for rule in NFT_RULES:
        netns.run(["nft", f"add rule inet fw c {rule}"], check=True)
    listed = netns.run(["nft", "list", "chain", "inet", "fw", "c"], check=True).stdout.splitlines()[3:-2]
    theirs = [" ".join(line.split()) for line in listed]
    ours = [e.text for e in nettrace.nft_changes(object="rule", action="added")]
    assert len(theirs) == len(NFT_RULES)
    assert ours == theirs


RULESET_A = """table inet fw {
  chain c {
    type filter hook input priority 0;
    udp dport 3001 drop
  }
}
"""
UDP_TO = "import socket, sys; socket.socket(2, 2).sendto(b'x', ('10.0.0.2', int(sys.argv[1])))"


@pytest.mark.nettrace(nft_trace=True)
@pytest.mark.parametrize("read_between", [True, False])
def test_a_verdict_names_the_rule_it_had_when_traced(make_netns, nettrace, read_between):
    """`flush ruleset` and the ruleset loaded again reuse rule handles: each
    verdict names the rule that had its handle when the packet was traced,
    whether it was read before the reload or after."""
    a, b = make_netns(), make_netns()
    a.add_veth("eth0", b, "eth0", addresses=["10.0.0.1/24"], peer_addresses=["10.0.0.2/24"])
    b.run(["nft", "-f", "-"], input=RULESET_A, check=True)
    a.run([sys.executable, "-c", UDP_TO, "3001"], check=True)
    if read_between:
        assert nettrace.dropped_by(nettrace.wait_for("drop", reason="NETFILTER_DROP", dport=3001)).rule == \
            "udp dport 3001 drop"
    b.run(["nft", "-f", "-"], input="flush ruleset\n" + RULESET_A.replace("3001", "3002"), check=True)
    a.run([sys.executable, "-c", UDP_TO, "3002"], check=True)
    first = nettrace.dropped_by(nettrace.wait_for("drop", reason="NETFILTER_DROP", dport=3001))
    second = nettrace.dropped_by(nettrace.wait_for("drop", reason="NETFILTER_DROP", dport=3002))
    assert first.handle == second.handle
    assert (first.rule, second.rule) == ("udp dport 3001 drop", "udp dport 3002 drop")


OTHER_FAMILIES = """table ip nat {
  chain pre {
    type nat hook prerouting priority dstnat;
    tcp dport 8080 dnat to 10.0.0.2:80
  }
  chain post {
    type nat hook postrouting priority srcnat;
    oifname "eth0" snat to 10.1.1.1
  }
}
table netdev n {
  chain ing {
    type filter hook ingress device "lo" priority 0;
    ip saddr 1.2.3.4 drop
    ip protocol udp drop
  }
}
table bridge b {
  chain f {
    type filter hook forward priority 0;
    ether type arp accept
  }
}
"""


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (ci/apt-packages.txt)")
def test_nat_netdev_bridge_rules_and_interval_elements_read_as_nft_prints_them(netns, nettrace):
    """NAT targets, a netdev or bridge table's header matches (whose
    protocol match nft leaves implicit), and an interval set's elements: one
    prefix or range each, as `nft monitor` announces them, though the kernel
    announces each interval as a start and an end."""
    netns.run(["nft", "-f", "-"], input=OTHER_FAMILIES, check=True)
    listed = [" ".join(line.split()) for table in ("ip nat", "netdev n", "bridge b")
              for line in netns.run(["nft", "list", "table", *table.split()], check=True).stdout.splitlines()
              if line.startswith("\t\t") and not line.strip().startswith("type ")]
    assert [e.text for e in nettrace.nft_changes(object="rule")] == listed and len(listed) == 5
    netns.run(["nft", "add table inet g; add set inet g allowed { type ipv4_addr; flags interval; "
               "elements = { 10.0.0.0/24, 192.168.1.5, 10.9.0.0-10.9.0.5 } }"], check=True)
    netns.run(["nft", "add element inet g allowed { 172.16.0.0/16 }"], check=True)
    netns.run(["nft", "delete element inet g allowed { 192.168.1.5 }"], check=True)
    elements = [(e.action, e.text) for e in nettrace.nft_changes(object="element")]
    assert elements == [("added", "10.0.0.0/24"), ("added", "10.9.0.0-10.9.0.5"), ("added", "192.168.1.5"),
                        ("added", "172.16.0.0/16"), ("deleted", "192.168.1.5")]
    assert "10.0.0.0/24" in netns.run(["nft", "list", "set", "inet", "g", "allowed"], check=True).stdout


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (ci/apt-packages.txt)")
def test_a_replaced_rule_is_the_old_deleted_and_the_new_added(netns, nettrace):
    """The kernel announces `nft replace rule` as nft monitor prints it: the
    old rule deleted, the new one added (it has no word for a replacement)."""
    netns.run(["nft", "add table inet f; add chain inet f c { type filter hook input priority 0; }; "
               "add rule inet f c tcp dport 22 accept"], check=True)
    handle = nettrace.assert_any("nft", object="rule").handle
    netns.run(["nft", "replace", "rule", "inet", "f", "c", "handle", str(handle), "tcp", "dport", "2222", "accept"],
              check=True)
    assert [(e.action, e.text) for e in nettrace.nft_changes(object="rule")] == [
        ("added", "tcp dport 22 accept"), ("deleted", "tcp dport 22 accept"), ("added", "tcp dport 2222 accept")]
    with pytest.raises(ValueError, match="replaced"):
        nettrace.nft_changes(action="replaced")

"""Address and route changes against `ip monitor`, an independent observer
of the same kernel notifications: every line it prints between two
sentinels is one of the plugin's events, field for field, and nothing more."""
from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import threading
from collections import Counter

import pytest

from traffic import script

pytestmark = pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")

_ADDR = re.compile(r"^(Deleted )?\d+: (\S+?)(?:@\S+)?\s+(inet6?) (\S+) .*?(?:\s(\S+))?\\")
_ROUTE = re.compile(r"^(Deleted )?(?:(local|broadcast|multicast|anycast|unreachable|blackhole|prohibit) )?"
                    r"(\S+)(?: via (?:inet6 )?(\S+))? dev (\S+)(?: table (\S+))?")
END = "198.51.100.2/32"


class Monitor:
    """`ip -o monitor address route` (or `objects`) in a namespace, read line by line."""

    def __init__(self, ns, objects=("address", "route")):
        self.proc = ns.popen(["ip", "-o", "monitor", *objects], stdout=subprocess.PIPE, text=True)
        self.lines = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def until(self, pattern: str, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: any(pattern in ln for ln in self.lines), timeout)

    def start(self, ns) -> str:
        """A sentinel address ip monitor printed: from its line on, it sees
        everything (it subscribes some time after it started)."""
        for n in range(10, 60):
            begin = f"198.51.100.{n}/32"
            ns.run(["ip", "addr", "add", begin, "dev", "lo"], check=True)
            if self.until(begin.split("/")[0] + "/32", 0.5):
                return begin
        raise AssertionError(f"ip monitor printed nothing: {self.lines[-5:]}")

    def parsed(self, begin: str):
        """(kind, key) of each line from the `begin` sentinel's to before the END one's."""
        out = []
        started = False
        for ln in self.lines:
            m = _ADDR.match(ln)
            if m:
                deleted, dev, fam, addr, label = m.groups()
                if addr == begin and not deleted:
                    started = True
                if addr == END:
                    break
                if started:
                    out.append(("addr", "deleted" if deleted else "added", ipaddress.ip_interface(addr), dev,
                                label if fam == "inet" else None))
                continue
            m = _ROUTE.match(ln)
            assert m, f"cannot parse ip monitor line {ln!r}"
            if not started:
                continue
            deleted, rtype, dst, via, dev, table = m.groups()
            out.append(("route", "deleted" if deleted else "added", rtype or "unicast",
                        ipaddress.ip_network(dst if dst != "default" else ("::/0" if via and ":" in via
                                                                          else "0.0.0.0/0")),
                        via and ipaddress.ip_address(via), dev, table or "main"))
        return out


def _ours(events, begin: str):
    out = []
    started = False
    for e in events:
        if e.kind == "addr" and str(e.address) == begin:
            started = True
        if e.kind == "addr" and str(e.address) == END:
            break
        if not started:
            continue
        if e.kind == "addr":
            out.append(("addr", e.action, e.address, e.dev, e.label))
        elif e.kind == "route":
            out.append(("route", e.action, e.type, e.dst, e.gateway, e.dev, str(e.table)))
    return out


def test_address_and_route_changes_match_ip_monitor(make_netns, nettrace):
    ns, peer = make_netns(), make_netns()
    mon = Monitor(ns)
    try:
        begin = mon.start(ns)
        ns.add_veth("d1", peer, "p1")
        for argv in (
            "addr add 192.168.2.1/24 dev d1",
            "addr add 192.168.2.247/24 dev d1 label d1:1",    # an alias: dev d1, label d1:1
            "addr add fd00::5/64 dev d1 nodad",
            "addr add 2001:db8::9/64 dev d1 nodad",
            "route add 10.9.0.0/16 via 192.168.2.2",
            "route add 10.8.0.0/16 dev d1 table 100",
            "route add default via 192.168.2.254",
            "-6 route add 2001:db8:1::/48 via fd00::1",
            "route del 10.9.0.0/16",
            "addr del 192.168.2.247/24 dev d1",
            "link set d1 down",                               # IPv6 addresses and routes go
            "link set d1 up",
            "addr del 192.168.2.1/24 dev d1",                 # its routes go
            "link del d1",
        ):
            ns.run(["ip"] + argv.split(), check=True)
        ns.run(["ip", "addr", "add", END, "dev", "lo"], check=True)
        assert mon.until(END.split("/")[0] + "/32"), f"ip monitor printed no {END}: {mon.lines[-5:]}"
    finally:
        mon.proc.terminate()
        mon.proc.wait(5)
    theirs = mon.parsed(begin)
    ours = _ours(nettrace.events(netns=ns.inode), begin)
    assert nettrace.lost() == 0
    assert len(theirs) > 30, theirs          # the workload did what it should
    # the same changes, each with the same fields (order across CPUs may differ)
    assert Counter(ours) == Counter(theirs), (sorted(Counter(ours) - Counter(theirs), key=str),
                                              sorted(Counter(theirs) - Counter(ours), key=str))
    # and in the same order where the kernel sent them one after another
    assert [t[:4] for t in ours] == [t[:4] for t in theirs]


# `ip -o monitor link neigh rule` lines. An interface's own link messages
# carry its qdisc; a bridge port's (AF_BRIDGE, `bridge monitor link`) do not,
# and neither do bridge forwarding entries' neigh lines an address.
_LINK = re.compile(r"^(Deleted )?\d+: ([^:@\s]+)(?:@\S+)?: <[^>]*> .* qdisc ")
_BRIDGE_PORT = re.compile(r"^(Deleted )?\d+: ([^:@\s]+): <[^>]*> .* master ")
_NEIGH = re.compile(r"^(Deleted )?(?:(\S+) )?dev (\S+)")
_RULE = re.compile(r"^(Deleted )?(\d+):\t")


def test_link_neighbour_and_rule_changes_match_ip_monitor(make_netns, nettrace):
    """Interfaces (veth, bridge, macvlan; mtu, address, name, up/down, a
    bridge port joining and leaving), neighbour entries (by hand and by ARP)
    and policy rules: every line of `ip monitor link neigh rule` between two
    sentinel rules is one event (a bridge port's own notifications and
    forwarding entries are no link or neigh events), and nothing more."""
    ns, peer = make_netns(), make_netns()
    mon = Monitor(ns, ("link", "neigh", "rule"))
    try:
        for n in range(10, 60):   # ip monitor subscribes some time after it starts
            ns.run(["ip", "rule", "add", "pref", str(10000 + n), "from", f"198.51.100.{n}", "lookup", "main"],
                   check=True)
            if mon.until(f"from 198.51.100.{n} ", 0.5):
                begin = 10000 + n
                break
        else:
            raise AssertionError(f"ip monitor printed nothing: {mon.lines[-5:]}")
        ns.add_veth("d1", peer, "p1", addresses=["192.168.2.1/24"], peer_addresses=["192.168.2.2/24"])
        ns.run(script("""
            import socket
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("192.168.2.2", 9))
        """), check=True)   # ARP: an entry the kernel makes and resolves
        for argv in (
            "neigh add 192.168.2.5 lladdr 02:00:00:00:00:05 dev d1 nud permanent",
            "neigh change 192.168.2.5 lladdr 02:00:00:00:00:06 dev d1",
            "neigh replace 192.168.2.6 lladdr 02:00:00:00:00:07 dev d1 nud stale",
            "neigh del 192.168.2.5 dev d1",
            "-6 neigh add fd00::7 lladdr 02:00:00:00:00:08 dev d1",
            "neigh flush dev d1 nud stale",
            "rule add from 10.0.0.0/8 table 100 pref 100",
            "rule add fwmark 0x10/0xff lookup 200 pref 200",
            "rule add not to 10.1.0.0/16 prohibit pref 300",
            "rule del pref 100",
            "-6 rule add from 2001:db8::/32 table 7 pref 400",
            "link set d1 mtu 1400",
            "link set d1 down",
            "link set d1 name e1",
            "link set e1 address 02:11:22:33:44:55",
            "link set e1 up",
            "link add br0 type bridge",
            "link set e1 master br0",
            "link set e1 nomaster",
            "link del br0",
            "link add mv0 link e1 type macvlan mode bridge",
            "link set mv0 up",
            "link del mv0",
        ):
            ns.run(["ip"] + argv.split(), check=True)
        ns.run(["ip", "rule", "add", "pref", "19999", "from", "198.51.100.2", "lookup", "main"], check=True)
        assert mon.until("from 198.51.100.2 "), f"ip monitor printed no end sentinel: {mon.lines[-5:]}"
    finally:
        mon.proc.terminate()
        mon.proc.wait(5)
    theirs, bridge_ports, started = [], 0, False
    for ln in mon.lines:
        m = _RULE.match(ln)
        if m:
            if int(m[2]) == begin:
                started = True
                continue
            if int(m[2]) == 19999:
                break
        if not started:
            continue
        if m:
            theirs.append(("rule", bool(m[1]), int(m[2])))
        elif _LINK.match(ln):
            m = _LINK.match(ln)
            theirs.append(("link", bool(m[1]), m[2]))
        elif _BRIDGE_PORT.match(ln):
            bridge_ports += 1
        else:
            m = _NEIGH.match(ln)
            assert m, f"cannot parse ip monitor line {ln!r}"
            if m[2]:   # (no address: a bridge forwarding entry)
                theirs.append(("neigh", bool(m[1]), ipaddress.ip_address(m[2]), m[3]))
    ours, started = [], False
    for e in nettrace.events(netns=ns.inode):
        if e.kind == "rule" and e.priority == begin:
            started = True
            continue
        if e.kind == "rule" and e.priority == 19999:
            break
        if not started:
            continue
        if e.kind == "rule":
            ours.append(("rule", e.action == "deleted", e.priority))
        elif e.kind == "link":
            ours.append(("link", e.action == "deleted", e.dev))
        elif e.kind == "neigh":
            ours.append(("neigh", e.action == "deleted", e.address, e.dev))
    assert nettrace.lost() == 0
    # the workload did what it should
    assert bridge_ports > 0 and ("link", True, "mv0") in theirs and ("neigh", False,
                                                                   ipaddress.ip_address("192.168.2.2"), "d1") in theirs
    assert Counter(ours) == Counter(theirs), (sorted(Counter(ours) - Counter(theirs), key=str),
                                              sorted(Counter(theirs) - Counter(ours), key=str))
    assert ours == theirs

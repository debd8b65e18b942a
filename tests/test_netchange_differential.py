"""Address and route changes against `ip monitor`, an independent observer
of the same kernel notifications: every line it prints between two
sentinels is one of the plugin's events, field for field, and nothing more."""
from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import threading
import time
from collections import Counter

import pytest

from traffic import script

pytestmark = pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")

_ADDR = re.compile(r"^(Deleted )?\d+: (\S+?)(?:@\S+)?\s+(inet6?) (\S+) .*?(?:\s(\S+))?\\")
_ROUTE = re.compile(r"^(Deleted )?(?:(local|broadcast|multicast|anycast|unreachable|blackhole|prohibit) )?"
                    r"(\S+)(?: via (?:inet6 )?(\S+))? dev (\S+)(?: table (\S+))?")
_HOPS = re.compile(r"nexthop via (?:inet6 )?(\S+) dev (\S+) weight (\d+)")
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

    def rule_sentinel(self, ns) -> int:
        """The priority of a rule ip monitor printed (watching `rule`): from
        its line on, it sees everything (it subscribes some time after it
        started)."""
        for n in range(10, 60):
            ns.run(["ip", "rule", "add", "pref", str(10000 + n), "from", f"198.51.100.{n}", "lookup", "main"],
                   check=True)
            if self.until(f"from 198.51.100.{n} ", 0.5):
                return 10000 + n
        raise AssertionError(f"ip monitor printed nothing: {self.lines[-5:]}")

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
            hops = tuple((via, dev, int(w)) for via, dev, w in _HOPS.findall(ln))
            if hops:   # a multipath route: "10.70.0.0/16 \\tnexthop via … dev … weight 1 …"
                if started:
                    deleted, dst = ln.startswith("Deleted "), ln.removeprefix("Deleted ").split()[0]
                    table = re.search(r" table (\S+)", ln)
                    out.append(("route", "deleted" if deleted else "added", "unicast", ipaddress.ip_network(dst),
                                hops, None, table[1] if table else "main"))
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


def _between(events, first, last):
    """The events after the first for which `first` holds, up to the next for which `last` does."""
    started = False
    for e in events:
        if not started:
            started = first(e)
        elif last(e):
            return
        else:
            yield e


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
        if e.kind == "addr":   # ip monitor does not tell a change from an addition
            out.append(("addr", "deleted" if e.action == "deleted" else "added", e.address, e.dev, e.label))
        elif e.kind == "route" and e.nexthops:
            out.append(("route", e.action, e.type, e.dst, tuple((str(h.gateway), h.dev, h.weight) for h in e.nexthops),
                        None, str(e.table)))
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
            "route add 10.70.0.0/16 nexthop via 192.168.2.2 weight 1 nexthop via 192.168.2.3 weight 2",
            "-6 route add 2001:db8:2::/48 nexthop via fd00::2 nexthop via fd00::3 weight 3",
            "route del 10.9.0.0/16",
            "route del 10.70.0.0/16",
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
    assert nettrace.lost("addr") == nettrace.lost("route") == 0   # (other kinds' losses are not compared here)
    assert len(theirs) > 30, theirs          # the workload did what it should
    assert sum(t[0] == "route" and isinstance(t[4], tuple) for t in theirs) >= 3, theirs   # multipath, v4 and v6
    # the same changes, each with the same fields (order across CPUs may differ)
    assert Counter(ours) == Counter(theirs), (sorted(Counter(ours) - Counter(theirs), key=str),
                                              sorted(Counter(theirs) - Counter(ours), key=str))
    # and in the same order where the kernel sent them one after another
    assert [t[:4] for t in ours] == [t[:4] for t in theirs]


# `ip -o monitor link neigh rule` lines. An interface's own link messages
# carry its qdisc; a bridge port's (AF_BRIDGE, `bridge monitor link`) do not,
# and neither do bridge forwarding entries' neigh lines an address.
_LINK = re.compile(r"^(Deleted )?\d+: ([^:@\s]+)(?:@\S+)?: <([^>]*)> .* qdisc ")
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
        begin = mon.rule_sentinel(ns)
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
            "rule add ipproto tcp dport 22 table 100 pref 500",
            "rule add ipproto udp sport 1000-2000 table 100 pref 501",
            "rule add uidrange 1000-1999 tos 0x10 lookup main suppress_prefixlength 0 pref 502",
            "rule del pref 501",
            "rule add pref 0 from 10.8.0.0/16 table 6",      # the kernel's message has no priority then
            "rule del pref 0 from 10.8.0.0/16",
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
        if m:   # what follows "500:\t", as ours says it (ip shows a rule's protocol only when set)
            theirs.append(("rule", bool(m[1]), int(m[2]), " ".join(re.sub(r" proto \S+", "", ln[m.end():]).split())))
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
    ours = []
    for e in _between(nettrace.events(netns=ns.inode), lambda e: e.kind == "rule" and e.priority == begin,
                      lambda e: e.kind == "rule" and e.priority == 19999):
        if e.kind == "rule":
            ours.append(("rule", e.action == "deleted", e.priority, e.describe().split(": ", 1)[1]))
        elif e.kind == "link":
            ours.append(("link", e.action == "deleted", e.dev))
        elif e.kind == "neigh":
            ours.append(("neigh", e.action == "deleted", e.address, e.dev))
    assert nettrace.lost("link") == nettrace.lost("neigh") == nettrace.lost("rule") == 0
    # the workload did what it should
    assert bridge_ports > 0 and ("link", True, "mv0") in theirs and ("neigh", False,
                                                                   ipaddress.ip_address("192.168.2.2"), "d1") in theirs
    assert Counter(ours) == Counter(theirs), (sorted(Counter(ours) - Counter(theirs), key=str),
                                              sorted(Counter(theirs) - Counter(ours), key=str))
    assert ours == theirs
    assert [e.action for e in nettrace.rule_changes(priority=0, src="10.8.0.0/16")] == ["added", "deleted"]


def test_whose_link_changes_are_in_each_namespace_match_ip_monitor_and_the_requests(make_netns, nettrace):
    """Requests whose link changes reach other links, in the requester's
    namespace and another: veth ends deleted from either end and within one
    namespace, one end set down and up (its peer's carrier, by the kernel's
    linkwatch), a link moved to another namespace, ports joining a bridge
    and the bridge deleted, a macvlan's lower link deleted. Every line `ip
    monitor link` prints in each namespace is one event saying the same
    (deleted or not, up or not: a carrier lost is no "down"), and nothing
    more; each request's own changes are those of the links it named (a
    moved link's in its new namespace too; `ip link add` names a veth's
    peer), every other one the kernel's (strace: each request is one
    message naming one link)."""
    a, b = make_netns(), make_netns()
    mons = {a: Monitor(a, ("link", "rule")), b: Monitor(b, ("link", "rule"))}
    steps = []   # (its ip arguments, its process, the links it names as (namespace, name))

    def run(ns, argv, *named):
        steps.append((argv, ns.run(["ip"] + argv.split(), check=True), set(named)))

    def carrier(since, operstate, *links):
        """The kernel's linkwatch worker announced each link's carrier change
        (a moment after the request: the next one must not come first, or
        it announces both changes as one)."""
        for ns, dev in links:
            nettrace.wait_for("link", timeout=5, netns=ns.inode, dev=dev, action="changed", operstate=operstate,
                              timestamp=lambda t: t > since)

    try:
        begin = {ns: mon.rule_sentinel(ns) for ns, mon in mons.items()}
        run(a, f"link add v0 type veth peer v1 netns {b.name}", (a, "v0"), (b, "v1"))
        since = time.monotonic_ns()
        run(a, "link set v0 up", (a, "v0"))
        run(b, "link set v1 up", (b, "v1"))
        carrier(since, "UP", (a, "v0"), (b, "v1"))
        since = time.monotonic_ns()
        run(a, "link set v0 down", (a, "v0"))
        carrier(since, "DOWN", (b, "v1"))
        since = time.monotonic_ns()
        run(a, "link set v0 up", (a, "v0"))
        carrier(since, "UP", (a, "v0"), (b, "v1"))
        run(b, "link del v1", (b, "v1"))                      # the other end: v0 goes with it
        run(a, "link add s0 type veth peer s1", (a, "s0"), (a, "s1"))
        run(a, "link del s0", (a, "s0"))                      # both ends here: s1 goes
        run(a, "link add m0 type veth peer m1", (a, "m0"), (a, "m1"))
        run(a, "link set m0 up", (a, "m0"))
        run(a, f"link set m0 netns {b.name}", (a, "m0"), (b, "m0"))
        run(a, "link add br0 type bridge", (a, "br0"))
        run(a, f"link add p0 type veth peer p1 netns {b.name}", (a, "p0"), (b, "p1"))
        run(a, "link set p0 master br0", (a, "p0"))
        run(a, "link set m1 master br0", (a, "m1"))
        run(a, "link del br0", (a, "br0"))                    # its ports leave it
        run(a, "link add mv0 link p0 type macvlan mode bridge", (a, "mv0"))
        run(a, "link set mv0 up", (a, "mv0"))
        run(a, "link del p0", (a, "p0"))                      # mv0, and p1 over there, go with it
        for ns, mon in mons.items():
            ns.run(["ip", "rule", "add", "pref", "19999", "from", "198.51.100.2", "lookup", "main"], check=True)
            assert mon.until("from 198.51.100.2 "), f"ip monitor printed no end sentinel: {mon.lines[-5:]}"
    finally:
        for mon in mons.values():
            mon.proc.terminate()
            mon.proc.wait(5)
    assert nettrace.lost("link") == 0
    for ns, mon in mons.items():
        started, theirs = False, []
        for ln in mon.lines:
            m = _RULE.match(ln)
            if m and int(m[2]) == begin[ns]:
                started = True
            elif m and int(m[2]) == 19999:
                break
            elif started and _LINK.match(ln):
                m = _LINK.match(ln)
                theirs.append((bool(m[1]), m[2], "UP" in m[3].split(",")))
        ours = [(e.action == "deleted", e.dev, e.up)
                for e in _between(nettrace.events(netns=ns.inode),
                                  lambda e: e.kind == "rule" and e.priority == begin[ns],
                                  lambda e: e.kind == "rule" and e.priority == 19999) if e.kind == "link"]
        assert ours == theirs, (ns.name, sorted(Counter(ours) - Counter(theirs), key=str),
                                sorted(Counter(theirs) - Counter(ours), key=str))
    inodes = {a.inode: a, b.inode: b}
    said = []   # (request, namespace, link, action, cause)
    for argv, r, named in steps:
        mine = [(argv, inodes[e.netns], e.dev, e.action, e.cause) for e in nettrace.link_changes(pid=r.pid)]
        # each link it named changed at its request, and no other did (a named link may change by the
        # kernel's hand too: a port made promiscuous by the bridge it joins)
        assert {(ns, dev) for _argv, ns, dev, _action, cause in mine if cause == "netlink"} == named, mine
        said += mine
    # the workload did what it should: the kernel changed other links under these requests
    kernels = {(argv, ns, dev, action) for argv, ns, dev, action, cause in said if cause == "kernel"}
    assert {("link del v1", a, "v0", "down"), ("link del v1", a, "v0", "deleted"),
            ("link del s0", a, "s1", "deleted"), ("link del br0", a, "p0", "changed"),
            ("link del br0", a, "m1", "changed"), ("link del p0", a, "mv0", "down"),
            ("link del p0", a, "mv0", "deleted"), ("link del p0", b, "p1", "deleted")} <= kernels, kernels
    moved = {(ns, action) for argv, ns, dev, action, cause in said if argv == f"link set m0 netns {b.name}"}
    assert moved == {(a, "down"), (a, "deleted"), (b, "added")}, moved
    # and a carrier lost or regained is no request's: the linkwatch worker's
    v1 = [(e.operstate, e.up, e.pid, e.cause) for e in nettrace.link_changes(dev="v1", action="changed")]
    assert ("DOWN", True, None, "kernel") in v1 and ("UP", True, None, "kernel") in v1, v1


# `ip -o monitor nexthop route` lines: a nexthop's ("id 10 group 1,3/2",
# "Deleted id 3 blackhole") and a route's ("10.9.0.0/16 nhid 10 …").
_NH = re.compile(r"^(Deleted )?id (\d+) ")
_NH_TOKENS = re.compile(r"\b(group|via|dev) (\S+)|\b(blackhole|resilient)\b")
_NH_ROUTE = re.compile(r"^(Deleted )?(?:(?:local|broadcast|multicast|anycast|unreachable|blackhole|prohibit) )?"
                       r"(\S+)(?: nhid (\d+))?")


def _nexthop_tokens(text: str):
    """What a nexthop line says, however it is worded around it."""
    return tuple(sorted((m[1] or m[3], m[2]) for m in _NH_TOKENS.finditer(text)))


def test_nexthop_changes_match_ip_monitor(make_netns, nettrace):
    """Nexthop objects (single, v4/v6 gateways, blackhole, multipath and
    resilient groups; replaced, a new id by `replace`, a member deleted,
    flushed) and the routes using them: every line of `ip monitor nexthop
    route` between two sentinel nexthops is one event saying the same, and
    nothing more; the kernel's silent removals (a device going down) are
    silent in both."""
    ns, peer = make_netns(), make_netns()
    ns.run(["ip", "link", "set", "lo", "up"], check=True)   # a blackhole nexthop needs it
    mon = Monitor(ns, ("nexthop", "route"))
    try:
        for n in range(9010, 9060):   # ip monitor subscribes some time after it starts
            ns.run(["ip", "nexthop", "add", "id", str(n), "blackhole"], check=True)
            if mon.until(f"id {n} blackhole", 0.5):
                begin = n
                break
        else:
            raise AssertionError(f"ip monitor printed nothing: {mon.lines[-5:]}")
        ns.add_veth("d1", peer, "p1", addresses=["192.168.2.1/24"])
        ns.run(["ip", "addr", "add", "fd00::1/64", "dev", "d1", "nodad"], check=True)
        for argv in (
            "nexthop add id 1 via 192.168.2.2 dev d1",
            "nexthop add id 2 via 192.168.2.3 dev d1",
            "nexthop add id 3 blackhole",
            "nexthop add id 4 via fd00::2 dev d1",
            "nexthop add id 10 group 1,3/2",
            "nexthop replace id 2 via 192.168.2.4 dev d1",
            "nexthop replace id 11 via 192.168.2.5 dev d1",   # a new id: an addition
            "route add 10.9.0.0/16 nhid 10",
            "route add 10.8.0.0/16 nhid 1",
            "-6 route add 2001:db8:1::/48 nhid 4",
            "nexthop add id 20 group 1/2 type resilient buckets 8",
            "nexthop del id 1",                               # groups 10 and 20 lose it
            "nexthop add id 30 dev d1",
            "nexthop del id 3",
            "nexthop add id 40 via 192.168.2.6 dev d1",
            "link set d1 down",                               # 2, 4, 11, 30, 40 go silently
            "nexthop flush",
        ):
            ns.run(["ip"] + argv.split(), check=True)
        ns.run(["ip", "nexthop", "add", "id", "9999", "blackhole"], check=True)
        assert mon.until("id 9999 blackhole"), f"ip monitor printed no end sentinel: {mon.lines[-5:]}"
    finally:
        mon.proc.terminate()
        mon.proc.wait(5)
    theirs = []

    def sentinel(n: int):
        return lambda ln: bool(_NH.match(ln)) and int(_NH.match(ln)[2]) == n

    for ln in _between(mon.lines, sentinel(begin), sentinel(9999)):
        m = _NH.match(ln)
        if m:
            theirs.append(("nexthop", bool(m[1]), int(m[2]), _nexthop_tokens(ln)))
        else:
            r = _NH_ROUTE.match(ln)
            assert r, f"cannot parse ip monitor line {ln!r}"
            theirs.append(("route", bool(r[1]), ipaddress.ip_network(r[2]), r[3] and int(r[3])))
    ours = []
    for e in _between(nettrace.events(netns=ns.inode), lambda e: e.kind == "nexthop" and e.id == begin,
                      lambda e: e.kind == "nexthop" and e.id == 9999):
        if e.kind == "nexthop":
            ours.append(("nexthop", e.action == "deleted", e.id, _nexthop_tokens(e.describe())))
        elif e.kind == "route":
            ours.append(("route", e.action == "deleted", e.dst, e.nhid))
    assert nettrace.lost("nexthop") == nettrace.lost("route") == 0
    assert ("route", False, ipaddress.ip_network("10.9.0.0/16"), 10) in theirs   # the workload did what it should
    assert Counter(ours) == Counter(theirs), (sorted(Counter(ours) - Counter(theirs), key=str),
                                              sorted(Counter(theirs) - Counter(ours), key=str))
    assert ours == theirs
    # what ip monitor cannot tell: an addition from a replacement, a group
    # the kernel rewrote, and who did each
    nh = [e for e in nettrace.nexthop_changes() if e.id < 9000]
    assert [(e.id, e.action) for e in nh if e.id in (2, 11)] == [(2, "added"), (2, "replaced"), (11, "added")]
    changed = [e for e in nh if e.action == "changed"]
    assert sorted(e.id for e in changed) == [10, 20]
    assert all(e.cause == "kernel" and e.detail == "a member of the group was deleted"
               and e.cmdline == "ip nexthop del id 1" for e in changed)
    [group] = [e for e in nh if e.id == 10 and e.action == "added"]
    assert group.group == ((1, 3), (2, 1)) and group.group_type == "mpath" and group.cause == "netlink"
    assert group.describe() == "added nexthop id 10 group 1,3/2" and group.comm == "ip"
    [v6] = [e for e in nh if e.id == 4 and e.action == "added"]
    assert (v6.family, str(v6.gateway), v6.dev) == (6, "fd00::2", "d1")
    assert [e.describe() for e in nh if e.id == 20][0] == "added nexthop id 20 group 1/2 type resilient"

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

pytestmark = pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's ip")

_ADDR = re.compile(r"^(Deleted )?\d+: (\S+?)(?:@\S+)?\s+(inet6?) (\S+) .*?(?:\s(\S+))?\\")
_ROUTE = re.compile(r"^(Deleted )?(?:(local|broadcast|multicast|anycast|unreachable|blackhole|prohibit) )?"
                    r"(\S+)(?: via (?:inet6 )?(\S+))? dev (\S+)(?: table (\S+))?")
END = "198.51.100.2/32"


class Monitor:
    """`ip -o monitor address route` in a namespace, read line by line."""

    def __init__(self, ns):
        self.proc = ns.popen(["ip", "-o", "monitor", "address", "route"], stdout=subprocess.PIPE, text=True)
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

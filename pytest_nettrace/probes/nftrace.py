"""Which nftables rule dropped a packet (kind "nftrace"), on request:
`nettrace.trace_nft()` or `@pytest.mark.nettrace(nft_trace=True)`.

nftables traces a packet whose `nftrace` bit is set: every rule it meets
sends a message to the trace netlink group (what `nft monitor trace`
prints). On request the plugin adds to a watched namespace's ruleset one
table of its own,

    table inet nettrace_trace {
        chain pre { type filter hook prerouting priority -500; meta nftrace set 1; }
        chain out { type filter hook output priority -500; meta nftrace set 1; }
    }

so that every IPv4/IPv6 packet entering or leaving is traced through all
the chains after it, listens on NFNLGRP_NFTRACE in that namespace, and keeps
the messages that end a packet with a drop (a rule's `drop`/`reject`, or a
base chain's `policy drop`). The table is owned by a socket the plugin keeps
open while tracing (NFT_TABLE_F_OWNER, 5.12+): the kernel removes it when
that socket closes — at the end of the test, or when the process dies — and
`nft flush ruleset` leaves it alone. Older kernels get a plain table,
deleted at the end by name and handle (only the one the plugin made). No BPF program: the
verdicts are read from the socket when the test reads events, and each is
joined to the kernel's drop event of the same packet (reason NETFILTER_DROP).
"""
from __future__ import annotations

import os
import re
import socket
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union, cast

from ..netns.linux import in_netns_at
from ..errors import NettraceError
from ..events import Event, IPAddress
from ..events import CHOICE, IP_PROTO, FieldType
from ..kernel import wire
from . import _nft
from .base import Plan, Probe
from .context import AddressFilter, CommonFilters, Filter, KindApi

if TYPE_CHECKING:
    from ..kernel.capabilities import KernelFeatures

TABLE = "nettrace_trace"
_RCVBUF = 16 << 20
_NOBODY = dict(pid=None, tid=None, comm=None, uid=None, ppid=None, parent_comm=None)
_TASK = ("pid", "tid", "comm", "uid", "ppid", "parent_comm", "context")


class _DropLink(FieldType):
    """The drop event of the packet a verdict dropped: in JSON, its location
    (the drop itself is a line of its own)."""

    def to_json(self, value: Any) -> Any:
        return getattr(value, "location", value)


DROP_LINK = _DropLink()


class NftVerdictEvent(Event, init=False):
    """A packet dropped by nftables, with what decided it: `table`, `chain`,
    `handle` (the rule's, as `nft -a` shows it; None when the chain's
    `policy drop` did), `policy`, `rule` (its text, as nft prints it),
    `family` (the table's: "ip", "ip6", "inet", ...), the packet's `saddr`,
    `daddr`, `ip_proto`, `sport`, `dport`, `iif`/`oif` (interface indexes),
    `trace_id`. `drop` is the kernel's drop event of that packet (reason
    NETFILTER_DROP) when it was seen; the task fields and timestamp are then
    its, else the time the verdict was read and nobody."""

    kind = "nftrace"
    verdict: str
    table: str
    chain: str
    handle: Optional[int]
    policy: bool
    rule: Optional[str]
    family: str                    # the table's: "ip", "ip6", "inet", ...
    saddr: Optional[IPAddress]
    daddr: Optional[IPAddress]
    ip_proto: Union[str, int, None]
    sport: Optional[int]
    dport: Optional[int]
    iif: Optional[int]
    oif: Optional[int]
    trace_id: int
    drop: Optional[Event]          # the kernel's drop event of the packet
    TYPES = {"family": CHOICE, "drop": DROP_LINK, "ip_proto": IP_PROTO}
    VALUES = {**Event.VALUES, "family": tuple(_nft.FAMILIES.values())}   # the table's, not 4/6

    def describe(self) -> str:
        by = f"policy of {self.family} {self.table} {self.chain}" if self.policy else \
            f"rule {self.family} {self.table} {self.chain} handle {self.handle}"
        rule = f": {self.rule}" if self.rule else ""
        def ports(a: Any, p: int) -> str:
            return f"[{a}]:{p}" if ":" in str(a) else f"{a}:{p}"
        pkt = ""
        if self.saddr is not None:
            src = ports(self.saddr, self.sport) if self.sport is not None else str(self.saddr)
            dst = ports(self.daddr, self.dport) if self.dport is not None else str(self.daddr)
            pkt = f" ({self.ip_proto} {src} > {dst})"
        return f"dropped by {by}{rule}{pkt}"


_COUNTER_FIGURES = re.compile(r"\bcounter packets \d+ bytes \d+")


class _Tracer:
    """The trace listener and the tracing table in one namespace."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lost = 0
        self.gone = False          # someone deleted our table: packets since are not traced
        self.verdicts: List[Dict[str, Any]] = []
        self._packets: Dict[int, Dict[str, Any]] = {}  # trace id -> the packet's addresses and ports
        self.listener = in_netns_at(path, self._listen)
        self.owner: Optional[socket.socket] = None
        try:
            self.handle = self._install()
        except BaseException:
            self.listener.close()
            if self.owner is not None:
                self.owner.close()
            raise
        # the namespace's rules now, then kept up to date by the change
        # notifications that reach the listener in order with the verdicts:
        # a verdict names the rule that had its handle when it was traced
        # (a ruleset flushed and loaded again reuses handles)
        self._rules = _nft.rules(self._request(_nft.dump_rules(), dump=True))

    @staticmethod
    def _socket(groups: int) -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 12)  # NETLINK_NETFILTER
        s.bind((0, groups))
        return s

    def _listen(self) -> socket.socket:
        s = self._socket(1 << (_nft.NFNLGRP_NFTRACE - 1) | 1 << (_nft.NFNLGRP_NFTABLES - 1))
        try:
            s.setsockopt(socket.SOL_SOCKET, 33, _RCVBUF)  # SO_RCVBUFFORCE
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        s.setblocking(False)
        return s

    def _request(self, data: bytes, sock: Optional[socket.socket] = None, dump: bool = False) -> bytes:
        """Send to nftables in the namespace (on `sock`, else a socket of its
        own), return the whole reply: up to the last ack (or an error), or
        for a `dump` up to its NLMSG_DONE."""
        def done(chunk: bytes) -> bool:
            if dump:
                return any(mtype in (2, 3) for mtype, _f, _raw in _nft.split(chunk))   # NLMSG_ERROR / DONE
            # every message is acked (NLM_F_ACK); the last ack (or an error) ends it
            return any(_nft.errors(chunk)) or _last_seq(chunk) >= _max_seq(data)

        def exchange(s: socket.socket) -> bytes:
            s.settimeout(5)
            s.send(data)
            out = b""
            while True:
                chunk = s.recv(1 << 16)
                out += chunk
                if done(chunk):
                    return out
        if sock is not None:
            return exchange(sock)

        def go() -> bytes:
            with self._socket(0) as s:
                return exchange(s)
        return in_netns_at(self.path, go)

    def _install(self) -> int:
        # Owned by a socket kept open while tracing (5.12+): the kernel removes
        # the table when it closes, even if this process is killed. Older
        # kernels refuse the flag: a plain table, deleted by handle at the end.
        self.owner = in_netns_at(self.path, lambda: self._socket(0))
        reply = self._request(_nft.tracing_table(TABLE), self.owner)
        if any(e in (95, 22) for e in _nft.errors(reply)):  # EOPNOTSUPP / EINVAL: no owner flag
            self.owner.close()
            self.owner = None
            reply = self._request(_nft.tracing_table(TABLE, owned=False))
        bad = [e for e in _nft.errors(reply) if e]
        if bad:
            raise NettraceError(f"cannot add the tracing table inet {TABLE} in {self.path}: "
                                f"{os.strerror(bad[0])}" + (" (it exists: traced already?)" if bad[0] == 17 else ""))
        handle = _nft.table_handle(reply)
        if handle is None:
            raise NettraceError(f"nftables did not say the handle of table inet {TABLE} in {self.path}")
        return handle

    def read(self) -> None:
        while True:
            try:
                data = self.listener.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == 105:  # ENOBUFS: the kernel dropped trace messages
                    self.lost += 1
                    continue
                raise
            for mtype, _flags, raw in _nft.split(data):
                if mtype == (_nft.NFNL_SUBSYS_NFTABLES << 8) | _nft.NFT_MSG_TRACE:
                    v = _nft.trace_verdict(raw, self._packets)
                    if v is not None and v["table"] != TABLE:
                        rule = self._rule(v)
                        # a counter's figures in the text are those of when it was read: none
                        v["rule"] = _COUNTER_FIGURES.sub("counter", rule) if rule else rule
                        self.verdicts.append(v)
                else:
                    _nft.apply_change(self._rules, mtype, raw)

    def _rule(self, v: Dict[str, Any]) -> Optional[str]:
        if v["handle"] is None:
            return None
        key = (v["family_id"], v["table"], v["chain"], v["handle"])
        if key not in self._rules:
            try:
                self._rules[key] = _nft.rule_text(self._request(_nft.get_rule(*key)))
            except OSError:
                self._rules[key] = None  # gone since: the nft events may still have its text
        return self._rules[key]

    def check_table(self) -> None:
        """Our table still there? (`nft flush ruleset` removes it, and the
        tracing with it: what follows cannot be ruled out.)"""
        if not self.gone and any(_nft.errors(self._request(_nft.get_table(TABLE)))):
            self.gone = True
            self.lost += 1

    def close(self) -> None:
        try:
            if self.owner is not None:
                self.owner.close()  # the kernel removes the table it owns
            elif not self.gone:
                self._request(_nft.delete_table(TABLE, self.handle))
        except (OSError, NettraceError):
            pass  # the namespace is gone, and the table with it
        finally:
            self.listener.close()


def _max_seq(batch: bytes) -> int:
    seqs = [int.from_bytes(raw[8:12], "little") for mtype, _f, raw in _nft.split(batch)
            if mtype not in (_nft.NFNL_MSG_BATCH_BEGIN, _nft.NFNL_MSG_BATCH_END)]
    return max(seqs) if seqs else 1


def _last_seq(reply: bytes) -> int:
    seqs = [int.from_bytes(raw[8:12], "little") for mtype, _f, raw in _nft.split(reply) if mtype == 2]
    return max(seqs) if seqs else 0


class NftTraceProbe(Probe):
    name = "nftrace"
    kind_id = wire.Kind.NFTRACE  # no ring records: losses are counted here
    event_types = {"nftrace": NftVerdictEvent}

    def __init__(self) -> None:
        self._tracers: Dict[int, _Tracer] = {}
        self._paths: Dict[int, str] = {}

    def plans(self, kernel: "KernelFeatures") -> List[Plan]:
        return [Plan("nftables_trace", [])]

    def watch(self, netns: int, path: Optional[str]) -> None:
        if path is not None:
            self._paths[netns] = path  # tracing starts only on request (start)

    def start(self, netns: int) -> None:
        """Trace nftables' verdicts in `netns` (a watched namespace)."""
        if netns in self._tracers:
            return
        path = self._paths.get(netns)
        if path is None:
            raise NettraceError(f"cannot trace nftables in netns {netns}: it is not watched, or cannot be opened")
        self._tracers[netns] = _Tracer(path)

    def tracing(self, netns: int) -> bool:
        return netns in self._tracers

    def unwatch(self, netns: int) -> None:
        self._paths.pop(netns, None)
        tracer = self._tracers.pop(netns, None)
        if tracer is not None:
            tracer.close()

    def poll(self) -> bool:
        for tracer in list(self._tracers.values()):
            tracer.read()
        return False

    def take(self, netns: int) -> List[Dict[str, Any]]:
        tracer = self._tracers.get(netns)
        if tracer is None:
            return []
        tracer.read()
        tracer.check_table()
        out, tracer.verdicts = tracer.verdicts, []
        return out

    def lost(self, netns: int) -> Dict[str, int]:
        tracer = self._tracers.get(netns)
        return {"nftrace": tracer.lost} if tracer is not None and tracer.lost else {}

    def close(self) -> None:
        for netns in list(self._tracers):
            self.unwatch(netns)


def _netfilter_drop(drop: Any) -> bool:   # a drop event
    # before 5.17 drops have no reason: where it was freed says netfilter
    if drop.reason is None:
        return (drop.location or "").startswith(("nf_hook_slow", "nft_do_chain"))
    return bool(drop.reason == "NETFILTER_DROP")


def _same_packet(drop: Any, v: Dict[str, Any]) -> bool:
    return bool(drop.saddr == v["saddr"] and drop.daddr == v["daddr"] and drop.ip_proto == v["ip_proto"]
            and drop.sport == v["sport"] and drop.dport == v["dport"])


class NftVerdictFilters(CommonFilters, total=False):
    """Filters of 'nftrace' events: a keyword per field (nettrace.events('nftrace', ...) takes them too)."""

    verdict: Filter[str]
    table: Filter[str]
    chain: Filter[str]
    handle: Filter[int]
    policy: Filter[str]
    rule: Filter[str]
    family: Filter[str]
    saddr: AddressFilter
    daddr: AddressFilter
    ip_proto: Filter[Union[str, int]]
    sport: Filter[int]
    dport: Filter[int]
    iif: Filter[int]
    oif: Filter[int]
    trace_id: Filter[int]
    drop: Filter[Any]


class NftTraceApi(KindApi):
    """`nettrace` methods for nftables verdicts (Trace exposes them)."""

    def _nftrace_probe(self) -> Optional[NftTraceProbe]:
        st = self.ctx.engine.status.get("nftrace")
        return cast(Optional[NftTraceProbe], st.probe if st is not None and st.plan is not None else None)

    def trace_nft(self, ns: Any = None) -> None:
        """Trace nftables in `ns` (default: every namespace this test watches
        but the host's): add the tracing table (see the module docstring),
        listen to the trace group, and report each drop a rule or policy
        decided as an "nftrace" event. Removed at the end of the test."""
        probe = self._nftrace_probe()
        if probe is None:
            self.ctx.validate("nftrace", {})  # raises: why it is not available
            return
        host = _host_inode()
        if ns is None:
            targets = [inode for inode in self.ctx.watched if inode != host]
        else:
            targets = [self.ctx.watch(ns)]
            if targets[0] == host:
                raise NettraceError("trace_nft() does not add rules to the host's own ruleset; "
                                    "trace a namespace the test made")
        for inode in targets:
            probe.start(inode)

    def pull(self) -> None:
        probe = self._nftrace_probe()
        if probe is None:
            return
        taken = [(netns, v) for netns in list(self.ctx.watched) for v in probe.take(netns)]
        if not taken:
            return
        # the drop is recorded just after its verdict was sent: drain again, so
        # a verdict read a moment before its drop still finds it
        self.ctx.engine.drain()
        seen = self.ctx.all_events()
        drops = [e for e in seen if e.kind == "drop" and _netfilter_drop(e)]
        used = {id(e.drop) for e in seen if isinstance(e, NftVerdictEvent) and e.drop is not None}
        now = time.monotonic_ns()
        verdicts = []
        for netns, v in taken:
            drop = next((d for d in drops if d.netns == netns and id(d) not in used and _same_packet(d, v)), None)
            if drop is not None:
                used.add(id(drop))
                task = {f: getattr(drop, f) for f in _TASK}
                ts = drop.timestamp
            else:
                task, ts = dict(_NOBODY, context="trace"), now
            fields = {k: v[k] for k in ("table", "chain", "handle", "policy", "rule", "saddr", "daddr", "ip_proto",
                                        "sport", "dport", "iif", "oif", "trace_id")}
            verdicts.append(NftVerdictEvent(None, (), task.pop("context"), timestamp=ts, netns=netns,
                                            verdict="drop", family=v["family_name"], drop=drop, **task, **fields))
        self.ctx.publish(verdicts)

    def dropped_by(self, drop: Event) -> Optional[Event]:
        """The "nftrace" event (table, chain, rule) of a netfilter drop event,
        or None when nftables was not traced there or did not decide it."""
        if drop.kind != "drop":
            raise ValueError(f"dropped_by() takes a drop event, got a {drop.kind!r} event")
        return next((e for e in self.ctx.events("nftrace") if cast(NftVerdictEvent, e).drop is drop), None)


def _host_inode() -> int:
    return os.stat("/proc/self/ns/net").st_ino


PROBE = NftTraceProbe
API = NftTraceApi

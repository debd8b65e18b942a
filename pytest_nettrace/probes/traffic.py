"""Traffic per process and device, nettop-style (bpf/traffic.bpf.c,
bpf/traffic.h): a table, not events — `nettrace.traffic()`.

The kernel counts packets per (namespace, device, protocol, local port,
sending process): a packet sent in a process's system call is counted as
that process's when it is sent. Packets whose process the kernel cannot know
then (received ones, accounted in softirq; a TCP ACK or retransmission sent
from softirq) are counted without one and joined with the processes that
used their port (sent, received, listened or connected on it), recorded from
process context, when the test reads them: one such process, they are its;
several, they form a row of their own naming them all (`shared_by`), as the
kernel could not tell whose each was. Packets with no owning process (ARP,
neighbour discovery, ICMP errors, forwarded traffic) form rows with
pid/uid/comm None — the seed's "swapper" rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import (TYPE_CHECKING, Any, Callable, ClassVar, Dict, Iterable, List, Mapping, Optional, Tuple, Type,
                    TypedDict, cast)

from ..errors import EventsLost
from ..events import Event, check_filters, describe_filters, matches
from ..events import COMM
from ..kernel import wire
from ..kernel.libbpf import NetnsPurge, map_items
from ..netns.linux import in_netns_at
from .base import Plan, Probe
from .context import Filter, KindApi

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..kernel.capabilities import KernelFeatures
    from ..kernel.libbpf import LoadedMaps

# Devices whose received packets the kernel hands up in the same pass as
# their lower device's (its receive handler, VLAN untagging, a VRF's l3mdev
# hook), without the netif_receive_skb tracepoint the receive count hangs on:
# those packets are counted on the lower device, not on these.
RX_HANDED_UP = frozenset(("macvlan", "macvtap", "ipvlan", "ipvtap", "vlan", "bond", "team", "vrf"))

_KEY = wire.TRAFFIC_KEY.struct
_COUNTERS = wire.TRAFFIC_COUNTERS.struct
_OWNER_KEY = wire.TRAFFIC_OWNER_KEY.struct
_OWNER = wire.TRAFFIC_OWNER.struct


@dataclass
class TrafficRow:
    """One line of the nettop table: a process (or nobody) on one device.
    Bytes are link-layer bytes; packets are what the device passed (a
    GSO/GRO aggregate is one), as its own counters (`ip -s link`) count them."""

    netns: int
    pid: Optional[int]
    uid: Optional[int]
    dev: str
    comm: Optional[str]
    tx_packets: int = 0
    rx_packets: int = 0
    tx_bytes: int = 0
    rx_bytes: int = 0
    # pid None, and the packets' ports were used by these processes (sorted
    # pids): the kernel could not tell which one each packet was for
    shared_by: Tuple[int, ...] = ()

    kind = "traffic"
    DESCRIBED = "traffic rows"   # in check_filters' messages
    FIELDS = ("netns", "pid", "uid", "dev", "comm", "tx_packets", "rx_packets", "tx_bytes", "rx_bytes", "shared_by")
    TYPES = {"comm": COMM}

    @property
    def packets(self) -> int:
        return self.tx_packets + self.rx_packets

    @property
    def bytes(self) -> int:
        return self.tx_bytes + self.rx_bytes


_HEADER = "%5s %5s %-7s %7s %7s %7s %7s %-15s %s" % (
    "PID", "UID", "DEV", "XMIT_PK", "RECV_PK", "XMIT_KB", "RECV_KB", "COMMAND", "NETNS")


def render_table(rows: List[TrafficRow], label: Callable[[int], str] = str) -> str:
    """nettop.stp's columns; traffic no process owns shows "-" for PID, UID
    and COMMAND (a 0 would read as root's, or the idle task's); traffic of
    ports several processes used shows "?" and names them in COMMAND."""
    lines = [_HEADER]
    for r in sorted(rows, key=lambda r: -(r.packets)):
        unknown = "?" if r.shared_by else "-"
        comm = "shared:" + ",".join(map(str, r.shared_by)) if r.shared_by else r.comm or "-"
        lines.append("%5s %5s %-7s %7d %7d %7d %7d %-15s %s" % (
            unknown if r.pid is None else r.pid, unknown if r.uid is None else r.uid, r.dev, r.tx_packets,
            r.rx_packets, r.tx_bytes // 1024, r.rx_bytes // 1024, comm, label(r.netns)))
    return "\n".join(lines)


class TrafficProbe(Probe):
    name = "traffic"
    kind_id = wire.Kind.TRAFFIC
    event_types: ClassVar[Dict[str, Type[Event]]] = {}   # a table, read from maps: no events

    def __init__(self) -> None:
        self._counters_fd = -1
        self._owners_fd = -1
        self._paths: Dict[int, str] = {}

    def plans(self, kernel: "KernelFeatures") -> List[Plan]:
        plans: List[Plan] = []
        counting = ("net_dev_start_xmit", "netif_receive_skb")
        if not (kernel.tp_btf and all(kernel.tracepoint_args(tp) is not None for tp in counting)):
            return plans
        if all(kernel.tracepoint_args(tp) is not None for tp in ("sock_send_length", "sock_recv_length")):
            plans.append(Plan("tp_btf", ["traffic_tx", "traffic_rx", "traffic_send", "traffic_recv",
                                         "traffic_state"]))
        if kernel.fentry:  # before 6.3: owners from inet{,6}_{send,recv}msg entry
            plans.append(Plan("tp_btf+fentry", ["traffic_tx", "traffic_rx", "traffic_send4_fentry",
                                                "traffic_send6_fentry", "traffic_recv4_fentry",
                                                "traffic_recv6_fentry", "traffic_state"]))
        for plan in plans:
            # the kernel skips traffic_state only for a state change in a
            # softirq that interrupted it (hundreds a second at ~30k
            # connections a second): never a listen(), the one it records
            plan.own_misses.append("traffic_state")
        return plans

    def unavailable_reason(self, kernel: "KernelFeatures") -> str:
        if not kernel.tp_btf:
            return f"needs tp_btf tracepoints ({kernel.why('tp_btf')})"
        return ("no sock_send_length/sock_recv_length tracepoints (kernel < 6.3) and no fentry "
                f"({kernel.why('fentry')}) on inet_sendmsg/inet_recvmsg to learn port owners")

    def attached(self, obj: "LoadedMaps") -> None:
        self._counters_fd = obj.map_fd("tf_counters")
        self._owners_fd = obj.map_fd("tf_owners")
        # netns is every key's first field
        self._purge = NetnsPurge(((self._counters_fd, _KEY.size), (self._owners_fd, _OWNER_KEY.size)))

    def reset(self, netns: int) -> None:
        self._purge.watch(netns)

    def watch(self, netns: int, path: Optional[str]) -> None:
        if path is not None:
            self._paths[netns] = path

    def unwatch(self, netns: int) -> None:
        self._purge.unwatch(netns)
        self._paths.pop(netns, None)

    def rx_not_counted(self, namespaces: Iterable[int]) -> Dict[Tuple[int, str], str]:
        """(netns, device) -> kind of the devices of these namespaces whose
        received packets are not counted (RX_HANDED_UP), as they are now."""
        from ..netns.rtnl import link_kinds   # pyroute2: ~100 ms to import, not on the way to attached probes
        found = {}
        for netns in namespaces:
            path = self._paths.get(netns)
            try:
                kinds = in_netns_at(path, link_kinds) if path is not None else {}
            except OSError:   # gone: nothing to ask any more
                kinds = {}
            found.update({(netns, dev): kind for dev, kind in kinds.items() if kind in RX_HANDED_UP})
        return found

    def poll(self) -> bool:
        self._purge.poll()
        return False

    def rows(self, namespaces: List[int]) -> List[TrafficRow]:
        """The table for these namespaces, joined with the port owners now."""
        return traffic_rows(map_items(self._counters_fd, _KEY.size, _COUNTERS.size),
                            map_items(self._owners_fd, _OWNER_KEY.size, _OWNER.size), namespaces)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def traffic_rows(counters: Iterable[Tuple[bytes, bytes]], owners: Iterable[Tuple[bytes, bytes]],
                 namespaces: Iterable[int]) -> List[TrafficRow]:
    """The nettop rows of these namespaces from the entries of tf_counters and
    tf_owners (struct traffic_key -> traffic_counters, traffic_owner_key ->
    traffic_owner), one row per process (or set of processes sharing ports)
    and device: counters the kernel keyed by their sender are that
    process's; the others are those of the one process that used their
    port, or shared by all that did."""
    wanted = set(namespaces)
    by_port: Dict[Tuple[int, int, int], List[Tuple[int, int, str]]] = {}
    for key, value in owners:
        netns, pid, port, proto = _OWNER_KEY.unpack(key)
        if netns in wanted:
            uid, comm = _OWNER.unpack(value)
            by_port.setdefault((netns, proto, port), []).append((pid, uid, _text(comm)))
    table: Dict[Tuple[Any, ...], TrafficRow] = {}
    for key, value in counters:
        netns, _ifindex, pid, port, proto = _KEY.unpack(key)
        if netns not in wanted:
            continue
        txp, rxp, txb, rxb, dev, uid, comm = _COUNTERS.unpack(value)
        who: Tuple[Any, ...] = (pid, uid, _text(comm), ())
        if not pid:
            users = sorted(by_port.get((netns, proto, port), ())) if port else []
            if len(users) == 1:
                who = (*users[0], ())
            else:
                who = (None, None, None, tuple(u[0] for u in users))
        devname = _text(dev)
        row = table.get((netns, devname, *who))
        if row is None:
            row = table[(netns, devname, *who)] = TrafficRow(netns, who[0], who[1], devname, who[2],
                                                            shared_by=who[3])
        row.tx_packets += txp
        row.rx_packets += rxp
        row.tx_bytes += txb
        row.rx_bytes += rxb
    return list(table.values())


def _check_bounds(bounds: Mapping[str, Any]) -> None:
    """assert_traffic's bounds: at least one, each a count (a str or float
    would fail with a TypeError deep inside, or compare as no count does)."""
    given = {k: v for k, v in bounds.items() if v is not None}
    if not given:
        raise ValueError(f"assert_traffic needs a bound: {', '.join(bounds)} (without one it asserts nothing)")
    for name, value in given.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"assert_traffic's {name} is a whole number (int), not {value!r} "
                            f"({type(value).__name__})")
        if value < 0:
            raise ValueError(f"assert_traffic's {name} is a count, not {value}")


class TrafficFilters(TypedDict, total=False):
    """Filters of traffic rows: a keyword per TrafficRow field."""

    shared_by: Filter[Tuple[int, ...]]
    netns: Filter[int]
    pid: Filter[int]
    uid: Filter[int]
    dev: Filter[str]
    comm: Filter[str]
    tx_packets: Filter[int]
    rx_packets: Filter[int]
    tx_bytes: Filter[int]
    rx_bytes: Filter[int]


class TrafficApi(KindApi):
    """`nettrace` methods for per-process traffic (Trace exposes them)."""

    def _traffic_probe(self) -> TrafficProbe:
        why = self.ctx.engine.probe_available("traffic")
        if why:
            from ..errors import NettraceError
            raise NettraceError(f"traffic accounting is not available: {why}")
        return cast(TrafficProbe, self.ctx.engine.status["traffic"].probe)

    def traffic(self, **filters: Unpack[TrafficFilters]) -> List[TrafficRow]:
        """nettop rows for the watched namespaces: objects with netns, pid, uid,
        dev, comm, tx_packets, rx_packets, tx_bytes, rx_bytes (pid/uid/comm
        None: no process owns that traffic). Filters as for events."""
        checked = check_filters(TrafficRow, dict(filters))
        probe = self._traffic_probe()
        self.ctx.check_open()
        rows = probe.rows(list(self.ctx.watched))
        return sorted((r for r in rows if matches(r, checked)), key=lambda r: (r.netns, r.dev, r.pid or 0))

    def traffic_table(self, **filters: Unpack[TrafficFilters]) -> str:
        """The rows as nettop.stp prints them: PID UID DEV XMIT_PK RECV_PK XMIT_KB RECV_KB COMMAND (+ NETNS)."""
        return render_table(self.traffic(**filters), self.ctx.label)

    def assert_traffic(self, *, min_bytes: Optional[int] = None, max_bytes: Optional[int] = None,
                       min_packets: Optional[int] = None, max_packets: Optional[int] = None,
                       direction: str = "both", **filters: Unpack[TrafficFilters]) -> List[TrafficRow]:
        """The traffic of the rows matching filters (e.g. comm="curl", dev="eth0")
        is within bounds; `direction` "tx", "rx" or "both". Returns the rows.
        An upper bound fails loudly if the kernel could not count everything
        (a full counter map; received traffic of a device in RX_HANDED_UP)."""
        if direction not in ("tx", "rx", "both"):
            raise ValueError(f"direction must be 'tx', 'rx' or 'both', not {direction!r}")
        _check_bounds({"min_bytes": min_bytes, "max_bytes": max_bytes, "min_packets": min_packets,
                       "max_packets": max_packets})
        rows = self.traffic(**filters)
        pick = {"tx": ("tx_",), "rx": ("rx_",), "both": ("tx_", "rx_")}[direction]
        nbytes = sum(getattr(r, p + "bytes") for r in rows for p in pick)
        npackets = sum(getattr(r, p + "packets") for r in rows for p in pick)
        what = f"{direction} traffic matching {describe_filters(filters)}"
        problems = []
        for name, value, lo, hi in (("bytes", nbytes, min_bytes, max_bytes),
                                    ("packets", npackets, min_packets, max_packets)):
            if lo is not None and value < lo:
                problems.append(f"{value} {name} < min {lo}")
            if hi is not None and value > hi:
                problems.append(f"{value} {name} > max {hi}")
        table = render_table(self.traffic(), self.ctx.label)
        engine, kind = self.ctx.engine, wire.Kind.TRAFFIC
        misses = engine.program_misses({kind})   # read once, for both counts and every namespace
        skipped = sum(engine.missed(ns, misses).get(kind, 0) for ns in self.ctx.watched)
        full = sum(engine.lost(ns, misses).get(kind, 0) for ns in self.ctx.watched) - skipped
        causes = [f"{full} packets were not counted (counter map full)"] if full else []
        if skipped:
            causes.append(f"{skipped} packets were not counted (the kernel skipped the counting program's call: "
                          "a packet sent or received while it ran on that CPU)")
        where = {k: v for k, v in filters.items() if k in ("netns", "dev")}
        if direction != "tx":
            devices = [f"{dev} ({kind}) in {self.ctx.label(netns)}" for (netns, dev), kind in sorted(
                self._traffic_probe().rx_not_counted(self.ctx.watched).items())
                if matches(TrafficRow(netns, None, None, dev, None), where)]
            if devices:
                causes.append(f"packets received on {', '.join(devices)} are not counted (the kernel hands them "
                              "up from the lower device without the receive tracepoint; they count there)")
        if filters.keys() & {"pid", "uid", "comm"}:   # a process's traffic may be in a shared row
            shared = [r for r in self.traffic() if r.shared_by and matches(r, where)
                      and any(getattr(r, p + "packets") for p in pick)]
            if shared:
                named = "; ".join(sorted({f"{','.join(map(str, r.shared_by))} in {self.ctx.label(r.netns)}"
                                          for r in shared}))
                causes.append(f"{sum(getattr(r, p + 'packets') for r in shared for p in pick)} packets on ports "
                              f"several processes used ({named}) are in rows of their own (shared_by): the kernel "
                              "could not tell which process each was for")
        uncounted = "; ".join(causes)
        if problems:
            note = f" ({uncounted})" if causes else ""
            raise AssertionError(f"{what}: {', '.join(problems)}{note}\n{table}")
        if max_bytes is not None or max_packets is not None:
            self.ctx.assert_watching("traffic", dict(filters))
        if causes and (max_bytes is not None or max_packets is not None):
            raise EventsLost(f"cannot assert an upper bound on {what}: {uncounted}; the assertion would not be "
                             f"sound\n{table}")
        return rows


PROBE = TrafficProbe
API = TrafficApi

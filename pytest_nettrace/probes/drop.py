"""Packet drops (bpf/drop.bpf.c, bpf/drop.h): `kind == "drop"`.

Seed: dropwatch ("N drops at location") and `perf record -e skb:kfree_skb`.
Drops can come at line rate, so the kernel counts every drop of a watched
namespace by (reason, location) and sends only the first DETAIL_BUDGET of
each namespace as detailed events; `drop_summary()` reads the counts, and
`assert_no_drops()` checks them for matching drops that were only counted.
"""
from __future__ import annotations

import ipaddress
import struct
from typing import (TYPE_CHECKING, Any, ClassVar, Dict, List, NamedTuple, Optional, Sequence, Tuple, TypedDict, Union,
                    cast)

from ..errors import EventsLost
from ..events import Event, Header, IPAddress, describe_filters, matches
from ..events import IP_PROTO, IpProto
from ..kernel import wire
from ..kernel.libbpf import NetnsPurge, map_delete, map_items, map_lookup, map_update
from ..kernel.symbols import frame_function, function_ranges, kallsyms, symbolize
from .base import Decoder, Plan, Probe
from .context import AddressFilter, CommonFilters, Filter, KindApi

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..kernel.capabilities import KernelFeatures
    from ..kernel.libbpf import LoadedMaps

DETAIL_BUDGET = 256  # detailed drop events per watched namespace (per test)
RECORD = wire.DROP_EVENT
_BODY = RECORD.body
_KEY = wire.DROP_KEY.struct
_COUNT = wire.DROP_COUNT.struct
_SCOPE = wire.DROP_SCOPE.struct
_u32 = struct.Struct("<I")
ETHERTYPES = {0x0800: "IPv4", 0x86DD: "IPv6", 0x0806: "ARP", 0x8100: "802.1Q", 0x0004: "802.2"}


class DropEvent(Event, init=False):
    """A packet the kernel dropped (kfree_skb), in a watched namespace.

    `reason` is the kernel's `enum skb_drop_reason` name without the
    SKB_DROP_REASON_ prefix (e.g. "NO_SOCKET", "NETFILTER_DROP"), read from
    the running kernel's BTF; None on kernels before 5.17. `location` is the
    freeing code as `func+0xoff`. Addresses, ports and `ip_proto` are the
    dropped packet's own (None when it is not IP / not TCP or UDP)."""

    kind = "drop"
    reason: Optional[str]
    location: str
    dev: Optional[str]
    ifindex: Optional[int]
    protocol: Optional[str]        # the ethertype's name ("IPv4", "ARP") or "0x88cc"
    family: Optional[int]
    saddr: Optional[IPAddress]
    daddr: Optional[IPAddress]
    sport: Optional[int]
    dport: Optional[int]
    ip_proto: Union[str, int, None]   # "tcp", or the number of one without a name
    length: int
    TYPES = {"ip_proto": IP_PROTO}
    ALARM = True  # but not its background drops (`background`)
    # naming a drop's own reason or address counts it, background or not
    # (README: "a reason … or a daddr filter")
    BACKGROUND_COUNTED_BY = frozenset(("reason", "daddr", "saddr"))
    # the running kernel's enum skb_drop_reason, set when the probe loads
    # (empty on kernels without drop reasons)
    REASONS: ClassVar[Optional[Tuple[str, ...]]] = None
    VALUES = {**Event.VALUES, "reason": lambda: DropEvent.REASONS}

    @property
    def background(self) -> bool:
        """Not a failure (what assert_no_drops ignores by default): a free the
        kernel does not name, IPv6 link-scope multicast, a duplicate of data
        TCP already had (TCP_OLD_DATA, TCP_OFOMERGE), an empty buffer
        purged from a socket being destroyed (the peer's FIN, never read by
        an application that closed without waiting for EOF: no data lost), or
        an AF_UNIX message discarded when its socket closed (not a packet)."""
        if self.reason == "QUEUE_PURGE" and self.length == 0:
            return True
        if self.reason in _DUPLICATES:
            return True   # a copy of data TCP already had (a spurious retransmission's): nothing lost
        if self.family is None and (self.location or "").startswith("unix_"):
            return True  # an AF_UNIX message (D-Bus...) discarded at close: not a network packet
        return not (_specified(self.reason) and _not_link_multicast(self.daddr))

    def as_dict(self) -> Dict[str, Any]:
        """With `background`: JSON consumers tell background drops from real ones."""
        return dict(super().as_dict(), background=self.background)

    def describe(self) -> str:
        why = self.reason or "drop"
        what = ""
        if self.family:
            proto = self.ip_proto if isinstance(self.ip_proto, str) else f"proto {self.ip_proto}"
            what = f" {proto} {_ep(self.saddr, self.sport)} > {_ep(self.daddr, self.dport)}"
        elif self.protocol:
            what = f" {self.protocol}"
        dev = f" dev {self.dev}" if self.dev else ""
        return f"{why} at {self.location}{what}{dev} len {self.length}"


def _ep(addr: Any, port: Optional[int]) -> str:
    if port is None:
        return str(addr)
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


class DropCount(NamedTuple):
    """One row of the in-kernel drop counts (all drops, delivered or not)."""

    netns: int
    namespace: str      # the trace's label of netns
    location: str       # func+0xoff
    reason: Optional[str]
    count: int  # type: ignore[assignment]  # a field, shadowing tuple.count
    undelivered: int    # of count: not delivered as detailed events

    def __str__(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"{self.count} drops at {self.location}{why} [{self.namespace}]"


class DropSummary(List[DropCount]):
    """Rows sorted by count, most first; str() is dropwatch's report."""

    def text(self) -> str:
        if not self:
            return "0 drops"
        return "\n".join(str(r) for r in self)

    def total(self) -> int:
        return sum(r.count for r in self)

    def __str__(self) -> str:
        return self.text()


class DropProbe(Probe):
    name = "drop"
    kind_id = wire.Kind.DROP
    event_types = {"drop": DropEvent}
    decoder: "DropDecoder"

    def __init__(self) -> None:
        self.decoder = DropDecoder()
        self._counts_fd = -1
        self._scopes_fd = -1

    def plans(self, kernel: "KernelFeatures") -> List[Plan]:
        reasons = {v: n.replace("SKB_DROP_REASON_", "") for v, n in kernel.enum("skb_drop_reason").items()}
        self.decoder.reasons = reasons
        DropEvent.REASONS = tuple(n for n in reasons.values() if n not in ("MAX", "SUBSYS_MASK"))  # not reasons
        config = {"drop_cfg": drop_config(function_ranges(_TAP_RECEIVERS + _FRAG_EXPIRY + _FRAG_PURGE))}
        args = kernel.tracepoint_args("kfree_skb")
        if not kernel.tp_btf or args is None:
            return []
        if args >= 3 and reasons:
            self.decoder.has_reason = True
            # 6.11+ names the socket that dropped it (rx_sk): TCP's receive
            # path leaves a segment neither device nor owner
            if args >= 4:
                return [Plan("tp_btf", ["drop_tp_sk"], config=config)]
            return [Plan("tp_btf (drops inside TCP's socket receive path unseen: no rx_sk before 6.11)",
                         ["drop_tp"], config=config)]
        return [Plan("tp_btf (no drop reasons: kernel < 5.17)", ["drop_tp_noreason"], config=config)]

    def unavailable_reason(self, kernel: "KernelFeatures") -> str:
        if not kernel.tp_btf:
            return f"needs tp_btf tracepoints ({kernel.why('tp_btf')})"
        return "the kernel BTF has no skb:kfree_skb tracepoint (btf_trace_kfree_skb)"

    def attached(self, obj: "LoadedMaps") -> None:
        self._counts_fd = obj.map_fd("drop_counts")
        self._scopes_fd = obj.map_fd("drop_scopes")
        self._purge = NetnsPurge(((self._counts_fd, _KEY.size),))   # netns is the key's first field

    def reset(self, netns: int) -> None:
        self._purge.watch(netns)

    def watch(self, netns: int, path: Optional[str]) -> None:
        map_update(self._scopes_fd, _u32.pack(netns), bytes(_SCOPE.size))

    def unwatch(self, netns: int) -> None:
        map_delete(self._scopes_fd, _u32.pack(netns))
        self._purge.unwatch(netns)

    def poll(self) -> bool:
        self._purge.poll()
        return False

    def lost(self, netns: int) -> Dict[str, int]:
        """Drops not delivered in detail (budget spent or counts map full).
        Ring-buffer losses are counted by the core; these come on top."""
        scope = self.scope(netns)
        n = scope[1] + scope[2]
        return {"drop": n} if n else {}

    def scope(self, netns: int) -> Tuple[int, ...]:
        """(detailed, summarized, unaccounted) of a watched namespace."""
        raw = map_lookup(self._scopes_fd, _u32.pack(netns), _SCOPE.size)
        return _SCOPE.unpack(raw) if raw else (0, 0, 0)

    def counts(self, netns: int) -> List[Tuple[int, Optional[str], int, int]]:
        """(location address, reason name, total, undelivered) for one namespace."""
        out = []
        for key, value in map_items(self._counts_fd, _KEY.size, _COUNT.size):
            ns, reason, location = _KEY.unpack(key)
            if ns == netns and not is_tap_copy(self.decoder.where(location)):
                total, undelivered = _COUNT.unpack(value)
                out.append((location, self.decoder.reason_name(reason), total, undelivered))
        return out


class DropDecoder(Decoder):
    """struct drop_event records to DropEvents; also names what the kernel's
    drop counts hold (a free's location, a reason's number)."""

    records = (RECORD,)
    needs_watch = False  # each record says all its event needs

    def __init__(self) -> None:
        self.reasons: Dict[int, str] = {}    # enum skb_drop_reason, from the kernel's BTF (plans)
        self.has_reason = False
        self.locations: Dict[int, str] = {}  # free address -> where, as decoded from a stack

    def where(self, address: int, stack: Sequence[int] = ()) -> str:
        """The free's location; what a stack once said about an address is
        remembered for the kernel's counts, which have no stack."""
        if address in self.locations:
            return self.locations[address]
        loc = _location(address, stack)
        if stack:
            self.locations[address] = loc
        return loc

    def reason_name(self, value: int) -> Optional[str]:
        if not self.has_reason:
            return None
        return self.reasons.get(value, str(value))

    def decode(self, buf: bytes, hdr: Header) -> List[Event]:
        (location, reason, length, ifindex, protocol, family, ip_proto, sport, dport, has_reason, has_ports,
         dev, saddr, daddr) = _BODY.unpack_from(buf, RECORD.body_offset)
        src: Any = None
        dst: Any = None
        if family == 4:
            src, dst = ipaddress.IPv4Address(saddr[:4]), ipaddress.IPv4Address(daddr[:4])
        elif family == 6:
            src, dst = ipaddress.IPv6Address(saddr), ipaddress.IPv6Address(daddr)
        stack = hdr.stack(buf)
        where = self.where(location, stack.addrs)
        if is_tap_copy(where):
            return []
        return [DropEvent(
            hdr, stack, "softirq",
            reason=(self.reasons.get(reason) or str(reason)) if has_reason else None,
            location=where, dev=dev.split(b"\0", 1)[0].decode(errors="replace") or None,
            ifindex=ifindex or None, protocol=ETHERTYPES.get(protocol, f"0x{protocol:04x}"),
            family=family or None, saddr=src, daddr=dst,
            sport=sport if has_ports else None, dport=dport if has_ports else None,
            ip_proto=IpProto.NAMES.get(ip_proto, ip_proto) if family else None, length=length,
        )]


# A packet socket's own copy of a frame (its tap: tcpdump's, or the packet
# probe's capture) freed where af_packet receives it: never the network's
# packet. Where the ETH_P_ALL hooks are host-wide (Debian 6.1 and 6.12; per
# namespace on 6.18), a fanout group frees every other namespace's frames at
# packet_rcv_fanout, a "drop" in that namespace; a full capture ring frees its
# copy in tpacket_rcv (the capture counts that as its own loss).
_TAP_RECEIVERS = ("packet_rcv_fanout", "packet_rcv", "tpacket_rcv", "packet_rcv_spkt")
_TAP_RANGES = 4  # DROP_TAP_RANGES in bpf/drop.bpf.c
# An expired reassembly queue: its head is freed (with its device) by the
# expiry, the rest of the queue right after by the purge, whose skbs have no
# device or socket to tell their namespace: the head's (bpf/drop.bpf.c).
_FRAG_EXPIRY = ("ip_expire", "ip6_frag_expire")
_FRAG_PURGE = ("inet_frag_rbtree_purge",)
_DROP_CFG = struct.Struct(f"<II{2 * (_TAP_RANGES + len(_FRAG_EXPIRY) + len(_FRAG_PURGE))}Q")


def drop_config(ranges: Dict[str, Tuple[int, int]]) -> bytes:
    """drop_cfg (bpf/drop.bpf.c): the detail budget; the [start, end) of
    the functions whose frees are tap copies, which the program leaves out
    (the decoder and the counts also do, by name: for a kernel that hides
    addresses); those of the reassembly expiry and purge ((0, 0): unknown)."""
    spans = [ranges[name] for name in _TAP_RECEIVERS if name in ranges]
    flat = [a for span in spans for a in span] + [0, 0] * (_TAP_RANGES - len(spans))
    frag = [a for name in _FRAG_EXPIRY + _FRAG_PURGE for a in ranges.get(name, (0, 0))]
    return _DROP_CFG.pack(DETAIL_BUDGET, 0, *flat, *frag)


def is_tap_copy(location: str) -> bool:
    """Whether a free at `location` ("func+0xoff") is a packet socket's copy, not a drop."""
    return frame_function(location) in _TAP_RECEIVERS


def _location(address: int, stack: Sequence[int]) -> str:
    """Where the packet was freed. When the return address lands in a BPF
    trampoline (a function traced with fentry frees it: seen on 6.1), the
    first real frame of the stack above the free itself says it instead."""
    loc = kallsyms().resolve(address)
    if not _unreliable(loc):
        return loc
    for frame in symbolize(stack):
        if not frame.startswith(_FREE_FRAMES) and not _unreliable(frame):
            return frame
    return loc


def _unreliable(frame: str) -> bool:
    """A BPF trampoline, or what kallsyms makes of one it did not list yet:
    trampolines live in module memory, often where a module's freed init or
    exit code was ("veth_init [veth]+0x54f", "ext4_exit_fs [ext4]+0x7bbc7"),
    or far past any symbol."""
    if "[bpf]" in frame or frame.startswith("bpf_trampoline"):
        return True
    name, _, off = frame.partition("+0x")
    if " [" in name and name.split(" [", 1)[0].endswith(("_init", "_exit")):
        return True
    return bool(off) and int(off, 16) > 0x20000


_FREE_FRAMES = ("kfree_skb", "__kfree_skb", "sk_skb_reason_drop", "kfree_skb_reason", "kfree_skb_list")


def _specified(reason: Optional[str]) -> bool:
    return reason != "NOT_SPECIFIED"


def _not_link_multicast(daddr: Any) -> bool:
    """IPv6 link-scope multicast (MLD reports, neighbour solicitations to
    ff02::…) is dropped by every fresh interface before it joins or routes
    anything: background, not a failure."""
    return not (isinstance(daddr, ipaddress.IPv6Address) and daddr in _LINK_MULTICAST)


_LINK_MULTICAST = ipaddress.ip_network("ff02::/16")
# TCP discarding a segment's data it already had — in order (the peer sent it
# again: a spurious retransmission, a lost ACK) or out of order — seen from
# 6.11 on (kfree_skb's rx_sk): no data lost, and routine on a loaded machine
_DUPLICATES = frozenset(("TCP_OLD_DATA", "TCP_OFOMERGE"))


def _describe(filters: Dict[str, Any], lifted: bool) -> str:
    return describe_filters(filters) + ("" if lifted else " (background drops left out)")


class _Counted:
    """Stands in for the drops of one (reason, location) count when matching filters."""

    def __init__(self, netns: int, reason: Optional[str], location: str) -> None:
        self.kind, self.netns, self.reason, self.location = "drop", netns, reason, location


# Filters a count can be judged on; any other filter could match a counted drop.
_COUNT_FIELDS = ("kind", "netns", "reason", "location")


class DropCountFilters(TypedDict, total=False):
    """Filters of drop_summary(): what a count knows of its drops."""

    netns: Filter[int]
    reason: Filter[str]
    location: Filter[str]


class DropFieldFilters(CommonFilters, total=False):
    """Filters of 'drop' events but `reason` (assert_no_drops names it as an argument)."""

    location: Filter[str]
    dev: Filter[str]
    ifindex: Filter[int]
    protocol: Filter[Any]
    family: Filter[Union[int, str]]
    saddr: AddressFilter
    daddr: AddressFilter
    sport: Filter[int]
    dport: Filter[int]
    ip_proto: Filter[int]
    length: Filter[int]


class DropFilters(DropFieldFilters, total=False):
    """Filters of 'drop' events: a keyword per field (nettrace.events('drop', ...) takes them too)."""

    reason: Filter[str]


class DropApi(KindApi):
    """`nettrace` methods for packet drops (Trace exposes them)."""

    def drops(self, **filters: Unpack[DropFilters]) -> List[DropEvent]:
        """Dropped packets delivered in detail (at most the first
        DETAIL_BUDGET per namespace; `drop_summary()` counts them all)."""
        return cast(List[DropEvent], self.ctx.events("drop", **filters))

    def assert_drop(self, timeout: float = 2.0, **filters: Unpack[DropFilters]) -> DropEvent:
        """A packet matching filters was dropped; returns the event."""
        return cast(DropEvent, self.ctx.wait_for("drop", timeout=timeout, **filters))

    def assert_no_drops(self, reason: Filter[str] = None, *, include_unspecified: bool = False,
                        **fields: Unpack[DropFieldFilters]) -> None:
        """No packet matching filters was dropped in the watched namespaces.

        By default (`reason=None`) background drops don't count: reason
        "NOT_SPECIFIED" (the kernel reports that for frees that are not
        failures, e.g. IPv6 multicast a host did not join, seen on every fresh
        veth) and packets to IPv6 link-scope multicast (ff02::/16: MLD and
        neighbour discovery before the interface is fully up; older kernels
        call those IP_INNOROUTES), and empty buffers purged from a socket
        being destroyed (QUEUE_PURGE, length 0: the peer's FIN that an
        application closing without reading EOF never read; a purge with data
        counts), and AF_UNIX messages discarded at close (D-Bus clients: not
        network packets). `include_unspecified=True` counts those too, and so
        does a filter naming a drop's own reason or address: an explicit
        `reason` ("NOT_SPECIFIED", a list, or a predicate), `daddr` or `saddr`
        counts every drop it matches, background or not. On kernels without
        drop reasons (< 5.17) every drop counts.

        Sound: drops that were only counted (past the per-namespace detail
        budget, or with the ring buffer full) fail the assertion when their
        reason and location could match, since their other fields are unknown."""
        filters: Dict[str, Any] = dict(fields)
        if reason is not None:
            filters["reason"] = reason
        # naming a drop's own reason or address counts it, background or not
        lifted = include_unspecified or not DropEvent.BACKGROUND_COUNTED_BY.isdisjoint(filters)
        found = self.ctx.events("drop", **filters)
        if not lifted:
            found = [e for e in found if not e.background]
        what = _describe(filters, lifted)
        if found:
            raise AssertionError(self.ctx.fail(
                f"expected no drop events matching {what}, saw {len(found)}", "drop", filters, found))
        self.ctx.assert_watching("drop", filters)
        hidden = self._hidden_drops(filters if lifted else dict(filters, reason=_specified))
        if hidden:
            lines = "; ".join(str(r) for r in hidden[:5])
            raise EventsLost(self.ctx.fail(
                f"cannot assert that no drop matching {what} happened: "
                f"{sum(r.undelivered for r in hidden)} drops were counted but not delivered in detail "
                f"(per-namespace budget {DETAIL_BUDGET} spent, or ring buffer full) and may match: {lines}",
                "drop", filters, []))

    def drop_summary(self, **wanted: Unpack[DropCountFilters]) -> DropSummary:
        """Every drop in the watched namespaces, counted in the kernel by
        (namespace, location, reason) — including those past the detail
        budget. Filters: netns, reason, location. str() gives dropwatch's
        "N drops at location (REASON)" lines."""
        bad = [f for f in wanted if f not in _COUNT_FIELDS]
        if bad:
            raise ValueError(f"unknown filter {bad[0]!r} for drop_summary; valid: netns, reason, location")
        filters = self.ctx.validate("drop", dict(wanted))
        self.ctx.sync("drop")  # decoded events teach the probe where trampolined frees were
        probe = cast(DropProbe, self.ctx.engine.status["drop"].probe)
        rows = []
        for netns in self.ctx.watched:
            for location, reason, total, undelivered in probe.counts(netns):
                row = DropCount(netns, self.ctx.label(netns), probe.decoder.where(location), reason, total,
                                undelivered)
                if matches(_Counted(netns, reason, row.location), filters):
                    rows.append(row)
        rows.sort(key=lambda r: (-r.count, r.location))
        return DropSummary(rows)

    def _hidden_drops(self, filters: Dict[str, Any]) -> List[DropCount]:
        """Counted-only drops that could match filters (an unaccounted one always could)."""
        probe = cast(DropProbe, self.ctx.engine.status["drop"].probe)
        judged = {k: v for k, v in filters.items() if k in _COUNT_FIELDS}
        hidden = [r for r in self.drop_summary() if r.undelivered
                  and matches(_Counted(r.netns, r.reason, r.location), judged)]
        for netns in self.ctx.watched:
            unaccounted = probe.scope(netns)[2]
            if unaccounted:
                hidden.append(DropCount(netns, self.ctx.label(netns), "<unknown: drop counts map full>", None,
                                        unaccounted, unaccounted))
        return hidden


PROBE = DropProbe
API = DropApi

"""TCP resets (bpf/rst.bpf.c, bpf/rst.h): `kind == "rst"`."""
from __future__ import annotations

import ipaddress
import struct
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Tuple, cast

from ..events import Event, Header, IPAddress, Stack
from ..kernel import wire
from ..kernel.symbols import function_ranges
from .base import Decoder, Plan, Probe
from .context import Filter, KindApi, TcpFlowFilters
from .tcp import TCP_STATES, ip_from

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..kernel.capabilities import KernelFeatures

RECORD = wire.RST_EVENT
_BODY = RECORD.body
# 3: a received RST seen where TCP freed it (bpf/rst.h RST_ORIGIN_FREED)
ORIGINS = {0: "reply", 1: "active", 2: "received", 3: "received"}
FREED = 3
UNKNOWN_STATE = "UNKNOWN"   # state 0: a RST whose socket, if any, nothing named


class RstEvent(Event, init=False):
    """A TCP reset. Addresses and ports are the reset segment's own: `saddr`
    is whoever sent the RST (us when `direction == "sent"`)."""

    kind = "rst"
    direction: str                 # "sent" / "received"
    origin: str                    # "reply" / "active" / "received"
    family: int
    saddr: IPAddress
    sport: int
    daddr: IPAddress
    dport: int
    state: str                     # the socket's; CLOSE: none; UNKNOWN: not known (see README)
    reason: Optional[str]          # enum sk_rst_reason (6.10+)
    ALARM = True
    # the running kernel's enum sk_rst_reason (6.10+), set when the probe loads
    REASONS: ClassVar[Optional[Tuple[str, ...]]] = None
    VALUES = {**Event.VALUES, "direction": ("sent", "received"), "origin": ("reply", "active", "received"),
              "state": (*TCP_STATES.values(), UNKNOWN_STATE), "reason": lambda: RstEvent.REASONS}

    def describe(self) -> str:
        why = f" reason {self.reason}" if self.reason else ""
        origin = "" if self.origin == "received" else f" ({self.origin})"
        return (f"RST {self.direction}{origin} {_ep(self.saddr, self.sport)} > {_ep(self.daddr, self.dport)}"
                f" state {self.state}{why}")


def _ep(addr: Any, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


# tcp_receive_reset fires in tcp_reset(), which the kernel also calls on its
# own when data arrives after close (TCP_ABORT_ON_DATA, in FIN_WAIT1/2, from
# tcp_rcv_state_process) — no RST came in then (the kernel answers with one,
# reported as sent). In those states a real incoming RST goes through
# tcp_validate_incoming first.
def _local_abort(state: str, stack: Stack) -> bool:
    if state not in ("FIN_WAIT1", "FIN_WAIT2") or not stack.addrs:
        return False
    names = stack.functions
    return "tcp_rcv_state_process" in names and "tcp_validate_incoming" not in names


# A RST's skb is freed by TCP after it handled it, or, when it never reached
# TCP, by whatever dropped it first (netfilter, a forwarding router) or by a
# capture that copied it: only the first kind was received by TCP.
_TCP_RECEIVERS = frozenset(("tcp_v4_rcv", "tcp_v6_rcv", "tcp_v4_do_rcv", "tcp_v6_do_rcv"))


def _reached_tcp(stack: Stack) -> bool:
    # no stack: cannot tell; a negative assertion had better see it
    return not stack.addrs or not _TCP_RECEIVERS.isdisjoint(stack.functions)


class RstProbe(Probe):
    name = "rst"
    kind_id = wire.Kind.RST
    event_types = {"rst": RstEvent}
    decoder: "RstDecoder"

    def __init__(self) -> None:
        self.decoder = RstDecoder()

    def plans(self, kernel: "KernelFeatures") -> List[Plan]:
        reasons = {v: n.replace("SK_RST_REASON_", "") for v, n in kernel.enum("sk_rst_reason").items()}
        self.decoder.reasons = reasons
        RstEvent.REASONS = tuple(n for n in reasons.values() if n != "MAX")  # not a reason
        plans: List[Plan] = []
        if not kernel.tp_btf:
            return plans
        # Received: tcp_receive_reset for a full socket's, the frees for every
        # other; kfree_skb names the dropping socket since 6.11 (4 arguments),
        # its reason since 5.17 (3; before, drops are not looked at).
        recv = ["rst_recv_tp", "rst_tw_cancel", "rst_recv_consume"]
        drop_args = kernel.tracepoint_args("kfree_skb") or 0
        if drop_args >= 3:
            recv.append("rst_recv_drop_sk" if drop_args >= 4 else "rst_recv_drop")
        no_socket = next((v for v, n in kernel.enum("skb_drop_reason").items()
                          if n == "SKB_DROP_REASON_NO_SOCKET"), 0)
        timers = function_ranges(["tw_timer_handler", "reqsk_timer_handler"])
        tw_timer = timers.get("tw_timer_handler", (0, 0))[0]
        req_timer = timers.get("reqsk_timer_handler", (0, 0))[0]

        def cfg(active_only: int) -> Dict[str, bytes]:
            return {"rst_cfg": struct.pack("<IIQQ", active_only, no_socket, tw_timer, req_timer)}

        # 6.10+: one tracepoint sees both replies and active resets, with a reason.
        if kernel.tracepoint_args("tcp_send_reset") == 3:
            plans.append(Plan("tp_btf", ["rst_send_tp"] + recv, config=cfg(0)))
        # Older: the tracepoint for active resets, function entry for replies.
        if kernel.fentry:
            plans.append(Plan("tp_btf+fentry", ["rst_send_tp", "rst_v4_fentry", "rst_v6_fentry"] + recv,
                              config=cfg(1)))
        if kernel.kprobe:
            plans.append(Plan("tp_btf+kprobe", ["rst_send_tp", "rst_v4_kprobe", "rst_v6_kprobe"] + recv,
                              config=cfg(1)))
        return plans

    def unavailable_reason(self, kernel: "KernelFeatures") -> str:
        if not kernel.tp_btf:
            return f"needs tp_btf tracepoints ({kernel.why('tp_btf')})"
        return ("tcp_send_reset tracepoint lacks the reset reason (kernel < 6.10) and neither fentry "
                f"({kernel.why('fentry')}) nor kprobes ({kernel.why('kprobe')}) are available")


class RstDecoder(Decoder):
    """struct rst_event records to RstEvents."""

    records = (RECORD,)
    needs_watch = False  # each record says all its event needs

    def __init__(self) -> None:
        self.reasons: Dict[int, str] = {}   # enum sk_rst_reason, from the kernel's BTF (plans)

    def decode(self, buf: bytes, hdr: Header) -> List[Event]:
        origin_id, family, state, has_reason, reason, sport, dport, saddr, daddr = (
            _BODY.unpack_from(buf, RECORD.body_offset))
        origin = ORIGINS.get(origin_id) or str(origin_id)
        # Without a stack: replies and received resets run in softirq.
        ctx = "process" if origin == "active" else "softirq"
        src, dst = ip_from(saddr, family), ip_from(daddr, family)
        stack = hdr.stack(buf)
        state_name = TCP_STATES.get(state) or (UNKNOWN_STATE if state == 0 else str(state))
        if origin_id == FREED and not _reached_tcp(stack):
            return []
        if origin == "received" and _local_abort(state_name, stack):
            return []
        # RstEvent.of: the fields in declaration order (a flood's events are made here)
        return [RstEvent.of(
            hdr, stack, ctx,
            "received" if origin == "received" else "sent",                       # direction
            origin, 4 if type(src) is ipaddress.IPv4Address else 6,  # family: a v4-mapped v6 socket reports IPv4
            src, sport, dst, dport, state_name,
            (self.reasons.get(reason) or str(reason)) if has_reason else None,       # reason
        )]


class RstFilters(TcpFlowFilters, total=False):
    """Filters of 'rst' events: a keyword per field (nettrace.events('rst', ...) takes them too)."""

    direction: Filter[str]
    origin: Filter[str]
    reason: Filter[str]


class RstApi(KindApi):
    """`nettrace` methods for TCP resets (Trace exposes them)."""

    def rst(self, **filters: Unpack[RstFilters]) -> List[RstEvent]:
        """TCP resets seen (sent and received)."""
        return cast(List[RstEvent], self.ctx.events("rst", **filters))

    def assert_no_rst(self, **filters: Unpack[RstFilters]) -> None:
        """No TCP reset matching filters was sent or received (and none was lost)."""
        self.ctx.assert_none("rst", **filters)

    def assert_rst(self, timeout: float = 2.0, **filters: Unpack[RstFilters]) -> RstEvent:
        """A TCP reset matching filters happened; returns it."""
        return cast(RstEvent, self.ctx.wait_for("rst", timeout=timeout, **filters))


PROBE = RstProbe
API = RstApi

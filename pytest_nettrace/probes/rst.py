"""TCP resets (bpf/rst.bpf.c, bpf/rst.h): `kind == "rst"`."""
from __future__ import annotations

import ipaddress
import struct
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Tuple, cast

from ..events import Event, Header, IPAddress, Stack
from ..kernel import wire
from .base import Decoder, Plan, Probe
from .context import Filter, KindApi, TcpFlowFilters
from .tcp import TCP_STATES, ip_from

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..kernel.capabilities import KernelFeatures

RECORD = wire.RST_EVENT
_BODY = RECORD.body
ORIGINS = {0: "reply", 1: "active", 2: "received"}


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
    state: str
    reason: Optional[str]          # enum sk_rst_reason (6.10+)
    ALARM = True
    # the running kernel's enum sk_rst_reason (6.10+), set when the probe loads
    REASONS: ClassVar[Optional[Tuple[str, ...]]] = None
    VALUES = {**Event.VALUES, "direction": ("sent", "received"), "origin": ("reply", "active", "received"),
              "state": tuple(TCP_STATES.values()), "reason": lambda: RstEvent.REASONS}

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
        recv = ["rst_recv_tp"]
        # 6.10+: one tracepoint sees both replies and active resets, with a reason.
        if kernel.tp_btf and kernel.tracepoint_args("tcp_send_reset") == 3:
            plans.append(Plan("tp_btf", ["rst_send_tp"] + recv, config={"rst_cfg": struct.pack("<I", 0)}))
        # Older: the tracepoint for active resets, function entry for replies.
        active_only = struct.pack("<I", 1)
        if kernel.tp_btf and kernel.fentry:
            plans.append(Plan("tp_btf+fentry", ["rst_send_tp", "rst_v4_fentry", "rst_v6_fentry"] + recv,
                              config={"rst_cfg": active_only}))
        if kernel.tp_btf and kernel.kprobe:
            plans.append(Plan("tp_btf+kprobe", ["rst_send_tp", "rst_v4_kprobe", "rst_v6_kprobe"] + recv,
                              config={"rst_cfg": active_only}))
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
        state_name = TCP_STATES.get(state) or str(state)
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

"""TCP retransmissions (bpf/retransmit.bpf.c, bpf/retransmit.h): `kind == "retransmit"`.

Seed: tcpretrans (TIME PID IP LADDR:LPORT T> RADDR:RPORT STATE)."""
from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, Dict, List, Tuple, cast

from ..events import Event, Header, IPAddress
from ..kernel import wire
from .base import Decoder, Plan, Probe
from .context import Filter, KindApi, TcpFlowFilters
from .tcp import TCP_STATES, ip_from

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..kernel.capabilities import KernelFeatures

RECORD = wire.RETRANS_EVENT
_BODY = RECORD.body
RETRANS_SYNACK = 1
_LOSS_PROBE_FRAMES = ("tcp_send_loss_probe",)


class RetransmitEvent(Event, init=False):
    """A TCP segment sent again. `saddr`/`sport` are the local end (the
    sender of the retransmission), `daddr`/`dport` the remote one.

    `type`: "syn" (a connect() SYN, state SYN_SENT), "synack" (a listener's
    SYN/ACK), "loss_probe" (a tail loss probe) or "retransmit" (RTO or fast
    retransmit of data/FIN). One event is one retransmission as the kernel
    made it (a line of tcpretrans; one packet in tcpdump on a device that
    takes GSO aggregates); `segs`: the TCP segments it carried — their sum
    is the namespace's TcpRetransSegs (nstat). `count`: how many times this segment (same
    socket, same sequence number) was retransmitted so far, this one included.
    `total_retrans`: the socket's retransmitted segments so far, this one
    included, as the kernel counts them (tcp_sock.total_retrans; for SYN/ACKs
    the request's). `err`: 0 when it went out; else the error of a
    retransmission the kernel counted whose transmit then failed (6.14+: -1
    EPERM, a netfilter drop on output; 1 NET_XMIT_DROP, a qdisc's drop) — an
    attempt that failed before the kernel counted it (-EBUSY: its last copy
    still in the host's queues) is no event."""

    kind = "retransmit"
    type: str
    family: int
    saddr: IPAddress
    sport: int
    daddr: IPAddress
    dport: int
    state: str
    seq: int
    segs: int
    count: int
    total_retrans: int
    err: int
    VALUES = {**Event.VALUES, "type": ("syn", "synack", "loss_probe", "retransmit"),
              "state": tuple(TCP_STATES.values())}

    def describe(self) -> str:
        # tcpretrans: LADDR:LPORT T> RADDR:RPORT STATE, T = R(etransmit) / L(oss probe)
        t = "L>" if self.type == "loss_probe" else "R>"
        failed = f", not sent: {err_name(self.err)}" if self.err else ""
        return (f"{self.type} {_ep(self.saddr, self.sport)} {t} {_ep(self.daddr, self.dport)} {self.state}"
                f" seq {self.seq} (#{self.count}{failed})")


def err_name(err: int) -> str:
    """A failed retransmission's `err`: a negative errno, or a positive
    NET_XMIT_* code (net_xmit_eval leaves NET_XMIT_DROP)."""
    if err < 0:
        return f"-{errno.errorcode.get(-err, str(-err))}"
    return {1: "NET_XMIT_DROP"}.get(err, str(err))


def _ep(addr: Any, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


class RetransmitProbe(Probe):
    name = "retransmit"
    kind_id = wire.Kind.RETRANS
    event_types = {"retransmit": RetransmitEvent}

    def __init__(self) -> None:
        self.decoder = RetransmitDecoder()

    def plans(self, kernel: "KernelFeatures") -> List[Plan]:
        args = kernel.tracepoint_args("tcp_retransmit_skb")
        if not kernel.tp_btf or args is None:
            return []
        synack = ["retrans_synack_tp"] if kernel.tracepoint_args("tcp_retransmit_synack") is not None else []
        notes = [] if synack else ["no tcp_retransmit_synack tracepoint: SYN/ACK retransmits are not seen"]
        # 6.14+ adds `err` (failed attempts fire too): that program skips them
        prog = "retrans_tp" if args >= 3 else "retrans_tp_noerr"
        return [Plan("tp_btf", [prog] + synack, notes=notes)]

    def unavailable_reason(self, kernel: "KernelFeatures") -> str:
        if not kernel.tp_btf:
            return f"needs tp_btf tracepoints ({kernel.why('tp_btf')})"
        return "no tcp:tcp_retransmit_skb tracepoint in the kernel BTF"

    def unwatch(self, netns: int) -> None:
        self.decoder.forget(netns)


class RetransmitDecoder(Decoder):
    """struct retrans_event records to RetransmitEvents, counting each
    segment's retransmissions."""

    records = (RECORD,)

    def __init__(self) -> None:
        self._seen: Dict[Tuple[int, int, int, int], int] = {}  # (netns, sk, type, seq) -> count

    def forget(self, netns: int) -> None:
        for key in [k for k in self._seen if k[0] == netns]:
            del self._seen[key]

    def decode(self, buf: bytes, hdr: Header) -> List[Event]:
        sk, seq, total, segs, rtype, family, state, _pad, sport, dport, saddr, daddr, err = (
            _BODY.unpack_from(buf, RECORD.body_offset))
        key = (hdr.netns, sk, rtype, seq)
        self._seen[key] = count = self._seen.get(key, 0) + 1
        src, dst = ip_from(saddr, family), ip_from(daddr, family)
        state_name = TCP_STATES.get(state) or str(state)
        stack = hdr.stack(buf)
        if rtype == RETRANS_SYNACK:
            rtype_name = "synack"
            total += 1  # request_sock.num_retrans grows after the tracepoint
        elif state_name == "SYN_SENT":
            rtype_name = "syn"
        elif stack.functions.intersection(_LOSS_PROBE_FRAMES):
            rtype_name = "loss_probe"
        else:
            rtype_name = "retransmit"
        return [RetransmitEvent(hdr, stack, "softirq", type=rtype_name, family=src.version, saddr=src, sport=sport,
                                daddr=dst, dport=dport, state=state_name, seq=seq, segs=segs, count=count,
                                total_retrans=total, err=err)]


class RetransmitFilters(TcpFlowFilters, total=False):
    """Filters of 'retransmit' events: a keyword per field (nettrace.events('retransmit', ...) takes them too)."""

    type: Filter[str]
    seq: Filter[int]
    segs: Filter[int]
    count: Filter[int]
    total_retrans: Filter[int]
    err: Filter[int]


class RetransmitApi(KindApi):
    """`nettrace` methods for TCP retransmissions (Trace exposes them)."""

    def retransmits(self, **filters: Unpack[RetransmitFilters]) -> List[RetransmitEvent]:
        """TCP segments retransmitted (kind "retransmit"); filter e.g. `type="syn"`."""
        return cast(List[RetransmitEvent], self.ctx.events("retransmit", **filters))

    def assert_retransmit(self, timeout: float = 5.0, **filters: Unpack[RetransmitFilters]) -> RetransmitEvent:
        """A retransmission matching filters happened (waits up to `timeout`:
        the first RTO is 200 ms for data, 1 s for a SYN); returns it."""
        return cast(RetransmitEvent, self.ctx.wait_for("retransmit", timeout=timeout, **filters))

    def assert_no_retransmits(self, **filters: Unpack[RetransmitFilters]) -> None:
        """No TCP segment matching filters was retransmitted (and none may have been lost);
        a retransmission the kernel counted but failed to send counts (filter `err=0` to leave it out)."""
        self.ctx.assert_none("retransmit", **filters)


PROBE = RetransmitProbe
API = RetransmitApi

"""TCP connections (bpf/conn.bpf.c, bpf/conn.h): `kind == "conn"`.

Seeds: tcp_connections.stp (who accepted what: UID CMD PID PORT IP_SOURCE)
and tcplife (duration and bytes at close). One event per connect, per accept
and per close of a TCP socket in a watched namespace.
"""
from __future__ import annotations

import platform
import struct
import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Tuple, cast

from ..events import Event, Header, IPAddress, check_timeout, describe_filters
from ..kernel import wire
from .base import Decoder, Plan, Probe
from .context import Filter, KindApi, TcpFlowFilters
from .syscall import SYSCALL_NR
from .tcp import TCP_STATES, ip_from

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..kernel.capabilities import KernelFeatures

RECORD, STACK_RECORD = wire.CONN_EVENT, wire.CONN_STACK_EVENT
_BODY = RECORD.body  # the same members at the same place in both
CONNECT, ESTABLISHED, ACCEPTED, CLOSE = 0, 1, 2, 3
_OWNER_FIELDS = ("pid", "tid", "uid", "comm", "ppid", "parent_comm")


class ConnEvent(Event, init=False):
    """A TCP connection connected, accepted or closed.

    `action`: "connect" (an active open reached ESTABLISHED), "accept" (a
    passive open reached ESTABLISHED; `pid`/`comm` are the process whose
    accept() returned it, None until one did), "close" (reached CLOSE from
    any state but LISTEN: a refused connect closes from SYN_SENT).
    `saddr`/`sport` are the local end, `daddr`/`dport` the remote one.
    pid, tid, uid and comm name the connection's owner — the process that
    called connect() or accept() — on every action, as tcplife does; `context`
    says where the state change itself ran. `stack` is there only on a close
    that ended no FIN exchange (a reset, a timeout, an abort, a refused
    connect), where it says why; other actions have none (taking one cost
    most of a state change). `state` is the state it reached,
    `old_state` the one it left. On close: `duration_ms` since SYN_SENT /
    SYN_RECV, `bytes_sent` (acknowledged by the peer) and `bytes_received`."""

    kind = "conn"
    ACTIONS = ("connect", "accept", "close")
    action: str
    family: int
    saddr: IPAddress
    sport: int
    daddr: IPAddress
    dport: int
    state: str
    old_state: str
    duration_ms: Optional[float]
    bytes_sent: Optional[int]
    bytes_received: Optional[int]
    VALUES = {**Event.VALUES, "action": ACTIONS, "state": tuple(TCP_STATES.values()),
              "old_state": tuple(TCP_STATES.values())}

    def describe(self) -> str:
        local, remote = _ep(self.saddr, self.sport), _ep(self.daddr, self.dport)
        if self.action == "close":
            life = f" after {self.duration_ms:.3f}ms" if self.duration_ms is not None else ""
            return (f"close {local} <> {remote} from {self.old_state}{life}, "
                    f"sent {self.bytes_sent} B, received {self.bytes_received} B")
        arrow = "from" if self.action == "accept" else "to"
        return f"{self.action} {local} {arrow} {remote}"

    def seed_row(self) -> str:
        """tcp_connections.stp's row: UID CMD PID PORT IP_SOURCE."""
        uid = "-" if self.uid is None else self.uid
        pid = "-" if self.pid is None else self.pid
        return f"{uid!s:>6} {(self.comm or '-')[:15]:<15} {pid!s:>7} {self.sport:>5} {self.daddr}"


SEED_HEADER = f"{'UID':>6} {'CMD':<15} {'PID':>7} {'PORT':>5} IP_SOURCE"


def _ep(addr: Any, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


class ConnProbe(Probe):
    name = "conn"
    kind_id = wire.Kind.CONN
    event_types = {"conn": ConnEvent}
    decoder: "ConnDecoder"

    def __init__(self) -> None:
        self.decoder = ConnDecoder()

    def plans(self, kernel: "KernelFeatures") -> List[Plan]:
        if not kernel.tp_btf or kernel.tracepoint_args("inet_sock_set_state") is None:
            return []
        # conn_state_nested takes the state changes the kernel skipped
        # conn_state_tp for (bpf/conn.bpf.c): only those it did not are lost
        state = ["conn_state_tp", "conn_state_nested", "conn_softirq_entry", "conn_softirq_exit"]
        plans = []
        # kretprobe first: it also sees io_uring and in-kernel accepts
        if kernel.kprobe:
            plans.append(Plan("tp_btf+kretprobe", state + ["conn_accept_kretprobe"]))
        nrs = SYSCALL_NR.get(platform.machine())
        if nrs:
            # the syscall probe's sys_exit program, which calls conn's part
            # when this is set (one program on that tracepoint, not two)
            cfg = {"conn_cfg": struct.pack("<iiI", nrs["accept"], nrs["accept4"], 1)}
            plans.append(Plan("tp_btf+sys_exit", state + ["sc_exit"], config=cfg))
        plans.append(Plan("tp_btf (accepting process unknown)", state,
                          notes=[f"no kprobes ({kernel.why('kprobe')}) and no syscall table for "
                                 f"{platform.machine()}: accept events have no pid"]))
        for plan in plans:
            plan.own_misses.append("conn_state_nested")
            plan.covered["conn_state_tp"] = "conn_covered"
        return plans

    def unavailable_reason(self, kernel: "KernelFeatures") -> str:
        if not kernel.tp_btf:
            return f"needs tp_btf tracepoints ({kernel.why('tp_btf')})"
        return "no sock:inet_sock_set_state tracepoint in the kernel BTF (kernel < 4.16)"

    def unwatch(self, netns: int) -> None:
        self.decoder.forget(netns)


class ConnDecoder(Decoder):
    """struct conn_event records to ConnEvents; a passive open's two records
    (established, accepted) make one event, corrected when the second comes."""

    records = (RECORD, STACK_RECORD)

    def __init__(self) -> None:
        # passive opens waiting for their other half (ESTABLISHED <-> ACCEPTED),
        # by (netns, socket address), with the action of the record that came
        # first: the two can come in either order
        self._pending: Dict[Tuple[int, int], Tuple[int, ConnEvent]] = {}
        # established, then closed (a reset) before accept() took them: accept()
        # still returns the socket, and its record then names who took it
        self._closed_unaccepted: Dict[Tuple[int, int], ConnEvent] = {}
        # a task's parent as its last record in its own context showed it, by
        # (netns, pid): a socket's record keeps no parent, and a close in
        # softirq (the peer's FIN) runs in nobody's context
        self._parents: Dict[Tuple[int, int], Tuple[int, str]] = {}

    def forget(self, netns: int) -> None:
        for table in (self._pending, self._closed_unaccepted, self._parents):
            for key in [k for k in table if k[0] == netns]:
                del table[key]

    def _fill_parent(self, netns: int, owner: Dict[str, Any]) -> None:
        """Remember the owner's parent, or fill it in from what was remembered."""
        if owner["pid"] is None:
            return
        if owner["ppid"] is not None:
            self._parents[(netns, owner["pid"])] = (owner["ppid"], owner["parent_comm"])
            return
        parent = self._parents.get((netns, owner["pid"]))
        if parent is not None:
            owner["ppid"], owner["parent_comm"] = parent

    def layout(self, hdr: Header) -> wire.Record:
        return STACK_RECORD if hdr.flags & wire.CONN_F_STACK else RECORD

    def decode(self, buf: bytes, hdr: Header) -> List[Event]:
        (sk, duration, acked, received, owner_pid, owner_tid, owner_uid, owner_comm, action, family,
         oldstate, newstate, has_owner, has_birth, sport, dport, _pad, saddr, daddr) = \
            _BODY.unpack_from(buf, RECORD.body_offset)
        key = (hdr.netns, sk)
        if action == ACCEPTED:
            first = self._pending.pop(key, None)
            ev = first[1] if first is not None else self._closed_unaccepted.get(key)
            self._closed_unaccepted.pop(key, None)
            if ev is not None:  # established first: now we know who accepted it
                acceptor = _owner_from_task(hdr)
                self._fill_parent(hdr.netns, acceptor)
                return [ev.corrected(**acceptor)]
        elif action == ESTABLISHED:
            self._closed_unaccepted.pop(key, None)   # the address is a new socket's now
            if self._pending.pop(key, None) is not None:  # accept() was reported first
                return []
        elif action == CLOSE:
            first = self._pending.pop(key, None)
            if first is not None and first[0] == ESTABLISHED:
                self._closed_unaccepted[key] = first[1]
        src, dst = ip_from(saddr, family), ip_from(daddr, family)
        stack = hdr.stack(buf)
        # only a close that ended no FIN exchange has a stack; the context
        # of the others is the kernel's word (the stack, where one is, agrees)
        guess = "softirq" if hdr.flags & wire.CONN_F_SOFTIRQ else "process"
        if action == ACCEPTED:
            owner_fields = _owner_from_task(hdr)
        else:
            owner = None
            if has_owner:
                owner = (owner_pid, owner_tid, owner_uid, owner_comm.split(b"\0", 1)[0].decode(errors="replace"))
            owner_fields = _owner_of(stack.context(guess), hdr, owner)
        self._fill_parent(hdr.netns, owner_fields)
        ev = ConnEvent(
            hdr, stack, guess,
            action={CONNECT: "connect", CLOSE: "close"}.get(action, "accept"),
            family=src.version, saddr=src, sport=sport, daddr=dst, dport=dport,
            state="ESTABLISHED" if action == ACCEPTED else TCP_STATES.get(newstate) or str(newstate),
            old_state=TCP_STATES.get(oldstate) or str(oldstate),
            duration_ms=duration / 1e6 if action == CLOSE and has_birth else None,
            bytes_sent=acked if action == CLOSE else None,
            bytes_received=received if action == CLOSE else None,
            **owner_fields,
        )
        if action in (ACCEPTED, ESTABLISHED):
            self._pending[key] = (action, ev)
        return [ev]


def _owner_from_task(hdr: Header) -> Dict[str, Any]:
    """The owner is the task the record was taken in (accept() returning)."""
    return dict(pid=hdr.pid, tid=hdr.tid, uid=hdr.uid, comm=hdr.comm, ppid=hdr.ppid, parent_comm=hdr.pcomm)


def _owner_of(context: str, hdr: Header, owner: Optional[Tuple[Any, ...]]) -> Dict[str, Any]:
    """Owner fields from the socket's birth record; the parent only when the
    event ran (`context`) in the owner's own context (it is not stored per socket)."""
    if owner is None:
        return dict.fromkeys(_OWNER_FIELDS)
    pid, tid, uid, comm = owner
    same = context == "process" and hdr.pid == pid
    return dict(pid=pid, tid=tid, uid=uid, comm=comm, ppid=hdr.ppid if same else None,
                parent_comm=hdr.pcomm if same else None)


def _no_count(filters: Mapping[str, Any], method: str) -> None:
    if "count" in filters:  # one return type per method: a count has its own
        raise TypeError(f"{method}() returns one event; for exactly N connections use {method}_count(N, ...)")


class ConnFieldFilters(TcpFlowFilters, total=False):
    """Filters of 'conn' events but `action` (which each method decides)."""

    old_state: Filter[str]
    duration_ms: Filter[float]
    bytes_sent: Filter[int]
    bytes_received: Filter[int]


class ConnFilters(ConnFieldFilters, total=False):
    """Filters of 'conn' events: a keyword per field (nettrace.events('conn', ...) takes them too)."""

    action: Filter[str]


class ConnApi(KindApi):
    """`nettrace` methods for TCP connections (Trace exposes them)."""

    def connections(self, **filters: Unpack[ConnFilters]) -> List[ConnEvent]:
        """TCP connects, accepts and closes (kind "conn"); filter e.g. `action="accept"`."""
        return cast(List[ConnEvent], self.ctx.events("conn", **filters))

    def assert_accepted(self, timeout: float = 2.0, **filters: Unpack[ConnFieldFilters]) -> ConnEvent:
        """A connection matching filters was accepted; returns the first such
        event. Filtering on pid/comm waits for the accept() to be attributed."""
        _no_count(filters, "assert_accepted")
        return cast(ConnEvent, self.ctx.wait_for("conn", timeout=timeout, action="accept", **filters))

    def assert_connected(self, timeout: float = 2.0, **filters: Unpack[ConnFieldFilters]) -> ConnEvent:
        """A connection matching filters was established by connect(); returns
        the first such event."""
        _no_count(filters, "assert_connected")
        return cast(ConnEvent, self.ctx.wait_for("conn", timeout=timeout, action="connect", **filters))

    def assert_accepted_count(self, count: int, timeout: float = 2.0,
                              **filters: Unpack[ConnFieldFilters]) -> List[ConnEvent]:
        """Exactly `count` connections matching filters were accepted: waits
        (up to `timeout`) for them, fails if more matched by then; returns them."""
        return self._assert_conn_count("accept", timeout, count, filters)

    def assert_connected_count(self, count: int, timeout: float = 2.0,
                               **filters: Unpack[ConnFieldFilters]) -> List[ConnEvent]:
        """Exactly `count` connections matching filters were established by
        connect(), as assert_accepted_count; returns them."""
        return self._assert_conn_count("connect", timeout, count, filters)

    def assert_closed(self, timeout: float = 2.0, **filters: Unpack[ConnFieldFilters]) -> ConnEvent:
        """A connection matching filters closed; returns the event (duration, bytes)."""
        return cast(ConnEvent, self.ctx.wait_for("conn", timeout=timeout, action="close", **filters))

    def connection_table(self, action: str = "accept", **filters: Unpack[ConnFieldFilters]) -> str:
        """tcp_connections.stp's report: UID CMD PID PORT IP_SOURCE, one row
        per connection (`action="connect"` for the client side)."""
        rows = [cast(ConnEvent, e).seed_row() for e in self.ctx.events("conn", action=action, **filters)]
        return "\n".join([SEED_HEADER] + rows)

    def _assert_conn_count(self, action: str, timeout: float, count: int,
                           fields: Mapping[str, Any]) -> List[ConnEvent]:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count is a number of connections >= 0, not {count!r}")
        if "action" in fields:   # each method decides it: another would be dropped without a word
            raise ValueError(f"assert_{'accepted' if action == 'accept' else 'connected'}_count() counts "
                             f"action={action!r} events; action={fields['action']!r} is not a filter here")
        filters = dict(fields, action=action)
        deadline = time.monotonic() + check_timeout(timeout)
        while True:
            found = cast(List[ConnEvent], self.ctx.events("conn", **filters))
            if len(found) >= count or time.monotonic() >= deadline:
                break
            self.ctx.engine.wait(min(0.02, max(0.0, deadline - time.monotonic())))
        if len(found) != count:
            if len(found) < count:
                self.ctx.assert_nothing_lost("conn", filters)
            raise AssertionError(self.ctx.fail(
                f"expected {count} conn events matching {describe_filters(filters)}, saw {len(found)}"
                + (f" within {timeout:g}s" if len(found) < count else ""), "conn", filters, found))
        return found


PROBE = ConnProbe
API = ConnApi

"""The wire contract between the BPF programs (bpf/*.h) and Python: kind ids,
header flags, and the layout of every ring record and map entry Python reads.

All layouts live in this one module, not beside each probe: the C side shares
them too (struct nt_hdr heads every record, struct sysctl_write is written by
sysctl.bpf.c and read from netchange records), and tests/unit/test_wire.py
checks every one against the built object's BTF from a single table
(LAYOUTS) — a layout added here is checked without touching the test.

A Layout is declared like its C struct, member by member, and laid out with
C's alignment rules, so a member added on one side only shows as an offset or
size mismatch in that test rather than as garbage in a decoded event.
"""
from __future__ import annotations

import enum
import struct
from typing import Any, Dict, List, Sequence, Tuple, Union

# bpf/nettrace.h
NT_COMM_LEN = 16
NT_MAX_STACK = 48
NT_MAX_KINDS = 16


class Kind(enum.IntEnum):
    """enum nt_kind: a record's nt_hdr.kind, and its index in nt_scope.lost."""

    RST = 1
    NLMSG = 2
    DROP = 3
    CONN = 4
    RETRANS = 5
    SYSCALL = 6
    TRAFFIC = 7
    PACKET = 8    # AF_PACKET capture: no ring records, losses counted in Python
    SYSCTL = 9
    NFTRACE = 10  # nftables trace messages: no ring records, losses counted in Python


# nt_hdr.flags (NT_F_* in bpf/nettrace.h; NC_F_* in bpf/netchange.h; CONN_F_* in bpf/conn.h;
# SY_F_* in bpf/sysctl.h)
NT_F_KTHREAD = 0x8     # the current task is a kernel thread
NC_F_QUEUED_BY = 0x10  # task, command line and stack are those of who queued the DAD work
NC_F_NFT = 0x20        # the record is a struct nftchange_event
CONN_F_SOFTIRQ = 0x40  # the TCP state change ran in softirq
CONN_F_STACK = 0x80    # the record is a struct conn_stack_event
SY_F_RESULT = 0x100    # the record is a struct sysctl_result

# bpf/netchange.h
NC_MSG_MAX, NC_CMDLINE_MAX, NC_NFT_MSG_MAX, NC_REQ_MAX = 1024, 256, 4096, 64
NC_SOCK_RTNL, NC_SOCK_NFT = 1, 2   # nc_socks value: which monitor socket
# bpf/sysctl.h
SY_NAME_MAX, SY_VALUE_MAX, SY_CMDLINE_MAX = 128, 64, 256
# bpf/syscall.h
SC_ADDR_MAX = 112
# bpf/drop.h
DROP_DEV_LEN = 16

Member = Tuple[str, Union[str, "Layout"]]


def _align_of(fmt: str) -> int:
    code = fmt[-1]
    return 1 if code in "sx" else struct.calcsize("<" + code)


class Layout:
    """A C struct as Python reads it. Members are (name, struct format) —
    "I", "16s", "6Q", "3x" for an unread pad — or (name, Layout) for a nested
    struct; offsets follow C's alignment, with the padding made explicit."""

    def __init__(self, cname: str, members: Sequence[Member]) -> None:
        self.cname = cname
        self.members = tuple(members)
        self.offsets: Dict[str, int] = {}
        self.align = 1
        fmt, off = "", 0
        for name, spec in self.members:
            inner, align = (spec.format, spec.align) if isinstance(spec, Layout) else (spec, _align_of(spec))
            pad = -off % align
            if pad:
                fmt += f"{pad}x"
                off += pad
            self.offsets[name] = off
            fmt += inner
            off += struct.calcsize("<" + inner)
            self.align = max(self.align, align)
        tail = -off % self.align
        self.format: str = fmt + (f"{tail}x" if tail else "")
        self.struct: struct.Struct = struct.Struct("<" + self.format)
        self.size = self.struct.size

    def part(self, first: str, last: str) -> Tuple[int, struct.Struct]:
        """(offset, Struct) of members `first` to `last`, inclusive, with the
        padding between them: one unpack_from for a record's body."""
        names = [n for n, _ in self.members]
        fmt, start = "", self.offsets[first]
        cur = start
        for name, spec in self.members[names.index(first):names.index(last) + 1]:
            inner = spec.format if isinstance(spec, Layout) else spec
            pad = self.offsets[name] - cur
            fmt += f"{pad}x" if pad else ""
            fmt += inner
            cur = self.offsets[name] + struct.calcsize("<" + inner)
        return start, struct.Struct("<" + fmt)

    def values(self, fields: Dict[str, Any]) -> List[Any]:
        """`fields` (member name -> value; a nested struct's a dict, an array's
        a sequence) in pack order; members left out are zero."""
        out: List[Any] = []
        for name, spec in self.members:
            value = fields.get(name)
            if isinstance(spec, Layout):
                out += spec.values(value or {})
            elif spec.endswith("x"):
                continue
            elif spec.endswith("s"):
                out.append(value or b"")
            elif spec[:-1]:  # an array: "6Q"
                n = int(spec[:-1])
                out += list(value or ()) + [0] * (n - len(value or ()))
            else:
                out.append(value or 0)
        return out

    def pack(self, **fields: Any) -> bytes:
        """The C struct with these member values (synthetic records for tests)."""
        return self.struct.pack(*self.values(fields))

    def __repr__(self) -> str:
        return f"Layout({self.cname!r}, size={self.size})"


class Record(Layout):
    """A ring-buffer record: struct nt_hdr `h`, the body, and optionally the
    kernel stack `stack` as the trailer (Header.stack reads it from the
    end). The decoder unpacks `body` at `body_offset`; a record whose length
    is not `size` is rejected before it reaches the decoder."""

    def __init__(self, cname: str, members: Sequence[Member], *, stack: bool = True) -> None:
        full: List[Member] = [("h", NT_HDR), *members]
        if stack:
            full.append(("stack", f"{NT_MAX_STACK}Q"))
        super().__init__(cname, full)
        self.body_offset, self.body = self.part(members[0][0], members[-1][0])


NT_HDR = Layout("nt_hdr", [
    ("ts", "Q"), ("netns", "I"), ("kind", "H"), ("flags", "H"), ("pid", "I"), ("tid", "I"), ("uid", "I"),
    ("ppid", "I"), ("comm", f"{NT_COMM_LEN}s"), ("pcomm", f"{NT_COMM_LEN}s"), ("stack_len", "i"), ("pad", "I")])
HEADER = NT_HDR.struct
STACK_BYTES = NT_MAX_STACK * 8
NT_SCOPE = Layout("nt_scope", [("lost", f"{NT_MAX_KINDS}Q"), ("since", "Q")])

RST_EVENT = Record("rst_event", [
    ("origin", "B"), ("family", "B"), ("state", "B"), ("has_reason", "B"), ("reason", "i"),
    ("sport", "H"), ("dport", "H"), ("saddr", "16s"), ("daddr", "16s")])

RETRANS_EVENT = Record("retrans_event", [
    ("sk", "Q"), ("seq", "I"), ("total_retrans", "I"), ("segs", "H"), ("type", "B"), ("family", "B"), ("state", "B"),
    ("pad", "B"), ("sport", "H"), ("dport", "H"), ("saddr", "16s"), ("daddr", "16s"), ("err", "i")])

_CONN_MEMBERS: List[Member] = [
    ("sk", "Q"), ("duration_ns", "Q"), ("bytes_acked", "Q"), ("bytes_received", "Q"),
    ("owner_pid", "I"), ("owner_tid", "I"), ("owner_uid", "I"), ("owner_comm", f"{NT_COMM_LEN}s"),
    ("action", "B"), ("family", "B"), ("oldstate", "B"), ("newstate", "B"), ("has_owner", "B"),
    ("has_birth", "B"), ("sport", "H"), ("dport", "H"), ("pad", "H"), ("saddr", "16s"), ("daddr", "16s")]
CONN_EVENT = Record("conn_event", _CONN_MEMBERS, stack=False)
CONN_STACK_EVENT = Record("conn_stack_event", _CONN_MEMBERS)  # flagged CONN_F_STACK

DROP_EVENT = Record("drop_event", [
    ("location", "Q"), ("reason", "I"), ("len", "I"), ("ifindex", "I"), ("protocol", "H"), ("family", "B"),
    ("ip_proto", "B"), ("sport", "H"), ("dport", "H"), ("has_reason", "B"), ("has_ports", "B"), ("pad", "2x"),
    ("dev", f"{DROP_DEV_LEN}s"), ("saddr", "16s"), ("daddr", "16s")])
DROP_KEY = Layout("drop_key", [("netns", "I"), ("reason", "I"), ("location", "Q")])
DROP_COUNT = Layout("drop_count", [("total", "Q"), ("undelivered", "Q")])
DROP_SCOPE = Layout("drop_scope", [("detailed", "Q"), ("summarized", "Q"), ("unaccounted", "Q")])

SYSCTL_WRITE = Layout("sysctl_write", [("name", f"{SY_NAME_MAX}s"), ("value", f"{SY_VALUE_MAX}s")])
SYSCTL_EVENT = Record("sysctl_event", [
    ("name_len", "i"), ("old_len", "i"), ("new_len", "i"), ("cmdline_len", "I"), ("file_pos", "I"),
    ("io_known", "I"), ("syscw", "Q"), ("wchar", "Q"), ("name", f"{SY_NAME_MAX}s"), ("old", f"{SY_VALUE_MAX}s"),
    ("new", f"{SY_VALUE_MAX}s"),
    ("cmdline", f"{SY_CMDLINE_MAX}s")], stack=False)
SYSCTL_RESULT = Record("sysctl_result", [("ret", "q")], stack=False)   # flagged SY_F_RESULT

NC_REQUEST = Layout("nc_request", [("netns", "I"), ("len", "I"), ("copied", "I"), ("pad", "I"),
                                   ("msg", f"{NC_REQ_MAX}s")])
NETCHANGE_EVENT = Record("netchange_event", [
    ("skb", "Q"), ("portid", "I"), ("msg_len", "I"), ("copied", "I"), ("cmdline_len", "I"),
    ("cmdline", f"{NC_CMDLINE_MAX}s"), ("msg", f"{NC_MSG_MAX}s"), ("sysctl", SYSCTL_WRITE), ("req", NC_REQUEST)])
NFTCHANGE_EVENT = Record("nftchange_event", [
    ("skb", "Q"), ("portid", "I"), ("msg_len", "I"), ("copied", "I"), ("cmdline_len", "I"),
    ("cmdline", f"{NC_CMDLINE_MAX}s"), ("msg", f"{NC_NFT_MSG_MAX}s")])
NC_SOCK_KEY = Layout("nc_sock_key", [("netns", "I"), ("portid", "I")])
NC_SOCK = Layout("nc_sock", [("which", "I"), ("pad", "I"), ("charged", "Q")])

SYSCALL_EVENT = Record("syscall_event", [
    ("args", "6Q"), ("ret", "q"), ("duration", "Q"), ("code", "H"), ("addr_len", "H"), ("value", "i"),
    ("value2", "i"), ("has_value", "B"), ("pad", "3x"), ("addr", f"{SC_ADDR_MAX}s")], stack=False)
SC_PENDING = Layout("sc_pending", [("e", SYSCALL_EVENT), ("netns", "I"), ("pad", "I")])

TRAFFIC_KEY = Layout("traffic_key", [("netns", "I"), ("ifindex", "I"), ("pid", "I"), ("port", "H"), ("proto", "B"),
                                     ("pad", "x")])
TRAFFIC_COUNTERS = Layout("traffic_counters", [
    ("tx_packets", "Q"), ("rx_packets", "Q"), ("tx_bytes", "Q"), ("rx_bytes", "Q"), ("dev", "16s"), ("uid", "I"),
    ("comm", f"{NT_COMM_LEN}s")])
TRAFFIC_OWNER_KEY = Layout("traffic_owner_key", [("netns", "I"), ("pid", "I"), ("port", "H"), ("proto", "B"),
                                                 ("pad", "x")])
TRAFFIC_OWNER = Layout("traffic_owner", [("uid", "I"), ("comm", f"{NT_COMM_LEN}s")])

# Every layout Python reads, for the BTF comparison.
LAYOUTS: Tuple[Layout, ...] = (
    NT_HDR, NT_SCOPE, RST_EVENT, RETRANS_EVENT, CONN_EVENT, CONN_STACK_EVENT, DROP_EVENT, DROP_KEY, DROP_COUNT,
    DROP_SCOPE,
    SYSCTL_WRITE, SYSCTL_EVENT, SYSCTL_RESULT, NC_REQUEST, NETCHANGE_EVENT, NFTCHANGE_EVENT, NC_SOCK_KEY, NC_SOCK,
    SYSCALL_EVENT, SC_PENDING,
    TRAFFIC_KEY, TRAFFIC_COUNTERS, TRAFFIC_OWNER_KEY, TRAFFIC_OWNER)

"""Network system calls of the test's processes, strace-style
(bpf/syscall.bpf.c, bpf/syscall.h): kind "syscall".

Traced: the tasks whose network namespace is watched — the processes a test
starts with `Namespace.run`/`popen` and their children — except pytest's own
process (its helper threads enter namespaces to set them up). Arguments are
decoded here: sockaddrs as address:port, socket options by name, errors by
errno name.
"""
from __future__ import annotations

import errno as _errno
import ipaddress
import os
import platform
import socket
import struct
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union, cast

from ..events import Event, Header, IPAddress
from ..kernel import wire
from ..kernel.libbpf import map_update
from .base import Decoder, Plan, Probe
from .context import AddressFilter, CommonFilters, Filter, KindApi

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..kernel.capabilities import KernelFeatures
    from ..kernel.libbpf import LoadedMaps

RECORD = wire.SYSCALL_EVENT
_BODY = RECORD.body
_u32 = struct.Struct("<I")
_u64 = struct.Struct("<Q")

# enum sc_code (bpf/syscall.h), in order
CALLS = ("socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
         "sendto", "sendmsg", "sendmmsg", "recvfrom", "recvmsg", "recvmmsg",
         "setsockopt", "getsockopt", "shutdown", "getsockname", "getpeername", "close")
CODE = {name: i + 1 for i, name in enumerate(CALLS)}

# syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl, include/uapi/asm-generic/unistd.h)
SYSCALL_NR = {
    "x86_64": dict(socket=41, connect=42, accept=43, sendto=44, recvfrom=45, sendmsg=46, recvmsg=47,
                   shutdown=48, bind=49, listen=50, getsockname=51, getpeername=52, socketpair=53,
                   setsockopt=54, getsockopt=55, accept4=288, recvmmsg=299, sendmmsg=307, close=3),
    "aarch64": dict(socket=198, socketpair=199, bind=200, listen=201, accept=202, connect=203,
                    getsockname=204, getpeername=205, sendto=206, recvfrom=207, setsockopt=208,
                    getsockopt=209, shutdown=210, sendmsg=211, recvmsg=212, accept4=242, recvmmsg=243,
                    sendmmsg=269, close=57),
}

FAMILIES = {0: "AF_UNSPEC", 1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6", 16: "AF_NETLINK", 17: "AF_PACKET"}
SOCK_TYPES = {1: "SOCK_STREAM", 2: "SOCK_DGRAM", 3: "SOCK_RAW", 4: "SOCK_RDM", 5: "SOCK_SEQPACKET", 10: "SOCK_PACKET"}
SOCK_FLAGS = {0o4000: "SOCK_NONBLOCK", 0o2000000: "SOCK_CLOEXEC"}
PROTOCOLS = {0: "IPPROTO_IP", 1: "IPPROTO_ICMP", 6: "IPPROTO_TCP", 17: "IPPROTO_UDP", 58: "IPPROTO_ICMPV6",
             132: "IPPROTO_SCTP", 136: "IPPROTO_UDPLITE", 255: "IPPROTO_RAW", 262: "IPPROTO_MPTCP"}
LEVELS = {0: "SOL_IP", 1: "SOL_SOCKET", 6: "SOL_TCP", 17: "SOL_UDP", 41: "SOL_IPV6", 58: "SOL_ICMPV6",
          255: "SOL_RAW", 263: "SOL_PACKET", 270: "SOL_NETLINK"}
OPTIONS = {
    "SOL_SOCKET": {1: "SO_DEBUG", 2: "SO_REUSEADDR", 3: "SO_TYPE", 4: "SO_ERROR", 5: "SO_DONTROUTE",
                   6: "SO_BROADCAST", 7: "SO_SNDBUF", 8: "SO_RCVBUF", 9: "SO_KEEPALIVE", 10: "SO_OOBINLINE",
                   12: "SO_PRIORITY", 13: "SO_LINGER", 15: "SO_REUSEPORT", 16: "SO_PASSCRED",
                   17: "SO_PEERCRED", 18: "SO_RCVLOWAT", 19: "SO_SNDLOWAT", 20: "SO_RCVTIMEO_OLD",
                   21: "SO_SNDTIMEO_OLD", 25: "SO_BINDTODEVICE", 26: "SO_ATTACH_FILTER", 29: "SO_TIMESTAMP_OLD",
                   30: "SO_ACCEPTCONN", 32: "SO_SNDBUFFORCE", 33: "SO_RCVBUFFORCE", 35: "SO_TIMESTAMPNS_OLD",
                   36: "SO_MARK", 38: "SO_PROTOCOL", 39: "SO_DOMAIN", 46: "SO_BUSY_POLL",
                   49: "SO_INCOMING_CPU", 60: "SO_ZEROCOPY", 66: "SO_RCVTIMEO_NEW", 67: "SO_SNDTIMEO_NEW"},
    "SOL_TCP": {1: "TCP_NODELAY", 2: "TCP_MAXSEG", 3: "TCP_CORK", 4: "TCP_KEEPIDLE", 5: "TCP_KEEPINTVL",
                6: "TCP_KEEPCNT", 7: "TCP_SYNCNT", 8: "TCP_LINGER2", 9: "TCP_DEFER_ACCEPT",
                10: "TCP_WINDOW_CLAMP", 11: "TCP_INFO", 12: "TCP_QUICKACK", 13: "TCP_CONGESTION",
                18: "TCP_USER_TIMEOUT", 23: "TCP_FASTOPEN", 25: "TCP_NOTSENT_LOWAT"},
    "SOL_IP": {1: "IP_TOS", 2: "IP_TTL", 3: "IP_HDRINCL", 4: "IP_OPTIONS", 8: "IP_PKTINFO",
               10: "IP_MTU_DISCOVER", 11: "IP_RECVERR", 15: "IP_FREEBIND", 19: "IP_TRANSPARENT",
               24: "IP_BIND_ADDRESS_NO_PORT", 32: "IP_MULTICAST_IF", 33: "IP_MULTICAST_TTL",
               34: "IP_MULTICAST_LOOP", 35: "IP_ADD_MEMBERSHIP", 36: "IP_DROP_MEMBERSHIP"},
    "SOL_IPV6": {16: "IPV6_UNICAST_HOPS", 17: "IPV6_MULTICAST_IF", 18: "IPV6_MULTICAST_HOPS",
                 19: "IPV6_MULTICAST_LOOP", 20: "IPV6_ADD_MEMBERSHIP", 25: "IPV6_RECVERR", 26: "IPV6_V6ONLY",
                 49: "IPV6_RECVPKTINFO", 67: "IPV6_TCLASS"},
    "SOL_RAW": {1: "ICMP_FILTER"},
}
# how strace names an option it does not know, by level: "0x270f /* TCP_??? */"
_OPTION_PREFIX = {"SOL_SOCKET": "SO", "SOL_TCP": "TCP", "SOL_UDP": "UDP", "SOL_IP": "IP", "SOL_IPV6": "IPV6",
                  "SOL_RAW": "ICMP"}
ICMP_TYPES = {0: "ICMP_ECHOREPLY", 3: "ICMP_DEST_UNREACH", 4: "ICMP_SOURCE_QUENCH", 5: "ICMP_REDIRECT",
              8: "ICMP_ECHO", 11: "ICMP_TIME_EXCEEDED", 12: "ICMP_PARAMETERPROB", 13: "ICMP_TIMESTAMP",
              14: "ICMP_TIMESTAMPREPLY", 15: "ICMP_INFO_REQUEST", 16: "ICMP_INFO_REPLY", 17: "ICMP_ADDRESS",
              18: "ICMP_ADDRESSREPLY"}
MSG_FLAGS = {0x1: "MSG_OOB", 0x2: "MSG_PEEK", 0x4: "MSG_DONTROUTE", 0x20: "MSG_TRUNC", 0x40: "MSG_DONTWAIT",
             0x80: "MSG_EOR", 0x100: "MSG_WAITALL", 0x800: "MSG_CONFIRM", 0x2000: "MSG_ERRQUEUE",
             0x4000: "MSG_NOSIGNAL", 0x8000: "MSG_MORE", 0x4000000: "MSG_ZEROCOPY",
             0x20000000: "MSG_FASTOPEN", 0x40000000: "MSG_CMSG_CLOEXEC"}
SHUT = {0: "SHUT_RD", 1: "SHUT_WR", 2: "SHUT_RDWR"}
_IP_FAMILY = {"AF_INET": 4, "AF_INET6": 6}   # `family` is 4/6 on every kind
# calls whose first argument is not a socket fd
_NO_FD = ("socket", "socketpair")


def _c_string(raw: bytes) -> str:
    """Bytes as strace quotes them: "lo\\0", "\\0\\0@\\r\\3"."""
    out = ['"']
    for i, c in enumerate(raw):
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif 0x20 <= c < 0x7F:
            out.append(chr(c))
        elif i + 1 < len(raw) and 0x30 <= raw[i + 1] <= 0x37:   # an octal digit follows: three digits
            out.append(f"\\{c:03o}")
        else:
            out.append(f"\\{c:o}")
    return "".join(out) + '"'


_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x0B: "\\v"}


def _option_value(option: str, raw: bytes) -> str:
    """A socket option's value as strace shows it: [1], {l_onoff=1, l_linger=0},
    ~[ICMP_ECHOREPLY], or its bytes quoted."""
    if option == "SO_LINGER" and len(raw) >= 8:
        onoff, linger = struct.unpack_from("<ii", raw)
        return f"{{l_onoff={onoff}, l_linger={linger}}}"
    if option == "ICMP_FILTER" and len(raw) == 4:
        bits = struct.unpack("<I", raw)[0]
        inverted = bin(bits).count("1") > 16
        shown = ~bits & 0xFFFFFFFF if inverted else bits
        names = [ICMP_TYPES.get(n, f"{n:#x} /* ICMP_??? */") for n in range(32) if shown >> n & 1]
        return ("~" if inverted else "") + "[" + " ".join(names) + "]"
    if len(raw) == 4 and option != "SO_BINDTODEVICE":
        return f"[{struct.unpack('<i', raw)[0]}]"
    return _c_string(raw)


def option_int(option: Optional[str], raw: bytes) -> Union[int, str, None]:
    """A socket option's value for the `value` field: an int (its first four
    bytes), a device's name for SO_BINDTODEVICE; None when not read."""
    if option == "SO_BINDTODEVICE":
        return raw.split(b"\0", 1)[0].decode(errors="replace") if raw else None
    return struct.unpack_from("<i", raw)[0] if len(raw) >= 4 else None


def _flags(value: int, names: Dict[int, str], zero: str = "0") -> str:
    parts = [n for bit, n in names.items() if value & bit]
    rest = value & ~sum(b for b in names if value & b)
    if rest:
        parts.append(hex(rest))
    return "|".join(parts) or zero


def decode_sockaddr(raw: bytes) -> Tuple[str, Dict[str, Any]]:
    """("{AF_INET, 10.0.0.1:80}", fields) of a struct sockaddr."""
    if len(raw) < 2:
        return "{}", {}
    fam = struct.unpack_from("<H", raw)[0]
    name = FAMILIES.get(fam, str(fam))
    out: Dict[str, Any] = {"family": name}
    if fam == socket.AF_INET and len(raw) >= 8:
        out["port"] = struct.unpack_from(">H", raw, 2)[0]
        out["address"] = ipaddress.IPv4Address(raw[4:8])
        return f"{{{name}, {out['address']}:{out['port']}}}", out
    if fam == socket.AF_INET6 and len(raw) >= 24:
        out["port"] = struct.unpack_from(">H", raw, 2)[0]
        addr = ipaddress.IPv6Address(raw[8:24])
        out["address"] = addr.ipv4_mapped or addr
        # an IPv4-mapped address as strace writes it ("::ffff:10.0.0.2"; Python < 3.13: "::ffff:a00:2")
        text = f"::ffff:{addr.ipv4_mapped}" if addr.ipv4_mapped else str(addr)
        return f"{{{name}, [{text}]:{out['port']}}}", out
    if fam == socket.AF_UNIX:
        path = raw[2:]
        text = "@" + path[1:].split(b"\0", 1)[0].decode(errors="replace") if path[:1] == b"\0" \
            else path.split(b"\0", 1)[0].decode(errors="replace")
        out["path"] = text
        return f'{{{name}, "{text}"}}', out
    if fam == socket.AF_NETLINK and len(raw) >= 12:
        pid, groups = struct.unpack_from("<II", raw, 4)
        return f"{{{name}, pid={pid}, groups={groups:08x}}}", out
    return f"{{{name}}}", out



# The kernel's own codes for a call a signal interrupted (include/linux/errno.h):
# a task never sees them (the call is restarted, or fails with EINTR), but the
# syscall's exit does; strace prints "= ? ERESTARTSYS (To be restarted if ...)"
_RESTART = {512: ("ERESTARTSYS", "To be restarted if SA_RESTART is set"),
            513: ("ERESTARTNOINTR", "To be restarted"),
            514: ("ERESTARTNOHAND", "To be restarted if no handler"),
            516: ("ERESTART_RESTARTBLOCK", "Interrupted by signal")}
ERRNO_NAMES = {**_errno.errorcode, **{n: name for n, (name, _) in _RESTART.items()}}

class SyscallEvent(Event, init=False):
    """One network system call, entry to exit. `duration` in seconds; `ret`
    the kernel's raw result: a negative errno on failure (-111), which
    `errno` names ("ECONNREFUSED") and `strace()` prints as strace does
    (`-1 ECONNREFUSED (Connection refused)`). `family` is 4 or 6 for an
    IP sockaddr (as on every kind), None otherwise; `sockaddr_family` the
    sockaddr's own family as strace names it ("AF_INET6", "AF_UNIX", …)."""

    kind = "syscall"
    name: str
    fd: Optional[int]
    args: str
    ret: int
    errno: Optional[str]
    duration: float
    family: Optional[int]
    sockaddr_family: Optional[str]
    address: Optional[IPAddress]
    port: Optional[int]
    path: Optional[str]
    level: Optional[str]
    option: Optional[str]
    value: Union[int, str, None]     # an option's int (SO_BINDTODEVICE: the name); socketpair: first fd
    HIGH_VOLUME = True
    VALUES = {**Event.VALUES, "name": CALLS, "errno": tuple(sorted(ERRNO_NAMES.values())),
              "sockaddr_family": tuple(FAMILIES.values())}

    def result(self) -> str:
        if -self.ret in _RESTART:
            return f"? {self.errno} ({_RESTART[-self.ret][1]})"
        if self.ret < 0 and self.errno:
            return f"-1 {self.errno} ({os.strerror(-self.ret)})"
        return str(self.ret)

    def strace(self, with_pid: bool = False) -> str:
        """`connect(3, {AF_INET, 10.0.0.1:80}, 16) = -1 ECONNREFUSED (Connection refused) <0.000123>`."""
        head = f"[pid {self.pid}] " if with_pid else ""
        return f"{head}{self.name}({self.args}) = {self.result()} <{self.duration:.6f}>"

    def describe(self) -> str:
        return self.strace()


_ADDRESS_OUT = ("accept", "accept4", "getsockname", "getpeername", "recvfrom")


def _render_args(name: str, a: Tuple[int, ...], addr: str, alen: int, ret: int, value: Optional[int],
                 value2: Optional[int], optval: bytes = b"") -> str:
    i32 = [struct.unpack("<i", struct.pack("<I", x & 0xFFFFFFFF))[0] for x in a]
    fd = i32[0]
    addr_out = addr if addr else ("NULL" if not a[1] else f"{a[1]:#x}")
    if name in ("socket", "socketpair"):
        fam = FAMILIES.get(i32[0], str(i32[0]))
        typ = SOCK_TYPES.get(i32[1] & 0xF, str(i32[1] & 0xF))
        flags = _flags(i32[1] & ~0xF, SOCK_FLAGS, "")
        proto = PROTOCOLS.get(i32[2], str(i32[2])) if fam in ("AF_INET", "AF_INET6") else str(i32[2])
        text = f"{fam}, {typ + ('|' + flags if flags else '')}, {proto}"
        if name == "socketpair":
            text += f", [{value}, {value2}]" if value is not None else f", {a[3]:#x}"
        return text
    if name in ("connect", "bind"):
        return f"{fd}, {addr_out}, {i32[2]}"
    if name == "listen":
        return f"{fd}, {i32[1]}"
    if name in _ADDRESS_OUT:   # the address and its length, value-result
        ptr, lenp = (a[4], a[5]) if name == "recvfrom" else (a[1], a[2])
        out = addr if addr else ("NULL" if not ptr else f"{ptr:#x}")
        if not lenp:
            room = "NULL"
        elif value2 is None:    # the caller's room could not be read
            room = f"[{alen}]" if addr else f"{lenp:#x}"
        elif ret < 0 or value is None or value == value2:
            room = f"[{value2}]"
        else:
            room = f"[{value2} => {value}]"
        if name == "recvfrom":
            return f"{fd}, ..., {a[2]}, {_flags(i32[3], MSG_FLAGS)}, {out}, {room}"
        text = f"{fd}, {out}, {room}"
        if name == "accept4":
            text += f", {_flags(i32[3], SOCK_FLAGS)}"
        return text
    if name == "sendto":
        return f"{fd}, ..., {a[2]}, {_flags(i32[3], MSG_FLAGS)}, {addr if addr else 'NULL'}, {i32[5]}"
    if name in ("sendmsg", "recvmsg"):
        msg = f"{{msg_name={addr}, ...}}" if addr else "{...}"
        return f"{fd}, {msg}, {_flags(i32[2], MSG_FLAGS)}"
    if name in ("sendmmsg", "recvmmsg"):
        return f"{fd}, ..., {a[2]}, {_flags(i32[3], MSG_FLAGS)}, ..."
    if name in ("setsockopt", "getsockopt"):
        level = LEVELS.get(i32[1], str(i32[1]))
        opt = OPTIONS.get(level, {}).get(i32[2]) or (
            f"{i32[2]:#x} /* {_OPTION_PREFIX[level]}_??? */" if level in _OPTION_PREFIX else str(i32[2]))
        val = _option_value(opt, optval) if optval or (name == "getsockopt" and value == 0) else \
            ("NULL" if not a[3] else f"{a[3]:#x}")
        if name == "setsockopt":
            optlen = str(i32[4])
        elif value2 is None:    # the caller's room could not be read
            optlen = "NULL" if not a[4] else f"{a[4]:#x}"
        elif value is None or value == value2 or ret < 0:
            optlen = f"[{value2}]"
        else:
            optlen = f"[{value2} => {value}]"
        return f"{fd}, {level}, {opt}, {val}, {optlen}"
    if name == "shutdown":
        return f"{fd}, {SHUT.get(i32[1], str(i32[1]))}"
    return str(fd)  # close


class SyscallProbe(Probe):
    name = "syscall"
    kind_id = wire.Kind.SYSCALL
    event_types = {"syscall": SyscallEvent}

    def __init__(self) -> None:
        self.decoder = SyscallDecoder()

    def plans(self, kernel: "KernelFeatures") -> List[Plan]:
        if not kernel.tp_btf or platform.machine() not in SYSCALL_NR:
            return []
        return [Plan("tp_btf", ["sc_enter", "sc_exit"], config={"sc_cfg": struct.pack("<I", os.getpid())})]

    def unavailable_reason(self, kernel: "KernelFeatures") -> str:
        if not kernel.tp_btf:
            return f"needs tp_btf tracepoints ({kernel.why('tp_btf')})"
        return f"no syscall table for {platform.machine()}"

    def attached(self, obj: "LoadedMaps") -> None:
        fd = obj.map_fd("sc_wanted")
        for name, nr in SYSCALL_NR[platform.machine()].items():
            map_update(fd, struct.pack("<I", nr), bytes([CODE[name]]))
        # A call in flight is kept per thread (task storage, gone with the
        # thread); one entered before its namespace's watch began is ignored
        # by sc_exit (nt_scope.since): nothing to purge at unwatch.


class SyscallDecoder(Decoder):
    """struct syscall_event records to SyscallEvents."""

    records = (RECORD,)
    needs_watch = False  # each record says all its event needs

    def decode(self, buf: bytes, hdr: Header) -> List[Event]:
        *args, ret, duration, code, addr_len, value, value2, has_value, addr = (
            _BODY.unpack_from(buf, RECORD.body_offset))
        name = CALLS[code - 1] if 0 < code <= len(CALLS) else f"syscall{code}"
        level = option = None
        optval = b""
        field_value: Union[int, str, None] = value if has_value else None
        if name in ("setsockopt", "getsockopt"):
            lv = struct.unpack("<i", struct.pack("<I", args[1] & 0xFFFFFFFF))[0]
            level = LEVELS.get(lv, str(lv))
            option = OPTIONS.get(level, {}).get(args[2] & 0xFFFFFFFF, str(args[2] & 0xFFFFFFFF))
            # addr holds the option's value; value/value2 its lengths (getsockopt)
            optval, addr_len = addr[:addr_len], 0
            field_value = option_int(option, optval)
        addr_text, fields = decode_sockaddr(addr[:addr_len]) if addr_len else ("", {})
        sockaddr_family: Any = fields.get("family")
        ok_value = value if has_value else None
        ok_value2 = value2 if has_value else None
        if name == "getsockopt" or name in _ADDRESS_OUT:   # value: a length returned (when the call was made)
            ok_value = value if ret >= 0 and has_value else None
        if name in _ADDRESS_OUT:
            field_value = None   # (value holds lengths, not an option's or a socketpair's)
        fd = None if name in _NO_FD else struct.unpack("<i", struct.pack("<I", args[0] & 0xFFFFFFFF))[0]
        return [SyscallEvent(
            hdr, (), "process", name=name, fd=fd,
            args=_render_args(name, tuple(args), addr_text, addr_len, ret, ok_value, ok_value2, optval),
            ret=ret, errno=ERRNO_NAMES.get(-ret) if ret < 0 else None, duration=duration / 1e9,
            address=fields.get("address"), port=fields.get("port"), path=fields.get("path"),
            family=_IP_FAMILY.get(sockaddr_family), sockaddr_family=sockaddr_family,
            level=level, option=option, value=field_value)]


class SyscallFilters(CommonFilters, total=False):
    """Filters of 'syscall' events: a keyword per field (nettrace.events('syscall', ...) takes them too)."""

    name: Filter[str]
    fd: Filter[int]
    args: Filter[Any]
    ret: Filter[int]
    errno: Filter[str]
    duration: Filter[float]
    family: Filter[Union[int, str]]
    sockaddr_family: Filter[int]
    address: AddressFilter
    port: Filter[int]
    path: Filter[str]
    level: Filter[Any]
    option: Filter[Any]
    value: Filter[Any]


class SyscallApi(KindApi):
    """`nettrace` methods for network system calls (Trace exposes them)."""

    def syscalls(self, **filters: Unpack[SyscallFilters]) -> List[SyscallEvent]:
        """Network system calls of the test's processes, e.g.
        `syscalls(name="connect", errno="ECONNREFUSED")`."""
        return cast(List[SyscallEvent], self.ctx.events("syscall", **filters))

    def strace(self, /, pid: Optional[int] = None, **filters: Any) -> str:
        """The calls as `strace -f -e trace=network` prints them (of one pid, or
        all with a `[pid N]` prefix)."""
        if pid is not None:
            filters["pid"] = pid
        return "\n".join(e.strace(with_pid=pid is None) for e in self.syscalls(**filters))

    def assert_no_syscall(self, **filters: Unpack[SyscallFilters]) -> None:
        """No network system call matching filters (and none lost)."""
        self.ctx.assert_none("syscall", **filters)

    def assert_syscall(self, timeout: float = 2.0, **filters: Unpack[SyscallFilters]) -> SyscallEvent:
        """A network system call matching filters happened; returns it."""
        return cast(SyscallEvent, self.ctx.wait_for("syscall", timeout=timeout, **filters))


PROBE = SyscallProbe
API = SyscallApi

"""A small synchronous rtnetlink client bound to one network namespace.

Why not pyroute2's `IPRoute` for the fixtures' own work: in pyroute2 0.9 the
sync `IPRoute` keeps one netlink socket *per calling thread*
(`threading.local`), opening it lazily where the call happens — a call from
a thread outside the namespace would reach the wrong namespace (or, with
`use_socket=`, raise RuntimeError). It also runs an asyncio loop per request,
which costs ~0.5 ms a call and fails inside a running loop.

Here one plain netlink socket, created by a thread that was inside the
namespace, carries every request; a socket stays bound to the namespace it
was created in, whichever thread later uses it. Messages are built and parsed
by pyroute2's message classes; only the ack/error path is decoded by hand
(to get the kernel's extended-ack reason text).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from typing import Any, Iterator

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR  # noqa: F401 (NLM_F_DUMP re-exported)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change


class KernelError(Exception):
    """A netlink request was refused; carries errno and the kernel's reason text."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.errno = code
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def open_rtnl_socket() -> socket.socket:
    """Open a NETLINK_ROUTE socket in the *calling thread's* network namespace."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)  # ask for reason strings
    sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # errors need not echo our request
    sock.bind((0, 0))
    return sock


class RtnlSocket:
    """Sends rtnetlink requests over one socket and waits for their answer.

    Thread-safe: a lock serialises request/answer pairs.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._seq = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self.sock.close()

    def request(self, msg: Any, msg_type: int, flags: int = 0) -> list[bytes]:
        """Send `msg` (a pyroute2 message) and return the raw reply messages.

        Raises KernelError if the kernel answers with an error.
        """
        with self._lock:
            self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
            seq = self._seq
            header = msg["header"]
            header["type"] = msg_type
            header["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
            header["sequence_number"] = seq
            header["pid"] = 0
            msg.encode()
            self.sock.send(msg.data)
            return self._collect(seq)

    def _collect(self, seq: int) -> list[bytes]:
        replies: list[bytes] = []
        while True:
            data = self.sock.recv(65536)  # > the kernel's 32 KiB dump chunks
            for raw, mtype, mflags, mseq in _split(data):
                if mseq != seq:
                    continue  # stale answer to an earlier, interrupted request
                if mtype == NLMSG_DONE:
                    return replies
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", raw, 16)[0]
                    if code == 0:
                        return replies
                    raise KernelError(code, _reason(raw, mflags, code))
                replies.append(raw)


def _split(data: bytes) -> Iterator[tuple[bytes, int, int, int]]:
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, mtype, mflags, mseq, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        yield data[offset : offset + length], mtype, mflags, mseq
        offset += (length + 3) & ~3


def _reason(raw: bytes, flags: int, code: int) -> str:
    """The extended-ack message if the kernel sent one, else strerror (lowercase)."""
    text = os.strerror(code)
    if flags & NLM_F_ACK_TLVS:
        # nlmsghdr(16) + error(4) + echoed nlmsghdr(16, capped) then TLVs
        offset = 16 + 4 + 16
        while offset + 4 <= len(raw):
            alen, atype = struct.unpack_from("=HH", raw, offset)
            if alen < 4:
                break
            if atype & 0x3FFF == NLMSGERR_ATTR_MSG:
                msg = raw[offset + 4 : offset + alen].split(b"\0", 1)[0].decode(errors="replace")
                if msg:
                    text = msg
                break
            offset += (alen + 3) & ~3
    return text[:1].lower() + text[1:]


def ifindex_of_reply(raw: bytes) -> int:
    """The interface index in an RTM_NEWLINK reply, without a full decode."""
    return int(_IFINFOMSG.unpack_from(raw, 16)[2])


def decode_link(raw: bytes) -> ifinfmsg:
    msg = ifinfmsg(raw)
    msg.decode()
    return msg


def decode_addr(raw: bytes) -> ifaddrmsg:
    msg = ifaddrmsg(raw)
    msg.decode()
    return msg


def link_kinds() -> dict[str, str]:
    """name -> kind ("veth", "macvlan", "vlan", …; "" for a device without
    one, such as lo) of every interface of the calling thread's namespace."""
    from pyroute2.netlink.rtnl import RTM_GETLINK
    rtnl = RtnlSocket(open_rtnl_socket())
    try:
        kinds = {}
        for raw in rtnl.request(ifinfmsg(), RTM_GETLINK, NLM_F_DUMP):
            msg = decode_link(raw)
            info = msg.get_attr("IFLA_LINKINFO")
            kinds[msg.get_attr("IFLA_IFNAME")] = (info.get_attr("IFLA_INFO_KIND") if info else None) or ""
        return kinds
    finally:
        rtnl.close()

"""Packets on the test's interfaces, tcpdump-style: kind "packet", and a
pcapng file per test (`nettrace.pcap_path`).

No BPF: an AF_PACKET socket per watched namespace, a plain socket queue,
and a TPACKET_V2 ring once the namespace's traffic is more than a few
packets (`_Capture`), opened by a
thread that enters the namespace (instant, so capture runs before the test
body), not bound to a device, so it sees every interface,
present and future, in both directions. Frames are read when the engine
drains and whenever the test reads, decoded for a few header fields
(addresses, ports, TCP flags) and written to the test's pcapng. What the
kernel could not keep (ring full, PACKET_STATISTICS drops — including
everything past the per-test cap) is counted as lost, so negative
assertions stay sound.
"""
from __future__ import annotations

import ctypes
import fcntl
import ipaddress
import mmap
import queue
import os
import re
import socket
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Tuple, TypedDict, Union, cast

from ..netns.linux import in_netns_at
from ..events import Event, IPAddress, wall_clock
from ..events import HEX, FieldType, IpProto
from ..kernel import wire
from .base import Plan, Probe, Wakeups
from .context import AddressFilter, Filter, KindApi, TraceContext

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..kernel.capabilities import KernelFeatures

# The ring: the kernel copies each packet (up to SNAPLEN) into the next free
# frame — no skb clone, no socket queue — and when the ring is full it drops
# the packet cheaply and counts it (PACKET_STATISTICS). Frames are read as
# they come (the sockets wake the engine's drain) and when the test reads,
# until the per-test cap; past it the kernel only counts what it could not
# keep, and the capture closes.
FRAME_SIZE = 4096                # one frame per packet: header + sockaddr_ll + data
RING_FRAMES = 2048               # 8 MiB per watched namespace
# Bytes kept per packet: the frame minus the kernel's header (~4000: full
# frames at MTU 1500, the start of GSO aggregates). The pcapng's interfaces
# declare the slot size: no capture can be longer, and a reader (tcpdump)
# refuses a packet longer than its interface's snaplen.
SNAPLEN = FRAME_SIZE
MAX_PACKETS = 10_000             # per namespace per test; beyond: left to the kernel, counted lost
QUEUE_BATCH = 256                # frames the drain thread reads from the queue socket at a time
RING_BATCH = 256                 # ring slots it looks at a time
# Most tests send a handful of packets: the queue socket alone keeps them,
# and the ring (8 MiB allocated and zeroed by the kernel, ~1.5 ms of CPU,
# and two more sockets to close) is set up only once a capture has read
# this many frames or bytes from its queue, or the queue dropped some.
# 0: at once, as the capture starts.
RING_AFTER = 64
RING_AFTER_BYTES = 256 << 10
# Room in the queue for what arrives between two reads until the ring takes
# over (charged as used: a GSO aggregate's clone counts ~64 KiB). The ring's
# setup waits out grace periods (20-50 ms here) while a veth carries 1-2 GB/s
# and the drain, sharing the CPUs with the workload, may not keep up: 16 MiB
# lost frames in 1 of 12 40 MiB transfers, 64 MiB in none of 16. Only what
# is queued is charged; the queue is empty once the ring took over.
QUEUE_RCVBUF = 64 << 20

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_RX_RING, PACKET_STATISTICS, PACKET_AUXDATA, PACKET_VERSION, TPACKET_V2 = 5, 6, 8, 10, 1
TP_STATUS_USER, TP_STATUS_VLAN_VALID, TP_STATUS_VLAN_TPID_VALID = 1, 0x10, 0x40
ETH_P_8021Q = 0x8100
SIOCGIFNAME = 0x8910
SO_TIMESTAMPNS, SO_RCVBUFFORCE, SO_ATTACH_FILTER, SO_DETACH_FILTER = 35, 33, 26, 27
PACKET_FANOUT, PACKET_FANOUT_DATA = 18, 22
PACKET_FANOUT_CBPF, PACKET_FANOUT_FLAG_UNIQUEID = 6, 0x2000
PACKET_OUTGOING = 4
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
PKTTYPES = {0: "in", 1: "in", 2: "in", 3: "in", 4: "out"}   # host/broadcast/multicast/otherhost/outgoing
# tp_status, tp_len, tp_snaplen, tp_mac, tp_net, tp_sec, tp_nsec, tp_vlan_tci, tp_vlan_tpid
_TPACKET2_HDR = struct.Struct("IIIHHIIHH")
# struct tpacket_auxdata, the queue socket's per-packet control message:
# tp_status, tp_len, tp_snaplen, tp_mac, tp_net, tp_vlan_tci, tp_vlan_tpid
_AUXDATA = struct.Struct("IIIHHHH")
_ANCILLARY = socket.CMSG_SPACE(16) + socket.CMSG_SPACE(_AUXDATA.size)   # SO_TIMESTAMPNS, PACKET_AUXDATA
_SOCKADDR_LL = struct.Struct("HHiHBB")     # family, protocol (be), ifindex, hatype, pkttype, halen
_SLL_OFFSET = 32                           # TPACKET_ALIGN(sizeof(struct tpacket2_hdr))
_SLL_WORD = _SLL_OFFSET // 4


def _vlan_restored(data: bytes, status: int, tci: int, tpid: int) -> bytes:
    """The frame with its VLAN tag back after the MAC addresses, where it was
    on the wire, as libpcap puts it back: the kernel hands a packet socket a
    received frame (or one a device tags on sending) with the tag moved to
    its metadata (`status`: TP_STATUS_* of the ring's header or auxdata)."""
    tpid = tpid if status & TP_STATUS_VLAN_TPID_VALID else ETH_P_8021Q
    return (data[:12] + struct.pack("!HH", tpid, tci) + data[12:])[:SNAPLEN]


class Frame(NamedTuple):
    """One captured packet, as read from the ring."""

    ts_real: int        # CLOCK_REALTIME ns
    ifname: str
    direction: str      # "in" / "out"
    ethernet: bytes     # the frame; non-Ethernet devices get a zero Ethernet header
    length: int         # original length


_libc = ctypes.CDLL(None, use_errno=True)


def _setsockopt(fd: int, level: int, name: int, value: bytes) -> None:
    buf = ctypes.create_string_buffer(value, len(value))
    if _libc.setsockopt(fd, level, name, buf, len(value)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _bind(fd: int, ethertype: int) -> None:
    """Bind a packet socket to `ethertype` on every device (ctypes: rebinding
    a hooked socket waits for an RCU grace period, without holding the GIL)."""
    addr = struct.pack("HHiHBB8s", socket.AF_PACKET, socket.htons(ethertype), 0, 0, 0, 0, b"")
    buf = ctypes.create_string_buffer(addr, len(addr))
    if _libc.bind(fd, buf, len(addr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _Filter:
    """A classic BPF program that returns `value` for every packet, as the
    struct sock_fprog setsockopt takes (kept alive with its instructions)."""

    def __init__(self, value: int) -> None:
        self._insns = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, value))   # BPF_RET|BPF_K
        self.fprog = struct.pack("HxxxxxxP", 1, ctypes.addressof(self._insns))


_DROP_ALL, _FIRST_MEMBER, _SECOND_MEMBER = _Filter(0), _Filter(0), _Filter(1)


_FLAGS = socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK


class _Capture:
    """The packet sockets and ring of one watched namespace.

    Every packet first goes to a socket queue, hooked when the constructor
    returns; the ring is set up only when the traffic asks for it
    (RING_AFTER), and takes over without losing or doubling a frame.
    A ring must be set up on a socket hooked to nothing: on a bound one the
    kernel unhooks it for an RCU grace period and purges what it had queued
    (packets sent right after `watch` were missed, uncounted). Setting it up
    waits out that grace period (synchronize_net in packet_set_ring, 8-30 ms),
    so it happens in the background, on a second socket (made then: most
    tests' few packets never need it, and each packet socket costs a visit
    to make and a grace period to close), while a first one, hooked at once,
    queues every packet from the moment the constructor returns. The two
    never both receive a packet: they are the members of one fanout group
    (PACKET_FANOUT), whose single hook hands each packet to exactly one
    member, the one its classic BPF program picks: the queue socket until
    the ring's socket has joined, then the ring (`_handover`). Two sockets
    each hooked on their own, switched by binding and unbinding, both
    received what came between the two binds, and no stamp or content tells
    those copies apart exactly (9 frames of 300 kept twice on a slow
    Debian 6.1 VM)."""

    def __init__(self, path: str, wakeups: Wakeups) -> None:
        queue_sock, self._fanout = in_netns_at(path, self._open)
        self._path = path   # where the ring's socket is made, if ever
        self.queue_sock: Optional[socket.socket] = queue_sock   # None once the ring took over
        self.sock: Optional[socket.socket] = None               # the ring's, once made; None once closed
        # read as frames come, not when ring records happen to: a bulk
        # transfer fills the queue and the ring in tens of milliseconds
        self._wakeups = wakeups
        wakeups.wake_on(queue_sock.fileno())
        self.ring: Optional[mmap.mmap] = None
        self._lock = threading.RLock()
        self.head = 0
        self.pending: List[Union[Frame, bytes]] = []   # bytes: a ring slot, made a Frame by take()
        self.taken = 0
        self.tap_stopped = False
        self.kernel_drops = 0
        self._names: Dict[int, str] = {}
        self._buf = bytearray(SNAPLEN)
        self._view = memoryview(self._buf)
        self._left_at_stop = 0
        self._idle: Optional[socket.socket] = None   # the queue socket once the ring took over
        self._from_queue = 0          # frames and bytes read from the queue: when to set the ring up
        self._queued = 0              # frames the queue took in (PACKET_STATISTICS): those never read are lost
        self._queue_bytes = 0
        self._ring_started = False
        self._ready = threading.Event()   # clear while a ring setup is under way
        self._ready.set()
        self._switching = threading.Event()
        if RING_AFTER == 0:
            self._start_ring()

    def _start_ring(self) -> None:
        """Set the ring up in the background (once; not without fanout, kernel < 4.3,
        where the queue socket captures alone)."""
        if not self._fanout or self._ring_started:
            return
        self._ring_started = True
        self._ready.clear()
        threading.Thread(target=self._setup_ring, name="nettrace-pcap-ring", daemon=True).start()

    def _ring_wanted(self) -> bool:
        return (not self._ring_started and self.queue_sock is not None and not self._at_cap()
                and (self._from_queue >= RING_AFTER or self._queue_bytes >= RING_AFTER_BYTES
                     or self.kernel_drops > 0))

    @staticmethod
    def _open() -> Tuple[socket.socket, bool]:
        """(the queue socket, whether it leads a fanout group a ring can join)."""
        queue = socket.socket(socket.AF_PACKET, _FLAGS, socket.htons(ETH_P_ALL))  # hooked at once
        try:
            queue.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            queue.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)   # VLAN tags the kernel took off the frames
            try:  # room for what arrives before a ring is ready, if one is
                queue.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, QUEUE_RCVBUF)
            except OSError:
                pass
            try:
                # a group of its own (the kernel picks an unused id), whose
                # program gives every packet to member 0, this socket
                queue.setsockopt(SOL_PACKET, PACKET_FANOUT,
                                 (PACKET_FANOUT_CBPF | PACKET_FANOUT_FLAG_UNIQUEID) << 16)
                queue.setsockopt(SOL_PACKET, PACKET_FANOUT_DATA, _FIRST_MEMBER.fprog)
            except OSError:
                return queue, False
            return queue, True
        except BaseException:
            queue.close()
            raise

    def _setup_ring(self) -> None:
        try:
            # protocol 0: hooked to nothing. The namespace is still there:
            # closing waits for this thread, and a capture closes before
            # its namespace goes (if it went, the queue socket captures alone)
            sock = in_netns_at(self._path, lambda: socket.socket(socket.AF_PACKET, _FLAGS, 0))
        except OSError:
            self._ready.set()
            return
        with self._lock:
            self.sock = sock
        self._wakeups.wake_on(sock.fileno())
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
            block = FRAME_SIZE * 16
            # through ctypes: it releases the GIL (socket.setsockopt does not)
            # while the kernel waits out the grace period
            _setsockopt(sock.fileno(), SOL_PACKET, PACKET_RX_RING,
                        struct.pack("IIII", block, RING_FRAMES // 16, FRAME_SIZE, RING_FRAMES))
            ring = mmap.mmap(sock.fileno(), FRAME_SIZE * RING_FRAMES, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)
            self._handover(sock, ring)
        except (OSError, ValueError):
            pass  # closed meanwhile, or no memory: the queue socket goes on capturing
        finally:
            self._ready.set()
            self._switching.clear()

    def _handover(self, sock: socket.socket, ring: mmap.mmap) -> None:
        """Move the ring's socket into the queue socket's fanout group and
        switch the group's program from member 0 (the queue) to member 1
        (the ring): each packet is given to one of them, whichever program
        the kernel ran for it. Joining needs a bound socket, and a bound
        socket has a hook of its own until it joins: a drop-all filter keeps
        that hook's packets (which the group gives the queue too) out of the
        ring. Replacing a group's program waits out an RCU grace period
        (synchronize_net in __fanout_set_data_bpf) before it returns: the
        first replacement makes sure no packet is still on its way through
        the ring socket's own hook when the filter goes, the second that the
        queue has everything the old program gave it. The queue socket stays
        in the group, given nothing, until the capture closes: its leaving
        would renumber the members."""
        queue_sock = self.queue_sock
        assert queue_sock is not None
        group = queue_sock.getsockopt(SOL_PACKET, PACKET_FANOUT) & 0xFFFF
        _setsockopt(sock.fileno(), socket.SOL_SOCKET, SO_ATTACH_FILTER, _DROP_ALL.fprog)
        _bind(sock.fileno(), ETH_P_ALL)
        _setsockopt(sock.fileno(), SOL_PACKET, PACKET_FANOUT, struct.pack("i", group | PACKET_FANOUT_CBPF << 16))
        _setsockopt(queue_sock.fileno(), SOL_PACKET, PACKET_FANOUT_DATA, _FIRST_MEMBER.fprog)
        _setsockopt(sock.fileno(), socket.SOL_SOCKET, SO_DETACH_FILTER, b"\0\0\0\0")
        self._switching.set()   # from here until the ring is ours, frames may be in it only
        _setsockopt(queue_sock.fileno(), SOL_PACKET, PACKET_FANOUT_DATA, _SECOND_MEMBER.fprog)
        with self._lock:
            # what the queue holds is read first, by read() a batch at a
            # time: read here, under the lock, a burst's thousands of frames
            # kept the drain thread waiting (50-250 ms: its ring overflowed)
            self.ring = ring

    def _retire_queue(self) -> None:
        """The queue socket is read to its end (or to the cap) after the
        handover: the ring's frames are next. It stays in the group, idle."""
        queue_sock = self.queue_sock
        assert queue_sock is not None
        self._stats_of(queue_sock)
        self.kernel_drops += self._queued - self._from_queue   # past the cap: never read, lost
        self.queue_sock, self._idle = None, queue_sock
        # stamping every packet of the machine was only for the queue's frames
        queue_sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 0)

    def _read_queue(self, budget: int) -> bool:
        """Frames queued on the first socket, until the ring takes over; at
        most `budget`. True: it stopped at the budget."""
        while self.queue_sock is not None and self.taken + len(self.pending) < MAX_PACKETS:
            if budget == 0:
                return True
            budget -= 1
            try:
                n, anc, _flags, addr = self.queue_sock.recvmsg_into([self._buf], _ANCILLARY, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return False
            self._from_queue += 1
            self._queue_bytes += n
            if self._ring_wanted():   # at once: a burst fills the queue while this loop reads it
                self._start_ring()
            ifname, proto, pkttype, hatype = addr[0], addr[1], addr[2], addr[3]
            ts = time.time_ns()
            status = tci = tpid = 0
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(cdata) >= 16:
                    sec, nsec = struct.unpack_from("qq", cdata)
                    ts = sec * 1_000_000_000 + nsec
                elif level == SOL_PACKET and kind == PACKET_AUXDATA and len(cdata) >= _AUXDATA.size:
                    status, _len, _snaplen, _mac, _net, tci, tpid = _AUXDATA.unpack_from(cdata)
            if hatype == ARPHRD_LOOPBACK and pkttype == PACKET_OUTGOING:
                continue  # loopback shows each packet twice; keep the incoming copy, as libpcap does
            data, length = bytes(self._view[:min(n, SNAPLEN)]), n   # one copy (a bytearray slice is one more)
            if hatype not in (ARPHRD_ETHER, ARPHRD_LOOPBACK):  # L3 frame: give it an Ethernet header
                data = bytes(12) + struct.pack("!H", proto) + data
                length += 14
            elif status & TP_STATUS_VLAN_VALID:
                data, length = _vlan_restored(data, status, tci, tpid), length + 4
            self.pending.append(Frame(ts, ifname, PKTTYPES.get(pkttype, "in"), data, length))
        return False

    def _ifname(self, index: int) -> str:
        """Device name in the socket's namespace ("?" once the device is gone)."""
        name = self._names.get(index)
        if name is None and self.sock is not None:
            try:
                raw = fcntl.ioctl(self.sock.fileno(), SIOCGIFNAME, struct.pack("16si20x", b"", index))
                name = raw[:16].split(b"\0", 1)[0].decode(errors="replace")
            except OSError:
                return "?"
            self._names[index] = name
        return name or "?"

    def read(self, complete: bool = True) -> bool:
        """Move the frames the kernel filled into `pending`, up to the cap.
        `complete`: wait for a handover under way, so that every frame
        captured so far is read (a test's read); the drain only keeps the
        queue from filling meanwhile, a batch at a time. True: frames were
        left in the queue for the next read."""
        if complete and (self._switching.is_set() or (self.queue_sock is not None and self._at_cap())):
            # mid-handover the newest frames are in a ring not read yet; at the
            # cap the handover counts what the queue holds past it as lost
            self._ready.wait(10.0)
        # A batch at a time, the lock let go in between: a burst's thousands
        # of frames (several microseconds each) read at once, by the drain
        # thread or by a test's read that it then waited for, kept the drain
        # from the ring buffer, which overflowed meanwhile
        while True:
            more = self._read_batch()
            if not more or not complete:
                return more

    def _read_batch(self) -> bool:
        """A batch of the queue's frames, or of the ring's once the queue is
        read to its end; True: frames were left."""
        with self._lock:
            more = self._read_queue(QUEUE_BATCH)
            if self.ring is not None and self.queue_sock is not None and not more:
                self._retire_queue()
            if self._ring_wanted():
                self._start_ring()
            if (self.queue_sock is not None and self._at_cap() and self._ready.is_set() and not self.tap_stopped
                    and (self.kernel_drops or self.left_in_queue())):
                # no ring (none wanted, or none could be set up): what waits
                # past the cap is lost, and then the devices need no tap. It
                # is counted, not read: reading a burst's tens of thousands
                # of frames one by one here kept the drain thread from the
                # ring buffer (whose records were lost meanwhile).
                self._stop_tap()
            if self.ring is not None and self.queue_sock is None:
                more = self._read_ring(self.ring, RING_BATCH) or more
                if (not self.tap_stopped and self._at_cap()
                        and (self.kernel_drops or self.ring[self.head * FRAME_SIZE] & TP_STATUS_USER)):
                    self._stop_tap()
            return more

    def _at_cap(self) -> bool:
        return self.taken + len(self.pending) >= MAX_PACKETS

    def _stop_tap(self) -> None:
        """Past the cap, with a frame already waiting or lost (so counted):
        stop tapping the devices. A tap makes the kernel clone every
        packet it sends (dev_queue_xmit_nit), kept or not — the capture's
        largest cost under load. A fanout member cannot be rebound, so the
        sockets close (the group's hook goes with its last member, after a
        grace period, like the rebinding it replaces); what was counted stays
        counted, so the loss count from here on is a lower bound."""
        self.stats()
        self._left_at_stop = self.left_in_ring() + self.left_in_queue()
        ring, socks = self.ring, [self.sock, self._idle, self.queue_sock]
        self.ring, self.sock, self._idle, self.queue_sock = None, None, None, None
        self.tap_stopped = True
        self._unhook(socks)
        # each socket's close waits for a grace period (up to ~250 ms under
        # a connection storm): off the drain thread, whose ring buffer
        # overflowed meanwhile
        _closer.put(lambda: self._release(ring, socks))

    def _read_ring(self, ring: mmap.mmap, budget: int) -> bool:
        """Copy the filled frames out of the ring as they are (header,
        address, data: one slice each) and give the slots back; they become
        Frames when the test reads (`take`). Under bulk traffic this runs
        beside the workload, for thousands of frames a second: per frame,
        only the words that decide whether it is kept are looked at, and
        the device's name is resolved while the socket is open. Looks at
        `budget` slots at most (the drain thread's batch); True: it left
        filled ones."""
        names = self._names
        pending = self.pending
        room = MAX_PACKETS - self.taken - len(pending)
        head = self.head
        with memoryview(ring) as mv, mv.cast("I") as words:
            while room > 0:
                off = head * FRAME_SIZE
                w = off >> 2
                if not words[w] & TP_STATUS_USER:
                    break
                if budget == 0:
                    self.head = head
                    return True
                budget -= 1
                # (u16 halves read as the low/high half of a word: the arches built, x86 and arm64, are little-endian)
                snaplen, mac = words[w + 2], words[w + 3] & 0xFFFF
                ll = words[w + _SLL_WORD + 2]          # sll_hatype | sll_pkttype << 16
                if not (ll & 0xFFFF == ARPHRD_LOOPBACK and (ll >> 16) & 0xFF == PACKET_OUTGOING):
                    # (loopback shows each packet twice; the incoming copy is kept, as libpcap does)
                    pending.append(ring[off: off + mac + snaplen])
                    room -= 1
                    ifindex = words[w + _SLL_WORD + 1]
                    if ifindex not in names:
                        self._ifname(ifindex)
                words[w] = 0   # TP_STATUS_KERNEL: the slot is the kernel's again
                head = (head + 1) % RING_FRAMES
        self.head = head
        return False

    def _frame(self, raw: Union[Frame, bytes]) -> Frame:
        """The Frame of a ring slot copied by `_read_ring` (queue frames are already Frames)."""
        if isinstance(raw, Frame):
            return raw
        status, length, _snaplen, mac, _net, sec, nsec, tci, tpid = _TPACKET2_HDR.unpack_from(raw, 0)
        _fam, _proto, ifindex, hatype, pkttype, _halen = _SOCKADDR_LL.unpack_from(raw, _SLL_OFFSET)
        data = raw[mac:]
        if hatype not in (ARPHRD_ETHER, ARPHRD_LOOPBACK):  # e.g. tun: the frame is L3
            data = bytes(12) + raw[_SLL_OFFSET + 2: _SLL_OFFSET + 4] + data   # sll_protocol, big-endian
            length += 14
        elif status & TP_STATUS_VLAN_VALID:
            data, length = _vlan_restored(data, status, tci, tpid), length + 4
        return Frame(sec * 1_000_000_000 + nsec, self._names.get(ifindex) or "?", PKTTYPES.get(pkttype, "in"),
                     data, length)

    def stats(self) -> None:
        """Accumulate the kernel's drop counters (reading resets them)."""
        with self._lock:
            for sock in (self.sock, self.queue_sock):
                if sock is not None:
                    self._stats_of(sock)

    def _stats_of(self, sock: socket.socket) -> None:
        # tp_packets counts the dropped ones too
        packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.kernel_drops += drops
        if sock is self.queue_sock:
            self._queued += packets - drops

    def left_in_queue(self) -> int:
        """Frames past the cap waiting in the queue socket, never to be read
        (0 below the cap: they will be)."""
        with self._lock:
            if self.queue_sock is None or not self._at_cap():
                return 0
            self._stats_of(self.queue_sock)
            return self._queued - self._from_queue

    def left_in_ring(self) -> int:
        """Frames past the cap, never read (0 below the cap: they will be)."""
        if self.tap_stopped:
            return self._left_at_stop
        if self.taken + len(self.pending) < MAX_PACKETS or self.ring is None:
            return 0
        return sum(1 for i in range(RING_FRAMES) if self.ring[i * FRAME_SIZE] & TP_STATUS_USER)

    def take(self) -> List[Frame]:
        self.read()
        with self._lock:
            raw, self.pending = self.pending, []
            self.taken += len(raw)
        return [self._frame(r) for r in raw]

    def close(self) -> None:
        # Closing a packet socket waits for an RCU grace period
        # (synchronize_net in packet_release, ~20 ms): off the test's path.
        _closer.put(self.finish_close)

    def finish_close(self) -> None:
        self._ready.wait(60.0)   # a ring setup under way still uses the socket
        with self._lock:
            ring, socks = self.ring, [self.queue_sock, self._idle, self.sock]
            self.ring, self.queue_sock, self._idle, self.sock = None, None, None, None
        self._unhook(socks)
        self._release(ring, socks)

    def _unhook(self, socks: List[Optional[socket.socket]]) -> None:
        """No more wakeups of the drain from these sockets (before they close: the fd stays ours)."""
        for sock in socks:
            if sock is not None:
                self._wakeups.stop_waking_on(sock.fileno())

    @staticmethod
    def _release(ring: Optional[mmap.mmap], socks: List[Optional[socket.socket]]) -> None:
        if ring is not None:
            ring.close()   # the ring's socket is released only once unmapped
        for sock in socks:
            if sock is not None:
                sock.close()


class _Closer:
    """Closes packet captures in the background. Each close waits for RCU
    grace periods (one per packet socket); closed one after another they fell
    behind a suite's pace (1,000 tests: 5 GB of rings still mapped, 29 s
    stalled at exit), so several threads close at once and their waits
    overlap."""

    WORKERS = 8

    def __init__(self) -> None:
        self._queue: "queue.Queue[Callable[[], None]]" = queue.Queue()
        self._threads: List[threading.Thread] = []
        self._lock = threading.Lock()

    def put(self, close: Callable[[], None]) -> None:
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            if len(self._threads) < self.WORKERS:
                t = threading.Thread(target=self._run, name="nettrace-pcap-close", daemon=True)
                t.start()
                self._threads.append(t)
        self._queue.put(close)

    def _run(self) -> None:
        while True:
            self._queue.get()()


_closer = _Closer()

# -- header summaries -------------------------------------------------------

TCP_LETTERS = "UAPRSF"   # tcpdumplike.stp's flag columns
# in tcpdump's order (print-tcp.c's tcp_flag_values): ECN's SYN-ACK is "S.E"
_TCPDUMP_FLAGS = ((0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x10, "."), (0x20, "U"), (0x40, "E"),
                  (0x80, "W"))
_TCPDUMP_LETTERS = "".join(ch for _bit, ch in _TCPDUMP_FLAGS)
_LETTER_BITS = {"U": 0x20, "A": 0x10, "P": 0x08, "R": 0x04, "S": 0x02, "F": 0x01}


class TcpFlags(str):
    """TCP flags as letters of U A P R S F; compares equal to any order
    ("SA" == "AS" for a SYN-ACK)."""

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return set(str(self)) == set(other.upper())
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash(frozenset(str(self)))


def tcp_flag_strings(bits: int) -> Tuple[str, TcpFlags]:
    """(tcpdump's "S." notation, TcpFlags letters) of the flags byte."""
    dump = "".join(ch for bit, ch in _TCPDUMP_FLAGS if bits & bit) or "none"
    return dump, TcpFlags("".join(ch for ch in TCP_LETTERS if bits & _LETTER_BITS[ch]))


_VLAN_TPIDS = (0x8100, 0x88A8)   # 802.1Q, 802.1ad (QinQ's outer tag)
# IPv6 extension headers the summary walks past to the protocol they carry,
# as tcpdump prints it ("HBH ICMP6", "frag (0|1448) ... UDP"): hop-by-hop,
# routing, fragment, destination options
_IP6_EXTENSIONS = (0, 43, 44, 60)
_IP6_FRAGMENT = 44


def summarize(frame: bytes) -> Dict[str, Any]:
    """Header fields of an Ethernet frame: ethertype, VLAN, addresses, ports, flags."""
    out: Dict[str, Any] = dict(proto=None, family=None, saddr=None, daddr=None, sport=None, dport=None,
                               flags=None, tcp_flags=None, seq=None, ack=None, icmp_type=None, payload=None,
                               payload_len=None)
    if len(frame) < 14:
        return out
    etype, off = struct.unpack_from(">H", frame, 12)[0], 14
    # the outer ethertype and VLAN id, as tcpdump's `ether proto` and `vlan`
    # match them (-e: "ethertype 802.1Q (0x8100), ...: vlan 10, ... ethertype IPv4")
    out["ethertype"] = etype
    if etype in _VLAN_TPIDS and len(frame) >= 18:
        out["vlan"] = struct.unpack_from(">H", frame, 14)[0] & 0xFFF
    while etype in _VLAN_TPIDS and len(frame) >= off + 4:  # the rest is decoded past the tags
        etype, off = struct.unpack_from(">H", frame, off + 2)[0], off + 4
    l4: Optional[int] = None
    proto: Any = None
    l4_end = len(frame)
    if etype == 0x0800 and len(frame) >= off + 20:
        ihl = (frame[off] & 0xF) * 4
        total, frag, proto = struct.unpack_from(">H", frame, off + 2)[0], struct.unpack_from(">H", frame, off + 6)[0], \
            frame[off + 9]
        out.update(family=4, saddr=ipaddress.IPv4Address(frame[off + 12:off + 16]),
                   daddr=ipaddress.IPv4Address(frame[off + 16:off + 20]),
                   proto=IpProto.NAMES.get(proto, f"ip-{proto}"))
        l4_end = off + total
        if not frag & 0x1FFF:
            l4 = off + ihl
    elif etype == 0x86DD and len(frame) >= off + 40:
        plen, proto = struct.unpack_from(">HB", frame, off + 4)
        out.update(family=6, saddr=ipaddress.IPv6Address(frame[off + 8:off + 24]),
                   daddr=ipaddress.IPv6Address(frame[off + 24:off + 40]))
        l4, l4_end = off + 40, off + 40 + plen
        while proto in _IP6_EXTENSIONS and l4 is not None and len(frame) >= l4 + 8:   # each 8 bytes or more
            if proto == _IP6_FRAGMENT:
                # every fragment has the protocol, as IPv4's do; the first alone its header
                later = struct.unpack_from(">H", frame, l4 + 2)[0] & 0xFFF8
                proto, l4 = frame[l4], None if later else l4 + 8
            else:
                proto, l4 = frame[l4], l4 + (frame[l4 + 1] + 1) * 8
        out["proto"] = IpProto.NAMES.get(proto, f"ip6-{proto}")
    elif etype == 0x0806 and len(frame) >= off + 28:
        out.update(proto="arp", family=4, icmp_type=struct.unpack_from(">H", frame, off + 6)[0],
                   saddr=ipaddress.IPv4Address(frame[off + 14:off + 18]),
                   daddr=ipaddress.IPv4Address(frame[off + 24:off + 28]))
        return out
    else:
        out["proto"] = f"ethertype-{etype:#06x}"
        return out
    if l4 is None:
        return out
    if proto == 6 and len(frame) >= l4 + 20:
        sport, dport, seq, ack, doff, bits = struct.unpack_from(">HHIIBB", frame, l4)
        start = l4 + (doff >> 4) * 4
        out.update(sport=sport, dport=dport, seq=seq, ack=ack, payload=bytes(frame[start:l4_end]),
                   payload_len=max(0, l4_end - start))
        out["flags"], out["tcp_flags"] = tcp_flag_strings(bits)
    elif proto == 17 and len(frame) >= l4 + 8:
        sport, dport, ulen = struct.unpack_from(">HHH", frame, l4)
        out.update(sport=sport, dport=dport, payload=bytes(frame[l4 + 8:l4 + max(8, ulen)]),
                   payload_len=max(0, ulen - 8))
    elif proto in (33, 132, 136) and len(frame) >= l4 + 4:
        # DCCP, SCTP, UDP-Lite: their ports lead the header, as tcpdump reads them
        sport, dport = struct.unpack_from(">HH", frame, l4)
        out.update(sport=sport, dport=dport)
    elif proto in (1, 58) and len(frame) >= l4 + 2:
        # the message's length, header included: what tcpdump prints as "length"
        out.update(icmp_type=frame[l4], payload_len=max(0, l4_end - l4))
    return out


class _TcpFlagsType(FieldType):
    """TcpFlags: any combination of letters, checked letter by letter."""

    def check(self, owner: Any, field: str, value: Any) -> Any:
        if not (isinstance(value, str) and value and set(value.upper()) <= set(TCP_LETTERS)):
            raise ValueError(f"unknown tcp_flags {value!r} for 'packet' events: letters of {TCP_LETTERS} "
                             f"in any order, e.g. 'SA'")
        return value

    def from_json(self, value: Any) -> Any:
        return TcpFlags(value) if isinstance(value, str) else value


class _TcpdumpFlagsType(FieldType):
    """tcpdump's notation ("S.", "P.") or "none"."""

    def check(self, owner: Any, field: str, value: Any) -> Any:
        # tcpdump writes the letters in one order ("R.", never ".R"): another never matches
        canonical = isinstance(value, str) and value == "".join(ch for ch in _TCPDUMP_LETTERS if ch in value)
        if not (isinstance(value, str) and (value == "none" or value and canonical)):
            raise ValueError(f"unknown flags {value!r} for 'packet' events: tcpdump's notation, letters of "
                             f"{_TCPDUMP_LETTERS} ('S', 'S.', 'P.', 'F.', 'R.') or 'none'")
        return value


class _PacketProtoType(IpProto):
    """A packet's `proto`: a protocol's name, as on every kind, or what
    `summarize` writes where there is none: "arp", "ip-99" (IPv4's
    protocol), "ip6-99" (IPv6's next header), "ethertype-0x88cc". Never a
    number, nor "ip-2" for a named one: a filter saying so would match nothing."""

    BY_NUMBER = re.compile(r"ip6?-(\d+)")
    OTHER = re.compile(r"arp|ethertype-0x[0-9a-f]{4}")
    UNNAMED = "(or 'ip-N', 'ip6-N', 'arp', 'ethertype-0xNNNN')"

    def check(self, owner: Any, field: str, value: Any) -> Any:
        if isinstance(value, str):
            name = value.lower()
            number = self.BY_NUMBER.fullmatch(name)
            if number and int(number[1]) in self.NAMES:
                raise ValueError(f"{field} {value!r} of {owner.kind!r} events is named: "
                                 f"write {self.NAMES[int(number[1])]!r}")
            if (number and int(number[1]) <= 255) or self.OTHER.fullmatch(name):
                return name
        elif isinstance(value, int) and not isinstance(value, bool) and value not in self.NAMES:
            raise ValueError(f"{field} {value} of {owner.kind!r} events: a protocol without a name is "
                             f"'ip-{value}' (IPv4) or 'ip6-{value}' (IPv6)")
        return super().check(owner, field, value)


TCP_FLAGS = _TcpFlagsType()
PACKET_PROTO = _PacketProtoType()
TCPDUMP_FLAGS = _TcpdumpFlagsType()


class PacketEvent(Event, init=False):
    """A packet seen on an interface of a watched namespace. `direction`
    "in"/"out"; `flags` in tcpdump notation ("S", "S.", "P.", "R."),
    `tcp_flags` as letters of UAPRSF in any order ("SA"); `length` on the wire.
    `payload` is the TCP/UDP payload's bytes as captured (the start of it
    for a GSO aggregate longer than the capture), `payload_len` its length
    on the wire (ICMP: the message's length, as tcpdump prints it).
    `ethertype` and `vlan` are the outer header's (a tagged frame's
    ethertype is 0x8100, as tcpdump's `ether proto`); the other fields are
    decoded past the tags."""

    kind = "packet"
    # a packet has no process, no stack: the common task fields are None
    WITHOUT = ("pid", "tid", "comm", "uid", "ppid", "parent_comm", "context", "stack")
    dev: str
    direction: str
    length: int
    proto: Optional[str]
    family: Optional[int]
    saddr: Optional[IPAddress]
    sport: Optional[int]
    daddr: Optional[IPAddress]
    dport: Optional[int]
    flags: Optional[str]
    tcp_flags: Optional[str]
    seq: Optional[int]
    ack: Optional[int]
    payload: Optional[bytes]
    payload_len: Optional[int]
    icmp_type: Optional[int]
    ethertype: Optional[int]
    vlan: Optional[int]
    TYPES = {"payload": HEX, "tcp_flags": TCP_FLAGS, "flags": TCPDUMP_FLAGS,
             "proto": PACKET_PROTO}
    VALUES = {**Event.VALUES, "direction": ("in", "out")}
    HIGH_VOLUME = True

    def actor(self) -> str:
        return f"{self.dev} {self.direction}"

    def describe(self) -> str:
        def ep(addr: Any, port: Optional[int]) -> str:
            return f"{addr}.{port}" if port is not None else str(addr)
        if self.proto == "arp":
            if self.icmp_type == 1:
                return f"ARP request who-has {self.daddr} tell {self.saddr}"
            return f"ARP reply {self.saddr} to {self.daddr}"
        if self.family is None:
            return f"{self.proto}, length {self.length}"
        ip = "IP" if self.family == 4 else "IP6"
        text = f"{ip} {ep(self.saddr, self.sport)} > {ep(self.daddr, self.dport)}: "
        if self.proto == "tcp":
            text += f"Flags [{self.flags}], seq {self.seq}"
            if self.tcp_flags and "A" in self.tcp_flags:
                text += f", ack {self.ack}"
            return text + f", length {self.payload_len}"
        if self.proto == "udp":
            return text + f"UDP, length {self.payload_len}"
        if self.proto in ("icmp", "icmpv6"):
            name = "ICMP" if self.proto == "icmp" else "ICMP6"  # tcpdump's spelling
            size = self.payload_len if self.payload_len is not None else self.length
            return text + f"{name} type {self.icmp_type}, length {size}"
        return text + f"{self.proto}, length {self.length}"

    def summary(self) -> str:
        return f"{self.kind:<6} {self.actor()} {self.describe()}"


# -- pcapng -----------------------------------------------------------------

class PcapngWriter:
    """Enough pcapng for tcpdump and Wireshark: one interface per
    (namespace, device), named "<namespace>:<device>", nanosecond
    timestamps, the direction in each packet's flags."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "wb")
        self._ifaces: Dict[Tuple[int, str], int] = {}
        # section header: byte-order magic, version 1.0, unknown section length
        self._block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))

    def _block(self, btype: int, body: bytes) -> None:
        body += bytes(-len(body) % 4)
        total = len(body) + 12
        self._f.write(struct.pack("<II", btype, total) + body + struct.pack("<I", total))

    @staticmethod
    def _option(code: int, value: bytes) -> bytes:
        return struct.pack("<HH", code, len(value)) + value + bytes(-len(value) % 4)

    def _iface(self, netns: int, name: str) -> int:
        key = (netns, name)
        if key not in self._ifaces:
            opts = self._option(2, name.encode()) + self._option(9, b"\x09") + bytes(4)  # if_name, if_tsresol=ns
            self._block(1, struct.pack("<HHI", 1, 0, SNAPLEN) + opts)  # LINKTYPE_ETHERNET
            self._ifaces[key] = len(self._ifaces)
        return self._ifaces[key]

    def write(self, netns: int, iface_name: str, frame: Frame) -> None:
        iid = self._iface(netns, iface_name)
        data = frame.ethernet
        flags = 1 if frame.direction == "in" else 2  # epb_flags: inbound / outbound
        body = struct.pack("<IIIII", iid, frame.ts_real >> 32, frame.ts_real & 0xFFFFFFFF, len(data), frame.length)
        body += data + bytes(-len(data) % 4) + self._option(2, struct.pack("<I", flags)) + bytes(4)
        self._block(6, body)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


class PacketProbe(Probe):
    name = "packet"
    kind_id = wire.Kind.PACKET
    event_types = {"packet": PacketEvent}

    def __init__(self) -> None:
        self._captures: Dict[int, _Capture] = {}
        self._unopened: Dict[int, int] = {}   # netns -> 1 when no path could open it
        self._lock = threading.Lock()

    def plans(self, kernel: "KernelFeatures") -> List[Plan]:
        return [Plan("af_packet", [])]

    def watch(self, netns: int, path: Optional[str]) -> None:
        with self._lock:
            if netns in self._captures:
                return
            if path is None:
                self._unopened[netns] = 1  # nothing captured: say so in lost()
                return
            self._captures[netns] = _Capture(path, self.wakeups)

    def unwatch(self, netns: int) -> None:
        with self._lock:
            self._unopened.pop(netns, None)
            cap = self._captures.pop(netns, None)
        if cap is not None:
            cap.close()

    def poll(self) -> bool:
        with self._lock:
            return any([cap.read(complete=False) for cap in self._captures.values()])

    def take(self, netns: int) -> List[Frame]:
        """Frames captured in `netns` since the last take (read with the
        probe's lock let go: the drain thread's poll() reads meanwhile)."""
        with self._lock:
            cap = self._captures.get(netns)
        return cap.take() if cap is not None else []

    def lost(self, netns: int) -> Dict[str, int]:
        with self._lock:
            if netns in self._unopened:
                return {"packet": 1}
            cap = self._captures.get(netns)
            if cap is None:
                return {}
            cap.stats()
            n = cap.kernel_drops + cap.left_in_ring() + cap.left_in_queue()
        return {"packet": n} if n else {}

    def close(self) -> None:
        for netns in list(self._captures):
            self.unwatch(netns)


# a packet has no process: the common task fields exist, empty
_NOBODY = dict(pid=None, tid=None, comm=None, uid=None, ppid=None, parent_comm=None)


def packet_event(frame: Frame, netns: int, offset: int) -> PacketEvent:
    """The event of a captured frame; `offset`: CLOCK_REALTIME minus
    CLOCK_MONOTONIC, to put it on the ring records' clock."""
    return PacketEvent(None, (), "capture", timestamp=frame.ts_real - offset, netns=netns, dev=frame.ifname,
                       direction=frame.direction, length=frame.length, **_NOBODY, **summarize(frame.ethernet))


class PacketFilters(TypedDict, total=False):
    """Filters of 'packet' events: a keyword per field (nettrace.events('packet', ...) takes them too)."""

    timestamp: Filter[int]
    netns: Filter[int]
    dev: Filter[str]
    direction: Filter[str]
    length: Filter[int]
    proto: Filter[str]
    family: Filter[Union[int, str]]
    saddr: AddressFilter
    sport: Filter[int]
    daddr: AddressFilter
    dport: Filter[int]
    flags: Filter[Any]
    tcp_flags: Filter[str]
    seq: Filter[int]
    ack: Filter[int]
    payload: Filter[bytes]
    payload_len: Filter[int]
    icmp_type: Filter[int]
    ethertype: Filter[int]
    vlan: Filter[int]


class PacketApi(KindApi):
    """`nettrace` methods for captured packets (Trace exposes them). The frames
    reach the test's events and pcapng whenever the test reads anything."""

    def __init__(self, ctx: TraceContext) -> None:
        super().__init__(ctx)
        self._pcap: Optional[PcapngWriter] = None

    def _packet_probe(self) -> Optional[PacketProbe]:
        st = self.ctx.engine.status.get("packet")
        return cast(Optional[PacketProbe], st.probe if st is not None and st.plan is not None else None)

    def pull(self) -> None:
        probe = self._packet_probe()
        if probe is None:
            return
        offset = time.time_ns() - time.monotonic_ns()
        frames = [(fr, netns) for netns in list(self.ctx.watched) for fr in probe.take(netns)]
        if not frames:
            return
        frames.sort(key=lambda f: f[0].ts_real)  # one file for all namespaces, in time order
        writer = self._pcap_writer()
        for fr, netns in frames:
            writer.write(netns, f"{self.ctx.label(netns)}:{fr.ifname}", fr)
        writer.flush()
        self.ctx.publish([packet_event(fr, netns, offset) for fr, netns in frames])

    def _pcap_writer(self) -> PcapngWriter:
        if self._pcap is None:
            self._pcap = PcapngWriter(self.ctx.capture_path())
        return self._pcap

    def finish(self) -> None:
        if self._pcap is not None:
            self._pcap.close()

    def files(self) -> Dict[str, str]:
        return {"pcap": self._pcap.path} if self._pcap is not None else {}

    @property
    def pcap_path(self) -> Optional[str]:
        """The test's pcapng (every packet on its interfaces so far; `tcpdump -r`
        reads it); None once the test ended without a packet."""
        if not self.ctx.closed:
            self.ctx.sync()
            return self._pcap_writer().path
        return self._pcap.path if self._pcap is not None else None

    def packets(self, **filters: Unpack[PacketFilters]) -> List[PacketEvent]:
        """Packets seen, e.g. `packets(proto="tcp", flags="S.", dport=80)`."""
        return cast(List[PacketEvent], self.ctx.events("packet", **filters))

    def tcpdump(self, **filters: Unpack[PacketFilters]) -> str:
        """The packets as `tcpdump -i any` prints them, one line each, with
        "<namespace>:<device> In/Out"."""
        return "\n".join(f"{wall_clock(e.timestamp):%H:%M:%S.%f} {self.ctx.label(e.netns)}:{e.dev} "
                         f"{e.direction.capitalize()} {e.describe()}" for e in self.packets(**filters))

    def assert_packet(self, timeout: float = 2.0, **filters: Unpack[PacketFilters]) -> PacketEvent:
        """A packet matching filters was seen; returns it."""
        return cast(PacketEvent, self.ctx.wait_for("packet", timeout=timeout, **filters))

    def assert_no_packet(self, **filters: Unpack[PacketFilters]) -> None:
        """No packet matching filters was seen — and none could have been missed."""
        self.ctx.assert_none("packet", **filters)


PROBE = PacketProbe
API = PacketApi

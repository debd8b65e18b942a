"""Reader for a BPF ring buffer map, by mmap: records are copied out in
batches without a per-record call through libbpf (a ctypes callback per event
tops out near 150k events/s). A read walks the records' headers and copies
what they cover in one piece; it makes no object per record (a bytes object
per record was three quarters of a read): whoever reads them does."""
from __future__ import annotations

import mmap
import os
import select
import struct
from typing import List, Tuple

_BUSY = 1 << 31
_DISCARD = 1 << 30
_HDR = 8  # struct bpf_ringbuf_hdr: u32 len, u32 pg_off
_LEN = _DISCARD - 1
Span = Tuple[bytes, List[int], int]  # see RingBuffer.read_spans
_u32 = struct.Struct("<I")


class RingBuffer:
    """Consumer side of one BPF_MAP_TYPE_RINGBUF map."""

    def __init__(self, map_fd: int, size: int, min_len: int = 0) -> None:
        """Records shorter than `min_len` bytes are skipped and counted in `short`."""
        page = mmap.PAGESIZE
        self.size = size
        self._mask = size - 1
        # consumer page: the only part we write (our read position)
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        # producer page + data mapped twice by the kernel, so records never wrap
        self._prod = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        # The positions are read and written as whole aligned words. struct's
        # "<Q" goes a byte at a time: a producer that read our position half
        # written (this thread preempted between its bytes) saw the reader
        # megabytes behind, the ring full, and dropped its event; a producer
        # position read half updated would send the reader past the end.
        self._cons_pos = memoryview(self._cons).cast("Q")
        self._prod_pos = memoryview(self._prod)[:8].cast("Q")
        self._data_off = page
        self.consumed = 0  # bytes handed back to the kernel so far (records and their headers)
        self.min_len = min_len
        self.short = 0
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)
        # lets close() wake a reader blocked in wait() at once instead of at
        # its timeout (which was most of Engine.close())
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)

    def read_spans(self) -> List[Span]:
        """Every committed record, in order; advances the consumer. Each span
        is (data, starts, base): a copy of part of the ring, and for each of
        its records where its 8-byte ring header is, in 4-byte words counted
        from `base` (`records(spans)` makes them bytes objects).

        Loops until the producer position stops moving: the kernel wakes the
        consumer only when it had caught up, so records submitted while we
        were reading would otherwise wait for the next timeout."""
        spans: List[Span] = []
        ring, mask, min_len = self._prod, self._mask, self.min_len
        # the headers as 4-byte words (a record starts 8-byte aligned); the
        # data pages are mapped twice, so a span never wraps
        words = memoryview(ring).cast("I")
        try:
            cons = start = self._cons_pos[0]
            while True:
                prod = self._prod_pos[0]
                if cons >= prod:
                    break
                base = (self._data_off + (cons & mask)) >> 2
                starts: List[int] = []
                at, end, spins = base, base + ((prod - cons) >> 2), 0
                keep = starts.append
                while at < end:
                    length = words[at]
                    if min_len <= length < _DISCARD:  # committed, kept
                        keep(at)
                        at += (length + _HDR + 7) >> 2 & -2
                    elif length & _BUSY:
                        # reserved, not yet submitted: a probe is filling it on another
                        # CPU right now (well under a microsecond); wait briefly so a
                        # read after an action sees that action's events, then stop
                        spins += 1
                        if spins > 1000:
                            break
                    else:  # discarded, or too short to be a record
                        if length < _DISCARD:
                            self.short += 1
                        at += ((length & _LEN) + _HDR + 7) >> 2 & -2
                # the copy follows the headers' reads: each record it covers was
                # complete when its header said so
                if starts:
                    spans.append((ring[base << 2: at << 2], starts, base))
                cons += (at - base) << 2
                # hand the space back as we go, so producers can reuse it
                self._cons_pos[0] = cons
                if at < end:
                    break  # stopped at a record still being written
        finally:
            words.release()  # an exported buffer would keep close() from unmapping
        self.consumed += cons - start
        return spans

    def read(self) -> List[bytes]:
        """Every committed record, in order, as bytes objects (read_spans)."""
        return records(self.read_spans())

    def wait(self, timeout: float) -> bool:
        """Block until the kernel signals new data, wake() or timeout (seconds)."""
        return bool(self._epoll.poll(timeout))

    def wake(self) -> None:
        """Make a wait() in another thread return now."""
        os.eventfd_write(self._wake, 1)

    def wake_on(self, fd: int) -> None:
        """Make wait() return too when `fd` gets new data. Edge-triggered:
        data left unread (a capture at its cap) does not wake it again."""
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)

    def stop_waking_on(self, fd: int) -> None:
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):   # never added, or this ring closed first
            pass

    def close(self) -> None:
        self._cons_pos.release()
        self._prod_pos.release()
        for m in (self._cons, self._prod):
            try:
                m.close()
            except (BufferError, ValueError):
                pass
        self._epoll.close()
        os.close(self._wake)


def records(spans: List[Span]) -> List[bytes]:
    """The records of read_spans' spans as bytes objects."""
    out = []
    for data, starts, base in spans:
        for at in starts:
            at = (at - base) << 2
            out.append(data[at + _HDR: at + _HDR + _u32.unpack_from(data, at)[0]])
    return out

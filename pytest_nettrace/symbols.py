"""Kernel addresses → `func+0xoff` (the form faddr2line takes), via /proc/kallsyms."""
from __future__ import annotations

import bisect
import threading
from typing import List, Optional, Sequence

_lock = threading.Lock()
_table: Optional["Kallsyms"] = None


class Kallsyms:
    def __init__(self, path: str = "/proc/kallsyms") -> None:
        entries = []
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or parts[1] not in "tTwW":
                    continue
                addr = int(parts[0], 16)
                if addr:
                    name = parts[2] if len(parts) == 3 else f"{parts[2]} {parts[3]}"
                    entries.append((addr, name))
        entries.sort()
        self._addrs = [a for a, _ in entries]
        self._names = [n for _, n in entries]
        # all-zero addresses: kptr_restrict hides them; say so instead of lying
        self.usable = bool(self._addrs)

    def resolve(self, addr: int) -> str:
        if not self.usable:
            return f"0x{addr:x}"
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return f"0x{addr:x}"
        return f"{self._names[i]}+0x{addr - self._addrs[i]:x}"


def invalidate() -> None:
    """Forget the table: attaching fentry/kprobe programs adds trampolines,
    which an older table would misplace into a neighbouring module."""
    global _table
    with _lock:
        _table = None
        _cache.clear()


def kallsyms() -> Kallsyms:
    global _table
    with _lock:
        if _table is None:
            _table = Kallsyms()
        return _table


# Frames of the probe machinery itself (BPF program, tracepoint, kprobe
# trampolines): dropped from the top so a stack starts at the kernel's code.
_MACHINERY = ("bpf_prog_", "bpf_trace_run", "__bpf_trace_", "__traceiter_", "trace_call_bpf",
              "kprobe_", "perf_trace_", "bpf_trampoline_", "__bpf_prog_enter", "__bpf_prog_exit")


_cache: dict = {}


def symbolize(addrs: Sequence[int]) -> List[str]:
    """Frames of a kernel stack, probe machinery dropped. Stacks repeat a lot
    (every RST of a flood has the same one): cached by their addresses."""
    if not addrs:
        return []
    key = tuple(addrs)
    hit = _cache.get(key)
    if hit is not None:
        return list(hit)
    if len(_cache) > 4096:
        _cache.clear()
    frames = _symbolize(key)
    _cache[key] = tuple(frames)
    return frames


def _symbolize(addrs: Sequence[int]) -> List[str]:
    table = kallsyms()
    frames = [table.resolve(a) for a in addrs]
    i = 0
    while i < len(frames) and (frames[i].startswith(_MACHINERY) or "[bpf]" in frames[i]):
        i += 1
    return frames[i:]

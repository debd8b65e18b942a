"""Kernel addresses → `func+0xoff` (the form faddr2line takes), via /proc/kallsyms."""
from __future__ import annotations

import bisect
import json
import threading
from typing import Dict, List, Optional, Sequence, Set, Tuple

from ..runtime import RUN_DIR, boot_id, read_cached, write_cached

_lock = threading.Lock()
_table: Optional["Kallsyms"] = None
_generation = 0  # bumped by invalidate(): what callers derived from names is stale


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


def function_ranges(names: Sequence[str], path: str = "/proc/kallsyms") -> Dict[str, Tuple[int, int]]:
    """name -> (start, end) of core-kernel functions, end being the next
    symbol; names not found (or addresses hidden) are left out. Cached per
    boot in RUN_DIR: addresses change only when the machine reboots."""
    boot = boot_id()
    cache = f"ksyms-{boot}.json" if boot and path == "/proc/kallsyms" else None
    known: Dict[str, List[int]] = {}
    raw = read_cached(RUN_DIR, cache, private=True) if cache else None
    try:
        loaded = json.loads(raw) if raw is not None else {}
        known = {str(n): [int(a) for a in r] for n, r in loaded.items() if len(r) in (0, 2)}
    except (ValueError, TypeError, AttributeError):
        known = {}
    if all(n in known for n in names):
        return {n: (known[n][0], known[n][1]) for n in names if known[n]}
    found = _scan(path, set(names) | set(known))
    if cache:
        data = {n: list(found[n]) if n in found else [] for n in set(names) | set(known)}
        write_cached(RUN_DIR, cache, json.dumps(data).encode(), private=True)
    return {n: found[n] for n in names if n in found}


def _scan(path: str, names: Set[str]) -> Dict[str, Tuple[int, int]]:
    with open(path, "rb") as f:
        data = f.read()
    found: Dict[str, Tuple[int, int]] = {}
    for name in names:
        i = data.find(b" " + name.encode() + b"\n")
        while i >= 0 and data[i - 2: i] not in (b" t", b" T"):
            i = data.find(b" " + name.encode() + b"\n", i + 1)
        if i < 0:
            continue
        start_line = data.rfind(b"\n", 0, i) + 1
        addr = int(data[start_line: data.index(b" ", start_line)], 16)
        nxt = data.find(b"\n", i) + 1
        end = int(data[nxt: data.index(b" ", nxt)], 16) if nxt < len(data) else 0
        if addr:
            found[name] = (addr, end if end > addr else addr + 1)
    return found


def invalidate() -> None:
    """Forget the table: attaching fentry/kprobe programs adds trampolines,
    which an older table would misplace into a neighbouring module."""
    global _table, _generation
    with _lock:
        _table = None
        _cache.clear()
        _generation += 1


def generation() -> int:
    """Changes whenever symbolised stacks may have changed (see invalidate)."""
    return _generation


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


_cache: Dict[Tuple[int, ...], Tuple[str, ...]] = {}


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


def frame_function(frame: str) -> str:
    """The bare function name of a symbolised frame: "nf_tables_newrule" of
    "nf_tables_newrule [nf_tables]+0x1a" (a module's symbol; nf_tables is a
    module on distribution kernels) or of "tcp_v4_rcv.cold+0x2"."""
    return frame.split("+", 1)[0].split(" ", 1)[0].split(".", 1)[0]

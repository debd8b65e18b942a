"""Kernel addresses → `func+0xoff` (the form faddr2line takes), via /proc/kallsyms."""
from __future__ import annotations

import array
import bisect
import glob
import hashlib
import json
import os
import struct
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

from ..runtime import RUN_DIR, boot_id, read_cached, trusted_dir, write_cached

_lock = threading.Lock()
_table: Optional["Kallsyms"] = None
_generation = 0  # bumped by invalidate(): what callers derived from names is stale


class Kallsyms:
    """The text symbols of the kernel and its modules, to name stack addresses.

    Reading and parsing /proc/kallsyms costs a process ~0.1-0.3 s (~120k
    lines); the kernel's own symbols change only with the boot, the modules'
    when modules come or go, so both are kept per boot in RUN_DIR (root's
    alone: addresses give away the kernel's randomized base), the modules'
    checked against /proc/modules and read again alone when that changed (a
    test's `nft` loads nf_tables). BPF programs and trampolines come and go
    all the time and are not kept: an address in neither the kernel's text
    (_stext.._etext) nor a module is one of them, named from /proc/kallsyms
    read again when one is asked for (a stack's leading ones, the probe's own
    machinery, never are: see _symbolize)."""

    def __init__(self, path: str = "/proc/kallsyms", modules: Optional[List[Tuple[str, int, int]]] = None) -> None:
        """`modules`: (name, size, start) of each (default: /proc/modules for
        /proc/kallsyms, none for another table, which is never kept)."""
        self._path = path
        self._keep = modules is None and path == "/proc/kallsyms"
        self._boot = boot_id() if self._keep else ""
        modules = _modules() if self._keep else (modules or [])
        parsed: Dict[str, _Table] = {}

        def parse(part: str) -> _Table:   # both parts in one read of the file, when both are wanted
            if not parsed:
                parsed.update(_parse_table(self._path, ("core", "modules")))
            return parsed[part]

        self._addrs, self._names, self._core = self._table("core", "ksymtab", "", parse)
        self._load_modules(modules, parse)
        self._dynamic: Optional[_Table] = None   # BPF programs and trampolines, read when needed
        self._dynamic_read = 0.0
        # all-zero addresses: kptr_restrict hides them; say so instead of lying
        self.usable = len(self._addrs) > 0

    def _table(self, part: str, prefix: str, key: str, parse: Callable[[str], _Table]) -> _Table:
        """One part of the table, from RUN_DIR if kept there under `key`, else parsed (and kept)."""
        name = f"{prefix}-{self._boot}.bin" if self._boot else None
        loaded = _load_table(read_cached(RUN_DIR, name, private=True), key) if name else None
        if loaded is None:
            loaded = parse(part)
            # no kernel text: addresses hidden (kptr_restrict), maybe not for long
            if name and (part != "core" or len(loaded[0])):
                write_cached(RUN_DIR, name, _dump_table(key, *loaded), private=True)
                _forget_other_boots(self._boot)
        return loaded

    def _load_modules(self, modules: List[Tuple[str, int, int]],
                      parse: Optional[Callable[[str], _Table]] = None) -> None:
        key = hashlib.sha256(repr(modules).encode()).hexdigest()
        self._mod_addrs, self._mod_names, _ = self._table(
            "modules", "ksymmod", key, parse or (lambda part: _parse_table(self._path, (part,))[part]))
        self._module_list = modules
        # a module's text lies in [start, start + size); none: no /proc/modules (built without modules)
        self._modules = sorted((start, start + size) for _name, size, start in modules if start)

    def _modules_changed(self) -> bool:
        """Read the modules' symbols again if modules were loaded or removed
        since: True if they were."""
        if not self._keep:
            return False
        now = _modules()
        if now == self._module_list:
            return False
        self._load_modules(now)
        return True

    def in_core(self, addr: int) -> bool:
        """Whether `addr` is in the kernel's own text (_stext.._etext; True
        when that is unknown)."""
        lo, hi = self._core
        return lo <= addr < hi or not lo

    def _in_module(self, addr: int) -> bool:
        # a module's range is what /proc/modules says, its whole size: from
        # 6.4 its data lies elsewhere, so an address just past its code may be taken for it
        i = bisect.bisect_right(self._modules, (addr, 1 << 64)) - 1
        return i >= 0 and self._modules[i][0] <= addr < self._modules[i][1]

    def in_text(self, addr: int) -> bool:
        """Whether `addr` is in the kernel's or a module's text (not a BPF
        program or trampoline)."""
        return self.in_core(addr) or self._in_module(addr)

    def resolve(self, addr: int) -> str:
        if not self.usable:
            return f"0x{addr:x}"
        if self.in_core(addr):
            addrs, names = self._addrs, self._names
        elif self._in_module(addr) or (self._modules_changed() and self._in_module(addr)):
            addrs, names = self._mod_addrs, self._mod_names
        else:
            # programs come and go: read again when the last read is not fresh
            if self._dynamic is None or time.monotonic() - self._dynamic_read > 1.0:
                self._dynamic, self._dynamic_read = _parse_table(self._path, ("dynamic",))["dynamic"], time.monotonic()
            addrs, names = self._dynamic[0], self._dynamic[1]
        i = bisect.bisect_right(addrs, addr) - 1
        if i < 0:
            return f"0x{addr:x}"
        return f"{names[i].decode()}+0x{addr - addrs[i]:x}"


_TABLE_MAGIC = b"NTKSYM2\n"
_Table = Tuple["array.array[int]", List[bytes], Tuple[int, int]]


def _forget_other_boots(boot: str) -> None:
    """Remove the tables of earlier boots: where /run is no tmpfs (some
    containers) they would pile up, ~4 MB a boot."""
    if not trusted_dir(RUN_DIR):
        return
    for pattern in ("ksymtab-*.bin", "ksymmod-*.bin", "ksyms-*.json"):
        for old in glob.glob(os.path.join(RUN_DIR, pattern)):
            if boot not in os.path.basename(old):
                try:
                    os.unlink(old)
                except OSError:
                    pass


def _modules() -> List[Tuple[str, int, int]]:
    """(name, size, start) of each loaded module, from /proc/modules."""
    out = []
    try:
        with open("/proc/modules") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6:
                    out.append((parts[0], int(parts[1]), int(parts[5], 16)))
    except (OSError, ValueError):
        pass
    return out


def _parse_table(path: str, parts: Sequence[str]) -> Dict[str, _Table]:
    """Text symbols of `path` (kallsyms format), sorted, of each of `parts`,
    in one read: the kernel's own ("core"), the modules' ("modules"), BPF
    programs' and trampolines' ("dynamic": "[bpf]", "[__builtin__...]")."""
    entries: Dict[str, List[Tuple[int, bytes]]] = {part: [] for part in parts}
    core_wanted, owned_wanted = "core" in parts, "modules" in parts or "dynamic" in parts
    core = [0, 0]
    with open(path, "rb") as f:
        for line in f:
            owned = b"[" in line   # a module's, a program's: "addr t name\t[owner]"
            if not (owned_wanted if owned else core_wanted):
                continue
            fields = line.split()
            if len(fields) < 3 or fields[1] not in (b"t", b"T", b"w", b"W"):
                continue
            addr = int(fields[0], 16)
            if not addr:
                continue
            if len(fields) == 3:
                name, part = fields[2], "core"
                if name == b"_stext":
                    core[0] = addr
                elif name == b"_etext":
                    core[1] = addr
            else:
                name = fields[2] + b" " + fields[3]
                part = "dynamic" if fields[3] == b"[bpf]" or fields[3].startswith(b"[__builtin") else "modules"
            if part in entries:
                entries[part].append((addr, name))
    bounds = (core[0], core[1]) if core[0] < core[1] else (0, 0)
    out = {}
    for part, found in entries.items():
        found.sort()
        out[part] = (array.array("Q", [a for a, _ in found]), [n for _, n in found], bounds)
    return out


def _dump_table(key: str, addrs: "array.array[int]", names: List[bytes], core: Tuple[int, int]) -> bytes:
    head = json.dumps({"key": key, "count": len(addrs), "core": list(core)}).encode()
    return b"".join((_TABLE_MAGIC, struct.pack("<I", len(head)), head, addrs.tobytes(), b"\n".join(names)))


def _load_table(raw: Optional[bytes], key: str) -> Optional[_Table]:
    """A table kept by _dump_table under `key`; None if missing, damaged or kept under another."""
    if not raw or not raw.startswith(_TABLE_MAGIC):
        return None
    try:
        at = len(_TABLE_MAGIC)
        (hlen,) = struct.unpack_from("<I", raw, at)
        head = json.loads(raw[at + 4: at + 4 + hlen])
        at += 4 + hlen
        count = int(head["count"])
        if head["key"] != key:
            return None
        addrs = array.array("Q")
        addrs.frombytes(raw[at: at + 8 * count])
        names = raw[at + 8 * count:].split(b"\n") if count else []
        lo, hi = (int(x) for x in head["core"])
    except (ValueError, KeyError, TypeError, struct.error):
        return None
    if len(addrs) != count or len(names) != count:
        return None
    return addrs, names, (lo, hi)


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
    first = 0
    while first < len(addrs) and table.usable and not table.in_core(addrs[first]):
        first += 1  # the probe's own BPF program and trampolines (never in the kernel's own text)
    frames = [table.resolve(a) for a in addrs[first:]]
    i = 0
    while i < len(frames) and (frames[i].startswith(_MACHINERY) or "[bpf]" in frames[i]):
        i += 1
    return frames[i:]


def frame_function(frame: str) -> str:
    """The bare function name of a symbolised frame: "nf_tables_newrule" of
    "nf_tables_newrule [nf_tables]+0x1a" (a module's symbol; nf_tables is a
    module on distribution kernels) or of "tcp_v4_rcv.cold+0x2"."""
    return frame.split("+", 1)[0].split(" ", 1)[0].split(".", 1)[0]

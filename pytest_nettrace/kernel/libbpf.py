"""A thin, typed ctypes layer over the system's libbpf (libbpf.so.1 / .so.0).

Only what the engine uses: open/load objects, share maps between objects,
attach programs, create and update maps, read vmlinux BTF enums. Every failure
becomes a ProbeLoadError naming the object, the program and the reason,
with libbpf's own log lines (the verifier's complaint) attached.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import os
import re
import struct
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Set, Tuple

from ..errors import ProbeLoadError, UnsupportedKernel

# enum bpf_map_type values used here (uapi/linux/bpf.h)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_RINGBUF = 27
BPF_F_NO_PREALLOC = 1

# BTF kinds (uapi/linux/btf.h)
BTF_KIND_ENUM = 6
BTF_KIND_FUNC_PROTO = 13
BTF_KIND_TYPEDEF = 8
BTF_KIND_PTR = 2
BTF_KIND_ENUM64 = 19
BTF_KIND_DATASEC = 15


class _OpenOpts(ctypes.Structure):
    """struct bpf_object_open_opts, as of libbpf 1.0 (sz tells libbpf our size)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("_stub_attach_prog_fd", ctypes.c_uint32),
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
    ]


# struct bpf_prog_info: its size up to load_time, and load_time's offset
_PROG_INFO_SIZE = 48
_PROG_INFO_LOAD_TIME = 40
# ... and up to recursion_misses (5.12+), and its offset
_PROG_INFO_MISSES_SIZE = 216
_PROG_INFO_MISSES = 208


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _BtfEnum(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val", ctypes.c_int32)]


class _BtfEnum64(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val_lo32", ctypes.c_uint32), ("val_hi32", ctypes.c_uint32)]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("offset", ctypes.c_uint32), ("size", ctypes.c_uint32)]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_NO_PRINT = _PRINT_FN()  # a NULL function pointer: libbpf then prints nothing


class _LogCapture:
    """libbpf prints through a callback; keep the lines so errors can quote them.

    The callback is installed only while some thread captures: libbpf calls
    it for every line, its debug chatter included (~5,000 lines opening and
    loading the probes' objects, ~3 ms of an engine's start-up spent
    entering Python to drop them); otherwise libbpf prints nothing."""

    def __init__(self, set_print: Callable[[Any], Any]) -> None:
        self._local = threading.local()
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
        self.callback = _PRINT_FN(self._on_print)
        self._set_print = set_print
        self._capturing = 0
        self._lock = threading.Lock()
        set_print(_NO_PRINT)  # libbpf's default would print to stderr

    def _on_print(self, level: int, fmt: bytes, va_list: int) -> int:
        if level >= 2 and not getattr(self._local, "debug", False):  # LIBBPF_DEBUG: relocation chatter
            return 0
        buf = ctypes.create_string_buffer(1 << 20)  # verifier logs are long
        self._libc.vsnprintf(buf, len(buf), fmt, va_list)
        lines = getattr(self._local, "lines", None)
        if lines is not None:
            lines.append(buf.value.decode(errors="replace").rstrip("\n"))
        return 0

    def start(self, debug: bool = False) -> None:
        if getattr(self._local, "lines", None) is None:
            with self._lock:
                self._capturing += 1
                if self._capturing == 1:
                    self._set_print(self.callback)
        self._local.lines = []
        self._local.debug = debug

    def take(self) -> List[str]:
        lines = getattr(self._local, "lines", None)
        if lines is not None:
            with self._lock:
                self._capturing -= 1
                if self._capturing == 0:
                    self._set_print(_NO_PRINT)
        self._local.lines = None
        self._local.debug = False
        return lines or []


def _find_libbpf() -> ctypes.CDLL:
    for name in ("libbpf.so.1", "libbpf.so.0"):
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
    from ctypes.util import find_library  # runs `ldconfig -p`: only when the usual names fail
    found = find_library("bpf")
    if found:
        try:
            return ctypes.CDLL(found, use_errno=True)
        except OSError:
            pass
    raise UnsupportedKernel(
        "libbpf not found (tried libbpf.so.1, libbpf.so.0): install the libbpf1 package (Debian/Ubuntu)"
        " or libbpf (Fedora)")


class LibBpf:
    """The functions of libbpf the engine needs, with argument types declared."""

    def __init__(self) -> None:
        lib = _find_libbpf()
        self.lib = lib
        vp, cp, ci, cu32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32
        sig = {
            "bpf_object__open_file": (vp, [cp, vp]),
            "bpf_object__load": (ci, [vp]),
            "bpf_object__close": (None, [vp]),
            "bpf_object__find_map_by_name": (vp, [vp, cp]),
            "bpf_object__find_program_by_name": (vp, [vp, cp]),
            "bpf_object__next_program": (vp, [vp, vp]),
            "bpf_object__next_map": (vp, [vp, vp]),
            "bpf_map__name": (cp, [vp]),
            "bpf_program__fd": (ci, [vp]),
            "bpf_obj_get_info_by_fd": (ci, [ci, vp, ctypes.POINTER(cu32)]),
            "bpf_program__name": (cp, [vp]),
            "bpf_program__section_name": (cp, [vp]),
            "bpf_program__set_autoload": (ci, [vp, ctypes.c_bool]),
            "bpf_program__autoload": (ctypes.c_bool, [vp]),
            "bpf_program__attach": (vp, [vp]),
            "bpf_program__attach_cgroup": (vp, [vp, ci]),
            "bpf_link__destroy": (ci, [vp]),
            "bpf_map__reuse_fd": (ci, [vp, ci]),
            "bpf_map__fd": (ci, [vp]),
            "bpf_map__set_max_entries": (ci, [vp, cu32]),
            "bpf_map__initial_value": (vp, [vp, ctypes.POINTER(ctypes.c_size_t)]),
            "bpf_map_create": (ci, [ci, cp, cu32, cu32, cu32, vp]),
            "bpf_map_update_elem": (ci, [ci, vp, vp, ctypes.c_uint64]),
            "bpf_map_lookup_elem": (ci, [ci, vp, vp]),
            "bpf_map_delete_elem": (ci, [ci, vp]),
            "bpf_map_get_next_key": (ci, [ci, vp, vp]),
            "bpf_map_lookup_batch": (ci, [ci, vp, vp, vp, vp, ctypes.POINTER(cu32), vp]),
            "btf__load_vmlinux_btf": (vp, []),
            "bpf_object__btf": (vp, [vp]),
            "btf__parse": (vp, [cp, vp]),
            "btf__free": (None, [vp]),
            "btf__find_by_name_kind": (ctypes.c_int32, [vp, cp, cu32]),
            "btf__type_by_id": (vp, [vp, cu32]),
            "btf__name_by_offset": (cp, [vp, cu32]),
            "libbpf_set_print": (vp, [_PRINT_FN]),
            "libbpf_strerror": (ci, [ci, cp, ctypes.c_size_t]),
        }
        for name, (res, args) in sig.items():
            fn = getattr(lib, name)
            fn.restype = res
            fn.argtypes = args
            setattr(self, name, fn)   # an instance attribute: no __getattr__ on the per-test map calls
        self.log = _LogCapture(lib.libbpf_set_print)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.lib, name)


_lib: Optional[LibBpf] = None
_lib_lock = threading.Lock()


def libbpf() -> LibBpf:
    """The process-wide libbpf handle (loaded on first use)."""
    global _lib
    if _lib is not None:   # loaded: no lock (the map calls come here many times a test)
        return _lib
    with _lib_lock:
        if _lib is None:
            _lib = LibBpf()
        return _lib


# libbpf's own error codes (enum libbpf_errno, from 4000 on), which
# os.strerror calls "Unknown error 4001": named here, worded by libbpf.
_LIBBPF_ERRNO_START = 4000
_LIBBPF_ERRNO_NAMES = ("LIBELF", "FORMAT", "KVERSION", "ENDIAN", "INTERNAL", "RELOC", "LOAD", "VERIFY",
                       "PROG2BIG", "KVER", "PROGTYPE", "WRNGPID", "INVSEQ", "NLPARSE")


def _errtext(err: int) -> str:
    err = abs(err)
    index = err - _LIBBPF_ERRNO_START
    if 0 <= index < len(_LIBBPF_ERRNO_NAMES):
        buf = ctypes.create_string_buffer(128)
        words = "libbpf error"
        try:
            if libbpf().lib.libbpf_strerror(err, buf, len(buf)) == 0:
                words = buf.value.decode(errors="replace")
        except (AttributeError, UnsupportedKernel):
            pass
        return f"LIBBPF_ERRNO__{_LIBBPF_ERRNO_NAMES[index]}: {words}"
    return f"{_errno.errorcode.get(err, err)}: {os.strerror(err)}"


def _reason_from_log(lines: List[str]) -> str:
    """The most telling lines of a libbpf/verifier log, for a one-line error:
    the verifier's last words (its complaint) and libbpf's summary."""
    out: List[str] = []
    for entry in lines:
        if "-- END PROG LOAD LOG --" in entry:
            body = entry.split("-- BEGIN PROG LOAD LOG --")[-1].split("-- END PROG LOAD LOG --")[0]
            verifier = [ln for ln in body.splitlines() if ln.strip() and not ln.startswith(("processed ", ";"))]
            out.append("verifier: " + " / ".join(verifier[-2:]))
            prog = entry.split("prog '", 1)[-1].split("'", 1)[0] if "prog '" in entry else ""
            if prog:
                out.append(f"prog '{prog}'")
        elif entry.strip() and "failed to load object" not in entry:
            out.append(entry.strip())
    return " | ".join(out[-4:])


class BpfLink:
    """An attached program; destroy() detaches it (idempotent)."""

    def __init__(self, ptr: int, description: str) -> None:
        self._ptr: Optional[int] = ptr
        self.description = description

    def destroy(self) -> None:
        if self._ptr:
            libbpf().bpf_link__destroy(self._ptr)
            self._ptr = None


class BpfObject:
    """One opened .bpf.o: choose programs, share maps, load, attach."""

    def __init__(self, path: str, btf_path: Optional[str] = None) -> None:
        self.path = path
        self.name = os.path.basename(path)
        lib = libbpf()
        opts = _OpenOpts()
        opts.sz = ctypes.sizeof(_OpenOpts)
        if btf_path and btf_path != "/sys/kernel/btf/vmlinux":
            opts.btf_custom_path = btf_path.encode()
        self._opts = opts  # libbpf keeps pointers into it until load
        ptr = lib.bpf_object__open_file(path.encode(), ctypes.byref(opts))
        if not ptr:  # again, with libbpf's log kept for the reason
            lib.log.start()
            ptr = lib.bpf_object__open_file(path.encode(), ctypes.byref(opts))
            err, lines = ctypes.get_errno(), lib.log.take()
            if not ptr:
                raise ProbeLoadError(f"cannot open BPF object {path}: {_errtext(err)} "
                                     f"{_reason_from_log(lines)}".rstrip())
        self._ptr = ptr
        self._programs: Optional[List[Tuple[str, str, int]]] = None
        self._rodata: Optional[Dict[str, Tuple[int, int]]] = None
        self.links: List[BpfLink] = []
        self.loaded = False

    # -- before load -------------------------------------------------
    def programs(self) -> List[Tuple[str, str, int]]:
        """(name, section, handle) of each program in the object (listed once:
        an engine's start-up asks for them a few times, ~80 ctypes calls each)."""
        if self._programs is None:
            lib = libbpf()
            found = []
            prog = lib.bpf_object__next_program(self._ptr, None)
            while prog:
                found.append((lib.bpf_program__name(prog).decode(), lib.bpf_program__section_name(prog).decode(),
                              prog))
                prog = lib.bpf_object__next_program(self._ptr, prog)
            self._programs = found
        return self._programs

    def maps(self) -> Iterator[Tuple[str, int]]:
        """(name, handle) of each map in the object."""
        lib = libbpf()
        m = lib.bpf_object__next_map(self._ptr, None)
        while m:
            yield (lib.bpf_map__name(m).decode(), m)
            m = lib.bpf_object__next_map(self._ptr, m)

    def set_autoload(self, enabled: Dict[str, bool]) -> None:
        """Load only the programs named True; every other is left out."""
        for name, _sec, prog in self.programs():
            libbpf().bpf_program__set_autoload(prog, bool(enabled.get(name, False)))

    def _map(self, name: str) -> int:
        m = libbpf().bpf_object__find_map_by_name(self._ptr, name.encode())
        if not m:
            raise ProbeLoadError(f"{self.name}: no map named {name!r}")
        return int(m)

    def map_fd(self, name: str) -> int:
        """fd of map `name` (after load)."""
        return int(libbpf().bpf_map__fd(self._map(name)))

    def reuse_map(self, name: str, fd: int) -> None:
        """Make this object's map `name` the already existing map `fd`."""
        rc = libbpf().bpf_map__reuse_fd(self._map(name), fd)
        if rc < 0:
            raise ProbeLoadError(f"{self.name}: cannot share map {name!r}: {_errtext(rc)}")

    def set_rodata(self, var: str, value: bytes) -> None:
        """Set `const volatile` variable `var` before load (probe configuration).

        The linked object's .rodata holds every probe's config; the object's
        BTF says where each variable lives in it."""
        lib = libbpf()
        m = lib.bpf_object__find_map_by_name(self._ptr, b".rodata")
        if self._rodata is None:
            self._rodata = self._rodata_layout() if m else {}
        if var not in self._rodata:
            raise ProbeLoadError(f"{self.name}: no config variable {var!r} in .rodata" if self._rodata
                                 else f"{self.name}: no .rodata to hold {var!r}")
        offset, var_size = self._rodata[var]
        if len(value) != var_size:
            raise ProbeLoadError(f"{self.name}: {var} is {var_size} bytes, got {len(value)}")
        size = ctypes.c_size_t()
        ptr = lib.bpf_map__initial_value(m, ctypes.byref(size))
        ctypes.memmove(ptr + offset, value, len(value))

    def _rodata_layout(self) -> Dict[str, Tuple[int, int]]:
        """Each .rodata variable's (offset, size), from the object's BTF."""
        lib = libbpf()
        btf = lib.bpf_object__btf(self._ptr)
        tid = lib.btf__find_by_name_kind(btf, b".rodata", BTF_KIND_DATASEC) if btf else -1
        if tid <= 0:
            return {}
        sec = _BtfType.from_address(lib.btf__type_by_id(btf, tid))
        base = ctypes.addressof(sec) + ctypes.sizeof(_BtfType)
        layout = {}
        for i in range(sec.info & 0xFFFF):
            info = _BtfVarSecinfo.from_address(base + i * ctypes.sizeof(_BtfVarSecinfo))
            vtype = _BtfType.from_address(lib.btf__type_by_id(btf, info.type))
            layout[lib.btf__name_by_offset(btf, vtype.name_off).decode()] = (info.offset, info.size)
        return layout

    # -- load / attach ----------------------------------------------
    def load(self, explain: bool = True) -> None:
        """Load the chosen programs. `explain`: a failure quotes libbpf's and
        the verifier's reason (kept from libbpf's log, which costs ~1 ms an
        object); without it, only the error code."""
        lib = libbpf()
        if explain:
            lib.log.start()
        rc = lib.bpf_object__load(self._ptr)
        lines = lib.log.take() if explain else []
        if rc < 0:
            raise ProbeLoadError(f"cannot load {self.name}: {_errtext(rc)}; {_reason_from_log(lines)}"
                                 if explain else f"cannot load {self.name}: {_errtext(rc)}")
        self.loaded = True

    def load_started(self) -> Dict[str, int]:
        """When the kernel began loading each loaded program (CLOCK_BOOTTIME
        ns, bpf_prog_info.load_time): libbpf loads them one after another,
        so the gaps are what each cost."""
        lib = libbpf()
        out = {}
        for name, _sec, prog in self.programs():
            fd = lib.bpf_program__fd(prog)
            # zeroed each time: the kernel reads a nonzero length as a buffer to fill
            info = ctypes.create_string_buffer(_PROG_INFO_SIZE)
            size = ctypes.c_uint32(_PROG_INFO_SIZE)
            if fd >= 0 and lib.bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)) == 0:
                out[name] = struct.unpack_from("<Q", info.raw, _PROG_INFO_LOAD_TIME)[0]
        return out

    def program_fds(self) -> Dict[str, int]:
        """name -> fd of each loaded program."""
        lib = libbpf()
        out = {}
        for name, _sec, prog in self.programs():
            fd = lib.bpf_program__fd(prog)
            if fd >= 0:
                out[name] = fd
        return out

    def core_relocations(self) -> List[str]:
        """What CO-RE relocation did to every program's instructions, as
        libbpf's debug log says it (type ids removed), from one load attempt:
        libbpf relocates all programs before loading any, so a program the
        kernel then refuses does not shorten the list."""
        lib = libbpf()
        lib.log.start(debug=True)
        lib.bpf_object__load(self._ptr)
        lines = lib.log.take()
        out = []
        for line in lines:
            if "relo #" in line and ("patched" in line or "substituting" in line or "poison" in line):
                out.append(re.sub(r"\[\d+\]", "[]", line.strip()))
        return out

    def attach(self, prog_name: str, cgroup: Optional[str] = None) -> BpfLink:
        """Attach `prog_name` where its section says; a cgroup program (section
        cgroup/...) to the cgroup v2 directory `cgroup`, as a link: closing
        it (or the process dying) detaches it."""
        lib = libbpf()
        prog = lib.bpf_object__find_program_by_name(self._ptr, prog_name.encode())
        if not prog:
            raise ProbeLoadError(f"{self.name}: no program named {prog_name!r}")
        section = lib.bpf_program__section_name(prog).decode()
        lib.log.start()
        if cgroup is not None:
            try:
                fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                lib.log.take()
                raise ProbeLoadError(f"cannot attach {self.name}:{prog_name} ({section}): "
                                     f"cannot open cgroup {cgroup}: {e.strerror}") from None
            try:
                link = lib.bpf_program__attach_cgroup(prog, fd)  # the link holds the cgroup
                err = ctypes.get_errno()
            finally:
                os.close(fd)
            ctypes.set_errno(err)
        else:
            link = lib.bpf_program__attach(prog)
        lines = lib.log.take()
        if not link:
            err = ctypes.get_errno()
            raise ProbeLoadError(
                f"cannot attach {self.name}:{prog_name} ({section}): {_errtext(err)}"
                f" {_reason_from_log(lines)}".rstrip())
        bl = BpfLink(link, f"{self.name}:{prog_name} ({section})")
        self.links.append(bl)
        return bl

    def close(self) -> None:
        # Last attached, first detached: a tracepoint with two programs goes
        # 2 -> 1, and when the one removed is the first of its list the kernel
        # waits for an RCU grace period (tracepoint_remove_func,
        # TP_TRANSITION_SYNC_N_2_1: 8-20 ms here); removing the later one
        # does not wait.
        for link in reversed(self.links):
            link.destroy()
        self.links.clear()
        if self._ptr:
            libbpf().bpf_object__close(self._ptr)
            self._ptr = None


class LoadedMaps(Protocol):
    """What a probe reads from the loaded programs: its maps."""

    def map_fd(self, name: str) -> int: ...


class SplitObject:
    """One .bpf.o loaded as several libbpf objects, one thread each.

    The kernel verifies a load call's programs one after another, and the
    verifier is most of an engine's start-up; programs split over `parts`
    objects are verified on as many CPUs at once. A first object that loads
    no program creates every map (and freezes .rodata); the parts reuse them
    all, so every program shares the same maps as in one object. `cost`
    guesses each program's load time, to balance the parts (longest first to
    the least loaded part); `costs()` measures them after a load, for the
    next one."""

    def __init__(self, path: str, btf_path: Optional[str], parts: int, cost: Dict[str, float]) -> None:
        self.name = os.path.basename(path)
        self._maps = BpfObject(path, btf_path)
        self._parts: List[BpfObject] = []
        self._cost = cost
        self._owner: Dict[str, BpfObject] = {}
        self.links: List[BpfLink] = []
        self._finished: Dict[int, int] = {}  # id(part) -> CLOCK_BOOTTIME ns its load returned
        try:
            for _ in range(parts):
                self._parts.append(BpfObject(path, btf_path))
        except BaseException:
            self.close()
            raise

    def _all(self) -> List[BpfObject]:
        return [self._maps, *self._parts]

    def reuse_map(self, name: str, fd: int) -> None:
        self._maps.reuse_map(name, fd)

    def set_rodata(self, var: str, value: bytes) -> None:
        for obj in self._all():  # the parts' copies are not loaded: kept equal all the same
            obj.set_rodata(var, value)

    def set_autoload(self, enabled: Dict[str, bool]) -> None:
        wanted = [name for name, _sec, _p in self._maps.programs() if enabled.get(name)]
        known = [self._cost[n] for n in wanted if n in self._cost]
        guess = sum(known) / len(known) if known else 1.0
        load = [0.0] * len(self._parts)
        chosen: List[Dict[str, bool]] = [{} for _ in self._parts]
        for name in sorted(wanted, key=lambda n: -self._cost.get(n, guess)):
            i = load.index(min(load))
            chosen[i][name] = True
            load[i] += self._cost.get(name, guess)
            self._owner[name] = self._parts[i]
        self._maps.set_autoload({})
        for part, mine in zip(self._parts, chosen):
            part.set_autoload(mine)

    def load(self, explain: bool = True) -> None:
        self._maps.load(explain)
        for name, handle in self._maps.maps():
            fd = libbpf().bpf_map__fd(handle)
            for part in self._parts:
                part.reuse_map(name, fd)
        errors: List[BaseException] = []

        def load_part(part: BpfObject) -> None:
            try:
                part.load(explain)
            except BaseException as e:  # re-raised in the caller's thread
                errors.append(e)
            self._finished[id(part)] = time.clock_gettime_ns(time.CLOCK_BOOTTIME)

        threads = [threading.Thread(target=load_part, args=(part,), name="nettrace-load")
                   for part in self._parts[1:]]
        for t in threads:
            t.start()
        load_part(self._parts[0])
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def costs(self) -> Dict[str, float]:
        """Each loaded program's load time in seconds, from this load."""
        out: Dict[str, float] = {}
        for part in self._parts:
            started = sorted((t, name) for name, t in part.load_started().items())
            ends = [t for t, _n in started[1:]] + [self._finished.get(id(part), 0)]
            for (t, name), end in zip(started, ends):
                if end > t:
                    out[name] = (end - t) / 1e9
        return out

    def map_fd(self, name: str) -> int:
        return self._maps.map_fd(name)

    def program_fds(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for part in self._parts:
            out.update(part.program_fds())
        return out

    def attach(self, prog_name: str, cgroup: Optional[str] = None) -> BpfLink:
        owner = self._owner.get(prog_name)
        if owner is None:
            raise ProbeLoadError(f"{self.name}: no program named {prog_name!r} was loaded")
        link = owner.attach(prog_name, cgroup)
        self.links.append(link)
        return link

    def close(self) -> None:
        for link in reversed(self.links):  # in the reverse of attach order, as BpfObject.close says why
            link.destroy()
        self.links.clear()
        for obj in self._all():
            obj.close()


def prog_recursion_misses(fd: int) -> Optional[int]:
    """How many times program `fd` was not run because it was already running
    on that CPU (bpf_prog_info.recursion_misses, 5.12+): a tracepoint program
    interrupted by a softirq that hits the same tracepoint skips that call,
    and whatever event it would have written, without a word to the
    program. None if the kernel does not say."""
    info = ctypes.create_string_buffer(_PROG_INFO_MISSES_SIZE)
    size = ctypes.c_uint32(_PROG_INFO_MISSES_SIZE)
    if libbpf().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)) != 0:
        return None
    if size.value < _PROG_INFO_MISSES + 8:   # an older kernel fills less
        return None
    return int(struct.unpack_from("<Q", info.raw, _PROG_INFO_MISSES)[0])


class _MapCreateOpts(ctypes.Structure):
    """struct bpf_map_create_opts, as far as map_flags."""
    _fields_ = [("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
                ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
                ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32)]


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
               flags: int = 0) -> int:
    """Create a BPF map owned by the caller; returns its fd."""
    opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags)
    fd = libbpf().bpf_map_create(map_type, name.encode(), key_size, value_size, max_entries, ctypes.byref(opts))
    if fd < 0:
        err = ProbeLoadError(f"cannot create BPF map {name} ({max_entries} entries): {_errtext(fd)}")
        err.errno = -fd  # type: ignore[attr-defined]
        raise err
    return int(fd)


# Keys and values the kernel only reads are passed as the bytes themselves
# (ctypes hands C a pointer to them): no buffer made per call.
def map_update(fd: int, key: bytes, value: bytes) -> None:
    rc = libbpf().bpf_map_update_elem(fd, key, value, 0)
    if rc < 0:
        raise ProbeLoadError(f"BPF map update failed: {_errtext(rc)}")


def map_lookup(fd: int, key: bytes, value_size: int) -> Optional[bytes]:
    vb = ctypes.create_string_buffer(value_size)
    rc = libbpf().bpf_map_lookup_elem(fd, key, vb)
    if rc < 0:
        return None
    return vb.raw


def map_delete(fd: int, key: bytes) -> None:
    libbpf().bpf_map_delete_elem(fd, key)


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key of the map once (keys added or deleted meanwhile may be
    missed). Asked for the key after one deleted meanwhile, the kernel
    answers from the first key again: those already seen are skipped."""
    lib = libbpf()
    cur: Optional[bytes] = None
    nxt = ctypes.create_string_buffer(key_size)
    seen: Set[bytes] = set()
    while lib.bpf_map_get_next_key(fd, cur, nxt) == 0:
        cur = nxt.raw
        if cur not in seen:
            seen.add(cur)
            yield cur


_BATCH_ROWS = 256


def map_items(fd: int, key_size: int, value_size: int) -> List[Tuple[bytes, bytes]]:
    """(key, value) of every entry, each once; for the probes that aggregate
    in the kernel. Read a batch of the hash table's buckets a call (one
    syscall for a table of a few hundred rows, not two a row): the kernel
    walks buckets by number, so rows deleted meanwhile (the drain thread's
    purge of other namespaces) cannot make it start over."""
    lib = libbpf()
    rows = _BATCH_ROWS
    # the kernel's batch token is a u32 bucket number; libbpf wants key-sized room
    tokens = (ctypes.create_string_buffer(max(key_size, 8)), ctypes.create_string_buffer(max(key_size, 8)))
    token_in: Optional[ctypes.Array[ctypes.c_char]] = None
    out: List[Tuple[bytes, bytes]] = []
    while True:
        keys = ctypes.create_string_buffer(key_size * rows)
        values = ctypes.create_string_buffer(value_size * rows)
        count = ctypes.c_uint32(rows)
        token_out = tokens[1] if token_in is tokens[0] else tokens[0]
        rc = lib.bpf_map_lookup_batch(fd, token_in, token_out, keys, values, ctypes.byref(count), None)
        if rc < 0 and rc not in (-_errno.ENOENT, -_errno.ENOSPC):
            return _map_items_by_key(fd, key_size, value_size)   # a map type without batch reads
        k, v = keys.raw, values.raw
        out += [(k[i * key_size:(i + 1) * key_size], v[i * value_size:(i + 1) * value_size])
                for i in range(count.value)]
        if rc == -_errno.ENOENT:   # past the last bucket
            return out
        if rc == -_errno.ENOSPC:   # one bucket holds more rows than asked for: ask for more
            rows *= 2
            continue
        token_in = token_out


def _map_items_by_key(fd: int, key_size: int, value_size: int) -> List[Tuple[bytes, bytes]]:
    out = []
    for key in list(map_keys(fd, key_size)):
        value = map_lookup(fd, key, value_size)
        if value is not None:
            out.append((key, value))
    return out


def map_delete_where(fd: int, key_size: int, pred: Callable[[bytes], bool]) -> int:
    """Delete the keys for which pred(key) is true; returns how many."""
    doomed = [k for k in map_keys(fd, key_size) if pred(k)]
    for key in doomed:
        map_delete(fd, key)
    return len(doomed)


_u32_key = struct.Struct("<I")


class Unwatched:
    """The namespaces unwatched since their entries were last deleted, with
    when (CLOCK_MONOTONIC ns, bpf_ktime_get_ns()'s clock): the test's thread
    adds to it, a purge (at the next watch, or a drain's poll once the
    oldest is `linger` seconds old) takes it whole."""

    def __init__(self, linger: float = 1.0) -> None:
        self._linger = linger
        self._lock = threading.Lock()
        self._since: Dict[int, int] = {}
        self._first = 0.0   # CLOCK_MONOTONIC s of the oldest

    def __bool__(self) -> bool:
        return bool(self._since)

    def add(self, netns: int) -> None:
        with self._lock:
            if not self._since:
                self._first = time.monotonic()
            self._since[netns] = time.monotonic_ns()

    def due(self) -> bool:
        return bool(self._since) and time.monotonic() - self._first >= self._linger

    def take(self) -> Dict[int, int]:
        with self._lock:
            taken, self._since = self._since, {}
        return taken


class NetnsPurge:
    """When a probe's maps keyed by namespace inode (the key's first u32)
    need their old entries deleted. The kernel writes entries only for a
    watched namespace, and keeps writing until the engine stops watching it,
    after the probe's unwatch(); an inode is reused by later namespaces. So
    an unwatched namespace's entries are deleted at the next watch (one scan
    of each map for every namespace unwatched since, ~16 us even empty), with
    those of the namespace being watched if this engine watched its inode
    before and has not deleted them since its last unwatch (a suite's second
    namespace was purged with the first's scan: scanning for it again found
    nothing); a never-seen inode has none. With no watch coming (`nettrace
    watch` runs for days), a drain's poll() deletes them once they are
    `linger` seconds old: they would take room in the maps."""

    def __init__(self, maps: "Sequence[Tuple[int, int]]", linger: float = 1.0) -> None:
        self._maps = maps          # (fd, key size) of each map
        self._stale = Unwatched(linger)  # entries not deleted yet
        self._seen: Set[int] = set()     # every inode watched (nsfs reuses the lowest free: stays small)
        self._clean: Set[int] = set()    # deleted since their last unwatch, not watched since
        self._watched: Set[int] = set()
        # The drain thread's poll() and the test's watch() both delete: one
        # at a time, and a poll never deletes a namespace watched since it
        # went stale (its inode reused: the poll's scan would find the new
        # namespace's rows under the old keys and delete live counts)
        self._lock = threading.Lock()

    def watch(self, netns: int) -> None:
        with self._lock:
            doomed = set(self._stale.take())
            if netns in self._seen and netns not in self._clean:
                doomed.add(netns)
            self._seen.add(netns)
            self._delete(doomed)
            self._clean.discard(netns)
            self._watched.add(netns)

    def unwatch(self, netns: int) -> None:
        with self._lock:
            self._watched.discard(netns)
            self._stale.add(netns)
            self._clean.discard(netns)

    def poll(self) -> None:
        if self._stale.due():
            with self._lock:
                self._delete(set(self._stale.take()) - self._watched)

    def _delete(self, doomed: Set[int]) -> None:
        if not doomed:
            return
        for fd, key_size in self._maps:
            map_delete_where(fd, key_size, lambda k: _u32_key.unpack_from(k)[0] in doomed)
        self._clean |= doomed


class KernelBtf:
    """Read-only questions about the running kernel's BTF (enums, tracepoint args)."""

    def __init__(self, path: Optional[str] = None) -> None:
        lib = libbpf()
        kernels = "/sys/kernel/btf/vmlinux"
        self.path = path or kernels
        if not os.path.exists(self.path):
            raise UnsupportedKernel(f"no kernel BTF at {self.path}: the kernel needs CONFIG_DEBUG_INFO_BTF=y"
                                    if self.path == kernels else
                                    f"no BTF file at {self.path} (the path given; the running kernel's is {kernels})")
        ptr = lib.btf__parse(self.path.encode(), None)
        if not ptr:
            raise UnsupportedKernel(f"cannot parse kernel BTF at {self.path}: {_errtext(ctypes.get_errno())}")
        self._ptr = ptr

    def close(self) -> None:
        if self._ptr:
            libbpf().btf__free(self._ptr)
            self._ptr = None

    def _find(self, name: str, kind: int) -> Optional[_BtfType]:
        tid = libbpf().btf__find_by_name_kind(self._ptr, name.encode(), kind)
        if tid <= 0:
            return None
        return _BtfType.from_address(libbpf().btf__type_by_id(self._ptr, tid))

    def _name(self, off: int) -> str:
        return str(libbpf().btf__name_by_offset(self._ptr, off).decode())

    def enum(self, name: str) -> Dict[int, str]:
        """Values → names of `enum name`; empty if the kernel has no such enum."""
        out: Dict[int, str] = {}
        for kind, member in ((BTF_KIND_ENUM, _BtfEnum), (BTF_KIND_ENUM64, _BtfEnum64)):
            t = self._find(name, kind)
            if t is None:
                continue
            vlen = t.info & 0xFFFF
            base = ctypes.addressof(t) + ctypes.sizeof(_BtfType)
            for i in range(vlen):
                m = member.from_address(base + i * ctypes.sizeof(member))
                val = m.val if member is _BtfEnum else (m.val_hi32 << 32 | m.val_lo32)
                out[val] = self._name(m.name_off)
            break
        return out

    def has_type(self, name: str, kind: int) -> bool:
        return self._find(name, kind) is not None

    def tracepoint_arg_count(self, tp: str) -> Optional[int]:
        """Arguments of tracepoint `tp` (without the leading ctx), from btf_trace_<tp>."""
        t = self._find(f"btf_trace_{tp}", BTF_KIND_TYPEDEF)
        if t is None:
            return None
        ptr = _BtfType.from_address(libbpf().btf__type_by_id(self._ptr, t.size_or_type))
        if (ptr.info >> 24) & 0x1F != BTF_KIND_PTR:
            return None
        proto = _BtfType.from_address(libbpf().btf__type_by_id(self._ptr, ptr.size_or_type))
        if (proto.info >> 24) & 0x1F != BTF_KIND_FUNC_PROTO:
            return None
        return int(proto.info & 0xFFFF) - 1

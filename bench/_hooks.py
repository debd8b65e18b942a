"""The floor of "every probe attached": an empty program on each `tp_btf`
hook the default engine uses — the same hooks, the same attach type, no
work — loaded here through the bpf() syscall itself (two instructions need no
compiler and no object file).

bpftrace's empty programs (bench/_bpftrace.py) are a floor for the same
*tracepoints*, but through classic tracepoints, which cost more per hit
than `tp_btf`: what attaching alone costs the engine is this one. What a
benchmark shows above it is the probes' own work and the drain's.
"""
from __future__ import annotations

import ctypes
import os
import struct
from typing import List

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_BPF = {"x86_64": 321, "aarch64": 280}[os.uname().machine]
BPF_PROG_LOAD, BPF_RAW_TRACEPOINT_OPEN = 5, 17
BPF_PROG_TYPE_TRACING, BPF_TRACE_RAW_TP = 26, 23
BTF_KIND_TYPEDEF = 8
# r0 = 0; exit
EMPTY = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])


def engine_hooks() -> List[str]:
    """The tracepoint of every `tp_btf` program the default engine attaches
    here, once per program (a hook with two programs runs them through a
    loop, which costs more than one)."""
    from pytest_nettrace.kernel import libbpf as lb
    from pytest_nettrace.kernel.capabilities import object_path
    from pytest_nettrace.kernel.engine import OBJECT, Engine
    from pytest_nettrace.probes.registry import all_probes
    engine = Engine(probes=all_probes(), background=False)
    try:
        wanted = {p for st in engine.status.values() if st.plan for p in st.plan.programs}
    finally:
        engine.close()
    obj = lb.BpfObject(object_path(OBJECT))
    try:
        return sorted(sec.split("/", 1)[1] for name, sec, _ in obj.programs()
                      if name in wanted and sec.startswith("tp_btf/"))
    finally:
        obj.close()


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = _libc.syscall(SYS_BPF, cmd, buf, len(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


class EmptyPrograms:
    """An empty program attached to each of `hooks` while open."""

    def __init__(self, hooks: List[str]) -> None:
        from pytest_nettrace.kernel.libbpf import libbpf
        lib = libbpf()
        btf = lib.btf__load_vmlinux_btf()
        if not btf:
            raise OSError("no kernel BTF")
        self.fds: List[int] = []
        insns = ctypes.create_string_buffer(EMPTY, len(EMPTY))
        license = ctypes.create_string_buffer(b"GPL")
        try:
            for hook in hooks:
                btf_id = lib.btf__find_by_name_kind(btf, f"btf_trace_{hook}".encode(), BTF_KIND_TYPEDEF)
                if btf_id < 0:
                    raise OSError(f"no BTF for tracepoint {hook}")
                attr = bytearray(128)   # union bpf_attr, BPF_PROG_LOAD
                struct.pack_into("<IIQQ", attr, 0, BPF_PROG_TYPE_TRACING, len(EMPTY) // 8,
                                 ctypes.addressof(insns), ctypes.addressof(license))
                attr[48:48 + 15] = f"nop_{hook}"[:15].encode().ljust(15, b"\0")   # prog_name
                struct.pack_into("<I", attr, 68, BPF_TRACE_RAW_TP)   # expected_attach_type
                struct.pack_into("<I", attr, 108, btf_id)           # attach_btf_id
                prog = _bpf(BPF_PROG_LOAD, bytes(attr))
                self.fds.append(prog)
                # name NULL: the program's own attach_btf_id says where
                self.fds.append(_bpf(BPF_RAW_TRACEPOINT_OPEN, struct.pack("<QI4x", 0, prog)))
        except BaseException:
            self.close()
            raise
        finally:
            lib.btf__free(btf)

    def close(self) -> None:
        for fd in reversed(self.fds):
            os.close(fd)
        self.fds = []

    def __enter__(self) -> "EmptyPrograms":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

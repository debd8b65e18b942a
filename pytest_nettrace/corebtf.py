"""A minimal kernel BTF for CO-RE relocation, made once per boot.

Relocating the probes against the full kernel BTF costs libbpf ~1 ms per
distinct kernel type (a name search over ~150k types), about half of the
attach time. `bpftool gen min_core_btf` writes a BTF holding only the types
and members the object relocates against; libbpf takes it as
`btf_custom_path` (attach targets still come from the kernel's own BTF).

It is used only once proven: the object is relocated against both BTFs and
every patched instruction must come out the same, else it is never used.
Kept in /run (cleared at reboot) under the boot id and the object's digest,
so a rebuilt object or another boot gets a new one. Without bpftool, or with
a BTF other than the running kernel's, the full BTF is used as before.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
from typing import Optional

from . import libbpf as lb
from .symbols import RUN_DIR, boot_id

KERNEL_BTF = "/sys/kernel/btf/vmlinux"


def minimal_btf(object_file: str, btf_path: str = KERNEL_BTF) -> Optional[str]:
    """Path of a checked minimal BTF for `object_file` on this boot, or None."""
    boot = boot_id()
    if btf_path != KERNEL_BTF or not boot or os.environ.get("NETTRACE_FULL_BTF"):
        return None
    try:
        with open(object_file, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return None
    path = os.path.join(RUN_DIR, f"core-{boot}-{digest}.btf")
    if os.path.exists(path):
        return path
    if os.path.exists(path + ".unusable"):
        return None
    bpftool = shutil.which("bpftool")
    if bpftool is None:
        return None
    try:
        os.makedirs(RUN_DIR, exist_ok=True)
        _forget_other_boots(boot)
    except OSError:
        return None
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        made = subprocess.run([bpftool, "gen", "min_core_btf", btf_path, tmp, object_file],
                              capture_output=True, text=True, timeout=60)
        if made.returncode != 0 or not os.path.exists(tmp):
            why: Optional[str] = f"bpftool gen min_core_btf failed: {(made.stderr or made.stdout).strip()[:300]}"
        else:
            why = check(object_file, tmp, btf_path)
        if why:
            with open(path + ".unusable", "w") as f:
                f.write(why + "\n")
            return None
        os.replace(tmp, path)
        return path
    except (OSError, subprocess.SubprocessError, lb.ProbeLoadError):
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check(object_file: str, candidate: str, btf_path: str = KERNEL_BTF) -> Optional[str]:
    """None if relocating `object_file` against `candidate` patches every
    instruction as against `btf_path`; else why not."""
    full = _relocations(object_file, btf_path)
    if not full:  # (a libbpf that logs them otherwise: nothing to compare)
        return "libbpf's log shows no relocations to compare"
    if _relocations(object_file, candidate) != full:
        return "relocations against it differ from those against the full BTF"
    return None


def _relocations(object_file: str, btf_path: str) -> list:
    obj = lb.BpfObject(object_file, btf_path)
    try:
        return obj.core_relocations()
    finally:
        obj.close()


def _forget_other_boots(boot: str) -> None:
    for old in glob.glob(os.path.join(RUN_DIR, "core-*")):
        if f"core-{boot}-" not in os.path.basename(old):
            try:
                os.unlink(old)
            except OSError:
                pass

"""A minimal kernel BTF for CO-RE relocation, made once per boot.

Relocating the probes against the full kernel BTF costs libbpf ~1 ms per
distinct kernel type (a name search over ~150k types), about half of the
attach time. `bpftool gen min_core_btf` writes a BTF holding only the types
and members the object relocates against; libbpf takes it as
`btf_custom_path` (attach targets still come from the kernel's own BTF).

It is used only once proven: the object is relocated against both BTFs and
every patched instruction must come out the same, else it is never used.
The first session of a boot makes it in the background after its own load
(which used the full BTF), for the sessions after it: no session waits for
it. Kept in /run (cleared at reboot) under the boot id and the object's
digest, so a rebuilt object or another boot gets a new one. Without bpftool,
or with a BTF other than the running kernel's, the full BTF is used.
"""
from __future__ import annotations

import fcntl
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import threading
from typing import List, Optional

from . import libbpf as lb
from ..errors import ProbeLoadError
from ..runtime import RUN_DIR, boot_id, trusted_dir, trusted_file

KERNEL_BTF = "/sys/kernel/btf/vmlinux"


def _cache_path(object_file: str, btf_path: str) -> Optional[str]:
    """Where the minimal BTF for `object_file` lives on this boot; None when
    it does not apply (another BTF than the running kernel's, or turned off)."""
    boot = boot_id()
    if btf_path != KERNEL_BTF or not boot or os.environ.get("NETTRACE_FULL_BTF"):
        return None
    digest = object_digest(object_file)
    return os.path.join(RUN_DIR, f"core-{boot}-{digest}.btf") if digest else None


def object_digest(object_file: str) -> Optional[str]:
    """The digest of the object's content (None: unreadable), hashed once per
    version of the file: the same object in two checkouts is one."""
    try:
        st = os.stat(object_file)
        return _digest(object_file, st.st_mtime_ns, st.st_size)
    except OSError:
        return None


@functools.lru_cache(maxsize=8)
def _digest(object_file: str, _mtime_ns: int, _size: int) -> str:
    """The object's digest, hashed once per version of the file (an engine
    load asks for it twice: is the BTF made, and if not, make it)."""
    with open(object_file, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def minimal_btf(object_file: str, btf_path: str = KERNEL_BTF) -> Optional[str]:
    """Path of the checked minimal BTF for `object_file` on this boot, if
    one was made already (see prepare()), else None: use the full BTF."""
    path = _cache_path(object_file, btf_path)
    return path if path is not None and trusted_file(path) else None


def prepare_in_background(object_file: str, btf_path: str = KERNEL_BTF) -> Optional[threading.Thread]:
    """Make the minimal BTF for the sessions that come after this one, off
    this one's path (it costs two relocations and program loads, ~0.2 s, once
    per boot); None when there is nothing to make."""
    path = _cache_path(object_file, btf_path)
    if path is None or os.path.exists(path) or os.path.exists(path + ".unusable") or not shutil.which("bpftool"):
        return None
    t = threading.Thread(target=prepare, args=(object_file, btf_path), name="nettrace-core-btf", daemon=True)
    t.start()
    return t


def prepare(object_file: str, btf_path: str = KERNEL_BTF) -> Optional[str]:
    """Make and check the minimal BTF now (one process at a time: the others
    leave it to the one holding the lock); its path, or None."""
    path = _cache_path(object_file, btf_path)
    bpftool = shutil.which("bpftool")
    if path is None or bpftool is None:
        return None
    if os.path.exists(path):
        return path
    if not trusted_dir(RUN_DIR, create=True):
        return None
    try:
        _forget_other_boots(boot_id())
        lock = open(path + ".lock", "w")
    except OSError:
        return None
    tmp = None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None  # another process, or thread, is making it
        # named only once the lock is held: a thread of this process that
        # lost the race must not remove the winner's file
        tmp = f"{path}.{os.getpid()}.tmp"
        _remove_abandoned(path)
        if os.path.exists(path) or os.path.exists(path + ".unusable"):
            return path if os.path.exists(path) else None
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
    except (OSError, subprocess.SubprocessError, ProbeLoadError):
        return None
    finally:
        lock.close()
        if tmp is not None and os.path.exists(tmp):
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


def _relocations(object_file: str, btf_path: str) -> List[str]:
    obj = lb.BpfObject(object_file, btf_path)
    try:
        return obj.core_relocations()
    finally:
        obj.close()


def _remove_abandoned(mine: str) -> None:
    """Delete the partial files of makers that died making them (this runs
    in a daemon thread, which the interpreter's exit stops where it is): a
    partial file whose lock nobody holds is nobody's (those of `mine`, whose
    lock this process holds, are all abandoned)."""
    for tmp in glob.glob(os.path.join(RUN_DIR, "core-*.btf.*.tmp")):
        made = tmp.rsplit(".", 2)[0]
        if made == mine:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            continue
        try:
            lock_path = made + ".lock"
            with open(lock_path, "a") as other:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(tmp)
        except OSError:
            pass  # its maker is at work, or it is gone already


def _forget_other_boots(boot: str) -> None:
    for old in glob.glob(os.path.join(RUN_DIR, "core-*")):
        if f"core-{boot}-" not in os.path.basename(old):
            try:
                os.unlink(old)
            except OSError:
                pass

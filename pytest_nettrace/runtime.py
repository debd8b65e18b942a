"""What lasts for one boot: the boot's id, and the directory (tmpfs, gone at
reboot) where the plugin keeps what is worth computing once per boot
(function addresses, the minimal CO-RE BTF, kernel features and BTF facts)
and its stale-cleanup lock.

On a shared machine the directory is believed only when root alone can write
it (a real directory owned by root, not writable by group or others), and a
file in it only when it is root's own regular file, not writable by others:
what another user could plant is never read, so a lie about the kernel cannot
come from a cache."""
from __future__ import annotations

import os
import stat
import threading
from typing import Optional

RUN_DIR = "/run/pytest-nettrace"


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _root_only(st: os.stat_result) -> bool:
    return st.st_uid == 0 and not st.st_mode & 0o022


def trusted_dir(directory: str, create: bool = False) -> bool:
    """Whether `directory` is a real directory that only root can write;
    `create`: make it (0755) when missing."""
    if create and os.geteuid() == 0:
        try:
            os.mkdir(directory, 0o755)
            os.chmod(directory, 0o755)  # whatever the umask
        except FileExistsError:
            pass
        except OSError:
            return False
    try:
        st = os.lstat(directory)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and _root_only(st)


def trusted_file(path: str) -> bool:
    """Whether `path` is root's own regular file (not a link), in a root-only directory."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and _root_only(st) and trusted_dir(os.path.dirname(path))


def read_cached(directory: str, name: str, private: bool = False) -> Optional[bytes]:
    """The content of cache file `name`, or None: missing, or not to be believed.
    `private`: it holds what only root may read (kernel addresses): one that
    others can read (written so by an older version) is made root's alone first."""
    if not trusted_dir(directory):
        return None
    try:
        fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _root_only(st):
            return None
        if private and st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError:
        return None
    finally:
        os.close(fd)


def write_cached(directory: str, name: str, data: bytes, private: bool = False) -> None:
    """Write cache file `name` whole (readers see the old or the new one,
    never a part); quietly nothing when the directory cannot be trusted or
    written (a read-only /run: computed again next time). `private`: only
    root may read it (kernel addresses: others would learn the kernel's
    randomized base, which kptr_restrict hides from them in /proc/kallsyms)."""
    if os.geteuid() != 0 or not trusted_dir(directory, create=True):
        return
    path = os.path.join(directory, name)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass

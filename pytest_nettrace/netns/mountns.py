"""`ip netns exec` semantics for programs started in a namespace: a mount
namespace of their own where /sys shows the network namespace's devices,
/etc/netns/<name>/* is bound over /etc, and private writable directories
(a daemon's /run/<daemon>, /var/lib/<daemon>) are tmpfs mounts.

Everything happens in the short-lived thread that starts the program (see
`_linux.run_in_thread`): it unshares its mount namespace (a thread may; the
kernel gives it its own fs_struct), makes every mount a slave so nothing
propagates back to the host, mounts, then forks the program, which inherits
that namespace. The host's filesystem and mount table are never changed: a
private directory that does not exist on the host (/run/NetworkManager of a
daemon that never ran) is made inside a tmpfs laid over its nearest existing
parent, into which the parent's entries are bound back.
"""
from __future__ import annotations

import errno
import os
import stat
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from .linux import (MNT_DETACH, MS_BIND, MS_RDONLY, MS_REC, MS_SLAVE, join_mountns, mount, umount2,
                     unshare_mountns)
from ..errors import NamespaceError

NETNS_ETC_DIR = "/etc/netns"


@dataclass(frozen=True)
class MountSetup:
    """What a program's mount namespace gets."""

    netns_name: str
    etc: Tuple[Tuple[str, str], ...]  # (source, target in /etc) bind mounts
    private_dirs: Tuple[str, ...]    # absolute, normalised
    readonly_sys: bool = False
    join_pid: Optional[int] = None   # instead: the mount namespace of this process


def check_private_dirs(dirs: Sequence[str]) -> Tuple[str, ...]:
    """Absolute, normalised paths; a ValueError names a bad one."""
    out = []
    for d in dirs:
        if not isinstance(d, (str, os.PathLike)):
            raise TypeError(f"private_dirs takes paths, not {d!r}")
        p = os.path.normpath(os.fspath(d))
        if not os.path.isabs(p) or p == "/":
            raise ValueError(f"private directory {os.fspath(d)!r} must be an absolute path below /")
        if p == "/proc" or p.startswith("/proc/") or p == "/sys" or p.startswith("/sys/"):
            raise ValueError(f"private directory {p!r}: /proc and /sys are the kernel's")
        out.append(p)
    return tuple(out)


def etc_binds(netns_name: str, etc: "str | os.PathLike[str] | bool | None") -> Tuple[Tuple[str, str], ...]:
    """What is bound over /etc: the entries of /etc/netns/<name> by default
    (if it exists), of a directory the caller gives, or none (`etc=False`).
    Each must name something that exists in /etc: one of /etc/netns/<name>
    that does not is skipped with a warning (ip netns exec says "Bind ...
    failed" and runs the program), one of the caller's directory is an error."""
    if etc is False:
        return ()
    default = etc is None or etc is True
    if etc is None or etc is True:
        path = os.path.join(NETNS_ETC_DIR, netns_name)
        if not os.path.isdir(path):
            return ()
    else:
        path = os.fspath(etc)
        if not os.path.isdir(path):
            raise ValueError(f"etc={path!r} is not a directory")
    binds = []
    for entry in sorted(os.listdir(path)):
        source, target = os.path.join(path, entry), os.path.join("/etc", entry)
        if os.path.lexists(target):
            binds.append((source, target))
        elif default:
            warnings.warn(f"{source} not bound: {target} does not exist (as ip netns exec, which "
                          f"says \"Bind ... failed\" and runs the program)", stacklevel=4)
        else:
            raise NamespaceError(f"cannot bind {source} over {target}: {target} does not exist")
    return tuple(binds)


def enter(setup: MountSetup) -> None:
    """In the calling thread: a new mount namespace set up as `setup` says
    (or the one of process `setup.join_pid`)."""
    if setup.join_pid is not None:
        join_mountns(setup.join_pid)
        return
    unshare_mountns()
    # Nothing mounted from here on may propagate to the host (as ip netns exec does).
    mount("", "/", None, MS_SLAVE | MS_REC)
    _mount_sysfs(setup)
    for source, target in setup.etc:
        try:
            mount(source, target, None, MS_BIND)
        except OSError as exc:
            raise NamespaceError(f"cannot bind {source} over {target}: {exc.strerror}") from None
    covered: set[str] = set()
    for path in setup.private_dirs:
        _private_dir(path, covered)


def _mount_sysfs(setup: MountSetup) -> None:
    flags = MS_RDONLY if setup.readonly_sys else 0
    # A read-only /sys (a container's) stays read-only: a program gets no more
    # than the host had. ip netns exec differs here: it checks only when it
    # cannot unmount /sys (a read-only one cannot be shadowed by a writable one).
    try:
        if os.statvfs("/sys").f_flag & os.ST_RDONLY:
            flags |= MS_RDONLY
    except OSError:
        pass
    try:
        umount2("/sys", MNT_DETACH)
    except OSError:
        pass  # not a mount point, or not ours to unmount: shadowed below
    try:
        mount(setup.netns_name, "/sys", "sysfs", flags)
    except OSError as exc:
        raise NamespaceError(f"cannot mount a sysfs of {setup.netns_name} on /sys: {exc.strerror}") from None


def _private_dir(path: str, covered: set[str]) -> None:
    """A fresh tmpfs at `path` in this mount namespace."""
    if os.path.isdir(path):
        _tmpfs(path, os.stat(path))
        return
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NamespaceError(f"private directory {path}: exists and is not a directory")
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):
        if os.path.lexists(parent):
            raise NamespaceError(f"private directory {path}: {parent} is not a directory")
        parent = os.path.dirname(parent)
    if parent == "/":
        raise NamespaceError(f"private directory {path}: nothing below / leads to it (a tmpfs over / "
                             f"is not laid); make it under an existing directory such as /run")
    # `covered`: directories of our own tmpfs mounts (an entry bound back into
    # one is the host's, and gets covered in turn)
    if parent not in covered:
        _cover(parent)
        covered.add(parent)
    os.makedirs(path, mode=0o755, exist_ok=True)  # in the tmpfs that now covers `parent`
    while path != parent:
        covered.add(path)
        path = os.path.dirname(path)


def _tmpfs(path: str, like: os.stat_result) -> None:
    mode = stat.S_IMODE(like.st_mode)
    try:
        mount("tmpfs", path, "tmpfs", 0, f"mode={mode:o},uid={like.st_uid},gid={like.st_gid}")
    except OSError as exc:
        raise NamespaceError(f"cannot mount a private tmpfs on {path}: {exc.strerror}") from None


def _cover(parent: str) -> None:
    """Lay a tmpfs over `parent` that shows what `parent` held: every entry is
    bound back (with the mounts below it), symlinks are copied. New
    directories can then be made in it without touching the host."""
    old = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        entries = os.listdir(old)
        _tmpfs(parent, os.fstat(old))
        for name in entries:
            src = f"/proc/thread-self/fd/{old}/{name}"
            dst = os.path.join(parent, name)
            try:
                st = os.lstat(src)
            except FileNotFoundError:
                continue  # gone meanwhile
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), dst)
                continue
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(dst, stat.S_IMODE(st.st_mode))
            else:
                os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
            try:
                mount(src, dst, None, MS_BIND | MS_REC)
            except OSError as exc:
                if exc.errno in (errno.ENOENT,):
                    continue
                raise NamespaceError(f"cannot show {parent}/{name} under the private tmpfs on {parent}: "
                                     f"{exc.strerror}") from None
    finally:
        os.close(old)

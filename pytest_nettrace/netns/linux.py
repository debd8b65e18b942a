"""Thin ctypes wrappers for the Linux syscalls the namespace layer needs.

Only what the standard library lacks: unshare, setns, mount, umount2.
Network namespaces are per *thread*, so everything that must happen inside a
namespace runs in a short-lived thread that enters it (`run_in_thread`), or,
for short jobs that only make sockets (`in_netns_at`), in the calling thread,
which enters the namespace for the job and returns to its own right after it.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from typing import Callable, TypeVar

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
CLONE_FS = 0x00000200
MS_RDONLY = 0x1
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)  # the C library Python runs on (find_library would run ldconfig)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]

T = TypeVar("T")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphaned descendants of this process are reparented to it, not to
    init: a daemon that forked away from what a test started (and cleared
    its environment, as `sudo` or `env -i` do) stays its descendant."""
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


def unshare_netns() -> None:
    """Move the calling thread into a brand-new network namespace."""
    _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")


def setns_net(fd: int) -> None:
    """Move the calling thread into the network namespace open as `fd`."""
    _check(_libc.setns(fd, CLONE_NEWNET), "setns(CLONE_NEWNET)")


def unshare_mountns() -> None:
    """Give the calling thread a mount namespace of its own (a copy of the
    current one; threads may, as it also unshares only their fs_struct)."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")


def join_mountns(pid: int) -> None:
    """Move the calling thread into the mount namespace of process `pid`
    (after giving it an fs_struct of its own, without which setns refuses)."""
    fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.unshare(CLONE_FS), "unshare(CLONE_FS)")
        _check(_libc.setns(fd, CLONE_NEWNS), f"setns(CLONE_NEWNS) of pid {pid}")
    finally:
        os.close(fd)


def mount(source: str, target: str, fstype: "str | None", flags: int, data: "str | None" = None) -> None:
    _check(_libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount {source} on {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def bind_mount(source: str, target: str) -> None:
    _check(_libc.mount(source.encode(), target.encode(), b"none", MS_BIND, None), f"bind mount {source} on {target}")


def make_shared(path: str, *, bind_first: bool = False) -> None:
    """Make `path` a shared mount (bind-mounting it onto itself first if asked)."""
    if bind_first:
        _check(_libc.mount(path.encode(), path.encode(), b"none", MS_BIND | MS_REC, None), f"bind mount {path}")
    _check(_libc.mount(b"", path.encode(), b"none", MS_SHARED | MS_REC, None), f"make {path} shared")


def umount_detach(target: str) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


def netns_inode_of(pid: int | str) -> int | None:
    """Inode of the network namespace of process `pid`; None if it is gone or a zombie."""
    try:
        link = os.readlink(f"/proc/{pid}/ns/net")  # "net:[4026532177]"
    except OSError:
        return None
    return int(link[5:-1])


def process_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a live process; None if dead or zombie.

    Together with the pid it identifies one process for the lifetime of the boot,
    which is how stale namespaces detect that their owner died (even if the pid
    was reused since).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def run_in_thread(fn: Callable[[], T], *, netns_fd: int | None = None, new_netns: bool = False) -> T:
    """Run `fn` in a fresh thread that first enters a network namespace.

    With `netns_fd` the thread setns()s into it; with `new_netns` it unshares a
    new one. The thread ends afterwards, so no thread is ever left in a foreign
    namespace. Returns fn's result or re-raises its exception.
    """
    box: dict[str, object] = {}

    def body() -> None:
        try:
            if new_netns:
                unshare_netns()
            elif netns_fd is not None:
                setns_net(netns_fd)
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=body, name="nettrace-netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def in_netns_at(path: str, fn: Callable[[], T]) -> T:
    """Run `fn` inside the network namespace at `path` (/run/netns/NAME,
    /proc/PID/ns/net): the calling thread enters it for the job and is back in
    its own namespace after it, whatever the job did; e.g. to open a socket
    that belongs to that namespace. `fn` must be short and change nothing but
    sockets (no unshare, no setns, no threads: they would start there).

    The calling thread, not a worker: handing the job to a thread and back
    cost two thread switches, ~0.1 ms a job, and a watched namespace takes
    three or four jobs; the two setns() calls cost ~5 us. A thread that
    could not come back would act in the wrong namespace from then on: the
    process stops at once instead (it never happened; setns into a namespace
    held open has no reason to fail)."""
    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:  # setns inside the try: an interrupt right after it still comes home
                setns_net(target)
                return fn()
            finally:
                _come_home(home)
        finally:
            os.close(home)
    finally:
        os.close(target)


def _come_home(home: int) -> None:
    """Back into the namespace open as `home` (a no-op if never left)."""
    try:
        setns_net(home)
    except OSError as exc:
        os.write(2, f"pytest-nettrace: a thread could not return to its own network namespace ({exc}); "
                    "stopping rather than act in a test's namespace\n".encode())
        os._exit(70)


SO_NETNS_COOKIE = 71  # Linux 5.14


def netns_cookie_at(path: str) -> int | None:
    """The cookie of the network namespace at `path` (an nsfs file: a
    /run/netns entry, /proc/PID/ns/net, /proc/PID/fd/N): unlike its inode,
    never reused during the boot. None where the kernel has no cookies or
    the path is no namespace."""
    def here() -> int | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                return int(struct.unpack("Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0])
            except OSError:
                return None
    try:
        return in_netns_at(path, here)
    except OSError:
        return None

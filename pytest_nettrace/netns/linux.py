"""Thin ctypes wrappers for the Linux syscalls the namespace layer needs.

Only what the standard library lacks: unshare, setns, mount, umount2.
Network namespaces are per *thread*, so everything that must happen inside a
namespace runs in a short-lived thread that enters it (`run_in_thread`), or,
for short jobs that only make sockets or talk netlink (`in_netns_at`), in one
worker thread that enters the namespace for the job and returns to its own
after it; the calling thread never changes namespace.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from typing import Callable, TypeVar, cast

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


class _Visitor:
    """One thread that runs jobs inside other network namespaces, one at a
    time: setns into the job's namespace, the job, setns back into its own.
    Starting a thread per job (and tearing it down) cost ~0.25 ms of CPU, and
    every watched namespace needs a few (its monitor and capture sockets).
    A thread that could not return home ends at once and is never given
    another job; the next job gets a new thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()      # one caller at a time
        self._cond = threading.Condition()
        self._job: "tuple[int, Callable[[], object]] | None" = None
        self._box: "dict[str, object] | None" = None
        self._thread: "threading.Thread | None" = None

    def run(self, fd: int, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:   # a job of its own: it is not home
            return run_in_thread(fn, netns_fd=fd)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="nettrace-netns-visitor", daemon=True)
                self._thread.start()
            thread = self._thread
            with self._cond:
                self._job, self._box = (fd, fn), None
                self._cond.notify_all()
                while self._box is None:
                    if not self._cond.wait(1.0) and not thread.is_alive() and self._box is None:
                        self._job = None   # it could not even start (no /proc?): a thread of the job's own
                        return run_in_thread(fn, netns_fd=fd)
                box, self._box = self._box, None
        if "error" in box:
            raise cast(BaseException, box["error"])
        result: T = box["result"]  # what fn returned
        return result

    def _loop(self) -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            while True:
                with self._cond:
                    while self._job is None:
                        self._cond.wait()
                    (fd, fn), self._job = self._job, None
                box: dict[str, object] = {}
                away = False
                try:
                    setns_net(fd)
                    away = True
                    box["result"] = fn()
                except BaseException as exc:  # handed to the caller
                    box["error"] = exc
                if away:
                    try:
                        setns_net(home)
                        away = False
                    except OSError:
                        pass
                with self._cond:
                    self._box = box
                    self._cond.notify_all()
                if away:   # stuck in a foreign namespace: no more jobs here
                    return
        finally:
            os.close(home)


_visitor = _Visitor()


def _fresh_visitor() -> None:
    # a child forked while a job was under way inherits locked locks and no thread
    global _visitor
    _visitor = _Visitor()


os.register_at_fork(after_in_child=_fresh_visitor)


def in_netns_at(path: str, fn: Callable[[], T]) -> T:
    """Run `fn` inside the network namespace at `path` (/run/netns/NAME,
    /proc/PID/ns/net), in a thread that enters it: e.g. to open a socket that
    belongs to that namespace. `fn` must be short and change nothing but
    sockets (no unshare, no setns: the thread goes on to other namespaces)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _visitor.run(fd, fn)
    finally:
        os.close(fd)


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

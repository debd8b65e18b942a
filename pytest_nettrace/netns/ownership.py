"""The /run/netns registry: naming, mounting, unmounting, and the per-process
ownership record that lets a later run remove what a dead one left.

Entries follow iproute2's convention (a bind mount of the namespace on
/run/netns/<name>), so `ip netns exec <name>` works on them. Names are
`nt-<pid>-s<token>-<counter>`, but a name proves nothing: anyone can make
an entry called nt-1-2-3. What a process made is written in its *record*
(SESSIONS_DIR/<token>.rec, root-only), before it is made: each namespace with
its inode and device, each process it started with its pid and start time.
The owner holds an flock on its record as long as it lives; a record whose
lock can be taken belongs to a dead process, whatever PID namespace it ran in
(pids are not comparable across PID namespaces, an flock on a shared file
is). Stale cleanup only touches what such a record names, and only if the
entry still is what was recorded (same namespace inode).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import json
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, TextIO

from ..runtime import RUN_DIR
from .linux import bind_mount, make_shared, process_start_time, umount_detach

NETNS_RUN_DIR = "/run/netns"
SESSIONS_DIR = os.path.join(RUN_DIR, "sessions")
# Held shared while stale entries are removed; a test that needs a stale entry
# to survive a moment (to show the next session removes it) holds it exclusively.
STALE_LOCK = os.path.join(RUN_DIR, "stale.lock")
NAME_PREFIX = "nt-"
#: Environment variable given to every process a Namespace starts: its value
#: (the record's secret token) marks the descendants of those processes as ours.
TOKEN_ENV = "NETTRACE_SESSION"

_counter = itertools.count(1)
_run_dir_ready_pid: int | None = None
_run_dir_lock = threading.Lock()


def new_name() -> str:
    """A namespace name unique across processes and runs: nt-<pid>-s<8 hex
    of the record's token>-<n>. The letter keeps it out of the pattern older
    versions took for proof of ownership (nt-<digits>-<digits>-<digits>), so
    they never remove ours on a host running both."""
    return f"{NAME_PREFIX}{os.getpid()}-s{record().token[:8]}-{next(_counter)}"


def path_of(name: str) -> str:
    return f"{NETNS_RUN_DIR}/{name}"


def nsfs_dev() -> int:
    """Device of the nsfs filesystem (namespace files), the same for every namespace."""
    return os.stat("/proc/self/ns/net").st_dev


def ensure_run_dir() -> None:
    """Create /run/netns and make it a shared mount, as `ip netns add` does.

    Shared propagation matters: unmounting an entry must also unmount its
    copies in mount namespaces cloned since (e.g. by `ip netns exec`),
    otherwise those copies keep the namespace alive.
    """
    global _run_dir_ready_pid
    if _run_dir_ready_pid == os.getpid():
        return
    with _run_dir_lock:
        os.makedirs(NETNS_RUN_DIR, mode=0o755, exist_ok=True)
        dir_fd = os.open(NETNS_RUN_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # Serialise with other workers so /run/netns is bind-mounted only once.
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            try:
                make_shared(NETNS_RUN_DIR)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: not a mount point yet
                    raise
                make_shared(NETNS_RUN_DIR, bind_first=True)
        finally:
            os.close(dir_fd)
        _run_dir_ready_pid = os.getpid()


def reserve(path: str) -> None:
    """Create the empty mount-point file; fails with FileExistsError if taken."""
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0))


def mount_current_thread_netns(path: str) -> None:
    """Pin the calling thread's network namespace on `path`."""
    bind_mount("/proc/thread-self/ns/net", path)


class NotOurs(Exception):
    """The entry is not (any more) the namespace we recorded: left alone."""


def remove_entry(path: str, inode: int | None, dev: int | None = None) -> None:
    """Unmount and unlink an entry, if it is the namespace `inode` (or, with
    inode None, the empty placeholder file reserve() made); the kernel frees
    the namespace later, alone. Raises NotOurs when the entry is something
    else, OSError when it cannot be removed."""
    dev = nsfs_dev() if dev is None else dev
    for _ in range(8):  # our namespace may be mounted on it more than once
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if st.st_dev == dev:
            if st.st_ino != inode:
                raise NotOurs(f"{path} is now another namespace (inode {st.st_ino}, not {inode})")
            umount_detach(path)
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
            raise NotOurs(f"{path} is not a namespace mount nor an empty file")
        os.unlink(path)
        return
    raise OSError(errno.EBUSY, f"{path} is still mounted after 8 unmounts")


# --------------------------------------------------------------------------
# The ownership record


def _secure_sessions_dir() -> None:
    """SESSIONS_DIR exists, is a real directory owned by root, 0700."""
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    try:
        os.mkdir(SESSIONS_DIR, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(SESSIONS_DIR)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
        raise PermissionError(errno.EPERM, f"{SESSIONS_DIR} is not a root-only directory; not trusting it")


class Record:
    """This process's record of what it created (see the module docstring).

    Appended one JSON line per fact, each written before the thing exists, so
    a crash at any moment leaves a record naming everything that might exist.
    """

    def __init__(self) -> None:
        _secure_sessions_dir()
        self.token = secrets.token_hex(16)
        self.path = os.path.join(SESSIONS_DIR, f"{self.token}.rec")
        self.pid = os.getpid()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW
                           | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)  # held until this process dies
        self._lock = threading.Lock()
        self.live: dict[str, int | None] = {}
        self._write(token=self.token, pid=self.pid, start=process_start_time(self.pid),
                    pidns=os.stat("/proc/self/ns/pid").st_ino)

    def _write(self, **fact: object) -> None:
        os.write(self._fd, (json.dumps(fact) + "\n").encode())

    def netns(self, name: str, inode: int | None, dev: int | None) -> None:
        """About to make namespace `name` (inode None: the placeholder file)."""
        with self._lock:
            self.live[name] = inode
            self._write(ns=name, ino=inode, dev=dev)

    def netns_gone(self, name: str) -> None:
        with self._lock:
            self.live.pop(name, None)
            self._write(gone=name)

    def process(self, pid: int, start: int | None, ns: str) -> None:
        with self._lock:
            self._write(proc=pid, start=start, ns=ns)

    def close_if_empty(self) -> None:
        """At exit: nothing left, so the record goes too."""
        with self._lock:
            if not self.live and self._fd >= 0:
                os.unlink(self.path)
                os.close(self._fd)
                self._fd = -1


_record: Record | None = None
_record_lock = threading.Lock()


def record() -> Record:
    """This process's record, made on first use (and again after a fork: the
    child is another owner)."""
    global _record
    with _record_lock:
        if _record is None or _record.pid != os.getpid():
            _record = Record()
            import atexit

            atexit.register(_record.close_if_empty)
        return _record


@dataclass
class DeadRecord:
    """A record whose owner is dead; its lock is held while this is open."""

    path: str
    token: str
    pidns: int | None
    namespaces: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)  # name -> (ino, dev)
    processes: list[tuple[int, int | None, str]] = field(default_factory=list)         # (pid, start, ns)
    fd: int = -1

    def forget(self) -> None:
        """Everything it named is gone: remove the record."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def dead_records() -> Iterator[DeadRecord]:
    """Records whose owner is dead, each locked while the caller handles it
    (so two cleaners never work on the same one)."""
    try:
        names = sorted(os.listdir(SESSIONS_DIR))
        _secure_sessions_dir()
    except FileNotFoundError:
        return
    for name in names:
        if not name.endswith(".rec"):
            continue
        path = os.path.join(SESSIONS_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its owner lives (or another cleaner has it)
            os.close(fd)
            continue
        if os.fstat(fd).st_nlink == 0:  # removed while we opened it
            os.close(fd)
            continue
        rec = _parse(path, fd)
        try:
            yield rec
        finally:
            rec.close()


def _parse(path: str, fd: int) -> DeadRecord:
    with os.fdopen(os.dup(fd), "rb") as f:
        lines = f.read().splitlines()
    rec = DeadRecord(path, "", None, fd=fd)
    for line in lines:
        try:
            fact = json.loads(line)
        except ValueError:  # a line cut by the owner's death
            continue
        if "token" in fact:
            rec.token, rec.pidns = fact["token"], fact.get("pidns")
        elif "proc" in fact:
            rec.processes.append((fact["proc"], fact.get("start"), fact.get("ns", "")))
        elif "ns" in fact:
            rec.namespaces[fact["ns"]] = (fact.get("ino"), fact.get("dev"))
        elif "gone" in fact:
            rec.namespaces.pop(fact["gone"], None)
    return rec


class stale_cleanup_lock:
    """Shared hold of STALE_LOCK for a stale cleanup: waits up to `wait`
    seconds while someone holds it exclusively, then goes on regardless (a
    cleanup that never ran would leak more than one that ran early)."""

    def __init__(self, wait: float = 30.0) -> None:
        self.wait = wait
        self._file: Optional[TextIO] = None

    def __enter__(self) -> "stale_cleanup_lock":

        try:
            os.makedirs(os.path.dirname(STALE_LOCK), exist_ok=True)
            self._file = open(STALE_LOCK, "a")
        except OSError:
            return self
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(self._file, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return self
            except OSError:
                if time.monotonic() >= deadline:
                    return self
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()

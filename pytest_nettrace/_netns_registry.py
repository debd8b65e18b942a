"""The /run/netns registry: naming, mounting, unmounting and stale cleanup.

Entries follow iproute2's convention (a bind mount of the namespace on
/run/netns/<name>), so `ip netns exec <name>` works on them. Names are
`nt-<owner pid>-<owner start time>-<counter>`: the pid and the start time
(ticks since boot) identify the owner process even after its pid is reused,
which lets any later run decide that an entry is stale.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import re
import threading
import time

from ._boot import RUN_DIR
from ._linux import bind_mount, make_shared, process_start_time, umount_detach

NETNS_RUN_DIR = "/run/netns"
# Held shared while stale entries are removed; a test that needs a stale entry
# to survive a moment (to show the next session removes it) holds it exclusively.
STALE_LOCK = os.path.join(RUN_DIR, "stale.lock")
NAME_PREFIX = "nt-"
_NAME_RE = re.compile(r"^nt-(\d+)-(\d+)-\d+$")

_counter = itertools.count(1)
_run_dir_ready_pid: int | None = None
_run_dir_lock = threading.Lock()
_owner_tag: tuple[int, str] | None = None


def new_name() -> str:
    """A namespace name unique across processes, runs and pid reuse."""
    global _owner_tag
    pid = os.getpid()
    if _owner_tag is None or _owner_tag[0] != pid:  # recompute after fork
        _owner_tag = (pid, f"{NAME_PREFIX}{pid}-{process_start_time(pid)}")
    return f"{_owner_tag[1]}-{next(_counter)}"


def path_of(name: str) -> str:
    return f"{NETNS_RUN_DIR}/{name}"


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
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))


def mount_current_thread_netns(path: str) -> None:
    """Pin the calling thread's network namespace on `path`."""
    bind_mount("/proc/thread-self/ns/net", path)


def remove_entry(path: str) -> None:
    """Unmount and unlink an entry; the kernel frees the namespace later, alone."""
    try:
        umount_detach(path)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not mounted
            raise
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def owner_alive(name: str) -> bool:
    """Whether the process that created namespace `name` still runs."""
    match = _NAME_RE.match(name)
    if not match:
        return True  # not ours to judge
    pid, started = int(match.group(1)), int(match.group(2))
    return process_start_time(pid) == started


def stale_names() -> list[str]:
    """Names of nt-* entries whose owner process is dead."""
    try:
        entries = os.listdir(NETNS_RUN_DIR)
    except FileNotFoundError:
        return []
    return sorted(e for e in entries if _NAME_RE.match(e) and not owner_alive(e))


class stale_cleanup_lock:
    """Shared hold of STALE_LOCK for a stale cleanup: waits up to `wait`
    seconds while someone holds it exclusively, then goes on regardless (a
    cleanup that never ran would leak more than one that ran early)."""

    def __init__(self, wait: float = 30.0) -> None:
        self.wait = wait
        self._file = None

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

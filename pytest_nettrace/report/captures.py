"""Where packet captures are written while tests run, and what is left after.

One directory per pytest process, `$TMPDIR/nettrace-<pid>-<start time>/`,
made with the first capture. A passing test's capture is removed at its
teardown; a failed test's is kept (`keep`), so the path its report prints
can be opened after the run, until a later session removes the directories
of processes that have ended (`--nettrace-report=DIR` copies them there for
good). When the session ends, whatever else is in the directory (captures of
traces made without the plugin's fixtures) goes, and the directory too if
nothing was kept: a run whose tests pass leaves nothing in /tmp. A process
that traces without a pytest session (the library, the benchmarks) tidies
the same way when it exits. The owner holds a lock on `.owner` in its
directory while it lives (flock: seen from any PID namespace, released
however the process ends), so no session removes another live one's
captures — not even one run under `unshare --pid`, which sees other pids
than the owner's.
"""
from __future__ import annotations

import atexit
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from typing import List, Optional, Set, Tuple

from ..netns.linux import process_start_time

PREFIX = "nettrace-"
_NAME_RE = re.compile(r"^nettrace-(\d+)-(\d+)$")
_made: Optional[Tuple[int, str, int]] = None   # (pid, directory, fd of its locked .owner) once made by this process
OWNER = ".owner"
_kept: Set[str] = set()         # captures of failed tests
_sessions = 0                   # pytest sessions running in this process (pytester runs nest)


def file_stem(nodeid: str) -> str:
    """A file name for a test: readable, safe, unique (a hash of the full node id)."""
    readable = re.sub(r"[^A-Za-z0-9_.\[\]-]+", "_", nodeid.replace("::", "__")).strip("_")[:120]
    digest = hashlib.sha1(nodeid.encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def session_dir() -> str:
    """This process's capture directory (made on first use, with its owner lock)."""
    global _made
    pid = os.getpid()
    if _made is None or _made[0] != pid:   # recomputed after a fork
        path = os.path.join(tempfile.gettempdir(), f"{PREFIX}{pid}-{process_start_time(pid)}")
        # made under a temporary name with the lock already held, then
        # renamed: no other session ever sees it without its lock
        tmp = tempfile.mkdtemp(prefix=".nettrace-new-", dir=tempfile.gettempdir())
        fd = os.open(os.path.join(tmp, OWNER), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            os.rename(tmp, path)
        except OSError:   # already there (made before a fork's exec?): use it as it is
            os.close(fd)
            shutil.rmtree(tmp, ignore_errors=True)
            fd = os.open(os.path.join(path, OWNER), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _made = (pid, path, fd)
        atexit.register(_at_exit, pid)
    return str(_made[1])


def capture_path(nodeid: str) -> str:
    """Where the capture of test `nodeid` is written."""
    return os.path.join(session_dir(), file_stem(nodeid) + ".pcapng")


def discard(path: Optional[str]) -> None:
    """Remove a capture nobody needs (a passing test's, or one copied away)."""
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def keep(path: Optional[str]) -> None:
    """A failed test's capture: it stays when the session ends."""
    if path:
        _kept.add(path)


def start_session() -> None:
    global _sessions
    _sessions += 1


def finish_session() -> Optional[str]:
    """At the end of the (outermost) session: remove every capture but the
    kept ones, and the directory if nothing is left; returns the directory
    if captures of failed tests remain in it."""
    global _sessions
    _sessions = max(0, _sessions - 1)
    return None if _sessions else _tidy()


def _at_exit(pid: int) -> None:
    """A process that traced outside a pytest session leaves only the kept captures."""
    if pid == os.getpid() and not _sessions:
        _tidy()


def _tidy() -> Optional[str]:
    if _made is None or _made[0] != os.getpid():
        return None
    directory = _made[1]
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return None
    for name in names:
        path = os.path.join(directory, name)
        if path not in _kept and name != OWNER:
            discard(path)
    if any(os.path.join(directory, n) in _kept for n in names):
        return directory   # its lock goes with this process: a later session removes it
    discard(os.path.join(directory, OWNER))
    try:
        os.rmdir(directory)
    except OSError:
        return directory
    return None


def remove_stale() -> List[str]:
    """Remove capture directories of pytest processes that have ended (and
    belong to this user); returns their paths."""
    base = tempfile.gettempdir()
    removed: List[str] = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        if not _NAME_RE.match(name):
            continue
        path = os.path.join(base, name)
        try:
            if os.lstat(path).st_uid != os.geteuid() or os.path.islink(path):
                continue
            fd = os.open(os.path.join(path, OWNER), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue   # not one of ours (no lock file): left alone
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue   # its owner lives
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed

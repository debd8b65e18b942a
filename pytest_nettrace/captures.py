"""Where packet captures are written while tests run, and what is left after.

One directory per pytest process, `$TMPDIR/nettrace-<pid>-<start time>/`,
made with the first capture. A passing test's capture is removed at its
teardown; a failed test's is kept (`keep`), so the path its report prints
can be opened after the run, until a later session removes the directories
of processes that have ended (`--nettrace-report=DIR` copies them there for
good). When the session ends, whatever else is in the directory (captures of
traces made without the plugin's fixtures) goes, and the directory too if
nothing was kept: a run whose tests pass leaves nothing in /tmp. The pid and the start time identify the owner process even
after its pid is reused, so no session removes another live one's captures.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from typing import List, Optional, Set

from ._linux import process_start_time

PREFIX = "nettrace-"
_NAME_RE = re.compile(r"^nettrace-(\d+)-(\d+)$")
_made: Optional[tuple] = None   # (pid, directory) once made by this process
_kept: Set[str] = set()         # captures of failed tests
_sessions = 0                   # pytest sessions running in this process (pytester runs nest)


def file_stem(nodeid: str) -> str:
    """A file name for a test: readable, safe, unique (a hash of the full node id)."""
    readable = re.sub(r"[^A-Za-z0-9_.\[\]-]+", "_", nodeid.replace("::", "__")).strip("_")[:120]
    digest = hashlib.sha1(nodeid.encode()).hexdigest()[:8]
    return f"{readable}-{digest}"


def session_dir() -> str:
    """This process's capture directory (made on first use)."""
    global _made
    pid = os.getpid()
    if _made is None or _made[0] != pid:   # recomputed after a fork
        path = os.path.join(tempfile.gettempdir(), f"{PREFIX}{pid}-{process_start_time(pid)}")
        os.makedirs(path, mode=0o700, exist_ok=True)
        _made = (pid, path)
    return _made[1]


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
    if _sessions or _made is None or _made[0] != os.getpid():
        return None
    directory = _made[1]
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return None
    for name in names:
        path = os.path.join(directory, name)
        if path not in _kept:
            discard(path)
    try:
        os.rmdir(directory)
        return None
    except OSError:
        return directory


def remove_stale() -> List[str]:
    """Remove capture directories of pytest processes that have ended (and
    belong to this user); returns their paths."""
    base = tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        m = _NAME_RE.match(name)
        if not m or process_start_time(int(m.group(1))) == int(m.group(2)):
            continue
        path = os.path.join(base, name)
        try:
            if os.lstat(path).st_uid != os.geteuid() or os.path.islink(path):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed

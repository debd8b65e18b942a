"""Finding and killing the processes that live in given network namespaces.

A namespace stays alive as long as one process is in it, so teardown must
kill stragglers (daemons that forked away, `ip netns exec` children, …).
They are found by comparing /proc/<pid>/ns/net with the namespace's inode.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Iterable

from ._linux import netns_inode_of


def pids_in(inodes: Iterable[int]) -> list[int]:
    """Pids (other than ours) whose network namespace is one of `inodes`."""
    wanted = set(inodes)
    if not wanted:
        return []
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me and netns_inode_of(entry) in wanted:
            found.append(int(entry))
    return found


def stop_popen(procs: Iterable[tuple[subprocess.Popen, int | None]], grace: float = 1.0) -> None:
    """Stop (Popen, process group) pairs: SIGTERM, SIGKILL after `grace` seconds, reap.

    With a group id the whole group is signalled, so children a daemon forked
    stay no longer than their parent.
    """
    procs = list(procs)
    for proc, pgid in procs:
        if proc.poll() is None:
            _signal(proc, pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc, pgid in procs:
        # Kill the group even if the leader exited: its children may linger.
        _signal(proc, pgid, signal.SIGKILL)
        proc.wait()


def kill_all_in(inodes: Iterable[int], wait: float = 2.0) -> list[int]:
    """SIGKILL every process living in one of the namespaces; wait until they are gone.

    Returns the pids that were still alive after `wait` seconds.
    """
    inodes = set(inodes)
    pids = pids_in(inodes)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while pids and time.monotonic() < deadline:
        # A killed process leaves the namespace when it exits (zombies no longer count).
        pids = [pid for pid in pids if netns_inode_of(pid) in inodes]
        if pids:
            time.sleep(0.005)
    return pids


def _signal(proc: subprocess.Popen, pgid: int | None, sig: int) -> None:
    try:
        if pgid is not None:
            os.killpg(pgid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass

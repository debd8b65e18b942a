"""Stopping the processes a session started, and only those.

A namespace stays alive as long as one process is in it, so teardown stops
what the tests started there: the processes `Namespace.popen` made (held by a
pidfd, so a reused pid is never signalled) and their descendants (daemons that
forked away), recognised by the session token in their environment or by a
started process among their ancestors. Anyone else in the namespace (another
tool's `ip netns exec`) is left alone and reported.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from .linux import become_subreaper, netns_cookie_at, netns_inode_of, process_start_time


@dataclass
class Found:
    """The processes living in some namespaces, sorted by whose they are:
    ours as pid -> pidfd (taken before looking, so what was checked is the
    process that gets signalled), foreign as pids."""

    ours: dict[int, int]
    foreign: list[int]


def open_pidfd(pid: int, start: int | None) -> int | None:
    """A pidfd for `pid` if it still is the process that started at `start`."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    # Checked after opening: the fd pins the process, so the check holds.
    if start is None or process_start_time(pid) != start:
        os.close(fd)
        return None
    return fd


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _settled_environ(pid: int, inodes: set[int], timeout: float = 1.0) -> bytes:
    """The environment of `pid`, waiting while it reads empty: it does for
    the ~10-20 ms of an exec (the new image's memory is not set up yet; seen
    for a third of the processes Popen had just returned) and while it exits.
    No event tells either end, so this polls; it gives up when the process
    leaves the namespaces or after `timeout`."""
    env = _environ(pid)
    deadline = time.monotonic() + timeout
    while not env and netns_inode_of(pid) in inodes and time.monotonic() < deadline:
        time.sleep(0.002)
        env = _environ(pid)
    return env


def _stat_fields(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return []
    return stat[stat.rindex(b")") + 2:].split()  # state, ppid, pgrp, ...


def _parent(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else 0


def stop_popen(proc: "subprocess.Popen[Any]", grace: float) -> list[int]:
    """Stop a child and what belongs to it (its process group, its
    descendants): SIGTERM, SIGKILL after `grace` seconds, reap. Only while it
    is unreaped: then its pid, and the group id it leads, are still its own;
    once reaped, they may be anyone's, and nothing is signalled. Returns the
    pids still running."""
    if proc.poll() is not None:
        return []
    leader = proc.pid
    fds = {leader: os.pidfd_open(leader)}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in (leader, os.getpid()):
            continue
        pid = int(entry)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        fields = _stat_fields(pid)  # read once the pidfd pins the process
        ancestor, hops = pid, 0
        while ancestor > 1 and ancestor != leader and hops < 64:
            ancestor, hops = _parent(ancestor), hops + 1
        if fields and (int(fields[2]) == leader or ancestor == leader):
            fds[pid] = pidfd
        else:
            os.close(pidfd)
    left = terminate(fds, grace)
    proc.wait()
    return left


_adopting = False


def adopt_orphans() -> None:
    """Make this process the subreaper of what it starts (once): a daemon
    that double-forks with its environment cleared (`env -i`, `sudo`)
    carries no session marker and its ancestry ended at init, so nothing
    proved it the test's and it outlived the test, keeping its namespace."""
    global _adopting
    if not _adopting:
        become_subreaper()
        _adopting = True


def reap_adopted(pids: Iterable[int]) -> None:
    """Collect the exit status of those of `pids` that are this process's
    children and have exited (orphans adopted, then killed): the
    subprocess module waits only for the children it started."""
    for pid in pids:
        fields = _stat_fields(pid)
        if fields and int(fields[1]) == os.getpid() and fields[0] == b"Z":
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def classify(inodes: Iterable[int], token: str, started: Iterable[int] = ()) -> Found:
    """Processes (other than us) in one of the namespaces `inodes`: ours when
    they carry `token` in their environment, or descend from a `started`
    pid or from this process — a test's own `subprocess.Popen(["ip",
    "netns", "exec", ...])` too (orphans too once adopted: adopt_orphans).
    The caller owns the returned pidfds."""
    wanted = set(inodes)
    found = Found({}, [])
    if not wanted:
        return found
    marker = f"NETTRACE_SESSION={token}".encode()
    me = os.getpid()
    started = set(started) | {me}
    for pid, pidfd in _opened(lambda pid: pid != me and netns_inode_of(pid) in wanted):
        ancestor, hops = pid, 0
        while ancestor > 1 and ancestor not in started and hops < 64:
            ancestor, hops = _parent(ancestor), hops + 1
        ours = netns_inode_of(pid) in wanted and (
            ancestor in started or marker in _settled_environ(pid, wanted).split(b"\0"))
        if ours:
            found.ours[pid] = pidfd
            continue
        os.close(pidfd)
        if netns_inode_of(pid) in wanted:  # not one that exited meanwhile
            found.foreign.append(pid)
    return found


def _opened(wanted: Callable[[int], bool]) -> Iterator[tuple[int, int]]:
    """(pid, pidfd) of the processes `wanted` picks, the pidfd opened after
    that first look: from then on `pid` is that process (or its zombie),
    whatever exits, so a second look at it sees what gets signalled."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not wanted(int(entry)):
            continue
        try:
            yield int(entry), os.pidfd_open(int(entry))
        except OSError:  # gone meanwhile
            continue


def carrying(token: str, skip: Iterable[int] = ()) -> dict[int, int]:
    """Processes anywhere (other than us and `skip`) whose environment
    carries session `token`, as pid -> pidfd: a dead session's daemons,
    wherever they are (the namespaces they ran in may have lost their
    /run/netns entries). The pidfd is taken before the check, so what was
    checked is what gets signalled."""
    marker = f"NETTRACE_SESSION={token}".encode()
    skip = set(skip) | {os.getpid()}
    out: dict[int, int] = {}
    for pid, pidfd in _opened(lambda pid: pid not in skip and marker in _environ(pid)):
        if marker in _environ(pid).split(b"\0"):
            out[pid] = pidfd
        else:
            os.close(pidfd)
    return out


def send(pidfd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass


def wait_exited(pidfds: Iterable[int], timeout: float) -> list[int]:
    """Wait until the processes have exited (a pidfd polls readable then);
    returns the pidfds still running after `timeout` seconds."""
    left = set(pidfds)
    poller = select.poll()
    for fd in left:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for fd, _ in poller.poll(remaining * 1000):
            left.discard(fd)
            poller.unregister(fd)
    return sorted(left)


def terminate(pidfds: dict[int, int], grace: float) -> list[int]:
    """SIGTERM, SIGKILL after `grace` seconds (at once if 0), wait for the
    exit; closes the pidfds. Returns the pids still running after all that."""
    try:
        by_fd = {fd: pid for pid, fd in pidfds.items()}
        left = list(by_fd)
        if grace > 0:
            for fd in by_fd:
                send(fd, signal.SIGTERM)
            left = wait_exited(by_fd, grace)
        for fd in left:
            send(fd, signal.SIGKILL)
        return [by_fd[fd] for fd in wait_exited(left, 5.0)]
    finally:
        for fd in pidfds.values():
            os.close(fd)


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f"{pid} ({f.read().strip()})"
    except OSError:
        return str(pid)


def holders(namespaces: dict[int, int | None], paths: Iterable[str] = ()) -> list[str]:
    """Who else keeps one of `namespaces` (inode -> cookie) alive: nsfs mounts
    in any mount namespace, and open fds (an fd opened through a mount reads
    as that mount's path, e.g. one of `paths`, or "/" once unmounted). One
    line each. A match by inode is confirmed by the cookie, as a freed
    namespace's inode may already be another's."""
    wanted = {f"net:[{ino}]": cookie for ino, cookie in namespaces.items()}
    if not wanted:
        return []

    def confirmed(target: str, path: str) -> bool:
        cookie = wanted[target]
        return cookie is None or netns_cookie_at(path) == cookie

    found: list[str] = []
    me = str(os.getpid())
    mount_namespaces: dict[str, str] = {os.readlink("/proc/self/ns/mnt"): me}
    pids = [e for e in os.listdir("/proc") if e.isdigit()]
    for pid in pids:
        try:
            mount_namespaces.setdefault(os.readlink(f"/proc/{pid}/ns/mnt"), pid)
        except OSError:
            continue
    names = set(paths)
    for pid in mount_namespaces.values():
        try:
            with open(f"/proc/{pid}/mountinfo") as f:
                lines = [line.split() for line in f]
        except OSError:
            continue
        for fields in lines:
            if fields[3] in wanted and confirmed(fields[3], f"/proc/{pid}/root{fields[4]}"):
                names.add(fields[4])
                found.append(f"{fields[3]} mounted on {fields[4]} (mount namespace of process {pid})")
    for pid in pids:
        if pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            path = f"/proc/{pid}/fd/{fd}"
            try:
                target = os.readlink(path)
            except OSError:
                continue
            if target not in wanted and (target == "/" or target in names):
                # opened through a mount: reads as its path, "/" once unmounted
                try:
                    target = f"net:[{os.stat(path).st_ino}]"
                except OSError:
                    continue
            if target in wanted and confirmed(target, path):
                found.append(f"{target} held open by process {describe(int(pid))}")
    return found

"""Shared by tests/test_reliability*.py: generated pytest sessions run in
subprocesses, and the kernel objects they might leave behind."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Iterator, List, Optional, Set

from netns_helpers import host_network_state

from pytest_nettrace.netns.ownership import STALE_LOCK

@contextmanager
def stale_lock() -> Iterator[None]:
    """Sessions starting remove stale namespaces (cleanup_stale), waiting while
    this is held: for a test that needs a stale namespace to survive a moment.
    A session started while holding it must set NETTRACE_KEEP_STALE=1 (no
    cleanup) or NETTRACE_STALE_LOCK_HELD=1 (it cleans, others wait)."""
    os.makedirs(os.path.dirname(STALE_LOCK), exist_ok=True)
    with open(STALE_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_session(directory, *args: str, timeout: float = 1800, env: Optional[dict] = None,
                user: Optional[List[str]] = None) -> subprocess.CompletedProcess:
    """`pytest <args>` in `directory` (its own rootdir), output captured."""
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args]
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("PYTEST_XDIST_WORKER", None)
    full_env.pop("PYTEST_ADDOPTS", None)
    # the captures an inner session keeps for its failing tests stay in the test's own directory
    full_env.setdefault("TMPDIR", str(directory))
    return subprocess.run((user or []) + argv, cwd=str(directory), capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def outcome_counts(output: str) -> dict:
    """{"passed": n, "failed": n, ...} from pytest's last summary line."""
    import re
    lines = [ln for ln in output.splitlines()
             if re.match(r"^(=+ )?(\d+ \w+(, )?)+.* in [\d.]+s", ln.strip())]
    counts: dict = {}
    if lines:
        for n, what in re.findall(r"(\d+) (\w+)", lines[-1]):
            what = {"error": "errors", "warning": "warnings"}.get(what, what)
            counts[what] = int(n)
    return counts


def own_bpf_link_ids() -> Set[int]:
    """IDs of the BPF links this process holds (from /proc/self/fdinfo)."""
    ids = set()
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                for line in f:
                    if line.startswith("link_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def bpf_link_ids() -> Set[int]:
    """Every BPF link on the machine (`bpftool link show`)."""
    out = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {link["id"] for link in json.loads(out or "[]")}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _stable(value):
    """Drop what changes by itself (address lifetimes count down)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if not k.endswith("_life_time")}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def stable_host_state() -> dict:
    return _stable(host_network_state())


def one_line(text: str) -> bool:
    return "\n" not in text.strip()

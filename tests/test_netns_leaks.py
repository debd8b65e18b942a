"""Nothing outlives a test: passing, failing, erroring in setup, or SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from netns_helpers import netns_entries, pids_left_in

from pytest_nettrace.netns import cleanup_stale, remove_stale
from reliability_helpers import stale_lock

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

# The inner tests record each namespace (name inode) and daemon pid they made.
INNER_CONFTEST = """
import os
import pytest

RECORD = os.environ["NT_RECORD"]

def record(ns, daemon):
    with open(RECORD, "a") as f:
        f.write(f"{ns.name} {ns.inode} {daemon.pid}\\n")

@pytest.fixture
def populated(make_netns):
    a, b = make_netns(), make_netns()
    a.add_veth("v0", b, "v1", ["10.0.0.1/24"], ["10.0.0.2/24"])
    a.add_dummy("d0", "10.1.0.1/24")
    for ns in (a, b):
        record(ns, ns.popen(["sleep", "300"]))
    return a, b
"""


def _records(path) -> list[tuple[str, int, int]]:
    return [(n, int(i), int(p)) for n, i, p in (line.split() for line in path.read_text().splitlines())]


def _assert_all_gone(records) -> None:
    assert records, "the inner test made no namespace"
    left = netns_entries()
    for name, inode, daemon in records:
        assert name not in left
        assert pids_left_in(name, inode) == []
        assert not _alive(daemon)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] not in "ZX"
    except FileNotFoundError:
        return False


@pytest.fixture
def inner(pytester: pytest.Pytester, tmp_path, monkeypatch):
    record = tmp_path / "record.txt"
    record.touch()
    monkeypatch.setenv("NT_RECORD", str(record))
    pytester.makeconftest(INNER_CONFTEST)
    return pytester, record


def test_nothing_leaks_after_pass_fail_and_setup_error(inner) -> None:
    pytester, record = inner
    pytester.makepyfile(
        """
        import pytest

        def test_passes(populated):
            pass

        def test_fails(populated):
            assert False, "deliberate"

        @pytest.fixture
        def broken(populated):
            raise RuntimeError("setup goes wrong after creating namespaces")

        def test_setup_error(broken):
            pass

        def test_call_raises(populated):
            raise OSError("boom")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=2, errors=1)
    records = _records(record)
    assert len(records) == 8
    _assert_all_gone(records)


def test_sigkilled_session_is_cleaned_by_the_next_session(inner, monkeypatch) -> None:
    pytester, record = inner
    pytester.makepyfile(
        test_dies="""
        import os, signal

        def test_dies(populated):
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    # other tests' sessions starting meanwhile would remove the stale entries
    # before we look: they wait while we hold the lock (this session must not)
    with stale_lock():
        monkeypatch.setenv("NETTRACE_KEEP_STALE", "1")
        pytester.runpytest_subprocess("-p", "no:cacheprovider")
        monkeypatch.delenv("NETTRACE_KEEP_STALE")
        records = _records(record)
        assert len(records) == 2
        left = netns_entries()
        assert all(name in left for name, _, _ in records), "expected the killed session's namespaces to survive it"

    pytester.makepyfile(test_dies="def test_nothing():\n    pass\n")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    _assert_all_gone(records)


def test_cleanup_stale_removes_namespaces_of_a_sigkilled_process() -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from pytest_nettrace.netns import NamespaceFactory
        factory = NamespaceFactory()
        ns = factory.create()
        ns.add_dummy("d0", "10.0.0.1/24")
        daemon = ns.popen(["sleep", "300"])
        print(ns.name, ns.inode, daemon.pid, flush=True)
        time.sleep(300)
        """
    )
    with stale_lock():  # no other session removes it before we do
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        name, inode, daemon = child.stdout.readline().split()
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert name in netns_entries() and _alive(int(daemon))
        removed = remove_stale()
        assert name in removed
    _wait_for(lambda: not _alive(int(daemon)))
    _assert_all_gone([(name, int(inode), int(daemon))])


def test_cleanup_stale_finds_a_dead_sessions_daemons_once_its_entries_are_gone() -> None:
    """A SIGKILLed session's daemon forked twice (its recorded pid long
    gone), and an admin removed the namespace's entry (ip netns del): only
    the session's secret in its environment still names it."""
    script = textwrap.dedent(
        """
        import sys, time
        from pytest_nettrace.netns import NamespaceFactory
        factory = NamespaceFactory()
        ns = factory.create()
        r = ns.run(["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 & echo $!"], check=True)
        print(ns.name, r.stdout.strip(), flush=True)
        time.sleep(300)
        """
    )
    with stale_lock():  # no other session removes it before we do
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        name, daemon = child.stdout.readline().split()
        child.send_signal(signal.SIGKILL)
        child.wait()
        subprocess.run(["ip", "netns", "del", name], check=True)
        assert _alive(int(daemon))
        remove_stale()
    _wait_for(lambda: not _alive(int(daemon)))


def test_cleanup_stale_spares_live_owners(netns) -> None:
    assert netns.name not in cleanup_stale()
    assert netns.name in netns_entries()


def test_report_header_names_the_dummy_strategy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_ok():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.stdout.re_match_lines(
        [r"nettrace: (dummy driver available|no dummy driver loaded, add_dummy\(\) uses a veth stand-in.*)"])


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)

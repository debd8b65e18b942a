"""Item 11: a session leaves nothing in /tmp — passing tests' captures go at
their teardown; a failed test's stays where its report says (until a later
session), or in `--nettrace-report=DIR` for good."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

SUITE = textwrap.dedent('''
    import sys

    PING = [sys.executable, "-c", "import socket\\n"
            "socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', 9))"]

    def test_passes(netns, nettrace):
        netns.run(PING, check=True)
        nettrace.assert_packet(dport=9)

    def test_fails(netns, nettrace):
        netns.run(PING, check=True)
        nettrace.assert_packet(dport=9)
        assert False, "boom"
''')


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    return tmp


def _pcap_paths(out: str) -> list:
    return re.findall(r"pcap:\n\s+(\S+)", out)


def test_passing_run_leaves_nothing_in_tmp(pytester, tmpdir_env):
    pytester.makepyfile(test_sample=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "-k", "passes")
    result.assert_outcomes(passed=1)
    assert os.listdir(tmpdir_env) == []


def test_failed_test_capture_kept_and_printed_passing_removed(pytester, tmpdir_env):
    pytester.makepyfile(test_sample=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    (path,) = _pcap_paths(out)
    assert os.path.isfile(path) and os.path.getsize(path) > 0
    (session,) = os.listdir(tmpdir_env)
    assert os.path.dirname(path) == str(tmpdir_env / session)
    assert sorted(os.listdir(tmpdir_env / session)) == [".owner", os.path.basename(path)], "only the failed test's"
    assert "test_fails" in path
    if subprocess.run(["which", "tcpdump"], capture_output=True).returncode == 0:
        assert "> 127.0.0.1.9: UDP" in subprocess.run(["tcpdump", "-nn", "-r", path], capture_output=True,
                                                       text=True).stdout
    # the next session removes what the ended one left
    again = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "passes")
    again.assert_outcomes(passed=1)
    assert os.listdir(tmpdir_env) == []


def test_report_dir_keeps_them_and_tmp_stays_empty(pytester, tmpdir_env):
    pytester.makepyfile(test_sample=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nettrace-report=out")
    result.assert_outcomes(passed=1, failed=1)
    (path,) = _pcap_paths(result.stdout.str())
    assert os.path.dirname(path) == str(pytester.path / "out") and os.path.isfile(path)
    pcaps = sorted(f for f in os.listdir(pytester.path / "out") if f.endswith(".pcapng"))
    assert len(pcaps) == 2   # the passing test's too: the user asked to keep them
    assert os.listdir(tmpdir_env) == []


def test_stale_directories_of_live_sessions_are_left_alone(tmpdir_env, monkeypatch):
    """A directory goes only when no process holds its owner lock (a pid check
    would remove a live session's seen from another PID namespace)."""
    import fcntl
    from pytest_nettrace.report import captures
    monkeypatch.setattr(captures.tempfile, "tempdir", str(tmpdir_env))
    live = tmpdir_env / "nettrace-1-1"          # its owner's pid as seen from elsewhere means nothing
    dead = tmpdir_env / "nettrace-999999999-1"
    unknown = tmpdir_env / "nettrace-2-2"       # no lock file: not provably ours
    other = tmpdir_env / "nettrace-keepme"
    for d in (live, dead, unknown, other):
        d.mkdir()
        (d / "x.pcapng").write_bytes(b"")
    (dead / captures.OWNER).write_bytes(b"")
    fd = os.open(live / captures.OWNER, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert captures.remove_stale() == [str(dead)]
        assert sorted(os.listdir(tmpdir_env)) == sorted([live.name, unknown.name, other.name])
    finally:
        os.close(fd)
    assert captures.remove_stale() == [str(live)]   # its owner has gone


def test_a_session_in_another_pid_namespace_leaves_ours_alone(pytester, tmpdir_env):
    """`unshare --pid` sees other pids: the owner lock, not the pid, says this
    session's directory is in use."""
    if subprocess.run(["which", "unshare"], capture_output=True).returncode:
        pytest.skip("unshare (util-linux) not installed")
    from pytest_nettrace.report import captures
    held = captures.capture_path("tests/x.py::test_held")  # this process's directory, locked
    with open(held, "wb"):
        pass
    pytester.makepyfile(test_sample="def test_x():\n    pass\n")
    env = dict(os.environ, TMPDIR=os.path.dirname(os.path.dirname(held)))
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "pytest", "-q",
                        "-p", "no:cacheprovider", str(pytester.path)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.path.exists(held), "a session in another PID namespace removed a live one's captures"
    captures.discard(held)


def test_a_test_without_packets_writes_no_capture(pytester, tmpdir_env):
    """Issue 14: reports name the capture a test wrote, and taking the view
    for them writes none (every test used to create and remove an empty
    pcapng)."""
    pytester.makepyfile(test_quiet='''
        def test_fails_quietly(netns, nettrace):
            nettrace.assert_no_rst()
            assert False, "boom"
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "network events" in out and _pcap_paths(out) == []
    # no capture file, so no capture directory either
    assert [f for d, _, files in os.walk(tmpdir_env) for f in files if f.endswith(".pcapng")] == []

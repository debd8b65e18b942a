"""The plugin runs as root on machines shared with other work: it touches only
what it can prove it made, removes all of it even when interrupted, and says
so when it leaves something. Bystanders are real processes in hand-made
namespaces (and in a sandboxed PID namespace where a wrong kill would reach
every process in sight); interruptions are real signals to real sessions.

Run as its own CI stage (ci/test.sh) after the main suite."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
from netns_helpers import netns_entries
from reliability_helpers import alive, run_session, stale_lock

from pytest_nettrace import LeftAlone
from pytest_nettrace.netns import NamespaceFactory, remove_stale

pytestmark = [pytest.mark.host_safety, pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]


def _wait_for(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not met in {timeout} s"
        time.sleep(0.02)


@contextlib.contextmanager
def _ended(session: subprocess.Popen):
    """The session, killed at the end if it is still running (a test that failed midway)."""
    try:
        yield session
    finally:
        if session.poll() is None:
            session.kill()
            session.communicate()


def _start_session(directory, *args: str, env: dict | None = None, prefix: list | None = None) -> subprocess.Popen:
    argv = [*(prefix or []), sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args]
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("PYTEST_XDIST_WORKER", None)
    full_env.pop("PYTEST_ADDOPTS", None)
    return subprocess.Popen(argv, cwd=str(directory), env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


# -- SIGINT / SIGTERM: teardown finishes, daemons ignoring SIGTERM included -------

HANGING_TEST = """
import json, os, time
import pytest

@pytest.fixture
def says_teardown(make_netns):
    yield
    # torn down before make_netns: the namespaces go right after this
    with open(os.environ["NT_RECORD"], "a") as f:
        f.write(json.dumps({{"teardown": 1}}) + "\\n")

def test_hangs_{i}(make_netns, says_teardown):
    ns = make_netns()
    # both ignore SIGTERM (SIG_IGN is inherited across fork and exec)
    daemon = ns.popen(["sh", "-c", "trap '' TERM; sleep 300 & exec sleep 301"])
    while len([p for p in os.listdir("/proc") if p.isdigit() and _in(p, ns.inode)]) < 2:
        time.sleep(0.01)
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _in(p, ns.inode)]
    with open(os.environ["NT_RECORD"], "a") as f:
        f.write(json.dumps({{"ns": ns.name, "pids": pids}}) + "\\n")
    if os.environ["NT_WHEN"] == "call":
        time.sleep(300)

def _in(pid, inode):
    try:
        return os.readlink(f"/proc/{{pid}}/ns/net") == f"net:[{{inode}}]"
    except OSError:
        return False
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("workers, to_group", [(0, False), (2, False), (2, True)],
                         ids=["no-xdist", "xdist-2-controller", "xdist-2-process-group"])
@pytest.mark.parametrize("when", ["call", "teardown"])
def test_signal_to_the_session_removes_namespaces_and_daemons_that_ignore_sigterm(tmp_path, sig, workers, to_group,
                                                                                   when):
    """The signal comes while the tests run, or while their namespaces are
    being removed (the daemons ignore SIGTERM, so that takes a second); to the
    pytest process (the xdist controller) or to its whole process group, as a
    terminal's Ctrl-C or a CI runner would."""
    suite = tmp_path / "suite"
    suite.mkdir()
    tests = max(workers, 1)
    for i in range(tests):
        (suite / f"test_hang_{i}.py").write_text(HANGING_TEST.format(i=i))
    record = tmp_path / "record.jsonl"
    record.touch()
    args = ["-n", str(workers)] if workers else ["-p", "no:xdist"]
    session = _start_session(suite, *args, env={"NT_RECORD": str(record), "NT_WHEN": when})
    with _ended(session):
        lines = tests if when == "call" else 2 * tests
        _wait_for(lambda: len(record.read_text().splitlines()) >= lines, 60, f"every test reached its {when}")
        made = [m for m in map(json.loads, record.read_text().splitlines()) if "ns" in m]
        assert all(len(m["pids"]) == 2 for m in made)
        if to_group:
            os.killpg(session.pid, sig)
        else:
            session.send_signal(sig)
        out, _ = session.communicate(timeout=60)
    assert session.returncode != 0, out
    # Everything was removed before the session exited: nothing to wait for.
    left_entries = [m["ns"] for m in made if m["ns"] in netns_entries()]
    left_pids = [p for m in made for p in m["pids"] if alive(p)]
    for p in left_pids:
        os.kill(p, signal.SIGKILL)
    assert left_entries == [] and left_pids == [], out[-3000:]


SLOW_TEARDOWN = """
import json, os, time
import pytest

@pytest.fixture
def slow_teardown(make_netns):
    yield
    time.sleep(6)   # past execnet's 5 s, within xdist's 10 s
    with open(os.environ["NT_RECORD"], "a") as f:
        f.write(json.dumps({"teardown": 1}) + "\\n")

@pytest.mark.parametrize("i", range(2))
def test_hangs(i, make_netns, slow_teardown):
    ns = make_netns()
    ns.popen(["sleep", "300"])
    with open(os.environ["NT_RECORD"], "a") as f:
        f.write(json.dumps({"ns": ns.name}) + "\\n")
    time.sleep(300)
"""


@pytest.mark.parametrize("sig, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGTERM-controller", "SIGINT-process-group"])
def test_an_xdist_workers_teardown_of_6_s_finishes_after_a_signal(tmp_path, sig, to_group):
    """Under xdist a worker's teardown had less than 5 s: execnet SIGINTs a
    worker still busy 5 s after the controller asked it to exit, which cut
    the teardown the first signal started (a second interrupt), and a
    controller that alone got the signal (`timeout`, a CI runner) let its
    workers learn of it only then. The controller passes the signal on at
    once and a worker takes the repeats as the same interrupt: a 6 s
    teardown finishes, and nothing is left."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_slow.py").write_text(SLOW_TEARDOWN)
    record = tmp_path / "record.jsonl"
    record.touch()
    session = _start_session(suite, "-n", "2", env={"NT_RECORD": str(record)})
    with _ended(session):
        _wait_for(lambda: record.read_text().count('"ns"') >= 2, 60, "both tests running")
        made = [m["ns"] for m in map(json.loads, record.read_text().splitlines())]
        if to_group:
            os.killpg(session.pid, sig)
        else:
            session.send_signal(sig)
        out, _ = session.communicate(timeout=60)
    assert record.read_text().count('"teardown"') == 2, out[-3000:]
    assert [name for name in made if name in netns_entries()] == [], out[-3000:]


HANGING_TEARDOWN = """
import os, time
import pytest

@pytest.fixture
def hangs():
    yield
    open(os.environ["NT_MARK"], "w").close()
    time.sleep(300)

def test_x(hangs):
    pass
"""


def test_a_second_sigint_interrupts_a_teardown_that_hangs(tmp_path):
    mark = tmp_path / "in-teardown"
    (tmp_path / "test_x.py").write_text(HANGING_TEARDOWN)
    session = _start_session(tmp_path, "-p", "no:xdist", env={"NT_MARK": str(mark)})
    with _ended(session):
        _wait_for(mark.exists, 60, "the teardown started")
        session.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):  # the first waits for the teardown
            session.wait(timeout=0.5)
        session.send_signal(signal.SIGINT)
        out, _ = session.communicate(timeout=30)
        assert "KeyboardInterrupt" in out, out


HANGING_AFTER_INTERRUPT = """
import os, time
import pytest

@pytest.fixture
def hangs():
    yield
    open(os.environ["NT_MARK"] + ".teardown", "w").close()
    time.sleep(300)

def test_x(hangs):
    open(os.environ["NT_MARK"] + ".call", "w").close()
    time.sleep(300)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_interrupts_the_teardown_the_first_one_started(tmp_path, sig):
    """The first signal ends the test's call; the teardown it starts hangs:
    the second ends that at once, in one line (it was deferred, and then
    re-raised as a traceback once the teardown was done)."""
    mark = tmp_path / "mark"
    (tmp_path / "test_x.py").write_text(HANGING_AFTER_INTERRUPT)
    session = _start_session(tmp_path, "-p", "no:xdist", env={"NT_MARK": str(mark)})
    with _ended(session):
        _wait_for((tmp_path / "mark.call").exists, 60, "the test runs")
        session.send_signal(sig)
        _wait_for((tmp_path / "mark.teardown").exists, 30, "the teardown started")
        session.send_signal(sig)
        out, _ = session.communicate(timeout=30)
    assert f"nettrace: teardown stopped by signal {sig.name} (again, during teardown)" in out, out
    assert "Traceback" not in out, out


def test_sigkill_of_the_whole_session_is_cleaned_by_the_next_one_sparing_a_process_that_joined(tmp_path):
    """SIGKILL to the process group of an xdist run (controller and workers):
    nothing runs its teardown. The next session removes the namespaces and
    kills the daemons the record names (they ignore SIGTERM), and leaves a
    process another tool put into one of those namespaces, saying so."""
    suite = tmp_path / "suite"
    suite.mkdir()
    for i in range(2):
        (suite / f"test_hang_{i}.py").write_text(HANGING_TEST.format(i=i))
    record = tmp_path / "record.jsonl"
    record.touch()
    session = _start_session(suite, "-n", "2", env={"NT_RECORD": str(record), "NT_WHEN": "call"})
    joined = None
    try:
        _wait_for(lambda: len(record.read_text().splitlines()) >= 2, 60, "every test started its daemons")
        made = [m for m in map(json.loads, record.read_text().splitlines()) if "ns" in m]
        joined = subprocess.Popen(["ip", "netns", "exec", made[0]["ns"], "sleep", "300"])
        _wait_for(lambda: _in_netns_of(joined.pid, f"/run/netns/{made[0]['ns']}") and _comm(joined.pid) == "sleep")
        (tmp_path / "next").mkdir()
        (tmp_path / "next" / "test_ok.py").write_text("def test_ok():\n    pass\n")
        with stale_lock():  # the next session is the one that cleans: others starting meanwhile wait
            os.killpg(session.pid, signal.SIGKILL)
            session.communicate(timeout=30)
            assert all(alive(p) for m in made for p in m["pids"]), "the daemons outlive a SIGKILLed session"
            result = run_session(tmp_path / "next", "-p", "no:xdist", env=_cleans_under_our_lock())
        assert result.returncode == 0, result.stdout
        assert [m["ns"] for m in made if m["ns"] in netns_entries()] == []
        assert [p for m in made for p in m["pids"] if alive(p)] == []
        assert joined.poll() is None
        assert (f"nettrace: stale cleanup: process {joined.pid} (sleep) is in a namespace of a dead session "
                "but not its: left running") in result.stdout, result.stdout
    finally:
        if session.poll() is None:
            os.killpg(session.pid, signal.SIGKILL)
            session.communicate()
        if joined is not None:
            joined.kill()
            joined.wait()


def _cleans_under_our_lock() -> dict:
    """For a session started while the test holds the stale lock: it does the
    cleanup (sessions of other tests wait), so its output tells what it did."""
    return {"NETTRACE_STALE_LOCK_HELD": "1"}


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_sigterm_interrupts_the_session_and_an_inline_run_leaves_that_in_place(pytester):
    from pytest_nettrace import plugin
    assert signal.getsignal(signal.SIGTERM) is plugin._raise_interrupt
    pytester.makepyfile("def test_ok():\n    pass\n")
    pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert signal.getsignal(signal.SIGTERM) is plugin._raise_interrupt


# -- ownership: a name proves nothing; only the session's record does ------------

SANDBOX = ["unshare", "--pid", "--fork", "--mount-proc"]


def _in_netns_of(pid: int, path: str) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/net") == f"net:[{os.stat(path).st_ino}]"
    except OSError:
        return False


def test_stale_cleanup_leaves_hand_made_nt_entries_and_what_runs_in_them():
    # names older versions made, with an owner pid that is dead or not the
    # owner: still not ours, as no record of ours names them
    names = ["nt-999999-12345-1", "nt-1-999-1"]
    bystanders: list = []
    try:
        # held: sessions of older versions on this host must not kill them first
        with stale_lock():
            for name in names:
                subprocess.run(["ip", "netns", "add", name], check=True)
                bystanders.append(subprocess.Popen(["ip", "netns", "exec", name, "sleep", "300"]))
            for name, proc in zip(names, bystanders):
                _wait_for(lambda: _in_netns_of(proc.pid, f"/run/netns/{name}"), what="bystander in its namespace")
            assert not set(names) & set(remove_stale())
            assert [p.poll() for p in bystanders] == [None, None]
            assert set(names) <= netns_entries()
    finally:
        for proc in bystanders:
            proc.kill()
            proc.wait()
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_an_entry_bound_to_the_sandboxs_own_namespace_does_not_get_its_processes_killed(tmp_path):
    # In a PID namespace, so that a wrong kill reaches only the sandbox: there
    # an nt-* entry bound to the namespace everyone runs in would mean every
    # process in sight.
    script = textwrap.dedent("""
        import os, subprocess, sys
        from pytest_nettrace.netns import remove_stale
        path = "/run/netns/" + sys.argv[1]
        bystander = subprocess.Popen(["sleep", "300"])
        open(path, "w").close()
        subprocess.run(["mount", "--bind", "/proc/self/ns/net", path], check=True)
        try:
            remove_stale()
            print("bystander", "alive" if bystander.poll() is None else "killed", flush=True)
        finally:
            subprocess.run(["umount", path])
            os.unlink(path)
            bystander.kill()
        """)
    with stale_lock():  # older versions on this host would remove the entry
        result = subprocess.run([*SANDBOX, sys.executable, "-c", script, f"nt-1-{os.getpid()}-7"],
                                cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert "bystander alive" in result.stdout, result.stdout + result.stderr


HOLDING_TEST = """
import os, time

def test_holds(netns):
    with open(os.environ["NT_READY"], "w") as f:
        f.write(netns.name)
    while not os.path.exists(os.environ["NT_GO"]):
        time.sleep(0.02)
    assert os.stat(netns.path).st_ino == netns.inode, "our namespace was taken away"
"""


def test_sessions_in_different_pid_namespaces_keep_each_others_namespaces(tmp_path):
    """Containers sharing /run/netns: each sees the other's owner pid as dead
    (or as some unrelated process) and must not conclude its entries are stale."""
    go = tmp_path / "go"
    sessions = []
    try:
        for where in ("host", "sandbox"):
            suite = tmp_path / where
            suite.mkdir()
            (suite / "test_hold.py").write_text(HOLDING_TEST)
            ready = tmp_path / f"{where}.ready"
            env = {"NT_READY": str(ready), "NT_GO": str(go)}
            sessions.append(_start_session(suite, "-p", "no:xdist", env=env,
                                           prefix=SANDBOX if where == "sandbox" else None))
            # the second session's start cleans "stale" entries: the first one's is live
            _wait_for(ready.exists, 60, f"{where} session holds a namespace")
        # and a host session starting now must leave the sandbox's alone
        other = tmp_path / "other"
        other.mkdir()
        (other / "test_ok.py").write_text("def test_ok(netns):\n    pass\n")
        assert run_session(other).returncode == 0
        go.touch()
        outs = [s.communicate(timeout=60)[0] for s in sessions]
        assert [s.returncode for s in sessions] == [0, 0], "\n".join(outs)
    finally:
        go.touch()
        for s in sessions:
            if s.poll() is None:
                s.kill()
                s.communicate()


def test_teardown_never_signals_a_pid_reused_after_the_program_exited(tmp_path):
    # In a PID namespace, where ns_last_pid makes the next process get the
    # pid `run()`'s program had: a bystander leading its own process group.
    script = textwrap.dedent("""
        import subprocess
        from pytest_nettrace.netns import NamespaceFactory
        factory = NamespaceFactory()
        ns = factory.create()
        pid = ns.run(["true"]).pid
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
        assert bystander.pid == pid, (bystander.pid, pid)
        factory.close()
        print("bystander", "alive" if bystander.poll() is None else "killed", flush=True)
        bystander.kill()
        """)
    result = subprocess.run([*SANDBOX, sys.executable, "-c", script], cwd=str(tmp_path),
                            capture_output=True, text=True, timeout=60)
    assert "bystander alive" in result.stdout, result.stdout + result.stderr


def test_a_namespace_kept_alive_by_an_fd_or_a_mount_is_reported(tmp_path):
    factory = NamespaceFactory()
    ns = factory.create()
    pin = tmp_path / "pin"
    pin.touch()
    subprocess.run(["mount", "--bind", ns.path, str(pin)], check=True)
    holder = subprocess.Popen(["bash", "-c", f"exec 3<{ns.path}; exec sleep 300"])
    try:
        _wait_for(lambda: _fd_inode(holder.pid, 3) == ns.inode, what="holder has its fd")
        with pytest.warns(LeftAlone) as caught:
            factory.close()
        notes = [str(w.message) for w in caught]
        assert f"a test namespace stays alive: net:[{ns.inode}] held open by process {holder.pid} (sleep)" in notes
        alive = f"a test namespace stays alive: net:[{ns.inode}] mounted on {pin} "
        assert any(n.startswith(alive) for n in notes), notes
        assert ns.name not in netns_entries()
    finally:
        holder.kill()
        holder.wait()
        subprocess.run(["umount", str(pin)])


def _fd_inode(pid: int, fd: int):
    try:
        return os.stat(f"/proc/{pid}/fd/{fd}").st_ino
    except OSError:
        return None


STALE_MAKER = """
import time
from pytest_nettrace.netns import NamespaceFactory
factory = NamespaceFactory()
names = [factory.create().name for _ in range(3)]
print(*names, flush=True)
time.sleep(300)
"""


def test_unremovable_hand_made_entries_never_stop_the_cleanup():
    # A directory and a doubly mounted entry at names older versions took for
    # theirs (they crashed on them: IsADirectoryError, EBUSY). Made only while
    # the stale lock is held: sessions of older versions on this host wait.
    directory, doubled = "/run/netns/nt-1-2-3", "/run/netns/nt-1-2-4"
    with stale_lock():
        os.mkdir(directory)
        try:
            subprocess.run(["ip", "netns", "add", os.path.basename(doubled)], check=True)
            subprocess.run(["mount", "--bind", doubled, doubled], check=True)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # nothing to say either: they are not ours
                remove_stale()
            assert os.path.isdir(directory) and os.path.ismount(doubled)
        finally:
            os.rmdir(directory)
            while subprocess.run(["umount", doubled], capture_output=True).returncode == 0:
                pass
            subprocess.run(["ip", "netns", "del", os.path.basename(doubled)], capture_output=True)


def test_recorded_entries_replaced_since_are_reported_one_by_one_and_the_session_goes_on(tmp_path):
    other_ns = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    try:
        with stale_lock():  # other sessions starting meanwhile must not clean first
            child = subprocess.Popen([sys.executable, "-c", STALE_MAKER], stdout=subprocess.PIPE, text=True)
            replaced, turned_dir, plain = child.stdout.readline().split()
            child.kill()
            child.wait()
            # one entry gets another namespace mounted over it, one becomes a directory
            _wait_for(lambda: os.readlink(f"/proc/{other_ns.pid}/ns/net") != os.readlink("/proc/self/ns/net"))
            subprocess.run(["mount", "--bind", f"/proc/{other_ns.pid}/ns/net", f"/run/netns/{replaced}"], check=True)
            subprocess.run(["umount", f"/run/netns/{turned_dir}"], check=True)
            os.unlink(f"/run/netns/{turned_dir}")
            os.mkdir(f"/run/netns/{turned_dir}")
            with pytest.warns(LeftAlone) as caught:
                removed = remove_stale()
        notes = [str(w.message) for w in caught]
        assert removed == [plain]
        assert any(n.startswith(f"/run/netns/{replaced} is now another namespace") for n in notes), notes
        assert any(n.startswith(f"/run/netns/{turned_dir} is not a namespace mount") for n in notes), notes
        assert other_ns.poll() is None
        (tmp_path / "test_ok.py").write_text("def test_ok(netns):\n    pass\n")
        result = run_session(tmp_path)
        assert result.returncode == 0 and "INTERNALERROR" not in result.stdout, result.stdout
    finally:
        other_ns.kill()
        other_ns.wait()
        for name in locals().get("replaced", None), locals().get("turned_dir", None):
            if name:
                while subprocess.run(["umount", f"/run/netns/{name}"], capture_output=True).returncode == 0:
                    pass
                subprocess.run(["rm", "-rf", f"/run/netns/{name}"], capture_output=True)


def test_a_session_says_what_its_stale_cleanup_left_in_one_line_even_under_w_error(tmp_path):
    other_ns = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    name = None
    try:
        with stale_lock():
            child = subprocess.Popen([sys.executable, "-c", STALE_MAKER], stdout=subprocess.PIPE, text=True)
            name = child.stdout.readline().split()[0]
            child.kill()
            child.wait()
            _wait_for(lambda: os.readlink(f"/proc/{other_ns.pid}/ns/net") != os.readlink("/proc/self/ns/net"))
            subprocess.run(["mount", "--bind", f"/proc/{other_ns.pid}/ns/net", f"/run/netns/{name}"], check=True)
            (tmp_path / "test_ok.py").write_text("def test_ok(netns):\n    pass\n")
            result = run_session(tmp_path, "-W", "error", "-p", "no:xdist", env=_cleans_under_our_lock())
        assert result.returncode == 0, result.stdout + result.stderr
        notes = [ln for ln in result.stdout.splitlines() if ln.startswith("nettrace: stale cleanup: ")]
        assert f"nettrace: stale cleanup: /run/netns/{name} is now another namespace" in "\n".join(notes), \
            result.stdout
        assert other_ns.poll() is None
    finally:
        other_ns.kill()
        other_ns.wait()
        if name:
            while subprocess.run(["umount", f"/run/netns/{name}"], capture_output=True).returncode == 0:
                pass
            subprocess.run(["rm", "-f", f"/run/netns/{name}"], capture_output=True)


# -- ci/setup.sh: the service blocker never outlives it ---------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_setup_sh_interrupted_during_apt_install_removes_policy_rc_d(tmp_path, sig):
    # A copy of ci/setup.sh wanting a package that is not installed, a fake
    # apt-get that hangs in `install`, and a private mount namespace whose
    # /usr/sbin is a scratch directory: the host's never sees the blocker.
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "setup.sh").write_text(open(os.path.join(REPO, "ci", "setup.sh")).read())
    (tmp_path / "ci" / "apt-packages.txt").write_text("nettrace-no-such-package\n")
    fake_bin, sbin = tmp_path / "bin", tmp_path / "sbin"
    fake_bin.mkdir()
    sbin.mkdir()
    started = tmp_path / "install-started"
    (fake_bin / "apt-get").write_text(f"#!/bin/sh\n[ \"$1\" = update ] && exit 0\ntouch {started}\nexec sleep 300\n")
    (fake_bin / "apt-get").chmod(0o755)
    script = f'mount --bind {sbin} /usr/sbin && exec bash {tmp_path}/ci/setup.sh'
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(started.exists, 30, "apt-get install started")
        assert (sbin / "policy-rc.d").exists()  # the blocker is in place meanwhile
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C or a CI runner does
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode != 0
    assert not (sbin / "policy-rc.d").exists(), out


# -- --nettrace-report: never written through a planted link; owner-only files ----

REPORTED_TEST = """
import socket

def test_x(make_netns, nettrace):
    a, b = make_netns(), make_netns()
    a.add_veth("v0", b, "v1", ["10.9.0.1/24"], ["10.9.0.2/24"])
    srv = b.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("10.9.0.2", 9999))
    cli = a.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(50):  # once in ~3 runs the first datagram was not in the capture (not investigated here)
        cli.sendto(b"SUPERSECRET-TOKEN-123", ("10.9.0.2", 9999))
        srv.recv(100)
        if nettrace.packets(proto="udp", dport=9999):
            break
    nettrace.assert_packet(proto="udp", dport=9999)
"""

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def test_report_files_replace_a_link_planted_by_an_unprivileged_user_and_are_owner_only(tmp_path):
    shared = tmp_path / "shared"  # as on a CI runner: a directory a user may write in
    shared.mkdir()
    modes, base = {}, str(tmp_path)
    while base != "/":  # nobody must reach it (search permission only)
        modes[base] = os.stat(base).st_mode
        os.chmod(base, modes[base] | 0o001)
        base = os.path.dirname(base)
    try:
        _planted_links_are_replaced(tmp_path, shared)
    finally:
        for path, mode in modes.items():
            os.chmod(path, mode)


def _planted_links_are_replaced(tmp_path, shared):
    from pytest_nettrace.report.section import file_stem

    victim = shared / "victim.conf"
    victim.write_text("precious\n")
    out = shared / "out"
    out.mkdir()
    os.chown(out, 65534, 65534)
    stem = file_stem("test_x.py::test_x")
    for ext in (".jsonl", ".pcapng"):
        subprocess.run([*NOBODY, "ln", "-s", str(victim), str(out / (stem + ext))], check=True)
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_x.py").write_text(REPORTED_TEST)
    result = run_session(suite, f"--nettrace-report={out}")
    assert result.returncode == 0, result.stdout
    assert victim.read_text() == "precious\n"
    for ext in (".jsonl", ".pcapng"):
        st = os.lstat(out / (stem + ext))
        assert stat_is_private_file(st), (ext, oct(st.st_mode))
    assert b"SUPERSECRET-TOKEN-123" in (out / (stem + ".pcapng")).read_bytes()
    assert [f for f in os.listdir(out) if f.startswith(".nettrace-")] == []  # no temporary left


def stat_is_private_file(st) -> bool:
    import stat
    return stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0


def test_report_dir_it_creates_is_0700_and_the_mode_option_relaxes_it(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_x.py").write_text(REPORTED_TEST)
    assert run_session(suite, "--nettrace-report=private").returncode == 0
    assert oct(os.stat(suite / "private").st_mode & 0o777) == "0o700"
    assert {oct(os.stat(f).st_mode & 0o777) for f in (suite / "private").iterdir()} == {"0o600"}
    assert run_session(suite, "--nettrace-report=shared", "--nettrace-report-mode=0644").returncode == 0
    assert oct(os.stat(suite / "shared").st_mode & 0o777) == "0o755"
    assert {oct(os.stat(f).st_mode & 0o777) for f in (suite / "shared").iterdir()} == {"0o644"}


@pytest.mark.parametrize("args, message", [
    (["--nettrace-report=afile"], "ERROR: --nettrace-report=*/afile: exists and is not a directory"),
    (["--nettrace-report=out", "--nettrace-report-mode=rw"], "ERROR: --nettrace-report-mode=rw: not a file mode*"),
])
def test_report_options_bad_input_is_a_one_line_usage_error(tmp_path, args, message):
    (tmp_path / "afile").write_text("")
    (tmp_path / "test_ok.py").write_text("def test_ok():\n    pass\n")
    result = run_session(tmp_path, *args)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "INTERNALERROR" not in result.stdout + result.stderr
    import fnmatch
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and fnmatch.fnmatch(errors[0], message), result.stderr

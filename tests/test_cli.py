"""`nettrace watch` / `nettrace capabilities` (issue 6), run as real
subprocesses against namespaces made with `ip netns add`."""
from __future__ import annotations

import itertools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import List

import pytest

from pytest_nettrace.probes.registry import kinds

NETTRACE = [sys.executable, "-m", "pytest_nettrace"]
_names = itertools.count()


class Lines:
    """A pipe read line by line in the background, so a test can wait for a line."""

    def __init__(self, stream) -> None:
        self.lines: List[str] = []
        self._q: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._q.put(line)

    def wait_for(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        for line in self.lines:
            if text in line:
                return line
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=0.1)
            except queue.Empty:
                continue
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} within {timeout}s; got: {self.lines}")

    def rest(self) -> str:
        time.sleep(0.2)
        while not self._q.empty():
            self.lines.append(self._q.get())
        return "".join(self.lines)


@pytest.fixture
def ipnetns():
    """A namespace made the way a user would (`ip netns add`), with a veth and 10.8.0.1/24."""
    name = f"ntcli-{os.getpid()}-{next(_names)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
        subprocess.run(["ip", "-n", name, "addr", "add", "10.8.0.1/24", "dev", "v0"], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "v0", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def start_watch(*args: str):
    proc = subprocess.Popen(NETTRACE + ["watch", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    try:
        # a bound, not a timing: attaching under emulation (ci/vm-test, TCG) takes tens of seconds
        err.wait_for("Ctrl-C to stop", timeout=180)
    except AssertionError:
        proc.kill()
        raise
    return proc, out, err


def stop(proc, err: Lines, sig: int = signal.SIGINT) -> str:
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0
    text = err.rest()
    assert "Traceback" not in text
    return text


def test_watch_shows_a_deletion_by_another_process_and_stops_on_sigint(ipnetns):
    proc, out, err = start_watch("--netns", ipnetns)
    try:
        assert f"watching {ipnetns} (" in err.lines[0]
        ip = subprocess.Popen(["ip", "-n", ipnetns, "addr", "del", "10.8.0.1/24", "dev", "v0"])
        assert ip.wait(5) == 0
        line = out.wait_for("deleted IPv4 10.8.0.1/24 from v0")
    finally:
        text = stop(proc, err)
    assert line.startswith(time.strftime("%a "))  # the seed's style: `Tue 08:01:30.963 ip(19838) uid 0 ...`
    assert f" ip({ip.pid}) uid 0 [parent " in line
    assert f"(netns {ipnetns}) via netlink: \"ip -n {ipnetns} addr del 10.8.0.1/24 dev v0\"" in line
    assert "stopped (SIGINT)" in text


def test_watch_json_by_pid_with_kind_filter_stops_on_sigterm(ipnetns):
    holder = subprocess.Popen(["ip", "netns", "exec", ipnetns, "sleep", "30"])
    try:
        time.sleep(0.2)  # until `ip netns exec` has entered the namespace
        proc, out, err = start_watch("--json", "--netns", str(holder.pid), "addr:deleted")
        try:
            subprocess.run(["ip", "-n", ipnetns, "addr", "add", "10.8.0.2/24", "dev", "v0"], check=True)
            subprocess.run(["ip", "-n", ipnetns, "addr", "del", "10.8.0.2/24", "dev", "v0"], check=True)
            row = json.loads(out.wait_for('"10.8.0.2/24"'))
        finally:
            text = stop(proc, err, signal.SIGTERM)
    finally:
        holder.kill()
        holder.wait()
    assert row["kind"] == "addr" and row["action"] == "deleted" and row["comm"] == "ip"
    assert row["cmdline"] == f"ip -n {ipnetns} addr del 10.8.0.2/24 dev v0"
    assert all(json.loads(line)["action"] == "deleted" for line in out.lines)  # the filter held
    assert "stopped (SIGTERM)" in text


def test_watch_says_where_its_capture_goes_as_it_makes_it(ipnetns):
    """The capture outlives the watch, which names it when it stops; a
    watch SIGKILLed never stops, so the path is said as the file is made."""
    subprocess.run(["ip", "-n", ipnetns, "link", "set", "lo", "up"], check=True)
    proc, out, err = start_watch("--netns", ipnetns, "packet")
    try:
        subprocess.run(["ip", "netns", "exec", ipnetns, sys.executable, "-c",
                        "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', "
                        "('10.8.0.1', 9))"], check=True)
        line = err.wait_for("writing packets to ")
        path = line.split("writing packets to ", 1)[1].strip()
        assert re.fullmatch(r".*/nettrace-watch-[^/]+/watch\.pcapng", path), path
    finally:
        proc.kill()   # as SIGKILL: no end to say it at
        proc.wait()
    try:
        assert os.path.exists(path)
    finally:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def test_watch_shows_an_accept_once_with_the_process_that_accepted(ipnetns):
    """The handshake completes in softirq; the task is known when accept()
    returns, 100 ms later here: one line, naming the server, not the
    softirq's line and then its correction."""
    server = textwrap.dedent("""
        import socket, time
        s = socket.socket(); s.bind(("10.8.0.1", 8123)); s.listen()
        c = socket.create_connection(("10.8.0.1", 8123))
        time.sleep(0.1)
        a, _ = s.accept()
        a.close(); c.close()
    """)
    subprocess.run(["ip", "-n", ipnetns, "link", "set", "lo", "up"], check=True)   # local traffic
    proc, out, err = start_watch("--netns", ipnetns, "conn:accept")
    try:
        py = subprocess.Popen(["ip", "netns", "exec", ipnetns, sys.executable, "-c", server])
        assert py.wait(10) == 0
        line = out.wait_for("accept 10.8.0.1:8123 from")
    finally:
        stop(proc, err)
    assert f"({py.pid}) uid 0" in line, line   # the server's task, not <softirq>
    assert sum("accept 10.8.0.1:8123" in ln for ln in out.lines) == 1, out.lines


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
@pytest.mark.parametrize("command", ["watch", "capabilities"])
def test_not_root_is_one_clear_line(command):
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *NETTRACE, command],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"nettrace: {command} needs root (or CAP_BPF and CAP_PERFMON)")


def test_bad_arguments_are_one_line_usage_errors():
    r = subprocess.run(NETTRACE + ["watch", "rts"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr == (f"nettrace: unknown event kind 'rts'; "
                                              f"valid kinds: {', '.join(sorted(kinds()))}\n")
    r = subprocess.run(NETTRACE + ["watch", "--netns", "no-such-ns-here"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "no network namespace 'no-such-ns-here'" in r.stderr
    assert "Traceback" not in r.stderr


def test_capabilities_lists_features_and_mechanisms():
    r = subprocess.run(NETTRACE + ["capabilities"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"kernel {os.uname().release}: btf yes, ringbuf yes")
    assert "probes: " in r.stdout and "rst=" in r.stdout
    assert re.search(r"^  rst: \S+; kinds: rst$", r.stdout, re.M), r.stdout
    assert re.search(r"^  netchange: \S+; kinds: addr, link, neigh, nexthop, nft, route, rule$", r.stdout, re.M)


def test_console_script_is_declared():
    script = shutil.which("nettrace", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the package is not installed with its console script in this environment")
    r = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "watch" in r.stdout and "capabilities" in r.stdout

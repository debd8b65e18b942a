"""Reliability under load (issue 8): nothing leaks, the host is untouched,
parallel workers see only their own events, negative assertions never pass
when events were lost, and bad input gets a one-line error.

Generated suites run as subprocesses; `--nettrace-long` makes them bigger.
"""
from __future__ import annotations

import json
import os
import re
import sys

import pytest

from pytest_nettrace.sequence import forbid
from netns_helpers import netns_entries, pids_left_in
from reliability_helpers import alive, bpf_link_ids, outcome_counts, run_session, stable_host_state

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


@pytest.fixture
def long_run(request) -> bool:
    return bool(request.config.getoption("--nettrace-long", default=False))


# ---------------------------------------------------------------------------
# Leaks and the host: a generated suite under -n 2 where tests pass, fail,
# raise in setup or in the call, and one SIGKILLs its xdist worker.

LEAK_CONFTEST = '''
import os
import socket
import pytest

RECORD = os.environ["NT_RECORD"]


def record(line):
    with open(RECORD, "a") as f:
        f.write(line + "\\n")


def link_ids():
    ids = set()
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            with open(f"/proc/self/fdinfo/{fd}") as f:
                ids.update(int(l.split()[1]) for l in f if l.startswith("link_id:"))
        except OSError:
            pass
    return ids


def pytest_sessionstart(session):
    record(f"pid {os.getpid()}")


@pytest.fixture
def populated(make_netns, nettrace):
    a, b = make_netns(), make_netns()
    a.add_veth("v0", b, "v1", ["10.0.0.1/24", "fd00::1/64"], ["10.0.0.2/24", "fd00::2/64"])
    a.add_dummy("d0", "10.1.0.1/24")
    for ns in (a, b):
        record(f"ns {ns.name} {ns.inode} {ns.popen(['sleep', '300']).pid}")
    for link in link_ids():
        record(f"link {link}")
    s = a.socket()
    try:
        s.connect(("10.0.0.2", 9))  # a RST: the probes have work to do
    except OSError:
        pass
    s.close()
    return a, b


@pytest.fixture
def broken(populated):
    raise RuntimeError("setup goes wrong after creating namespaces")
'''

LEAK_TESTS = '''
import os
import signal
import pytest

N = int(os.environ["NT_N"])
KILLER = int(os.environ["NT_KILLER"])


@pytest.mark.parametrize("i", [i for i in range(N) if i % 10 < 6 and i != KILLER])
def test_passes(i, populated, nettrace):
    nettrace.assert_rst(direction="sent", sport=9)


@pytest.mark.parametrize("i", [i for i in range(N) if i % 10 in (6, 7)])
def test_fails(i, populated):
    assert False, "deliberate"


@pytest.mark.parametrize("i", [i for i in range(N) if i % 10 == 8])
def test_setup_error(i, broken):
    pass


@pytest.mark.parametrize("i", [i for i in range(N) if i % 10 == 9])
def test_call_raises(i, populated):
    raise OSError("boom")


def test_worker_killed(populated):
    os.kill(os.getpid(), signal.SIGKILL)
'''


def _leak_records(path):
    pids, namespaces, links = set(), [], set()
    for line in path.read_text().splitlines():
        what, *rest = line.split()
        if what == "pid":
            pids.add(int(rest[0]))
        elif what == "ns":
            namespaces.append((rest[0], int(rest[1]), int(rest[2])))
        elif what == "link":
            links.add(int(rest[0]))
    return pids, namespaces, links


def _settled(probe, timeout: float = 5.0):
    """probe()'s value once falsy, or its last value after `timeout` (killed
    processes take a moment to leave their namespace, more on a loaded machine)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if not value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def _describe(in_ns: dict, namespaces) -> list:
    names = {inode: name for name, inode, _ in namespaces}
    out = []
    for inode, pids in in_ns.items():
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(") ", 1)[1].split()[:2]
            except OSError:
                cmd, state = "?", "?"
            out.append(f"{names[inode]}: pid {pid} {cmd!r} state/ppid {state}")
    return out


def test_no_leak_and_host_untouched_after_failures_setup_errors_and_a_sigkilled_worker(tmp_path, long_run):
    n = 200 if long_run else 40
    killer = 3  # a would-be passing test
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(LEAK_CONFTEST)
    (suite / "test_leaks.py").write_text(LEAK_TESTS)
    record = tmp_path / "record.txt"
    record.touch()
    env = {"NT_RECORD": str(record), "NT_N": str(n), "NT_KILLER": str(killer)}

    host_before = stable_host_state()
    links_before = bpf_link_ids()
    first = run_session(suite, "-n", "2", "-q", env=env)
    # the next session removes what the killed worker left (or another
    # test's session starting meanwhile does: all must be gone either way)
    (suite / "test_leaks.py").write_text("def test_nothing():\n    pass\n")
    second = run_session(suite, "-q", env=env)
    out = first.stdout + first.stderr

    expected = {
        "passed": sum(1 for i in range(n) if i % 10 < 6 and i != killer),
        "failed": sum(1 for i in range(n) if i % 10 in (6, 7, 9)) + 1,  # + the killed worker's test
        "errors": sum(1 for i in range(n) if i % 10 == 8),
    }
    counts = outcome_counts(out)
    assert {k: counts.get(k, 0) for k in expected} == expected, out[-3000:]
    assert "worker_killed" in out and ("crashed" in out or "node down" in out), out[-3000:]
    assert outcome_counts(second.stdout).get("passed") == 1, second.stdout[-2000:]

    pids, namespaces, links = _leak_records(record)
    assert len({name for name, _, _ in namespaces}) == len(namespaces) == 2 * n, len(namespaces)
    left = netns_entries()
    leaked = [name for name, _, _ in namespaces if name in left]
    assert not leaked, f"{len(leaked)} namespaces left in /run/netns: {leaked[:5]}"
    in_ns = _settled(lambda: {inode: pids for name, inode, _ in namespaces if (pids := pids_left_in(name, inode))})
    assert not in_ns, f"processes left in our namespaces: {_describe(in_ns, namespaces)}"
    daemons = _settled(lambda: [d for _, _, d in namespaces if alive(d)])
    assert not daemons, f"daemons still running: {daemons[:5]}"
    assert len(pids) >= 4, pids  # 2 sessions' main processes + at least 2 workers
    assert not [p for p in pids if alive(p)], "a session or worker process outlived its session"
    assert links, "the workers recorded no BPF link"
    links_after = bpf_link_ids()
    assert not links & links_after, f"BPF links of the generated sessions remain: {sorted(links & links_after)}"
    # (machine-wide count, for the record: other test runs attach and detach concurrently)
    print(f"bpftool link show: {len(links_before)} before, {len(links_after)} after; "
          f"the sessions held {len(links)}")
    assert stable_host_state() == host_before, "the host's links, addresses or routes changed"


# ---------------------------------------------------------------------------
# Isolation: 4 xdist workers generating RSTs (IPv4 and IPv6, loopback and
# across a veth) and address changes at the same time; each test must see
# exactly its own events and nothing of the others'.

ISOLATION_TESTS = '''
import json, os, socket, time
import pytest

BARRIER = os.environ["NT_BARRIER"]
WORKERS = int(os.environ["NT_WORKERS"])
SECONDS = float(os.environ["NT_SECONDS"])


def wait_for_all_workers():
    open(os.path.join(BARRIER, os.environ["PYTEST_XDIST_WORKER"]), "w").close()
    deadline = time.monotonic() + 30
    while len(os.listdir(BARRIER)) < WORKERS:
        assert time.monotonic() < deadline, "the other workers never started"
        time.sleep(0.01)


def refused(ns, family, source, host, own_ports):
    s = ns.socket(family)
    s.bind((source, 0))
    own_ports.add(s.getsockname()[1])
    try:
        s.connect((host, 9))
    except ConnectionRefusedError:
        pass
    else:
        raise AssertionError("port 9 answered")
    finally:
        s.close()


@pytest.mark.parametrize("i", range(2 * WORKERS))
def test_own_events_only(i, make_netns, nettrace):
    a, b = make_netns(), make_netns()
    a.add_veth("eth0", b, "eth0", [f"10.{i}.0.1/24", f"fd{i:02x}::1/64"], [f"10.{i}.0.2/24", f"fd{i:02x}::2/64"])
    a.add_dummy("d0", f"10.{i}.9.1/24")
    nettrace.address_changes()  # setup's own changes are read (and ignored) now
    setup_addr = len(nettrace.address_changes())
    wait_for_all_workers()
    own_ports, n, changes = set(), 0, 0
    start = time.time()
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        refused(a, socket.AF_INET, "127.0.0.1", "127.0.0.1", own_ports)           # in a, over loopback
        refused(b, socket.AF_INET6, f"fd{i:02x}::2", f"fd{i:02x}::1", own_ports)       # b -> a over the veth
        n += 1
        addr = f"10.{i}.9.{2 + n % 250}/24"
        a.add_address("d0", addr)
        a.del_address("d0", addr)
        changes += 1
    end = time.time()
    with open(os.path.join(BARRIER, "..", "intervals"), "a") as f:
        f.write(json.dumps([os.environ["PYTEST_XDIST_WORKER"], i, start, end]) + "\\n")
    own_ns = {a.inode, b.inode}
    assert nettrace.lost("rst") == 0 and nettrace.lost("addr") == 0
    every = nettrace.events()
    assert {e.netns for e in every} <= own_ns, "events from a foreign namespace"
    sent = nettrace.rst(direction="sent")
    received = nettrace.rst(direction="received")
    assert len(sent) == 2 * n, (len(sent), n)
    assert len(received) == 2 * n, (len(received), n)
    assert {e.dport for e in sent} == own_ports
    assert {e.sport for e in received} == {9}
    assert {str(e.daddr) for e in sent} == {"127.0.0.1", f"fd{i:02x}::2"}
    looped = lambda a: a is not None and a.version == 4 and str(a.ip) != f"10.{i}.9.1"  # not setup's
    added = nettrace.address_changes(action="added", dev="d0", address=looped)
    deleted = nettrace.address_changes(action="deleted", dev="d0", address=looped)
    assert len(added) == len(deleted) == changes, (len(added), len(deleted), changes)
    assert all(str(e.address).startswith(f"10.{i}.9.") for e in added + deleted)
    assert all(str(e.address.ip).startswith((f"10.{i}.", f"fd{i:02x}:", "fe80:"))
               for e in nettrace.address_changes() if e.address is not None)
    assert {e.pid for e in added + deleted} == {os.getpid()}
    assert {e.netns for e in added + deleted} == {a.inode}
'''


def test_four_workers_each_see_exactly_their_own_events(tmp_path, long_run):
    workers = 4
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_isolation4.py").write_text(ISOLATION_TESTS)
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = {"NT_BARRIER": str(barrier), "NT_WORKERS": str(workers), "NT_SECONDS": "3.0" if long_run else "0.8"}
    result = run_session(suite, "-n", str(workers), "-q", env=env)
    out = result.stdout + result.stderr
    assert outcome_counts(out) == {"passed": 2 * workers}, out[-4000:]
    # the generation phases really overlapped: each worker's first test ran
    # while the others' first tests ran (they met at a barrier)
    intervals = [json.loads(line) for line in (tmp_path / "intervals").read_text().splitlines()]
    firsts: dict = {}
    for worker, _, start, end in sorted(intervals, key=lambda x: x[2]):
        firsts.setdefault(worker, (start, end))
    assert len(firsts) == workers, firsts
    common = min(e for s, e in firsts.values()) - max(s for s, e in firsts.values())
    assert common > 0, f"the workers' first tests did not run at the same time: {firsts}"


# ---------------------------------------------------------------------------
# Soundness: with a one-page ring that nobody drains during a flood, every
# negative assertion fails and names the loss; none may pass.

FLOOD = r"""
import socket, struct, sys, time
# RSTs (and drops, syscalls): connects to a closed port
for _ in range(60):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", 9))
    except OSError:
        pass
    s.close()
# connections: accepted, established, closed
lst = socket.socket()
lst.bind(("127.0.0.1", 0))
lst.listen(64)
for _ in range(10):
    c = socket.create_connection(lst.getsockname())
    a, _ = lst.accept()
    c.close()
    a.close()
print("ok")
"""

# A call that matches nothing that happened, per negative assertion
# (unknown ones, added later by other probes, are called without arguments).
MATCH_NOTHING = {
    "assert_no_rst": {"dport": 4242},
    "assert_address_not_deleted": {"address": "192.0.2.99"},
    "assert_no_drops": {"dport": 4242},
    "assert_no_retransmits": {"dport": 4242},
    "assert_no_syscall": {"pid": -1},
}
# Kinds the flood below must make the kernel lose (the rest: reported, not required).
REQUIRED_LOSS = {"rst", "addr", "link", "route", "conn", "drop", "syscall", "retransmit"}


def _negative_assertions():
    from pytest_nettrace.trace import Trace
    return sorted(n for n in dir(Trace) if n != "assert_none" and n.startswith("assert_")
                  and (n.startswith("assert_no_") or "_not_" in n))


def _retransmit_flood(a, b):
    """Established connection a -> b, then b loses its address (it drops what
    arrives; a link down would fail the transmit, which is no retransmission)."""
    import socket as _s
    lst = b.socket(_s.AF_INET)
    lst.bind(("10.77.0.2", 0))
    lst.listen(4)
    c = a.socket(_s.AF_INET)
    c.connect(lst.getsockname())
    peer, _ = lst.accept()
    b.del_address("eth0", "10.77.0.2/24")
    c.setblocking(False)
    try:
        c.send(b"x" * 1000)
    except OSError:
        pass
    return [c, peer, lst]


def test_tiny_ring_flood_makes_every_negative_assertion_fail_with_the_loss_count(make_netns):
    import time

    from pytest_nettrace import EventsLost
    from pytest_nettrace.kernel.engine import Engine
    from pytest_nettrace.probes.registry import all_probes
    from pytest_nettrace.probes.registry import kinds
    from pytest_nettrace.trace import Trace

    a, b = make_netns(), make_netns()
    a.add_veth("eth0", b, "eth0", ["10.77.0.1/24"], ["10.77.0.2/24"])
    engine = Engine(probes=all_probes(), ringbuf_size=4096, background=False)
    keep = []
    try:
        trace = Trace(engine, "tiny ring")
        trace.watch(a)
        trace.watch(b)
        # nothing drains from here on until the first assertion
        assert a.run([sys.executable, "-c", FLOOD], check=True).stdout.strip() == "ok"
        a.add_dummy("d0", "10.78.0.1/24")
        a.add_address("d0", "10.78.0.2/24")
        a.del_address("d0", "10.78.0.2/24")
        a.set_down("d0")
        a.set_up("d0")
        a.run(["ip", "route", "add", "10.79.0.0/24", "dev", "d0"], check=True)
        a.run(["ip", "route", "del", "10.79.0.0/24", "dev", "d0"], check=True)
        keep = _retransmit_flood(a, b)
        time.sleep(0.6)  # retransmission timer (>= 200 ms)
        lost = {kind: trace.lost(kind) for kind in kinds()}
        missing = sorted(k for k in REQUIRED_LOSS & set(kinds()) if not lost[k])
        assert not missing, f"the flood made no {missing} events get lost: {lost}"
        passed, wrong = [], []
        for kind, n in lost.items():
            if not n:
                continue
            try:
                trace.assert_none(kind, pid=-1)
            except EventsLost as e:
                # (retransmission timers and drops go on: the count may have grown since)
                m = re.search(rf"\b(\d+) {kind} events lost", str(e))
                if not m or int(m.group(1)) < n:
                    wrong.append(f"assert_none({kind!r}): {str(e).splitlines()[0]}")
            except AssertionError as e:
                wrong.append(f"assert_none({kind!r}) failed without naming the loss: {str(e).splitlines()[0]}")
            else:
                passed.append(f"assert_none({kind!r}) with {n} {kind} events lost")
        for name in _negative_assertions():
            kwargs = MATCH_NOTHING.get(name, {})
            try:
                getattr(trace, name)(**kwargs)
            except AssertionError as e:
                if "lost" not in str(e) or not re.search(r"\d+", str(e)):
                    wrong.append(f"{name}: {str(e).splitlines()[0]}")
            else:
                passed.append(f"{name}({kwargs})")
        assert not passed, f"passed although events were lost ({lost}): {passed}"
        assert not wrong, f"failed without the loss count: {wrong}"
        trace.close()
    finally:
        for s in keep:
            s.close()
        engine.close()


INI_SUITE = '''
import socket
import pytest
from pytest_nettrace import EventsLost


def test_ring_size_from_ini(nettrace):
    assert nettrace.engine.ringbuf_size == 4096


def test_flood_then_assert_no_rst(netns, nettrace):
    with nettrace.engine._lock:  # the drain thread waits: the one page fills
        for _ in range(100):
            s = netns.socket()
            try:
                s.connect(("127.0.0.1", 9))
            except OSError:
                pass
            s.close()
    nettrace.assert_no_rst(dport=4242)
'''


def test_tiny_ring_from_ini_fails_the_negative_assertion(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "pytest.ini").write_text("[pytest]\nnettrace_ringbuf_size = 4096\n")
    (suite / "test_tiny.py").write_text(INI_SUITE)
    result = run_session(suite, "-q", "-p", "no:xdist")
    out = result.stdout + result.stderr
    assert outcome_counts(out) == {"passed": 1, "failed": 1}, out[-3000:]
    assert "test_flood_then_assert_no_rst" in out and "rst events lost" in out, out[-3000:]


@pytest.mark.parametrize("size", ["4294967296", "8589934592"])
def test_a_ring_size_the_kernel_refuses_is_a_usage_error_before_any_test(tmp_path, size):
    # a power of two, so only the kernel can say no; with a gate, every test
    # skipping (the old outcome) would have checked nothing and exited 0
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "pytest.ini").write_text(f"[pytest]\nnettrace_ringbuf_size = {size}\nnettrace_forbid = addr:deleted\n")
    (suite / "test_x.py").write_text("def test_x(nettrace):\n    pass\n")
    result = run_session(suite, "-q", "-p", "no:xdist")
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("ERROR")]
    assert result.returncode == 4, result.stdout + result.stderr
    assert len(errors) == 1 and errors[0].startswith(f"ERROR: nettrace_ringbuf_size = {size}: "), result.stderr
    assert "INTERNALERROR" not in result.stderr and "test_x" not in result.stdout


def test_ring_size_probe_takes_what_the_kernel_takes():
    from pytest_nettrace.kernel.engine import ring_size_refused
    assert ring_size_refused(4096) is None and ring_size_refused(8 << 20) is None


def test_garbage_btf_is_named_in_libbpf_words(tmp_path):
    from pytest_nettrace.kernel.engine import Engine
    from pytest_nettrace.probes.registry import all_probes
    from pytest_nettrace.errors import UnsupportedKernel
    garbage = tmp_path / "vmlinux"
    garbage.write_bytes(b"neither BTF nor ELF" * 100)
    with pytest.raises(UnsupportedKernel) as info:
        Engine(probes=all_probes(), btf_path=str(garbage), background=False)
    text = str(info.value)
    assert "Unknown error" not in text and "LIBBPF_ERRNO__FORMAT: BPF object format invalid" in text, text
    assert str(garbage) in text and "\n" not in text


def test_header_fallback_reasons_are_whole(pytestconfig, monkeypatch):
    from pytest_nettrace import plugin
    engine, why = pytestconfig.stash[plugin._ENGINE].try_get()
    if engine is None:
        pytest.skip(f"probes unavailable here: {why}")
    # a reason as long as libbpf's (this kernel may need no fallback at all)
    status = next(iter(engine.status.values()))
    reason = "tp_btf: cannot attach " + "x" * 300 + " the end"
    monkeypatch.setattr(status, "failures", [*status.failures, reason])
    header = plugin.pytest_report_header(pytestconfig)
    assert f"nettrace:   {status.probe.name}: fell back from {reason}" in header, header


# ---------------------------------------------------------------------------
# Bad input: one clear line naming the problem, never a ctypes / netlink
# traceback, never a silent pass.

def _closed(trace, ns):
    trace.close()
    return trace


BAD_INPUT = [
    # (id, call(trace, ns), exception types, message regex)
    ("malformed-v4-filter", lambda t, ns: t.rst(daddr="10.0.0.300"), ValueError, r"invalid daddr '10\.0\.0\.300'"),
    ("malformed-v6-filter", lambda t, ns: t.rst(saddr="fd00::zz"), ValueError, r"invalid saddr 'fd00::zz'"),
    ("address-list-filter", lambda t, ns: t.rst(daddr=["10.0.0.1", "nope"]), ValueError, r"invalid daddr 'nope'"),
    ("malformed-address-assert", lambda t, ns: t.assert_address_not_deleted("999.1.1.1"), ValueError,
     r"invalid address '999\.1\.1\.1'"),
    ("malformed-address-positive", lambda t, ns: t.assert_address_deleted("not-an-ip", timeout=0.01), ValueError,
     r"invalid address 'not-an-ip'"),
    ("unknown-kind", lambda t, ns: t.events("rest"), ValueError, r"unknown event kind 'rest'; valid kinds: .*rst"),
    ("unknown-kind-assert-none", lambda t, ns: t.assert_none("nosuch"), ValueError, r"unknown event kind 'nosuch'"),
    ("unknown-kind-lost", lambda t, ns: t.lost("nosuch"), ValueError, r"unknown event kind 'nosuch'"),
    # a filter of another type, or a value a field never holds, would make a negative assertion pass
    ("port-as-str", lambda t, ns: t.assert_no_rst(sport="9"), ValueError,
     r"sport of 'rst' events is a number: '9' \(str\) would match nothing"),
    ("pid-as-str", lambda t, ns: t.assert_none("conn", pid="1"), ValueError, r"pid of 'conn' events is a number"),
    ("netns-as-str", lambda t, ns: t.assert_none("rst", netns=str(ns.inode)), ValueError,
     r"netns of 'rst' events is a number"),
    ("comm-as-int", lambda t, ns: t.assert_none("conn", comm=7), ValueError, r"comm of 'conn' events is a str"),
    ("proto-typo", lambda t, ns: t.assert_no_packet(proto="tpc"), ValueError,
     r"unknown proto 'tpc' for 'packet' events; valid: .*tcp"),
    ("ip-proto-typo", lambda t, ns: t.assert_no_drops(ip_proto="tpc"), ValueError, r"unknown ip_proto 'tpc'"),
    ("ip-proto-number-named", lambda t, ns: t.assert_no_drops(ip_proto=6), ValueError,
     r"ip_proto 6 of 'drop' events is named: write 'tcp'"),
    ("table-typo", lambda t, ns: t.assert_none("route", table="mian"), ValueError,
     r"unknown table 'mian' for 'route' events; valid: default, main, local or a table's number"),
    ("tcpdump-flags-order", lambda t, ns: t.assert_no_packet(flags=".R"), ValueError, r"unknown flags '\.R'"),
    ("sequence-port-as-str", lambda t, ns: forbid("rst", sport="9", between=("a", "b")), ValueError,
     r"sport of 'rst' events is a number"),
    ("watch-a-file", lambda t, ns: t.watch("/etc/passwd"), ValueError,
     r"^'/etc/passwd' is not a network namespace \(/etc/passwd is another file\)$"),
    ("watch-a-mount-namespace", lambda t, ns: t.watch("/proc/self/ns/mnt"), ValueError,
     r"is not a network namespace"),
    ("timeout-as-str", lambda t, ns: t.assert_any("rst", timeout="0.1"), ValueError,
     r"timeout is a number of seconds >= 0, not '0.1'"),
    ("count-as-str", lambda t, ns: t.assert_accepted_count("3"), ValueError,
     r"count is a number of connections >= 0, not '3'"),
    ("kinds-as-a-list", lambda t, ns: t.events(["addr", "route"]), ValueError,
     r"an event kind is one name, got list \['addr', 'route'\]; valid kinds: .*rst"),
    ("unknown-filter", lambda t, ns: t.rst(dprot=80), ValueError, r"unknown filter 'dprot' for 'rst' events"),
    ("unknown-filter-any-kind", lambda t, ns: t.events(colour="red"), ValueError, r"unknown filter 'colour'"),
    ("unknown-filter-negative", lambda t, ns: t.assert_no_rst(dprot=80), ValueError, r"unknown filter 'dprot'"),
    ("missing-namespace-name", lambda t, ns: t.watch("no-such-ns"), ValueError,
     r"no network namespace 'no-such-ns' \(looked at /run/netns/no-such-ns\)"),
    ("missing-namespace-path", lambda t, ns: t.watch("/nonexistent/ns"), ValueError,
     r"no network namespace '/nonexistent/ns'"),
    ("missing-namespace-pid", lambda t, ns: t.watch("pid:999999999"), ValueError, r"pid:999999999"),
    ("namespace-none", lambda t, ns: t.watch(None), TypeError, r"not a network namespace: None"),
    ("namespace-float", lambda t, ns: t.watch(1.5), TypeError, r"not a network namespace: 1\.5"),
    ("namespace-bool", lambda t, ns: t.watch(True), TypeError, r"not a network namespace: True"),
    ("removed-namespace-watch", lambda t, ns: (ns.close(), t.watch(ns)), Exception, r"removed|closed|no network"),
    ("after-teardown-read", lambda t, ns: _closed(t, ns).rst(), Exception, r"closed at the end of its test"),
    ("after-teardown-assert-no", lambda t, ns: _closed(t, ns).assert_no_rst(), Exception,
     r"closed at the end of its test"),
    ("after-teardown-watch", lambda t, ns: _closed(t, ns).watch(ns), Exception, r"closed at the end of its test"),
    ("after-teardown-lost", lambda t, ns: _closed(t, ns).lost(), Exception, r"closed at the end of its test"),
    ("namespace-after-close", lambda t, ns: (ns.close(), ns.add_address("lo", "10.0.0.1/8")), Exception,
     r"already removed"),
    ("bad-address-to-add", lambda t, ns: ns.add_address("lo", "10.0.0.300/24"), ValueError, r"10\.0\.0\.300"),
    ("int-address", lambda t, ns: ns.add_address("lo", 5), TypeError, r"an address is a str .* not int 5"),
    ("bytes-address", lambda t, ns: ns.add_address("lo", b"\n\0\0\1"), TypeError, r"not bytes"),
    ("peer-addresses-str", lambda t, ns: ns.add_veth("v0", ns, "v1", peer_addresses="10.0.0.1/24"), TypeError,
     r"peer_addresses must be a list of addresses, not one str: write peer_addresses=\['10\.0\.0\.1/24'\]"),
    ("addresses-str", lambda t, ns: ns.add_veth("v0", ns, "v1", "10.0.0.1/24"), TypeError,
     r"^addresses must be a list"),
    ("missing-link", lambda t, ns: ns.add_address("nosuch0", "10.0.0.1/24"), Exception, r"nosuch0"),
    ("ifname-too-long", lambda t, ns: ns.add_dummy("a" * 20), ValueError, r"a{20}"),
]


@pytest.mark.parametrize("call, errors, pattern", [pytest.param(c, e, p, id=i) for i, c, e, p in BAD_INPUT])
def test_bad_input_is_one_clear_line(netns, nettrace, call, errors, pattern):
    import ctypes
    with pytest.raises(errors) as info:
        call(nettrace, netns)
    exc = info.value
    text = str(exc)
    assert not isinstance(exc, ctypes.ArgumentError) and "pyroute2" not in type(exc).__module__, repr(exc)
    assert re.search(pattern, text), f"{type(exc).__name__}: {text}"
    assert "\n" not in text.strip(), f"not one line: {text!r}"
    assert "Traceback" not in text


def test_watching_an_inode_no_namespace_has_is_an_error(nettrace):
    """An int that is no namespace's inode must not make every assertion pass."""
    with pytest.raises((ValueError, Exception)) as info:
        nettrace.watch(1)
    assert "namespace" in str(info.value) and "\n" not in str(info.value).strip()


def test_engine_rejects_a_bad_ring_size():
    from pytest_nettrace.kernel.engine import Engine
    from pytest_nettrace.probes.registry import all_probes
    with pytest.raises(ValueError, match=r"ring buffer size 1000 must be a power of two >= 4096"):
        Engine(probes=all_probes(), ringbuf_size=1000, background=False)


def test_ring_wait_returns_on_wake_long_before_its_timeout():
    """Engine.close() wakes the drain thread instead of waiting out its poll
    timeout (which was most of close())."""
    import threading
    from pytest_nettrace.kernel import libbpf as lb
    from pytest_nettrace.kernel.ringbuf import RingBuffer
    fd = lb.map_create(lb.BPF_MAP_TYPE_RINGBUF, "t_ring", 0, 0, 4096)
    ring = RingBuffer(fd, 4096)
    try:
        waiter = threading.Thread(target=ring.wait, args=(60.0,))
        waiter.start()
        ring.wake()
        waiter.join(30.0)
        assert not waiter.is_alive(), "wait() ignored wake()"
    finally:
        ring.close()
        os.close(fd)


def test_engine_close_stops_the_drain_thread():
    from pytest_nettrace.kernel.engine import Engine
    from pytest_nettrace.probes.registry import all_probes
    engine = Engine(probes=all_probes())
    thread = engine._thread
    engine.close()
    assert thread is not None and not thread.is_alive()
    engine.close()  # idempotent


UNPRIVILEGED = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


def _unprivileged_python_works() -> bool:
    import shutil
    import subprocess
    if not shutil.which("setpriv"):
        return False
    r = subprocess.run(UNPRIVILEGED + [sys.executable, "-c", "import pytest, pytest_nettrace"],
                       capture_output=True, text=True, cwd="/")
    return r.returncode == 0


def test_unprivileged_engine_raises_unsupported_kernel_naming_not_root(tmp_path):
    import subprocess
    if not _unprivileged_python_works():
        pytest.skip("cannot run this Python as uid 65534 (setpriv missing or interpreter unreadable)")
    code = ("from pytest_nettrace.kernel.engine import Engine\n"
            "from pytest_nettrace.probes.registry import all_probes\n"
            "from pytest_nettrace.errors import UnsupportedKernel\n"
            "try:\n    Engine(probes=all_probes(), background=False)\n"
            "except UnsupportedKernel as e:\n    print('UnsupportedKernel:', e)\n"
            "else:\n    print('no error')\n")
    r = subprocess.run(UNPRIVILEGED + [sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    line = r.stdout.strip()
    assert line.startswith("UnsupportedKernel:") and "not root" in line and "\n" not in line, r.stdout


def test_unprivileged_session_skips_with_a_one_line_reason(tmp_path):
    if not _unprivileged_python_works():
        pytest.skip("cannot run this Python as uid 65534 (setpriv missing or interpreter unreadable)")
    import shutil
    import tempfile
    suite = tempfile.mkdtemp(prefix="nettrace-unpriv-")  # pytest's tmp_path is root-only
    try:
        os.chmod(suite, 0o777)
        with open(os.path.join(suite, "test_probe.py"), "w") as f:
            f.write("def test_uses_probes(nettrace):\n    nettrace.assert_no_rst()\n")
        result = run_session(suite, "-q", "-p", "no:xdist", user=UNPRIVILEGED)
    finally:
        shutil.rmtree(suite, ignore_errors=True)
    out = result.stdout + result.stderr
    assert outcome_counts(out) == {"skipped": 1}, out[-3000:]
    reason = [ln for ln in out.splitlines() if ln.startswith("SKIPPED")]
    assert len(reason) == 1 and "not root" in reason[0], out[-3000:]
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.parametrize("mode, outcomes", [("skip", {"skipped": 3}), ("error", {"errors": 2, "failed": 1})])
def test_unprivileged_netns_fixtures_skip_with_one_line_like_nettrace(tmp_path, mode, outcomes):
    if not _unprivileged_python_works():
        pytest.skip("cannot run this Python as uid 65534 (setpriv missing or interpreter unreadable)")
    import shutil
    import tempfile
    suite = tempfile.mkdtemp(prefix="nettrace-unpriv-")  # pytest's tmp_path is root-only
    try:
        os.chmod(suite, 0o777)
        with open(os.path.join(suite, "pytest.ini"), "w") as f:
            f.write(f"[pytest]\nnettrace_unavailable = {mode}\n")
        with open(os.path.join(suite, "test_ns.py"), "w") as f:
            f.write("def test_netns_and_probes(netns, nettrace):\n    pass\n\n"
                    "def test_netns(netns):\n    pass\n\n"
                    "def test_make_netns(make_netns):\n    make_netns()\n")
        result = run_session(suite, "-p", "no:xdist", user=UNPRIVILEGED)
    finally:
        shutil.rmtree(suite, ignore_errors=True)
    out = result.stdout + result.stderr
    assert outcome_counts(out) == outcomes, out[-3000:]
    reasons = [ln for ln in out.splitlines() if ln.startswith(("SKIPPED", "ERROR", "FAILED"))]
    assert len(reasons) == 3, out[-3000:]
    # (the short summary cuts its lines at the terminal's width: the sections hold them whole)
    # what to do first, then the file it failed on (the session's record, not /run/netns)
    assert out.count("network namespaces unavailable: network namespaces need root (euid 65534): run the tests "
                     "as root (sudo)") >= 3, out[-3000:]
    assert re.search(r"run the tests as root \(sudo\) — /run/pytest-nettrace/\S+: Permission denied", out), \
        out[-3000:]
    assert "Traceback" not in out and "NamespaceError" not in out and "During handling" not in out, out[-3000:]


def test_missing_btf_skips_with_a_one_line_reason_naming_the_path(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_probe.py").write_text("def test_uses_probes(nettrace):\n    nettrace.assert_no_rst()\n")
    result = run_session(suite, "-q", "-p", "no:xdist", "--nettrace-btf=/nonexistent/vmlinux")
    out = result.stdout + result.stderr
    assert outcome_counts(out) == {"skipped": 1}, out[-3000:]
    reason = [ln for ln in out.splitlines() if ln.startswith("SKIPPED")]
    assert len(reason) == 1 and "/nonexistent/vmlinux" in reason[0], out[-3000:]
    assert "the path given" in reason[0] and "CONFIG_DEBUG_INFO_BTF" not in reason[0], reason[0]  # not the kernel's
    assert "Traceback" not in out, out[-3000:]

"""Behaviour of Namespace / NamespaceFactory through the `netns` fixtures."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import subprocess
import traceback

import pytest
from netns_helpers import ip_json

from pytest_nettrace.errors import LeftAlone, NamespaceError, NetlinkOperationError
from pytest_nettrace.netns.namespace import (
    KIND_DUMMY,
    KIND_DUMMY_STANDIN,
    CommandFailed,
    Link,
    Namespace,
    NamespaceFactory,
    dummy_supported,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# -- identity ---------------------------------------------------------------


def test_fresh_namespace_has_only_loopback_up(netns: Namespace) -> None:
    links = ip_json(netns, "link")
    assert [link["ifname"] for link in links] == ["lo"]
    assert "UP" in links[0]["flags"]
    assert netns.path == f"/run/netns/{netns.name}"
    assert os.stat(netns.path).st_ino == netns.inode


def test_name_identifies_owner_and_is_unique(make_netns) -> None:
    names = {make_netns().name for _ in range(5)}
    assert len(names) == 5
    for name in names:
        assert re.fullmatch(rf"nt-{os.getpid()}-s[0-9a-f]{{8}}-\d+", name)


def test_ip_netns_exec_enters_the_same_namespace(netns: Namespace) -> None:
    out = subprocess.run(
        ["ip", "netns", "exec", netns.name, "readlink", "/proc/self/ns/net"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == f"net:[{netns.inode}]"
    assert netns.name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_make_netns_returns_distinct_namespaces(netns: Namespace, make_netns) -> None:
    other = make_netns()
    assert other.inode != netns.inode


def test_factory_calls_listeners_for_each_namespace() -> None:
    seen: list[str] = []
    later: list[str] = []
    with NamespaceFactory(on_create=lambda ns: seen.append(ns.name)) as factory:
        first = factory.create()
        factory.add_listener(lambda ns: later.append(ns.name))
        second = factory.create()
        assert factory.namespaces == [first, second]
    assert seen == [first.name, second.name]
    assert later == [second.name]
    assert first.closed and second.closed


# -- links and addresses ----------------------------------------------------


def test_veth_between_namespaces_carries_tcp_v4_and_v6(make_netns) -> None:
    a, b = make_netns(), make_netns()
    left, right = a.add_veth("veth0", b, "veth1", ["10.0.0.1/24", "2001:db8::1/64"], ["10.0.0.2/24", "2001:db8::2/64"])
    assert left == Link("veth0", left.index, "veth", a)
    assert (right.ifname, right.kind, right.netns) == ("veth1", "veth", b)
    for family, server_ip, client_ip in ((socket.AF_INET, "10.0.0.2", "10.0.0.1"),
                                         (socket.AF_INET6, "2001:db8::2", "2001:db8::1")):
        with b.socket(family) as server, a.socket(family) as client:
            server.bind((server_ip, 0))
            server.listen()
            client.settimeout(5)
            # IPv6 must work at once: no DAD wait.
            client.connect((server_ip, server.getsockname()[1]))
            conn, peer = server.accept()
            conn.close()
            assert peer[0] == client_ip


def test_veth_within_one_namespace(netns: Namespace) -> None:
    left, right = netns.add_veth("va", netns, "vb", ["10.1.0.1/24"], ["10.1.0.2/24"])
    assert left.netns is right.netns is netns
    links = {link["ifname"]: link for link in ip_json(netns, "link")}
    assert "UP" in links["va"]["flags"] and "UP" in links["vb"]["flags"]


def test_add_dummy_is_up_with_addresses_and_routes(netns: Namespace) -> None:
    link = netns.add_dummy("dummy0", "192.168.0.1/24", "2001:db8::1/64")
    assert link.kind == (KIND_DUMMY if dummy_supported() else KIND_DUMMY_STANDIN)
    assert netns.link("dummy0") == link
    (info,) = ip_json(netns, "link", "show", "dummy0")
    assert {"UP", "LOWER_UP"} <= set(info["flags"])
    assert {str(a) for a in netns.addresses("dummy0")} >= {"192.168.0.1/24", "2001:db8::1/64"}
    # Routes through it behave as through a dummy.
    netns.ipr.route("add", dst="10.9.0.0/16", gateway="192.168.0.2")
    routes = {r["dst"]: r for r in ip_json(netns, "route")}
    assert routes["192.168.0.0/24"]["dev"] == "dummy0"
    assert routes["10.9.0.0/16"]["gateway"] == "192.168.0.2"
    assert any(r["dst"] == "2001:db8::/64" and r["dev"] == "dummy0" for r in ip_json(netns, "-6", "route"))
    # A bound socket can use the address straight away.
    with netns.socket(socket.AF_INET6) as sock:
        sock.bind(("2001:db8::1", 0))


def test_dummy_standin_helper_namespace_is_hidden(netns: Namespace) -> None:
    netns.add_dummy("d0")
    netns.add_dummy("d1")
    ours = {e for e in os.listdir("/run/netns") if e.startswith(f"nt-{os.getpid()}-")}
    assert ours == {netns.name}
    assert [link["ifname"] for link in ip_json(netns, "link")] == ["lo", "d0", "d1"]


def test_bridge_joins_namespaces(make_netns) -> None:
    hub, a, b = make_netns(), make_netns(), make_netns()
    hub.add_veth("pa", a, "eth0", peer_addresses=["10.2.0.1/24"])
    hub.add_veth("pb", b, "eth0", peer_addresses=["10.2.0.2/24"])
    bridge = hub.add_bridge("br0", ports=["pa", "pb"])
    assert bridge.kind == "bridge" and hub.link("br0") == bridge
    masters = {link["ifname"]: link.get("master") for link in ip_json(hub, "link")}
    assert masters["pa"] == masters["pb"] == "br0"
    with b.socket() as server, a.socket() as client:
        server.bind(("10.2.0.2", 0))
        server.listen()
        client.settimeout(5)
        client.connect(("10.2.0.2", server.getsockname()[1]))


def test_addresses_add_list_delete(netns: Namespace) -> None:
    netns.add_dummy("d0")
    netns.add_address("d0", "10.3.0.1/24")
    netns.add_address("d0", ipaddress.ip_interface("2001:db8:3::1/64"))
    assert netns.addresses("d0")[:2] == [ipaddress.ip_interface("10.3.0.1/24"),
                                         ipaddress.ip_interface("2001:db8:3::1/64")]
    everything = netns.addresses()
    assert ipaddress.ip_interface("127.0.0.1/8") in everything and ipaddress.ip_interface("::1/128") in everything
    netns.del_address("d0", "10.3.0.1/24")
    assert ipaddress.ip_interface("10.3.0.1/24") not in netns.addresses("d0")


def test_ipv6_skips_dad_unless_asked(netns: Namespace) -> None:
    netns.add_dummy("d0", "2001:db8::1/64")
    netns.add_address("d0", "2001:db8::2/64", dad=True)
    flags = {a["local"]: a for a in ip_json(netns, "-6", "addr", "show", "dev", "d0")[0]["addr_info"]}
    assert not flags["2001:db8::1"].get("tentative")
    assert flags["2001:db8::1"].get("nodad")
    assert not flags["2001:db8::2"].get("nodad")


def test_set_down_and_up(netns: Namespace) -> None:
    netns.add_dummy("d0")
    netns.set_down("d0")
    assert "UP" not in ip_json(netns, "link", "show", "d0")[0]["flags"]
    netns.set_up("d0")
    assert "UP" in ip_json(netns, "link", "show", "d0")[0]["flags"]


def test_ipr_is_bound_to_the_namespace(netns: Namespace) -> None:
    netns.add_dummy("d0")
    names = {link.get("ifname") for link in netns.ipr.link("dump")}
    assert names == {"lo", "d0"}


# -- processes and sockets --------------------------------------------------


def test_run_inside_reports_pid_and_output(netns: Namespace) -> None:
    result = netns.run(["sh", "-c", 'echo "$$ $(readlink /proc/self/ns/net)"; echo err >&2; exit 3'])
    pid, ns_link = result.stdout.split()
    assert int(pid) == result.pid
    assert ns_link == f"net:[{netns.inode}]"
    assert (result.returncode, result.stderr) == (3, "err\n")


def test_run_input_and_check(netns: Namespace) -> None:
    assert netns.run(["cat"], input="hello").stdout == "hello"
    with pytest.raises(CommandFailed, match=r"exited 2 in nt-.*: boom"):
        netns.run(["sh", "-c", "echo boom >&2; exit 2"], check=True)


def test_run_timeout_kills_the_program(netns: Namespace) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        netns.run(["sleep", "30"], timeout=0.2)
    assert not _pids_in(netns)


def test_socket_lives_in_the_namespace(netns: Namespace) -> None:
    netns.add_dummy("d0", "10.4.0.1/24")
    with netns.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("10.4.0.1", 0))  # the address exists only in the namespace
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host_sock, pytest.raises(OSError):
        host_sock.bind(("10.4.0.1", 0))


def test_jobs_in_a_namespace_run_there_and_the_thread_comes_home(make_netns) -> None:
    """in_netns_at runs its jobs in the calling thread, inside the namespace
    asked for, and the thread is back in its own after every job, whatever
    the job did (returned, raised, visited another namespace)."""
    import threading

    from pytest_nettrace.netns.linux import in_netns_at

    a, b = make_netns(), make_netns()
    home = os.stat("/proc/thread-self/ns/net").st_ino
    seen = []

    def here() -> int:
        seen.append(threading.get_native_id())
        return os.stat("/proc/thread-self/ns/net").st_ino

    assert [in_netns_at(ns.path, here) for ns in (a, b, a)] == [a.inode, b.inode, a.inode]
    assert set(seen) == {threading.get_native_id()}, "the caller's own thread, no worker"
    assert os.stat("/proc/thread-self/ns/net").st_ino == home
    with pytest.raises(ZeroDivisionError):
        in_netns_at(b.path, lambda: 1 // 0)
    assert os.stat("/proc/thread-self/ns/net").st_ino == home
    # a job that asks for another namespace gets it, and is back in its own after
    assert in_netns_at(a.path, lambda: (in_netns_at(b.path, here), here())) == (b.inode, a.inode)
    assert os.stat("/proc/thread-self/ns/net").st_ino == home

    # an interrupt in the middle of a job (a signal handler raising) too
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        in_netns_at(a.path, interrupted)
    assert os.stat("/proc/thread-self/ns/net").st_ino == home
    # another thread's jobs leave this thread where it is
    other = threading.Thread(target=lambda: seen.append(in_netns_at(b.path, here)))
    other.start()
    other.join()
    assert seen[-1] == b.inode and os.stat("/proc/thread-self/ns/net").st_ino == home


def test_close_stops_the_daemons_it_started_and_leaves_a_process_that_joined_from_outside() -> None:
    factory = NamespaceFactory()
    ns = factory.create()
    daemon = ns.popen(["sh", "-c", "sleep 300 & sleep 300 & wait"])
    # Fully detached: own session, reparented to init; found by the session token it inherited.
    ns.run(["sh", "-c", "setsid -f sleep 300 >/dev/null 2>&1"], check=True)
    # Another tool entering the namespace: not the test's, never killed, reported.
    external = _started_outside(["ip", "netns", "exec", ns.name, "sleep", "300"])
    try:
        sock = ns.socket()
        # sh + 2 sleeps + setsid sleep + ip-exec'd sleep (ip enters the namespace before it execs sleep)
        _wait_until(lambda: len(_pids_in(ns)) >= 5 and _comm(external) == "sleep")
        with pytest.warns(LeftAlone, match=rf"process {external} \(sleep\) joined {ns.name} from outside"):
            factory.close()
        assert daemon.poll() is not None
        assert _pids_in(ns) == [external]
        assert sock.fileno() == -1
        assert ns.name not in os.listdir("/run/netns")
    finally:
        os.kill(external, 9)


def test_a_process_the_test_started_itself_with_ip_netns_exec_is_stopped_too() -> None:
    """A test that starts its daemon with `subprocess.Popen(["ip", "netns",
    "exec", ...])` instead of `Namespace.popen` (and never called popen):
    the daemon descends from this process, so it is the test's, stopped at
    teardown, not left running (and its namespace alive) as a stranger's."""
    import warnings

    factory = NamespaceFactory()
    ns = factory.create()
    daemon = subprocess.Popen(["ip", "netns", "exec", ns.name, "sleep", "300"])
    try:
        _wait_until(lambda: _pids_in(ns) == [daemon.pid] and _comm(daemon.pid) == "sleep")
        with warnings.catch_warnings():
            warnings.simplefilter("error", LeftAlone)
            factory.close()
        assert daemon.wait(5) is not None
        assert ns.name not in os.listdir("/run/netns")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def _started_outside(argv: list) -> int:
    """A process that is no descendant of this one, as another tool's would
    be: forked away while this process adopts no orphans (the plugin makes
    it their subreaper), so init takes it."""
    import ctypes
    import shlex
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    was = ctypes.c_int(0)
    prctl(37, ctypes.byref(was), 0, 0, 0)   # PR_GET_CHILD_SUBREAPER
    prctl(36, 0, 0, 0, 0)                   # PR_SET_CHILD_SUBREAPER off
    try:
        shell = subprocess.Popen(["sh", "-c", f"{shlex.join(argv)} >/dev/null 2>&1 & echo $!"],
                                 stdout=subprocess.PIPE, text=True)
        pid = int(shell.stdout.readline())
        shell.wait(5)
    finally:
        prctl(36, was.value, 0, 0, 0)
    return pid


def test_a_process_in_the_middle_of_its_exec_is_still_known_by_its_token(netns: Namespace) -> None:
    # Right after Popen returns, a third of the children still read an empty
    # environment (their exec is not done): a daemon that detached (no
    # ancestry to go by) caught at that moment must not pass for a stranger.
    from pytest_nettrace.netns import ownership as _netns_registry, procs as _procs

    token = _netns_registry.record().token
    for _ in range(30):
        proc = netns.popen(["sleep", "300"])
        found = _procs.classify({netns.inode}, token)  # no started pids: only the token tells
        for fd in found.ours.values():
            os.close(fd)
        proc.kill()
        proc.wait()
        assert (list(found.ours), found.foreign) == ([proc.pid], [])


def test_a_holder_is_reported_only_for_the_very_namespace_not_one_that_got_its_inode() -> None:
    # The kernel reuses a freed namespace's inode; its cookie is never reused.
    from pytest_nettrace.netns import linux as _linux, procs as _procs

    holder = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    try:
        _wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"))
        inode = os.stat(f"/proc/{holder.pid}/ns/net").st_ino
        cookie = _linux.netns_cookie_at(f"/proc/{holder.pid}/ns/net")
        assert cookie is not None
        assert _procs.holders({inode: cookie}) == []  # a process in it is no fd or mount
        fd = os.open(f"/proc/{holder.pid}/ns/net", os.O_RDONLY)  # a holder: another process of ours would do
        try:
            pinning = subprocess.Popen(["sleep", "300"], pass_fds=[fd])
            try:
                _wait_until(lambda: os.path.exists(f"/proc/{pinning.pid}/fd/{fd}"))
                assert f"net:[{inode}] held open by process {pinning.pid} (sleep)" in _procs.holders({inode: cookie})
                assert _procs.holders({inode: cookie + 1}) == []  # same inode, another namespace
            finally:
                pinning.kill()
                pinning.wait()
        finally:
            os.close(fd)
    finally:
        holder.kill()
        holder.wait()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


# -- errors -----------------------------------------------------------------


def test_kernel_refusal_is_one_clear_error(netns: Namespace) -> None:
    netns.add_dummy("d0", "10.5.0.1/24")
    with pytest.raises(NetlinkOperationError) as info:
        netns.add_address("d0", "10.5.0.1/24")
    message = str(info.value)
    assert message.startswith(f"cannot add address 10.5.0.1/24 to d0 in {netns.name}: ")
    assert "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "NetlinkError" not in "".join(traceback.format_exception(info.value))


def test_missing_link_names_it(netns: Namespace) -> None:
    with pytest.raises(NetlinkOperationError, match=rf"cannot set nosuch up in {netns.name}: no such device"):
        netns.set_up("nosuch")
    with pytest.raises(NetlinkOperationError, match="nosuch"):
        netns.link("nosuch")


def test_duplicate_link_names_it(netns: Namespace) -> None:
    netns.add_dummy("d0")
    with pytest.raises(NetlinkOperationError, match=rf"d0 in {netns.name}: file exists"):
        netns.add_dummy("d0")


@pytest.mark.parametrize("bad", ["300.1.1.1/24", "10.0.0.1/33", "2001:db8::g/64", "", "eth0"])
def test_malformed_address_is_value_error_naming_it(netns: Namespace, bad: str) -> None:
    netns.add_dummy("d0")
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        netns.add_address("d0", bad)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        netns.add_dummy("d1", bad)
    assert [link["ifname"] for link in ip_json(netns, "link")] == ["lo", "d0"]  # nothing half-made


@pytest.mark.parametrize("bad", ["", "x" * 16, "a/b", "a b", "a:b", ".."])
def test_bad_ifname_is_value_error(netns: Namespace, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid interface name"):
        netns.add_dummy(bad)


def test_use_after_close_is_namespace_error(make_netns) -> None:
    ns = make_netns()
    ns.close()
    ns.close()  # idempotent
    for use in (lambda: ns.add_dummy("d0"), lambda: ns.run(["true"]), lambda: ns.socket(), lambda: ns.ipr):
        with pytest.raises(NamespaceError, match=f"{ns.name} is already removed"):
            use()


def test_veth_to_a_removed_namespace_is_namespace_error(make_netns) -> None:
    a, b = make_netns(), make_netns()
    b.close()
    with pytest.raises(NamespaceError, match=b.name):
        a.add_veth("v0", b, "v1")


# -- helpers ----------------------------------------------------------------


def _pids_in(ns: Namespace) -> list[int]:
    from netns_helpers import pids_in_netns

    return pids_in_netns(ns.inode)


def _wait_until(condition, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_close_leaves_no_fd_pinning_the_namespace() -> None:
    """After close nothing of ours keeps the namespace alive (sockets included)."""
    factory = NamespaceFactory()
    ns = factory.create()
    ns.add_dummy("d0", "10.8.0.1/24")  # may make the hidden stand-in namespace
    ns.ipr.link("dump")
    ns.socket()
    ns.run(["true"])
    assert ns.inode in _netns_inodes_of_our_fds()
    factory.close()
    assert ns.inode not in _netns_inodes_of_our_fds()


def test_close_after_external_ip_netns_del(netns: Namespace) -> None:
    subprocess.run(["ip", "netns", "del", netns.name], check=True)
    netns.close()
    assert not os.path.exists(netns.path)


def _netns_inodes_of_our_fds() -> set[int]:
    """Namespaces our fds refer to: nsfs fds directly, sockets via SIOCGSKNS."""
    import fcntl
    import stat

    siocgskns = 0x894C
    nsfs_dev = os.stat("/proc/self/ns/net").st_dev
    inodes = set()
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if st.st_dev == nsfs_dev:
            inodes.add(st.st_ino)
        elif stat.S_ISSOCK(st.st_mode):
            try:
                ns_fd = fcntl.ioctl(fd, siocgskns)
            except OSError:
                continue
            inodes.add(os.fstat(ns_fd).st_ino)
            os.close(ns_fd)
    return inodes


def test_a_daemon_that_clears_its_environment_and_forks_away_goes_with_the_test() -> None:
    """`env -i setsid daemon &` from a shell that exits: no session marker
    in its environment, and its ancestry ended at init, so nothing proved it
    the test's; it outlived the test (keeping the namespace alive) with a
    warning that it had joined from outside. Adopted as an orphan, it is a
    descendant of the test's process and goes with the namespace."""
    import time
    import warnings
    factory = NamespaceFactory()
    ns = factory.create()
    shell = ns.popen(["sh", "-c", "env -i setsid sleep 300 & echo $!"], stdout=subprocess.PIPE, text=True)
    daemon = int(shell.stdout.readline())
    shell.wait(5)
    deadline = time.monotonic() + 5
    while _parent_of(daemon) != os.getpid():   # the shell's exit hands it over
        assert time.monotonic() < deadline, f"pid {daemon} not adopted (parent {_parent_of(daemon)})"
        time.sleep(0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeftAlone)
        factory.close()
    assert not os.path.exists(f"/proc/{daemon}"), "killed and reaped, not left a zombie"


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])

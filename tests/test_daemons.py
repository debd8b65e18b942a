"""Daemons in one line (issue 15): `ip netns exec` semantics for
Namespace.run/popen, private state directories, and real dbus-daemon,
NetworkManager and systemd-networkd started by the fixtures."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid

import pytest

from pytest_nettrace.netns.daemons import DaemonError, DaemonNotInstalled, find_program
from pytest_nettrace.netns.linux import MS_BIND, MS_RDONLY, MS_REC, MS_SLAVE, mount, unshare_mountns
from pytest_nettrace.errors import NamespaceError
from pytest_nettrace.netns.namespace import CommandFailed

MS_REMOUNT = 0x20


def host_mounts():
    """The host's mount table, without /run/netns entries (other tests add and remove theirs)."""
    with open("/proc/self/mountinfo") as f:
        rows = [line.split() for line in f]
    return sorted((r[4], r[8]) for r in rows if not r[4].startswith("/run/netns/"))


def in_own_mount_namespace(prepare, fn):
    """fn() in a thread with a mount namespace of its own, changed by
    prepare() (a host as some distribution or container has it); programs
    it starts inherit that namespace, the rest of the test does not."""
    box = {}

    def body():
        try:
            unshare_mountns()
            mount("", "/", None, MS_SLAVE | MS_REC)
            prepare()
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


# -- ip netns exec semantics -------------------------------------------------

def test_sys_shows_the_namespaces_devices(netns):
    netns.add_veth("v-a", netns, "v-b")
    inside = netns.run(["ls", "/sys/class/net"], check=True).stdout.split()
    assert sorted(inside) == ["lo", "v-a", "v-b"]
    # the same as ip netns exec shows (its own mount namespace, its own sysfs)
    ipnetns = subprocess.run(["ip", "netns", "exec", netns.name, "ls", "/sys/class/net"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert sorted(ipnetns) == sorted(inside)
    host = netns.run(["ls", "/sys/class/net"], host_view=True, check=True).stdout.split()
    assert sorted(host) == sorted(os.listdir("/sys/class/net"))


def test_a_read_only_sys_stays_read_only(netns):
    """ip netns exec gives a writable /sys when it can unmount a read-only one;
    we keep it read-only: a program gets no more than the host had."""
    def sys_options():
        mountinfo = netns.run(["cat", "/proc/self/mountinfo"], check=True).stdout
        return next(line.split()[5] for line in mountinfo.splitlines() if line.split()[4] == "/sys")

    assert sys_options().startswith("rw")
    read_only = in_own_mount_namespace(lambda: mount("", "/sys", None, MS_REMOUNT | MS_BIND | MS_RDONLY),
                                       sys_options)
    assert read_only.startswith("ro")


def test_nothing_changes_on_the_host(netns):
    before = host_mounts()
    missing = f"/run/nettrace-test-{uuid.uuid4().hex[:8]}"
    r = netns.run(["sh", "-c", f"echo x > {missing}/deep/state && cat {missing}/deep/state && ls /run/netns"],
                  private_dirs=[f"{missing}/deep", "/var/tmp"], check=True)
    assert r.stdout.split()[0] == "x"
    assert netns.name in r.stdout.split()  # the rest of /run is still there inside
    assert not os.path.exists(missing)
    assert host_mounts() == before


@pytest.fixture
def etc_netns(netns):
    """/etc/netns/<name>/hosts for this namespace, as `ip netns exec` users make it; removed after."""
    made_parent = not os.path.exists("/etc/netns")
    d = f"/etc/netns/{netns.name}"
    os.makedirs(d)
    try:
        with open(f"{d}/hosts", "w") as f:
            f.write("10.9.9.9 only-in-this-netns\n")
        yield d
    finally:
        shutil.rmtree(d)
        if made_parent:
            try:
                os.rmdir("/etc/netns")
            except OSError:  # someone else's entry appeared meanwhile: theirs to remove
                pass


def test_etc_netns_files_are_bound_over_etc(netns, etc_netns):
    assert "only-in-this-netns" in netns.run(["cat", "/etc/hosts"], check=True).stdout
    # as ip netns exec does
    assert "only-in-this-netns" in subprocess.run(["ip", "netns", "exec", netns.name, "cat", "/etc/hosts"],
                                                  capture_output=True, text=True, check=True).stdout
    assert "only-in-this-netns" not in netns.run(["cat", "/etc/hosts"], etc=False, check=True).stdout
    assert "only-in-this-netns" not in netns.run(["cat", "/etc/hosts"], host_view=True, check=True).stdout
    assert "only-in-this-netns" not in open("/etc/hosts").read()


def test_an_etc_netns_entry_missing_from_etc_is_skipped_with_a_warning(netns, etc_netns):
    with open(f"{etc_netns}/not-in-etc.conf", "w") as f:
        f.write("x\n")
    # ip netns exec complains and runs the program, the other entries bound
    r = subprocess.run(["ip", "netns", "exec", netns.name, "cat", "/etc/hosts"], capture_output=True, text=True)
    assert r.returncode == 0 and "only-in-this-netns" in r.stdout and "not-in-etc.conf" in r.stderr
    with pytest.warns(UserWarning, match=f"^{etc_netns}/not-in-etc.conf not bound: /etc/not-in-etc.conf does not "
                                         f"exist"):
        assert "only-in-this-netns" in netns.run(["cat", "/etc/hosts"], check=True).stdout


def test_etc_from_a_directory_of_the_test(netns, tmp_path):
    (tmp_path / "resolv.conf").write_text("nameserver 192.0.2.53\n")
    r = netns.run(["cat", "/etc/resolv.conf"], etc=tmp_path, check=True)
    assert r.stdout == "nameserver 192.0.2.53\n"
    (tmp_path / "no-such-file-in-etc").write_text("")
    with pytest.raises(NamespaceError, match="/etc/no-such-file-in-etc does not exist"):
        netns.run(["true"], etc=tmp_path)


def test_private_dirs_are_empty_writable_and_private(netns, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "host-file").write_text("host")
    daemon = netns.popen(["sh", "-c", f"ls -A {state}; echo daemon > {state}/own; echo ready; exec sleep 60"],
                         private_dirs=[state], stdout=subprocess.PIPE, text=True)
    assert daemon.stdout.readline() == "ready\n"  # ls found the directory empty
    r = netns.run(["cat", f"{state}/own"], mounts_of=daemon, check=True)
    assert r.stdout == "daemon\n"  # seen in the daemon's mount namespace
    assert not (state / "own").exists() and (state / "host-file").exists()
    assert netns.run(["ls", "-A", str(state)], private_dirs=[state], check=True).stdout == ""
    daemon.kill()


def test_a_removed_namespace_is_not_kept_by_a_daemons_mounts(make_netns):
    """A daemon's mount namespace holds copies of /run/netns entries; removing
    a namespace must unmount those copies too (else they keep it alive)."""
    a, b = make_netns(), make_netns()
    plain = a.popen(["sleep", "60"])
    covered = a.popen(["sleep", "60"], private_dirs=[f"/run/nettrace-test-{uuid.uuid4().hex[:8]}"])
    for p in (plain, covered):
        with open(f"/proc/{p.pid}/mountinfo") as f:
            assert f"/run/netns/{b.name} " in f.read()
    b.close()
    for p in (plain, covered):
        with open(f"/proc/{p.pid}/mountinfo") as f:
            assert f"/run/netns/{b.name} " not in f.read()


@pytest.mark.parametrize("kwargs, message", [
    ({"private_dirs": ["run/x"]}, "must be an absolute path"),
    ({"private_dirs": ["/"]}, "must be an absolute path below /"),
    ({"private_dirs": ["/sys/fs"]}, "/proc and /sys are the kernel's"),
    ({"host_view": True, "private_dirs": ["/run/x"]}, "host_view=True runs with the host's mounts"),
    ({"etc": "/no/such/dir"}, "is not a directory"),
    ({"mounts_of": 1 << 30}, "is not running"),
])
def test_bad_mount_arguments_are_one_line_errors(netns, kwargs, message):
    with pytest.raises(ValueError, match=message):
        netns.run(["true"], **kwargs)


def test_a_private_dir_over_a_file_is_an_error(netns, tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(NamespaceError, match="exists and is not a directory"):
        netns.run(["true"], private_dirs=[tmp_path / "f"])
    with pytest.raises(NamespaceError, match="nothing below / leads to it"):
        netns.run(["true"], private_dirs=[f"/nettrace-no-such-{uuid.uuid4().hex[:8]}/state"])


# -- daemons -----------------------------------------------------------------

def test_a_missing_daemon_names_its_package():
    with pytest.raises(DaemonNotInstalled, match="^no-such-daemon not found: install package no-such-pkg$"):
        find_program("no-such-daemon", "no-such-pkg")


def test_a_missing_daemon_skips_or_errors(pytester):
    pytester.makepyfile(test_x="""
from pytest_nettrace.netns import daemons
def test_x(monkeypatch, networkmanager):
    monkeypatch.setattr(daemons, "SEARCH_PATH", "/nonexistent")
    networkmanager()
""")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*NetworkManager not found: install package network-manager*"])
    pytester.makeini("[pytest]\nnettrace_unavailable = error\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rN")  # -rN: no short summary
    result.assert_outcomes(failed=1)
    assert result.stdout.str().count("NetworkManager not found: install package network-manager") == 1
    result.stdout.no_fnmatch_line("*During handling of the above exception*")

def test_dbus_system_bus_is_private_to_its_namespace(dbus_system_bus, make_netns):
    r = dbus_system_bus.run(["busctl", "--system", "--no-pager", "list"], check=True)
    assert "org.freedesktop.DBus" in r.stdout
    other = make_netns()
    r = other.run(["busctl", "--system", "list"], env={**os.environ, **dbus_system_bus.env})
    assert r.returncode != 0  # an abstract socket: another namespace has none of that name


LAB = """[connection]
id=lab
type=ethernet
interface-name=eth1

[ipv4]
method=manual
address1=10.2.0.1/24

[ipv6]
method=disabled
"""


def test_networkmanager_applies_a_profile_from_the_tests_directory(make_netns, networkmanager, nettrace,
                                                                    tmp_path):
    host, lab = make_netns(), make_netns()
    host.add_veth("eth1", lab, "eth0", peer_addresses=["10.2.0.254/24"])
    (tmp_path / "lab.nmconnection").write_text(LAB)
    nm = networkmanager(host, profiles=tmp_path)
    assert "lab" in nm.nmcli("-t", "-f", "NAME", "connection", "show").stdout.split()
    nm.nmcli("connection", "up", "lab")
    ev = nettrace.assert_any("addr", timeout=10, action="added", address="10.2.0.1/24", dev="eth1")
    assert ev.comm == "NetworkManager" and ev.pid == nm.process.pid and ev.netns == host.inode
    # the independent observer: the kernel's own view, and nmcli's
    assert "10.2.0.1/24" in [str(a) for a in host.addresses("eth1")]
    assert "eth1:connected" in nm.nmcli("-t", "-f", "DEVICE,STATE", "device").stdout.split()
    assert (tmp_path / "lab.nmconnection").read_text() == LAB  # the test's copy is never written to


# Ubuntu's network-manager package ships this in /usr/lib/NetworkManager/conf.d
UBUNTU_UNMANAGED = """[keyfile]
unmanaged-devices=*,except:type:wifi,except:type:gsm,except:type:cdma
"""


def ubuntu_conf_d():
    mount("tmpfs", "/usr/lib/NetworkManager/conf.d", "tmpfs", 0, "mode=755")
    with open("/usr/lib/NetworkManager/conf.d/10-globally-managed-devices.conf", "w") as f:
        f.write(UBUNTU_UNMANAGED)


@pytest.mark.skipif(not os.path.isdir("/usr/lib/NetworkManager/conf.d"), reason="no distribution conf.d to hide")
def test_networkmanager_ignores_the_distributions_configuration(make_netns, networkmanager, nettrace, tmp_path):
    host, lab = make_netns(), make_netns()
    host.add_veth("eth1", lab, "eth0")
    (tmp_path / "lab.nmconnection").write_text(LAB)
    nm = in_own_mount_namespace(ubuntu_conf_d, lambda: networkmanager(host, profiles=tmp_path))
    nm.nmcli("connection", "up", "lab")  # fails where eth1 is unmanaged
    nettrace.assert_any("addr", timeout=10, action="added", address="10.2.0.1/24", dev="eth1")


def test_networkmanager_leaves_the_host_alone(netns, networkmanager):
    host_had = os.path.exists("/run/NetworkManager")
    before = host_mounts()
    nm = networkmanager()  # in `netns`, no profiles
    nm.nmcli("general", "status")
    assert os.path.exists("/run/NetworkManager") == host_had
    assert host_mounts() == before
    nm.stop()
    assert nm.process.poll() is not None and nm.bus.process.poll() is not None


NETWORK = """[Match]
Name=eth1

[Network]
Address={address}
IPv6AcceptRA=no
"""


def test_systemd_networkd_applies_and_reloads_network_files(netns, systemd_networkd, nettrace, tmp_path):
    netns.add_dummy("eth1")
    (tmp_path / "10-eth1.network").write_text(NETWORK.format(address="10.3.0.1/24"))
    networkd = systemd_networkd(netns, config=tmp_path)
    networkd.wait_configured("eth1")
    ev = nettrace.assert_any("addr", action="added", address="10.3.0.1/24", dev="eth1")
    assert ev.comm == "systemd-network" and ev.pid == networkd.process.pid  # the kernel keeps 15 bytes
    assert "10.3.0.1/24" in [str(a) for a in netns.addresses("eth1")]

    (networkd.config / "10-eth1.network").write_text(NETWORK.format(address="10.3.0.2/24"))
    networkd.reload()
    networkd.networkctl("reconfigure", "eth1")
    added = nettrace.assert_any("addr", timeout=10, action="added", address="10.3.0.2/24",
                                comm="systemd-networkd")
    assert added.netns == netns.inode
    assert "eth1" in networkd.networkctl("list").stdout


NEXTHOP_NETWORK = """[Match]
Name=eth1

[Network]
Address=10.3.0.1/24
IPv6AcceptRA=no

[NextHop]
Id=5
Gateway=10.3.0.254

[Route]
Destination=10.50.0.0/16
NextHop=5
"""


def test_systemd_networkd_nexthop_objects_and_the_routes_using_them(netns, systemd_networkd, nettrace, tmp_path):
    """networkd makes a [NextHop] a nexthop object and routes through it by
    id: both are events by networkd, and the route names its nexthop."""
    netns.add_dummy("eth1")
    (tmp_path / "10-eth1.network").write_text(NEXTHOP_NETWORK)
    networkd = systemd_networkd(netns, config=tmp_path)
    networkd.wait_configured("eth1")
    nh = nettrace.assert_any("nexthop", timeout=10, action="added", id=5)
    assert (str(nh.gateway), nh.dev, nh.family) == ("10.3.0.254", "eth1", 4)
    assert nh.comm == "systemd-network" and nh.pid == networkd.process.pid and nh.cause == "netlink"
    route = nettrace.assert_any("route", timeout=10, action="added", dst="10.50.0.0/16")
    assert route.nhid == 5 and route.pid == networkd.process.pid
    assert "nhid 5" in route.describe()


def test_a_networkmanager_that_exits_at_once_fails_at_once(netns, networkmanager):
    t0 = time.monotonic()
    with pytest.raises(DaemonError, match=r"NetworkManager exited, status \d+\): .*not a key-value pair"):
        networkmanager(netns, config="[main\n")  # a broken section header: it refuses to start
    assert time.monotonic() - t0 < 20  # not nm-online's full 60 s


def test_a_daemon_that_has_exited_is_named_as_such(make_netns, networkmanager, systemd_networkd):
    nm, networkd = networkmanager(make_netns()), systemd_networkd(make_netns())
    for daemon in (nm, networkd):
        daemon.process.kill()
        daemon.process.wait()
    with pytest.raises(DaemonError, match=r"^NetworkManager in \S+ has exited \(status -9\): "):
        nm.nmcli("general", "status")
    for call in (networkd.reload, lambda: networkd.wait_configured("lo", timeout=1)):
        with pytest.raises(DaemonError, match=r"^systemd-networkd in \S+ has exited \(status -9\): "):
            call()


def test_a_link_waiting_for_router_advertisements_is_explained(netns, systemd_networkd, tmp_path):
    netns.add_dummy("eth1")
    (tmp_path / "10-eth1.network").write_text(NETWORK.format(address="10.3.0.1/24").replace("IPv6AcceptRA=no\n", ""))
    networkd = systemd_networkd(netns, config=tmp_path)
    with pytest.raises(DaemonError, match=r"'configuring', not configured \(10-eth1.network does not say "
                                          r"IPv6AcceptRA=no: .*\):"):
        networkd.wait_configured("eth1", timeout=2)


def test_a_profile_networkmanager_rejected_is_explained_by_its_log(netns, networkmanager, tmp_path):
    netns.add_dummy("eth1")
    (tmp_path / "lab.nmconnection").write_text(LAB.replace("10.2.0.1/24", "10.2.0.300/24"))
    nm = networkmanager(netns, profiles=tmp_path)
    with pytest.raises(CommandFailed, match=r"(?s)unknown connection 'lab'.*\nNetworkManager's log: .*"
                                            r"Invalid IPv4 address '10.2.0.300'.*failed to load connection"):
        nm.nmcli("connection", "up", "lab")

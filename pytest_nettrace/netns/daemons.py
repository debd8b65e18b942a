"""Network daemons in a test's namespace, each in one call: a private D-Bus
system bus, NetworkManager, systemd-networkd.

Each runs through `Namespace.popen` (a mount namespace of its own, /sys of
the network namespace, private state directories), with its files in a
directory of the test's (`workdir`: configuration, copied profiles, its log),
and is stopped with the namespace at the latest. The fixtures in plugin.py
(`dbus_system_bus`, `networkmanager`, `systemd_networkd`) wrap these.
"""
from __future__ import annotations

import itertools
import os
import select
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from .procs import stop_popen
from ..errors import NettraceError
from .namespace import CommandFailed, Namespace, RunResult

__all__ = ["DaemonError", "DaemonNotInstalled", "SystemBus", "NetworkManager", "Networkd", "find_program",
           "start_system_bus", "start_networkmanager", "start_networkd"]

# Where daemons are looked for (sbin included, which a user's PATH may lack).
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_counter = itertools.count(1)


class DaemonError(NettraceError):
    """A daemon did not start; the message says which and why (with its log's end)."""


class DaemonNotInstalled(DaemonError):
    """A program is missing; the message names the package to install."""


def find_program(program: str, package: str, candidates: Sequence[str] = ()) -> str:
    """Full path of `program` (or of the first existing candidate path); a
    DaemonError naming the package to install otherwise."""
    for c in candidates:
        if os.access(c, os.X_OK):
            return c
    path = shutil.which(program, path=SEARCH_PATH)
    if path is None:
        raise DaemonNotInstalled(f"{program} not found: install package {package}")
    return path


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def _env(extra: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PATH", SEARCH_PATH)
    env.update(extra)
    return env


def _stop(proc: subprocess.Popen[Any]) -> None:
    stop_popen(proc, grace=5.0)


# -- D-Bus -------------------------------------------------------------------

_BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:abstract={name}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/> <allow own="*"/> <allow send_destination="*"/> <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


class SystemBus:
    """A private D-Bus system bus: dbus-daemon in one network namespace,
    listening on an abstract socket (per network namespace, nothing on disk),
    so only programs of that namespace reach it, and no policy stands in the
    way. `env` is what a client needs (DBUS_SYSTEM_BUS_ADDRESS)."""

    def __init__(self, ns: Namespace, process: subprocess.Popen[Any], address: str, log: Path) -> None:
        self.ns = ns
        self.process = process
        self.address = address
        self.log = log

    @property
    def env(self) -> Dict[str, str]:
        return {"DBUS_SYSTEM_BUS_ADDRESS": self.address}

    def run(self, argv: Sequence[str], **kwargs: Any) -> RunResult:
        """`Namespace.run` with this bus in the environment (e.g. `busctl`)."""
        kwargs["env"] = _env({**(kwargs.get("env") or {}), **self.env})
        return self.ns.run(argv, **kwargs)

    def stop(self) -> None:
        _stop(self.process)

    def __repr__(self) -> str:
        return f"<SystemBus {self.address} in {self.ns.name}>"


def start_system_bus(ns: Namespace, workdir: "str | os.PathLike[str]", timeout: float = 60.0) -> SystemBus:
    """dbus-daemon with a private system bus in `ns`; returns once it listens."""
    dbus = find_program("dbus-daemon", "dbus-daemon")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    conf, log = workdir / "bus.conf", workdir / "dbus-daemon.log"
    conf.write_text(_BUS_CONF.format(name=f"/pytest-nettrace/{ns.name}/bus-{os.getpid()}-{next(_counter)}"))
    with log.open("w") as err:
        proc = ns.popen([dbus, "--nofork", "--print-address", "--config-file", str(conf)],
                        stdout=subprocess.PIPE, stderr=err, text=True)
    address = _read_line(proc, timeout)
    if not address:
        _stop(proc)
        raise DaemonError(f"dbus-daemon did not start in {ns.name} within {timeout:g}s "
                          f"(exit status {proc.poll()}): {_tail(log)}")
    return SystemBus(ns, proc, address, log)


def _read_line(proc: subprocess.Popen[Any], timeout: float) -> str:
    """One line of the program's stdout (its readiness), or "" if none came in time."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


# -- NetworkManager ----------------------------------------------------------

_NM_CONF = """[main]
plugins=keyfile
no-auto-default=*
dns=none
rc-manager=unmanaged
hostname-mode=none
auth-polkit=root-only
[keyfile]
path={profiles}
[logging]
level={log_level}
{extra}
"""

# Its state goes to tmpfs directories of its own; the host's NetworkManager
# (if any) and its profiles are never seen.
NM_PRIVATE_DIRS = ("/run/NetworkManager", "/var/lib/NetworkManager", "/etc/NetworkManager")


class _BusDaemon:
    """A daemon the plugin started in a namespace, on a system bus (its own
    when `own_bus`: stopped with it)."""

    program = ""  # its name, in messages

    def __init__(self, ns: Namespace, bus: SystemBus, process: subprocess.Popen[Any], log: Path, own_bus: bool) -> None:
        self.ns = ns
        self.bus = bus
        self._own_bus = own_bus
        self.process = process
        self.log = log

    def _run(self, argv: Sequence[str], check: bool, timeout: float, **kwargs: Any) -> RunResult:
        """A client of the daemon on its bus; once the daemon has exited, a
        DaemonError saying so (not the client's or mounts_of's complaint)."""
        try:
            result = self.bus.run(argv, check=False, timeout=timeout, **kwargs)
        except ValueError:  # mounts_of= a daemon that is gone
            self._check_running()
            raise
        if result.returncode != 0:
            self._check_running()
            if check:
                raise CommandFailed(result, self.bus.ns.name, self._explain(result))
        return result

    def _explain(self, failed: RunResult) -> str:
        """What the daemon's log says about a client's failure ("": nothing)."""
        return ""

    def _check_running(self) -> None:
        status = self.process.poll()
        if status is not None:
            raise DaemonError(f"{self.program} in {self.ns.name} has exited (status {status}): {_tail(self.log)}")

    def stop(self) -> None:
        """Stop it (and the bus it started for itself)."""
        _stop(self.process)
        if self._own_bus:
            self.bus.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid {self.process.pid} in {self.ns.name}>"


class NetworkManager(_BusDaemon):
    """NetworkManager running in a namespace, on a private system bus.

    `profiles`: its keyfile directory (a copy of the test's profiles; what
    `nmcli connection add` writes lands here too); `log`: its log;
    `nmcli(...)`: nmcli bound to this instance."""

    program = "NetworkManager"

    def _explain(self, failed: RunResult) -> str:
        # A profile NetworkManager rejected is just "unknown" to nmcli; why is in its log.
        if "unknown connection" not in failed.stderr:
            return ""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        rejected = [line for line in lines if "<warn>" in line and "keyfile:" in line]
        return "NetworkManager's log: " + "\n".join(rejected[-5:]) if rejected else ""

    def __init__(self, ns: Namespace, bus: SystemBus, process: subprocess.Popen[Any], profiles: Path, log: Path,
                 nmcli_path: str, own_bus: bool) -> None:
        super().__init__(ns, bus, process, log, own_bus)
        self.profiles = profiles
        self._nmcli = nmcli_path

    def nmcli(self, *args: str, check: bool = True, wait: float = 20, timeout: float = 60) -> RunResult:
        """`nmcli --wait <wait> ARGS` against this NetworkManager; with `check`,
        a failure raises CommandFailed with nmcli's stderr (DaemonError once
        NetworkManager has exited)."""
        return self._run([self._nmcli, "--wait", f"{wait:g}", *args], check, timeout)


def copy_profiles(source: "str | os.PathLike[str] | None", target: Path) -> None:
    """Keyfile profiles as NetworkManager insists on them: root's, mode 0600,
    in a directory only root reads."""
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    if source is None:
        return
    src = Path(source)
    if not src.is_dir():
        raise ValueError(f"profiles={str(source)!r} is not a directory")
    for f in sorted(src.iterdir()):
        if f.is_file():
            dst = target / f.name
            shutil.copyfile(f, dst)
            os.chmod(dst, stat.S_IRUSR | stat.S_IWUSR)


def _workdir_and_bus(ns: Namespace, workdir: "str | os.PathLike[str]",
                     bus: Optional[SystemBus]) -> Tuple[Path, SystemBus, bool]:
    """A daemon's work directory (made), and its bus: `bus`, or a private one
    started in the work directory (then the daemon owns it: True)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if bus is not None:
        return workdir, bus, False
    return workdir, start_system_bus(ns, workdir / "dbus"), True


def start_networkmanager(ns: Namespace, workdir: "str | os.PathLike[str]", *,
                         profiles: "str | os.PathLike[str] | None" = None,
                         bus: Optional[SystemBus] = None, config: str = "", log_level: str = "INFO",
                         timeout: float = 60.0) -> NetworkManager:
    """NetworkManager in `ns` with the keyfile profiles of directory `profiles`
    (copied), on `bus` (a new private one if None); returns once it has started
    (`nm-online --wait-for-startup`). `config`: more lines for its
    NetworkManager.conf (e.g. "[device]\\nmatch-device=interface-name:eth1\\nmanaged=1")."""
    nm = find_program("NetworkManager", "network-manager")
    nmcli = find_program("nmcli", "network-manager")
    nm_online = find_program("nm-online", "network-manager")
    workdir, bus, own_bus = _workdir_and_bus(ns, workdir, bus)
    copy_profiles(profiles, workdir / "profiles")
    conf, log = workdir / "NetworkManager.conf", workdir / "NetworkManager.log"
    conf.write_text(_NM_CONF.format(profiles=workdir / "profiles", log_level=log_level, extra=config))
    # Empty configuration directories, not the host's /etc/NetworkManager/conf.d
    # nor the distribution's /usr/lib/NetworkManager/conf.d (Ubuntu's leaves
    # every device but wifi unmanaged)
    (workdir / "conf.d").mkdir(exist_ok=True)
    (workdir / "system-conf.d").mkdir(exist_ok=True)
    dirs = list(NM_PRIVATE_DIRS)
    if os.path.isdir("/usr/lib/NetworkManager/system-connections"):  # profiles a distribution ships
        dirs.append("/usr/lib/NetworkManager/system-connections")
    with log.open("w") as out:
        # --debug: log to stderr (no syslog here); /sys read-only makes it run as
        # in a container: devices are ready without udev
        proc = ns.popen([nm, "--debug", f"--config={conf}", f"--config-dir={workdir / 'conf.d'}",
                         f"--system-config-dir={workdir / 'system-conf.d'}"],
                        env=_env(bus.env), stdout=out, stderr=subprocess.STDOUT,
                        private_dirs=dirs, readonly_sys=True)
    waiter = bus.ns.popen([nm_online, "--wait-for-startup", "--quiet", f"--timeout={int(timeout)}"],
                          env=_env(bus.env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # watched together: a NetworkManager that exits at once fails now, not
    # when nm-online gives up
    deadline = time.monotonic() + timeout + 5
    while waiter.poll() is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    status = proc.poll()
    if waiter.poll() != 0 or status is not None:
        why = f"NetworkManager exited, status {status}" if status is not None else \
            f"nm-online exit {waiter.returncode}"
        _stop(waiter)
        _stop(proc)
        raise DaemonError(f"NetworkManager did not start in {ns.name} ({why}): {_tail(log)}")
    return NetworkManager(ns, bus, proc, workdir / "profiles", log, nmcli, own_bus)


# -- systemd-networkd ----------------------------------------------------------

NETWORKD_CANDIDATES = ("/lib/systemd/systemd-networkd", "/usr/lib/systemd/systemd-networkd")
# Configuration only from the test: the host's runtime state and .network
# files (/run/systemd: networkd makes netif/ there itself, owned by the user
# it drops to) and the distribution's are hidden.
NETWORKD_PRIVATE_DIRS = ("/run/systemd",)
NETWORKD_HIDDEN_IF_PRESENT = ("/usr/lib/systemd/network", "/usr/local/lib/systemd/network")


class Networkd(_BusDaemon):
    """systemd-networkd running in a namespace (no systemd as PID 1 needed),
    on a private system bus, configured from the test's .network/.netdev
    files (`config`, a copy: change them there, then `reload()`)."""

    program = "systemd-networkd"

    def __init__(self, ns: Namespace, bus: SystemBus, process: subprocess.Popen[Any], config: Path, log: Path,
                 networkctl_path: str, own_bus: bool) -> None:
        super().__init__(ns, bus, process, log, own_bus)
        self.config = config
        self._networkctl = networkctl_path

    def networkctl(self, *args: str, check: bool = True, timeout: float = 30) -> RunResult:
        """`networkctl ARGS` against this networkd (in its mount namespace, where
        its state files are); DaemonError once networkd has exited."""
        return self._run([self._networkctl, "--no-pager", "--no-legend", *args], check, timeout,
                         mounts_of=self.process)

    def reload(self) -> None:
        """Read the configuration again and apply it (`networkctl reload`)."""
        self.networkctl("reload")

    def wait_configured(self, ifname: str, timeout: float = 60.0) -> None:
        """Until networkd says `ifname` is configured (or failed: an error).
        A link whose .network accepts router advertisements (the default)
        stays "configuring" until one comes: say `IPv6AcceptRA=no` if none will."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.networkctl("list", ifname).stdout.split()
            setup = state[4] if len(state) > 4 else "?"
            if setup == "configured":
                return
            if setup == "failed" or time.monotonic() > deadline:
                hint = self._ra_hint(ifname) if setup == "configuring" else ""
                raise DaemonError(f"systemd-networkd: {ifname} is {setup!r}, not configured{hint}: "
                                  f"{_tail(self.log)}")
            time.sleep(0.05)

    def _ra_hint(self, ifname: str) -> str:
        """Why a link may be stuck "configuring": its .network file (one of
        ours) accepts router advertisements, the default, and none came."""
        status = self.networkctl("status", ifname, check=False).stdout
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Network File":
                network = self.config / Path(value.strip()).name
                if network.is_file() and "IPv6AcceptRA" not in network.read_text():
                    return (f" ({network.name} does not say IPv6AcceptRA=no: the link waits for a router "
                            f"advertisement; say IPv6AcceptRA=no in [Network] where no router is)")
        return ""


def start_networkd(ns: Namespace, workdir: "str | os.PathLike[str]", *, config: "str | os.PathLike[str] | None" = None,
                   bus: Optional[SystemBus] = None, timeout: float = 60.0) -> Networkd:
    """systemd-networkd in `ns` with the files of directory `config` as its
    /etc/systemd/network (copied; other configuration hidden), on `bus` (a new
    private one if None); returns once it reported ready (sd_notify READY=1)."""
    networkd = find_program("systemd-networkd", "systemd", NETWORKD_CANDIDATES)
    networkctl = find_program("networkctl", "systemd")
    workdir, bus, own_bus = _workdir_and_bus(ns, workdir, bus)
    # what it sees as /etc/systemd: only network/ (and no host networkd.conf)
    etc = workdir / "etc"
    net = etc / "systemd" / "network"
    net.mkdir(parents=True, exist_ok=True)
    if config is not None:
        src = Path(config)
        if not src.is_dir():
            raise ValueError(f"config={str(config)!r} is not a directory")
        for f in sorted(src.iterdir()):
            if f.is_file():
                shutil.copyfile(f, net / f.name)
    log = workdir / "systemd-networkd.log"
    # READY=1 arrives on a socket of ours in the namespace (abstract: per netns, nothing on disk)
    notify_name = f"pytest-nettrace/{ns.name}/notify-{os.getpid()}-{next(_counter)}"
    notify = ns.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.bind("\0" + notify_name)
        with log.open("w") as out:
            proc = ns.popen([networkd], env=_env({**bus.env, "NOTIFY_SOCKET": "@" + notify_name,
                                                  "SYSTEMD_LOG_TARGET": "console", "SYSTEMD_LOG_LEVEL": "info"}),
                            stdout=out, stderr=subprocess.STDOUT, etc=etc, readonly_sys=True,
                            private_dirs=NETWORKD_PRIVATE_DIRS + tuple(
                                d for d in NETWORKD_HIDDEN_IF_PRESENT if os.path.isdir(d)))
        if not _wait_ready(notify, proc, timeout):
            _stop(proc)
            raise DaemonError(f"systemd-networkd did not report ready in {ns.name} within {timeout:g}s "
                              f"(exit status {proc.poll()}): {_tail(log)}")
    finally:
        notify.close()
    return Networkd(ns, bus, proc, net, log, networkctl, own_bus)


def _wait_ready(notify: socket.socket, proc: subprocess.Popen[Any], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([notify], [], [], 0.1)
        if ready and b"READY=1" in notify.recv(4096).split(b"\n"):
            return True
    return False


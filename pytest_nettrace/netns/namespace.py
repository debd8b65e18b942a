"""Network namespaces for tests: create, populate, run programs in, remove.

Every namespace is a real kernel object pinned on /run/netns/<name> (so
`ip netns exec <name> …` works), populated through rtnetlink messages
built by pyroute2. All netlink traffic goes over a socket created *inside*
the namespace (see `_rtnl` for why not a plain `IPRoute`), so no request can
land in the host's namespace, whichever thread calls.

Addresses returned by `Namespace.addresses()` are the kernel's full view:
every address of the interface(s), loopback and IPv6 link-local included.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, Union

from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL
from pyroute2.netlink.rtnl import RTM_DELADDR, RTM_GETADDR, RTM_GETLINK, RTM_NEWADDR, RTM_NEWLINK
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD, ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg

from . import mountns as _mountns
from . import ownership as registry
from . import procs as procs
from .linux import netns_cookie_at, netns_inode_of, process_start_time, run_in_thread
from pyroute2.netlink import NLM_F_DUMP

from .rtnl import KernelError, RtnlSocket, decode_addr, decode_link, ifindex_of_reply, open_rtnl_socket
from ..errors import LeftAlone, NamespaceError, NetlinkOperationError

__all__ = [
    "KIND_DUMMY",
    "KIND_DUMMY_STANDIN",
    "CommandFailed",
    "Link",
    "Namespace",
    "NamespaceFactory",
    "RunResult",
    "cleanup_stale",
    "dummy_supported",
]

KIND_DUMMY = "dummy"
#: Kind of the link `add_dummy` makes when the kernel has no dummy driver:
#: a veth whose peer sits, up, in a hidden namespace owned by the Namespace.
KIND_DUMMY_STANDIN = "veth-standin"

AddressLike = Union[str, ipaddress.IPv4Interface, ipaddress.IPv6Interface, ipaddress.IPv4Address, ipaddress.IPv6Address]
_IFNAMSIZ = 16


@dataclass(frozen=True)
class Link:
    """A network interface in a `Namespace`."""

    ifname: str
    index: int
    kind: str
    netns: "Namespace" = field(repr=False, compare=False)


@dataclass(frozen=True)
class RunResult:
    """Outcome of `Namespace.run`."""

    argv: Sequence[str]
    pid: int
    returncode: int
    stdout: str
    stderr: str


class CommandFailed(subprocess.CalledProcessError):
    """`Namespace.run(check=True)` saw a non-zero exit; the message carries
    stderr (and `note`: what else explains it, e.g. a daemon's log lines)."""

    def __init__(self, result: RunResult, netns_name: str, note: str = "") -> None:
        super().__init__(result.returncode, list(result.argv), result.stdout, result.stderr)
        self.netns_name = netns_name
        self.note = note

    def __str__(self) -> str:
        err = (self.stderr or "").strip() or "(no stderr)"
        note = f"\n{self.note}" if self.note else ""
        return f"{self.cmd!r} exited {self.returncode} in {self.netns_name}: {err}{note}"


# --------------------------------------------------------------------------
# Dummy driver detection


_dummy_supported: bool | None = None
_dummy_lock = threading.Lock()


# /sys/module/dummy: the driver is loaded, or built in (its numdummies
# parameter is listed either way)
DUMMY_MODULE = "/sys/module/dummy"


def dummy_supported() -> bool:
    """Whether the kernel can create `dummy` links (checked once per process).

    Tried for real, in a throwaway namespace that is never mounted, and only
    if the driver is already there: asked for a dummy link, the kernel loads
    a modular driver itself, and the module then makes dummy0 in the host's
    namespace (numdummies=1). `modprobe dummy numdummies=0` allows it.
    """
    global _dummy_supported
    with _dummy_lock:
        if _dummy_supported is None and not os.path.isdir(DUMMY_MODULE):
            _dummy_supported = False
        if _dummy_supported is None:
            fd, rtnl = run_in_thread(_open_here, new_netns=True)
            try:
                msg = _linkmsg(attrs=[("IFLA_IFNAME", "probe0"), _linkinfo("dummy")])
                rtnl.request(msg, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
                _dummy_supported = True
            except KernelError:
                _dummy_supported = False
            finally:
                rtnl.close()
                os.close(fd)
        return _dummy_supported


def _open_here() -> tuple[int, RtnlSocket]:
    """In the calling thread's namespace: an fd pinning it and a netlink socket."""
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd, RtnlSocket(open_rtnl_socket())
    except BaseException:
        os.close(fd)
        raise


# --------------------------------------------------------------------------
# Namespace


class Namespace:
    """A network namespace with its loopback up, pinned on /run/netns/<name>.

    Create them with `NamespaceFactory.create()` (or the `netns` /
    `make_netns` fixtures); `close()` removes everything.
    """

    def __init__(self, name: str, fd: int, rtnl: RtnlSocket) -> None:
        # Internal: takes ownership of `fd` (pinning the namespace) and `rtnl`.
        self.name = name
        self.path = registry.path_of(name)
        self.inode: int = os.fstat(fd).st_ino
        self._cookie = netns_cookie_at(f"/proc/self/fd/{fd}")  # identifies it even once its inode is reused
        self._fd = fd
        self._rtnl = rtnl
        self._closed = False
        self._procs: list[tuple[subprocess.Popen[Any], int]] = []  # started here, with their pidfd
        self._sockets: "weakref.WeakSet[socket.socket]" = weakref.WeakSet()
        self._ipr: Any = None
        self._ipr_socket: socket.socket | None = None  # closed again at teardown in case IPRoute.close() fails
        self._standins: set[int] = set()  # ifindexes of dummy stand-ins
        self._helper: tuple[int, RtnlSocket] | None = None  # hidden ns of stand-in peers
        self._helper_links = 0
        self._lock = threading.Lock()  # guards the lazily made helper ns and ipr

    @classmethod
    def _create(cls) -> "Namespace":
        try:
            record = registry.record()
            registry.ensure_run_dir()
            while True:
                name = registry.new_name()
                path = registry.path_of(name)
                try:
                    registry.reserve(path)
                    break
                except FileExistsError:  # someone else's (or an earlier boot's): not ours
                    continue
            record.netns(name, None, None)  # the placeholder file is ours
        except OSError as exc:
            if isinstance(exc, PermissionError) and os.geteuid() != 0:
                # the first file it writes (the session's record or /run/netns) is only where it shows
                err = NamespaceError(f"network namespaces need root (euid {os.geteuid()}): run the tests as root "
                                     f"(sudo) — {exc.filename or registry.NETNS_RUN_DIR}: {exc.strerror}")
            else:
                hint = " (needs root)" if isinstance(exc, PermissionError) else ""
                err = NamespaceError(f"cannot register a network namespace in {registry.NETNS_RUN_DIR}: {exc}{hint}")
            err.unprivileged = isinstance(exc, PermissionError)
            raise err from None
        dev = registry.nsfs_dev()

        def inside_new_netns() -> tuple[int, RtnlSocket]:
            fd, rtnl = _open_here()
            try:
                record.netns(name, os.fstat(fd).st_ino, dev)  # recorded before it is pinned
                registry.mount_current_thread_netns(path)
            except BaseException:
                rtnl.close()
                os.close(fd)
                raise
            return fd, rtnl

        try:
            fd, rtnl = run_in_thread(inside_new_netns, new_netns=True)
        except OSError as exc:
            try:
                registry.remove_entry(path, None)
                record.netns_gone(name)
            except (OSError, registry.NotOurs):
                pass  # still recorded: stale cleanup will look again
            err = NamespaceError(f"cannot create network namespace {name}: {exc.strerror or exc}")
            err.unprivileged = isinstance(exc, PermissionError)
            raise err from None
        ns = cls(name, fd, rtnl)
        try:
            ns.set_up("lo")
        except BaseException:
            ns.close()
            raise
        return ns

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"inode={self.inode}"
        return f"<Namespace {self.name} {state}>"

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise NamespaceError(f"network namespace {self.name} is already removed")

    # -- netlink plumbing ---------------------------------------------------

    def _request(self, what: str, msg: Any, msg_type: int, flags: int = 0,
                 rtnl: RtnlSocket | None = None) -> list[bytes]:
        self._check_open()
        try:
            return (rtnl or self._rtnl).request(msg, msg_type, flags)
        except KernelError as exc:
            err = NetlinkOperationError(f"cannot {what} in {self.name}: {exc.reason}")
            err.errno = exc.errno  # type: ignore[attr-defined]
            raise err from None

    def _index(self, ifname: str) -> int:
        _check_ifname(ifname)
        reply = self._request(f"find link {ifname}", _linkmsg(attrs=[("IFLA_IFNAME", ifname)]), RTM_GETLINK)
        return ifindex_of_reply(reply[0])

    def _set_flags(self, ifname: str, up: bool) -> None:
        _check_ifname(ifname)
        msg = _linkmsg(flags=IFF_UP if up else 0, change=IFF_UP, attrs=[("IFLA_IFNAME", ifname)])
        self._request(f"set {ifname} {'up' if up else 'down'}", msg, RTM_NEWLINK)

    def _address_request(self, msg_type: int, ifname: str, index: int, iface: Any, dad: bool) -> None:
        msg = ifaddrmsg()
        msg["family"] = socket.AF_INET if iface.version == 4 else socket.AF_INET6
        msg["prefixlen"] = iface.network.prefixlen
        msg["index"] = index
        msg["flags"] = 0 if (dad or iface.version == 4) else IFA_F_NODAD
        addr = str(iface.ip)
        msg["attrs"] = [("IFA_LOCAL", addr), ("IFA_ADDRESS", addr)]
        verb = "add address {} to {}" if msg_type == RTM_NEWADDR else "delete address {} from {}"
        flags = NLM_F_CREATE | NLM_F_EXCL if msg_type == RTM_NEWADDR else 0
        self._request(verb.format(iface.with_prefixlen, ifname), msg, msg_type, flags)

    def _add_addresses(self, ifname: str, index: int, ifaces: Iterable[Any], dad: bool) -> None:
        for iface in ifaces:
            self._address_request(RTM_NEWADDR, ifname, index, iface, dad)

    # -- links --------------------------------------------------------------

    def add_dummy(self, ifname: str, *addresses: AddressLike, dad: bool = False) -> Link:
        """Add a dummy interface, up, with `addresses` (IPv6 without DAD unless `dad`).

        Without a dummy driver the link is a veth whose peer stays up in a
        hidden namespace owned by this one; its kind is KIND_DUMMY_STANDIN.
        """
        _check_ifname(ifname)
        ifaces = [parse_address(a) for a in addresses]
        self._check_open()
        if dummy_supported():
            msg = _linkmsg(flags=IFF_UP, change=IFF_UP, attrs=[("IFLA_IFNAME", ifname), _linkinfo("dummy")])
            self._request(f"add dummy {ifname}", msg, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
            index, kind = self._index(ifname), KIND_DUMMY
        else:
            helper_rtnl, hidden_name = self._helper_link_name()
            # Created from the hidden side so that side is up from birth; the
            # visible end is born in this namespace and brought up below.
            peer = _linkmsg(attrs=[("IFLA_IFNAME", ifname), ("IFLA_NET_NS_FD", self._fd)])
            msg = _linkmsg(flags=IFF_UP, change=IFF_UP, attrs=[("IFLA_IFNAME", hidden_name), _linkinfo("veth", peer)])
            self._request(f"add dummy stand-in {ifname}", msg, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, rtnl=helper_rtnl)
            self._set_flags(ifname, up=True)
            index, kind = self._index(ifname), KIND_DUMMY_STANDIN
            self._standins.add(index)
        self._add_addresses(ifname, index, ifaces, dad)
        return Link(ifname, index, kind, self)

    def _helper_link_name(self) -> tuple[RtnlSocket, str]:
        """The hidden namespace's netlink socket and a fresh name for a link there."""
        with self._lock:
            # Held only by an fd: never visible in /run/netns, gone with the process.
            if self._helper is None:
                self._helper = run_in_thread(_open_here, new_netns=True)
            self._helper_links += 1
            return self._helper[1], f"sb{self._helper_links}"

    def add_veth(
        self,
        ifname: str,
        peer_ns: "Namespace",
        peer_ifname: str,
        addresses: Iterable[AddressLike] = (),
        peer_addresses: Iterable[AddressLike] = (),
        *,
        dad: bool = False,
    ) -> tuple[Link, Link]:
        """Add a veth pair `ifname` (here) <-> `peer_ifname` (in `peer_ns`, may be self), both up."""
        _check_ifname(ifname)
        _check_ifname(peer_ifname)
        ifaces = _parse_addresses(addresses, "addresses")
        peer_ifaces = _parse_addresses(peer_addresses, "peer_addresses")
        if not isinstance(peer_ns, Namespace):
            raise TypeError(f"peer_ns must be a Namespace, not {type(peer_ns).__name__}")
        self._check_open()
        peer_ns._check_open()
        peer_attrs: list[tuple[str, Any]] = [("IFLA_IFNAME", peer_ifname)]
        if peer_ns is not self:
            peer_attrs.append(("IFLA_NET_NS_FD", peer_ns._fd))
        # The peer cannot be born up (the kernel refuses to open a veth end
        # before its pair exists), so it is brought up by its own namespace.
        veth_info = _linkinfo("veth", _linkmsg(attrs=peer_attrs))
        msg = _linkmsg(flags=IFF_UP, change=IFF_UP, attrs=[("IFLA_IFNAME", ifname), veth_info])
        where = "" if peer_ns is self else f" (peer in {peer_ns.name})"
        self._request(f"add veth {ifname}/{peer_ifname}{where}", msg, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
        peer_ns._set_flags(peer_ifname, up=True)
        link = Link(ifname, self._index(ifname), "veth", self)
        peer = Link(peer_ifname, peer_ns._index(peer_ifname), "veth", peer_ns)
        self._add_addresses(ifname, link.index, ifaces, dad)
        peer_ns._add_addresses(peer_ifname, peer.index, peer_ifaces, dad)
        return link, peer

    def add_bridge(self, ifname: str, ports: Iterable[str] = ()) -> Link:
        """Add a bridge, up, STP off and no forward delay; enslave `ports` (ifnames here)."""
        _check_ifname(ifname)
        ports = list(ports)
        for port in ports:
            _check_ifname(port)
        info = _linkinfo("bridge", data=[("IFLA_BR_FORWARD_DELAY", 0)])
        msg = _linkmsg(flags=IFF_UP, change=IFF_UP, attrs=[("IFLA_IFNAME", ifname), info])
        self._request(f"add bridge {ifname}", msg, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
        index = self._index(ifname)
        for port in ports:
            msg = _linkmsg(attrs=[("IFLA_IFNAME", port), ("IFLA_MASTER", index)])
            self._request(f"enslave {port} to bridge {ifname}", msg, RTM_NEWLINK)
        return Link(ifname, index, "bridge", self)

    def link(self, ifname: str) -> Link:
        """Look up an interface of this namespace by name."""
        _check_ifname(ifname)
        reply = self._request(f"find link {ifname}", _linkmsg(attrs=[("IFLA_IFNAME", ifname)]), RTM_GETLINK)
        msg = decode_link(reply[0])
        if msg["index"] in self._standins:
            kind = KIND_DUMMY_STANDIN
        else:
            info = msg.get_attr("IFLA_LINKINFO")
            kind = (info.get_attr("IFLA_INFO_KIND") if info else None) or ("loopback" if msg["index"] == 1 else "")
        return Link(ifname, msg["index"], kind, self)

    def set_up(self, ifname: str) -> None:
        """Bring an interface up."""
        self._set_flags(ifname, up=True)

    def set_down(self, ifname: str) -> None:
        """Bring an interface down."""
        self._set_flags(ifname, up=False)

    # -- addresses ----------------------------------------------------------

    def add_address(self, ifname: str, address: AddressLike, *, dad: bool = False) -> None:
        """Add an address ("10.0.0.1/24", "2001:db8::1/64"); IPv6 skips DAD unless `dad`."""
        iface = parse_address(address)
        self._address_request(RTM_NEWADDR, ifname, self._index(ifname), iface, dad)

    def del_address(self, ifname: str, address: AddressLike) -> None:
        """Remove an address from an interface."""
        iface = parse_address(address)
        self._address_request(RTM_DELADDR, ifname, self._index(ifname), iface, dad=True)

    def addresses(self, ifname: str | None = None) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
        """All addresses of `ifname` (of every interface when None), as the kernel lists them.

        Unfiltered: loopback and IPv6 link-local addresses are included.
        """
        index = self._index(ifname) if ifname is not None else None
        msg = ifaddrmsg()
        replies = self._request("list addresses", msg, RTM_GETADDR, NLM_F_DUMP)
        found = []
        for raw in replies:
            addr = decode_addr(raw)
            if index is not None and addr["index"] != index:
                continue
            ip = addr.get_attr("IFA_LOCAL") or addr.get_attr("IFA_ADDRESS")
            found.append(ipaddress.ip_interface(f"{ip}/{addr['prefixlen']}"))
        return found

    # -- processes and sockets ----------------------------------------------

    def popen(self, argv: Sequence[str], *, host_view: bool = False, etc: "str | os.PathLike[str] | bool | None" = None,
              private_dirs: Sequence["str | os.PathLike[str]"] = (), readonly_sys: bool = False,
              mounts_of: "subprocess.Popen[Any] | int | None" = None, **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start a program inside the namespace, for daemons; stopped at teardown.

        As with `ip netns exec`, it gets a mount namespace of its own where
        /sys shows this namespace's devices (read-only with `readonly_sys`,
        or when the host's is) and each entry of /etc/netns/<name>/ is bound
        over the same name in /etc; `etc=DIR` binds DIR's entries instead,
        `etc=False` none. `private_dirs` ("/run/NetworkManager", ...) become
        empty writable tmpfs directories, made if the host has none (the
        host's filesystem is never touched). `host_view=True`: none of this,
        the program sees the host's mounts. `mounts_of=proc` (a Popen or a
        pid): the mount namespace of that running program instead, to see
        a daemon's private directories (`networkctl` reading networkd's state).

        Stopped at teardown with the processes it started (SIGTERM, SIGKILL
        after a second). It runs in a new session unless
        `start_new_session=False`. Its environment gets
        NETTRACE_SESSION=<secret>: that marks its descendants (even daemons
        that forked away) as the test's.
        """
        self._check_open()
        procs.adopt_orphans()
        setup = self._mount_setup(host_view, etc, private_dirs, readonly_sys, mounts_of)
        popen_kwargs.setdefault("start_new_session", True)
        record = registry.record()
        env = popen_kwargs.get("env")
        popen_kwargs["env"] = dict(os.environ if env is None else env, **{registry.TOKEN_ENV: record.token})

        def start() -> subprocess.Popen[Any]:
            if setup is not None:
                _mountns.enter(setup)
            return subprocess.Popen(argv, **popen_kwargs)

        proc = run_in_thread(start, netns_fd=self._fd)
        # Not reaped yet, so the pid is still this child's when the pidfd is opened.
        pidfd = os.pidfd_open(proc.pid)
        record.process(proc.pid, process_start_time(proc.pid), self.name)
        self._procs.append((proc, pidfd))
        return proc

    def _mount_setup(self, host_view: bool, etc: Any, private_dirs: Sequence[Any],
                     readonly_sys: bool, mounts_of: Any) -> "_mountns.MountSetup | None":
        dirs = _mountns.check_private_dirs(private_dirs)
        if host_view or mounts_of is not None:
            if dirs or etc not in (None, False) or readonly_sys or (host_view and mounts_of is not None):
                what = "host_view=True runs with the host's mounts" if host_view else \
                    "mounts_of= runs with that program's mounts"
                raise ValueError(f"{what}: no etc, private_dirs, readonly_sys" +
                                 (" or mounts_of" if host_view else ""))
            if host_view:
                return None
            pid = mounts_of if isinstance(mounts_of, int) else getattr(mounts_of, "pid", None)
            if not isinstance(pid, int) or isinstance(pid, bool):
                raise TypeError(f"mounts_of takes a Popen or a pid, not {mounts_of!r}")
            if getattr(mounts_of, "returncode", None) is not None or not os.path.exists(f"/proc/{pid}/ns/mnt"):
                raise ValueError(f"mounts_of: process {pid} is not running")
            return _mountns.MountSetup(self.name, (), (), False, join_pid=pid)
        return _mountns.MountSetup(self.name, _mountns.etc_binds(self.name, etc), dirs, readonly_sys)

    def run(self, argv: Sequence[str], *, check: bool = False, timeout: float = 30, input: str | None = None,
            env: dict[str, str] | None = None, cwd: str | None = None, host_view: bool = False,
            etc: "str | os.PathLike[str] | bool | None" = None, private_dirs: Sequence["str | os.PathLike[str]"] = (),
            readonly_sys: bool = False, mounts_of: "subprocess.Popen[Any] | int | None" = None) -> RunResult:
        """Run a program inside the namespace and wait for it (text output).

        Mounts as for `popen` (`ip netns exec` semantics; `host_view`, `etc`,
        `private_dirs`, `readonly_sys`, `mounts_of` likewise). On timeout the program is
        killed and subprocess.TimeoutExpired raised; with `check`, a non-zero
        exit raises CommandFailed (stderr included). `env` and `cwd` are
        passed to subprocess as they are.
        """
        stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
        proc = self.popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=cwd, host_view=host_view, etc=etc, private_dirs=private_dirs,
                          readonly_sys=readonly_sys, mounts_of=mounts_of)
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            procs.send(next(fd for p, fd in self._procs if p is proc), signal.SIGKILL)
            proc.wait()
            raise
        result = RunResult(list(argv), proc.pid, proc.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise CommandFailed(result, self.name)
        return result

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        """A socket that belongs to this namespace (closed at teardown if still open)."""
        self._check_open()
        sock = run_in_thread(lambda: socket.socket(family, type, proto), netns_fd=self._fd)
        self._sockets.add(sock)
        return sock

    @property
    def ipr(self) -> Any:
        """A pyroute2 `IPRoute` whose socket lives in this namespace (created on first use).

        pyroute2 0.9 limits: call it from the thread that first touched it
        (others get RuntimeError, never the host), and not from inside a
        running asyncio loop.
        """
        self._check_open()
        with self._lock:
            if self._ipr is None:
                from pyroute2 import IPRoute

                self._ipr_socket = run_in_thread(
                    lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE), netns_fd=self._fd
                )
                self._ipr = IPRoute(use_socket=self._ipr_socket)
        return self._ipr

    # -- teardown -----------------------------------------------------------

    def _inodes(self) -> set[int]:
        inodes = {self.inode}
        if self._helper is not None:
            inodes.add(os.fstat(self._helper[0]).st_ino)
        return inodes

    def close(self) -> None:
        """Remove the namespace: its processes, sockets, then the namespace itself.

        Links go with the namespace: deleting them one by one would cost an
        RCU grace period each (~20 ms), while the kernel frees a namespace's
        links in the background. Idempotent; raises NamespaceError naming
        whatever could not be removed, warns (LeftAlone) about what it left
        because it is not the test's.
        """
        if not self._closed:
            _remove([self])

    def _release(self, errors: list[str]) -> None:
        """Everything but processes: sockets, fds, the /run/netns entry."""
        self._closed = True
        for sock in list(self._sockets):
            sock.close()
        if self._ipr is not None:
            try:
                self._ipr.close()
            except Exception as exc:
                errors.append(f"closing IPRoute: {exc}")
        if self._ipr_socket is not None:
            self._ipr_socket.close()
        self._rtnl.close()
        try:
            registry.remove_entry(self.path, self.inode)
            registry.record().netns_gone(self.name)
        except registry.NotOurs as exc:
            registry.record().netns_gone(self.name)
            warnings.warn(LeftAlone(f"{exc}: left alone"), stacklevel=4)
        except OSError as exc:
            errors.append(f"removing {self.path}: {exc.strerror or exc}")
        os.close(self._fd)
        if self._helper is not None:
            self._helper[1].close()
            os.close(self._helper[0])


def _remove(namespaces: list[Namespace]) -> None:
    """Stop the processes the tests started in `namespaces` (and only those),
    then remove the namespaces; raise NamespaceError naming what could not be
    removed and warn (LeftAlone) about what was left because it is not ours:
    processes that joined from outside, fds and mounts keeping one alive."""
    if not namespaces:
        return
    errors: list[str] = []
    notes: list[str] = []
    inodes = set().union(*(ns._inodes() for ns in namespaces))
    started = [(ns, proc, fd) for ns in namespaces for proc, fd in ns._procs]
    try:
        token = registry.record().token
        for _, proc, fd in started:
            if proc.returncode is None:
                procs.send(fd, signal.SIGTERM)
        # Children of the started ones (daemons that forked) get their turn
        # too; a second look catches what they forked meanwhile.
        killed: set[int] = set()
        for round_ in range(3):
            found = procs.classify(inodes, token, [p.pid for _, p, _ in started if p.returncode is None])
            ours = found.ours
            killed |= set(ours)
            if round_ == 0:
                for _, proc, fd in started:
                    if proc.returncode is None and proc.pid not in ours:
                        ours[proc.pid] = os.dup(fd)
            if not ours:
                break
            left = procs.terminate(ours, grace=1.0 if round_ == 0 else 0)
            if left:
                errors.append(f"processes {', '.join(map(procs.describe, left))} would not die")
                break
        for _, proc, fd in started:
            proc.poll()  # reap: they are dead by now
            os.close(fd)
        procs.reap_adopted(killed - {proc.pid for _, proc, _ in started})
        if found.foreign:
            where = {pid: ns.name for pid in found.foreign for ns in namespaces if netns_inode_of(pid) in ns._inodes()}
            notes += [f"process {procs.describe(pid)} joined {where.get(pid, 'a test namespace')} from outside: "
                      "left running (it keeps the namespace alive)" for pid in found.foreign]
    except Exception as exc:  # keep going: the mounts must go regardless
        errors.append(f"stopping processes: {exc}")
    for ns in namespaces:
        ns._procs.clear()
    for ns in reversed(namespaces):
        ns_errors: list[str] = []
        ns._release(ns_errors)
        errors.extend(f"{ns.name}: {e}" for e in ns_errors)
    cookies = {ns.inode: ns._cookie for ns in namespaces}
    notes += [f"a test namespace stays alive: {h}" for h in procs.holders(cookies, [ns.path for ns in namespaces])]
    for note in notes:
        warnings.warn(LeftAlone(note), stacklevel=3)
    if errors:
        raise NamespaceError("could not remove everything: " + "; ".join(errors))


# --------------------------------------------------------------------------
# Factory


class NamespaceFactory:
    """Creates namespaces and removes them all on `close()`.

    Listeners (callables taking the new Namespace) are told about each one,
    which is how tracing can watch every namespace a test makes.
    """

    def __init__(self, on_create: Callable[[Namespace], Any] | None = None) -> None:
        self._listeners: list[Callable[[Namespace], Any]] = [on_create] if on_create else []
        self.namespaces: list[Namespace] = []
        self._closed = False

    def add_listener(self, callback: Callable[[Namespace], Any]) -> None:
        """Call `callback(ns)` for every namespace created from now on."""
        self._listeners.append(callback)

    def create(self) -> Namespace:
        """A fresh namespace, loopback up."""
        if self._closed:
            raise NamespaceError("NamespaceFactory is closed")
        ns = Namespace._create()
        self.namespaces.append(ns)
        for callback in self._listeners:
            callback(ns)
        return ns

    def close(self) -> None:
        """Remove every namespace (processes first, then the namespaces).

        Tries everything, then raises one NamespaceError if anything is left.
        """
        self._closed = True
        _remove([ns for ns in self.namespaces if not ns.closed])

    def __enter__(self) -> "NamespaceFactory":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# --------------------------------------------------------------------------
# Stale namespaces


def cleanup_stale() -> list[str]:
    """Remove what processes that died left: the namespaces their records
    name (if the entry still is the recorded namespace) and the processes
    they started in them. Returns the names removed; what it leaves is
    warned about (LeftAlone). Waits while a test holds the stale lock
    (registry.STALE_LOCK) exclusively; a session such a test starts meanwhile
    skips the cleanup with NETTRACE_KEEP_STALE=1, or is the one that cleans
    with NETTRACE_STALE_LOCK_HELD=1 (the test holds the lock for it).
    """
    if os.environ.get("NETTRACE_KEEP_STALE"):
        return []
    if os.environ.get("NETTRACE_STALE_LOCK_HELD"):
        return remove_stale()
    with registry.stale_cleanup_lock():
        return remove_stale()


def remove_stale() -> list[str]:
    """cleanup_stale() without the stale lock: the names removed; what could
    not be removed or is not provably ours is warned about (LeftAlone)."""
    removed: list[str] = []
    for rec in registry.dead_records():
        same_pidns = rec.pidns == os.stat("/proc/self/ns/pid").st_ino
        # Only namespaces still pinned where recorded: a freed one's inode may
        # be some other namespace's by now.
        inodes = {ino for name, (ino, dev) in rec.namespaces.items() if ino is not None
                  and _entry_is(registry.path_of(name), ino, dev)}
        # Only what the record proves ours: the started processes (same pid
        # and start time; pids mean something only in the owner's PID
        # namespace) and the processes carrying its token.
        pids = {pid: start for pid, start, _ in rec.processes} if same_pidns else {}
        pidfds = {pid: fd for pid, start in pids.items() if (fd := procs.open_pidfd(pid, start)) is not None}
        found = procs.classify(inodes, rec.token)
        # and those carrying its secret anywhere else: with the namespaces'
        # entries removed (ip netns del), none of the above finds them, and
        # the record, forgotten below, was the only thing that named them
        found.ours.update(procs.carrying(rec.token, skip=set(found.ours) | set(pidfds)))
        for pid, fd in found.ours.items():
            if pid in pidfds:
                os.close(fd)
            else:
                pidfds[pid] = fd
        left = procs.terminate(pidfds, grace=0)
        problems = [f"process {procs.describe(pid)} of a dead session would not die" for pid in left]
        problems += [f"process {procs.describe(pid)} is in a namespace of a dead session but not its: left running"
                     for pid in found.foreign if pid not in pidfds]
        kept = False
        for name, (ino, dev) in rec.namespaces.items():
            path = registry.path_of(name)
            try:
                registry.remove_entry(path, ino, dev)
                removed.append(name)
            except registry.NotOurs as exc:
                problems.append(f"{exc}: left alone")
            except OSError as exc:
                problems.append(f"cannot remove {path}: {exc.strerror or exc}")
                kept = True  # another session will try again
        for problem in problems:
            warnings.warn(LeftAlone(problem), stacklevel=2)
        if not kept:
            rec.forget()
    return removed


def _entry_is(path: str, inode: int, dev: int | None) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return st.st_ino == inode and st.st_dev == (dev if dev is not None else registry.nsfs_dev())


# --------------------------------------------------------------------------
# Validation and message building


def parse_address(address: AddressLike) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """"10.0.0.1/24" / "2001:db8::1/64" / ipaddress objects -> an interface (bare IP = host prefix)."""
    if isinstance(address, (ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
        return address
    if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return ipaddress.ip_interface(address)
    if not isinstance(address, str):
        # ipaddress would take 5 for 0.0.0.5 and b"\n\0\0\1" for 10.0.0.1: a slip, not an address
        raise TypeError(f"an address is a str like '192.168.0.1/24' or an ipaddress object, "
                        f"not {type(address).__name__} {address!r}")
    try:
        return ipaddress.ip_interface(address)
    except (ValueError, TypeError):
        raise ValueError(f"malformed address {address!r}: expected e.g. '192.168.0.1/24' or '2001:db8::1/64'") from None


def _parse_addresses(addresses: Iterable[AddressLike], what: str) -> list[Any]:
    if isinstance(addresses, (str, bytes, ipaddress.IPv4Interface, ipaddress.IPv6Interface,
                              ipaddress.IPv4Address, ipaddress.IPv6Address)):
        raise TypeError(f"{what} must be a list of addresses, not one {type(addresses).__name__}: "
                        f"write {what}=[{str(addresses)!r}]")
    return [parse_address(a) for a in addresses]


def _check_ifname(ifname: object) -> None:
    # The kernel's dev_valid_name(), checked here for a clearer message.
    if not isinstance(ifname, str):
        raise TypeError(f"interface name must be a str, not {type(ifname).__name__}")
    encoded = ifname.encode()
    if not 0 < len(encoded) < _IFNAMSIZ or ifname in (".", "..") or any(c in ifname for c in "/: \t\n\0"):
        raise ValueError(f"invalid interface name {ifname!r}: 1-15 bytes, no '/', ':' or whitespace")


def _linkmsg(flags: int = 0, change: int = 0, attrs: list[Any] | None = None) -> ifinfmsg:
    msg = ifinfmsg()
    msg["flags"] = flags
    msg["change"] = change
    msg["attrs"] = attrs or []
    return msg


def _linkinfo(kind: str, peer: ifinfmsg | None = None, data: list[Any] | None = None) -> tuple[str, dict[str, Any]]:
    attrs: list[Any] = [("IFLA_INFO_KIND", kind)]
    if peer is not None:
        attrs.append(("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", {"attrs": peer["attrs"]})]}))
    elif data:
        attrs.append(("IFLA_INFO_DATA", {"attrs": data}))
    return ("IFLA_LINKINFO", {"attrs": attrs})

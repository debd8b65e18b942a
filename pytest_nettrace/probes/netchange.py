"""Network configuration changes with the process that made them
(bpf/netchange.bpf.c, bpf/netchange.h): kinds "addr", "link", "route",
"neigh", "rule", "nexthop" (rtnetlink) and "nft" (nftables).

The plugin owns one rtnetlink monitor socket per watched namespace. The BPF
program fires when the kernel queues a notification on it — in the context of
the task that caused the change — and copies the task, its command line, the
kernel stack and the message. This module decodes the message (what changed)
and tells from the stack how it was asked for (netlink, ioctl or the kernel).
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
import functools
import ipaddress
import os
import random
import socket
import struct
import time
from typing import (TYPE_CHECKING, AbstractSet, Any, Dict, FrozenSet, Iterator, List, NamedTuple, Optional, Sequence,
                    Set, Tuple, Type, Union, cast)

from ..netns.linux import in_netns_at
from ..events import (Event, Header, IPAddress, IPInterface, IPNetwork, Stack, command_line, parse_address,
                      quoted_command, user_name)
from ..events import CHOICE, IP_PROTO, FieldType, IpProto
from ..kernel import wire
from ..kernel.wire import NC_F_NFT, NC_F_QUEUED_BY, NC_SOCK_NFT, NC_SOCK_RTNL, NT_F_KTHREAD
from ..kernel.libbpf import map_delete, map_lookup, map_update
from ..kernel.symbols import frame_function, function_ranges
from . import _nft
from .nftrace import TABLE as NFTRACE_TABLE
from .base import Decoder, Plan, Probe
from .context import AddressFilter, CommonFilters, Filter, KindApi

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..kernel.capabilities import KernelFeatures
    from ..kernel.libbpf import LoadedMaps

# Notifications queue on the monitor socket for the whole test (see poll()):
# 256 MiB of receive buffer is several hundred thousand small messages.
MONITOR_RCVBUF = 128 << 20
RECORD, NFT_RECORD = wire.NETCHANGE_EVENT, wire.NFTCHANGE_EVENT
_BODY, _NFT_BODY = RECORD.body, NFT_RECORD.body
_NLMSG = struct.Struct("<IHHII")
_RTA = struct.Struct("<HH")
_KEY = wire.NC_SOCK_KEY.struct
_DAD_PROGRAMS = ("nc_queue_work", "nc_timer_start", "nc_work_start", "nc_work_end")

# rtnetlink message types and multicast groups (uapi/linux/rtnetlink.h)
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR, RTM_NEWROUTE, RTM_DELROUTE = \
    16, 17, 18, 20, 21, 22, 24, 25
AF_BRIDGE = 7
RTM_SETLINK = 19
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
_GROUPS = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
# neighbours and policy-routing rules (issue 15): RTNLGRP_NEIGH, RTNLGRP_IPV4_RULE, RTNLGRP_IPV6_RULE
RTMGRP_NEIGH, RTMGRP_IPV4_RULE, RTMGRP_IPV6_RULE = 0x4, 0x80, 1 << (19 - 1)
_GROUPS |= RTMGRP_NEIGH | RTMGRP_IPV4_RULE | RTMGRP_IPV6_RULE
IFF_UP = 0x1
# uapi/linux/if_link.h: how a link request names its link, and where it moves it
IFLA_IFNAME, IFLA_NET_NS_PID, IFLA_NET_NS_FD, IFLA_TARGET_NETNSID = 3, 19, 28, 46
IFA_F_SECONDARY = 0x1
IFA_F_NODAD = 0x2
# Deleting an IPv4 primary address deletes the secondaries of its subnet
# first, or promotes one (net.ipv4.conf.*.promote_secondaries), in the same
# request: __inet_del_ifa, under the netlink or ioctl handler
_DELETING_AN_IPV4_ADDRESS = frozenset(("__inet_del_ifa", "inet_rtm_deladdr"))
_EXPIRED = "address lifetime expired"
# the preferred lifetime ran out before the valid one: the kernel keeps the
# address, deprecated (IFA_F_DEPRECATED), and picks it no more as a source
_DEPRECATED = "preferred lifetime expired: deprecated, kept until its valid lifetime ends"
IFA_F_DEPRECATED = 0x20
# an IPv4 secondary removed by the lifetime worker with time left: its
# subnet's primary ran out (corrected to name it when that one follows)
_WITH_AN_EXPIRED_PRIMARY = "removed with the primary address of its subnet, whose lifetime expired"
IFA_CACHEINFO = 6
INFINITY_LIFE_TIME = 0xFFFFFFFF
NLM_F_REPLACE = 0x100
# linux/netlink.h; pyroute2's message classes are imported where requests are
# built: importing any of pyroute2 costs ~100 ms, on the path to attached probes
NLM_F_REQUEST, NLM_F_DUMP, NLMSG_ERROR, NLMSG_DONE = 0x1, 0x300, 2, 3
SOL_NETLINK, NETLINK_ADD_MEMBERSHIP = 270, 1
SO_RCVBUFFORCE = 33       # asm-generic/socket.h: not in Python's socket module
NETLINK_NETFILTER = 12    # linux/netlink.h: not in Python's socket module
RT_TABLES = {253: "default", 254: "main", 255: "local"}


class _RouteTable(FieldType):
    """A routing table: its name where it has one (main, local, default), else its number."""

    def check(self, owner: Any, field: str, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            if value in RT_TABLES:
                raise ValueError(f"{field} {value} of {owner.kind!r} events is named: write {RT_TABLES[value]!r}")
            return value
        if value not in RT_TABLES.values():
            raise ValueError(f"unknown {field} {value!r} for {owner.kind!r} events; valid: "
                             f"{', '.join(RT_TABLES.values())} or a table's number")
        return value


ROUTE_TABLE = _RouteTable()
RTN_TYPES = {1: "unicast", 2: "local", 3: "broadcast", 4: "anycast", 5: "multicast", 6: "blackhole",
             7: "unreachable", 8: "prohibit", 9: "throw", 10: "nat"}
_OPERSTATES = {0: "UNKNOWN", 1: "NOTPRESENT", 2: "DOWN", 3: "LOWERLAYERDOWN", 4: "TESTING", 5: "DORMANT", 6: "UP"}

# Which rtnetlink / ioctl handlers ask for which kind of change.
_NETLINK_HANDLERS: Dict[str, Tuple[str, ...]] = {
    "addr": ("inet_rtm_newaddr", "inet_rtm_deladdr", "inet6_rtm_newaddr", "inet6_rtm_deladdr"),
    "link": ("rtnl_newlink", "rtnl_dellink", "rtnl_setlink", "__rtnl_newlink"),
    "route": ("inet_rtm_newroute", "inet_rtm_delroute", "inet6_rtm_newroute", "inet6_rtm_delroute"),
}
# What a handler calls last, where a compiler's tail call leaves the handler
# out of the stack (Debian 6.1's inet_rtm_newaddr: rtnetlink_rcv_msg then
# __inet_insert_ifa): the request's own change when a netlink request is in
# the stack, no notifier and no other kind's handler
_HANDLER_TAILS: Dict[str, Tuple[str, ...]] = {"addr": ("__inet_insert_ifa",)}
_IOCTL_HANDLERS = {
    "addr": ("devinet_ioctl", "addrconf_add_ifaddr", "addrconf_del_ifaddr", "addrconf_set_dstaddr"),
    # SIOCSIFFLAGS on an AF_INET socket (busybox ip, ifconfig) reaches
    # dev_change_flags through devinet_ioctl
    "link": ("dev_ifsioc", "dev_ioctl", "devinet_ioctl"),
    "route": ("ip_rt_ioctl", "ipv6_route_ioctl"),
}
# An address or route announced from a notifier chain follows from a change
# of something else (a link set down or removed, an address deleted): no
# program asked for it, however that other change was asked for.
_NOTIFIER_FRAMES = ("notifier_call_chain", "raw_notifier_call_chain", "blocking_notifier_call_chain",
                    "call_netdevice_notifiers_info", "call_netdevice_notifiers")
_ANY_NETLINK = ("rtnetlink_rcv_msg", "netlink_rcv_skb", "netlink_sendmsg")
# IPv6 privacy extensions: the temporary addresses the kernel makes from a
# mngtmpaddr address (and their routes), and removes with it, under the
# request that named only that address
_TEMPADDR_CREATED = ("ipv6_create_tempaddr",)
_TEMPADDR_DELETED = ("delete_tempaddrs",)
_ANY_IOCTL = ("sock_ioctl", "sock_do_ioctl", "inet_ioctl", "inet6_ioctl", "dev_ioctl", "__x64_sys_ioctl",
              "__arm64_sys_ioctl", "__se_sys_ioctl")
# What set the kernel off, searched before the details below: (frames, frames
# too or () for none, detail). The removals of a link down, the neighbour
# flush of an address change, also follow other requests; each trigger has
# its names of 6.1 to 6.18 (dev_* became netif_* in 6.15) as alternatives.
_NETNS_CHANGE = ("__dev_change_net_namespace", "dev_change_net_namespace", "netif_change_net_namespace")
_MTU_SET = ("netif_set_mtu_ext", "dev_set_mtu_ext", "netif_set_mtu", "dev_set_mtu", "call_netdevice_notifiers_mtu")
_TRIGGERS: Tuple[Tuple[Tuple[str, ...], Tuple[str, ...], str], ...] = (
    # inetdev_event re-announces IPv4 addresses under their new label
    (("netif_change_name", "dev_change_name"), (), "the link was renamed"),
    # the MTU notifier stops IPv6 (addrconf_ifdown) below 1280, IPv4
    # (inetdev_destroy, often inlined) below 68; the link stays up
    (_MTU_SET, ("addrconf_ifdown", "rt6_disable_ip"), "the MTU went below IPv6's minimum (1280)"),
    (_MTU_SET, ("inetdev_destroy", "inetdev_event"), "the MTU went below IPv4's minimum (68)"),
    # closed and unregistered in the old namespace (inetdev_destroy inlined
    # into inetdev_event), announced anew in the new one
    (_NETNS_CHANGE, (), "the link moved to another namespace"),
    # `ip link set arp off|on`: NETDEV_CHANGE with IFF_NOARP changed flushes
    # as an address change does (neigh_changeaddr), from the flags' notifier
    (("neigh_changeaddr",), ("__dev_notify_flags", "netif_change_flags", "dev_change_flags"),
     "the link's NOARP flag changed (arp on/off)"),
)
# Kernel-initiated changes: the first matching frame names why.
_KERNEL_DETAILS = (
    (_TEMPADDR_CREATED, "temporary address (IPv6 privacy extensions)"),
    (_TEMPADDR_DELETED, "removed with the address it was made from (IPv6 privacy extensions)"),
    (("addrconf_dad_failure", "addrconf_dad_stop"), "duplicate address detected (DAD failure)"),
    (("unregister_netdevice_many_notify", "unregister_netdevice_many", "unregister_netdevice_queue",
      "inetdev_destroy", "default_device_exit_batch", "cleanup_net"), "device removed"),
    (("addrconf_ifdown", "__dev_close_many", "dev_close_many", "__dev_change_flags", "inetdev_event"),
     "link down"),
    (("addrconf_verify_rtnl", "addrconf_verify_work", "check_lifetime"), "address lifetime expired"),
    (("fib6_run_gc", "fib6_gc_timer_cb", "fib6_age", "fib6_age_exceptions"), "route lifetime expired"),
    (("addrconf_prefix_rcv", "ndisc_router_discovery", "rt6_route_rcv"), "router advertisement"),
    (("addrconf_dad_completed", "addrconf_dad_work", "addrconf_dad_begin"), "duplicate address detection"),
    (("addrconf_add_linklocal", "addrconf_dev_config", "addrconf_addr_gen"), "IPv6 autoconfiguration"),
    (("fib_add_ifaddr", "fib_del_ifaddr", "fib_netdev_event", "fib_inetaddr_event"),
     "follows an address or link change"),
    (("netdev_state_change", "netif_state_change", "linkwatch_event", "__linkwatch_run_queue", "linkwatch_do_dev",
      "linkwatch_sync_dev", "__linkwatch_sync_dev"), "carrier change"),
)


# Frames of a link going down, and those only a link coming up shows (what
# `ip link set lo up` adds: 127.0.0.1 from inetdev_event, ::1 from init_loopback)
_GOING_DOWN = frozenset(("addrconf_ifdown", "__dev_close_many", "dev_close_many", "__dev_close", "dev_close",
                         "netif_close", "netif_close_many"))
# (__dev_notify_flags runs NETDEV_UP's notifiers: all but DOWN, which
# removes, add nothing; 6.1 inlines the others)
_COMING_UP = frozenset(("init_loopback", "addrconf_init_auto_addrs", "__dev_open", "dev_open", "netif_open",
                        "__dev_notify_flags", "netif_change_flags", "dev_change_flags"))
_VAGUE = (None, "consequence of a netlink request", "consequence of an ioctl")


# A device acting on another: an upper device (bridge, macvlan, VLAN, bond)
# setting its lower's promiscuity or multicast, a device added on top of one
_ONE_DEVICE_ON_ANOTHER = frozenset(("dev_set_promiscuity", "netif_set_promiscuity", "dev_set_allmulti",
                                    "netif_set_allmulti"))
_UPPER_LINKED = frozenset(("__netdev_upper_dev_link", "netdev_upper_dev_unlink", "__netdev_upper_dev_unlink"))
# A port added to or removed from its master (do_set_master is inlined on 6.1)
_ENSLAVING = frozenset(("do_set_master", "br_add_if", "br_del_if", "bond_enslave", "__bond_release_one",
                        "team_port_add", "team_port_del", "vrf_add_slave", "vrf_del_slave"))
# A device closed or unregistered by a notifier: a macvlan, VLAN or VXLAN
# going with its lower device (macvlan_device_event, vlan_device_event,
# vxlan_netdevice_event run inside the lower's unregistering or down)
_CLOSING = frozenset(("unregister_netdevice_many_notify", "unregister_netdevice_many", "unregister_netdevice_queue",
                      "netif_close_many", "dev_close_many", "__dev_close_many", "netif_close", "dev_close"))
_CHAINS = frozenset(("notifier_call_chain", "raw_notifier_call_chain", "call_netdevice_notifiers_info",
                     "call_netdevice_notifiers"))


@functools.lru_cache(maxsize=256)
def follows_another_link(frames: Tuple[str, ...]) -> bool:
    """Whether a link's notification, under a request, is of a device the
    request did not name: a bridge following its port's MTU or removal (a
    notifier chain run inside another's), a port made promiscuous by its
    bridge, a link given an upper device (`ip link add mv0 link eth0 type
    macvlan`), a bridge's features recomputed for a new port, a macvlan
    removed or set down with its lower link. The port's own change under
    `ip link set p1 master br0` is the request's."""
    names = [frame_function(f) for f in frames]
    functions = frozenset(names)
    # (frames from the innermost: a closing called from within a chain)
    closing = next((i for i, name in enumerate(names) if name in _CLOSING), None)
    if closing is not None and not _CHAINS.isdisjoint(names[closing + 1:]):
        return True
    # one chain run shows as notifier_call_chain, raw_notifier_call_chain
    # calling it, or both (inlining varies by kernel)
    chains = max(names.count("notifier_call_chain"), names.count("raw_notifier_call_chain"))
    if chains >= 2 or not functions.isdisjoint(_ONE_DEVICE_ON_ANOTHER):
        return True
    if not functions.isdisjoint(_UPPER_LINKED):
        # `ip link set X master Y` (do_setlink) links X itself; a new device
        # on top (`ip link add mv0 link X`) links X as a consequence
        return "do_setlink" not in functions
    return chains == 1 and not functions.isdisjoint(_ENSLAVING)


_FOLLOWS_ANOTHER_LINK = "follows a change of another link"


class LinkRequest(NamedTuple):
    """The one link an rtnetlink request names: in `netns` (its socket's), by
    `ifindex`, or by `name` where that is 0; `moves`: the request moves it
    to another namespace."""

    netns: int
    ifindex: int
    name: Optional[str]
    moves: bool

    def names(self, netns: int, index: int, name: Optional[str], functions: AbstractSet[str]) -> bool:
        """Whether a link notification (in `netns`, of link `index` named
        `name`, its stack's `functions`) is of this link."""
        if netns != self.netns:
            # a link moved is announced anew in the namespace it went to
            return self.moves and not functions.isdisjoint(_NETNS_CHANGE)
        return index == self.ifindex if self.ifindex else name == self.name


def link_request(netns: int, length: int, msg: bytes) -> Optional[LinkRequest]:
    """The link a request names, from the start of the buffer its sender's
    system call sent (`length` bytes in all, 0: unknown; `netns` its
    socket's namespace, 0: no request). None for no link request, or one that
    names no single link: a new one (`ip link add` names a veth's peer
    too), a group, one of another namespace by its id; or when the call sent
    several messages, or the copy is cut short."""
    if not netns or len(msg) < 32:
        return None
    nl_len, mtype, flags, _seq, _pid = _NLMSG.unpack_from(msg, 0)
    if mtype not in (RTM_NEWLINK, RTM_DELLINK, RTM_SETLINK) or not 32 <= nl_len <= len(msg) \
            or not nl_len <= length <= (nl_len + 3) & ~3:
        return None
    if mtype == RTM_NEWLINK and flags & NLM_F_CREATE:
        return None
    index = max(struct.unpack_from("<i", msg, 20)[0], 0)
    attrs = _attrs(msg, 32, nl_len)
    # (the kernel looks a link up by its name only when no index is given)
    name = None if index else _cstr(attrs.get(IFLA_IFNAME))
    if IFLA_TARGET_NETNSID in attrs or not (index or name):
        return None
    return LinkRequest(netns, index, name, IFLA_NET_NS_PID in attrs or IFLA_NET_NS_FD in attrs)


def applied_by_a_reader(functions: AbstractSet[str]) -> bool:
    """A carrier change waits for the kernel's linkwatch worker, unless a task
    reading the link first (`ip link show`, a daemon's query, ethtool) applies
    it on the way (linkwatch_sync_dev; inlined on 6.12, where the stack shows
    linkwatch_do_dev under rtnl_getlink): that reader asked for nothing. The
    worker's queue run, and the one a device's removal makes, are not readers."""
    if not functions.isdisjoint(("linkwatch_sync_dev", "__linkwatch_sync_dev")):
        return True
    return "linkwatch_do_dev" in functions and functions.isdisjoint(
        ("__linkwatch_run_queue", "linkwatch_run_queue", "linkwatch_event"))


def _attrs(buf: bytes, off: int, end: int) -> Dict[int, bytes]:
    """rtattrs in buf[off:end] (a truncated copy just ends early)."""
    out: Dict[int, bytes] = {}
    unpack = _RTA.unpack_from   # a link message has ~50 attributes: no lookups per attribute
    while off + 4 <= end:
        length, kind = unpack(buf, off)
        if length < 4:
            break
        kind &= 0x3FFF
        if kind not in out:   # the first of a repeated attribute
            stop = off + length
            out[kind] = buf[off + 4: stop if stop < end else end]
        off += (length + 3) & ~3
    return out


def _cstr(raw: Optional[bytes]) -> Optional[str]:
    return raw.split(b"\0", 1)[0].decode(errors="replace") if raw is not None else None


@functools.lru_cache(maxsize=4096)   # a namespace's addresses come again and again; ipaddress objects are immutable
def _ip(raw: Optional[bytes], family: int) -> Optional[Any]:
    if raw is None:
        return None
    if family == socket.AF_INET and len(raw) >= 4:
        return ipaddress.IPv4Address(raw[:4])
    if family == socket.AF_INET6 and len(raw) >= 16:
        return ipaddress.IPv6Address(raw[:16])
    return None


class NetChangeEvent(Event, init=False):
    """Common to addr/link/route: how the change was asked for, by whom.

    `announced_by` names the kernel worker that announced the change when that
    was not the task that asked for it (IPv6 addresses: "addrconf_dad_work");
    pid, cmdline, stack and cause are then those of the task that queued it.
    """

    action: str
    dev: Optional[str]
    ifindex: Optional[int]
    cause: str
    detail: Optional[str]
    cmdline: Optional[str]
    user: Optional[str]
    announced_by: Optional[str]
    VALUES = {**Event.VALUES, "cause": ("netlink", "ioctl", "sysctl", "kernel", "unknown"),
              "announced_by": ("addrconf_dad_work",)}

    def how(self, full: bool = False) -> str:
        via = {"netlink": "via netlink", "ioctl": "via ioctl", "kernel": "by the kernel",
               "sysctl": "by a sysctl write"}.get(self.cause, self.cause)
        if self.detail:
            via += f" ({self.detail})"
        if full and self.cmdline:
            via += f": {quoted_command(self.cmdline)}"
        return f" {via}"


class AddrEvent(NetChangeEvent, init=False):
    """An IPv4/IPv6 address added to or deleted from an interface, or
    "changed": one already there announced again (its flags or lifetimes
    updated; a daemon applying its configuration again). `dev` is the
    interface; `label` the IPv4 address's label (`"eth0:1"` for an alias
    made with `ifconfig eth0:1` or `ip addr add … label eth0:1`, else the
    device's name; None for IPv6)."""

    kind = "addr"
    ACTIONS = ("added", "changed", "deleted")
    address: Optional[IPInterface]
    family: int
    scope: int
    flags: int
    label: Optional[str]
    VALUES = {**NetChangeEvent.VALUES, "action": ACTIONS}

    def describe(self) -> str:
        fam = "IPv4" if self.family == 4 else "IPv6"
        prep = {"deleted": "from", "changed": "on"}.get(self.action, "to")
        return f"{self.action} {fam} {self.address} {prep} {self.dev or f'ifindex {self.ifindex}'}"


# IFLA_INFO_KIND of Linux's link types: iproute2's `ip link add type` list
# (its *_slave entries are port kinds) and the kinds made otherwise (tun,
# team, wireguard, openvswitch, batadv, ppp, can, ovpn)
LINK_KINDS = frozenset((
    "amt", "bareudp", "batadv", "bond", "bridge", "can", "dsa", "dummy", "erspan", "geneve", "gre", "gretap", "gtp",
    "hsr", "ifb", "ip6erspan", "ip6gre", "ip6gretap", "ip6tnl", "ipip", "ipoib", "ipvlan", "ipvtap", "l2tpeth",
    "lowpan", "macsec", "macvlan", "macvtap", "netdevsim", "netkit", "nlmon", "openvswitch", "ovpn", "pfcp", "ppp",
    "rmnet", "sit", "team", "tun", "vcan", "veth", "virt_wifi", "vlan", "vrf", "vti", "vti6", "vxcan", "vxlan",
    "wireguard", "wwan", "xfrm"))


class _LinkKind(FieldType):
    """A link's kind (`veth`, `bridge`, …): a name not among Linux's is a typo."""

    def check(self, owner: Any, field: str, value: Any) -> Any:
        if value not in LINK_KINDS:
            raise ValueError(f"unknown {field} {value!r} for {owner.kind!r} events; valid: "
                             f"{', '.join(sorted(LINK_KINDS))} (another: {field}=lambda k: k == {value!r})")
        return value


class _LinkLayerAddress(FieldType):
    """A link-layer address as events hold it, "02:00:00:00:00:0a": a filter
    may write it in capitals or with '-' (as other tools print it)."""

    def check(self, owner: Any, field: str, value: Any) -> Any:
        text = value if isinstance(value, str) else ""
        parts = text.split("-" if "-" in text and ":" not in text else ":")
        if not all(0 < len(p) <= 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
            raise ValueError(f"invalid {field} {value!r} for {owner.kind!r} events: hex bytes separated by ':' "
                             "or '-', e.g. '02:00:00:00:00:0a'")
        return ":".join(f"{int(p, 16):02x}" for p in parts)


class LinkEvent(NetChangeEvent, init=False):
    """A network interface added, deleted, set up/down, or otherwise changed:
    one per notification of the interface itself (a bridge port's own,
    `bridge monitor link`, are none)."""

    kind = "link"
    ACTIONS = ("added", "deleted", "up", "down", "changed")
    up: bool
    flags: int
    link_kind: Optional[str]
    mtu: Optional[int]
    operstate: Optional[str]
    VALUES = {**NetChangeEvent.VALUES, "action": ACTIONS,
              "operstate": tuple(_OPERSTATES.values())}
    TYPES = {"link_kind": _LinkKind()}

    def describe(self) -> str:
        what = {"added": "added link", "deleted": "deleted link", "up": "set link up",
                "down": "set link down"}.get(self.action, "changed link")
        return f"{what} {self.dev or f'ifindex {self.ifindex}'}"


class RouteHop(NamedTuple):
    """One path of a multipath route (`ip route add … nexthop via … nexthop via …`)."""

    gateway: Optional[IPAddress]
    dev: Optional[str]
    ifindex: int
    weight: int


class _RouteHops(FieldType):
    """A multipath route's paths: objects in JSON, RouteHops again when read back."""

    def to_json(self, value: Any) -> Any:
        return [dict(gateway=None if h.gateway is None else str(h.gateway), dev=h.dev, ifindex=h.ifindex,
                     weight=h.weight) for h in value] if value is not None else None

    def from_json(self, value: Any) -> Any:
        if value is None:
            return None
        return tuple(RouteHop(parse_address(h["gateway"]) if h["gateway"] else None, h["dev"], h["ifindex"],
                              h["weight"]) for h in value)


class _Pairs(FieldType):
    """A tuple of pairs (a nexthop group's members): lists in JSON, tuples again when read back."""

    def to_json(self, value: Any) -> Any:
        return [list(p) for p in value] if value is not None else None

    def from_json(self, value: Any) -> Any:
        return tuple(tuple(p) for p in value) if value is not None else None


class RouteEvent(NetChangeEvent, init=False):
    """A route added, replaced (`ip route replace` of an existing one: the old
    route is gone, the kernel does not say what it was) or deleted. A
    multipath route has its paths in `nexthops` (gateway None); its `dev` is
    the device they share, if they share one."""

    kind = "route"
    ACTIONS = ("added", "replaced", "deleted")
    dst: IPNetwork
    gateway: Optional[IPAddress]
    table: Union[str, int]         # "main", or a number without a name
    family: int
    type: Union[str, int]
    protocol: int
    priority: Optional[int]
    prefsrc: Optional[IPAddress]
    nhid: Optional[int]            # the nexthop object it uses (`ip route add … nhid 5`), if any
    nexthops: Tuple[RouteHop, ...]   # a multipath route's paths; () for one path
    VALUES = {**NetChangeEvent.VALUES, "action": ACTIONS,
              "type": tuple(RTN_TYPES.values())}
    TYPES = {"nexthops": _RouteHops(), "table": ROUTE_TABLE}

    def describe(self) -> str:
        dst = "default" if self.dst is not None and self.dst.prefixlen == 0 else str(self.dst)
        # as ip route says a type other than unicast: "blackhole 10.4.0.0/16", "local 10.0.0.1 …"
        rtype = f"{self.type} " if self.type != "unicast" else ""
        nhid = f" nhid {self.nhid}" if self.nhid is not None else ""
        via = f" via {self.gateway}" if self.gateway else ""
        dev = f" dev {self.dev}" if self.dev and not self.nexthops else ""
        table = f" table {self.table}" if self.table != "main" else ""
        # as ip route prints it: routes that differ by metric alone read alike without it
        metric = f" metric {self.priority}" if self.priority else ""
        # as ip route prints a multipath route: "nexthop via 10.0.0.1 dev eth0 weight 1" each
        hops = "".join(" nexthop" + (f" via {h.gateway}" if h.gateway else "") + (f" dev {h.dev}" if h.dev else "")
                       + f" weight {h.weight}" for h in self.nexthops)
        return f"{self.action} route {rtype}{dst}{nhid}{via}{dev}{table}{metric}{hops}"


# -- neighbours and policy-routing rules (issue 15) ---------------------------
# Same monitor socket, more groups; uapi/linux/neighbour.h, uapi/linux/fib_rules.h.
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH, RTM_NEWRULE, RTM_DELRULE = 28, 29, 30, 32, 33
NUD_STATES = {0x01: "INCOMPLETE", 0x02: "REACHABLE", 0x04: "STALE", 0x08: "DELAY", 0x10: "PROBE",
              0x20: "FAILED", 0x40: "NOARP", 0x80: "PERMANENT", 0x00: "NONE"}
FR_ACTIONS = {1: "lookup", 2: "goto", 3: "nop", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
_NETLINK_HANDLERS["neigh"] = ("neigh_add", "neigh_delete")
_NETLINK_HANDLERS["rule"] = ("fib_nl_newrule", "fib_nl_delrule", "fib_newrule", "fib_delrule")
_IOCTL_HANDLERS["neigh"] = ("arp_ioctl",)  # SIOCSARP / SIOCDARP (`arp -s`, `arp -d`)
_IOCTL_HANDLERS["rule"] = ()
# Searched before the common _KERNEL_DETAILS.
_KIND_DETAILS = {
    "neigh": (
        (("unregister_netdevice_many_notify", "unregister_netdevice_many", "unregister_netdevice_queue"),
         "device removed"),
        (("neigh_carrier_down",), "carrier lost"),
        # the same flush, asked for by other changes than a link going down
        (("neigh_changeaddr",), "the link's hardware address changed"),
        (("fib_inetaddr_event",), "the link's last IPv4 address was removed"),
        (("neigh_ifdown", "__neigh_ifdown", "neigh_flush_dev"), "link down"),
        (("neigh_periodic_work", "neigh_forced_gc"), "neighbour garbage collection"),
        (("neigh_timer_handler",), "neighbour state timer"),
        # what was received, where the stack says (ndisc_rcv is often a tail call)
        (("ndisc_recv_rs",), "learned from a received Router Solicitation"),
        (("ndisc_recv_ns",), "learned from a received Neighbour Solicitation"),
        (("ndisc_recv_na",), "learned from a received Neighbour Advertisement"),
        (("ndisc_router_discovery",), "learned from a received Router Advertisement"),
        (("ndisc_redirect_rcv",), "learned from a received Redirect"),
        (("arp_process", "arp_rcv"), "learned from a received ARP packet"),
        (("neigh_event_ns", "ndisc_rcv"), "learned from a received packet"),
        (("__neigh_event_send", "neigh_resolve_output", "neigh_direct_output"),
         "resolving the neighbour of an outgoing packet"),
    ),
}


_NETLINK_HANDLERS["nft"] = ("nfnetlink_rcv_batch", "nf_tables_commit")
_IOCTL_HANDLERS["nft"] = ()


class NftEvent(NetChangeEvent, init=False):
    """An nftables table, chain, rule, set or set element added or deleted —
    `nft flush ruleset` deletes every rule, set, chain and table, each its
    own event; `nft replace rule` is the old rule deleted and the new added,
    as the kernel announces it (and nft monitor prints it)."""

    kind = "nft"
    ACTIONS = ("added", "deleted")
    # `family` is the table's nftables family, not 4/6
    VALUES = {**NetChangeEvent.VALUES, "object": ("table", "chain", "rule", "set", "element", "object", "flowtable"),
              "family": tuple(_nft.FAMILIES.values())}
    object: str
    family: str
    table: Optional[str]
    chain: Optional[str]
    set: Optional[str]
    handle: Optional[int]
    name: Optional[str]
    text: Optional[str]
    TYPES = {"family": CHOICE}

    @property
    def background(self) -> bool:
        # the tracing table the plugin itself adds on request (probes/nftrace.py)
        return self.table == NFTRACE_TABLE and self.pid == os.getpid()

    def describe(self) -> str:
        # as `nft monitor` says it: "add rule inet filter input ip saddr 10.0.0.2 drop # handle 2"
        verb = {"added": "add", "deleted": "delete"}[self.action]
        where = {"table": f"{self.family} {self.table}",
                 "chain": f"{self.family} {self.table} {self.chain}",
                 "rule": f"{self.family} {self.table} {self.chain}",
                 "set": f"{self.family} {self.table} {self.set}",
                 "element": f"{self.family} {self.table} {self.set}"}.get(self.object, f"{self.family}")
        text = f" {{ {self.text} }}" if self.text and self.object in ("chain", "element") else \
            f" {self.text}" if self.text else ""
        handle = f" # handle {self.handle}" if self.handle is not None else ""
        return f"{verb} {self.object} {where}{text}{handle}"


def _address_of(family: int, attrs: Dict[int, bytes]) -> Optional[bytes]:
    """An RTM_*ADDR message's address: IFA_LOCAL for IPv4 (IFA_ADDRESS is the
    peer's on a point-to-point link), IFA_ADDRESS otherwise."""
    return attrs.get(2) if family == socket.AF_INET and 2 in attrs else attrs.get(1)


def address_key(msg: bytes) -> Optional[Tuple[int, int, bytes, int]]:
    """(family, ifindex, address, prefix length) of an RTM_*ADDR message."""
    if len(msg) < 24:
        return None
    family, prefixlen, _flags, _scope, index = struct.unpack_from("<BBBBI", msg, 16)
    return family, index, _address_of(family, _attrs(msg, 24, len(msg))) or b"", prefixlen


def neigh_key(msg: bytes) -> Optional[Tuple[int, int, bytes]]:
    """(family, ifindex, destination) of an IPv4/IPv6 RTM_*NEIGH message; None
    for others (bridge forwarding entries share the group)."""
    if len(msg) < 28:
        return None
    family, index = msg[16], struct.unpack_from("<i", msg, 20)[0]
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    dst = _attrs(msg, 28, len(msg)).get(1)  # NDA_DST
    return (family, index, dst) if dst else None


_KIND_OF_TYPE = {RTM_NEWADDR: "addr", RTM_DELADDR: "addr", RTM_NEWLINK: "link", RTM_DELLINK: "link",
                 RTM_NEWROUTE: "route", RTM_DELROUTE: "route", RTM_NEWNEIGH: "neigh", RTM_DELNEIGH: "neigh",
                 RTM_NEWRULE: "rule", RTM_DELRULE: "rule"}
_SHORTEST = {"addr": 24, "link": 32, "route": 28, "neigh": 28, "rule": 28, "nexthop": 24}


def change_kind(msg: bytes, own_portid: Optional[int]) -> Optional[str]:
    """The kind of event a netlink notification makes, or None when it makes
    none: a reply to the monitor's own request (`own_portid`), a type or
    family no kind reports, a message too short for its header. Decoding and
    counting both ask it, so they agree on what is an event."""
    if len(msg) < 16:
        return None
    _length, mtype, _flags, _seq, nl_pid = _NLMSG.unpack_from(msg, 0)
    if own_portid is not None and nl_pid == own_portid:
        return None  # a reply to our own request, not a change
    kind = _KIND_OF_TYPE.get(mtype) or ("nexthop" if mtype in (RTM_NEWNEXTHOP, RTM_DELNEXTHOP) else None)
    if kind is None or len(msg) < _SHORTEST[kind]:
        return None
    if kind == "link" and msg[16] == AF_BRIDGE:
        # a bridge port's own notification (`bridge monitor link`): its
        # RTM_DELLINK is the port leaving the bridge, not the interface
        # going away (which the interface's own message says)
        return None
    if kind == "neigh" and neigh_key(msg) is None:
        return None  # a bridge forwarding entry
    if kind == "nexthop" and _u32(_attrs(msg, 24, len(msg)), 1) is None:
        return None  # no NHA_ID
    return kind


def nud_state(state: int) -> str:
    """`REACHABLE`, or several joined by `|` (`ip neigh` prints them the same way)."""
    if state in NUD_STATES:
        return NUD_STATES[state]
    return "|".join(name for bit, name in NUD_STATES.items() if bit and state & bit)


class _NudState(FieldType):
    """A neighbour state: one of ip neigh's names, or several joined by "|"."""

    def check(self, owner: Any, field: str, value: Any) -> Any:
        if not (isinstance(value, str) and set(value.split("|")) <= set(NUD_STATES.values())):
            raise ValueError(f"unknown {field} {value!r} for 'neigh' events; valid: "
                             f"{', '.join(NUD_STATES.values())} (several joined by '|')")
        return value


NUD_STATE = _NudState()


class NeighEvent(NetChangeEvent, init=False):
    """An ARP (IPv4) or NDP (IPv6) neighbour entry added, changed (its state or
    link-layer address) or deleted — `ip neigh flush`, `arp -d`, the kernel's
    garbage collection. Bridge forwarding entries are not neighbour entries."""

    kind = "neigh"
    ACTIONS = ("added", "changed", "deleted")
    address: Optional[IPAddress]
    lladdr: Optional[str]
    state: str
    old_state: Optional[str]
    family: int
    flags: int
    router: bool
    proxy: bool
    TYPES = {"state": NUD_STATE, "old_state": NUD_STATE, "lladdr": _LinkLayerAddress()}

    @property
    def background(self) -> bool:
        # the kernel resolving and ageing entries as traffic flows is noise;
        # an entry a process touched, or one that went away, is news
        return bool(self.cause == "kernel" and self.action != "deleted")

    def describe(self) -> str:
        lladdr = f" lladdr {self.lladdr}" if self.lladdr else ""
        dev = self.dev or f"ifindex {self.ifindex}"
        if self.action == "changed" and self.old_state is not None:
            return f"changed neigh {self.address} dev {dev}{lladdr} {self.old_state} -> {self.state}"
        return f"{self.action} neigh {self.address} dev {dev}{lladdr} {self.state}"


class RuleEvent(NetChangeEvent, init=False):
    """A policy-routing rule (`ip rule`) added or deleted."""

    kind = "rule"
    ACTIONS = ("added", "deleted")
    family: int
    priority: int
    src: Optional[IPNetwork]
    dst: Optional[IPNetwork]
    iif: Optional[str]
    oif: Optional[str]
    fwmark: Optional[int]
    fwmask: Optional[int]
    table: Union[str, int, None]
    rule_action: Union[str, int]
    goto: Optional[int]
    invert: bool
    protocol: Optional[int]
    tos: Optional[int]
    ip_proto: Union[str, int, None]        # "tcp", "udp", … (`ip rule … ipproto tcp`)
    sport: Optional[Tuple[int, int]]       # (first, last) port (`sport 1000-2000`; `sport 80`: (80, 80))
    dport: Optional[Tuple[int, int]]
    uidrange: Optional[Tuple[int, int]]
    suppress_prefixlength: Optional[int]
    l3mdev: bool
    VALUES = {**NetChangeEvent.VALUES, "rule_action": tuple(FR_ACTIONS.values())}
    TYPES = {"ip_proto": IP_PROTO, "sport": _Pairs(), "dport": _Pairs(), "uidrange": _Pairs(), "table": ROUTE_TABLE}

    def describe(self) -> str:
        # as `ip rule` prints it: "100: from 10.0.0.0/8 lookup 100"
        parts = [f"{self.priority}:"]
        if self.invert:
            parts.append("not")
        parts.append(f"from {self.src if self.src is not None else 'all'}")
        if self.dst is not None:
            parts.append(f"to {self.dst}")
        if self.tos:
            parts.append(f"tos {self.tos:#x}")
        if self.fwmark is not None:
            mask = f"/{self.fwmask:#x}" if self.fwmask not in (None, 0xFFFFFFFF) else ""
            parts.append(f"fwmark {self.fwmark:#x}{mask}")
        if self.iif:
            parts.append(f"iif {self.iif}")
        if self.oif:
            parts.append(f"oif {self.oif}")
        if self.l3mdev:
            parts.append("lookup [l3mdev-table]")
        if self.uidrange is not None:
            parts.append(f"uidrange {self.uidrange[0]}-{self.uidrange[1]}")
        if self.ip_proto is not None:
            parts.append(f"ipproto {self.ip_proto}")
        for name, ports in (("sport", self.sport), ("dport", self.dport)):
            if ports is not None:
                parts.append(f"{name} {ports[0]}" if ports[0] == ports[1] else f"{name} {ports[0]}-{ports[1]}")
        if self.l3mdev:   # its lookup is said above, where ip rule says it
            pass
        elif self.rule_action == "lookup":
            parts.append(f"lookup {self.table}")
        elif self.rule_action == "goto":
            parts.append(f"goto {self.goto}")
        else:
            parts.append(str(self.rule_action))
        if self.suppress_prefixlength is not None:
            parts.append(f"suppress_prefixlength {self.suppress_prefixlength}")
        fam = "" if self.family == 4 else " (IPv6)"
        return f"{self.action} rule{fam} " + " ".join(p for p in parts if p)


# -- nexthop objects (`ip nexthop`; systemd-networkd's [NextHop], FRR) ---------
# uapi/linux/nexthop.h. RTNLGRP_NEXTHOP is past the 32 groups bind() takes.
RTM_NEWNEXTHOP, RTM_DELNEXTHOP, RTM_GETNEXTHOP = 104, 105, 106
RTNLGRP_NEXTHOP = 32
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
NH_GROUP_TYPES = {0: "mpath", 1: "resilient"}
_NH_GRP = struct.Struct("<IBBH")   # struct nexthop_grp: id, weight - 1, weight_high, resvd
_NETLINK_HANDLERS["nexthop"] = ("rtm_new_nexthop", "rtm_del_nexthop")
_IOCTL_HANDLERS["nexthop"] = ()


class NexthopEvent(NetChangeEvent, init=False):
    """A nexthop object added, replaced, changed or deleted: one of `ip
    monitor nexthop`'s lines. "changed" is a group the kernel rewrote because
    a member was deleted (cause "kernel"). A nexthop that goes with its
    device (the link set down or deleted) is removed without a notification,
    as are the routes using it: `ip monitor` prints nothing then either; the
    same id given again is "added"."""

    kind = "nexthop"
    ACTIONS = ("added", "replaced", "changed", "deleted")
    id: int
    family: Optional[int]          # 4 or 6; None for a group or a blackhole without one
    gateway: Optional[IPAddress]
    blackhole: bool
    group: Tuple[Tuple[int, int], ...]   # (member id, weight) of a group, in order
    group_type: Union[str, int, None]   # "mpath" or "resilient" for a group
    fdb: bool
    protocol: int
    VALUES = {**NetChangeEvent.VALUES, "action": ACTIONS, "group_type": tuple(NH_GROUP_TYPES.values())}
    TYPES = {"group": _Pairs()}

    def describe(self) -> str:
        # as `ip nexthop` prints it: "id 10 group 1,3/2", "id 1 via 10.0.0.1 dev eth0"
        parts = [f"{self.action} nexthop id {self.id}"]
        if self.group:
            parts.append("group " + "/".join(f"{i},{w}" if w != 1 else str(i) for i, w in self.group))
            if self.group_type == "resilient":
                parts.append("type resilient")
        if self.blackhole:
            parts.append("blackhole")
        if self.gateway is not None:
            parts.append(f"via {self.gateway}")
        if self.dev or self.ifindex:
            parts.append(f"dev {self.dev or f'ifindex {self.ifindex}'}")
        if self.fdb:
            parts.append("fdb")
        return " ".join(parts)


def nexthop_group(raw: Optional[bytes]) -> Tuple[Tuple[int, int], ...]:
    """NHA_GROUP's members as (id, weight); the kernel keeps weight - 1, its
    high byte (weights above 256, 6.12+) apart."""
    if not raw:
        return ()
    return tuple((nh_id, (high << 8 | low) + 1) for nh_id, low, high, _ in _NH_GRP.iter_unpack(raw[:len(raw) // 8 * 8]))


_RTNH = struct.Struct("<HBBi")   # struct rtnexthop: len, flags, hops (weight - 1), ifindex


def _route_hops(raw: Optional[bytes], family: int, mon: Optional["_Monitor"]) -> Tuple[RouteHop, ...]:
    """RTA_MULTIPATH's paths, each a struct rtnexthop and its attributes."""
    hops = []
    off = 0
    while raw and off + _RTNH.size <= len(raw):
        length, _flags, weight, ifindex = _RTNH.unpack_from(raw, off)
        if length < _RTNH.size:
            break
        attrs = _attrs(raw, off + _RTNH.size, min(off + length, len(raw)))
        gateway = _ip(attrs.get(5), family)   # RTA_GATEWAY
        if gateway is None and len(attrs.get(18, b"")) >= 2:   # RTA_VIA: an IPv4 route via an IPv6 gateway
            via_family = struct.unpack_from("<H", attrs[18])[0]
            gateway = _ip(attrs[18][2:], via_family)
        hops.append(RouteHop(gateway, mon.names.get(ifindex) if mon else None, ifindex, weight + 1))
        off += (length + 3) & ~3
    return tuple(hops)


def _prefix(raw: Optional[bytes], family: int, plen: int) -> Optional[Any]:
    ip = _ip(raw, family)
    return _network(ip, plen) if ip is not None else None


@functools.lru_cache(maxsize=1024)  # a test's routes repeat a few prefixes; the values are immutable
@functools.lru_cache(maxsize=4096)
def _network(ip: Any, plen: int) -> Any:
    return ipaddress.ip_network(f"{ip}/{plen}", strict=False)


@functools.lru_cache(maxsize=1024)
def _interface(ip: Any, plen: int) -> Any:
    return ipaddress.ip_interface(f"{ip}/{plen}")


def _range(raw: Optional[bytes], fmt: str) -> Optional[Tuple[int, int]]:
    """A (start, end) range attribute (ports: "<HH", uids: "<II")."""
    if raw is None or len(raw) < struct.calcsize(fmt):
        return None
    start, end = struct.unpack_from(fmt, raw)
    return (start, end)


def _u32(attrs: Dict[int, bytes], key: int) -> Optional[int]:
    raw = attrs.get(key, b"")
    return struct.unpack_from("<I", raw)[0] if len(raw) >= 4 else None


# -- changes a sysctl write made (issue 15) -------------------------------------
_SYSCTL_WRITE_FRAMES = ("proc_sys_call_handler", "proc_sys_write")
# where the sysctl probe could not say which setting: the handler's name does
_SYSCTL_HANDLERS = (("addrconf_sysctl_disable", "disable_ipv6"), ("addrconf_sysctl_forward", "forwarding"),
                    ("devinet_sysctl_forward", "forwarding"), ("addrconf_sysctl_addr_gen_mode", "addr_gen_mode"),
                    ("addrconf_sysctl_stable_secret", "stable_secret"))


def sysctl_cause(ev: NetChangeEvent, functions: AbstractSet[str], name: bytes, value: bytes) -> Dict[str, Any]:
    """A change the kernel made while a process wrote a sysctl (IPv6
    addresses removed by net.ipv6.conf.<dev>.disable_ipv6=1): cause "sysctl",
    the setting and the value written in `detail` (the changes to make to
    `ev`; none when it is not one). `name`/`value` are the thread's last
    sysctl write as bpf/sysctl.bpf.c recorded it (it is this write: the stack
    runs through the sysctl write handler; `functions`: its stack's function
    names, Stack.functions)."""
    if ev.cause != "kernel" or ev.pid is None or functions.isdisjoint(_SYSCTL_WRITE_FRAMES):
        return {}
    setting = _cstr(name)
    if setting:
        parts = setting.split("/")
        return dict(cause="sysctl",
                    detail=".".join(p.replace(".", "/") for p in parts) + "=" + (_cstr(value) or "").strip())
    handler = next((what for frame, what in _SYSCTL_HANDLERS if frame in functions), None)
    return dict(cause="sysctl", detail=f"a write to {handler}" if handler else "a write to /proc/sys/net")


# Where an interrupt's frames end: below them is whatever it interrupted (a
# softirq run on top of the DAD worker, of a task's netlink request)
_INTERRUPT_ENTRIES = frozenset(("handle_softirqs", "__do_softirq", "do_softirq", "run_ksoftirqd", "irq_exit_rcu",
                                "__irq_exit_rcu", "common_interrupt", "asm_common_interrupt",
                                "__sysvec_apic_timer_interrupt"))


@functools.lru_cache(maxsize=1024)  # a test's changes repeat a handful of stacks
def own_functions(frames: Tuple[str, ...]) -> FrozenSet[str]:
    """The function names of a stack's frames ("addrconf_ifdown" of
    "addrconf_ifdown.isra.0+0x1f": compiler clones keep the name) down to an
    interrupt's entry: what it interrupted did not make this change."""
    names = []
    for frame in frames:
        name = frame_function(frame)
        if name in _INTERRUPT_ENTRIES:
            break
        names.append(name)
    return frozenset(names)


def cause_of(kind: str, frames: Sequence[str]) -> Tuple[str, Optional[str]]:
    """("netlink" | "ioctl" | "kernel", detail) from the kernel stack: how
    *this* change was asked for. The IPv6 addresses a link down removes are
    "kernel"/"link down" whether the down came over netlink or SIOCSIFFLAGS."""
    return _cause(kind, own_functions(tuple(frames)))


@functools.lru_cache(maxsize=1024)  # a test's changes repeat a handful of stacks (Stack.functions, hashed once)
def _cause(kind: str, present: FrozenSet[str]) -> Tuple[str, Optional[str]]:
    """cause_of() of a stack's function names."""
    follows = kind != "link" and present.intersection(_NOTIFIER_FRAMES + _TEMPADDR_CREATED + _TEMPADDR_DELETED)
    if not follows and present.intersection(_NETLINK_HANDLERS[kind]):
        return "netlink", None
    if not follows and present.intersection(_HANDLER_TAILS.get(kind, ())) and present.intersection(_ANY_NETLINK) \
            and not any(present.intersection(h) for k, h in _NETLINK_HANDLERS.items() if k != kind):
        return "netlink", None
    if not follows and present.intersection(_IOCTL_HANDLERS[kind]) and present.intersection(_ANY_IOCTL):
        return "ioctl", None
    detail = next((text for frames_for, too, text in _TRIGGERS
                   if present.intersection(frames_for) and (not too or present.intersection(too))), None)
    for frames_for, text in () if detail else _KIND_DETAILS.get(kind, ()) + _KERNEL_DETAILS:
        if present.intersection(frames_for):
            detail = text
            break
    # A consequence of a request of another kind (e.g. `ip link set down`
    # removing IPv6 addresses): the kernel did it, on that task's behalf.
    if detail is None and present.intersection(_ANY_NETLINK):
        detail = "consequence of a netlink request"
    elif detail is None and present.intersection(_ANY_IOCTL):
        detail = "consequence of an ioctl"
    return "kernel", detail


def _dad_tracking(kernel: "KernelFeatures") -> Tuple[Optional[bytes], str]:
    """(nc_cfg for the DAD-worker programs, "") or (None, why the kernel
    cannot have them)."""
    if not kernel.tp_btf:
        return None, "no tp_btf for the workqueue tracepoints"
    if "BPF_FUNC_loop" not in kernel.enum("bpf_func_id").values():
        return None, "no bpf_loop helper (kernel < 5.17)"
    ranges = function_ranges(("addrconf_dad_work", "delayed_work_timer_fn", "call_timer_fn",
                              "handle_softirqs", "__do_softirq"))
    softirq = ranges.get("handle_softirqs") or ranges.get("__do_softirq")
    missing = [n for n in ("addrconf_dad_work", "delayed_work_timer_fn", "call_timer_fn") if n not in ranges]
    if softirq is None:
        missing.append("handle_softirqs/__do_softirq")
    if missing or softirq is None:
        return None, f"{', '.join(missing)} not in /proc/kallsyms"
    expiry = ranges["call_timer_fn"]
    return struct.pack("<QQQQQQ", ranges["addrconf_dad_work"][0], ranges["delayed_work_timer_fn"][0],
                       expiry[0], expiry[1], softirq[0], softirq[1]), ""


@dataclass
class Present:
    """What a namespace holds now, as its notifications tell it (seeded by a
    dump when its monitor opens): a notification of one of these again is a
    change, not an addition — the kernel's message does not say."""

    addresses: Set[Tuple[int, int, bytes, int]] = field(default_factory=set)   # (family, ifindex, address, plen)
    # nexthop id -> its device's ifindex (None: a group, a blackhole or an fdb
    # nexthop): `ip nexthop replace` of a new id is an addition
    nexthops: Dict[int, Optional[int]] = field(default_factory=dict)
    groups: Dict[int, Set[int]] = field(default_factory=dict)   # a group's id -> its members' ids

    def nexthop_announced(self, nh_id: int, attrs: Dict[int, bytes]) -> None:
        """An RTM_NEWNEXTHOP's attributes: the nexthop is there now."""
        self.nexthops[nh_id] = _u32(attrs, 5)   # NHA_OIF
        members = nexthop_group(attrs.get(2))
        if members:
            self.groups[nh_id] = {member for member, _weight in members}
        else:
            self.groups.pop(nh_id, None)

    def nexthop_deleted(self, nh_id: int) -> None:
        self.nexthops.pop(nh_id, None)
        self.groups.pop(nh_id, None)

    def link_down(self, ifindex: int) -> None:
        """A link set down or deleted: the kernel removes its nexthops
        (nexthop_flush_dev) without a notification, drops them from their
        groups, and removes a group left empty — silently too."""
        gone = {nh_id for nh_id, dev in self.nexthops.items() if dev == ifindex}
        for group, members in list(self.groups.items()):
            members -= gone
            if not members:
                gone.add(group)
        for nh_id in gone:
            self.nexthop_deleted(nh_id)


SO_MEMINFO = 55   # asm-generic/socket.h: not in Python's socket module
_MEMINFO = struct.Struct("<9I")   # SK_MEMINFO_RMEM_ALLOC first


def _rmem(sock: socket.socket) -> int:
    """The socket's receive memory: the truesize of the messages queued on it."""
    return int(_MEMINFO.unpack(sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size))[0])


def _charged(socks_fd: int, key: bytes) -> int:
    """The truesize the program saw queued on the monitor socket of `key` (nc_socks)."""
    raw = map_lookup(socks_fd, key, wire.NC_SOCK.size)
    return int(wire.NC_SOCK.struct.unpack(raw)[2]) if raw is not None else 0


class _Monitor:
    """The rtnetlink socket the plugin owns in one watched namespace."""

    def __init__(self, path: str) -> None:
        # both monitors made in one visit to the namespace
        self.sock, self.nft, self.nft_error = in_netns_at(path, self._open_both)
        self.portid = self.sock.getsockname()[0]
        # the nftables monitor, where nf_tables exists
        self.nft_portid = self.nft.getsockname()[0] if self.nft is not None else 0
        self.lost = 0
        # (socket, its nc_socks key, receive memory, charged) when watched
        self._accounts: List[Tuple[socket.socket, bytes, int, int]] = []
        self._socks_fd = -1
        self.names: Dict[int, str] = {}
        # (family, ifindex, dst) -> (NUD state, lladdr) of the entries known now
        self.neighbours: Dict[Tuple[int, int, bytes], Tuple[int, Optional[bytes]]] = {}
        self.present = Present()
        try:
            self._dump_links()
            self._dump_neighbours()
            self._dump_addresses()
            self._dump_nexthops()
        except BaseException:
            self.close()
            raise
        self.sock.setblocking(False)

    @classmethod
    def _open_both(cls) -> Tuple[socket.socket, Optional[socket.socket], Optional[str]]:
        """(rtnetlink monitor, nftables monitor or None, why not)."""
        sock = cls._open()
        try:
            return sock, _open_nft(sock.getsockname()[0]), None
        except OSError as e:
            return sock, None, e.strerror or str(e)
        except BaseException:
            sock.close()
            raise

    @staticmethod
    def _open() -> socket.socket:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            # Room for bursts between drains; a full queue is counted as loss.
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, MONITOR_RCVBUF)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MONITOR_RCVBUF)
        s.bind((0, _GROUPS))
        s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, RTNLGRP_NEXTHOP)
        return s

    def _dump(self, msg_type: int, seq: int) -> Iterator[Tuple[int, bytes]]:
        """(type, message) of each object a dump request of `msg_type` returns."""
        self.sock.send(_dump_request(msg_type, seq))
        while True:
            for mtype, msg in _split(self.sock.recv(1 << 16)):
                if mtype in (NLMSG_DONE, NLMSG_ERROR):
                    return
                yield mtype, msg

    def _dump_links(self) -> None:
        """ifindex -> name of the links present now (IPv6 notifications carry only the index)."""
        for mtype, msg in self._dump(RTM_GETLINK, 1):
            if mtype == RTM_NEWLINK:
                self.learn(msg)

    def _dump_neighbours(self) -> None:
        """The neighbour entries present now: a later RTM_NEWNEIGH for one of
        them is a change, not an addition (the kernel's message does not say)."""
        for mtype, msg in self._dump(RTM_GETNEIGH, 2):
            key = neigh_key(msg)
            if mtype == RTM_NEWNEIGH and key is not None:
                self.neighbours[key] = (struct.unpack_from("<H", msg, 24)[0], _attrs(msg, 28, len(msg)).get(2))

    def _dump_addresses(self) -> None:
        for mtype, msg in self._dump(RTM_GETADDR, 4):
            key = address_key(msg) if mtype == RTM_NEWADDR else None
            if key is not None:
                self.present.addresses.add(key)

    def _dump_nexthops(self) -> None:
        for mtype, msg in self._dump(RTM_GETNEXTHOP, 3):
            attrs = _attrs(msg, 24, len(msg)) if mtype == RTM_NEWNEXTHOP else {}
            nh_id = _u32(attrs, 1)   # NHA_ID
            if nh_id is not None:
                self.present.nexthop_announced(nh_id, attrs)

    def learn(self, msg: bytes) -> None:
        if len(msg) >= 32:
            index = struct.unpack_from("<i", msg, 20)[0]
            name = _cstr(_attrs(msg, 32, len(msg)).get(3))
            if name:
                self.names[index] = name

    def start_accounting(self, socks_fd: int, netns: int) -> None:
        """Where each socket's receive memory and the program's count of what
        it saw queued there start (read once it is in the map: a message
        between the two reads is in both, or only in the count)."""
        keys = [(sock, _KEY.pack(netns, portid))
                for sock, portid in ((self.sock, self.portid), (self.nft, self.nft_portid)) if sock is not None]
        self._accounts = [(sock, key, _rmem(sock), _charged(socks_fd, key)) for sock, key in keys]
        self._socks_fd = socks_fd

    def unseen(self) -> int:
        """Messages queued on the monitor sockets that the program did not
        see (the kernel skipped its call: it was running on that CPU). A
        call still running when this reads is given a moment; what stays
        unseen counts as one loss per socket."""
        unseen = 0
        for sock, key, rmem0, charged0 in self._accounts:
            for _ in range(3):
                grown = _rmem(sock) - rmem0
                seen = _charged(self._socks_fd, key) - charged0
                if grown <= seen:
                    break
                time.sleep(0.001)
            else:
                unseen += 1
        return unseen

    def check_overrun(self) -> None:
        """The kernel drops notifications for a full socket and sets ENOBUFS."""
        for sock in (self.sock, self.nft):
            if sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ENOBUFS:
                self.lost += 1

    def close(self) -> None:
        self.sock.close()
        if self.nft is not None:
            self.nft.close()


def _open_nft(avoid: int) -> socket.socket:
    """The nftables monitor (NETLINK_NETFILTER, group NFNLGRP_NFTABLES). Its
    port id is chosen, not the kernel's: the BPF map tells the two monitors
    apart by (netns, port id), and each protocol numbers its ports alone."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, MONITOR_RCVBUF)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MONITOR_RCVBUF)
        for _ in range(64):
            portid = random.randrange(1 << 30, 1 << 31)
            if portid == avoid:
                continue
            try:
                s.bind((portid, 1 << (_nft.NFNLGRP_NFTABLES - 1)))
                return s
            except OSError as e:
                if e.errno != errno.EADDRINUSE:  # taken: try another port id
                    raise
        raise OSError(errno.EADDRINUSE, "no free netlink port id")
    except BaseException:
        s.close()
        raise


@functools.lru_cache(maxsize=None)
def _dump_request(msg_type: int, seq: int) -> bytes:
    """A dump request (NLM_F_REQUEST | NLM_F_DUMP) of `msg_type` (links,
    neighbours, addresses or nexthops), built by pyroute2's message classes as
    netns/rtnl.py builds its requests, once per process. It goes out on the
    monitor socket itself: its replies carry the monitor's port id, which is
    how decode() tells them from changes."""
    from pyroute2.netlink import nlmsg
    from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
    from pyroute2.netlink.rtnl.ndmsg import ndmsg

    class nhmsg(nlmsg):  # type: ignore[misc]  # (pyroute2 is untyped) struct nhmsg (uapi/linux/nexthop.h): pyroute2 0.9 has no class for it
        fields = (("family", "B"), ("scope", "B"), ("protocol", "B"), ("resvd", "B"), ("flags", "I"))

    msg = {RTM_GETLINK: ifinfmsg, RTM_GETNEIGH: ndmsg, RTM_GETADDR: ifaddrmsg, RTM_GETNEXTHOP: nhmsg}[msg_type]()
    msg["header"]["type"] = msg_type
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def _split(data: bytes) -> Iterator[Tuple[int, bytes]]:
    off = 0
    while off + 16 <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
        if length < 16:
            return
        yield mtype, data[off: off + length]
        off += (length + 3) & ~3


class NetChangeProbe(Probe):
    name = "netchange"
    kind_id = wire.Kind.NLMSG
    event_types = {"addr": AddrEvent, "link": LinkEvent, "route": RouteEvent,
                   "neigh": NeighEvent, "rule": RuleEvent, "nft": NftEvent, "nexthop": NexthopEvent}
    decoder: "NetChangeDecoder"

    def __init__(self) -> None:
        self._monitors: Dict[int, _Monitor] = {}
        self.decoder = NetChangeDecoder(self._monitors)
        self._socks_fd = -1

    def plans(self, kernel: "KernelFeatures") -> List[Plan]:
        plans = []
        # a call of these the kernel skipped is found by lost() (the monitor
        # socket's memory grew by more than they saw queued), not charged to
        # every watched namespace: sk_data_ready fires for every socket of
        # the machine, and nearly every skipped call was another socket's
        if kernel.tp_btf and kernel.tracepoint_args("sk_data_ready") is not None:
            plans.append(Plan("tp_btf", ["netchange_tp"], own_misses=["netchange_tp"]))
        if kernel.fentry:
            plans.append(Plan("fentry", ["netchange_fentry"], own_misses=["netchange_fentry"]))
        if kernel.kprobe:
            plans.append(Plan("kprobe", ["netchange_kprobe"], own_misses=["netchange_kprobe"]))
        dad, why_not = _dad_tracking(kernel)
        if dad is None:
            for plan in plans:
                plan.notes.append("IPv6 additions not attributed: " + why_not)
            return plans
        # each mechanism with the DAD-worker programs first; the same without
        # them last, so they can never cost the probe itself
        with_dad = [Plan(p.mechanism, p.programs + list(_DAD_PROGRAMS), dict(p.config, nc_cfg=dad),
                         own_misses=p.own_misses) for p in plans]
        for plan in plans:
            plan.notes.append("IPv6 additions not attributed: the DAD-worker programs did not load")
        return with_dad + plans

    def unavailable_reason(self, kernel: "KernelFeatures") -> str:
        return ("no sock:sk_data_ready tracepoint (kernel < 6.4), and neither fentry "
                f"({kernel.why('fentry')}) nor kprobes ({kernel.why('kprobe')}) to reach __netlink_sendskb")

    def attached(self, obj: "LoadedMaps") -> None:
        self._socks_fd = obj.map_fd("nc_socks")

    def watch(self, netns: int, path: Optional[str]) -> None:
        if netns in self._monitors or path is None:
            return
        mon = _Monitor(path)
        self._monitors[netns] = mon
        map_update(self._socks_fd, _KEY.pack(netns, mon.portid), wire.NC_SOCK.struct.pack(NC_SOCK_RTNL, 0, 0))
        if mon.nft is not None:
            map_update(self._socks_fd, _KEY.pack(netns, mon.nft_portid), wire.NC_SOCK.struct.pack(NC_SOCK_NFT, 0, 0))
        mon.start_accounting(self._socks_fd, netns)

    def unwatch(self, netns: int) -> None:
        mon = self._monitors.pop(netns, None)
        if mon is not None:
            map_delete(self._socks_fd, _KEY.pack(netns, mon.portid))
            if mon.nft is not None:
                map_delete(self._socks_fd, _KEY.pack(netns, mon.nft_portid))
            mon.close()
        self.decoder.forget(netns)

    def poll(self) -> bool:
        # The monitor sockets are not read while watched: reading frees skbs
        # (their addresses come back, hiding races) and could take a message
        # before the tracepoint reads it. Notifications stay queued (memory
        # is charged only as used) until unwatch closes the socket; a full
        # queue makes the kernel drop them and flag ENOBUFS, counted in lost().
        return False

    def lost(self, netns: int) -> Dict[str, int]:
        mon = self._monitors.get(netns)
        if mon is not None:
            mon.check_overrun()
        n = (mon.lost + mon.unseen() if mon else 0) + self.decoder.raced(netns)
        return {k: n for k in self.event_types} if n else {}

    def close(self) -> None:
        for netns in list(self._monitors):
            self.unwatch(netns)



class NetChangeDecoder(Decoder):
    """netlink notification records (struct netchange_event, and
    struct nftchange_event for an nftables batch) to addr/link/route/neigh/
    rule/nft events. It reads the probe's monitor of each namespace (`monitors`:
    replies to its own requests are no changes; interface names) and counts
    the notifications lost to races (`raced`)."""

    records = (RECORD, NFT_RECORD)

    def __init__(self, monitors: Dict[int, _Monitor]) -> None:
        self._monitors = monitors
        self._last: Dict[int, Tuple[int, Optional[NetChangeEvent]]] = {}  # netns -> (skb, event) of the last record
        self._raced_count: Dict[int, int] = {}
        self._unmonitored: Dict[int, Present] = {}  # what is present, where no monitor knows it
        # (netns, tid) -> secondary addresses that task's request deleted so
        # far: its own request, unless a primary of theirs follows
        self._secondaries_deleted: Dict[Tuple[int, Optional[int]], List[AddrEvent]] = {}

    def forget(self, netns: int) -> None:
        self._last.pop(netns, None)
        self._raced_count.pop(netns, None)
        self._unmonitored.pop(netns, None)

    def _seen(self, netns: int, mon: Optional["_Monitor"]) -> "Present":
        return mon.present if mon is not None else self._unmonitored.setdefault(netns, Present())

    def raced(self, netns: int) -> int:
        """Notifications of `netns` lost: raced onto the monitor socket, or past a batch's copy."""
        return self._raced_count.get(netns, 0)

    def layout(self, hdr: Header) -> wire.Record:
        return NFT_RECORD if hdr.flags & NC_F_NFT else RECORD

    def decode(self, buf: bytes, hdr: Header) -> List[Event]:
        if hdr.flags & NC_F_NFT:
            return self._nft(buf, hdr)
        (skb, portid, msg_len, copied, cmd_len, cmdline, msg, sy_name, sy_value,
         req_netns, req_len, req_copied, _pad, req_msg) = _BODY.unpack_from(buf, RECORD.body_offset)
        mon = self._monitors.get(hdr.netns)
        if not self._readable(hdr.netns, skb, copied):
            if copied:
                blamed = self._blame_nobody(hdr.netns)
                return [blamed] if blamed is not None else []
            return []
        request = link_request(req_netns, req_len, req_msg[:req_copied])
        event = self._decode(buf, hdr, msg[:copied], cmd_len, cmdline, mon, request)
        if event is None:
            self._last[hdr.netns] = (skb, None)
            return []  # not a change (our own request's reply)
        functions = hdr.stack(buf).functions
        changes = sysctl_cause(event, functions, sy_name, sy_value)
        if changes:
            event = event.evolve(**changes)
        self._last[hdr.netns] = (skb, event)
        if isinstance(event, AddrEvent):
            return [event] + self._removed_with_their_primary(hdr, event, functions)
        return [event]

    def count(self, buf: bytes, hdr: Header) -> List[str]:
        """decode()'s kinds, without the events: the message's type says it
        (corrections are no new events; the races are counted the same)."""
        if hdr.flags & NC_F_NFT:
            return super().count(buf, hdr)
        skb, _portid, _msg_len, copied, _cmd_len, _cmdline, msg, *_ = _BODY.unpack_from(buf, RECORD.body_offset)
        if not self._readable(hdr.netns, skb, copied):
            return []
        mon = self._monitors.get(hdr.netns)
        kind = change_kind(msg[:copied], mon.portid if mon is not None else None)
        self._last[hdr.netns] = (skb, None)
        return [kind] if kind is not None else []

    def _readable(self, netns: int, skb: int, copied: int) -> bool:
        """Whether a record holds the message it was written for; if not,
        the change is counted as lost."""
        if not copied:
            # the queue was already empty (our reader took the message first) or
            # unreadable: something changed and we cannot say what
            self._raced_count[netns] = self._raced_count.get(netns, 0) + 1
            return False
        return not self._raced(netns, skb)

    def _removed_with_their_primary(self, hdr: Header, ev: "AddrEvent", functions: AbstractSet[str]) -> List[Event]:
        """The secondary addresses deleted just before `ev` by the same
        request, when `ev` is that request's primary: the kernel removed them
        with it, nobody asked (corrections of their events)."""
        key = (hdr.netns, ev.tid)
        # the kernel's own deletion of a primary: its lifetime ran out
        # (check_lifetime takes the subnet's secondaries with it)
        kernels = ev.cause == "kernel" and ev.detail not in (_EXPIRED, _WITH_AN_EXPIRED_PRIMARY)
        if ev.action != "deleted" or ev.family != 4 or kernels or \
                functions.isdisjoint(_DELETING_AN_IPV4_ADDRESS):
            self._secondaries_deleted.pop(key, None)
            return []
        if ev.flags & IFA_F_SECONDARY:
            if ev.detail == _EXPIRED:
                return []   # a secondary whose own lifetime ran out
            if len(self._secondaries_deleted) > 64:   # tasks that deleted a secondary and nothing after
                self._secondaries_deleted.clear()
            self._secondaries_deleted.setdefault(key, []).append(ev)
            return []
        return [sec.corrected(cause="kernel", detail=f"removed with {ev.address}, the primary address of its subnet")
                for sec in self._secondaries_deleted.pop(key, ()) if sec.ifindex == ev.ifindex]

    def _raced(self, netns: int, skb: int) -> bool:
        """Two notifications queued on one monitor socket from two CPUs at the
        same instant: with the tracepoint both programs read the queue's tail,
        so both records show the later message and the earlier one is lost.
        Seen as the same skb twice: the socket is not read while watched, so
        no skb is freed and no address comes back. The first record's process
        may not be the one that made that change: it is marked unknown, and
        the lost message is counted so negative assertions fail loudly."""
        last = self._last.get(netns)
        if not skb or last is None or last[0] != skb:
            return False
        self._raced_count[netns] = self._raced_count.get(netns, 0) + 1
        return True

    def _blame_nobody(self, netns: int) -> Optional[Event]:
        """After a race, the earlier record's event (already published) as a
        new fact naming nobody, or None when it already does."""
        skb, earlier = self._last[netns]
        if earlier is None or earlier.cause == "unknown":
            return None
        nobody = dict.fromkeys(("pid", "tid", "comm", "uid", "user", "ppid", "parent_comm", "cmdline"))
        corrected = earlier.corrected(
            **nobody, cause="unknown",
            detail="two changes raced onto the monitor socket: who made this one is unknown")
        self._last[netns] = (skb, corrected)
        return corrected

    def _decode(self, buf: bytes, hdr: Header, msg: bytes, cmd_len: int, cmdline: bytes,
                mon: Optional[_Monitor], request: Optional[LinkRequest]) -> Optional[NetChangeEvent]:
        kind = change_kind(msg, mon.portid if mon is not None else None)
        if kind is None:
            return None
        _length, mtype, nl_flags, _seq, _pid = _NLMSG.unpack_from(msg, 0)
        stack = hdr.stack(buf)
        common = dict(cmdline=command_line(cmdline, cmd_len))
        if kind == "addr":
            return self._addr(hdr, stack, msg, mtype, mon, common)
        if kind == "link":
            return self._link(hdr, stack, msg, mtype, mon, request, common)
        if kind == "route":
            return self._route(hdr, stack, msg, mtype, nl_flags, mon, common)
        if kind == "neigh":
            key = neigh_key(msg)
            assert key is not None   # change_kind checked it
            return self._neigh(hdr, stack, msg, mtype, key, mon, common)
        if kind == "rule":
            return self._rule(hdr, stack, msg, mtype, mon, common)
        return self._nexthop(hdr, stack, msg, mtype, nl_flags, mon, common)

    def _finish(self, cls: Type[NetChangeEvent], hdr: Header, stack: Stack,
                fields: Dict[str, Any], another_link: bool = False) -> NetChangeEvent:
        """The `cls` event of `stack` with its `fields` and how the change
        was asked for, and by whom (built once: a record's event was built,
        then rebuilt with these). `another_link`: the request being handled
        names another link than this one."""
        kthread = bool(hdr.flags & NT_F_KTHREAD)
        functions = own_functions(stack.frames)
        cause, detail = _cause(cls.kind, functions)
        if cause == "kernel" and fields.get("action") == "added" and functions.isdisjoint(_GOING_DOWN) and (
                detail == "link down" or detail in _VAGUE and not functions.isdisjoint(_COMING_UP)):
            # the same notifier (inetdev_event, NETDEV_UP/DOWN) for both ways;
            # NETDEV_CHANGEMTU runs NETDEV_UP's addrconf too, when the MTU is
            # back at 1280 or more (the link never went down)
            detail = "link up" if functions.isdisjoint(_MTU_SET) else \
                "the MTU went back to IPv6's minimum (1280) or above"
        if cls.kind == "link" and cause != "kernel" and (another_link or follows_another_link(stack.frames)):
            cause, detail = "kernel", _FOLLOWS_ANOTHER_LINK
        fields["cause"], fields["detail"] = cause, detail
        if hdr.flags & NC_F_QUEUED_BY:
            # announced by the kernel's DAD worker; task, stack and cause are
            # those of whoever queued that work (an interrupt: nobody)
            fields["announced_by"] = "addrconf_dad_work"
            # right away with nodad (its first announcement); else the task
            # announced it tentative, and the worker when it no longer was
            # (after DAD, or at once with accept_dad=0)
            if cause != "kernel" and fields.get("action") == "changed" and \
                    not fields.get("flags", IFA_F_NODAD) & IFA_F_NODAD:
                fields["detail"] = "announced by the kernel's DAD worker once the address was no longer tentative"
            elif cause != "kernel":
                fields["detail"] = "announced by the kernel's DAD worker (right away with nodad)"
        uid: Optional[int] = hdr.uid
        if kthread or stack.context("process") != "process" or applied_by_a_reader(stack.functions):
            # a kernel thread, an interrupt, or a pending carrier change that a
            # reader's query applied: no process asked for this
            fields.update(dict.fromkeys(("pid", "tid", "comm", "uid", "ppid", "parent_comm", "cmdline")),
                          interrupted_task=f"{hdr.comm}({hdr.pid})", cause="kernel")
            uid = None
        fields["user"] = user_name(uid)
        return cls(hdr, stack, "process", **fields)

    def _addr(self, hdr: Header, stack: Stack, msg: bytes, mtype: int,
              mon: Optional[_Monitor], common: Dict[str, Any]) -> NetChangeEvent:
        family, prefixlen, flags, scope, index = struct.unpack_from("<BBBBI", msg, 16)
        attrs = _attrs(msg, 24, len(msg))
        raw = _address_of(family, attrs)
        ip = _ip(raw, family)
        if 8 in attrs and len(attrs[8]) >= 4:  # IFA_FLAGS: the full 32-bit flags
            flags = struct.unpack_from("<I", attrs[8])[0]
        # IFA_LABEL is the address's label ("eth0:1" for an alias), which
        # starts with the device's name; the device is the one of ifindex
        label = _cstr(attrs.get(3))
        dev = (mon.names.get(index) if mon else None) or (label.split(":", 1)[0] if label else None)
        known = self._seen(hdr.netns, mon).addresses
        key = (family, index, raw or b"", prefixlen)   # address_key()
        if mtype == RTM_NEWADDR:
            action = "changed" if key in known else "added"
            known.add(key)
        else:
            action = "deleted"
            known.discard(key)
        fields = dict(action=action,
                      address=_interface(ip, prefixlen) if ip is not None else None,
                      family=4 if family == socket.AF_INET else 6, dev=dev, label=label, ifindex=index,
                      scope=scope, flags=flags, **common)
        event = self._finish(AddrEvent, hdr, stack, fields)
        deleting = not stack.functions.isdisjoint(_DELETING_AN_IPV4_ADDRESS)
        if mtype == RTM_NEWADDR and deleting and (event.cause != "kernel" or event.detail == _EXPIRED):
            # (on request, or the lifetime worker deleting an expired primary)
            return event.evolve(cause="kernel", detail="promoted to primary: its subnet's primary address was deleted")
        if mtype != RTM_NEWADDR and deleting and event.detail == _EXPIRED and flags & IFA_F_SECONDARY:
            cache = attrs.get(IFA_CACHEINFO, b"")
            valid_left = struct.unpack_from("<II", cache)[1] if len(cache) >= 8 else 0
            if valid_left:   # its own lifetime had not run out (INFINITY_LIFE_TIME: forever)
                return event.evolve(detail=_WITH_AN_EXPIRED_PRIMARY)
        if mtype == RTM_NEWADDR and action == "changed" and event.detail == _EXPIRED and flags & IFA_F_DEPRECATED:
            # the preferred lifetime ran out: deprecated, still there
            return event.evolve(detail=_DEPRECATED)
        return event

    def _link(self, hdr: Header, stack: Stack, msg: bytes, mtype: int, mon: Optional[_Monitor],
              request: Optional[LinkRequest], common: Dict[str, Any]) -> NetChangeEvent:
        _family, _pad, _type, index, flags, change = struct.unpack_from("<BBHiII", msg, 16)
        attrs = _attrs(msg, 32, len(msg))
        name = _cstr(attrs.get(3))
        if mon is not None and name:
            if mtype == RTM_DELLINK:
                mon.names.pop(index, None)
            else:
                mon.names[index] = name
        if mtype == RTM_DELLINK:
            action = "deleted"
            self._seen(hdr.netns, mon).link_down(index)
        elif change == 0xFFFFFFFF:
            action = "added"
        elif change & IFF_UP:
            action = "up" if flags & IFF_UP else "down"
            if action == "down":
                self._seen(hdr.netns, mon).link_down(index)
        else:
            action = "changed"
        kind_attr = _attrs(attrs[18], 0, len(attrs[18])).get(1) if 18 in attrs else None  # IFLA_LINKINFO/KIND
        mtu = struct.unpack("<I", attrs[4][:4])[0] if len(attrs.get(4, b"")) >= 4 else None
        oper = attrs.get(16)
        dev = name or (mon.names.get(index) if mon else None)
        fields = dict(action=action, dev=dev,
                      ifindex=index, up=bool(flags & IFF_UP), flags=flags, link_kind=_cstr(kind_attr),
                      mtu=mtu, operstate=_OPERSTATES.get(oper[0]) if oper else None, **common)
        # the stack says a request is being handled, not which link it names:
        # a veth's peer goes with it, under the same handler
        another = request is not None and not request.names(hdr.netns, index, dev, stack.functions)
        return self._finish(LinkEvent, hdr, stack, fields, another)

    def _route(self, hdr: Header, stack: Stack, msg: bytes, mtype: int, nl_flags: int,
               mon: Optional[_Monitor], common: Dict[str, Any]) -> NetChangeEvent:
        family, dst_len, _src_len, _tos, table, proto, _scope, rtype, _flags = \
            struct.unpack_from("<BBBBBBBBI", msg, 16)
        attrs = _attrs(msg, 28, len(msg))
        if 15 in attrs and len(attrs[15]) >= 4:  # RTA_TABLE: tables above 255
            table = struct.unpack_from("<I", attrs[15])[0]
        dst_ip = _ip(attrs.get(1), family)
        if dst_ip is None:
            dst_ip = ipaddress.ip_address(0) if family == socket.AF_INET else ipaddress.IPv6Address(0)
        oif = struct.unpack_from("<I", attrs[4])[0] if len(attrs.get(4, b"")) >= 4 else None
        prio = struct.unpack_from("<I", attrs[6])[0] if len(attrs.get(6, b"")) >= 4 else None
        hops = _route_hops(attrs.get(9), family, mon)   # RTA_MULTIPATH
        if hops and oif is None and len({h.ifindex for h in hops}) == 1:
            oif = hops[0].ifindex
        if mtype == RTM_DELROUTE:
            action = "deleted"
        else:  # `ip route replace` of an existing route: the kernel says NLM_F_REPLACE
            action = "replaced" if nl_flags & NLM_F_REPLACE else "added"
        fields = dict(action=action,
                      dst=_network(dst_ip, dst_len),
                      gateway=_ip(attrs.get(5), family), dev=mon.names.get(oif) if mon and oif else None,
                      ifindex=oif, table=RT_TABLES.get(table, table), family=4 if family == socket.AF_INET else 6,
                      type=RTN_TYPES.get(rtype, rtype), protocol=proto, priority=prio,
                      prefsrc=_ip(attrs.get(7), family), nhid=_u32(attrs, 30), nexthops=hops,  # RTA_NH_ID
                      **common)
        return self._finish(RouteEvent, hdr, stack, fields)

    def _neigh(self, hdr: Header, stack: Stack, msg: bytes, mtype: int, key: Tuple[int, int, bytes],
               mon: Optional[_Monitor], common: Dict[str, Any]) -> NetChangeEvent:
        family, index, dst = key
        state, flags = struct.unpack_from("<HB", msg, 24)
        attrs = _attrs(msg, 28, len(msg))
        lladdr = attrs.get(2)  # NDA_LLADDR
        old = mon.neighbours.get(key) if mon else None
        if mtype == RTM_DELNEIGH:
            action = "deleted"
            if mon:
                mon.neighbours.pop(key, None)
            if lladdr is None and old is not None:  # the kernel marks it FAILED first, without it
                lladdr = old[1]
        else:
            action = "added" if old is None else "changed"
            if mon:
                mon.neighbours[key] = (state, lladdr or (old[1] if old else None))
        fields = dict(action=action, address=_ip(dst, family),
                      lladdr=":".join(f"{b:02x}" for b in lladdr) if lladdr else None,
                      state=nud_state(state), old_state=nud_state(old[0]) if old is not None else None,
                      family=4 if family == socket.AF_INET else 6, flags=flags,
                      router=bool(flags & 0x80), proxy=bool(flags & 0x08),  # NTF_ROUTER, NTF_PROXY
                      dev=mon.names.get(index) if mon else None, ifindex=index, **common)
        return self._finish(NeighEvent, hdr, stack, fields)

    def _rule(self, hdr: Header, stack: Stack, msg: bytes, mtype: int,
              mon: Optional[_Monitor], common: Dict[str, Any]) -> NetChangeEvent:
        family, dst_len, src_len, tos, table, _r1, _r2, action, flags = struct.unpack_from("<8BI", msg, 16)
        attrs = _attrs(msg, 28, len(msg))
        table = _u32(attrs, 15) or table  # FRA_TABLE: tables above 255
        proto = attrs.get(21)  # FRA_PROTOCOL
        ip_proto = attrs.get(22)  # FRA_IP_PROTO
        suppress = _u32(attrs, 14)  # FRA_SUPPRESS_PREFIXLEN
        fields = dict(action="added" if mtype == RTM_NEWRULE else "deleted",
                      # FRA_PRIORITY: the kernel leaves it out for priority 0 (`ip rule add pref 0`)
                      family=4 if family == socket.AF_INET else 6, priority=_u32(attrs, 6) or 0,
                      src=_prefix(attrs.get(2), family, src_len), dst=_prefix(attrs.get(1), family, dst_len),
                      iif=_cstr(attrs.get(3)), oif=_cstr(attrs.get(17)), fwmark=_u32(attrs, 10),
                      fwmask=_u32(attrs, 16), table=RT_TABLES.get(table, table),
                      rule_action=FR_ACTIONS.get(action, action), goto=_u32(attrs, 4),
                      invert=bool(flags & 0x2),  # FIB_RULE_INVERT
                      protocol=proto[0] if proto else None, tos=tos or None,
                      ip_proto=IpProto.NAMES.get(ip_proto[0], ip_proto[0]) if ip_proto else None,
                      sport=_range(attrs.get(23), "<HH"), dport=_range(attrs.get(24), "<HH"),  # FRA_*PORT_RANGE
                      uidrange=_range(attrs.get(20), "<II"),  # FRA_UID_RANGE
                      suppress_prefixlength={None: None, 0xFFFFFFFF: None}.get(suppress, suppress),  # -1: none
                      l3mdev=bool(attrs.get(19, b"\0")[:1] != b"\0"),  # FRA_L3MDEV
                      dev=None, ifindex=None, **common)
        return self._finish(RuleEvent, hdr, stack, fields)

    def _nexthop(self, hdr: Header, stack: Stack, msg: bytes, mtype: int, nl_flags: int,
                 mon: Optional[_Monitor], common: Dict[str, Any]) -> NetChangeEvent:
        family, _scope, proto, _resvd, _flags = struct.unpack_from("<BBBBI", msg, 16)
        attrs = _attrs(msg, 24, len(msg))
        nh_id = _u32(attrs, 1)  # NHA_ID
        assert nh_id is not None   # change_kind checked it
        present = self._seen(hdr.netns, mon)
        if mtype == RTM_DELNEXTHOP:
            action = "deleted"
            present.nexthop_deleted(nh_id)
        else:
            # the kernel echoes the request's flags: NLM_F_EXCL (`ip nexthop
            # add`) succeeds only for an id not there; a group it rewrote after
            # a member was deleted carries neither NLM_F_CREATE nor NLM_F_REPLACE
            if nh_id not in present.nexthops or nl_flags & NLM_F_EXCL:
                action = "added"
            elif nl_flags & (NLM_F_REPLACE | NLM_F_CREATE):
                action = "replaced"
            else:
                action = "changed"
            present.nexthop_announced(nh_id, attrs)
        oif = _u32(attrs, 5)
        group = nexthop_group(attrs.get(2))
        group_type: Union[str, int, None] = None
        if group:   # NHA_GROUP_TYPE: absent for a plain multipath group on some kernels
            raw_type = struct.unpack_from("<H", attrs[3])[0] if len(attrs.get(3, b"")) >= 2 else 0
            group_type = NH_GROUP_TYPES.get(raw_type, raw_type)
        fields = dict(action=action, id=nh_id, family={socket.AF_INET: 4, socket.AF_INET6: 6}.get(family),
                      gateway=_ip(attrs.get(6), family), blackhole=4 in attrs, group=group,
                      group_type=group_type,
                      fdb=11 in attrs, protocol=proto, dev=mon.names.get(oif) if mon and oif else None,
                      ifindex=oif, **common)
        event = self._finish(NexthopEvent, hdr, stack, fields)
        if action == "changed" and event.cause == "netlink":
            event = event.evolve(cause="kernel", detail="a member of the group was deleted")
        return event

    def _nft(self, buf: bytes, hdr: Header) -> List[Event]:
        """Every change of one nftables notification batch, each attributed to
        the committing task."""
        skb, _portid, msg_len, copied, cmd_len, cmdline, msg = _NFT_BODY.unpack_from(buf, NFT_RECORD.body_offset)
        if not copied or self._raced(hdr.netns, skb):
            if not copied:
                self._raced_count[hdr.netns] = self._raced_count.get(hdr.netns, 0) + 1
            return []
        msg = msg[:copied]
        if copied < msg_len and not _nft.complete(msg, msg_len):
            # a batch longer than the copy: the changes past it are lost
            self._raced_count[hdr.netns] = self._raced_count.get(hdr.netns, 0) + 1
        stack = hdr.stack(buf)
        line = command_line(cmdline, cmd_len)
        events: List[NetChangeEvent] = []
        for change in _nft.changes(msg):
            fields = dict(cmdline=line, dev=None, ifindex=None, **change)
            events.append(self._finish(NftEvent, hdr, stack, fields))
        self._last[hdr.netns] = (skb, events[-1] if events else None)
        return list(events)


def _address_filters(address: Any, dev: Optional[str]) -> Dict[str, Any]:
    filters: Dict[str, Any] = {}
    if address is not None:
        filters["address"] = parse_address(address)
    if dev is not None:
        filters["dev"] = dev
    return filters


class ChangeFilters(CommonFilters, total=False):
    """Filters every configuration change (addr, link, route, neigh, rule, nexthop, nft) takes."""

    action: Filter[str]
    dev: Filter[str]
    ifindex: Filter[int]
    cause: Filter[str]
    detail: Filter[str]
    cmdline: Filter[str]
    user: Filter[str]
    announced_by: Filter[str]


class AddrFilters(ChangeFilters, total=False):
    """Filters of 'addr' events: a keyword per field (nettrace.events('addr', ...) takes them too)."""

    address: AddressFilter
    family: Filter[Union[int, str]]
    scope: Filter[str]
    flags: Filter[Any]
    label: Filter[str]


class LinkFilters(ChangeFilters, total=False):
    """Filters of 'link' events: a keyword per field (nettrace.events('link', ...) takes them too)."""

    up: Filter[bool]
    flags: Filter[Any]
    link_kind: Filter[str]
    mtu: Filter[int]
    operstate: Filter[str]


class RouteFilters(ChangeFilters, total=False):
    """Filters of 'route' events: a keyword per field (nettrace.events('route', ...) takes them too)."""

    dst: AddressFilter
    gateway: AddressFilter
    table: Filter[Union[int, str]]
    family: Filter[Union[int, str]]
    type: Filter[str]
    protocol: Filter[Any]
    priority: Filter[int]
    prefsrc: AddressFilter
    nhid: Filter[int]
    nexthops: Filter[Any]


class NeighFilters(ChangeFilters, total=False):
    """Filters of 'neigh' events: a keyword per field (nettrace.events('neigh', ...) takes them too)."""

    address: AddressFilter
    lladdr: Filter[str]
    state: Filter[str]
    old_state: Filter[str]
    family: Filter[Union[int, str]]
    flags: Filter[Any]
    router: Filter[bool]
    proxy: Filter[bool]


class RuleFilters(ChangeFilters, total=False):
    """Filters of 'rule' events: a keyword per field (nettrace.events('rule', ...) takes them too)."""

    family: Filter[Union[int, str]]
    priority: Filter[int]
    src: AddressFilter
    dst: AddressFilter
    iif: Filter[str]
    oif: Filter[str]
    fwmark: Filter[int]
    fwmask: Filter[int]
    table: Filter[Union[int, str]]
    rule_action: Filter[str]
    goto: Filter[int]
    invert: Filter[bool]
    protocol: Filter[Any]
    tos: Filter[int]
    ip_proto: Filter[Union[str, int]]
    sport: Filter[Any]
    dport: Filter[Any]
    uidrange: Filter[Any]
    suppress_prefixlength: Filter[int]
    l3mdev: Filter[bool]


class NexthopFilters(ChangeFilters, total=False):
    """Filters of 'nexthop' events: a keyword per field (nettrace.events('nexthop', ...) takes them too)."""

    id: Filter[int]
    family: Filter[Union[int, str]]
    gateway: AddressFilter
    blackhole: Filter[bool]
    group: Filter[Any]
    group_type: Filter[str]
    fdb: Filter[bool]
    protocol: Filter[Any]


class NftFilters(ChangeFilters, total=False):
    """Filters of 'nft' events: a keyword per field (nettrace.events('nft', ...) takes them too)."""

    object: Filter[str]
    family: Filter[str]
    table: Filter[str]
    chain: Filter[str]
    set: Filter[str]
    handle: Filter[int]
    name: Filter[str]
    text: Filter[str]


class NetChangeApi(KindApi):
    """`nettrace` methods for network configuration changes (Trace exposes them)."""

    def address_changes(self, **filters: Unpack[AddrFilters]) -> List[AddrEvent]:
        """Addresses added or deleted (kind "addr"), with who did it."""
        return cast(List[AddrEvent], self.ctx.events("addr", **filters))

    def link_changes(self, **filters: Unpack[LinkFilters]) -> List[LinkEvent]:
        """Links added, deleted, set up/down or changed (kind "link")."""
        return cast(List[LinkEvent], self.ctx.events("link", **filters))

    def route_changes(self, **filters: Unpack[RouteFilters]) -> List[RouteEvent]:
        """Routes added or deleted (kind "route")."""
        return cast(List[RouteEvent], self.ctx.events("route", **filters))

    def assert_address_deleted(self, address: Any, *, dev: Optional[str] = None, by_pid: Optional[int] = None,
                               by_comm: Optional[str] = None, timeout: float = 2.0) -> AddrEvent:
        """`address` ("192.168.0.1", "192.168.0.1/24" or an ipaddress object) was
        deleted (from `dev`, by `by_pid` / `by_comm` when given); returns the event."""
        filters = _address_filters(address, dev)
        if by_pid is not None:
            filters["pid"] = by_pid
        if by_comm is not None:
            filters["comm"] = by_comm
        return cast(AddrEvent, self.ctx.wait_for("addr", timeout=timeout, action="deleted", **filters))

    def assert_address_not_deleted(self, address: Any = None, *, dev: Optional[str] = None) -> None:
        """No address (or not `address`, on `dev` when given) was deleted — and none may have been lost."""
        self.ctx.assert_none("addr", action="deleted", **_address_filters(address, dev))

    def neighbour_changes(self, **filters: Unpack[NeighFilters]) -> List[NeighEvent]:
        """ARP/NDP neighbour entries added, changed or deleted (kind "neigh")."""
        return cast(List[NeighEvent], self.ctx.events("neigh", **filters))

    def assert_neighbour_not_deleted(self, address: Any = None, *, dev: Optional[str] = None) -> None:
        """No neighbour entry (or not `address`, on `dev` when given) was
        deleted — `ip neigh flush`, `arp -d` — and none may have been lost."""
        self.ctx.assert_none("neigh", action="deleted", **_address_filters(address, dev))

    def nft_changes(self, **filters: Unpack[NftFilters]) -> List[NftEvent]:
        """nftables tables, chains, rules, sets and elements added or
        deleted (kind "nft")."""
        return cast(List[NftEvent], self.ctx.events("nft", **filters))

    def rule_changes(self, **filters: Unpack[RuleFilters]) -> List[RuleEvent]:
        """Policy-routing rules (`ip rule`) added or deleted (kind "rule")."""
        return cast(List[RuleEvent], self.ctx.events("rule", **filters))

    def nexthop_changes(self, **filters: Unpack[NexthopFilters]) -> List[NexthopEvent]:
        """Nexthop objects (`ip nexthop`) added, replaced, changed or deleted (kind "nexthop")."""
        return cast(List[NexthopEvent], self.ctx.events("nexthop", **filters))


PROBE = NetChangeProbe
API = NetChangeApi

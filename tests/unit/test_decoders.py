"""Every probe's decoder on synthetic records built from the wire contract,
and the record decoder's own checks (length, kind): root-free, no kernel."""
from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from pytest_nettrace.events import check_filters, matches
from pytest_nettrace.kernel import wire
from pytest_nettrace.kernel.records import RecordDecoder
from pytest_nettrace.probes.conn import ConnProbe
from pytest_nettrace.probes.drop import DropEvent, DropProbe
from pytest_nettrace.probes.netchange import (RTM_DELLINK, RTM_NEWADDR, RTM_NEWLINK, RTM_NEWNEXTHOP, RTM_SETLINK,
                                              LinkRequest, NetChangeProbe, applied_by_a_reader, link_request)
from pytest_nettrace.probes.packet import PacketProbe
from pytest_nettrace.probes.retransmit import RetransmitEvent, RetransmitProbe
from pytest_nettrace.probes.rst import RstProbe
from pytest_nettrace.probes.syscall import CALLS, SyscallProbe
from pytest_nettrace.probes.sysctl import SysctlProbe

from records import NETNS, addr, decode, record


def test_rst_reply():
    rec = record(wire.RST_EVENT, wire.Kind.RST, origin=0, family=4, state=7, sport=80, dport=43210,
                 saddr=addr("10.0.0.1"), daddr=addr("10.0.0.2"))
    [ev] = decode(RstProbe(), rec)
    assert (ev.kind, ev.direction, ev.origin, ev.family) == ("rst", "sent", "reply", 4)
    assert (ev.saddr, ev.sport, ev.daddr, ev.dport) == (ipaddress.ip_address("10.0.0.1"), 80,
                                                       ipaddress.ip_address("10.0.0.2"), 43210)
    assert ev.state == "CLOSE" and ev.reason is None and ev.netns == NETNS
    # a reply runs in softirq: nobody is blamed for it
    assert ev.context == "softirq" and ev.pid is None and ev.comm is None


def test_rst_active_is_the_process_and_v6():
    rec = record(wire.RST_EVENT, wire.Kind.RST, origin=1, family=6, state=1, sport=5000, dport=80,
                 saddr=addr("fd00::1"), daddr=addr("fd00::2"), pid=77, comm=b"python3")
    [ev] = decode(RstProbe(), rec)
    assert (ev.origin, ev.family, ev.state, ev.pid, ev.comm) == ("active", 6, "ESTABLISHED", 77, "python3")
    assert ev.daddr == ipaddress.ip_address("fd00::2")


def test_retransmit_counts_the_same_segment():
    probe = RetransmitProbe()
    fields = dict(sk=0xffff888000001000, seq=1000, total_retrans=1, type=0, family=4, state=1, sport=40000,
                  dport=80, saddr=addr("10.0.0.2"), daddr=addr("10.0.0.1"))
    rec = record(wire.RETRANS_EVENT, wire.Kind.RETRANS, **fields)
    first, second = decode(probe, rec) + decode(probe, rec)
    assert (first.type, first.count, second.count, first.seq) == ("retransmit", 1, 2, 1000)
    [syn] = decode(probe, record(wire.RETRANS_EVENT, wire.Kind.RETRANS, **{**fields, "state": 2, "seq": 7}))
    assert syn.type == "syn" and syn.state == "SYN_SENT"
    assert first.err == 0 and "not sent" not in first.describe()


def test_retransmit_the_kernel_counted_but_could_not_send_carries_its_error():
    probe = RetransmitProbe()
    fields = dict(sk=0xffff888000001000, seq=1000, total_retrans=3, segs=2, type=0, family=6, state=1, sport=40000,
                  dport=80, saddr=addr("fd00::2"), daddr=addr("fd00::1"))
    netfilter, qdisc = (decode(probe, record(wire.RETRANS_EVENT, wire.Kind.RETRANS, **{**fields, "err": err}))[0]
                        for err in (-1, 1))
    assert (netfilter.err, netfilter.segs, netfilter.count, qdisc.count) == (-1, 2, 1, 2)
    assert netfilter.describe().endswith("seq 1000 (#1, not sent: -EPERM)")
    assert qdisc.describe().endswith("(#2, not sent: NET_XMIT_DROP)")
    assert matches(qdisc, check_filters(RetransmitEvent, {"err": 1}))
    assert not matches(qdisc, check_filters(RetransmitEvent, {"err": 0}))


def test_conn_accept_corrects_the_established_record_with_a_new_fact():
    probe = ConnProbe()
    common = dict(sk=0xffff888000002000, family=4, sport=80, dport=40000, saddr=addr("10.0.0.1"),
                  daddr=addr("10.0.0.2"), oldstate=3, newstate=1)
    established = record(wire.CONN_EVENT, wire.Kind.CONN, action=1, **common)
    accepted = record(wire.CONN_EVENT, wire.Kind.CONN, action=2, pid=99, comm=b"server", **common)
    first, owned = decode(probe, established, accepted)
    assert (first.action, first.pid) == ("accept", None)  # published: never changes
    assert owned.supersedes is first and (owned.action, owned.pid, owned.comm) == ("accept", 99, "server")
    close = record(wire.CONN_EVENT, wire.Kind.CONN, action=3, has_birth=1, duration_ns=2_500_000,
                   bytes_acked=10, bytes_received=20, **{**common, "newstate": 7})
    [ev] = decode(probe, close)
    assert (ev.action, ev.duration_ms, ev.bytes_sent, ev.bytes_received) == ("close", 2.5, 10, 20)


def test_conn_context_is_the_kernels_softirq_flag():
    common = dict(sk=0xffff888000003000, family=4, sport=40000, dport=80, saddr=addr("10.0.0.2"),
                  daddr=addr("10.0.0.1"), oldstate=2, newstate=1, has_owner=1, owner_pid=7, owner_comm=b"client")
    [soft] = decode(ConnProbe(), record(wire.CONN_EVENT, wire.Kind.CONN, flags=wire.CONN_F_SOFTIRQ, **common))
    [proc] = decode(ConnProbe(), record(wire.CONN_EVENT, wire.Kind.CONN, pid=7, **common))
    assert (soft.context, soft.pid, soft.comm, soft.ppid) == ("softirq", 7, "client", None)  # the owner, not blamed
    assert (proc.context, proc.pid, proc.ppid) == ("process", 7, 1)  # in the owner's own context: its parent too


def test_conn_a_reset_close_carries_its_stack_in_the_longer_record():
    common = dict(sk=0xffff888000004000, family=4, sport=40000, dport=80, saddr=addr("10.0.0.2"),
                  daddr=addr("10.0.0.1"), action=3, oldstate=1, newstate=7)
    stack = [0xffffffff81000000, 0xffffffff81000100]
    rec = record(wire.CONN_STACK_EVENT, wire.Kind.CONN, flags=wire.CONN_F_STACK, stack=stack,
                 **common)
    [ev] = decode(ConnProbe(), rec)
    assert (ev.action, ev.old_state, len(ev.stack)) == ("close", "ESTABLISHED", 2)
    # the flag says which layout: a long record without it is a stale object's, not an event
    dec = RecordDecoder()
    dec.add(ConnProbe())
    assert dec.decode(record(wire.CONN_STACK_EVENT, wire.Kind.CONN, **common)) == []
    assert dec.lost(NETNS) == {wire.Kind.CONN: 1}


def test_drop_fields():
    probe = DropProbe()
    dec = probe.decoder
    dec.reasons, dec.has_reason = {2: "NO_SOCKET"}, True
    dec.locations[0xffffffff81000000] = "tcp_v4_rcv+0x10"  # as a stack once told (no kallsyms here)
    rec = record(wire.DROP_EVENT, wire.Kind.DROP, location=0xffffffff81000000, reason=2, len=60, ifindex=2,
                 protocol=0x0800, family=4, ip_proto=6, sport=40000, dport=9, has_reason=1, has_ports=1,
                 dev=b"eth0", saddr=addr("10.0.0.2"), daddr=addr("10.0.0.1"))
    [ev] = decode(probe, rec)
    assert (ev.reason, ev.location, ev.dev, ev.ip_proto, ev.dport, ev.length) == (
        "NO_SOCKET", "tcp_v4_rcv+0x10", "eth0", "tcp", 9, 60)
    [v6] = decode(probe, record(wire.DROP_EVENT, wire.Kind.DROP, location=0xffffffff81000000, family=6,
                                ip_proto=58, protocol=0x86DD, saddr=addr("fd00::1"), daddr=addr("ff02::1")))
    assert v6.ip_proto == "icmpv6" and v6.sport is None and v6.reason is None
    # named as filters name it: GRE was 47, which a filter must write "gre"
    [gre] = decode(probe, record(wire.DROP_EVENT, wire.Kind.DROP, location=0xffffffff81000000, family=4,
                                 ip_proto=47, protocol=0x0800, saddr=addr("10.0.0.2"), daddr=addr("10.0.0.1")))
    assert matches(gre, check_filters(DropEvent, {"ip_proto": "gre"}))


def test_a_packet_sockets_own_copy_is_not_a_drop():
    # Debian 6.1/6.12: a capture's fanout group frees other namespaces' frames
    # at packet_rcv_fanout; a full ring frees its copy in tpacket_rcv
    probe = DropProbe()
    dec = probe.decoder
    dec.reasons, dec.has_reason = {2: "NOT_SPECIFIED"}, True
    dec.locations[0xffffffff81000100] = "packet_rcv_fanout+0xcc"
    dec.locations[0xffffffff81000200] = "tpacket_rcv [af_packet]+0x3a"
    dec.locations[0xffffffff81000300] = "tcp_v4_rcv+0x10"
    common = dict(reason=2, len=66, family=4, ip_proto=6, protocol=0x0800, has_reason=1,
                  saddr=addr("10.0.0.2"), daddr=addr("10.0.0.1"))
    taps = [record(wire.DROP_EVENT, wire.Kind.DROP, location=a, **common)
            for a in (0xffffffff81000100, 0xffffffff81000200)]
    assert decode(probe, *taps) == []
    [real] = decode(probe, record(wire.DROP_EVENT, wire.Kind.DROP, location=0xffffffff81000300, **common))
    assert real.location == "tcp_v4_rcv+0x10"


def _syscall(name: str, args, ret: int = 0, sockaddr: bytes = b"", **fields):
    rec = record(wire.SYSCALL_EVENT, wire.Kind.SYSCALL, args=list(args), ret=ret, code=CALLS.index(name) + 1,
                 addr_len=len(sockaddr), addr=sockaddr, duration=1500, **fields)
    [ev] = decode(SyscallProbe(), rec)
    return ev


def _sockaddr_in(ip: str, port: int) -> bytes:
    return socket.AF_INET.to_bytes(2, "little") + port.to_bytes(2, "big") + socket.inet_aton(ip) + bytes(8)


def test_syscall_connect_refused_rendered_as_strace():
    ev = _syscall("connect", (3, 0x7ffd0000, 16, 0, 0, 0), ret=-111, sockaddr=_sockaddr_in("10.0.0.1", 9))
    assert (ev.name, ev.fd, ev.errno, ev.address, ev.port, ev.family) == (
        "connect", 3, "ECONNREFUSED", ipaddress.ip_address("10.0.0.1"), 9, 4)
    assert ev.args == "3, {AF_INET, 10.0.0.1:9}, 16"
    assert ev.duration == 1.5e-6


def test_syscall_an_ipv4_mapped_peer_is_written_as_strace_writes_it():
    # a dual-stack listener's accept of an IPv4 client
    addr = struct.pack("<HHI", socket.AF_INET6, socket.htons(45294), 0) + \
        ipaddress.IPv6Address("::ffff:10.0.0.2").packed + b"\0" * 4
    ev = _syscall("accept4", (3, 0x7ffd0000, 0x7ffd0100, 0x80000, 0, 0), ret=4, sockaddr=addr)
    assert ev.args == "3, {AF_INET6, [::ffff:10.0.0.2]:45294}, [28], SOCK_CLOEXEC"
    assert (ev.address, ev.port, ev.family) == (ipaddress.ip_address("10.0.0.2"), 45294, 6)


def test_syscall_setsockopt_names_level_and_option():
    # the option's value travels in the sockaddr's room
    ev = _syscall("setsockopt", (4, socket.SOL_SOCKET, socket.SO_REUSEADDR, 0x7ffd0000, 4, 0),
                  sockaddr=struct.pack("<i", 1))
    assert (ev.level, ev.option, ev.value) == ("SOL_SOCKET", "SO_REUSEADDR", 1)
    assert ev.args == "4, SOL_SOCKET, SO_REUSEADDR, [1], 4" and ev.address is None
    linger = _syscall("setsockopt", (4, socket.SOL_SOCKET, socket.SO_LINGER, 0x7ffd0000, 8, 0),
                      sockaddr=struct.pack("<ii", 1, 0))
    assert linger.args == "4, SOL_SOCKET, SO_LINGER, {l_onoff=1, l_linger=0}, 8"
    # getsockopt: value = the length returned, value2 = the room given (has_value)
    dev = _syscall("getsockopt", (4, socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 0x7ffd0000, 0x7ffd0100, 0),
                   sockaddr=b"lo\0", value=3, value2=16, has_value=1)
    assert (dev.args, dev.value) == ('4, SOL_SOCKET, SO_BINDTODEVICE, "lo\\0", [16 => 3]', "lo")


def test_syscall_socket_renders_family_and_type():
    ev = _syscall("socket", (socket.AF_INET6, socket.SOCK_STREAM | socket.SOCK_CLOEXEC, 0, 0, 0, 0), ret=5)
    assert ev.fd is None and ev.ret == 5
    assert ev.args.startswith("AF_INET6, SOCK_STREAM|SOCK_CLOEXEC")


def test_sysctl_write_named_as_sysctl_spells_it_and_a_restart_is_one_event():
    probe = SysctlProbe()
    name = b"net/ipv4/conf/eth0.100/rp_filter"
    rec = record(wire.SYSCTL_EVENT, wire.Kind.SYSCTL, name_len=len(name), old_len=2, new_len=2, name=name,
                 old=b"0\n", new=b"1\n", cmdline=b"sysctl\0-w\0", cmdline_len=10)
    [ev] = decode(probe, rec, rec)  # the same write restarted: one event
    assert (ev.name, ev.old, ev.new) == ("net.ipv4.conf.eth0/100.rp_filter", "0", "1")


def _sysctl_write(new: bytes, syscw: int, wchar: int = 100) -> bytes:
    name = b"net/ipv4/ip_default_ttl"
    return record(wire.SYSCTL_EVENT, wire.Kind.SYSCTL, name_len=len(name), old_len=3, new_len=len(new),
                  name=name, old=b"64\n", new=new, io_known=1, syscw=syscw, wchar=wchar)


def _sysctl_result(ret: int) -> bytes:
    return record(wire.SYSCTL_RESULT, wire.Kind.SYSCTL, flags=wire.SY_F_RESULT, ret=ret)


def test_sysctl_a_refused_write_is_corrected_with_its_error_and_changed_nothing():
    first, fixed = decode(SysctlProbe(), _sysctl_write(b"300\n", 5), _sysctl_result(-22))
    assert (first.ret, first.changed) == (None, True)   # as published before the write returned
    assert fixed.supersedes is first and (fixed.ret, fixed.error, fixed.changed) == (-22, "EINVAL", False)
    assert fixed.describe() == "failed to write net.ipv4.ip_default_ttl=300: EINVAL (was 64)"


def test_sysctl_a_restart_is_one_write_and_a_refused_value_tried_again_is_two():
    # restarted (ERESTARTNOINTR): the hook runs again with nothing written in between
    events = decode(SysctlProbe(), _sysctl_write(b"1\n", 5), _sysctl_result(-513), _sysctl_write(b"1\n", 6),
                    _sysctl_result(2))
    assert [(e.new, e.ret) for e in events] == [("1", None), ("1", 2)]
    # refused, then the same value written again (sysctl(8) does): two writes
    events = decode(SysctlProbe(), _sysctl_write(b"300\n", 5), _sysctl_result(-22), _sysctl_write(b"300\n", 6),
                    _sysctl_result(-22))
    assert [(e.ret, e.supersedes is None) for e in events] == [(None, True), (-22, False), (None, True),
                                                                (-22, False)]


def _newaddr(ip: str, prefixlen: int, index: int) -> bytes:
    msg = ifaddrmsg()
    msg["header"]["type"] = RTM_NEWADDR
    msg["family"], msg["prefixlen"], msg["index"] = socket.AF_INET, prefixlen, index
    msg["attrs"] = [("IFA_ADDRESS", ip), ("IFA_LOCAL", ip), ("IFA_LABEL", "eth0")]
    msg.encode()
    return bytes(msg.data)


def test_netchange_address_added_from_a_notification():
    msg = _newaddr("10.0.0.1", 24, 2)
    rec = record(wire.NETCHANGE_EVENT, wire.Kind.NLMSG, skb=0xffff888000003000, portid=1234, msg_len=len(msg),
                 copied=len(msg), msg=msg, cmdline=b"ip\0addr\0add\0", cmdline_len=12, pid=55, comm=b"ip")
    [ev] = decode(NetChangeProbe(), rec)
    assert (ev.kind, ev.action, ev.address, ev.dev, ev.pid, ev.cmdline) == (
        "addr", "added", ipaddress.ip_interface("10.0.0.1/24"), "eth0", 55, "ip addr add")


def test_netchange_kernel_thread_blames_nobody():
    msg = _newaddr("10.0.0.1", 24, 2)
    rec = record(wire.NETCHANGE_EVENT, wire.Kind.NLMSG, flags=wire.NT_F_KTHREAD, skb=1, msg_len=len(msg),
                 copied=len(msg), msg=msg, comm=b"kworker/0:1")
    [ev] = decode(NetChangeProbe(), rec)
    assert ev.cause == "kernel" and ev.pid is None and ev.interrupted_task == "kworker/0:1(42)"


def test_netchange_raced_record_names_nobody_and_counts_as_lost():
    probe = NetChangeProbe()
    msg = _newaddr("10.0.0.1", 24, 2)
    fields = dict(skb=0xffff888000004000, msg_len=len(msg), copied=len(msg), msg=msg)
    first, again = (record(wire.NETCHANGE_EVENT, wire.Kind.NLMSG, pid=7, comm=b"ip", **fields) for _ in range(2))
    ev, blamed = decode(probe, first, again)
    assert ev.pid == 7 and blamed.supersedes is ev and blamed.pid is None and blamed.cause == "unknown"
    assert probe.lost(NETNS) == {k: 1 for k in probe.event_types}


def _dellink(family: int) -> bytes:
    msg = ifinfmsg()
    msg["header"]["type"] = RTM_DELLINK
    msg["family"], msg["index"] = family, 2
    msg["attrs"] = [("IFLA_IFNAME", "e1")]
    msg.encode()
    return bytes(msg.data)


def test_netchange_a_bridge_port_leaving_its_bridge_is_no_link_deleted():
    # the port's own AF_BRIDGE RTM_DELLINK (`ip link set e1 nomaster`); the
    # interface's own (AF_UNSPEC) one is the interface going away
    recs = [record(wire.NETCHANGE_EVENT, wire.Kind.NLMSG, skb=skb, msg_len=len(msg), copied=len(msg), msg=msg,
                   pid=55, comm=b"ip")
            for skb, msg in ((0xffff888000005000, _dellink(socket.AF_BRIDGE)),
                             (0xffff888000006000, _dellink(socket.AF_UNSPEC)))]
    [ev] = decode(NetChangeProbe(), *recs)
    assert (ev.kind, ev.action, ev.dev) == ("link", "deleted", "e1")


def _link_request(mtype: int, index: int = 0, flags: int = 0x5, **attrs: object) -> bytes:
    """An rtnetlink link request as `ip` or pyroute2 sends it."""
    msg = ifinfmsg()
    msg["header"]["type"], msg["header"]["flags"] = mtype, flags
    msg["index"] = index
    msg["attrs"] = list(attrs.items())
    msg.encode()
    return bytes(msg.data)


def test_the_link_a_request_names():
    """`ip link del v0` (RTM_DELLINK, v0's index), pyroute2 by name,
    `ip link set v0 netns b` (moves it): one link of the sender's namespace.
    A new link (`ip link add` names a veth's peer as well), a group, a link
    of another namespace by id, several messages in one call, a copy cut
    short: no one link."""
    ns = 4026532001
    dellink = _link_request(RTM_DELLINK, 7)
    assert link_request(ns, len(dellink), dellink) == LinkRequest(ns, 7, None, False)
    by_name = _link_request(RTM_SETLINK, IFLA_IFNAME="v0")
    assert link_request(ns, len(by_name), by_name) == LinkRequest(ns, 0, "v0", False)
    move = _link_request(RTM_NEWLINK, 7, IFLA_NET_NS_FD=5)
    assert link_request(ns, len(move), move) == LinkRequest(ns, 7, None, True)
    renamed = _link_request(RTM_NEWLINK, 7, IFLA_IFNAME="v9")   # by its index: the name is the new one
    assert link_request(ns, len(renamed), renamed) == LinkRequest(ns, 7, None, False)
    for msg in (_link_request(RTM_NEWLINK, flags=0x605, IFLA_IFNAME="v0"),   # NLM_F_CREATE
                _link_request(RTM_DELLINK, IFLA_GROUP=5),
                _link_request(RTM_DELLINK, 7, IFLA_IF_NETNSID=1),   # IFLA_TARGET_NETNSID
                _newaddr("10.0.0.1", 24, 7)):
        assert link_request(ns, len(msg), msg) is None, msg
    assert link_request(ns, 2 * len(dellink), dellink + dellink) is None     # two messages, one call
    assert link_request(ns, 0, dellink) is None                              # (several buffers)
    assert link_request(ns, len(by_name), by_name[:-4]) is None              # cut short
    assert link_request(0, len(dellink), dellink) is None                    # no request read


def test_a_link_notification_under_a_request_for_another_is_not_its_own():
    request = LinkRequest(4026532001, 7, None, False)
    assert request.names(4026532001, 7, "v0", frozenset())
    assert not request.names(4026532001, 8, "v1", frozenset())     # the peer, same namespace
    assert not request.names(4026532002, 7, "v1", frozenset())     # the peer elsewhere, the same index
    moved = request._replace(moves=True)
    assert moved.names(4026532002, 3, "v0", frozenset({"__dev_change_net_namespace"}))
    assert not moved.names(4026532002, 3, "v1", frozenset({"linkwatch_event"}))
    assert LinkRequest(4026532001, 0, "v0", False).names(4026532001, 9, "v0", frozenset())


def _newnexthop(nh_id: int, flags: int, *attrs: bytes) -> bytes:
    body = struct.pack("<BBBBI", 0, 0, 0, 0, 0) + struct.pack("<HHI", 8, 1, nh_id) + b"".join(attrs)
    return struct.pack("<IHHII", 16 + len(body), RTM_NEWNEXTHOP, flags, 1, 0) + body


def _nh_attr(kind: int, value: bytes) -> bytes:
    return struct.pack("<HH", 4 + len(value), kind) + value + bytes(-len(value) % 4)


def test_netchange_nexthop_groups_and_what_each_notification_is():
    """A group's members and weights (the kernel keeps weight - 1; its high
    byte apart), resilient groups; a new id is an addition even by `replace`,
    a known one replaced; a group rewritten without request flags (a member
    deleted) is a change."""
    members = struct.pack("<IBBH", 1, 2, 0, 0) + struct.pack("<IBBH", 2, 0, 0, 0) + struct.pack("<IBBH", 3, 43, 1, 0)
    msgs = [_newnexthop(10, 0x505, _nh_attr(2, members), _nh_attr(3, struct.pack("<H", 1))),   # replace, new id
            _newnexthop(10, 0x505, _nh_attr(2, members[:16])),                                  # replace, known
            _newnexthop(10, 0x5, _nh_attr(2, members[:8]))]                                     # rewritten
    recs = [record(wire.NETCHANGE_EVENT, wire.Kind.NLMSG, skb=0xffff888000007000 + 0x100 * i, msg_len=len(m),
                   copied=len(m), msg=m, pid=55, comm=b"ip") for i, m in enumerate(msgs)]
    added, replaced, changed = decode(NetChangeProbe(), *recs)
    assert (added.kind, added.action, added.id, added.group, added.group_type) == (
        "nexthop", "added", 10, ((1, 3), (2, 1), (3, 300)), "resilient")
    assert added.describe() == "added nexthop id 10 group 1,3/2/3,300 type resilient"
    assert (replaced.action, replaced.group, replaced.group_type) == ("replaced", ((1, 3), (2, 1)), "mpath")
    assert (changed.action, changed.group) == ("changed", ((1, 3),))


def test_netchange_counting_agrees_with_decoding():
    """A passing test's unread kinds are counted, not decoded
    (Trace.count_unread): counting says the kinds decoding makes of each
    record (no event for a bridge port's own message, none for a correction
    of a raced one) and counts the same races as lost."""
    nexthops = [_newnexthop(10, 0x505), _newnexthop(11, 0x5)]
    msgs = [_newaddr("10.0.0.1", 24, 2), _dellink(socket.AF_BRIDGE), _dellink(socket.AF_UNSPEC), *nexthops,
            _newaddr("10.0.0.1", 24, 2)[:12]]   # too short for a netlink header
    recs = [record(wire.NETCHANGE_EVENT, wire.Kind.NLMSG, skb=0xffff888000008000 + 0x100 * i, msg_len=len(m),
                   copied=len(m), msg=m, pid=55, comm=b"ip") for i, m in enumerate(msgs)]
    recs.insert(5, recs[4])   # the same message read twice in a row: raced
    recs.append(record(wire.NETCHANGE_EVENT, wire.Kind.NLMSG, skb=1, msg_len=40, copied=0))   # nothing read
    decoding, counting = NetChangeProbe(), NetChangeProbe()
    made = [e.kind for e in decode(decoding, *recs) if e.supersedes is None]
    dec = RecordDecoder()
    dec.add(counting)
    counted = [kind for rec in recs for kind in dec.count(rec)]
    assert counted == made == ["addr", "link", "nexthop", "nexthop"]
    assert counting.lost(NETNS) == decoding.lost(NETNS) == {k: 2 for k in NetChangeProbe.event_types}


# -- the record decoder's checks -------------------------------------------------

def test_a_record_of_the_wrong_length_is_rejected_and_counted_as_lost():
    dec = RecordDecoder()
    dec.add(RstProbe())
    good = record(wire.RST_EVENT, wire.Kind.RST, family=4)
    assert len(dec.decode(good)) == 1
    for bad in (good[:-8], good + bytes(8)):  # a field added on one side only
        assert dec.decode(bad) == []
    assert dec.lost(NETNS) == {wire.Kind.RST: 2} and dec.errors == 2


def test_netchange_records_are_checked_against_the_layout_their_flag_names():
    dec = RecordDecoder()
    dec.add(NetChangeProbe())
    nft_sized = record(wire.NFTCHANGE_EVENT, wire.Kind.NLMSG)  # but without NC_F_NFT
    assert dec.decode(nft_sized) == [] and dec.lost(NETNS) == {wire.Kind.NLMSG: 1}


def test_records_of_kinds_without_ring_records_or_unknown_are_lost():
    dec = RecordDecoder()
    dec.add(PacketProbe())
    fake = record(wire.RST_EVENT, wire.Kind.PACKET)
    unknown = record(wire.RST_EVENT, 15)
    assert dec.decode(fake) == [] and dec.decode(unknown) == []
    assert dec.lost(NETNS) == {wire.Kind.PACKET: 1, 15: 1}
    assert dec.decode(b"short") == [] and dec.errors == 3


def test_a_decoder_bug_is_a_lost_record_not_a_crash(monkeypatch):
    dec = RecordDecoder()
    probe = RstProbe()
    dec.add(probe)
    monkeypatch.setattr(probe.decoder, "decode", lambda buf, hdr: 1 / 0)
    assert dec.decode(record(wire.RST_EVENT, wire.Kind.RST)) == []
    assert dec.lost(NETNS) == {wire.Kind.RST: 1}


@pytest.mark.parametrize("bug", [False, True])
def test_a_kinds_records_decoded_together_are_what_each_alone_makes(monkeypatch, bug):
    """decode_all (the trace's way, a kind's queue at a time) checks what
    decode checks: lengths, a decoder's bug; the same events in order."""
    good = [record(wire.RST_EVENT, wire.Kind.RST, family=4, sport=1000 + i) for i in range(3)]
    recs = [good[0], good[1][:-8], good[1], good[2] + bytes(8), good[2]]
    alone, together = RecordDecoder(), RecordDecoder()
    for dec in (alone, together):
        probe = RstProbe()
        dec.add(probe)
        if bug:
            monkeypatch.setattr(probe.decoder, "decode", lambda buf, hdr: 1 / 0)
    one_by_one = [event for rec in recs for event in alone.decode(rec)]
    assert [repr(e) for e in together.decode_all(wire.Kind.RST, recs)] == [repr(e) for e in one_by_one]
    assert [e.sport for e in one_by_one] == ([] if bug else [1000, 1001, 1002])
    assert together.lost(NETNS) == alone.lost(NETNS) == {wire.Kind.RST: 5 if bug else 2}
    assert together.decode_all(15, [record(wire.RST_EVENT, 15)]) == []   # no decoder: counted, as alone
    assert together.lost(NETNS)[15] == 1


def test_a_carrier_change_applied_by_a_reader_is_told_from_the_stack():
    """6.18 shows linkwatch_sync_dev; 6.12 inlines it (linkwatch_do_dev under
    rtnl_getlink); the worker's queue run and a device's removal are no readers."""
    assert applied_by_a_reader(frozenset({"netif_state_change", "linkwatch_sync_dev", "rtnl_getlink"}))
    assert applied_by_a_reader(frozenset({"netdev_state_change", "linkwatch_do_dev", "rtnl_getlink"}))
    assert not applied_by_a_reader(frozenset({"netdev_state_change", "linkwatch_do_dev", "__linkwatch_run_queue",
                                              "linkwatch_event", "process_one_work"}))
    assert not applied_by_a_reader(frozenset({"linkwatch_do_dev", "linkwatch_run_queue", "netdev_run_todo"}))
    assert not applied_by_a_reader(frozenset({"rtnl_newlink", "do_setlink"}))


def test_an_nftables_drop_names_its_protocol_as_every_kind_does():
    """A dropped packet's protocol: 'gre' for 47 (was the str '47', which no
    filter takes), a number for one without a name (was a str too)."""
    import struct as st
    from pytest_nettrace.events import check_filters, matches
    from pytest_nettrace.probes import _nft
    from pytest_nettrace.probes.nftrace import NftVerdictEvent

    def attr(kind: int, value: bytes) -> bytes:
        return st.pack("<HH", 4 + len(value), kind) + value + bytes(-len(value) % 4)

    policy = next(k for k, v in _nft._TRACE_TYPES.items() if v == "policy")
    for proto, named in ((47, "gre"), (99, 99), (33, "dccp")):
        ip = bytes([0x45, 0, 0, 20, 0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2])
        body = (attr(1, b"t\0") + attr(2, b"c\0") + attr(4, st.pack(">I", policy)) + attr(16, st.pack(">I", 0))
                + attr(8, ip))
        raw = bytes(16) + bytes([2, 0, 0, 0]) + body
        verdict = _nft.trace_verdict(raw)
        assert verdict is not None and verdict["ip_proto"] == named
        event = NftVerdictEvent(None, (), "softirq", ip_proto=verdict["ip_proto"])
        assert matches(event, check_filters(NftVerdictEvent, {"ip_proto": named}))

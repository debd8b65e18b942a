"""Pure logic on synthetic input, root-free: filters, the cause of a network
change, packet summaries, the pcapng writer (read back by a small reader and
by tcpdump), the traffic table's join."""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import struct
import subprocess
from typing import Tuple

import pytest

from pytest_nettrace.events import check_filters, matches
from pytest_nettrace.kernel import wire
from pytest_nettrace.probes.drop import DropEvent
from pytest_nettrace.probes.netchange import AddrEvent, Present, RouteEvent, cause_of, follows_another_link
from pytest_nettrace.probes.packet import (SNAPLEN, Frame, PacketEvent, PcapngWriter, _vlan_restored, packet_event,
                                           summarize)
from pytest_nettrace.probes.traffic import traffic_rows

# -- filters ------------------------------------------------------------------


def _filter(cls, event, **filters) -> bool:
    return matches(event, check_filters(cls, filters))


def test_address_filters_take_any_spelling():
    ev = AddrEvent(None, (), "process", address=ipaddress.ip_interface("10.0.0.1/24"), family=4, comm="ip")
    assert _filter(AddrEvent, ev, address="10.0.0.1")
    assert _filter(AddrEvent, ev, address="10.0.0.1/24")
    assert not _filter(AddrEvent, ev, address="10.0.0.1/16")
    assert _filter(AddrEvent, ev, address=["10.9.9.9", "10.0.0.1"])
    assert _filter(AddrEvent, ev, family="AF_INET") and _filter(AddrEvent, ev, family=socket.AF_INET)
    with pytest.raises(ValueError, match="not an IPv4 or IPv6 address"):
        check_filters(AddrEvent, {"address": "10.0.0.300"})


def test_an_int_or_a_bool_is_no_address_filter():
    """`assert_no_rst(daddr=10)` (a port meant?) was 0.0.0.10 and matched
    nothing: the negative assertion passed whatever happened."""
    for value in (10, [10, "10.0.0.1"]):
        with pytest.raises(ValueError, match=r"daddr=10: an int is no address here"):
            check_filters(DropEvent, {"daddr": value})
    with pytest.raises(ValueError, match=r"daddr=True: not an address"):
        check_filters(DropEvent, {"daddr": True})
    assert check_filters(DropEvent, {"daddr": ipaddress.ip_address(10)})


def test_a_prefix_on_an_address_field_is_a_subnet():
    """`saddr="10.0.0.0/24"` on a plain address: any address in it, not
    10.0.0.0 alone (which would let a negative assertion pass)."""
    drop = DropEvent(None, (), "softirq", saddr=ipaddress.ip_address("10.0.0.7"))
    assert _filter(DropEvent, drop, saddr="10.0.0.0/24") and _filter(DropEvent, drop, saddr="10.0.0.1/24")
    assert not _filter(DropEvent, drop, saddr="10.0.1.0/24") and not _filter(DropEvent, drop, saddr="fd00::/8")
    assert _filter(DropEvent, drop, saddr="10.0.0.7/32") and not _filter(DropEvent, drop, saddr="10.0.0.8/32")


def test_filter_values_of_another_type_or_never_held_are_errors():
    with pytest.raises(ValueError, match=r"sport of 'drop' events is a number: '9' \(str\) would match nothing"):
        check_filters(DropEvent, {"sport": "9"})
    with pytest.raises(ValueError, match="unknown ip_proto 'tpc'"):
        check_filters(DropEvent, {"ip_proto": "tpc"})
    assert check_filters(DropEvent, {"ip_proto": "TCP", "sport": [9, 10]}) == {"ip_proto": "tcp", "sport": [9, 10]}
    assert check_filters(PacketEvent, {"proto": "ip-99", "flags": "S.E"}) == {"proto": "ip-99", "flags": "S.E"}
    for flags in (".R", "SS", "s"):
        with pytest.raises(ValueError, match="unknown flags"):
            check_filters(PacketEvent, {"flags": flags})
    with pytest.raises(ValueError, match="unknown table 'mian'"):
        check_filters(RouteEvent, {"table": "mian"})
    assert check_filters(RouteEvent, {"table": 100}) == {"table": 100}


def test_default_route_and_predicates():
    ev = RouteEvent(None, (), "process", dst=ipaddress.ip_network("0.0.0.0/0"), family=4)
    assert _filter(RouteEvent, ev, dst="default") and _filter(RouteEvent, ev, dst="0.0.0.0/0")
    assert _filter(RouteEvent, ev, dst=lambda d: d.prefixlen == 0)
    assert not _filter(RouteEvent, RouteEvent(None, (), dst=ipaddress.ip_network("10.0.0.0/8")), dst="default")


def test_a_comm_filter_names_the_task_in_full():
    """The kernel keeps 15 bytes of a task's name."""
    ev = AddrEvent(None, (), "process", comm="systemd-network")
    assert _filter(AddrEvent, ev, comm="systemd-networkd")
    assert not _filter(AddrEvent, ev, comm="systemd-resolved")


def test_unknown_filter_names_are_errors():
    with pytest.raises(ValueError, match="unknown filter 'addres'"):
        check_filters(AddrEvent, {"addres": "10.0.0.1"})


def test_icmpv6_is_one_spelling_and_icmp6_an_alias_on_every_kind():
    drop = DropEvent(None, (), "softirq", ip_proto="icmpv6")
    pkt = PacketEvent(None, (), "capture", proto="icmpv6")
    for cls, ev, field in ((DropEvent, drop, "ip_proto"), (PacketEvent, pkt, "proto")):
        assert _filter(cls, ev, **{field: "icmpv6"}) and _filter(cls, ev, **{field: "icmp6"})


def test_a_link_going_down_takes_its_nexthops_and_groups_left_empty():
    def nexthop(oif=None, group=()):
        attrs = {5: struct.pack("<I", oif)} if oif else {}
        if group:
            attrs[2] = b"".join(struct.pack("<IBBH", member, 0, 0, 0) for member in group)
        return attrs
    present = Present()
    for nh_id, attrs in ((1, nexthop(oif=7)), (2, nexthop(oif=7)), (3, nexthop(oif=8)), (4, nexthop()),
                         (10, nexthop(group=(1, 2))), (11, nexthop(group=(1, 3)))):
        present.nexthop_announced(nh_id, attrs)
    present.link_down(7)
    assert sorted(present.nexthops) == [3, 4, 11] and present.groups == {11: {3}}


# -- cause_of -------------------------------------------------------------------

def test_cause_of_netlink_ioctl_and_kernel():
    assert cause_of("addr", ["inet_rtm_newaddr+0x1", "rtnetlink_rcv_msg+0x2", "netlink_sendmsg+0x3"])[0] == \
        "netlink"
    assert cause_of("link", ["dev_change_flags+0x1", "dev_ifsioc+0x2", "sock_ioctl+0x3"])[0] in ("ioctl", "netlink")
    cause, detail = cause_of("addr", ["addrconf_ifdown.isra.0+0x1f", "addrconf_notify+0x10",
                                      "notifier_call_chain+0x5", "do_setlink+0x1", "rtnetlink_rcv_msg+0x2"])
    assert cause == "kernel" and detail  # removed by a link down, on that request's behalf
    assert cause_of("route", []) == ("kernel", None)


_NOTIFIED = ["sock_def_readable+0x7f", "__netlink_sendskb+0x67", "netlink_broadcast_filtered+0x41d",
             "nlmsg_notify+0x51"]
_REQUEST = ["do_setlink.isra.0+0x1", "rtnl_newlink+0x2", "netlink_rcv_skb+0x3", "netlink_sendmsg+0x4"]


@pytest.mark.parametrize("kind, frames, detail", [
    # as 6.18 showed them, and with the names 6.1 and 6.12 have (dev_* before netif_*)
    ("addr", ["inetdev_event+0x1", "notifier_call_chain+0x2", "netif_change_name+0x3"], "the link was renamed"),
    ("addr", ["inetdev_event+0x1", "notifier_call_chain+0x2", "dev_change_name+0x3"], "the link was renamed"),
    ("route", ["fib6_del+0x1", "rt6_disable_ip+0x2", "addrconf_ifdown.isra.0+0x3", "addrconf_notify+0x4",
               "notifier_call_chain+0x5", "dev_set_mtu_ext+0x6"], "the MTU went below IPv6's minimum (1280)"),
    ("addr", ["__inet_del_ifa+0x1", "inetdev_event+0x2", "notifier_call_chain+0x3", "netif_set_mtu_ext+0x4"],
     "the MTU went below IPv4's minimum (68)"),
    ("addr", ["__inet_del_ifa+0x1", "inetdev_event+0x2", "notifier_call_chain+0x3",
              "__dev_change_net_namespace+0x4"], "the link moved to another namespace"),
    ("neigh", ["__neigh_notify+0x1", "neigh_flush_dev.isra.0+0x2", "neigh_changeaddr+0x3", "arp_netdev_event+0x4",
               "notifier_call_chain+0x5", "__dev_notify_flags+0x6", "dev_change_flags+0x7"],
     "the link's NOARP flag changed (arp on/off)"),
    ("neigh", ["__neigh_notify+0x1", "neigh_flush_dev.isra.0+0x2", "neigh_changeaddr+0x3", "arp_netdev_event+0x4",
               "notifier_call_chain+0x5", "dev_set_mac_address+0x6"], "the link's hardware address changed"),
    # raising the MTU again configures IPv6 anew: not the MTU's minimum
    ("addr", ["addrconf_add_linklocal+0x1", "addrconf_dev_config+0x2", "addrconf_notify+0x3",
              "notifier_call_chain+0x4", "dev_set_mtu_ext+0x5"], "IPv6 autoconfiguration"),
])
def test_what_set_the_kernel_off_is_the_detail(kind, frames, detail):
    assert cause_of(kind, _NOTIFIED + frames + _REQUEST) == ("kernel", detail)


def test_frames_below_an_interrupt_are_not_why():
    """A Router Solicitation received in a softirq that ran on top of the
    DAD worker (6.18), or of a task's netlink request (6.1's __do_softirq)."""
    received = _NOTIFIED + ["__neigh_notify+0x1", "__neigh_update+0x2", "ndisc_recv_rs+0x3", "icmpv6_rcv+0x4",
                            "net_rx_action+0x5"]
    worker = ["handle_softirqs+0x1", "__local_bh_enable_ip+0x2", "ndisc_send_skb+0x3",
              "addrconf_dad_completed+0x4", "addrconf_dad_work+0x5", "process_one_work+0x6"]
    assert cause_of("neigh", received + worker) == ("kernel", "learned from a received Router Solicitation")
    request = ["__do_softirq+0x1", "neigh_add+0x2", "rtnetlink_rcv_msg+0x3"] + _REQUEST
    assert cause_of("neigh", received + request) == ("kernel", "learned from a received Router Solicitation")


def test_a_link_closed_by_another_links_notifier_follows_it():
    upper = _NOTIFIED + ["netif_close_many+0x1", "unregister_netdevice_many_notify+0x2", "macvlan_device_event+0x3",
                         "notifier_call_chain+0x4", "unregister_netdevice_many_notify+0x5", "rtnl_dellink+0x6"]
    assert follows_another_link(tuple(upper))
    own = _NOTIFIED + ["netif_close_many+0x1", "unregister_netdevice_many_notify+0x2", "rtnl_dellink+0x3"]
    assert not follows_another_link(tuple(own))
    renamed = _NOTIFIED + ["rtnetlink_event+0x1", "notifier_call_chain+0x2", "netif_change_name+0x3"] + _REQUEST
    assert not follows_another_link(tuple(renamed))


# -- packets and pcapng ---------------------------------------------------------------

def _udp_frame(payload: bytes = b"hello") -> bytes:
    udp = struct.pack(">HHHH", 40000, 9999, 8 + len(payload), 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     socket.inet_aton("10.0.0.2"), socket.inet_aton("10.0.0.1"))
    return bytes(6) + bytes([2, 0, 0, 0, 0, 1]) + b"\x08\x00" + ip + udp


def test_packet_event_summarises_the_frame():
    frame = Frame(ts_real=1_700_000_000_123_456_789, ifname="eth0", direction="out", ethernet=_udp_frame(),
                  length=47)
    ev = packet_event(frame, 4026531999, offset=1_700_000_000_000_000_000)
    assert (ev.proto, ev.sport, ev.dport, ev.payload, ev.direction, ev.dev) == ("udp", 40000, 9999, b"hello",
                                                                                 "out", "eth0")
    assert ev.timestamp == 123_456_789 and ev.pid is None
    assert "10.0.0.2.40000 > 10.0.0.1.9999: UDP, length 5" in ev.describe()


def _ip4_frame(proto: int, body: bytes, frag: int = 0) -> bytes:
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 1, frag, 1, proto, 0,
                     socket.inet_aton("10.0.0.2"), socket.inet_aton("224.0.0.22"))
    return bytes(6) + bytes([2, 0, 0, 0, 0, 1]) + b"\x08\x00" + ip + body


def _ip6_frame(next_header: int, body: bytes) -> bytes:
    ip6 = struct.pack(">IHBB16s16s", 6 << 28, len(body), next_header, 64, socket.inet_pton(socket.AF_INET6, "fd00::2"),
                      socket.inet_pton(socket.AF_INET6, "fd00::1"))
    return bytes(6) + bytes([2, 0, 0, 0, 0, 1]) + b"\x86\xdd" + ip6 + body


def test_ip_protocols_have_the_names_filters_take():
    """One table: `proto` names what a filter accepts ("igmp" was "ip-2", so
    assert_no_packet(proto="igmp") passed on IGMP)."""
    igmp_report = bytes([0x22, 0, 0, 0, 0, 0, 0, 1]) + bytes([4, 0, 0, 0]) + socket.inet_aton("239.1.2.3")
    assert summarize(_ip4_frame(2, igmp_report))["proto"] == "igmp"
    assert summarize(_ip4_frame(47, bytes(4)))["proto"] == "gre"
    assert summarize(_ip4_frame(99, bytes(4)))["proto"] == "ip-99"
    assert summarize(_ip6_frame(50, bytes(8)))["proto"] == "esp"
    assert summarize(_ip6_frame(99, bytes(8)))["proto"] == "ip6-99"
    ev = PacketEvent(None, (), "capture", **summarize(_ip4_frame(2, igmp_report)))
    assert _filter(PacketEvent, ev, proto="igmp") and _filter(PacketEvent, ev, proto="IGMP")


def test_proto_and_payload_filters_name_only_what_a_packet_can_hold():
    """A packet's protocol without a name is "ip-99"/"ip6-99", a named one
    its name: a number alone, "ip-2" or "ip-300" matched nothing; a payload
    is bytes: a str matched nothing."""
    for value, error in ((99, "'ip-99' (IPv4) or 'ip6-99' (IPv6)"), (2, "write 'igmp'"),
                         ("ip-2", "write 'igmp'"), ("IP6-17", "write 'udp'"), ("ip-300", "unknown proto 'ip-300'")):
        with pytest.raises(ValueError, match=re.escape(error)):
            check_filters(PacketEvent, {"proto": value})
    assert check_filters(PacketEvent, {"proto": ["IP-99", "ip6-99", "ARP", "ethertype-0x88CC", "icmp6"]}) == \
        {"proto": ["ip-99", "ip6-99", "arp", "ethertype-0x88cc", "icmpv6"]}
    unnamed = PacketEvent(None, (), "capture", **summarize(_ip4_frame(99, bytes(4))))
    assert _filter(PacketEvent, unnamed, proto="IP-99") and not _filter(PacketEvent, unnamed, proto="ip6-99")
    with pytest.raises(ValueError, match=re.escape("payload of 'packet' events is bytes: 'HELLO' (str) would match "
                                                   "nothing: write b'HELLO'")):
        check_filters(PacketEvent, {"payload": "HELLO"})
    assert check_filters(PacketEvent, {"payload": [b"HELLO", bytearray(b"hi")]}) == {"payload": [b"HELLO", b"hi"]}
    # a packet's spellings are no other kind's: a drop's protocol is a name or a number
    with pytest.raises(ValueError, match="unknown ip_proto 'arp'"):
        check_filters(DropEvent, {"ip_proto": "arp"})
    assert check_filters(DropEvent, {"ip_proto": 99}) == {"ip_proto": 99}


def test_ipv6_extension_headers_are_walked_to_the_protocol():
    """Hop-by-hop (MLD: tcpdump's "HBH ICMP6"), routing, destination options
    and fragment headers: `proto` is what they carry. A fragment has it in its
    fragment header, as an IPv4 fragment in its IP header (both "udp"); the
    first alone has the UDP header."""
    udp = struct.pack(">HHHH", 40000, 9999, 8 + 3000, 0) + b"u" * 1200
    first = _ip6_frame(44, bytes([17, 0]) + struct.pack(">HI", 0x0001, 7) + udp)        # offset 0, more
    later = _ip6_frame(44, bytes([17, 0]) + struct.pack(">HI", 1208 | 1, 7) + b"u" * 1200)
    assert [summarize(f)["proto"] for f in (first, later)] == ["udp", "udp"]
    assert (summarize(first)["dport"], summarize(first)["payload_len"]) == (9999, 3000)
    assert (summarize(later)["dport"], summarize(later)["payload"]) == (None, None)
    v4_later = _ip4_frame(17, b"u" * 100, frag=185)
    assert (summarize(v4_later)["proto"], summarize(v4_later)["dport"]) == ("udp", None)
    mld = bytes([58, 0, 5, 2, 0, 0, 1, 0]) + bytes([143, 0, 0, 0, 0, 0, 0, 0])   # router alert, then ICMPv6
    assert (summarize(_ip6_frame(0, mld))["proto"], summarize(_ip6_frame(0, mld))["icmp_type"]) == ("icmpv6", 143)
    routed = bytes([60, 0, 4, 0, 0, 0, 0, 0]) + bytes([17, 0, 1, 4, 0, 0, 0, 0]) + \
        struct.pack(">HHHH", 1, 2, 8, 0)   # routing, then destination options, then UDP
    assert (summarize(_ip6_frame(43, routed))["proto"], summarize(_ip6_frame(43, routed))["dport"]) == ("udp", 2)


def _tagged(frame: bytes, *tags: Tuple[int, int]) -> bytes:
    """`frame` with VLAN tags ((tpid, id), outer first) after its MAC addresses."""
    return frame[:12] + b"".join(struct.pack(">HH", tpid, vid) for tpid, vid in tags) + frame[12:]


def test_a_tagged_frame_has_the_outer_ethertype_and_vlan():
    """As tcpdump's `ether proto 0x8100` and `vlan 10` match it (it was
    0x0800: ethertype=0x8100 matched nothing); the rest is decoded past the tags."""
    fields = summarize(_tagged(_udp_frame(), (0x8100, 0x2000 | 10)))   # priority 1, VLAN 10
    assert (fields["ethertype"], fields["vlan"], fields["proto"], fields["dport"]) == (0x8100, 10, "udp", 9999)
    qinq = summarize(_tagged(_udp_frame(), (0x88A8, 20), (0x8100, 10)))
    assert (qinq["ethertype"], qinq["vlan"], qinq["proto"]) == (0x88A8, 20, "udp")
    untagged = PacketEvent(None, (), "capture", **summarize(_udp_frame()))
    assert (untagged.ethertype, untagged.vlan) == (0x0800, None)
    assert _filter(PacketEvent, untagged, vlan=None) and not _filter(PacketEvent, untagged, vlan=10)


def test_the_tag_the_kernel_took_is_put_back():
    """The kernel hands a packet socket a received frame without its tag (in
    its metadata: the ring's header, the queue's auxdata); the frame gets it
    back, with the TPID when the kernel gives one (802.1Q when not)."""
    vlan_valid, tpid_valid = 0x10, 0x40
    assert _vlan_restored(_udp_frame(), vlan_valid, 10, 0) == _tagged(_udp_frame(), (0x8100, 10))
    assert _vlan_restored(_udp_frame(), vlan_valid | tpid_valid, 20, 0x88A8) == _tagged(_udp_frame(), (0x88A8, 20))
    # no longer than the pcapng's snaplen, which tcpdump enforces
    assert len(_vlan_restored(_udp_frame(b"x" * SNAPLEN), vlan_valid, 10, 0)) == SNAPLEN


def _read_pcapng(path):
    """(interface names, [(interface, ts ns, flags, data)]) — enough of pcapng to check ours."""
    data = open(path, "rb").read()
    names, packets, off = [], [], 0
    while off < len(data):
        btype, total = struct.unpack_from("<II", data, off)
        body = data[off + 8: off + total - 4]
        assert struct.unpack_from("<I", data, off + total - 4)[0] == total
        if btype == 0x0A0D0D0A:
            assert struct.unpack_from("<I", body)[0] == 0x1A2B3C4D
        elif btype == 1:
            opts, i = body[8:], 0
            while i + 4 <= len(opts):
                code, n = struct.unpack_from("<HH", opts, i)
                if code == 2:
                    names.append(opts[i + 4: i + 4 + n].decode())
                i += 4 + n + (-n % 4)
        elif btype == 6:
            iid, hi, lo, caplen, _orig = struct.unpack_from("<IIIII", body)
            opts = body[20 + caplen + (-caplen % 4):]
            code, n, flags = struct.unpack_from("<HHI", opts)
            assert code == 2
            packets.append((iid, hi << 32 | lo, flags, body[20: 20 + caplen]))
        off += total
    return names, packets


def _write_pcapng(path):
    w = PcapngWriter(path)
    frames = [Frame(1_700_000_000_000_000_001 + i, "eth0", "out" if i % 2 else "in", _udp_frame(b"x" * i), 43 + i)
              for i in range(3)]
    for fr in frames:
        w.write(1, "ns1:eth0", fr)
    w.write(2, "ns2:eth0", frames[0])  # another namespace's eth0 is another interface
    w.close()
    return frames


def test_pcapng_writer_reads_back(tmp_path):
    path = str(tmp_path / "t.pcapng")
    frames = _write_pcapng(path)
    names, packets = _read_pcapng(path)
    assert names == ["ns1:eth0", "ns2:eth0"]
    assert [(p[0], p[1], p[2], p[3]) for p in packets[:3]] == [
        (0, fr.ts_real, 1 if fr.direction == "in" else 2, fr.ethernet) for fr in frames]
    assert packets[3][0] == 1


def _capability_less_root() -> bool:
    if os.geteuid() != 0:
        return False
    with open("/proc/self/status") as f:
        eff = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    return int(eff, 16) == 0


def test_pcapng_writer_output_read_by_tcpdump(tmp_path):
    tcpdump = shutil.which("tcpdump")
    if tcpdump is None:
        pytest.skip("tcpdump not installed: the independent reader of the pcapng (apt install tcpdump)")
    if _capability_less_root():
        pytest.skip("root without capabilities: tcpdump -r must switch to its own user and cannot "
                    "(this check runs as nobody and in the host suite)")
    path = str(tmp_path / "t.pcapng")
    _write_pcapng(path)
    out = subprocess.run([tcpdump, "-nn", "-r", path], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 4 and all("10.0.0.2.40000 > 10.0.0.1.9999: UDP" in line for line in lines)


# -- the traffic table -------------------------------------------------------------

def test_traffic_rows_join_counters_with_port_owners():
    """Counters the kernel keyed by their sender are its; the others go to
    their port's one user, or to a row naming its several users."""
    key, counters = wire.TRAFFIC_KEY, wire.TRAFFIC_COUNTERS
    okey, owner = wire.TRAFFIC_OWNER_KEY, wire.TRAFFIC_OWNER
    entries = [
        (key.pack(netns=1, ifindex=2, port=40000, proto=6),
         counters.pack(tx_packets=3, rx_packets=2, tx_bytes=300, rx_bytes=200, dev=b"eth0")),
        (key.pack(netns=1, ifindex=2, port=40001, proto=6),
         counters.pack(tx_packets=1, rx_packets=1, tx_bytes=100, rx_bytes=100, dev=b"eth0")),
        (key.pack(netns=1, ifindex=2, port=0, proto=0), counters.pack(rx_packets=5, rx_bytes=500, dev=b"eth0")),
        (key.pack(netns=9, ifindex=2, port=40000, proto=6), counters.pack(tx_packets=7, dev=b"eth0")),
        # sent by 200 in its system call, on 100's port: 200's, whoever else used the port
        (key.pack(netns=1, ifindex=2, pid=200, port=40000, proto=6),
         counters.pack(tx_packets=2, tx_bytes=20, dev=b"eth0", uid=7, comm=b"wget")),
        # received on a port 300 and 301 both used: neither's alone
        (key.pack(netns=1, ifindex=2, port=6000, proto=17), counters.pack(rx_packets=4, rx_bytes=40, dev=b"eth0")),
    ]
    owners = [(okey.pack(netns=1, pid=100, port=p, proto=6), owner.pack(uid=0, comm=b"curl")) for p in (40000, 40001)]
    owners += [(okey.pack(netns=1, pid=p, port=6000, proto=17), owner.pack(uid=0, comm=b"nc")) for p in (301, 300)]
    rows = sorted(traffic_rows(entries, owners, [1]), key=lambda r: (r.pid or 0, r.shared_by))
    assert [(r.pid, r.uid, r.comm, r.shared_by, r.tx_packets, r.rx_bytes) for r in rows] == [
        (None, None, None, (), 0, 500), (None, None, None, (300, 301), 0, 40), (100, 0, "curl", (), 4, 300),
        (200, 7, "wget", (), 2, 0)]


def test_a_dummy_driver_not_loaded_is_never_asked_for(monkeypatch, tmp_path):
    """Asked for a dummy link, the kernel loads a modular driver, whose
    numdummies=1 adds dummy0 to the host's namespace: without the driver
    there (/sys/module/dummy), no link is tried."""
    from pytest_nettrace.netns import namespace

    def no_attempt(*args, **kwargs):
        raise AssertionError("a dummy link was asked for")
    monkeypatch.setattr(namespace, "DUMMY_MODULE", str(tmp_path / "absent"))
    monkeypatch.setattr(namespace, "_dummy_supported", None)
    monkeypatch.setattr(namespace, "run_in_thread", no_attempt)
    assert namespace.dummy_supported() is False


def test_traffic_filters_and_bounds_are_checked_by_type():
    """What would match no row or compare as no count does is a usage error."""
    from pytest_nettrace.events import check_filters
    from pytest_nettrace.probes.traffic import TrafficRow, _check_bounds
    assert check_filters(TrafficRow, {"pid": 5, "dev": ["eth0", "lo"], "comm": None}) == {
        "pid": 5, "dev": ["eth0", "lo"], "comm": None}
    for bad in ({"pid": "1"}, {"dev": 0}, {"netns": "nt-x"}, {"rx_bytes": 1.5}, {"nosuch": 1}):
        with pytest.raises(ValueError, match="traffic rows"):
            check_filters(TrafficRow, bad)
    _check_bounds({"min_bytes": 0, "max_bytes": None})
    with pytest.raises(ValueError, match="needs a bound"):
        _check_bounds({"min_bytes": None, "max_packets": None})
    for bad_bound in (1.5, "10", True):
        with pytest.raises(TypeError, match="max_packets is a whole number"):
            _check_bounds({"max_packets": bad_bound})


def test_sctp_dccp_and_udplite_packets_have_their_ports():
    """tcpdump shows their ports; dport= matched none of these packets."""
    for proto, name in ((132, "sctp"), (33, "dccp"), (136, "udplite")):
        fields = summarize(_ip4_frame(proto, struct.pack(">HH", 3868, 38412) + bytes(8)))
        assert (fields["proto"], fields["sport"], fields["dport"]) == (name, 3868, 38412)
        six = summarize(_ip6_frame(proto, struct.pack(">HH", 5000, 6000) + bytes(8)))
        assert (six["proto"], six["sport"], six["dport"]) == (name, 5000, 6000)


def test_an_address_added_by_netlink_where_the_handler_was_a_tail_call():
    """Debian 6.1's stack of `ip addr add` (fentry on __netlink_sendskb):
    inet_rtm_newaddr tail-called __inet_insert_ifa, so no handler showed and
    the request's own address read 'kernel, consequence of a netlink request'."""
    stack = ["__netlink_sendskb+0x5", "netlink_broadcast+0x469", "nlmsg_notify+0x38", "__inet_insert_ifa+0x1fa",
             "rtnetlink_rcv_msg+0x14e", "netlink_rcv_skb+0x51", "netlink_unicast+0x284", "netlink_sendmsg+0x250",
             "__sock_sendmsg+0x5f", "____sys_sendmsg+0x27f", "___sys_sendmsg+0x9a", "__sys_sendmsg+0x76",
             "do_syscall_64+0x5d", "entry_SYSCALL_64_after_hwframe+0x6e"]
    assert cause_of("addr", stack) == ("netlink", None)
    # the same function under a notifier (lo's 127.0.0.1 on link up) stays the kernel's
    up = stack[:4] + ["inetdev_event+0x601", "notifier_call_chain+0x59", "__dev_notify_flags+0x55",
                      "netif_change_flags+0x50", "do_setlink.isra.0+0x374", "rtnl_newlink+0x96b"] + stack[5:]
    assert cause_of("addr", up)[0] == "kernel"


@pytest.mark.parametrize("cpus, workers, threads", [(2, None, 2), (2, "2", 1), (8, None, 4), (8, "2", 4),
                                                    (8, "4", 2), (1, None, 1), (4, "16", 1), (4, "junk", 4)])
def test_programs_are_verified_by_the_cpus_each_xdist_worker_has(monkeypatch, cpus, workers, threads):
    from pytest_nettrace import plugin
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    if workers is None:
        monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    else:
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", workers)
    assert plugin._load_threads() == threads


def test_tcp_discarding_a_copy_of_data_it_had_is_a_background_drop():
    """From 6.11 the probe sees TCP's own drops after it took a segment; a
    copy of data it already had (the peer sent it again: a spurious
    retransmission on a loaded machine) loses nothing, so assert_no_drops
    leaves it out unless the test names it; data TCP had no room for counts."""
    dup = DropEvent(None, (), "softirq", reason="TCP_OLD_DATA", daddr=ipaddress.ip_address("10.0.0.1"),
                    location="tcp_data_queue+0x1d")
    merged = DropEvent(None, (), "softirq", reason="TCP_OFOMERGE", daddr=ipaddress.ip_address("10.0.0.1"))
    full = DropEvent(None, (), "softirq", reason="TCP_RCVQ_FULL", daddr=ipaddress.ip_address("10.0.0.1"))
    assert dup.background and merged.background and not full.background
    assert _filter(DropEvent, dup, reason="TCP_OLD_DATA")

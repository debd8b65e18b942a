"""Pure logic on synthetic input, root-free: filters, the cause of a network
change, packet summaries, the pcapng writer (read back by a small reader and
by tcpdump), the traffic table's join."""
from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import struct
import subprocess

import pytest

from pytest_nettrace.events import check_filters, matches
from pytest_nettrace.kernel import wire
from pytest_nettrace.probes.drop import DropEvent
from pytest_nettrace.probes.netchange import AddrEvent, RouteEvent, cause_of
from pytest_nettrace.probes.packet import Frame, PacketEvent, PcapngWriter, packet_event
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
    assert check_filters(PacketEvent, {"proto": "ip-47", "flags": "S.E"}) == {"proto": "ip-47", "flags": "S.E"}
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


# -- cause_of -------------------------------------------------------------------

def test_cause_of_netlink_ioctl_and_kernel():
    assert cause_of("addr", ["inet_rtm_newaddr+0x1", "rtnetlink_rcv_msg+0x2", "netlink_sendmsg+0x3"])[0] == \
        "netlink"
    assert cause_of("link", ["dev_change_flags+0x1", "dev_ifsioc+0x2", "sock_ioctl+0x3"])[0] in ("ioctl", "netlink")
    cause, detail = cause_of("addr", ["addrconf_ifdown.isra.0+0x1f", "addrconf_notify+0x10",
                                      "notifier_call_chain+0x5", "do_setlink+0x1", "rtnetlink_rcv_msg+0x2"])
    assert cause == "kernel" and detail  # removed by a link down, on that request's behalf
    assert cause_of("route", []) == ("kernel", None)


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

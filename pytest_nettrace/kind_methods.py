"""Every probe kind's `nettrace` methods, as `Trace` (which subclasses
`KindMethods`) exposes them, each typed with its query class's signature.

GENERATED from the registry (pytest_nettrace/probes/registry.py) by
`python -m pytest_nettrace.probes`: do not edit. The unit layer
fails when it is stale."""
from __future__ import annotations

from .probes.conn import ConnApi
from .probes.drop import DropApi
from .probes.netchange import NetChangeApi
from .probes.nftrace import NftTraceApi
from .probes.packet import PacketApi
from .probes.retransmit import RetransmitApi
from .probes.rst import RstApi
from .probes.syscall import SyscallApi
from .probes.sysctl import SysctlApi
from .probes.traffic import TrafficApi
from .probes.context import Delegate, DelegateProperty


class KindMethods:
    """Each kind's query methods (defined in pytest_nettrace/probes/<kind>.py)."""

    # conn: ConnApi
    connections = Delegate(ConnApi.connections)
    assert_accepted = Delegate(ConnApi.assert_accepted)
    assert_connected = Delegate(ConnApi.assert_connected)
    assert_accepted_count = Delegate(ConnApi.assert_accepted_count)
    assert_connected_count = Delegate(ConnApi.assert_connected_count)
    assert_closed = Delegate(ConnApi.assert_closed)
    connection_table = Delegate(ConnApi.connection_table)

    # drop: DropApi
    drops = Delegate(DropApi.drops)
    assert_drop = Delegate(DropApi.assert_drop)
    assert_no_drops = Delegate(DropApi.assert_no_drops)
    drop_summary = Delegate(DropApi.drop_summary)

    # netchange: NetChangeApi
    address_changes = Delegate(NetChangeApi.address_changes)
    link_changes = Delegate(NetChangeApi.link_changes)
    route_changes = Delegate(NetChangeApi.route_changes)
    assert_address_deleted = Delegate(NetChangeApi.assert_address_deleted)
    assert_address_not_deleted = Delegate(NetChangeApi.assert_address_not_deleted)
    neighbour_changes = Delegate(NetChangeApi.neighbour_changes)
    assert_neighbour_not_deleted = Delegate(NetChangeApi.assert_neighbour_not_deleted)
    nft_changes = Delegate(NetChangeApi.nft_changes)
    rule_changes = Delegate(NetChangeApi.rule_changes)
    nexthop_changes = Delegate(NetChangeApi.nexthop_changes)

    # nftrace: NftTraceApi
    trace_nft = Delegate(NftTraceApi.trace_nft)
    dropped_by = Delegate(NftTraceApi.dropped_by)

    # packet: PacketApi
    pcap_path = DelegateProperty(PacketApi.pcap_path)
    packets = Delegate(PacketApi.packets)
    tcpdump = Delegate(PacketApi.tcpdump)
    assert_packet = Delegate(PacketApi.assert_packet)
    assert_no_packet = Delegate(PacketApi.assert_no_packet)

    # retransmit: RetransmitApi
    retransmits = Delegate(RetransmitApi.retransmits)
    assert_retransmit = Delegate(RetransmitApi.assert_retransmit)
    assert_no_retransmits = Delegate(RetransmitApi.assert_no_retransmits)

    # rst: RstApi
    rst = Delegate(RstApi.rst)
    assert_no_rst = Delegate(RstApi.assert_no_rst)
    assert_rst = Delegate(RstApi.assert_rst)

    # syscall: SyscallApi
    syscalls = Delegate(SyscallApi.syscalls)
    strace = Delegate(SyscallApi.strace)
    assert_no_syscall = Delegate(SyscallApi.assert_no_syscall)
    assert_syscall = Delegate(SyscallApi.assert_syscall)

    # sysctl: SysctlApi
    sysctl_writes = Delegate(SysctlApi.sysctl_writes)

    # traffic: TrafficApi
    traffic = Delegate(TrafficApi.traffic)
    traffic_table = Delegate(TrafficApi.traffic_table)
    assert_traffic = Delegate(TrafficApi.assert_traffic)

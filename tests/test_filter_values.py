"""Items 7 and 9: a value a field cannot take is a usage error listing the
valid ones (a typo must never make a negative assertion pass), and `family`
is 4/6 on every kind, spelled any usual way in a filter."""
from __future__ import annotations

import socket

import pytest

from pytest_nettrace.events import check_filters, parse_family
from pytest_nettrace.probes.conn import ConnEvent
from pytest_nettrace.probes.netchange import AddrEvent, LinkEvent, RouteEvent
from pytest_nettrace.probes.packet import PacketEvent
from pytest_nettrace.probes.retransmit import RetransmitEvent
from pytest_nettrace.probes.rst import RstEvent
from pytest_nettrace.probes.syscall import SyscallEvent
from traffic import connect_refused


@pytest.mark.parametrize("cls, field, typo, valid", [
    (PacketEvent, "direction", "inbound", "in, out"),
    (RstEvent, "direction", "send", "sent, received"),
    (RstEvent, "origin", "replied", "reply, active, received"),
    (RstEvent, "state", "ESTABLISHD", "ESTABLISHED"),
    (ConnEvent, "state", "TIMEWAIT", "TIME_WAIT"),
    (ConnEvent, "old_state", "FIN_WAIT_2", "FIN_WAIT2"),
    (ConnEvent, "action", "accepted", "connect, accept, close"),
    (RetransmitEvent, "type", "sin", "syn, synack, loss_probe, retransmit"),
    (SyscallEvent, "name", "conect", "connect"),
    (SyscallEvent, "errno", "ECONREFUSED", "ECONNREFUSED"),
    (AddrEvent, "cause", "netlnk", "netlink, ioctl, sysctl, kernel, unknown"),
    (AddrEvent, "action", "delted", "added, changed, deleted"),
    (LinkEvent, "operstate", "up", "UP"),
    (RouteEvent, "type", "unicst", "unicast"),
    (AddrEvent, "context", "irq", "softirq"),
])
def test_unknown_value_is_an_error_listing_the_valid_ones(cls, field, typo, valid):
    with pytest.raises(ValueError, match=rf"unknown {field} {typo!r} for {cls.kind!r} events; valid: .*{valid}"):
        check_filters(cls, {field: typo})
    with pytest.raises(ValueError, match=f"unknown {field}"):     # in a list too
        check_filters(cls, {field: [typo]})


def test_tcp_flag_letters_and_tcpdump_flags_are_checked():
    for bad in ("SX", "", "syn"):
        with pytest.raises(ValueError, match="unknown tcp_flags .* letters of UAPRSF"):
            check_filters(PacketEvent, {"tcp_flags": bad})
    with pytest.raises(ValueError, match=r"unknown flags 'SA' .*tcpdump's notation"):
        check_filters(PacketEvent, {"flags": "SA"})
    assert check_filters(PacketEvent, {"tcp_flags": "sa", "flags": "S."}) == {"tcp_flags": "sa", "flags": "S."}


def test_predicates_and_none_are_taken_as_given():
    pred = lambda v: True  # noqa: E731
    assert check_filters(RstEvent, {"reason": None, "state": pred})["state"] is pred


@pytest.mark.parametrize("spelling", [6, "6", "ipv6", "IPv6", "inet6", "AF_INET6", socket.AF_INET6])
def test_family_spellings(spelling):
    assert parse_family(spelling) == 6
    assert check_filters(SyscallEvent, {"family": spelling}) == {"family": 6}


@pytest.mark.parametrize("bad", [2, 10, "AF_UNIX", "v6", True])
def test_family_typos_are_errors(bad):
    with pytest.raises(ValueError, match="unknown family"):
        check_filters(RstEvent, {"family": bad})


def test_kernel_enums_from_btf_and_family_across_kinds(make_netns, nettrace):
    a, b = make_netns(), make_netns()
    a.add_veth("eth0", b, "eth0", addresses=["fd00::1/64"], peer_addresses=["fd00::2/64"])
    b.run(connect_refused("fd00::1", 9), check=True)
    # drop reasons are the running kernel's (BTF enum skb_drop_reason)
    with pytest.raises(ValueError, match=r"unknown reason 'NO_SOCKETT' for 'drop' events; valid: .*\bNO_SOCKET\b"):
        nettrace.assert_no_drops(reason="NO_SOCKETT")
    with pytest.raises(ValueError, match="unknown reason"):
        nettrace.drop_summary(reason="NO_SOCKETT")
    nettrace.drops(reason="NO_SOCKET")        # a real one is fine
    with pytest.raises(ValueError, match="unknown tcp_flags 'SX'"):
        nettrace.assert_no_packet(tcp_flags="SX")
    with pytest.raises(ValueError, match="unknown direction 'inbound'"):
        nettrace.assert_no_packet(direction="inbound")
    with pytest.raises(ValueError, match="unknown type 'sin'"):
        nettrace.assert_no_retransmits(type="sin")
    with pytest.raises(ValueError, match="unknown name 'conect'"):
        nettrace.assert_no_syscall(name="conect")
    with pytest.raises(ValueError, match="unknown direction"):
        nettrace.events(direction="inbound")   # without a kind: no kind takes it
    # one convention for family: 6 on every kind, however the filter spells it
    for spelling in (6, "AF_INET6", "ipv6", socket.AF_INET6):
        assert nettrace.syscalls(name="connect", family=spelling), spelling
        assert nettrace.rst(family=spelling), spelling
        assert nettrace.packets(family=spelling), spelling
    with pytest.raises(AssertionError, match="expected no syscall events"):
        nettrace.assert_no_syscall(family=6, name="connect")
    kinds = {e.kind for e in nettrace.events(family=6)}
    assert {"syscall", "rst", "packet"} <= kinds
    assert all(getattr(e, "family", None) in (4, 6, None) for e in nettrace.events())


def test_sequence_steps_take_the_same_values():
    from pytest_nettrace import step
    assert step("rst", family="AF_INET6").filters == {"family": 6}
    with pytest.raises(ValueError, match="unknown origin 'replied'"):
        step("rst", origin="replied")


def test_nftables_kinds_name_the_table_family():
    """nft/nftrace events' `family` is the nftables table's ("inet", "ip6", …),
    not an IP family: its own values, no 4/6 spellings."""
    from pytest_nettrace.probes.netchange import NeighEvent, NftEvent, RuleEvent
    assert check_filters(NftEvent, {"family": "inet"}) == {"family": "inet"}
    with pytest.raises(ValueError, match="unknown family 'inet4' for 'nft' events; valid: .*inet"):
        check_filters(NftEvent, {"family": "inet4"})
    assert check_filters(RuleEvent, {"family": "ipv6", "rule_action": "lookup"}) == {"family": 6,
                                                                                    "rule_action": "lookup"}
    with pytest.raises(ValueError, match="unknown rule_action 'lookpu'"):
        check_filters(RuleEvent, {"rule_action": "lookpu"})
    assert check_filters(NeighEvent, {"state": "REACHABLE|STALE"})
    with pytest.raises(ValueError, match="unknown state 'REACHBLE' for 'neigh' events"):
        check_filters(NeighEvent, {"state": "REACHBLE"})
    with pytest.raises(ValueError, match="unknown action 'flushed' for 'neigh' events"):
        check_filters(NeighEvent, {"action": "flushed"})

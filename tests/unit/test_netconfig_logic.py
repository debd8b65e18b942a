"""Pure logic of issue 15's kinds, root-free: the nftables decoding
(pytest_nettrace/probes/_nft.py) on a real notification batch recorded once
from `nft flush ruleset`, event lines, sysctl names, the cgroup v2 lookup."""
from __future__ import annotations

from pytest_nettrace.probes import _nft

# `nft flush ruleset` of: table inet filter { set blocked { type ipv4_addr }; chain input { type filter
# hook input priority 0; policy drop; ct state established,related accept; ip6 daddr fd00::1 udp sport 53
# meta mark 0x10 counter drop; ip saddr @blocked drop } }
FLUSH = bytes.fromhex(
    "04010000080a000001000000696e0000010000030b00010066696c74657200000a000200696e7075740000000c000300"
    "0000000000000002cc00040020000100070001006374000014000200080001000000000108000200000000004c000100"
    "0c00010062697477697365003c0002000800010000000001080002000000000108000300000000040800060000000000"
    "0c00040008000100060000000c00050008000100000000002c00010008000100636d7000200002000800010000000001"
    "08000200000000010c0003000800010000000000300001000e000100696d6d6564696174650000001c00020008000100"
    "00000000100002000c000200080001000000000154020000080a000001000000696e0000010000030b00010066696c74"
    "657200000a000200696e7075740000000c00030000000000000000031c02040024000100090001006d65746100000000"
    "14000200080002000000000f08000100000000012c00010008000100636d700020000200080001000000000108000200"
    "000000000c000300050001000a000000340001000c0001007061796c6f61640024000200080001000000000108000200"
    "00000001080003000000001808000400000000103800010008000100636d70002c000200080001000000000108000200"
    "000000001800030014000100fd00000000000000000000000000000124000100090001006d6574610000000014000200"
    "080002000000001008000100000000012c00010008000100636d70002000020008000100000000010800020000000000"
    "0c0003000500010011000000340001000c0001007061796c6f6164002400020008000100000000010800020000000002"
    "080003000000000008000400000000022c00010008000100636d70002000020008000100000000010800020000000000"
    "0c000300060001000035000024000100090001006d657461000000001400020008000200000000030800010000000001"
    "2c00010008000100636d700020000200080001000000000108000200000000000c00030008000100100000002c000100"
    "0c000100636f756e746572001c0002000c00010000000000000000000c0002000000000000000000300001000e000100"
    "696d6d6564696174650000001c0002000800010000000000100002000c000200080001000000000020010000080a0000"
    "01000000696e0000010000030b00010066696c74657200000a000200696e7075740000000c0003000000000000000005"
    "e800040024000100090001006d6574610000000014000200080002000000000f08000100000000012c00010008000100"
    "636d700020000200080001000000000108000200000000000c0003000500010002000000340001000c0001007061796c"
    "6f6164002400020008000100000000010800020000000001080003000000000c0800040000000004300001000b000100"
    "6c6f6f6b75700000200002000c000100626c6f636b65640008000200000000010800050000000000300001000e000100"
    "696d6d6564696174650000001c0002000800010000000000100002000c0002000800010000000000380000000b0a0000"
    "01000000696e0000010000030b00010066696c74657200000c000200626c6f636b6564000c0010000000000000000004"
    "38000000050a000001000000696e0000010000030b00010066696c74657200000a000300696e7075740000000c000200"
    "000000000000000134000000020a000001000000696e0000010000030b00010066696c74657200000800030000000000"
    "0c0004000000000000000001"
)


def test_flush_batch_decodes_to_one_change_per_object_in_kernel_order():
    got = [(c["object"], c["action"], c["family"], c["table"], c["handle"]) for c in _nft.changes(FLUSH)]
    assert got == [("rule", "deleted", "inet", "filter", 2), ("rule", "deleted", "inet", "filter", 3),
                   ("rule", "deleted", "inet", "filter", 5), ("set", "deleted", "inet", "filter", 4),
                   ("chain", "deleted", "inet", "filter", 1), ("table", "deleted", "inet", "filter", 1)]


def test_rules_render_as_nft_prints_them():
    texts = [c["text"] for c in _nft.changes(FLUSH) if c["object"] == "rule"]
    assert texts == ["ct state established,related accept",
                     "ip6 daddr fd00::1 udp sport 53 meta mark 0x00000010 counter packets 0 bytes 0 drop",
                     "ip saddr @blocked drop"]


def test_a_truncated_batch_is_told_and_decodes_what_fits():
    cut = FLUSH[:700]
    assert _nft.complete(FLUSH, len(FLUSH)) and not _nft.complete(cut, len(FLUSH))
    assert [c["handle"] for c in _nft.changes(cut)] == [2]  # the second rule is cut: left out, not garbled


# -- more pure logic of issue 15's kinds (root-free) ------------------------------

from pytest_nettrace.probes.netchange import NeighEvent, RuleEvent, nud_state  # noqa: E402
from pytest_nettrace.probes.sysctl import cgroup2_mount, dev_of  # noqa: E402


def test_nud_states_named_as_ip_neigh_names_them():
    assert nud_state(0x02) == "REACHABLE" and nud_state(0x80) == "PERMANENT" and nud_state(0) == "NONE"
    assert nud_state(0x02 | 0x40) == "REACHABLE|NOARP"


def test_rule_and_neigh_lines():
    rule = RuleEvent(None, (), "process", action="added", family=6, priority=5, src=None, dst=None, iif="eth0",
                     oif=None, fwmark=None, fwmask=None, table=None, rule_action="unreachable", goto=None,
                     invert=True)
    assert rule.describe() == "added rule (IPv6) 5: not from all iif eth0 unreachable"
    neigh = NeighEvent(None, (), "process", action="changed", address="10.0.0.2", dev="eth0",
                       lladdr="02:00:00:00:00:02", state="STALE", old_state="REACHABLE", cause="kernel")
    assert neigh.describe() == "changed neigh 10.0.0.2 dev eth0 lladdr 02:00:00:00:00:02 REACHABLE -> STALE"
    assert neigh.background, "the kernel ageing an entry is noise"


def test_cgroup2_found_in_unified_and_hybrid_layouts_and_missing_on_v1_only(tmp_path):
    unified = tmp_path / "unified"
    unified.write_text("30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n")
    hybrid = tmp_path / "hybrid"
    hybrid.write_text("31 30 0:27 / /sys/fs/cgroup/cpu rw shared:10 - cgroup cgroup rw,cpu\n"
                      "40 30 0:35 / /sys/fs/cgroup/unified rw shared:11 - cgroup2 cgroup2 rw\n")
    v1 = tmp_path / "v1"
    v1.write_text("31 30 0:27 / /sys/fs/cgroup/cpu rw shared:10 - cgroup cgroup rw,cpu\n")
    assert cgroup2_mount(str(unified)) == "/sys/fs/cgroup"
    assert cgroup2_mount(str(hybrid)) == "/sys/fs/cgroup/unified"
    assert cgroup2_mount(str(v1)) is None and cgroup2_mount(str(tmp_path / "absent")) is None


def test_sysctl_dev_only_for_per_interface_settings():
    assert dev_of("net/ipv6/conf/eth0.100/disable_ipv6".split("/")) == "eth0.100"
    assert dev_of("net/ipv4/neigh/all/gc_stale_time".split("/")) == "all"
    assert dev_of("net/ipv4/ip_forward".split("/")) is None

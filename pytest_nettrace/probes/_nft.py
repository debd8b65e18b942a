"""nftables notifications, decoded with pyroute2's message classes: what a
commit changed (tables, chains, rules, sets, elements), and rules rendered as
text close to what `nft list ruleset` prints.

Pure functions on message bytes (no kernel needed): netchange.py turns their
results into events with who did it."""
from __future__ import annotations

import ipaddress
import struct
from typing import Any, Dict, Iterator, List, Optional, Tuple, cast

from ..events import IpProto

NFNL_SUBSYS_NFTABLES = 10
NFNLGRP_NFTABLES = 7
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
# NFT_MSG_* -> (object, action, message class in pyroute2's nftsocket)
MESSAGES = {
    0: ("table", "added", "nft_table_msg"), 2: ("table", "deleted", "nft_table_msg"),
    3: ("chain", "added", "nft_chain_msg"), 5: ("chain", "deleted", "nft_chain_msg"),
    6: ("rule", "added", "nft_rule_msg"), 8: ("rule", "deleted", "nft_rule_msg"),
    9: ("set", "added", "nft_set_msg"), 11: ("set", "deleted", "nft_set_msg"),
    12: ("element", "added", "nft_set_elem_list_msg"), 14: ("element", "deleted", "nft_set_elem_list_msg"),
}
NFT_MSG_NEWGEN = 15
OTHER_OBJECTS = {18: ("object", "added"), 20: ("object", "deleted"),
                 22: ("flowtable", "added"), 24: ("flowtable", "deleted")}
HOOKS = {"ip": ("prerouting", "input", "forward", "output", "postrouting"),
         "netdev": ("ingress", "egress"),
         "arp": ("input", "output", "forward")}
VERDICTS = {"NF_DROP": "drop", "NF_ACCEPT": "accept", "NFT_RETURN": "return", "NFT_CONTINUE": "continue",
            "NFT_JUMP": "jump", "NFT_GOTO": "goto", "NFT_BREAK": "break", "NF_QUEUE": "queue"}
# as nft writes a protocol in a rule (/etc/protocols' names)
L4 = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 33: "dccp", 47: "gre", 50: "esp", 51: "ah", 58: "icmpv6",
      132: "sctp", 136: "udplite"}
_NET_FIELDS: Dict[Optional[str], Dict[int, str]] = {"ip": {12: "saddr", 16: "daddr", 9: "protocol", 8: "ttl"},
               "ip6": {8: "saddr", 24: "daddr", 6: "nexthdr", 7: "hoplimit"}}
_TRANSPORT_FIELDS = {0: "sport", 2: "dport"}
# (l4 protocol, offset, length) -> field, past the ports every one has
_L4_FIELDS: Dict[Tuple[Optional[str], int, int], str] = {
    ("tcp", 13, 1): "flags", ("tcp", 4, 4): "sequence", ("tcp", 8, 4): "ackseq", ("tcp", 14, 2): "window",
    ("icmp", 0, 1): "type", ("icmp", 1, 1): "code", ("icmpv6", 0, 1): "type", ("icmpv6", 1, 1): "code"}
_TCP_FLAGS = ((0x01, "fin"), (0x02, "syn"), (0x04, "rst"), (0x08, "psh"), (0x10, "ack"), (0x20, "urg"),
              (0x40, "ecn"), (0x80, "cwr"))
_ICMP_TYPES = {0: "echo-reply", 3: "destination-unreachable", 4: "source-quench", 5: "redirect", 8: "echo-request",
               9: "router-advertisement", 10: "router-solicitation", 11: "time-exceeded", 12: "parameter-problem",
               13: "timestamp-request", 14: "timestamp-reply"}
_ICMPV6_TYPES = {1: "destination-unreachable", 2: "packet-too-big", 3: "time-exceeded", 4: "parameter-problem",
                 128: "echo-request", 129: "echo-reply", 130: "mld-listener-query", 131: "mld-listener-report",
                 132: "mld-listener-done", 133: "nd-router-solicit", 134: "nd-router-advert",
                 135: "nd-neighbor-solicit", 136: "nd-neighbor-advert", 137: "nd-redirect"}
# how nft names the protocol in an `ip protocol` / `ip6 nexthdr` match (/etc/protocols)
_PROTOCOL_NAMES = {**L4, 58: "ipv6-icmp"}
# reject's codes, by the family it answers in (pyroute2 names every code by the icmpx enum)
_ICMPX_CODES = {"NFT_REJECT_ICMPX_NO_ROUTE": 0, "NFT_REJECT_ICMPX_PORT_UNREACH": 1,
                "NFT_REJECT_ICMPX_HOST_UNREACH": 2, "NFT_REJECT_ICMPX_ADMIN_PROHIBITED": 3}
_REJECT_CODES: Dict[str, Dict[Any, str]] = {
    "icmpx": {0: "no-route", 1: "port-unreachable", 2: "host-unreachable", 3: "admin-prohibited"},
    "icmp": {0: "net-unreachable", 1: "host-unreachable", 2: "prot-unreachable", 3: "port-unreachable",
             9: "net-prohibited", 10: "host-prohibited", 13: "admin-prohibited"},
    "icmpv6": {0: "no-route", 1: "admin-prohibited", 3: "addr-unreachable", 4: "port-unreachable", 5: "policy-fail",
               6: "reject-route"}}
# the meta keys nft names without "meta" (meta.c's unqualified keys)
_UNQUALIFIED_META = ("iif", "oif", "iifname", "oifname", "iifgroup", "oifgroup")
_META: Dict[Any, str] = {"NFT_META_IIFNAME": "iifname", "NFT_META_OIFNAME": "oifname", "NFT_META_IIF": "iif",
         "NFT_META_OIF": "oif", "NFT_META_MARK": "mark", "NFT_META_NFPROTO": "nfproto",
         "NFT_META_L4PROTO": "l4proto", "NFT_META_NFTRACE": "nftrace", "NFT_META_PROTOCOL": "protocol",
         "NFT_META_SKUID": "skuid", "NFT_META_SKGID": "skgid", "NFT_META_PKTTYPE": "pkttype",
         "NFT_META_LEN": "length", "NFT_META_PRIORITY": "priority", "NFT_META_CPU": "cpu",
         "NFT_META_IIFTYPE": "iiftype", "NFT_META_OIFTYPE": "oiftype", "NFT_META_CGROUP": "cgroup",
         "NFT_META_IIFGROUP": "iifgroup", "NFT_META_OIFGROUP": "oifgroup", "NFT_META_PRANDOM": "random"}
_CT_STATES = ((1, "invalid"), (2, "established"), (4, "related"), (8, "new"), (64, "untracked"))
_CMP: Dict[Any, str] = {"NFT_CMP_EQ": "", "NFT_CMP_NEQ": "!= ", "NFT_CMP_LT": "< ", "NFT_CMP_LTE": "<= ",
        "NFT_CMP_GT": "> ", "NFT_CMP_GTE": ">= "}


def _classes() -> Any:
    """pyroute2's nftables message classes, imported on first use: importing
    any of pyroute2 costs ~100 ms, which loading the probes need not pay."""
    from pyroute2.netlink.nfnetlink import nftsocket
    return nftsocket


def split(buf: bytes) -> Iterator[Tuple[int, int, bytes]]:
    """(type, flags, message) of each netlink message in a batch."""
    off = 0
    while off + 16 <= len(buf):
        length, mtype, flags = struct.unpack_from("<IHH", buf, off)
        if length < 16 or off + length > len(buf):
            return
        yield mtype, flags, buf[off: off + length]
        off += (length + 3) & ~3


def complete(buf: bytes, total: int) -> bool:
    """Whether the batch's messages all fit in the copy."""
    off = 0
    while off + 16 <= total:
        if off + 16 > len(buf):
            return False
        length = struct.unpack_from("<I", buf, off)[0]
        if length < 16:
            return True
        if off + length > len(buf):
            return False
        off += (length + 3) & ~3
    return True


def changes(buf: bytes) -> List[Dict[str, Any]]:
    """One dict per table/chain/rule/set/element change in a notification
    batch (fields of NftEvent)."""
    out: List[Dict[str, Any]] = []
    for mtype, flags, raw in split(buf):
        if mtype >> 8 != NFNL_SUBSYS_NFTABLES:
            continue
        kind = mtype & 0xFF
        if kind == NFT_MSG_NEWGEN:
            continue  # the commit's end: who made it is known already
        if kind in OTHER_OBJECTS:
            obj, action = OTHER_OBJECTS[kind]
            out.append(dict(object=obj, action=action, family=FAMILIES.get(raw[16], raw[16])))
            continue
        if kind not in MESSAGES:
            continue
        obj, action, cls = MESSAGES[kind]
        msg = getattr(_classes(), cls)(raw)
        msg.decode()
        family = FAMILIES.get(msg["nfgen_family"], msg["nfgen_family"])
        change = _describe(obj, action, family, msg)
        if obj == "set" and str(change["set"]).startswith(("__set", "__map")):
            continue   # a rule's anonymous set or map ({ tcp, udp }): part of the rule, as nft monitor shows it
        end = change.pop("interval_end", None)
        if end is not None:
            # the kernel announces an interval's end in a message of its own,
            # right after its start: one element, as nft monitor prints it
            last = out[-1] if out else None
            if last is not None and last.get("start") is not None and \
                    (last["object"], last["action"], last["table"], last["set"]) == \
                    ("element", action, change["table"], change["set"]):
                last["text"] = _interval_text(last.pop("start"), int.from_bytes(end, "big") - 1)
            continue   # (an end alone, at the set's lowest value, only opens it)
        out.append(change)
    # the anonymous sets' elements (announced before their rule) go into
    # the rule's text: `tcp dport vmap { 80 : accept, 443 : drop }`
    anonymous: Dict[Tuple[Any, Any], List[str]] = {}
    kept = []
    for change in out:
        change.pop("start", None)
        if change["object"] == "element" and str(change["set"]).startswith(("__set", "__map")):
            if change["text"]:
                anonymous.setdefault((change["table"], change["set"]), []).append(change["text"])
        else:
            kept.append(change)
    for change in kept:
        if change["object"] == "rule" and change["text"] and "@__" in change["text"]:
            change["text"] = _inline_sets(change["text"], change["table"], anonymous)
    return kept


def _inline_sets(text: str, table: Any, anonymous: Dict[Tuple[Any, Any], List[str]]) -> str:
    """`@__set0` in a rule's text as its elements, where the batch had them."""
    words = text.split(" ")
    for i, word in enumerate(words):
        elements = anonymous.get((table, word[1:])) if word.startswith("@__") else None
        if elements:
            if i and words[i - 1] in ("l4proto", "protocol", "nexthdr"):   # (their numbers, by name)
                elements = [_PROTOCOL_NAMES.get(int(e), e) if e.isdigit() else e for e in elements]
            words[i] = "{ " + ", ".join(elements) + " }"
    return " ".join(words)


def _describe(obj: str, action: str, family: Any, msg: Any) -> Dict[str, Any]:
    get = msg.get_attr
    d: Dict[str, Any] = dict(object=obj, action=action, family=family, table=None, chain=None, set=None,
                             handle=None, name=None, text=None)
    if obj == "table":
        d.update(table=get("NFTA_TABLE_NAME"), name=get("NFTA_TABLE_NAME"), handle=get("NFTA_TABLE_HANDLE"))
    elif obj == "chain":
        d.update(table=get("NFTA_CHAIN_TABLE"), chain=get("NFTA_CHAIN_NAME"), name=get("NFTA_CHAIN_NAME"),
                 handle=get("NFTA_CHAIN_HANDLE"), text=_chain_text(family, msg))
    elif obj == "rule":
        exprs = get("NFTA_RULE_EXPRESSIONS")
        d.update(table=get("NFTA_RULE_TABLE"), chain=get("NFTA_RULE_CHAIN"), handle=get("NFTA_RULE_HANDLE"),
                 text=render_rule(family, exprs) if exprs is not None else None)
    elif obj == "set":
        d.update(table=get("NFTA_SET_TABLE"), set=get("NFTA_SET_NAME"), name=get("NFTA_SET_NAME"),
                 handle=get("NFTA_SET_HANDLE"))
    elif obj == "element":
        text, start, end = _elements(msg)
        d.update(table=get("NFTA_SET_ELEM_LIST_TABLE"), set=get("NFTA_SET_ELEM_LIST_SET"),
                 name=get("NFTA_SET_ELEM_LIST_SET"), text=text, start=start, interval_end=end)
    return d


def _chain_text(family: Any, msg: Any) -> Optional[str]:
    """`type filter hook input priority 0; policy accept;` for a base chain."""
    hook = msg.get_attr("NFTA_CHAIN_HOOK")
    if not hook:
        return None
    num = hook.get_attr("NFTA_HOOK_HOOKNUM")
    names = HOOKS.get("netdev" if family == "netdev" else "arp" if family == "arp" else "ip", ())
    hook_name = names[num] if isinstance(num, int) and num < len(names) else str(num)
    text = f"type {msg.get_attr('NFTA_CHAIN_TYPE')} hook {hook_name} priority {hook.get_attr('NFTA_HOOK_PRIORITY')};"
    policy = msg.get_attr("NFTA_CHAIN_POLICY")
    if policy is not None:
        text += f" policy {'accept' if policy == 1 else 'drop'};"
    return text


NFT_SET_ELEM_INTERVAL_END = 0x1


def _data_value(attr: Any) -> Optional[bytes]:
    value = attr.get_attr("NFTA_DATA_VALUE") if attr is not None and hasattr(attr, "get_attr") else None
    return bytes(value) if isinstance(value, (bytes, bytearray)) else None


def _elements(msg: Any) -> Tuple[Optional[str], Optional[bytes], Optional[bytes]]:
    """(the elements as nft monitor lists them, the key of the last if it may
    start an interval, the end key if the message is only an interval's end).
    An interval set's element is a start and, flagged, the end after it
    (`10.0.0.0/24` is 10.0.0.0 and 10.0.1.0; an end alone at 0.0.0.0 opens
    the set): one prefix or range."""
    shown: List[str] = []
    start: Optional[bytes] = None
    end_only: Optional[bytes] = None
    for elem in msg.get_attr("NFTA_SET_ELEM_LIST_ELEMENTS") or []:
        if not hasattr(elem, "get_attr"):
            continue
        key = _data_value(elem.get_attr("NFTA_SET_ELEM_KEY"))
        if key is None:
            continue
        flags = elem.get_attr("NFTA_SET_ELEM_FLAGS") or 0   # pyroute2: a set of the flags' bits, or a number
        if NFT_SET_ELEM_INTERVAL_END in flags if isinstance(flags, (set, frozenset)) else \
                int(flags) & NFT_SET_ELEM_INTERVAL_END:
            if start is not None:
                shown[-1] = _interval_text(start, int.from_bytes(key, "big") - 1)
            elif not shown:
                end_only = key
            start = None
            continue
        end = _data_value(elem.get_attr("NFTA_SET_ELEM_KEY_END"))   # a concatenation's range, inclusive
        shown.append(_interval_text(key, int.from_bytes(end, "big")) if end is not None else _value_text(key))
        verdict = elem.get_attr("NFTA_SET_ELEM_DATA")
        code = verdict.get_attr("NFTA_DATA_VERDICT") if verdict is not None and hasattr(verdict, "get_attr") else None
        if code is not None:   # a verdict map's element
            verdict_code = code.get_attr("NFTA_VERDICT_CODE")
            shown[-1] += " : " + VERDICTS.get(verdict_code, str(verdict_code))
        start = key if end is None and code is None else None
    return (", ".join(shown) if shown else None), start, end_only


def _interval_text(start: bytes, last: int) -> str:
    """start..last (inclusive) as nft writes it: one value, a prefix, a range."""
    first, bits = int.from_bytes(start, "big"), len(start) * 8
    span = last - first + 1
    if span <= 1:
        return _value_text(start)
    end = last.to_bytes(len(start), "big")
    if len(start) in (4, 16) and span & (span - 1) == 0 and first % span == 0:
        return f"{_value_text(start)}/{bits - span.bit_length() + 1}"
    return f"{_value_text(start)}-{_value_text(end)}"


def _value_text(raw: bytes) -> str:
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    if len(raw) == 16:
        return str(ipaddress.IPv6Address(raw))
    if len(raw) <= 2:   # a port, a protocol, an ether type: nft prints the number
        return str(int.from_bytes(raw, "big"))
    return "0x" + raw.hex()


def _data(expr: Any) -> Dict[str, Any]:
    data = expr.get_attr("NFTA_EXPR_DATA")
    return dict(data["attrs"]) if data is not None else {}


def render_rule(family: Any, exprs: List[Any]) -> str:
    """A rule's expressions as nft prints them, for the common ones (payload
    and meta matches, ct state, counters, sets, verdicts, log, nat); any
    other expression shows as `<name>`. The dependencies nft adds on its own
    (`meta nfproto ipv4` before `ip saddr` in an inet table, `meta l4proto
    tcp` before `tcp dport`) are left out, as nft leaves them out."""
    out: List[Optional[str]] = []   # None: a dependency nft leaves out
    st = _State(family if family in ("ip", "ip6") else None)
    for expr in exprs:
        name = expr.get_attr("NFTA_EXPR_NAME")
        a = _data(expr)
        if name == "meta" and "NFTA_META_DREG" in a:
            st.load(("meta", _META.get(a.get("NFTA_META_KEY"), str(a.get("NFTA_META_KEY")).lower())), out)
        elif name == "meta" and "NFTA_META_SREG" in a:
            key = _META.get(a.get("NFTA_META_KEY"), a.get("NFTA_META_KEY"))
            value = int.from_bytes(st.immediate, "little") if st.immediate is not None else "<register>"
            out.append(f"meta {key} set {value}")
        elif name == "payload" and "NFTA_PAYLOAD_DREG" in a:
            st.load(("payload", (a.get("NFTA_PAYLOAD_BASE"), a.get("NFTA_PAYLOAD_OFFSET"),
                                 a.get("NFTA_PAYLOAD_LEN"))), out)
        elif name == "ct" and "NFTA_CT_DREG" in a:
            st.load(("ct", str(a.get("NFTA_CT_KEY", "")).replace("NFT_CT_", "").lower()), out)
        elif name == "bitwise":
            mask = dict(a["NFTA_BITWISE_MASK"]["attrs"]).get("NFTA_DATA_VALUE") if "NFTA_BITWISE_MASK" in a else None
            st.mask = bytes(mask) if isinstance(mask, (bytes, bytearray)) else None
        elif name == "byteorder":
            # a host-order value (meta length, skuid) turned to network order for a range comparison
            st.network_order = a.get("NFTA_BYTEORDER_OP") == "NFT_BYTEORDER_HTON"
        elif name == "cmp" and st.reg is not None:
            st.compare(_cmp_value(a), _CMP.get(a.get("NFTA_CMP_OP"), "? "), out)
        elif name == "cmp" and st.ranged(_cmp_value(a), _CMP.get(a.get("NFTA_CMP_OP")), out):
            pass   # `>= 1024` then `<= 65535` on the same load: `1024-65535`
        elif name == "lookup" and st.reg is not None:
            # a map's lookup writes the element's data: the verdict register for a vmap
            dreg = a.get("NFTA_LOOKUP_DREG")
            how = "" if dreg is None else "vmap " if dreg in (0, "NFT_REG_VERDICT") else "map "
            key = " . ".join(st.concat + [_load_text(st.reg, st.net, st.l4)])
            out.append(f"{key} {how}@{a.get('NFTA_LOOKUP_SET')}")
            st.reg, st.concat = None, []
        elif name == "counter":
            out.append(f"counter packets {a.get('NFTA_COUNTER_PACKETS', 0)} bytes {a.get('NFTA_COUNTER_BYTES', 0)}")
        elif name == "immediate":
            verdict = _verdict(a)
            if verdict:
                out.append(verdict)
            else:
                st.immediate = _immediate_value(a)
                st.registers[_register(a.get("NFTA_IMMEDIATE_DREG"))] = st.immediate
        elif name == "log":
            prefix, level = a.get("NFTA_LOG_PREFIX"), _log_level(a.get("NFTA_LOG_LEVEL"))
            text = f'log prefix "{prefix}"' if prefix else "log"
            out.append(text + (f" level {level}" if level not in (None, "warn") else ""))
        elif name == "limit":
            out.append(_limit_text(a))
        elif name == "quota":
            over = "over " if _flag_set(a.get("NFTA_QUOTA_FLAGS"), 1, "NFT_QUOTA_F_INV") else ""
            # (pyroute2 reads NFTA_QUOTA_BYTES, a be64, as a be16: read from the attribute's bytes)
            quota = _raw_attr(expr.get_attr("NFTA_EXPR_DATA"), 1)
            amount = _bytes_text(int.from_bytes(quota[:8], "big")) if len(quota) >= 8 else "?"
            out.append(f"quota {over}{amount}")
        elif name == "reject":
            out.append(st.reject(a, family, out))
        elif name in ("notrack", "queue", "dup", "fwd"):
            out.append(name)
        elif name == "masq":
            out.append("masquerade")
        elif name == "nat":
            out.append(st.nat(a, family))
        else:
            out.append(f"<{name}>")
    return " ".join(t for t in out if t is not None)


class _State:
    """What the expressions so far loaded and matched."""

    def __init__(self, net: Optional[str]) -> None:
        self.net = net
        self.l4: Optional[str] = None
        self.reg: Optional[Tuple[str, Any]] = None  # what the last load put in the register
        self.mask: Optional[bytes] = None
        self.network_order = False   # the register was turned to network order (byteorder)
        self.immediate: Optional[bytes] = None
        self.dependency: Dict[str, int] = {}  # "net" / "l4" -> index in out of a match that may be implicit
        self.registers: Dict[int, Optional[bytes]] = {}   # what immediates put in which register
        self.concat: List[str] = []   # the loads before this one that a lookup takes together
        self.last: Optional[Tuple[Tuple[str, Any], int, bytes]] = None   # the last `>=`: load, where, value

    def ranged(self, value: bytes, op: Optional[str], out: List[Optional[str]]) -> bool:
        """A `<=` right after a `>=` of the same load: one range."""
        if self.last is None or op != "<= ":
            return False
        reg, at, low = self.last
        self.last = None
        text = out[at] or ""
        out[at] = text.rsplit(" >= ", 1)[0] + f" {_number(low, reg)}-{_number(value, reg)}"
        return True

    def nat(self, a: Dict[str, Any], family: Any) -> str:
        """`dnat to 10.0.0.2:80` (`dnat ip to ...` in an inet table)."""
        kind = str(a.get("NFTA_NAT_TYPE", "")).replace("NFT_NAT_", "").lower() or "nat"
        addr = self.registers.get(_register(a.get("NFTA_NAT_REG_ADDR_MIN")))
        port = self.registers.get(_register(a.get("NFTA_NAT_REG_PROTO_MIN")))
        text = kind
        if family == "inet" and addr is not None:
            text += " ip6" if len(addr) == 16 else " ip"
        if addr is not None:
            shown = str(ipaddress.ip_address(addr)) if len(addr) in (4, 16) else "0x" + addr.hex()
            text += f" to {f'[{shown}]' if len(addr) == 16 and port is not None else shown}"
        if port is not None:
            text += f"{'' if addr is not None else ' to'}:{int.from_bytes(port[:2], 'big')}"
        return text

    def load(self, reg: Tuple[str, Any], out: List[Optional[str]]) -> None:
        if self.reg is not None:   # a load nothing compared yet: a concatenation's part (`ip saddr . tcp dport`)
            self.concat.append(_load_text(self.reg, self.net, self.l4))
        self.reg, self.mask, self.network_order = reg, None, False
        if reg[0] == "payload":
            # a header load makes the match that selected its protocol implicit
            layer = {"NFT_PAYLOAD_NETWORK_HEADER": "net", "NFT_PAYLOAD_TRANSPORT_HEADER": "l4"}.get(reg[1][0])
            if layer in self.dependency:
                out[self.dependency.pop(layer)] = None
            # ICMP is IPv4's, ICMPv6 IPv6's: their header's match implies the family
            if layer == "l4" and self.l4 in ("icmp", "icmpv6") and "net" in self.dependency:
                out[self.dependency.pop("net")] = None

    def reject(self, a: Dict[str, Any], family: Any, out: List[Optional[str]]) -> str:
        """`reject`, with what it answers unless it is the family's default."""
        rtype = a.get("NFTA_REJECT_TYPE")
        if rtype == "NFT_REJECT_TCP_RST":
            return "reject with tcp reset"
        raw = a.get("NFTA_REJECT_ICMP_CODE", 0)
        code = _ICMPX_CODES.get(raw, raw) if isinstance(raw, str) else raw
        if rtype == "NFT_REJECT_ICMPX_UNREACH":
            kind, default = "icmpx", family == "inet" and code == 1
        else:   # ICMP of the packet's family: the table's, or the nfproto match before it (which it implies)
            net = self.net or family
            kind = "icmpv6" if net == "ip6" else "icmp"
            default = (family, kind, code) in (("ip", "icmp", 3), ("ip6", "icmpv6", 4))
            if "net" in self.dependency:
                out[self.dependency.pop("net")] = None
        return "reject" if default else f"reject with {kind} {_REJECT_CODES[kind].get(code, code)}"

    def compare(self, value: bytes, op: str, out: List[Optional[str]]) -> None:
        assert self.reg is not None  # render_rule compares only after a load
        kind, what = self.reg
        self.reg, self.concat = None, []
        num = int.from_bytes(value, "big" if self.network_order else "little") if value else 0
        self.last = ((kind, what), len(out), value) if op == ">= " else None
        if kind == "meta" and what == "protocol" and not op:
            # the ether type, in network order: what a bridge or netdev rule's header match depends on
            ethertype = int.from_bytes(value, "big")
            self.net = {0x0800: "ip", 0x86DD: "ip6"}.get(ethertype, self.net)
            self.dependency["net"] = len(out)
            out.append(f"meta protocol {_ETHER_TYPES.get(ethertype, hex(ethertype))}")
            return
        if kind == "meta" and what == "pkttype":
            out.append(f"meta pkttype {op}{_PKTTYPES.get(num, num)}")
            return
        if kind == "meta" and what == "nfproto" and not op:
            self.net = {2: "ip", 10: "ip6"}.get(num, self.net)
            self.dependency["net"] = len(out)
            out.append(f"meta nfproto {'ipv4' if num == 2 else 'ipv6' if num == 10 else num}")
            return
        if kind == "meta" and what == "l4proto" and not op:
            self.l4 = L4.get(num, str(num))
            self.dependency["l4"] = len(out)   # nft's own, before a transport header's match
            out.append(f"meta l4proto {self.l4}")
            return
        if kind == "payload" and what[0] == "NFT_PAYLOAD_NETWORK_HEADER" and not op \
                and (self.net, what[1]) in (("ip", 9), ("ip6", 6)):
            # written by hand (nft's own dependencies match meta l4proto): kept, named as nft names it
            self.l4 = L4.get(num, str(num))
            out.append(f"{self.net} {_NET_FIELDS[self.net][what[1]]} {_PROTOCOL_NAMES.get(num, num)}")
            return
        if kind == "meta" and what in ("iifname", "oifname"):
            ifname = value.split(b"\0", 1)[0].decode(errors="replace")
            out.append(f'{what} {op}"{ifname}"')
        elif kind == "meta" and what == "mark":
            out.append(f"meta mark {op}0x{num:08x}")
        elif kind == "meta":
            out.append(f"{_load_text((kind, what), self.net, self.l4)} {op}{num}")
        elif kind == "ct" and what == "state":
            bits = int.from_bytes(self.mask, "little") if self.mask and op == "!= " and not num else num
            names = [n for bit, n in _CT_STATES if bits & bit]
            out.append(f"ct state {'' if bits != num else op}{','.join(names) or num}")
        elif kind == "ct" and what == "status":
            bits = int.from_bytes(self.mask, "little") if self.mask and op == "!= " and not num else num
            names = [n for bit, n in _CT_STATUS if bits & bit]
            out.append(f"ct status {'' if bits != num else op}{','.join(names) or num}")
        elif kind == "ct" and what == "direction":
            out.append(f"ct direction {op}{('original', 'reply')[num] if num in (0, 1) else num}")
        elif kind == "ct":
            out.append(f"ct {what} {op}0x{num:08x}")
        else:
            base, offset, length = what
            field = _L4_FIELDS.get((self.l4, offset, length)) if base == "NFT_PAYLOAD_TRANSPORT_HEADER" else None
            if field == "flags":
                out.append(_tcp_flags(value, self.mask, op))
                return
            full = {"ip": 4, "ip6": 16}.get(self.net or "")
            if base == "NFT_PAYLOAD_NETWORK_HEADER" and full and _NET_FIELDS[self.net].get(offset) in (
                    "saddr", "daddr") and 0 < len(value) <= full:
                # a prefix: nft loads only its bytes, and masks a partial last one
                plen = bin(int.from_bytes(self.mask, "big")).count("1") if self.mask else len(value) * 8
                ip = ipaddress.ip_address(value + bytes(full - len(value)))
                out.append(f"{self.net} {_NET_FIELDS[self.net][offset]} {op}{ip}"
                           + (f"/{plen}" if plen < full * 8 else ""))
                return
            if base == "NFT_PAYLOAD_NETWORK_HEADER" and length in (4, 16) and len(value) == length:
                shown = str(ipaddress.ip_address(value))
            elif base == "NFT_PAYLOAD_LL_HEADER" and (offset, length) == (12, 2):
                shown = _ETHER_TYPES.get(int.from_bytes(value, "big"), str(int.from_bytes(value, "big")))
            elif base == "NFT_PAYLOAD_LL_HEADER" and length == 6:
                shown = ":".join(f"{b:02x}" for b in value)
            elif field == "type" and self.l4 in ("icmp", "icmpv6"):
                types = _ICMP_TYPES if self.l4 == "icmp" else _ICMPV6_TYPES
                shown = types.get(value[0], str(value[0])) if value else "0"
            else:
                shown = str(int.from_bytes(value, "big"))
            if self.mask is not None and field is None:
                out.append(f"{_load_text((kind, what), self.net, self.l4)} & 0x{self.mask.hex()} {op or '== '}{shown}")
                return
            out.append(f"{_load_text((kind, what), self.net, self.l4)} {op}{shown}")


_ETHER_TYPES = {0x0800: "ip", 0x86DD: "ip6", 0x0806: "arp", 0x8100: "vlan", 0x88A8: "8021ad"}
_ETHER_FIELDS = {(0, 6): "daddr", (6, 6): "saddr", (12, 2): "type"}
_PKTTYPES = {0: "host", 1: "broadcast", 2: "multicast", 3: "other"}
_CT_STATUS = ((1, "expected"), (2, "seen-reply"), (4, "assured"), (8, "confirmed"), (0x10, "snat"), (0x20, "dnat"),
              (0x200, "dying"))
_LOG_LEVELS = {0: "emerg", 1: "alert", 2: "crit", 3: "err", 4: "warn", 5: "notice", 6: "info", 7: "debug",
               8: "audit"}


def _log_level(level: Any) -> Optional[str]:
    """nft's word for a log level (pyroute2 gives "NFT_LOGLEVEL_INFO" or a number)."""
    if level is None:
        return None
    if isinstance(level, int):
        return _LOG_LEVELS.get(level, str(level))
    word = str(level).replace("NFT_LOGLEVEL_", "").lower()
    return "warn" if word == "warning" else word


def _raw_attr(nla: Any, kind: int) -> bytes:
    """The bytes of attribute `kind` inside `nla`, as the kernel sent them."""
    try:
        raw = bytes(nla.data[nla.offset: nla.offset + nla.length])
    except (AttributeError, TypeError):
        return b""
    off = 4
    while off + 4 <= len(raw):
        length, found = struct.unpack_from("<HH", raw, off)
        if length < 4:
            break
        if found & 0x3FFF == kind:
            return raw[off + 4: off + length]
        off += (length + 3) & ~3
    return b""
_TIME_UNITS = {1: "second", 60: "minute", 3600: "hour", 86400: "day", 604800: "week"}


def _register(reg: Any) -> int:
    """A register's number (pyroute2 gives a number or its enum name)."""
    if isinstance(reg, int):
        return reg
    text = str(reg)
    return int(text.rsplit("_", 1)[1]) if text.startswith("NFT_REG") and text[-1:].isdigit() else -1


def _flag_set(flags: Any, bit: int, name: str = "") -> bool:
    """Whether a flags attribute has `bit` (pyroute2: a number, or a set of bits or names)."""
    if isinstance(flags, (set, frozenset, list, tuple)):
        return bit in flags or name in flags
    return bool(int(flags or 0) & bit)


def _bytes_text(n: int) -> str:
    """nft's own: the largest unit that divides it."""
    for unit, size in (("gbytes", 1 << 30), ("mbytes", 1 << 20), ("kbytes", 1 << 10)):
        if n and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _limit_text(a: Dict[str, Any]) -> str:
    """`limit rate 5/second`, `limit rate over 10/minute burst 20 packets`."""
    rate, unit, burst = a.get("NFTA_LIMIT_RATE", 0), a.get("NFTA_LIMIT_UNIT", 1), a.get("NFTA_LIMIT_BURST", 0)
    over = "over " if _flag_set(a.get("NFTA_LIMIT_FLAGS"), 1, "NFT_LIMIT_F_INV") else ""
    per = _TIME_UNITS.get(unit, f"{unit} seconds")
    if str(a.get("NFTA_LIMIT_TYPE", "")) in ("NFT_LIMIT_PKT_BYTES", "1"):
        text = f"limit rate {over}{_bytes_text(rate)}/{per}"
        return text + (f" burst {_bytes_text(burst)}" if burst else "")
    return f"limit rate {over}{rate}/{per}" + (f" burst {burst} packets" if burst not in (0, 5) else "")


def _number(value: bytes, reg: Tuple[str, Any]) -> str:
    """A compared value as nft shows it in a range: a port, an address."""
    if reg[0] == "payload" and len(value) in (4, 16) and reg[1][0] == "NFT_PAYLOAD_NETWORK_HEADER":
        return str(ipaddress.ip_address(value))
    return str(int.from_bytes(value, "big"))


def _tcp_flags(value: bytes, mask: Optional[bytes], op: str) -> str:
    """`tcp flags syn` (any of them: mask, != 0), `tcp flags syn / syn,ack`
    (these of those: value / mask), as nft 1.0 prints them."""
    def names(bits: int) -> str:
        return ",".join(n for bit, n in _TCP_FLAGS if bits & bit) or "0"
    num = value[0] if value else 0
    if mask is None:
        return f"tcp flags {op}{names(num)}"
    if op == "!= " and num == 0:
        return f"tcp flags {names(mask[0])}"
    return f"tcp flags {op}{names(num)} / {names(mask[0])}"


def _immediate_value(a: Dict[str, Any]) -> Optional[bytes]:
    data = a.get("NFTA_IMMEDIATE_DATA")
    value = data.get_attr("NFTA_DATA_VALUE") if data is not None and hasattr(data, "get_attr") else None
    return bytes(value) if isinstance(value, (bytes, bytearray)) else None


def _cmp_value(a: Dict[str, Any]) -> bytes:
    data = a.get("NFTA_CMP_DATA")
    if data is None:
        return b""
    attrs = dict(data["attrs"]) if hasattr(data, "__getitem__") and "attrs" in data else {}
    value = attrs.get("NFTA_DATA_VALUE", b"")
    return bytes(value) if isinstance(value, (bytes, bytearray)) else b""


def _load_text(reg: Tuple[str, Any], net: Optional[str], l4: Optional[str]) -> str:
    kind, what = reg
    if kind == "meta":
        return str(what) if what in _UNQUALIFIED_META or str(what).startswith("NFT_") else f"meta {what}"
    if kind == "ct":
        return f"ct {what}"
    base, offset, length = what
    if base == "NFT_PAYLOAD_NETWORK_HEADER" and net in _NET_FIELDS and offset in _NET_FIELDS[net]:
        return f"{net} {_NET_FIELDS[net][offset]}"
    if base == "NFT_PAYLOAD_TRANSPORT_HEADER" and (l4, offset, length) in _L4_FIELDS:
        return f"{l4} {_L4_FIELDS[(l4, offset, length)]}"
    if base == "NFT_PAYLOAD_TRANSPORT_HEADER" and offset in _TRANSPORT_FIELDS and l4 in ("tcp", "udp", "sctp",
                                                                                          "udplite", "dccp"):
        return f"{l4} {_TRANSPORT_FIELDS[offset]}"
    if base == "NFT_PAYLOAD_LL_HEADER" and (offset, length) in _ETHER_FIELDS:
        return f"ether {_ETHER_FIELDS[(offset, length)]}"
    if base == "NFT_PAYLOAD_TRANSPORT_HEADER" and offset in _TRANSPORT_FIELDS and length == 2 and l4 is None:
        return f"th {_TRANSPORT_FIELDS[offset]}"
    short = {"NFT_PAYLOAD_LL_HEADER": "ll", "NFT_PAYLOAD_NETWORK_HEADER": "nh",
             "NFT_PAYLOAD_TRANSPORT_HEADER": "th"}.get(base, base)
    return f"@{short},{offset * 8},{length * 8}"


def _verdict(a: Dict[str, Any]) -> Optional[str]:
    data = a.get("NFTA_IMMEDIATE_DATA")
    if data is None or not hasattr(data, "get_attr"):
        return None
    verdict = data.get_attr("NFTA_DATA_VERDICT")
    if verdict is None:
        return None
    code = VERDICTS.get(verdict.get_attr("NFTA_VERDICT_CODE"), str(verdict.get_attr("NFTA_VERDICT_CODE")))
    chain = verdict.get_attr("NFTA_VERDICT_CHAIN")
    return f"{code} {chain}" if chain else code


# -- tracing (nft monitor trace) -------------------------------------------------
NFNLGRP_NFTRACE = 9
NFT_MSG_TRACE = 17
NLM_F_REQUEST, NLM_F_ACK, NLM_F_ECHO, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x8, 0x200, 0x400, 0x300
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFPROTO_INET = 1
NFT_META_NFTRACE, NFT_REG_1 = 12, 1
NF_INET_PRE_ROUTING, NF_INET_LOCAL_OUT = 0, 3
# The chains that mark packets for tracing run before everything else
# (conntrack is -200, raw -300): every chain after them is traced.
TRACE_PRIORITY = -500
_TRACE_TYPES = {1: "policy", 2: "return", 3: "rule"}
_VERDICT_CODES = {0: "drop", 1: "accept", 2: "stolen", 3: "queue", 4: "repeat", 5: "stop",
                  0xFFFFFFFF: "continue", 0xFFFFFFFE: "break", 0xFFFFFFFD: "jump", 0xFFFFFFFC: "goto",
                  0xFFFFFFFB: "return"}


def _encode(cls: Any, mtype: int, flags: int, seq: int, family: int, attrs: List[Any], res_id: int = 0) -> bytes:
    msg = cls()
    msg["header"]["type"] = mtype
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = seq
    msg["nfgen_family"] = family
    msg["res_id"] = res_id
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data[: msg["header"]["length"]])


def batch(items: List[Tuple[Any, int, int, List[Any]]], family: int = NFPROTO_INET) -> bytes:
    """An nftables transaction: (message class, NFT_MSG_*, extra flags,
    attributes) each; sequence numbers from 1 (begin) on, every message acked."""
    from pyroute2.netlink.nfnetlink import nfgen_msg
    out = _encode(nfgen_msg, NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 1, 0, [], res_id=NFNL_SUBSYS_NFTABLES)
    for i, (cls, kind, flags, attrs) in enumerate(items):
        out += _encode(cls, (NFNL_SUBSYS_NFTABLES << 8) | kind, NLM_F_REQUEST | NLM_F_ACK | flags, 2 + i,
                       family, attrs)
    out += _encode(nfgen_msg, NFNL_MSG_BATCH_END, NLM_F_REQUEST, 2 + len(items), 0, [],
                   res_id=NFNL_SUBSYS_NFTABLES)
    return out


NFT_TABLE_F_OWNER = 0x2  # 5.12+: the table lives as long as the socket that made it


def tracing_table(table: str, owned: bool = True) -> bytes:
    """`table inet <table> { chain pre { type filter hook prerouting priority
    -500; meta nftrace set 1 } chain out { type filter hook output priority
    -500; meta nftrace set 1 } }`, created exclusively (an existing table of
    that name is an error, never reused); the table comes back echoed, with
    its handle. `owned`: the kernel removes it when the socket that sent this
    closes (whatever kills the process), and `nft flush ruleset` leaves it."""
    m = _classes()
    attrs: List[Any] = [("NFTA_TABLE_NAME", table)]
    if owned:
        attrs.append(("NFTA_TABLE_FLAGS", NFT_TABLE_F_OWNER))
    items: List[Tuple[Any, int, int, List[Any]]] = [
        (m.nft_table_msg, 0, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ECHO, attrs)]
    for chain, hook in (("pre", NF_INET_PRE_ROUTING), ("out", NF_INET_LOCAL_OUT)):
        items.append((m.nft_chain_msg, 3, NLM_F_CREATE, [
            ("NFTA_CHAIN_TABLE", table), ("NFTA_CHAIN_NAME", chain),
            ("NFTA_CHAIN_HOOK", {"attrs": [("NFTA_HOOK_HOOKNUM", hook), ("NFTA_HOOK_PRIORITY", TRACE_PRIORITY)]}),
            ("NFTA_CHAIN_TYPE", "filter")]))
        items.append((m.nft_rule_msg, 6, NLM_F_CREATE, [
            ("NFTA_RULE_TABLE", table), ("NFTA_RULE_CHAIN", chain),
            ("NFTA_RULE_EXPRESSIONS", [
                {"attrs": [("NFTA_EXPR_NAME", "immediate"), ("NFTA_EXPR_DATA", {"attrs": [
                    ("NFTA_IMMEDIATE_DREG", NFT_REG_1),
                    ("NFTA_IMMEDIATE_DATA", {"attrs": [("NFTA_DATA_VALUE", b"\x01\x00\x00\x00")]})]})]},
                {"attrs": [("NFTA_EXPR_NAME", "meta"), ("NFTA_EXPR_DATA", {"attrs": [
                    ("NFTA_META_KEY", NFT_META_NFTRACE), ("NFTA_META_SREG", NFT_REG_1)]})]}])]))
    return batch(items)


def delete_table(table: str, handle: int) -> bytes:
    """Delete table `table` only if it still has `handle` (the one we made)."""
    return batch([(_classes().nft_table_msg, 2, 0, [("NFTA_TABLE_NAME", table), ("NFTA_TABLE_HANDLE", handle)])])


def get_rule(family: int, table: str, chain: str, handle: int) -> bytes:
    return _encode(_classes().nft_rule_msg, (NFNL_SUBSYS_NFTABLES << 8) | 7, NLM_F_REQUEST | NLM_F_ACK, 1, family,
                   [("NFTA_RULE_TABLE", table), ("NFTA_RULE_CHAIN", chain), ("NFTA_RULE_HANDLE", handle)])


def dump_rules() -> bytes:
    """A dump request of every rule of every table (the namespace's ruleset)."""
    return _encode(_classes().nft_rule_msg, (NFNL_SUBSYS_NFTABLES << 8) | 7, NLM_F_REQUEST | NLM_F_DUMP, 1, 0, [])


def rules(buf: bytes) -> Dict[Tuple[int, str, str, int], Optional[str]]:
    """(family id, table, chain, handle) -> text of each rule in a dump's reply."""
    out: Dict[Tuple[int, str, str, int], Optional[str]] = {}
    for mtype, _f, raw in split(buf):
        if mtype == (NFNL_SUBSYS_NFTABLES << 8) | 6:
            msg = _classes().nft_rule_msg(raw)
            msg.decode()
            exprs = msg.get_attr("NFTA_RULE_EXPRESSIONS")
            key = (msg["nfgen_family"], msg.get_attr("NFTA_RULE_TABLE"), msg.get_attr("NFTA_RULE_CHAIN"),
                   msg.get_attr("NFTA_RULE_HANDLE"))
            out[key] = render_rule(FAMILIES.get(msg["nfgen_family"]), exprs) if exprs is not None else None
    return out


def apply_change(known: Dict[Tuple[int, str, str, int], Optional[str]], mtype: int, raw: bytes) -> None:
    """Keep `known` (rules() of a namespace) up to date with one change
    notification: a rule added, a rule, chain or table deleted."""
    kind = mtype & 0xFF if mtype >> 8 == NFNL_SUBSYS_NFTABLES else None
    if kind == 6:
        known.update(rules(raw))
    elif kind in (8, 5, 2):   # DELRULE, DELCHAIN, DELTABLE
        cls = {8: "nft_rule_msg", 5: "nft_chain_msg", 2: "nft_table_msg"}[kind]
        msg = getattr(_classes(), cls)(raw)
        msg.decode()
        prefix = {8: ("RULE", ("TABLE", "CHAIN", "HANDLE")), 5: ("CHAIN", ("TABLE", "NAME")),
                  2: ("TABLE", ("NAME",))}[kind]
        gone = (msg["nfgen_family"],) + tuple(msg.get_attr(f"NFTA_{prefix[0]}_{f}") for f in prefix[1])
        for key in [k for k in known if k[:len(gone)] == gone]:
            del known[key]


def get_table(table: str) -> bytes:
    return _encode(_classes().nft_table_msg, (NFNL_SUBSYS_NFTABLES << 8) | 1, NLM_F_REQUEST | NLM_F_ACK, 1,
                   NFPROTO_INET, [("NFTA_TABLE_NAME", table)])


def errors(buf: bytes) -> List[int]:
    """The errno of every NLMSG_ERROR in a reply (0: an ack)."""
    return [-struct.unpack_from("<i", raw, 16)[0] for mtype, _f, raw in split(buf) if mtype == 2 and len(raw) >= 20]


def table_handle(buf: bytes) -> Optional[int]:
    for mtype, _f, raw in split(buf):
        if mtype == (NFNL_SUBSYS_NFTABLES << 8):
            msg = _classes().nft_table_msg(raw)
            msg.decode()
            return cast(Optional[int], msg.get_attr("NFTA_TABLE_HANDLE"))
    return None


def rule_text(buf: bytes) -> Optional[str]:
    for mtype, _f, raw in split(buf):
        if mtype == (NFNL_SUBSYS_NFTABLES << 8) | 6:
            msg = _classes().nft_rule_msg(raw)
            msg.decode()
            exprs = msg.get_attr("NFTA_RULE_EXPRESSIONS")
            return render_rule(FAMILIES.get(msg["nfgen_family"]), exprs) if exprs is not None else None
    return None


def _be(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def trace_verdict(raw: bytes, packets: Optional[Dict[Any, Dict[str, Any]]] = None) -> Optional[Dict[str, Any]]:
    """A trace message that ends a packet's journey with a drop (a rule's
    verdict, or a base chain's policy): table, chain, handle, the packet's
    addresses and ports; None for any other trace message. The kernel sends
    the packet's headers with the first message of each chain only:
    `packets` (trace id -> addresses and ports) remembers them across calls."""
    if len(raw) < 20:
        return None
    attrs: Dict[int, bytes] = {}
    off = 20
    while off + 4 <= len(raw):
        length, kind = struct.unpack_from("<HH", raw, off)
        if length < 4:
            break
        attrs.setdefault(kind & 0x3FFF, raw[off + 4: off + length])
        off += (length + 3) & ~3
    trace_id = _be(attrs.get(6, b"")) or None
    if packets is not None and 8 in attrs and trace_id is not None:
        if len(packets) > 4096:
            packets.pop(next(iter(packets)))
        packets[trace_id] = _packet(attrs.get(8), attrs.get(9))
    ttype = _TRACE_TYPES.get(_be(attrs.get(4, b"\0\0\0\0")))
    if ttype == "rule" and 5 in attrs:
        inner = attrs[5]  # NFTA_TRACE_VERDICT { NFTA_VERDICT_CODE, ... }
        code = _be(inner[4:8]) if len(inner) >= 8 else None
    elif ttype == "policy" and 16 in attrs:
        code = _be(attrs[16])
    else:
        return None
    if code != 0:  # NF_DROP
        return None
    family = raw[16]
    out: Dict[str, Any] = dict(
        table=attrs.get(1, b"").split(b"\0", 1)[0].decode(errors="replace"),
        chain=attrs.get(2, b"").split(b"\0", 1)[0].decode(errors="replace"),
        handle=_be(attrs[3]) if ttype == "rule" and 3 in attrs else None, policy=ttype == "policy",
        family_name=FAMILIES.get(family, str(family)), family_id=family, trace_id=trace_id,
        iif=_be(attrs[10]) if 10 in attrs else None, oif=_be(attrs[12]) if 12 in attrs else None,
        saddr=None, daddr=None, ip_proto=None, sport=None, dport=None)
    out.update(_packet(attrs.get(8), attrs.get(9)) if 8 in attrs else (packets or {}).get(trace_id, {}))
    return out


def _packet(net: Optional[bytes], transport: Optional[bytes]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if not net:
        return out
    proto = None
    if net[0] >> 4 == 4 and len(net) >= 20:
        out.update(saddr=ipaddress.IPv4Address(net[12:16]), daddr=ipaddress.IPv4Address(net[16:20]))
        proto = net[9]
    elif net[0] >> 4 == 6 and len(net) >= 40:
        out.update(saddr=ipaddress.IPv6Address(net[8:24]), daddr=ipaddress.IPv6Address(net[24:40]))
        proto = net[6]
    if proto is not None:
        # as every kind names it (a filter's names): a number without one
        out["ip_proto"] = IpProto.NAMES.get(proto, proto)
        if proto in (6, 17, 132, 136) and transport and len(transport) >= 4:
            out.update(sport=_be(transport[0:2]), dport=_be(transport[2:4]))
    return out

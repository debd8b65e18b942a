"""Root-free: the event schema (declared field types and the kinds' policy
flags) and the rendering room (timeline, failures, the report section,
JSON lines, reporters) on synthetic events over a frozen TraceView — no
root, no kernel, no Trace."""
from __future__ import annotations

import ipaddress
import json
import os
import re
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

import pytest
from interpreter import run_python

from pytest_nettrace.events import (ADDRESS, CHOICE, COMM, FAMILY, HEX, NETWORK, PLAIN, Event, FieldType, IPAddress,
                                    Stack, check_filters, field_type, matches)
from pytest_nettrace.probes.drop import DropEvent
from pytest_nettrace.probes.netchange import AddrEvent, RouteEvent, RouteHop, RuleEvent
from pytest_nettrace.probes.packet import PacketEvent
from pytest_nettrace.probes.registry import kinds
from pytest_nettrace.probes.rst import RstEvent
from pytest_nettrace.report import jsonl, reporters
from pytest_nettrace.report.reporters import Reporter
from pytest_nettrace.report.section import SECTION, section_text, summary
from pytest_nettrace.report.timeline import WIDTH, render_failure, render_timeline
from pytest_nettrace.report.view import TraceView

START = 1_000_000_000
NS = 4026532000


def make(cls: type, at_ms: float = 1.0, **fields: Any) -> Event:
    """An event as a decoder would hand it out, without a kernel record."""
    fields.setdefault("timestamp", START + int(at_ms * 1e6))
    fields.setdefault("netns", NS)
    if cls is not PacketEvent:
        for k, v in dict(pid=4242, tid=4242, comm="ip", uid=0, ppid=1, parent_comm="bash").items():
            fields.setdefault(k, v)
    return cls(None, (), "process", **fields)


def rst(at_ms: float = 2.0) -> Event:
    return make(RstEvent, at_ms, direction="sent", origin="reply", family=4, saddr=ipaddress.ip_address("10.0.0.1"),
                sport=9, daddr=ipaddress.ip_address("10.0.0.2"), dport=40000, state="CLOSE", reason=None)


def drop(at_ms: float = 3.0, reason: str = "NO_SOCKET") -> Event:
    return make(DropEvent, at_ms, reason=reason, location="tcp_v4_rcv+0x1a", dev="eth0", ifindex=2,
                protocol="ip", family=4, saddr=ipaddress.ip_address("10.0.0.2"),
                daddr=ipaddress.ip_address("10.0.0.1"), sport=40000, dport=9, ip_proto="tcp", length=60)


def packet(at_ms: float = 0.5) -> Event:
    return make(PacketEvent, at_ms, dev="eth0", direction="out", length=74, proto="tcp", family=4,
                saddr=ipaddress.ip_address("10.0.0.2"), sport=40000, daddr=ipaddress.ip_address("10.0.0.1"),
                dport=9, flags="S", tcp_flags="S", seq=1, ack=0, payload=b"", payload_len=0)


def addr_deleted(at_ms: float = 1.0, dev: str = "eth0") -> Event:
    return make(AddrEvent, at_ms, action="deleted", dev=dev, ifindex=2, cause="netlink", detail="RTM_DELADDR",
                cmdline="ip addr del 10.0.0.1/24 dev eth0", user="root", address=ipaddress.ip_interface(
                    "10.0.0.1/24"), family=4, scope="global", flags=0, label=dev)


def view_of(events: List[Event], **kw: Any) -> TraceView:
    kw.setdefault("labels", {NS: "server"})
    return TraceView(start_ns=START, events=events, **kw)


# -- the schema ------------------------------------------------------------------

def test_the_kinds_policy_is_declared_on_their_classes():
    flags = {k: (info.event_type.HIGH_VOLUME, info.event_type.ALARM) for k, info in kinds().items()}
    assert {k for k, (hv, _) in flags.items() if hv} == {"packet", "syscall"}
    assert {k for k, (_, alarm) in flags.items() if alarm} == {"rst", "drop"}


def test_field_types_are_declared_and_merged_from_the_bases():
    assert field_type(RstEvent, "saddr") is ADDRESS and field_type(RstEvent, "comm") is COMM
    assert field_type(RstEvent, "family") is FAMILY and field_type(RstEvent, "direction") is CHOICE
    assert field_type(RouteEvent, "dst") is NETWORK and field_type(RouteEvent, "gateway") is ADDRESS
    assert field_type(RuleEvent, "dst") is NETWORK and field_type(PacketEvent, "payload") is HEX
    assert field_type(AddrEvent, "action") is CHOICE and field_type(RstEvent, "sport") is PLAIN
    for kind, info in kinds().items():   # every declared type names a field of its kind
        cls = info.event_type
        assert set(cls.TYPES) - {"comm", "parent_comm", "family"} <= set(cls.FIELDS), kind


def test_default_route_and_prefixes_are_network_fields():
    route = make(RouteEvent, dst=ipaddress.ip_network("0.0.0.0/0"), family=4)
    other = make(RouteEvent, dst=ipaddress.ip_network("10.1.0.0/16"), family=4)
    f = check_filters(RouteEvent, {"dst": "default"})
    assert matches(route, f) and not matches(other, f)
    assert matches(other, check_filters(RouteEvent, {"dst": "10.1.0.0/16"}))
    assert matches(make(RuleEvent, dst=ipaddress.ip_network("::/0")), check_filters(RuleEvent, {"dst": "default"}))
    with pytest.raises(ValueError, match="invalid gateway 'default'"):   # a gateway is an address, not a prefix
        check_filters(RouteEvent, {"gateway": "default"})


def test_a_task_name_is_matched_as_the_kernel_keeps_it():
    ev = make(AddrEvent, comm="systemd-network", parent_comm="systemd-network")
    assert matches(ev, check_filters(AddrEvent, {"comm": "systemd-networkd"}))
    assert matches(ev, check_filters(AddrEvent, {"parent_comm": ["x", "systemd-networkd"]}))
    assert not matches(ev, check_filters(AddrEvent, {"comm": "systemd-resolved"}))
    assert not matches(make(AddrEvent, dev="systemd-networkd-1"),   # only task names are cut
                       check_filters(AddrEvent, {"dev": "systemd-networkd"}))


def test_a_new_field_type_is_one_class():
    class Port(FieldType):
        def check(self, owner: Any, field: str, value: Any) -> Any:
            if not (isinstance(value, int) and 0 <= value < 65536):
                raise ValueError(f"unknown {field} {value!r} for {owner.kind!r} events: a port number")
            return value

    class Probe(Event):
        kind = "probe"
        port: int
        saddr: IPAddress
        TYPES = {"port": Port()}

    assert field_type(Probe, "port").__class__ is Port and field_type(Probe, "comm") is COMM
    with pytest.raises(ValueError, match="unknown port 70000"):
        check_filters(Probe, {"port": 70000})


def _value_for(cls: type, name: str) -> Any:
    """A value of the declared type of `cls.name`, as a decoder would give it."""
    ftype = field_type(cls, name)
    if ftype is NETWORK:
        return ipaddress.ip_network("2001:db8::/32")
    if ftype is ADDRESS:
        return ipaddress.ip_interface("10.0.0.1/24") if cls is AddrEvent else ipaddress.ip_address("2001:db8::1")
    if ftype is HEX:
        return b"\x00\xffpayload"
    if name == "nexthops":   # a multipath route's paths
        return (RouteHop(ipaddress.ip_address("10.0.0.2"), "eth0", 2, 1), RouteHop(None, "eth1", 3, 2))
    if name == "group":      # a nexthop group's (member id, weight) pairs
        return ((1, 3), (2, 1))
    if isinstance(ftype, FieldType) and type(ftype) is not FieldType:
        valid = cls.valid_values(name) if hasattr(cls, "valid_values") else None
        if valid:
            return next(iter(valid))
        for candidate in ("S.", "SA", "REACHABLE", None):
            try:
                return ftype.check(cls, name, candidate) if candidate is not None else None
            except ValueError:
                continue
    return {"timestamp": START, "netns": NS}.get(name, 7 if name.endswith(("port", "len", "index", "ret")) else "x")


@pytest.mark.parametrize("kind", sorted(kinds()))
def test_json_is_derived_from_the_declarations_and_round_trips(kind, tmp_path):
    cls = kinds()[kind].event_type
    fields = {f: _value_for(cls, f) for f in cls.FIELDS if f != "context" and f in cls.STORED}
    ev = cls(None, Stack.resolved(["tcp_v4_rcv+0x1a", "ip_rcv+0x30"]), "process", **fields)
    row = ev.as_dict()
    for name in cls.FIELDS:   # each field as its type writes it
        assert row[name] == field_type(cls, name).to_json(getattr(ev, name, None)), name
    path = tmp_path / "events.jsonl"
    with open(path, "w") as f:
        jsonl.write_events(f, [ev])
    (back,) = jsonl.read_events(str(path))
    assert type(back) is cls and back.as_dict() == jsonl.jsonable(ev)
    for name in fields:   # in their own types again: addresses, prefixes, bytes
        assert getattr(back, name) == getattr(ev, name) and type(getattr(back, name)) is type(getattr(ev, name)) \
            or isinstance(getattr(ev, name), str), name
    assert back.stack == (ev.stack if "stack" in cls.FIELDS else [])


# -- rendering over a view ----------------------------------------------------------

def test_timeline_fits_100_columns_and_marks_the_offending():
    long_dev = "veth-with-a-long-name"
    events = [packet(), addr_deleted(1.0, long_dev), rst(), drop()] + [
        addr_deleted(5.0 + i, f"eth{i}") for i in range(50)]
    view = view_of(events, labels={NS: "a-namespace-with-a-rather-long-label-for-wrapping"})
    text = render_timeline(view, events, highlight=[events[1]])
    assert all(len(line) <= WIDTH for line in text.splitlines()), text
    assert re.search(r"^>>\s+\+1\.000ms addr\s+ip\(4242\).*deleted IPv4 10\.0\.0\.1/24", text, re.M)
    assert "more events not shown" in text   # 54 rows: cut to 40 around the marked one
    # which command did it, on the row itself (as the README's samples show it)
    assert 'via netlink (RTM_DELADDR): "ip addr del 10.0.0.1/24 dev eth0"' in " ".join(text.split())


def test_failure_counts_background_and_high_volume_and_reads_only_the_view():
    background = drop(4.0, reason="NOT_SPECIFIED")
    assert background.background and not drop().background
    events = [packet(), addr_deleted(), rst(), drop(), background]
    view = view_of(events, lost_total=3, lost_by_kind={"rst": 2, "drop": 1})
    text = render_failure(view, "expected no rst events matching (any), saw 1", "rst", [events[2]])
    assert "(not shown: 1 background drop, 1 packet; nettrace.events() lists them)" in text
    assert re.search(r"^>> .*rst .*RST sent", text, re.M) and "drop   ip(4242)" in text
    assert "lost events: 3 (rst: 2)" in text
    assert "first offending event:" in text and "kernel stack:" in text
    assert all(len(line) <= WIDTH for line in text.splitlines()), text
    # packets are shown when they are what was asserted on
    assert "not shown: 1 background drop;" in render_failure(view, "h", "packet", [])


def test_a_view_is_taken_once_and_rendering_never_asks_the_trace():
    class FakeTrace:
        start_ns = START
        closed = False
        watched = {NS: "server"}
        queried = {"addr"}
        calls: List[Optional[str]] = []

        def lost(self, kind: Optional[str] = None) -> int:
            self.calls.append(kind)
            return {None: 2, "rst": 2}.get(kind, 0)

        def all_events(self) -> List[Event]:
            return [addr_deleted(), rst()]

        def files(self) -> Dict[str, str]:
            return {"pcap": "/tmp/t.pcapng"}

    trace = FakeTrace()
    view = TraceView.of(trace, "t", kinds=("addr", "rst"))
    assert trace.calls == [None, "addr", "rst"] and view.lost_by_kind == {"rst": 2}
    with pytest.raises(TypeError):
        view.lost_by_kind["x"] = 1  # type: ignore[index]
    with pytest.raises(AttributeError):
        view.events = ()  # type: ignore[misc]
    render_failure(view, "headline", "rst", list(view.events))
    section_text(view)
    assert trace.calls == [None, "addr", "rst"]   # nothing drained again
    assert view.unasserted() == ["rst"] and summary(view)["lost"] == 2
    assert view.files == {"pcap": "/tmp/t.pcapng"}


def test_alarm_kinds_seen_without_looking_come_from_the_flags():
    assert view_of([rst(), drop()]).unasserted() == ["drop", "rst"]
    assert view_of([drop(reason="NOT_SPECIFIED"), addr_deleted()]).unasserted() == []   # background, not alarm
    assert view_of([rst()], queried={"rst"}).unasserted() == []
    assert view_of([rst()], queried={"*"}).unasserted() == []


def test_section_lists_files_and_counts_hidden_events():
    view = view_of([packet(), addr_deleted(), rst()], lost_total=None,
                   files={"events file": "/r/t.jsonl", "pcap": "/r/t.pcapng"})
    text = section_text(view)
    assert text.startswith("3 events in the watched namespaces: server (4026532000)")
    assert "(not shown: 1 packet; in the events file / nettrace.events())" in text
    assert "lost events: unknown (the test closed its trace)" in text
    assert text.endswith("events file:\n    /r/t.jsonl\npcap:\n    /r/t.pcapng")


# -- the reporter seam -------------------------------------------------------------

def test_built_in_reporters_over_one_view(tmp_path):
    capture = tmp_path / "capture.pcapng"
    capture.write_bytes(b"\x0a\x0d\x0d\x0a")
    out = tmp_path / "report"
    out.mkdir()
    view = view_of([addr_deleted(), rst()], nodeid="tests/test_x.py::test_y", files={"pcap": str(capture)})
    planned = reporters.planned(view, str(out))
    written = reporters.write_files(view, str(out), 0o640)
    assert dict(written.files) == dict(planned.files) and view.files == {"pcap": str(capture)}
    events_file, pcap = written.files["events file"], written.files["pcap"]
    assert [e.as_dict() for e in jsonl.read_events(events_file)] == [e.as_dict() for e in view.events]
    assert open(pcap, "rb").read() == capture.read_bytes()
    assert (out / events_file).stat().st_mode & 0o777 == 0o640
    props = dict(reporters.properties(written))
    assert props == {"nettrace_events": 2, "nettrace_events.addr": 1, "nettrace_events.rst": 1,
                     "nettrace_lost": 0, "nettrace_events_file": events_file, "nettrace_pcap": pcap}
    ((title, text),) = reporters.sections(written)
    assert title == SECTION and events_file in text
    live = list(reporters.by_name("json").live(view))
    assert [json.loads(line)["kind"] for line in live] == ["addr", "rst"]
    (line, _) = reporters.by_name("text").live(view)
    assert "ip(4242) uid 0 [parent bash(1)] deleted IPv4 10.0.0.1/24 from eth0 (netns server)" in line


def test_a_new_report_format_is_one_class(tmp_path):
    class KindCounts(Reporter):
        """Counts per kind: a file, a property and a section line."""

        name = "kind-counts"

        def files(self, view: TraceView, directory: str) -> Dict[str, str]:
            return {"counts": f"{directory}/{view.nodeid}.counts.json"}

        def write(self, view: TraceView, what: str, out: BinaryIO) -> None:
            out.write(json.dumps(view.counts()).encode())

        def properties(self, view: TraceView) -> List[Tuple[str, Any]]:
            return [("kinds", ",".join(view.counts()))]

        def section(self, view: TraceView) -> Optional[Tuple[str, str]]:
            return "kind counts", " ".join(f"{k}={n}" for k, n in view.counts().items())

    view = view_of([addr_deleted(), rst(), rst()], nodeid="t")
    reporter = reporters.register(KindCounts())
    try:
        with pytest.raises(ValueError, match="already registered"):
            reporters.register(KindCounts())
        written = reporters.write_files(view, str(tmp_path), 0o600)
        assert json.loads((tmp_path / "t.counts.json").read_text()) == {"addr": 1, "rst": 2}
        assert written.files["counts"] == f"{tmp_path}/t.counts.json"
        assert ("kinds", "addr,rst") in reporters.properties(written)
        assert ("kind counts", "addr=1 rst=2") in reporters.sections(written)
        assert "counts:\n    " in dict(reporters.sections(written))[SECTION]   # the section names its file
    finally:
        reporters.unregister(reporter)
    assert all(r.name != "kind-counts" for r in reporters.REPORTERS)


_TRACE_WITHOUT_PYTEST = """
import sys
from pytest_nettrace.report import captures
path = captures.capture_path("a trace made by a script")
open(path, "w").write("pcapng")
if sys.argv[1] == "keep":
    captures.keep(path)
print(path)
"""


@pytest.mark.parametrize("keep", [False, True])
def test_a_process_tracing_without_pytest_leaves_only_kept_captures(tmp_path, keep):
    """The benchmarks and library users trace without a pytest session: their
    capture directory went with no session end (a pcapng a run in /tmp)."""
    path = run_python(_TRACE_WITHOUT_PYTEST, "keep" if keep else "discard", env={"TMPDIR": str(tmp_path)}).strip()
    assert path.startswith(str(tmp_path))
    if keep:
        assert sorted(os.listdir(os.path.dirname(path))) == [".owner", os.path.basename(path)]
    else:
        assert [n for n in os.listdir(tmp_path) if "nettrace" in n] == []


def test_a_field_holding_tuples_takes_a_tuple_as_its_value_and_a_list_as_a_choice():
    """Rule ports and uid ranges are (first, last), a nexthop group is
    ((id, weight), ...): a tuple given for them is the value (it matched
    nothing when taken as a choice of values), a list a choice, anything
    else a usage error."""
    from pytest_nettrace.probes.netchange import NexthopEvent
    rule = make(RuleEvent, action="added", family=4, priority=5, dport=(22, 22), sport=None, uidrange=(1000, 1999))
    for filters in ({"dport": (22, 22)}, {"dport": [(80, 80), (22, 22)]}, {"uidrange": (1000, 1999)},
                    {"dport": rule.dport}):
        assert matches(rule, check_filters(RuleEvent, filters)), filters
    assert not matches(rule, check_filters(RuleEvent, {"dport": (22, 23)}))
    for bad in (22, [22], (22,), ("22", "22"), [22, 22]):
        with pytest.raises(ValueError, match=r"dport of 'rule' events holds a Tuple\[int, int\]"):
            check_filters(RuleEvent, {"dport": bad})
    group = make(NexthopEvent, action="added", id=7, group=((1, 3), (2, 1)))
    assert matches(group, check_filters(NexthopEvent, {"group": ((1, 3), (2, 1))}))
    with pytest.raises(ValueError, match="group of 'nexthop' events holds a Tuple"):
        check_filters(NexthopEvent, {"group": [(1, 3), (2, 1)]})   # a choice of two pairs: never a group


def test_filters_that_could_match_nothing_are_usage_errors():
    for filters, message in [
        ({"direction": []}, "an empty choice matches no 'rst' event"),
        ({"dport": -1}, "dport of 'rst' events is a port, 0-65535"),
        ({"sport": 70000}, "sport of 'rst' events is a port"),
        ({"comm": ""}, "comm of 'rst' events is a task's name: '' would match nothing"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            check_filters(RstEvent, filters)
    with pytest.raises(ValueError, match=r"payload of 'packet' events is bytes: 'HELLO' \(str\) would match "
                                         r"nothing: write b'HELLO'"):
        check_filters(PacketEvent, {"payload": "HELLO"})
    assert check_filters(PacketEvent, {"payload": bytearray(b"HELLO")}) == {"payload": b"HELLO"}


def test_a_predicate_failing_on_a_value_names_its_filter():
    arp = make(PacketEvent, proto="arp", sport=None, dport=None)
    with pytest.raises(TypeError, match=r"the predicate given for dport failed on None \(a packet event's dport"):
        matches(arp, check_filters(PacketEvent, {"dport": lambda p: p > 1024}))


def test_a_route_says_its_metric_as_ip_route_does():
    """`ip route replace 10.5.0.0/16 dev eth0 metric 5` read as the add it
    replaced (new-user trial, against ip monitor): routes that differ by
    metric alone now read apart."""
    route = make(RouteEvent, action="replaced", dst=ipaddress.ip_network("10.5.0.0/16"), gateway=None, table="main",
                 family=4, type="unicast", protocol=3, priority=5, prefsrc=None, nhid=None, nexthops=(), dev="eth0")
    assert route.describe() == "replaced route 10.5.0.0/16 dev eth0 metric 5"
    assert "metric" not in make(RouteEvent, action="added", dst=ipaddress.ip_network("10.5.0.0/16"), gateway=None,
                                table="main", family=4, type="unicast", protocol=3, priority=None, prefsrc=None,
                                nhid=None, nexthops=(), dev="eth0").describe()


def test_a_derived_fields_filter_is_checked_against_its_getters_type():
    """sysctl's `changed` is a property: changed='True' was taken as given
    and matched nothing, so assert_none('sysctl', changed='True') passed."""
    from pytest_nettrace.probes.sysctl import SysctlEvent
    assert check_filters(SysctlEvent, {"changed": True}) == {"changed": True}
    for bad in ("True", "yes", 1):
        with pytest.raises(ValueError, match="changed of 'sysctl' events is True or False"):
            check_filters(SysctlEvent, {"changed": bad})


def test_a_sysctl_write_changed_a_value_as_the_kernel_reads_numbers():
    """`changed` compared text: writing "01", "0x1" or "1 2" over 1 said
    changed, and two values cut at 64 bytes to the same text said not."""
    from pytest_nettrace.probes.sysctl import SysctlEvent

    def changed(old: str, new: str) -> Any:
        return SysctlEvent(None, (), "process", name="net.ipv4.conf.all.rp_filter", old=old, new=new, ret=len(new),
                           offset=0).changed
    assert [changed("1", v) for v in ("01", "0x1", "1 2", "1\t", "2", "-1")] == [False, False, False, False,
                                                                               True, True]
    assert changed("32768\t60999", "32768 61000") is True and changed("reno cubic", "reno  cubic") is False
    # fewer numbers than a vector holds: the kernel keeps the others
    assert changed("4096\t131072\t6291456", "4096 131072") is False and changed("32768\t60999", "32768") is False
    assert changed("4096\t16384\t4194304", "8192") is True

    def took(old: str, new: str, ret: int) -> Any:
        return SysctlEvent(None, (), "process", name="net.ipv4.ip_forward", old=old, new=new, ret=ret,
                           offset=0).changed
    # what write() returned is what the kernel took: "1 abc" is "1 " over 1
    assert (took("1", "1 abc", 2), took("1", "1\nabc", 2), took("0", "1 abc", 2), took("1", "1", 2)) == (
        False, False, True, False)
    assert changed("1,2,3" + "," * 60 + "...", "1,2,3" + "," * 60 + "...") is None


def test_a_command_line_with_line_breaks_renders_on_one_line():
    """`python3 -c` with a multi-line script spread one event over several
    lines of `nettrace watch`."""
    from pytest_nettrace.probes.sysctl import SysctlEvent
    ev = SysctlEvent(None, (), "process", name="net.ipv4.ip_forward", old="0", new="1", ret=2, offset=0,
                     cmdline="python3 -c import os\nos.write(1, b'x')\tdone")
    assert ev.how(full=True) == ': "python3 -c import os\\nos.write(1, b\'x\')\\tdone"'


def test_the_session_summary_names_the_kinds_that_lost_events():
    """`lost events: 44 in test_x` read like the ring overflowing; a drop
    past its per-namespace detail budget counts too: the kinds are named."""
    from pytest_nettrace.report.section import SessionSummary

    s = SessionSummary()
    s.add("t.py::test_noisy", {"counts": {"drop": 300}, "lost": 44, "lost_kinds": ["drop"]})
    s.add("t.py::test_quiet", {"counts": {"rst": 1}, "lost": 0, "lost_kinds": []})
    assert s.lines()[:2] == ["2 traced tests; events: drop 300, rst 1",
                             "lost events: 44 (drop) in t.py::test_noisy"]

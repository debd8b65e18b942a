"""Reports (issue 6): the "network events" section of failing tests, the
per-test JSON-lines files, JUnit properties, the session summary — all of it
through pytest-xdist's controller (sample suites run under `-n 2`)."""
from __future__ import annotations

import ipaddress
import json
import os
import re
import textwrap
import xml.etree.ElementTree as ET

import pytest

from pytest_nettrace.report.jsonl import event_json, jsonable, read_events, select_events, write_events
from pytest_nettrace.report.captures import file_stem
from pytest_nettrace.report.section import section_text, summary

from traffic import connect_refused

SUITE = textwrap.dedent('''
    import sys

    REFUSED = [sys.executable, "-c", "import socket\\ntry: socket.create_connection(('127.0.0.1', 9))\\n"
               "except OSError: pass"]

    def test_assert_fails(netns, nettrace):
        netns.add_dummy("d0", "10.1.1.1/24")
        netns.run(["ip", "addr", "del", "10.1.1.1/24", "dev", "d0"], check=True)
        assert False, "boom"

    def test_error_raises(netns, nettrace):
        netns.add_dummy("d0", "10.1.1.1/24")
        netns.run(["ip", "addr", "del", "10.1.1.1/24", "dev", "d0"], check=True)
        raise RuntimeError("not an assertion")

    def test_passes_quietly(netns, nettrace):
        netns.add_dummy("d0", "10.4.4.4/24")

    def test_rst_never_looked_at(netns, nettrace):
        netns.run(REFUSED, check=True)

    def test_rst_asserted(netns, nettrace):
        netns.run(REFUSED, check=True)
        nettrace.assert_rst(sport=9)

    def test_not_traced():
        pass
''')


@pytest.fixture
def dummy_with_events(netns, nettrace):
    """An address added and deleted, and a RST from a closed port."""
    netns.add_dummy("d0", "10.5.0.1/24")
    netns.run(["ip", "addr", "del", "10.5.0.1/24", "dev", "d0"], check=True)
    netns.run(connect_refused("127.0.0.1", 9), check=True)
    return netns


def _section(out: str, test: str) -> str:
    """The network events section printed under `test`'s failure header."""
    block = out.split(f" {test} ", 1)[1].split(" network events ", 1)[1]
    lines = []
    for line in block.splitlines()[1:]:
        if line[:1] in ("-", "=", "_"):  # the next separator
            break
        lines.append(line)
    return "\n".join(lines)


def test_failing_tests_get_the_timeline_files_and_properties_under_xdist(pytester):
    pytester.makepyfile(test_sample=SUITE)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", "--nettrace-report=out",
                                           "--junitxml=junit.xml")
    result.assert_outcomes(passed=4, failed=2)
    out = result.stdout.str()

    for test in ("test_assert_fails", "test_error_raises"):
        sec = _section(out, test)
        flat = " ".join(sec.split())  # rows wrap at 100 columns
        assert "deleted IPv4 10.1.1.1/24 from d0 via netlink" in flat, sec
        assert re.search(r"^\s+\+\s*\d+\.\d{3}ms addr ", sec, re.M), "time offset from test start"
        assert "lost events: 0" in sec and "events file:" in sec
        # every line fits 100 columns but a path on its own (pytester's are long)
        assert all(len(line) <= 100 for line in sec.splitlines() if " " in line.strip()), sec
    assert "RuntimeError: not an assertion" in out

    # one JSON-lines file per traced test; every line parses; the deletion is there
    out_dir = pytester.path / "out"
    files = sorted(f for f in os.listdir(out_dir) if f.endswith(".jsonl"))
    assert len(files) == 5, files
    stem = file_stem("test_sample.py::test_assert_fails")
    rows = read_events(str(out_dir / f"{stem}.jsonl"))
    deleted = select_events(rows, "addr", action="deleted")
    assert len(deleted) == 1 and deleted[0].address == ipaddress.ip_interface("10.1.1.1/24")
    assert deleted[0].comm == "ip" and deleted[0].cmdline == "ip addr del 10.1.1.1/24 dev d0"
    assert [r.timestamp for r in rows] == sorted(r.timestamp for r in rows)

    # JUnit XML (written by the controller): paths and counts as properties
    cases = {c.get("name"): c for c in ET.parse(pytester.path / "junit.xml").iter("testcase")}
    props = {name: {p.get("name"): p.get("value") for p in c.iter("property")} for name, c in cases.items()}
    p = props["test_assert_fails"]
    assert p["nettrace_events_file"] == str(out_dir / f"{stem}.jsonl")
    assert int(p["nettrace_events"]) == len(rows) and p["nettrace_lost"] == "0"
    assert int(p["nettrace_events.addr"]) == sum(r.kind == "addr" for r in rows)
    assert int(props["test_rst_never_looked_at"]["nettrace_events.rst"]) >= 1
    assert not any(k.startswith("nettrace") for k in props["test_not_traced"])
    if "nettrace_pcap" in p:  # where the packet probe wrote a capture, it is copied next to the events
        assert os.path.dirname(p["nettrace_pcap"]) == str(out_dir) and os.path.getsize(p["nettrace_pcap"]) > 0

    # the session summary aggregates both workers
    summary = out.split(" nettrace summary ", 1)[1]
    assert "5 traced tests; events: " in summary and re.search(r"rst \d+", summary)
    assert "lost events: 0" in summary
    assert re.search(r"test_sample.py::test_rst_never_looked_at: .*rst", summary), summary
    assert not re.search(r"test_rst_asserted: .*rst", summary), summary


def test_a_passing_tests_unread_kinds_are_counted_as_decoding_them_would(pytester):
    """A passing test's report needs only the number of events of the kinds
    it never read: they are counted, not decoded (the decoding was most of a
    trace's cost at the end of a test). The same workload read in full
    reports the same counts, and a test that fails after its trace closed
    (a fixture's teardown) says which kinds were only counted."""
    pytester.makepyfile(test_counted=textwrap.dedent('''
        import pytest

        # The carrier comes up in the kernel's link-watch work, later: the
        # workload waits for it, or a loaded machine could end one test's
        # trace before it and count a link event fewer than the other's.
        WORK = ["sh", "-ec", "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1;"
                "ip link add v0 type veth peer name v1; ip addr add 10.7.0.1/24 dev v0;"
                "ip addr add 10.7.0.2/24 dev v0; ip link set v0 up; ip link set v1 up;"
                "for d in v0 v1; do until ip -o link show $d | grep -q 'state UP'; do sleep 0.01; done; done;"
                "ip route add 10.8.0.0/16 dev v0; ip addr del 10.7.0.1/24 dev v0"]

        @pytest.fixture
        def fails_later():
            yield
            raise RuntimeError("torn down after the trace")

        def test_never_read(netns, nettrace):
            netns.run(WORK, check=True)

        def test_read_in_full(netns, nettrace):
            netns.run(WORK, check=True)
            assert nettrace.events()

        def test_fails_after_its_trace(fails_later, netns, nettrace):
            netns.run(WORK, check=True)
    '''))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist", "--junitxml=junit.xml")
    result.assert_outcomes(passed=3, errors=1)
    cases = {c.get("name"): c for c in ET.parse(pytester.path / "junit.xml").iter("testcase")}
    props = {name: {p.get("name"): p.get("value") for p in c.iter("property") if p.get("name").startswith(
        "nettrace_events")} for name, c in cases.items()}
    counted, read = props["test_never_read"], props["test_read_in_full"]
    assert counted == read, (counted, read)
    for kind in ("link", "addr", "route", "sysctl"):
        assert int(counted[f"nettrace_events.{kind}"]) >= 1, counted
    flat = " ".join(result.stdout.str().split())
    assert re.search(r"\(counted, not decoded: (\d+ \w+, )*\d+ route", flat), flat


def test_verbose_shows_passing_timelines_and_none_hides_sections(pytester):
    pytester.makepyfile(test_sample=SUITE)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", "-v", "-k", "quietly or asserted")
    result.assert_outcomes(passed=2)
    passed = result.stdout.str().split(" network events of passed tests ", 1)[1]
    assert "test_sample.py::test_passes_quietly" in passed
    flat = " ".join(passed.split())
    assert "added IPv4 10.4.4.4/24 to d0" in flat
    assert "test_sample.py::test_rst_asserted" in flat and "RST sent (reply) 127.0.0.1:9" in flat

    quiet = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nettrace-show=none", "-k", "assert_fails")
    quiet.assert_outcomes(failed=1)
    assert " network events " not in quiet.stdout.str()
    assert "AssertionError: boom" in quiet.stdout.str()


def test_jsonl_round_trip(dummy_with_events, nettrace, tmp_path):
    events = nettrace.events()
    assert {e.kind for e in events} >= {"addr", "rst"}
    path = tmp_path / "events.jsonl"
    with open(path, "w") as f:
        assert write_events(f, events) == len(events)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [jsonable(e) for e in events]
    for ev, row in zip(events, rows):
        extra = ["background"] if ev.kind == "drop" else []   # JSON consumers tell background drops apart
        assert list(row) == list(type(ev).FIELDS) + extra  # stable names: Event.as_dict()
        assert row == json.loads(json.dumps(ev.as_dict(), default=str))
        assert "\n" not in event_json(ev)
    # read back: events of their kind, with attributes and filters, as the test saw them
    back = read_events(str(path))
    assert [type(e) for e in back] == [type(e) for e in events]
    assert [jsonable(e) for e in back] == rows
    (addr,) = select_events(back, "addr", action="deleted", address="10.5.0.1")
    assert addr.address == ipaddress.ip_interface("10.5.0.1/24") and addr.dev == "d0"
    rst = select_events(back, "rst", sport=9)[0]
    assert rst.saddr == ipaddress.ip_address("127.0.0.1") and rst.stack and rst.stack == rst.stack[:]
    assert all(isinstance(frame, str) for frame in rst.stack)
    syn = select_events(back, "packet", tcp_flags="S", dport=9)[0]
    assert syn.tcp_flags == "S" and isinstance(syn.payload, bytes)
    with pytest.raises(ValueError, match="unknown action 'delted'"):
        select_events(back, "addr", action="delted")
    with pytest.raises(ValueError, match="unknown filter 'acton'"):
        select_events(back, acton="x")


def test_record_section_fits_100_columns_and_marks(dummy_with_events, nettrace):
    view = nettrace.snapshot("t")
    deleted = [e for e in view.events if e.kind == "addr" and getattr(e, "action", "") == "deleted"]
    view = view.replace(highlight=deleted)
    text = section_text(view)
    assert all(len(line) <= 100 for line in text.splitlines() if " " in line.strip()), text
    assert re.search(r"^>> .*deleted IPv4 10.5.0.1/24", text, re.M)
    assert view.lost_line() == "lost events: 0"
    assert view.counts()["addr"] >= 2 and summary(view)["lost"] == 0


def test_file_stems_are_safe_and_unique():
    a = file_stem("tests/test_x.py::test_y[10.0.0.1/24-a b]")
    b = file_stem("tests/test_x.py::test_y[10.0.0.1/24-a_b]")
    assert a != b and "/" not in a and " " not in a
    assert a.startswith("tests_test_x.py__test_y[10.0.0.1_24-a_b]")
    assert len(file_stem("t::" + "x" * 500)) < 140



def test_a_failed_assertions_timeline_is_not_repeated_by_the_section(pytester):
    """The assertion's message lists the timeline up to the failure; the
    section below it says so and lists only what came after, not all of it
    again (it was printed twice)."""
    pytester.makepyfile(test_twice=textwrap.dedent('''
        def test_deleted(netns, nettrace):
            netns.add_dummy("d0", "10.6.0.1/24")
            netns.run(["ip", "addr", "del", "10.6.0.1/24", "dev", "d0"], check=True)
            nettrace.assert_address_not_deleted("10.6.0.1")
    '''))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    message, section = re.split(r"-+ network events -+", result.stdout.str(), maxsplit=1)
    # Under CI=1, pytest's short summary repeats the whole message: not ours.
    section = re.split(r"=+ short test summary info =+", section, maxsplit=1)[0]
    assert "addr   ip(" in message and "deleted IPv4 10.6.0.1/24" in message
    assert "addr   ip(" not in section, section
    assert re.search(r"the failure's message above\s+lists them up to the failure; none since", section), section

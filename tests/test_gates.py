"""Forbidden-event gates (issue 6): `@pytest.mark.nettrace(forbid=...)`,
`--nettrace-forbid`, ini `nettrace_forbid`; bad words are collection/usage
errors; a gate whose kind lost events fails with the count."""
from __future__ import annotations

import re
import textwrap

import pytest

from pytest_nettrace.kernel.engine import Engine

from pytest_nettrace.probes.registry import all_probes
from pytest_nettrace.report.gates import ForbidRule, GateSpecError, check, parse_marker, parse_rules
from pytest_nettrace.probes.registry import kinds
from pytest_nettrace.trace import Trace

from traffic import script

MARKED = textwrap.dedent('''
    import socket, sys
    import pytest

    REFUSED = [sys.executable, "-c", "import socket\\ntry: socket.create_connection(('127.0.0.1', 9))\\n"
               "except OSError: pass"]

    @pytest.mark.nettrace(forbid=["addr:deleted"])
    def test_deletes_without_fixture(netns):
        netns.add_dummy("d0", "10.2.0.1/24")
        netns.run(["ip", "addr", "del", "10.2.0.1/24", "dev", "d0"], check=True)

    @pytest.mark.nettrace(forbid=["addr:deleted", "link:deleted"])
    def test_only_adds(netns):
        netns.add_dummy("d0", "10.2.0.1/24")

    @pytest.mark.nettrace(forbid="route:deleted, link:deleted")
    def test_action_filter_lets_other_actions_pass(netns):
        netns.add_dummy("d0", "10.2.0.1/24")   # routes and links are only added

    @pytest.mark.nettrace(forbid=["rst"])
    def test_rst_forbidden(netns, nettrace):
        netns.run(REFUSED, check=True)

    @pytest.mark.nettrace(forbid=["rst"])
    def test_no_rst(netns, nettrace):
        netns.add_dummy("d0", "10.2.0.1/24")
        assert nettrace.rst() == []

    @pytest.mark.nettrace(watch_host=True, forbid=["rst"])
    def test_host_rst(nettrace):
        import os
        assert os.stat("/proc/self/ns/net").st_ino in nettrace.watched
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        c = socket.socket()
        try:
            c.connect(("127.0.0.1", port))   # nobody listens: the host answers with a RST
        except ConnectionRefusedError:
            pass
        c.close()

    @pytest.mark.nettrace(forbid=["rst"])
    class TestClassMarker:
        def test_in_class(self, netns):
            netns.run(REFUSED, check=True)
''')


def test_marker_gates_fail_the_right_tests_under_xdist(pytester):
    pytester.makepyfile(test_marked=MARKED)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", "-rE")
    result.assert_outcomes(passed=7, errors=4)
    out = result.stdout.str()
    errored = set(re.findall(r"^ERROR (test_marked.py::\S+)", out, re.M))
    assert errored == {"test_marked.py::test_deletes_without_fixture", "test_marked.py::test_rst_forbidden",
                       "test_marked.py::test_host_rst", "test_marked.py::TestClassMarker::test_in_class"}
    block = out.split("ERROR at teardown of test_deletes_without_fixture", 1)[1].split("ERROR at teardown", 1)[0]
    flat = " ".join(block.split())
    assert "nettrace gate: forbidden events in this test (forbid=addr:deleted, link:deleted)" not in flat
    assert "nettrace gate: forbidden events in this test (forbid=addr:deleted):" in flat
    assert "addr:deleted: 1 event" in flat
    assert 'ip(' in flat and 'deleted IPv4 10.2.0.1/24 from d0' in flat and "inet_rtm_deladdr" in flat
    # the timeline, with the offending event marked
    assert " network events " in block and re.search(r"^>> .*addr .*deleted IPv4 10.2.0.1/24", block, re.M)
    rst = out.split("ERROR at teardown of test_rst_forbidden", 1)[1]
    assert re.search(r"rst: [12] events?", rst) and "RST sent (reply) 127.0.0.1:9" in " ".join(rst.split())
    assert "the timeline is in the 'network events' section" in block


def test_gate_message_does_not_point_to_a_hidden_timeline(pytester):
    pytester.makepyfile(test_marked=MARKED)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nettrace-show=none",
                                           "-k", "deletes_without_fixture")
    result.assert_outcomes(passed=1, errors=1)
    out = result.stdout.str()
    assert "nettrace gate: forbidden events in this test (forbid=addr:deleted):" in out
    assert " network events " not in out and "'network events' section" not in out


SUITE = textwrap.dedent('''
    import sys

    def test_resets(netns):
        netns.run([sys.executable, "-c", "import socket\\ntry: socket.create_connection(('127.0.0.1', 9))\\n"
                   "except OSError: pass"], check=True)

    def test_deletes(netns):
        netns.add_dummy("d0", "10.3.0.1/24")
        netns.del_address("d0", "10.3.0.1/24")

    def test_plain():
        pass
''')


def test_suite_wide_gate_from_option_and_ini(pytester):
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", "--nettrace-forbid=rst")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*3 traced tests*", "ERROR test_suite.py::test_resets*"])
    # the gate asserted on RSTs: the summary does not call them unread
    assert not re.search(r"test_resets: .*\brst\b", result.stdout.str()), result.stdout.str()

    pytester.makeini("[pytest]\nnettrace_forbid = addr:deleted\n    link:deleted\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["ERROR test_suite.py::test_deletes*"])
    # the command line overrides the ini file; an empty value turns the gate off
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nettrace-forbid=")
    result.assert_outcomes(passed=3)


BAD_MARKERS = textwrap.dedent('''
    import pytest

    @pytest.mark.nettrace(forbid=["rts"])
    def test_unknown_kind(): pass

    @pytest.mark.nettrace(forbid=["addr:removed"])
    def test_unknown_action(): pass

    @pytest.mark.nettrace(forbid=["rst:sent"])
    def test_action_on_kind_without_actions(): pass

    @pytest.mark.nettrace("rst")
    def test_positional(): pass

    @pytest.mark.nettrace(forbidd=["rst"])
    def test_unknown_argument(): pass

    @pytest.mark.nettrace(watch_host="yes")
    def test_bad_watch_host(): pass

    @pytest.mark.nettrace(forbid=[1])
    def test_not_a_string(): pass

    @pytest.mark.nettrace(max_records="many")
    def test_bad_limit(): pass

    def test_fine(): pass
''')


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["no-xdist", "xdist"])
def test_bad_markers_are_collection_errors_naming_the_word(pytester, xdist):
    pytester.makepyfile(test_bad=BAD_MARKERS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *xdist)
    assert result.ret == pytest.ExitCode.INTERRUPTED if not xdist else result.ret != 0
    out = result.stdout.str()
    assert "INTERNALERROR" not in out and "passed" not in out.splitlines()[-1]
    valid = ", ".join(sorted(kinds()))
    for expected in (
            f"test_bad.py::test_unknown_kind: unknown event kind 'rts'; valid kinds: {valid}",
            "test_bad.py::test_unknown_action: unknown action 'removed' for 'addr' in 'addr:removed'; "
            "valid actions: added, changed, deleted",
            "test_bad.py::test_action_on_kind_without_actions: 'rst' events have no action",
            "test_bad.py::test_positional: @pytest.mark.nettrace takes keyword arguments only",
            "test_bad.py::test_unknown_argument: unknown @pytest.mark.nettrace argument 'forbidd'; "
            "valid: forbid, watch_host, nft_trace, max_records",
            "test_bad.py::test_bad_watch_host: watch_host must be True or False, got 'yes'",
            "test_bad.py::test_not_a_string: forbid entries must be strings",
            "test_bad.py::test_bad_limit: max_records must be a whole number of records, 0 for no limit, "
            "got 'many'"):
        assert expected in out, expected


@pytest.mark.parametrize("args,ini,message", [
    ([], "nettrace_max_records = lots", "nettrace_max_records = 'lots': a whole number of records (0: no limit)"),
    (["--nettrace-forbid=rst,rts"], "", "--nettrace-forbid: unknown event kind 'rts'; valid kinds: "),
    (["--nettrace-forbid=link:flapped"], "", "--nettrace-forbid: unknown action 'flapped' for 'link'"),
    ([], "nettrace_forbid = addr:deleted bogus", "ini nettrace_forbid: unknown event kind 'bogus'"),
])
def test_bad_forbid_option_is_a_usage_error(pytester, args, ini, message):
    pytester.makepyfile(test_x="def test_x(): pass")
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", *args)
    printed = f"exit {result.ret}\nstdout:\n{result.stdout.str()}\nstderr:\n{result.stderr.str()}"
    assert result.ret == pytest.ExitCode.USAGE_ERROR, printed
    assert message in result.stderr.str(), printed
    assert "Traceback" not in result.stderr.str(), printed


def test_rule_parsing():
    assert parse_rules("rst, addr:deleted rst", "t") == [ForbidRule("rst"), ForbidRule("addr", "deleted")]
    assert parse_rules(["link:down", "route"], "t") == [ForbidRule("link", "down"), ForbidRule("route")]
    assert parse_rules("conn:close", "t") == [ForbidRule("conn", "close")]
    assert str(ForbidRule("addr", "deleted")) == "addr:deleted"
    spec = parse_marker((), {"forbid": ["rst"], "watch_host": True}, "t")
    assert spec.forbid == [ForbidRule("rst")] and spec.watch_host
    with pytest.raises(GateSpecError, match="unknown action '' for 'addr'"):
        parse_rules("addr:", "t")
    with pytest.raises(GateSpecError, match="forbid must be a list"):
        parse_rules(3, "t")


def test_gate_is_sound_when_events_were_lost(make_netns):
    """Nothing forbidden was delivered, but the ring overflowed: the gate fails with the count."""
    ns = make_netns()
    ns.add_dummy("d0", "10.6.0.1/24")
    engine = Engine(probes=all_probes(), ringbuf_size=4096, background=False)  # one page, never drained meanwhile
    try:
        trace = Trace(engine, "tiny")
        trace.watch(ns)
        ns.run(["ip", "-batch", "-"], input="".join(f"addr add 10.6.1.{i}/24 dev d0\n" for i in range(1, 40)),
               check=True)
        violation = check(trace, [ForbidRule("addr", "deleted")])
        assert violation is not None
        assert re.search(r"addr:deleted: cannot be ruled out: \d+ addr events lost", violation.message)
        assert violation.offending == []
        trace.close()
    finally:
        engine.close()


def test_gate_passes_when_nothing_forbidden_happened(netns, nettrace):
    netns.add_dummy("d0", "10.6.0.1/24")
    assert check(nettrace, [ForbidRule("addr", "deleted"), ForbidRule("rst")]) is None
    netns.del_address("d0", "10.6.0.1/24")
    violation = check(nettrace, [ForbidRule("addr", "deleted"), ForbidRule("rst")])
    assert violation is not None and [e.kind for e in violation.offending] == ["addr"]
    assert all(len(line) <= 100 for line in violation.message.splitlines())


def test_drop_gate_ignores_background_drops_and_trips_on_real_ones(make_netns, nettrace):
    # a fresh veth pair with IPv6 makes background drops (multicast nobody
    # joined): a `drop` gate must not trip on those, as assert_no_drops doesn't
    a, b = make_netns(), make_netns()
    a.add_veth("eth0", b, "eth0", addresses=["10.7.0.1/24", "fd07::1/64"],
               peer_addresses=["10.7.0.2/24", "fd07::2/64"])
    nettrace.wait_for("drop", timeout=5)  # the kernel's own background drops
    assert all(e.background for e in nettrace.drops())
    assert check(nettrace, [ForbidRule("drop")]) is None
    b.run(script("""
        import socket
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("10.7.0.1", 9))
    """), check=True)
    violation = check(nettrace, [ForbidRule("drop")])
    assert violation is not None and [e.reason for e in violation.offending] == ["NO_SOCKET"]


LIMITED = textwrap.dedent('''
    import sys
    import pytest

    STORM = [sys.executable, "-c", "import socket\\nfor _ in range(100):\\n    s = socket.socket()\\n"
             "    try: s.connect(('127.0.0.1', 9))\\n    except OSError: pass\\n    s.close()"]

    def test_past_the_limit(netns, nettrace):
        netns.run(STORM, check=True)
        nettrace.assert_no_rst(dport=4242)   # nothing kept matches: what was not kept might have

    @pytest.mark.nettrace(max_records=0)
    def test_no_limit(netns, nettrace):
        netns.run(STORM, check=True)
        nettrace.assert_no_rst(dport=4242)
        assert len(nettrace.rst()) == 200

    @pytest.mark.nettrace(max_records=0)
    class TestClass:
        @pytest.mark.nettrace(max_records=10)
        def test_the_closest_marker_decides(self, netns, nettrace):
            netns.run(STORM, check=True)
            assert nettrace.lost("rst") > 0
''')


def test_a_tests_record_limit_from_the_ini_file_and_its_marker(pytester):
    """nettrace_max_records bounds what a test's trace keeps; past it the
    negative assertion fails naming the limit; a marker overrides it."""
    pytester.makepyfile(test_limited=LIMITED)
    pytester.makeini("[pytest]\nnettrace_max_records = 50\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    assert "FAILED test_limited.py::test_past_the_limit" in out
    assert "records past this trace's" in out and "limit of 50" in out and "(nettrace_max_records" in out, out


def test_a_markers_gate_on_a_test_that_watches_nothing_fails(pytester):
    """A gate the test asked for, on a test with no namespace (it forgot
    `netns`): it would pass whatever happened, so it fails as a negative
    assertion does; a suite-wide gate still lets such tests pass."""
    pytester.makepyfile(test_forgot=textwrap.dedent('''
        import pytest

        @pytest.mark.nettrace(forbid=["rst"])
        def test_no_namespace():
            pass

        @pytest.mark.nettrace(forbid=["rst"], watch_host=True)
        def test_the_host_watched():
            pass

        def test_plain():
            pass
    '''))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--nettrace-forbid=addr:deleted")
    result.assert_outcomes(passed=3, errors=1)
    out = " ".join(result.stdout.str().split())
    assert "ERROR test_forgot.py::test_no_namespace" in out
    assert ("nettrace gate (forbid=rst) cannot be checked: this test watches no network namespace, "
            "so it would pass whatever happened") in out

"""A user's test annotated with the fixtures' types is checked by mypy: a
misspelt method or a filter of the wrong type is an error before anything
runs, correct uses are clean (no root, no kernel: mypy reads the package)."""
from __future__ import annotations

import pathlib
import re
import textwrap
from typing import List

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytest.importorskip("mypy", reason="mypy is in the test extra (pip install -e '.[test]', ci/setup.sh)")

USER_TEST = '''\
from typing import Optional

from pytest_nettrace import Namespace, Trace


def test_reset(netns: Namespace, nettrace: Trace) -> None:
    ev = nettrace.assert_rst(direction="sent")
    port: int = ev.sport
    nettrace.assert_no_rst(dport=[80, 443], saddr="10.0.0.1", comm="curl")
    nettrace.assert_rst(timeout=5, dport=lambda p: p > 1024, family="ipv6")
    for e in nettrace.rst(state="ESTABLISHED"):
        print(e.daddr, port)
    reason: Optional[str] = ev.reason
    print(ev.saddr.version, ev.stack[0], ev.timestamp + 1, reason, ev.supersedes)
    gone = nettrace.assert_address_deleted("10.0.0.1/24", dev="eth0")
    print(gone.address, gone.dev, gone.cause)
    nettrace.assert_no_drops(reason="NETFILTER_DROP", dev="eth0")
    nettrace.assert_accepted_count(2, dport=80)
    assert nettrace.pcap_path is None or nettrace.pcap_path.endswith(".pcapng")
    print(nettrace.drop_summary(reason="NO_SOCKET").total, nettrace.traffic_table(comm="curl"))
    netns.run(["true"])
    port2: int = nettrace.events("rst")[0].sport + nettrace.assert_any("conn", dport=80).dport
    cause: str = nettrace.assert_any("addr").cause
    anything = nettrace.events()[0].timestamp + len(nettrace.select(str(cause)))
    print(port2, anything)
'''

MISTAKES = {
    "nettrace.assert_rts()": r'"Trace" has no attribute "assert_rts"',
    'nettrace.assert_rst(dport="x")': r'Argument "dport" .* incompatible type "str"',
    "nettrace.assert_rst(dprot=80)": r'Unexpected keyword argument "dprot"',
    "nettrace.assert_no_drops(sport=1.5)": r'Argument "sport" .* incompatible type "float"',
    "nettrace.assert_accepted(action='close')": r'Unexpected keyword argument "action"',
    "nettrace.traffic(tx_bytes='many')": r'Argument "tx_bytes" .* incompatible type "str"',
    "nettrace.drop_summary(dev='eth0')": r'Unexpected keyword argument "dev"',
    # an event's fields are typed: a misspelt one, or one used as the wrong type
    "print(nettrace.assert_rst().sprot)": r'"RstEvent" has no attribute "sprot"',
    "bad: str = nettrace.assert_rst().sport": r'Incompatible types in assignment \(expression has type "int", '
                                              r'variable has type "str"\)',
    "print(nettrace.assert_address_deleted('10.0.0.1').adress)": r'"AddrEvent" has no attribute "adress"',
    # the generic methods return a literal kind's class; a misspelt kind is an error
    "print(nettrace.events('rst')[0].sprot)": r'"RstEvent" has no attribute "sprot"',
    "nettrace.events('rts')": r'No overload variant of "events" of "Trace" matches argument type',
    "nettrace.assert_none('rts')": r'Argument 1 to "assert_none" of "Trace" has incompatible type',
    "print(nettrace.wait_for('addr').sport)": r'"AddrEvent" has no attribute "sport"',
    # events are immutable (at run time too): a kind's own field, a common one
    "nettrace.assert_rst().sport = 1": r'Property "sport" defined in "RstEvent" is read-only',
    "nettrace.assert_accepted().pid = 1": r'Property "pid" defined in "ConnEvent" is read-only',
}


def mypy(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, source: str) -> List[str]:
    """mypy's error lines for `source` as a user's test file (strict, no config of ours)."""
    from mypy import api   # in-process: no second interpreter to start (the unit layer runs as nobody)
    (tmp_path / "test_user.py").write_text(source)
    # The package as an editable install shows it to mypy (this checkout's
    # hides it behind an import hook: MYPYPATH finds it): a user's strict
    # check meets the package's own code, which must be clean too.
    (tmp_path / "mypy.ini").write_text("[mypy]\nstrict = True\n[mypy-pyroute2.*]\nignore_missing_imports = True\n")
    monkeypatch.setenv("MYPYPATH", str(ROOT))
    monkeypatch.chdir(tmp_path)
    out, err, status = api.run(["--config-file", "mypy.ini", "--cache-dir", str(tmp_path / "cache"),
                                "--no-error-summary", "--hide-error-context", "test_user.py"])
    assert status in (0, 1), out + err
    return [line for line in out.splitlines() if ": error:" in line]


def test_mypy_flags_misspelt_methods_and_wrong_filters_and_passes_correct_uses(tmp_path, monkeypatch):
    bad = "\n".join(f"    {call}" for call in MISTAKES)
    errors = mypy(tmp_path, monkeypatch, USER_TEST + textwrap.dedent('''

        def test_mistakes(nettrace: Trace) -> None:
        ''') + bad + "\n")
    first_bad = len(USER_TEST.splitlines()) + 4   # the line of the first mistake
    by_line = {}
    for err in errors:
        line = int(err.split(":")[1])
        by_line.setdefault(line, []).append(err)
    # the correct uses above are clean
    assert all(line >= first_bad for line in by_line), errors
    for i, (call, expected) in enumerate(MISTAKES.items()):
        found = by_line.get(first_bad + i, [])
        assert any(re.search(expected, e) for e in found), (call, expected, errors)


def test_the_kind_names_a_type_checker_knows_are_the_registrys():
    import typing
    from pytest_nettrace.probes.registry import kinds
    from pytest_nettrace.trace import KindName
    assert set(typing.get_args(KindName)) == set(kinds())

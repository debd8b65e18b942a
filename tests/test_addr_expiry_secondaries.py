"""An IPv4 primary address whose valid lifetime runs out takes its subnet's
secondaries with it, or promotes one (promote_secondaries), as a deletion
on request does. Those secondaries' own lifetimes (forever here) did not
run out: `ip monitor` shows them removed with `valid_lft forever`, while
the plugin said "address lifetime expired" for them too."""
from __future__ import annotations

import subprocess
import threading

import pytest


def _monitor(ns):
    proc = ns.popen(["ip", "-o", "monitor", "address"], stdout=subprocess.PIPE, text=True)
    lines, cond = [], threading.Condition()

    def read():
        for line in proc.stdout:
            with cond:
                lines.append(line.rstrip("\n"))
                cond.notify_all()
    threading.Thread(target=read, daemon=True).start()
    return proc, lines, cond


@pytest.mark.parametrize("promote", [0, 1], ids=["deleted", "promoted"])
def test_secondaries_of_an_expired_primary_did_not_expire(netns, nettrace, promote):
    netns.add_dummy("eth1")
    netns.run(["sysctl", "-qw", f"net.ipv4.conf.eth1.promote_secondaries={promote}"], check=True)
    proc, lines, cond = _monitor(netns)
    try:
        for n in range(10, 60):   # ip monitor subscribes some time after it starts
            netns.run(["ip", "addr", "add", f"198.51.100.{n}/32", "dev", "lo"], check=True)
            with cond:
                if cond.wait_for(lambda: any(f"198.51.100.{n}/32" in ln for ln in lines), 0.5):
                    break
        netns.run(["ip", "addr", "add", "10.7.0.1/24", "dev", "eth1", "valid_lft", "2", "preferred_lft", "1"],
                  check=True)
        netns.run(["ip", "addr", "add", "10.7.0.2/24", "dev", "eth1"], check=True)
        netns.run(["ip", "addr", "add", "10.7.0.3/24", "dev", "eth1", "valid_lft", "100", "preferred_lft", "100"],
                  check=True)
        primary = nettrace.wait_for("addr", action="deleted", address="10.7.0.1/24", timeout=8)
        with cond:
            assert cond.wait_for(lambda: any("Deleted" in ln and "10.7.0.1/24" in ln for ln in lines), 5)
            if promote:
                cond.wait_for(lambda: any("10.7.0.2/24" in ln and "secondary" not in ln for ln in lines), 2)
    finally:
        proc.terminate()
        proc.wait(5)
    # the observer: only the primary ran out; the others were removed (or
    # one promoted) with plenty of lifetime left
    mine = [ln for ln in lines if "10.7.0." in ln]
    assert any("Deleted" in ln and "10.7.0.1/24" in ln and "valid_lft 0sec" in ln for ln in mine), mine
    assert not any("10.7.0.2/24" in ln and "valid_lft forever" not in ln for ln in mine), mine
    assert (primary.cause, primary.pid, primary.detail) == ("kernel", None, "address lifetime expired")
    if promote:
        assert not nettrace.address_changes(action="deleted", address="10.7.0.3/24")   # stays, a secondary
        promoted = nettrace.address_changes(address="10.7.0.2/24")[-1]
        assert (promoted.action, promoted.cause, promoted.pid) == ("changed", "kernel", None)
        assert promoted.detail == "promoted to primary: its subnet's primary address was deleted"
        others = []
    else:
        others = [e for e in nettrace.address_changes(action="deleted", address=["10.7.0.2/24", "10.7.0.3/24"])]
        assert len(others) == 2
    for ev in others:
        assert (ev.cause, ev.pid) == ("kernel", None), ev.describe()
        assert ev.detail == "removed with 10.7.0.1/24, the primary address of its subnet", (str(ev.address), ev.detail)
    assert nettrace.lost("addr") == 0


def test_a_secondary_whose_own_lifetime_ran_out_says_so(netns, nettrace):
    """The other way round: a secondary expiring alone is its lifetime's
    doing, and the primary that stays takes nothing with it."""
    netns.add_dummy("eth1")
    netns.run(["ip", "addr", "add", "10.7.0.1/24", "dev", "eth1"], check=True)
    netns.run(["ip", "addr", "add", "10.7.0.2/24", "dev", "eth1", "valid_lft", "1", "preferred_lft", "1"],
              check=True)
    ev = nettrace.wait_for("addr", action="deleted", address="10.7.0.2/24", timeout=8)
    assert (ev.cause, ev.pid, ev.detail) == ("kernel", None, "address lifetime expired")
    netns.run(["ip", "addr", "del", "10.7.0.1/24", "dev", "eth1"], check=True)
    assert nettrace.address_changes(action="deleted", address="10.7.0.2/24")[-1].detail == "address lifetime expired"

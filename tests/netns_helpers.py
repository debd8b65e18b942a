"""Assertions the namespace tests share."""

from __future__ import annotations

import json
import os
import subprocess


def host_network_state() -> dict[str, object]:
    """The host's links, addresses and routes as `ip -j` reports them."""
    state = {}
    for what in (["link"], ["addr"], ["route"], ["-6", "route"]):
        out = subprocess.run(["ip", "-j", *what], check=True, capture_output=True, text=True).stdout
        state[" ".join(what)] = json.loads(out)
    return state


def netns_entries() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def pids_in_netns(inode: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == f"net:[{inode}]":
                    found.append(int(entry))
            except OSError:
                pass
    return found


def pids_left_in(name: str, inode: int) -> list[int]:
    """Processes still in the namespace that was `name` (inode `inode`) —
    unless the kernel has since given that inode to a namespace another test
    made (it reuses them; xdist workers run side by side): then none of them
    are that namespace's."""
    for other in netns_entries() - {name}:
        try:
            if os.stat(f"/run/netns/{other}").st_ino == inode:
                return []
        except OSError:
            pass
    return pids_in_netns(inode)


def ip_json(ns, *argv: str) -> list:
    """`ip -j <argv>` run inside `ns`."""
    return json.loads(ns.run(["ip", "-j", *argv], check=True).stdout)

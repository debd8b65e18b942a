"""VRRP failover: keepalived on two routers shares a virtual IP (VIP).

When the master's keepalived stops, it removes the VIP and the backup's
keepalived adds it. A TCP connection to the VIP that was open on the old
master cannot survive: its next segment reaches the new master, which has no
such connection and answers with a RST.
"""
from __future__ import annotations

import subprocess

import pytest

from pytest_nettrace import forbid, ref, step
from readiness import wait_for_log, wait_for_listener

VIP = "10.7.0.100"
ROUTERS = {"r1": "10.7.0.1", "r2": "10.7.0.2"}
CLIENT = "10.7.0.50"
PORT = 7000

# Unicast adverts: no dependence on multicast over the bridge.
CONFIG = """
global_defs {{
    router_id {name}
}}
vrrp_instance VI_EXAMPLE {{
    state {state}
    interface eth0
    virtual_router_id 51
    priority {priority}
    advert_int 1
    unicast_src_ip {me}
    unicast_peer {{
        {peer}
    }}
    virtual_ipaddress {{
        {vip}/24 dev eth0
    }}
}}
"""


@pytest.fixture
def lan(make_netns):
    """Namespaces r1, r2 (the routers) and client, on one bridge in a fourth namespace."""
    switch = make_netns()
    addresses = {**ROUTERS, "client": CLIENT}
    nodes = {name: make_netns() for name in addresses}
    for name, ns in nodes.items():
        switch.add_veth(f"to-{name}", ns, "eth0", peer_addresses=[f"{addresses[name]}/24"])
    switch.add_bridge("br0", [f"to-{name}" for name in nodes])
    return nodes


def start_keepalived(keepalived, ns, name, state, priority, tmp_path):
    """keepalived in `ns`, logging to tmp_path/<name>.log; returns (process, log path)."""
    peer = next(ip for router, ip in ROUTERS.items() if router != name)
    conf = tmp_path / f"{name}.conf"
    conf.write_text(CONFIG.format(name=name, state=state, priority=priority, me=ROUTERS[name], peer=peer, vip=VIP))
    log = tmp_path / f"{name}.log"
    # -n: foreground; -l -G: log to stdout, not syslog; -P: VRRP only. Pid files
    # of its own, or two instances (or the host's keepalived) would collide.
    argv = [keepalived, "-n", "-l", "-G", "-D", "-P", "-f", str(conf),
            "-p", str(tmp_path / f"{name}.pid"), "-r", str(tmp_path / f"{name}-vrrp.pid")]
    with log.open("w") as out:
        return ns.popen(argv, stdout=out, stderr=subprocess.STDOUT), log


def test_failover_moves_vip_and_resets_connections(lan, keepalived, socat, tmp_path, nettrace):
    r1, r2, client = lan["r1"], lan["r2"], lan["client"]
    master, _ = start_keepalived(keepalived, r1, "r1", "MASTER", 200, tmp_path)
    nettrace.wait_for("addr", timeout=10, action="added", address=VIP, netns=r1.inode)
    _, backup_log = start_keepalived(keepalived, r2, "r2", "BACKUP", 100, tmp_path)
    wait_for_log(backup_log, "Entering BACKUP STATE")
    for ns in (r1, r2):  # the service behind the VIP: an echo server on each router
        ns.popen([socat, f"TCP-LISTEN:{PORT},reuseaddr,fork", "EXEC:cat"])
    for ns in (r1, r2):
        wait_for_listener(ns, PORT)

    conn = client.socket()
    conn.connect((VIP, PORT))
    conn.sendall(b"hello\n")
    assert conn.recv(100) == b"hello\n"

    master.terminate()  # the master's keepalived stops: it gives the VIP up, the backup takes it over
    nettrace.wait_for("addr", timeout=10, action="added", address=VIP, netns=r2.inode)
    conn.sendall(b"still there?\n")  # the open connection now reaches r2, which never heard of it

    # The whole failover, in order: the connection, the VIP leaving r1 and
    # arriving on r2 (both keepalived's doing, nothing reset in between),
    # then r2's kernel resetting that very connection.
    story = nettrace.expect_sequence(
        step("conn", action="connect", daddr=VIP, dport=PORT, netns=client.inode, bind={"port": "sport"}),
        step("addr", action="deleted", address=VIP, dev="eth0", netns=r1.inode, comm="keepalived",
             as_="vip_gone"),
        step("addr", action="added", address=VIP, dev="eth0", netns=r2.inode, comm="keepalived",
             as_="vip_back"),
        forbid("rst", between=("vip_gone", "vip_back")),
        step("rst", netns=r2.inode, direction="sent", saddr=VIP, daddr=CLIENT, dport=ref("port"), as_="reset"),
        timeout=10,
    )
    assert story.bound["port"] == conn.getsockname()[1]
    assert story["reset"].pid is None  # r2's kernel, not a process
    with pytest.raises(ConnectionResetError):
        conn.recv(100)

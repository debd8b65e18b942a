"""Seed 003: a NATed container's connection reset by its own host.

A container (172.17.0.2) reaches a remote server through its host's
masquerade, as with Docker's bridge network. When the server sends a segment
conntrack judges out of window, conntrack marks it INVALID and NAT leaves it
alone: the host receives a segment for its own address and a port it has no
socket on, and answers with a RST. Setting the per-namespace sysctl
net.netfilter.nf_conntrack_tcp_be_liberal=1 makes conntrack accept it: the
segment is translated and reaches the container, which just ACKs it.
"""
from __future__ import annotations

import socket
import struct

import pytest

CONTAINER, BRIDGE, HOST, REMOTE, PORT = "172.17.0.2", "172.17.0.1", "192.0.2.1", "192.0.2.2", 8443

MASQUERADE = """
table ip nat {
    chain postrouting {
        type nat hook postrouting priority srcnat;
        ip saddr 172.17.0.0/16 oifname "eth0" masquerade
    }
}
"""


@pytest.fixture
def docker_like(make_netns, nft):
    """(container, host, remote): the host forwards and masquerades the container's traffic."""
    container, host, remote = make_netns(), make_netns(), make_netns()
    container.add_veth("eth0", host, "docker0", addresses=[f"{CONTAINER}/16"], peer_addresses=[f"{BRIDGE}/16"])
    host.add_veth("eth0", remote, "eth0", addresses=[f"{HOST}/24"], peer_addresses=[f"{REMOTE}/24"])
    container.run(["ip", "route", "add", "default", "via", BRIDGE], check=True)
    host.run(["sysctl", "-w", "net.ipv4.ip_forward=1"], check=True)
    host.run([nft, "-f", "-"], input=MASQUERADE, check=True)
    return container, host, remote


def connect_through_nat(container, remote):
    """An established connection container -> remote; returns (client sock, server's sock)."""
    listener = remote.socket()
    listener.bind((REMOTE, PORT))
    listener.listen()
    client = container.socket()
    client.connect((REMOTE, PORT))
    server_side, (peer, _) = listener.accept()
    assert peer == HOST  # the server sees the host, not the container: masqueraded
    client.sendall(b"upload...")
    assert server_side.recv(100) == b"upload..."
    return client, server_side


def send_out_of_window(remote, server_side: socket.socket) -> None:
    """From the server's namespace, one data segment of `server_side`'s connection
    whose sequence number is 1 GiB past what it has sent: far out of any window."""
    snd_nxt, rcv_nxt = tcp_sequence_numbers(server_side)
    (src, sport), (dst, dport) = server_side.getsockname(), server_side.getpeername()
    payload = b"late"
    header = struct.pack("!HHIIBBHHH", sport, dport, (snd_nxt + (1 << 30)) & 0xFFFFFFFF, rcv_nxt,
                         5 << 4, 0x18, 65535, 0, 0)  # PSH|ACK
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(header + payload))
    segment = bytearray(header + payload)
    struct.pack_into("!H", segment, 16, checksum(pseudo + segment))
    with remote.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw:
        raw.sendto(bytes(segment), (dst, 0))


def tcp_sequence_numbers(sock: socket.socket) -> "tuple[int, int]":
    """(snd_nxt, rcv_nxt) of an established socket, read in TCP repair mode (needs root)."""
    TCP_REPAIR, TCP_REPAIR_QUEUE, TCP_QUEUE_SEQ = 19, 20, 21
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
    try:
        seqs = []
        for queue in (2, 1):  # TCP_SEND_QUEUE, TCP_RECV_QUEUE
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
            seqs.append(struct.unpack("I", sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0])
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, -1)  # off, without a window probe
    return seqs[0], seqs[1]


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_invalid_segment_is_reset_by_the_host(docker_like, nettrace):
    container, host, remote = docker_like
    client, server_side = connect_through_nat(container, remote)
    nat_port = server_side.getpeername()[1]

    send_out_of_window(remote, server_side)
    # The host answers itself, from its masqueraded address: no socket there.
    rst = nettrace.assert_rst(netns=host.inode, direction="sent", saddr=HOST, sport=nat_port, daddr=REMOTE)
    assert rst.reason == "NO_SOCKET" and rst.pid is None  # the kernel did it, in softirq
    # ...and its sequence number is right: the server's connection dies (the
    # seed's stalled upload), though the container never closed anything.
    nettrace.assert_rst(netns=remote.inode, direction="received", saddr=HOST, dport=PORT)
    with pytest.raises(ConnectionResetError):
        server_side.sendall(b"ack")


def test_be_liberal_conntrack_lets_it_through(docker_like, nettrace):
    container, host, remote = docker_like
    host.run(["sysctl", "-w", "net.netfilter.nf_conntrack_tcp_be_liberal=1"], check=True)
    client, server_side = connect_through_nat(container, remote)

    send_out_of_window(remote, server_side)
    # Translated and delivered to the container, whose TCP discards it: the
    # connection goes on, and nobody sent a reset.
    server_side.sendall(b"ack")
    assert client.recv(100) == b"ack"
    nettrace.assert_no_rst()

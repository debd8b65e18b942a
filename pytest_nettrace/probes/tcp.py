"""What the TCP probes (rst, retransmit, conn) share: the kernel's TCP state
names and a socket's addresses as ipaddress objects."""
from __future__ import annotations

import functools
import ipaddress
from typing import Union

# enum tcp_state (include/net/tcp_states.h)
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
    11: "CLOSING", 12: "NEW_SYN_RECV", 13: "BOUND_INACTIVE",
}


def ip_from(raw: bytes, family: int) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    """An ipaddress object; IPv4-mapped IPv6 becomes the IPv4 address."""
    # only the address's own bytes key the cache: the rest of an IPv4 field is not zeroed
    return _ip(raw[:4] if family == 4 else raw[:16], family)


@functools.lru_cache(maxsize=4096)  # a flood repeats a few addresses; the objects are immutable
def _ip(raw: bytes, family: int) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    if family == 4:
        return ipaddress.IPv4Address(raw)
    addr = ipaddress.IPv6Address(raw)
    return addr.ipv4_mapped or addr

"""Walking a BPF hash map from Python (the core's libbpf layer only looks up,
updates and deletes single keys). Private to the probes that keep their own
aggregation maps."""
from __future__ import annotations

import ctypes
from typing import Callable, Iterator, List, Optional, Tuple

from ..libbpf import libbpf, map_delete, map_lookup

_get_next_key: Optional[Callable[..., int]] = None


def _next_key_fn() -> Callable[..., int]:
    # an independent prototype: never changes the argtypes other code sees
    global _get_next_key
    if _get_next_key is None:
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, use_errno=True)
        _get_next_key = proto(("bpf_map_get_next_key", libbpf().lib))
    return _get_next_key


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key of the map, once (keys deleted meanwhile may be skipped)."""
    fn = _next_key_fn()
    cur: Optional[ctypes.Array] = None
    nxt = ctypes.create_string_buffer(key_size)
    while fn(fd, cur, nxt) == 0:
        yield nxt.raw
        cur = ctypes.create_string_buffer(nxt.raw, key_size)


def map_items(fd: int, key_size: int, value_size: int) -> List[Tuple[bytes, bytes]]:
    out = []
    for key in list(map_keys(fd, key_size)):
        value = map_lookup(fd, key, value_size)
        if value is not None:
            out.append((key, value))
    return out


def map_delete_where(fd: int, key_size: int, pred: Callable[[bytes], bool]) -> int:
    """Delete the keys for which pred(key) is true; returns how many."""
    doomed = [k for k in map_keys(fd, key_size) if pred(k)]
    for key in doomed:
        map_delete(fd, key)
    return len(doomed)

"""Reading a BPF hash map whole while rows are deleted: how the traffic and
drop tables are read at the end of a test while the drain thread deletes
the rows of namespaces unwatched earlier. Real kernel maps."""
from __future__ import annotations

import os
import struct
import threading

from pytest_nettrace.kernel import libbpf as lb

_KEY = struct.Struct("<II")     # (namespace, row): a table's key starts with its namespace
_VALUE = struct.Struct("<Q")


def _filled(n: int) -> int:
    fd = lb.map_create(lb.BPF_MAP_TYPE_HASH, "nt_test_rows", _KEY.size, _VALUE.size, 4 * n, lb.BPF_F_NO_PREALLOC)
    for netns in (1, 2):
        for row in range(n):
            lb.map_update(fd, _KEY.pack(netns, row), _VALUE.pack(row))
    return fd


def test_a_whole_read_sees_each_kept_row_once_while_other_rows_are_deleted():
    """Asked for the key after one just deleted, the kernel starts again
    from the first: a reader that stood on another namespace's row as the
    purge deleted it counted every row before it twice (a traffic total
    then exceeded, or under its baseline fell short of, the device's own)."""
    n = 2000
    fd = _filled(n)
    stop = threading.Event()

    def churn() -> None:   # namespace 2's rows deleted and made again, as purges and new rows do
        while not stop.is_set():
            for row in range(n):
                lb.map_delete(fd, _KEY.pack(2, row))
            for row in range(n):
                lb.map_update(fd, _KEY.pack(2, row), _VALUE.pack(row))

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(50):
            items = lb.map_items(fd, _KEY.size, _VALUE.size)
            twice = len(items) - len({k for k, _v in items})
            assert twice == 0, f"{twice} rows read twice"
            kept = {_KEY.unpack(k)[1]: _VALUE.unpack(v)[0] for k, v in items if _KEY.unpack(k)[0] == 1}
            assert kept == {row: row for row in range(n)}
            keys = list(lb.map_keys(fd, _KEY.size))   # key by key (a purge's own walk)
            assert len(keys) == len(set(keys)) and {_KEY.pack(1, row) for row in range(n)} <= set(keys)
    finally:
        stop.set()
        thread.join()
        os.close(fd)


def test_a_whole_read_of_an_empty_and_of_a_large_map():
    fd = lb.map_create(lb.BPF_MAP_TYPE_HASH, "nt_test_rows", _KEY.size, _VALUE.size, 70000, lb.BPF_F_NO_PREALLOC)
    try:
        assert lb.map_items(fd, _KEY.size, _VALUE.size) == []
        for row in range(65536):
            lb.map_update(fd, _KEY.pack(3, row), _VALUE.pack(row * 7))
        items = lb.map_items(fd, _KEY.size, _VALUE.size)
        assert sorted((_KEY.unpack(k)[1], _VALUE.unpack(v)[0]) for k, v in items) == \
            [(row, row * 7) for row in range(65536)]
        assert lb.map_delete_where(fd, _KEY.size, lambda k: _KEY.unpack(k)[1] % 2 == 0) == 32768
        assert len(lb.map_items(fd, _KEY.size, _VALUE.size)) == 32768
    finally:
        os.close(fd)

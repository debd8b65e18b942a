"""An engine's programs verified by several threads (SplitObject) are one
set of programs: every part uses the very maps the others use, and what it
measures balances the next load. Real kernel."""
from __future__ import annotations

import ctypes
import json
import struct

import pytest

from pytest_nettrace.kernel import engine as engine_mod
from pytest_nettrace.kernel import libbpf as lb
from pytest_nettrace.kernel.engine import Engine, LoadCosts
from pytest_nettrace.probes.registry import all_probes


def _map_id(fd: int) -> int:
    info = ctypes.create_string_buffer(8)  # struct bpf_map_info: type, id
    size = ctypes.c_uint32(8)
    assert lb.libbpf().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)) == 0
    return struct.unpack_from("<I", info.raw, 4)[0]


def test_a_split_load_shares_every_map_and_splits_the_programs():
    engine = Engine(probes=all_probes(), background=False, load_parts=2)
    try:
        obj = engine._obj
        assert isinstance(obj, lb.SplitObject)
        first = {name: _map_id(obj.map_fd(name)) for name, _m in obj._maps.maps()}
        assert {"nt_scopes", "nt_events", "tf_counters"} <= set(first)
        loaded = []
        for part in obj._parts:
            mine = set(part.load_started())
            assert mine, "a part loaded no program"
            loaded += mine
            for name, handle in part.maps():
                assert _map_id(lb.libbpf().bpf_map__fd(handle)) == first[name], name
        wanted = {p for st in engine.status.values() if st.plan for p in st.plan.programs}
        assert sorted(loaded) == sorted(wanted)  # each program once, in one part
        costs = obj.costs()
        assert set(costs) == wanted and all(0 < c < 5 for c in costs.values()), costs
    finally:
        engine.close()


def test_a_split_and_a_single_load_attach_the_same():
    split = Engine(probes=all_probes(), background=False, load_parts=2)
    single = Engine(probes=all_probes(), background=False, load_parts=1)
    try:
        assert isinstance(single._obj, lb.BpfObject)
        assert {n: s.mechanism for n, s in split.status.items()} == \
            {n: s.mechanism for n, s in single.status.items()}
    finally:
        split.close()
        single.close()


def test_load_costs_are_kept_per_object_and_bad_files_are_ignored(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_mod, "RUN_DIR", str(tmp_path))
    tmp_path.chmod(0o755)
    obj = tmp_path / "x.bpf.o"
    obj.write_bytes(b"one")
    costs = LoadCosts(str(obj), "/sys/kernel/btf/vmlinux")
    assert costs.name and costs.known == {}
    costs.save({"a": 0.002, "b": 0.001})
    assert LoadCosts(str(obj), "/sys/kernel/btf/vmlinux").known == {"a": 0.002, "b": 0.001}
    assert LoadCosts(str(obj), "/other/btf").known == {}  # relocated otherwise: verified otherwise
    (tmp_path / costs.name).write_text(json.dumps({"a": "slow", "b": -1, "c": 0.5}))
    assert LoadCosts(str(obj), "/sys/kernel/btf/vmlinux").known == {"c": 0.5}
    (tmp_path / costs.name).write_text("{not json")
    assert LoadCosts(str(obj), "/sys/kernel/btf/vmlinux").known == {}
    obj.write_bytes(b"rebuilt")  # another object: measured again
    assert LoadCosts(str(obj), "/sys/kernel/btf/vmlinux").name != costs.name


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_any_number_of_parts_loads_every_probe(parts):
    engine = Engine(probes=all_probes(), background=False, load_parts=parts)
    try:
        assert all(st.plan is not None or st.unavailable for st in engine.status.values())
        assert [n for n, st in engine.status.items() if st.plan] == \
            [n for n, st in engine.status.items() if st.unavailable is None]
    finally:
        engine.close()


def test_libbpf_prints_to_python_only_while_a_thread_keeps_its_log():
    """libbpf calls its print function for each of ~5,000 debug lines an
    engine's load makes; entering Python for each cost ~3 ms of start-up."""
    import threading
    lib = lb.libbpf()

    def installed() -> int:
        old = lib.lib.libbpf_set_print(lib.log.callback) or 0  # the one it replaces
        lib.lib.libbpf_set_print(ctypes.cast(old, type(lib.log.callback)))
        return int(old)

    callback = ctypes.cast(lib.log.callback, ctypes.c_void_p).value
    assert installed() == 0
    lib.log.start()
    assert installed() == callback
    other_started, other_done = threading.Event(), threading.Event()

    def other() -> None:
        lib.log.start()
        other_started.set()
        other_done.wait(5)
        lib.log.take()

    t = threading.Thread(target=other)
    t.start()
    other_started.wait(5)
    lib.log.take()
    assert installed() == callback  # the other thread still keeps its log
    other_done.set()
    t.join()
    assert installed() == 0


def test_a_probe_config_is_checked_against_the_objects_rodata():
    from pytest_nettrace.errors import ProbeLoadError
    from pytest_nettrace.kernel.capabilities import object_path
    obj = lb.BpfObject(object_path(engine_mod.OBJECT))
    try:
        with pytest.raises(ProbeLoadError, match="no config variable 'rst_cfgg' in .rodata"):
            obj.set_rodata("rst_cfgg", b"\0" * 24)
        with pytest.raises(ProbeLoadError, match=r"rst_cfg is \d+ bytes, got 3"):
            obj.set_rodata("rst_cfg", b"abc")
        names = [name for name, _sec, _p in obj.programs()]
        assert "conn_state_tp" in names and names == [name for name, _sec, _p in obj.programs()]
    finally:
        obj.close()

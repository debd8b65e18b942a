"""Function addresses for probe configuration: read from /proc/kallsyms once
per boot, cached, and the same as the kernel's own table."""
from __future__ import annotations

import json
import os

from pytest_nettrace.kernel import symbols


def test_function_ranges_match_kallsyms_and_are_cached_per_boot():
    names = ("addrconf_dad_work", "call_timer_fn", "no_such_function_xyz")
    got = symbols.function_ranges(names)
    assert "no_such_function_xyz" not in got
    start, end = got["call_timer_fn"]
    assert end > start
    assert symbols.kallsyms().resolve(start) == "call_timer_fn+0x0"
    assert symbols.kallsyms().resolve(end - 1).startswith("call_timer_fn+")
    with open("/proc/sys/kernel/random/boot_id") as f:
        cache = os.path.join(symbols.RUN_DIR, f"ksyms-{f.read().strip()}.json")
    with open(cache) as f:
        cached = json.load(f)
    assert cached["call_timer_fn"] == [start, end] and cached["no_such_function_xyz"] == []
    assert symbols.function_ranges(names) == got


def test_function_ranges_from_a_table_file(tmp_path):
    table = tmp_path / "kallsyms"
    table.write_text("ffffffff81000000 T _stext\n"
                     "ffffffff81000100 t helper\n"
                     "ffffffff81000180 d helper_data\n"
                     "ffffffff81000200 T other\n")
    got = symbols.function_ranges(("helper", "helper_data", "other"), path=str(table))
    assert got["helper"] == (0xffffffff81000100, 0xffffffff81000180)
    assert "helper_data" not in got, "data symbols are not functions"
    assert got["other"][0] == 0xffffffff81000200

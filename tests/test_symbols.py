"""Function addresses for probe configuration: read from /proc/kallsyms once
per boot, cached, and the same as the kernel's own table."""
from __future__ import annotations

import json
import os

import pytest

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


def _old_resolve(addr: int, entries: list, starts: list) -> str:
    """What the table said before it was kept per boot: the nearest text symbol below."""
    import bisect
    i = bisect.bisect_right(starts, addr) - 1
    return f"{entries[i][1]}+0x{addr - entries[i][0]:x}"


def test_the_kept_table_names_every_address_as_proc_kallsyms_does(tmp_path, monkeypatch):
    """The table is read from /proc/kallsyms once per boot, then from the
    kept copy (~15 ms instead of ~0.1-0.3 s a process): both name kernel
    addresses exactly as a fresh read of /proc/kallsyms does."""
    import random
    monkeypatch.setattr(symbols, "RUN_DIR", str(tmp_path))
    tmp_path.chmod(0o755)
    entries = []
    with open("/proc/kallsyms") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] in "tTwW" and int(parts[0], 16) and \
                    (len(parts) == 3 or not parts[3].startswith(("[bpf]", "[__builtin"))):
                entries.append((int(parts[0], 16), " ".join(parts[2:4]) if len(parts) > 3 else parts[2]))
    entries.sort()
    starts = [a for a, _ in entries]
    (tmp_path / "ksymtab-an-earlier-boot.bin").write_bytes(b"old")
    (tmp_path / "ksyms-an-earlier-boot.json").write_text("{}")
    made = symbols.Kallsyms()
    [kept] = tmp_path.glob("ksymtab-*.bin")   # an earlier boot's tables removed
    assert not list(tmp_path.glob("ksyms-*.json"))
    assert kept.stat().st_mode & 0o077 == 0, "addresses are root's alone"
    again = symbols.Kallsyms()
    picks = random.Random(7).sample(entries[:-1], 2000)
    for table in (made, again):
        for addr, _name in picks:
            for off in (0, 1, 7):
                if table.in_text(addr + off):
                    assert table.resolve(addr + off) == _old_resolve(addr + off, entries, starts)
    kept.write_bytes(b"NTKSYM1\n garbage")
    assert symbols.Kallsyms().resolve(picks[0][0]) == _old_resolve(picks[0][0], entries, starts)


def test_a_table_from_a_file_with_modules_and_bpf_programs(tmp_path):
    table = tmp_path / "kallsyms"
    table.write_text("ffffffff81000000 T _stext\n"
                     "ffffffff81000100 t helper\n"
                     "ffffffff81000200 T other\n"
                     "ffffffff82000000 T _etext\n"
                     "ffffffffc0001000 t bpf_prog_0123_probe\t[bpf]\n"
                     "ffffffffc0100000 t veth_xmit\t[veth]\n"
                     "ffffffffc0100400 t veth_poll\t[veth]\n")
    k = symbols.Kallsyms(str(table), modules=[("veth", 0x2000, 0xffffffffc0100000)])
    assert k.resolve(0xffffffff81000104) == "helper+0x4"
    assert k.resolve(0xffffffffc0100410) == "veth_poll [veth]+0x10"
    assert k.in_text(0xffffffffc0100410) and not k.in_text(0xffffffffc0001010)
    # a BPF program: named from the table of programs, not as the module below it
    assert k.resolve(0xffffffffc0001010) == "bpf_prog_0123_probe [bpf]+0x10"
    assert k.resolve(0xffffffffc0102100).startswith("bpf_prog_0123_probe [bpf]+"), "past the module: not veth"


def test_a_stacks_leading_bpf_frames_are_dropped_unread(monkeypatch):
    """The probe's own program heads every stack: dropped by its address,
    without reading the (changing) table of BPF programs."""
    k = symbols.kallsyms()
    start, _end = symbols.function_ranges(("call_timer_fn",))["call_timer_fn"]
    monkeypatch.setattr(symbols, "_parse_table", lambda *a, **kw: (_ for _ in ()).throw(AssertionError("read")))
    outside = k._core[1] + 0x100000 if k._core[1] else None
    if outside is None or k.in_text(outside):
        pytest.skip("no address known to be outside the kernel's and the modules' text on this kernel")
    symbols._cache.clear()
    assert symbols.symbolize([outside, outside + 8, start + 2]) == ["call_timer_fn+0x2"]


def test_a_module_loaded_after_the_table_was_read_is_found(tmp_path, monkeypatch):
    """A test's `nft` loads nf_tables after the table was read: an address
    in no known text has /proc/modules read again, and the table with it."""
    monkeypatch.setattr(symbols, "RUN_DIR", str(tmp_path))
    tmp_path.chmod(0o755)
    k = symbols.Kallsyms()
    if not k.usable or not k._core[1]:
        pytest.skip("kernel addresses hidden, or no _etext in /proc/kallsyms")
    base = k._core[1] + (1 << 30)   # where no text is now
    assert not k.in_text(base + 4)
    parsed = []
    real_parse = symbols._parse_table
    monkeypatch.setattr(symbols, "_parse_table", lambda *a, **kw: parsed.append(a) or real_parse(*a, **kw))
    monkeypatch.setattr(symbols, "_modules", lambda: [*k._module_list, ("nf_fake", 0x1000, base)])
    k.resolve(base + 4)
    assert k.in_text(base + 4) and len(parsed) == 1, "read again, once, for the new module list"
    assert len(list(tmp_path.glob("ksymtab-*.bin"))) == 1
    k.resolve(base + 8)
    assert len(parsed) == 1, "nothing changed since: not read again"


def test_a_table_of_hidden_addresses_is_not_kept(tmp_path, monkeypatch):
    """kptr_restrict shows zeros: nothing to name with, and nothing kept for
    the rest of the boot (it may be lifted)."""
    monkeypatch.setattr(symbols, "RUN_DIR", str(tmp_path))
    tmp_path.chmod(0o755)
    real_parse = symbols._parse_table
    monkeypatch.setattr(symbols, "_parse_table", lambda path, part: real_parse("/dev/null", part))
    k = symbols.Kallsyms()
    assert not k.usable and k.resolve(0xffffffff81000000) == "0xffffffff81000000"
    assert not list(tmp_path.glob("ksymtab-*.bin"))

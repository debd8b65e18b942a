"""The shipped BPF objects: built from the current sources, reproducible, and
relocatable on the kernels and architectures we support — checked offline,
without root or a kernel (bpf/Makefile, bpf/vmlinux/README.md)."""
import hashlib
import lzma
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from pytest_nettrace.kernel import capabilities

REPO = Path(__file__).resolve().parent.parent
BPF = REPO / "bpf"
OBJECTS = REPO / "pytest_nettrace" / "bpf"
BTF_DIR = REPO / "tests" / "data" / "btf"
ARCHES = sorted(set(capabilities.OBJECT_ARCHES.values()))


def _recorded():
    lines = (OBJECTS / "SOURCES").read_text().splitlines()
    clang = lines[0].removeprefix("# clang: ")
    digests = dict(reversed(line.split(None, 1)) for line in lines[1:])
    return clang, {name.strip(): d for name, d in digests.items()}


def _sources():
    names = [p.name for p in BPF.glob("*.bpf.c")] + [p.name for p in BPF.glob("*.h")]
    names += [f"vmlinux/{a}/vmlinux.h" for a in ARCHES] + ["Makefile"]
    return sorted(names)


def test_objects_are_built_from_the_current_sources():
    _, recorded = _recorded()
    assert sorted(recorded) == _sources(), "bpf/ sources were added or removed since the objects were built: " \
        "run make -C bpf"
    stale = [n for n, d in recorded.items() if hashlib.sha256((BPF / n).read_bytes()).hexdigest() != d]
    assert not stale, f"pytest_nettrace/bpf objects are stale ({', '.join(stale)} changed): run make -C bpf"
    for arch in ARCHES:
        for obj in ("nettrace.bpf.o", "caps.bpf.o"):
            assert (OBJECTS / arch / obj).is_file(), f"missing {arch}/{obj}: run make -C bpf"


def test_rebuild_gives_the_same_bytes(tmp_path):
    clang, _ = _recorded()
    if not shutil.which("clang") or not shutil.which("bpftool"):
        pytest.skip("clang or bpftool not installed (ci/setup.sh installs them)")
    here = subprocess.run(["clang", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    if here != clang:
        pytest.skip(f"the objects were built by {clang!r}, this machine has {here!r}: bytes may differ")
    shutil.copytree(BPF, tmp_path / "bpf", ignore=shutil.ignore_patterns("update.py", "*.md"))
    (tmp_path / "pytest_nettrace").mkdir()
    # a host BTF argument must not change anything
    subprocess.run(["make", "-s", "-C", str(tmp_path / "bpf"), "VMLINUX_BTF=/sys/kernel/btf/vmlinux"],
                   check=True, capture_output=True)
    for arch in ARCHES:
        for obj in ("nettrace.bpf.o", "caps.bpf.o"):
            built = (tmp_path / "pytest_nettrace/bpf" / arch / obj).read_bytes()
            assert built == (OBJECTS / arch / obj).read_bytes(), f"{arch}/{obj} does not rebuild identically"


def _failed_relocations(log: str):
    """{program: [spec, ...]} of CO-RE relocations that found no target, except
    existence checks and values guarded by one (bpf_core_*_exists)."""
    spec_of, failed, exists = {}, defaultdict(list), defaultdict(set)
    for line in log.splitlines():
        m = re.match(r"libbpf: prog '([^']+)': relo #(\d+): <(\w+)> \[\d+\] (.*)", line)
        if m:
            prog, num, kind, spec = m.groups()
            spec_of[prog, num] = (kind, re.sub(r" = -?\d+$| \(.*\)$", "", spec))
            continue
        m = re.match(r"libbpf: prog '([^']+)': relo #(\d+): no matching targets found", line)
        if m:
            kind, spec = spec_of[m.groups()]
            if kind.endswith("_exists"):
                exists[m.group(1)].add(spec)
            else:
                failed[m.group(1)].append(spec)
    return {prog: [s for s in specs if s not in exists[prog]] for prog, specs in failed.items()
            if any(s not in exists[prog] for s in specs)}


@pytest.mark.parametrize("btf", sorted(p.name[:-len(".btf.xz")] for p in BTF_DIR.glob("*.btf.xz")))
@pytest.mark.parametrize("obj", ["nettrace.bpf.o", "caps.bpf.o"])
def test_every_program_relocates_on_a_stock_kernel(btf, obj, tmp_path):
    """bpftool gen min_core_btf runs libbpf's CO-RE relocation of every program
    without loading it: a relocation that finds no target would make the
    program fail to load on that kernel (Debian's amd64 and arm64 kernels)."""
    if not shutil.which("bpftool"):
        pytest.skip("bpftool not installed (ci/setup.sh installs it)")
    arch = btf.split("-")[0]
    raw = tmp_path / "kernel.btf"
    raw.write_bytes(lzma.decompress((BTF_DIR / f"{btf}.btf.xz").read_bytes()))
    r = subprocess.run(["bpftool", "-d", "gen", "min_core_btf", str(raw), str(tmp_path / "min.btf"),
                        str(OBJECTS / arch / obj)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _failed_relocations(r.stderr) == {}


def test_the_relocation_check_catches_a_wrong_architecture(tmp_path):
    if not shutil.which("bpftool"):
        pytest.skip("bpftool not installed (ci/setup.sh installs it)")
    raw = tmp_path / "kernel.btf"
    raw.write_bytes(lzma.decompress((BTF_DIR / "arm64-6.12.btf.xz").read_bytes()))
    r = subprocess.run(["bpftool", "-d", "gen", "min_core_btf", str(raw), str(tmp_path / "min.btf"),
                        str(OBJECTS / "x86/nettrace.bpf.o")], capture_output=True, text=True)
    assert "tp_btf/sys_exit" in _failed_relocations(r.stderr)  # x86's pt_regs.orig_ax


def test_an_unsupported_architecture_is_one_line(monkeypatch):
    monkeypatch.setattr(capabilities.platform, "machine", lambda: "riscv64")
    assert capabilities.unsupported_architecture() == (
        "no BPF objects for architecture 'riscv64': pytest-nettrace is built for x86_64, aarch64")
    k = capabilities.detect()
    with pytest.raises(capabilities.UnsupportedKernel, match="^(not root|no BPF objects for architecture 'riscv64')"):
        k.require()

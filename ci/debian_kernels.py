"""Debian's stock kernels, fetched through apt without touching the host's apt setup.

Used by ci/vm-test (kernels to boot) and bpf/vmlinux/update.py (the BTF the
probes are built against and checked with). A private sources list names
bookworm and bookworm-backports for amd64 and arm64; its package lists live
in the cache, so the host's /etc/apt and /var/lib/apt stay as they were.
"""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import List, Optional

SUITES = ("bookworm", "bookworm-backports")
ARCHES = ("amd64", "arm64")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR = "http://deb.debian.org/debian"
# a package list older than this is fetched again
LISTS_MAX_AGE = 24 * 3600


def _apt_dir(cache: Path) -> Path:
    return cache / "apt"


def apt_options(cache: Path) -> List[str]:
    d = _apt_dir(cache)
    return ["-o", f"Dir::Etc::SourceList={d / 'sources.list'}", "-o", "Dir::Etc::SourceParts=-",
            "-o", f"Dir::State::Lists={d / 'lists'}", "-o", f"Dir::Cache={d / 'cache'}",
            "-o", "APT::Architectures::=arm64", "-o", "Debug::NoLocking=1",
            "-o", "APT::Sandbox::User=root"]


def update(cache: Path, force: bool = False) -> None:
    """Fetch the private package lists (once a day)."""
    d = _apt_dir(cache)
    for sub in ("lists/partial", "cache/archives/partial"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    arch = ",".join(ARCHES)
    (d / "sources.list").write_text("".join(
        f"deb [arch={arch} signed-by={KEYRING}] {MIRROR} {suite} main\n" for suite in SUITES))
    stamp = d / "updated"
    if force or not stamp.exists() or time.time() - stamp.stat().st_mtime > LISTS_MAX_AGE:
        subprocess.run(["apt-get", *apt_options(cache), "update", "-q"], check=True,
                       stdout=subprocess.DEVNULL)
        stamp.touch()


def latest(cache: Path, series: str, arch: str = "amd64") -> Optional[str]:
    """The newest `linux-image-<series>.*-<arch>-unsigned` package (generic flavour)."""
    out = subprocess.run(["apt-cache", *apt_options(cache), "pkgnames", f"linux-image-{series}"],
                         capture_output=True, text=True).stdout.split()
    pat = re.compile(rf"linux-image-({re.escape(series)}(?:\.\d+)?(?:-\d+)?(?:\+deb\d+)?)-{arch}-unsigned$")
    found = [(m.group(1), name) for name in out for m in [pat.match(name)] if m]

    def key(item):
        return [int(x) for x in re.findall(r"\d+", item[0])]
    return max(found, key=key)[1] if found else None


def download(cache: Path, package: str, arch: str, dest: Path) -> Path:
    """apt-get download `package` for `arch` into `dest`; returns the .deb."""
    dest.mkdir(parents=True, exist_ok=True)
    name = package if arch == "amd64" else f"{package}:{arch}"
    subprocess.run(["apt-get", *apt_options(cache), "download", "-q", name], cwd=dest, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return next(dest.glob(f"{package}_*.deb"))


def unpack(deb: Path, root: Path) -> Path:
    """Unpack a kernel package; returns its /boot/vmlinuz-*."""
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return next((root / "boot").glob("vmlinuz-*"))


def decompress_kernel(vmlinuz: Path) -> bytes:
    """The uncompressed kernel inside a Debian vmlinuz: the ELF vmlinux of an
    x86 bzImage (xz on 6.1, zstd on 6.12), an arm64 Image as it is."""
    data = vmlinuz.read_bytes()
    xz = data.find(b"\xfd7zXZ\x00")
    if xz >= 0:
        import lzma
        try:
            out = lzma.LZMADecompressor().decompress(data[xz:])
            if out.startswith(b"\x7fELF"):
                return out
        except lzma.LZMAError:
            pass
    zst = data.find(b"\x28\xb5\x2f\xfd")
    if zst >= 0 and shutil.which("zstd"):
        # zstd complains about the bzImage's trailer after the frame; the frame is whole
        out = subprocess.run(["zstd", "-d", "-q", "-c"], input=data[zst:], capture_output=True).stdout
        if out.startswith(b"\x7fELF"):
            return out
    return data


def carve_btf(kernel: bytes) -> bytes:
    """The kernel's own BTF (what /sys/kernel/btf/vmlinux shows on that kernel):
    the one large BTF blob in the image, ELF or raw."""
    i = 0
    while True:
        i = kernel.find(b"\x9f\xeb\x01\x00\x18\x00\x00\x00", i)  # magic, version 1, flags, hdr_len 24
        if i < 0:
            raise ValueError("no BTF in this kernel image (CONFIG_DEBUG_INFO_BTF off?)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", kernel, i + 8)
        if type_off == 0 and str_off == type_len and type_len > 1_000_000:
            return kernel[i:i + 24 + str_off + str_len]
        i += 1

#!/usr/bin/env python3
"""Regenerate the vendored kernel headers and the test kernels' BTF.

    sudo bpf/vmlinux/update.py [--series 6.12] [--test-series 6.1 6.12]

Writes, from Debian's stock kernel packages (fetched with a private apt
setup, see ci/debian_kernels.py; the host's apt configuration is not touched):
  bpf/vmlinux/<arch>/vmlinux.h   what the probes compile against (x86, arm64),
                                 from the newest `--series` kernel
  tests/data/btf/<arch>-<series>.btf.xz
                                 the BTF of each `--test-series` kernel, which
                                 tests/test_build.py relocates every program
                                 against, offline (bpftool gen min_core_btf)
  bpf/vmlinux/SOURCES            which package each file came from
Then run `make -C bpf` and commit the headers, the BTF files and the objects.
A new header changes nothing at run time by itself (CO-RE relocates to the
running kernel); it is needed when a probe uses a type, field or enum value
newer than the current header.
"""
import argparse
import hashlib
import lzma
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "ci"))
import debian_kernels as dk  # noqa: E402

ARCH_DIR = {"amd64": "x86", "arm64": "arm64"}


def kernel_btf(cache, tmp, series, arch):
    pkg = dk.latest(cache, series, arch)
    if not pkg:
        sys.exit(f"update.py: no linux-image-{series}.*-{arch}-unsigned package known to apt")
    print(f"  {arch} {series}: {pkg}", flush=True)
    deb = dk.download(cache, pkg, arch, tmp / pkg)
    vmlinuz = dk.unpack(deb, tmp / pkg / "root")
    btf = dk.carve_btf(dk.decompress_kernel(vmlinuz))
    return pkg, btf


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--series", default="6.12", help="kernel series the headers come from")
    p.add_argument("--test-series", nargs="*", default=["6.1", "6.12"])
    p.add_argument("--cache-dir", type=Path, default=Path("/var/cache/pytest-nettrace"))
    args = p.parse_args()
    dk.update(args.cache_dir)
    lines = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for series in dict.fromkeys([args.series, *args.test_series]):
            for arch in dk.ARCHES:
                pkg, btf = kernel_btf(args.cache_dir, tmp, series, arch)
                digest = hashlib.sha256(btf).hexdigest()[:16]
                if series == args.series:
                    raw = tmp / f"{arch}.btf"
                    raw.write_bytes(btf)
                    header = HERE / ARCH_DIR[arch] / "vmlinux.h"
                    header.parent.mkdir(exist_ok=True)
                    with open(header, "w") as f:
                        subprocess.run(["bpftool", "btf", "dump", "file", str(raw), "format", "c"],
                                       stdout=f, check=True)
                    lines.append(f"{header.relative_to(REPO)} {pkg} btf-sha256:{digest}")
                if series in args.test_series:
                    out = REPO / "tests/data/btf" / f"{ARCH_DIR[arch]}-{series}.btf.xz"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(lzma.compress(btf, preset=9))
                    lines.append(f"{out.relative_to(REPO)} {pkg} btf-sha256:{digest}")
    (HERE / "SOURCES").write_text("# written by bpf/vmlinux/update.py\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

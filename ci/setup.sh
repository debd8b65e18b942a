#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine for pytest-nettrace: the apt packages
# in ci/apt-packages.txt (only the missing ones), a virtualenv in .venv with the
# package installed editable, and the BPF objects built from the current sources.
# Idempotent; run as root (probes and namespaces need it anyway).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "ci/setup.sh: run as root (sudo): installing packages, BPF and network namespaces need it" >&2
    exit 1
fi

# --- apt: install only what is missing (a second run costs nothing) --------
mapfile -t wanted < <(grep -v '^\s*#' ci/apt-packages.txt | grep -v '^\s*$')
missing=()
for pkg in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# python3-venv is only needed when this python3 cannot make a venv with pip
if printf '%s\n' "${missing[@]}" | grep -qx python3-venv && python3 -m venv --help >/dev/null 2>&1 \
        && python3 -c 'import ensurepip' 2>/dev/null; then
    missing=("${missing[@]/python3-venv}")
fi
missing=($(printf '%s\n' "${missing[@]}" | grep -v '^$' || true))
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Ubuntu ships bpftool in linux-tools; fall back to it when there is no bpftool package
    if printf '%s\n' "${missing[@]}" | grep -qx bpftool && ! apt-cache show bpftool >/dev/null 2>&1; then
        missing=("${missing[@]/bpftool/linux-tools-common}" "linux-tools-$(uname -r)")
    fi
    # Daemons the examples start inside namespaces (keepalived, NetworkManager)
    # must not start on the host: block service starts while installing, and
    # keep the ones installed now from starting at boot. Packages that were
    # already installed are left exactly as they were.
    # The blocker goes whatever happens (error, Ctrl-C, SIGTERM): left behind,
    # it would block every service start on the host.
    blocker=""
    trap '[ -n "$blocker" ] && rm -f "$blocker"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        blocker=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' > "$blocker" && chmod +x "$blocker"
    fi
    rc=0
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
    [ -n "$blocker" ] && rm -f "$blocker"
    blocker=""
    [ $rc -eq 0 ] || exit $rc
    if [ -d /run/systemd/system ]; then
        for unit in keepalived.service NetworkManager.service; do
            pkg=$(case $unit in keepalived*) echo keepalived;; *) echo network-manager;; esac)
            if printf '%s\n' "${missing[@]}" | grep -qx "$pkg"; then
                systemctl disable --now "$unit" >/dev/null 2>&1 || true
            fi
        done
    fi
fi

# --- Python: .venv with the package and the test tools ----------------------
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# compat: the checkout on sys.path (a path line in a .pth), not setuptools'
# import hook, whose imports (pathlib, urllib, re) cost every Python started
# in the venv ~12 ms (`python -c pass` 23 -> 11 ms): the tests start hundreds
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" --config-settings editable_mode=compat

# --- BPF objects: rebuilt only when the sources changed -----------------------
# pytest_nettrace/bpf/SOURCES holds the digests of what the shipped objects were
# built from (tests/test_build.py checks them too); the build uses the vendored
# bpf/vmlinux/<arch>/vmlinux.h, so the host's kernel never changes the objects.
listed=$(tail -n +2 pytest_nettrace/bpf/SOURCES 2>/dev/null | awk '{print $2}' | sort)
present=$(cd bpf && ls *.bpf.c *.h vmlinux/*/vmlinux.h Makefile | sort)
if [ "$listed" != "$present" ] || ! (cd bpf && tail -n +2 ../pytest_nettrace/bpf/SOURCES | sha256sum --quiet -c - >/dev/null 2>&1); then
    echo "setup: bpf/ sources changed: rebuilding the probes"
    make -s -B -C bpf
fi
echo "setup: ok ($(.venv/bin/python --version), $(clang --version | head -1))"

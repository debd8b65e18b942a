"""Fixtures shared by the examples.

A missing daemon is a setup ERROR, not a skip: a test of your daemon that
silently skips when the daemon is not installed is a test that never runs.
(The plugin's own daemon fixtures — `networkmanager`, `systemd_networkd`,
`dbus_system_bus` — do the same here: pytest.ini says nettrace_unavailable = error.)
"""
from __future__ import annotations

import shutil

import pytest

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def require(program: str, package: str) -> str:
    """Full path of `program`; fails the test's setup when it is not installed."""
    path = shutil.which(program, path=_PATH)
    if path is None:
        pytest.fail(f"{program} not found: install package {package} (ci/setup.sh does)", pytrace=False)
    return path


@pytest.fixture
def dnsmasq() -> str:
    return require("dnsmasq", "dnsmasq-base")


@pytest.fixture
def busybox() -> str:
    return require("busybox", "busybox")


@pytest.fixture
def keepalived() -> str:
    return require("keepalived", "keepalived")


@pytest.fixture
def socat() -> str:
    return require("socat", "socat")


@pytest.fixture
def curl() -> str:
    return require("curl", "curl")


@pytest.fixture
def nft() -> str:
    return require("nft", "nftables")


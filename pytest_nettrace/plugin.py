"""pytest plugin entry point (`pytest11: nettrace`)."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import pytest

from .netns import Namespace, NamespaceFactory, cleanup_stale, dummy_supported


def pytest_sessionstart(session: pytest.Session) -> None:
    # Namespaces of runs that died (SIGKILLed worker, crash) are removed here.
    if os.geteuid() == 0:
        cleanup_stale()


def pytest_report_header(config: pytest.Config) -> str:
    if os.geteuid() != 0:
        return "nettrace: not root, network namespaces unavailable"
    try:
        real = dummy_supported()
    except OSError as exc:
        return f"nettrace: cannot probe the dummy driver ({exc})"
    if real:
        return "nettrace: dummy driver available"
    return "nettrace: no dummy driver, add_dummy() uses a veth stand-in (kind 'veth-standin')"


@pytest.fixture
def netns_factory() -> Iterator[NamespaceFactory]:
    """The factory behind `netns` and `make_netns`; removes all its namespaces after the test."""
    factory = NamespaceFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def netns(netns_factory: NamespaceFactory) -> Namespace:
    """A fresh network namespace, loopback up, removed after the test."""
    return netns_factory.create()


@pytest.fixture
def make_netns(netns_factory: NamespaceFactory) -> Callable[[], Namespace]:
    """`make_netns()` returns another fresh namespace; all are removed after the test."""
    return netns_factory.create

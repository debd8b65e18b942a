"""Loading the probes imports only what loading them needs: pyroute2 (~100 ms
of imports, all of it pulled in by any of its submodules) is imported where
netlink messages are built or decoded, never on the way to attached probes
(issue 14: exec to attached). Root-free: it only imports."""
from __future__ import annotations

from interpreter import run_python

ENGINE_PATH = ("import sys; "
               "from pytest_nettrace.kernel.engine import Engine; "
               "from pytest_nettrace.probes.registry import all_probes; "
               "import pytest_nettrace.netns; "
               "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] == 'pyroute2')))")


def test_loading_the_probes_does_not_import_pyroute2():
    out = run_python(ENGINE_PATH)
    assert out.split() == [], f"imported on the way to attached probes: {out.strip()[:300]}"


def test_the_namespace_api_still_comes_from_the_netns_package():
    from pytest_nettrace import netns
    from pytest_nettrace.netns import namespace
    assert netns.NamespaceFactory is namespace.NamespaceFactory
    assert all(getattr(netns, name) is getattr(namespace, name) for name in netns.__all__)

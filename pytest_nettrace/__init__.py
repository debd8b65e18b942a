"""pytest-nettrace: test what the Linux kernel's network stack did."""
from typing import TYPE_CHECKING, Any

from .errors import (EventsLost, LeftAlone, NamespaceError, NetlinkOperationError,
                     NettraceError, NothingWatched, ProbeLoadError, UnsupportedKernel)
from .sequence import forbid, ref, step

if TYPE_CHECKING:
    from .netns import Namespace, NamespaceFactory
    from .trace import KindName, Trace

__version__ = "0.1.0"
__all__ = ["EventsLost", "KindName", "LeftAlone", "Namespace", "NamespaceFactory", "NamespaceError",
           "NetlinkOperationError", "NettraceError", "NothingWatched", "ProbeLoadError", "Trace", "UnsupportedKernel",
           "forbid", "ref", "step"]

# The fixtures' types, for annotations (`def test_x(netns: Namespace, nettrace: Trace)`);
# imported on first use so that `import pytest_nettrace` stays light.
_LAZY = {"Namespace": "netns", "NamespaceFactory": "netns", "Trace": "trace", "KindName": "trace"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pytest_nettrace' has no attribute {name!r}")

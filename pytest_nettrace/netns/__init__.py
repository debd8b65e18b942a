"""The namespaces room: network namespaces, their links and addresses, the
processes run in them, ownership records and the daemons' helpers. It
imports nothing from the other rooms."""
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .namespace import (KIND_DUMMY, CommandFailed, Link, Namespace, NamespaceFactory, RunResult, cleanup_stale,
                            dummy_supported, parse_address, remove_stale)

__all__ = ["KIND_DUMMY", "CommandFailed", "Link", "Namespace", "NamespaceFactory", "RunResult", "cleanup_stale",
           "dummy_supported", "parse_address", "remove_stale"]


def __getattr__(name: str) -> Any:
    # namespace.py is imported on first use: it pulls in pyroute2 (~100 ms),
    # which the probes' own modules (importing netns.linux) do not need
    if name in __all__:
        from . import namespace
        return getattr(namespace, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

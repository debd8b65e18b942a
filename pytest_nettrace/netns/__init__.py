"""The namespaces room: network namespaces, their links and addresses, the
processes run in them, ownership records and the daemons' helpers. It
imports nothing from the other rooms."""
from .namespace import (KIND_DUMMY, CommandFailed, Link, Namespace, NamespaceFactory, RunResult, cleanup_stale,
                        dummy_supported, parse_address, remove_stale)

__all__ = ["KIND_DUMMY", "CommandFailed", "Link", "Namespace", "NamespaceFactory", "RunResult", "cleanup_stale",
           "dummy_supported", "parse_address", "remove_stale"]

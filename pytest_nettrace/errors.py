"""Exceptions the plugin raises. Each message names the problem in one line."""


class NettraceError(Exception):
    """Base of every error pytest-nettrace raises on purpose."""


class NetlinkOperationError(NettraceError):
    """A netlink request failed; the message names namespace, link and the kernel's reason."""


class NamespaceError(NettraceError):
    """A namespace could not be created, entered or removed."""


class UnsupportedKernel(NettraceError):
    """The running kernel lacks a feature a probe or fixture needs."""


class ProbeLoadError(NettraceError):
    """A BPF object failed to open, load or attach."""


class EventsLost(AssertionError):
    """A negative assertion cannot be trusted because the kernel dropped events."""

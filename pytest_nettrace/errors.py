"""Exceptions the plugin raises. Each message names the problem in one line."""


class NettraceError(Exception):
    """Base of every error pytest-nettrace raises on purpose."""


class NetlinkOperationError(NettraceError):
    """A netlink request failed; the message names namespace, link and the kernel's reason."""


class NamespaceError(NettraceError):
    """A namespace could not be created, entered or removed (`unprivileged`:
    because this process lacks the privilege, e.g. is not root)."""

    unprivileged = False


class UnsupportedKernel(NettraceError):
    """The running kernel lacks a feature a probe or fixture needs."""


class ProbeLoadError(NettraceError):
    """A BPF object failed to open, load or attach."""


class EventsLost(AssertionError):
    """A negative assertion cannot be trusted because the kernel dropped events."""


class NothingWatched(AssertionError):
    """A negative assertion in a test that watches no network namespace: it
    would pass whatever happened (in the host's namespace, say)."""


class LeftAlone(UserWarning):
    """Teardown or stale cleanup left something alone because it cannot prove
    the plugin made it (a process that joined a test namespace from outside,
    an fd or mount keeping one alive, an entry that changed); or could not
    remove something. One line naming it."""

"""pytest-nettrace: test what the Linux kernel's network stack did."""
from .errors import (EventsLost, LeftAlone, NamespaceError, NetlinkOperationError,
                     NettraceError, ProbeLoadError, UnsupportedKernel)
from .sequence import forbid, ref, step

__version__ = "0.1.0"
__all__ = ["EventsLost", "LeftAlone", "NamespaceError", "NetlinkOperationError", "NettraceError",
           "ProbeLoadError", "UnsupportedKernel", "forbid", "ref", "step"]

"""Network sysctl writes with the process that made them (bpf/sysctl.bpf.c,
bpf/sysctl.h): kind "sysctl".

A BPF_PROG_TYPE_CGROUP_SYSCTL program on the cgroup v2 root runs before every
sysctl write of every process below it, in the writer's context, and sees the
setting's name, its current value and the value written: `sysctl -w`, a shell's
`echo 1 > /proc/sys/net/...`, a daemon's own writes. Only writes under
/proc/sys/net by a task whose network namespace is watched are recorded (the
writer's namespace at the time of the write; the setting is that of the
namespace it opened the file in, which differs only for a task that moved in
between). It needs a cgroup v2 hierarchy
(the unified one, or the hybrid layout's /sys/fs/cgroup/unified); a cgroup v1
only host has none, and the pytest header says so.
"""
from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Set, Tuple, cast

from ..events import Event, Header, command_line, quoted_command, user_name
from ..kernel import wire
from .base import Decoder, Plan, Probe
from .context import CommonFilters, Filter, KindApi

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..kernel.capabilities import KernelFeatures

RECORD, RESULT = wire.SYSCTL_EVENT, wire.SYSCTL_RESULT
_BODY, _RESULT_BODY = RECORD.body, RESULT.body
E2BIG = 7
# what a write syscall returns when the kernel restarts it (ERESTARTSYS,
# ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK): it runs again
_RESTARTS = (-512, -513, -514, -516)



def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> Optional[str]:
    """Where this process sees the cgroup v2 hierarchy, if mounted."""
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[sep + 1] == "cgroup2":
                    return fields[4].replace("\\040", " ")
    except (OSError, ValueError, IndexError):
        return None
    return None


def _value(raw: bytes, length: int) -> Optional[str]:
    """The value as written or read (without the trailing newline); None when
    the kernel could not give it; a truncated one ends with '...'."""
    if length < 0 and length != -E2BIG:
        return None
    text = raw.split(b"\0", 1)[0].decode(errors="replace")
    text = text.rstrip("\n")
    return text + "..." if length == -E2BIG else text


def _as_kernel_reads(text: str) -> Optional[List[int]]:
    """The numbers a numeric setting reads from `text` (proc_dointvec:
    strtoul with base 0, so "01" is 1 in octal and "0x1" is 1), or None
    when it is not numbers."""
    out = []
    for word in text.split():
        sign = -1 if word.startswith("-") else 1
        digits = word.lstrip("+-")
        try:
            if digits[:2].lower() == "0x":
                value = int(digits[2:], 16)
            elif len(digits) > 1 and digits.startswith("0"):
                value = int(digits[1:], 8)
            else:
                value = int(digits, 10)
        except ValueError:
            return None
        out.append(sign * value)
    return out


class SysctlEvent(Event, init=False):
    """A network sysctl written: `name` as `sysctl` spells it
    ("net.ipv6.conf.eth0.disable_ipv6"), `old` (the value before the write)
    and `new` (what was written, whitespace as the writer gave it, without the
    trailing newline); `dev` is the interface of a per-interface setting
    (net.ipv4.conf.<dev>.*, net.ipv6.conf.<dev>.*, net.ipv4.neigh.<dev>.*,
    "all" and "default" included), else None. A write the kernel restarts
    (waiting for the RTNL lock) is one event; two writes are two events,
    even of the same value by the same thread. No stack: cgroup programs
    cannot take one.

    The hook runs before the kernel takes the value, which it may refuse
    (`echo abc > .../ip_forward`, a TTL of 300): the event is the attempt,
    corrected when the write returns. `ret` is what the write syscall
    returned, as strace shows it (bytes written, or -errno), and `error` its
    errno's name ("EINVAL"), None when it succeeded; both None while the
    write has not returned, or where results are not seen (no sys_exit
    program: the pytest header says so). `changed` is False for a refused
    write, compares numbers as the kernel reads them ("01" and "0x1" are 1,
    "1 2" written to a one-number setting is 1, "4096" written to the
    three-number tcp_wmem sets only the first; of "1 abc" the kernel takes "1 ",
    as the write's result says) and is None for a value cut
    at 64 bytes (its end unknown). `offset` is where in the file the value
    was written: past the start (a second write() on one open file, a pwrite), most numeric
    settings ignore it under the default kernel.sysctl_writes_strict=1
    though the call succeeds, and some take it; `changed` is then None
    (unknown)."""

    kind = "sysctl"
    name: str
    old: Optional[str]
    new: Optional[str]
    dev: Optional[str]
    cmdline: Optional[str]
    user: Optional[str]
    ret: Optional[int]
    error: Optional[str]
    offset: int
    DERIVED = ("changed",)
    VALUES = {**Event.VALUES, "error": tuple(sorted(errno.errorcode.values()))}

    @property
    def changed(self) -> Optional[bool]:
        """Whether the write set a value different from the one before
        (False when the kernel refused it; None if unknown: a value it could
        not give, a write past the start of the file)."""
        if self.ret is not None and self.ret < 0:
            return False
        if self.old is None or self.new is None or self.offset or self.old.endswith("...") \
                or self.new.endswith("..."):
            return None   # a truncated value: its end is not known
        written = self.new
        if self.ret is not None and self.ret < len(written.encode()):
            # the kernel took only the first `ret` bytes ("1 abc": the number,
            # and write() returned 2): what it left is no part of the value
            written = written.encode()[:self.ret].decode(errors="ignore")
        old, new = _as_kernel_reads(self.old), _as_kernel_reads(written)
        if old is None or new is None:
            return bool(self.old.split() != written.split())
        # a setting takes as many numbers as it has and ignores the rest
        # ("1 2" to rp_filter is 1), and of a vector it sets only as many as
        # were written, keeping the others ("4096" to tcp_wmem changes its
        # first number only): compared as far as both go
        n = min(len(old), len(new))
        return old[:n] != new[:n]

    def describe(self) -> str:
        old = f" (was {self.old})" if self.old is not None else ""
        if self.ret is not None and self.ret < 0:
            return f"failed to write {self.name}={self.new}: {self.error or self.ret}{old}"
        at = f" at offset {self.offset}" if self.offset else ""
        return f"wrote {self.name}={self.new}{at}{old}"

    def how(self, full: bool = False) -> str:
        return f": {quoted_command(self.cmdline)}" if full and self.cmdline else ""


def dev_of(parts: List[str]) -> Optional[str]:
    """The interface of a per-interface setting's path components."""
    if len(parts) == 5 and parts[0] == "net" and parts[1] in ("ipv4", "ipv6") and parts[2] in ("conf", "neigh"):
        return parts[3]
    return None


class SysctlProbe(Probe):
    name = "sysctl"
    kind_id = wire.Kind.SYSCTL
    event_types = {"sysctl": SysctlEvent}

    def plans(self, kernel: "KernelFeatures") -> List[Plan]:
        root = cgroup2_mount()
        if root is None or "BPF_CGROUP_SYSCTL" not in kernel.enum("bpf_attach_type").values():
            return []
        cgroups = {"sysctl_write": root}
        plans = []
        if kernel.tp_btf:
            # how each write returned, from the syscall probe's sys_exit
            # program (one program on that tracepoint, shared with conn)
            cfg = {"sy_cfg": struct.pack("<I", 1)}
            plans.append(Plan("cgroup_sysctl+sys_exit", ["sysctl_write", "sc_exit"], config=cfg, cgroups=cgroups))
        plans.append(Plan("cgroup_sysctl (results unknown)", ["sysctl_write"], cgroups=cgroups,
                          notes=[f"no sys_exit program ({kernel.why('tp_btf')}): whether the kernel took a "
                                 "value written is unknown"]))
        return plans

    def unavailable_reason(self, kernel: "KernelFeatures") -> str:
        if "BPF_CGROUP_SYSCTL" not in kernel.enum("bpf_attach_type").values():
            return "no cgroup sysctl hook (BPF_CGROUP_SYSCTL, kernel < 5.2)"
        return ("no cgroup v2 hierarchy mounted here (the sysctl hook attaches to one): a cgroup-v1-only host, "
                "or a container that mounts none at /sys/fs/cgroup")

    def __init__(self) -> None:
        self.decoder = SysctlDecoder()

    def unwatch(self, netns: int) -> None:
        self.decoder.forget(netns)


class SysctlDecoder(Decoder):
    """struct sysctl_event records to SysctlEvents, corrected with how their
    write returned (struct sysctl_result, after it); a write the kernel
    restarts is one event."""

    records = (RECORD, RESULT)

    def __init__(self) -> None:
        self._last: Dict[int, Dict[int, _Write]] = {}  # netns -> thread -> its last write seen
        # the event of each thread's write whose result has not come yet
        self._open: Dict[Tuple[int, int], SysctlEvent] = {}
        # threads whose write syscall the kernel restarted (its result said so)
        self._restarted: Set[Tuple[int, int]] = set()

    def forget(self, netns: int) -> None:
        self._last.pop(netns, None)
        for key in [k for k in self._open if k[0] == netns]:
            del self._open[key]
        self._restarted = {k for k in self._restarted if k[0] != netns}

    def layout(self, hdr: Header) -> wire.Record:
        return RESULT if hdr.flags & wire.SY_F_RESULT else RECORD

    def decode(self, buf: bytes, hdr: Header) -> List[Event]:
        if hdr.flags & wire.SY_F_RESULT:
            return self._result(buf, hdr)
        (name_len, old_len, new_len, cmd_len, pos, io_known, syscw, wchar,
         name, old, new, cmdline) = _BODY.unpack_from(buf, RECORD.body_offset)
        # "net/ipv4/conf/eth0.100/rp_filter" -> "net.ipv4.conf.eth0/100.rp_filter", as sysctl(8) spells it
        parts = name.split(b"\0", 1)[0].decode(errors="replace").split("/")
        setting = ".".join(p.replace(".", "/") for p in parts)
        write = _Write(setting, _value(old, old_len), _value(new, new_len), syscw if io_known else None, wchar)
        last = self._last.setdefault(hdr.netns, {})
        prev = last.get(hdr.tid)
        restart = write.restarts(prev)
        if (hdr.netns, hdr.tid) in self._restarted:
            # the kernel said the syscall runs again: whichever syscall it is
            # (splice and sendfile do not count as write syscalls)
            self._restarted.discard((hdr.netns, hdr.tid))
            restart = restart or (prev is not None and write.same_change(prev))
        last[hdr.tid] = write
        if restart:
            return []
        ev = SysctlEvent(hdr, (), "process", name=setting, old=write.old, new=write.new, dev=dev_of(parts),
                         cmdline=command_line(cmdline, cmd_len), user=user_name(hdr.uid),   # no stack: always in
                         offset=pos)                                                          # the writing process
        self._open[(hdr.netns, hdr.tid)] = ev
        return [ev]

    def _result(self, buf: bytes, hdr: Header) -> List[Event]:
        (ret,) = _RESULT_BODY.unpack_from(buf, RESULT.body_offset)
        if ret in _RESTARTS:
            # the write runs again (the hook too: one event, see _Write.restarts)
            self._restarted.add((hdr.netns, hdr.tid))
            return []
        # the write is over: the thread's next write is a new one, even of the
        # same value after a refusal (which, like a restart, wrote nothing)
        self._last.get(hdr.netns, {}).pop(hdr.tid, None)
        ev = self._open.pop((hdr.netns, hdr.tid), None)
        if ev is None:
            return []
        return [ev.corrected(ret=ret, error=errno.errorcode.get(-ret, str(-ret)) if ret < 0 else None)]


class _Write(NamedTuple):
    """What tells a write from its thread's previous one. Values as decoded:
    the record's buffers hold stale bytes past the string (the name comes
    from a per-CPU scratch buffer, which bpf_sysctl_get_name's strscpy does
    not clear), so raw bytes differ with the CPU the write ran on."""

    name: str
    old: Optional[str]
    new: Optional[str]
    syscw: Optional[int]   # the thread's write syscalls before this one (None: not counted by this kernel)
    wchar: int             # bytes the thread has written

    def same_change(self, other: "_Write") -> bool:
        return (self.name, self.old, self.new) == (other.name, other.old, other.new)

    def restarts(self, prev: "Optional[_Write]") -> bool:
        """Whether this is `prev` again, restarted by the kernel. Some
        handlers restart the write syscall instead of waiting for the RTNL
        lock (net.ipv4.ip_forward, conf.*.forwarding: rtnl_trylock,
        restart_syscall), and the hook runs again, before anything changed:
        the same setting, old and new value, as the thread's very next write
        syscall (vfs_write counts every attempt) with no byte written in
        between (it counts only writes that succeeded) — a second write of
        the same value comes after the first one wrote its bytes. Without
        the counters (CONFIG_TASK_XACCT off) the same values once more are
        taken as the restart."""
        if prev is None or not self.same_change(prev):
            return False
        if self.syscw is None or prev.syscw is None:
            return True
        return self.syscw == prev.syscw + 1 and self.wchar == prev.wchar


class SysctlFilters(CommonFilters, total=False):
    """Filters of 'sysctl' events: a keyword per field (nettrace.events('sysctl', ...) takes them too)."""

    name: Filter[str]
    old: Filter[str]
    new: Filter[str]
    dev: Filter[str]
    changed: Filter[bool]
    cmdline: Filter[str]
    user: Filter[str]
    ret: Filter[int]
    error: Filter[str]
    offset: Filter[int]


class SysctlApi(KindApi):
    """`nettrace` methods for sysctl writes (Trace exposes them)."""

    def sysctl_writes(self, **filters: Unpack[SysctlFilters]) -> List[SysctlEvent]:
        """Network sysctls written (kind "sysctl"), with who wrote them."""
        return cast(List[SysctlEvent], self.ctx.events("sysctl", **filters))


PROBE = SysctlProbe
API = SysctlApi

"""The event model shared by every probe: the common header, filtering, and
one-line rendering. Probe modules (pytest_nettrace/probes/) subclass Event."""
from __future__ import annotations

import datetime
import difflib
import functools
import ipaddress
import itertools
import pwd
import socket
import struct
import time
from typing import (TYPE_CHECKING, Any, Callable, ClassVar, Collection, Dict, FrozenSet, Iterable, List, Mapping,
                    Optional, Sequence, Tuple, Type, TypeVar, Union, cast)

from .kernel import symbols
from .kernel.symbols import frame_function, symbolize
from .kernel.wire import HEADER, NT_MAX_STACK, STACK_BYTES

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform
else:
    def dataclass_transform(**_: Any) -> Callable[[Any], Any]:
        return lambda cls: cls

# Frames that only appear when the probe fired while serving interrupts.
_SOFTIRQ_FRAMES = ("handle_softirqs", "__do_softirq", "net_rx_action", "run_ksoftirqd", "do_softirq")
_HARDIRQ_FRAMES = ("common_interrupt", "asm_common_interrupt", "__sysvec_apic_timer_interrupt")
_STACK = struct.Struct(f"<{NT_MAX_STACK}Q")

# `family` of every kind that has an IP family (nftables' kinds name the
# table's family instead: "ip", "ip6", "inet", …)
IP_FAMILIES = (4, 6)


def wall_clock(ts_ns: int) -> datetime.datetime:
    """CLOCK_MONOTONIC ns (as BPF stamps events) → local wall-clock time."""
    offset = time.time_ns() - time.monotonic_ns()
    return datetime.datetime.fromtimestamp((ts_ns + offset) / 1e9)


@functools.lru_cache(maxsize=1024)  # task names repeat
def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


class Stack:
    """A kernel stack as a record captured it, shared by every event with the
    same one (a flood repeats a handful): symbolised, and its context judged,
    once."""

    __slots__ = ("addrs", "_frames", "_functions", "_contexts")

    def __init__(self, addrs: Tuple[int, ...]) -> None:
        self.addrs = addrs
        self._frames: Optional[Tuple[str, ...]] = None
        self._functions: Optional[FrozenSet[str]] = None
        self._contexts: Dict[str, str] = {}

    @classmethod
    def resolved(cls, frames: Sequence[str]) -> "Stack":
        """A stack known by its frames only (read back from JSON, or made by a test)."""
        st = cls(())
        st._frames = tuple(frames)
        return st

    @property
    def frames(self) -> Tuple[str, ...]:
        """"func+0xoff" from the innermost, probe machinery dropped."""
        if self._frames is None:
            self._frames = tuple(symbolize(self.addrs))
        return self._frames

    @property
    def functions(self) -> FrozenSet[str]:
        """The bare function names of its frames (`frame_function`)."""
        if self._functions is None:
            self._functions = frozenset(frame_function(f) for f in self.frames)
        return self._functions

    def context(self, guess: str) -> str:
        """Where the probe fired (process / softirq / hardirq); `guess` when
        no stack was captured."""
        ctx = self._contexts.get(guess)
        if ctx is None:
            ctx = self._contexts[guess] = context_of(self.frames, guess) if self.addrs else guess
        return ctx


NO_STACK = Stack(())
# raw trailer bytes (or addresses) -> Stack, for the symbols generation they were resolved in
_stacks: Dict[Any, Stack] = {}
_stacks_generation = -1


def stack_of(key: Any, addrs: Optional[Tuple[int, ...]] = None) -> Stack:
    """The shared Stack of `addrs` (also its `key` in the cache: the raw
    trailer bytes, hashed cheaper than a tuple of ints)."""
    global _stacks_generation
    gen = symbols.generation()
    if gen != _stacks_generation or len(_stacks) > 4096:
        _stacks.clear()  # names may have changed (a module loaded): resolve again
        _stacks_generation = gen
    st = _stacks.get(key)
    if st is None:
        st = _stacks[key] = Stack(tuple(key) if addrs is None else addrs)
    return st


def context_of(frames: Sequence[str], guess: str = "process") -> str:
    """Where the probe fired, told from the symbolised kernel stack; `guess`
    when no stack was captured."""
    if not frames:
        return guess
    names = {frame_function(f) for f in frames}
    if names.intersection(_HARDIRQ_FRAMES):
        return "hardirq"
    if names.intersection(_SOFTIRQ_FRAMES):
        return "softirq"
    return "process"


class Header:
    """struct nt_hdr, decoded."""

    __slots__ = ("ts", "netns", "kind", "flags", "pid", "tid", "uid", "ppid", "comm", "pcomm", "stack_len")

    def __init__(self, buf: bytes) -> None:
        (self.ts, self.netns, self.kind, self.flags, self.pid, self.tid, self.uid, self.ppid,
         comm, pcomm, self.stack_len, _pad) = HEADER.unpack_from(buf, 0)
        self.comm = _cstr(comm)
        self.pcomm = _cstr(pcomm)

    def stack(self, buf: bytes) -> Stack:
        """The kernel stack from the event's trailer (the last STACK_BYTES):
        the one Stack of every event with the same addresses."""
        size = self.stack_len & ~7
        if not size:
            return NO_STACK
        if size > STACK_BYTES:
            size = STACK_BYTES
        start = len(buf) - STACK_BYTES
        raw = buf[start:start + size]   # hashed cheaper than the addresses it holds
        st = _stacks.get(raw)
        if st is not None and _stacks_generation == symbols.generation():
            return st
        return stack_of(raw, _STACK.unpack_from(buf, start)[:size // 8])


# -- field types: how a field is filtered, matched and written as JSON ---------

_ADDR_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)
_IFACE_TYPES = (ipaddress.IPv4Interface, ipaddress.IPv6Interface)
_NET_TYPES = (ipaddress.IPv4Network, ipaddress.IPv6Network)


class FieldType:
    """What a field holds, declared on its Event class (`TYPES`): how a
    filter's value is checked (`check`: a usage error names a value the field
    cannot take), how an event's value is compared with it (`matches`) and
    how it is written to and read from JSON. This plain type takes values as
    they are."""

    def check(self, owner: Any, field: str, value: Any) -> Any:
        """`value` as a filter compares it; ValueError when `field` of `owner`
        (an Event class) cannot hold it."""
        return value

    def matches(self, actual: Any, wanted: Any) -> bool:
        return bool(actual == wanted)

    def to_json(self, value: Any) -> Any:
        return value

    def from_json(self, value: Any) -> Any:
        return value


class Choice(FieldType):
    """One of a known set: the class's VALUES for the field (`action`: its ACTIONS)."""

    def check(self, owner: Any, field: str, value: Any) -> Any:
        valid = owner.valid_values(field)
        if valid is not None and value not in valid:
            names = [repr(v) if not isinstance(v, str) else v for v in valid]
            if len(names) > self.LISTED:
                # errnos, drop reasons: the likeliest, not a screenful
                near = difflib.get_close_matches(str(value), names, n=5, cutoff=0.6)
                shown = ", ".join(near) + f"{', ' if near else ''}… {len(names) - len(near)} more: " \
                                          f"{getattr(owner, '__name__', 'Event')}.valid_values({field!r})"
            else:
                shown = ", ".join(names) or "(none on this kernel)"
            raise ValueError(f"unknown {field} {value!r} for {owner.kind!r} events; valid: {shown}")
        return value

    LISTED = 30   # valid values listed in full up to this many


class Family(Choice):
    """4 or 6, however a filter spells it ("ipv6", "AF_INET6", socket.AF_INET6)."""

    def check(self, owner: Any, field: str, value: Any) -> Any:
        return super().check(owner, field, parse_family(value))


class Address(FieldType):
    """An IP address or interface (address/len); a filter gives any form
    `ipaddress` parses, compared as addresses (an interface filter needs the
    length too)."""

    def check(self, owner: Any, field: str, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"{field}={value!r}: not an address")
        if isinstance(value, int):
            # `daddr=10` (a port, a count?) would be 0.0.0.10 and match nothing
            raise ValueError(f"{field}={value!r}: an int is no address here; write the address as a string "
                             f"('10.0.0.1'), or ipaddress.ip_address({value!r}) for the address it numbers")
        parse_address(value, field)
        return value

    def matches(self, actual: Any, wanted: Any) -> bool:
        if not isinstance(actual, _ADDR_TYPES + _IFACE_TYPES + _NET_TYPES) or isinstance(wanted, bool):
            return bool(actual == wanted)
        want = parse_address(wanted, "address")
        if isinstance(actual, _IFACE_TYPES):
            if isinstance(want, _IFACE_TYPES):
                return bool(actual == want)
            return bool(actual.ip == want)
        if isinstance(actual, _NET_TYPES):
            if isinstance(want, _IFACE_TYPES):
                return actual == want.network and want.ip == want.network.network_address
            return bool(actual == ipaddress.ip_network(want))
        if isinstance(want, _IFACE_TYPES):
            # a prefix is a subnet ("10.0.0.0/24": any address in it), not its first address
            if want.network.prefixlen < want.max_prefixlen:
                return actual.version == want.version and actual in want.network
            return bool(actual == want.ip)
        return bool(actual == want)

    def to_json(self, value: Any) -> Any:
        return None if value is None else str(value)

    def from_json(self, value: Any) -> Any:
        return parse_address(value) if isinstance(value, str) else value


class Network(Address):
    """A prefix (a route's or a rule's destination); `"default"`, as `ip
    route` says it, is 0.0.0.0/0 or ::/0."""

    DEFAULT = "default"

    def check(self, owner: Any, field: str, value: Any) -> Any:
        return value if value == self.DEFAULT else super().check(owner, field, value)

    def matches(self, actual: Any, wanted: Any) -> bool:
        if wanted == self.DEFAULT and isinstance(actual, _NET_TYPES):
            return actual.prefixlen == 0
        return super().matches(actual, wanted)

    def from_json(self, value: Any) -> Any:
        return ipaddress.ip_network(value, strict=False) if isinstance(value, str) else value


class Comm(FieldType):
    """A task's name: the kernel keeps 15 bytes of it ("systemd-networkd" is
    "systemd-network" in every event), and a filter says it in full."""

    LEN = 16  # TASK_COMM_LEN, with the NUL

    def matches(self, actual: Any, wanted: Any) -> bool:
        if isinstance(wanted, str) and isinstance(actual, str):
            return actual == wanted.encode()[:self.LEN - 1].decode(errors="ignore")
        return bool(actual == wanted)


class Hex(FieldType):
    """Bytes (a packet's payload), as hex in JSON."""

    def check(self, owner: Any, field: str, value: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
        hint = f": write {str(value).encode()!r}" if isinstance(value, str) else ""
        raise ValueError(f"{field} of {owner.kind!r} events is bytes: {value!r} ({type(value).__name__}) "
                         f"would match nothing{hint}")

    def to_json(self, value: Any) -> Any:
        return value.hex() if isinstance(value, (bytes, bytearray)) else value

    def from_json(self, value: Any) -> Any:
        return bytes.fromhex(value) if isinstance(value, str) else value


class IpProto(FieldType):
    """An IP protocol's name: one spelling in every kind ("icmpv6", as nft
    spells it); a filter may also use the other spellings in use (tcpdump's
    "icmp6", /etc/protocols' "ipv6-icmp")."""

    ALIASES = {"icmp6": "icmpv6", "ipv6-icmp": "icmpv6"}
    # the names the kinds give protocol numbers (others stay numbers)
    NAMES = {0: "hopopts", 1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 33: "dccp", 41: "ipv6", 47: "gre", 50: "esp",
             51: "ah", 58: "icmpv6", 132: "sctp", 136: "udplite"}
    UNNAMED = "(or a number)"   # how the kind gives a protocol without a name, for the error

    def check(self, owner: Any, field: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"{field} of {owner.kind!r} events is a protocol's name or number, not {value!r}")
        if isinstance(value, int):
            if value in self.NAMES:
                raise ValueError(f"{field} {value} of {owner.kind!r} events is named: write {self.NAMES[value]!r}")
            return value
        name = self.ALIASES.get(value.lower(), value.lower())
        if name not in self.NAMES.values():
            raise ValueError(f"unknown {field} {value!r} for {owner.kind!r} events; valid: "
                             f"{', '.join(sorted(set(self.NAMES.values())))} {self.UNNAMED}")
        return name


PLAIN = FieldType()
CHOICE = Choice()
FAMILY = Family()
ADDRESS = Address()
NETWORK = Network()
COMM = Comm()
HEX = Hex()
IP_PROTO = IpProto()


@functools.lru_cache(maxsize=None)  # asked per event and filter: classes and their declarations are fixed
def field_type(owner: Any, field: str) -> FieldType:
    """The declared type of `field` on `owner` (an Event class, or any class
    with FIELDS): its TYPES entry; a Choice where it has known values; plain
    otherwise."""
    declared = getattr(owner, "TYPES", {}).get(field)
    if declared is not None:
        return cast(FieldType, declared)
    if field in getattr(owner, "VALUES", {}) or (field == "action" and getattr(owner, "ACTIONS", None)):
        return CHOICE
    return PLAIN


IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPInterface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_set = object.__setattr__
_NONES = itertools.repeat(None)   # pop()'s default, for every field
_ANNOTATED_TYPES = {"IPAddress": ADDRESS, "IPInterface": ADDRESS, "IPNetwork": NETWORK}


_SCALARS = {"int": int, "str": str, "float": float, "bool": bool}


def _annotation_text(annotation: Any) -> str:
    """An annotation as written, without Optional[...]: "int", "IPAddress"."""
    if isinstance(annotation, type):
        return annotation.__name__
    text = (annotation if isinstance(annotation, str) else repr(annotation)).replace("typing.", "")
    return text[len("Optional["):-1] if text.startswith("Optional[") and text.endswith("]") else text


@functools.lru_cache(maxsize=None)
def _field_annotation(owner: Any, field: str) -> Optional[str]:
    """The text of `field`'s annotation on `owner` or the first base that
    declares it (a derived field, sysctl's `changed`: its getter's return
    type), without Optional[...]; None when nothing declares it."""
    for klass in getattr(owner, "__mro__", ()):
        members = getattr(klass, "__dict__", {})
        annotation = members.get("__annotations__", {}).get(field)
        if annotation is None and isinstance(members.get(field), property):
            annotation = getattr(members[field].fget, "__annotations__", {}).get("return")
        if annotation is not None:
            return _annotation_text(annotation)
    return None


def scalar_type(owner: Any, field: str) -> Optional[type]:
    """int, str, float or bool when `field` of `owner` holds only that (or
    None); None for anything else (a union, an address, bytes)."""
    return _SCALARS.get(_field_annotation(owner, field) or "")


def described(owner: Any) -> str:
    """What filter errors call the records of `owner`: "'rst' events", or
    its DESCRIBED (a table's rows are no events)."""
    return getattr(owner, "DESCRIBED", None) or f"{owner.kind!r} events"


# fields of these names that hold an int are ports: a value outside
# 0-65535 matches nothing
_PORT_FIELDS = frozenset({"port", "sport", "dport", "lport", "rport", "local_port", "remote_port"})


def _check_scalar(owner: Any, field: str, value: Any) -> None:
    """A filter value of another type than the field's never matches: a
    port given as "9" would make a negative assertion pass."""
    expected = scalar_type(owner, field)
    if expected is None or expected is bool and isinstance(value, bool):
        return
    if not isinstance(value, bool) and isinstance(value, (int, float) if expected is float else expected):
        if expected is int and field in _PORT_FIELDS and not 0 <= value <= 65535:
            raise ValueError(f"{field} of {described(owner)} is a port, 0-65535: {value!r} would match nothing")
        if expected is str and value == "" and field in ("comm", "parent_comm", "owner_comm"):
            raise ValueError(f"{field} of {described(owner)} is a task's name: '' would match nothing")
        return
    what = {int: "a number", str: "a str", float: "a number", bool: "True or False"}[expected]
    raise ValueError(f"{field} of {described(owner)} is {what}: {value!r} ({type(value).__name__}) "
                     f"would match nothing")


def tuple_shape(owner: Any, field: str) -> Optional[str]:
    """The annotation of `field` when it holds tuples ("Tuple[int, int]"),
    else None: a tuple given as its filter is its value, not a choice."""
    text = _field_annotation(owner, field)
    return text if text is not None and text.startswith("Tuple[") else None


def _split_arguments(text: str) -> List[str]:
    """"int, Tuple[int, int]" -> ["int", "Tuple[int, int]"] (top-level commas only)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return parts


def _fits(shape: str, value: Any) -> bool:
    """Whether `value` is something a field annotated `shape` can hold."""
    if shape.startswith("Tuple[") and shape.endswith("]"):
        if not isinstance(value, tuple):
            return False
        items = _split_arguments(shape[len("Tuple["):-1])
        if len(items) == 2 and items[1] == "...":
            return all(_fits(items[0], v) for v in value)
        return len(items) == len(value) and all(_fits(s, v) for s, v in zip(items, value))
    expected = _SCALARS.get(shape)
    if expected is None:
        return True   # a class of the kind's (RouteHop): not checked here
    return isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)


class OneOf(list):  # type: ignore[type-arg]
    """A filter's values, any of which matches (a list given for a field
    that holds tuples, where a tuple is the value itself)."""


def _check_tuple(owner: Any, field: str, shape: str, value: Any) -> Any:
    if value is None or _is_predicate(value) or _fits(shape, value):
        return value
    raise ValueError(f"{field} of {owner.kind!r} events holds a {shape}: {value!r} would match nothing "
                     f"(a list of them matches any)")


def _annotated_type(annotation: Any) -> Optional[FieldType]:
    """The FieldType an annotation implies (`Optional[IPAddress]`: ADDRESS), if any."""
    return _ANNOTATED_TYPES.get(_annotation_text(annotation))
_E = TypeVar("_E", bound="Event")


def _is_classvar(annotation: Any) -> bool:
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return text.startswith(("ClassVar", "typing.ClassVar"))


def _getter(i: int) -> Callable[[Any], Any]:
    def get(self: Any) -> Any:
        return self._values[i]
    return get


@dataclass_transform(frozen_default=True)
class _EventType(type):
    """Lays out an Event class from its annotated fields (`sport: int`):
    FIELDS (its bases', then its own, then its DERIVED properties, less
    WITHOUT) and one read-only property per stored field, all held in one
    tuple per event (`_values`): built in one step, immutable.

    Type checkers see each kind as a frozen dataclass (`ev.sport = 1` is an
    error in a user's test, as it is when it runs); a kind says `init=False`
    (`class RstEvent(Event, init=False)`) because events are built by
    Event's own constructors, not from their fields one by one."""

    def __new__(mcs, name: str, bases: Tuple[type, ...], ns: Dict[str, Any], **kw: Any) -> "_EventType":
        kw.pop("init", None)   # for type checkers only (above)
        own = [f for f, t in ns.get("__annotations__", {}).items()
               if not _is_classvar(t) and not f.startswith("_") and f not in ns.get("__slots__", ())]
        for f in own:
            if ns.get(f, None) is not None:
                raise TypeError(f"{name}.{f}: a field's default is None, not {ns[f]!r}")
            ns.pop(f, None)
        if "FIELDS" in ns or "STORED" in ns:
            raise TypeError(f"{name}: declare fields as annotations (`sport: int`); FIELDS follows from them")
        base = next((b for b in bases if isinstance(b, _EventType)), None)
        stored: Tuple[str, ...] = getattr(base, "STORED", ())
        own = [f for f in own if f not in stored]
        index = len(stored)
        ns.setdefault("__slots__", ())
        for i, f in enumerate(own):
            ns[f] = property(_getter(index + i), doc=f"the {f!r} field")
        cls = super().__new__(mcs, name, bases, ns, **kw)
        extra: Tuple[str, ...] = ns.get("EXTRA", ())
        fields = getattr(base, "FIELDS", ("kind",)) + tuple(f for f in own if f not in extra) + ns.get("DERIVED", ())
        without = ns.get("WITHOUT", ())
        setattr(cls, "STORED", stored + tuple(own))
        setattr(cls, "FIELDS", tuple(f for f in fields if f not in without))
        # Event: the common fields (the first class laid out here)
        root: Any = [c for c in cls.__mro__ if "STORED" in c.__dict__][-1]
        setattr(cls, "_OWN", (stored + tuple(own))[len(root.STORED):] if root is not cls else ())
        setattr(cls, "_STORED_SET", frozenset(stored + tuple(own)))
        return cls


def _common(hdr: Header, stack: Stack, context_guess: str) -> Tuple[Any, ...]:
    """The values of Event's own fields (STORED) for a record's header."""
    context = stack.context(context_guess)
    if context == "process":
        # 0: a process outside this pid namespace (the host's, seen from a container)
        return (hdr.ts, hdr.netns, hdr.pid or None, hdr.tid or None, hdr.comm, hdr.uid, hdr.ppid, hdr.pcomm,
                context, None)
    # in an interrupt, the current task did not do it
    return (hdr.ts, hdr.netns, None, None, None, None, None, None, context, f"{hdr.comm}({hdr.pid})")


if TYPE_CHECKING:
    # A type checker takes the class that names a dataclass_transform
    # metaclass for the plain base of its dataclasses: Event must not be it.
    class _EventRoot(metaclass=_EventType, init=False):
        pass
else:   # the same metaclass, without laying anything out
    _EventRoot = type.__new__(_EventType, "_EventRoot", (), {"__slots__": ()})


class Event(_EventRoot, init=False):
    """One thing the kernel did, in one watched network namespace.

    Common fields: kind, timestamp (ns, CLOCK_MONOTONIC), netns (inode),
    pid, tid, comm, uid, ppid, parent_comm, context ("process" / "softirq" /
    "hardirq" / "nmi"), stack (list of "func+0xoff", may be empty).
    In interrupt context the current task is unrelated to the event, so pid,
    tid, comm and uid are None: nobody is blamed for what a softirq did.

    A kind declares its fields as annotations (`sport: int`); FIELDS follows
    from them. An event is immutable: a decoder that learns more later says
    so with a new event (`corrected`).
    """

    __slots__ = ("_values", "_stack", "supersedes")

    kind: ClassVar[str] = "event"
    timestamp: int
    netns: int
    pid: Optional[int]
    tid: Optional[int]
    comm: Optional[str]
    uid: Optional[int]
    ppid: Optional[int]
    parent_comm: Optional[str]
    context: str
    # what a softirq interrupted: kept for debugging, never reported as the actor
    interrupted_task: Optional[str]
    EXTRA: ClassVar[Tuple[str, ...]] = ("interrupted_task",)  # stored, but not a field (no filter, no JSON)
    DERIVED: ClassVar[Tuple[str, ...]] = ("stack",)  # fields that are properties over the others
    WITHOUT: ClassVar[Tuple[str, ...]] = ()  # common fields a kind does not have (None on its events)
    # (set by _EventType)
    FIELDS: ClassVar[Tuple[str, ...]]   # a filter's names, as_dict's keys
    STORED: ClassVar[Tuple[str, ...]]   # what `_values` holds, in order
    _OWN: ClassVar[Tuple[str, ...]]    # STORED past the common fields
    _values: Tuple[Any, ...]           # STORED's values (the fields' properties read them)
    _stack: Stack                      # shared by the events with the same one
    # the earlier, already published event this one corrects (`corrected`); None
    supersedes: Optional["Event"]
    _STORED_SET: ClassVar[FrozenSet[str]]
    # Each field's type where it is not plain (`FieldType`): how filters on
    # it are checked and compared, and how JSON holds it. A class declares its
    # own; those of its bases are merged in (`__init_subclass__`).
    TYPES: ClassVar[Dict[str, "FieldType"]] = {"comm": COMM, "parent_comm": COMM, "family": FAMILY}
    # The values a field can take, where they are a known set: a filter with
    # any other value is a usage error listing these (a typo must not make a
    # negative assertion pass). A callable gives them when asked (values the
    # running kernel defines). None is always accepted: "the field is absent".
    VALUES: ClassVar[Dict[str, Union[Collection[Any], Callable[[], Optional[Collection[Any]]]]]] = {
        "context": ("process", "softirq", "hardirq", "nmi"),
        "family": IP_FAMILIES,
    }

    # -- the kind's policy, read by the generic layers (reports, the CLI) --
    # A high-volume view (packets, syscalls): `nettrace watch` leaves it out
    # unless asked for, and timelines count its events instead of listing
    # them unless its kind is the one asserted on.
    HIGH_VOLUME: ClassVar[bool] = False
    # Usually means trouble: a test that saw such an event (not background)
    # without reading or asserting on its kind is named in the session summary.
    ALARM: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        merged: Dict[str, FieldType] = {}
        for base in reversed(cls.__mro__[1:]):
            merged.update(getattr(base, "TYPES", {}))
        # an address field's annotation says how it is filtered (IPAddress: ADDRESS, IPNetwork: NETWORK)
        for name, annotation in cls.__dict__.get("__annotations__", {}).items():
            ftype = _annotated_type(annotation)
            if ftype is not None:
                merged[name] = ftype
        cls.TYPES = {**merged, **cls.__dict__.get("TYPES", {})}

    @classmethod
    def valid_values(cls, field: str) -> Optional[Collection[Any]]:
        """The values `field` can take, or None when it is not a known set
        (`action`: the class's ACTIONS)."""
        values = cls.VALUES.get(field)
        if values is None and field == "action":
            return getattr(cls, "ACTIONS", None)
        return values() if callable(values) else values

    def __init__(self, hdr: Optional[Header] = None, stack: Union[Stack, Sequence[int]] = NO_STACK,
                 context_guess: str = "process", **fields: Any) -> None:
        """The event a record stands for: the common fields from its header
        `hdr` (None: from `fields`), the context told from its kernel `stack`
        (`Header.stack`; `context_guess` without one), the kind's own fields
        by name (those not given are None)."""
        cls = type(self)
        if not isinstance(stack, Stack):
            stack = stack_of(tuple(stack)) if stack else NO_STACK
        # Each known field is taken out of `fields` (our own dict) in one
        # pass; what is left is a common field given as well, or a typo.
        if hdr is None:   # every field from `fields` (packets, verdicts, JSON)
            fields.setdefault("context", stack.context(context_guess))
            values = tuple(map(fields.pop, cls.STORED, _NONES))
        else:
            values = _common(hdr, stack, context_guess) + tuple(map(fields.pop, cls._OWN, _NONES))
            if fields:   # a decoder naming common fields itself (conn: the connection's owner)
                values = cls._merge(dict(zip(cls.STORED, values)), fields)
                fields = {}
        if fields:
            raise TypeError(f"{cls.__name__} has no field {sorted(fields)[0]!r}")
        _set(self, "_values", values)
        _set(self, "_stack", stack)
        _set(self, "supersedes", None)

    @classmethod
    def of(cls: Type[_E], hdr: Header, stack: Stack, context_guess: str, *own: Any) -> _E:
        """`cls(hdr, stack, context_guess, **fields)` for a decoder of many
        events: the kind's own fields by position, in the order the class
        declares them, all of them."""
        event = object.__new__(cls)
        if len(own) != len(cls._OWN):
            raise TypeError(f"{cls.__name__}.of() takes its {len(cls._OWN)} own fields, got {len(own)}")
        context = stack.context(context_guess)
        if context == "process":   # as _common, inline: this is the hot path
            common: Tuple[Any, ...] = (hdr.ts, hdr.netns, hdr.pid or None, hdr.tid or None, hdr.comm, hdr.uid,
                                       hdr.ppid, hdr.pcomm, context, None)
        else:
            common = (hdr.ts, hdr.netns, None, None, None, None, None, None, context, f"{hdr.comm}({hdr.pid})")
        _set(event, "_values", common + own)
        _set(event, "_stack", stack)
        _set(event, "supersedes", None)
        return event

    @classmethod
    def _merge(cls, base: Dict[str, Any], changes: Mapping[str, Any]) -> Tuple[Any, ...]:
        """STORED's values: `base`'s, with `changes`."""
        if not changes.keys() <= cls._STORED_SET:
            raise TypeError(f"{cls.__name__} has no field {sorted(set(changes) - cls._STORED_SET)[0]!r}")
        base.update(changes)
        return tuple(map(base.get, cls.STORED))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name!r} "
                             f"(a decoder that learns more makes a new event: corrected())")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name!r}")

    def __reduce__(self) -> Any:   # copy and pickle: slots that __setattr__ refuses
        return (_rebuild, (type(self), self._values, self._stack.frames, self.supersedes))

    def evolve(self: _E, **changes: Any) -> _E:
        """A new event: this one with `changes` (and what it supersedes).
        For a decoder still building an event, before it publishes it."""
        new = object.__new__(type(self))
        _set(new, "_values", self._merge(dict(zip(self.STORED, self._values)), changes))
        _set(new, "_stack", self._stack)
        _set(new, "supersedes", self.supersedes)
        return new

    def corrected(self: _E, **changes: Any) -> _E:
        """A new event: this one with `changes`, superseding it. A published
        event never changes (a test may hold it); a decoder that learns more
        later (who accepted a connection, that a record raced) says so with
        a new fact, which takes the earlier one's place in the trace."""
        new = self.evolve(**changes)
        _set(new, "supersedes", self)
        return new

    @property
    def background(self) -> bool:
        """Noise rather than news (probes override): left out of failure
        timelines unless its kind is the one asserted on, and of what a
        negative assertion, a forbid or a gate counts unless a filter in
        BACKGROUND_COUNTED_BY names it."""
        return False

    # filters that name an event's own particulars: given one, a background
    # event it matches counts (assert_no_drops(reason="NOT_SPECIFIED"))
    BACKGROUND_COUNTED_BY: ClassVar[FrozenSet[str]] = frozenset()

    @property
    def stack(self) -> List[str]:
        """The kernel stack, "func+0xoff" from the innermost (a new list: the
        frames are shared with every event of the same stack)."""
        return list(self._stack.frames)

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready dict of FIELDS, each as its declared type writes it
        (addresses as strings, bytes as hex, everything else as is)."""
        types = type(self).TYPES
        return {name: types.get(name, PLAIN).to_json(getattr(self, name, None)) for name in self.FIELDS}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Event":
        """The event `as_dict()` (read back from JSON) stands for: each field
        in its declared type again (addresses as ipaddress objects), so
        attributes and filters work as on the events of a live trace."""
        # derived fields (DERIVED: the stack, sysctl's `changed`) follow from the others
        owner: Any = cls   # (a class is hashable: lru_cache's Hashable does not say so of type[Event])
        fields = {name: field_type(owner, name).from_json(data[name]) for name in cls.FIELDS
                  if name in data and name != "context" and name in cls.STORED}
        event = cls(None, NO_STACK, data.get("context") or "process", **fields)
        _set(event, "_stack", Stack.resolved([str(frame) for frame in data.get("stack") or ()]))
        return event

    # -- rendering ---------------------------------------------------
    def actor(self) -> str:
        """Who did it, in the seed's words: `ip(19838) uid 0 [parent bash(1200)]`."""
        if self.pid is None:
            if self.context != "process":
                return f"<{self.context}>"
            return f"<kernel: {self.interrupted_task}>" if self.interrupted_task else "<kernel>"
        s = f"{self.comm}({self.pid}) uid {self.uid}"
        if self.ppid:
            s += f" [parent {self.parent_comm}({self.ppid})]"
        return s

    def describe(self) -> str:
        """What happened, without who/when; probes override."""
        return self.kind

    def how(self, full: bool = False) -> str:
        """How it was asked for (` via netlink`; with `full`, the command line
        too: ` via netlink: "ip addr del …"`); probes override."""
        return ""

    def summary(self) -> str:
        return f"{self.kind:<6} {self.actor()} {self.describe()}{self.how()}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.summary()}>"




def _rebuild(cls: Any, values: Tuple[Any, ...], frames: Tuple[str, ...], supersedes: Optional[Event]) -> Event:
    event = object.__new__(cls)
    _set(event, "_values", values)
    _set(event, "_stack", Stack.resolved(frames))
    _set(event, "supersedes", supersedes)
    return cast(Event, event)


def parse_address(value: Any, what: str = "address") -> Any:
    """An IP address, interface (addr/len) or network from str/int/ipaddress; ValueError names a bad one."""
    if isinstance(value, _ADDR_TYPES + _IFACE_TYPES + _NET_TYPES):
        return value
    try:
        if isinstance(value, str) and "/" in value:
            return ipaddress.ip_interface(value)
        return ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"invalid {what} {value!r}: not an IPv4 or IPv6 address") from None


def _value_matches(ftype: FieldType, actual: Any, wanted: Any) -> bool:
    if _is_predicate(wanted):
        return bool(wanted(actual))
    if isinstance(wanted, OneOf):
        return any(_value_matches(ftype, actual, w) for w in wanted)
    if isinstance(wanted, (list, tuple, set, frozenset)) and not isinstance(actual, (list, tuple)):
        return any(_value_matches(ftype, actual, w) for w in wanted)
    return ftype.matches(actual, wanted)


_FAMILIES = {4: 4, 6: 6, "4": 4, "6": 6, "ipv4": 4, "ipv6": 6, "ip": 4, "ip6": 6, "inet": 4, "inet6": 6,
             "af_inet": 4, "af_inet6": 6}


def parse_family(value: Any) -> Any:
    """4 or 6 from 4/6, "ipv4"/"IPv6", "inet6", "AF_INET6" or socket.AF_INET6
    (every kind stores 4/6); None stays None; ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, socket.AddressFamily):
        value = value.name
    key = value.lower() if isinstance(value, str) else value
    if isinstance(key, bool) or key not in _FAMILIES:
        raise ValueError(f"unknown family {value!r}: events store 4 or 6; give 4, 6, 'ipv4', 'ipv6', "
                         f"'AF_INET', 'AF_INET6' or socket.AF_INET/AF_INET6")
    return _FAMILIES[key]


def _is_predicate(value: Any) -> bool:
    return callable(value) and not isinstance(value, type)


def check_timeout(timeout: Any) -> float:
    """A wait's timeout, in seconds; ValueError naming anything else."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise ValueError(f"timeout is a number of seconds >= 0, not {timeout!r}")
    return float(timeout)


def check_filters(cls: Any, filters: Dict[str, Any]) -> Dict[str, Any]:
    """The filters as events are compared with them (each field type's `check`).
    Unknown filter names, malformed addresses and values a field cannot take
    are usage errors, raised before looking at any event (a bad filter must
    not pass by matching nothing)."""
    out: Dict[str, Any] = {}
    for name, value in filters.items():
        if name not in cls.FIELDS:
            raise ValueError(
                f"unknown filter {name!r} for {described(cls)}; valid: {', '.join(cls.FIELDS)}")
        if value is None or _is_predicate(value) or name == "stack":
            out[name] = value
            continue
        if isinstance(value, (list, tuple, set, frozenset)) and not value:
            raise ValueError(f"{name}={value!r}: an empty choice matches no {cls.kind!r} event")
        shape = tuple_shape(cls, name)
        if shape is not None:
            out[name] = (OneOf(_check_tuple(cls, name, shape, v) for v in value) if isinstance(value, list)
                         else _check_tuple(cls, name, shape, value))
            continue
        many = isinstance(value, (list, tuple, set, frozenset))
        ftype = field_type(cls, name)
        checked = []
        for v in (value if many else [value]):
            if v is None or _is_predicate(v):
                checked.append(v)
            else:
                if ftype is PLAIN or ftype is COMM:
                    _check_scalar(cls, name, v)
                checked.append(ftype.check(cls, name, v))
        out[name] = checked if many else checked[0]
    return out


def matches(event: Any, filters: Mapping[str, Any]) -> bool:
    """Whether `event` (an Event, or a row with FIELDS) meets the checked filters."""
    owner: Any = type(event)
    for name, wanted in filters.items():
        actual = getattr(event, name, None)
        try:
            if not _value_matches(field_type(owner, name), actual, wanted):
                return False
        except TypeError as exc:
            if not _is_predicate(wanted):
                raise
            raise TypeError(f"the predicate given for {name} failed on {actual!r} (a {getattr(owner, 'kind', '')} "
                            f"event's {name}; some events have None there): {exc}") from None
    return True


def news(events: Iterable[Event], filters: Mapping[str, Any]) -> List[Event]:
    """The events a negative assertion, a forbid or a gate counts: not the
    background ones, unless the filters name their particulars."""
    return [e for e in events if not e.background or not type(e).BACKGROUND_COUNTED_BY.isdisjoint(filters)]


def describe_filters(filters: Mapping[str, Any]) -> str:
    if not filters:
        return "(any)"
    return ", ".join(f"{k}={v!r}" if not callable(v) else f"{k}=<predicate>" for k, v in filters.items())


_user_names: Dict[int, str] = {}


def command_line(raw: bytes, length: int) -> Optional[str]:
    """A task's command line as a probe copied it (the first `length` bytes
    of its NUL-separated arguments), its arguments joined by spaces; None
    when empty (a kernel thread)."""
    return raw[:length].rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace") or None if length else None


def quoted_command(cmdline: str) -> str:
    """A command line in a one-line rendering: quoted, its line breaks and
    tabs escaped (`python3 -c` with a script spread one event over lines)."""
    return '"' + cmdline.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def user_name(uid: Optional[int]) -> Optional[str]:
    """The account name of `uid` (the number as text when it has none)."""
    if uid is None:
        return None
    # asked per event (netchange's actors): each lookup reads /etc/passwd.
    # Only found names are kept: an account a test creates is named once it exists.
    name = _user_names.get(uid)
    if name is None:
        try:
            name = _user_names[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            return str(uid)
    return name

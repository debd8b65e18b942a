"""What the running kernel and process allow, found by trying, once per boot.

Each feature is a bool plus, when False, the reason (the errno or the missing
file), so the pytest header and every skip can say exactly why. What the
probes ask the kernel's BTF (enum values, tracepoint arguments) is kept for
the boot too: a process whose questions were all answered before does not
parse the BTF (libbpf still does, for the attach targets)."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from . import libbpf as lb
from ..runtime import RUN_DIR, boot_id, read_cached, write_cached
from ..errors import NettraceError, UnsupportedKernel

DEFAULT_BTF = "/sys/kernel/btf/vmlinux"
OBJECT_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bpf")
# platform.machine() -> the directory of the objects built for it (bpf/Makefile's ARCHES)
OBJECT_ARCHES = {"x86_64": "x86", "aarch64": "arm64"}

CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


def unsupported_architecture() -> Optional[str]:
    """None when the package carries BPF objects for this machine, else why not."""
    if platform.machine() in OBJECT_ARCHES:
        return None
    return (f"no BPF objects for architecture {platform.machine()!r}: pytest-nettrace is built for "
            f"{', '.join(OBJECT_ARCHES)}")


def object_path(name: str) -> str:
    """The object `name` built for the running machine's architecture."""
    why = unsupported_architecture()
    if why:
        raise UnsupportedKernel(why)
    return os.path.join(OBJECT_DIR, OBJECT_ARCHES[platform.machine()], name)


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


@dataclass
class KernelFeatures:
    """Found features; `reasons[name]` says why one is missing."""

    btf_path: str = DEFAULT_BTF
    privileged: bool = False
    btf: bool = False
    ringbuf: bool = False
    tracepoint: bool = False
    tp_btf: bool = False
    fentry: bool = False
    kprobe: bool = False
    reasons: Dict[str, str] = field(default_factory=dict)
    _btf: Optional[lb.KernelBtf] = None   # parsed only when a question is not in _facts
    _facts: Optional[BtfFacts] = None     # None: no usable BTF

    def why(self, feature: str) -> str:
        return self.reasons.get(feature, "available" if getattr(self, feature, False) else "unknown")

    def enum(self, name: str) -> Dict[int, str]:
        if self._facts is None:
            return {}
        with _parse_lock:  # (the facts are written out as they grow)
            known = self._facts.enums.get(name)
            if known is None:
                known = self._facts.enums[name] = self._parsed().enum(name)
                self._facts.save()
            return known

    def tracepoint_args(self, tp: str) -> Optional[int]:
        if self._facts is None:
            return None
        with _parse_lock:
            if tp not in self._facts.tracepoint_args:
                self._facts.tracepoint_args[tp] = self._parsed().tracepoint_arg_count(tp)
                self._facts.save()
            return self._facts.tracepoint_args[tp]

    def _parsed(self) -> lb.KernelBtf:
        with _parse_lock:
            if self._btf is None:
                self._btf = lb.KernelBtf(self.btf_path)
            return self._btf

    def require(self) -> None:
        """Raise UnsupportedKernel with the first missing essential, in one line."""
        for feat in ("privileged", "btf", "ringbuf", "tp_btf"):
            if not getattr(self, feat):
                raise UnsupportedKernel(self.reasons[feat])

    def summary(self) -> str:
        names = ["btf", "ringbuf", "tracepoint", "tp_btf", "fentry", "kprobe"]
        parts = [f"{n} yes" if getattr(self, n) else f"{n} no ({_brief(self.reasons.get(n, '?'))})"
                 for n in names]
        if not self.privileged:
            parts.insert(0, "NOT PRIVILEGED")
        return ", ".join(parts)

    def missing(self) -> List[str]:
        names = ["privileged", "btf", "ringbuf", "tracepoint", "tp_btf", "fentry", "kprobe"]
        return [f"{n}: {self.reasons[n]}" for n in names if not getattr(self, n) and n in self.reasons]


def _brief(reason: str) -> str:
    """First clause of a reason: "EPERM", "ENOENT", "not root"."""
    return reason.split(":")[0].strip()[:40]


def _try_program(prog: str, btf_path: str, attach: bool = True) -> Optional[str]:
    """None if `prog` of caps.bpf.o loads and attaches, else the reason."""
    try:
        obj = lb.BpfObject(object_path("caps.bpf.o"), btf_path)
    except NettraceError as e:
        return str(e)
    try:
        obj.set_autoload({prog: True})
        obj.load()
        if attach:
            obj.attach(prog)
        return None
    except NettraceError as e:
        return str(e)
    finally:
        obj.close()


def no_btf_reason(btf_path: str) -> str:
    """Why there is no BTF at `btf_path`: the kernel's, or a path given."""
    if btf_path == DEFAULT_BTF:
        return f"no kernel BTF at {btf_path}: the kernel needs CONFIG_DEBUG_INFO_BTF=y"
    return f"no BTF file at {btf_path} (the path given; the running kernel's is {DEFAULT_BTF})"


def detect(btf_path: str = DEFAULT_BTF) -> KernelFeatures:
    k = KernelFeatures(btf_path=btf_path)
    caps = _effective_caps()
    k.privileged = os.geteuid() == 0 or bool(caps >> CAP_BPF & 1 and caps >> CAP_PERFMON & 1) \
        or bool(caps >> CAP_SYS_ADMIN & 1)
    if not k.privileged:
        k.reasons["privileged"] = (f"not root and no CAP_BPF+CAP_PERFMON (euid {os.geteuid()}): "
                                   "run the tests as root (sudo) to attach BPF probes")
    arch = unsupported_architecture()
    if arch:
        k.reasons["btf"] = arch
    elif not os.path.exists(btf_path):
        k.reasons["btf"] = no_btf_reason(btf_path)
    else:
        k._facts = BtfFacts.load(btf_path)
        if k._facts is None:  # not parsed yet this boot (or no cache): parse it now, to know it is usable
            try:
                k._btf = lb.KernelBtf(btf_path)
                k._facts = BtfFacts(_btf_cache_name(btf_path))
            except NettraceError as e:
                k.reasons["btf"] = str(e)
        k.btf = k._facts is not None
    if not k.privileged or not k.btf:
        blocker = k.reasons.get("privileged") or k.reasons.get("btf")
        for feat in ("ringbuf", "tracepoint", "tp_btf", "fentry", "kprobe"):
            k.reasons[feat] = f"not tried: {blocker}"
        return k
    try:
        os.close(lb.map_create(lb.BPF_MAP_TYPE_RINGBUF, "nt_cap_rb", 0, 0, 4096))
        k.ringbuf = True
    except NettraceError as e:
        k.reasons["ringbuf"] = f"BPF ring buffer unavailable (kernel >= 5.8 needed): {e}"
    cache = _probe_cache_path(btf_path, caps)
    probed = _read_probe_cache(cache)
    if probed is None:
        probed = {}
        for feat, prog in _PROBED:
            # a classic tracepoint attach costs ~70 ms (perf event setup and teardown): load it only
            err = _try_program(prog, btf_path, attach=feat != "tracepoint")
            probed[feat] = None if err is None else _short(err)
        _write_probe_cache(cache, probed)
    for feat, why in probed.items():
        setattr(k, feat, why is None)
        if why is not None:
            k.reasons[feat] = why
    if not k.kprobe and not os.path.exists("/sys/bus/event_source/devices/kprobe") \
            and not any(os.path.exists(f"{d}/kprobe_events") for d in ("/sys/kernel/tracing",
                                                                        "/sys/kernel/debug/tracing")):
        k.reasons["kprobe"] = "ENOENT: no kprobe support in this kernel (no kprobe PMU, no kprobe_events)"
    return k


_PROBED = (("tp_btf", "cap_tp_btf"), ("tracepoint", "cap_tracepoint"),
           ("fentry", "cap_fentry"), ("kprobe", "cap_kprobe"))


def _probe_cache_path(btf_path: str, caps: int) -> Optional[str]:
    """Where the probing's outcome is kept for this boot, or None (not root).
    Loading the probe programs is what takes time, and their outcome changes
    only with the boot, the programs, the credentials and the BTF: all in the name."""
    boot = boot_id()
    if os.geteuid() != 0 or not boot:
        return None
    try:
        with open(object_path("caps.bpf.o"), "rb") as f:
            digest = hashlib.sha256(f.read())
    except (OSError, UnsupportedKernel):
        return None
    digest.update(f"{boot}\0{os.geteuid()}\0{caps:x}\0{os.path.realpath(btf_path)}".encode())
    return os.path.join(RUN_DIR, f"features-{digest.hexdigest()[:32]}.json")


def _read_probe_cache(path: Optional[str]) -> Optional[Dict[str, Optional[str]]]:
    """The cached outcome; None for no file, one that is not to be believed
    (runtime.read_cached), or not exactly what _write_probe_cache writes."""
    raw = read_cached(os.path.dirname(path), os.path.basename(path)) if path else None
    try:
        data = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    if not isinstance(data, dict) or set(data) != {f for f, _ in _PROBED} or \
            not all(v is None or isinstance(v, str) for v in data.values()):
        return None
    return data


def _write_probe_cache(path: Optional[str], probed: Dict[str, Optional[str]]) -> None:
    if path is not None:
        write_cached(os.path.dirname(path), os.path.basename(path), json.dumps(probed).encode())


def _btf_cache_name(btf_path: str) -> Optional[str]:
    """The facts file of `btf_path` on this boot (None: not kept): named by the
    boot, the file and its identity, so a replaced BTF file is asked again."""
    boot = boot_id()
    if os.geteuid() != 0 or not boot:
        return None
    try:
        st = os.stat(btf_path)
    except OSError:
        return None
    key = f"{boot}\0{os.path.realpath(btf_path)}\0{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    return f"btf-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


class BtfFacts:
    """What the probes asked the kernel's BTF this boot, kept in RUN_DIR."""

    def __init__(self, name: Optional[str], enums: Optional[Dict[str, Dict[int, str]]] = None,
                 tracepoint_args: Optional[Dict[str, Optional[int]]] = None) -> None:
        self.name = name
        self.enums: Dict[str, Dict[int, str]] = enums or {}
        self.tracepoint_args: Dict[str, Optional[int]] = tracepoint_args or {}

    @classmethod
    def load(cls, btf_path: str) -> Optional["BtfFacts"]:
        """The facts kept for `btf_path`, None when there are none to believe."""
        name = _btf_cache_name(btf_path)
        raw = read_cached(RUN_DIR, name) if name else None
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            enums = {str(e): {int(v): str(n) for v, n in values} for e, values in data["enums"].items()}
            tps = {str(tp): None if n is None else int(n) for tp, n in data["tracepoint_args"].items()}
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        return cls(name, enums, tps)

    def save(self) -> None:
        """Kept for the next processes; two writing at once lose one's new
        facts at worst, which the next process asks again."""
        if self.name:
            data = {"enums": {e: sorted(values.items()) for e, values in self.enums.items()},
                    "tracepoint_args": self.tracepoint_args}
            write_cached(RUN_DIR, self.name, json.dumps(data).encode())


def _short(err: str) -> str:
    # "cannot attach caps.bpf.o:cap_fentry (fentry/…): EPERM: Operation not permitted …" -> the errno part
    for marker in (": E",):
        i = err.find(marker)
        if i >= 0:
            return err[i + 2:].split(" | ")[0].split(";")[0].strip()
    return err


_cached: Dict[str, KernelFeatures] = {}
_lock = threading.Lock()
_parse_lock = threading.RLock()


def features(btf_path: str = DEFAULT_BTF) -> KernelFeatures:
    """Detected once per process and BTF path."""
    with _lock:
        if btf_path not in _cached:
            _cached[btf_path] = detect(btf_path)
        return _cached[btf_path]

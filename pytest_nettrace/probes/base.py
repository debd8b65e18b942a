"""What every probe module builds on: Plan, Probe, Decoder and Wakeups, the engine's
contract (defined in pytest_nettrace/kernel/probe.py, where the engine sees them)."""
from ..kernel.probe import Decoder, Plan, Probe, Wakeups

__all__ = ["Decoder", "Plan", "Probe", "Wakeups"]

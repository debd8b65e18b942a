"""What every probe module builds on: Plan and Probe, the engine's contract
(defined in pytest_nettrace/kernel/probe.py, where the engine sees them)."""
from ..kernel.probe import Plan, Probe

__all__ = ["Plan", "Probe"]

"""Probes: one module per probe, next to bpf/<probe>.bpf.c."""

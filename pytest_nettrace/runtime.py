"""What lasts for one boot: the boot's id, and the directory (tmpfs, gone at
reboot) where the plugin keeps what is worth computing once per boot
(function addresses, the minimal CO-RE BTF) and its stale-cleanup lock."""
from __future__ import annotations

RUN_DIR = "/run/pytest-nettrace"


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""

"""A fresh interpreter with this one's import path, for tests that need a
process of their own. Run as nobody (ci/unit-test), the venv's path may not
be executable while the running interpreter is: it is then started again
through /proc."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, Optional


def run_python(code: str, *args: str, env: Optional[Dict[str, str]] = None) -> str:
    """`code` run by a fresh interpreter (extra `env` on top of ours); its stdout. Fails on a non-zero exit."""
    python = sys.executable if os.access(sys.executable, os.X_OK) else "/proc/self/exe"
    full = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), **(env or {})}
    return subprocess.run([python, "-c", code, *args], capture_output=True, text=True, check=True, env=full).stdout

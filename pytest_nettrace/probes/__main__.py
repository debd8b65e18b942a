"""`python -m pytest_nettrace.probes [--check]`: write (or check) the Trace's
per-kind methods, pytest_nettrace/kind_methods.py, from the registry."""
import sys

from .registry import main

sys.exit(main())

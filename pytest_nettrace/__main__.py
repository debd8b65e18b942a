"""`python -m pytest_nettrace` = the `nettrace` command."""
import sys

from .cli import main

sys.exit(main())

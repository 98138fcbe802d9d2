"""``python -m mpnn.sweep``: see ``mpnn.sweep.cli``."""

import sys

from .cli import main

sys.exit(main())

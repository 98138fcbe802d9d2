"""``python -m mpnn.gradcheck``: runs ``cli.main`` and exits with its status."""

import sys

from .cli import main

sys.exit(main())

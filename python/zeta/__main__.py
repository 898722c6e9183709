"""``python -m zeta ...`` is the ``zeta`` command (info, demo, bench)."""

import sys

from .cli import main

sys.exit(main())

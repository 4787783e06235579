"""``python -m benchmarks.kvbench``: see ``cli``."""

import sys

from .cli import main

sys.exit(main())

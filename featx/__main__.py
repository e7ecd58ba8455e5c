"""``python -m featx``: the featx command line."""

import sys

from .cli import main

sys.exit(main())

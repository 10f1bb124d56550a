"""``python -m vlmsae_utils``: the book's command line (:mod:`.cli`)."""

import sys

from .cli import main

sys.exit(main())

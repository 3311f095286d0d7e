"""``python -m samhq_fast``: the ``samhq-fast`` command line."""

import sys

from samhq_fast.cli import main

sys.exit(main())

"""``python -m fastcal`` is the ``fastcal`` command."""

import sys

from fastcal.cli import main

sys.exit(main())

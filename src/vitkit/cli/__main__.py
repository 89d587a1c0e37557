"""`python -m vitkit.cli`, as `python -m vitkit`."""

import sys

from . import main

sys.exit(main())

"""`python -m ctrldiff.cli`: the same as the `ctrldiff` command."""

import sys

from . import main

sys.exit(main())

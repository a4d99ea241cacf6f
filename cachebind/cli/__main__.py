"""`python -m cachebind.cli`: the same as the `cachebind` command."""

import sys

from cachebind.cli import main

sys.exit(main())

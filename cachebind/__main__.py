"""``python -m cachebind <stage> …``: the same as the ``cachebind`` command.

The one entry point, on a workstation and as a Ray job alike::

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m cachebind embed /data/cc3m --config cachebind.toml --ray-address auto
"""

import sys

from cachebind.cli import main

sys.exit(main())

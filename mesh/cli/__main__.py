"""``python -m mesh.cli``: the ``sluice`` console script before it is installed."""

import sys

from mesh.cli import main

sys.exit(main())

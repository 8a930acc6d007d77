"""``python -m mapa``: the same as the ``mapa`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

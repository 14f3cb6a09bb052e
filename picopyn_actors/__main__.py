"""``python -m picopyn_actors``: the same as the ``picopyn-actors`` command.

Example::

    python -m picopyn_actors monitor postgresql://admin:pw@127.0.0.1:4327 --check
    python -m picopyn_actors demo --duration 30
"""

from __future__ import annotations

import sys

from ._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

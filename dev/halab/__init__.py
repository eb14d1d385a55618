"""Development tools outside the product: the network-namespace lab, its echo peer, the demo.

Nothing in `hasync` imports this package; it needs pyroute2, the product does not. `make setup`
puts `dev/` on the virtualenv's path (a .pth file), so `python -m halab ...` works there.
"""

from __future__ import annotations

import os
from pathlib import Path

import hasync


def pythonpath() -> str:
    """PYTHONPATH for processes the lab and demo start: hasync's source root and dev/."""
    return os.pathsep.join([str(Path(hasync.__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1])])

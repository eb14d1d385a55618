"""Where things are, for tests: the repository, the package and dev roots, fixtures, ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE_ROOT = REPO / "src" / "opnsense" / "scripts" / "ha"
DEV_ROOT = REPO / "dev"  # halab: the lab and the demo, outside the product package
FIXTURES = REPO / "fixtures"
SHARED = Path(os.environ.get("OPNSENSE_HA_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A file of ../shared, or a clean skip when it is absent (a user's clone has none)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared not available)")
    return path

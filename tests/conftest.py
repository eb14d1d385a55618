"""Shared test plumbing: import path, the optional ../shared data, and small helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = REPO / "src" / "opnsense" / "scripts" / "ha"
DEV_ROOT = REPO / "dev"  # halab: the lab and the demo, outside the product package
for _root in (DEV_ROOT, PACKAGE_ROOT):
    if str(_root) not in sys.path:
        sys.path.insert(0, str(_root))

from services_helpers import reap_orphans  # noqa: E402,F401 - autouse: no zombies from test daemons

FIXTURES = REPO / "fixtures"
SHARED = Path(os.environ.get("OPNSENSE_HA_SHARED", REPO.parent / "shared"))


@pytest.fixture
def shared_dir() -> Path:
    """../shared when present (a developer's or CI's checkout); skip cleanly in a user's clone."""
    if not (SHARED / "fixtures").is_dir():
        pytest.skip("../shared is absent (expected in a user's clone)")
    return SHARED


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared not available)")
    return path

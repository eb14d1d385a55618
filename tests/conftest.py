"""Shared test plumbing: the import path, the process reaper, and the optional ../shared data.

Helpers live in the `support` package next to this file (`from support.nodes import ...`);
tests are grouped by layer (core, config, payload, failover, services, wire, node, agent, sync,
health, cli) plus integration, resilience, lab and architecture.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from support.paths import DEV_ROOT, PACKAGE_ROOT, SHARED  # noqa: E402 - after the path set-up

for _root in (DEV_ROOT, PACKAGE_ROOT):
    if str(_root) not in sys.path:
        sys.path.insert(0, str(_root))

from support.processes import reap_orphans  # noqa: E402,F401 - autouse: no process left behind


@pytest.fixture
def shared_dir() -> Path:
    """../shared when present (a developer's or CI's checkout); skip cleanly in a user's clone."""
    if not (SHARED / "fixtures").is_dir():
        pytest.skip("../shared is absent (expected in a user's clone)")
    return SHARED

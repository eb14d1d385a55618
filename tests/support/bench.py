"""The benchmark's own modules (`bench/generate.py` and the rest), loaded by path: `bench/` is
no package, and the tests that need a realistic generated config use the bench's generator."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from support.paths import REPO

BENCH = REPO / "bench"


def bench_module(name: str) -> Any:
    """`bench/<name>.py` as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module

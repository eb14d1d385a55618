"""`opnsense-ha payload` and `apply-payload` print byte for byte what they printed before.

The expected files were recorded by `fixtures/compat/record.py` from main's tree (the layout
before the layered restructure, with every merged feature); this runs the same cases through the
current tree's CLI. A difference means a move or a shared helper changed behaviour.
"""

from __future__ import annotations

import importlib.util
import sys

from support.paths import FIXTURES, PACKAGE_ROOT

spec = importlib.util.spec_from_file_location("compat_record", FIXTURES / "compat" / "record.py")
assert spec is not None and spec.loader is not None
record = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record)


def test_payload_and_apply_payload_outputs_are_unchanged() -> None:
    expected_dir = FIXTURES / "compat" / "expected"
    expected = {path.name: path.read_bytes() for path in expected_dir.iterdir()}
    actual = record.outputs(sys.executable, PACKAGE_ROOT)
    assert sorted(actual) == sorted(expected)
    differing = [name for name in sorted(expected) if actual[name] != expected[name]]
    assert not differing, f"outputs differ from {expected_dir}: {differing}"

"""PHP's own notions of empty and of an integer, as OPNsense's code applies them to config values.

config.xml holds strings; OPNsense decides with `empty()`, `!empty()` and `intval()` whether a
flag is set (`nosync`, `disabled`, `noshow`) or what a number is. Reading them any other way
(``"0"`` as true, ``"10abc"`` as an error) would disagree with the GUI on the same config, so
every such decision in this package goes through these two functions.
"""

from __future__ import annotations

import re
from typing import Any


def php_empty(value: Any) -> bool:
    """PHP's empty(): '', '0', 0, False, None and empty arrays are empty (so ``nosync=0`` is not set)."""
    if value is None or value is False:
        return True
    if isinstance(value, str):
        return value in ("", "0")
    if isinstance(value, (int, float)):
        return value == 0
    if isinstance(value, (list, dict)):
        return len(value) == 0
    return False


_LEADING_INT = re.compile(r"^\s*([+-]?\d+)")


def php_intval(value: Any) -> int:
    """PHP's intval() on a config value: the leading integer of a string, 0 when there is none;
    an array is 1 when it has elements, else 0."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, (list, dict)):
        return 1 if value else 0
    match = _LEADING_INT.match(value if isinstance(value, str) else "")
    return int(match.group(1)) if match else 0


def php_truthy(value: Any) -> bool:
    """PHP's ``!empty()``: the flag is set."""
    return not php_empty(value)

"""JSON schemas shipped with the package, for validating our own JSON output.

`jsonschema` is imported when a document is validated (only `--json` outputs are): importing it
costs more than a whole no-op sync.
"""

from __future__ import annotations

import json
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jsonschema


@cache
def load(name: str) -> dict[str, Any]:
    from importlib import resources

    text = resources.files(__name__).joinpath(f"{name}.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def validate(name: str, document: Any) -> None:
    """Raise jsonschema.ValidationError when `document` breaks the shipped schema `name`."""
    import jsonschema

    jsonschema.validate(document, load(name))


def errors(name: str, document: Any) -> list[jsonschema.ValidationError]:
    """Every way `document` breaks the shipped schema `name` (empty when it is valid)."""
    import jsonschema

    return list(jsonschema.Draft202012Validator(load(name)).iter_errors(document))

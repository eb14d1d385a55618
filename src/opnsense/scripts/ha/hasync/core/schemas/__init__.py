"""JSON schemas shipped with the package, for validating our own JSON output."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import jsonschema


@cache
def load(name: str) -> dict[str, Any]:
    text = resources.files(__name__).joinpath(f"{name}.schema.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def validate(name: str, document: Any) -> None:
    """Raise jsonschema.ValidationError when `document` breaks the shipped schema `name`."""
    jsonschema.validate(document, load(name))

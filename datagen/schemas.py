"""Access to the JSON Schemas shipped with the package (``datagen/schemas``)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from jsonschema import Draft202012Validator


@cache
def schema(name: str) -> dict:
    text = resources.files("datagen").joinpath("schemas", f"{name}.schema.json").read_text()
    return json.loads(text)


@cache
def validator(name: str) -> Draft202012Validator:
    s = schema(name)
    Draft202012Validator.check_schema(s)
    return Draft202012Validator(s)


def schema_errors(name: str, obj: object) -> list[str]:
    """Every way ``obj`` breaks schema ``name``, as 'path: message' lines."""
    errs = sorted(validator(name).iter_errors(obj), key=lambda e: list(e.absolute_path))
    out = []
    for e in errs:
        path = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        out.append(f"{path}: {e.message}")
    return out

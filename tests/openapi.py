"""Responses checked against the served OpenAPI document (gateway/api/openapi.json)."""

import json
from pathlib import Path

import jsonschema

DOC = json.loads((Path(__file__).resolve().parent.parent / "gateway" / "api" / "openapi.json").read_text())


def check(response_json, status: int, method: str, path: str):
    """Validate a response body against the documented schema for (path, method, status)."""
    operation = DOC["paths"][path][method.lower()]
    assert str(status) in operation["responses"], f"{method} {path} -> {status} is undocumented"
    schema = operation["responses"][str(status)]["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": DOC["components"]}).validate(response_json)

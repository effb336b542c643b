"""The admin route table's row type, and the OpenAPI 3.1 document built from that same table."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from shieldproxy.admin.models import ErrorBody

REF = "#/components/schemas/{model}"
SECURITY = "adminToken"
_ERRORS = {
    400: "Malformed JSON, or a body that is not a JSON object (`bad_json`)",
    401: "Missing or wrong admin token (`unauthorized`)",
    404: "No such id (`not_found`)",
    409: "Conflicts with the current state, e.g. a revoked key (`conflict`)",
    413: "Body larger than 1 MiB (`payload_too_large`)",
    422: "Invalid fields or query parameters, listed as `field.path: problem` (`invalid`)",
    429: "Too many failed admin logins from this address (`too_many_attempts`)",
    503: "The store did not answer (`store_unavailable`)",
}


@dataclass(frozen=True, slots=True)
class Route:
    """One admin endpoint: how it is served and how it is documented, from the same fields."""

    method: Literal["GET", "POST", "PATCH", "DELETE"]
    path: str
    handler: Callable[..., Awaitable[Any]]
    summary: str
    response: Any  # a model, or list[model]
    status: int = 200
    body: type[BaseModel] | None = None
    body_required: bool = True
    query: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()  # besides those every route of its shape can answer

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.path)

    @property
    def error_statuses(self) -> list[int]:
        found = {401, 429, 503, *self.errors}
        if self.body is not None:
            found |= {400, 413, 422}
        if self.query is not None:
            found.add(422)
        if self.path_params:
            found.add(404)
        return sorted(found)


def build_document(routes: Sequence[Route], *, title: str, version: str) -> dict[str, Any]:
    """Request bodies in validation mode, responses in serialization mode; `$defs` hoisted."""
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorBody, "serialization")]
    for route in routes:
        if route.body is not None:
            wanted.append((route.body, "validation"))
        wanted.append((_response_model(route.response), "serialization"))
    refs, defs = models_json_schema(list(dict.fromkeys(wanted)), ref_template=REF)

    def schema_of(response: Any) -> dict[str, Any]:
        ref = dict(refs[(_response_model(response), "serialization")])
        return {"type": "array", "items": ref} if get_origin(response) is list else ref

    error = {"application/json": {"schema": dict(refs[(ErrorBody, "serialization")])}}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "operationId": route.handler.__name__,
            "summary": route.summary,
            "tags": [route.path.split("/")[2]],
            "parameters": _parameters(route),
            "responses": {
                str(route.status): {
                    "description": route.summary,
                    "content": {"application/json": {"schema": schema_of(route.response)}},
                },
                **{
                    str(s): {"description": _ERRORS[s], "content": error}
                    for s in route.error_statuses
                },
            },
        }
        if route.body is not None:
            operation["requestBody"] = {
                "required": route.body_required,
                "content": {"application/json": {"schema": dict(refs[(route.body, "validation")])}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": 'Every error is `{"error": {"code", "message"}}`.',
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                SECURITY: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the admin token (config, env, or <data-dir>/admin-token)",
                }
            },
        },
        "security": [{SECURITY: []}],
    }


def _response_model(response: Any) -> type[BaseModel]:
    model = get_args(response)[0] if get_origin(response) is list else response
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"a route responds with a model or list[model], not {response!r}")
    return model


def _parameters(route: Route) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in route.path_params
    ]
    if route.query is None:
        return params
    schema = route.query.model_json_schema()
    required = set(schema.get("required", ()))
    for name, field in schema["properties"].items():
        prop = {k: v for k, v in field.items() if k != "title" and (k, v) != ("default", None)}
        options = [o for o in prop.pop("anyOf", ()) if o != {"type": "null"}]
        if options:  # `str | None`: a query string has no null, only "absent"
            prop.update(options[0])
        param = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if "description" in prop:
            param["description"] = prop.pop("description")
        params.append(param)
    return params

"""The OpenAPI document of the FHIR routes (`/openapi.json`), completed from what they are.

FHIR handlers read their bodies raw (the raw input is kept, inbox first) and answer with
`FhirResponse`, so FastAPI alone documents neither request bodies nor responses. This fills
them in from each route's FHIR interaction (`adapters.fhir.capability.inventory`), without
overriding what a route documents itself:

- request bodies: the resource a create/update takes (`resourceType` fixed), a transaction or
  batch Bundle, a message Bundle for `$process-message`, a history Bundle for Subscription
  notifications, a JSON Patch for `PATCH`;
- success responses: a Bundle for searches, transactions and messages, the Task for Task
  read/update/patch, the stored resource (or an OperationOutcome) for creates and updates;
- errors: 400, 401, 403, 404, 406, 415, 422 (and 409, 412 for writes) as OperationOutcomes,
  all `application/fhir+json`, in place of FastAPI's 422 validation schema (the app answers
  validation errors 400 with an OperationOutcome);
- the bearer-token security scheme on every FHIR route but `/fhir/metadata`.

The schemas are deliberately loose (FHIR resources are large and open): they pin what a
client relies on (`resourceType`, Bundle `type` and `entry`, Task `status`, OperationOutcome
`issue`), and the conformance tests (schemathesis) check every answer against them.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from adapters.fhir.capability import FHIR_PREFIX, Interaction, inventory
from adapters.fhir.http import FHIR_JSON
from adapters.fhir.task_api import TASK_STATUS_CODES

__all__ = ["SCHEMAS", "install_openapi"]

_REF = "#/components/schemas/"
_CODING = {"type": "object", "additionalProperties": True}

SCHEMAS: dict[str, dict[str, Any]] = {
    "OperationOutcome": {
        "type": "object",
        "description": "FHIR R4 OperationOutcome: why a request failed, or what it did.",
        "required": ["resourceType", "issue"],
        "properties": {
            "resourceType": {"type": "string", "enum": ["OperationOutcome"]},
            "issue": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["severity", "code"],
                    "properties": {
                        "severity": {
                            "type": "string",
                            "enum": ["fatal", "error", "warning", "information"],
                        },
                        "code": {"type": "string"},
                        "diagnostics": {"type": "string"},
                        "expression": {"type": "array", "items": {"type": "string"}},
                        "location": {"type": "array", "items": {"type": "string"}},
                        "details": _CODING,
                    },
                },
            },
        },
    },
    "Resource": {
        "type": "object",
        "description": "A FHIR R4 resource (JSON); `resourceType` names its type.",
        "required": ["resourceType"],
        "properties": {
            "resourceType": {"type": "string"},
            "id": {"type": "string"},
            "meta": {"type": "object"},
        },
        "additionalProperties": True,
    },
    "Bundle": {
        "type": "object",
        "description": "A FHIR R4 Bundle.",
        "required": ["resourceType", "type"],
        "properties": {
            "resourceType": {"type": "string", "enum": ["Bundle"]},
            "id": {"type": "string"},
            "type": {
                "type": "string",
                "enum": [
                    "document",
                    "message",
                    "transaction",
                    "transaction-response",
                    "batch",
                    "batch-response",
                    "history",
                    "searchset",
                    "collection",
                ],
            },
            "total": {"type": "integer", "minimum": 0},
            "link": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["relation", "url"],
                    "properties": {"relation": {"type": "string"}, "url": {"type": "string"}},
                },
            },
            "entry": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "fullUrl": {"type": "string"},
                        "resource": {"$ref": _REF + "Resource"},
                        "request": {"type": "object"},
                        "response": {"type": "object"},
                        "search": {"type": "object"},
                    },
                },
            },
        },
        "additionalProperties": True,
    },
    "Task": {
        "type": "object",
        "description": "A recall Task (FHIR R4 Task).",
        "required": ["resourceType", "status", "intent"],
        "properties": {
            "resourceType": {"type": "string", "enum": ["Task"]},
            "id": {"type": "string"},
            "status": {"type": "string", "enum": list(TASK_STATUS_CODES)},
            "intent": {"type": "string"},
            "priority": {"type": "string"},
            "owner": {"type": "object"},
            "note": {"type": "array", "items": {"type": "object"}},
            "statusReason": {"type": "object"},
        },
        "additionalProperties": True,
    },
    "JsonPatch": {
        "type": "array",
        "description": "A JSON Patch (RFC 6902) of a Task, e.g. replace /status.",
        "items": {
            "type": "object",
            "required": ["op", "path"],
            "properties": {
                "op": {
                    "type": "string",
                    "enum": ["add", "remove", "replace", "move", "copy", "test"],
                },
                "path": {"type": "string"},
                "value": {},
                "from": {"type": "string"},
            },
        },
    },
    "CapabilityStatement": {
        "type": "object",
        "required": ["resourceType", "status", "kind", "fhirVersion", "format", "rest"],
        "properties": {
            "resourceType": {"type": "string", "enum": ["CapabilityStatement"]},
            "fhirVersion": {"type": "string"},
            "format": {"type": "array", "items": {"type": "string"}},
            "rest": {"type": "array", "items": {"type": "object"}},
        },
        "additionalProperties": True,
    },
}

_ERRORS = {
    "400": "Not valid: bad JSON, not a valid FHIR R4 resource, or a bad parameter",
    "401": "No valid bearer token",
    "403": "The token's roles do not allow this",
    "404": "No such resource (or one the caller may not see), or an unsupported type",
    "406": "Only FHIR JSON can be produced (_format or Accept asked for another format)",
}
_WRITE_ERRORS = {
    "409": "Conflict with the stored state (e.g. a status change not allowed from here)",
    "412": "Version conflict (If-Match)",
    "415": "The body is not JSON (XML is not supported)",
    "422": "Valid FHIR that fails a business check (a code outside its value set...)",
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF + name}


def _resource_of(resource_type: str) -> dict[str, Any]:
    return {
        "allOf": [
            _ref("Resource"),
            {
                "type": "object",
                "properties": {"resourceType": {"type": "string", "enum": [resource_type]}},
            },
        ]
    }


def _bundle_of(*types: str) -> dict[str, Any]:
    return {
        "allOf": [
            _ref("Bundle"),
            {"type": "object", "properties": {"type": {"type": "string", "enum": list(types)}}},
        ]
    }


def _request_body(found: list[Interaction]) -> tuple[dict[str, Any], str] | None:
    """(schema, media type) of the body an interaction takes."""
    first = found[0]
    codes = {i.code for i in found}
    if codes & {"transaction", "batch"}:
        return _bundle_of("transaction", "batch"), FHIR_JSON
    if first.code == "patch":
        return _ref("JsonPatch"), "application/json-patch+json"
    if first.code in ("create", "update") and first.resource_type:
        if len(found) == 1:
            return _resource_of(first.resource_type), FHIR_JSON
        return {"oneOf": [_resource_of(i.resource_type) for i in found]}, FHIR_JSON
    if first.code == "operation" and first.operation == "process-message":
        return _bundle_of("message"), FHIR_JSON
    if first.code == "operation" and "notification" in first.operation:
        return _bundle_of("history"), FHIR_JSON
    if first.code == "operation":
        return _ref("Resource"), FHIR_JSON
    return None


def _success(found: list[Interaction]) -> dict[str, Any]:
    first = found[0]
    if first.code in ("search-type", "transaction", "batch"):
        return _ref("Bundle")
    if first.code == "operation" and first.operation == "process-message":
        return {"oneOf": [_ref("Bundle"), _ref("OperationOutcome")]}
    if first.resource_type == "Task" and first.code in ("read", "update", "patch"):
        return {"oneOf": [_ref("Task"), _ref("OperationOutcome")]}
    return _ref("Resource")


def _vague(schema: Any) -> bool:
    """Whether a schema says no more than a JSON type (`{}`, `{"type": "object"}`, an
    array of those): a route's placeholder, completed here."""
    if not isinstance(schema, dict):
        return True
    if not set(schema) <= {"type", "items"}:
        return False
    return "items" not in schema or _vague(schema["items"])


def _empty(content: dict[str, Any] | None) -> bool:
    if not content:
        return True
    return all(_vague(media.get("schema")) for media in content.values())


_COUNT = {
    "name": "_count",
    "in": "query",
    "required": False,
    "description": "Entries per page.",
    "schema": {"type": "integer", "minimum": 0},
}
_PARAM_SCHEMAS = {
    "date": {"type": "string", "pattern": r"^(eq|ne|gt|lt|ge|le|sa|eb|ap)?\d{4}(-\d{2}){0,2}"},
}


def _query_parameters(operation: dict[str, Any], found: list[Interaction]) -> None:
    """Document a search route's parameters (its handler reads the raw query)."""
    if not found or found[0].code != "search-type":
        return
    parameters: list[dict[str, Any]] = operation.setdefault("parameters", [])
    named = {p.get("name") for p in parameters if p.get("in") == "query"}
    for param in found[0].search_params:
        if param.name in named:
            continue
        parameters.append(
            {
                "name": param.name,
                "in": "query",
                "required": False,
                "description": f"({param.type}) {param.documentation}".strip(),
                "schema": copy.deepcopy(_PARAM_SCHEMAS.get(param.type, {"type": "string"})),
            }
        )
    if "_count" not in named:
        parameters.append(copy.deepcopy(_COUNT))


def _document_operation(
    operation: dict[str, Any], method: str, found: list[Interaction], public: bool
) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    validation = responses.get("422", {}).get("content", {}).get("application/json", {})
    if validation.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
        del responses["422"]
    if method in ("post", "put", "patch"):
        body = operation.get("requestBody")
        if body is None or _empty(body.get("content")):
            documented = _request_body(found) if found else None
            if documented is not None:
                schema, media_type = documented
                content = {media_type: {"schema": schema}}
                if media_type == FHIR_JSON:
                    content["application/json"] = {"schema": copy.deepcopy(schema)}
                operation["requestBody"] = {"required": True, "content": content}
    _query_parameters(operation, found)
    success = _success(found) if found else _ref("Resource")
    success_codes = [code for code in responses if code.startswith("2")] or ["200"]
    for code in success_codes:
        answer = responses.setdefault(code, {"description": "Successful Response"})
        if _empty(answer.get("content")):
            answer["content"] = {FHIR_JSON: {"schema": success}}
    if found and found[0].code == "create":
        responses.setdefault(
            "201", {"description": "Created", "content": {FHIR_JSON: {"schema": success}}}
        )
    errors = {} if public else dict(_ERRORS)
    errors["406"] = _ERRORS["406"]
    errors["400"] = _ERRORS["400"]
    if method in ("post", "put", "patch"):
        errors.update(_WRITE_ERRORS)
    for code, text in sorted(errors.items()):
        answer = responses.setdefault(code, {"description": text})
        if _empty(answer.get("content")):
            answer["content"] = {FHIR_JSON: {"schema": _ref("OperationOutcome")}}
    if not public:
        operation.setdefault("security", [{"bearer": []}])


def document(schema: dict[str, Any], app: FastAPI) -> dict[str, Any]:
    """Complete an OpenAPI document of `app` for its FHIR routes (in place; returned)."""
    found = inventory(app.routes)
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name, body in SCHEMAS.items():
        schemas.setdefault(name, copy.deepcopy(body))
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "A safetynet token (safetynet tokens create) or a JWT (--jwks-url).",
    }
    for path, item in schema.get("paths", {}).items():
        if path != FHIR_PREFIX and not path.startswith(FHIR_PREFIX + "/"):
            continue
        for method, operation in item.items():
            if not isinstance(operation, dict) or method not in (
                "get",
                "post",
                "put",
                "patch",
                "delete",
            ):
                continue
            mine = [i for i in found.interactions if i.path == path and i.method == method.upper()]
            _document_operation(operation, method, mine, public=path == FHIR_PREFIX + "/metadata")
    metadata = schema.get("paths", {}).get(FHIR_PREFIX + "/metadata", {}).get("get")
    if metadata:
        metadata["responses"]["200"]["content"] = {
            FHIR_JSON: {"schema": _ref("CapabilityStatement")}
        }
    return schema


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (and so `/openapi.json`) return the completed document."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = document(schema, app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override

"""`GET /fhir/metadata`: the CapabilityStatement, generated from the routes the app serves.

What the server supports is read from the FastAPI routes mounted under `/fhir` (`inventory`),
so the statement cannot drift from the code: a route added, removed or given another method
changes it. Each route's path and method is read as a FHIR RESTful interaction:

    POST [base]                      transaction and batch (system)
    POST [base]/$op                  system operation (e.g. $process-message)
    POST [base]/Type                 create        GET [base]/Type        search-type
    GET  [base]/Type/{id}            read          PUT [base]/Type/{id}   update
    PATCH [base]/Type/{id}           patch         DELETE [base]/Type/{id} delete
    POST [base]/Type/$op, [base]/Type/{id}/$op     type and instance operations

A path parameter in the type position (`/{resource_type}`) is read through its annotation
(an Enum or a Literal of the type names). A search route's parameters are the
`SEARCH_PARAMETERS` its module declares (`((name, type, documentation), ...)`, what the
handler reads from the raw query), else its declared query parameters (FHIR's result
parameters such as `_count` are not search parameters). A route
under /fhir that reads as none of these is listed in `Inventory.unread`; the tests keep that
list empty, so a new kind of route must be taught here before it ships.

The statement is public (no token): a client reads it before it has one. It is validated with
the fhir.resources R4B CapabilityStatement model when first built.
"""

from __future__ import annotations

import enum
import re
import sys
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fastapi.routing
from fastapi import APIRouter, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fhir.resources.R4B.capabilitystatement import CapabilityStatement

from adapters import package_version
from adapters.fhir.http import FHIR_JSON, FhirResponse

__all__ = [
    "FHIR_PREFIX",
    "Interaction",
    "Inventory",
    "SearchParam",
    "capability_statement",
    "inventory",
    "router",
]

FHIR_PREFIX = "/fhir"
FHIR_VERSION = "4.0.1"

router = APIRouter(tags=["FHIR: capabilities"])

_TYPE = re.compile(r"^[A-Z][A-Za-z]+$")
_PARAM = re.compile(r"^\{([^}:]+)(?::[^}]*)?\}$")
# Search result parameters: how results are shaped, not what is searched for.
RESULT_PARAMETERS = frozenset(
    {
        "_count",
        "_sort",
        "_include",
        "_revinclude",
        "_summary",
        "_total",
        "_elements",
        "_contained",
        "_containedType",
        "_format",
        "_pretty",
        "_getpages",
        "_getpagesoffset",
        "_page",
        "_offset",
        "page",
    }
)
# The FHIR R4 definitions of the search parameters a route may take (Task's, and common ones).
_SEARCH_TYPES: dict[str, str] = {
    "_id": "token",
    "_lastUpdated": "date",
    "_tag": "token",
    "_profile": "uri",
    "_security": "token",
    "authored-on": "date",
    "based-on": "reference",
    "business-status": "token",
    "code": "token",
    "encounter": "reference",
    "focus": "reference",
    "group-identifier": "token",
    "identifier": "token",
    "intent": "token",
    "modified": "date",
    "owner": "reference",
    "part-of": "reference",
    "patient": "reference",
    "performer": "token",
    "period": "date",
    "priority": "token",
    "requester": "reference",
    "status": "token",
    "subject": "reference",
}
_INTERACTION_ORDER = (
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
)
_OPERATION_DEFINITIONS = {
    "process-message": "http://hl7.org/fhir/OperationDefinition/MessageHeader-process-message",
}


@dataclass(frozen=True, slots=True)
class Interaction:
    """One route read as FHIR: `code` is a FHIR interaction code (read, create,
    search-type, transaction...) or "operation" (then `operation` names it, without `$`)."""

    method: str
    path: str
    code: str
    resource_type: str = ""
    operation: str = ""
    search_params: tuple[SearchParam, ...] = ()
    summary: str = ""


@dataclass(frozen=True, slots=True)
class SearchParam:
    """A search parameter a route takes: its name, FHIR type and what it does."""

    name: str
    type: str
    documentation: str = ""


@dataclass(frozen=True)
class Inventory:
    """What the routes under /fhir offer, and the routes that could not be read."""

    interactions: tuple[Interaction, ...]
    unread: tuple[str, ...] = ()
    routes: tuple[tuple[str, str], ...] = field(default=())

    def resource_types(self) -> list[str]:
        """The resource types with at least one interaction, sorted."""
        return sorted({i.resource_type for i in self.interactions if i.resource_type})

    def of(self, resource_type: str) -> list[Interaction]:
        """The interactions on one resource type."""
        return [i for i in self.interactions if i.resource_type == resource_type]


def _query_names(dependant: Dependant) -> list[str]:
    names = [param.alias for param in dependant.query_params]
    for sub in dependant.dependencies:
        names.extend(_query_names(sub))
    return list(dict.fromkeys(names))


def _search_params(route: APIRoute) -> tuple[SearchParam, ...]:
    """What a search route takes: its module's SEARCH_PARAMETERS, else its query params."""
    module = sys.modules.get(getattr(route.endpoint, "__module__", ""))
    declared = getattr(module, "SEARCH_PARAMETERS", None)
    if declared:
        return tuple(SearchParam(str(n), str(t), str(d)) for n, t, d in declared)
    return tuple(
        SearchParam(name, _SEARCH_TYPES.get(name, "string"))
        for name in _query_names(route.dependant)
        if name not in RESULT_PARAMETERS
    )


def _enumerated(route: APIRoute, name: str) -> list[str]:
    """The values a path parameter may take: its Enum's or Literal's, else none."""
    for param in route.dependant.path_params:
        if param.name != name:
            continue
        annotation = param.field_info.annotation
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            return [str(member.value) for member in annotation]
        if typing.get_origin(annotation) is typing.Literal:
            return [str(value) for value in typing.get_args(annotation)]
    return []


def _types_at(route: APIRoute, segment: str) -> list[str]:
    if _TYPE.match(segment):
        return [segment]
    param = _PARAM.match(segment)
    if param:
        return [t for t in _enumerated(route, param.group(1)) if _TYPE.match(t)]
    return []


def _read_route(route: APIRoute, method: str, relative: str) -> list[Interaction] | None:
    """The interactions one route and method offer; None when it reads as none."""
    parts = [p for p in relative.split("/") if p]
    path = FHIR_PREFIX + relative
    if not parts:
        if method == "POST":
            return [Interaction(method, path, "transaction"), Interaction(method, path, "batch")]
        return None
    if len(parts) == 1 and parts[0] == "metadata":
        return [] if method == "GET" else None
    if len(parts) == 1 and parts[0].startswith("$"):
        return [
            Interaction(
                method, path, "operation", operation=parts[0][1:], summary=route.summary or ""
            )
        ]
    types = _types_at(route, parts[0])
    if not types:
        return None
    rest = parts[1:]
    is_id = bool(rest) and _PARAM.match(rest[0]) is not None
    code = ""
    operation = ""
    if not rest:
        code = {"POST": "create", "GET": "search-type"}.get(method, "")
    elif rest == ["_search"] and method == "POST":
        code = "search-type"
    elif rest == ["_history"] and method == "GET":
        code = "history-type"
    elif len(rest) == 1 and rest[0].startswith("$"):
        code, operation = "operation", rest[0][1:]
    elif is_id and len(rest) == 1:
        code = {"GET": "read", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
            method, ""
        )
    elif is_id and len(rest) == 2 and rest[1].startswith("$"):
        code, operation = "operation", rest[1][1:]
    elif is_id and rest[1:] == ["_history"] and method == "GET":
        code = "history-instance"
    elif is_id and len(rest) == 3 and rest[1] == "_history" and method == "GET":
        code = "vread"
    if not code:
        return None
    params = _search_params(route) if code == "search-type" else ()
    return [
        Interaction(method, path, code, t, operation, params, route.summary or "") for t in types
    ]


def _api_routes(routes: Iterable[Any]) -> Iterator[tuple[str, set[str], APIRoute]]:
    """(full path, methods, route) of every APIRoute, routers included (FastAPI keeps an
    included router as one lazy entry of `app.routes`; `iter_route_contexts` opens it).
    Routes left out of the OpenAPI document (the answer to unsupported types) are no
    capability and are skipped."""
    contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    if contexts is None:  # older FastAPI: included routes are copied into app.routes
        for route in routes:
            if isinstance(route, APIRoute) and route.include_in_schema:
                yield route.path, set(route.methods or ()), route
        return
    for context in contexts(list(routes)):
        original = context.original_route
        if isinstance(original, APIRoute) and context.path and original.include_in_schema:
            yield context.path, set(context.methods or ()), original


def inventory(routes: Iterable[Any], prefix: str = FHIR_PREFIX) -> Inventory:
    """Read every route under `prefix` as FHIR interactions."""
    found: list[Interaction] = []
    unread: list[str] = []
    seen: list[tuple[str, str]] = []
    for path, methods, route in _api_routes(routes):
        if path != prefix and not path.startswith(prefix + "/"):
            continue
        for method in sorted(methods - {"HEAD", "OPTIONS"}):
            seen.append((method, path))
            read = _read_route(route, method, path[len(prefix) :])
            if read is None:
                unread.append(f"{method} {path}")
            else:
                found.extend(read)
    return Inventory(tuple(found), tuple(unread), tuple(seen))


def _search_param(param: SearchParam, resource_type: str) -> dict[str, Any]:
    name = param.name
    entry: dict[str, Any] = {"name": name, "type": param.type}
    if name.startswith("_"):
        entry["definition"] = f"http://hl7.org/fhir/SearchParameter/Resource-{name[1:]}"
    elif name in _SEARCH_TYPES:
        entry["definition"] = f"http://hl7.org/fhir/SearchParameter/{resource_type}-{name}"
    if param.documentation:
        entry["documentation"] = param.documentation
    return entry


def _operation(name: str, interactions: Sequence[Interaction]) -> dict[str, Any]:
    definition = _OPERATION_DEFINITIONS.get(name, f"urn:safetynet:operation:{name}")
    entry: dict[str, Any] = {"name": name, "definition": definition}
    summaries = [i.summary for i in interactions if i.operation == name and i.summary]
    if summaries:
        entry["documentation"] = summaries[0]
    return entry


def _resource(resource_type: str, interactions: Sequence[Interaction]) -> dict[str, Any]:
    codes = {i.code for i in interactions}
    entry: dict[str, Any] = {
        "type": resource_type,
        "interaction": [{"code": c} for c in _INTERACTION_ORDER if c in codes],
    }
    if "update" in codes:
        entry["versioning"] = "versioned"
        entry["readHistory"] = False
        # Inbound resources keep the sender's ids: PUT to a new id creates it.
        entry["updateCreate"] = "create" in codes or "read" not in codes
    params = list(dict.fromkeys(p for i in interactions for p in i.search_params))
    if params:
        entry["searchParam"] = [_search_param(p, resource_type) for p in params]
    operations = sorted({i.operation for i in interactions if i.code == "operation"})
    if operations:
        entry["operation"] = [_operation(o, interactions) for o in operations]
    if not entry["interaction"]:
        del entry["interaction"]
    return entry


SECURITY_TEXT = (
    "Every endpoint but /fhir/metadata needs a bearer token (Authorization: Bearer ...): a "
    "token issued by `safetynet tokens create`, or a JWT validated against the configured "
    "JWKS when one is set. Not SMART on FHIR: no SMART scopes or launch context; access "
    "follows the token's roles: feed (send resources and messages), clinician (read Tasks, "
    "change the ones they own), safeguarding (also read safeguarding Tasks), governance "
    "(read every Task) and admin (everything). 401 without a valid token, 403 without the "
    "role; both answered with an OperationOutcome."
)


def capability_statement(
    found: Inventory, *, base_url: str = "", date: datetime | None = None
) -> dict[str, Any]:
    """The CapabilityStatement (FHIR R4, JSON) of what `found` offers, validated."""
    system: list[dict[str, Any]] = []
    for code in ("transaction", "batch", "search-system", "history-system"):
        if any(i.code == code and not i.resource_type for i in found.interactions):
            system.append({"code": code})
    system_ops = sorted(
        {i.operation for i in found.interactions if i.code == "operation" and not i.resource_type}
    )
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": (
            "safetynet's FHIR R4 server: clinical resources in (stored inbox-first and mapped "
            "to the same canonical events as HL7 v2), recall Tasks out to clinicians."
        ),
        "security": {
            "cors": False,
            "service": [
                {
                    "coding": [
                        {
                            "system": (
                                "http://terminology.hl7.org/CodeSystem/restful-security-service"
                            ),
                            "code": "OAuth",
                            "display": "OAuth",
                        }
                    ],
                    "text": "Bearer tokens (not SMART on FHIR)",
                }
            ],
            "description": SECURITY_TEXT,
        },
        "resource": [_resource(t, found.of(t)) for t in found.resource_types()],
    }
    if system:
        rest["interaction"] = system
    if system_ops:
        rest["operation"] = [_operation(o, found.interactions) for o in system_ops]
    when = (date or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    statement: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        "id": "safetynet",
        "name": "SafetynetFhirServer",
        "title": "safetynet FHIR R4 server",
        "status": "active",
        "experimental": False,
        "date": when.isoformat().replace("+00:00", "Z"),
        "publisher": "safetynet",
        "description": (
            "Exactly what this server supports: the interactions, search parameters and "
            "operations below, FHIR JSON only."
        ),
        "kind": "instance",
        "software": {"name": "safetynet", "version": package_version()},
        "implementation": {"description": "safetynet FHIR R4 API"},
        "fhirVersion": FHIR_VERSION,
        "format": ["json", FHIR_JSON],
        "rest": [rest],
    }
    if any(i.code == "patch" for i in found.interactions):
        statement["patchFormat"] = ["application/json-patch+json"]
    if base_url:
        statement["implementation"]["url"] = base_url
    CapabilityStatement.model_validate(statement)
    return statement


def _base_url(request: Request) -> str:
    configured = getattr(getattr(request.app.state, "fhir", None), "base_url", "")
    if configured:
        return str(configured).rstrip("/")
    return str(request.base_url).rstrip("/") + FHIR_PREFIX


@router.get(
    "/metadata",
    summary="The CapabilityStatement: exactly what this server supports (no token needed)",
    response_class=FhirResponse,
)
def metadata(request: Request) -> FhirResponse:
    """The CapabilityStatement, built from the app's routes once per base URL (the base URL
    comes from the request, unless `--public-base-url` fixes it)."""
    state = request.app.state
    statements: dict[str, dict[str, Any]] | None = getattr(state, "fhir_capability", None)
    if statements is None:
        statements = state.fhir_capability = {}
    base_url = _base_url(request)
    statement = statements.get(base_url)
    if statement is None:
        found = inventory(request.app.routes)
        statement = capability_statement(found, base_url=base_url)
        if len(statements) < 16:  # a few names for one server; never grow without bound
            statements[base_url] = statement
    return FhirResponse(statement)

"""FHIR resources in over HTTP: create, update, transaction/batch and $process-message.

    POST /fhir/{type}              create (type: Encounter, ServiceRequest, DiagnosticReport,
                                   ImagingStudy, Patient, Flag); the sender's id is kept
    PUT  /fhir/{type}/{id}         update (or create: the ids are the sending server's)
    POST /fhir                     a transaction (all or nothing) or batch Bundle
    POST /fhir/$process-message    a message Bundle (FHIR messaging, synchronous)

Every write needs the `feed` role (admin passes). Each request is stored inbox-first by
`adapters.fhir.inbound.FhirIngest` (which documents idempotency, versions, references and
Bundles) with group commit (`adapters.fhir.committer`: concurrent requests share one
transaction, each in its own savepoint), answered once committed, and the worker is woken
(`FhirApi.notify`, once per commit) to process it. Answers (application/fhir+json):

* 201 Created (new) or 200 OK (new version, or a redelivery answered as the first time), with
  Location `[base]/Type/id/_history/N` and ETag `W/"N"`; the body as `Prefer: return=` asks:
  `representation` (the default: the resource as stored, meta.versionId N), `minimal` (no
  body) or `OperationOutcome` (what was done);
* a transaction-response or batch-response Bundle (200), a response message (200);
* errors as OperationOutcomes: 400 not JSON / not FHIR / an invalid resource (or a PUT whose
  body id is not the URL's), 404 a resource type not taken (in a batch entry or message
  entry; at the URL level, an unknown path), 415 not JSON, 422 a failed business check.
  The input is kept (quarantine, or "unsupported") whatever the answer.

Handlers are async: they read the raw body, hand the write to the group committer's thread
and await its commit (no pool thread is held while waiting). The answer is built on the event
loop, or in the thread pool for a large body.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from adapters.fhir.committer import GroupCommitter
from adapters.fhir.context import FhirApi, fhir_api
from adapters.fhir.http import FhirHttpError, FhirResponse, operation_outcome
from adapters.fhir.inbound import BundleResult, FhirIngest, FhirResult
from adapters.fhir.mapping import SUPPORTED, FhirMappingError, parse_json
from adapters.service.auth import Principal, require
from adapters.store import SqlUnitOfWork

__all__ = ["router"]

router = APIRouter(tags=["FHIR: resources in"])

Feed = Annotated[Principal, Depends(require("feed"))]
Api = Annotated[FhirApi, Depends(fhir_api)]
_STORED: dict[int | str, dict[str, Any]] = {
    200: {"description": "Stored: a new version, or a redelivery answered as the first time"},
    201: {"description": "Created: stored for processing"},
}
# Bodies up to this size are answered from the event loop; larger ones from the thread pool
# (encoding a large answer would hold up every other request on the loop).
_INLINE_ANSWER_BYTES = 64 * 1024


def _ingest(request: Request, api: FhirApi) -> FhirIngest:
    """The app's accept-only FhirIngest (the worker holds the processing one)."""
    state = request.app.state
    ingest: FhirIngest | None = getattr(state, "fhir_ingest", None)
    if ingest is None or ingest.mapper is not api.mapper:
        ingest = state.fhir_ingest = FhirIngest(api.mapper)
    return ingest


def _committer(request: Request, api: FhirApi) -> GroupCommitter:
    """The app's group committer on the API's store (made on first use; the event loop is
    the only caller, so no lock is needed)."""
    state = request.app.state
    committer: GroupCommitter | None = getattr(state, "fhir_committer", None)
    if committer is None or committer.store is not api.store:
        committer = state.fhir_committer = GroupCommitter(
            api.store, after_commit=api.notify, on_writing=api.on_writing
        )
    return committer


def _base(request: Request, api: FhirApi) -> str:
    if api.base_url:
        return api.base_url.rstrip("/")
    return str(request.base_url).rstrip("/") + "/fhir"


def _origin(request: Request) -> str:
    client = request.client
    return f"http:{client.host}" if client is not None else "http"


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _prefer(request: Request) -> str:
    """The `return` preference (RFC 7240): minimal, representation or OperationOutcome."""
    for part in request.headers.get("prefer", "").split(","):
        name, _, value = part.partition("=")
        if name.strip().lower() == "return":
            return value.strip().strip('"')
    return "representation"


def _stored_view(resource: Mapping[str, Any], result: FhirResult) -> dict[str, Any]:
    """The resource as this server holds it: its id (given, or assigned) and version."""
    view = dict(resource)
    view["id"] = result.resource_id
    meta = view.get("meta")
    meta = dict(meta) if isinstance(meta, Mapping) else {}
    meta["versionId"] = str(result.version)
    view["meta"] = meta
    return view


def _resource_answer(
    request: Request, api: FhirApi, result: FhirResult, resource: Mapping[str, Any] | None
) -> Response:
    if not result.ok:
        return FhirResponse(
            result.outcome or operation_outcome("refused"), status_code=result.status
        )
    headers = {
        "Location": f"{_base(request, api)}/{result.location}",
        "ETag": f'W/"{result.version}"',
    }
    prefer = _prefer(request)
    if prefer == "minimal":
        return Response(status_code=result.status, headers=headers)
    if prefer == "OperationOutcome" or resource is None:
        again = " (received before: no second effect)" if result.duplicate else ""
        body = operation_outcome(
            f"stored as {result.location}{again}; it is processed in arrival order",
            code="informational",
            severity="information",
        )
        return FhirResponse(body, status_code=result.status, headers=headers)
    return FhirResponse(_stored_view(resource, result), status_code=result.status, headers=headers)


async def _write(
    request: Request,
    api: FhirApi,
    caller: Principal,
    raw: bytes,
    resource_type: str,
    resource_id: str | None,
) -> Response:
    ingest = _ingest(request, api)
    received_at, origin, media_type = api.now(), _origin(request), _media_type(request)

    def accept(uow: SqlUnitOfWork) -> FhirResult:
        return ingest.accept_body(
            uow,
            raw,
            received_at,
            sender=caller.subject,
            resource_type=resource_type,
            resource_id=resource_id,
            origin=origin,
            media_type=media_type,
        )

    result = await _committer(request, api).run(accept)
    if len(raw) > _INLINE_ANSWER_BYTES:
        return await run_in_threadpool(_resource_answer_of, request, api, result, raw)
    return _resource_answer_of(request, api, result, raw)


def _resource_answer_of(request: Request, api: FhirApi, result: FhirResult, raw: bytes) -> Response:
    resource = result.resource
    if result.ok and resource is None:  # a redelivery: the body is what was stored
        try:
            resource = parse_json(raw)
        except FhirMappingError:
            resource = None
    return _resource_answer(request, api, result, resource)


async def _bundle(
    request: Request, api: FhirApi, caller: Principal, raw: bytes, message: bool
) -> Response:
    ingest = _ingest(request, api)
    received_at, origin, media_type = api.now(), _origin(request), _media_type(request)
    base_url = _base(request, api)

    def accept(uow: SqlUnitOfWork) -> BundleResult:
        return ingest.accept_bundle(
            uow,
            raw,
            received_at,
            sender=caller.subject,
            origin=origin,
            message=message,
            base_url=base_url,
            media_type=media_type,
        )

    done = await _committer(request, api).run(accept)
    if len(raw) > _INLINE_ANSWER_BYTES:
        return await run_in_threadpool(FhirResponse, done.body, done.status)
    return FhirResponse(done.body, status_code=done.status)


def _create(resource_type: str) -> Callable[..., Coroutine[Any, Any, Response]]:
    async def create(request: Request, api: Api, caller: Feed) -> Response:
        raw = await request.body()
        return await _write(request, api, caller, raw, resource_type, None)

    create.__name__ = f"create_{resource_type}"
    create.__doc__ = (
        f"Store a {resource_type} for processing (201 Created; its id, when it has one, is "
        "kept: the sending server's)."
    )
    return create


def _update(resource_type: str) -> Callable[..., Coroutine[Any, Any, Response]]:
    async def update(resource_id: str, request: Request, api: Api, caller: Feed) -> Response:
        raw = await request.body()
        return await _write(request, api, caller, raw, resource_type, resource_id)

    update.__name__ = f"update_{resource_type}"
    update.__doc__ = (
        f"Store a new version of a {resource_type} (201 Created for one not seen before, "
        "200 for an update); the body's id must be the URL's."
    )
    return update


def install_routes(target: APIRouter) -> None:
    """The create and update routes, one per supported type (explicit paths: a parameter in
    the type position would shadow other routers' paths)."""
    for kind in SUPPORTED:
        target.add_api_route(
            f"/{kind}",
            _create(kind),
            methods=["POST"],
            summary=f"Create a {kind} (stored inbox-first, then processed)",
            response_class=FhirResponse,
            responses=_STORED,
        )
        target.add_api_route(
            f"/{kind}/{{resource_id}}",
            _update(kind),
            methods=["PUT"],
            summary=f"Update (or create) a {kind} by its id",
            response_class=FhirResponse,
            responses=_STORED,
        )


install_routes(router)


@router.post(
    "",
    summary="A transaction (all or nothing) or batch Bundle of resources",
    response_class=FhirResponse,
)
async def transaction_or_batch(request: Request, api: Api, caller: Feed) -> Response:
    """A transaction is judged whole (one bad entry: 400 naming `Bundle.entry[i]`, nothing
    stored but the Bundle, for review); a batch takes each entry on its own."""
    raw = await request.body()
    return await _bundle(request, api, caller, raw, False)


@router.post(
    "/$process-message",
    summary="A FHIR message (Bundle of type message, MessageHeader first), synchronously",
    response_class=FhirResponse,
)
async def process_message(request: Request, api: Api, caller: Feed) -> Response:
    """The response message (MessageHeader.response code ok, with an OperationOutcome of what
    was stored and ignored); a message that cannot be taken is answered with an
    OperationOutcome (400, 422) and kept for review."""
    raw = await request.body()
    return await _bundle(request, api, caller, raw, True)


# Types with routes of their own in another router (a write to them is 405, not "unsupported").
_SERVED_ELSEWHERE = frozenset({"Task"})


class _ResourceType(Convertor[str]):
    """A path segment that looks like a FHIR resource type (`Observation`), so that the
    fallback never answers for other paths (`/fhir/no-such-thing` stays a plain 404)."""

    regex = "[A-Z][A-Za-z]{1,63}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("fhir_type", _ResourceType())

fallback = APIRouter()
"""Requests for a resource type safetynet does not serve: included after every other router,
so it never shadows a served path. A write (POST, PUT) is still kept (inbox, state unsupported)
and answered 404 not-supported, as an unsupported HL7 v2 type is kept and answered; any other
method is 404 (405 for Task, which has other methods). Not in the CapabilityStatement or the
OpenAPI document: it is the answer to what is not supported."""

_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


async def _unsupported(
    request: Request, api: FhirApi, caller: Principal, resource_type: str, resource_id: str | None
) -> Response:
    if resource_type in _SERVED_ELSEWHERE:
        raise FhirHttpError(
            405,
            f"Method Not Allowed: {request.method} is not supported for {resource_type}",
            code="not-supported",
        )
    if request.method not in ("POST", "PUT") or (request.method == "PUT") != bool(resource_id):
        raise FhirHttpError(404, "Not Found", code="not-found")
    return await _write(request, api, caller, await request.body(), resource_type, resource_id)


@fallback.api_route("/{resource_type:fhir_type}", methods=_METHODS, include_in_schema=False)
async def type_not_served(resource_type: str, request: Request, api: Api, caller: Feed) -> Response:
    """A type not served: a POST is kept and answered 404 not-supported."""
    return await _unsupported(request, api, caller, resource_type, None)


@fallback.api_route(
    "/{resource_type:fhir_type}/{resource_id}", methods=_METHODS, include_in_schema=False
)
async def instance_not_served(
    resource_type: str, resource_id: str, request: Request, api: Api, caller: Feed
) -> Response:
    """An instance of a type not served: a PUT is kept and answered 404 not-supported."""
    return await _unsupported(request, api, caller, resource_type, resource_id)

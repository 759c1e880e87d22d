"""FHIR R4 resources in: inbox first, as HL7 v2 (adapters.ingest), one resource per inbox row.

Two steps, as for HL7 v2:

* **accept** (the HTTP handler, or a Subscription notification, in the caller's transaction;
  answered once it commits): the resource is validated (R4B model, the codes the engine relies
  on, mapping to canonical events, its literal references resolved) and stored raw in the inbox
  with protocol "fhir"; or kept there, refused, with the reason (quarantine for content that is
  wrong, state "unsupported" for what safetynet does not take). Nothing here runs the rules.
* **process** (`process_stored`, the worker): the stored resource is mapped again, with the
  references it was resolved with when accepted, and applied by the shared processor exactly
  as an HL7 v2 message is (`Hl7Ingest.process`: a savepoint, due timers first, quarantine and
  "record incomplete" marks on a refusal).

**Idempotency.** The inbox key is (sender, control id, content hash): sender the caller (the
principal's subject, a Subscription's name); control id "Type/id/_history/versionId" when the
resource carries an id and a meta.versionId, else "Type/id", else "" (a resource without id
is known by its content alone); content the SHA-256 of the resource's canonical JSON (keys
sorted, no spaces: a redelivery that only re-indents is the same content). A redelivery is
answered with the answer stored the first time (`fhir_inbox`) and has no second effect; one
refused the first time is judged again (what it names may have come since) and, if taken
now, its review item is settled and it is processed: its first effect.

**Versions.** `fhir_resources` keeps, per sender and resource, the current version: `version`
counts the versions stored here (the Location `Type/id/_history/N` answered; 1 = created,
201), `version_id` the sender's meta.versionId. A resource without id gets one from its
content hash. The last version received is the current one (as HL7 v2: the engine judges by
event times, not by arrival).

**Literal references** ("Patient/123", a full URL ending so, "Encounter/abc") are resolved
against what the same sender sent before (ids belong to the sending server), and, in a
Bundle, against its own entries first (`bundle_references`: fullUrl, urn:uuid, Type/id). What
a reference resolved to is stored with the inbox row, so the worker maps the resource exactly
as it was judged at accept time, whatever arrived in between. A reference to a resource never
received resolves to nothing: the reference's own identifier is used when it has one; an
order, a report or a study is then linked through its order numbers (as an HL7 v2 result
without PID); an Encounter, a Flag or a Patient link must name its patient, so it is refused
(422, kept in quarantine): send the Patient first, or in the same transaction. A quarantined
resource sent back to the worker (`safetynet quarantine retry`) is resolved against what has
arrived since.

**Bundles.** The Bundle itself is stored raw (its own inbox row, "Bundle <type>") and each
entry that is taken becomes an inbox row of its own, stored as the entry's canonical JSON; the
Bundle's row is then in state "split" (nothing left to process). A transaction is judged
whole before anything is stored: one bad entry and only the Bundle is kept, quarantined, and
the answer names `Bundle.entry[i]`. A batch takes each entry on its own. A message ($process-
message) is judged whole like a transaction; entries of types safetynet does not use
(Practitioner, Organization...) and entries it does not take (a non-imaging order, a Flag
that is not about safeguarding) are ignored, and said so in the response. Entries are taken
in Bundle order (a feed's history may carry two versions of one resource).

Answers carry HTTP statuses (`FhirResult.status`): 201/200 stored, 400 not FHIR R4 JSON or
an invalid resource, 404 a resource type safetynet does not take, 415 not JSON, 422 valid FHIR
that fails a business check (a code outside its value set, an element the engine needs
missing or unresolvable, content safetynet does not take). Error texts name elements, never
values (adapters.fhir.mapping).
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from http import HTTPStatus
from typing import Any, NamedTuple

from sqlalchemy import Connection, bindparam, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

from adapters.fhir.mapping import (
    SUPPORTED,
    BundleReferences,
    FhirMapper,
    FhirMappingError,
    Mapped,
    bundle_references,
    parse_json,
    validate_resource,
)
from adapters.ingest import Hl7Ingest, IngestResult, content_hash
from adapters.store.schema import fhir_inbox, fhir_resources, inbox, quarantine
from adapters.store.sql import SqlUnitOfWork, prepare
from engine.events import Event, Patient, PatientIdentifier
from engine.ports import InboundMessage, UnitOfWork

__all__ = [
    "PROTOCOL",
    "SPLIT",
    "BundleResult",
    "FhirIngest",
    "FhirResult",
    "canonical_json",
    "control_id_of",
    "resource_hash",
]

PROTOCOL = "fhir"
SPLIT = "split"  # inbox state of a Bundle whose entries were stored as rows of their own
UNREADABLE = "(unreadable)"  # message_type of a body that is not a JSON object
_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
BUNDLE_TYPES = frozenset(
    {
        "document",
        "message",
        "transaction",
        "transaction-response",
        "batch",
        "batch-response",
        "history",
        "searchset",
        "collection",
    }
)
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_RESOLVED_TYPES = ("Patient", "Encounter")


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FhirResult:
    """What became of one resource, and the HTTP answer it earns.

    `status`: 201 (a new resource stored), 200 (a new version of one; a redelivery is
    answered as the first time), 400 (not a valid FHIR R4 resource), 404 (a resource type
    safetynet does not take), 415 (not JSON), 422 (valid FHIR that fails a business check: a
    code outside its value set, an element the engine needs missing or naming nothing usable,
    content safetynet does not take). `location`: "Type/id/_history/N" once stored;
    `outcome`: the OperationOutcome of an error (None on success); `events`: the canonical
    events, when accepted for processing (None for a refusal or a redelivery); `resource`:
    the resource as read, when accepted for processing (what an HTTP answer may echo)."""

    status: int
    resource_type: str = ""
    resource_id: str = ""
    version: int = 0
    inbox_id: int | None = None
    duplicate: bool = False
    outcome: Mapping[str, Any] | None = None
    events: tuple[Event, ...] | None = None
    resource: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        """Stored for processing (now or the first time)."""
        return self.status < 300

    @property
    def location(self) -> str:
        """The stored version, "Type/id/_history/N"; "" for a refusal."""
        if not self.ok or not self.version:
            return ""
        return f"{self.resource_type}/{self.resource_id}/_history/{self.version}"


@dataclass(frozen=True, slots=True)
class BundleResult:
    """What became of a Bundle (transaction, batch or message) and the answer: `status` and
    `body` (a response Bundle, or the OperationOutcome of a refusal). `entries`: the result of
    each entry stored (empty for a redelivery: its stored answer is the body)."""

    status: int
    body: Mapping[str, Any]
    inbox_id: int | None = None
    duplicate: bool = False
    entries: tuple[FhirResult, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class _Judged:
    """One resource judged (nothing written): mapped, or refused with an HTTP status."""

    kind: str
    mapped: Mapped | None = None
    refs: BundleReferences = field(default_factory=lambda: BundleReferences({}, {}))
    error: FhirMappingError | None = None
    status: int = 200


class _Unchanged(Exception):
    """A redelivered Bundle that is refused again: undo the attempt."""


class _EntryRefused(Exception):
    """A Bundle entry that cannot even be read as a create or update."""

    def __init__(self, status: int, error: FhirMappingError) -> None:
        super().__init__(error.reason)
        self.status = status
        self.error = error


# --- pure helpers --------------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """JSON text with keys sorted and no spaces: what the content hash is taken of."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def resource_hash(resource: Any) -> str:
    """The content half of duplicate detection: SHA-256 of the canonical JSON."""
    return content_hash(canonical_json(resource))


def _plain_str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _fhir_id(value: Any) -> str:
    """`value` if it is a valid FHIR id (what may go in a control id and its index), else ""."""
    return value if isinstance(value, str) and _FHIR_ID.match(value) else ""


def _type_of(resource: Mapping[str, Any]) -> str:
    """The resourceType if it reads as a type name (else "": it is never echoed or stored)."""
    kind = resource.get("resourceType")
    return kind if isinstance(kind, str) and _TYPE_NAME.match(kind) else ""


def control_id_of(resource: Mapping[str, Any]) -> str:
    """The control id: "Type/id/_history/versionId", else "Type/id", else "" (known by
    content alone). An id that is not a valid FHIR id counts as none (it never reaches the
    inbox key)."""
    kind, rid = _type_of(resource), _fhir_id(resource.get("id"))
    if not kind or not rid:
        return ""
    meta = resource.get("meta")
    version = _fhir_id(meta.get("versionId")) if isinstance(meta, Mapping) else ""
    return f"{kind}/{rid}/_history/{version}" if version else f"{kind}/{rid}"


def _safe(value: Any) -> Any:
    """JSON for a JSON column: NUL replaced in every string (PostgreSQL's JSONB refuses it)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, Mapping):
        return {_safe(k): _safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_safe(v) for v in value]
    return value


def _text(body: bytes | str) -> str:
    """A body as stored: UTF-8 (a BOM dropped, undecodable bytes replaced), NUL replaced
    (PostgreSQL text cannot hold it)."""
    text = body.decode("utf-8-sig", errors="replace") if isinstance(body, bytes) else body
    return text.replace("\x00", "\ufffd")


def _read_body(raw: str, media_type: str) -> Mapping[str, Any]:
    """A request body as a JSON object: `media_type` (the Content-Type without parameters)
    must be a JSON type ("" reads it as JSON). FhirMappingError "not-supported" for another
    type or XML, "invalid" for what is not a JSON object."""
    kind = media_type.strip().lower()
    if kind and not (kind.startswith("application/") and kind.endswith(("/json", "+json"))):
        raise FhirMappingError(
            "the body must be FHIR JSON (Content-Type application/fhir+json)", "", "not-supported"
        )
    return parse_json(raw)


def _status_of(error: FhirMappingError, kind: str) -> int:
    if error.code == "not-supported":
        return 404 if kind not in SUPPORTED else 422
    if error.code == "invalid" or error.location in ("", "resourceType"):
        return 400
    return 422


def _references_in(value: Any) -> Iterator[str]:
    """Every `reference` string in a resource (contained resources included)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            for key, inner in item.items():
                if key == "reference" and isinstance(inner, str):
                    yield inner
                elif isinstance(inner, Mapping | list):
                    stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)


def _literal(reference: str) -> tuple[str, str] | None:
    """(type, id) of a literal reference ("Patient/1", a full URL, "/_history/n" dropped)."""
    if reference.startswith(("#", "urn:")):
        return None
    parts = reference.partition("/_history/")[0].split("?", 1)[0].rstrip("/").split("/")
    if len(parts) >= 2 and _TYPE_NAME.match(parts[-2]) and parts[-1]:
        return parts[-2], parts[-1]
    return None


def _known(reference: str, known: Mapping[str, Any]) -> Any:
    if reference in known:
        return known[reference]
    head, sep, _ = reference.partition("/_history/")
    return known.get(head) if sep else None


def _patient_json(patient: Patient) -> dict[str, Any]:
    return {
        "identifiers": [
            [i.value, i.system, i.type_code, i.is_nhs_number] for i in patient.identifiers
        ],
        "birth": patient.birth.isoformat() if patient.birth else None,
        "sex": patient.sex,
    }


def _refs_json(refs: BundleReferences) -> dict[str, Any]:
    return {
        "patients": {ref: _patient_json(p) for ref, p in refs.patients.items()},
        "encounters": dict(refs.encounters),
    }


def _in_entry(index: int, location: str, kind: str) -> str:
    """A resource's FHIRPath location ("Encounter.subject") as seen from its Bundle."""
    where = f"Bundle.entry[{index}]"
    if not location:
        return where
    if location.startswith("Bundle."):
        return location
    head, dot, rest = location.partition(".")
    if head == kind or _TYPE_NAME.match(head):
        return f"{where}.resource{dot}{rest}"
    return f"{where}.resource.{location}"


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def _issue(severity: str, code: str, diagnostics: str, where: str = "") -> dict[str, Any]:
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    if where:
        issue["expression"] = [where]
    return issue


def _outcome(*issues: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": list(issues)}


def _entry_outcome(
    index: int, error: FhirMappingError, kind: str, tail: str = ""
) -> dict[str, Any]:
    where = f"Bundle.entry[{index}]"
    return _outcome(
        _issue(
            "error",
            error.code,
            f"{where}: {error.reason}{tail}",
            _in_entry(index, error.location, kind),
        )
    )


def _entry_request(index: int, entry: Any) -> tuple[Mapping[str, Any], str, str | None]:
    """(resource, type, id or None) of a transaction or batch entry that creates (POST
    "Type") or updates (PUT "Type/id") a resource. Raises _EntryRefused otherwise."""
    where = f"Bundle.entry[{index}]"
    if not isinstance(entry, Mapping):
        raise _EntryRefused(400, FhirMappingError("a Bundle entry must be an object", where))
    request = entry.get("request")
    if not isinstance(request, Mapping):
        raise _EntryRefused(
            400,
            FhirMappingError(
                "request is missing: a transaction or batch entry says what to do",
                f"{where}.request",
                "required",
            ),
        )
    method, url = request.get("method"), request.get("url")
    if method not in ("POST", "PUT"):
        raise _EntryRefused(
            405,
            FhirMappingError(
                "request.method: only POST (create) and PUT (update) are supported",
                f"{where}.request.method",
                "not-supported",
            ),
        )
    resource = entry.get("resource")
    if not isinstance(resource, Mapping):
        raise _EntryRefused(
            400,
            FhirMappingError(
                "resource is missing or not an object", f"{where}.resource", "required"
            ),
        )
    if not isinstance(url, str) or not url.strip():
        raise _EntryRefused(
            400, FhirMappingError("request.url is missing", f"{where}.request.url", "required")
        )
    if "?" in url:
        raise _EntryRefused(
            400,
            FhirMappingError(
                "request.url: conditional create or update is not supported",
                f"{where}.request.url",
                "not-supported",
            ),
        )
    parts = url.strip().rstrip("/").split("/")
    if method == "POST" and parts and _TYPE_NAME.match(parts[-1]):
        return resource, parts[-1], None
    if method == "PUT" and len(parts) >= 2 and _TYPE_NAME.match(parts[-2]) and parts[-1]:
        return resource, parts[-2], parts[-1]
    raise _EntryRefused(
        400,
        FhirMappingError(
            "request.url must be Type (POST) or Type/id (PUT)", f"{where}.request.url"
        ),
    )


# --- the ingest ----------------------------------------------------------------------------


class FhirIngest:
    """Takes FHIR R4 resources into the inbox and, from there, through the processor.

    `applier`: the HL7 v2 ingest whose `process` applies events (the shared processor and
    processing clock); needed by `process_stored` only, so the HTTP side may leave it out."""

    def __init__(self, mapper: FhirMapper, applier: Hl7Ingest | None = None) -> None:
        self.mapper = mapper
        self._applier = applier

    # --- accept: one resource ---------------------------------------------------------

    def accept_resource(
        self,
        uow: UnitOfWork,
        resource: Mapping[str, Any],
        received_at: datetime,
        *,
        sender: str,
        origin: str = "",
        references: BundleReferences | None = None,
    ) -> FhirResult:
        """Validate one resource (R4B model, the codes the engine needs, mapping to events,
        its literal references resolved against the resources received before) and store it
        in the inbox (protocol "fhir") inside `uow`, or keep it in quarantine with the reason.

        `sender`: who sent it (the caller's principal subject; a Subscription's name);
        `origin`: where it came from ("http:127.0.0.1", a notification...); `references`:
        what the other entries of the Bundle it came in name (`bundle_references`), tried
        before the stored resources. Stored as its canonical JSON. Redelivery of the same
        content is a duplicate: answered the same, no second effect. The caller commits `uow`
        and then wakes the worker (`FhirApi.notify`). Never raises for bad content: the
        answer is in the result."""
        return self._accept(
            uow, resource, canonical_json(resource), received_at, sender, origin, references
        )

    def accept_body(
        self,
        uow: UnitOfWork,
        body: bytes | str,
        received_at: datetime,
        *,
        sender: str,
        resource_type: str,
        resource_id: str | None = None,
        origin: str = "",
        media_type: str = "",
    ) -> FhirResult:
        """`POST /fhir/{resource_type}` (`resource_id` None) or `PUT .../{resource_id}`: the
        body as received is what is stored. `media_type`: the request's Content-Type without
        parameters ("" reads the body as JSON); anything but JSON is refused with 415."""
        raw = _text(body)
        try:
            resource = _read_body(raw, media_type)
        except FhirMappingError as exc:
            status = 415 if exc.code == "not-supported" else 400
            return self._keep_unreadable(uow, raw, received_at, sender, origin, exc, status)
        return self._accept(
            uow,
            resource,
            raw,
            received_at,
            sender,
            origin,
            None,
            expect_type=resource_type,
            expect_id=resource_id,
        )

    def _accept(
        self,
        uow: UnitOfWork,
        resource: Mapping[str, Any],
        raw: str,
        received_at: datetime,
        sender: str,
        origin: str,
        references: BundleReferences | None,
        *,
        expect_type: str = "",
        expect_id: str | None = None,
        judged: _Judged | None = None,
    ) -> FhirResult:
        kind = _type_of(resource)
        digest = resource_hash(resource)
        entry = uow.add_to_inbox(
            InboundMessage(
                raw,
                sender,
                control_id_of(resource),
                digest,
                received_at,
                PROTOCOL,
                kind or UNREADABLE,
                origin,
            )
        )
        again = entry.duplicate
        if again:
            answered = self._answered(uow, entry.id, kind)
            if answered.ok:
                return answered
        if judged is None:
            judged = self._judge(
                uow, resource, received_at, sender, references, expect_type, expect_id
            )
        rid = _plain_str(resource.get("id"))
        if judged.error is not None or judged.mapped is None:
            assert judged.error is not None
            if again:
                return answered  # refused as the first time: nothing changes
            return self._refuse(uow, entry.id, judged.error, judged.status, received_at, kind, rid)
        if again:
            # Refused when it first came (e.g. its patient had not come yet), taken now: its
            # first effect. The review item is settled; the worker takes the row.
            _take_again(uow, entry.id, received_at)
        rid = rid or digest[:32]
        version = self._register(
            uow, sender, kind, rid, resource, judged.mapped, digest, entry.id, received_at
        )
        status = 201 if version == 1 else 200
        self._answer(uow, entry.id, status, kind, rid, version, {}, _refs_json(judged.refs))
        return FhirResult(
            status,
            kind,
            rid,
            version,
            entry.id,
            events=tuple(judged.mapped.events),
            resource=resource,
        )

    def _judge(
        self,
        uow: UnitOfWork,
        resource: Mapping[str, Any],
        received_at: datetime,
        sender: str,
        references: BundleReferences | None,
        expect_type: str = "",
        expect_id: str | None = None,
    ) -> _Judged:
        """Validate and map one resource, its references resolved; writes nothing."""
        kind = _plain_str(resource.get("resourceType"))
        try:
            if expect_type and kind != expect_type:
                if not kind:
                    raise FhirMappingError(
                        "the resource has no resourceType", "resourceType", "required"
                    )
                raise FhirMappingError(
                    f"resourceType must be {expect_type} here", "resourceType", "invalid"
                )
            if expect_id is not None and resource.get("id") != expect_id:
                raise FhirMappingError(
                    f"{kind}.id must be the id in the URL (an update names its resource twice)",
                    f"{kind}.id",
                    "invalid",
                )
            refs = self._resolve(uow, resource, sender, references)
            mapped = self.mapper.read(
                resource, received_at, patients=refs.patients, encounters=refs.encounters
            )
        except FhirMappingError as exc:
            return _Judged(kind, error=exc, status=_status_of(exc, kind))
        return _Judged(kind, mapped=mapped, refs=refs)

    def _keep_unreadable(
        self,
        uow: UnitOfWork,
        raw: str,
        received_at: datetime,
        sender: str,
        origin: str,
        error: FhirMappingError,
        status: int,
        message_type: str = UNREADABLE,
    ) -> FhirResult:
        """Keep a body that is not a JSON object (or not JSON at all), refused."""
        entry = uow.add_to_inbox(
            InboundMessage(
                raw, sender, "", content_hash(raw), received_at, PROTOCOL, message_type, origin
            )
        )
        if entry.duplicate:
            return self._answered(uow, entry.id, "")
        return self._refuse(uow, entry.id, error, status, received_at, "", "")

    def _refuse(
        self,
        uow: UnitOfWork,
        inbox_id: int,
        error: FhirMappingError,
        status: int,
        at: datetime,
        kind: str,
        rid: str,
        outcome: Mapping[str, Any] | None = None,
    ) -> FhirResult:
        """Keep a refused message: "unsupported" (what safetynet does not take: the sender
        was told, nobody needs to review it) or quarantined (content that is wrong)."""
        answer = dict(outcome or error.outcome())
        if error.code == "not-supported":
            uow.set_inbox_state(inbox_id, "unsupported", error.reason)
        else:
            uow.quarantine(
                inbox_id,
                error.reason,
                error.ack_code,
                error.location,
                {"status": status, "code": error.code},
                at,
            )
            uow.set_inbox_state(inbox_id, "quarantined", error.reason)
        self._answer(uow, inbox_id, status, kind, rid, 0, answer, {})
        return FhirResult(status, kind, rid, 0, inbox_id, outcome=answer)

    # --- accept: Bundles --------------------------------------------------------------

    def accept_bundle(
        self,
        uow: UnitOfWork,
        body: bytes | str,
        received_at: datetime,
        *,
        sender: str,
        origin: str = "",
        message: bool = False,
        base_url: str = "",
        media_type: str = "",
    ) -> BundleResult:
        """`POST /fhir` (a transaction or batch Bundle) or, with `message`, `POST
        /fhir/$process-message` (a message Bundle): the Bundle is stored raw, then split
        into its entries (see the module docstring). `base_url`: this server's FHIR base,
        the response message's source; `media_type` as for `accept_body`. A redelivery gets
        the stored answer."""
        raw = _text(body)
        try:
            bundle = _read_body(raw, media_type)
        except FhirMappingError as exc:
            status = 415 if exc.code == "not-supported" else 400
            kept = self._keep_unreadable(uow, raw, received_at, sender, origin, exc, status)
            return BundleResult(kept.status, kept.outcome or {}, kept.inbox_id, kept.duplicate)
        kind = _plain_str(bundle.get("type"))
        entry = uow.add_to_inbox(
            InboundMessage(
                raw,
                sender,
                control_id_of(bundle),
                resource_hash(bundle),
                received_at,
                PROTOCOL,
                f"Bundle {kind}" if kind in BUNDLE_TYPES else "Bundle",
                origin,
            )
        )
        if not entry.duplicate:
            return self._split(
                uow, entry.id, bundle, received_at, sender, origin, message, base_url
            )
        status, answer = self._stored_answer(uow, entry.id) or (200, _outcome())
        if status < 300:
            return BundleResult(status, answer, entry.id, duplicate=True)
        # Refused the first time: taken if it can be now (what it names may have come since).
        try:
            with uow.savepoint():
                done = self._split(
                    uow, entry.id, bundle, received_at, sender, origin, message, base_url
                )
                if done.status >= 300:
                    raise _Unchanged
        except _Unchanged:
            return BundleResult(status, answer, entry.id, duplicate=True)
        _take_again(uow, entry.id, received_at, state=SPLIT)
        return done

    def _split(
        self,
        uow: UnitOfWork,
        envelope: int,
        bundle: Mapping[str, Any],
        received_at: datetime,
        sender: str,
        origin: str,
        message: bool,
        base_url: str,
    ) -> BundleResult:
        kind = _plain_str(bundle.get("type"))
        try:
            if bundle.get("resourceType") != "Bundle":
                raise FhirMappingError(
                    "not a Bundle: send a resource to POST /fhir/{type}", "resourceType"
                )
            if message and kind != "message":
                raise FhirMappingError(
                    "$process-message takes a Bundle of type message", "Bundle.type"
                )
            if not message and kind not in ("transaction", "batch"):
                hint = " (a message goes to $process-message)" if kind == "message" else ""
                raise FhirMappingError(
                    f"POST /fhir takes a Bundle of type transaction or batch{hint}",
                    "Bundle.type",
                    "not-supported" if kind else "required",
                )
            entries = bundle.get("entry", [])
            if not isinstance(entries, list):
                raise FhirMappingError("Bundle.entry must be a list", "Bundle.entry")
        except FhirMappingError as exc:
            status = 422 if exc.code == "not-supported" else 400
            return self._bundle_refused(uow, envelope, status, exc.outcome(), exc, received_at)
        try:
            refs = bundle_references(bundle, self.mapper)
        except FhirMappingError:
            refs = BundleReferences({}, {})  # an entry that is not an object: judged below
        args = (uow, envelope, bundle, entries, refs, received_at, sender, origin)
        if message:
            return self._message(*args, base_url=base_url)
        if kind == "transaction":
            return self._transaction(*args)
        return self._batch(*args)

    def _transaction(
        self,
        uow: UnitOfWork,
        envelope: int,
        bundle: Mapping[str, Any],
        entries: Sequence[Any],
        refs: BundleReferences,
        received_at: datetime,
        sender: str,
        origin: str,
    ) -> BundleResult:
        """All or nothing: every entry judged before any is stored."""
        judged: list[tuple[Mapping[str, Any], _Judged]] = []
        tail = "; nothing in the transaction was stored"
        for n, entry in enumerate(entries):
            try:
                resource, kind, rid = _entry_request(n, entry)
            except _EntryRefused as exc:
                outcome = _entry_outcome(n, exc.error, "", tail)
                return self._bundle_refused(uow, envelope, 400, outcome, exc.error, received_at)
            verdict = self._judge(uow, resource, received_at, sender, refs, kind, rid)
            if verdict.error is not None:
                outcome = _entry_outcome(n, verdict.error, verdict.kind, tail)
                return self._bundle_refused(uow, envelope, 400, outcome, verdict.error, received_at)
            judged.append((resource, verdict))
        results = [
            self._accept(
                uow, r, canonical_json(r), received_at, sender, origin, refs, judged=verdict
            )
            for r, verdict in judged
        ]
        body = {
            "resourceType": "Bundle",
            "type": "transaction-response",
            "entry": [{"response": self._entry_response(r, received_at)} for r in results],
        }
        return self._bundle_done(uow, envelope, 200, body, results)

    def _batch(
        self,
        uow: UnitOfWork,
        envelope: int,
        bundle: Mapping[str, Any],
        entries: Sequence[Any],
        refs: BundleReferences,
        received_at: datetime,
        sender: str,
        origin: str,
    ) -> BundleResult:
        """Each entry on its own: stored, or refused (and kept) with its own outcome."""
        results: list[FhirResult] = []
        for n, entry in enumerate(entries):
            try:
                resource, kind, rid = _entry_request(n, entry)
            except _EntryRefused as exc:
                raw = _text(canonical_json(entry))
                outcome = _entry_outcome(n, exc.error, "")
                results.append(
                    self._keep_unreadable(
                        uow, raw, received_at, sender, origin, exc.error, exc.status, "entry"
                    )
                    if exc.error.code != "not-supported"
                    else self._keep_unsupported_entry(
                        uow, raw, received_at, sender, origin, exc, outcome
                    )
                )
                continue
            results.append(
                self._accept(
                    uow,
                    resource,
                    canonical_json(resource),
                    received_at,
                    sender,
                    origin,
                    refs,
                    expect_type=kind,
                    expect_id=rid,
                )
            )
        body = {
            "resourceType": "Bundle",
            "type": "batch-response",
            "entry": [{"response": self._entry_response(r, received_at)} for r in results],
        }
        return self._bundle_done(uow, envelope, 200, body, [r for r in results if r.ok])

    def _keep_unsupported_entry(
        self,
        uow: UnitOfWork,
        raw: str,
        received_at: datetime,
        sender: str,
        origin: str,
        refused: _EntryRefused,
        outcome: Mapping[str, Any],
    ) -> FhirResult:
        entry = uow.add_to_inbox(
            InboundMessage(
                raw, sender, "", content_hash(raw), received_at, PROTOCOL, "entry", origin
            )
        )
        if entry.duplicate:
            return self._answered(uow, entry.id, "")
        return self._refuse(
            uow, entry.id, refused.error, refused.status, received_at, "", "", outcome
        )

    def _message(
        self,
        uow: UnitOfWork,
        envelope: int,
        bundle: Mapping[str, Any],
        entries: Sequence[Any],
        refs: BundleReferences,
        received_at: datetime,
        sender: str,
        origin: str,
        *,
        base_url: str,
    ) -> BundleResult:
        """A FHIR message: the MessageHeader first, then the resources it carries. Judged
        whole; entries safetynet does not use are ignored (and listed as such)."""
        first = entries[0] if entries else None
        header = first.get("resource") if isinstance(first, Mapping) else None
        try:
            if not isinstance(header, Mapping) or header.get("resourceType") != "MessageHeader":
                raise FhirMappingError(
                    "the first entry of a message must be its MessageHeader",
                    "Bundle.entry[0].resource",
                    "required",
                )
            validate_resource(header, "MessageHeader")
        except FhirMappingError as exc:
            outcome = _entry_outcome(0, exc, "MessageHeader")
            return self._bundle_refused(uow, envelope, 400, outcome, exc, received_at)
        notes: list[dict[str, Any]] = []
        judged: list[tuple[int, Mapping[str, Any], _Judged]] = []
        for n, entry in enumerate(entries[1:], start=1):
            where = f"Bundle.entry[{n}]"
            resource = entry.get("resource") if isinstance(entry, Mapping) else None
            if not isinstance(resource, Mapping):
                notes.append(_issue("information", "informational", f"{where}: no resource"))
                continue
            kind = _type_of(resource)
            if kind not in SUPPORTED:
                notes.append(
                    _issue(
                        "information",
                        "informational",
                        f"{where}: resource type {kind or '(none)'} is not used by safetynet; "
                        "ignored",
                        where,
                    )
                )
                continue
            verdict = self._judge(uow, resource, received_at, sender, refs)
            if verdict.error is not None and verdict.error.code == "not-supported":
                notes.append(
                    _issue(
                        "warning",
                        "not-supported",
                        f"{where}: {verdict.error.reason}; ignored",
                        _in_entry(n, verdict.error.location, kind),
                    )
                )
                continue
            if verdict.error is not None:
                outcome = _entry_outcome(n, verdict.error, kind, "; the message was not taken")
                return self._bundle_refused(
                    uow, envelope, verdict.status, outcome, verdict.error, received_at
                )
            judged.append((n, resource, verdict))
        results: list[FhirResult] = []
        for n, resource, verdict in judged:
            result = self._accept(
                uow,
                resource,
                canonical_json(resource),
                received_at,
                sender,
                origin,
                refs,
                judged=verdict,
            )
            results.append(result)
            notes.append(
                _issue(
                    "information",
                    "informational",
                    f"Bundle.entry[{n}]: stored as {result.location}"
                    + (" (received before)" if result.duplicate else ""),
                    f"Bundle.entry[{n}]",
                )
            )
        body = self._response_message(bundle, header, envelope, notes, received_at, base_url)
        return self._bundle_done(uow, envelope, 200, body, results)

    @staticmethod
    def _response_message(
        bundle: Mapping[str, Any],
        header: Mapping[str, Any],
        envelope: int,
        notes: list[dict[str, Any]],
        received_at: datetime,
        base_url: str,
    ) -> dict[str, Any]:
        """The response message (FHIR messaging): a MessageHeader whose `response` names the
        request's MessageHeader (code ok) and an OperationOutcome of what was done."""
        request_id = (
            _plain_str(header.get("id"))
            or _plain_str(bundle.get("id"))
            or resource_hash(bundle)[:32]
        )
        seed = f"safetynet:{envelope}:{request_id}"
        header_id = str(uuid.uuid5(uuid.NAMESPACE_URL, seed + ":header"))
        outcome_id = str(uuid.uuid5(uuid.NAMESPACE_URL, seed + ":outcome"))
        response: dict[str, Any] = {
            "resourceType": "MessageHeader",
            "id": header_id,
            "source": {"name": "safetynet", "endpoint": f"{base_url}/$process-message"},
            "response": {
                "identifier": request_id,
                "code": "ok",
                "details": {"reference": f"urn:uuid:{outcome_id}"},
            },
            "focus": [{"reference": f"urn:uuid:{outcome_id}"}],
        }
        for key in ("eventCoding", "eventUri"):
            if key in header:
                response[key] = header[key]
        source = header.get("source")
        if isinstance(source, Mapping) and isinstance(source.get("endpoint"), str):
            response["destination"] = [{"endpoint": source["endpoint"]}]
        if not notes:
            notes.append(_issue("information", "informational", "nothing to store"))
        return {
            "resourceType": "Bundle",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, seed + ":bundle")),
            "type": "message",
            "timestamp": received_at.isoformat(),
            "entry": [
                {"fullUrl": f"urn:uuid:{header_id}", "resource": response},
                {
                    "fullUrl": f"urn:uuid:{outcome_id}",
                    "resource": {**_outcome(*notes), "id": outcome_id},
                },
            ],
        }

    @staticmethod
    def _entry_response(result: FhirResult, received_at: datetime) -> dict[str, Any]:
        if not result.ok:
            return {"status": _status_line(result.status), "outcome": result.outcome}
        return {
            "status": _status_line(result.status),
            "location": result.location,
            "etag": f'W/"{result.version}"',
            "lastModified": received_at.isoformat(),
        }

    def _bundle_refused(
        self,
        uow: UnitOfWork,
        envelope: int,
        status: int,
        outcome: Mapping[str, Any],
        error: FhirMappingError,
        at: datetime,
    ) -> BundleResult:
        issue = outcome["issue"][0]
        reason = str(issue.get("diagnostics", error.reason))
        location = (issue.get("expression") or [""])[0]
        if error.code == "not-supported":
            uow.set_inbox_state(envelope, "unsupported", reason)
        else:
            detail = {"status": status, "code": error.code}
            uow.quarantine(envelope, reason, error.ack_code, location, detail, at)
            uow.set_inbox_state(envelope, "quarantined", reason)
        self._answer(uow, envelope, status, "Bundle", "", 0, dict(outcome), {})
        return BundleResult(status, outcome, envelope)

    def _bundle_done(
        self,
        uow: UnitOfWork,
        envelope: int,
        status: int,
        body: Mapping[str, Any],
        results: Sequence[FhirResult],
    ) -> BundleResult:
        uow.set_inbox_state(envelope, SPLIT, f"{len(results)} entries stored as inbox rows")
        self._answer(uow, envelope, status, "Bundle", "", 0, dict(body), {})
        return BundleResult(status, body, envelope, entries=tuple(results))

    # --- process ----------------------------------------------------------------------

    def process_stored(
        self, uow: UnitOfWork, inbox_id: int, raw: str, received_at: datetime
    ) -> IngestResult:
        """Process one FHIR inbox row (the live worker calls it): map the resource again,
        with the references it was resolved with when accepted, and apply its events as an
        HL7 v2 message's are. A row that was refused when accepted and sent back to the
        worker from quarantine is judged again against what has arrived since (a Bundle is
        split again). Fails closed as `Hl7Ingest.process`."""
        if self._applier is None:
            raise RuntimeError("this FhirIngest accepts only: it was built without an applier")
        sql, statements = _prepared(uow)
        ((sender, origin),) = sql.run_prepared(statements.inbox_row, {"inbox_id": inbox_id})
        found = sql.run_prepared(statements.answer_refs, {"inbox_id": inbox_id})
        record = _Record(*found[0]) if found else None
        try:
            resource = parse_json(raw)
        except FhirMappingError as exc:
            return self._failed(uow, inbox_id, exc, received_at)
        if resource.get("resourceType") == "Bundle":
            return self._resplit(uow, inbox_id, resource, received_at, sender, origin)
        accepted = record is not None and record.status < 300
        kind = _plain_str(resource.get("resourceType"))
        try:
            if record is not None and accepted:
                refs = self._refs_from(record.refs)
            else:
                refs = self._resolve(uow, resource, sender, None)
            mapped = self.mapper.read(
                resource, received_at, patients=refs.patients, encounters=refs.encounters
            )
        except FhirMappingError as exc:
            return self._failed(uow, inbox_id, exc, received_at)
        if not accepted:
            # Refused when it came, taken now (a retry from quarantine): it exists from now.
            digest = resource_hash(resource)
            rid = _plain_str(resource.get("id")) or digest[:32]
            version = self._register(
                uow, sender, kind, rid, resource, mapped, digest, inbox_id, received_at
            )
            self._answer(
                uow,
                inbox_id,
                201 if version == 1 else 200,
                kind,
                rid,
                version,
                {},
                _refs_json(refs),
            )
        accepted_as = IngestResult(
            "AA",
            control_id=control_id_of(resource),
            message_type=kind,
            inbox_id=inbox_id,
            sender=sender,
        )
        return self._applier.process(uow, inbox_id, mapped.events, received_at, accepted_as)

    def _resplit(
        self,
        uow: UnitOfWork,
        inbox_id: int,
        bundle: Mapping[str, Any],
        received_at: datetime,
        sender: str,
        origin: str,
    ) -> IngestResult:
        """A Bundle sent back from quarantine: split it again (its entries become inbox
        rows of their own, processed next), or refuse it again."""
        message = bundle.get("type") == "message"
        done = self._split(uow, inbox_id, bundle, received_at, sender, origin, message, "")
        if done.status < 300:
            return IngestResult(
                "AA",
                control_id=control_id_of(bundle),
                message_type="Bundle",
                reason=f"split into {len(done.entries)} resources",
                inbox_id=inbox_id,
                sender=sender,
            )
        issue = done.body.get("issue", [{}])[0]
        return IngestResult(
            "AE",
            message_type="Bundle",
            reason=str(issue.get("diagnostics", "")),
            location=str((issue.get("expression") or [""])[0]),
            hl7_code="207",
            inbox_id=inbox_id,
            sender=sender,
        )

    @staticmethod
    def _failed(
        uow: UnitOfWork, inbox_id: int, error: FhirMappingError, at: datetime
    ) -> IngestResult:
        """Accepted earlier, refused now (a retry after a change of code or settings)."""
        uow.quarantine(inbox_id, error.reason, error.ack_code, error.location, {}, at)
        uow.set_inbox_state(inbox_id, "quarantined", error.reason)
        return IngestResult(
            error.ack_code,
            reason=error.reason,
            location=error.location,
            hl7_code="207",
            inbox_id=inbox_id,
        )

    # --- the FHIR tables --------------------------------------------------------------

    def _resolve(
        self,
        uow: UnitOfWork,
        resource: Mapping[str, Any],
        sender: str,
        references: BundleReferences | None,
    ) -> BundleReferences:
        """What the resource's literal Patient and Encounter references resolve to: the
        Bundle's entries first, then the resources this sender sent before."""
        patients: dict[str, Patient] = {}
        encounters: dict[str, str] = {}
        wanted: dict[tuple[str, str], list[str]] = {}
        for ref in set(_references_in(resource)):
            if references is not None:
                patient = _known(ref, references.patients)
                if patient is not None:
                    patients[ref] = patient
                    continue
                visit = _known(ref, references.encounters)
                if visit:
                    encounters[ref] = visit
                    continue
            literal = _literal(ref)
            if literal is not None and literal[0] in _RESOLVED_TYPES:
                wanted.setdefault(literal, []).append(ref)
        if wanted:
            sql, statements = _prepared(uow)
            for (kind, rid), refs in wanted.items():
                key = {"sender": sender, "resource_type": kind, "resource_id": rid}
                for patient_json, visit in sql.run_prepared(statements.resolve, key):
                    for ref in refs:
                        if kind == "Patient" and patient_json:
                            patients[ref] = self._patient_from(patient_json)
                        elif kind == "Encounter" and visit:
                            encounters[ref] = visit
        return BundleReferences(patients, encounters)

    def _patient_from(self, data: Mapping[str, Any]) -> Patient:
        birth = data.get("birth")
        return Patient(
            identifiers=tuple(
                PatientIdentifier(str(v), str(s), str(t), bool(n))
                for v, s, t, n in data.get("identifiers", [])
            ),
            birth=(
                datetime.fromisoformat(birth).astimezone(self.mapper.settings.timezone)
                if isinstance(birth, str)
                else None
            ),
            sex=str(data.get("sex", "")),
        )

    def _refs_from(self, data: Mapping[str, Any]) -> BundleReferences:
        return BundleReferences(
            {ref: self._patient_from(p) for ref, p in (data.get("patients") or {}).items()},
            {ref: str(v) for ref, v in (data.get("encounters") or {}).items()},
        )

    @staticmethod
    def _register(
        uow: UnitOfWork,
        sender: str,
        kind: str,
        rid: str,
        resource: Mapping[str, Any],
        mapped: Mapped,
        digest: str,
        inbox_id: int,
        received_at: datetime,
    ) -> int:
        """Make this the current version of the resource; its version number here."""
        sql, statements = _prepared(uow)
        meta = resource.get("meta")
        values = {
            "version_id": _plain_str(meta.get("versionId")) if isinstance(meta, Mapping) else "",
            "content_hash": digest,
            "inbox_id": inbox_id,
            "patient": _safe(_patient_json(mapped.patient)) if mapped.patient else None,
            "visit_number": mapped.visit_number.replace("\x00", "\ufffd"),
            "last_updated": mapped.last_updated or received_at,
        }
        params = {"sender": sender, "resource_type": kind, "resource_id": rid, **values}
        ((version,),) = sql.run_prepared(statements.register, params)
        return int(version)

    @staticmethod
    def _answer(
        uow: UnitOfWork,
        inbox_id: int,
        status: int,
        kind: str,
        rid: str,
        version: int,
        answer: Mapping[str, Any],
        refs: Mapping[str, Any],
    ) -> None:
        """Record what an inbox row was answered (replacing an earlier answer: a retry)."""
        sql, statements = _prepared(uow)
        sql.run_prepared(statements.forget_answer, {"inbox_id": inbox_id})
        sql.run_prepared(
            statements.answer,
            {
                "inbox_id": inbox_id,
                "status": status,
                "resource_type": kind,
                "resource_id": rid,
                "version": version,
                "answer": _safe(dict(answer)),
                "refs": _safe(dict(refs)),
            },
        )

    @staticmethod
    def _stored_answer(uow: UnitOfWork, inbox_id: int) -> tuple[int, dict[str, Any]] | None:
        row = (
            _connection(uow)
            .execute(
                select(fhir_inbox.c.status, fhir_inbox.c.answer).where(
                    fhir_inbox.c.inbox_id == inbox_id
                )
            )
            .first()
        )
        return (int(row.status), dict(row.answer)) if row is not None else None

    @staticmethod
    def _answered(uow: UnitOfWork, inbox_id: int, kind: str) -> FhirResult:
        """The answer a redelivery gets: the one stored the first time."""
        c = fhir_inbox.c
        row = (
            _connection(uow)
            .execute(
                select(c.status, c.resource_type, c.resource_id, c.version, c.answer).where(
                    c.inbox_id == inbox_id
                )
            )
            .first()
        )
        if row is None:  # stored by something other than this ingest: say it is known
            return FhirResult(200, kind, inbox_id=inbox_id, duplicate=True)
        return FhirResult(
            int(row.status),
            row.resource_type,
            row.resource_id,
            int(row.version),
            inbox_id,
            duplicate=True,
            outcome=dict(row.answer) if row.status >= 300 else None,
        )


def _take_again(uow: UnitOfWork, inbox_id: int, at: datetime, state: str = "received") -> None:
    """A refused message redelivered and taken: its open review items are settled and its
    row goes to `state` ("received": the worker takes it)."""
    conn = _connection(uow)
    conn.execute(
        update(quarantine)
        .where(quarantine.c.inbox_id == inbox_id, quarantine.c.resolved_at.is_(None))
        .values(resolved_at=at, resolution="taken when sent again")
    )
    if state == "received":
        conn.execute(
            update(inbox)
            .where(inbox.c.id == inbox_id)
            .values(state=state, attempts=0, detail="taken when sent again")
        )


_KEY = ("sender", "resource_type", "resource_id")
_CURRENT = ("version_id", "content_hash", "inbox_id", "patient", "visit_number", "last_updated")
_ANSWER = ("inbox_id", "status", "resource_type", "resource_id", "version", "answer", "refs")


class _Record(NamedTuple):
    """What an inbox row was answered when accepted, as the worker reads it."""

    status: int
    refs: Mapping[str, Any]


class _Statements:
    """The statements an accept runs, each compiled once per dialect (`prepare`): an accept
    runs four or five, and SQLAlchemy compiles ON CONFLICT statements again on every call."""

    def __init__(self, dialect: Dialect) -> None:
        module: Any = postgresql if dialect.name == "postgresql" else sqlite
        c = fhir_resources.c
        # INSERT ... ON CONFLICT DO UPDATE of `fhir_resources` (version 1, else version + 1),
        # RETURNING the version: one statement, so two senders' updates of one resource never
        # read the same version.
        upsert = module.insert(fhir_resources).values(
            {**{name: bindparam(name) for name in (*_KEY, *_CURRENT)}, "version": 1}
        )
        upsert = upsert.on_conflict_do_update(
            index_elements=list(_KEY),
            set_={"version": c.version + 1, **{n: upsert.excluded[n] for n in _CURRENT}},
        ).returning(c.version)
        self.register = prepare(upsert, dialect, *_KEY, *_CURRENT)
        self.resolve = prepare(
            select(c.patient, c.visit_number).where(
                c.sender == bindparam("sender"),
                c.resource_type == bindparam("resource_type"),
                c.resource_id == bindparam("resource_id"),
            ),
            dialect,
            *_KEY,
        )
        by_row = fhir_inbox.c.inbox_id == bindparam("inbox_id")
        self.forget_answer = prepare(delete(fhir_inbox).where(by_row), dialect, "inbox_id")
        self.answer = prepare(insert(fhir_inbox), dialect, *_ANSWER)
        self.answer_refs = prepare(
            select(fhir_inbox.c.status, fhir_inbox.c.refs).where(by_row), dialect, "inbox_id"
        )
        self.inbox_row = prepare(
            select(inbox.c.sender, inbox.c.origin).where(inbox.c.id == bindparam("inbox_id")),
            dialect,
            "inbox_id",
        )


_STATEMENTS: dict[tuple[str, str], _Statements] = {}
_STATEMENTS_LOCK = threading.Lock()


def _prepared(uow: UnitOfWork) -> tuple[SqlUnitOfWork, _Statements]:
    """The SQL unit of work and this module's statements for its dialect."""
    if not isinstance(uow, SqlUnitOfWork):
        raise TypeError("FHIR ingest needs the SQL store's unit of work")
    dialect = uow.connection.dialect
    key = (dialect.name, dialect.driver)
    statements = _STATEMENTS.get(key)
    if statements is None:
        with _STATEMENTS_LOCK:
            statements = _STATEMENTS.get(key) or _STATEMENTS.setdefault(key, _Statements(dialect))
    return uow, statements


def _connection(uow: UnitOfWork) -> Connection:
    """The SQL connection of a unit of work (the FHIR tables are this adapter's own)."""
    connection = getattr(uow, "connection", None)
    if not isinstance(connection, Connection):
        raise TypeError("FHIR ingest needs the SQL store's unit of work")
    return connection

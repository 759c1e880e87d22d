"""The Task API for clinicians: search, read, and status changes by PUT or JSON Patch.

    GET   /fhir/Task            searchset Bundle (SEARCH_PARAMETERS), paged by an opaque cursor
    GET   /fhir/Task/{id}       the Task, ETag W/"<version>", Last-Modified
    PUT   /fhir/Task/{id}       the whole Task; only status, statusReason, note may change
    PATCH /fhir/Task/{id}       application/json-patch+json on /status, /statusReason, /note

Who may do what (`adapters.service.auth`): clinicians, the safeguarding role and governance
read Tasks, a feed token does not (403). Safeguarding Tasks are visible only to their owner,
the safeguarding role and admins; a Task the caller may not see is answered 404, as an
unknown one is. Shadow Tasks (what shadow rules would have raised) are not work: they are
listed only with `_tag=shadow`, and only to governance and admins. Only a Task's owner (a
clinician or safeguarding token whose practitioner is the owner) or an admin changes it.

A status change is checked at once against the Task as stored (409 for a transition that is
not allowed from its status, 422 for a missing note or reason or an element that may not
change, 412 for a stale If-Match), then stored inbox-first (`adapters.fhir.task_change`)
and applied by the worker through the processor, so that the rules see it. The answer waits
up to `FhirApi.task_wait` seconds: 200 with the changed Task, 409 if the processor refused
it meanwhile (the Task moved on), or 202 while it is still queued.

Search cost: a searchset is written as JSON text around each stored Task's own text
(`search_task_json`: no decoding and re-encoding of the Tasks), and `Bundle.total` is counted
on the first page only (unless that page already holds every match) and carried in the paging
cursor to the next pages, so it is the total when the search began; `_total=accurate`
counts again on every page, `_total=none` never counts.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, tzinfo
from email.utils import format_datetime
from typing import Annotated, Any
from urllib.parse import urlencode

import jsonpatch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from fhir.resources.R4B.task import Task
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from adapters.fhir.context import FhirApi, fhir_api
from adapters.fhir.http import FHIR_JSON, FhirHttpError, FhirResponse, operation_outcome
from adapters.fhir.mapping import FhirMappingError, parse_json
from adapters.fhir.task import RULE_SYSTEM, TAG_SYSTEM
from adapters.fhir.task_change import TaskStatusChange, change_state, submit_change
from adapters.service.auth import Principal, can_change_task, require
from adapters.store.task_search import (
    Clause,
    Cursor,
    CursorError,
    TaskJson,
    TaskPage,
    TaskRecord,
    Term,
    Viewer,
    search_task_json,
    visible_task,
)
from engine.processor import ALLOWED, NEEDS_TEXT

__all__ = [
    "CHANGEABLE_ELEMENTS",
    "CLINICIAN_STATUSES",
    "DEFAULT_COUNT",
    "INTERACTIONS",
    "MAX_COUNT",
    "SEARCH_PARAMETERS",
    "proposed_change",
    "router",
    "viewer_of",
]

router = APIRouter(tags=["Task"])

READERS = ("clinician", "safeguarding", "governance")
CHANGERS = ("clinician", "safeguarding")
CLINICIAN_STATUSES = ("accepted", "in-progress", "completed", "rejected")
# Elements of a Task a PUT may change (businessStatus is the server's: a different one is
# ignored, so that a client writing back an older copy is not refused for it).
CHANGEABLE_ELEMENTS = ("status", "statusReason", "note", "businessStatus")
_SERVER_MANAGED = ("lastModified",)  # set by the change itself
_SERVER_META = ("versionId", "lastUpdated", "source")
PATCHABLE = ("/status", "/statusReason", "/note")
DEFAULT_COUNT, MAX_COUNT = 50, 500

TASK_STATUS_SYSTEM = "http://hl7.org/fhir/task-status"
PRIORITY_SYSTEM = "http://hl7.org/fhir/request-priority"
# FHIR R4 Task.status (value set task-status), in the specification's order.
TASK_STATUS_CODES = (
    "draft",
    "requested",
    "received",
    "accepted",
    "rejected",
    "ready",
    "cancelled",
    "in-progress",
    "on-hold",
    "failed",
    "completed",
    "entered-in-error",
)
TASK_STATUSES = frozenset(TASK_STATUS_CODES)

# The search parameters, as the CapabilityStatement lists them: (name, type, documentation).
SEARCH_PARAMETERS: tuple[tuple[str, str, str], ...] = (
    ("_id", "token", "The Task id (comma: any of)."),
    (
        "owner",
        "reference",
        "The owner's id (e.g. C9001, or Practitioner/C9001); owner:identifier=system|value.",
    ),
    (
        "patient",
        "reference",
        "Task.for by identifier: system|value or value (also patient:identifier).",
    ),
    ("status", "token", "Task status (comma: any of)."),
    ("priority", "token", "routine | urgent | asap | stat (comma: any of)."),
    ("code", "token", f"The rule that raised the Task: its id, or {RULE_SYSTEM}|id."),
    (
        "_lastUpdated",
        "date",
        "When the Task last changed: prefixes eq, ge, gt, le, lt; repeatable.",
    ),
    (
        "_tag",
        "token",
        "shadow (shadow Tasks, excluded otherwise; governance and admin only) or safeguarding.",
    ),
)
# Control parameters (not filters): `_count` (default 50, at most 500), `_sort`
# (_lastUpdated, -_lastUpdated, authored-on, -authored-on), `_cursor` (from the paging links),
# `_total` (accurate: count on every page | estimate: the default, counted on the first page
# and carried to the next | none).
INTERACTIONS = ("read", "search-type", "update", "patch")
_MODIFIERS = {"owner": {"", "identifier"}, "patient": {"", "identifier"}}
_FILTERS = {name for name, _, _ in SEARCH_PARAMETERS}
_CONTROLS = {"_count", "_sort", "_cursor", "_total"}
_SORTS = {
    "authored-on": ("created", False),
    "-authored-on": ("created", True),
    "_lastUpdated": ("updated", False),
    "-_lastUpdated": ("updated", True),
}
_DATE = re.compile(
    r"(?P<prefix>[a-z]{2})?(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:\.(?P<fraction>\d{1,9}))?)?"
    r"(?P<zone>Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_PATCH = "application/json-patch+json"

Caller = Annotated[Principal, Depends(require(*READERS))]
Changer = Annotated[Principal, Depends(require(*CHANGERS))]
Api = Annotated[FhirApi, Depends(fhir_api)]


def viewer_of(caller: Principal) -> Viewer:
    """What a caller may see, for the store's search (`can_see_task`, and shadow work only
    for governance and admins)."""
    admin = "admin" in caller.roles
    return Viewer(
        all_safeguarding=admin or "safeguarding" in caller.roles,
        practitioner=caller.practitioner,
        shadow=admin or "governance" in caller.roles,
    )


def _base(api: FhirApi, request: Request) -> str:
    return api.base_url.rstrip("/") or str(request.base_url).rstrip("/") + "/fhir"


def _instant(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _etag(record: TaskRecord) -> str:
    return f'W/"{record.task.version}"'


def _served(record: TaskRecord) -> dict[str, Any]:
    """The Task as served: the stored resource with meta.versionId and meta.lastUpdated."""
    stored = record.task.resource
    meta = dict(stored.get("meta") or {})
    meta["versionId"] = str(record.task.version)
    meta["lastUpdated"] = _instant(record.updated_at)
    out: dict[str, Any] = {"resourceType": "Task", "id": stored.get("id"), "meta": meta}
    out.update((key, value) for key, value in stored.items() if key not in out)
    return out


def _headers(record: TaskRecord, base: str) -> dict[str, str]:
    return {
        "ETag": _etag(record),
        "Last-Modified": format_datetime(record.updated_at.astimezone(UTC), usegmt=True),
        "Content-Location": f"{base}/Task/{record.task.identifier}/_history/{record.task.version}",
    }


def _not_found() -> FhirHttpError:
    # The same answer for an unknown Task and one the caller may not see.
    return FhirHttpError(404, "Task not found", code="not-found")


# --- search ---------------------------------------------------------------------------------


def _token(value: str) -> tuple[str | None, str]:
    """A token search value: (system or None when not given, code)."""
    system, bar, code = value.partition("|")
    return (system, code) if bar else (None, value)


def _identifier_alternative(value: str, system_column: str, value_column: str) -> tuple[Term, ...]:
    """`system|value`, `|value` (no system), `system|` (any value) or `value` (any system)."""
    system, code = _token(value)
    terms: list[Term] = []
    if system is not None:
        terms.append((system_column, "eq", system))
    if code:
        terms.append((value_column, "eq", code))
    return tuple(terms)


def _coded(values: Sequence[str], column: str, system: str) -> Clause:
    """A token parameter on a coded column whose codes all belong to `system`."""
    out = []
    for value in values:
        given, code = _token(value)
        if given not in (None, "", system):
            continue  # a code of another system matches nothing here
        out.append(((column, "eq", code),) if code else ())
    return tuple(out)


def _date_clause(values: Sequence[str], zone: tzinfo) -> Clause:
    out: list[tuple[Term, ...]] = []
    for value in values:
        start, end, prefix = _date_range(value, zone)
        if prefix == "eq":
            out.append((("updated_at", "ge", start), ("updated_at", "lt", end)))
        elif prefix == "ge":
            out.append((("updated_at", "ge", start),))
        elif prefix == "gt":
            out.append((("updated_at", "ge", end),))
        elif prefix == "lt":
            out.append((("updated_at", "lt", start),))
        else:  # le
            out.append((("updated_at", "lt", end),))
    return tuple(out)


def _date_range(value: str, zone: tzinfo) -> tuple[datetime, datetime, str]:
    """A FHIR date search value as [start, end) at its precision, and its prefix. A value
    without a zone is read in the site's time zone."""
    found = _DATE.fullmatch(value.strip())
    if found is None:
        raise FhirHttpError(
            400,
            "_lastUpdated: not a FHIR date (e.g. ge2026-01-05 or lt2026-01-05T10:00:00Z)",
            location="_lastUpdated",
        )
    parts = found.groupdict()
    prefix = parts["prefix"] or "eq"
    if prefix not in ("eq", "ge", "gt", "le", "lt"):
        raise FhirHttpError(
            400,
            f"_lastUpdated: the prefix {prefix} is not supported (eq, ge, gt, le, lt)",
            location="_lastUpdated",
        )
    if parts["zone"] == "Z":
        zone = UTC
    elif parts["zone"]:
        zone = datetime.fromisoformat("2000-01-01T00:00:00" + parts["zone"]).tzinfo or zone
    try:
        year = int(parts["year"])
        month, day = int(parts["month"] or 1), int(parts["day"] or 1)
        hour, minute = int(parts["hour"] or 0), int(parts["minute"] or 0)
        second = int(parts["second"] or 0)
        fraction = parts["fraction"] or ""
        micro = int((fraction + "000000")[:6]) if fraction else 0
        start = datetime(year, month, day, hour, minute, second, micro, tzinfo=zone)
        if parts["month"] is None:
            end = start.replace(year=year + 1)
        elif parts["day"] is None:
            end = start.replace(year=year + month // 12, month=month % 12 + 1)
        elif parts["hour"] is None:
            end = (start.replace(tzinfo=None) + timedelta(days=1)).replace(tzinfo=zone)
        elif parts["second"] is None:
            end = start + timedelta(minutes=1)
        elif not fraction:
            end = start + timedelta(seconds=1)
        else:
            end = start + timedelta(microseconds=max(1, 10 ** (6 - min(len(fraction), 6))))
        start, end = start.astimezone(UTC), end.astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise FhirHttpError(
            400, "_lastUpdated: not a valid date, or out of range", location="_lastUpdated"
        ) from exc
    return start, end, prefix


def _tag_clause(values: Sequence[str]) -> tuple[Clause, bool]:
    """A `_tag` parameter: its clause, and whether it asks for shadow Tasks."""
    out: list[tuple[Term, ...]] = []
    shadow = False
    for value in values:
        system, code = _token(value)
        if system not in (None, "", TAG_SYSTEM):
            continue
        if code == "shadow":
            shadow = True
            out.append((("shadow", "eq", True),))
        elif code == "safeguarding":
            out.append((("safeguarding", "eq", True),))
    return tuple(out), shadow


_OWNER_TYPES = ("Practitioner", "CareTeam", "PractitionerRole")


def _reference_ids(values: Sequence[str]) -> Clause:
    """`owner`: an owner id, or a reference `Practitioner/<id>` (a full URL too). A
    reference to a type that owns no Task matches nothing."""
    out = []
    for value in values:
        kind, slash, plain = value.rpartition("/")
        if not slash:
            out.append((("owner", "eq", value),))
        elif kind.rsplit("/", 1)[-1] in _OWNER_TYPES:
            out.append((("owner", "eq", plain),))
    return tuple(out)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_:.=-]{0,63}")


def _shown(name: str) -> str:
    """A parameter name as an answer may quote it: a plain name, else nothing (a query may
    carry anything, and patient data never goes into an answer)."""
    return (
        repr(name) if _NAME.fullmatch(name) and not any(c.isdigit() for c in name) else "(a name)"
    )


def _strict(request: Request) -> bool:
    prefer = request.headers.get("prefer", "")
    return any(
        part.strip().lower().replace(" ", "") == "handling=strict"
        for part in re.split(r"[,;]", prefer)
    )


def _int_param(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise FhirHttpError(400, f"{name} must be a whole number", location=name) from None


@dataclass
class _Search:
    """A search request as read from its query: the filters and how to page."""

    clauses: list[Clause] = field(default_factory=list)
    used: list[tuple[str, str]] = field(default_factory=list)  # for the links
    ignored: list[str] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    shadow: bool = False  # shadow Tasks asked for (_tag=shadow)
    count: int = DEFAULT_COUNT
    sort: str = "created"
    descending: bool = False
    cursor: Cursor | None = None
    with_total: bool = True
    recount: bool = False  # _total=accurate: count on every page, not only the first


def _filter(name: str, modifier: str, values: Sequence[str], zone: tzinfo) -> tuple[Clause, bool]:
    """One filter parameter as a clause, and whether it asks for shadow Tasks."""
    if name == "_id":
        return tuple((("identifier", "eq", v),) for v in values), False
    if name == "owner" and modifier == "identifier":
        return tuple(_identifier_alternative(v, "owner_system", "owner") for v in values), False
    if name == "owner":
        return _reference_ids(values), False
    if name == "patient":
        return (
            tuple(_identifier_alternative(v, "patient_system", "patient_value") for v in values),
            False,
        )
    if name == "status":
        return _coded(values, "status", TASK_STATUS_SYSTEM), False
    if name == "priority":
        return _coded(values, "priority", PRIORITY_SYSTEM), False
    if name == "code":
        return _coded(values, "rule_id", RULE_SYSTEM), False
    if name == "_lastUpdated":
        return _date_clause(values, zone), False
    return _tag_clause(values)


def _control(search: _Search, name: str, value: str) -> bool:
    """Apply a control parameter (_count, _sort, _cursor, _total); whether the self link
    keeps it as given."""
    if name == "_count":
        search.count = _int_param("_count", value)
        if search.count < 0:
            raise FhirHttpError(400, "_count must be 0 or more", location="_count")
        if search.count > MAX_COUNT:
            search.notes.append(
                {
                    "severity": "information",
                    "code": "informational",
                    "diagnostics": f"_count is at most {MAX_COUNT}: {MAX_COUNT} per page",
                }
            )
            search.count = MAX_COUNT
        return False
    if name == "_sort":
        if value not in _SORTS:
            search.ignored.append("_sort=" + value)
            return False
        search.sort, search.descending = _SORTS[value]
        return True
    if name == "_cursor":
        try:
            search.cursor = Cursor.decode(value)
        except CursorError as exc:
            raise FhirHttpError(400, str(exc), location="_cursor") from exc
        return False
    search.with_total = value != "none"  # _total
    search.recount = value == "accurate"
    return True


def _parse_search(items: Sequence[tuple[str, str]], zone: tzinfo) -> _Search:
    """Read a search query. Unknown parameters are listed in `ignored`; an unknown modifier
    or a value that cannot be read is refused (400)."""
    search = _Search()
    for key, raw_value in items:
        name, _, modifier = key.partition(":")
        if name not in _FILTERS and name not in _CONTROLS:
            search.ignored.append(key)
            continue
        if modifier not in _MODIFIERS.get(name, {""}):
            # FHIR: a modifier the server does not know is refused, never ignored.
            raise FhirHttpError(
                400, f"the modifier {_shown(modifier)} is not supported on {name}", location=name
            )
        value = raw_value.strip()
        if not value:
            continue  # FHIR: an empty parameter is ignored
        if name in _CONTROLS:
            if _control(search, name, value):
                search.used.append((key, value))
            continue
        clause, shadow = _filter(name, modifier, [v for v in value.split(",") if v], zone)
        search.clauses.append(clause)
        search.shadow = search.shadow or shadow
        search.used.append((key, value))
    return search


# As FhirResponse writes JSON; one encoder, not one per call (json.dumps with options makes one).
_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _entry_json(base: str, task: TaskJson) -> str:
    """One searchset entry as JSON text: the Task as `_served` makes it (resourceType, id,
    meta with versionId and lastUpdated, then the stored elements), around its stored text."""
    meta = dict(task.meta)
    meta["versionId"] = str(task.version)
    meta["lastUpdated"] = _instant(task.updated_at)
    rest = task.rest.strip()
    tail = "," + rest[1:] if rest[1:].strip() != "}" else "}"  # the stored elements, if any
    return (
        f'{{"fullUrl":{_json(base + "/Task/" + task.identifier)},"resource":'
        f'{{"resourceType":"Task","id":{_json(task.resource_id)},"meta":{_json(meta)}{tail},'
        '"search":{"mode":"match"}}'
    )


def _searchset(base: str, search: _Search, page: TaskPage[TaskJson], now: datetime) -> bytes:
    """The searchset Bundle of one page, as JSON bytes: links (self, first, next,
    previous), the Tasks (each spliced in as stored: `_entry_json`), and an OperationOutcome
    entry for what was ignored or adjusted."""

    def link(relation: str, at: Cursor | None) -> dict[str, str]:
        params = [*search.used, ("_count", str(search.count))]
        if at is not None:
            params.append(("_cursor", at.encode()))
        return {"relation": relation, "url": f"{base}/Task?{urlencode(params)}"}

    links = [link("self", search.cursor), link("first", None)]
    if page.next is not None:
        links.append(link("next", page.next))
    if page.previous is not None:
        links.append(link("previous", page.previous))
    entries = [_entry_json(base, task) for task in page.records]
    issues = [
        {
            "severity": "warning",
            "code": "not-supported",
            "diagnostics": f"search parameter {_shown(name)} is not supported and was ignored",
        }
        for name in search.ignored
    ] + search.notes
    if issues:
        outcome = {
            "resource": {"resourceType": "OperationOutcome", "issue": issues},
            "search": {"mode": "outcome"},
        }
        entries.append(_json(outcome))
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": uuid.uuid4().hex,
        "meta": {"lastUpdated": _instant(now)},
        "type": "searchset",
        **({"total": page.total} if page.total >= 0 else {}),
        "link": links,
    }
    text = _json(bundle)
    if entries:
        text = text[:-1] + ',"entry":[' + ",".join(entries) + "]}"
    return text.encode("utf-8")


@router.get(
    "/Task",
    response_class=FhirResponse,
    summary="Search Tasks",
    responses={
        200: {"description": "A searchset Bundle", "content": {"application/fhir+json": {}}}
    },
)
def search(request: Request, api: Api, caller: Caller) -> Response:
    """Search the Tasks the caller may see (FHIR searchset Bundle, paged). Unknown
    parameters are ignored and reported in an OperationOutcome entry, or refused (400) with
    `Prefer: handling=strict`."""
    viewer = viewer_of(caller)
    query = _parse_search(request.query_params.multi_items(), api.catalogue.site.timezone)
    if query.ignored and _strict(request):
        raise FhirHttpError(
            400,
            f"search parameter {_shown(query.ignored[0])} is not supported "
            "(Prefer: handling=strict)",
            code="not-supported",
        )
    if query.shadow and not viewer.shadow:
        raise FhirHttpError(403, "shadow Tasks are listed for governance and admin only")
    clauses = query.clauses
    if not query.shadow:  # shadow work is never shown as work
        clauses = [*clauses, ((("shadow", "eq", False),),)]
    cursor = query.cursor
    if cursor is not None and query.recount:
        cursor = replace(cursor, total=-1)  # _total=accurate: count this page's search again
    with api.store.begin(read_only=True) as uow:
        try:
            page = search_task_json(
                uow,
                viewer,
                clauses,
                sort=query.sort,
                descending=query.descending,
                count=query.count,
                cursor=cursor,
                with_total=query.with_total,
            )
        except CursorError as exc:
            raise FhirHttpError(400, str(exc), location="_cursor") from exc
    body = _searchset(_base(api, request), query, page, api.now())
    return Response(body, media_type=FHIR_JSON)


# --- read -----------------------------------------------------------------------------------


@router.get(
    "/Task/{task_id}",
    response_class=FhirResponse,
    summary="Read a Task",
    responses={
        200: {"description": "The Task", "content": {"application/fhir+json": {}}},
        404: {"description": "No such Task (or not visible)"},
    },
)
def read(task_id: str, request: Request, api: Api, caller: Caller) -> Response:
    """One Task, with its version as ETag (404 when unknown or not visible to the caller)."""
    with api.store.begin(read_only=True) as uow:
        record = visible_task(uow, viewer_of(caller), task_id)
    if record is None:
        raise _not_found()
    headers = _headers(record, _base(api, request))
    if _etag(record) in _etags(request.headers.get("if-none-match")):
        return Response(status_code=304, headers=headers)
    return FhirResponse(_served(record), headers=headers)


def _etags(header: str | None) -> set[str]:
    """The entity tags of an If-Match / If-None-Match header, as W/"n" (or "*")."""
    if header is None:
        return set()
    out = set()
    for part in header.split(","):
        tag = part.strip()
        if tag == "*":
            out.add("*")
            continue
        tag = tag.removeprefix("W/").strip().strip('"')
        out.add(f'W/"{tag}"')
    return out


# --- status changes -------------------------------------------------------------------------


def _changeable(api: FhirApi, caller: Principal, task_id: str, if_match: str | None) -> TaskRecord:
    """The Task the caller wants to change, if they may (404, 403, 412 otherwise)."""
    with api.store.begin(read_only=True) as uow:
        record = visible_task(uow, viewer_of(caller), task_id)
    if record is None:
        raise _not_found()
    if not can_change_task(caller, record.task):
        raise FhirHttpError(403, "only the Task's owner or an admin may change it")
    wanted = _etags(if_match)
    if wanted and "*" not in wanted and _etag(record) not in wanted:
        raise FhirHttpError(
            412,
            f"the Task has changed: it is at version {record.task.version} "
            "(read it again and retry)",
            code="conflict",
        )
    return record


def _concept_text(concept: Any) -> str:
    if not isinstance(concept, Mapping):
        return ""
    if isinstance(concept.get("text"), str) and concept["text"].strip():
        return str(concept["text"]).strip()
    for coding in concept.get("coding") or []:
        if isinstance(coding, Mapping):
            text = coding.get("display") or coding.get("code")
            if isinstance(text, str) and text.strip():
                return text.strip()
    return ""


def _validated(proposed: Mapping[str, Any]) -> None:
    """The proposed Task must be a valid FHIR R4 Task (the R4B model)."""
    try:
        Task.model_validate(dict(proposed))
    except ValidationError as exc:
        errors = exc.errors()
        where = "Task"
        if errors:
            where += "".join(
                f"[{part}]" if isinstance(part, int) else f".{part}"
                for part in errors[0]["loc"]
                if isinstance(part, int) or str(part).isidentifier()
            )
        # The message, never the input: the input may be patient data.
        message = " ".join(str(errors[0]["msg"]).split())[:160] if errors else "invalid"
        raise FhirHttpError(422, f"not a valid FHIR R4 Task: {message}", location=where) from exc
    except (TypeError, ValueError) as exc:
        raise FhirHttpError(422, "not a valid FHIR R4 Task", location="Task") from exc


def _meta_rest(resource: Mapping[str, Any]) -> dict[str, Any]:
    meta = resource.get("meta")
    if not isinstance(meta, Mapping):
        return {}
    return {k: v for k, v in meta.items() if k not in _SERVER_META}


def proposed_change(
    current: Mapping[str, Any], proposed: Mapping[str, Any], task_id: str
) -> tuple[str, str] | None:
    """(status, text) of the change `proposed` (a whole Task) makes to `current` (as
    served): the text is the note of what was done, or the reason for a rejection. None
    when it changes nothing. Raises FhirHttpError: 400 (not this Task), 422 (an element
    that may not change, a status clinicians do not set, a missing note or reason), 409 (a
    transition not allowed from the current status)."""
    if proposed.get("resourceType") != "Task":
        raise FhirHttpError(400, "the body must be a Task resource", location="resourceType")
    if proposed.get("id") != task_id:
        raise FhirHttpError(400, "the Task's id must be the id in the URL", location="Task.id")
    _validated(proposed)
    for key in sorted(set(current) | set(proposed)):
        if key in CHANGEABLE_ELEMENTS or key in _SERVER_MANAGED:
            continue
        if key == "meta":
            if _meta_rest(current) != _meta_rest(proposed):
                raise FhirHttpError(
                    422,
                    "Task.meta cannot be changed (only its tags are compared)",
                    code="business-rule",
                    location="Task.meta",
                )
            continue
        if current.get(key) != proposed.get(key):
            raise FhirHttpError(
                422,
                f"Task.{key} cannot be changed: only status, statusReason and note may "
                "differ from the stored Task",
                code="business-rule",
                location=f"Task.{key}",
            )
    status = str(proposed.get("status", ""))
    before, after = current.get("note") or [], proposed.get("note") or []
    if after[: len(before)] != before:
        raise FhirHttpError(
            422,
            "Task.note: notes already recorded cannot be changed or removed; add a new one "
            "after them",
            code="business-rule",
            location="Task.note",
        )
    added = "\n".join(
        str(note.get("text", "")).strip()
        for note in after[len(before) :]
        if isinstance(note, Mapping) and str(note.get("text", "")).strip()
    )
    reason_changed = current.get("statusReason") != proposed.get("statusReason")
    reason = _concept_text(proposed.get("statusReason")) if reason_changed else ""
    if status == current.get("status") and not added and not reason_changed:
        return None
    if status not in CLINICIAN_STATUSES:
        raise FhirHttpError(
            422,
            f"Task.status: a clinician may set {', '.join(CLINICIAN_STATUSES)}",
            code="business-rule",
            location="Task.status",
        )
    stored = str(current.get("status", ""))
    allowed = ALLOWED.get(stored, frozenset())
    if status not in allowed:
        raise FhirHttpError(
            409,
            f"a {stored} Task cannot become {status}"
            + (f" (allowed: {', '.join(sorted(allowed))})" if allowed else ""),
            code="business-rule",
            location="Task.status",
        )
    if reason_changed and status != "rejected":
        raise FhirHttpError(
            422,
            "Task.statusReason is taken only with status rejected (use a note)",
            code="business-rule",
            location="Task.statusReason",
        )
    text = "; ".join(part for part in (reason, added) if part) if status == "rejected" else added
    if status in NEEDS_TEXT and not text:
        where = "Task.statusReason" if status == "rejected" else "Task.note"
        raise FhirHttpError(
            422,
            f"a Task marked {status} needs {NEEDS_TEXT[status]}"
            + (" (statusReason.text or a new note)" if status == "rejected" else " (a new note)"),
            code="required",
            location=where,
        )
    return status, text


def _apply(
    api: FhirApi,
    request: Request,
    caller: Principal,
    record: TaskRecord,
    proposed: Mapping[str, Any],
) -> Response:
    """Check the change, store it inbox-first, wait for the worker, answer."""
    base = _base(api, request)
    change = proposed_change(_served(record), proposed, record.task.identifier)
    if change is None:  # nothing to change: the Task as it is
        return FhirResponse(_served(record), headers=_headers(record, base))
    status, text = change
    now = api.now()
    submitted = TaskStatusChange(
        task=record.task.identifier,
        status=status,
        note=text,
        by=caller.practitioner or caller.subject,
        at=now,
        subject=caller.subject,
        version=record.task.version,
    )
    with api.store.begin() as uow:
        inbox_id = submit_change(
            uow, submitted, now, origin=f"http:{request.method} /fhir/Task/{{id}}"
        )
    api.notify()
    state, detail = _wait(api, inbox_id)
    if state == "processed":
        with api.store.begin(read_only=True) as uow:
            changed = visible_task(uow, viewer_of(caller), record.task.identifier)
        if changed is None:  # e.g. a merge moved it out of sight: the change stands
            raise _not_found()
        return FhirResponse(_served(changed), headers=_headers(changed, base))
    if state in ("quarantined", "failed"):
        raise FhirHttpError(409, f"the change was not applied: {detail}", code="conflict")
    body = operation_outcome(
        "the change is stored and will be applied shortly; read the Task to see it",
        code="informational",
        severity="information",
    )
    return FhirResponse(
        body, status_code=202, headers={"Content-Location": f"{base}/Task/{record.task.identifier}"}
    )


def _wait(api: FhirApi, inbox_id: int) -> tuple[str, str]:
    """The stored change's state once the worker has taken it, or "received" after
    `api.task_wait` seconds."""
    deadline = time.monotonic() + max(0.0, api.task_wait)
    pause = 0.005
    while True:
        with api.store.begin(read_only=True) as uow:
            state, detail = change_state(uow, inbox_id)
        left = deadline - time.monotonic()
        if state != "received" or left <= 0:
            return state, detail
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)


def _body(raw: bytes) -> Any:
    try:
        return parse_json(raw)
    except FhirMappingError as exc:
        status = 415 if exc.code == "not-supported" else 400
        raise FhirHttpError(status, exc.reason, code=exc.code) from exc


def _put(api: FhirApi, request: Request, caller: Principal, task_id: str, raw: bytes) -> Response:
    record = _changeable(api, caller, task_id, request.headers.get("if-match"))
    return _apply(api, request, caller, record, _body(raw))


_TASK_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/fhir+json": {"schema": {"type": "object"}}},
    }
}
_PATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {_PATCH: {"schema": {"type": "array", "items": {"type": "object"}}}},
    }
}
_CHANGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The changed Task", "content": {"application/fhir+json": {}}},
    202: {"description": "Stored; not yet applied", "content": {"application/fhir+json": {}}},
    403: {"description": "Not the Task's owner"},
    404: {"description": "No such Task (or not visible)"},
    409: {"description": "Not allowed from the Task's status"},
    412: {"description": "If-Match names an older version"},
    422: {"description": "An element that may not change, or a missing note or reason"},
}


@router.put(
    "/Task/{task_id}",
    response_class=FhirResponse,
    summary="Change a Task's status (whole Task)",
    openapi_extra=_TASK_BODY,
    responses=_CHANGE_RESPONSES,
)
async def update(task_id: str, request: Request, api: Api, caller: Changer) -> Response:
    """Change a Task's status: the whole Task, in which only status, statusReason and note
    differ from the stored one."""
    raw = await request.body()
    return await run_in_threadpool(_put, api, request, caller, task_id, raw)


def _patch(api: FhirApi, request: Request, caller: Principal, task_id: str, raw: bytes) -> Response:
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != _PATCH:
        raise FhirHttpError(
            415,
            f"PATCH takes a JSON Patch ({_PATCH}); FHIRPath Patch is not supported",
            code="not-supported",
        )
    try:
        operations = json.loads(raw.decode("utf-8-sig", errors="replace"))
    except ValueError as exc:
        raise FhirHttpError(400, "the JSON Patch is not JSON") from exc
    if not isinstance(operations, list) or not all(isinstance(op, dict) for op in operations):
        raise FhirHttpError(400, "a JSON Patch is an array of operations")
    record = _changeable(api, caller, task_id, request.headers.get("if-match"))
    for index, op in enumerate(operations):
        for member in ("path", "from"):
            path = op.get(member)
            if member == "from" and path is None:
                continue
            if op.get("op") == "test" and member == "path":
                continue  # a test changes nothing, wherever it looks
            if not isinstance(path, str) or not any(
                path == allowed or path.startswith(allowed + "/") for allowed in PATCHABLE
            ):
                raise FhirHttpError(
                    422,
                    f"operation {index}: only /status, /statusReason and /note may be patched",
                    code="business-rule",
                    location=f"[{index}].{member}",
                )
    try:
        patch = jsonpatch.JsonPatch(operations)
        proposed = patch.apply(_served(record))
    except jsonpatch.JsonPatchTestFailed as exc:
        raise FhirHttpError(409, "a test operation of the patch failed", code="conflict") from exc
    except jsonpatch.InvalidJsonPatch as exc:
        # jsonpatch's messages may quote the document (patient data): never pass them on.
        raise FhirHttpError(400, "not a valid JSON Patch (RFC 6902)") from exc
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
        raise FhirHttpError(
            422,
            "the patch cannot be applied to the Task (a path names nothing there)",
            code="processing",
        ) from exc
    if not isinstance(proposed, dict):
        raise FhirHttpError(422, "the patch must leave a Task", code="processing")
    return _apply(api, request, caller, record, proposed)


@router.patch(
    "/Task/{task_id}",
    response_class=FhirResponse,
    summary="Change a Task's status (JSON Patch)",
    openapi_extra=_PATCH_BODY,
    responses=_CHANGE_RESPONSES,
)
async def patch(task_id: str, request: Request, api: Api, caller: Changer) -> Response:
    """Change a Task's status with a JSON Patch on /status, /statusReason and /note."""
    raw = await request.body()
    return await run_in_threadpool(_patch, api, request, caller, task_id, raw)

"""FHIR Subscription notifications in (the R4 Subscriptions backport), with gap recovery.

The hospital's FHIR server holds a topic-based Subscription whose channel endpoint is
`POST {base}/fhir/$subscription-notification` (role `feed`). Each notification is a Bundle of
type `history` whose first entry is the SubscriptionStatus: a `Parameters` resource in R4
(`subscription`, `topic`, `status`, `type`, `events-since-subscription-start`, and one
`notification-event` per event with `event-number`, `focus` and `additional-context`); the R4B
`SubscriptionStatus` resource is read too. What happens, by `type`:

* handshake, heartbeat (and query-status): 200; the subscription and its event count are
  recorded (table `fhir_subscriptions`). A handshake sets the starting count of a subscription
  not seen before; one whose count is below what was seen restarts the numbering.
* event-notification (and query-event): each event's resources (additional context first,
  then the focus) go to `FhirIngest.accept_resource`, inbox first, in event-number order.
  Full-resource: taken from the Bundle. Id-only (a focus reference, or an entry without a
  resource): read from the configured source FHIR server (`FhirApi.source_server`), by
  "Type/id" (vread when the reference carries `_history`), whatever base the reference names,
  so a notification cannot make safetynet call anywhere else.
* Gaps: per subscription the highest event number applied is kept. When a notification's
  numbers skip, or a count (`events-since-subscription-start`) is ahead of it, the source's
  `Subscription/{id}/$status` gives the current count and `$events?eventsSinceNumber=
  &eventsUntilNumber=` the missing events, which are applied in order with the notification's
  own, and the recovery is audited. Events the source can no longer give back are audited and
  left for review (quarantine item). An event number already applied has no second effect.

Every read from the source happens before anything is written; a source that fails (down, a
timeout, an error status, not FHIR) makes the answer 503 with Retry-After and nothing is
kept, so the sender's retry finds everything as it was. The state row is written with an
optimistic check (`revision`), so two notifications racing for one subscription cannot both
apply the same events; no database lock is held over an HTTP call.

A notification that is not one (not JSON, not a history Bundle, no SubscriptionStatus first,
a status that breaks the profile) is answered 400 (structure) or 422 (profile) with an
OperationOutcome naming the element, and its raw text is kept (inbox protocol
"fhir-notification", quarantined) for review.

Exceptions (all under adapters.errors.AdapterError):

    FhirMappingError
     +-- NotificationError      a malformed notification; `status` 400 or 422
    SourceError                 the source FHIR server did not give what was asked
     +-- SourceUnavailable      transient or misconfigured: answered 503 + Retry-After
     +-- SourceMissing          404/410 for a resource: the event is kept for review
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Annotated, Any, Protocol

import httpx
from fastapi import APIRouter, Depends, Request
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from adapters.errors import AdapterError
from adapters.fhir.context import FhirApi, fhir_api
from adapters.fhir.http import FhirHttpError, FhirResponse, operation_outcome
from adapters.fhir.inbound import FhirIngest
from adapters.fhir.mapping import FhirMappingError, parse_json
from adapters.ingest import content_hash
from adapters.service.auth import Principal, require
from adapters.store import SqlStore
from adapters.store.schema import fhir_subscriptions
from engine.ports import InboundMessage, UnitOfWork

__all__ = [
    "NOTIFICATION_PATH",
    "PROTOCOL",
    "FhirSource",
    "Notification",
    "NotificationError",
    "NotificationEvent",
    "Receipt",
    "ResourceRef",
    "SourceError",
    "SourceMissing",
    "SourceUnavailable",
    "SubscriptionReceiver",
    "parse_notification",
    "resource_ref",
    "router",
]

log = logging.getLogger(__name__)

NOTIFICATION_PATH = "/$subscription-notification"
PROTOCOL = "fhir-notification"  # inbox protocol of the malformed notifications kept
RETRY_AFTER = "10"  # seconds, sent with a 503
SOURCE_TIMEOUT = 10.0  # seconds per source request, unless FhirApi.source_timeout says
RECOVERY_PAGE = 100  # events per $events request
RECOVERY_LIMIT = 1000  # events recovered for one notification; the rest on its resend
ATTEMPTS = 10  # plans of one notification that lost a race to another instance
MISSING_KEPT = 1000  # unrecoverable event numbers remembered per subscription

KINDS = ("handshake", "heartbeat", "event-notification", "query-status", "query-event")
_EVENT_KINDS = frozenset({"event-notification", "query-event"})
STATUSES = ("requested", "active", "error", "off", "entered-in-error")

router = APIRouter()


# --- errors ---------------------------------------------------------------------------------


class NotificationError(FhirMappingError):
    """A notification that is not one. `status`: 400 when the Bundle is not a notification
    Bundle at all, 422 when its SubscriptionStatus breaks the backport profile."""

    def __init__(
        self, reason: str, location: str = "", code: str = "invalid", status: int = 400
    ) -> None:
        super().__init__(reason, location, code)
        self.status = status


class SourceError(AdapterError):
    """The source FHIR server did not give what was asked."""


class SourceUnavailable(SourceError):
    """The source could not be read now (down, slow, refused, not FHIR): try again later."""


class SourceMissing(SourceError):
    """The source says the resource is not there (404, 410)."""


# --- references -----------------------------------------------------------------------------

_REF = re.compile(
    r"(?:^|/)(?P<type>[A-Z][A-Za-z]{1,63})/(?P<id>[A-Za-z0-9\-.]{1,64})"
    r"(?:/_history/(?P<version>[A-Za-z0-9\-.]{1,64}))?/?$"
)


@dataclass(frozen=True, slots=True)
class ResourceRef:
    """A literal reference reduced to what the source is asked for: type, id, version."""

    type: str
    id: str
    version: str = ""

    @property
    def key(self) -> str:
        """ "Type/id"."""
        return f"{self.type}/{self.id}"

    @property
    def path(self) -> str:
        """The path under the source's base: "Type/id", or "Type/id/_history/v"."""
        return f"{self.key}/_history/{self.version}" if self.version else self.key

    def matches(self, resource: Mapping[str, Any]) -> bool:
        """Whether `resource` is this one (type and id; the version too when both say)."""
        if resource.get("resourceType") != self.type or resource.get("id") != self.id:
            return False
        version = (resource.get("meta") or {}).get("versionId")
        return not (self.version and version and str(version) != self.version)


def resource_ref(reference: str) -> ResourceRef | None:
    """The type, id and version a literal reference ends with ("Type/id", a full URL, either
    with "/_history/v"), or None (e.g. "urn:uuid:...", which only a Bundle entry resolves)."""
    found = _REF.search(reference.split("?", 1)[0].split("#", 1)[0])
    if found is None or not found["id"].strip(".") or not (found["version"] or "x").strip("."):
        return None  # "..": never a path outside "Type/id"
    return ResourceRef(found["type"], found["id"], found["version"] or "")


# --- the notification, read -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NotificationEvent:
    """One notification-event: its number, its focus and additional-context references ("" for
    an empty-content event), and where it was in the status resource."""

    number: int
    focus: str = ""
    context: tuple[str, ...] = ()
    where: str = ""


@dataclass(frozen=True, slots=True)
class Entry:
    """One Bundle entry after the status: its fullUrl and its resource (None: id-only)."""

    full_url: str
    resource: Mapping[str, Any] | None
    where: str


@dataclass(frozen=True, slots=True)
class Notification:
    """A notification Bundle, read. `subscription`: "Subscription/<id>" (the state key);
    `reference`: as the sender wrote it; `events_since`: events-since-subscription-start when
    given; `events`: in Bundle order."""

    subscription: str
    reference: str
    kind: str
    status: str
    topic: str
    events_since: int | None
    events: tuple[NotificationEvent, ...]
    entries: tuple[Entry, ...]

    @property
    def subscription_id(self) -> str:
        """The Subscription's id on the source."""
        return self.subscription.split("/", 1)[1]

    def find(self, reference: str) -> Entry | None:
        """The entry a reference names: the same fullUrl, else the same type and id (and
        version, when both say) by fullUrl or by resource."""
        for entry in self.entries:
            if entry.full_url and entry.full_url == reference:
                return entry
        wanted = resource_ref(reference)
        if wanted is None:
            return None
        for entry in self.entries:
            if entry.resource is not None and wanted.matches(entry.resource):
                return entry
            named = resource_ref(entry.full_url) if entry.full_url else None
            if (
                named is not None
                and named.key == wanted.key
                and not (named.version and wanted.version and named.version != wanted.version)
            ):
                return entry
        return None


def _bad(reason: str, where: str, code: str = "invalid") -> NotificationError:
    return NotificationError(reason, where, code, status=400)


def _profile(reason: str, where: str, code: str = "required") -> NotificationError:
    return NotificationError(reason, where, code, status=422)


# Elements of the backport's drafts that R4B dropped: ignored rather than refused.
_DRAFT_ONLY = frozenset({"eventsInNotification"})


def _validate(kind: str, resource: Mapping[str, Any], where: str) -> None:
    """Check the status resource against its R4B model (structure and data types)."""
    try:
        get_fhir_model_class(kind).model_validate(
            {name: value for name, value in resource.items() if name not in _DRAFT_ONLY}
        )
    except ValidationError as exc:
        errors = exc.errors()
        message = " ".join(str(errors[0]["msg"]).split())[:160] if errors else "invalid"
        step = ".".join(
            str(part) for part in (errors[0]["loc"] if errors else ()) if str(part) != "root"
        )
        raise _bad(f"not a valid FHIR R4 {kind}: {message}", f"{where}.{step}".rstrip(".")) from exc
    except (TypeError, ValueError) as exc:
        raise _bad(f"not a valid FHIR R4 {kind}", where) from exc


def _count(value: Any, where: str) -> int:
    """An event number or count: a non-negative integer, sent as a string or a number."""
    if isinstance(value, bool):
        raise _profile("an event number must be a non-negative integer", where, "value")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 18:
        number = int(value.strip())
    else:
        raise _profile("an event number must be a non-negative integer", where, "value")
    if number < 0:
        raise _profile("an event number must be a non-negative integer", where, "value")
    return number


_COUNT_VALUES = ("valueString", "valueInteger64", "valueUnsignedInt", "valueInteger")
_CODE_VALUES = ("valueCode", "valueString")
_URI_VALUES = ("valueCanonical", "valueUri", "valueUrl", "valueString")


def _value(parameter: Mapping[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        if name in parameter:
            return parameter[name]
    return None


def _reference(parameter: Mapping[str, Any]) -> str:
    value = parameter.get("valueReference")
    if isinstance(value, Mapping) and isinstance(value.get("reference"), str):
        return str(value["reference"])
    return ""


@dataclass
class _Status:
    """The status resource's content, whichever form it came in."""

    reference: str = ""
    kind: str = ""
    status: str = ""
    topic: str = ""
    events_since: int | None = None
    events: list[NotificationEvent] = field(default_factory=list)


def _from_parameters(resource: Mapping[str, Any], where: str) -> _Status:
    """The R4 form: Parameters (profile backport-subscription-status-r4)."""
    out = _Status()
    for n, parameter in enumerate(resource.get("parameter") or ()):
        at = f"{where}.parameter[{n}]"
        name = parameter.get("name")
        if name == "subscription":
            out.reference = _reference(parameter)
            if not out.reference:
                raise _profile("subscription must be a valueReference with a reference", at)
        elif name == "type":
            out.kind = str(_value(parameter, _CODE_VALUES) or "")
        elif name == "status":
            out.status = str(_value(parameter, _CODE_VALUES) or "")
        elif name == "topic":
            out.topic = str(_value(parameter, _URI_VALUES) or "")
        elif name == "events-since-subscription-start":
            out.events_since = _count(_value(parameter, _COUNT_VALUES), at)
        elif name == "notification-event":
            out.events.append(_event_from_parts(parameter.get("part") or (), at))
    return out


def _event_from_parts(parts: Iterable[Mapping[str, Any]], where: str) -> NotificationEvent:
    number: int | None = None
    focus = ""
    context: list[str] = []
    for n, part in enumerate(parts):
        at = f"{where}.part[{n}]"
        name = part.get("name")
        if name == "event-number":
            number = _count(_value(part, _COUNT_VALUES), at)
        elif name == "focus":
            focus = _reference(part)
            if not focus:
                raise _profile("focus must be a valueReference with a reference", at)
        elif name == "additional-context":
            extra = _reference(part)
            if extra:
                context.append(extra)
    if number is None:
        raise _profile("a notification-event needs an event-number part", where)
    return NotificationEvent(number, focus, tuple(context), where)


def _from_subscription_status(resource: Mapping[str, Any], where: str) -> _Status:
    """The R4B form: a SubscriptionStatus resource (the backport's R4B profile)."""
    subscription = resource.get("subscription") or {}
    out = _Status(
        reference=str(subscription.get("reference") or ""),
        kind=str(resource.get("type") or ""),
        status=str(resource.get("status") or ""),
        topic=str(resource.get("topic") or ""),
    )
    if "eventsSinceSubscriptionStart" in resource:
        out.events_since = _count(
            resource["eventsSinceSubscriptionStart"], f"{where}.eventsSinceSubscriptionStart"
        )
    for n, event in enumerate(resource.get("notificationEvent") or ()):
        at = f"{where}.notificationEvent[{n}]"
        if "eventNumber" not in event:
            raise _profile("a notificationEvent needs an eventNumber", at)
        context = tuple(
            str(ref.get("reference"))
            for ref in event.get("additionalContext") or ()
            if isinstance(ref.get("reference"), str)
        )
        out.events.append(
            NotificationEvent(
                _count(event["eventNumber"], f"{at}.eventNumber"),
                str((event.get("focus") or {}).get("reference") or ""),
                context,
                at,
            )
        )
    return out


def parse_notification(body: Mapping[str, Any]) -> Notification:
    """Read a notification Bundle. Raises NotificationError (400: not a history Bundle whose
    first entry is a SubscriptionStatus; 422: the status lacks what the profile requires or
    says something this endpoint cannot act on)."""
    if body.get("resourceType") != "Bundle":
        raise _bad("a subscription notification is a Bundle", "resourceType")
    if body.get("type") != "history":
        raise _bad("a subscription notification is a Bundle of type history", "Bundle.type")
    raw_entries = body.get("entry")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise _bad(
            "a notification Bundle needs entries, the SubscriptionStatus first", "Bundle.entry"
        )
    for n, raw in enumerate(raw_entries):
        if not isinstance(raw, Mapping):
            raise _bad("a Bundle entry must be an object", f"Bundle.entry[{n}]")
        resource = raw.get("resource")
        if resource is not None and not isinstance(resource, Mapping):
            raise _bad("an entry's resource must be an object", f"Bundle.entry[{n}].resource")
        if not isinstance(raw.get("fullUrl", ""), str):
            raise _bad("an entry's fullUrl must be a string", f"Bundle.entry[{n}].fullUrl")
    first = raw_entries[0].get("resource")
    where = "Bundle.entry[0].resource"
    kind = first.get("resourceType") if isinstance(first, Mapping) else None
    if kind not in ("Parameters", "SubscriptionStatus"):
        raise _bad(
            "the first entry of a notification Bundle must be its SubscriptionStatus "
            "(a Parameters resource in R4, or a SubscriptionStatus)",
            where,
        )
    assert isinstance(first, Mapping) and isinstance(kind, str)
    _validate(kind, first, where)
    status = (
        _from_parameters(first, where)
        if kind == "Parameters"
        else _from_subscription_status(first, where)
    )
    if not status.reference:
        raise _profile("the SubscriptionStatus names no subscription", f"{where}.subscription")
    named = resource_ref(status.reference)
    if named is None or named.type != "Subscription":
        raise _profile(
            'subscription must reference a Subscription ("Subscription/<id>")',
            f"{where}.subscription",
            "value",
        )
    if status.kind not in KINDS:
        raise _profile(f"type must be one of {', '.join(KINDS)}", f"{where}.type", "code-invalid")
    if status.status and status.status not in STATUSES:
        raise _profile(
            f"status must be one of {', '.join(STATUSES)}", f"{where}.status", "code-invalid"
        )
    numbers = [event.number for event in status.events]
    if len(set(numbers)) != len(numbers):
        raise _profile("two notification-events have the same event-number", where, "value")
    if 0 in numbers:
        raise _profile("event numbers start at 1", where, "value")
    entries = tuple(
        Entry(str(raw.get("fullUrl") or ""), raw.get("resource"), f"Bundle.entry[{n}]")
        for n, raw in enumerate(raw_entries)
        if n > 0
    )
    return Notification(
        subscription=named.key,
        reference=status.reference,
        kind=status.kind,
        status=status.status or "active",
        topic=status.topic,
        events_since=status.events_since,
        events=tuple(sorted(status.events, key=lambda event: event.number)),
        entries=entries,
    )


# --- the source FHIR server -----------------------------------------------------------------


class FhirSource:
    """The source FHIR server (httpx, one client per notification): reads, `$status`,
    `$events`. Every failure is a SourceError; nothing it raises names patient data."""

    def __init__(
        self,
        base: str,
        *,
        token: str = "",
        timeout: float = SOURCE_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Accept": "application/fhir+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(
            base_url=base.rstrip("/") + "/",
            headers=headers,
            timeout=timeout,
            transport=transport,
            follow_redirects=False,
        )
        self.requests = 0

    def __enter__(self) -> FhirSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._client.close()

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> httpx.Response:
        self.requests += 1
        try:
            return self._client.get(path, params=params)
        except httpx.TimeoutException as exc:
            raise SourceUnavailable("the source FHIR server did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise SourceUnavailable(
                f"the source FHIR server could not be reached ({type(exc).__name__})"
            ) from exc

    @staticmethod
    def _json(response: httpx.Response, what: str) -> Mapping[str, Any]:
        if response.status_code != 200:
            raise SourceUnavailable(
                f"the source FHIR server answered {what} with HTTP {response.status_code}"
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise SourceUnavailable(f"the source FHIR server's {what} is not JSON") from exc
        if not isinstance(body, Mapping):
            raise SourceUnavailable(f"the source FHIR server's {what} is not a FHIR resource")
        return body

    def read(self, ref: ResourceRef) -> dict[str, Any]:
        """The resource (that version when `ref` names one; the current one when the server
        has no such version to give). Raises SourceMissing (404, 410) or SourceUnavailable."""
        response = self._get(ref.path)
        if ref.version and response.status_code in (404, 405, 501):
            response = self._get(ref.key)  # no vread here: the current version will do
        if response.status_code in (404, 410):
            raise SourceMissing(f"the source FHIR server has no {ref.type} of that id")
        body = self._json(response, f"a read of a {ref.type}")
        if body.get("resourceType") != ref.type or body.get("id") != ref.id:
            raise SourceUnavailable(
                f"the source FHIR server answered a read of a {ref.type} with another resource"
            )
        return dict(body)

    def current_count(self, subscription_id: str) -> int | None:
        """events-since-subscription-start from `$status`, or None when the server has no
        `$status` (404, 405, 501)."""
        response = self._get(f"Subscription/{subscription_id}/$status")
        if response.status_code in (404, 405, 501):
            return None
        body = self._json(response, "$status")
        status = body
        if body.get("resourceType") == "Bundle":
            entries = body.get("entry") or []
            status = entries[0].get("resource") or {} if entries else {}
        try:
            if status.get("resourceType") == "Parameters":
                return _from_parameters(status, "$status").events_since
            if status.get("resourceType") == "SubscriptionStatus":
                return _from_subscription_status(status, "$status").events_since
        except NotificationError as exc:
            raise SourceUnavailable("the source FHIR server's $status is not valid") from exc
        raise SourceUnavailable("the source FHIR server's $status holds no subscription status")

    def events(self, subscription_id: str, since: int, until: int) -> Notification:
        """The notification Bundle `$events` gives for events `since`..`until` (inclusive),
        full resources asked for (a hint the server may ignore)."""
        response = self._get(
            f"Subscription/{subscription_id}/$events",
            {
                "eventsSinceNumber": str(since),
                "eventsUntilNumber": str(until),
                "content": "full-resource",
            },
        )
        body = self._json(response, "$events")
        try:
            return parse_notification(body)
        except NotificationError as exc:
            raise SourceUnavailable(
                f"the source FHIR server's $events is not a notification Bundle ({exc.reason})"
            ) from exc


# --- receiving -------------------------------------------------------------------------------


class ResourceIngest(Protocol):
    """What the receiver needs of `adapters.fhir.inbound.FhirIngest`."""

    def accept_resource(
        self,
        uow: UnitOfWork,
        resource: Mapping[str, Any],
        received_at: datetime,
        *,
        sender: str,
        origin: str = "",
    ) -> Any: ...


@dataclass(frozen=True, slots=True)
class _Row:
    revision: int
    last_event: int
    missing: frozenset[int]


@dataclass(frozen=True, slots=True)
class _Ready:
    """One event to apply: its resources in order (context first, focus last)."""

    number: int
    resources: tuple[Mapping[str, Any], ...]
    recovered: bool
    gone: tuple[str, ...] = ()  # "Type/id" the source no longer has


@dataclass(frozen=True, slots=True)
class Receipt:
    """What one notification did. `applied`: event numbers applied now (recovered ones
    included); `recovered`: those read back with $events; `duplicates`: numbers already
    applied before; `lost`: numbers the source could not give back; `resources`: resources
    handed to the ingest; `backlog`: events still to recover (the sender should resend)."""

    subscription: str
    kind: str
    applied: tuple[int, ...] = ()
    recovered: tuple[int, ...] = ()
    duplicates: tuple[int, ...] = ()
    lost: tuple[int, ...] = ()
    resources: int = 0
    rejected: int = 0
    backlog: int = 0
    restarted: bool = False

    def text(self) -> str:
        """A one-line account for the OperationOutcome (numbers and counts only)."""
        parts = [f"{self.kind} for {self.subscription}"]
        if self.applied:
            many = "resource" if self.resources == 1 else "resources"
            parts.append(f"events {_ranges(self.applied)} stored ({self.resources} {many})")
        if self.recovered:
            parts.append(f"events {_ranges(self.recovered)} recovered from the source")
        if self.duplicates:
            parts.append(f"events {_ranges(self.duplicates)} already received: no effect")
        if self.lost:
            parts.append(f"events {_ranges(self.lost)} no longer available: kept for review")
        if self.rejected:
            many = "resource" if self.rejected == 1 else "resources"
            parts.append(f"{self.rejected} {many} refused: kept in quarantine for review")
        if self.backlog:
            parts.append(f"{self.backlog} earlier events still to recover: send it again")
        if len(parts) == 1:
            parts.append("recorded")
        return "; ".join(parts)


def _ranges(numbers: Iterable[int]) -> str:
    """ "1-3, 5"."""
    out: list[str] = []
    run: list[int] = []
    for number in sorted(set(numbers)):
        if run and number == run[-1] + 1:
            run.append(number)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [number]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def _runs(numbers: Sequence[int], page: int) -> Iterator[tuple[int, int]]:
    """Contiguous (first, last) ranges of sorted `numbers`, each at most `page` long."""
    start = previous = None
    for number in numbers:
        if start is None or previous is None:
            start = previous = number
        elif number == previous + 1 and number - start < page:
            previous = number
        else:
            yield start, previous
            start = previous = number
    if start is not None and previous is not None:
        yield start, previous


def _readable(n: Notification, reference: str) -> ResourceRef | None:
    """What to read from the source for a reference the Bundle does not carry: its own
    "Type/id", else that of the entry it names (an id-only entry's fullUrl)."""
    entry = n.find(reference)
    return resource_ref(reference) or (
        resource_ref(entry.full_url) if entry is not None and entry.full_url else None
    )


def _check_readable(n: Notification, event: NotificationEvent) -> None:
    """Refuse (422) an event naming a resource neither carried nor readable: a "urn:uuid:"
    reference with no entry holding its resource."""
    for reference in (*event.context, event.focus):
        if not reference:
            continue
        entry = n.find(reference)
        if entry is not None and entry.resource is not None:
            continue
        if _readable(n, reference) is None:
            raise NotificationError(
                "a focus or additional-context reference names no resource of the Bundle "
                'and no "Type/id" to read from the source',
                event.where,
                "not-found",
                status=422,
            )


class _Conflict(Exception):
    """Another notification changed the subscription's state first: plan again."""


class _KeyedLocks:
    """One lock per subscription, so that this process takes one subscription's
    notifications one at a time (the `revision` check covers other processes)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    @contextmanager
    def held(self, key: str) -> Iterator[None]:
        """Hold the lock of `key` for the block."""
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield


_LOCKS = _KeyedLocks()


class SubscriptionReceiver:
    """Applies notifications: the state per subscription, the source reads, the ingest.

    `source`: a factory for a `FhirSource` (None: no source server is configured, so id-only
    notifications and gaps are answered 503 until one is)."""

    def __init__(
        self,
        store: SqlStore,
        ingest: ResourceIngest,
        source: Callable[[], FhirSource] | None,
        now: Callable[[], datetime],
        *,
        recovery_limit: int = RECOVERY_LIMIT,
    ) -> None:
        self._store = store
        self._ingest = ingest
        self._source = source
        self._now = now
        self._limit = recovery_limit

    # -- state --
    def _load(self, key: str) -> _Row | None:
        with self._store.begin(read_only=True) as uow:
            row = uow.connection.execute(
                select(
                    fhir_subscriptions.c.revision,
                    fhir_subscriptions.c.last_event,
                    fhir_subscriptions.c.missing,
                ).where(fhir_subscriptions.c.subscription == key)
            ).first()
        if row is None:
            return None
        return _Row(int(row.revision), int(row.last_event), frozenset(map(int, row.missing)))

    def receive(self, notification: Notification, sender: str, origin: str = "") -> Receipt:
        """Apply one notification (see the module docstring). Raises SourceUnavailable when
        the source must be read and cannot be (nothing is kept then)."""
        with _LOCKS.held(notification.subscription):
            for _ in range(ATTEMPTS):
                state = self._load(notification.subscription)
                try:
                    return self._attempt(notification, state, sender, origin)
                except _Conflict:
                    continue
        raise SourceUnavailable("the subscription's state kept changing under this notification")

    def _attempt(self, n: Notification, state: _Row | None, sender: str, origin: str) -> Receipt:
        last = state.last_event if state is not None else 0
        missing = set(state.missing) if state is not None else set()
        restarted = False
        if n.kind == "handshake" and n.events_since is not None:
            if state is None:
                last = n.events_since  # what came before this endpoint is not ours to miss
            elif n.events_since < last:
                last, missing, restarted = n.events_since, set(), True

        def fresh(number: int) -> bool:
            return number > last or number in missing

        own = {event.number: event for event in n.events if fresh(event.number)}
        duplicates = tuple(event.number for event in n.events if not fresh(event.number))
        for event in own.values():
            _check_readable(n, event)
        top = max([last, *own, n.events_since or 0])
        gap = [number for number in range(last + 1, top + 1) if number not in own]
        empty = [number for number, event in own.items() if not event.focus]
        needs_source = bool(gap or empty) or any(
            self._unresolved(n, event) for event in own.values()
        )
        ready: list[_Ready] = []
        lost: list[int] = []
        backlog = 0
        if needs_source:
            if self._source is None:
                raise SourceUnavailable(
                    "this notification needs reads from the source FHIR server, and none is "
                    "configured (safetynet serve --fhir-source-server)"
                )
            with self._source() as source:
                if gap:
                    current = source.current_count(n.subscription_id)
                    if current is not None and current > top:
                        gap += range(top + 1, current + 1)
                        top = current
                wanted = sorted(set(gap) | set(empty))
                if len(wanted) > self._limit:
                    backlog = len(wanted) - self._limit
                    wanted = wanted[: self._limit]
                    top = wanted[-1]
                    own = {number: event for number, event in own.items() if number <= top}
                recovered = self._recover(source, n, wanted)
                lost = [number for number in wanted if number not in recovered]
                ready += recovered.values()
                for number, event in own.items():
                    if number not in recovered and number not in empty:
                        ready.append(self._resolve(n, event, source, recovered=False))
        else:
            ready += [self._resolve(n, event, None, recovered=False) for event in own.values()]
        if n.kind in _EVENT_KINDS and not n.events and not backlog:
            ready += self._unnumbered(n)
        ready.sort(key=lambda item: item.number)
        receipt = Receipt(
            subscription=n.subscription,
            kind=n.kind,
            applied=tuple(item.number for item in ready if item.number > 0),
            recovered=tuple(item.number for item in ready if item.recovered),
            duplicates=duplicates,
            lost=tuple(lost),
            backlog=backlog,
            restarted=restarted,
        )
        new_last = max(last, top)
        still_missing = (missing - {item.number for item in ready}) | set(lost)
        return self._write(n, state, receipt, ready, new_last, still_missing, sender, origin)

    def _unresolved(self, n: Notification, event: NotificationEvent) -> bool:
        for reference in (*event.context, event.focus):
            entry = n.find(reference) if reference else None
            if entry is None or entry.resource is None:
                return True
        return False

    def _unnumbered(self, n: Notification) -> list[_Ready]:
        """Entries of an event notification that numbers no event (an older backport draft):
        applied as they come; the inbox's duplicate check is their only guard."""
        resources = tuple(entry.resource for entry in n.entries if entry.resource is not None)
        return [_Ready(0, resources, recovered=False)] if resources else []

    def _resolve(
        self,
        n: Notification,
        event: NotificationEvent,
        source: FhirSource | None,
        *,
        recovered: bool,
    ) -> _Ready:
        """The event's resources: from the Bundle, else read from the source."""
        resources: list[Mapping[str, Any]] = []
        gone: list[str] = []
        for reference in (*event.context, event.focus):
            if not reference:
                continue
            entry = n.find(reference)
            if entry is not None and entry.resource is not None:
                resources.append(entry.resource)
                continue
            ref = _readable(n, reference)
            if ref is None:
                _check_readable(n, event)  # raises
                continue
            if source is None:  # pragma: no cover - guarded by _unresolved
                raise SourceUnavailable("no source FHIR server is configured")
            try:
                resources.append(source.read(ref))
            except SourceMissing:
                gone.append(ref.key)
        return _Ready(event.number, tuple(resources), recovered, tuple(gone))

    def _recover(
        self, source: FhirSource, n: Notification, wanted: Sequence[int]
    ) -> dict[int, _Ready]:
        """Read `wanted` events back with `$events`, page by page."""
        found: dict[int, _Ready] = {}
        chosen = set(wanted)
        for first, last in _runs(wanted, RECOVERY_PAGE):
            page = source.events(n.subscription_id, first, last)
            for event in page.events:
                if event.number not in chosen or not event.focus or event.number in found:
                    continue
                try:
                    found[event.number] = self._resolve(page, event, source, recovered=True)
                except NotificationError:
                    continue  # the source's own Bundle names nothing readable: lost
        return found

    # -- writing --
    def _write(
        self,
        n: Notification,
        state: _Row | None,
        receipt: Receipt,
        ready: Sequence[_Ready],
        last_event: int,
        missing: set[int],
        sender: str,
        origin: str,
    ) -> Receipt:
        at = self._now()
        table = fhir_subscriptions
        values = {
            "reference": n.reference,
            "topic": n.topic,
            "status": n.status,
            "last_event": last_event,
            "missing": sorted(missing)[-MISSING_KEPT:],
            "last_type": n.kind,
            "updated_at": at,
        }
        accepted = rejected = 0
        try:
            with self._store.begin() as uow:
                if state is None:
                    uow.connection.execute(
                        insert(table).values(
                            subscription=n.subscription,
                            reported_events=n.events_since or 0,
                            notifications=1,
                            revision=1,
                            created_at=at,
                            **values,
                        )
                    )
                else:
                    done = uow.connection.execute(
                        update(table)
                        .where(
                            table.c.subscription == n.subscription,
                            table.c.revision == state.revision,
                        )
                        .values(
                            reported_events=(
                                n.events_since
                                if n.events_since is not None
                                else table.c.reported_events
                            ),
                            notifications=table.c.notifications + 1,
                            revision=state.revision + 1,
                            **values,
                        )
                    )
                    if done.rowcount != 1:
                        raise _Conflict
                for item in ready:
                    where = f"subscription {n.subscription} event {item.number}"
                    for resource in item.resources:
                        result = self._ingest.accept_resource(
                            uow, resource, at, sender=sender, origin=f"{origin}{where}"
                        )
                        if int(getattr(result, "status", 200)) >= 400:
                            rejected += 1
                        else:
                            accepted += 1
                    for key in item.gone:
                        uow.quarantine(
                            None,
                            f"{key.split('/')[0]} of event {item.number} of {n.subscription}: "
                            "the source FHIR server no longer has it",
                            "AE",
                            "notification-event.focus",
                            {"subscription": n.subscription, "event": item.number, "ref": key},
                            at=at,
                        )
                self._audit(uow, at, sender, n, receipt)
        except IntegrityError as exc:  # a first notification of it was stored meanwhile
            raise _Conflict from exc
        done_receipt = replace(receipt, resources=accepted, rejected=rejected)
        # Extras on the log allow-list only (adapters.service.logs): the subscription as
        # `sender`, the notification type as `kind`, numbers as `count`.
        log.info(
            "subscription notification",
            extra={"sender": n.subscription, "kind": n.kind, "count": len(receipt.applied)},
        )
        if receipt.recovered:
            log.info(
                "subscription gap recovered from the source",
                extra={"sender": n.subscription, "count": len(receipt.recovered)},
            )
        if receipt.lost:
            log.warning(
                "subscription events lost: the source no longer has them",
                extra={"sender": n.subscription, "count": len(receipt.lost)},
            )
        return done_receipt

    @staticmethod
    def _audit(
        uow: UnitOfWork, at: datetime, actor: str, n: Notification, receipt: Receipt
    ) -> None:
        subject = n.subscription
        uow.audit(
            at,
            actor,
            f"subscription.{n.kind}",
            subject,
            {
                "status": n.status,
                "events_since_subscription_start": n.events_since,
                "applied": list(receipt.applied),
                "duplicates": list(receipt.duplicates),
            },
        )
        if receipt.restarted:
            uow.audit(at, actor, "subscription.restarted", subject, {"count": n.events_since})
        if receipt.recovered:
            uow.audit(
                at,
                actor,
                "subscription.gap-recovered",
                subject,
                {"events": list(receipt.recovered), "via": "$status, $events"},
            )
        if receipt.lost:
            uow.audit(
                at, actor, "subscription.events-lost", subject, {"events": list(receipt.lost)}
            )
            uow.quarantine(
                None,
                f"events {_ranges(receipt.lost)} of {n.subscription} could not be recovered "
                "from the source FHIR server: the record may be incomplete",
                "AE",
                "Subscription/$events",
                {"subscription": n.subscription, "events": list(receipt.lost)},
                at=at,
            )


# --- HTTP -----------------------------------------------------------------------------------


def _keep_malformed(
    api: FhirApi, raw: str, sender: str, error: NotificationError, origin: str
) -> None:
    """Keep a malformed notification's raw text for review (inbox + quarantine)."""
    at = api.now()
    with api.store.begin() as uow:
        entry = uow.add_to_inbox(
            InboundMessage(
                raw=raw,
                sender=sender,
                control_id="",
                content_hash=content_hash(raw),
                received_at=at,
                protocol=PROTOCOL,
                message_type="Bundle/subscription-notification",
                origin=origin,
            )
        )
        if not entry.duplicate:
            uow.quarantine(
                entry.id,
                error.reason,
                "AR" if error.status == 400 else "AE",
                error.location,
                {"http_status": error.status, "issue_code": error.code},
                at=at,
            )
            uow.set_inbox_state(entry.id, "quarantined", error.reason)


def _source_factory(api: FhirApi) -> Callable[[], FhirSource] | None:
    base = api.source_server
    if not base:
        return None
    token = str(getattr(api, "source_token", "") or "")
    timeout = float(getattr(api, "source_timeout", SOURCE_TIMEOUT) or SOURCE_TIMEOUT)
    return lambda: FhirSource(base, token=token, timeout=timeout)


def _ingest(api: FhirApi) -> ResourceIngest:
    """The HTTP side's ingest: it accepts into the inbox; the worker's own processes."""
    return FhirIngest(api.mapper)


async def _raw_body(request: Request) -> bytes:
    """FastAPI dependency: the request body as sent (handlers stay synchronous)."""
    return await request.body()


@router.post(
    NOTIFICATION_PATH,
    summary="Receive a FHIR Subscription notification (R4 Subscriptions backport)",
    response_class=FhirResponse,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/fhir+json": {
                    "schema": {
                        "type": "object",
                        "description": "a Bundle of type history, the SubscriptionStatus "
                        "(R4: a Parameters resource) its first entry",
                    }
                }
            },
        }
    },
    responses={
        400: {"description": "not a notification Bundle (OperationOutcome; kept for review)"},
        422: {"description": "a SubscriptionStatus that breaks the profile (OperationOutcome)"},
        503: {"description": "the source FHIR server could not be read: send it again"},
    },
)
def subscription_notification(
    request: Request,
    body: Annotated[bytes, Depends(_raw_body)],
    caller: Annotated[Principal, Depends(require("feed"))],
    api: Annotated[FhirApi, Depends(fhir_api)],
) -> FhirResponse:
    """The channel endpoint of the hospital's Subscriptions: a `history` Bundle whose first
    entry is the SubscriptionStatus. 200 with an OperationOutcome (information) saying what
    was stored; 400/422 for a malformed notification (kept for review); 503 with Retry-After
    when the source FHIR server must be read and cannot be (nothing kept: send it again)."""
    return _handle(api, caller, body, _origin(request))


def _origin(request: Request) -> str:
    client = request.client
    peer = f"{client.host}:{client.port}" if client is not None else ""
    return f"http:POST /fhir{NOTIFICATION_PATH} {peer} ".lstrip()


def _handle(api: FhirApi, caller: Principal, body: bytes, origin: str) -> FhirResponse:
    raw = body.decode("utf-8-sig", errors="replace")
    try:
        try:
            parsed = parse_json(body)
        except FhirMappingError as exc:
            raise NotificationError(exc.reason, exc.location, exc.code, status=400) from exc
        notification = parse_notification(parsed)
    except NotificationError as exc:
        _keep_malformed(api, raw, caller.subject, exc, origin)
        raise FhirHttpError(exc.status, exc.reason, code=exc.code, location=exc.location) from exc
    receiver = SubscriptionReceiver(api.store, _ingest(api), _source_factory(api), api.now)
    try:
        receipt = receiver.receive(notification, caller.subject, origin)
    except NotificationError as exc:
        _keep_malformed(api, raw, caller.subject, exc, origin)
        raise FhirHttpError(exc.status, exc.reason, code=exc.code, location=exc.location) from exc
    except SourceUnavailable as exc:
        log.warning(
            "subscription notification deferred: source unavailable",
            extra={"sender": notification.subscription, "reason_code": "source-unavailable"},
        )
        raise FhirHttpError(
            503,
            f"{exc.reason}; nothing was kept: send the notification again",
            code="transient",
            headers={"Retry-After": RETRY_AFTER},
        ) from exc
    if receipt.applied or receipt.resources:
        api.notify()
    if receipt.backlog and notification.kind in _EVENT_KINDS:
        raise FhirHttpError(503, receipt.text(), code="transient", headers={"Retry-After": "1"})
    return FhirResponse(
        operation_outcome(receipt.text(), code="informational", severity="information"),
        status_code=200,
    )

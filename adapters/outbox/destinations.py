"""Where Task changes go: a FHIR R4 server (conditional update) or a webhook, over HTTP.

Each destination makes one synchronous HTTP request per change (`httpx.Client`: the dispatcher
runs in a thread) and either returns (delivered) or raises `DeliveryError`. Every failure is
retried by the dispatcher, a 4xx included: a Task is never dropped because a server refused it
once; the reason records what the server said, so a person can fix the cause.

    AdapterError                 (adapters.errors) root of the adapters' exceptions
     +-- DeliveryError           a destination did not accept a change: `reason` (what the
                                 server said, or why no answer came), `status_code` (None
                                 when there was no HTTP answer), `retry_after` (seconds the
                                 server asked us to wait, from Retry-After on 429/503)

httpx's exceptions (timeouts, connection errors) are translated here and never leave.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Final, Protocol

import httpx

from adapters.errors import AdapterError
from adapters.fhir.task import TASK_SYSTEM
from adapters.outbox.store import Delivery

__all__ = [
    "DeliveryError",
    "Destination",
    "FhirTaskDestination",
    "WebhookDestination",
    "destination_from_url",
]

FHIR_JSON: Final = "application/fhir+json"
WEBHOOK_EVENT: Final = "task.changed"
SIGNATURE_HEADER: Final = "X-Safetynet-Signature"
# A server's own words in a reason are cut to this length (the store keeps 500 characters).
_SERVER_TEXT_LIMIT = 300
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


class DeliveryError(AdapterError):
    """A destination did not accept a change; the dispatcher retries it later.

    `reason` says what happened in plain words and quotes the server's answer (it is stored
    with the delivery, never logged); `status_code` is the HTTP status, or None when no answer
    came; `retry_after` is how long the server asked us to wait, in seconds, if it said."""

    def __init__(
        self, reason: str, *, status_code: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.status_code = status_code
        self.retry_after = retry_after


class Destination(Protocol):
    """One configured receiver of Task changes."""

    name: str

    def deliver(self, delivery: Delivery) -> None:
        """Send one change; return only once the receiver has accepted it. Raises
        `DeliveryError` for every kind of failure. Must be safe to repeat (the same change can
        be sent again after a crash between sending and recording)."""
        ...

    def close(self) -> None:
        """Release connections. The destination is unusable afterwards."""
        ...


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        # Measure against the server's own clock when it sent one: ours may be skewed.
        reference = datetime.now(UTC)
        date = response.headers.get("Date")
        if date is not None:
            with contextlib.suppress(TypeError, ValueError):
                reference = parsedate_to_datetime(date)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        if reference.tzinfo is None:
            reference = reference.replace(tzinfo=UTC)
        seconds = (when - reference).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _server_says(response: httpx.Response) -> str:
    """The server's explanation: an OperationOutcome's issues, else the start of the body."""
    text = ""
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        issues = []
        for issue in body.get("issue") or ():
            if not isinstance(issue, dict):
                continue
            details = issue.get("details")
            said = issue.get("diagnostics") or (
                details.get("text") if isinstance(details, dict) else None
            )
            code = issue.get("code", "")
            issues.append(f"{code}: {said}" if said else str(code))
        text = "; ".join(issues)
    if not text:
        try:
            text = response.text
        except (UnicodeDecodeError, LookupError):
            text = ""
    text = " ".join(text.split())
    return text[:_SERVER_TEXT_LIMIT]


def _refused(response: httpx.Response, what: str = "") -> DeliveryError:
    status = response.status_code
    reason = f"HTTP {status} {response.reason_phrase}".rstrip()
    if what:
        reason += f" ({what})"
    said = _server_says(response)
    if said:
        reason += f": {said}"
    retry_after = _retry_after(response) if status in (429, 503) else None
    return DeliveryError(reason, status_code=status, retry_after=retry_after)


def _send(client: httpx.Client, request: httpx.Request) -> httpx.Response:
    """Send, turning httpx's transport failures into DeliveryError."""
    try:
        return client.send(request)
    except httpx.TimeoutException as exc:
        raise DeliveryError(f"no answer in time ({type(exc).__name__})") from exc
    except httpx.TransportError as exc:
        raise DeliveryError(f"connection failed ({type(exc).__name__})") from exc


def _client(
    headers: Mapping[str, str] | None, timeout: float, transport: httpx.BaseTransport | None
) -> httpx.Client:
    # Redirects are not followed: a PUT or a signed POST must reach the URL configured.
    return httpx.Client(
        headers=dict(headers or {}),
        timeout=timeout,
        transport=transport,
        follow_redirects=False,
    )


class FhirTaskDestination:
    """A FHIR R4 server that keeps the Tasks: each change is a conditional update keyed by the
    Task's identifier, `PUT [base]/Task?identifier=urn:safetynet:task|<identifier>`.

    The server creates the Task (with an id it assigns) when none has that identifier and
    replaces the one that does, so redelivering a change is harmless and safetynet never needs
    to remember the server's ids. 200 and 201 mean delivered; 412 (several Tasks carry the
    identifier) and every other answer or failure raise `DeliveryError`.

    The body is sent without `id`. FHIR R4 (http.html, conditional update: "The resource MAY
    contain an id element, but does not need to") matches by the search, not by an id; our `id`
    is safetynet's identifier, never the id the server assigned, and a server that checks a
    given id against the match (R5 requires a 400 when they differ, and a server may create
    with a client id when nothing matches) would refuse every update after the first or keep
    our id. Leaving it out is valid on every version. The identifier the search names is always
    in the body (added if missing), or the next update could not find the Task.
    The `Task/<identifier>` in a `partOf` reference is left as rendered; the identifier beside
    it is what a receiving server can resolve.

    Not for servers without conditional update (their CapabilityStatement says
    `conditionalUpdate: false`; they answer 400 and the delivery stays pending for ever).
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.name = name
        self._url = base_url.rstrip("/") + "/Task"
        self._client = _client(headers, timeout, transport)

    def body(self, delivery: Delivery) -> dict[str, Any]:
        """The JSON sent for a change: the Task without `id`, with its identifier."""
        body = {key: value for key, value in delivery.resource.items() if key != "id"}
        ours = {"system": TASK_SYSTEM, "value": delivery.task_identifier}
        identifiers = list(body.get("identifier") or [])
        if not any(
            isinstance(i, Mapping)
            and i.get("system") == TASK_SYSTEM
            and i.get("value") == delivery.task_identifier
            for i in identifiers
        ):
            body["identifier"] = [*identifiers, ours]
        return body

    def deliver(self, delivery: Delivery) -> None:
        """Create or update the Task on the server; raises `DeliveryError` unless 200/201."""
        request = self._client.build_request(
            "PUT",
            self._url,
            params={"identifier": f"{TASK_SYSTEM}|{delivery.task_identifier}"},
            content=json.dumps(self.body(delivery), separators=(",", ":")).encode(),
            headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON},
        )
        response = _send(self._client, request)
        if response.status_code in (200, 201):
            return
        if response.status_code == 412:
            raise _refused(response, "more than one Task on the server has this identifier")
        raise _refused(response)

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()


class WebhookDestination:
    """A URL that receives each change as a JSON POST:
    `{"event": "task.changed", "task_identifier", "task_version", "task": <Task JSON>}`.

    Headers: `Idempotency-Key: <identifier>:<version>` (a receiver can drop repeats: a change
    may arrive twice after a crash), and with a `secret`, `X-Safetynet-Signature:
    sha256=<hex HMAC-SHA256 of the exact body bytes>`. Any 2xx means delivered.
    """

    def __init__(
        self,
        name: str,
        url: str,
        *,
        secret: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.name = name
        self._url = url
        self._secret = secret.encode() if secret else None
        self._client = _client(headers, timeout, transport)

    def body(self, delivery: Delivery) -> bytes:
        """The exact bytes posted (and signed) for a change."""
        payload = {
            "event": WEBHOOK_EVENT,
            "task_identifier": delivery.task_identifier,
            "task_version": delivery.task_version,
            "task": dict(delivery.resource),
        }
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()

    def deliver(self, delivery: Delivery) -> None:
        """POST the change; raises `DeliveryError` unless the answer is 2xx."""
        body = self.body(delivery)
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": f"{delivery.task_identifier}:{delivery.task_version}",
        }
        if self._secret is not None:
            digest = hmac.new(self._secret, body, hashlib.sha256).hexdigest()
            headers[SIGNATURE_HEADER] = f"sha256={digest}"
        request = self._client.build_request("POST", self._url, content=body, headers=headers)
        response = _send(self._client, request)
        if not response.is_success:
            raise _refused(response)

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()


_KINDS = ("fhir", "webhook")


def destination_from_url(
    spec: str,
    *,
    secret: str | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Destination:
    """A destination from a setting: `fhir=https://host/fhir`, `webhook=https://host/hook`,
    or `name:kind=url` to name it (the name defaults to the kind; each destination's name keys
    its delivery rows, so renaming one delivers everything again to the "new" destination).

    `secret` signs webhook bodies (a FHIR destination has no use for it and ignores it, so one
    site-wide secret can be passed for every spec); `headers` (e.g. Authorization) go on every
    request. Raises ValueError naming what is wrong; the message
    repeats the scheme and host, never the rest of the URL (it may carry credentials).
    """
    label, equals, url = spec.strip().partition("=")
    if not equals or not label or not url:
        raise ValueError(
            "a destination is KIND=URL or NAME:KIND=URL with KIND one of "
            f"{', '.join(_KINDS)} (e.g. fhir=https://host/fhir); got {label or spec[:20]!r}..."
        )
    name, colon, kind = label.rpartition(":")
    if not colon:
        name = kind
    if kind not in _KINDS:
        raise ValueError(f"unknown destination kind {kind!r}: use one of {', '.join(_KINDS)}")
    if not _NAME.match(name):
        raise ValueError(
            f"destination name {name!r} must be letters, digits, '_', '.' or '-' "
            "(starting with a letter or digit)"
        )
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"destination {name!r}: the URL cannot be read ({exc})") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(
            f"destination {name!r}: the URL must be http:// or https:// with a host "
            f"(got scheme {parsed.scheme!r}, host {parsed.host!r})"
        )
    if kind == "fhir":
        return FhirTaskDestination(name, url, headers=headers, timeout=timeout)
    return WebhookDestination(name, url, secret=secret, headers=headers, timeout=timeout)

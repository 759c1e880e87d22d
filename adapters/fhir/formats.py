"""Content negotiation for every route under `/fhir`, in one place: this server speaks FHIR
JSON only.

- A request body must be JSON: `application/fhir+json`, `application/json`, or any
  `application/*+json` (JSON Patch is `application/json-patch+json`). A body sent as XML
  (`application/fhir+xml`, `application/xml`, `text/xml`) or as anything else is refused
  with 415 before a handler sees it. A request without a Content-Type is read as JSON.
- `_format` (FHIR's override of Accept) may be `json`, `application/json` or
  `application/fhir+json`; anything else (`xml`, `ttl`, `html`...) is refused with 406.
- Without `_format`, an Accept header must allow one of the JSON types (with q > 0, wildcards
  count); one that allows only XML (or only anything else) is refused with 406.

Refusals are OperationOutcomes. It is an ASGI middleware rather than a FastAPI dependency so
that it runs before anything reads the body, for every route, including the ones a router
adds later. It echoes a media type in its diagnostics only when it is a plain token (a header
may carry anything, and patient data never goes into an answer or a log).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from adapters.fhir.http import FHIR_JSON, outcome_response

__all__ = ["JSON_TYPES", "FhirFormats", "refusal"]

JSON_TYPES = (FHIR_JSON, "application/json")
_JSON_FORMATS = frozenset({"json", *JSON_TYPES})
_XML = frozenset({"application/fhir+xml", "application/xml", "text/xml", "xml"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_TOKEN = re.compile(r"^[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+*-]{1,64}$|^[a-z]{1,16}$")


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def _shown(media_type: str) -> str:
    return media_type if _TOKEN.match(media_type) else "this media type"


def _is_json(media_type: str) -> bool:
    kind, _, subtype = media_type.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def _quality(parameters: list[str]) -> float:
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value.strip())
            except ValueError:
                return 0.0
    return 1.0


def _accepts_json(accept: str) -> bool:
    """Whether an Accept header allows a JSON type (RFC 9110 media ranges, q > 0)."""
    for media_range in accept.split(","):
        if not media_range.strip():
            continue
        kind_sub, *parameters = media_range.split(";")
        wanted = kind_sub.strip().lower()
        if _quality(parameters) <= 0:
            continue
        if wanted in ("*/*", "application/*") or wanted in JSON_TYPES:
            return True
    return False


def refusal(method: str, headers: Headers, query_string: bytes) -> tuple[int, str] | None:
    """(status, diagnostics) when a /fhir request asks for or sends a format this server
    does not speak; None when it may go on."""
    if method in _BODY_METHODS and headers.get("content-type"):
        sent = _media_type(headers["content-type"])
        if sent in _XML:
            return 415, (f"Content-Type {sent}: XML is not supported; send the body as {FHIR_JSON}")
        if not _is_json(sent):
            return 415, (
                f"Content-Type {_shown(sent)} is not supported; send the body as {FHIR_JSON}"
            )
    formats = [
        value
        for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
        if name == "_format"
    ]
    if formats:
        for value in formats:
            asked = _media_type(value)
            if asked not in _JSON_FORMATS:
                kind = "XML is" if asked in _XML else f"_format={_shown(asked)} is"
                return 406, (
                    f"{kind} not supported: this server answers in {FHIR_JSON} only "
                    "(_format=json, or leave _format out)"
                )
        return None  # _format overrides Accept
    accept = headers.get("accept", "").strip()
    if accept and not _accepts_json(accept):
        return 406, (
            f"the Accept header allows no format this server produces: it answers in "
            f"{FHIR_JSON} (or application/json) only"
        )
    return None


class FhirFormats:
    """ASGI middleware applying `refusal` to every HTTP request under `prefix`."""

    def __init__(self, app: ASGIApp, prefix: str = "/fhir") -> None:
        self.app = app
        self.prefix = prefix.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == self.prefix or path.startswith(self.prefix + "/"):
            refused = refusal(scope["method"], Headers(scope=scope), scope.get("query_string", b""))
            if refused is not None:
                status, diagnostics = refused
                response = outcome_response(status, diagnostics)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

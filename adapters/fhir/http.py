"""HTTP plumbing shared by every FHIR endpoint: the media type, OperationOutcome answers, and
the exception handlers that make every error (ours, FastAPI's, an unexpected crash) a FHIR
OperationOutcome with the right status code.

Handlers raise `FhirHttpError(status, diagnostics, code=..., location=...)`; anything else
that escapes becomes a 500 OperationOutcome that says nothing of the input (a broken sender
may put patient data anywhere; the traceback goes to the log, by exception type only).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = [
    "FHIR_JSON",
    "FhirHttpError",
    "FhirResponse",
    "install_fhir_errors",
    "operation_outcome",
    "outcome_response",
]

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"

# The OperationOutcome issue type each HTTP status defaults to.
_DEFAULT_CODE = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    410: "deleted",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "processing",
    429: "throttled",
    500: "exception",
    503: "transient",
}


class FhirResponse(Response):
    """A JSON body sent as `application/fhir+json; charset=utf-8`."""

    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def operation_outcome(
    diagnostics: str,
    *,
    code: str = "invalid",
    severity: str = "error",
    location: str | Sequence[str] = "",
    issues: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """An OperationOutcome with one issue (or `issues`, already built, appended after it)."""
    issue: dict[str, Any] = {"severity": severity, "code": code, "diagnostics": diagnostics}
    locations = [location] if isinstance(location, str) else list(location)
    locations = [where for where in locations if where]
    if locations:
        issue["expression"] = locations
    return {"resourceType": "OperationOutcome", "issue": [issue, *issues]}


class FhirHttpError(Exception):
    """An error answered with `status` and an OperationOutcome."""

    def __init__(
        self,
        status: int,
        diagnostics: str,
        *,
        code: str = "",
        location: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.diagnostics = diagnostics
        self.code = code or _DEFAULT_CODE.get(status, "processing")
        self.location = location
        self.headers = dict(headers or {})

    def outcome(self) -> dict[str, Any]:
        """The OperationOutcome body."""
        return operation_outcome(self.diagnostics, code=self.code, location=self.location)


def outcome_response(
    status: int,
    diagnostics: str,
    *,
    code: str = "",
    severity: str = "error",
    location: str = "",
    headers: Mapping[str, str] | None = None,
) -> FhirResponse:
    """An OperationOutcome response."""
    body = operation_outcome(
        diagnostics,
        code=code or _DEFAULT_CODE.get(status, "processing"),
        severity=severity,
        location=location,
    )
    return FhirResponse(body, status_code=status, headers=dict(headers or {}))


def _validation_text(exc: RequestValidationError) -> tuple[str, str]:
    errors = exc.errors()
    if not errors:
        return "the request is not valid", ""
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return f"{where or 'request'}: {first.get('msg', 'not valid')}", where


def install_fhir_errors(app: FastAPI) -> None:
    """Answer every error raised under `app` with an OperationOutcome."""

    @app.exception_handler(FhirHttpError)
    async def _fhir_error(request: Request, exc: FhirHttpError) -> Response:
        return FhirResponse(exc.outcome(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        headers = dict(exc.headers or {})
        return outcome_response(exc.status_code, detail, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        text, where = _validation_text(exc)
        return outcome_response(400, text, location=where)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        kind = type(exc)
        log.error(
            "request failed",
            extra={"reason_code": f"{kind.__module__}.{kind.__qualname__}"},
            exc_info=False,
        )
        return outcome_response(500, "internal error: the request was not completed")

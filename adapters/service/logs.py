"""Structured JSON logs for `safetynet serve`, safe by construction.

Each record is one JSON line: `time` (ISO-8601, UTC, milliseconds), `level`, `logger`,
`message`, then the record's extra fields that are on the allow-list below. DESIGN.md's
non-negotiable 6 (no patient data in logs) is kept by what can reach a line, not by care at each
call site:

- **Extras pass an allow-list.** `SafeExtrasFilter` drops every `extra=` key (and every key of a
  dict logged as the message) not in `ALLOWED_EXTRAS`, so `extra={"surname": ...}` logs nothing:

      inbox_id, outbox_id, control_id, sender, message_type, ack_code, task_identifier,
      rule_id, rule_version, destination, status_code, attempts, worker_pid, lease_holder,
      epoch, peer, bytes, reason_code, duration_ms, count, kind, state, method, path,
      principal (the API caller: a token name or a JWT subject: staff or a system)

  These name messages (inbox id, MSH-10), systems (MSH-3^MSH-4, destinations, peers), API
  callers and internal work, never a patient. `patient_key` is deliberately absent: today a
  patient key is the preferred identifier token itself
  (`https://fhir.nhs.uk/Id/nhs-number|<NHS number>`), so logging it would log the NHS number.
  Add a key here only if no value of it can name a patient.
- **Exceptions keep their type and frames, not their message.** A driver error quotes its SQL
  parameters (a raw HL7 message on an inbox insert), a parser error the segment it choked on;
  so a traceback is logged as each exception's qualified type name and its frames (file, line,
  function; no source lines, no locals), the text withheld. Log what you need as extras.
- **The access log drops query strings.** uvicorn's access line is rewritten to method, path and
  status (`AccessLogFilter`): a FHIR search's query (`?patient=...`) never reaches the log.

What no filter can stop: the message text itself. Log fixed sentences and put ids in extras
(`log.info("message quarantined", extra={"inbox_id": 5})`), never `%s` of clinical content.
"""

from __future__ import annotations

import logging
import sys
import traceback
from datetime import UTC, datetime
from types import TracebackType
from typing import IO, Any

from pythonjsonlogger.json import JsonFormatter

__all__ = [
    "ALLOWED_EXTRAS",
    "AccessLogFilter",
    "JsonLogFormatter",
    "SafeExtrasFilter",
    "configure_logging",
    "uvicorn_log_config",
]

ALLOWED_EXTRAS: frozenset[str] = frozenset(
    {
        "inbox_id",
        "outbox_id",
        "control_id",
        "sender",
        "message_type",
        "ack_code",
        "task_identifier",
        "rule_id",
        "rule_version",
        "destination",
        "status_code",
        "attempts",
        "worker_pid",
        "lease_holder",
        "epoch",
        "peer",
        "bytes",
        "reason_code",
        "duration_ms",
        "count",
        "kind",
        "state",
        "method",
        "path",
        "principal",
    }
)
"""The extra fields a log line may carry; any other `extra=` key is dropped (see the module)."""

# The attributes every LogRecord has (its own fields, not extras), plus those formatters add.
_RECORD_FIELDS = frozenset(logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

# Marks the root handler `configure_logging` installed, so calling it again replaces it.
_OURS = "_safetynet_json_handler"

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class SafeExtrasFilter(logging.Filter):
    """Removes from each record the extra fields not in `ALLOWED_EXTRAS` (and keys of a dict
    message likewise), and any exception text another formatter cached on it. Never rejects a
    record. Attach it to a handler, so records from every logger pass through it."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Strip the record in place; always True."""
        for key in [k for k in record.__dict__ if k not in _RECORD_FIELDS]:
            if key not in ALLOWED_EXTRAS and not key.startswith("_"):
                del record.__dict__[key]
        if isinstance(record.msg, dict):
            record.msg = {k: v for k, v in record.msg.items() if k in ALLOWED_EXTRAS}
        # Another handler's formatter may have cached the full traceback text, message and all.
        record.exc_text = None
        return True


class AccessLogFilter(logging.Filter):
    """Rewrites uvicorn's access line (`peer - "GET /path?query HTTP/1.1" 200`) as
    `GET /path 200` with `peer`, `method`, `path` and `status_code` extras; the query string
    is dropped. Lines for `/fhir` are dropped whole: their paths carry the senders' resource
    ids (`/fhir/Patient/<id>`, which may be an NHS number), and `safetynet.http` already logs
    each of those requests by its route template (adapters/service/audit.py). Other records
    pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite an access record in place; False only for a `/fhir` access line."""
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            peer, method, full_path, _http_version, status = args
            path = str(full_path).split("?", 1)[0]
            if path == "/fhir" or path.startswith("/fhir/"):
                return False
            record.peer = str(peer)
            record.method = str(method)
            record.path = path
            record.status_code = status
            record.msg = "%s %s %s"
            record.args = (method, path, status)
        return True


class JsonLogFormatter(JsonFormatter):
    """One JSON object per record: time (UTC), level, logger, message, then extras.

    Use it together with `SafeExtrasFilter` (as `configure_logging` does): the formatter writes
    whatever extras reach it. Exceptions are written without their messages (see the module).
    `use_colors` is accepted and ignored (uvicorn passes it to its formatters).
    """

    def __init__(self, use_colors: bool | None = None) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """ISO-8601 in UTC with milliseconds, e.g. `2026-03-01T09:00:00.123Z`."""
        at = datetime.fromtimestamp(record.created, UTC)
        return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def formatException(self, ei: Any) -> str:
        """Each chained exception's type and frames (file, line, function), never its message."""
        return _traceback_without_messages(ei)


def _traceback_without_messages(ei: _ExcInfo | tuple[None, None, None]) -> str:
    exc = ei[1]
    chain: list[BaseException] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        if exc.__cause__ is not None:
            exc = exc.__cause__
        elif not exc.__suppress_context__:
            exc = exc.__context__
        else:
            exc = None
    lines: list[str] = []
    for position, link in enumerate(reversed(chain)):
        if position:
            lines.append("\nThe above exception led to the following exception:\n\n")
        lines.append("Traceback (most recent call last):\n")
        lines.extend(
            f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}\n'
            for frame in traceback.extract_tb(link.__traceback__)
        )
        kind = type(link)
        lines.append(f"{kind.__module__}.{kind.__qualname__} (message withheld)\n")
    return "".join(lines).rstrip("\n")


def configure_logging(level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Send every logger's records, as safe JSON lines, to `stream` (standard error by default)
    at `level` and above.

    Installs one handler on the root logger with `JsonLogFormatter` and `SafeExtrasFilter`.
    Idempotent: calling it again replaces that handler (other handlers are left alone). Call it
    once from the composition root (and once in each worker process), before the first record
    is logged.
    """
    root = logging.getLogger()
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    for handler in list(root.handlers):
        if getattr(handler, _OURS, False):
            root.removeHandler(handler)
            handler.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _OURS, True)
    handler.setFormatter(JsonLogFormatter())
    handler.addFilter(SafeExtrasFilter())
    root.addHandler(handler)
    root.setLevel(numeric)


def uvicorn_log_config(level: str = "INFO", stream: IO[str] | None = None) -> dict[str, Any]:
    """A `logging.config.dictConfig` dictionary for `uvicorn.Config(log_config=...)`: uvicorn's
    server and access logs as the same safe JSON lines, access lines without query strings.

    Leaves other loggers as they are (`disable_existing_loggers` is False), but note that any
    `dictConfig` call closes the handlers it finds; `configure_logging`'s handler keeps
    working after it, because closing a stream handler does not close its stream.
    """
    target: Any = stream if stream is not None else "ext://sys.stderr"
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        # uvicorn sets `use_colors` on these two names when asked to; the formatter ignores it.
        "formatters": {
            "default": {"()": JsonLogFormatter},
            "access": {"()": JsonLogFormatter},
        },
        "filters": {
            "safe_extras": {"()": SafeExtrasFilter},
            "access_line": {"()": AccessLogFilter},
        },
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["safe_extras"],
                "stream": target,
            },
            "access": {
                "class": "logging.StreamHandler",
                "formatter": "access",
                # Order matters: the access line is rewritten before the allow-list applies.
                "filters": ["access_line", "safe_extras"],
                "stream": target,
            },
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["access"], "level": level, "propagate": False},
        },
    }

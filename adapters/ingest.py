"""Ingest: one raw HL7 v2 message -> inbox -> events -> processor, with the answer it gets.

Shared by replay (files) and, later, the MLLP listener. The raw message is always stored
first (the inbox, or quarantine with a reason when it cannot be read); a redelivery (same
sender, control id and content) is answered again and has no second effect.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from adapters.errors import AdapterError, UnsupportedMessage
from adapters.hl7v2.er7 import Hl7ReadError, read_message
from adapters.hl7v2.mapping import Mapper
from engine.errors import EngineError, RuleEvaluationError
from engine.events import Event
from engine.ports import InboundMessage, StoredTask, UnitOfWork
from engine.processor import Processor

UNREADABLE_SENDER = "(unreadable)"


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What became of one message, and the ACK it earns (AA, AE or AR)."""

    ack_code: str
    control_id: str = ""
    message_type: str = ""
    reason: str = ""
    location: str = ""
    inbox_id: int | None = None
    duplicate: bool = False
    control_id_reused: bool = False
    unsupported: bool = False
    tasks: tuple[StoredTask, ...] = field(default_factory=tuple)


NowFor = Callable[[Sequence[Event]], datetime]
"""Processing time for a message's events: the wall clock live; in replay, the simulated clock
advanced to the events' time."""


def content_hash(raw: str) -> str:
    """The sha256 of a message's text, the content half of duplicate detection."""
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


class Hl7Ingest:
    """Takes HL7 v2 messages into the store and through the processor."""

    def __init__(self, processor: Processor, mapper: Mapper, now_for: NowFor) -> None:
        self._processor = processor
        self._mapper = mapper
        self._now_for = now_for

    def ingest(
        self, uow: UnitOfWork, raw: str, received_at: datetime, origin: str = ""
    ) -> IngestResult:
        """Store, read, map and process one message inside `uow`."""
        try:
            message = read_message(raw)
        except Hl7ReadError as exc:
            entry = uow.add_to_inbox(
                InboundMessage(
                    raw, UNREADABLE_SENDER, "", content_hash(raw), received_at, origin=origin
                )
            )
            if entry.duplicate:
                return IngestResult(
                    exc.ack_code,
                    reason=exc.reason,
                    location=exc.location,
                    inbox_id=entry.id,
                    duplicate=True,
                )
            return self._quarantined(
                uow,
                entry.id,
                exc.reason,
                exc.ack_code,
                exc.location,
                received_at,
                {"inbox_id": entry.id},
            )
        kind = f"{message.message_type}^{message.trigger}"
        entry = uow.add_to_inbox(
            InboundMessage(
                raw=message.text,
                sender=f"{message.sending_application}^{message.sending_facility}",
                control_id=message.control_id,
                content_hash=content_hash(message.text),
                received_at=received_at,
                message_type=kind,
                origin=origin,
            )
        )
        base: dict[str, Any] = dict(
            control_id=message.control_id,
            message_type=kind,
            inbox_id=entry.id,
            control_id_reused=entry.control_id_reused,
        )
        if entry.duplicate:
            return IngestResult("AA", duplicate=True, reason="duplicate: already received", **base)
        try:
            events = self._mapper.events(message, received_at)
        except UnsupportedMessage as exc:
            uow.set_inbox_state(entry.id, "unsupported", exc.reason)
            return IngestResult(
                exc.ack_code, reason=exc.reason, location=exc.location, unsupported=True, **base
            )
        except AdapterError as exc:
            return self._quarantined(
                uow, entry.id, exc.reason, exc.ack_code, exc.location, received_at, base
            )
        now = self._now_for(events)
        try:
            with uow.savepoint():
                fired = self._processor.fire_due(uow, now)
                applied = self._processor.apply(uow, events, now)
        except RuleEvaluationError as exc:
            # Fail closed: stored, not processed, and a human-review item exists.
            return self._quarantined(
                uow,
                entry.id,
                f"rules could not be evaluated: {exc.reason}",
                "AE",
                exc.location,
                received_at,
                base,
                state="failed",
            )
        except EngineError as exc:
            return self._quarantined(
                uow, entry.id, exc.reason, exc.ack_code, exc.location, received_at, base
            )
        uow.set_inbox_state(entry.id, "processed", "" if events else "no clinical events")
        return IngestResult("AA", tasks=(*fired, *applied.tasks), **base)

    @staticmethod
    def _quarantined(
        uow: UnitOfWork,
        inbox_id: int,
        reason: str,
        ack_code: str,
        location: str,
        at: datetime,
        base: dict[str, Any],
        state: str = "quarantined",
    ) -> IngestResult:
        uow.quarantine(inbox_id, reason, ack_code, location, at=at)
        uow.set_inbox_state(inbox_id, state, reason)
        return IngestResult(ack_code, reason=reason, location=location, **base)

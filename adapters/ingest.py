"""Ingest: one raw HL7 v2 message -> inbox -> events -> processor, with the answer it gets.

Two steps, which replay runs together and the live service runs apart:

* `accept` stores the raw message first (the inbox, or quarantine with a reason when it cannot
  be read or understood) and decides the ACK: everything an ACK may depend on (the header, the
  type, version and processing id, the content's mapping to events) is checked here, before
  anything is answered. Nothing here touches the rules.
* `process` applies a stored message's events and evaluates the rules. The live service runs it
  in a worker process, from the inbox, so that a crash in the rule engine costs a retry and not
  the listener.

A redelivery (same sender, control id and content) is answered again and has no second effect.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol

from adapters.errors import AdapterError, UnsupportedMessage
from adapters.hl7v2.er7 import Hl7ReadError, Message, read_message
from adapters.hl7v2.mapping import Mapper
from engine.errors import EngineError, RuleEvaluationError
from engine.events import Event
from engine.ports import InboundMessage, StoredTask, UnitOfWork
from engine.processor import Processor

UNREADABLE_SENDER = "(unreadable)"
# Refusals that accept-and-ignore never turns into AA: the site does not take these at all.
_NOT_ACCEPTED = frozenset({"202", "203"})


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What became of one message, and the ACK it earns (AA, AE or AR, original mode).

    `hl7_code`: the HL7 table 0357 error code for the ERR segment when the answer is not AA.
    `events`: the message's canonical events, when it was accepted for processing."""

    ack_code: str
    control_id: str = ""
    message_type: str = ""
    reason: str = ""
    location: str = ""
    hl7_code: str = ""
    inbox_id: int | None = None
    duplicate: bool = False
    control_id_reused: bool = False
    unsupported: bool = False
    tasks: tuple[StoredTask, ...] = field(default_factory=tuple)
    events: tuple[Event, ...] | None = None
    sender: str = ""


@dataclass(frozen=True, slots=True)
class IngestPolicy:
    """What the site accepts, beyond what safetynet can read.

    `processing_ids`: MSH-11.1 values accepted (others are answered AR, code 202); empty accepts
    any. `versions`: MSH-12.1 values accepted (AR, code 203); empty accepts any.
    `unsupported`: "reject" answers a message safetynet does not handle (its type or event, an
    order control or document type it ignores) AR; "accept" answers AA and keeps it, marked
    unsupported (accept-and-ignore)."""

    processing_ids: Collection[str] = ()
    versions: Collection[str] = ()
    unsupported: str = "reject"

    def __post_init__(self) -> None:
        if self.unsupported not in ("reject", "accept"):
            raise ValueError(f"unsupported must be 'reject' or 'accept', not {self.unsupported!r}")


class StoredMessageProcessor(Protocol):
    """Processes one inbox row of its protocol (the live worker calls it; see the worker)."""

    def process_stored(
        self, uow: UnitOfWork, inbox_id: int, raw: str, received_at: datetime
    ) -> IngestResult: ...


NowFor = Callable[[Sequence[Event]], datetime]
"""Processing time for a message's events: the wall clock live; in replay, the simulated clock
advanced to the events' time."""


def content_hash(raw: str) -> str:
    """The sha256 of a message's text, the content half of duplicate detection."""
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def _policy_error(message: Message, policy: IngestPolicy) -> UnsupportedMessage | None:
    processing_id = message.segments[0].get(11, 1)
    if policy.processing_ids and processing_id not in policy.processing_ids:
        return UnsupportedMessage(
            f"processing id {processing_id or '(empty)'} is not accepted here "
            f"(accepted: {', '.join(sorted(policy.processing_ids))})",
            "MSH-11",
            hl7_code="202",
        )
    if policy.versions and message.version not in policy.versions:
        return UnsupportedMessage(
            f"HL7 version {message.version or '(empty)'} is not accepted here",
            "MSH-12",
            hl7_code="203",
        )
    return None


class Hl7Ingest:
    """Takes HL7 v2 messages into the store and through the processor."""

    def __init__(
        self,
        processor: Processor,
        mapper: Mapper,
        now_for: NowFor,
        policy: IngestPolicy | None = None,
    ) -> None:
        self._processor = processor
        self._mapper = mapper
        self._now_for = now_for
        self._policy = policy or IngestPolicy()

    @property
    def processor(self) -> Processor:
        """The processor `process` hands events to."""
        return self._processor

    def ingest(
        self, uow: UnitOfWork, raw: str, received_at: datetime, origin: str = ""
    ) -> IngestResult:
        """Accept and process one message inside `uow` (replay: one transaction for both)."""
        accepted = self.accept(uow, raw, received_at, origin)
        if accepted.events is None or accepted.inbox_id is None:
            return accepted
        return self.process(uow, accepted.inbox_id, accepted.events, received_at, accepted)

    def accept(
        self, uow: UnitOfWork, raw: str, received_at: datetime, origin: str = ""
    ) -> IngestResult:
        """Store one message and decide its answer; does not evaluate rules.

        The result carries `events` when the message is to be processed (its inbox row stays in
        state "received"); otherwise the row is already final (quarantined, unsupported) or the
        message is a duplicate."""
        try:
            message = read_message(raw)
        except Hl7ReadError as exc:
            entry = uow.add_to_inbox(
                InboundMessage(
                    raw, UNREADABLE_SENDER, "", content_hash(raw), received_at, origin=origin
                )
            )
            unreadable = IngestResult(
                exc.ack_code,
                reason=exc.reason,
                location=exc.location,
                hl7_code=exc.hl7_code,
                inbox_id=entry.id,
                duplicate=entry.duplicate,
            )
            if not entry.duplicate:
                self._quarantine(uow, unreadable, received_at, {"inbox_id": entry.id})
            return unreadable
        kind = f"{message.message_type}^{message.trigger}"
        sender = f"{message.sending_application}^{message.sending_facility}"
        entry = uow.add_to_inbox(
            InboundMessage(
                raw=message.text,
                sender=sender,
                control_id=message.control_id,
                content_hash=content_hash(message.text),
                received_at=received_at,
                message_type=kind,
                origin=origin,
            )
        )
        base = IngestResult(
            "AA",
            control_id=message.control_id,
            message_type=kind,
            inbox_id=entry.id,
            duplicate=entry.duplicate,
            control_id_reused=entry.control_id_reused,
            sender=sender,
        )
        try:
            rejected = _policy_error(message, self._policy)
            if rejected is not None:
                raise rejected
            events = self._mapper.events(message, received_at)
        except UnsupportedMessage as exc:
            ignored = self._policy.unsupported == "accept" and exc.hl7_code not in _NOT_ACCEPTED
            result = replace(
                base,
                ack_code="AA" if ignored else exc.ack_code,
                reason=exc.reason,
                location=exc.location,
                hl7_code="" if ignored else exc.hl7_code,
                unsupported=True,
            )
            if not entry.duplicate:
                uow.set_inbox_state(entry.id, "unsupported", exc.reason)
            return result
        except AdapterError as exc:
            result = replace(
                base,
                ack_code=exc.ack_code,
                reason=exc.reason,
                location=exc.location,
                hl7_code=exc.hl7_code,
            )
            if not entry.duplicate:
                self._quarantine(uow, result, received_at, {})
            return result
        if entry.duplicate:
            return replace(base, reason="duplicate: already received")
        return replace(base, events=tuple(events))

    def accept_oversized(
        self,
        uow: UnitOfWork,
        head: str,
        size: int,
        limit: int,
        received_at: datetime,
        origin: str = "",
    ) -> IngestResult:
        """Keep the head of a message too large to take (quarantine) and answer AE, so the
        sender does not resend it for ever. The head's MSH names the sender and control id."""
        sender, control_id, kind = UNREADABLE_SENDER, "", ""
        try:
            header = read_message(head.split("\r", 1)[0].split("\n", 1)[0])
        except Hl7ReadError:
            pass
        else:
            sender = f"{header.sending_application}^{header.sending_facility}"
            control_id = header.control_id
            kind = f"{header.message_type}^{header.trigger}"
        entry = uow.add_to_inbox(
            InboundMessage(
                head, sender, control_id, content_hash(head), received_at, "hl7v2", kind, origin
            )
        )
        result = IngestResult(
            "AE",
            control_id=control_id,
            message_type=kind,
            reason=f"message of {size} bytes is larger than the limit of {limit} bytes; "
            f"its first {len(head.encode('utf-8', 'surrogatepass'))} bytes are kept for review",
            hl7_code="207",
            inbox_id=entry.id,
            duplicate=entry.duplicate,
            sender=sender,
        )
        if not entry.duplicate:
            self._quarantine(uow, result, received_at, {"size": size, "limit": limit})
        return result

    def process(
        self,
        uow: UnitOfWork,
        inbox_id: int,
        events: Sequence[Event],
        received_at: datetime,
        accepted: IngestResult | None = None,
    ) -> IngestResult:
        """Apply one accepted message's events and evaluate the rules; mark its inbox row.

        Fails closed: a rule that cannot be evaluated leaves the message "failed" with a
        human-review item (quarantine); a message that cannot be linked safely is quarantined."""
        base = replace(accepted, events=None) if accepted else IngestResult("AA", inbox_id=inbox_id)
        now = self._now_for(events)
        try:
            with uow.savepoint():
                fired = self._processor.fire_due(uow, now)
                applied = self._processor.apply(uow, events, now)
        except RuleEvaluationError as exc:
            failed = replace(
                base,
                ack_code="AE",
                reason=f"rules could not be evaluated: {exc.reason}",
                location=exc.location,
                hl7_code="207",
            )
            self._quarantine(uow, failed, received_at, {}, state="failed")
            return self._incomplete(uow, failed, events, inbox_id, now)
        except EngineError as exc:
            linked = replace(
                base,
                ack_code=exc.ack_code,
                reason=exc.reason,
                location=exc.location,
                hl7_code="204",
            )
            self._quarantine(uow, linked, received_at, {})
            return self._incomplete(uow, linked, events, inbox_id, now)
        uow.set_inbox_state(inbox_id, "processed", "" if events else "no clinical events")
        # Processed at last (e.g. a retry): no longer a gap in its patients' records.
        resolved = self._processor.mark_complete(uow, inbox_id, applied.patients, now)
        return replace(base, tasks=(*fired, *applied.tasks, *resolved))

    def _incomplete(
        self,
        uow: UnitOfWork,
        result: IngestResult,
        events: Sequence[Event],
        inbox_id: int,
        now: datetime,
    ) -> IngestResult:
        """Mark the patients a refused message names as having an incomplete record, and
        evaluate them (a discharge already past raises its review Task now). When the rules
        cannot be evaluated for them, the marks are still written, unevaluated: they stand
        for when the rules can be, and the quarantine item is the human-review item."""
        try:
            with uow.savepoint():
                tasks = self._processor.mark_incomplete(uow, events, inbox_id, now)
        except EngineError:
            try:
                with uow.savepoint():
                    self._processor.mark_incomplete(uow, events, inbox_id, now, evaluate=False)
            except EngineError:
                pass  # e.g. identifiers that cannot even be stored: the item stands alone
            return result
        return replace(result, tasks=tuple(tasks))

    def process_stored(
        self, uow: UnitOfWork, inbox_id: int, raw: str, received_at: datetime
    ) -> IngestResult:
        """`process` for a message read back from the inbox (the live worker): read and map
        it again (pure and cheap), then apply it."""
        try:
            message = read_message(raw)
            events = self._mapper.events(message, received_at)
        except AdapterError as exc:
            # Accepted earlier, refused now (a retry after a change of code or settings).
            refused = IngestResult(
                exc.ack_code,
                reason=exc.reason,
                location=exc.location,
                hl7_code=exc.hl7_code,
                inbox_id=inbox_id,
            )
            return self._quarantine(uow, refused, received_at, {})
        accepted = IngestResult(
            "AA",
            control_id=message.control_id,
            message_type=f"{message.message_type}^{message.trigger}",
            inbox_id=inbox_id,
        )
        return self.process(uow, inbox_id, events, received_at, accepted)

    @staticmethod
    def _quarantine(
        uow: UnitOfWork,
        result: IngestResult,
        at: datetime,
        detail: dict[str, Any],
        state: str = "quarantined",
    ) -> IngestResult:
        assert result.inbox_id is not None
        uow.quarantine(result.inbox_id, result.reason, result.ack_code, result.location, at=at)
        uow.set_inbox_state(result.inbox_id, state, result.reason)
        return result

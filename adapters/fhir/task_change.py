"""Task status changes from the HTTP API, inbox first: stored, then applied by the worker.

A clinician's change (`PUT`/`PATCH /fhir/Task/{id}`) is checked at once by the API against
the Task as stored, then kept as an inbox row of protocol "task" (the raw text is the JSON of
a `TaskStatusChange`) and applied by the worker, which alone runs the processor, through
`TaskChangeProcessor.process_stored`: the change becomes the canonical event
`TaskStatusChanged`, which the rules see (accepting a Task stops its escalation), and the
processor restates the Task (new version, history row, outbox row) and audits who changed
what. A change the processor refuses (the Task moved on meanwhile: `TaskStateError`) is
quarantined with its reason, which the API answers as 409.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import select

from adapters.ingest import IngestResult, NowFor, content_hash
from adapters.store import schema
from adapters.store.sql import SqlUnitOfWork
from engine.errors import EngineError, RuleEvaluationError
from engine.events import SourceRef, TaskStatusChanged
from engine.ports import InboundMessage, UnitOfWork
from engine.processor import Processor

__all__ = [
    "TASK_PROTOCOL",
    "TaskChangeProcessor",
    "TaskStatusChange",
    "change_state",
    "submit_change",
]

TASK_PROTOCOL = "task"
MESSAGE_TYPE = "Task.status"


@dataclass(frozen=True, slots=True)
class TaskStatusChange:
    """One requested status change, as kept in the inbox.

    `task`: the Task identifier; `status`: the new status; `note`: what was done
    (completed), or the reason (rejected); `by`: who, as audited (the caller's practitioner
    id, else their token's subject); `subject`: the caller's token subject; `at`: when the
    request was made (the event time); `version`: the Task version the change was checked
    against."""

    task: str
    status: str
    note: str
    by: str
    at: datetime
    subject: str = ""
    version: int = 0

    def raw(self) -> str:
        """The inbox text: JSON, keys sorted."""
        data: dict[str, Any] = asdict(self)
        data["at"] = self.at.isoformat()
        return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_raw(cls, raw: str) -> TaskStatusChange:
        """Read an inbox text made by `raw`; ValueError when it is not one."""
        try:
            data = json.loads(raw)
            change = cls(
                task=str(data["task"]),
                status=str(data["status"]),
                note=str(data.get("note", "")),
                by=str(data.get("by", "")),
                at=datetime.fromisoformat(str(data["at"])),
                subject=str(data.get("subject", "")),
                version=int(data.get("version", 0)),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError("not a Task status change") from exc
        if not change.task or not change.status or change.at.tzinfo is None:
            raise ValueError("a Task status change needs a Task, a status and a time")
        return change

    def event(self, received_at: datetime, inbox_id: int) -> TaskStatusChanged:
        """The canonical event of this change."""
        return TaskStatusChanged(
            source=SourceRef(f"api:{self.subject or self.by}", str(inbox_id), MESSAGE_TYPE),
            occurred_at=self.at,
            received_at=received_at,
            status=self.status,
            task=self.task,
            by=self.by,
            note=self.note,
        )


def submit_change(
    uow: UnitOfWork, change: TaskStatusChange, received_at: datetime, origin: str = ""
) -> int:
    """Store `change` in the inbox (protocol "task") inside `uow`; its inbox id. The caller
    commits and wakes the worker. Every request is a new row (a request id in the control
    id): a repeated request is judged again against the Task as it then is."""
    raw = change.raw()
    entry = uow.add_to_inbox(
        InboundMessage(
            raw=raw,
            sender=f"api:{change.subject or change.by}",
            control_id=f"Task/{change.task}/{change.version}/{uuid.uuid4().hex}",
            content_hash=content_hash(raw),
            received_at=received_at,
            protocol=TASK_PROTOCOL,
            message_type=MESSAGE_TYPE,
            origin=origin,
        )
    )
    return entry.id


def change_state(uow: SqlUnitOfWork, inbox_id: int) -> tuple[str, str]:
    """(state, detail) of a stored change: "received" while it waits for the worker, then
    "processed", or "quarantined" / "failed" with the reason in `detail`."""
    row = uow.connection.execute(
        select(schema.inbox.c.state, schema.inbox.c.detail).where(schema.inbox.c.id == inbox_id)
    ).one()
    return str(row.state), str(row.detail)


class TaskChangeProcessor:
    """Applies stored Task status changes through the shared processor (the worker's
    `StoredMessageProcessor` for protocol "task")."""

    def __init__(self, processor: Processor, now_for: NowFor) -> None:
        self._processor = processor
        self._now_for = now_for

    def process_stored(
        self, uow: UnitOfWork, inbox_id: int, raw: str, received_at: datetime
    ) -> IngestResult:
        """Apply one stored change inside `uow`: timers due by its time fire first (as for
        any message), then the change. A change the processor refuses is quarantined with
        its reason (state "quarantined"; "failed" when the rules could not be evaluated);
        nothing of it is applied."""
        base = IngestResult("AA", message_type=MESSAGE_TYPE, inbox_id=inbox_id)
        try:
            change = TaskStatusChange.from_raw(raw)
        except ValueError as exc:
            return _quarantine(uow, replace(base, ack_code="AR", reason=str(exc)), received_at)
        base = replace(base, control_id=f"Task/{change.task}")
        event = change.event(received_at, inbox_id)
        now = self._now_for([event])
        try:
            # Separate savepoints: a refused change must not undo the timers that fired.
            with uow.savepoint():
                fired = self._processor.fire_due(uow, now)
            with uow.savepoint():
                applied = self._processor.apply(uow, [event], now)
        except RuleEvaluationError as exc:
            failed = replace(
                base,
                ack_code="AE",
                reason=f"rules could not be evaluated: {exc.reason}",
                location=exc.location,
            )
            return _quarantine(uow, failed, received_at, state="failed")
        except EngineError as exc:
            refused = replace(base, ack_code="AE", reason=exc.reason, location=exc.location)
            return _quarantine(uow, refused, received_at)
        uow.set_inbox_state(inbox_id, "processed", f"Task {change.task}: {change.status}")
        return replace(base, tasks=(*fired, *applied.tasks))


def _quarantine(
    uow: UnitOfWork, result: IngestResult, at: datetime, state: str = "quarantined"
) -> IngestResult:
    assert result.inbox_id is not None
    uow.quarantine(result.inbox_id, result.reason, result.ack_code, result.location, at=at)
    uow.set_inbox_state(result.inbox_id, state, result.reason)
    return result

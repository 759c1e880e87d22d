"""The processor: canonical events -> patient facts -> rule evaluation -> Tasks and timers.

Everything happens inside the caller's unit of work, so a message's facts, Tasks, timers and
audit entries commit together or not at all. Evaluation re-reads the patient's complete facts
from the store every time (the database is the record) and re-raises every matching Task;
Tasks have deterministic identifiers, so only new ones are written.

Each Task raised is also written as a `task:<identifier>` fact, so rules can see Tasks:
escalation (R11) watches their deadlines and status, withdrawal (R12) their discharge. A
clinician's status change (`TaskStatusChanged`) updates both the Task and its fact. A result
that names no known order and no patient is kept under a placeholder patient
(`unmatched-...`) for the identity rule (R14); when a later message names its order with a
patient, the placeholder is merged into that patient.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from engine.catalogue import Catalogue, Rule
from engine.errors import IdentityError, LinkError, RuleEvaluationError, TaskStateError
from engine.events import (
    Event,
    ImagingOrdered,
    OrderCancelled,
    OrderChanged,
    PatientsMerged,
    ReportIssued,
    TaskStatusChanged,
)
from engine.facts import by_key, epoch, project, working_memory
from engine.identity import new_patient_key
from engine.ports import Fact, StoredTask, UnitOfWork
from engine.rulecore import RuleCore
from engine.tasks import CLOSED, NOT_ACCEPTED, PRIORITIES, RecallTask, RuleMatch, TaskChange

TaskRenderer = Callable[[RecallTask], Mapping[str, Any]]
"""Turns a decided Task into the resource stored and delivered (FHIR R4 Task JSON)."""


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """A change of a stored Task's status, for the TaskRestatus port to write into its JSON."""

    status: str
    at: datetime
    by: str
    reason: str = ""  # statusReason: why (cancelled, rejected)
    note: str = ""  # what was done (completed)
    business_status: str = ""
    patient: tuple[str, str, bool] | None = None  # a new subject (system, value, is NHS)


TaskRestatus = Callable[[Mapping[str, Any], StatusUpdate], Mapping[str, Any]]
"""Writes a status change into a stored Task's resource (FHIR: status, statusReason, note,
lastModified)."""

UNMATCHED_PREFIX = "unmatched-"
# Status changes a clinician may make, from each status.
ALLOWED = {
    **{s: frozenset({"accepted", "in-progress", "completed", "rejected"}) for s in NOT_ACCEPTED},
    "accepted": frozenset({"in-progress", "completed", "rejected"}),
    "in-progress": frozenset({"completed", "rejected"}),
}
NEEDS_TEXT = {"completed": "a note of what was done", "rejected": "a reason"}
MAX_PASSES = 4  # Tasks raised in one evaluation may let rules over Tasks match: re-decide

_FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)
_ORDER_EVENTS = (ImagingOrdered, OrderCancelled, OrderChanged, ReportIssued)


@dataclass(frozen=True, slots=True)
class Applied:
    """What one message did: the patients it touched and the Tasks it created."""

    patients: tuple[str, ...]
    tasks: tuple[StoredTask, ...]


class Processor:
    """Applies canonical events to the store and evaluates the rules of a catalogue."""

    def __init__(
        self,
        catalogue: Catalogue,
        render: TaskRenderer,
        restatus: TaskRestatus | None = None,
    ) -> None:
        self.catalogue = catalogue
        self._render = render
        self._restatus = restatus
        self._rules: dict[str, Rule] = {}
        definitions: dict[str, Mapping[str, Any]] = {}
        for rule in catalogue.evaluated:
            for variant, definition in rule.module.conditions(rule.params, catalogue.site).items():
                name = f"{rule.id}/{variant}"
                definitions[name] = definition
                self._rules[name] = rule
        self._core = RuleCore(definitions)
        # Tasks raised in one pass are facts rules may read in the next (escalation,
        # withdrawal): a second pass only when some rule reads Task facts at all.
        self._passes = MAX_PASSES if "task" in self._core.kinds else 1
        self._next_due: datetime | None = None  # None: unknown, read the due table

    # --- identity -------------------------------------------------------------------------

    def _patient_key(self, uow: UnitOfWork, event: Event) -> str:
        if event.patient is None or not event.patient.identifiers:
            if isinstance(event, _ORDER_EVENTS):
                found = uow.order_for(event.order.tokens())
                if found is not None:
                    return found[1]
                if isinstance(event, ReportIssued) and event.order.tokens():
                    # Kept for the identity rule (R14) rather than refused: a Task asks a
                    # person to match it; its order, when it comes, re-homes it.
                    return UNMATCHED_PREFIX + _digest(event.order.tokens()[0])
                raise LinkError(
                    "message names no known order (placer/filler numbers) and carries no patient "
                    "identifiers",
                    "PID-3",
                )
            raise IdentityError("message carries no patient identifier", "PID-3")
        tokens = [i.token for i in event.patient.identifiers]
        known = uow.patients_for(tokens)
        keys = set(known.values())
        if len(keys) > 1:
            raise IdentityError(
                f"the message's identifiers name {len(keys)} different known patients", "PID-3"
            )
        key = keys.pop() if keys else new_patient_key(event.patient.identifiers)
        missing = [t for t in tokens if t not in known]
        if missing:
            uow.add_patient_aliases(key, missing)
        return key

    def _order_key(self, uow: UnitOfWork, event: Event, patient_key: str) -> tuple[str, bool]:
        """The event's order key, and whether a placeholder patient was merged to find it."""
        if not isinstance(event, _ORDER_EVENTS):
            return "", False
        tokens = event.order.tokens()
        if not tokens:
            raise LinkError("order has neither a placer nor a filler number", "ORC-2")
        found = uow.order_for(tokens)
        rehomed = False
        if found is not None and found[1] != patient_key:
            if not found[1].startswith(UNMATCHED_PREFIX):
                raise IdentityError("the order belongs to a different patient", "ORC-2")
            # The order of a result held unmatched: its patient is now known.
            uow.merge_patients(found[1], patient_key)
            uow.audit(
                event.received_at,
                "engine",
                "result.matched",
                patient_key,
                {"message": event.source.message_id},
            )
            found, rehomed = (found[0], patient_key), True
        order_key = found[0] if found is not None else tokens[0]
        uow.add_order_aliases(order_key, patient_key, tokens)
        return order_key, rehomed

    # --- events ---------------------------------------------------------------------------

    def apply(self, uow: UnitOfWork, events: Sequence[Event], now: datetime) -> Applied:
        """Apply one message's events, then evaluate each patient it touched at `now`.

        Raises IdentityError / LinkError (nothing should be written: call inside a
        savepoint) or RuleEvaluationError (fail closed: the message stays unprocessed)."""
        touched: dict[str, dict[str, Fact]] = {}
        for event in events:
            if isinstance(event, TaskStatusChanged):
                patient_key, task = self._task_of(uow, event)
                self._status_changed(uow, event, task, patient_key, now)
                touched[patient_key] = by_key(uow.facts(patient_key))
                continue
            patient_key = self._patient_key(uow, event)
            if isinstance(event, PatientsMerged):
                priors = set(uow.patients_for([i.token for i in event.prior]).values())
                for prior in sorted(priors - {patient_key}):
                    uow.put_facts(
                        patient_key,
                        [merge_fact(prior, uow.facts(prior), uow.facts(patient_key), event)],
                    )
                    moved = [t for t in uow.tasks(patient_key=prior) if t.status not in CLOSED]
                    uow.merge_patients(prior, patient_key)
                    self._repoint(uow, moved, patient_key, now)
                    touched.pop(prior, None)
                    uow.audit(
                        now,
                        "engine",
                        "patients.merged",
                        patient_key,
                        {"message": event.source.message_id},
                    )
                touched.pop(patient_key, None)  # the merge brought in facts: read again
            order_key, rehomed = self._order_key(uow, event, patient_key)
            if rehomed:
                touched.pop(patient_key, None)  # the placeholder's facts came in: read again
            current = touched.get(patient_key)
            if current is None:
                current = touched[patient_key] = by_key(uow.facts(patient_key))
            projected = project(event, current, self.catalogue.site.facts, order_key)
            if patient_key.startswith(UNMATCHED_PREFIX) and "patient" not in current:
                projected.append(Fact("patient", "patient", {"kind": "patient", "unmatched": 1}))
            changed = [
                fact
                for fact in projected
                if fact.key not in current or current[fact.key].data != fact.data
            ]
            if changed:
                uow.put_facts(patient_key, changed)
                current.update((f.key, f) for f in changed)
        tasks: list[StoredTask] = []
        for patient_key, current in touched.items():
            tasks.extend(self.evaluate(uow, patient_key, now, list(current.values())))
        return Applied(tuple(touched), tuple(tasks))

    # --- record incomplete (DESIGN.md non-negotiable 3) -----------------------------------

    def mark_incomplete(
        self,
        uow: UnitOfWork,
        events: Sequence[Event],
        inbox_id: int,
        now: datetime,
        evaluate: bool = True,
    ) -> list[StoredTask]:
        """Fail closed: a message the engine refused (quarantined) leaves every patient it
        names with an incomplete record until it is processed. Each such patient gets an
        `incomplete:<inbox id>` fact (so a discharge raises a review Task) and is evaluated.
        A patient heard of here for the first time is created with the message's
        identifiers: the record that is missing something must exist to say so. Without
        `evaluate` only the marks are written (when the rules cannot be evaluated for these
        patients, the mark still stands for when they can)."""
        keys: set[str] = set()
        for event in events:
            if event.patient is not None and event.patient.identifiers:
                tokens = [i.token for i in event.patient.identifiers]
                known = uow.patients_for(tokens)
                if known:
                    keys |= set(known.values())
                else:
                    key = new_patient_key(event.patient.identifiers)
                    uow.add_patient_aliases(key, tokens)
                    keys.add(key)
            if isinstance(event, _ORDER_EVENTS):
                found = uow.order_for(event.order.tokens())
                if found is not None:
                    keys.add(found[1])
        tasks: list[StoredTask] = []
        for key in sorted(keys):
            uow.put_facts(
                key,
                [
                    Fact(
                        f"incomplete:{inbox_id}",
                        "incomplete",
                        {"kind": "incomplete", "inbox": inbox_id, "at": epoch(now), "resolved": 0},
                    )
                ],
            )
            if evaluate:
                tasks.extend(self.evaluate(uow, key, now))
        return tasks

    def mark_complete(
        self, uow: UnitOfWork, inbox_id: int, patient_keys: Sequence[str], now: datetime
    ) -> list[StoredTask]:
        """A message once refused has now been processed: its patients' records are no
        longer incomplete on its account (rules may then withdraw their review Tasks)."""
        tasks: list[StoredTask] = []
        for key in patient_keys:
            fact = next((f for f in uow.facts(key) if f.key == f"incomplete:{inbox_id}"), None)
            if fact is not None and not fact.data.get("resolved"):
                uow.put_facts(
                    key, [Fact(fact.key, "incomplete", {**fact.data, "resolved": epoch(now)})]
                )
                tasks.extend(self.evaluate(uow, key, now))
        return tasks

    def fire_due(self, uow: UnitOfWork, until: datetime, limit: int = 1000) -> list[StoredTask]:
        """Evaluate every patient whose timer is due by `until`, each at its due time.

        Remembers the earliest due time it has seen or scheduled, so that calling it before
        every message costs no query until something can be due. The hint is never later
        than the truth for timers this processor scheduled; call `forget_due_hint()` when
        another process may schedule timers in the same database."""
        if self._next_due is not None and self._next_due > until:
            return []
        tasks: list[StoredTask] = []
        fired = 0
        # A Task raised on a timer may set timers that are already due (an escalation step
        # whose time has passed in a replay): fire those too, in due order.
        while fired < limit:
            timers = uow.due_timers(until, limit - fired)
            if not timers:
                break
            for timer in timers:
                tasks.extend(self.evaluate(uow, timer.patient_key, timer.due_at))
                uow.mark_fired(timer.id, timer.due_at)
            fired += len(timers)
        if fired < limit:
            self._next_due = uow.next_due() or _FAR_FUTURE
        return tasks

    @property
    def next_due_hint(self) -> datetime | None:
        """The earliest time a timer may be due, as far as this processor knows (None:
        unknown). Never later than the truth for timers it scheduled itself."""
        return self._next_due

    def forget_due_hint(self) -> None:
        """Make the next `fire_due` read the due table (other writers may have scheduled)."""
        self._next_due = None

    # --- rules ----------------------------------------------------------------------------

    def decide(
        self, memory: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> list[RecallTask | TaskChange]:
        """The Tasks the rules raise, and the changes they make to existing Tasks, over one
        patient's working memory (pure: no store). Several matches for one identifier give
        one Task, at the highest priority; one change per Task (the first)."""
        index = dict(memory)
        decided: dict[str, RecallTask] = {}
        changes: dict[str, TaskChange] = {}
        for match in self._core.evaluate(memory):
            rule = self._rules[match.rule]
            try:
                result = rule.module.recall_task(
                    RuleMatch(
                        match.rule.split("/", 1)[1],
                        {alias: index[src] for alias, src in match.facts.items()},
                        memory,
                        rule,
                        self.catalogue.site,
                    )
                )
            except Exception as exc:
                raise RuleEvaluationError(f"{rule.id}: building the Task failed: {exc!r}") from exc
            # One decision, none, or several (a Task for the clinician and one for the
            # safeguarding lead).
            for task in result if isinstance(result, list | tuple) else (result,):
                if task is None:
                    continue
                if isinstance(task, TaskChange):
                    changes.setdefault(task.identifier, task)
                    continue
                seen = decided.get(task.identifier)
                if seen is None or PRIORITIES.index(task.priority) > PRIORITIES.index(
                    seen.priority
                ):
                    decided[task.identifier] = task
        return [*decided.values(), *changes.values()]

    def evaluate(
        self,
        uow: UnitOfWork,
        patient_key: str,
        now: datetime,
        facts: Sequence[Fact] | None = None,
    ) -> list[StoredTask]:
        """Evaluate one patient's rules at `now`; store new Tasks (and their facts), apply
        the rules' changes to open Tasks, and schedule the next timers. `facts`: the
        patient's current facts when the caller has just read them."""
        current = by_key(uow.facts(patient_key) if facts is None else facts)
        created: list[StoredTask] = []
        for n in range(1, MAX_PASSES + 1):
            memory = working_memory(current.values(), now, self.catalogue.site.timezone)
            written: list[Fact] = []
            for decision in self.decide(memory):
                if isinstance(decision, TaskChange):
                    fact = self._apply_change(uow, decision, now)
                    if fact is not None:
                        written.append(fact)
                    continue
                if uow.get_task(decision.identifier) is not None:
                    continue  # already raised; from here on its owner manages it
                created.append(self._raise(uow, patient_key, decision, now))
                written.append(task_fact(decision, decision.status))
            if not written:
                break
            uow.put_facts(patient_key, written)
            current.update((f.key, f) for f in written)
            if n == self._passes < MAX_PASSES:
                break  # no rule reads Task facts: nothing more can change
        else:
            raise RuleEvaluationError(
                f"rules still changing Tasks after {MAX_PASSES} passes (a rule loop)"
            )
        for rule in self.catalogue.evaluated:
            for due in rule.module.wake_times(memory, rule.params, self.catalogue.site):
                if due > now:
                    uow.schedule(patient_key, due, "evaluate")
                    if self._next_due is not None and due < self._next_due:
                        self._next_due = due
        return created

    def _raise(
        self, uow: UnitOfWork, patient_key: str, task: RecallTask, now: datetime
    ) -> StoredTask:
        stored = uow.put_task(
            StoredTask(
                identifier=task.identifier,
                patient_key=patient_key,
                rule_id=task.rule_id,
                rule_version=task.rule_version,
                status=task.status,
                priority=task.priority,
                owner=task.owner.id,
                resource=self._render(task),
                shadow=task.shadow,
            ),
            at=now,
            reason=f"raised by {task.rule_uri}",
        )
        uow.audit(
            now,
            f"rule:{task.rule_id}",
            "task.raised",
            task.identifier,
            {
                "rule_version": task.rule_version,
                "priority": task.priority,
                "shadow": task.shadow,
            },
        )
        return stored

    def _repoint(
        self, uow: UnitOfWork, tasks: Sequence[StoredTask], patient_key: str, now: datetime
    ) -> None:
        """Open Tasks moved by a merge now name the surviving patient (the identifier they
        named before is kept with them, for audit)."""
        patient = next((f.data for f in uow.facts(patient_key) if f.kind == "patient"), {})
        if not patient.get("id_value"):
            return
        subject = (
            str(patient.get("id_system", "")),
            str(patient["id_value"]),
            bool(patient.get("id_nhs", False)),
        )
        for task in tasks:
            self._restate(
                uow,
                replace(task, patient_key=patient_key),
                StatusUpdate(status=task.status, at=now, by="", patient=subject),
                actor="engine",
                now=now,
                action="task.moved",
            )

    # --- Task status ----------------------------------------------------------------------

    def _task_of(self, uow: UnitOfWork, event: TaskStatusChanged) -> tuple[str, StoredTask]:
        """(patient key, Task) a status change names: by identifier, or the latest Task of
        the named rule for the named order."""
        if event.task:
            stored = uow.get_task(event.task)
            if stored is None:
                raise TaskStateError(f"no Task {event.task}", "Task.identifier")
            return stored.patient_key, stored
        found = uow.order_for(event.order.tokens()) if event.order is not None else None
        if found is None:
            raise TaskStateError("the status change names no known Task or order", "Task")
        order_key, patient_key = found
        candidates = [
            f.data
            for f in uow.facts(patient_key)
            if f.kind == "task" and f.data["rule"] == event.rule and f.data["okey"] == order_key
        ]
        if not candidates:
            raise TaskStateError(f"no {event.rule} Task for that order", "Task")
        latest = max(candidates, key=lambda t: (int(t["raised_at"]), str(t["id"])))
        stored = uow.get_task(str(latest["id"]))
        if stored is None:
            raise TaskStateError(f"Task {latest['id']} is not stored", "Task")
        return patient_key, stored

    def _status_changed(
        self,
        uow: UnitOfWork,
        event: TaskStatusChanged,
        stored: StoredTask,
        patient_key: str,
        now: datetime,
    ) -> None:
        allowed = ALLOWED.get(stored.status, frozenset())
        if event.status not in allowed:
            raise TaskStateError(
                f"a {stored.status} Task cannot become {event.status}"
                + (f" (allowed: {', '.join(sorted(allowed))})" if allowed else ""),
                "Task.status",
            )
        if event.status in NEEDS_TEXT and not event.note.strip():
            raise TaskStateError(
                f"a Task marked {event.status} needs {NEEDS_TEXT[event.status]}", "Task.note"
            )
        update = StatusUpdate(
            status=event.status,
            at=event.occurred_at,
            by=event.by,
            reason=event.note if event.status == "rejected" else "",
            note=event.note if event.status != "rejected" else "",
        )
        self._restate(uow, stored, update, actor=event.by or "unknown", now=now)
        facts = by_key(uow.facts(patient_key))
        changed = []
        own = facts.get(f"task:{stored.identifier}")
        if own is not None:
            changed.append(Fact(own.key, "task", restated(own.data, event.status)))
            parent = str(own.data.get("parent", ""))
            # Accepting an escalation takes responsibility for the Task it escalated: the
            # escalation of that Task stops (the first person to acknowledge closes the loop).
            if (
                int(own.data.get("level", 0)) > 0
                and event.status not in ("rejected",)
                and f"task:{parent}" in facts
            ):
                up = facts[f"task:{parent}"]
                changed.append(Fact(up.key, "task", {**up.data, "open": 0, "acknowledged": 1}))
        if changed:
            uow.put_facts(patient_key, changed)

    def _apply_change(self, uow: UnitOfWork, change: TaskChange, now: datetime) -> Fact | None:
        """Apply a rule's change to a Task that is still open; None when it is not (a Task a
        clinician has taken on or closed is theirs)."""
        stored = uow.get_task(change.identifier)
        if stored is None or stored.status not in NOT_ACCEPTED:
            return None
        if self.catalogue.rule(change.rule_id).status == "shadow" and not stored.shadow:
            return None  # a shadow rule records what it would do; it never touches live work
        update = StatusUpdate(status=change.status, at=now, by="", reason=change.reason)
        self._restate(uow, stored, update, actor=f"rule:{change.rule_id}", now=now)
        fact = next(
            (f for f in uow.facts(stored.patient_key) if f.key == f"task:{change.identifier}"),
            None,
        )
        if fact is None:
            return None
        return Fact(fact.key, "task", restated(fact.data, change.status))

    def _restate(
        self,
        uow: UnitOfWork,
        stored: StoredTask,
        update: StatusUpdate,
        actor: str,
        now: datetime,
        action: str = "",
    ) -> None:
        if self._restatus is None:
            raise RuleEvaluationError("this processor was built without a TaskRestatus port")
        uow.put_task(
            replace(stored, status=update.status, resource=self._restatus(stored.resource, update)),
            at=now,
            reason=(
                f"moved to the surviving patient by {actor}"
                if update.patient is not None
                else f"{update.status} by {actor}" + (f": {update.reason}" if update.reason else "")
            ),
        )
        detail: dict[str, Any] = {"from": stored.status}
        if update.reason:
            # A rule's reason is safetynet's own text; a clinician's is free text that may name
            # the patient: the audit records only that one was given (the Task keeps the words).
            own = actor.startswith("rule:") or actor == "engine"
            detail["reason"] = update.reason[:200] if own else "(given; kept with the Task)"
        uow.audit(now, actor, action or f"task.{update.status}", stored.identifier, detail)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def task_fact(task: RecallTask, status: str) -> Fact:
    """What rules see of a Task they raised."""
    enc, _, at = task.discharge.partition(":")
    return Fact(
        f"task:{task.identifier}",
        "task",
        {
            "kind": "task",
            "id": task.identifier,
            "rule": task.rule_id,
            "title": task.rule_title,
            "okey": task.subject_key,
            "priority": task.priority,
            "critical": int(task.priority == "stat"),
            "status": status,
            "open": int(status in NOT_ACCEPTED),
            "closed": int(status in CLOSED),
            "acknowledged": 0,
            "owner": task.owner.id,
            "owner_name": task.owner.name,
            "raised_at": epoch(task.authored_on),
            "deadline_at": epoch(task.deadline),
            "enc": task.encounter,
            "discharge_enc": enc,
            "discharge_at": int(at) if at else 0,
            "dependent": int(task.discharge_dependent),
            "safeguarding": int(task.safeguarding),
            "escalates": int(task.escalates and not task.shadow),
            "shadow": int(task.shadow),
            "level": task.level,
            "parent": task.part_of or "",
        },
    )


def restated(data: Mapping[str, Any], status: str) -> dict[str, Any]:
    """A Task fact after a status change."""
    return {
        **data,
        "status": status,
        "open": int(status in NOT_ACCEPTED and not data.get("acknowledged")),
        "closed": int(status in CLOSED),
    }


def merge_fact(
    prior: str, prior_facts: Sequence[Fact], surviving_facts: Sequence[Fact], event: Event
) -> Fact:
    """What a merge brought together (R13): the safeguarding-relevant history of each side."""

    def summary(facts: Sequence[Fact]) -> dict[str, int]:
        return {
            "flags": sum(1 for f in facts if f.kind == "flag" and f.data.get("active")),
            "findings": sum(1 for f in facts if f.kind == "finding"),
            "attendances": sum(1 for f in facts if f.kind == "encounter"),
        }

    before, after = summary(prior_facts), summary(surviving_facts)
    return Fact(
        f"merge:{prior}",
        "merge",
        {
            "kind": "merge",
            "at": epoch(event.occurred_at),
            "message_id": event.source.message_id,
            **{f"prior_{k}": v for k, v in before.items()},
            **{f"surviving_{k}": v for k, v in after.items()},
        },
    )

"""The processor: canonical events -> patient facts -> rule evaluation -> Tasks and timers.

Everything happens inside the caller's unit of work, so a message's facts, Tasks, timers and
audit entries commit together or not at all. Evaluation re-reads the patient's complete facts
from the store every time (the database is the record) and re-raises every matching Task;
Tasks have deterministic identifiers, so only new ones are written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from engine.catalogue import Catalogue, Rule
from engine.errors import IdentityError, LinkError, RuleEvaluationError
from engine.events import (
    Event,
    ImagingOrdered,
    OrderCancelled,
    OrderChanged,
    PatientsMerged,
    ReportIssued,
)
from engine.facts import by_key, project, working_memory
from engine.identity import new_patient_key
from engine.ports import Fact, StoredTask, UnitOfWork
from engine.rulecore import RuleCore
from engine.tasks import PRIORITIES, RecallTask, RuleMatch

TaskRenderer = Callable[[RecallTask], Mapping[str, Any]]
"""Turns a decided Task into the resource stored and delivered (FHIR R4 Task JSON)."""

_FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)
_ORDER_EVENTS = (ImagingOrdered, OrderCancelled, OrderChanged, ReportIssued)


@dataclass(frozen=True, slots=True)
class Applied:
    """What one message did: the patients it touched and the Tasks it created."""

    patients: tuple[str, ...]
    tasks: tuple[StoredTask, ...]


class Processor:
    """Applies canonical events to the store and evaluates the rules of a catalogue."""

    def __init__(self, catalogue: Catalogue, render: TaskRenderer) -> None:
        self.catalogue = catalogue
        self._render = render
        self._rules: dict[str, Rule] = {}
        definitions: dict[str, Mapping[str, Any]] = {}
        for rule in catalogue.evaluated:
            for variant, definition in rule.module.conditions(rule.params, catalogue.site).items():
                name = f"{rule.id}/{variant}"
                definitions[name] = definition
                self._rules[name] = rule
        self._core = RuleCore(definitions)
        self._next_due: datetime | None = None  # None: unknown, read the due table

    # --- identity -------------------------------------------------------------------------

    def _patient_key(self, uow: UnitOfWork, event: Event) -> str:
        if event.patient is None or not event.patient.identifiers:
            if isinstance(event, _ORDER_EVENTS):
                found = uow.order_for(event.order.tokens())
                if found is not None:
                    return found[1]
                raise LinkError(
                    "result names no known order (placer/filler numbers) and carries no patient "
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

    def _order_key(self, uow: UnitOfWork, event: Event, patient_key: str) -> str:
        if not isinstance(event, _ORDER_EVENTS):
            return ""
        tokens = event.order.tokens()
        if not tokens:
            raise LinkError("order has neither a placer nor a filler number", "ORC-2")
        found = uow.order_for(tokens)
        if found is not None and found[1] != patient_key:
            raise IdentityError("the order belongs to a different patient", "ORC-2")
        order_key = found[0] if found is not None else tokens[0]
        uow.add_order_aliases(order_key, patient_key, tokens)
        return order_key

    # --- events ---------------------------------------------------------------------------

    def apply(self, uow: UnitOfWork, events: Sequence[Event], now: datetime) -> Applied:
        """Apply one message's events, then evaluate each patient it touched at `now`.

        Raises IdentityError / LinkError (nothing should be written: call inside a
        savepoint) or RuleEvaluationError (fail closed: the message stays unprocessed)."""
        touched: dict[str, dict[str, Fact]] = {}
        for event in events:
            patient_key = self._patient_key(uow, event)
            if isinstance(event, PatientsMerged):
                priors = set(uow.patients_for([i.token for i in event.prior]).values())
                for prior in sorted(priors - {patient_key}):
                    uow.merge_patients(prior, patient_key)
                    touched.pop(prior, None)
                    uow.audit(
                        now,
                        "engine",
                        "patients.merged",
                        patient_key,
                        {"message": event.source.message_id},
                    )
                touched.pop(patient_key, None)  # the merge brought in facts: read again
            order_key = self._order_key(uow, event, patient_key)
            current = touched.get(patient_key)
            if current is None:
                current = touched[patient_key] = by_key(uow.facts(patient_key))
            changed = [
                fact
                for fact in project(event, current, self.catalogue.site.facts, order_key)
                if fact.key not in current or current[fact.key].data != fact.data
            ]
            if changed:
                uow.put_facts(patient_key, changed)
                current.update((f.key, f) for f in changed)
        tasks: list[StoredTask] = []
        for patient_key, current in touched.items():
            tasks.extend(self.evaluate(uow, patient_key, now, list(current.values())))
        return Applied(tuple(touched), tuple(tasks))

    def fire_due(self, uow: UnitOfWork, until: datetime, limit: int = 1000) -> list[StoredTask]:
        """Evaluate every patient whose timer is due by `until`, each at its due time.

        Remembers the earliest due time it has seen or scheduled, so that calling it before
        every message costs no query until something can be due. The hint is never later
        than the truth for timers this processor scheduled; call `forget_due_hint()` when
        another process may schedule timers in the same database."""
        if self._next_due is not None and self._next_due > until:
            return []
        tasks: list[StoredTask] = []
        timers = uow.due_timers(until, limit)
        for timer in timers:
            tasks.extend(self.evaluate(uow, timer.patient_key, timer.due_at))
            uow.mark_fired(timer.id, timer.due_at)
        if len(timers) < limit:
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

    def decide(self, memory: Sequence[tuple[str, Mapping[str, Any]]]) -> list[RecallTask]:
        """The Tasks the rules raise over one patient's working memory (pure: no store).
        Several matches for one identifier give one Task, at the highest priority."""
        index = dict(memory)
        decided: dict[str, RecallTask] = {}
        for match in self._core.evaluate(memory):
            rule = self._rules[match.rule]
            try:
                task = rule.module.recall_task(
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
            if task is None:
                continue
            seen = decided.get(task.identifier)
            if seen is None or PRIORITIES.index(task.priority) > PRIORITIES.index(seen.priority):
                decided[task.identifier] = task
        return list(decided.values())

    def evaluate(
        self,
        uow: UnitOfWork,
        patient_key: str,
        now: datetime,
        facts: Sequence[Fact] | None = None,
    ) -> list[StoredTask]:
        """Evaluate one patient's rules at `now`; store new Tasks and the next timers.
        `facts`: the patient's current facts when the caller has just read them."""
        if facts is None:
            facts = uow.facts(patient_key)
        memory = working_memory(facts, now, self.catalogue.site.timezone)
        created: list[StoredTask] = []
        for task in self.decide(memory):
            if uow.get_task(task.identifier) is not None:
                continue  # already raised; from here on its owner manages it
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
            created.append(stored)
        for rule in self.catalogue.evaluated:
            for due in rule.module.wake_times(memory, rule.params, self.catalogue.site):
                if due > now:
                    uow.schedule(patient_key, due, "evaluate")
                    if self._next_due is not None and due < self._next_due:
                        self._next_due = due
        return created

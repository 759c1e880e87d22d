"""Recall Tasks as the engine decides them, and the plain-English helpers rules write them with.

A `RecallTask` is wire-free: `adapters.fhir.task` renders it as a FHIR R4 Task. Its identifier
is deterministic: a hash of the rule id, the order key and the trigger (never the patient key,
which a merge can change), so re-evaluating the same history raises the same Task again and
the store sees nothing new.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from engine.catalogue import Rule, Site
from engine.events import Clinician
from engine.facts import from_epoch

PRIORITIES = ("routine", "urgent", "asap", "stat")
# FHIR Task statuses: not yet taken on by anyone (escalation watches these), and finished.
NOT_ACCEPTED = frozenset({"draft", "requested", "received", "ready"})
CLOSED = frozenset({"completed", "cancelled", "rejected", "failed", "entered-in-error"})


def task_identifier(rule_id: str, order_key: str, trigger: str) -> str:
    """The deterministic identifier of the Task `rule_id` raises for `order_key` on `trigger`."""
    digest = hashlib.sha256(f"{rule_id}\x1f{order_key}\x1f{trigger}".encode()).hexdigest()
    return f"{rule_id}-{digest[:20]}"


@dataclass(frozen=True, slots=True)
class OrderFocus:
    """The order a Task is about (FHIR: a contained ServiceRequest)."""

    placer: str
    placer_ns: str
    filler: str
    filler_ns: str
    code: str
    name: str


@dataclass(frozen=True, slots=True)
class RecallTask:
    """A recall or review Task decided by a rule."""

    identifier: str
    rule_id: str
    rule_title: str
    rule_version: str
    rule_uri: str
    priority: str
    description: str
    reason: str
    owner: Clinician
    owner_is_pool: bool
    patient_system: str
    patient_value: str
    patient_is_nhs: bool
    encounter: str
    focus: OrderFocus | None
    authored_on: datetime
    deadline: datetime
    part_of: str | None = None
    shadow: bool = False
    status: str = "requested"
    subject_key: str = ""  # the order (or finding, flag...) key the identifier was built from
    discharge: str = ""  # the discharge trigger it depends on ("<enc>:<epoch>"), if any
    discharge_dependent: bool = False
    safeguarding: bool = False
    escalates: bool = True
    level: int = 0  # escalation level: 0 the original, 1-3 escalation steps (R11)
    inputs: tuple[tuple[str, str], ...] = ()  # (label, text) shown with the Task (FHIR input)


@dataclass(frozen=True, slots=True)
class TaskChange:
    """A rule's decision to change an existing Task's status (e.g. R12 withdraws a Task whose
    discharge was cancelled). Applied only while the Task is still open; audited."""

    identifier: str
    rule_id: str
    rule_version: str
    status: str
    reason: str


@dataclass(frozen=True)
class RuleMatch:
    """What `recall_task()` of a rule gets: the matched facts by alias, the patient's whole
    working memory, the rule (with its parameters) and the site settings."""

    variant: str
    facts: Mapping[str, Mapping[str, Any]]
    memory: Sequence[tuple[str, Mapping[str, Any]]]
    rule: Rule
    site: Site

    @property
    def p(self) -> dict[str, Any]:
        """The rule's parameter values."""
        return self.rule.params

    def of_kind(self, kind: str) -> list[Mapping[str, Any]]:
        """Every fact of one kind in the patient's working memory."""
        return [f for _, f in self.memory if f.get("kind") == kind]

    def patient(self) -> Mapping[str, Any]:
        """The patient fact (empty if none is known)."""
        found = self.of_kind("patient")
        return found[0] if found else {}

    def task(
        self,
        *,
        order: Mapping[str, Any] | None,
        trigger: str,
        priority: str,
        description: str,
        reason: str,
        owner: tuple[Clinician, bool],
        encounter: str,
        authored_on: datetime,
        deadline: datetime,
        part_of: str | None = None,
        key: str = "",
        discharge: Mapping[str, Any] | None = None,
        level: int = 0,
        inputs: Sequence[tuple[str, str]] = (),
    ) -> RecallTask:
        """Assemble a RecallTask for this rule, with its deterministic identifier.

        `order`: the order the Task is about (its focus), or None for a Task about something
        else, named by `key` (a finding, a flag, a merge). `discharge`: the discharge the Task
        depends on, for rules whose Tasks a cancelled discharge withdraws."""
        if priority not in PRIORITIES:
            raise ValueError(f"priority {priority!r} is not one of {PRIORITIES}")
        subject = str(order["okey"]) if order is not None else key
        if not subject:
            raise ValueError("a Task needs an order or a key")
        patient = self.patient()
        rule = self.rule
        return RecallTask(
            identifier=task_identifier(rule.id, subject, trigger),
            rule_id=rule.id,
            rule_title=rule.title,
            rule_version=rule.version,
            rule_uri=rule.uri,
            priority=priority,
            description=description,
            reason=reason,
            owner=owner[0],
            owner_is_pool=owner[1],
            patient_system=str(patient.get("id_system", "")),
            patient_value=str(patient.get("id_value", "")),
            patient_is_nhs=bool(patient.get("id_nhs", False)),
            encounter=encounter,
            focus=None
            if order is None
            else OrderFocus(
                placer=str(order.get("placer", "")),
                placer_ns=str(order.get("placer_ns", "")),
                filler=str(order.get("filler", "")),
                filler_ns=str(order.get("filler_ns", "")),
                code=str(order.get("code", "")),
                name=str(order.get("name", "")),
            ),
            authored_on=authored_on,
            deadline=deadline,
            part_of=part_of,
            shadow=rule.status == "shadow",
            subject_key=subject,
            discharge=f"{discharge['enc']}:{discharge['at']}" if discharge is not None else "",
            discharge_dependent=rule.discharge_dependent and discharge is not None,
            safeguarding=rule.safeguarding,
            escalates=rule.escalates,
            level=level,
            inputs=tuple(inputs),
        )

    def change(self, identifier: str, status: str, reason: str) -> TaskChange:
        """A decision to move an existing Task to `status`, with the reason in plain English."""
        return TaskChange(identifier, self.rule.id, self.rule.version, status, reason)


def responsible_clinician(
    site: Site, *facts: Mapping[str, Any], roles: Sequence[str] = ("attending", "orderer")
) -> tuple[Clinician, bool]:
    """The first clinician named in `facts` under `roles`, in order (by default the attending
    on the discharge, then the ordering clinician); failing all, the site's pool.
    Returns (clinician, is_pool): a Task is never ownerless."""
    for role in roles:
        for fact in facts:
            ident = str(fact.get(f"{role}_id", ""))
            if ident:
                return (
                    Clinician(
                        ident, str(fact.get(f"{role}_name", "")), str(fact.get(f"{role}_auth", ""))
                    ),
                    False,
                )
    return site.pool, True


def local_time(seconds: int, site: Site) -> datetime:
    """Epoch seconds as an aware datetime in the site's time zone."""
    return from_epoch(seconds).astimezone(site.timezone)


def when(seconds: int, site: Site) -> str:
    """A time as clinicians write it: "14:00 on 1 May 2008" (site time zone)."""
    t = local_time(seconds, site)
    return f"{t:%H:%M} on {t.day} {t:%B %Y}"


def age_phrase(age_days: int, age_months: int) -> str:
    """An age as clinicians say it: "3-day-old", "7-week-old", "18-month-old", "5-year-old";
    "" when unknown.

    Infants are described in weeks (from 2 weeks to 1 year), newborns in days."""
    if age_days < 0:
        return ""
    if age_days < 14:
        return f"{age_days}-day-old"
    if age_months < 12:
        return f"{age_days // 7}-week-old"
    if age_months < 24:
        return f"{age_months}-month-old"
    return f"{age_months // 12}-year-old"


def person(sex: str, age_months: int) -> str:
    """The noun for the patient: boy, girl, man, woman; child or patient when sex is unknown."""
    child = 0 <= age_months < 18 * 12
    if sex == "M":
        return "boy" if child else "man"
    if sex == "F":
        return "girl" if child else "woman"
    return "child" if child else "patient"


def who(discharge: Mapping[str, Any], patient: Mapping[str, Any]) -> str:
    """Who left, e.g. "7-week-old boy"; "patient of unknown age" without a date of birth."""
    months = int(discharge.get("age_months", -1))
    age = age_phrase(int(discharge.get("age_days", -1)), months)
    if not age:
        return "patient of unknown age (no date of birth on record)"
    return f"{age} {person(str(patient.get('sex', '')), months)}"


def plus_hours(seconds: int, hours: float, site: Site) -> datetime:
    """`seconds` + `hours`, as an aware datetime in the site's time zone."""
    return local_time(seconds, site) + timedelta(hours=hours)


def role_owner(site: Site, role: str) -> tuple[Clinician, bool]:
    """Who holds a role in the site's directory (rules/directory.toml); the pool if nobody."""
    return site.directory.role(role, site.pool)


def consultant_in_charge(site: Site, clinician_id: str) -> tuple[Clinician, bool]:
    """The consultant in charge of this clinician's team (themself, if they lead it);
    failing that, whoever holds the consultant-in-charge role; failing that, the pool."""
    lead = site.directory.team_lead(clinician_id)
    if lead is not None:
        return lead[0], False
    if clinician_id and any(t.lead == clinician_id for t in site.directory.teams.values()):
        return site.directory.person(clinician_id), False  # they lead their own team
    return role_owner(site, "consultant-in-charge")

"""Rule cases: scenarios a governance lead can read, run through the real engine.

A case file (`rules/<id>/cases/*.toml`) is a timeline of clinical events for one patient and
the Tasks expected at the end (none for a "no-recall" case):

    description = "7-week-old discharged home while the skeletal survey was preliminary"
    kind = "recall"                       # or "no-recall"
    until = "2008-05-02T09:00:00+01:00"   # the clock at the end (due timers fire)

    [patient]
    birth = "2008-03-13"
    sex = "M"
    nhs_number = "9990000018"             # or mrn = "RX1000123"

    [[events]]
    at = "2008-05-01T11:30:00+01:00"
    type = "registered"                   # see EVENT_TYPES
    visit = "V1"
    location = "PAEDED"
    attending = "C1001"

    [[expect]]
    rule = "imaging-pending-at-discharge"
    order = "ORD-1"
    priority = "urgent"
    owner = "C1001"
    status = "requested"                  # the Task's status at the end (default: any)
    within = "24 hours"                   # its deadline after it was raised (default: any)

An `[[expect]]` table may hold only these keys (and `part_of`, the rule whose Task this one
is part of): a misspelt key would otherwise be ignored and the case would test less than it
says.

A case may name a second identity, `[prior_patient]`, for a merge: events with
`as = "prior"` are sent under it, and a `merged` event merges it into `[patient]`. Events with
`unmatched = true` carry no patient at all (a results-only feed).

The events are canonical events (engine.events), so a case says what happened clinically,
not how a feed encoded it. Running a case uses a fresh in-memory database, the rules folder's
own settings and the simulated clock, exactly as `safetynet replay` does. The result lists
each `Difference` between the Tasks raised and those expected as a sentence a clinician can
read ("expected an urgent Task from ... owned by the attending (C1001); none was raised").
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from adapters.fhir.task import task_resource, task_restatus
from adapters.store import open_store
from engine.catalogue import Catalogue, Site
from engine.clock import SimulatedClock
from engine.errors import ConfigurationError
from engine.events import (
    AdmissionCancelled,
    ClinicalNote,
    Clinician,
    DischargeCancelled,
    Event,
    ImagingOrdered,
    OrderCancelled,
    OrderChanged,
    OrderRef,
    Patient,
    PatientAdmitted,
    PatientDischarged,
    PatientIdentifier,
    PatientRegistered,
    PatientsMerged,
    PatientTransferred,
    ReportIssued,
    SafeguardingFlagCleared,
    SafeguardingFlagRaised,
    SourceRef,
    TaskStatusChanged,
    Visit,
)
from engine.ports import StoredTask, UnitOfWork
from engine.processor import Processor
from engine.tasks import PRIORITIES

EVENT_TYPES = (
    "registered",
    "admitted",
    "transferred",
    "discharged",
    "discharge-cancelled",
    "admission-cancelled",
    "ordered",
    "cancelled",
    "performed",
    "report",
    "flag",
    "flag-cleared",
    "note",
    "task",
    "merged",
    "held",
    "released",
)
KINDS = ("recall", "no-recall")
CASE_KEYS = ("description", "kind", "until", "patient", "prior_patient", "events", "expect")
EXPECT_KEYS = ("rule", "order", "priority", "owner", "part_of", "status", "within")
# FHIR Task statuses, in words a clinician uses.
TASK_STATUS_WORDS = {
    "draft": "not yet issued",
    "requested": "waiting for its owner to accept it",
    "received": "received, not yet accepted",
    "ready": "ready, not yet accepted",
    "accepted": "accepted by its owner",
    "in-progress": "being worked on",
    "on-hold": "on hold",
    "completed": "done",
    "cancelled": "withdrawn",
    "rejected": "declined by its owner",
    "failed": "failed",
    "entered-in-error": "entered in error",
}
_WITHIN = re.compile(r"^\s*(\d+)\s*(minute|hour|day)s?\s*$")


@dataclass(frozen=True, slots=True, kw_only=True)
class HeldMessage(Event):
    """A case event standing for ingest's fail-closed path: a message about the patient was
    refused and held in quarantine (`held`), or was processed at last (not `held`)."""

    inbox: int
    held: bool


@dataclass(frozen=True)
class Expectation:
    """One Task a case expects."""

    rule: str
    order: str
    priority: str | None = None
    owner: str | None = None
    part_of: str | None = None  # the rule whose Task this one is part of
    status: str | None = None
    within: timedelta | None = None  # the Task's deadline, counted from when it was raised


@dataclass(frozen=True)
class Case:
    """A parsed case file."""

    path: Path
    description: str
    kind: str
    until: datetime | None
    events: tuple[Event, ...]
    expect: tuple[Expectation, ...]


@dataclass(frozen=True)
class Difference:
    """One way the Tasks raised differ from those a case expects.

    `kind` is "missing" (an expected Task was not raised), "unexpected" (a Task nobody
    expected), or the detail of an expected Task that differs: "priority", "owner", "status",
    "deadline", "part_of". `expected` and `actual` are that detail in words; `task` is the Task
    concerned, when one was raised; `text` is the whole difference as one plain sentence.
    """

    kind: str
    rule: str
    order: str
    expected: str
    actual: str
    text: str
    task: StoredTask | None = None


@dataclass(frozen=True)
class CaseResult:
    """What running a case gave, and how it differs from what was expected."""

    case: Case
    tasks: tuple[StoredTask, ...]
    differences: tuple[Difference, ...]

    @property
    def problems(self) -> tuple[str, ...]:
        """Each difference as a sentence."""
        return tuple(d.text for d in self.differences)

    @property
    def passed(self) -> bool:
        """True when the Tasks raised are exactly the ones expected."""
        return not self.differences


def _time(value: Any, where: str) -> datetime:
    if isinstance(value, datetime):
        at = value
    else:
        try:
            at = datetime.fromisoformat(str(value))
        except ValueError as exc:
            raise ConfigurationError(f"{where}: not an ISO-8601 time: {value!r}") from exc
    if at.tzinfo is None:
        raise ConfigurationError(f"{where}: time {value!r} needs a UTC offset")
    return at


def _clinician(ident: Any) -> Clinician | None:
    return Clinician(str(ident), f"Dr {ident}", "GMC") if ident else None


def build_event(
    row: Mapping[str, Any],
    patient: Patient,
    n: int,
    tz: ZoneInfo,
    prior: Patient | None = None,
) -> Event:
    """One canonical event from a case row (`type`, `at` and the type's fields)."""
    kind = row.get("type")
    where = f"event {n} ({kind})"
    if kind not in EVENT_TYPES:
        raise ConfigurationError(f"{where}: type must be one of {', '.join(EVENT_TYPES)}")
    at = _time(row.get("at"), where)
    who: Patient | None = patient
    if row.get("as") == "prior":
        if prior is None:
            raise ConfigurationError(f"{where}: as = 'prior' needs a [prior_patient]")
        who = prior
    if row.get("unmatched"):
        who = None
    common: dict[str, Any] = {
        "source": SourceRef("case", f"case-{n}", str(kind)),
        "occurred_at": at,
        "received_at": at,
        "patient": who,
        "encounter": str(row.get("visit", "")),
    }
    if kind == "flag":
        return SafeguardingFlagRaised(
            **common, flag=str(row.get("flag", "F1")), category=str(row.get("category", ""))
        )
    if kind == "flag-cleared":
        return SafeguardingFlagCleared(**common, flag=str(row.get("flag", "F1")))
    if kind == "note":
        if not row.get("text"):
            raise ConfigurationError(f"{where}: needs text")
        return ClinicalNote(
            **common,
            note=str(row.get("note", f"N{n}")),
            text=str(row["text"]),
            source_kind=str(row.get("source", "clinical note")),
        )
    if kind in ("held", "released"):
        return HeldMessage(**common, inbox=int(row.get("message", 1)), held=kind == "held")
    if kind == "merged":
        if prior is None:
            raise ConfigurationError(f"{where}: a merge needs a [prior_patient]")
        return PatientsMerged(**common, prior=prior.identifiers)
    if kind == "task":
        if not row.get("rule") or not row.get("order") or not row.get("status"):
            raise ConfigurationError(f"{where}: needs rule, order and status")
        return TaskStatusChanged(
            **{**common, "patient": None},
            status=str(row["status"]),
            rule=str(row["rule"]),
            order=OrderRef(placer=str(row["order"]), placer_ns="RIS"),
            by=str(row.get("by", "")),
            note=str(row.get("note", "")),
        )
    visit = Visit(
        patient_class=str(row.get("class", "E")),
        location=str(row.get("location", "")),
        attending=_clinician(row.get("attending")),
        disposition=str(row.get("disposition", "")),
    )
    order = OrderRef(placer=str(row.get("order", "")), placer_ns="RIS")
    if kind == "registered":
        return PatientRegistered(**common, visit=visit)
    if kind == "admitted":
        return PatientAdmitted(**common, visit=visit)
    if kind == "transferred":
        return PatientTransferred(**common, visit=visit)
    if kind == "discharged":
        return PatientDischarged(**common, visit=visit)
    if kind == "discharge-cancelled":
        return DischargeCancelled(**common)
    if kind == "admission-cancelled":
        return AdmissionCancelled(**common)
    if not order.placer:
        raise ConfigurationError(f"{where}: needs an order")
    if kind == "ordered":
        return ImagingOrdered(
            **common,
            order=order,
            procedure_code=str(row.get("code", "")),
            procedure_name=str(row.get("procedure", "")),
            section=str(row.get("section", "RAD")),
            orderer=_clinician(row.get("orderer")),
        )
    if kind == "cancelled":
        return OrderCancelled(**common, order=order, control="CA")
    if kind == "performed":
        return OrderChanged(**common, order=order, control="SC", order_status="CM")
    status = str(row.get("status", ""))
    if status not in ("preliminary", "final", "corrected", "withdrawn"):
        raise ConfigurationError(
            f"{where}: status must be preliminary, final, corrected or withdrawn"
        )
    return ReportIssued(
        **common,
        order=order,
        status=status,
        flags=tuple(row.get("flags", ())),
        procedure_name=str(row.get("procedure", "")),
        section=str(row.get("section", "RAD")),
        performed_at=_time(row["performed"], where) if "performed" in row else None,
        alert=str(row.get("alert", "")),
        findings=tuple(row.get("findings", ())),
        wrong_patient=bool(row.get("wrong_patient", False)),
    )


def case_patient(spec: Mapping[str, Any], tz: ZoneInfo) -> Patient:
    """The case's patient: NHS number and/or MRN, birth date, sex."""
    idents = []
    if spec.get("nhs_number"):
        idents.append(PatientIdentifier(str(spec["nhs_number"]), "NHS", "NH", is_nhs_number=True))
    idents.append(PatientIdentifier(str(spec.get("mrn", "CASE-MRN")), "RX1", "MR"))
    birth = spec.get("birth")
    if isinstance(birth, str) and len(birth) == 10:
        try:
            birth = date.fromisoformat(birth)
        except ValueError as exc:
            raise ConfigurationError(f"patient.birth: not a date: {birth!r}") from exc
    born = None
    if isinstance(birth, date) and not isinstance(birth, datetime):
        born = datetime.combine(birth, time(0), tz)
    elif birth is not None:
        born = _time(birth, "patient.birth")
    return Patient(identifiers=tuple(idents), birth=born, sex=str(spec.get("sex", "")))


def load_case(path: Path, tz: ZoneInfo) -> Case:
    """Parse one case file; ConfigurationError names the file and the problem."""
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"{path}: {exc}") from exc
    try:
        kind = raw.get("kind")
        if kind not in KINDS:
            raise ConfigurationError(f"kind must be 'recall' or 'no-recall', not {kind!r}")
        patient = case_patient(raw.get("patient", {}), tz)
        prior = case_patient(raw["prior_patient"], tz) if "prior_patient" in raw else None
        events = tuple(
            build_event(row, patient, n, tz, prior)
            for n, row in enumerate(raw.get("events", []), 1)
        )
        unknown = sorted(set(raw) - set(CASE_KEYS))
        if unknown:
            raise ConfigurationError(
                f"unknown key {unknown[0]!r} (a case has {', '.join(CASE_KEYS)})"
            )
        expect = tuple(
            _expectation(e, n) for n, e in enumerate(_tables(raw.get("expect", []), "expect"), 1)
        )
        if (kind == "recall") != bool(expect):
            raise ConfigurationError(
                "a 'recall' case expects at least one Task; a 'no-recall' case expects none"
            )
        until = _time(raw["until"], "until") if "until" in raw else None
    except ConfigurationError as exc:
        raise ConfigurationError(f"{path}: {exc.reason}") from exc
    except KeyError as exc:
        raise ConfigurationError(f"{path}: missing {exc}") from exc
    return Case(path, str(raw.get("description", "")), kind, until, events, expect)


def _tables(value: Any, name: str) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigurationError(f"{name} must be a list of tables ([[{name}]])")
    return value


def _expectation(row: Mapping[str, Any], n: int) -> Expectation:
    """One `[[expect]]` table, every key checked: a typo must not weaken the case."""
    where = f"expect {n}"
    unknown = sorted(set(row) - set(EXPECT_KEYS))
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown key {unknown[0]!r} (an expectation has {', '.join(EXPECT_KEYS)})"
        )
    if not row.get("rule"):
        raise ConfigurationError(f"{where}: needs the rule whose Task is expected")
    priority = row.get("priority")
    if priority is not None and priority not in PRIORITIES:
        raise ConfigurationError(
            f"{where}: priority must be one of {', '.join(PRIORITIES)}, not {priority!r}"
        )
    status = row.get("status")
    if status is not None and status not in TASK_STATUS_WORDS:
        raise ConfigurationError(f"{where}: {status!r} is not a FHIR Task status")
    within = None
    if "within" in row:
        found = _WITHIN.match(str(row["within"]))
        if found is None:
            raise ConfigurationError(
                f'{where}: within must read like "24 hours", "30 minutes" or "14 days", '
                f"not {row['within']!r}"
            )
        within = timedelta(**{f"{found.group(2)}s": int(found.group(1))})
    return Expectation(
        str(row["rule"]),
        str(row.get("order", "")),
        priority,
        None if row.get("owner") is None else str(row["owner"]),
        None if row.get("part_of") is None else str(row["part_of"]),
        status,
        within,
    )


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def duration_words(span: timedelta) -> str:
    """A time span as a clinician says it: "30 minutes", "24 hours", "14 days"."""
    minutes = int(span.total_seconds() // 60)
    hours = minutes // 60
    if minutes % 60:
        amount, unit = minutes, "minute"
    elif hours > 72 and hours % 24 == 0:  # up to 72, clinicians count in hours
        amount, unit = hours // 24, "day"
    else:
        amount, unit = hours, "hour"
    return f"{amount} {unit}{'' if amount == 1 else 's'}"


def _deadline_after_raised(task: StoredTask) -> timedelta | None:
    end = task.resource.get("restriction", {}).get("period", {}).get("end")
    raised = task.resource.get("authoredOn")
    if not end or not raised:
        return None
    return datetime.fromisoformat(end) - datetime.fromisoformat(raised)


class _Names:
    """Who a clinician or pool id is in a case, in words: "the attending (C1001)"."""

    def __init__(self, case: Case, site: Site) -> None:
        self.known: dict[str, str] = {}
        for event in case.events:  # the case's own people first: that is what a case is about
            visit = getattr(event, "visit", None)
            if visit is not None and visit.attending is not None:
                self.known.setdefault(visit.attending.id, "the attending")
            orderer = getattr(event, "orderer", None)
            if orderer is not None:
                self.known.setdefault(orderer.id, "the ordering clinician")
        for role, (holder, _pool) in site.directory.roles.items():
            self.known.setdefault(holder.id, "the " + role.replace("-", " "))
        pool = site.pool.name or "pool"
        if pool[:1].isupper() and pool[1:2].islower():
            pool = pool[0].lower() + pool[1:]
        self.known.setdefault(site.pool.id, f"the {pool}")

    def __call__(self, ident: str) -> str:
        role = self.known.get(ident)
        return f"{role} ({ident})" if role else ident


def _order_of(task: StoredTask) -> str:
    for ident in (task.resource.get("contained") or [{}])[0].get("identifier", []):
        if ident.get("type", {}).get("coding", [{}])[0].get("code") == "PLAC":
            return str(ident.get("value", ""))
    return ""


def run_case(case: Case, catalogue: Catalogue) -> CaseResult:
    """Run a case through the real engine and compare the Tasks raised with those expected."""
    clock = SimulatedClock()
    store = open_store("sqlite://", clock=clock)
    # A case tests its own rule whatever the site has made of it: a governance lead tests a
    # rule before switching it on (status "off") or out of shadow.
    own = case.path.parent.parent.name
    catalogue = replace(
        catalogue,
        rules=tuple(
            replace(r, status="active") if r.id == own and r.status != "active" else r
            for r in catalogue.rules
        ),
    )
    processor = Processor(catalogue, task_resource, task_restatus)
    tasks: list[StoredTask] = []
    try:
        with store.begin() as uow:
            for event in sorted(case.events, key=lambda e: e.occurred_at):
                now = clock.advance(event.occurred_at)
                tasks.extend(processor.fire_due(uow, now))
                if isinstance(event, HeldMessage):
                    tasks.extend(held_message(processor, uow, event, now))
                    continue
                tasks.extend(processor.apply(uow, [event], now).tasks)
            if case.until is not None:
                clock.advance(case.until)
            tasks.extend(processor.fire_due(uow, clock.now()))
            # Each Task as it stands at the end (a later event may have withdrawn it).
            tasks = [uow.get_task(t.identifier) or t for t in tasks]
    finally:
        store.close()
    # A case speaks for its own rule (the folder it lives in) and the rules it names.
    relevant = {case.path.parent.parent.name} | {e.rule for e in case.expect}
    tasks = [t for t in tasks if t.rule_id in relevant]
    names = _Names(case, catalogue.site)
    return CaseResult(case, tuple(tasks), tuple(_compare(case.expect, tasks, names)))


def held_message(
    processor: Processor, uow: UnitOfWork, event: HeldMessage, now: datetime
) -> list[StoredTask]:
    """Apply a HeldMessage as ingest would: mark the patient's record incomplete, or
    complete again."""
    if event.held:
        return processor.mark_incomplete(uow, [event], event.inbox, now)
    assert event.patient is not None
    keys = uow.patients_for([i.token for i in event.patient.identifiers])
    return processor.mark_complete(uow, event.inbox, sorted(set(keys.values())), now)


def _details(
    exp: Expectation, found: StoredTask, tasks: Sequence[StoredTask], names: _Names
) -> list[tuple[str, str, str, str]]:
    """How an expected Task that was raised differs from the expectation: (kind, expected,
    actual, sentence) for each detail."""
    out: list[tuple[str, str, str, str]] = []
    if exp.priority and found.priority != exp.priority:
        out.append(
            (
                "priority",
                exp.priority,
                found.priority,
                f"expected priority {exp.priority}; got {found.priority}",
            )
        )
    if exp.owner and found.owner != exp.owner:
        want, got = names(exp.owner), names(found.owner)
        out.append(("owner", want, got, f"expected it to be owned by {want}; it is owned by {got}"))
    if exp.status and found.status != exp.status:
        want = f"{exp.status} ({TASK_STATUS_WORDS.get(exp.status, exp.status)})"
        got = f"{found.status} ({TASK_STATUS_WORDS.get(found.status, found.status)})"
        out.append(("status", want, got, f"expected status {want}; got {got}"))
    if exp.within is not None:
        span = _deadline_after_raised(found)
        if span != exp.within:
            want = duration_words(exp.within)
            got = duration_words(span) if span is not None else "no deadline"
            out.append(
                (
                    "deadline",
                    want,
                    got,
                    f"expected it to be due within {want} of being raised; "
                    + (f"it is due {got} after" if span is not None else "it has no deadline"),
                )
            )
    if exp.part_of:
        parents = [t for t in tasks if t.rule_id == exp.part_of and _order_of(t) == exp.order]
        refs = {p["identifier"]["value"] for p in found.resource.get("partOf", [])}
        if not any(p.identifier in refs for p in parents):
            out.append(
                (
                    "part_of",
                    f"part of the {exp.part_of} Task",
                    "not part of it",
                    f"expected it to be part of the {exp.part_of} Task; it is not",
                )
            )
    return out


def _compare(
    expected: Sequence[Expectation], tasks: Sequence[StoredTask], names: _Names
) -> list[Difference]:
    differences: list[Difference] = []
    unmatched = list(tasks)
    for exp in expected:
        # Of several Tasks of one rule for one order (e.g. one for the clinician and one for
        # the safeguarding lead), prefer the one with the expected owner.
        candidates = [t for t in unmatched if t.rule_id == exp.rule and _order_of(t) == exp.order]
        candidates.sort(key=lambda t: exp.owner is not None and t.owner != exp.owner)
        found = candidates[0] if candidates else None
        about = f" for order {exp.order}" if exp.order else ""
        if found is None:
            what = (
                f"{_a(exp.priority + ' Task') if exp.priority else 'a Task'} from {exp.rule}"
                + about
                + (f", owned by {names(exp.owner)}" if exp.owner else "")
                + (f", due within {duration_words(exp.within)}" if exp.within else "")
            )
            differences.append(
                Difference(
                    "missing", exp.rule, exp.order, what, "", f"expected {what}; none was raised"
                )
            )
            continue
        unmatched.remove(found)
        differences.extend(
            Difference(kind, exp.rule, exp.order, want, got, f"{exp.rule}{about}: {text}", found)
            for kind, want, got, text in _details(exp, found, tasks, names)
        )
    for task in unmatched:
        order = _order_of(task)
        what = (
            f"{_a(task.priority)} Task"
            + (f" for order {order}" if order else "")
            + f", owned by {names(task.owner)}"
        )
        said = str(task.resource.get("description", "")).strip()
        text = (
            f"expected no Task; {task.rule_id} raised {what}"
            if not expected
            else f"did not expect {what} from {task.rule_id}"
        ) + (f': "{said}"' if said else "")
        differences.append(Difference("unexpected", task.rule_id, order, "", what, text, task))
    return differences


def rule_cases(catalogue: Catalogue) -> dict[str, list[Path]]:
    """Every rule's case files, by rule id."""
    return {rule.id: sorted((rule.path / "cases").glob("*.toml")) for rule in catalogue.rules}

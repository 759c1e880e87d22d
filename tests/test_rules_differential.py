"""The differential check of the whole catalogue (issue 5, DESIGN.md "Rule core").

durable_rules fails silently, so every evaluation the engine makes on random event histories
is compared with the plain-Python statement of every rule (tests/oracle.py and
tests/oracle_*.py): the engine must raise exactly the Tasks, and make exactly the changes to
Tasks, that the plain statement does. The histories mix everything the catalogue reacts to:
visits, orders, reports of every status with flags, alerts and findings, discharges home and
within the hospital, cancelled discharges, safeguarding flags, clinical notes, clinicians
accepting Tasks, merges of two records, results with no patient, and they arrive with
duplicates and out of order; timers fire on the simulated clock as replay fires them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.cases import HeldMessage, held_message
from adapters.fhir.task import task_resource, task_restatus
from adapters.store import open_store
from engine.catalogue import load_catalogue
from engine.clock import SimulatedClock
from engine.errors import EngineError
from engine.events import (
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
    ReportIssued,
    SafeguardingFlagCleared,
    SafeguardingFlagRaised,
    SourceRef,
    TaskStatusChanged,
    Visit,
)
from engine.processor import Processor
from engine.tasks import RecallTask, TaskChange
from tests.oracle import all_expected

RULES = Path(__file__).resolve().parents[1] / "rules"
CATALOGUE = load_catalogue(RULES)
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
PROCEDURES = ("XR skeletal survey", "XR chest", "CT head")
NOTES = (
    "Small blue mark on left cheek",
    "No bruising seen",
    "Grip marks to chest",
    "Dad says he squeezed him",
    "Well baby, feeding normally",
    "no marks or bruises but ?bruise behind ear",
)
RULE_IDS = tuple(r.id for r in CATALOGUE.rules)


def _decisions(decided: Sequence[RecallTask | TaskChange]) -> dict[str, str]:
    return {
        d.identifier: (f"change:{d.status}" if isinstance(d, TaskChange) else d.priority)
        for d in decided
    }


class CheckedProcessor(Processor):
    """A processor that checks every decision against the plain-Python rules."""

    def __init__(self) -> None:
        super().__init__(CATALOGUE, task_resource, task_restatus)
        self.evaluations = 0
        self.disagreements: list[str] = []
        self.raised: set[str] = set()
        self.changes = 0

    def decide(self, memory: Any) -> Any:
        decided = super().decide(memory)
        got, want = _decisions(decided), all_expected(memory, CATALOGUE)
        self.evaluations += 1
        self.raised |= {k for k, v in want.items() if not v.startswith("change:")}
        self.changes += sum(1 for v in want.values() if v.startswith("change:"))
        if got != want:
            only_engine = {k: v for k, v in got.items() if want.get(k) != v}
            only_oracle = {k: v for k, v in want.items() if got.get(k) != v}
            self.disagreements.append(
                f"engine only {only_engine}; plain Python only {only_oracle}; memory "
                f"{[f for _, f in memory if f.get('kind') != 'patient']}"
            )
        return decided


@dataclass(frozen=True)
class Step:
    """One thing that happens, `minutes` after T0."""

    kind: str
    minutes: int
    args: Mapping[str, Any]


_minutes = st.one_of(
    st.integers(0, 600),  # the first hours: visits, orders, reports
    st.integers(600, 4 * 24 * 60),  # the next days: reports after discharge, deadlines
    st.integers(10 * 24 * 60, 30 * 24 * 60),  # follow-up surveys, late escalations
)
_order = st.sampled_from(["O1", "O2", "O3"])
_visit = st.sampled_from(["V1", "V2"])
_who = st.sampled_from(["main", "main", "main", "prior"])
_steps = st.one_of(
    st.builds(
        Step, st.just("registered"), _minutes, st.fixed_dictionaries({"visit": _visit, "who": _who})
    ),
    st.builds(
        Step,
        st.just("ordered"),
        _minutes,
        st.fixed_dictionaries(
            {
                "visit": _visit,
                "order": _order,
                "procedure": st.sampled_from(PROCEDURES),
                "who": _who,
            }
        ),
    ),
    st.builds(Step, st.just("performed"), _minutes, st.fixed_dictionaries({"order": _order})),
    st.builds(Step, st.just("cancelled"), _minutes, st.fixed_dictionaries({"order": _order})),
    st.builds(
        Step,
        st.just("report"),
        _minutes,
        st.fixed_dictionaries(
            {
                "order": _order,
                "status": st.sampled_from(
                    ["preliminary", "final", "final", "corrected", "withdrawn"]
                ),
                "flags": st.sampled_from([(), ("N",), ("A",), ("HH",), ("A", "H")]),
                "alert": st.sampled_from(["", "", "significant", "urgent", "critical"]),
                "findings": st.sampled_from([(), (), ("SCT|125605004",), ("SCT|1", "SCT|2")]),
                "wrong_patient": st.sampled_from([False, False, False, True]),
                "unmatched": st.sampled_from([False, False, False, True]),
                "performed": st.booleans(),
            }
        ),
    ),
    st.builds(
        Step,
        st.just("discharged"),
        _minutes,
        st.fixed_dictionaries({"visit": _visit, "home": st.sampled_from([True, True, False])}),
    ),
    st.builds(Step, st.just("admitted"), _minutes, st.fixed_dictionaries({"visit": st.just("W1")})),
    st.builds(
        Step, st.just("discharge-cancelled"), _minutes, st.fixed_dictionaries({"visit": _visit})
    ),
    st.builds(Step, st.just("flag"), _minutes, st.fixed_dictionaries({"who": _who})),
    st.builds(Step, st.just("flag-cleared"), _minutes, st.just({})),
    st.builds(
        Step,
        st.just("note"),
        _minutes,
        st.fixed_dictionaries({"text": st.sampled_from(NOTES), "visit": _visit, "who": _who}),
    ),
    st.builds(
        Step,
        st.just("task"),
        _minutes,
        st.fixed_dictionaries(
            {
                "rule": st.sampled_from(RULE_IDS),
                "order": _order,
                "status": st.sampled_from(["accepted", "accepted", "completed", "rejected"]),
            }
        ),
    ),
    st.builds(Step, st.just("merged"), _minutes, st.just({})),
    st.builds(Step, st.just("held"), _minutes, st.fixed_dictionaries({"who": _who})),
    st.builds(Step, st.just("released"), _minutes, st.fixed_dictionaries({"who": _who})),
)


def _patient(mrn: str, birth: datetime | None) -> Patient:
    return Patient(identifiers=(PatientIdentifier(mrn, "RX1", "MR"),), birth=birth, sex="M")


def _events(steps: Sequence[Step], birth: datetime | None) -> list[Event]:
    main, prior = _patient("M1", birth), _patient("P1", birth)
    out: list[Event] = []
    for n, step in enumerate(steps):
        at = T0 + timedelta(minutes=step.minutes)
        a = step.args
        who = prior if a.get("who") == "prior" else main
        common: dict[str, Any] = {
            "source": SourceRef("test", f"m{n}", step.kind),
            "occurred_at": at,
            "received_at": at,
            "patient": who,
            "encounter": str(a.get("visit", "")),
        }
        attending = Clinician("C1001", "Dr C1001", "GMC")
        order = OrderRef(str(a.get("order", "")), "RIS")
        if step.kind == "registered":
            out.append(
                PatientRegistered(
                    **common, visit=Visit(patient_class="E", location="PAEDED", attending=attending)
                )
            )
        elif step.kind == "ordered":
            out.append(
                ImagingOrdered(
                    **common,
                    order=order,
                    procedure_name=a["procedure"],
                    section="RAD",
                    orderer=Clinician("C2002", "Dr C2002", "GMC"),
                )
            )
        elif step.kind == "performed":
            out.append(
                OrderChanged(
                    **{**common, "patient": None}, order=order, control="SC", order_status="CM"
                )
            )
        elif step.kind == "cancelled":
            out.append(OrderCancelled(**{**common, "patient": None}, order=order, control="CA"))
        elif step.kind == "report":
            out.append(
                ReportIssued(
                    **{**common, "patient": None if a["unmatched"] else main},
                    order=order,
                    status=a["status"],
                    flags=a["flags"],
                    alert=a["alert"],
                    findings=a["findings"],
                    wrong_patient=a["wrong_patient"] and a["status"] == "withdrawn",
                    performed_at=at - timedelta(minutes=30) if a["performed"] else None,
                    procedure_name="XR skeletal survey",
                    section="RAD",
                )
            )
        elif step.kind == "discharged":
            out.append(
                PatientDischarged(
                    **common,
                    visit=Visit(
                        patient_class="E",
                        location="PAEDED",
                        attending=attending,
                        disposition="" if a["home"] else "AW",
                    ),
                )
            )
        elif step.kind == "admitted":
            out.append(
                PatientAdmitted(**common, visit=Visit(patient_class="I", attending=attending))
            )
        elif step.kind == "discharge-cancelled":
            out.append(DischargeCancelled(**common))
        elif step.kind == "flag":
            out.append(
                SafeguardingFlagRaised(**common, flag="F1", category="child protection plan")
            )
        elif step.kind == "flag-cleared":
            out.append(SafeguardingFlagCleared(**common, flag="F1"))
        elif step.kind == "note":
            out.append(
                ClinicalNote(**common, note=f"N{n}", text=a["text"], source_kind="triage note")
            )
        elif step.kind == "task":
            out.append(
                TaskStatusChanged(
                    **{**common, "patient": None},
                    status=a["status"],
                    rule=a["rule"],
                    order=order,
                    by="C1001",
                    note="Reviewed and discussed with the family",
                )
            )
        elif step.kind == "merged":
            out.append(PatientsMerged(**common, prior=prior.identifiers))
        elif step.kind in ("held", "released"):  # ingest's fail-closed path (adapters.cases)
            out.append(HeldMessage(**common, inbox=7, held=step.kind == "held"))
    return out


def _deliveries(
    events: list[Event], swaps: Sequence[int], duplicates: Sequence[int]
) -> list[Event]:
    """Event-time order, then some neighbours swapped (late arrival) and some delivered twice."""
    order = sorted(events, key=lambda e: e.occurred_at)
    for i in swaps:
        if i + 1 < len(order):
            order[i], order[i + 1] = order[i + 1], order[i]
    for i in sorted(set(duplicates), reverse=True):
        if i < len(order):
            order.insert(i + 1, order[i])
    return order


def run_checked(events: Sequence[Event], until: datetime) -> CheckedProcessor:
    """Deliver the events as replay does (the clock never goes back), firing due timers
    before each one and at the end; each message that the engine refuses is skipped, as
    ingest would quarantine it."""
    clock = SimulatedClock()
    store = open_store("sqlite://", clock=clock)
    processor = CheckedProcessor()
    try:
        with store.begin() as uow:
            for event in events:
                now = clock.advance(event.occurred_at)
                processor.fire_due(uow, now)
                try:
                    with uow.savepoint():
                        if isinstance(event, HeldMessage):
                            held_message(processor, uow, event, now)
                        else:
                            processor.apply(uow, [event], now)
                except EngineError:
                    pass
            processor.fire_due(uow, clock.advance(until), limit=100_000)
            stored = {t.identifier for t in uow.tasks()}
    finally:
        store.close()
    assert stored == processor.raised, "the store holds exactly the Tasks the rules raised"
    return processor


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    steps=st.lists(_steps, min_size=3, max_size=28),
    birth_days=st.sampled_from([None, 20, 50, 100, 160, 300, 600, 1200]),
    swaps=st.lists(st.integers(0, 30), max_size=3),
    duplicates=st.lists(st.integers(0, 30), max_size=2),
)
def test_random_histories_raise_exactly_the_tasks_the_plain_statement_does(
    steps: list[Step], birth_days: int | None, swaps: list[int], duplicates: list[int]
) -> None:
    birth = None if birth_days is None else T0 - timedelta(days=birth_days)
    events = _deliveries(_events(steps, birth), swaps, duplicates)
    processor = run_checked(events, T0 + timedelta(days=40))
    assert processor.disagreements == []


def _derby_like(birth: datetime) -> list[Step]:
    """A history that reaches most rules: an infant with a mark, a skeletal survey pending at
    discharge, a safeguarding flag, a normal preliminary and a critical final after home."""
    return [
        Step("registered", 0, {"visit": "V1", "who": "main"}),
        Step("note", 10, {"text": "Small blue mark on left cheek", "visit": "V1", "who": "main"}),
        Step(
            "ordered",
            20,
            {"visit": "V1", "order": "O1", "procedure": "XR skeletal survey", "who": "main"},
        ),
        Step("flag", 30, {"who": "main"}),
        Step(
            "report",
            90,
            {
                "order": "O1",
                "status": "preliminary",
                "flags": ("N",),
                "alert": "",
                "findings": (),
                "wrong_patient": False,
                "unmatched": False,
                "performed": True,
            },
        ),
        Step("discharged", 150, {"visit": "V1", "home": True}),
        Step(
            "report",
            270,
            {
                "order": "O1",
                "status": "final",
                "flags": ("HH",),
                "alert": "critical",
                "findings": ("SCT|125605004",),
                "wrong_patient": False,
                "unmatched": False,
                "performed": False,
            },
        ),
    ]


def test_a_derby_like_history_reaches_many_rules_and_engine_and_plain_python_agree() -> None:
    """A fixed history, so the differential check is known to exercise most of the catalogue
    (a random one might not): the Tasks come from many rules, and every decision agrees."""
    events = _events(_derby_like(T0 - timedelta(days=50)), T0 - timedelta(days=50))
    processor = run_checked(sorted(events, key=lambda e: e.occurred_at), T0 + timedelta(days=40))
    assert processor.disagreements == []
    rules = {identifier.rsplit("-", 1)[0] for identifier in processor.raised}
    assert len(rules) >= 6, rules


def _random_steps(rng: random.Random) -> list[Step]:
    """A seeded history in the shape of `_steps`, denser in the events that matter."""
    out: list[Step] = [Step("registered", 0, {"visit": "V1", "who": "main"})]
    for _ in range(rng.randint(6, 24)):
        kind = rng.choice(KINDS)
        minutes = rng.choice(
            [rng.randint(0, 600), rng.randint(600, 5760), rng.randint(14400, 43200)]
        )
        args: dict[str, Any] = {
            "visit": rng.choice(["V1", "V2"]),
            "who": rng.choice(["main", "main", "prior"]),
            "order": rng.choice(["O1", "O2", "O3"]),
            "procedure": rng.choice(PROCEDURES),
            "status": rng.choice(["preliminary", "final", "corrected", "withdrawn"]),
            "flags": rng.choice([(), ("N",), ("A",), ("HH",)]),
            "alert": rng.choice(["", "", "significant", "urgent", "critical"]),
            "findings": rng.choice([(), ("SCT|125605004",)]),
            "wrong_patient": rng.random() < 0.2,
            "unmatched": rng.random() < 0.15,
            "performed": rng.random() < 0.5,
            "home": rng.random() < 0.8,
            "text": rng.choice(NOTES),
            "rule": rng.choice(RULE_IDS),
        }
        if kind == "task":
            args["status"] = rng.choice(["accepted", "completed", "rejected"])
        out.append(Step(kind, minutes, args))
    if rng.random() < 0.3:  # a report corrected after the child went home
        report = {"order": "O1", "flags": ("A",), "alert": "", "findings": ()}
        report |= {"wrong_patient": False, "unmatched": False, "performed": True}
        out += [
            Step(
                "ordered",
                20,
                {"visit": "V1", "order": "O1", "procedure": "XR chest", "who": "main"},
            ),
            Step("discharged", 200, {"visit": "V1", "home": True}),
            Step("report", 400, {**report, "status": "final"}),
            Step("report", 700, {**report, "status": rng.choice(["corrected", "withdrawn"])}),
        ]
    return out


KINDS = (
    "ordered",
    "report",
    "report",
    "discharged",
    "note",
    "flag",
    "performed",
    "cancelled",
    "discharge-cancelled",
    "task",
    "merged",
    "registered",
    "admitted",
    "flag-cleared",
    "held",
    "released",
)


def test_the_random_histories_reach_every_rule_and_agree() -> None:
    """Seeded histories, so the check is known to cover the whole catalogue: every rule that
    is switched on raises Tasks in them, withdrawals happen, and engine and plain Python agree
    on every decision."""
    rng = random.Random(2008)
    raised: set[str] = set()
    changed = 0
    evaluations = 0
    for _ in range(150):
        birth = T0 - timedelta(days=rng.choice([20, 50, 100, 300, 600]))
        events = _deliveries(_events(_random_steps(rng), birth), [rng.randint(0, 20)], [])
        processor = run_checked(events, T0 + timedelta(days=40))
        assert processor.disagreements == []
        raised |= {identifier.rsplit("-", 1)[0] for identifier in processor.raised}
        changed += processor.changes
        evaluations += processor.evaluations
    # discharge-cancelled raises no Tasks: it withdraws them (the changes counted here).
    on = {r.id for r in CATALOGUE.rules if r.status != "off"} - {"discharge-cancelled"}
    assert on - raised == set(), f"rules never exercised: {sorted(on - raised)}"
    assert changed > 20 and evaluations > 5000

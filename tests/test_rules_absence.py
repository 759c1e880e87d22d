"""The absence rules (R6, R7, R9): the engine against the plain-Python oracle, and the timers.

The oracle (tests/oracle_absence.py) is written from the rules' READMEs; here the engine's
`Processor.decide` is compared with it on hand-built working memories (each an edge a README
names) and on random ones. The timer tests show that a case's Tasks do not depend on how the
clock gets to the end: one jump (`replay --until`) and a live scheduler that ticks every
hour fire the same Tasks.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from adapters.cases import load_case, run_case
from adapters.fhir.task import task_resource, task_restatus
from adapters.store import open_store
from engine.catalogue import Catalogue, load_catalogue
from engine.clock import SimulatedClock
from engine.facts import NEVER, working_memory
from engine.ports import Fact
from engine.processor import Processor
from engine.tasks import RecallTask, TaskChange, task_identifier
from tests.oracle_absence import R1, R6, R7, R9, expected

RULES = Path(__file__).resolve().parents[1] / "rules"
FULL = load_catalogue(RULES)
ABSENCE = (R6, R7, R9)
CATALOGUE = replace(FULL, rules=tuple(r for r in FULL.rules if r.id in ABSENCE))
TZ = FULL.site.timezone
BASE = int(datetime(2026, 3, 2, 9, 0, tzinfo=UTC).timestamp())
H, D = 3600, 86400


@pytest.fixture(scope="module")
def processor() -> Processor:
    return Processor(CATALOGUE, task_resource, task_restatus)


def _decided(processor: Processor, memory: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for decision in processor.decide(memory):
        if isinstance(decision, TaskChange):
            out[decision.identifier] = f"change:{decision.status}"
        else:
            out[decision.identifier] = decision.priority
    return out


def _memory(facts: list[Fact], now: int) -> list[tuple[str, dict[str, Any]]]:
    return working_memory(facts, datetime.fromtimestamp(now, UTC), TZ)


def _patient(months: int | None = 2) -> Fact:
    data: dict[str, Any] = {"kind": "patient", "sex": "F", "unmatched": 0}
    if months is not None:
        data["birth_at"] = BASE - (months * 30 + 10) * D
    return Fact("patient", "patient", data)


def _discharge(at: int, enc: str = "V1", **extra: Any) -> Fact:
    data = {
        "kind": "discharge",
        "enc": enc,
        "at": at,
        "leaves_care": 1,
        "cancelled": 0,
        "disposition": "",
        "class": "E",
        "location": "PAEDED",
        "attending_id": "C1001",
        "attending_name": "Dr C1001",
        "attending_auth": "GMC",
    }
    data.update(extra)
    return Fact(f"discharge:{enc}", "discharge", data)


def _order(okey: str, ordered_at: int, enc: str = "V1", skeletal: int = 0, **extra: Any) -> Fact:
    data = {
        "kind": "order",
        "okey": okey,
        "enc": enc,
        "code": "",
        "name": "XR skeletal survey" if skeletal else "XR chest",
        "section": "RAD",
        "placer": okey,
        "placer_ns": "RIS",
        "filler": "",
        "filler_ns": "",
        "imaging": 1,
        "skeletal": skeletal,
        "ordered_at": ordered_at,
        "performed_at": NEVER,
        "cancelled_at": NEVER,
        "orderer_id": "C2002",
        "orderer_name": "Dr C2002",
        "orderer_auth": "GMC",
    }
    data.update(extra)
    if not data["enc"]:
        del data["enc"]  # as projection stores it: empty values are left out
    return Fact(f"order:{okey}", "order", data)


def _report(okey: str, n: int, at: int, status: str = "P", **extra: Any) -> Fact:
    data = {
        "kind": "report",
        "okey": okey,
        "status": status,
        "final": int(status in ("F", "C")),
        "at": at,
        "flags": "",
        "abnormal": 0,
        "alert": 0,
        "findings": "",
        "wrong_patient": 0,
        "message_id": f"m{n}",
    }
    data.update(extra)
    return Fact(f"report:{okey}:{n}", "report", data)


def _r7_task(okey: str, discharge_at: int, trigger: str, open_: int = 1) -> Fact:
    ident = task_identifier(R7, okey, f"discharge:V1:{discharge_at}:{trigger}")
    return Fact(
        f"task:{ident}",
        "task",
        {
            "kind": "task",
            "id": ident,
            "rule": R7,
            "okey": okey,
            "priority": "routine",
            "critical": 0,
            "status": "requested" if open_ else "accepted",
            "open": open_,
            "closed": 0,
            "acknowledged": 0,
            "owner": "C1001",
            "raised_at": discharge_at + 900,
            "deadline_at": discharge_at + 900 + 72 * H,
            "enc": "V1",
            "discharge_enc": "V1",
            "discharge_at": discharge_at,
            "dependent": 1,
            "safeguarding": 0,
            "escalates": 1,
            "shadow": 0,
            "level": 0,
            "parent": "",
        },
    )


def _check(processor: Processor, facts: list[Fact], now: int) -> dict[str, str]:
    memory = _memory(facts, now)
    got = _decided(processor, memory)
    assert got == expected(memory, CATALOGUE)
    return got


def _ident(rule: str, okey: str, trigger: str) -> str:
    return task_identifier(rule, okey, trigger)


# --- R6: final report overdue ---------------------------------------------------------------


def test_r6_survey_is_urgent_once_its_deadline_passes_and_not_before(processor: Processor) -> None:
    d = BASE + 5 * H
    facts = [_patient(), _discharge(d), _order("S1", BASE, skeletal=1), _report("S1", 0, d - H)]
    overdue = _ident(R6, "S1", f"discharge:V1:{d}:overdue")
    assert _check(processor, facts, d + 24 * H - 1) == {}
    assert _check(processor, facts, d + 24 * H) == {overdue: "urgent"}
    # A final report at the deadline counts as in time; one after it does not.
    assert _check(processor, [*facts, _report("S1", 1, d + 24 * H, "F")], d + 30 * H) == {}
    late = [*facts, _report("S1", 1, d + 24 * H + 1, "C")]
    assert _check(processor, late, d + 30 * H) == {overdue: "urgent"}


def test_r6_other_imaging_is_routine_and_older_child_survey_uses_hours(
    processor: Processor,
) -> None:
    d = BASE + 5 * H
    facts = [_patient(30), _discharge(d), _order("S1", BASE, skeletal=1)]
    wider = replace(
        CATALOGUE,
        rules=tuple(
            replace(
                r,
                parameters={
                    **r.parameters,
                    "max_age_months": replace(r.parameters["max_age_months"], value=48),
                },
            )
            if r.id == R6
            else r
            for r in CATALOGUE.rules
        ),
    )
    wide = Processor(wider, task_resource, task_restatus)
    memory = _memory(facts, d + 25 * H)
    got = _decided(wide, memory)
    assert got == expected(memory, wider)
    assert got == {_ident(R6, "S1", f"discharge:V1:{d}:overdue"): "routine"}
    assert _check(processor, facts, d + 25 * H) == {}  # 30 months: outside the default cohort


def test_r6_not_for_an_order_cancelled_by_the_deadline_or_an_admission(
    processor: Processor,
) -> None:
    d = BASE + 5 * H
    order = _order("X1", BASE, performed_at=d - H, cancelled_at=d + 2 * H)
    cancelled = [_patient(), _discharge(d), order]
    assert _check(processor, cancelled, d + 30 * H) == {}
    admitted = [
        _patient(),
        _discharge(d),
        _order("X1", BASE),
        Fact(
            "admission:V2",
            "admission",
            {"kind": "admission", "enc": "V2", "at": d + 600, "cancelled": 0},
        ),
    ]
    assert _check(processor, admitted, d + 30 * H) == {}


# --- R7: imaging not performed by discharge -----------------------------------------------


def test_r7_not_performed_then_cancelled_raises_two_tasks(processor: Processor) -> None:
    d = BASE + 5 * H
    facts = [_patient(), _discharge(d), _order("X1", BASE, cancelled_at=d + 3 * H)]
    got = _check(processor, facts, d + 4 * H)
    assert got == {
        _ident(R7, "X1", f"discharge:V1:{d}:not-performed"): "routine",
        _ident(R7, "X1", f"discharge:V1:{d}:cancelled"): "routine",
    }


def test_r7_cancelled_within_the_settle_time_raises_only_the_cancelled_task(
    processor: Processor,
) -> None:
    d = BASE + 5 * H
    facts = [_patient(), _discharge(d), _order("S1", BASE, skeletal=1, cancelled_at=d + 600)]
    assert _check(processor, facts, d + 900) == {
        _ident(R7, "S1", f"discharge:V1:{d}:cancelled"): "urgent"
    }


def test_r7_a_report_or_a_performed_time_by_discharge_means_done(processor: Processor) -> None:
    d = BASE + 5 * H
    reported = [_patient(), _discharge(d), _order("X1", BASE), _report("X1", 0, d)]
    assert _check(processor, reported, d + H) == {}
    performed = [_patient(), _discharge(d), _order("X1", BASE, performed_at=d - H)]
    assert _check(processor, performed, d + H) == {}


def test_r7_is_urgent_with_a_safeguarding_flag_active_at_discharge(processor: Processor) -> None:
    d = BASE + 5 * H
    flag = Fact(
        "flag:F1",
        "flag",
        {
            "kind": "flag",
            "flag": "F1",
            "category": "CP",
            "at": BASE,
            "active": 1,
            "cleared_at": NEVER,
        },
    )
    facts = [_patient(), _discharge(d), _order("X1", BASE), flag]
    assert _check(processor, facts, d + H) == {
        _ident(R7, "X1", f"discharge:V1:{d}:not-performed"): "urgent"
    }


def test_r7_withdraws_its_open_task_when_the_exam_proves_done_before_discharge(
    processor: Processor,
) -> None:
    d = BASE + 5 * H
    task = _r7_task("X1", d, "not-performed")
    facts = [_patient(), _discharge(d), _order("X1", BASE, performed_at=d - H), task]
    assert _check(processor, facts, d + 6 * H) == {str(task.data["id"]): "change:cancelled"}
    accepted = _r7_task("X1", d, "not-performed", open_=0)
    facts = [_patient(), _discharge(d), _order("X1", BASE, performed_at=d - H), accepted]
    assert _check(processor, facts, d + 6 * H) == {}


# --- R9: follow-up skeletal survey --------------------------------------------------------


def test_r9_due_on_day_11_not_before_and_not_after_day_28(processor: Processor) -> None:
    t0 = BASE + 2 * H
    facts = [_patient(), _order("S1", BASE, skeletal=1, performed_at=t0)]
    due = {_ident(R9, "S1", "follow-up"): "urgent"}
    assert _check(processor, facts, t0 + 11 * D - 1) == {}
    assert _check(processor, facts, t0 + 11 * D) == due
    assert _check(processor, facts, t0 + 28 * D - 1) == due
    assert _check(processor, facts, t0 + 28 * D) == {}


def test_r9_a_requested_follow_up_cancels_and_a_cancelled_one_does_not(
    processor: Processor,
) -> None:
    t0 = BASE + 2 * H
    first = _order("S1", BASE, skeletal=1, performed_at=t0)
    booked = _order("S2", t0 + 5 * D, enc="V2", skeletal=1)
    assert _check(processor, [_patient(), first, booked], t0 + 12 * D) == {}
    dropped = _order("S2", t0 + 5 * D, enc="V2", skeletal=1, cancelled_at=t0 + 6 * D)
    assert _check(processor, [_patient(), first, dropped], t0 + 12 * D) == {
        _ident(R9, "S1", "follow-up"): "urgent"
    }


def test_r9_the_follow_up_survey_demands_no_follow_up_of_its_own(processor: Processor) -> None:
    t0 = BASE + 2 * H
    first = _order("S1", BASE, skeletal=1, performed_at=t0)
    second = _order("S2", t0 + 12 * D, enc="V2", skeletal=1, performed_at=t0 + 13 * D)
    assert _check(processor, [_patient(), first, second], t0 + 13 * D + 11 * D) == {}
    # Reported only (no examination time): the request time stands in for both.
    first = _order("S1", BASE, skeletal=1)
    second = _order("S2", BASE + 13 * D, enc="V2", skeletal=1)
    facts = [_patient(), first, second, _report("S1", 0, BASE + 3 * H, "F")]
    facts.append(_report("S2", 0, BASE + 13 * D + 3 * H, "F"))
    assert _check(processor, facts, BASE + 25 * D) == {}


def test_r9_cohort_is_age_when_the_first_survey_was_requested(processor: Processor) -> None:
    t0 = BASE + 2 * H
    survey = _order("S1", BASE, skeletal=1, performed_at=t0)
    assert _check(processor, [_patient(30), survey], t0 + 12 * D) == {}
    assert _check(processor, [_patient(None), survey], t0 + 12 * D) == {
        _ident(R9, "S1", "follow-up"): "urgent"
    }


# --- random histories ---------------------------------------------------------------------


def _random_facts(rng: random.Random) -> tuple[list[Fact], int]:
    grid = 15 * 60

    def t(span_days: int = 40) -> int:
        return BASE + rng.randrange(0, span_days * 96) * grid

    facts = [_patient(rng.choice([None, 1, 3, 11, 23, 24, 30]))]
    discharges: list[int] = []
    for enc in ("V1", "V2"):
        if rng.random() < 0.8:
            at = t(20)
            discharges.append(at)
            facts.append(
                _discharge(
                    at,
                    enc,
                    leaves_care=int(rng.random() < 0.85),
                    cancelled=int(rng.random() < 0.1),
                )
            )
            if rng.random() < 0.15:
                facts.append(
                    Fact(
                        f"admission:{enc}X",
                        "admission",
                        {
                            "kind": "admission",
                            "enc": enc + "X",
                            "at": at + rng.choice([0, 600, 900, 901, 3600]),
                            "cancelled": int(rng.random() < 0.3),
                        },
                    )
                )
    near = discharges or [t(20)]
    orders: list[str] = []
    for i in range(rng.randint(1, 4)):
        okey = f"O{i}"
        orders.append(okey)
        anchor = rng.choice(near)
        ordered = anchor + rng.choice([-20, -8, -1, 0, 1]) * H
        if rng.random() < 0.3:
            ordered = t()

        def maybe(base: int) -> int:
            if rng.random() < 0.5:
                return NEVER
            return base + rng.choice([-2 * H, 0, 900, 901, 3 * H, 24 * H, 2 * D, 12 * D])

        facts.append(
            _order(
                okey,
                ordered,
                enc=rng.choice(["V1", "V2", "V1", ""]),
                skeletal=int(rng.random() < 0.6),
                imaging=int(rng.random() < 0.9),
                performed_at=maybe(ordered + H),
                cancelled_at=maybe(anchor),
            )
        )
        for n in range(rng.randint(0, 3)):
            facts.append(
                _report(
                    okey,
                    n,
                    rng.choice([anchor + rng.choice([-H, 0, H, 24 * H, 24 * H + 1, 30 * H]), t()]),
                    rng.choice("PPFCW"),
                    wrong_patient=int(rng.random() < 0.1),
                )
            )
    if rng.random() < 0.3:
        raised = t(20)
        facts.append(
            Fact(
                "flag:F1",
                "flag",
                {
                    "kind": "flag",
                    "flag": "F1",
                    "category": "CP",
                    "at": raised,
                    "active": 1,
                    "cleared_at": rng.choice([NEVER, raised + D]),
                },
            )
        )
    for okey in orders:
        if discharges and rng.random() < 0.3:
            facts.append(
                _r7_task(
                    okey,
                    rng.choice(discharges),
                    rng.choice(["not-performed", "cancelled"]),
                    open_=int(rng.random() < 0.8),
                )
            )
    anchor = rng.choice(near)
    now = rng.choice([t(45), anchor + 900, anchor + 24 * H, anchor + 11 * D, anchor + 40 * D])
    return facts, now


def test_engine_agrees_with_the_oracle_on_random_histories(processor: Processor) -> None:
    rng = random.Random(20260305)
    raised = {R6: 0, R7: 0, R9: 0, "change": 0}
    for _ in range(600):
        facts, now = _random_facts(rng)
        memory = _memory(facts, now)
        got = _decided(processor, memory)
        assert got == expected(memory, CATALOGUE), facts
        for ident, what in got.items():
            raised["change" if what.startswith("change:") else ident.rsplit("-", 1)[0]] += 1
    # The histories reach every rule (the comparison is not vacuous).
    assert all(count > 5 for count in raised.values()), raised


# --- timers: replay --until and the live scheduler fire the same Tasks ----------------------


def _run(path: Path, catalogue: Catalogue, tick: timedelta | None) -> dict[str, str]:
    """Run a case's events; with `tick`, the clock also stops every `tick` (a live
    scheduler polling the due table); without, it jumps straight to `until` (replay)."""
    case = load_case(path, TZ)
    assert case.until is not None
    clock = SimulatedClock()
    store = open_store("sqlite://", clock=clock)
    processor = Processor(catalogue, task_resource, task_restatus)
    stops: list[tuple[datetime, Any]] = [(e.occurred_at, e) for e in case.events]
    if tick is not None:
        moment = min(e.occurred_at for e in case.events)
        while moment < case.until:
            stops.append((moment, None))
            moment += tick
    tasks = {}
    try:
        with store.begin() as uow:
            for at, event in sorted(stops, key=lambda s: (s[0], s[1] is None)):
                now = clock.advance(at)
                for task in processor.fire_due(uow, now):
                    tasks[task.identifier] = task.priority
                if event is not None:
                    for task in processor.apply(uow, [event], now).tasks:
                        tasks[task.identifier] = task.priority
            for task in processor.fire_due(uow, clock.advance(case.until)):
                tasks[task.identifier] = task.priority
    finally:
        store.close()
    return tasks


TIMED_CASES = [
    p
    for rule in ABSENCE
    for p in sorted((RULES / rule / "cases").glob("*.toml"))
    if load_case(p, TZ).kind == "recall"
]


@pytest.mark.parametrize("path", TIMED_CASES, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_replay_until_and_live_ticks_fire_the_same_tasks(path: Path) -> None:
    catalogue = replace(FULL, rules=tuple(r for r in FULL.rules if r.id in (*ABSENCE, R1)))
    replayed = _run(path, catalogue, None)
    live = _run(path, catalogue, timedelta(hours=1))
    assert replayed == live
    assert any(ident.startswith(path.parent.parent.name) for ident in replayed), (
        "the recall case raised none of its rule's Tasks"
    )


@pytest.mark.parametrize("rule_id", ABSENCE)
def test_every_case_passes_against_the_absence_rules_alone(rule_id: str) -> None:
    """The cases through the engine with only R1 and these rules (the full suite runs them
    with every rule in tests/test_rule_cases.py)."""
    catalogue = replace(FULL, rules=tuple(r for r in FULL.rules if r.id in (*ABSENCE, R1)))
    for path in sorted((RULES / rule_id / "cases").glob("*.toml")):
        result = run_case(load_case(path, TZ), catalogue)
        assert result.passed, f"{path.name}: " + "; ".join(result.problems)


def test_recall_tasks_name_their_parent_and_flags() -> None:
    """R6 and R7 Tasks are part of the pending-imaging Task and depend on the discharge; R9's
    is a safeguarding Task that no discharge withdraws."""
    processor = Processor(CATALOGUE, task_resource, task_restatus)
    d = BASE + 5 * H
    facts = [_patient(), _discharge(d), _order("S1", BASE, skeletal=1, performed_at=d + 2 * D)]
    first = _order("S0", BASE - 20 * D, enc="V0", skeletal=1, performed_at=BASE - 20 * D)
    tasks = [
        t
        for t in processor.decide(_memory([_patient(), first], BASE - 9 * D))
        + processor.decide(_memory(facts, d + 25 * H))
        if isinstance(t, RecallTask)
    ]
    by_rule = {t.rule_id: t for t in tasks}
    assert set(by_rule) == {R6, R7, R9}
    parent = _ident(R1, "S1", f"discharge:V1:{d}")
    for rule in (R6, R7):
        assert by_rule[rule].part_of == parent
        assert by_rule[rule].discharge_dependent and not by_rule[rule].safeguarding
    assert by_rule[R9].safeguarding and not by_rule[R9].discharge_dependent
    assert by_rule[R9].owner.id == "C2002"
    assert "11 to 14 days" in by_rule[R9].description


def test_wake_times_are_the_moments_the_answers_change_on_the_clock() -> None:
    d, t0 = BASE + 5 * H, BASE + 2 * H
    facts = [
        _patient(),
        _discharge(d),
        _order("S1", BASE, skeletal=1, performed_at=t0),
        _order("S2", BASE, skeletal=1),  # not performed, not reported: no follow-up clock
    ]
    memory = _memory(facts, BASE)
    site = CATALOGUE.site

    def wakes(rule_id: str) -> list[int]:
        rule = CATALOGUE.rule(rule_id)
        return [int(t.timestamp()) for t in rule.module.wake_times(memory, rule.params, site)]

    assert wakes(R6) == [d + 24 * H]  # `hours` and `skeletal_survey_hours` are both 24
    assert wakes(R7) == [d + site.settle_minutes * 60]
    assert wakes(R9) == [t0 + 11 * D]


def test_skeletal_survey_hours_has_a_hard_limit_of_72_and_a_site_may_use_it() -> None:
    from engine.catalogue import load_rule
    from engine.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="hard limit 72"):
        load_rule(RULES / R6, {"skeletal_survey_hours": 73})
    with pytest.raises(ConfigurationError, match="hard limit 28"):
        load_rule(RULES / R9, {"window_end_days": 29})
    site72 = replace(
        CATALOGUE,
        rules=tuple(
            load_rule(RULES / R6, {"skeletal_survey_hours": 72}) if r.id == R6 else r
            for r in CATALOGUE.rules
        ),
    )
    processor = Processor(site72, task_resource, task_restatus)
    d = BASE + 5 * H
    facts = [_patient(), _discharge(d), _order("S1", BASE, skeletal=1, performed_at=d - H)]
    for hours, want in ((30, {}), (72, {_ident(R6, "S1", f"discharge:V1:{d}:overdue"): "urgent"})):
        memory = _memory(facts, d + hours * H)
        assert _decided(processor, memory) == expected(memory, site72) == want

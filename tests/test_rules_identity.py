"""The merge, identity and repeat-attendance rules (R13-R15): the engine against the plain-
Python oracle (tests/oracle_identity.py) on hand-built and random working memories, and what
their Tasks say."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from adapters.cases import load_case, run_case
from adapters.fhir.task import task_resource, task_restatus
from adapters.store import open_store
from engine.catalogue import Catalogue, load_catalogue
from engine.clock import SimulatedClock
from engine.facts import NEVER, epoch, working_memory
from engine.ports import Fact
from engine.processor import Processor
from engine.tasks import RecallTask, task_identifier
from tests.oracle_identity import R2, R13, R14, R15, expected

RULES = Path(__file__).resolve().parents[1] / "rules"
MINE = (R13, R14, R15)
BASE = epoch(datetime(2026, 3, 1, 9, 0, tzinfo=UTC))
DAY = 86_400
ORDER = "PLAC|RIS|ORD-1"
LONDON = ZoneInfo("Europe/London")
Row = tuple[str, dict[str, Any]]  # (fact key, fact data)
YEAR_OLD_AT_BASE = epoch(datetime(2025, 3, 1, tzinfo=LONDON))  # 12 months old at BASE
ADULT_AT_BASE = epoch(datetime(2008, 3, 1, tzinfo=LONDON))  # 216 months old at BASE

SETTINGS = """
timezone = "Europe/London"
[discharge]
settle_minutes = 15
[imaging]
sections = ["RAD"]
[owners.pool]
id = "SAFETYNET-RESULTS-POOL"
name = "Radiology results safety-net pool"
[locations]
ED = "the emergency department"
"""


def _catalogue(folder: Path, active: bool) -> Catalogue:
    """Only these rules (other rule folders may be mid-edit), with the site's directory and
    terminology; R15 switched on when `active`."""
    folder.mkdir()
    (folder / "settings.toml").write_text(SETTINGS)
    for name in ("directory.toml", "terminology.toml", *MINE):
        (folder / name).symlink_to(RULES / name)
    catalogue = load_catalogue(folder)
    if active:
        catalogue = replace(
            catalogue,
            rules=tuple(replace(r, status="active") for r in catalogue.rules),
        )
    return catalogue


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Catalogue:
    return _catalogue(tmp_path_factory.mktemp("rules") / "shipped", active=False)


@pytest.fixture(scope="module")
def switched_on(tmp_path_factory: pytest.TempPathFactory) -> Catalogue:
    return _catalogue(tmp_path_factory.mktemp("rules") / "on", active=True)


@pytest.fixture(scope="module")
def engine_on(switched_on: Catalogue) -> Processor:
    return Processor(switched_on, task_resource, task_restatus)


def memory(facts: Sequence[tuple[str, Mapping[str, Any]]], now: int) -> list[Any]:
    """The working memory the engine would build from these facts at `now`."""
    stored = [Fact(key, str(data["kind"]), dict(data)) for key, data in facts]
    return working_memory(stored, datetime.fromtimestamp(now, UTC), LONDON)


def decided(processor: Processor, mem: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, str]:
    """The engine's answer in the oracle's shape, for R13-R15 only."""
    out = {}
    for d in processor.decide(mem):
        if d.rule_id in MINE:
            out[d.identifier] = d.priority if isinstance(d, RecallTask) else f"change:{d.status}"
    return out


def tasks_of(processor: Processor, mem: Sequence[tuple[str, Mapping[str, Any]]]) -> list[Any]:
    return [d for d in processor.decide(mem) if d.rule_id in MINE]


# --- fact builders -------------------------------------------------------------------------


def patient(birth_at: int | None = BASE - 60 * DAY, unmatched: int = 0) -> Row:
    data: dict[str, Any] = {"kind": "patient", "unmatched": unmatched}
    if unmatched == 0:
        data.update(sex="F", id_system="RX1", id_value="RX9", id_nhs=False)
        if birth_at is not None:
            data["birth_at"] = birth_at
    return "patient", data


def encounter(enc: str, start: int | None, cls: str = "E") -> Row:
    data: dict[str, Any] = {"kind": "encounter", "enc": enc, "class": cls, "location": "ED"}
    if start is not None:
        data["started_at"] = start
    return f"encounter:{enc}", data


def discharge(enc: str, at: int, cancelled: int = 0) -> Row:
    return f"discharge:{enc}", {
        "kind": "discharge",
        "enc": enc,
        "at": at,
        "leaves_care": 1,
        "disposition": "",
        "cancelled": cancelled,
        "class": "E",
        "location": "ED",
    }


def finding(note: str, enc: str, at: int) -> Row:
    return f"finding:{note}:bruise", {
        "kind": "finding",
        "concept": "bruise",
        "words": "mark",
        "region": "",
        "patterned": 0,
        "at": at,
        "source": "triage note",
        "enc": enc,
        "note": note,
    }


def flag(name: str, at: int, cleared_at: int = NEVER) -> Row:
    return f"flag:{name}", {
        "kind": "flag",
        "flag": name,
        "category": "",
        "at": at,
        "active": int(cleared_at == NEVER),
        "cleared_at": cleared_at,
    }


def merge(prior: str, at: int, **counts: int) -> Row:
    data: dict[str, Any] = {"kind": "merge", "at": at, "message_id": "M1"}
    for side in ("prior", "surviving"):
        for what in ("flags", "findings", "attendances"):
            data[f"{side}_{what}"] = counts.get(f"{side}_{what}", 0)
    return f"merge:{prior}", data


def order(okey: str = ORDER, name: str = "XR chest", enc: str = "") -> Row:
    return f"order:{okey}", {
        "kind": "order",
        "okey": okey,
        "enc": enc,
        "code": "",
        "name": name,
        "section": "RAD",
        "placer": okey.rsplit("|", 1)[-1],
        "placer_ns": "RIS",
        "filler": "",
        "filler_ns": "",
        "imaging": 1,
        "skeletal": 0,
        "ordered_at": BASE,
        "performed_at": NEVER,
        "cancelled_at": NEVER,
    }


def report(n: int, at: int, status: str = "F", wrong: int = 0, okey: str = ORDER) -> Row:
    return f"report:{okey}:{n}", {
        "kind": "report",
        "okey": okey,
        "status": status,
        "final": int(status in ("F", "C")),
        "at": at,
        "flags": "",
        "abnormal": 0,
        "alert": 0,
        "findings": "",
        "wrong_patient": wrong,
        "message_id": f"R{n}",
    }


def task(rule: str, okey: str, ident: str, open_: int = 1, enc: str = "", level: int = 0) -> Row:
    return f"task:{ident}", {
        "kind": "task",
        "id": ident,
        "rule": rule,
        "okey": okey,
        "priority": "asap",
        "critical": 0,
        "status": "requested" if open_ else "accepted",
        "open": open_,
        "closed": 0,
        "acknowledged": 0,
        "owner": "X",
        "raised_at": BASE,
        "deadline_at": BASE + DAY,
        "enc": enc,
        "discharge_enc": enc,
        "discharge_at": 0,
        "dependent": 0,
        "safeguarding": 0,
        "escalates": 1,
        "shadow": 0,
        "level": level,
        "parent": "",
    }


UNRESOLVED = task_identifier(R14, ORDER, "unresolved-identity")
WRONG = task_identifier(R14, ORDER, "wrong-patient")


# --- hand-built memories -------------------------------------------------------------------

HAND_BUILT = {
    "merge: prior finding, surviving attendance": [
        patient(),
        merge("P1", BASE, prior_findings=1, surviving_attendances=2),
    ],
    "merge: surviving flag, prior attendance": [
        patient(),
        merge("P1", BASE, surviving_flags=1, prior_attendances=1),
    ],
    "merge: surviving flag, empty prior": [patient(), merge("P1", BASE, surviving_flags=1)],
    "merge: attendances only": [
        patient(),
        merge("P1", BASE, prior_attendances=3, surviving_attendances=1),
    ],
    "merge: adult": [
        patient(BASE - 30 * 365 * DAY),
        merge("P1", BASE, prior_flags=1, surviving_flags=1),
    ],
    "merge: unknown age": [
        patient(None),
        merge("P1", BASE, prior_flags=1, surviving_findings=1),
    ],
    "placeholder within grace": [patient(unmatched=1), order(), report(0, BASE)],
    "placeholder after grace": [patient(unmatched=1), order(), report(0, BASE - 31 * 60)],
    "placeholder two reports": [
        patient(unmatched=1),
        order(),
        report(0, BASE - 3600, "P"),
        report(1, BASE - 600, "F"),
    ],
    "placeholder withdrawn wrong patient": [
        patient(unmatched=1),
        order(),
        report(0, BASE - 3600, "W", wrong=1),
    ],
    "matched: open unresolved Task": [
        patient(),
        order(),
        report(0, BASE - 3600),
        task(R14, ORDER, UNRESOLVED),
    ],
    "matched: accepted unresolved Task": [
        patient(),
        order(),
        report(0, BASE - 3600),
        task(R14, ORDER, UNRESOLVED, open_=0),
    ],
    "matched: open wrong-patient Task": [
        patient(),
        order(),
        report(0, BASE - 3600, "W", wrong=1),
        task(R14, ORDER, WRONG),
    ],
    "wrong patient": [patient(), order(), report(0, BASE - 7200), report(1, BASE, "W", wrong=1)],
    "wrong patient, no patient fact": [order(), report(0, BASE, "W", wrong=1)],
    "withdrawn, not wrong patient": [patient(), order(), report(0, BASE, "W")],
    "repeat: bruise at first": [
        patient(),
        encounter("V1", BASE - 20 * DAY),
        finding("N1", "V1", BASE - 20 * DAY + 600),
        encounter("V2", BASE),
    ],
    "repeat: bruise at second": [
        patient(),
        encounter("V1", BASE - 20 * DAY),
        encounter("V2", BASE),
        finding("N1", "V2", BASE + 600),
    ],
    "repeat: bruise elsewhere": [
        patient(),
        encounter("V1", BASE - 20 * DAY),
        encounter("V2", BASE),
        finding("N1", "", BASE - DAY),
    ],
    "repeat: outside window": [
        patient(),
        encounter("V1", BASE - 31 * DAY),
        finding("N1", "V1", BASE - 31 * DAY),
        encounter("V2", BASE),
    ],
    "repeat: exactly at the window": [
        patient(),
        encounter("V1", BASE - 30 * DAY),
        finding("N1", "V1", BASE - 30 * DAY),
        encounter("V2", BASE),
    ],
    "repeat: too old": [
        patient(BASE - 400 * DAY),
        encounter("V1", BASE - 5 * DAY),
        finding("N1", "V1", BASE - 5 * DAY),
        encounter("V2", BASE),
    ],
    "repeat: unknown age": [
        patient(None),
        encounter("V1", BASE - 5 * DAY),
        finding("N1", "V1", BASE - 5 * DAY),
        encounter("V2", BASE),
    ],
    "repeat: outpatient second": [
        patient(),
        encounter("V1", BASE - 5 * DAY),
        finding("N1", "V1", BASE - 5 * DAY),
        encounter("V2", BASE, cls="O"),
    ],
    "repeat: flag cleared before first": [
        patient(),
        flag("F1", BASE - 60 * DAY, BASE - 40 * DAY),
        encounter("V1", BASE - 5 * DAY),
        encounter("V2", BASE),
    ],
    "repeat: flag between": [
        patient(),
        encounter("V1", BASE - 5 * DAY),
        flag("F1", BASE - 3 * DAY, BASE - 2 * DAY),
        encounter("V2", BASE),
    ],
    "repeat: flag during second": [
        patient(),
        encounter("V1", BASE - 5 * DAY),
        encounter("V2", BASE),
        flag("F1", BASE + 3600),
        discharge("V2", BASE + 7200),
    ],
    "repeat: flag after second left": [
        patient(),
        encounter("V1", BASE - 5 * DAY),
        encounter("V2", BASE),
        discharge("V2", BASE + 3600),
        flag("F1", BASE + 7200),
    ],
    "repeat: flag as the second attendance ends": [
        patient(),
        encounter("V1", BASE - 5 * DAY),
        encounter("V2", BASE),
        discharge("V2", BASE + 3600),
        flag("F1", BASE + 3600),
    ],
    "repeat: flag as the first attendance starts": [
        patient(),
        flag("F1", BASE - 60 * DAY, BASE - 5 * DAY),
        encounter("V1", BASE - 5 * DAY),
        encounter("V2", BASE),
    ],
    "repeat: flag after a cancelled discharge": [
        patient(),
        encounter("V1", BASE - 5 * DAY),
        encounter("V2", BASE),
        discharge("V2", BASE + 3600, cancelled=1),
        flag("F1", BASE + 7200),
    ],
    "repeat: late report of the first": [
        patient(),
        encounter("V1", BASE - 5 * DAY),
        encounter("V2", BASE),
        task(R2, ORDER, "r2-task", enc="V1"),
    ],
    "repeat: late report of the second": [
        patient(),
        encounter("V1", BASE - 5 * DAY),
        encounter("V2", BASE),
        task(R2, ORDER, "r2-task", enc="V2"),
    ],
    "repeat: three attendances": [
        patient(),
        encounter("V1", BASE - 20 * DAY),
        finding("N1", "V1", BASE - 20 * DAY),
        encounter("V2", BASE - 10 * DAY),
        encounter("V3", BASE),
    ],
}


@pytest.mark.parametrize("name", HAND_BUILT)
def test_engine_agrees_with_the_oracle_on_hand_built_memories(
    name: str, engine_on: Processor, switched_on: Catalogue
) -> None:
    mem = memory(HAND_BUILT[name], BASE + DAY)
    assert decided(engine_on, mem) == expected(mem, switched_on)


def test_hand_built_memories_say_what_the_readmes_say(
    engine_on: Processor, switched_on: Catalogue
) -> None:
    """The oracle is only useful if it is right: spot-check its answers by hand."""
    answers = {
        name: sorted(expected(memory(facts, BASE + DAY), switched_on).values())
        for name, facts in HAND_BUILT.items()
    }
    assert answers["merge: prior finding, surviving attendance"] == ["urgent"]
    assert answers["merge: surviving flag, prior attendance"] == ["urgent"]
    assert answers["merge: surviving flag, empty prior"] == []
    assert answers["merge: attendances only"] == []
    assert answers["merge: adult"] == []
    assert answers["merge: unknown age"] == ["urgent"]
    assert answers["placeholder two reports"] == ["asap"]  # one Task per order
    assert answers["placeholder withdrawn wrong patient"] == ["asap"]  # not also wrong-patient
    assert answers["matched: open unresolved Task"] == ["change:cancelled"]
    assert answers["matched: accepted unresolved Task"] == []
    assert answers["matched: open wrong-patient Task"] == ["urgent"]  # raised, never withdrawn
    assert answers["wrong patient"] == ["urgent"]
    assert answers["wrong patient, no patient fact"] == ["urgent"]  # fails safe
    assert answers["withdrawn, not wrong patient"] == []
    for name in (
        "repeat: bruise at first",
        "repeat: bruise at second",
        "repeat: exactly at the window",
        "repeat: unknown age",
        "repeat: flag between",
        "repeat: flag during second",
        "repeat: flag after a cancelled discharge",
        "repeat: flag as the second attendance ends",
        "repeat: late report of the first",
    ):
        assert answers[name] == ["urgent"], name
    for name in (
        "repeat: bruise elsewhere",
        "repeat: outside window",
        "repeat: too old",
        "repeat: outpatient second",
        "repeat: flag cleared before first",
        "repeat: flag after second left",
        "repeat: flag as the first attendance starts",  # cleared as it began
        "repeat: late report of the second",
    ):
        assert answers[name] == [], name
    # V1->V2 (bruise at V1) and V1->V3 (bruise at V1); V2->V3 has no concern.
    assert answers["repeat: three attendances"] == ["urgent", "urgent"]
    within = memory(HAND_BUILT["placeholder within grace"], BASE + 29 * 60)
    assert expected(within, switched_on) == decided(engine_on, within) == {}
    assert answers["placeholder within grace"] == ["asap"]  # a day later


def test_an_off_rule_raises_nothing_in_the_engine_or_the_oracle(
    shipped: Catalogue, switched_on: Catalogue
) -> None:
    assert shipped.rule(R15).status == "off"
    mem = memory(HAND_BUILT["repeat: bruise at first"], BASE + DAY)
    assert decided(Processor(shipped, task_resource, task_restatus), mem) == {}
    assert expected(mem, shipped) == {}
    assert len(expected(mem, switched_on)) == 1


# --- random histories ----------------------------------------------------------------------


def random_history(rng: random.Random, steps: int) -> list[Row]:
    """One patient's facts, drawn so that windows, grace times and cohorts are often close.

    Times fall on a grid of `steps` half-months (a 30-day window is two steps) plus 0, 30 or
    60 minutes (the grace time is 30), so that boundaries are hit: a repeat attendance exactly
    at the window's end, a flag raised as an attendance starts or as one ends."""

    def t() -> int:
        return BASE + rng.randint(-steps, 1) * 15 * DAY + rng.choice((0, 1800, 3600))

    placeholder = rng.random() < 0.2
    birth = rng.choice([None, BASE - 20 * 365 * DAY, *(BASE - d * DAY for d in (30, 200, 360))])
    if rng.random() < 0.2:  # a first or eighteenth birthday falls inside the histories
        birth = rng.choice([YEAR_OLD_AT_BASE, ADULT_AT_BASE])
    facts = [patient(birth, unmatched=int(placeholder))]
    visits = [f"V{i}" for i in range(rng.randint(0, 4))]
    for enc in visits:
        start = rng.choice([None, t(), t(), t()])
        facts.append(encounter(enc, start, rng.choice("EEEIO")))
        if start is not None and rng.random() < 0.6:
            left = start + rng.choice((1800, 3600, 7200))
            facts.append(discharge(enc, left, int(rng.random() < 0.2)))
    for i in range(rng.randint(0, 2)):
        facts.append(finding(f"N{i}", rng.choice([*visits, ""]), t()))
    for i in range(rng.randint(0, 2)):
        raised = t()
        facts.append(flag(f"F{i}", raised, rng.choice([NEVER, raised + 1800, raised + 15 * DAY])))
    if rng.random() < 0.4:
        counts = {
            f"{side}_{what}": rng.choice([0, 0, 1, 2])
            for side in ("prior", "surviving")
            for what in ("flags", "findings", "attendances")
        }
        facts.append(merge("P1", t(), **counts))
    for n in range(rng.randint(0, 2)):
        okey = f"PLAC|RIS|ORD-{n}"
        facts.append(order(okey, enc=rng.choice([*visits, ""])))
        for k in range(rng.randint(0, 2)):
            status = rng.choice("PFCW")
            wrong = int(status == "W" and rng.random() < 0.7)
            facts.append(report(k, t(), status, wrong, okey))
        if rng.random() < 0.4:
            trigger = rng.choice(["unresolved-identity", "wrong-patient"])
            ident = task_identifier(R14, okey, trigger)
            facts.append(task(R14, okey, ident, int(rng.random() < 0.7), level=rng.choice([0, 1])))
    for i in range(rng.randint(0, 2)):
        facts.append(
            task(R2, f"PLAC|RIS|ORD-{i}", f"r2-{i}", enc=rng.choice([*visits, ""]), level=0)
        )
    return facts


@pytest.mark.parametrize("steps", [3, 6])
def test_engine_agrees_with_the_oracle_on_random_histories(
    steps: int, engine_on: Processor, switched_on: Catalogue
) -> None:
    rng = random.Random(20260305 + steps)
    raised = 0
    for _ in range(1000):
        history = random_history(rng, steps)
        at = [f["at"] for _, f in history if "at" in f]
        now = (
            rng.choice(at) + 1800 if at and rng.random() < 0.3 else BASE + rng.randint(-2, 4) * DAY
        )
        mem = memory(history, now)
        want = expected(mem, switched_on)
        assert decided(engine_on, mem) == want, mem
        raised += len(want)
    assert raised > 100  # the histories exercise the rules, not only their silence


# --- what the Tasks say --------------------------------------------------------------------


def test_unmatched_result_task_names_what_is_known_and_no_patient(engine_on: Processor) -> None:
    facts = [patient(unmatched=1), order(name="XR skeletal survey"), report(0, BASE, "P")]
    (decision,) = tasks_of(engine_on, memory(facts, BASE + 3600))
    assert isinstance(decision, RecallTask)
    assert decision.identifier == UNRESOLVED
    text = decision.description
    assert "placer order number ORD-1" in text
    assert "XR skeletal survey" in text
    assert "preliminary report issued at 09:00 on 1 March 2026" in text
    assert decision.owner.id == "IDENTITY-POOL" and decision.owner_is_pool
    assert decision.authored_on == datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
    resource = task_resource(decision)
    assert "for" not in resource
    assert {"type": {"text": "Placer order number"}, "valueString": "ORD-1 (RIS)"} in resource[
        "input"
    ]


def test_merge_task_goes_to_the_safeguarding_team_and_lists_the_history(
    engine_on: Processor,
) -> None:
    facts = [
        patient(),
        finding("N1", "V1", BASE - 2 * DAY),
        flag("F1", BASE - DAY),
        merge("P1", BASE, prior_findings=1, surviving_flags=1, surviving_attendances=1),
    ]
    (decision,) = tasks_of(engine_on, memory(facts, BASE + 60))
    assert isinstance(decision, RecallTask)
    assert decision.priority == "urgent" and decision.safeguarding
    assert decision.owner.id == "SAFEGUARDING-TEAM"
    assert "The record merged in held 1 bruise or mark finding;" in decision.description
    assert "the surviving record held 1 active safeguarding flag and 1 attendance" in (
        decision.description
    )
    assert "8-week-old girl" in decision.description
    labels = [label for label, _ in decision.inputs]
    assert labels[:3] == ["Record merged in", "Surviving record", "Merge message"]
    assert labels[3:] == ["Finding", "Safeguarding flag"]  # oldest first


def test_repeat_attendance_task_says_when_and_why(engine_on: Processor) -> None:
    (decision,) = tasks_of(engine_on, memory(HAND_BUILT["repeat: bruise at first"], BASE))
    assert isinstance(decision, RecallTask)
    assert decision.description.startswith(
        "8-week-old girl attended the emergency department at 09:00 on 1 March 2026, "
        "20 days after an earlier attendance"
    )
    assert "written as 'mark' in the triage note" in decision.description
    assert decision.encounter == "V2" and decision.owner.id == "SAFEGUARDING-TEAM"


# --- cases -------------------------------------------------------------------------------


def test_the_derby_gap_is_caught_with_a_60_day_window(switched_on: Catalogue) -> None:
    """The shipped 30-day window misses Derby's six-week gap (a no-recall case); the 60-90 days
    the catalogue suggests catch it."""
    path = RULES / R15 / "cases" / "no_recall_derby_six_week_gap.toml"
    case = load_case(path, switched_on.site.timezone)
    assert run_case(case, switched_on).passed
    rule = switched_on.rule(R15)
    wider = replace(
        rule,
        parameters={
            **rule.parameters,
            "window_days": replace(rule.parameters["window_days"], value=60),
        },
    )
    catalogue = replace(
        switched_on, rules=tuple(wider if r.id == R15 else r for r in switched_on.rules)
    )
    result = run_case(case, catalogue)
    assert [t.rule_id for t in result.tasks] == [R15]


def test_cases_of_an_off_rule_still_run_it(shipped: Catalogue) -> None:
    path = RULES / R15 / "cases" / "recall_bruise_at_first_attendance.toml"
    result = run_case(load_case(path, shipped.site.timezone), shipped)
    assert result.passed, result.problems


def test_a_withdrawn_identity_task_says_why(shipped: Catalogue) -> None:
    path = RULES / R14 / "cases" / "recall_withdrawn_when_order_arrives.toml"
    result = run_case(load_case(path, shipped.site.timezone), shipped)
    assert result.passed, result.problems
    (withdrawn,) = result.tasks
    assert withdrawn.status == "cancelled"
    assert withdrawn.resource["statusReason"] == {
        "text": "matched to the patient when its order arrived"
    }


def test_a_merge_re_decides_the_task_raised_before_it_and_raises_it_once(
    tmp_path: Path,
) -> None:
    """The no-duplicate case proves de-duplication, not silence: after the merge the
    pending-imaging rule matches again over the combined history, with the same identifier
    as the Task raised under the prior identity, and that Task has moved to the survivor."""
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "settings.toml").write_text(SETTINGS)
    for name in ("directory.toml", "terminology.toml", R13, "imaging-pending-at-discharge"):
        (folder / name).symlink_to(RULES / name)
    catalogue = load_catalogue(folder)
    case = load_case(
        RULES / R13 / "cases" / "recall_r1_task_not_duplicated_by_merge.toml",
        catalogue.site.timezone,
    )
    processor = Processor(catalogue, task_resource, task_restatus)
    clock = SimulatedClock()
    store = open_store("sqlite://", clock=clock)
    raised = []
    try:
        with store.begin() as uow:
            for event in sorted(case.events, key=lambda e: e.occurred_at):
                now = clock.advance(event.occurred_at)
                raised += processor.fire_due(uow, now)
                applied = processor.apply(uow, [event], now)
                raised += applied.tasks
            (survivor,) = applied.patients
            (before,) = raised
            after = processor.decide(
                working_memory(uow.facts(survivor), clock.now(), catalogue.site.timezone)
            )
            moved = uow.get_task(before.identifier)
    finally:
        store.close()
    assert before.rule_id == "imaging-pending-at-discharge"
    assert before.patient_key != survivor  # raised under the prior identity
    assert [d.identifier for d in after] == [before.identifier]
    assert moved is not None and moved.patient_key == survivor
    # The moved Task names the surviving patient; the identifier it named before stays with
    # it (clinical-rules R13 step 1), and so does its contained order.
    assert moved.resource["for"] != before.resource["for"]
    assert moved.resource["contained"][0]["subject"] == moved.resource["for"]
    kept = {i["type"]["text"]: i["valueString"] for i in moved.resource["input"]}
    old_id = before.resource["for"]["identifier"]
    assert kept["Patient identifier before the merge"] == f"{old_id['system']}|{old_id['value']}"

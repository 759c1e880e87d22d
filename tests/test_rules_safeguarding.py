"""The safeguarding rules (R8 safeguarding-flag-with-imaging, R10 bruise-in-non-mobile-infant):
the engine against their plain-Python statement (tests/oracle_safeguarding.py) on hand-built
and random working memories, the Task text, and what the cases show when one event is taken
away.

The catalogue here holds only these two rules and the site files, so the check does not
depend on the rest of the catalogue (tests/test_rules_differential.py covers it all).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.cases import load_case, run_case
from adapters.fhir.task import task_resource, task_restatus
from engine.catalogue import Catalogue, load_catalogue
from engine.events import SafeguardingFlagCleared, SafeguardingFlagRaised
from engine.facts import NEVER
from engine.processor import Processor
from engine.tasks import RecallTask, TaskChange, task_identifier
from tests.oracle_safeguarding import R8, R10, expected

RULES = Path(__file__).resolve().parents[1] / "rules"
OWN = (R8, R10)
HOUR = 3600
T0 = 1_772_442_000  # 2026-03-02 09:00 UTC
DAY = 86_400


def _catalogue(folder: Path) -> Catalogue:
    for name in ("settings.toml", "directory.toml", "terminology.toml", *OWN):
        (folder / name).symlink_to(RULES / name)
    return load_catalogue(folder)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Catalogue:
    return _catalogue(tmp_path_factory.mktemp("rules"))


@pytest.fixture(scope="module")
def processor(catalogue: Catalogue) -> Processor:
    return Processor(catalogue, task_resource, task_restatus)


# --- hand-built working memories ------------------------------------------------------------


def _aged(data: dict[str, Any], age_days: int) -> dict[str, Any]:
    months = -1 if age_days < 0 else age_days * 12 // 365
    return {**data, "age_days": age_days, "age_months": months}


def patient(sex: str = "M") -> tuple[str, dict[str, Any]]:
    return "patient", {"kind": "patient", "sex": sex, "unmatched": 0, "id_value": "RX1"}


def encounter(enc: str = "V1", attending: str = "C1001") -> tuple[str, dict[str, Any]]:
    return f"encounter:{enc}", {
        "kind": "encounter",
        "enc": enc,
        "class": "E",
        "location": "PAEDED",
        "attending_id": attending,
        "attending_name": f"Dr {attending}",
        "attending_auth": "GMC",
    }


def discharge(
    at: int, age: int, enc: str = "V1", home: bool = True, cancelled: bool = False
) -> tuple[str, dict[str, Any]]:
    return f"discharge:{enc}", _aged(
        {
            "kind": "discharge",
            "enc": enc,
            "at": at,
            "leaves_care": int(home),
            "cancelled": int(cancelled),
            "class": "E",
            "location": "PAEDED",
            "attending_id": "C1001",
            "attending_name": "Dr C1001",
        },
        age,
    )


def admission(at: int, enc: str = "W1") -> tuple[str, dict[str, Any]]:
    return f"admission:{enc}", {"kind": "admission", "enc": enc, "at": at, "cancelled": 0}


def order(okey: str, at: int, age: int, enc: str = "V1") -> tuple[str, dict[str, Any]]:
    return f"order:{okey}", _aged(
        {
            "kind": "order",
            "okey": okey,
            "enc": enc,
            "name": "XR skeletal survey",
            "imaging": 1,
            "skeletal": 1,
            "ordered_at": at,
            "performed_at": NEVER,
            "cancelled_at": NEVER,
            "orderer_id": "C2002",
        },
        age,
    )


def report(okey: str, n: int, at: int, age: int, status: str = "F") -> tuple[str, dict[str, Any]]:
    return f"report:{okey}:{n}", _aged(
        {
            "kind": "report",
            "okey": okey,
            "status": status,
            "final": int(status in "FC"),
            "at": at,
            "flags": "",
            "abnormal": 0,
            "alert": 0,
            "findings": "",
            "wrong_patient": 0,
        },
        age,
    )


def flag(name: str, at: int, age: int, cleared_at: int = NEVER) -> tuple[str, dict[str, Any]]:
    return f"flag:{name}", _aged(
        {
            "kind": "flag",
            "flag": name,
            "category": "child protection plan",
            "at": at,
            "active": int(cleared_at == NEVER),
            "cleared_at": cleared_at,
        },
        age,
    )


def finding(
    note: str,
    at: int,
    age: int,
    words: str = "mark",
    region: str = "",
    patterned: int = 0,
    enc: str = "V1",
) -> tuple[str, dict[str, Any]]:
    return f"finding:{note}:bruise", _aged(
        {
            "kind": "finding",
            "concept": "bruise",
            "words": words,
            "region": region,
            "patterned": patterned,
            "at": at,
            "source": "triage note",
            "enc": enc,
            "note": note,
        },
        age,
    )


def memory(*facts: tuple[str, dict[str, Any]], now: int) -> list[tuple[str, dict[str, Any]]]:
    return [*facts, ("now", {"kind": "now", "t": now})]


def decisions(decided: Sequence[RecallTask | TaskChange]) -> dict[str, str]:
    return {
        d.identifier: (f"change:{d.status}" if isinstance(d, TaskChange) else d.priority)
        for d in decided
    }


def tasks(decided: Sequence[RecallTask | TaskChange]) -> list[RecallTask]:
    return [d for d in decided if isinstance(d, RecallTask)]


INFANT = 50  # days old


def _pairs(rule: str, key: str, trigger: str) -> set[str]:
    return {task_identifier(rule, key, trigger), task_identifier(rule, key, trigger + ":lead")}


HAND_BUILT = {
    "R8 (a): flagged infant home with the survey pending": (
        memory(
            patient(),
            encounter(),
            flag("F1", T0, INFANT),
            order("O1", T0 + 600, INFANT),
            discharge(T0 + HOUR, INFANT),
            now=T0 + 2 * HOUR,
        ),
        _pairs(R8, "O1", f"discharge:V1:{T0 + HOUR}"),
    ),
    "R8 (a) not before the settle time has passed": (
        memory(
            patient(),
            flag("F1", T0, INFANT),
            order("O1", T0 + 600, INFANT),
            discharge(T0 + HOUR, INFANT),
            now=T0 + HOUR + 60,
        ),
        set(),
    ),
    "R8 (a) not when admitted within the settle time": (
        memory(
            patient(),
            flag("F1", T0, INFANT),
            order("O1", T0 + 600, INFANT),
            discharge(T0 + HOUR, INFANT),
            admission(T0 + HOUR + 300),
            now=T0 + 3 * HOUR,
        ),
        set(),
    ),
    "R8 (a) not when the flag was cleared before the discharge": (
        memory(
            patient(),
            flag("F1", T0, INFANT, cleared_at=T0 + 1800),
            order("O1", T0 + 600, INFANT),
            discharge(T0 + HOUR, INFANT),
            now=T0 + 2 * HOUR,
        ),
        set(),
    ),
    "R8 (b): final report while the flag is active": (
        memory(
            patient(),
            encounter(),
            flag("F1", T0, INFANT),
            order("O1", T0 + 600, INFANT),
            report("O1", 0, T0 + 5 * HOUR, INFANT),
            now=T0 + 6 * HOUR,
        ),
        _pairs(R8, "O1", f"report:{T0 + 5 * HOUR}"),
    ),
    "R8 (b) not after the flag was cleared; a preliminary is not a report": (
        memory(
            patient(),
            flag("F1", T0, INFANT, cleared_at=T0 + 4 * HOUR),
            order("O1", T0 + 600, INFANT),
            report("O1", 0, T0 + 2 * HOUR, INFANT, status="P"),
            report("O1", 1, T0 + 5 * HOUR, INFANT),
            now=T0 + 6 * HOUR,
        ),
        set(),
    ),
    "R8 (b) an adult is outside the cohort": (
        memory(
            patient(),
            flag("F1", T0, 30 * 365),
            order("O1", T0 + 600, 30 * 365),
            report("O1", 0, T0 + 5 * HOUR, 30 * 365),
            now=T0 + 6 * HOUR,
        ),
        set(),
    ),
    "R10: a mark in an infant, no flag, review time over": (
        memory(patient(), encounter(), finding("N1", T0, INFANT), now=T0 + 4 * HOUR),
        _pairs(R10, "finding:N1:bruise", "finding"),
    ),
    "R10 not a second before the review time ends": (
        memory(patient(), encounter(), finding("N1", T0, INFANT), now=T0 + 4 * HOUR - 1),
        set(),
    ),
    "R10 not when a flag is recorded 3 hours before the note": (
        memory(
            patient(),
            finding("N1", T0, INFANT),
            flag("F1", T0 - 3 * HOUR, INFANT),
            now=T0 + 5 * HOUR,
        ),
        set(),
    ),
    "R10 flags 5 hours before or after the note do not count": (
        memory(
            patient(),
            finding("N1", T0, INFANT),
            flag("F1", T0 - 5 * HOUR, INFANT),
            flag("F2", T0 + 5 * HOUR, INFANT),
            now=T0 + 6 * HOUR,
        ),
        _pairs(R10, "finding:N1:bruise", "finding"),
    ),
    "R10: stat at once when the child goes home before the review time": (
        memory(
            patient(),
            encounter(),
            finding("N1", T0, INFANT),
            discharge(T0 + HOUR, INFANT),
            now=T0 + HOUR + 900,
        ),
        _pairs(R10, "finding:N1:bruise", "finding"),
    ),
    "R10 a toddler's bruise counts on a TEN-4-FACESp region, not on a shin": (
        memory(
            patient(),
            finding("N1", T0, 700, region="cheek"),
            finding("N2", T0, 700, words="bruise"),
            now=T0 + 5 * HOUR,
        ),
        _pairs(R10, "finding:N1:bruise", "finding"),
    ),
    "R10 patterned under 4 years, not at 5": (
        memory(
            patient(),
            finding("N1", T0, 1000, words="grip marks", patterned=1),
            finding("N2", T0, 5 * 365, words="grip marks", patterned=1),
            now=T0 + 5 * HOUR,
        ),
        _pairs(R10, "finding:N1:bruise", "finding"),
    ),
    "R10 unknown age counts": (
        memory(patient(), finding("N1", T0, -1), now=T0 + 5 * HOUR),
        _pairs(R10, "finding:N1:bruise", "finding"),
    ),
    "R10 a later note of the same visit is covered by the first": (
        memory(
            patient(),
            encounter(),
            finding("N1", T0, INFANT),
            finding("N2", T0 + 1800, INFANT, words="discolouration"),
            finding("N3", T0 + 5 * HOUR, INFANT, words="bruise"),
            finding("N4", T0 + 1800, INFANT, enc="V2"),
            now=T0 + 10 * HOUR,
        ),
        _pairs(R10, "finding:N1:bruise", "finding")
        | _pairs(R10, "finding:N3:bruise", "finding")
        | _pairs(R10, "finding:N4:bruise", "finding"),
    ),
}


@pytest.mark.parametrize("name", list(HAND_BUILT))
def test_engine_and_plain_statement_agree_on_hand_built_memories(
    name: str, processor: Processor, catalogue: Catalogue
) -> None:
    mem, raised = HAND_BUILT[name]
    got = decisions(processor.decide(mem))
    assert got == expected(mem, catalogue)
    assert set(got) == raised


def test_sent_home_is_stat_and_wins_over_the_timed_task(processor: Processor) -> None:
    mem = memory(
        patient(),
        encounter(),
        finding("N1", T0, INFANT),
        discharge(T0 + 3 * HOUR, INFANT),
        now=T0 + 5 * HOUR,
    )
    assert set(decisions(processor.decide(mem)).values()) == {"stat"}


# --- random working memories ----------------------------------------------------------------

_t = st.integers(0, 16).map(lambda k: T0 + k * 1800)  # a half-hour grid: edges coincide
_age = st.sampled_from([-1, 20, 120, 160, 400, 1400, 1500, 7000])


@st.composite
def _memories(draw: st.DrawFn) -> list[tuple[str, dict[str, Any]]]:
    age = draw(_age)
    facts: list[tuple[str, dict[str, Any]]] = [patient(), encounter("V1"), encounter("V2")]
    for i in range(draw(st.integers(0, 2))):
        raised = draw(_t)
        cleared = draw(st.one_of(st.just(NEVER), _t.filter(lambda t, r=raised: t > r)))
        facts.append(flag(f"F{i}", raised, age, cleared))
    for i in range(draw(st.integers(0, 3))):
        facts.append(
            finding(
                f"N{i}",
                draw(_t),
                age,
                region=draw(st.sampled_from(["", "", "cheek"])),
                patterned=draw(st.sampled_from([0, 0, 1])),
                enc=draw(st.sampled_from(["V1", "V2", ""])),
            )
        )
    for enc in ("V1", "V2"):
        if draw(st.booleans()):
            facts.append(
                discharge(
                    draw(_t),
                    age,
                    enc=enc,
                    home=draw(st.sampled_from([True, True, False])),
                    cancelled=draw(st.sampled_from([False, False, True])),
                )
            )
    if draw(st.booleans()):
        facts.append(admission(draw(_t)))
    for i in range(draw(st.integers(0, 2))):
        okey = f"O{i}"
        _, o = order(okey, draw(_t), age, enc=draw(st.sampled_from(["V1", "V2"])))
        o["cancelled_at"] = draw(st.one_of(st.just(NEVER), _t))
        o["imaging"] = draw(st.sampled_from([1, 1, 0]))
        facts.append((f"order:{okey}", o))
        for n in range(draw(st.integers(0, 2))):
            facts.append(report(okey, n, draw(_t), age, draw(st.sampled_from("PFCW"))))
    return memory(*facts, now=draw(_t) + draw(st.sampled_from([0, 0, DAY])))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mem=_memories())
def test_engine_and_plain_statement_agree_on_random_memories(
    mem: list[tuple[str, dict[str, Any]]], processor: Processor, catalogue: Catalogue
) -> None:
    assert decisions(processor.decide(mem)) == expected(mem, catalogue)


# --- the Tasks themselves ---------------------------------------------------------------------


def _by_owner(decided: Sequence[RecallTask | TaskChange]) -> dict[str, RecallTask]:
    return {t.owner.id: t for t in tasks(decided)}


def test_r10_shows_the_words_as_written_next_to_the_concept(processor: Processor) -> None:
    mem = memory(
        patient("F"),
        encounter(),
        finding("N1", T0, INFANT, words="grip marks", region="torso", patterned=1),
        now=T0 + 4 * HOUR,
    )
    owners = _by_owner(processor.decide(mem))
    assert set(owners) == {"C9001", "SAFEGUARDING-TEAM"}  # C1001's consultant in charge
    consultant, lead = owners["C9001"], owners["SAFEGUARDING-TEAM"]
    text = consultant.description
    assert text.startswith('Possible bruising in a 7-week-old girl: recorded as "grip marks"')
    assert "(suspected bruise, patterned)" in text
    assert "No safeguarding referral (flag) has been recorded in the 4 hours since." in text
    assert "NICE CG89: suspect maltreatment" in text and "RCR guidance" in text
    inputs = dict(consultant.inputs)
    assert inputs["Words recorded"] == "grip marks"
    assert inputs["Concept"].startswith("bruise")
    assert inputs["Terminology map version"]
    assert lead.part_of == consultant.identifier and consultant.part_of is None
    assert lead.safeguarding and consultant.safeguarding and not consultant.discharge_dependent
    assert lead.description.startswith("For the safeguarding team: possible bruising")
    assert consultant.deadline.timestamp() == T0 + 8 * HOUR


def test_r10_sent_home_says_so_and_its_deadline_is_30_minutes(processor: Processor) -> None:
    mem = memory(
        patient(),
        encounter(),
        finding("N1", T0, INFANT, words="?bruise"),
        discharge(T0 + HOUR, INFANT),
        now=T0 + 2 * HOUR,
    )
    consultant = _by_owner(processor.decide(mem))["C9001"]
    assert consultant.priority == "stat"
    assert 'recorded as "?bruise"' in consultant.description
    assert "went home from the paediatric emergency department at" in consultant.description
    assert consultant.authored_on.timestamp() == T0 + HOUR + 15 * 60
    assert consultant.deadline.timestamp() == T0 + HOUR + 45 * 60


def test_r8_raises_one_task_for_the_clinician_and_one_for_the_safeguarding_team(
    processor: Processor,
) -> None:
    mem = memory(
        patient(),
        encounter(),
        flag("F1", T0, INFANT),
        order("O1", T0 + 600, INFANT),
        discharge(T0 + HOUR, INFANT),
        now=T0 + 2 * HOUR,
    )
    owners = _by_owner(processor.decide(mem))
    assert set(owners) == {"C1001", "SAFEGUARDING-TEAM"}
    clinician, lead = owners["C1001"], owners["SAFEGUARDING-TEAM"]
    assert lead.part_of == clinician.identifier
    assert clinician.priority == lead.priority == "urgent"
    assert clinician.safeguarding and not clinician.discharge_dependent
    assert clinician.description.startswith("7-week-old boy with an active safeguarding flag")
    assert "XR skeletal survey had not been reported" in clinician.description
    assert dict(clinician.inputs)["Safeguarding flag"] == "child protection plan"
    assert clinician.deadline.timestamp() == T0 + HOUR + 15 * 60 + 4 * HOUR


def test_wake_times_are_the_end_of_each_review_time_and_settle_time(catalogue: Catalogue) -> None:
    mem = memory(finding("N1", T0, INFANT), discharge(T0 + HOUR, INFANT), now=T0)
    rule = catalogue.rule(R10)
    woken = {int(t.timestamp()) for t in rule.module.wake_times(mem, rule.params, catalogue.site)}
    assert woken == {T0 + 4 * HOUR, T0 + HOUR + 15 * 60}


# --- the cases, one event taken away --------------------------------------------------------


def _case_without(catalogue: Catalogue, rule: str, name: str, drop: type) -> tuple[int, int]:
    """(Tasks the case raises, Tasks it raises without its events of type `drop`)."""
    case = load_case(catalogue.path / rule / "cases" / name, catalogue.site.timezone)
    result = run_case(case, catalogue)
    assert result.passed, "; ".join(result.problems)
    events = tuple(e for e in case.events if not isinstance(e, drop))
    return len(result.tasks), len(run_case(replace(case, events=events), catalogue).tasks)


def test_the_flag_cleared_case_recalls_without_the_clearing(catalogue: Catalogue) -> None:
    raised, without = _case_without(
        catalogue, R8, "no_recall_flag_cleared_before_report.toml", SafeguardingFlagCleared
    )
    assert (raised, without) == (0, 2)  # the clinician's Task and the safeguarding team's


def test_the_flag_within_review_case_recalls_without_the_flag(catalogue: Catalogue) -> None:
    raised, without = _case_without(
        catalogue, R10, "no_recall_flag_recorded_within_review.toml", SafeguardingFlagRaised
    )
    assert (raised, without) == (0, 2)


@pytest.mark.parametrize("rule", OWN)
def test_own_cases_pass(rule: str, catalogue: Catalogue) -> None:
    paths = sorted((catalogue.path / rule / "cases").glob("*.toml"))
    assert len([p for p in paths if p.name.startswith("recall")]) >= 2
    assert len([p for p in paths if p.name.startswith("no_recall")]) >= 2
    for path in paths:
        result = run_case(load_case(path, catalogue.site.timezone), catalogue)
        assert result.passed, f"{path.name}: " + "; ".join(result.problems)


def test_parameters_are_documented(catalogue: Catalogue) -> None:
    for rule_id in OWN:
        rule = catalogue.rule(rule_id)
        readme = (rule.path / "README.md").read_text()
        for name, parameter in rule.parameters.items():
            assert f"`{name}`" in readme
            assert str(parameter.default) in readme, f"{rule_id}: default of {name}"


# --- the engine hazard these rules avoid ----------------------------------------------------


def _nested_and(node: Any, inside: bool = False) -> bool:
    if isinstance(node, dict):
        return any(
            (key == "$and" and inside) or _nested_and(value, inside or key == "$and")
            for key, value in node.items()
        )
    if isinstance(node, list):
        return any(_nested_and(item, inside) for item in node)
    return False


def test_no_condition_of_these_rules_nests_a_conjunction(catalogue: Catalogue) -> None:
    for rule_id in OWN:
        rule = catalogue.rule(rule_id)
        for variant, definition in rule.module.conditions(rule.params, catalogue.site).items():
            assert not _nested_and(definition), f"{rule_id}/{variant}"

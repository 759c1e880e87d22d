"""Rules over Tasks: escalation (task-not-accepted, R11) and withdrawal on a cancelled
discharge (discharge-cancelled, R12).

The oracle (tests/oracle_tasks.py) is checked against the engine's decisions on hand-built
and random working memories; the full engine runs cases that need a site setting the
default catalogue does not have (a stat or a safeguarding Task).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from adapters.cases import Expectation, load_case, run_case
from adapters.fhir.task import task_resource, task_restatus
from engine.catalogue import Catalogue, Rule, load_catalogue
from engine.errors import ConfigurationError
from engine.facts import epoch, working_memory
from engine.ports import Fact
from engine.processor import Processor
from engine.tasks import RecallTask, TaskChange, task_identifier
from tests.oracle_tasks import R11, R12, expected

RULES = Path(__file__).resolve().parents[1] / "rules"
R1 = "imaging-pending-at-discharge"
R2 = "report-final-after-discharge"
MINE = (R11, R12)
HOUR = 3600
# The Derby-like timeline: discharge 14:00 BST, R1 Task raised 14:15, due 24 hours later.
DISCHARGE = epoch(datetime(2008, 5, 1, 13, 0, tzinfo=UTC))
RAISED = DISCHARGE + 15 * 60
DEADLINE = RAISED + 24 * HOUR


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    """The bundled catalogue with these rules active: R11 ships in shadow until Tasks can be
    accepted, and these tests are about what it does when switched on."""
    shipped = load_catalogue(RULES)
    return replace(
        shipped,
        rules=tuple(
            replace(r, status="active") if r.id in (R11, R12) else r for r in shipped.rules
        ),
    )


@pytest.fixture(scope="module")
def processor(catalogue: Catalogue) -> Processor:
    return Processor(catalogue, task_resource, task_restatus)


def original(ident: str = "T1", **changes: Any) -> dict[str, Any]:
    """A Task fact as the processor writes it for R1's Task (engine.processor.task_fact)."""
    fact: dict[str, Any] = {
        "kind": "task",
        "id": ident,
        "rule": R1,
        "okey": "PLAC|RIS|ORD-1",
        "priority": "urgent",
        "critical": 0,
        "status": "requested",
        "open": 1,
        "closed": 0,
        "acknowledged": 0,
        "owner": "C1001",
        "raised_at": RAISED,
        "deadline_at": DEADLINE,
        "enc": "V1",
        "discharge_enc": "V1",
        "discharge_at": DISCHARGE,
        "dependent": 1,
        "safeguarding": 0,
        "escalates": 1,
        "shadow": 0,
        "level": 0,
        "parent": "",
    }
    fact.update(changes)
    if "priority" in changes:
        fact["critical"] = int(changes["priority"] == "stat")
    return fact


def escalation(parent: Mapping[str, Any], level: int, **changes: Any) -> dict[str, Any]:
    """The Task fact of an escalation Task of `parent`."""
    ident = task_identifier(R11, str(parent["okey"]), f"escalation:{parent['id']}:L{level}")
    return original(
        ident,
        rule=R11,
        okey=parent["okey"],
        priority=parent["priority"],
        owner="C9001" if level == 1 else "C9100",
        raised_at=int(parent["deadline_at"]),
        deadline_at=int(parent["deadline_at"]) + 4 * HOUR,
        discharge_enc="",
        discharge_at=0,
        dependent=0,
        escalates=0,
        level=level,
        parent=parent["id"],
        **changes,
    )


def memory(
    tasks: Sequence[Mapping[str, Any]],
    now: int,
    *,
    cancelled: bool = False,
    birth_at: int = 1205366400,  # 13 March 2008
) -> list[tuple[str, dict[str, Any]]]:
    """A 7-week-old boy's working memory at `now`: visit V1, its order and discharge, and the
    Task facts given."""
    facts = [
        Fact("patient", "patient", {"kind": "patient", "sex": "M", "birth_at": birth_at}),
        Fact(
            "discharge:V1",
            "discharge",
            {
                "kind": "discharge",
                "enc": "V1",
                "at": DISCHARGE,
                "leaves_care": 1,
                "cancelled": int(cancelled),
                "location": "PAEDED",
                "class": "E",
            },
        ),
        *(Fact(f"task:{t['id']}", "task", dict(t)) for t in tasks),
    ]
    return working_memory(facts, datetime.fromtimestamp(now, UTC), UTC)


def decided(processor: Processor, mem: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, str]:
    """The engine's decisions of R11 and R12, in the oracle's form."""
    out = {}
    for d in processor.decide(mem):
        if d.rule_id in MINE:
            out[d.identifier] = f"change:{d.status}" if isinstance(d, TaskChange) else d.priority
    return out


def escalations(
    processor: Processor, mem: Sequence[tuple[str, Mapping[str, Any]]]
) -> list[RecallTask]:
    return sorted(
        (d for d in processor.decide(mem) if isinstance(d, RecallTask) and d.rule_id == R11),
        key=lambda t: t.level,
    )


T1 = original()
SAFEGUARDING = original(safeguarding=1)
STAT = original(priority="stat", deadline_at=RAISED + 30 * 60)
L1 = escalation(T1, 1)

HAND_BUILT = {
    "not yet due": ([T1], DEADLINE - 1, False, 0),
    "at the deadline: L1": ([T1], DEADLINE, False, 1),
    "4 hours late (urgent): L1, L2": ([T1], DEADLINE + 4 * HOUR, False, 2),
    "a week late, not safeguarding: stops at L2": ([T1], DEADLINE + 168 * HOUR, False, 2),
    "safeguarding, 12 hours late: L1, L2, L3": ([SAFEGUARDING], DEADLINE + 12 * HOUR, False, 3),
    "stat, 30 minutes late: L1, L2": ([STAT], STAT["deadline_at"] + 30 * 60, False, 2),
    "accepted": ([original(status="accepted", open=0)], DEADLINE + 99 * HOUR, False, 0),
    "rejected: closed, not escalated": (
        [original(status="rejected", open=0, closed=1)],
        DEADLINE + HOUR,
        False,
        0,
    ),
    "shadow Task": ([original(shadow=1, escalates=0)], DEADLINE + 99 * HOUR, False, 0),
    "rule does not escalate": ([original(escalates=0)], DEADLINE + 99 * HOUR, False, 0),
    "owner is consultant in charge: L1 on-call, no L2": (
        [original(owner="C9001")],
        DEADLINE + 99 * HOUR,
        False,
        1,
    ),
    "owned by the pool": (
        [original(owner="SAFETYNET-RESULTS-POOL")],
        DEADLINE + 4 * HOUR,
        False,
        2,
    ),
    "owner not in the directory": ([original(owner="C7777")], DEADLINE, False, 1),
    "original accepted, L1 open: L1 withdrawn": (
        [original(status="accepted", open=0), L1],
        DEADLINE + HOUR,
        False,
        0,
    ),
    "original rejected, L1 open: L1 stays": (
        [original(status="rejected", open=0, closed=1), L1],
        DEADLINE + HOUR,
        False,
        0,
    ),
    "L1 accepted: original acknowledged, no L2": (
        [original(open=0, acknowledged=1), escalation(T1, 1, status="accepted", open=0)],
        DEADLINE + 9 * HOUR,
        False,
        0,
    ),
    "L1 accepted, L2 open: L2 withdrawn": (
        [
            original(open=0, acknowledged=1),
            escalation(T1, 1, status="accepted", open=0),
            escalation(T1, 2),
        ],
        DEADLINE + 9 * HOUR,
        False,
        0,
    ),
    "discharge cancelled: R1 Task withdrawn": ([T1], RAISED + 60, True, 0),
    "discharge cancelled after escalation: Task withdrawn, L1 still raised this pass": (
        [T1, L1],
        DEADLINE + HOUR,
        True,
        1,
    ),
    "discharge cancelled, Task withdrawn: L1 withdrawn": (
        [original(status="cancelled", open=0, closed=1), L1],
        DEADLINE + HOUR,
        True,
        0,
    ),
    "discharge cancelled, stat Task stays": ([STAT], RAISED + 60, True, 0),
    "discharge cancelled, safeguarding Task stays": ([SAFEGUARDING], RAISED + 60, True, 0),
    "discharge cancelled, accepted Task stays": (
        [original(status="accepted", open=0)],
        RAISED + 60,
        True,
        0,
    ),
    "discharge cancelled, Task of another discharge stays": (
        [original(discharge_at=DISCHARGE - 86400)],
        RAISED + 60,
        True,
        0,
    ),
    "discharge cancelled, Task not discharge-dependent stays": (
        [original(dependent=0)],
        RAISED + 60,
        True,
        0,
    ),
}


@pytest.mark.parametrize(
    ("tasks", "now", "cancelled", "levels"), HAND_BUILT.values(), ids=HAND_BUILT
)
def test_oracle_agrees_with_the_engine_on_hand_built_memories(
    processor: Processor,
    catalogue: Catalogue,
    tasks: list[dict[str, Any]],
    now: int,
    cancelled: bool,
    levels: int,
) -> None:
    mem = memory(tasks, now, cancelled=cancelled)
    assert decided(processor, mem) == expected(mem, catalogue)
    assert len(escalations(processor, mem)) == levels


def test_expected_decisions_of_the_hand_built_memories(
    processor: Processor, catalogue: Catalogue
) -> None:
    """Spot checks that the oracle (and so the engine) says what the READMEs say."""

    def decisions(name: str) -> dict[str, str]:
        tasks, now, cancelled, _ = HAND_BUILT[name]
        return expected(memory(tasks, now, cancelled=cancelled), catalogue)

    assert decisions("discharge cancelled: R1 Task withdrawn") == {"T1": "change:cancelled"}
    assert decisions("original accepted, L1 open: L1 withdrawn") == {L1["id"]: "change:cancelled"}
    assert decisions("original rejected, L1 open: L1 stays") == {}
    assert decisions("discharge cancelled, stat Task stays") == {}
    assert decisions("discharge cancelled, safeguarding Task stays") == {}
    assert decisions("discharge cancelled, accepted Task stays") == {}


def test_escalation_tasks_owners_times_and_links(processor: Processor) -> None:
    tasks = escalations(processor, memory([SAFEGUARDING], DEADLINE + 12 * HOUR))
    assert [(t.level, t.owner.id) for t in tasks] == [(1, "C9001"), (2, "C9100"), (3, "C9300")]
    for task, hours in zip(tasks, (0, 4, 12), strict=True):
        assert task.part_of == "T1"
        assert task.priority == "urgent"
        assert task.subject_key == "PLAC|RIS|ORD-1"
        assert task.identifier == task_identifier(
            R11, "PLAC|RIS|ORD-1", f"escalation:T1:L{task.level}"
        )
        assert epoch(task.authored_on) == DEADLINE + hours * HOUR
        assert not task.escalates  # an escalation Task is not escalated itself
    # Each step is due when the next falls due; the last one after the urgent window (4 h).
    assert [epoch(t.deadline) for t in tasks] == [
        DEADLINE + 4 * HOUR,
        DEADLINE + 12 * HOUR,
        DEADLINE + 16 * HOUR,
    ]
    # Not safeguarding: L2 is the last step.
    plain = escalations(processor, memory([T1], DEADLINE + 4 * HOUR))
    assert epoch(plain[-1].deadline) == DEADLINE + 8 * HOUR


def test_escalation_text_is_plain_english(processor: Processor) -> None:
    first, second = escalations(processor, memory([T1], DEADLINE + 4 * HOUR))
    assert first.description == (
        'Dr C1001 has not accepted the safety-net Task "Imaging pending at discharge" about a '
        "7-week-old boy discharged from the paediatric emergency department at 14:00 on 1 May "
        "2008. It was raised at 14:15 on 1 May 2008 and was due by 14:15 on 2 May 2008. As "
        "consultant in charge of the owner's team, make sure it is taken on by 18:15 on 2 May "
        "2008: accepting this Task takes responsibility for it and stops the escalation."
    )
    assert first.reason == "Not accepted by Dr C1001 within 24 hours of 14:15 on 1 May 2008"
    assert "It was escalated to Dr C9001 (ED consultant in charge)" in second.description
    assert "As on-call lead" in second.description
    assert second.reason == (
        "Not accepted by Dr C1001 or Dr C9001 (ED consultant in charge) within 28 hours of "
        "14:15 on 1 May 2008"
    )
    for task in (first, second):
        assert R1 not in task.description and "PLAC" not in task.description


def test_escalation_text_for_an_older_child_and_an_unknown_age(processor: Processor) -> None:
    older = escalations(processor, memory([T1], DEADLINE, birth_at=RAISED - 550 * 86400))
    assert "about an 18-month-old boy discharged" in older[0].description
    unknown = memory([T1], DEADLINE)
    unknown[0] = ("patient", {"kind": "patient", "sex": "M"})
    assert (
        "about a patient of unknown age discharged"
        in escalations(processor, unknown)[0].description
    )


def test_withdrawal_reasons_say_why(processor: Processor) -> None:
    changes = [
        d
        for d in processor.decide(memory([T1], RAISED + 60, cancelled=True))
        if isinstance(d, TaskChange)
    ]
    assert [(c.identifier, c.rule_id, c.status, c.reason) for c in changes] == [
        (
            "T1",
            R12,
            "cancelled",
            "The discharge from the paediatric emergency department at 14:00 on 1 May 2008 "
            "was cancelled (A13); this Task depended on it.",
        )
    ]
    tasks, now, _, _ = HAND_BUILT["L1 accepted, L2 open: L2 withdrawn"]
    (change,) = [d for d in processor.decide(memory(tasks, now)) if isinstance(d, TaskChange)]
    assert change.reason == (
        "No longer needed: another escalation of the same Task has been accepted."
    )


def test_wake_times_are_every_step_of_every_open_escalating_task(catalogue: Catalogue) -> None:
    rule = catalogue.rule(R11)
    mem = memory(
        [T1, SAFEGUARDING | {"id": "T2"}, original("T3", status="accepted", open=0)], RAISED
    )
    times = sorted(epoch(t) for t in rule.module.wake_times(mem, rule.params, catalogue.site))
    t1 = [DEADLINE, DEADLINE + 4 * HOUR]  # L1, L2
    t2 = [DEADLINE, DEADLINE + 4 * HOUR, DEADLINE + 12 * HOUR]  # safeguarding: L1 to L3
    assert times == sorted([*t1, *t2])
    r12 = catalogue.rule(R12)
    assert list(r12.module.wake_times(mem, r12.params, catalogue.site)) == []


def test_escalation_steps_out_of_order_are_refused(catalogue: Catalogue) -> None:
    rule = catalogue.rule(R11)
    params = {**rule.params, "urgent_l2_hours": 20, "urgent_l3_hours": 10}
    with pytest.raises(ConfigurationError, match="L1 <= L2 <= L3"):
        rule.module.conditions(params, catalogue.site)


# --- random memories ------------------------------------------------------------------------

OWNERS = ("C1001", "C2002", "C3003", "C9001", "C9100", "C9300", "SAFETYNET-RESULTS-POOL", "X1")
STATUSES = (
    "requested",
    "requested",
    "accepted",
    "in-progress",
    "completed",
    "rejected",
    "cancelled",
)


def random_memory(rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    tasks: list[dict[str, Any]] = []
    for n in range(rng.randint(1, 4)):
        status = rng.choice(STATUSES)
        acknowledged = int(status == "requested" and rng.random() < 0.2)
        priority = rng.choice(("routine", "urgent", "asap", "stat"))
        shadow = int(rng.random() < 0.1)
        parent = original(
            f"T{n}",
            okey=rng.choice(("PLAC|RIS|ORD-1", "PLAC|RIS|ORD-2", "finding:N1:bruise")),
            rule=rng.choice((R1, R2, "bruise-in-non-mobile-infant")),
            priority=priority,
            status=status,
            acknowledged=acknowledged,
            open=int(status == "requested" and not acknowledged),
            closed=int(status in ("completed", "rejected", "cancelled")),
            owner=rng.choice(OWNERS),
            deadline_at=RAISED + rng.choice((30 * 60, 4 * HOUR, 24 * HOUR, 72 * HOUR)),
            discharge_at=rng.choice((DISCHARGE, DISCHARGE - 86400, 0)),
            dependent=int(rng.random() < 0.7),
            safeguarding=int(rng.random() < 0.3),
            shadow=shadow,
            escalates=int(not shadow and rng.random() < 0.9),
        )
        tasks.append(parent)
        for level in range(1, rng.randint(1, 4)):
            e_status = rng.choice(STATUSES)
            tasks.append(
                escalation(
                    parent,
                    level,
                    status=e_status,
                    open=int(e_status == "requested"),
                    closed=int(e_status in ("completed", "rejected", "cancelled")),
                    shadow=int(rng.random() < 0.1),
                )
            )
    now = RAISED + rng.randint(0, 12 * 24) * 15 * 60
    return memory(tasks, now, cancelled=rng.random() < 0.5)


def test_oracle_agrees_with_the_engine_on_random_memories(
    processor: Processor, catalogue: Catalogue
) -> None:
    rng = random.Random(20080501)
    seen = {"raised": 0, "changed": 0}
    for _ in range(300):
        mem = random_memory(rng)
        got = decided(processor, mem)
        assert got == expected(mem, catalogue), mem
        seen["raised"] += sum(1 for v in got.values() if not v.startswith("change:"))
        seen["changed"] += sum(1 for v in got.values() if v.startswith("change:"))
    assert seen["raised"] > 100 and seen["changed"] > 50, seen  # the histories exercise both


def test_shadow_rules_change_no_live_task(processor: Processor, catalogue: Catalogue) -> None:
    shadowed = replace(
        catalogue,
        rules=tuple(replace(r, status="shadow") if r.id in MINE else r for r in catalogue.rules),
    )
    shadow_processor = Processor(shadowed, task_resource, task_restatus)
    mem = memory([T1, original("T2", shadow=1, escalates=0)], RAISED + 60, cancelled=True)
    assert decided(shadow_processor, mem) == expected(mem, shadowed) == {"T2": "change:cancelled"}
    # A shadow escalation rule still raises its Tasks, in shadow.
    (l1,) = escalations(shadow_processor, memory([T1], DEADLINE))
    assert l1.shadow


# --- full engine: cases the default catalogue cannot express ---------------------------------

CASE_HEAD = """
[patient]
birth = "2008-03-13"
sex = "M"
nhs_number = "9990000018"

[[events]]
at = "2008-05-01T11:30:00+01:00"
type = "registered"
visit = "V1"
location = "PAEDED"
attending = "C1001"

[[events]]
at = "2008-05-01T12:10:00+01:00"
type = "ordered"
visit = "V1"
order = "ORD-1"
procedure = "XR skeletal survey"

[[events]]
at = "2008-05-01T13:20:00+01:00"
type = "report"
order = "ORD-1"
status = "preliminary"

[[events]]
at = "2008-05-01T14:00:00+01:00"
type = "discharged"
visit = "V1"
location = "PAEDED"
attending = "C1001"
"""


def note(at: str) -> str:
    """A telephone note: an event after the Task is raised, so that the case runner fires
    the escalation timers that Task set (it fires due timers once per event)."""
    return (
        f'\n[[events]]\nat = "{at}"\ntype = "note"\n'
        'text = "Mother phoned asking for the X-ray result; told the report is awaited."\n'
    )


def final_report(at: str) -> str:
    """The final report, normal: the event after the Task is raised (as `note`), and it keeps
    final-report-overdue from raising a second Task (and its escalations) the next day."""
    return (
        f'\n[[events]]\nat = "{at}"\ntype = "report"\norder = "ORD-1"\nstatus = "final"\n'
        'flags = ["N"]\n'
    )


def _with_r1(catalogue: Catalogue, **changes: Any) -> Catalogue:
    """The catalogue with R1 as a site might set it: `priority` or a [tasks] flag."""

    values = {k: changes.pop(k) for k in ("priority", "ack_hours") if k in changes}

    def changed(rule: Rule) -> Rule:
        if rule.id != R1:
            return rule
        params = {
            name: replace(p, value=values[name]) if name in values else p
            for name, p in rule.parameters.items()
        }
        return replace(rule, parameters=params, **changes)

    return replace(catalogue, rules=tuple(changed(r) for r in catalogue.rules))


def _run(tmp_path: Path, catalogue: Catalogue, rule: str, body: str) -> None:
    folder = tmp_path / rule / "cases"
    folder.mkdir(parents=True)
    path = folder / "case.toml"
    path.write_text(body)
    result = run_case(load_case(path, catalogue.site.timezone), catalogue)
    assert result.passed, "; ".join(result.problems)


def _expect(rule: str, owner: str, status: str, priority: str = "urgent", part_of: str = "") -> str:
    extra = f'part_of = "{part_of}"\n' if part_of else ""
    return (
        f'\n[[expect]]\nrule = "{rule}"\norder = "ORD-1"\npriority = "{priority}"\n'
        f'owner = "{owner}"\nstatus = "{status}"\n{extra}'
    )


def test_safeguarding_task_escalates_to_the_named_doctor(
    tmp_path: Path, catalogue: Catalogue
) -> None:
    body = (
        'kind = "recall"\nuntil = "2008-05-03T03:00:00+01:00"\n'
        + CASE_HEAD
        + final_report("2008-05-01T18:00:00+01:00")
        + _expect(R1, "C1001", "requested")
        + _expect(R11, "C9001", "requested", part_of=R1)
        + _expect(R11, "C9100", "requested", part_of=R1)
        + _expect(R11, "C9300", "requested", part_of=R1)
    )
    _run(tmp_path, _with_r1(catalogue, safeguarding=True), R11, body)


def test_stat_task_escalates_within_the_hour(tmp_path: Path, catalogue: Catalogue) -> None:
    # R1 at stat with a 30-minute window: due 14:45, L1 14:45, L2 15:15 (not safeguarding).
    r1 = _with_r1(catalogue, priority="stat", ack_hours=0.5)
    body = (
        'kind = "recall"\nuntil = "2008-05-01T15:20:00+01:00"\n'
        + CASE_HEAD
        + note("2008-05-01T14:20:00+01:00")
        + _expect(R1, "C1001", "requested", "stat")
        + _expect(R11, "C9001", "requested", "stat", part_of=R1)
        + _expect(R11, "C9100", "requested", "stat", part_of=R1)
    )
    _run(tmp_path, r1, R11, body)


CANCELLED = (
    '\n[[events]]\nat = "2008-05-01T14:40:00+01:00"\ntype = "discharge-cancelled"\nvisit = "V1"\n'
)


@pytest.mark.parametrize(
    "changes",
    [{"priority": "stat"}, {"safeguarding": True}],
    ids=["critical (stat)", "safeguarding"],
)
def test_cancelled_discharge_never_withdraws_critical_or_safeguarding_tasks(
    tmp_path: Path, catalogue: Catalogue, changes: dict[str, Any]
) -> None:
    priority = changes.get("priority", "urgent")
    body = (
        'kind = "recall"\nuntil = "2008-05-01T14:50:00+01:00"\n'
        + CASE_HEAD
        + CANCELLED
        + _expect(R1, "C1001", "requested", priority)
    )
    _run(tmp_path, _with_r1(catalogue, **changes), R12, body)


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("no_recall_accepted_task_left_alone", "accepted"),
        ("no_recall_other_visit_cancelled", "requested"),
    ],
)
def test_no_recall_cases_leave_the_task_as_it_was(
    catalogue: Catalogue, case: str, status: str
) -> None:
    """R12's no-recall cases expect nothing of R12 itself; here the Task they are about is
    checked too: still there, with its status unchanged."""
    loaded = load_case(RULES / R12 / "cases" / f"{case}.toml", catalogue.site.timezone)
    keep = Expectation(R1, "ORD-1", "urgent", "C1001", None, status)
    result = run_case(replace(loaded, expect=(keep,)), catalogue)
    assert result.passed, "; ".join(result.problems)

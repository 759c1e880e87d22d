"""The rule core: durable_rules as a stateless evaluator (shared/reference/durable-rules.md §7).

Pins the engine hazards we work around (32-bit id collisions, the 1,024-session cap, `none()`
and `$or` mis-evaluation) and shows the adapter is immune to them, with every decision checked
against the plain-Python statement of the rules in tests/oracle.py.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine.rulecore as rulecore
from adapters.fhir.task import task_resource, task_restatus
from adapters.store import open_store
from engine.catalogue import load_catalogue
from engine.errors import RuleEvaluationError
from engine.events import (
    Clinician,
    ImagingOrdered,
    OrderRef,
    Patient,
    PatientAdmitted,
    PatientDischarged,
    PatientIdentifier,
    PatientRegistered,
    ReportIssued,
    SourceRef,
    Visit,
)
from engine.facts import NEVER, working_memory
from engine.ports import Fact, UnitOfWork
from engine.processor import Processor
from engine.rulecore import RuleCore, c, engine_hash, m, when_all
from engine.tasks import RecallTask, TaskChange
from tests.oracle import R1, R2, all_expected, expected_tasks

RULES = Path(__file__).resolve().parents[1] / "rules"
CATALOGUE = load_catalogue(RULES)
TZ = ZoneInfo("Europe/London")
T0 = datetime(2026, 2, 2, 8, 0, tzinfo=UTC)


def _patient(mrn: str, months: int = 2) -> Patient:
    return Patient(
        identifiers=(PatientIdentifier(mrn, "RX1", "MR"),),
        birth=T0 - timedelta(days=30 * months + 3),
        sex="F",
    )


class _Events:
    """Builds canonical events for one patient."""

    def __init__(self, mrn: str, months: int = 2) -> None:
        self.patient = _patient(mrn, months)
        self.mrn = mrn
        self.n = 0

    def _common(self, at: datetime, visit: str = "") -> dict[str, Any]:
        self.n += 1
        return dict(
            source=SourceRef("test", f"{self.mrn}-{self.n}", "test"),
            occurred_at=at,
            received_at=at,
            patient=self.patient,
            encounter=visit,
        )

    def registered(self, at: datetime, visit: str) -> PatientRegistered:
        return PatientRegistered(
            **self._common(at, visit),
            visit=Visit(patient_class="E", location="ED", attending=Clinician("C1", "Dr One")),
        )

    def admitted(self, at: datetime, visit: str) -> PatientAdmitted:
        return PatientAdmitted(**self._common(at, visit), visit=Visit(patient_class="I"))

    def discharged(self, at: datetime, visit: str) -> PatientDischarged:
        return PatientDischarged(
            **self._common(at, visit),
            visit=Visit(patient_class="E", location="ED", attending=Clinician("C1", "Dr One")),
        )

    def ordered(self, at: datetime, visit: str, placer: str) -> ImagingOrdered:
        return ImagingOrdered(
            **self._common(at, visit),
            order=OrderRef(placer, "RIS"),
            procedure_name="XR chest",
            section="RAD",
        )

    def report(
        self, at: datetime, placer: str, status: str, flags: tuple[str, ...] = ()
    ) -> ReportIssued:
        return ReportIssued(
            **self._common(at), order=OrderRef(placer, "RIS"), status=status, flags=flags
        )


class CheckedProcessor(Processor):
    """A processor that checks every evaluation against the plain-Python rules."""

    def __init__(self) -> None:
        super().__init__(CATALOGUE, task_resource, task_restatus)
        self.evaluations = 0
        self.disagreements: list[str] = []
        self.oracle_union: dict[str, str] = {}

    def decide(self, memory: Any) -> Any:
        tasks = super().decide(memory)
        got = {
            t.identifier: (f"change:{t.status}" if isinstance(t, TaskChange) else t.priority)
            for t in tasks
        }
        want = all_expected(memory, CATALOGUE)
        self.evaluations += 1
        self.oracle_union.update({k: v for k, v in want.items() if not v.startswith("change:")})
        if got != want:
            self.disagreements.append(f"engine {got} != oracle {want}")
        return tasks


def _run(events: list[Any], processor: Processor, uow: UnitOfWork) -> None:
    for event in sorted(events, key=lambda e: e.occurred_at):
        processor.fire_due(uow, event.occurred_at)
        processor.apply(uow, [event], event.occurred_at)


# --- the engine's hazards, pinned ---------------------------------------------------------


def test_engine_hash_reproduces_the_measured_collisions() -> None:
    assert engine_hash("ORD-0022789") == engine_hash("ORD-0239192") == 2507999691
    assert engine_hash("MRN00412789") == engine_hash("MRN00649192") == 1423798155


def test_colliding_engine_ids_are_caught_not_silently_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core = RuleCore({"x": when_all(c.o << (m.kind == "order")).define()})
    monkeypatch.setattr(
        RuleCore, "_engine_ids", staticmethod(lambda n, sid: ["ORD-0022789", "ORD-0239192"][:n])
    )
    facts = [("a", {"kind": "order"}), ("b", {"kind": "order"})]
    with pytest.raises(RuleEvaluationError, match="engine"):
        core.evaluate(facts)


def test_engine_ids_are_rekeyed_when_their_hashes_clash(monkeypatch: pytest.MonkeyPatch) -> None:
    real = rulecore.engine_hash
    monkeypatch.setattr(rulecore, "engine_hash", lambda s: real("f0") if s == "f1" else real(s))
    rulecore._ID_CACHE.clear()
    ids = RuleCore._engine_ids(3, "e1")
    assert ids == ["f0", "f1.1", "f2"]
    core = RuleCore({"x": when_all(c.o << (m.kind == "order")).define()})
    matches = core.evaluate(
        [("a", {"kind": "order"}), ("b", {"kind": "order"}), ("c", {"kind": "order"})]
    )
    assert sorted(mt.facts["o"] for mt in matches) == ["a", "b", "c"]
    rulecore._ID_CACHE.clear()  # do not leave ids made with the patched hash behind


def test_none_and_or_are_refused_because_the_engine_gets_them_wrong() -> None:
    from durable.lang import none

    with pytest.raises(RuleEvaluationError, match=r"\$not"):
        RuleCore({"x": when_all(c.d << (m.kind == "d"), none(m.kind == "e")).define()})
    with pytest.raises(RuleEvaluationError, match=r"\$or"):
        RuleCore({"x": when_all(c.d << ((m.kind == "d") | (m.kind == "e"))).define()})


def test_the_engine_really_misjudges_none_and_or() -> None:
    """Why the two are refused: measured on durable_rules 2.0.28 with a raw host."""
    from durable.lang import none

    def fires(definition: dict[str, Any], facts: list[dict[str, Any]]) -> bool:
        fired: list[int] = []
        host = rulecore._SyncHost(
            {
                "probe" + str(id(definition)): {
                    "x": {**definition, "run": lambda c_: fired.append(1)}
                }
            }
        )
        name = "probe" + str(id(definition))
        host.assert_facts(name, [dict(f, id=f"f{i}", sid="s1") for i, f in enumerate(facts)])
        return bool(fired)

    discharge = {"kind": "d", "at": 1000}
    # A final report at 900 (before the discharge at 1000) must block "none reported by then";
    # the engine's none() right after `d` lets it through.
    blocked = when_all(c.d << (m.kind == "d"), none((m.kind == "r") & (m.at <= c.d.at))).define()
    assert fires(blocked, [discharge, {"kind": "r", "at": 900}]) is True
    # An $or before a comparison with another fact breaks the comparison: a report at 2000
    # is not "at or before 1000", yet it matches.
    broken = when_all(
        c.d << (m.kind == "d"),
        c.r << (((m.s == "F") | (m.s == "C")) & (m.kind == "r") & (m.at <= c.d.at)),
    ).define()
    assert fires(broken, [discharge, {"kind": "r", "s": "F", "at": 2000}]) is True


# --- failures are loud ----------------------------------------------------------------------


def test_action_errors_limits_and_bad_definitions_fail_closed() -> None:
    core = RuleCore({"x": when_all(c.o << (m.kind == "order")).define()}, max_facts=3)
    with pytest.raises(RuleEvaluationError, match="working-memory bound"):
        core.evaluate([(str(i), {"kind": "order"}) for i in range(4)])
    big = {"kind": "order", **{f"k{i}": i for i in range(200)}}
    with pytest.raises(RuleEvaluationError, match="properties"):
        core.evaluate([("big", big)])
    # still usable afterwards
    assert [mt.facts for mt in core.evaluate([("a", {"kind": "order"})])] == [{"o": "a"}]
    with pytest.raises(RuleEvaluationError, match="not defined"):
        RuleCore({"x!unless-y": when_all(c.o << (m.kind == "order")).define()})


def test_an_error_while_building_a_task_fails_the_evaluation() -> None:
    processor = Processor(CATALOGUE, task_resource, task_restatus)
    memory = working_memory(
        [
            Fact(
                "discharge:V",
                "discharge",
                {"kind": "discharge", "enc": "V", "at": 1000, "leaves_care": 1, "cancelled": 0},
            ),
            Fact("patient", "patient", {"kind": "patient", "birth_at": 0}),
            # an order without "okey" cannot name its Task
            Fact(
                "order:X",
                "order",
                {
                    "kind": "order",
                    "enc": "V",
                    "imaging": 1,
                    "ordered_at": 10,
                    "cancelled_at": NEVER,
                },
            ),
        ],
        datetime.fromtimestamp(10_000, UTC),
        TZ,
    )
    with pytest.raises(RuleEvaluationError, match="building the Task failed"):
        processor.decide(memory)


# --- differential: engine == plain Python ---------------------------------------------------


def test_colliding_order_ids_of_one_patient_both_raise_tasks() -> None:
    store = open_store("sqlite://")
    processor = CheckedProcessor()
    ev = _Events("RX-COLL-1")
    events = [
        ev.registered(T0, "V1"),
        ev.ordered(T0 + timedelta(minutes=5), "V1", "ORD-0022789"),
        ev.ordered(T0 + timedelta(minutes=6), "V1", "ORD-0239192"),
        ev.discharged(T0 + timedelta(hours=1), "V1"),
    ]
    with store.begin() as uow:
        _run(events, processor, uow)
        processor.fire_due(uow, T0 + timedelta(hours=2))
        tasks = [t for t in uow.tasks() if t.rule_id == R1]  # the collision is the subject
    orders = sorted(t.resource["contained"][0]["identifier"][0]["value"] for t in tasks)
    assert orders == ["ORD-0022789", "ORD-0239192"]
    assert processor.disagreements == []


def test_colliding_patient_keys_do_not_affect_each_other() -> None:
    store = open_store("sqlite://")
    processor = CheckedProcessor()
    a, b = _Events("MRN00412789"), _Events("MRN00649192")
    events = [
        a.registered(T0, "VA"),
        b.registered(T0, "VB"),
        a.ordered(T0 + timedelta(minutes=5), "VA", "ORD-A"),
        b.ordered(T0 + timedelta(minutes=5), "VB", "ORD-B"),
        b.report(T0 + timedelta(minutes=30), "ORD-B", "final"),  # B's is final before discharge
        a.discharged(T0 + timedelta(hours=1), "VA"),
        b.discharged(T0 + timedelta(hours=1), "VB"),
    ]
    with store.begin() as uow:
        _run(events, processor, uow)
        processor.fire_due(uow, T0 + timedelta(hours=2))
        tasks = [t for t in uow.tasks() if t.rule_id == R1]  # the collision is the subject
    assert [(t.patient_key, t.rule_id) for t in tasks] == [
        ("RX1|MRN00412789", "imaging-pending-at-discharge")
    ]
    assert processor.disagreements == []


def _history(rng: random.Random, i: int) -> list[Any]:
    """One patient's visit: registered in the first hour, 1-3 orders, discharge in the second
    hour (so that all patients have pending orders at once), reports before and after."""
    ev = _Events(f"MRN{i:06d}", months=rng.choice([1, 5, 11, 23, 30]))
    start = T0 + timedelta(seconds=rng.randrange(2400))
    discharge = T0 + timedelta(hours=1, seconds=rng.randrange(3600))
    events: list[Any] = [ev.registered(start, f"V{i}")]
    for k in range(rng.randint(1, 3)):
        placer = f"ORD-{i:06d}-{k}"
        events.append(
            ev.ordered(start + timedelta(seconds=rng.randrange(60, 600)), f"V{i}", placer)
        )
        if rng.random() < 0.6:
            events.append(
                ev.report(
                    start + timedelta(seconds=rng.randrange(700, 1800)),
                    placer,
                    "preliminary",
                    (rng.choice(["N", "A", ""]),),
                )
            )
        if rng.random() < 0.8:
            after = rng.random() < 0.7
            at = (
                discharge + timedelta(minutes=rng.randrange(1, 600))
                if after
                else start + timedelta(seconds=rng.randrange(1800, 3500))
            )
            events.append(
                ev.report(
                    at,
                    placer,
                    rng.choice(["final", "final", "corrected"]),
                    (rng.choice(["N", "A", "", "HH"]),),
                )
            )
    events.append(ev.discharged(discharge, f"V{i}"))
    if rng.random() < 0.05:
        events.append(ev.admitted(discharge + timedelta(minutes=rng.randrange(1, 30)), f"W{i}"))
    return events


@pytest.mark.slow
def test_2000_interleaved_patients_give_exactly_the_plain_python_tasks(tmp_path: Path) -> None:
    rng = random.Random(20081)
    events = [e for i in range(2000) for e in _history(rng, i)]
    # Orders are placed in the first hour and discharges come after it: at the first discharge,
    # count the patients holding an order with no final report yet (the engine's cap: 1,024).
    first_discharge = min(e.occurred_at for e in events if isinstance(e, PatientDischarged))
    finals = {
        e.order.placer
        for e in events
        if isinstance(e, ReportIssued) and e.occurred_at <= first_discharge
    }
    pending = {
        e.patient for e in events if isinstance(e, ImagingOrdered) and e.order.placer not in finals
    }
    assert max(e.occurred_at for e in events if isinstance(e, ImagingOrdered)) < first_discharge
    assert len(pending) > 1024
    store = open_store(f"sqlite:///{tmp_path / 'many.db'}")
    processor = CheckedProcessor()
    with store.begin() as uow:
        _run(events, processor, uow)
        processor.fire_due(uow, T0 + timedelta(days=2), limit=100_000)
        stored = {t.identifier: t.priority for t in uow.tasks()}
    store.close()
    assert processor.disagreements == []
    assert processor.evaluations > 12_000
    assert stored == processor.oracle_union
    assert len(stored) > 1500  # the scenario really raises many Tasks


_report = st.fixed_dictionaries(
    {
        "okey": st.sampled_from(["O1", "O2"]),
        "status": st.sampled_from(["P", "F", "C", "W"]),
        "at": st.integers(0, 4000),
        "flags": st.sampled_from(["", "N", "A", "A,H", "HH"]),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    discharges=st.lists(
        st.fixed_dictionaries(
            {
                "enc": st.sampled_from(["V1", "V2"]),
                "at": st.integers(500, 2500),
                "leaves_care": st.sampled_from([0, 1, 1, 1]),
                "cancelled": st.sampled_from([0, 0, 1]),
            }
        ),
        min_size=1,
        max_size=2,
        unique_by=lambda d: d["enc"],
    ),
    orders=st.lists(
        st.fixed_dictionaries(
            {
                "okey": st.sampled_from(["O1", "O2"]),
                "enc": st.sampled_from(["V1", "V2"]),
                "imaging": st.sampled_from([0, 1, 1]),
                "ordered_at": st.integers(0, 3000),
                "cancelled_at": st.sampled_from([NEVER, 100, 1500, 3000]),
            }
        ),
        max_size=2,
        unique_by=lambda o: o["okey"],
    ),
    reports=st.lists(_report, max_size=5),
    admissions=st.lists(st.integers(0, 4000), max_size=2),
    birth=st.sampled_from([None, -60 * 86400, -400 * 86400, -900 * 86400]),
    now=st.integers(0, 6000),
)
def test_random_histories_engine_equals_plain_python(
    discharges: list[dict[str, Any]],
    orders: list[dict[str, Any]],
    reports: list[dict[str, Any]],
    admissions: list[int],
    birth: int | None,
    now: int,
) -> None:
    facts = [
        Fact(f"discharge:{d['enc']}", "discharge", {"kind": "discharge", **d}) for d in discharges
    ]
    facts += [
        Fact(f"order:{o['okey']}", "order", {"kind": "order", "name": "XR", **o}) for o in orders
    ]
    facts += [
        Fact(
            f"report:{r['okey']}:{n}",
            "report",
            {"kind": "report", "final": int(r["status"] in ("F", "C")), **r},
        )
        for n, r in enumerate(reports)
    ]
    facts += [
        Fact(f"admission:A{n}", "admission", {"kind": "admission", "at": a, "cancelled": 0})
        for n, a in enumerate(admissions)
    ]
    if birth is not None:
        facts.append(Fact("patient", "patient", {"kind": "patient", "birth_at": birth}))
    memory = working_memory(facts, datetime.fromtimestamp(now + 900, UTC), TZ)
    # These facts carry only what R1 and R2 read: compare those two rules' Tasks.
    got = {
        t.identifier: t.priority
        for t in _PROCESSOR.decide(memory)
        if isinstance(t, RecallTask) and t.rule_id in (R1, R2)
    }
    assert got == expected_tasks(memory)


_PROCESSOR = Processor(CATALOGUE, task_resource, task_restatus)


def test_the_alpha_short_cut_skips_only_rules_that_cannot_match() -> None:
    definition = when_all(
        c.d << ((m.kind == "discharge") & (m.age_months < 24) & (m.code != "X")),
        c.o << ((m.kind == "order") & (m.enc == c.d.enc)),
    ).define()
    alpha = rulecore._AlphaFilter([rulecore._alpha_filter(definition)])
    order = {"kind": "order", "enc": "V"}
    infant = {"kind": "discharge", "age_months": 3, "enc": "V"}
    adult = {"kind": "discharge", "age_months": 400, "enc": "V"}
    assert alpha.could_match([infant, order])
    assert not alpha.could_match([adult, order])  # certain: too old
    assert not alpha.could_match([infant])  # no order at all
    # uncertain cases go to the engine: a missing property under != and text against a number
    assert alpha.could_match([{**infant, "age_months": "3"}, order])
    assert alpha.could_match([{k: v for k, v in infant.items()}, order])
    # several rules: any one that could match is enough; an alias with no kind test is tried
    # against every fact
    other = when_all(c.x << (m.flag == 1)).define()
    both = rulecore._AlphaFilter(
        [rulecore._alpha_filter(definition), rulecore._alpha_filter(other)]
    )
    assert not both.could_match([adult, order])
    assert both.could_match([adult, {"kind": "order", "flag": 1}])


def test_a_comparison_after_a_nested_conjunction_is_evaluated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Measured: durable_rules 2.0.28 ignores a comparison with another fact placed after a
    nested `$and` (`a & (b & c) & (m.at >= c.d.at - x)` matches when the last test fails).
    The rule core flattens conjunctions before the engine sees them."""
    facts = [("d", {"kind": "d", "at": 1000}), ("f", {"kind": "f", "at": 100, "x": 1, "y": 1})]
    nested = (m.kind == "f") & ((m.x == 1) & (m.y == 1)) & (m.at >= c.d.at - 500)
    definition = when_all(c.d << (m.kind == "d"), c.f << nested).define()
    assert RuleCore({"x": definition}).evaluate(facts) == []  # 100 >= 500 does not hold
    monkeypatch.setattr(rulecore, "_flatten", lambda node: node)
    assert RuleCore({"x": definition}).evaluate(facts) != []  # the engine's own answer


def test_a_rule_testing_a_property_the_core_overwrites_is_refused() -> None:
    """Every fact reaches the engine with the core's own `id` (and `sid`, `src_id`): a join
    on a Task fact's `id` would silently compare engine ids, so it is refused."""
    joins = when_all(c.t << (m.kind == "task"), c.e << (m.parent == c.t.id)).define()
    with pytest.raises(RuleEvaluationError, match=r"tests \['id'\]"):
        RuleCore({"x": joins})
    own = when_all(c.t << ((m.kind == "task") & (m.id == "T1"))).define()
    with pytest.raises(RuleEvaluationError, match="compare another property"):
        RuleCore({"x": own})
    fine = when_all(c.t << (m.kind == "id")).define()  # a constant that happens to read "id"
    assert RuleCore({"x": fine}).evaluate([("a", {"kind": "id"})]) != []

"""Ingest: inbox first, duplicates have no second effect, bad input is kept with a reason,
and a rule that cannot be evaluated fails closed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from adapters.bootstrap import App, build_replay_app
from engine.errors import RuleEvaluationError

ROOT = Path(__file__).resolve().parents[1]
DERBY = ROOT / "tests" / "fixtures" / "hl7v2" / "derby"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def derby(n: int) -> str:
    return sorted(DERBY.glob("*.hl7"))[n - 1].read_bytes().decode()


@pytest.fixture
def app() -> Iterator[App]:
    built = build_replay_app("sqlite://", ROOT / "rules")
    yield built
    built.close()


def rows(app: App, sql: str) -> list[tuple]:
    with app.store.begin() as uow:
        return [tuple(r) for r in uow.connection.execute(text(sql))]


def test_a_redelivered_message_is_answered_again_and_has_no_second_effect(app: App) -> None:
    with app.store.begin() as uow:
        first = app.ingest.ingest(uow, derby(1), NOW)
        again = app.ingest.ingest(uow, derby(1), NOW)
    assert (first.ack_code, first.duplicate) == ("AA", False)
    assert (again.ack_code, again.duplicate, again.inbox_id) == ("AA", True, first.inbox_id)
    assert rows(app, "select count(*) from inbox") == [(1,)]


def test_the_same_control_id_with_other_content_is_kept_processed_and_reported(app: App) -> None:
    changed = derby(1).replace("PAEDED", "ED")
    with app.store.begin() as uow:
        app.ingest.ingest(uow, derby(1), NOW)
        second = app.ingest.ingest(uow, changed, NOW)
    assert second.ack_code == "AA" and not second.duplicate and second.control_id_reused
    assert rows(app, "select control_id, state from inbox order by id") == [
        ("DERBY-0001", "processed"),
        ("DERBY-0001", "processed"),
    ]


def test_unreadable_input_is_kept_in_quarantine_with_its_reason(app: App) -> None:
    garbage = "this is not HL7\rPID|1"
    with app.store.begin() as uow:
        result = app.ingest.ingest(uow, garbage, NOW)
    assert result.ack_code == "AR"
    assert "MSH" in result.reason
    assert rows(app, "select raw, state from inbox") == [(garbage, "quarantined")]
    assert rows(app, "select reason, ack_code from quarantine") == [(result.reason, "AR")]


def test_a_result_that_links_to_nothing_is_kept_for_identity_review_then_rehomed(
    app: App,
) -> None:
    """No PID and an unknown order: kept under a placeholder patient (R14 asks a person to
    match it), and moved to the patient as soon as a message names its order with one."""
    orphan = "\r".join(s for s in derby(3).split("\r") if not s.startswith(("PID", "PV1")))
    with app.store.begin() as uow:
        result = app.ingest.ingest(uow, orphan, NOW)
    assert result.ack_code == "AA"
    assert rows(app, "select state from inbox") == [("processed",)]
    [(placeholder,)] = rows(app, "select distinct patient_key from facts")
    assert placeholder.startswith("unmatched-")
    with app.store.begin() as uow:
        for n in (1, 2):  # registration, then the order, with the patient
            assert app.ingest.ingest(uow, derby(n), NOW).ack_code == "AA"
    keys = {k for (k,) in rows(app, "select distinct patient_key from facts")}
    assert len(keys) == 1 and placeholder not in keys
    kinds = {k for (k,) in rows(app, "select key from facts")}
    assert any(k.startswith("report:") for k in kinds)


def test_a_cancellation_that_names_no_known_order_or_patient_is_quarantined(app: App) -> None:
    order = "\r".join(s for s in derby(2).split("\r") if not s.startswith(("PID", "PV1")))
    cancel = order.replace("|NW|", "|CA|", 1)
    with app.store.begin() as uow:
        result = app.ingest.ingest(uow, cancel, NOW)
    assert result.ack_code == "AE"
    assert result.reason.startswith("message names no known order")
    assert rows(app, "select state from inbox") == [("quarantined",)]
    assert rows(app, "select count(*) from facts") == [(0,)]


def test_a_result_without_patient_group_links_through_its_order(app: App) -> None:
    bare = "\r".join(s for s in derby(5).split("\r") if not s.startswith(("PID", "PV1")))
    with app.store.begin() as uow:
        for n in (1, 2, 3, 4):
            assert app.ingest.ingest(uow, derby(n), NOW).ack_code == "AA"
        result = app.ingest.ingest(uow, bare, NOW)
    assert result.ack_code == "AA"
    assert {t.rule_id for t in result.tasks} == {
        "imaging-pending-at-discharge",
        "report-final-after-discharge",
        "discrepancy-after-discharge",  # normal preliminary, abnormal final: the Derby case
    }


def test_a_rule_engine_failure_fails_closed(app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    with app.store.begin() as uow:
        for n in (1, 2, 3):
            app.ingest.ingest(uow, derby(n), NOW)

    def broken(*_: object) -> list:
        raise RuleEvaluationError("engine kept 3 of 4 facts")

    monkeypatch.setattr(app.processor._core, "evaluate", broken)
    with app.store.begin() as uow:
        result = app.ingest.ingest(uow, derby(4), NOW)
    assert result.ack_code == "AE"
    assert result.reason == "rules could not be evaluated: engine kept 3 of 4 facts"
    # stored, not processed, nothing of it applied, and a review item exists
    assert rows(app, "select state from inbox where control_id = 'DERBY-0004'") == [("failed",)]
    assert rows(app, "select count(*) from facts where key like 'discharge:%'") == [(0,)]
    assert rows(app, "select reason from quarantine") == [(result.reason,)]
    # The patient's record is marked incomplete all the same (unevaluated: the rules cannot
    # be), so a discharge raises a review Task once they can.
    [(mark,)] = rows(app, "select data from facts where key like 'incomplete:%'")
    assert '"resolved": 0' in mark


_FIELD_TEXT = st.text(alphabet=st.sampled_from(list("0123456789ABCZ^~&\\ -.:+")), max_size=20)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(1, 5),
    segment=st.integers(0, 6),
    field=st.integers(1, 50),
    value=_FIELD_TEXT,
)
def test_any_damaged_message_gets_an_answer_never_an_exception(
    app: App, n: int, segment: int, field: int, value: str
) -> None:
    segments = derby(n).rstrip("\r").split("\r")
    target = segments[segment % len(segments)].split("|")
    if field < len(target):
        target[field] = value
    else:
        target.extend([""] * (field - len(target)) + [value])
    segments[segment % len(segments)] = "|".join(target)
    with app.store.begin() as uow:
        result = app.ingest.ingest(uow, "\r".join(segments), NOW)
    assert result.ack_code in ("AA", "AE", "AR")
    assert result.ack_code == "AA" or result.reason


def test_a_results_only_feed_still_catches_the_pending_examination(app: App) -> None:
    # No order message: the final report after discharge is the first word of the order, and
    # its examination time (OBR-7, 12:45) shows it was pending when the child left at 14:00.
    with app.store.begin() as uow:
        for n in (1, 4):
            assert app.ingest.ingest(uow, derby(n), NOW).ack_code == "AA"
        result = app.ingest.ingest(uow, derby(5), NOW)
    assert result.ack_code == "AA"
    assert {t.rule_id for t in result.tasks} == {
        "imaging-pending-at-discharge",
        "report-final-after-discharge",
    }


def test_a_refused_message_leaves_its_patients_records_incomplete_until_it_is_processed(
    app: App,
) -> None:
    """Fail closed (DESIGN.md non-negotiable 3): an order whose identifiers name two known
    patients is held; the child's discharge then raises a review Task for the identity team;
    once the records are merged and the held message is retried and processed, the open
    review Task is withdrawn with the reason."""
    from adapters.store.operations import quarantine_items, retry

    other = derby(1).replace("9990000018^^^NHS^NH~RX1000123^^^RX1^MR", "RX2000456^^^RX1^MR")
    other = other.replace("DERBY-0001", "OTHER-0001").replace("V0001^", "V0002^")
    clash = derby(2).replace(
        "9990000018^^^NHS^NH~RX1000123^^^RX1^MR", "9990000018^^^NHS^NH~RX2000456^^^RX1^MR"
    )
    with app.store.begin() as uow:
        assert app.ingest.ingest(uow, derby(1), NOW).ack_code == "AA"
        assert app.ingest.ingest(uow, other, NOW).ack_code == "AA"
        held = app.ingest.ingest(uow, clash, NOW)
    assert held.ack_code == "AE" and "2 different known patients" in held.reason
    assert len(rows(app, "select patient_key from facts where key like 'incomplete:%'")) == 2
    with app.store.begin() as uow:
        for n in (4, 5):  # discharge home at 14:00; the final report at 16:00 fires timers
            app.ingest.ingest(uow, derby(n), NOW)
        [review] = uow.tasks(owner="IDENTITY-POOL")
    assert (review.rule_id, review.status) == ("record-incomplete-at-discharge", "requested")
    assert "inbox 3" in review.resource["description"]

    merge = (
        "MSH|^~\\&|PAS|RX1|SAFETYNET|RX1|20080501170000||ADT^A40^ADT_A39|MERGE-1|P|2.5\r"
        "EVN|A40|20080501170000\r"
        "PID|1||9990000018^^^NHS^NH~RX1000123^^^RX1^MR||Testbaby^Alex||20080313|M\r"
        "MRG|RX2000456^^^RX1^MR"
    )
    with app.store.begin() as uow:
        assert app.ingest.ingest(uow, merge, NOW).ack_code == "AA"
        [item] = quarantine_items(uow)
        retry(uow, item.id, NOW, "integration engineer")
        retried = app.ingest.process_stored(uow, item.inbox_id, clash, NOW)
        assert retried.ack_code == "AA"
        withdrawn = uow.get_task(review.identifier)
    assert withdrawn is not None and withdrawn.status == "cancelled"
    assert "has now been processed" in withdrawn.resource["statusReason"]["text"]
    assert rows(app, "select count(*) from facts where key like 'incomplete:%'") == [(1,)]

"""FHIR Subscription notifications (R4 backport) over real HTTP: the API on a real port with its
worker (tests/api_harness.py) and the hospital's FHIR server as a real small server
(tests/fhir_source_server.py) that builds the notifications and answers reads, `$status` and
`$events`. The Derby-like scenario (tests/fixtures/fhir/derby) is sent as Subscription events.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from adapters.fhir.inbound import FhirIngest
from adapters.fhir.subscriptions import (
    NOTIFICATION_PATH,
    PROTOCOL,
    FhirSource,
    NotificationError,
    ResourceRef,
    SourceMissing,
    SourceUnavailable,
    SubscriptionReceiver,
    _Conflict,
    parse_notification,
    resource_ref,
)
from adapters.store.schema import audit, fhir_subscriptions, inbox, quarantine
from tests.api_harness import ApiServer
from tests.fhir_source_server import FhirSourceServer

ROOT = Path(__file__).resolve().parents[1]
DERBY = ROOT / "tests" / "fixtures" / "fhir" / "derby"
CORPUS = ROOT.parent / "shared" / "corpus" / "fhir" / "subscription-backport-ig-draft"
SUB = "safetynet-radiology"
KEY = f"Subscription/{SUB}"
# The scenario's recall Tasks and their owners (as tests/test_replay_e2e.py: the attending
# C1001, and the ED consultant in charge C9001 for the discrepancy).
DERBY_TASKS = {
    "imaging-pending-at-discharge": "C1001",
    "report-final-after-discharge": "C1001",
    "discrepancy-after-discharge": "C9001",
}


def derby() -> list[dict[str, Any]]:
    """The six Derby resources, in the order the hospital's systems wrote them."""
    return [json.loads(path.read_text()) for path in sorted(DERBY.glob("*.json"))]


@pytest.fixture
def source() -> Iterator[FhirSourceServer]:
    with FhirSourceServer() as server:
        server.subscription(SUB)
        yield server


@pytest.fixture
def api(tmp_path: Path, source: FhirSourceServer) -> Iterator[ApiServer]:
    with ApiServer(tmp_path / "api.db", source_server=source.base_url) as server:
        yield server


@pytest.fixture
def feed(api: ApiServer) -> str:
    return api.token("hospital-subscriptions", "feed")


def post(api: ApiServer, token: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with api.client(token) as http:
        return http.post(
            NOTIFICATION_PATH,
            content=content,
            headers={"Content-Type": "application/fhir+json"},
        )


def ok(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "information"
    text: str = body["issue"][0]["diagnostics"]
    return text


def state(api: ApiServer) -> dict[str, Any] | None:
    with api.store.begin(read_only=True) as uow:
        row = uow.connection.execute(
            select(fhir_subscriptions).where(fhir_subscriptions.c.subscription == KEY)
        ).first()
    return None if row is None else dict(row._mapping)


def audited(api: ApiServer, action: str) -> list[dict[str, Any]]:
    with api.store.begin(read_only=True) as uow:
        rows = uow.connection.execute(
            select(audit.c.detail, audit.c.subject).where(audit.c.action == action)
        ).all()
    return [dict(row.detail, subject=row.subject) for row in rows]


def inbox_count(api: ApiServer, protocol: str = "fhir") -> int:
    with api.store.begin(read_only=True) as uow:
        count: int = uow.connection.execute(
            select(func.count()).select_from(inbox).where(inbox.c.protocol == protocol)
        ).scalar_one()
    return count


def derby_tasks(api: ApiServer) -> list[Any]:
    api.drain()
    with api.store.begin(read_only=True) as uow:
        return uow.tasks()


def assert_derby_tasks(api: ApiServer) -> None:
    """The scenario's three recall Tasks, once each, with their owners. (Live, the wall clock
    is years past 2008, so escalation timers fire too: their Tasks are not counted here.)"""
    tasks = [task for task in derby_tasks(api) if task.rule_id in DERBY_TASKS]
    assert sorted(task.rule_id for task in tasks) == sorted(DERBY_TASKS)
    assert {task.rule_id: task.owner for task in tasks} == DERBY_TASKS


def emit_all(source: FhirSourceServer, resources: list[dict[str, Any]]) -> list[int]:
    return [source.emit(SUB, resource).number for resource in resources]


# --- handshake and heartbeat --------------------------------------------------------------


def test_a_handshake_records_the_subscription(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    text = ok(post(api, feed, source.handshake(SUB)))
    assert "handshake" in text and KEY in text
    row = state(api)
    assert row is not None
    assert (row["last_event"], row["reported_events"], row["last_type"]) == (0, 0, "handshake")
    assert row["reference"] == f"{source.base_url}/{KEY}"
    assert row["status"] == "active" and row["topic"].startswith("urn:safetynet:test:topic")
    assert [entry["subject"] for entry in audited(api, "subscription.handshake")] == [KEY]
    assert source.requests() == []  # a handshake reads nothing


def test_a_heartbeat_records_the_count_and_reads_nothing_when_nothing_was_missed(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    ok(post(api, feed, source.handshake(SUB)))
    ok(post(api, feed, source.heartbeat(SUB)))
    row = state(api)
    assert row is not None
    assert (row["notifications"], row["last_type"], row["last_event"]) == (2, "heartbeat", 0)
    assert source.requests() == []


def test_a_heartbeat_ahead_of_what_was_seen_recovers_the_missing_events(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    ok(post(api, feed, source.handshake(SUB)))
    emit_all(source, derby())
    ok(post(api, feed, source.notification(SUB, 1, 2)))
    text = ok(post(api, feed, source.heartbeat(SUB)))  # says 6: events 3-6 never came
    assert "events 3-6 recovered" in text
    assert_derby_tasks(api)
    row = state(api)
    assert row is not None and (row["last_event"], row["reported_events"]) == (6, 6)
    assert any("$events?eventsSinceNumber=3&eventsUntilNumber=6" in r for r in source.requests())


def test_a_handshake_below_the_count_seen_restarts_the_numbering(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    """The hospital recreated the Subscription: numbers start again at 1 and are new events."""
    ok(post(api, feed, source.handshake(SUB)))
    resources = derby()
    emit_all(source, resources[:2])
    ok(post(api, feed, source.notification(SUB, 1, 2)))
    source.subscription(SUB)  # recreated: no events yet
    ok(post(api, feed, source.handshake(SUB)))
    assert [entry["count"] for entry in audited(api, "subscription.restarted")] == [0]
    source.emit(SUB, resources[2])
    assert "events 1 stored (1 resource)" in ok(post(api, feed, source.notification(SUB, 1)))
    assert inbox_count(api) == 3


# --- event notifications ------------------------------------------------------------------


def test_full_resource_notifications_raise_the_derby_tasks(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    ok(post(api, feed, source.handshake(SUB)))
    patient, encounter, *rest = derby()
    # Event 1: the Encounter, its Patient as additional context (applied first, so that the
    # Encounter's "Patient/derby-baby" resolves).
    source.emit(SUB, encounter, context=[patient])
    text = ok(post(api, feed, source.notification(SUB, 1)))
    assert "events 1 stored (2 resources)" in text and "quarantine" not in text
    for resource in rest:
        number = source.emit(SUB, resource).number
        text = ok(post(api, feed, source.notification(SUB, number)))
        assert f"events {number} stored (1 resource)" in text and "quarantine" not in text
    assert_derby_tasks(api)
    assert source.requests() == []  # everything came in the notifications
    assert inbox_count(api) == 6
    row = state(api)
    assert row is not None and row["last_event"] == 5 and row["missing"] == []


def test_several_events_in_one_notification_are_applied_in_event_order(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    ok(post(api, feed, source.handshake(SUB)))
    numbers = emit_all(source, derby())
    bundle = source.notification(SUB, *numbers)
    # Out of order in the Bundle: the event numbers decide.
    status, *entries = bundle["entry"]
    bundle["entry"] = [status, *reversed(entries)]
    parameters = status["resource"]["parameter"]
    events = [p for p in parameters if p["name"] == "notification-event"]
    others = [p for p in parameters if p["name"] != "notification-event"]
    status["resource"]["parameter"] = [*others, *reversed(events)]
    assert "events 1-6 stored (6 resources)" in ok(post(api, feed, bundle))
    assert_derby_tasks(api)


def test_id_only_notifications_are_read_from_the_source(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    """Id-only: an entry with a fullUrl and no resource (odd events), or no entry at all, the
    notification-event's focus alone (even events)."""
    ok(post(api, feed, source.handshake(SUB)))
    for number in emit_all(source, derby()):
        bundle = source.notification(SUB, number, full=False)
        assert "resource" not in bundle["entry"][1]
        if number % 2 == 0:
            bundle["entry"] = bundle["entry"][:1]
        ok(post(api, feed, bundle))
    assert_derby_tasks(api)
    reads = [path for path in source.requests() if "/_history/" in path]
    # Each event's own version, read by "Type/id/_history/v" (the Encounter and the report
    # twice: version 1, then version 2).
    assert reads == [
        "/fhir/Patient/derby-baby/_history/1",
        "/fhir/Encounter/derby-visit/_history/1",
        "/fhir/ServiceRequest/derby-order/_history/1",
        "/fhir/DiagnosticReport/derby-report/_history/1",
        "/fhir/Encounter/derby-visit/_history/2",
        "/fhir/DiagnosticReport/derby-report/_history/2",
    ]
    assert len(reads) == len(source.requests())  # nothing but the reads


def test_a_gap_is_recovered_with_status_and_events(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    resources = derby()
    ok(post(api, feed, source.handshake(SUB)))
    emit_all(source, resources[:5])
    ok(post(api, feed, source.notification(SUB, 1)))
    ok(post(api, feed, source.notification(SUB, 2)))
    text = ok(post(api, feed, source.notification(SUB, 5)))  # 3 and 4 were lost on the way
    assert "events 3-5 stored" in text and "events 3-4 recovered from the source" in text
    source.emit(SUB, resources[5])
    ok(post(api, feed, source.notification(SUB, 6)))
    assert_derby_tasks(api)
    requests = source.requests()
    assert f"/fhir/{KEY}/$status" in requests
    assert (
        f"/fhir/{KEY}/$events?eventsSinceNumber=3&eventsUntilNumber=4&content=full-resource"
        in requests
    )
    assert [entry["events"] for entry in audited(api, "subscription.gap-recovered")] == [[3, 4]]
    row = state(api)
    assert row is not None and row["last_event"] == 6 and row["missing"] == []
    assert inbox_count(api) == 6


def test_a_replayed_event_has_no_second_effect(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    ok(post(api, feed, source.handshake(SUB)))
    for number in emit_all(source, derby()):
        ok(post(api, feed, source.notification(SUB, number, full=False)))
    before = {(task.identifier, task.version) for task in derby_tasks(api)}
    rows, reads = inbox_count(api), len(source.requests())
    # The hospital changes the report again; a replay of event 6 (id-only) must not read it.
    changed = copy.deepcopy(derby()[5])
    changed["meta"]["versionId"] = "3"
    changed["status"] = "entered-in-error"
    source.put(changed)
    for number in (6, 4, 2):
        text = ok(post(api, feed, source.notification(SUB, number, full=False)))
        assert f"events {number} already received: no effect" in text
    ok(post(api, feed, source.notification(SUB, 3)))  # full-resource replay too
    assert {(task.identifier, task.version) for task in derby_tasks(api)} == before
    assert inbox_count(api) == rows
    assert len(source.requests()) == reads
    duplicates = [entry["duplicates"] for entry in audited(api, "subscription.event-notification")]
    assert duplicates[-4:] == [[6], [4], [2], [3]]


def test_source_down_answers_503_and_a_resend_succeeds(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    ok(post(api, feed, source.handshake(SUB)))
    resources = derby()
    emit_all(source, resources[:2])
    notification = source.notification(SUB, 1, 2, full=False)
    source.mode = "down"
    refused = post(api, feed, notification)
    assert refused.status_code == 503
    assert refused.headers["retry-after"].isdigit()
    issue = refused.json()["issue"][0]
    assert issue["code"] == "transient"
    assert (
        "HTTP 503" in issue["diagnostics"] and "send the notification again" in issue["diagnostics"]
    )
    # Nothing half-done: no resource, the state as the handshake left it.
    assert inbox_count(api) == 0
    row = state(api)
    assert row is not None and (row["last_event"], row["notifications"]) == (0, 1)
    source.stop()  # connection refused is the same answer
    assert post(api, feed, notification).status_code == 503
    source.start()
    source.mode = "up"
    assert "events 1-2 stored (2 resources)" in ok(post(api, feed, notification))
    assert inbox_count(api) == 2


def test_a_gap_the_source_cannot_serve_answers_503_and_keeps_nothing(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    ok(post(api, feed, source.handshake(SUB)))
    emit_all(source, derby()[:3])
    full = source.notification(SUB, 3)  # full resource, but 1 and 2 must be read back
    source.mode = "down"
    assert post(api, feed, full).status_code == 503
    assert inbox_count(api) == 0
    source.mode = "up"
    assert "events 1-2 recovered" in ok(post(api, feed, full))
    assert inbox_count(api) == 3


def test_events_the_source_no_longer_has_are_kept_for_review(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    ok(post(api, feed, source.handshake(SUB)))
    emit_all(source, derby()[:4])
    source.forget(SUB, 2)
    text = ok(post(api, feed, source.notification(SUB, 1, 4)))
    assert "events 2 no longer available: kept for review" in text
    assert "events 3 recovered from the source" in text
    row = state(api)
    assert row is not None and row["last_event"] == 4 and row["missing"] == [2]
    assert [entry["events"] for entry in audited(api, "subscription.events-lost")] == [[2]]
    with api.store.begin(read_only=True) as uow:
        reasons = uow.connection.execute(select(quarantine.c.reason)).scalars().all()
    assert any("events 2 of Subscription/safetynet-radiology" in r for r in reasons)
    # Should event 2 arrive after all, it is applied (it was never applied before).
    full_two = source.notification(SUB, 2)
    source.forget(SUB)  # nothing more forgotten
    assert "events 2 stored (1 resource)" in ok(post(api, feed, full_two))
    row = state(api)
    assert row is not None and row["missing"] == []


def test_a_resource_the_ingest_refuses_is_kept_and_its_event_counts_as_received(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    ok(post(api, feed, source.handshake(SUB)))
    report = derby()[3]
    report["status"] = "bogus"  # valid FHIR JSON, a code outside the value set
    source.emit(SUB, report)
    text = ok(post(api, feed, source.notification(SUB, 1)))
    assert "events 1 stored (0 resources)" in text
    assert "1 resource refused: kept in quarantine for review" in text
    with api.store.begin(read_only=True) as uow:
        states = (
            uow.connection.execute(select(inbox.c.state).where(inbox.c.protocol == "fhir"))
            .scalars()
            .all()
        )
    assert states == ["quarantined"]
    # A resend is a replay: no second quarantine item.
    assert "already received" in ok(post(api, feed, source.notification(SUB, 1)))
    row = state(api)
    assert row is not None and row["last_event"] == 1


# --- refusals --------------------------------------------------------------------------------


def _status_parameter(bundle: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        p for p in bundle["entry"][0]["resource"]["parameter"] if p["name"] == name
    )
    return found


def _malformed(source: FhirSourceServer) -> list[tuple[str, Any, int, str, str]]:
    """(case, body, status, issue code, words of the diagnostics)."""
    handshake = source.handshake(SUB)
    no_subscription = copy.deepcopy(handshake)
    no_subscription["entry"][0]["resource"]["parameter"] = [
        p
        for p in no_subscription["entry"][0]["resource"]["parameter"]
        if p["name"] != "subscription"
    ]
    bad_type = copy.deepcopy(handshake)
    _status_parameter(bad_type, "type")["valueCode"] = "party"
    bad_count = copy.deepcopy(handshake)
    _status_parameter(bad_count, "events-since-subscription-start")["valueString"] = "many"
    not_a_subscription = copy.deepcopy(handshake)
    _status_parameter(not_a_subscription, "subscription")["valueReference"] = {
        "reference": "Patient/derby-baby"
    }
    transaction = dict(handshake, type="transaction")
    patient_first = dict(handshake, entry=[{"resource": derby()[0]}])
    no_event_number = copy.deepcopy(handshake)
    no_event_number["entry"][0]["resource"]["parameter"].append(
        {"name": "notification-event", "part": [{"name": "focus", "valueReference": {}}]}
    )
    source.emit(SUB, derby()[0])
    dangling = source.notification(SUB, 1)
    _status_parameter(dangling, "notification-event")["part"][2]["valueReference"] = {
        "reference": "urn:uuid:7c1f0d52-5b3a-4f54-9d7e-0b5a1c2d3e4f"
    }
    return [
        ("not JSON", b"{not json", 400, "invalid", "not JSON"),
        ("not a Bundle", derby()[0], 400, "invalid", "is a Bundle"),
        ("not history", transaction, 400, "invalid", "of type history"),
        ("no status first", patient_first, 400, "invalid", "first entry"),
        ("no subscription", no_subscription, 422, "required", "names no subscription"),
        ("unknown type", bad_type, 422, "code-invalid", "type must be one of handshake"),
        ("bad count", bad_count, 422, "value", "non-negative integer"),
        ("not a Subscription", not_a_subscription, 422, "value", "reference a Subscription"),
        ("focus without reference", no_event_number, 422, "required", "focus must be"),
        ("dangling focus", dangling, 422, "not-found", "names no resource of the Bundle"),
    ]


def test_malformed_notifications_get_an_operation_outcome_and_are_kept(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    cases = _malformed(source)
    for case, body, status, code, words in cases:
        response = post(api, feed, body)
        assert response.status_code == status, (case, response.text)
        assert response.headers["content-type"].startswith("application/fhir+json")
        issue = response.json()["issue"][0]
        assert (issue["severity"], issue["code"]) == ("error", code), case
        assert words in issue["diagnostics"], (case, issue["diagnostics"])
        # The sender's values are never echoed (they may be patient data).
        assert "derby-baby" not in response.text and "party" not in response.text, case
    with api.store.begin(read_only=True) as uow:
        kept = uow.connection.execute(
            select(inbox.c.raw, inbox.c.state, quarantine.c.reason)
            .join(quarantine, quarantine.c.inbox_id == inbox.c.id)
            .where(inbox.c.protocol == PROTOCOL)
            .order_by(inbox.c.id)
        ).all()
    assert len(kept) == len(cases)
    assert kept[0].raw == "{not json" and {row.state for row in kept} == {"quarantined"}
    assert state(api) is None  # no subscription recorded from any of them
    # The same malformed body again: answered the same, kept once.
    assert post(api, feed, b"{not json").status_code == 400
    assert inbox_count(api, PROTOCOL) == len(cases)


def test_only_a_feed_may_send_notifications(api: ApiServer, source: FhirSourceServer) -> None:
    clinician = api.token("dr", "clinician", practitioner="C9001")
    refused = post(api, clinician, source.handshake(SUB))
    assert refused.status_code == 403 and refused.json()["resourceType"] == "OperationOutcome"
    assert post(api, "", source.handshake(SUB)).status_code == 401
    assert state(api) is None


def test_without_a_source_server_id_only_notifications_wait(tmp_path: Path) -> None:
    with FhirSourceServer() as source, ApiServer(tmp_path / "x.db") as api:
        source.subscription(SUB)
        feed = api.token("feed", "feed")
        ok(post(api, feed, source.handshake(SUB)))
        source.emit(SUB, derby()[0])
        refused = post(api, feed, source.notification(SUB, 1, full=False))
        assert refused.status_code == 503
        assert "--fhir-source-server" in refused.json()["issue"][0]["diagnostics"]
        # Full-resource notifications need no source.
        ok(post(api, feed, source.notification(SUB, 1)))
        assert inbox_count(api) == 1


# --- reading notifications (no HTTP) -------------------------------------------------------


def test_the_ig_draft_id_only_example_is_read() -> None:
    path = CORPUS / "notification_id_only_history_bundle.json"
    if not path.is_file():
        pytest.skip(f"corpus not found at {CORPUS} (CI has it beside the repo)")
    notification = parse_notification(json.loads(path.read_text()))
    assert notification.subscription == "Subscription/admission"
    assert (notification.kind, notification.status, notification.events_since) == (
        "event-notification",
        "active",
        2,
    )
    [event] = notification.events
    assert event.number == 2
    assert resource_ref(event.focus) == resource_ref(
        "Encounter/551683b3-1477-41d1-b58e-32fe8b0047b0"
    )
    [entry] = notification.entries
    assert entry.resource is None and notification.find(event.focus) is entry


def test_references_reduce_to_type_id_and_version() -> None:
    ref = resource_ref("https://h.example/fhir/r4/Encounter/e-1/_history/2")
    assert ref is not None and (ref.key, ref.version, ref.path) == (
        "Encounter/e-1",
        "2",
        "Encounter/e-1/_history/2",
    )
    assert resource_ref("urn:uuid:0b1c") is None
    assert resource_ref("Patient/..") is None  # never a path outside "Type/id"
    assert resource_ref("Patient/p-1/_history/..") is None


def test_a_status_resource_is_checked_against_its_model() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "history",
        "entry": [{"resource": {"resourceType": "Parameters", "parameter": "nope"}}],
    }
    with pytest.raises(NotificationError) as caught:
        parse_notification(bundle)
    assert caught.value.status == 400 and "not a valid FHIR R4 Parameters" in caught.value.reason


# --- races and backends --------------------------------------------------------------------


def test_racing_notifications_apply_each_event_once(
    database_url: str, source: FhirSourceServer
) -> None:
    """Every Derby event sent twice, all at once, in a shuffled order, on each backend: each
    event is applied exactly once (gaps met on the way are recovered from the source)."""
    with ApiServer(database_url, source_server=source.base_url) as api:
        feed = api.token("hospital", "feed")
        ok(post(api, feed, source.handshake(SUB)))
        numbers = emit_all(source, derby())
        bundles = [source.notification(SUB, number, full=number % 2 == 0) for number in numbers]
        sends = bundles * 2
        random.Random(4).shuffle(sends)
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda bundle: post(api, feed, bundle), sends))
        assert [answer.status_code for answer in answers] == [200] * len(sends)
        applied = [
            number
            for entry in audited(api, "subscription.event-notification")
            + audited(api, "subscription.heartbeat")
            for number in entry["applied"]
        ]
        assert sorted(applied) == numbers
        assert inbox_count(api) == 6
        row = state(api)
        assert row is not None and (row["last_event"], row["notifications"]) == (6, 13)
        assert_derby_tasks(api)


def test_a_notification_that_lost_a_race_to_another_instance_plans_again(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    """Two instances on one database: the per-process lock cannot order them; the state's
    revision does. The loser writes nothing and plans again from the new state."""
    ok(post(api, feed, source.handshake(SUB)))
    emit_all(source, derby()[:2])
    receiver = SubscriptionReceiver(
        api.store, FhirIngest(api.api.mapper), lambda: FhirSource(source.base_url), api.api.now
    )
    stale = receiver._load(KEY)
    ok(post(api, feed, source.notification(SUB, 1)))  # the other instance, first
    second = parse_notification(source.notification(SUB, 2))
    with pytest.raises(_Conflict):
        receiver._attempt(second, stale, "hospital-subscriptions", "")
    assert inbox_count(api) == 1
    receipt = receiver.receive(second, "hospital-subscriptions")
    assert (receipt.applied, receipt.recovered, receipt.resources) == ((2,), (), 1)
    assert inbox_count(api) == 2


def test_the_source_client_sends_its_token_and_gives_up_on_time(source: FhirSourceServer) -> None:
    source.put(derby()[0])
    source.token = "source-secret"
    patient = resource_ref("Patient/derby-baby")
    assert patient is not None
    with FhirSource(source.base_url, token="source-secret") as client:
        assert client.read(patient)["id"] == "derby-baby"
    with FhirSource(source.base_url) as client, pytest.raises(SourceUnavailable) as refused:
        client.read(patient)
    assert "HTTP 401" in refused.value.reason
    with FhirSource(source.base_url, token="source-secret") as client, pytest.raises(SourceMissing):
        client.read(ResourceRef("Encounter", "nowhere"))
    source.delay = 1.0
    slow_client = FhirSource(source.base_url, token="source-secret", timeout=0.2)
    with slow_client, pytest.raises(SourceUnavailable) as slow:
        slow_client.read(patient)
    assert "did not answer in time" in slow.value.reason


def test_a_long_gap_is_recovered_in_order_over_several_resends(
    api: ApiServer, source: FhirSourceServer, feed: str
) -> None:
    """At most `recovery_limit` events are read back per notification: the oldest first, then
    the sender's resend (a 503 over HTTP) goes on from there."""
    ok(post(api, feed, source.handshake(SUB)))
    emit_all(source, derby()[:5])
    receiver = SubscriptionReceiver(
        api.store,
        FhirIngest(api.api.mapper),
        lambda: FhirSource(source.base_url),
        api.api.now,
        recovery_limit=2,
    )
    fifth = parse_notification(source.notification(SUB, 5))
    first = receiver.receive(fifth, "hospital-subscriptions")
    assert (first.applied, first.recovered, first.backlog) == ((1, 2), (1, 2), 2)
    assert "2 earlier events still to recover: send it again" in first.text()
    second = receiver.receive(fifth, "hospital-subscriptions")
    assert (second.applied, second.recovered, second.backlog) == ((3, 4, 5), (3, 4), 0)
    row = state(api)
    assert row is not None and row["last_event"] == 5
    assert inbox_count(api) == 5

"""The Task API for clinicians (issue 4, items 4 and 5): search, read, status changes.

Real parts throughout: Tasks are raised by replaying synthetic HL7 v2 traffic and the Derby
fixture into a SQLite file (or PostgreSQL), then the API runs on a real port over that
database (`tests.api_harness.ApiServer`) with the worker applying status changes from the
inbox. Expected results come from the stored Tasks, filtered in Python with
`adapters.service.auth.can_see_task` (an oracle independent of the SQL under test).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, select, text

from adapters.bootstrap import build_replay_app, default_rules_dir
from adapters.fhir.task_api import viewer_of
from adapters.service.auth import Principal, can_see_task
from adapters.service.worker import Worker
from adapters.store import schema
from adapters.store.sql import MIGRATIONS
from adapters.synth import SynthConfig, synth_messages
from engine.ports import StoredTask
from tests.api_harness import ApiServer

ROOT = Path(__file__).resolve().parents[1]
DERBY = ROOT / "tests" / "fixtures" / "hl7v2" / "derby"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
GMC = "https://fhir.hl7.org.uk/Id/gmc-number"
PATCH = {"Content-Type": "application/json-patch+json"}


# --- the world: Tasks raised by replayed traffic ------------------------------------------------


def replay(db_url: str, rules: Path, patients: int, derby: bool = True) -> None:
    """Raise Tasks by replaying synthetic traffic (and the Derby fixture) into `db_url`, then
    fire every timer due by now, so that a server started on it has nothing left to fire."""
    app = build_replay_app(db_url, rules)
    try:
        with app.store.begin() as uow:
            received = datetime.now(UTC)
            if patients:
                for _, message in synth_messages(SynthConfig(patients=patients, seed=11)):
                    app.ingest.ingest(uow, message, received)
            if derby:
                for path in sorted(DERBY.glob("*.hl7")):
                    assert app.ingest.ingest(uow, path.read_text(), received).ack_code == "AA"
        if patients:
            app.clock.advance(datetime.now(UTC))
            while True:
                with app.store.begin() as uow:
                    if not uow.due_timers(app.clock.now(), 1):
                        break
                    app.processor.fire_due(uow, app.clock.now())
    finally:
        app.close()


@dataclass
class Stored:
    """A stored Task with the times the API serves."""

    task: StoredTask
    created_at: datetime
    updated_at: datetime

    @property
    def id(self) -> str:
        return self.task.identifier

    @property
    def safeguarding(self) -> bool:
        tags = self.task.resource.get("meta", {}).get("tag", [])
        return any(tag.get("code") == "safeguarding" for tag in tags)


def stored(server: ApiServer) -> dict[str, Stored]:
    """Every stored Task, read through the store's port (not the search under test)."""
    with server.store.begin(read_only=True) as uow:
        tasks = uow.tasks()
        times = {
            row.identifier: (row.created_at, row.updated_at)
            for row in uow.connection.execute(
                select(
                    schema.tasks.c.identifier, schema.tasks.c.created_at, schema.tasks.c.updated_at
                )
            )
        }
    return {t.identifier: Stored(t, *times[t.identifier]) for t in tasks}


def visible(tasks: dict[str, Stored], who: Principal, shadow: bool = False) -> dict[str, Stored]:
    """The oracle: what `who` may see (`can_see_task`), shadow Tasks or the others."""
    return {i: s for i, s in tasks.items() if s.task.shadow == shadow and can_see_task(who, s.task)}


def search_all(http: httpx.Client, params: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Every Task id of a search, following `next` links; and the first page's Bundle."""
    response = http.get("/Task", params=params)
    assert response.status_code == 200, response.text
    first = bundle = response.json()
    ids: list[str] = []
    while True:
        assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
        ids += [e["resource"]["id"] for e in bundle.get("entry", []) if _match(e)]
        following = _link(bundle, "next")
        if following is None:
            return ids, first
        response = http.get(following)
        assert response.status_code == 200, response.text
        bundle = response.json()


def _match(entry: dict[str, Any]) -> bool:
    return bool(entry["search"]["mode"] == "match")


def _link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((li["url"] for li in bundle["link"] if li["relation"] == relation), None)


def ids_of(params: dict[str, Any], http: httpx.Client) -> set[str]:
    ids, first = search_all(http, {**params, "_count": 500})
    assert len(ids) == len(set(ids)) == first["total"]
    return set(ids)


@dataclass
class World:
    server: ApiServer
    tokens: dict[str, str]
    principals: dict[str, Principal]

    def client(self, who: str) -> Any:
        return self.server.client(self.tokens[who])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("task-api")
    db = folder / "api.db"
    # The escalation rule (R11) in shadow, so the world holds shadow Tasks beside live ones.
    rules = folder / "rules"
    shutil.copytree(default_rules_dir(), rules)
    with (rules / "settings.toml").open("a", encoding="utf-8") as settings:
        settings.write('\n[rules.task-not-accepted]\nstatus = "shadow"\n')
    replay(f"sqlite:///{db}", rules, patients=450, derby=False)
    with ApiServer(db, rules) as server:
        server.drain()
        tasks = stored(server)
        safeguarding_owners = {
            s.task.owner for s in tasks.values() if s.safeguarding and not s.task.shadow
        }
        # A clinician who owns a safeguarding Task, and the owner of most open everyday Tasks.
        sg_owner = sorted(o for o in safeguarding_owners if o.startswith("C"))[0]
        open_counts: dict[str, int] = {}
        for s in tasks.values():
            if not (s.task.shadow or s.safeguarding) and s.task.status == "requested":
                open_counts[s.task.owner] = open_counts.get(s.task.owner, 0) + 1
        busy = max((o for o in open_counts if o != sg_owner), key=lambda o: open_counts[o])
        principals = {
            "own-sg": Principal("dr-sg-owner", frozenset({"clinician"}), sg_owner),
            "busy": Principal("dr-busy", frozenset({"clinician"}), busy),
            "other": Principal("dr-other", frozenset({"clinician"}), "C0000001"),
            "safeguarding": Principal("sg-lead", frozenset({"safeguarding"}), "C0000002"),
            "governance": Principal("gov", frozenset({"governance"})),
            "admin": Principal("admin", frozenset({"admin"})),
            "feed": Principal("feed", frozenset({"feed"})),
        }
        tokens = {
            key: server.token(p.subject, *sorted(p.roles), practitioner=p.practitioner)
            for key, p in principals.items()
        }
        yield World(server, tokens, principals)


# --- visibility ---------------------------------------------------------------------------------


def test_the_world_has_what_the_tests_need(world: World) -> None:
    tasks = stored(world.server)
    everyday = [s for s in tasks.values() if not s.task.shadow]
    assert len(everyday) > 40
    assert sum(s.task.shadow for s in tasks.values()) > 120
    assert any(s.safeguarding and s.task.owner == "SAFEGUARDING-TEAM" for s in everyday)
    assert any(
        s.safeguarding and s.task.owner == world.principals["own-sg"].practitioner for s in everyday
    )


@pytest.mark.parametrize("who", ["own-sg", "busy", "other", "safeguarding", "governance", "admin"])
def test_each_reader_sees_exactly_what_can_see_task_allows(world: World, who: str) -> None:
    principal = world.principals[who]
    tasks = stored(world.server)
    with world.client(who) as http:
        assert ids_of({}, http) == set(visible(tasks, principal))
        if who in ("governance", "admin"):
            assert ids_of({"_tag": "shadow"}, http) == set(visible(tasks, principal, shadow=True))
        else:
            refused = http.get("/Task", params={"_tag": "shadow"})
            assert refused.status_code == 403
            assert refused.json()["resourceType"] == "OperationOutcome"


def test_safeguarding_tasks_only_for_owner_safeguarding_role_and_admin(world: World) -> None:
    tasks = stored(world.server)
    owner = world.principals["own-sg"].practitioner
    own_sg = next(s for s in tasks.values() if s.safeguarding and s.task.owner == owner)
    team_sg = next(
        s for s in tasks.values() if s.safeguarding and s.task.owner == "SAFEGUARDING-TEAM"
    )
    expected = {
        "own-sg": (200, 404),
        "busy": (404, 404),
        "other": (404, 404),
        "safeguarding": (200, 200),
        "governance": (404, 404),
        "admin": (200, 200),
    }
    for who, (own_status, team_status) in expected.items():
        with world.client(who) as http:
            assert http.get(f"/Task/{own_sg.id}").status_code == own_status, who
            assert http.get(f"/Task/{team_sg.id}").status_code == team_status, who
    with world.client("busy") as http:
        hidden = http.get(f"/Task/{own_sg.id}")
        unknown = http.get("/Task/no-such-task")
    # Not visible and not there at all are answered alike: nothing reveals that it exists.
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json() == unknown.json()
    assert hidden.json()["issue"][0]["code"] == "not-found"


def test_the_sql_visibility_is_can_see_task(world: World) -> None:
    """Differential: the search's SQL visibility against `can_see_task` for every reader and
    every stored Task (shadow Tasks included for governance and admin)."""
    tasks = stored(world.server)
    for who, principal in world.principals.items():
        if who == "feed":
            continue
        viewer = viewer_of(principal)
        with world.client(who) as http:
            for shadow in (False, True) if viewer.shadow else (False,):
                params = {"_tag": "shadow"} if shadow else {}
                assert ids_of(params, http) == set(visible(tasks, principal, shadow)), who


def test_feed_cannot_read_and_nobody_reads_without_a_token(world: World) -> None:
    any_id = next(iter(stored(world.server)))
    with world.client("feed") as http:
        for path in ("/Task", f"/Task/{any_id}"):
            response = http.get(path)
            assert response.status_code == 403
            assert response.headers["content-type"].startswith("application/fhir+json")
            assert response.json()["issue"][0]["code"] == "forbidden"
    with world.server.client() as http:
        assert http.get("/Task").status_code == 401


# --- search parameters --------------------------------------------------------------------------


def test_search_by_owner(world: World) -> None:
    tasks = visible(stored(world.server), world.principals["governance"])
    owner = world.principals["busy"].practitioner
    expected = {i for i, s in tasks.items() if s.task.owner == owner}
    assert expected
    with world.client("governance") as http:
        assert ids_of({"owner": owner}, http) == expected
        assert ids_of({"owner": f"Practitioner/{owner}"}, http) == expected
        assert ids_of({"owner:identifier": f"{GMC}|{owner}"}, http) == expected
        assert ids_of({"owner:identifier": f"urn:other|{owner}"}, http) == set()
        assert ids_of({"owner": f"Patient/{owner}"}, http) == set()
        pool = {i for i, s in tasks.items() if s.task.owner in (owner, "SAFEGUARDING-TEAM")}
        assert ids_of({"owner": f"{owner},SAFEGUARDING-TEAM"}, http) == pool


def test_search_by_patient(world: World) -> None:
    tasks = visible(stored(world.server), world.principals["admin"])

    def subject(s: Stored) -> dict[str, str]:
        return dict(s.task.resource.get("for", {}).get("identifier", {}))

    by_nhs = next(s for s in tasks.values() if subject(s).get("system") == NHS)
    nhs_number = subject(by_nhs)["value"]
    expected = {i for i, s in tasks.items() if subject(s) == subject(by_nhs)}
    with world.client("admin") as http:
        assert ids_of({"patient": f"{NHS}|{nhs_number}"}, http) == expected
        assert ids_of({"patient": nhs_number}, http) == expected
        assert ids_of({"patient:identifier": f"{NHS}|{nhs_number}"}, http) == expected
        assert ids_of({"patient": f"urn:other|{nhs_number}"}, http) == set()
        local = next(s for s in tasks.values() if subject(s).get("system", NHS) != NHS)
        ident = subject(local)
        expected = {i for i, s in tasks.items() if subject(s) == ident}
        assert ids_of({"patient": f"{ident['system']}|{ident['value']}"}, http) == expected
        two = {i for i, s in tasks.items() if subject(s) in (ident, subject(by_nhs))}
        assert ids_of({"patient": f"{ident['system']}|{ident['value']},{nhs_number}"}, http) == two


def test_search_by_status_priority_code_and_id(world: World) -> None:
    tasks = visible(stored(world.server), world.principals["governance"])
    with world.client("governance") as http:
        for status in ("requested", "requested,cancelled", "completed"):
            wanted = set(status.split(","))
            expected = {i for i, s in tasks.items() if s.task.status in wanted}
            assert ids_of({"status": status}, http) == expected, status
        for priority in ("urgent", "routine,stat"):
            wanted = set(priority.split(","))
            expected = {i for i, s in tasks.items() if s.task.priority in wanted}
            assert ids_of({"priority": priority}, http) == expected, priority
        rule = "report-final-after-discharge"
        expected = {i for i, s in tasks.items() if s.task.rule_id == rule}
        assert expected
        assert ids_of({"code": rule}, http) == expected
        assert ids_of({"code": f"urn:safetynet:rule|{rule}"}, http) == expected
        assert ids_of({"code": f"http://snomed.info/sct|{rule}"}, http) == set()
        # Parameters AND: urgent Tasks of that rule.
        both = {i for i in expected if tasks[i].task.priority == "urgent"}
        assert ids_of({"code": rule, "priority": "urgent"}, http) == both
        two = sorted(tasks)[:2]
        assert ids_of({"_id": ",".join(two)}, http) == set(two)


def test_search_by_last_updated(world: World) -> None:
    tasks = visible(stored(world.server), world.principals["governance"])
    times = sorted(s.updated_at for s in tasks.values())
    middle = times[len(times) // 2]
    cut = middle.replace(microsecond=0)
    stamp = cut.strftime("%Y-%m-%dT%H:%M:%SZ")
    with world.client("governance") as http:
        after = {i for i, s in tasks.items() if s.updated_at >= cut}
        assert ids_of({"_lastUpdated": f"ge{stamp}"}, http) == after
        before = {i for i, s in tasks.items() if s.updated_at < cut}
        assert ids_of({"_lastUpdated": f"lt{stamp}"}, http) == before
        assert after and before
        # Repeated: a range (AND); a day is the whole day in the site's zone (Europe/London,
        # UTC in January).
        day = min(times).date()
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        on_day = {i for i, s in tasks.items() if start <= s.updated_at < start + timedelta(1)}
        assert on_day
        assert ids_of({"_lastUpdated": day.isoformat()}, http) == on_day
        got = http.get(
            "/Task",
            params=[
                ("_lastUpdated", f"ge{day.isoformat()}"),
                ("_lastUpdated", f"lt{(day + timedelta(1)).isoformat()}"),
                ("_count", "500"),
            ],
        ).json()
        assert {e["resource"]["id"] for e in got.get("entry", []) if _match(e)} == on_day
        bad = http.get("/Task", params={"_lastUpdated": "sometime"})
        assert bad.status_code == 400
        assert bad.json()["issue"][0]["expression"] == ["_lastUpdated"]
        assert http.get("/Task", params={"_lastUpdated": "ne2026-01-05"}).status_code == 400


def test_shadow_tasks_only_with_tag_and_tags(world: World) -> None:
    tasks = stored(world.server)
    admin = world.principals["admin"]
    with world.client("admin") as http:
        listed = ids_of({}, http)
        assert not any(tasks[i].task.shadow for i in listed)
        shadow = ids_of({"_tag": "urn:safetynet:tag|shadow"}, http)
        assert shadow == set(visible(tasks, admin, shadow=True))
        expected = {i for i, s in visible(tasks, admin).items() if s.safeguarding}
        assert ids_of({"_tag": "safeguarding"}, http) == expected
    # Shadow work is never shown as work: not even read by id, but by governance and admins.
    one = next(i for i, s in tasks.items() if s.task.shadow and not s.safeguarding)
    for who, status in (("busy", 404), ("safeguarding", 404), ("governance", 200)):
        with world.client(who) as http:
            assert http.get(f"/Task/{one}").status_code == status, who


def test_unknown_parameters_lenient_or_strict(world: World) -> None:
    with world.client("governance") as http:
        lenient = http.get("/Task", params={"colour": "blue", "status": "requested"})
        assert lenient.status_code == 200
        outcome = [e for e in lenient.json()["entry"] if e["search"]["mode"] == "outcome"]
        assert len(outcome) == 1
        issue = outcome[0]["resource"]["issue"][0]
        assert issue["severity"] == "warning" and "colour" in issue["diagnostics"]
        assert "colour" not in (_link(lenient.json(), "self") or "")
        # A parameter name that may be data is not quoted back.
        odd = http.get("/Task", params={"9990000018": "x"}).json()
        assert "9990000018" not in json.dumps(odd["entry"][-1]["resource"])
        strict = http.get("/Task", params={"colour": "blue"}, headers={"Prefer": "handling=strict"})
        assert strict.status_code == 400
        assert strict.json()["issue"][0]["code"] == "not-supported"
        # A modifier the server does not know is refused, never ignored.
        assert http.get("/Task", params={"status:not": "completed"}).status_code == 400


def test_count_limits_and_sort(world: World) -> None:
    tasks = visible(stored(world.server), world.principals["governance"])
    with world.client("governance") as http:
        only_total = http.get("/Task", params={"_count": 0}).json()
        assert only_total["total"] == len(tasks) and "entry" not in only_total
        default = http.get("/Task").json()
        assert len([e for e in default["entry"] if _match(e)]) == min(50, len(tasks))
        capped = http.get("/Task", params={"_count": 1000, "_tag": "shadow"}).json()
        assert len([e for e in capped["entry"] if _match(e)]) <= 500
        assert "_count=500" in (_link(capped, "self") or "")
        for bad in ("-1", "many"):
            assert http.get("/Task", params={"_count": bad}).status_code == 400
        assert http.get("/Task", params={"_cursor": "not-a-cursor"}).status_code == 400
        newest, _ = search_all(http, {"_sort": "-_lastUpdated", "_count": 9})
        expected = sorted(tasks, key=lambda i: (tasks[i].updated_at, i), reverse=True)
        assert newest == expected


def test_paging_has_no_duplicates_or_gaps_both_ways(world: World) -> None:
    tasks = visible(stored(world.server), world.principals["governance"], shadow=True)
    assert len(tasks) > 120
    expected = sorted(tasks, key=lambda i: (tasks[i].created_at, i))
    with world.client("governance") as http:
        forwards, first = search_all(http, {"_tag": "shadow", "_count": 13})
        assert forwards == expected
        assert first["total"] == len(expected)
        assert _link(first, "previous") is None
        # Walk to the last page, then back to the first with the `previous` links.
        bundle = first
        while (following := _link(bundle, "next")) is not None:
            bundle = http.get(following).json()
        backwards: list[str] = []
        while True:
            backwards = [e["resource"]["id"] for e in bundle["entry"] if _match(e)] + backwards
            preceding = _link(bundle, "previous")
            if preceding is None:
                break
            bundle = http.get(preceding).json()
        assert backwards == expected
        # The cursor belongs to its sort order.
        cursor = (_link(first, "next") or "").split("_cursor=")[1]
        wrong = http.get("/Task", params={"_sort": "-authored-on", "_cursor": cursor})
        assert wrong.status_code == 400


def test_read_gives_etag_last_modified_and_conditional_read(world: World) -> None:
    tasks = visible(stored(world.server), world.principals["busy"])
    task = next(iter(tasks.values()))
    with world.client("busy") as http:
        response = http.get(f"/Task/{task.id}")
        assert response.status_code == 200
        body = response.json()
        assert body["id"] == task.id and body["resourceType"] == "Task"
        assert response.headers["etag"] == f'W/"{task.task.version}"'
        assert body["meta"]["versionId"] == str(task.task.version)
        assert response.headers["last-modified"].endswith("GMT")
        again = http.get(f"/Task/{task.id}", headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304


# --- status changes -----------------------------------------------------------------------------


def open_tasks(world: World, who: str = "busy") -> list[Stored]:
    owner = world.principals[who].practitioner
    return sorted(
        (
            s
            for s in stored(world.server).values()
            if s.task.owner == owner
            and s.task.status == "requested"
            and not s.task.shadow
            and not s.safeguarding
        ),
        key=lambda s: s.id,
    )


def put(http: httpx.Client, task: dict[str, Any], **headers: str) -> httpx.Response:
    return http.put(f"/Task/{task['id']}", json=task, headers=headers)


def test_accept_start_and_complete_with_a_note(world: World) -> None:
    task = open_tasks(world)[0]
    who = world.principals["busy"]
    with world.client("busy") as http:
        current = http.get(f"/Task/{task.id}").json()
        accepted = put(http, {**current, "status": "accepted"})
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["status"] == "accepted"
        assert accepted.headers["etag"] == f'W/"{task.task.version + 1}"'
        started = put(http, {**accepted.json(), "status": "in-progress"})
        assert started.status_code == 200, started.text
        note = {"text": "Final report reviewed; family called back for review clinic."}
        done = put(http, {**started.json(), "status": "completed", "note": [note]})
        assert done.status_code == 200, done.text
        body = done.json()
        assert body["status"] == "completed"
        assert body["note"][-1]["text"] == note["text"]
        assert body["note"][-1]["authorString"] == who.practitioner
        assert http.get(f"/Task/{task.id}").json()["status"] == "completed"
    # History: every state, in order; audit: who, what, from which status.
    with world.server.store.begin(read_only=True) as uow:
        history = [h.status for h in uow.task_history(task.id)]
        audit = uow.connection.execute(
            select(schema.audit.c.actor, schema.audit.c.action, schema.audit.c.detail)
            .where(schema.audit.c.subject == task.id)
            .order_by(schema.audit.c.id)
        ).all()
    assert history[-3:] == ["accepted", "in-progress", "completed"]
    changes = [(a.actor, a.action, a.detail.get("from")) for a in audit][-3:]
    assert changes == [
        (who.practitioner, "task.accepted", "requested"),
        (who.practitioner, "task.in-progress", "accepted"),
        (who.practitioner, "task.completed", "in-progress"),
    ]
    patient = task.task.resource["for"]["identifier"]["value"]
    assert all(patient not in json.dumps(a.detail) for a in audit)


def test_completed_needs_a_note_and_rejected_needs_a_reason(world: World) -> None:
    first, second = open_tasks(world)[1:3]
    with world.client("busy") as http:
        current = http.get(f"/Task/{first.id}").json()
        no_note = put(http, {**current, "status": "completed"})
        assert no_note.status_code == 422
        assert no_note.json()["issue"][0]["expression"] == ["Task.note"]
        no_reason = put(http, {**current, "status": "rejected"})
        assert no_reason.status_code == 422
        assert no_reason.json()["issue"][0]["expression"] == ["Task.statusReason"]
        assert (
            http.get(f"/Task/{first.id}").json()["meta"]["versionId"]
            == current["meta"]["versionId"]
        )
        reason = {"text": "Not my patient: discharged under another team."}
        rejected = put(http, {**current, "status": "rejected", "statusReason": reason})
        assert rejected.status_code == 200, rejected.text
        assert rejected.json()["statusReason"]["text"] == reason["text"]
        # A reason given as a note is taken too.
        other = http.get(f"/Task/{second.id}").json()
        by_note = put(http, {**other, "status": "rejected", "note": [{"text": "Duplicate."}]})
        assert by_note.status_code == 200, by_note.text
        assert by_note.json()["statusReason"]["text"] == "Duplicate."


def test_invalid_transitions_and_elements_that_may_not_change(world: World) -> None:
    task = open_tasks(world)[3]
    with world.client("busy") as http:
        current = http.get(f"/Task/{task.id}").json()
        cancelled = put(http, {**current, "status": "cancelled"})
        assert cancelled.status_code == 422
        assert cancelled.json()["issue"][0]["expression"] == ["Task.status"]
        moved = put(http, {**current, "priority": "routine", "status": "accepted"})
        assert moved.status_code == 422
        assert moved.json()["issue"][0]["expression"] == ["Task.priority"]
        assert "Task.priority" in moved.json()["issue"][0]["diagnostics"]
        done = put(http, {**current, "status": "completed", "note": [{"text": "Seen in clinic."}]})
        assert done.status_code == 200, done.text
        back = put(http, {**done.json(), "status": "accepted"})
        assert back.status_code == 409
        assert "completed Task cannot become accepted" in back.json()["issue"][0]["diagnostics"]
        wrong_id = http.put(f"/Task/{task.id}", json={**done.json(), "id": "another"})
        assert wrong_id.status_code == 400
        same = put(http, done.json())  # nothing changes: the Task as it is
        assert same.status_code == 200 and same.headers["etag"] == done.headers["etag"]
        assert http.put(f"/Task/{task.id}", content=b"{not json").status_code == 400


def test_only_the_owner_or_an_admin_changes_a_task(world: World) -> None:
    task = open_tasks(world)[4]
    with world.client("busy") as http:
        current = http.get(f"/Task/{task.id}").json()
    for who in ("other", "own-sg", "safeguarding"):
        with world.client(who) as http:
            response = put(http, {**current, "status": "accepted"})
            assert response.status_code == 403, who
    for who in ("governance", "feed"):
        with world.client(who) as http:
            assert put(http, {**current, "status": "accepted"}).status_code == 403, who
            patch = [{"op": "replace", "path": "/status", "value": "accepted"}]
            assert http.patch(f"/Task/{task.id}", json=patch, headers=PATCH).status_code == 403
    with world.client("admin") as http:
        response = put(http, {**current, "status": "accepted"})
        assert response.status_code == 200, response.text
    with world.server.store.begin(read_only=True) as uow:
        actors = uow.connection.execute(
            select(schema.audit.c.actor).where(
                schema.audit.c.subject == task.id, schema.audit.c.action == "task.accepted"
            )
        ).all()
    assert [a.actor for a in actors] == ["admin"]


def test_if_match_stale_version_is_412(world: World) -> None:
    task = open_tasks(world)[5]
    with world.client("busy") as http:
        current = http.get(f"/Task/{task.id}").json()
        etag = f'W/"{current["meta"]["versionId"]}"'
        accepted = put(http, {**current, "status": "accepted"}, **{"If-Match": etag})
        assert accepted.status_code == 200, accepted.text
        stale = put(http, {**current, "status": "in-progress"}, **{"If-Match": etag})
        assert stale.status_code == 412
        patch = [{"op": "replace", "path": "/status", "value": "in-progress"}]
        stale_patch = http.patch(
            f"/Task/{task.id}", json=patch, headers={**PATCH, "If-Match": etag}
        )
        assert stale_patch.status_code == 412
        fresh = http.patch(
            f"/Task/{task.id}",
            json=patch,
            headers={**PATCH, "If-Match": accepted.headers["etag"]},
        )
        assert fresh.status_code == 200, fresh.text


def test_patch_changes_status_and_adds_notes_only(world: World) -> None:
    task = open_tasks(world)[6]
    with world.client("busy") as http:
        url = f"/Task/{task.id}"
        accept = [
            {"op": "test", "path": "/status", "value": "requested"},
            {"op": "replace", "path": "/status", "value": "accepted"},
        ]
        response = http.patch(url, json=accept, headers=PATCH)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "accepted"
        failed_test = http.patch(url, json=accept, headers=PATCH)
        assert failed_test.status_code == 409
        priority = [{"op": "replace", "path": "/priority", "value": "stat"}]
        refused = http.patch(url, json=priority, headers=PATCH)
        assert refused.status_code == 422
        assert refused.json()["issue"][0]["expression"] == ["[0].path"]
        complete = [
            {"op": "replace", "path": "/status", "value": "completed"},
            {"op": "add", "path": "/note", "value": [{"text": "Report read; no action needed."}]},
        ]
        assert (
            http.patch(url, json=complete, headers={"Content-Type": "application/json"}).status_code
            == 415
        )
        done = http.patch(url, json=complete, headers=PATCH)
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "completed"
        assert done.json()["note"][-1]["text"] == "Report read; no action needed."
        assert http.patch(url, content=b"[{", headers=PATCH).status_code == 400


def test_write_errors_reveal_nothing_of_hidden_tasks(world: World) -> None:
    tasks = stored(world.server)
    hidden = next(
        s for s in tasks.values() if s.safeguarding and s.task.owner == "SAFEGUARDING-TEAM"
    )
    with world.client("busy") as http:
        body = {"resourceType": "Task", "id": hidden.id, "status": "accepted"}
        assert put(http, body).status_code == 404
        assert put(http, {**body, "id": "no-such-task"}).status_code == 404


# --- inbox first: queued (202) and refused by the worker (409) -----------------------------------


@contextmanager
def worker_thread(server: ApiServer, now: Callable[[], datetime] | None = None) -> Iterator[None]:
    """The processor worker on the server's parts, as `safetynet serve` runs it, with an
    optional clock standing in for the wall clock."""
    extra = {"now": now} if now is not None else {}
    worker = Worker(
        server.store,
        server.parts.ingest,
        server.settings,
        clock=server.parts.clock,
        protocols=server.parts.protocols,
        **extra,
    )
    stop = threading.Event()
    thread = threading.Thread(
        target=worker.run, args=(lambda s: stop.wait(min(s, 0.02)), stop.is_set), daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def _inbox(server: ApiServer) -> list[Any]:
    with server.store.begin(read_only=True) as uow:
        return list(
            uow.connection.execute(
                select(schema.inbox.c.id, schema.inbox.c.state, schema.inbox.c.detail)
                .where(schema.inbox.c.protocol == "task")
                .order_by(schema.inbox.c.id)
            )
        )


def test_queued_change_is_202_and_a_race_lost_in_the_worker_is_409(tmp_path: Path) -> None:
    db = tmp_path / "race.db"
    replay(f"sqlite:///{db}", default_rules_dir(), patients=0)
    with ApiServer(db, worker=False, task_wait=0.2) as server:
        task = next(s for s in stored(server).values() if s.task.owner == "C9001")
        token = server.token("dr-c9001", "clinician", practitioner="C9001")
        with server.client(token) as http:
            current = http.get(f"/Task/{task.id}").json()
            note = [{"text": "Reviewed with the radiologist."}]
            queued = put(http, {**current, "status": "completed", "note": note})
            assert queued.status_code == 202
            assert queued.json()["issue"][0]["severity"] == "information"
            assert queued.headers["content-location"].endswith(f"/Task/{task.id}")
            # Checked against the stored Task (still requested): accepted is allowed now...
            server.api.task_wait = 10.0
            answer: list[httpx.Response] = []
            racing = threading.Thread(
                target=lambda: answer.append(put(http, {**current, "status": "accepted"}))
            )
            racing.start()
            deadline = time.monotonic() + 10
            while len(_inbox(server)) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            # ...but the worker applies the completion first, and refuses the acceptance.
            with worker_thread(server):
                racing.join(15)
            assert answer and answer[0].status_code == 409, answer
            assert (
                "completed Task cannot become accepted"
                in answer[0].json()["issue"][0]["diagnostics"]
            )
            assert http.get(f"/Task/{task.id}").json()["status"] == "completed"
        rows = _inbox(server)
        assert [r.state for r in rows] == ["processed", "quarantined"]
        with server.store.begin(read_only=True) as uow:
            held = uow.connection.execute(
                select(schema.quarantine.c.reason).where(schema.quarantine.c.inbox_id == rows[1].id)
            ).scalar_one()
        assert "cannot become accepted" in held


# --- accepting a Task stops its escalation ------------------------------------------------------


def test_accepting_a_task_stops_its_escalation(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(default_rules_dir(), rules)
    with (rules / "settings.toml").open("a") as settings:
        settings.write('\n[rules.task-not-accepted]\nstatus = "active"\n')
    db = tmp_path / "escalation.db"
    replay(f"sqlite:///{db}", rules, patients=0)  # Derby: ends 1 May 2008 16:00 (+01:00)
    wall = [datetime(2008, 5, 1, 15, 30, tzinfo=UTC)]
    with ApiServer(db, rules, worker=False) as server:
        server.api.now = lambda: wall[0]
        tasks = stored(server)
        accepted = next(s for s in tasks.values() if s.task.owner == "C9001")
        left = {i for i, s in tasks.items() if s.task.owner != "C9001"}
        assert accepted.task.rule_id == "discrepancy-after-discharge" and len(left) == 2
        token = server.token("dr-c9001", "clinician", practitioner="C9001")
        with worker_thread(server, now=lambda: wall[0]), server.client(token) as http:
            current = http.get(f"/Task/{accepted.id}").json()
            response = put(http, {**current, "status": "accepted"})
            assert response.status_code == 200, response.text
            wall[0] = datetime(2008, 5, 4, tzinfo=UTC)  # past every deadline
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with server.store.begin(read_only=True) as uow:
                    if not uow.due_timers(wall[0], 1):
                        break
                time.sleep(0.05)
            server.drain()
        escalations = [s for s in stored(server).values() if s.task.rule_id == "task-not-accepted"]
    parents = {s.task.resource["partOf"][0]["identifier"]["value"] for s in escalations}
    assert not any(s.task.shadow for s in escalations)
    assert accepted.id not in parents
    assert left <= parents
    # The control: left unaccepted, that same Task is escalated by the same time.
    control = build_replay_app(f"sqlite:///{tmp_path / 'control.db'}", rules)
    try:
        with control.store.begin() as uow:
            for path in sorted(DERBY.glob("*.hl7")):
                control.ingest.ingest(uow, path.read_text(), datetime.now(UTC))
        control.clock.advance(wall[0])
        with control.store.begin() as uow:
            control.processor.fire_due(uow, control.clock.now())
        with control.store.begin(read_only=True) as uow:
            escalated = {
                t.resource["partOf"][0]["identifier"]["value"]
                for t in uow.tasks()
                if t.rule_id == "task-not-accepted"
            }
    finally:
        control.close()
    assert accepted.id in escalated


# --- schema: the search columns, on each backend, and their backfill ----------------------------


def test_search_and_change_on_each_backend(database_url: str, tmp_path: Path) -> None:
    replay(database_url, default_rules_dir(), patients=0)
    with ApiServer(database_url) as server:
        token = server.token("dr-c9001", "clinician", practitioner="C9001")
        with server.client(token) as http:
            # The Derby discrepancy Task (the server's worker, on the wall clock, may also
            # raise escalations of the 2008 Tasks for the same owner).
            mine = {"owner": "C9001", "patient": f"{NHS}|9990000018"}
            found = http.get("/Task", params={**mine, "code": "discrepancy-after-discharge"})
            assert found.status_code == 200 and found.json()["total"] == 1
            task = found.json()["entry"][0]["resource"]
            patch = [{"op": "replace", "path": "/status", "value": "accepted"}]
            changed = http.patch(f"/Task/{task['id']}", json=patch, headers=PATCH)
            assert changed.status_code == 200, changed.text
            after = http.get("/Task", params={"status": "accepted", "_lastUpdated": "ge2026"})
            assert [e["resource"]["id"] for e in after.json()["entry"]] == [task["id"]]


def test_migration_backfills_the_search_columns(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    resource = {
        "resourceType": "Task",
        "id": "t1",
        "meta": {"tag": [{"system": "urn:safetynet:tag", "code": "safeguarding"}]},
        "owner": {"identifier": {"system": GMC, "value": "C9001"}},
        "for": {"identifier": {"system": NHS, "value": "9990000018"}},
    }
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0006")
        connection.execute(
            text(
                "INSERT INTO tasks (identifier, patient_key, rule_id, rule_version, status,"
                " priority, owner, shadow, resource, version, created_at, updated_at) VALUES"
                " ('t1', 'p', 'r', '1', 'requested', 'urgent', 'C9001', 0, :resource, 1,"
                " '2026-01-05 00:00:00', '2026-01-05 00:00:00')"
            ),
            {"resource": json.dumps(resource)},
        )
        command.upgrade(config, "head")
        row = connection.execute(
            text("SELECT safeguarding, owner_system, patient_system, patient_value FROM tasks")
        ).one()
    engine.dispose()
    assert tuple(row) == (1, GMC, NHS, "9990000018")

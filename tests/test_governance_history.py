"""Rule-set history and approvals (issue 6, items 2 and 4), on SQLite and PostgreSQL.

The service records the rule set it starts with when it changed; a change to what an active
rule does (shadow or off to active, a new active rule, a version or parameter change of an
active rule) needs a recorded approval of exactly that version and those parameters, or the
service refuses to start (exit status 2). Also pinned here: every Task names the rule version
that raised it (row and FHIR resource), and shadow Tasks never reach the outbox.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from adapters.bootstrap import default_rules_dir
from adapters.cli import main
from adapters.fhir.task import TAG_SYSTEM
from adapters.governance.approvals import (
    ApprovalRefused,
    approve,
    load_history,
    record_rule_set,
    render_history,
    verify_rule_set,
)
from adapters.store import SqlStore, open_store
from adapters.store import schema as db
from engine.catalogue import Catalogue, load_catalogue
from engine.errors import ConfigurationError
from tests.service_harness import ServeProcess

ROOT = Path(__file__).resolve().parents[1]
DERBY = ROOT / "tests" / "fixtures" / "hl7v2" / "derby"
RULE = "imaging-pending-at-discharge"  # R1: active in the bundled rules, 1.0.0
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


class Rules:
    """A copy of the bundled rules whose site settings (and R1's version) a test sets."""

    def __init__(self, folder: Path) -> None:
        shutil.copytree(default_rules_dir(), folder)
        self.folder = folder
        self.settings = (folder / "settings.toml").read_text()
        self.card = (folder / RULE / "rule.toml").read_text()
        assert f"\n[rules.{RULE}]" not in self.settings, "the site already overrides R1"
        assert 'version = "1.0.0"' in self.card

    def set(self, status: str, version: str = "1.0.0", **parameters: Any) -> Catalogue:
        """R1 with this status, version and parameter overrides; the catalogue as loaded."""
        lines = [f"[rules.{RULE}]", f'status = "{status}"']
        lines += [f"{k} = {v!r}".replace("'", '"') for k, v in parameters.items()]
        (self.folder / "settings.toml").write_text(self.settings + "\n" + "\n".join(lines) + "\n")
        card = self.card.replace('version = "1.0.0"', f'version = "{version}"', 1)
        (self.folder / RULE / "rule.toml").write_text(card)
        return load_catalogue(self.folder)


@pytest.fixture
def rules(tmp_path: Path) -> Rules:
    """The bundled rules, copied so that a test can change R1."""
    return Rules(tmp_path / "rules")


@pytest.fixture
def store(database_url: str) -> Iterator[SqlStore]:
    """A migrated, empty store on each backend."""
    opened = open_store(database_url)
    try:
        yield opened
    finally:
        opened.close()


def count(store: SqlStore, table: Any) -> int:
    """Rows in a table."""
    with store.begin(read_only=True) as uow:
        return int(uow.connection.execute(select(func.count()).select_from(table)).scalar_one())


def activation(store: SqlStore, rule_set_id: int, rule_id: str = RULE) -> Any:
    """One rule's row of one recorded rule set."""
    act = db.rule_activations
    with store.begin(read_only=True) as uow:
        return uow.connection.execute(
            select(act).where(act.c.rule_set_id == rule_set_id, act.c.rule_id == rule_id)
        ).one()


def refused(store: SqlStore, catalogue: Catalogue, at: datetime = T0) -> str:
    """The message of a refused recording (and check that nothing was recorded)."""
    before = count(store, db.rule_sets)
    with pytest.raises(ConfigurationError) as caught:
        record_rule_set(store, catalogue, at, "serve test")
    assert count(store, db.rule_sets) == before
    return str(caught.value)


# --- recording ------------------------------------------------------------------------------


def test_first_record_is_the_baseline_and_an_unchanged_restart_records_nothing(
    store: SqlStore, rules: Rules
) -> None:
    catalogue = rules.set("active")  # active at once: the baseline needs no approval
    record_rule_set(store, catalogue, T0, "serve node-a")
    record_rule_set(store, load_catalogue(rules.folder), T0 + timedelta(days=1), "serve node-a")

    history = load_history(store)
    assert len(history.records) == 1
    first = history.records[0]
    assert first.baseline and first.recorded_by == "serve node-a" and first.recorded_at == T0
    assert set(first.rules) == {r.id for r in catalogue.rules}
    assert first.rules[RULE].status == "active" and first.rules[RULE].version == "1.0.0"
    assert dict(first.rules[RULE].parameters)["max_age_months"] == 24
    assert first.approvals == {}
    text = render_history(history, RULE)
    assert "from 2026-11-02 09:00 UTC, in force now: version 1.0.0, active" in text
    assert "the baseline: the first rule set recorded on this database" in text
    assert "no approval needed" in text


def test_shadow_to_active_without_approval_is_refused(store: SqlStore, rules: Rules) -> None:
    record_rule_set(store, rules.set("shadow"), T0, "serve test")
    message = refused(store, rules.set("active"))
    assert f"rule {RULE} version 1.0.0 is configured active but was shadow" in message
    assert (
        f"safetynet rules approve {RULE} --version 1.0.0 --by NAME --reason TEXT "
        f"--rules {rules.folder} --db "
    ) in message
    # The --db named is this database, and the command can be run as printed.
    command = re.search(r"safetynet rules approve .*", message)
    assert command is not None and str(store.engine.url.database) in command.group(0)


def test_shadow_to_active_with_approval_is_accepted_and_recorded(
    store: SqlStore, rules: Rules
) -> None:
    record_rule_set(store, rules.set("shadow"), T0, "serve test")
    active = rules.set("active")
    given = approve(
        store, active, RULE, "1.0.0", "Dr Jane Safety (CSO)", "Backtest Q3 reviewed", T0
    )
    assert (given.from_status, given.to_status) == ("shadow", "active")
    record_rule_set(store, active, T0 + timedelta(hours=1), "serve test")

    history = load_history(store)
    assert len(history.records) == 2
    second = history.records[1]
    assert not second.baseline and second.rules[RULE].status == "active"
    assert second.approvals == {RULE: given.id}
    assert activation(store, second.id).approval_id == given.id
    assert history.approvals[0].used_in == second.id
    text = render_history(history, RULE)
    assert "from 2026-11-02 09:00 UTC to 2026-11-02 10:00 UTC: version 1.0.0, shadow" in text
    assert "from 2026-11-02 10:00 UTC, in force now: version 1.0.0, active" in text
    assert "switched from shadow to active" in text
    assert "approved by Dr Jane Safety (CSO)" in text and "Backtest Q3 reviewed" in text

    record_rule_set(store, active, T0 + timedelta(hours=2), "serve test")  # unchanged restart
    assert count(store, db.rule_sets) == 2


def test_an_approval_for_another_version_does_not_count(store: SqlStore, rules: Rules) -> None:
    record_rule_set(store, rules.set("shadow"), T0, "serve test")
    approve(store, rules.set("active"), RULE, "1.0.0", "Dr Jane Safety", "reviewed", T0)
    bumped = rules.set("active", version="1.1.0")  # the logic changed after the sign-off
    message = refused(store, bumped)
    assert f"rule {RULE} version 1.1.0 is configured active but was shadow" in message
    assert "is for version 1.0.0, not 1.1.0" in message
    assert "--version 1.1.0" in message

    with pytest.raises(ApprovalRefused, match=r"at version 1\.1\.0, not 1\.0\.0"):
        approve(store, bumped, RULE, "1.0.0", "Dr Jane Safety", "reviewed", T0)
    approve(store, bumped, RULE, "1.1.0", "Dr Jane Safety", "re-reviewed 1.1.0", T0)
    record_rule_set(store, bumped, T0, "serve test")
    assert load_history(store).records[-1].rules[RULE].version == "1.1.0"


def test_changes_to_an_active_rule_need_approval_standing_it_down_does_not(
    store: SqlStore, rules: Rules
) -> None:
    record_rule_set(store, rules.set("active"), T0, "serve test")

    # A new version of an active rule: its logic changed.
    message = refused(store, rules.set("active", version="1.0.1"))
    assert "is active and its version changed from 1.0.0" in message

    # A parameter of an active rule, and an approval given for other parameters.
    wider = rules.set("active", max_age_months=36)
    assert "max_age_months 24 -> 36" in refused(store, wider)
    approve(store, rules.set("active", max_age_months=30), RULE, "1.0.0", "Dr A", "30", T0)
    assert "was given for other parameters: max_age_months 30 -> 36" in refused(store, wider)
    approve(store, wider, RULE, "1.0.0", "Dr A", "Cohort widened to 3 years", T0)
    record_rule_set(store, wider, T0 + timedelta(hours=1), "serve test")

    # Standing it down (the emergency brake) and changing it in shadow need no approval.
    record_rule_set(store, rules.set("shadow", max_age_months=36), T0 + timedelta(hours=2), "s")
    record_rule_set(store, rules.set("shadow", max_age_months=48), T0 + timedelta(hours=3), "s")
    assert count(store, db.rule_sets) == 4

    # Back to active: the approval used before does not count twice.
    back = rules.set("active", max_age_months=36)
    message = refused(store, back)
    assert "was shadow" in message
    approve(store, back, RULE, "1.0.0", "Dr A", "Back on after the flood was fixed", T0)
    record_rule_set(store, back, T0 + timedelta(hours=4), "serve test")

    text = render_history(load_history(store), RULE)
    assert "parameters changed: max_age_months 24 -> 36" in text
    assert "no approval needed: the rule is shadow" in text
    assert text.count("approved by Dr A") == 2
    assert "given 2026-11-02 09:00 UTC by Dr A: imaging-pending-at-discharge version 1.0.0" in (
        text
    )
    assert "not used yet" in text  # the approval for max_age_months 30 never ran
    assert "version 1.0.0, a change while active (version or parameters), because: 30" in text


def test_a_new_rule_configured_active_needs_approval(store: SqlStore, rules: Rules) -> None:
    record_rule_set(store, rules.set("active"), T0, "serve test")
    folder = rules.folder / "copy-of-r1"
    shutil.copytree(rules.folder / RULE, folder)
    card = (folder / "rule.toml").read_text().replace(f'id = "{RULE}"', 'id = "copy-of-r1"')
    (folder / "rule.toml").write_text(card)
    message = refused(store, load_catalogue(rules.folder))
    assert (
        "rule copy-of-r1 version 1.0.0 is configured active but was not in the rule set" in message
    )


def test_approve_refuses_what_is_not_there_or_already_in_force(
    store: SqlStore, rules: Rules
) -> None:
    active = rules.set("active")
    with pytest.raises(ApprovalRefused, match="has no rule 'no-such-rule'"):
        approve(store, active, "no-such-rule", "1.0.0", "Dr A", "x", T0)
    with pytest.raises(ApprovalRefused, match="--reason"):
        approve(store, active, RULE, "1.0.0", "Dr A", "  ", T0)
    record_rule_set(store, active, T0, "serve test")
    with pytest.raises(ApprovalRefused, match="nothing to approve"):
        approve(store, active, RULE, "1.0.0", "Dr A", "again", T0)
    assert count(store, db.rule_approvals) == 0


def test_a_process_that_does_not_record_refuses_an_unrecorded_rule_set(
    store: SqlStore, rules: Rules
) -> None:
    with pytest.raises(ConfigurationError, match="not the rule set recorded"):
        verify_rule_set(store, rules.set("shadow"))
    record_rule_set(store, rules.set("shadow"), T0, "serve test")
    verify_rule_set(store, load_catalogue(rules.folder))
    with pytest.raises(ConfigurationError, match="restart the service"):
        verify_rule_set(store, rules.set("active"))


def test_instances_starting_together_record_a_change_once(database_url: str, rules: Rules) -> None:
    catalogue = rules.set("shadow")
    stores = [open_store(database_url) for _ in range(4)]
    errors: list[BaseException] = []

    def start(store: SqlStore) -> None:
        try:
            record_rule_set(store, catalogue, T0, "serve racing")
        except BaseException as exc:  # reported below, with the test's own assertion
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert count(stores[0], db.rule_sets) == 1
    finally:
        for opened in stores:
            opened.close()


# --- the command line -----------------------------------------------------------------------


def test_rules_approve_and_history_commands(
    database_url: str, rules: Rules, capsys: pytest.CaptureFixture[str]
) -> None:
    opened = open_store(database_url)
    try:
        record_rule_set(opened, rules.set("shadow"), T0, "serve node-a")
    finally:
        opened.close()
    rules.set("active")
    db_args = ["--db", database_url]
    assert main(["rules", "history", RULE, *db_args]) == 0
    assert "version 1.0.0, shadow" in capsys.readouterr().out

    approve_args = ["--by", "Dr Jane Safety", "--reason", "Backtest of 2026 Q3 reviewed"]
    rules_args = ["--rules", str(rules.folder), *db_args]
    code = main(["rules", "approve", RULE, "--version", "1.0.0", *approve_args, *rules_args])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("recorded approval 1, given ")
    assert "by Dr Jane Safety: imaging-pending-at-discharge version 1.0.0, shadow -> active" in out

    assert main(["rules", "history", *db_args]) == 0
    text = capsys.readouterr().out
    assert "Rule sets recorded on this database: 1" in text
    assert "1. 2026-11-02 09:00 UTC by serve node-a" in text and "baseline" in text
    assert "approval 1, given" in text and "Backtest of 2026 Q3 reviewed" in text
    assert "not used yet: it takes effect when the service next starts" in text

    wrong = ["rules", "approve", RULE, "--version", "2.0.0", *approve_args]
    assert main([*wrong, *rules_args]) == 2
    assert "not 2.0.0: approve the version that will run" in capsys.readouterr().err
    assert main(["rules", "history", "no-such-rule", *db_args]) == 2
    assert "no rule 'no-such-rule'" in capsys.readouterr().err


def test_serve_refuses_an_unapproved_switch_to_active_and_starts_once_approved(
    tmp_path: Path, rules: Rules
) -> None:
    db_url = f"sqlite:///{tmp_path / 'serve.db'}"
    rules.set("shadow")
    with ServeProcess(db_url, tmp_path / "first.log", "--rules", str(rules.folder)):
        pass  # started (ready) and stopped: the baseline is recorded

    rules.set("active")
    refused_serve = ServeProcess(db_url, tmp_path / "refused.log", "--rules", str(rules.folder))
    refused_serve.start(wait_ready=False)
    assert refused_serve.process is not None
    assert refused_serve.process.wait(timeout=60) == 2
    log = refused_serve.log()
    assert "safetynet: error: not starting" in log
    assert f"rule {RULE} version 1.0.0 is configured active but was shadow" in log
    assert f"safetynet rules approve {RULE} --version 1.0.0 --by NAME --reason TEXT" in log

    approve_cmd = [sys.executable, "-m", "adapters.cli", "rules", "approve", RULE]
    approve_cmd += ["--version", "1.0.0", "--by", "Dr Jane Safety", "--reason", "reviewed"]
    approve_cmd += ["--rules", str(rules.folder), "--db", db_url]
    subprocess.run(approve_cmd, cwd=ROOT, check=True, capture_output=True, timeout=60)
    with ServeProcess(db_url, tmp_path / "approved.log", "--rules", str(rules.folder)):
        pass
    store = open_store(db_url)
    try:
        history = load_history(store)
    finally:
        store.close()
    assert [r.baseline for r in history.records] == [True, False]
    assert history.records[1].rules[RULE].status == "active"
    assert history.records[1].recorded_by.startswith("serve ")
    assert history.approvals[0].used_in == history.records[1].id


# --- what Tasks carry -----------------------------------------------------------------------


def replay_derby(database_url: str, rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Replay the Derby-like scenario into the database (three Tasks: R1, R2, R3)."""
    assert main(["replay", str(DERBY), "--db", database_url, "--rules", str(rules)]) == 0
    capsys.readouterr()


def test_a_task_names_the_rule_version_in_its_row_and_fhir_resource(
    database_url: str, rules: Rules, capsys: pytest.CaptureFixture[str]
) -> None:
    rules.set("active", version="1.0.7")
    replay_derby(database_url, rules.folder, capsys)
    store = open_store(database_url)
    try:
        with store.begin(read_only=True) as uow:
            tasks = {t.rule_id: t for t in uow.tasks()}
            history = uow.task_history(tasks[RULE].identifier)
    finally:
        store.close()
    assert set(tasks) == {
        RULE,
        "report-final-after-discharge",
        "discrepancy-after-discharge",
    }
    r1 = tasks[RULE]
    assert r1.rule_version == "1.0.7"
    assert r1.resource["instantiatesUri"] == f"urn:safetynet:rule:{RULE}|1.0.7"
    assert r1.resource["code"]["coding"][0]["code"] == RULE
    assert history and all(h.rule_version == "1.0.7" for h in history)
    other = tasks["report-final-after-discharge"]
    assert other.resource["instantiatesUri"].endswith(f"|{other.rule_version}")


def test_shadow_tasks_are_recorded_and_marked_but_never_reach_the_outbox(
    database_url: str, rules: Rules, capsys: pytest.CaptureFixture[str]
) -> None:
    rules.set("shadow")
    replay_derby(database_url, rules.folder, capsys)
    store = open_store(database_url)
    try:
        with store.begin(read_only=True) as uow:
            tasks = {t.rule_id: t for t in uow.tasks()}
            queued = uow.connection.execute(select(db.outbox.c.task_identifier)).scalars().all()
    finally:
        store.close()
    shadow = tasks[RULE]
    assert shadow.shadow
    assert {"system": TAG_SYSTEM, "code": "shadow"} in shadow.resource["meta"]["tag"]
    live = {t.identifier for t in tasks.values() if not t.shadow}
    assert len(live) == 2
    assert shadow.identifier not in queued
    assert set(queued) == live  # every live Task was queued, and nothing else

    assert main(["tasks", "list", "--db", database_url]) == 0
    listing = capsys.readouterr().out
    assert "3 task(s), 1 of them shadow (recorded, never delivered)" in listing
    shadow_lines = [line for line in listing.splitlines() if line.endswith("SHADOW")]
    assert len(shadow_lines) == 1 and shadow_lines[0].startswith(shadow.identifier)

"""End to end: `safetynet replay` as a user runs it, on the Derby-like scenario."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DERBY = ROOT / "tests" / "fixtures" / "hl7v2" / "derby"
R1 = "imaging-pending-at-discharge"
R2 = "report-final-after-discharge"
R3 = "discrepancy-after-discharge"


def replay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapters.cli", "replay", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def tasks_of(stdout: str) -> dict[str, dict]:
    """The current state of each Task: the last NDJSON line per identifier wins."""
    latest: dict[str, dict] = {}
    for line in stdout.splitlines():
        task = json.loads(line)
        latest[task["identifier"][0]["value"]] = task
    return latest


def test_derby_scenario_gives_exactly_three_tasks_and_replaying_again_changes_nothing(
    database_url: str,
) -> None:
    db = database_url  # a SQLite file, and a fresh PostgreSQL database
    first = replay(str(DERBY), "--db", db)
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    tasks = tasks_of(first.stdout)
    assert len(tasks) == 3
    by_rule = {t["code"]["coding"][0]["code"]: t for t in tasks.values()}
    pending, review, discrepancy = by_rule[R1], by_rule[R2], by_rule[R3]

    for task in (pending, review):
        assert task["status"] == "requested"
        assert task["intent"] == "order"
        assert task["priority"] == "urgent"
        assert task["owner"]["identifier"]["value"] == "C1001"
        assert task["owner"]["display"] == "Dr Ada Testdoctor"
        assert task["for"]["identifier"] == {
            "system": "https://fhir.nhs.uk/Id/nhs-number",
            "value": "9990000018",
        }
        assert task["encounter"]["identifier"]["value"] == "V0001"
        order = task["contained"][0]
        assert task["focus"]["reference"] == "#" + order["id"]
        assert {(i["type"]["coding"][0]["code"], i["value"]) for i in order["identifier"]} == {
            ("PLAC", "ORD-0000001"),
            ("FILL", "ACC-0000001"),
        }
    assert pending["instantiatesUri"] == f"urn:safetynet:rule:{R1}|1.0.0"
    assert pending["description"] == (
        "7-week-old boy discharged from the paediatric emergency department at 14:00 on "
        "1 May 2008 while XR skeletal survey had only a preliminary report. Review the final "
        "report when it is issued and recall the child if needed."
    )
    assert pending["authoredOn"] == "2008-05-01T14:15:00+01:00"
    assert pending["restriction"]["period"]["end"] == "2008-05-02T14:15:00+01:00"
    assert review["partOf"][0]["identifier"]["value"] == pending["identifier"][0]["value"]
    assert (
        "The final report is abnormal; the preliminary report was normal."
        in (review["description"])
    )
    # What the preliminary read missed: the consultant in charge of the attending's team
    # (rules/directory.toml) is asked to consider recall; part of the review Task.
    assert discrepancy["priority"] == "urgent"
    assert discrepancy["owner"]["identifier"]["value"] == "C9001"
    assert discrepancy["partOf"][0]["identifier"]["value"] == review["identifier"][0]["value"]
    assert "whether to recall the child" in discrepancy["description"]

    again = replay(str(DERBY), "--db", db)
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""  # no Task created or changed

    text = replay(str(DERBY), "--format", "text")
    assert text.returncode == 0
    assert text.stdout.startswith("3 task(s)")
    assert "Dr Ada Testdoctor" in text.stdout


def test_without_until_the_settle_timer_waits_for_the_clock(tmp_path: Path) -> None:
    # Only registration, order, preliminary and discharge: the clock stops at 14:00, so the
    # 14:15 settle timer has not fired; --until moves the clock on and it fires.
    files = sorted(DERBY.glob("0[1-4]_*.hl7"))
    db = f"sqlite:///{tmp_path / 'until.db'}"
    assert tasks_of(replay(*map(str, files), "--db", db).stdout) == {}
    late = replay(*map(str, files), "--db", db, "--until", "2008-05-01T14:16:00+01:00")
    assert [t["code"]["coding"][0]["code"] for t in tasks_of(late.stdout).values()] == [R1]


def test_rejected_and_unsupported_messages_are_reported_and_the_replay_goes_on(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "mixed.hl7"
    bad.write_bytes(
        b"MSH|^~\\&|LAB|RX1|SAFETYNET|RX1|20080501090000||SIU^S12|X-1|P|2.5\r"
        b"SCH|1\n"
        b"MSH|^~\\&|PAS|RX1|SAFETYNET|RX1|20080501090000||ADT^A04|X-2|P|2.5\r"
        b"PID|1||\r\n" + (DERBY / "01_adt_a04_registration.hl7").read_bytes()
    )
    result = replay(str(bad))
    assert result.returncode == 0
    lines = result.stderr.splitlines()
    assert lines == [
        f"{bad}: X-1: unsupported: message type SIU^S12 is not supported (MSH-9)",
        f"{bad}: X-2: rejected: ADT message without a patient identifier (PID-3)",
    ]


def test_a_missing_path_is_a_clear_error() -> None:
    result = replay("no/such/folder")
    assert result.returncode == 2
    assert result.stderr.strip() == "safetynet: error: no/such/folder: no such file or folder"


@pytest.mark.parametrize("fmt", ["ndjson", "text"])
def test_replay_of_synthetic_traffic_runs_clean(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "synth.hl7"
    made = subprocess.run(
        [sys.executable, "-m", "adapters.cli", "synth", str(out), "--patients", "150"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    assert "messages" in made.stderr
    result = replay(str(out), "--format", fmt, "--until", "2026-02-01T00:00:00+00:00")
    assert result.returncode == 0
    assert result.stderr == ""  # every synthetic message is supported and valid
    if fmt == "ndjson":
        tasks = tasks_of(result.stdout)
        assert tasks, "infants with imaging pending at discharge must raise Tasks"
        assert all(t["owner"]["identifier"]["value"] for t in tasks.values())

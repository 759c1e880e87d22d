"""`safetynet backtest`: the report against plain replays of the same archive.

Every number the backtest reports is checked against `safetynet replay` run on the same
messages with the same rules (the Tasks it prints), and its differences against two plain
replays. Archives: the Derby-like fixture and a small `safetynet synth` archive (synthetic
patients only). No timing here: speed is measured by bench/bench_backtest.py.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, ClassVar

import pytest

from adapters import cli
from adapters.governance.backtest import redact
from adapters.synth import SynthConfig, synth_to_file

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "rules"
DERBY = ROOT / "tests" / "fixtures" / "hl7v2" / "derby"
R1 = "imaging-pending-at-discharge"
UNTIL = "2026-01-25T00:00:00+00:00"  # past the synth archive's last event: escalations fire
# Every rule set of the synth tests runs the escalation rule (R11) in shadow, whatever the
# bundled status: shadow and live Tasks are then both counted.
SHADOW_R11 = '[rules.task-not-accepted]\nstatus = "shadow"\n'
SECTIONS = ("summary", "rule-sets", "weekly", "burden", "priority", "shadow")


# --- helpers ------------------------------------------------------------------------------


def plain_replay(paths: list[Path], rules: Path, until: str | None = None) -> dict[str, dict]:
    """`safetynet replay` in process: the current state of each Task it printed."""
    argv = ["replay", *map(str, paths), "--rules", str(rules)]
    args = cli.parser().parse_args(argv + (["--until", until] if until else []))
    out, err = io.StringIO(), io.StringIO()
    assert cli.replay(args, out, err) == 0
    latest: dict[str, dict] = {}
    for line in out.getvalue().splitlines():
        task = json.loads(line)
        latest[task["identifier"][0]["value"]] = task
    return latest


def run_backtest(out_dir: Path, *argv: str) -> tuple[dict[str, Any], str, str]:
    """`safetynet backtest` in process, writing report.html, csv/ and report.json in
    `out_dir`; returns the JSON document, the HTML and what it printed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = cli.parser().parse_args(
        [
            "backtest",
            *argv,
            "--out",
            str(out_dir / "report.html"),
            "--csv",
            str(out_dir / "csv"),
            "--json",
            str(out_dir / "report.json"),
        ]
    )
    out, err = io.StringIO(), io.StringIO()
    assert args.func(args, out, err) == 0
    doc = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
    return doc, (out_dir / "report.html").read_text(encoding="utf-8"), out.getvalue()


def rule_of(task: dict) -> str:
    return task["code"]["coding"][0]["code"]


def is_shadow(task: dict) -> bool:
    return any(t["code"] == "shadow" for t in task.get("meta", {}).get("tag", []))


def with_override(tmp: Path, name: str, table: str = "") -> Path:
    """A copy of rules/ with R11 in shadow and `table` (a rule's overrides, as a governance
    lead would write them) added to its settings.toml."""
    target = tmp / name
    shutil.copytree(RULES, target, ignore=shutil.ignore_patterns("__pycache__"))
    settings = target / "settings.toml"
    text = settings.read_text(encoding="utf-8")
    settings.write_text(f"{text}\n{SHADOW_R11}\n{table}", encoding="utf-8")
    return target


class _Structure(HTMLParser):
    """Checks tag balance and collects what could load something from elsewhere."""

    VOID: ClassVar[set[str]] = {
        "meta",
        "br",
        "hr",
        "img",
        "input",
        "link",
        "area",
        "base",
        "col",
        "source",
        "wbr",
    }

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.external: list[str] = []
        self.ids: set[str] = set()
        self.tags: Counter[str] = Counter()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        for name, value in attrs:
            if name == "id" and value:
                self.ids.add(value)
            if name in ("src", "srcset", "data", "action", "poster", "xlink:href"):
                self.external.append(f"{tag} {name}={value}")
            if name == "href" and value and not value.startswith("#"):
                self.external.append(f"{tag} href={value}")
        if tag in ("script", "link", "iframe", "object", "embed", "img", "use", "image"):
            self.external.append(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        for name, value in attrs:
            if name in ("src", "href", "xlink:href"):
                self.external.append(f"{tag} {name}={value}")

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()


def assert_self_contained_report(html: str) -> None:
    """A complete HTML page with every section and inline SVG charts, loading nothing."""
    assert html.startswith("<!DOCTYPE html>")
    lowered = html.lower()
    assert "http://" not in lowered and "https://" not in lowered
    assert "url(" not in lowered and "@import" not in lowered
    page = _Structure()
    page.feed(html)
    page.close()
    assert page.errors == []
    assert page.stack == []
    assert page.external == []
    assert set(SECTIONS) <= page.ids
    assert page.tags["style"] == 1 and page.tags["script"] == 0
    svgs = re.findall(r"<svg\b.*?</svg>", html, re.S)
    assert len(svgs) >= 4
    for svg in svgs:  # each chart is well-formed XML with something drawn and a title
        root = ET.fromstring(svg)
        assert root.find("title") is not None
        assert root.findall("rect") or root.findall("line")


def archive_patient_details(paths: list[Path]) -> dict[str, set[str]]:
    """Names, identifiers and free text of the archive's patients, from PID and OBR-13/NTE."""
    names: set[str] = set()
    identifiers: set[str] = set()
    free_text: set[str] = set()
    for path in paths:
        for segment in re.split(r"[\r\n]+", path.read_text(encoding="ascii")):
            fields = segment.split("|")
            if fields[0] == "PID" and len(fields) > 5:
                for rep in fields[3].split("~"):
                    value = rep.split("^")[0]
                    if value:
                        identifiers.add(value)
                for rep in fields[5].split("~"):
                    parts = rep.split("^")
                    family, given = parts[0], parts[1] if len(parts) > 1 else ""
                    names.add(family)
                    if given:
                        names.add(f"{given} {family}")
                        names.add(f"{family}, {given}")
            elif fields[0] == "OBR" and len(fields) > 13 and fields[13]:
                free_text.add(fields[13])
            elif fields[0] == "NTE" and len(fields) > 3 and fields[3]:
                free_text.add(fields[3])
    return {"names": names, "identifiers": identifiers, "free_text": free_text}


def all_outputs(out_dir: Path) -> dict[str, str]:
    files = [out_dir / "report.html", out_dir / "report.json", *sorted((out_dir / "csv").iterdir())]
    return {p.name: p.read_text(encoding="utf-8") for p in files}


def csv_rows(out_dir: Path, name: str) -> list[dict[str, str]]:
    with (out_dir / "csv" / name).open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("archive") / "synth.hl7"
    count = synth_to_file(SynthConfig(patients=200, seed=1, days=14), path)
    assert count > 500
    return path


@pytest.fixture(scope="module")
def candidate_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rules/ as bundled (R11 in shadow)."""
    return with_override(tmp_path_factory.mktemp("rules"), "candidate")


@pytest.fixture(scope="module")
def baseline_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rules/ with one parameter changed: R1 only for children under 1 month (default 24)."""
    return with_override(
        tmp_path_factory.mktemp("rules"), "baseline", f"[rules.{R1}]\nmax_age_months = 1\n"
    )


@pytest.fixture(scope="module")
def replays(
    synth_archive: Path, candidate_rules: Path, baseline_rules: Path
) -> dict[str, dict[str, dict]]:
    """Plain replays of the synth archive under the candidate and the baseline rules."""
    return {
        "rules": plain_replay([synth_archive], candidate_rules, UNTIL),
        "baseline": plain_replay([synth_archive], baseline_rules, UNTIL),
    }


@pytest.fixture(scope="module")
def compared(
    tmp_path_factory: pytest.TempPathFactory,
    synth_archive: Path,
    candidate_rules: Path,
    baseline_rules: Path,
) -> tuple[Path, dict[str, Any], str]:
    """The backtest of the synth archive: the candidate rules against the baseline."""
    out_dir = tmp_path_factory.mktemp("compared")
    doc, html, _ = run_backtest(
        out_dir,
        str(synth_archive),
        "--rules",
        str(candidate_rules),
        "--baseline",
        str(baseline_rules),
        "--until",
        UNTIL,
        "--quiet",
    )
    return out_dir, doc, html


# --- the Derby-like scenario, as a user runs it -------------------------------------------


def test_derby_backtest_writes_a_self_contained_report_counting_what_replay_raises(
    tmp_path: Path,
) -> None:
    report, data = tmp_path / "derby.html", tmp_path / "derby.json"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "adapters.cli", "backtest", str(DERBY), "--rules", str(RULES)),
            *("--out", str(report), "--json", str(data), "--csv", str(tmp_path / "csv")),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # not a terminal: no progress bar; no rejected message
    assert "5 messages; candidate: 3 Task(s) (3 live, 0 shadow)" in done.stdout
    html = report.read_text(encoding="utf-8")
    assert_self_contained_report(html)

    doc = json.loads(data.read_text(encoding="utf-8"))
    replayed = plain_replay([DERBY], RULES)
    assert len(replayed) == 3
    cand = doc["rule_sets"]["candidate"]
    assert cand["tasks"] == {"tasks": 3, "live": 3, "shadow": 0}
    assert {r["rule"]: r["tasks"] for r in cand["by_rule"] if r["tasks"]} == Counter(
        rule_of(t) for t in replayed.values()
    )
    assert {p["priority"]: p["tasks"] for p in cand["by_priority"]} == {"urgent": 3}
    owners = {(o["owner_id"], o["owner_name"]): o["live"] for o in cand["owners"]}
    assert owners == Counter(
        (t["owner"]["identifier"]["value"], t["owner"]["display"]) for t in replayed.values()
    )
    assert owners[("C1001", "Dr Ada Testdoctor")] == 2
    assert cand["per_owner_day"] == [
        {"owner_id": o, "owner_name": n, "day": "2008-05-01", "tasks": k, "live": k, "shadow": 0}
        for (o, n), k in sorted(owners.items())
    ]
    assert {(w["rule"], w["week"]) for w in cand["per_rule_week"]} == {
        (rule_of(t), "2008-W18") for t in replayed.values()
    }
    assert doc["archive"]["messages"] == 5 and doc["archive"]["file_count"] == 5
    assert doc["archive"]["first_event"].startswith("2008-05-01T11:30:00")
    assert doc["differences"] is None
    rule_card = next(r for r in cand["rules"] if r["id"] == R1)
    assert rule_card["version"] == "1.0.0"
    assert {p["name"]: p["value"] for p in rule_card["parameters"]}["max_age_months"] == 24

    details = archive_patient_details(sorted(DERBY.iterdir()))
    assert "Testbaby" in details["names"] and "9990000018" in details["identifiers"]
    outputs = {p.name: p.read_text(encoding="utf-8") for p in (report, data)}
    outputs |= {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "csv").iterdir()}
    for name, text in outputs.items():
        for secret in details["names"] | details["identifiers"]:
            assert secret not in text, f"{secret!r} in {name}"
        assert not re.search(r"\d+-(day|week|month|year)-old", text), name


# --- the synth archive: counts, differences, privacy --------------------------------------


def test_counts_equal_the_tasks_a_plain_replay_raises(
    compared: tuple[Path, dict[str, Any], str], replays: dict[str, dict[str, dict]]
) -> None:
    out_dir, doc, html = compared
    assert_self_contained_report(html)
    for label, replayed in (("candidate", replays["rules"]), ("baseline", replays["baseline"])):
        rs = doc["rule_sets"][label]
        shadow = sum(1 for t in replayed.values() if is_shadow(t))
        assert rs["tasks"] == {
            "tasks": len(replayed),
            "live": len(replayed) - shadow,
            "shadow": shadow,
        }
        assert shadow > 0  # escalation steps (R11 ships in shadow) fired with --until
        by_rule = {r["rule"]: (r["tasks"], r["live"], r["shadow"]) for r in rs["by_rule"]}
        for rule, n in Counter(rule_of(t) for t in replayed.values()).items():
            live = sum(1 for t in replayed.values() if rule_of(t) == rule and not is_shadow(t))
            assert by_rule[rule] == (n, live, n - live)
        assert sum(v[0] for v in by_rule.values()) == len(replayed)
        assert {p["priority"]: p["tasks"] for p in rs["by_priority"]} == Counter(
            t["priority"] for t in replayed.values()
        )
        per_owner: Counter[str] = Counter()
        for item in rs["per_owner_day"]:
            per_owner[item["owner_id"]] += item["live"]
        assert per_owner == Counter(
            t["owner"]["identifier"]["value"] for t in replayed.values() if not is_shadow(t)
        )
        weekly: Counter[str] = Counter()
        for item in rs["per_rule_week"]:
            weekly[item["rule"]] += item["tasks"]
        assert weekly == Counter(rule_of(t) for t in replayed.values())
    text = Path(doc["archive"]["files"][0]).read_text(encoding="ascii")
    assert doc["archive"]["messages"] == len(re.findall(r"(?:^|[\r\n])MSH\|", text))
    # The CSV files carry the same numbers as the JSON document.
    rows = csv_rows(out_dir, "tasks_by_rule.csv")
    for label in ("candidate", "baseline"):
        assert {r["rule"]: int(r["tasks"]) for r in rows if r["rule_set"] == label} == {
            r["rule"]: r["tasks"] for r in doc["rule_sets"][label]["by_rule"]
        }
    owner_days = csv_rows(out_dir, "tasks_per_owner_day.csv")
    assert sum(int(r["tasks"]) for r in owner_days if r["rule_set"] == "candidate") == len(
        replays["rules"]
    )


def test_the_differences_are_exactly_the_tasks_that_appear_or_disappear(
    compared: tuple[Path, dict[str, Any], str], replays: dict[str, dict[str, dict]]
) -> None:
    out_dir, doc, html = compared
    cand, base = replays["rules"], replays["baseline"]
    appear, disappear = set(cand) - set(base), set(base) - set(cand)
    assert appear  # the baseline drops R1 above 1 month: those Tasks and their escalations
    assert {rule_of(cand[i]) for i in appear} == {R1, "task-not-accepted"}
    diff = doc["differences"]
    assert {t["identifier"] for t in diff["only_candidate"]} == appear
    assert {t["identifier"] for t in diff["only_baseline"]} == disappear
    assert diff["changed"] == []  # the Tasks both raise are the same Tasks
    assert diff["summary"] == {
        "only_candidate": len(appear),
        "only_baseline": len(disappear),
        "changed": 0,
    }
    assert diff["rule_changes"] == [
        {
            "rule": R1,
            "what": "parameter max_age_months (months)",
            "baseline": "1",
            "candidate": "24",
        }
    ]
    for item in diff["only_candidate"]:
        task = cand[item["identifier"]]
        assert item["rule"] == rule_of(task)
        assert item["priority"] == task["priority"]
        assert item["owner_id"] == task["owner"]["identifier"]["value"]
        assert item["owner_name"] == task["owner"]["display"]
        assert item["shadow"] == is_shadow(task)
        assert item["patient"].startswith("P-") and len(item["patient"]) == 14
        assert item["text"] and item["reason"]
        if item["rule"] == R1:
            assert item["cause"] == "parameter max_age_months (months): 1 → 24"
            assert item["text"].startswith("Patient discharged from ")
        else:  # an escalation of a Task that appears
            assert item["part_of"] in appear
            assert item["cause"] == (
                f"this rule is unchanged: it acts on {item['part_of']}, which is only under "
                "the candidate"
            )
        assert item["identifier"] in html
    # One patient, one pseudonym: R1 Tasks and their escalations share it.
    by_id = {t["identifier"]: t for t in diff["only_candidate"]}
    for item in diff["only_candidate"]:
        if item["part_of"]:
            assert item["patient"] == by_id[item["part_of"]]["patient"]
    differences = csv_rows(out_dir, "differences.csv")
    assert {r["identifier"] for r in differences if r["side"] == "only_candidate"} == appear


def test_swapping_the_rule_sets_swaps_the_differences(
    tmp_path: Path,
    synth_archive: Path,
    candidate_rules: Path,
    baseline_rules: Path,
    replays: dict[str, dict[str, dict]],
) -> None:
    doc, _, printed = run_backtest(
        tmp_path,
        str(synth_archive),
        "--rules",
        str(baseline_rules),
        "--baseline",
        str(candidate_rules),
        "--until",
        UNTIL,
    )
    gone = set(replays["rules"]) - set(replays["baseline"])
    assert {t["identifier"] for t in doc["differences"]["only_baseline"]} == gone
    assert doc["differences"]["only_candidate"] == []
    assert f"0 only under the candidate, {len(gone)} only under the baseline" in printed


def test_a_changed_priority_lists_the_tasks_raised_under_both_as_changed(
    tmp_path: Path,
    synth_archive: Path,
    candidate_rules: Path,
    replays: dict[str, dict[str, dict]],
) -> None:
    routine = with_override(tmp_path, "routine", f'[rules.{R1}]\npriority = "routine"\n')
    doc, html, _ = run_backtest(
        tmp_path / "out",
        str(synth_archive),
        "--rules",
        str(candidate_rules),
        "--baseline",
        str(routine),
        "--until",
        UNTIL,
    )
    cand = replays["rules"]
    base = plain_replay([synth_archive], routine, UNTIL)
    diff = doc["differences"]
    assert {t["identifier"] for t in diff["only_candidate"]} == set(cand) - set(base)
    assert {t["identifier"] for t in diff["only_baseline"]} == set(base) - set(cand)
    expected = {
        i
        for i in set(cand) & set(base)
        if (cand[i]["priority"], cand[i]["owner"], cand[i]["status"])
        != (base[i]["priority"], base[i]["owner"], base[i]["status"])
    }
    r1 = {i for i, t in cand.items() if rule_of(t) == R1}
    assert r1 and r1 <= expected
    assert {t["identifier"] for t in diff["changed"]} == expected
    for item in diff["changed"]:
        if item["rule"] == R1:
            assert item["changes"]["priority"] == {"baseline": "routine", "candidate": "urgent"}
    assert "<mark>routine → urgent</mark>" in html


def test_status_and_site_setting_changes_are_named_with_the_tasks_they_move(
    tmp_path: Path,
) -> None:
    baseline = tmp_path / "baseline"
    shutil.copytree(RULES, baseline, ignore=shutil.ignore_patterns("__pycache__"))
    settings = baseline / "settings.toml"
    text = settings.read_text(encoding="utf-8")
    assert "settle_minutes = 15\n" in text
    text = text.replace("settle_minutes = 15\n", "settle_minutes = 30\n")
    settings.write_text(text + f'\n[rules.{R1}]\nstatus = "off"\n', encoding="utf-8")
    doc, html, _ = run_backtest(
        tmp_path / "out", str(DERBY), "--rules", str(RULES), "--baseline", str(baseline)
    )
    cand, base = plain_replay([DERBY], RULES), plain_replay([DERBY], baseline)
    diff = doc["differences"]
    assert {t["identifier"] for t in diff["only_candidate"]} == set(cand) - set(base)
    assert {t["identifier"] for t in diff["only_baseline"]} == set(base) - set(cand)
    assert [t["rule"] for t in diff["only_candidate"]] == [R1]
    assert diff["only_candidate"][0]["cause"] == "status: off → active"
    assert diff["rule_changes"] == [
        {"rule": R1, "what": "status", "baseline": "off", "candidate": "active"},
        {
            "rule": "(site settings)",
            "what": "settle_minutes",
            "baseline": "30",
            "candidate": "15",
        },
        {
            "rule": "(site settings)",
            "what": "[discharge]",
            "baseline": "as in the baseline folder",
            "candidate": "changed",
        },
    ]
    assert "<mark>off (site)</mark>" in html


def test_no_patient_name_identifier_age_or_free_text_leaves_the_backtest(
    compared: tuple[Path, dict[str, Any], str], synth_archive: Path
) -> None:
    out_dir, doc, _ = compared
    details = archive_patient_details([synth_archive])
    assert len(details["identifiers"]) > 200 and len(details["names"]) > 20
    assert details["free_text"]  # e.g. the clinical details of skeletal survey requests
    outputs = all_outputs(out_dir)
    assert {"report.html", "report.json", "differences.csv", "owners.csv"} <= set(outputs)
    for name, text in outputs.items():
        words = set(re.findall(r"[A-Za-z0-9-]+", text))
        leaked = {i for i in details["identifiers"] if i in words}
        assert not leaked, f"identifiers in {name}: {sorted(leaked)[:5]}"
        for family_or_full in details["names"]:
            assert family_or_full not in text, f"{family_or_full!r} in {name}"
        for note in details["free_text"]:
            assert note not in text, f"free text in {name}"
        assert not re.search(r"\d+-(day|week|month|year)-old", text), name
    # The Tasks raised do carry those details (what the redaction is for).
    bruise = [t for t in doc["rule_sets"]["candidate"]["by_rule"] if t["rule"].startswith("bruise")]
    assert bruise and bruise[0]["tasks"] > 0


def test_redact_removes_patient_details_and_keeps_the_clinical_sense() -> None:
    assert redact(
        "7-week-old boy discharged from the paediatric emergency department at 14:00 on "
        "1 May 2008 while XR skeletal survey had only a preliminary report."
    ) == (
        "Patient discharged from the paediatric emergency department at [time] while XR "
        "skeletal survey had only a preliminary report."
    )
    assert redact(
        'Possible bruising in an 8-week-old girl: recorded as "?bruise on left cheek" in a '
        'triage note; the "Imaging pending at discharge" Task',
        keep=["Imaging pending at discharge"],
    ) == (
        "Possible bruising in a patient: recorded as [words removed] in a triage note; the "
        '"Imaging pending at discharge" Task'
    )
    assert redact("placer order number ORD-0000002 for 9994191322", {"ORD-0000002"}) == (
        "placer order number [id] for [number]"
    )
    assert redact("NHS 999 419 1322, MRN00000002, born 2024-09-29") == (
        "NHS [number], [number], born [date]"
    )
    assert redact("The patient of unknown age (no date of birth on record) was seen") == (
        "The patient was seen"
    )


# --- the command line ---------------------------------------------------------------------


def test_progress_bar_on_a_terminal_only_and_not_with_quiet(tmp_path: Path) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for quiet in (False, True):
        argv = ["backtest", str(DERBY), "--out", str(tmp_path / f"r{quiet}.html")]
        args = cli.parser().parse_args(argv + (["--quiet"] if quiet else []))
        out, err = io.StringIO(), Terminal()
        assert args.func(args, out, err) == 0
        if quiet:
            assert err.getvalue() == ""
        else:
            assert "candidate: 100%" in err.getvalue()
            assert "5 messages" in err.getvalue()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nowhere.hl7", "--out", "{tmp}/r.html"], "nowhere.hl7: no such file or folder"),
        (
            ["{derby}", "--rules", "{tmp}/none", "--out", "{tmp}/r.html"],
            "--rules {tmp}/none: no such folder",
        ),
        (
            ["{derby}", "--baseline", "{tmp}/broken", "--out", "{tmp}/r.html"],
            "--baseline {tmp}/broken: {tmp}/broken/settings.toml: invalid TOML",
        ),
        (
            ["{derby}", "--out", "{tmp}/missing/r.html"],
            "--out {tmp}/missing/r.html: folder {tmp}/missing does not exist",
        ),
        (
            ["{derby}", "--out", "{tmp}/r.html", "--csv", "{tmp}/a-file"],
            "--csv {tmp}/a-file: exists and is not a folder",
        ),
        (["{tmp}/empty.hl7", "--out", "{tmp}/r.html"], "{tmp}/empty.hl7: no HL7 v2 messages"),
    ],
)
def test_command_errors_name_the_file_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "empty.hl7").write_text("")
    broken = tmp_path / "broken"
    shutil.copytree(RULES, broken, ignore=shutil.ignore_patterns("__pycache__"))
    (broken / "settings.toml").write_text("[[[\n")
    fill = {"tmp": str(tmp_path), "derby": str(DERBY)}
    code = cli.main(["backtest", *(a.format(**fill) for a in argv)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith(f"safetynet: error: {message.format(**fill)}")
    assert not (tmp_path / "r.html").exists()


def test_until_without_an_offset_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["backtest", str(DERBY), "--out", "r.html", "--until", "2008-05-03T00:00:00"])
    assert stopped.value.code == 2
    assert "needs a UTC offset" in capsys.readouterr().err

"""`safetynet rules test` and `safetynet rules check` (adapters.governance.rule_tools): the
real catalogue passes, each check catches a fault planted in a copy of rules/, and a failing
case reads as a sentence a clinician understands."""

from __future__ import annotations

import shutil
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.cli import main
from adapters.governance.rule_tools import (
    LOCK_NAME,
    check_rules,
    fingerprint,
    read_lock,
    rule_fingerprint,
)
from engine.catalogue import load_catalogue

RULES = Path(__file__).resolve().parents[1] / "rules"
R1 = "imaging-pending-at-discharge"
R6 = "final-report-overdue"
DERBY = "recall_derby_preliminary_only.toml"
FINAL_FIRST = "no_recall_final_before_discharge.toml"


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    """A copy of the shipped rules folder, lock included, to plant faults in."""
    target = tmp_path / "rules"
    shutil.copytree(RULES, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def edit(path: Path, old: str, new: str) -> None:
    """Replace `old` (which must be there) with `new` in a file."""
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def check_lines(rules: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main(["rules", "check", "--rules", str(rules), *extra])
    return code, capsys.readouterr().out


# --- rules check: the real catalogue ------------------------------------------------------


def test_the_shipped_catalogue_passes_rules_check() -> None:
    """CI keeps the lock honest: a rule whose rule.py or defaults change without a new version
    (or a README out of step with its rule.toml) fails here."""
    report = check_rules(RULES)
    assert report.ok, "\n".join(str(f) for f in report.findings)
    assert len(report.rules) == len(load_catalogue(RULES).rules)
    assert report.recorded == []


def test_the_lock_records_every_shipped_rule_at_its_version() -> None:
    lock = read_lock(RULES / LOCK_NAME)
    for rule in load_catalogue(RULES).rules:
        assert lock[rule.id][rule.version] == rule_fingerprint(rule.path)


def test_rules_check_prints_a_summary_and_exits_0(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = check_lines(rules, capsys)
    assert code == 0
    assert out.endswith("rule(s) checked: all in order.\n")


# --- rules check: rule.toml schema --------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('status = "active"', 'status = "paused"', "status 'paused' must be active, shadow or off"),
        ('version = "1.0.0"', 'version = "1.0"', "version '1.0' must be a version number"),
        ('owner = "Paediatric', 'ownr = "Paediatric', "rule.toml has no owner"),
        ('unit = "hours"', 'unit = "hrs"', "the unit 'hrs', which safetynet does not know"),
        ('default = "urgent"', 'default = "urgnet"', "must be one of routine, urgent, asap, stat"),
        ('default = 24\nunit = "months"', 'default = "24"\nunit = "months"', "must be a number"),
        ('unit = "hours"\ndoc = "The', 'unit = "hours"\nmaximum = 48\ndoc = "The', "'maximum'"),
        ("discharge_dependent = true", 'discharge_dependent = "yes"', "must be true or false"),
        ('id = "imaging-pending-at-discharge"', 'id = "imaging-pending"', "must be the folder's"),
    ],
)
def test_rules_check_finds_a_fault_in_rule_toml(
    rules: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, message: str
) -> None:
    edit(rules / R1 / "rule.toml", old, new)
    code, out = check_lines(rules, capsys)
    assert code == 1
    problem = [line for line in out.splitlines() if message in line]
    assert problem and problem[0].startswith(f"rule {R1}: "), out
    assert out.endswith("problem(s) to fix.\n")


def test_rules_check_finds_a_default_above_its_hard_limit(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(rules / R6 / "rule.toml", "default = 24\nmax = 72", "default = 96\nmax = 72")
    code, out = check_lines(rules, capsys)
    assert code == 1
    assert (
        f"rule {R6}: rule.toml: parameter skeletal_survey_hours: its default 96 is above its "
        "hard limit (max) 72\n"
    ) in out


def test_rules_check_reports_a_rule_toml_that_is_not_toml(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(rules / R1 / "rule.toml", 'title = "', 'title = "unterminated\n')
    code, out = check_lines(rules, capsys)
    assert code == 1
    assert f"rule {R1}: rule.toml not valid TOML" in out


def test_rules_check_reports_a_site_override_beyond_a_hard_limit(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """settings.toml is checked by loading the catalogue once every rule.toml is sound."""
    settings = rules / "settings.toml"
    settings.write_text(settings.read_text() + f"\n[rules.{R6}]\nskeletal_survey_hours = 96\n")
    code, out = check_lines(rules, capsys)
    assert code == 1
    assert "the catalogue does not load: " in out
    assert "skeletal_survey_hours = 96 exceeds its hard limit 72" in out


# --- rules check: cases -------------------------------------------------------------------


@pytest.mark.parametrize(("prefix", "kind"), [("no_recall_", "no-recall"), ("recall_", "recall")])
def test_rules_check_needs_both_kinds_of_case(
    rules: Path, capsys: pytest.CaptureFixture[str], prefix: str, kind: str
) -> None:
    for path in (rules / R1 / "cases").glob(f"{prefix}*.toml"):
        path.unlink()
    code, out = check_lines(rules, capsys)
    assert code == 1
    assert f"rule {R1}: no '{kind}' case (" in out


def test_rules_check_reports_an_unreadable_case_and_an_unknown_rule(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(rules / R1 / "cases" / DERBY, 'kind = "recall"', 'kind = "recal"')
    edit(
        rules / R6 / "cases" / "recall_survey_unreported_24h.toml", f'rule = "{R6}"', 'rule = "r6"'
    )
    code, out = check_lines(rules, capsys)
    assert code == 1
    assert f"rule {R1}: cases/{DERBY} cannot be read: kind must be 'recall' or 'no-recall'" in out
    assert "expects a Task from 'r6', which is not a rule of this folder" in out


# --- rules check: README in step with rule.toml -------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "| `ack_hours` | 24 | hours |",
            "| `ack_hours` | 12 | hours |",
            "README.md gives ack_hours the default 12; rule.toml says 24",
        ),
        (
            "| `ack_hours` | 24 | hours |",
            "| `ack_hours` | 24 | minutes |",
            "README.md gives ack_hours the unit minutes; rule.toml says hours",
        ),
        (
            "| `ack_hours` | 24 | hours |",
            "| `ack_hrs` | 24 | hours |",
            "README.md's parameter table does not list ack_hours (in rule.toml)",
        ),
        (
            "| `priority` | urgent |",
            "| `priority` | stat |",
            "README.md gives priority the default stat; rule.toml says urgent",
        ),
        (
            "# imaging-pending-at-discharge (v1.0.0)",
            "# imaging-pending-at-discharge (v0.9.0)",
            "README.md's title says imaging-pending-at-discharge v0.9.0; rule.toml says",
        ),
        ("## Sources", "## Reading", "README.md has no '## Sources' section"),
    ],
)
def test_rules_check_finds_a_readme_out_of_step(
    rules: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, message: str
) -> None:
    edit(rules / R1 / "README.md", old, new)
    code, out = check_lines(rules, capsys)
    assert code == 1
    assert f"rule {R1}: {message}" in out, out


def test_rules_check_finds_a_readme_parameter_rule_toml_lacks(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = rules / R1 / "README.md"
    edit(readme, "| `ack_hours` |", "| `settle_hours` | 2 | hours | Gone. |\n| `ack_hours` |")
    code, out = check_lines(rules, capsys)
    assert code == 1
    assert f"rule {R1}: README.md's parameter table lists settle_hours, which rule.toml" in out


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("| 24 (hard limit 72) |", "| 24 |", "does not give skeletal_survey_hours's hard limit"),
        (
            "| 24 (hard limit 72) |",
            "| 24 (hard limit 48) |",
            "the hard limit 48; rule.toml says 72",
        ),
        ("| `hours` | 24 |", "| `hours` | 24 (hard limit 72) |", "hours a hard limit of 72; rule"),
    ],
)
def test_rules_check_finds_a_readme_hard_limit_out_of_step(
    rules: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, message: str
) -> None:
    edit(rules / R6 / "README.md", old, new)
    code, out = check_lines(rules, capsys)
    assert code == 1
    assert message in out, out


# --- rules check: versions and the lock ---------------------------------------------------


def test_a_changed_rule_needs_a_new_version_and_the_lock_records_it(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock_path = rules / LOCK_NAME
    before = read_lock(lock_path)
    logic = rules / R1 / "rule.py"
    logic.write_text(logic.read_text() + "\n# a change of logic\n")

    code, out = check_lines(rules, capsys)
    assert code == 1
    message = (
        f"rule {R1} changed (logic or defaults) but its version is still 1.0.0: bump the "
        "version in rule.toml and run `safetynet rules check --update-lock`\n"
    )
    assert message in out
    # --update-lock never rewrites a recorded version's fingerprint.
    code, out = check_lines(rules, capsys, "--update-lock")
    assert code == 1 and message in out
    assert read_lock(lock_path) == before

    edit(rules / R1 / "rule.toml", 'version = "1.0.0"', 'version = "1.1.0"')
    edit(rules / R1 / "README.md", "(v1.0.0)", "(v1.1.0)")
    code, out = check_lines(rules, capsys)
    assert code == 1
    assert f"rule {R1} version 1.1.0 is not recorded in {LOCK_NAME} yet" in out

    code, out = check_lines(rules, capsys, "--update-lock")
    assert code == 0, out
    assert f"rule {R1}: recorded version 1.1.0 in {LOCK_NAME}\n" in out
    after = read_lock(lock_path)
    assert after[R1] == {"1.0.0": before[R1]["1.0.0"], "1.1.0": rule_fingerprint(rules / R1)}
    assert {k: v for k, v in after.items() if k != R1} == {
        k: v for k, v in before.items() if k != R1
    }
    assert check_lines(rules, capsys) == (0, f"{len(after)} rule(s) checked: all in order.\n")


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.replace(
            "[parameters.ack_hours]\ndefault = 24", "[parameters.ack_hours]\ndefault = 12"
        ),
        lambda t: t.replace("discharge_dependent = true", "discharge_dependent = false"),
    ],
    ids=["a default", "the [tasks] table"],
)
def test_a_changed_default_or_tasks_table_changes_the_fingerprint(
    rules: Path, change: Callable[[str], str]
) -> None:
    card = rules / R1 / "rule.toml"
    before = rule_fingerprint(rules / R1)
    changed = change(card.read_text())
    assert changed != card.read_text()
    card.write_text(changed)
    assert rule_fingerprint(rules / R1) != before


def test_status_docs_and_line_endings_leave_the_fingerprint_alone(rules: Path) -> None:
    card = rules / R1 / "rule.toml"
    before = rule_fingerprint(rules / R1)
    edit(card, 'status = "active"', 'status = "shadow"')
    edit(card, 'title = "Imaging pending at discharge"', 'title = "Imaging still pending"')
    edit(card, 'doc = "Priority of the Task', 'doc = "How urgent the Task is')
    logic = rules / R1 / "rule.py"
    logic.write_bytes(logic.read_bytes().replace(b"\n", b"\r\n"))
    assert rule_fingerprint(rules / R1) == before
    parsed = tomllib.loads(card.read_text())
    assert fingerprint(parsed, logic.read_bytes()) == before


def test_a_lower_version_is_refused(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edit(rules / R1 / "rule.toml", 'version = "1.0.0"', 'version = "0.9.0"')
    edit(rules / R1 / "README.md", "(v1.0.0)", "(v0.9.0)")
    code, out = check_lines(rules, capsys, "--update-lock")
    assert code == 1
    assert f"rule {R1}'s version 0.9.0 is lower than 1.0.0, already recorded" in out
    assert "0.9.0" not in read_lock(rules / LOCK_NAME)[R1]


def test_a_missing_lock_is_a_problem_until_created(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (rules / LOCK_NAME).unlink()
    code, out = check_lines(rules, capsys)
    assert code == 1
    assert f"the rules folder has no {LOCK_NAME}: run `safetynet rules check --update-lock`" in out
    code, out = check_lines(rules, capsys, "--update-lock")
    assert code == 0, out
    assert read_lock(rules / LOCK_NAME) == read_lock(RULES / LOCK_NAME)


def test_rules_check_on_a_missing_folder_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rules", "check", "--rules", str(tmp_path / "nowhere")]) == 2
    assert "rules folder not found" in capsys.readouterr().err


# --- rules test ---------------------------------------------------------------------------


def run_test(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["rules", "test", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_rules_test_passes_one_rule_and_exits_0(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_test(capsys, str(rules / R1))
    count = len(list((rules / R1 / "cases").glob("*.toml")))
    assert code == 0
    lines = out.splitlines()
    assert len([x for x in lines if x.startswith(f"PASS    {R1}  ")]) == count
    assert f"PASS    {R1}  recall_derby_preliminary_only: A 7-week-old boy is sent home" in out
    assert lines[-1] == f"{count} case(s) of 1 rule(s): {count} passed, 0 failed."


def test_rules_test_says_an_expected_task_was_not_raised(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = rules / R1 / "cases" / FINAL_FIRST
    edit(case, 'kind = "no-recall"', 'kind = "recall"')
    case.write_text(
        case.read_text() + f'\n[[expect]]\nrule = "{R1}"\norder = "ORD-1"\npriority = "urgent"\n'
        'owner = "C1001"\nwithin = "24 hours"\n'
    )
    code, out, _ = run_test(capsys, str(case))
    assert code == 1
    assert out.startswith(f"FAIL    {R1}  no_recall_final_before_discharge: The skeletal survey")
    assert (
        f"        - expected an urgent Task from {R1} for order ORD-1, owned by the attending "
        "(C1001), due within 24 hours; none was raised\n"
    ) in out
    assert f"        case file: {case}\n" in out
    assert out.splitlines()[-1] == "1 case(s) of 1 rule(s): 0 passed, 1 failed."


def test_rules_test_says_which_task_was_raised_when_none_was_expected(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = rules / R1 / "cases" / DERBY
    text = case.read_text()
    case.write_text(
        text[: text.index("[[expect]]")].replace('kind = "recall"', 'kind = "no-recall"')
    )
    code, out, _ = run_test(capsys, str(case))
    assert code == 1
    assert (
        f"        - expected no Task; {R1} raised an urgent Task for order ORD-1, owned by the "
        'attending (C1001): "7-week-old boy discharged from the paediatric emergency department '
        "at 14:00 on 1 May 2008 while XR skeletal survey had only a preliminary report."
    ) in out


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ('priority = "urgent"', 'priority = "stat"', "expected priority stat; got urgent"),
        (
            'owner = "C1001"',
            'owner = "C9001"',
            "expected it to be owned by the consultant in charge (C9001); it is owned by the "
            "attending (C1001)",
        ),
        (
            'owner = "C1001"',
            'owner = "C1001"\nstatus = "accepted"',
            "expected status accepted (accepted by its owner); got requested (waiting for its "
            "owner to accept it)",
        ),
        (
            'owner = "C1001"',
            'owner = "C1001"\nwithin = "4 hours"',
            "expected it to be due within 4 hours of being raised; it is due 24 hours after",
        ),
    ],
    ids=["priority", "owner", "status", "deadline"],
)
def test_rules_test_says_what_differs_in_a_task_that_was_raised(
    rules: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, says: str
) -> None:
    case = rules / R1 / "cases" / DERBY
    edit(case, old, new)
    code, out, _ = run_test(capsys, "--rules", str(rules), str(case))
    assert code == 1
    assert f"        - {R1} for order ORD-1: {says}\n" in out, out


def test_a_site_override_is_what_rules_test_tests(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The walk-through of the README: tune a parameter in settings.toml, see which cases
    now disagree with it."""
    settings = rules / "settings.toml"
    settings.write_text(settings.read_text() + f'\n[rules.{R1}]\npriority = "stat"\n')
    code, out, _ = run_test(capsys, "--rules", str(rules), "--rule", R1)
    assert code == 1
    assert f"        - {R1} for order ORD-1: expected priority urgent; got stat\n" in out
    assert "FAIL    " + R1 + "  recall_derby_preliminary_only:" in out


def test_a_broken_case_file_exits_2_naming_the_file_and_the_problem(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    case = rules / R1 / "cases" / DERBY
    edit(case, 'priority = "urgent"', 'prority = "urgent"')
    code, out, _ = run_test(capsys, str(rules / R1))
    assert code == 2
    broken = [line for line in out.splitlines() if line.startswith("BROKEN")]
    assert len(broken) == 1
    assert DERBY in broken[0]
    assert "expect 1: unknown key 'prority'" in broken[0]
    assert out.splitlines()[-1].endswith("1 could not be read or run (fix the case file).")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rule", "no-such-rule"], "no rule 'no-such-rule'"),
        (["/nowhere/at/all"], "no such file or folder"),
    ],
)
def test_rules_test_exits_2_on_a_wrong_selection(
    rules: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, _, err = run_test(capsys, "--rules", str(rules), *argv)
    assert code == 2
    assert message in err


def test_rules_test_outside_a_rules_folder_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_test(capsys, str(tmp_path))
    assert code == 2
    assert "not inside a rules folder" in err

"""The clinical safety case: the hazard log is complete, its controls name tests that exist,
the signed summary is generated from it, and a full test run fails when a control's test does
not pass."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adapters import package_version
from adapters.cli import SAFETY_LOG, main
from adapters.governance.safety_case import (
    LIKELIHOOD,
    SEVERITY,
    check_log,
    load_log,
    render_summary,
    risk,
    unproven_controls,
)

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = ROOT / "safety" / "safety-case.md"


def test_the_hazard_log_is_complete_and_every_control_names_a_test_that_exists() -> None:
    log = load_log(SAFETY_LOG)
    assert check_log(log, ROOT) == []
    assert len(log.hazards) >= 10
    assert all(control.tests for hazard in log.hazards for control in hazard.controls)


def test_the_committed_safety_case_is_generated_from_the_log() -> None:
    expected = render_summary(load_log(SAFETY_LOG), package_version())
    assert SUMMARY.read_text(encoding="utf-8") == expected, (
        "safety/safety-case.md is out of date: run "
        "`safetynet safety report --out safety/safety-case.md`"
    )


def test_the_risk_matrix_is_dcb0160s() -> None:
    assert risk("Minor", "Very low") == 1
    assert risk("Catastrophic", "Very high") == 5
    assert risk("Major", "Medium") == 3
    assert risk("Catastrophic", "Medium") == 4
    for likelihood in LIKELIHOOD:  # more severe never means less risk
        ratings = [risk(severity, likelihood) for severity in SEVERITY]
        assert ratings == sorted(ratings)
    for severity in SEVERITY:
        ratings = [risk(severity, likelihood) for likelihood in LIKELIHOOD]
        assert ratings == sorted(ratings)


BROKEN = """
[system]
name = "x"
intended_use = "x"
scope = "x"
clinical_safety_officer = "x"

[[hazard]]
id = "H1"
title = "t"
cause = "c"
effect = "e"
harm = "h"
severity = "Major"
likelihood = "Often"
residual_severity = "Major"
residual_likelihood = "Low"
status = "closed"
owner = "o"
[[hazard.control]]
control = "no test"
kind = "design"
tests = []
[[hazard.control]]
control = "a test that is not there"
kind = "design"
tests = ["tests/test_safety_case.py::test_that_does_not_exist"]

[[hazard]]
id = "H1"
title = "t"
cause = "c"
effect = "e"
harm = "h"
severity = "Catastrophic"
likelihood = "High"
residual_severity = "Catastrophic"
residual_likelihood = "High"
status = "closed"
owner = "o"
"""


def test_a_broken_log_is_reported_problem_by_problem(tmp_path: Path) -> None:
    path = tmp_path / "hazard-log.toml"
    path.write_text(BROKEN, encoding="utf-8")
    problems = check_log(load_log(path), ROOT)
    assert "hazard H1: likelihood 'Often' is not one of Very low, Low, Medium, High, Very high" in (
        problems
    )
    assert "hazard H1 control 1: names no test that proves it" in problems
    assert (
        "hazard H1 control 2: the test tests/test_safety_case.py::test_that_does_not_exist "
        "does not exist" in problems
    )
    assert "hazard H1: the id is used twice" in problems
    assert "hazard H1: has no control" in problems
    assert any("closed with a residual risk of 5" in p for p in problems)


def test_controls_are_unproven_unless_every_named_case_ran_and_passed() -> None:
    log = load_log(SAFETY_LOG)
    named = sorted({t for h in log.hazards for c in h.controls for t in c.tests})
    everything = {test: "passed" for test in named}
    assert unproven_controls(log, everything) == []
    parametrised = {f"{test}[a]": "passed" for test in named}
    assert unproven_controls(log, parametrised) == []
    one = named[0]
    assert unproven_controls(log, {**everything, f"{one}[b]": "skipped"}) == [
        f"{one}: named by the hazard log, skipped"
    ]
    missing = {test: "passed" for test in named[1:]}
    assert unproven_controls(log, missing) == [f"{one}: named by the hazard log, did not run"]


def test_cli_check_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["safety", "check"]) == 0
    assert "every control names a test" in capsys.readouterr().out
    broken = tmp_path / "safety" / "hazard-log.toml"
    broken.parent.mkdir()
    broken.write_text(BROKEN, encoding="utf-8")
    assert main(["safety", "check", "--log", str(broken)]) == 1
    assert "names no test that proves it" in capsys.readouterr().err
    out = tmp_path / "case.md"
    assert main(["safety", "report", "--out", str(out), "--release", "9.9.9"]) == 0
    assert out.read_text(encoding="utf-8").startswith(
        "# Clinical safety case summary: safetynet 9.9.9"
    )
    (tmp_path / "bad.toml").write_text("[system", encoding="utf-8")
    assert main(["safety", "check", "--log", str(tmp_path / "bad.toml")]) == 2
    assert "bad.toml: not valid TOML" in capsys.readouterr().err


def _run_checks(project: Path, log: str) -> subprocess.CompletedProcess[str]:
    (project / "hazards.toml").write_text(log, encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SAFETYNET_HAZARD_LOG": str(project / "hazards.toml"),
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.safety_plugin",
            "-p",
            "no:cacheprovider",
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_full_run_fails_when_a_named_test_does_not_pass(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\ntestpaths = checks\n", encoding="utf-8")
    (tmp_path / "checks").mkdir()
    (tmp_path / "checks" / "test_a.py").write_text(
        textwrap.dedent(
            """
            import pytest

            def test_ok():
                assert True

            @pytest.mark.skip(reason="not here")
            def test_skipped():
                pass
            """
        ),
        encoding="utf-8",
    )
    header = BROKEN.split("[[hazard]]", 1)[0]
    hazard = (
        '[[hazard]]\nid = "H1"\n[[hazard.control]]\ncontrol = "c"\nkind = "design"\n'
        "tests = [{tests}]\n"
    )
    good = _run_checks(tmp_path, header + hazard.format(tests='"checks/test_a.py::test_ok"'))
    assert good.returncode == 0, good.stdout + good.stderr
    bad = _run_checks(tmp_path, header + hazard.format(tests='"checks/test_a.py::test_skipped"'))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "checks/test_a.py::test_skipped: named by the hazard log, skipped" in bad.stdout

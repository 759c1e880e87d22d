"""Pytest plugin: a full test run fails when a control of the hazard log is not proven.

`safety/hazard-log.toml` names, for each control, the tests that prove it. After a full run
(`make test`: the configured test paths, no -k/-m/--lf selection), every named test must have
run and passed; otherwise the run fails with the list, even if pytest's own tally is green
(e.g. a named test was skipped, renamed away or deselected). Partial runs are not judged, nor
runs with SAFETYNET_SKIP_POSTGRES=1; the log names no test that needs ../shared/corpus.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapters.governance.safety_case import load_log, unproven_controls

# SAFETYNET_HAZARD_LOG names another log (the plugin's own test uses it).
LOG = Path(
    os.environ.get("SAFETYNET_HAZARD_LOG")
    or Path(__file__).resolve().parents[1] / "safety" / "hazard-log.toml"
)
_outcomes: dict[str, str] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or report.outcome != "passed":
        previous = _outcomes.get(report.nodeid, "passed")
        _outcomes[report.nodeid] = report.outcome if previous == "passed" else previous


def _full_run(config: pytest.Config) -> bool:
    option = config.option
    return (
        config.args_source == pytest.Config.ArgsSource.TESTPATHS
        and not option.keyword
        and not option.markexpr
        and not getattr(option, "lf", False)
        and not getattr(option, "deselect", None)
        and not getattr(option, "maxfail", 0)
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _full_run(session.config):
        return
    problems = unproven_controls(load_log(LOG), _outcomes)
    if not problems:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if os.environ.get("SAFETYNET_SKIP_POSTGRES") == "1":
        # A developer's machine without PostgreSQL: say so, but do not judge (CI has it).
        if reporter is not None:
            reporter.write_sep("=", "hazard log not judged (SAFETYNET_SKIP_POSTGRES=1)")
        return
    if reporter is not None:
        reporter.write_sep("=", "hazard log: controls without passing evidence", red=True)
        for problem in problems:
            reporter.write_line(problem)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

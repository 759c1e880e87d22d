"""The clinical safety case (DCB0129): the hazard log, its checks, and the summary a clinical
safety officer signs.

`safety/hazard-log.toml` holds one `[[hazard]]` per identified hazard: what can go wrong
(hazard), why (cause), what it does to a patient (effect, harm), its initial and residual
severity and likelihood on the DCB0129/DCB0160 scales, and its controls. Every control names
the tests that prove it (`tests/test_x.py::test_name`, a prefix of pytest node ids: all of a
parametrised test's cases count).

* `check_log` finds what is wrong with the log itself: unknown scale values, a hazard without
  a control, a control without a test, a test that does not exist, an accepted (closed)
  hazard whose residual risk is still unacceptable.
* `unproven_controls` compares the log with the outcomes of a test run: the pytest plugin in
  tests/conftest.py fails a full run when any named test did not run or did not pass.
* `render_summary` writes the safety case summary (Markdown) from the log; the committed
  `safety/safety-case.md` must equal it (a test says so), so it is regenerated for each
  release with `safetynet safety report`.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LIKELIHOOD",
    "SEVERITY",
    "Control",
    "Hazard",
    "HazardLog",
    "check_log",
    "load_log",
    "render_summary",
    "risk",
    "unproven_controls",
]

# DCB0160 §4 scales, least to most.
SEVERITY = ("Minor", "Significant", "Considerable", "Major", "Catastrophic")
LIKELIHOOD = ("Very low", "Low", "Medium", "High", "Very high")
# The DCB0160 risk matrix: RISK[likelihood][severity], 1 (acceptable) to 5 (unacceptable).
_MATRIX = (
    (1, 1, 2, 2, 3),  # Very low
    (1, 2, 2, 3, 4),  # Low
    (2, 2, 3, 3, 4),  # Medium
    (2, 3, 3, 4, 5),  # High
    (3, 4, 4, 5, 5),  # Very high
)
RISK_MEANING = {
    1: "Acceptable",
    2: "Acceptable where cost of further reduction outweighs benefit",
    3: "Undesirable: accept only with the clinical safety officer's agreement",
    4: "Mandatory elimination or control to reduce risk to an acceptable level",
    5: "Unacceptable",
}
STATUSES = ("open", "closed", "transferred")
CONTROL_KINDS = ("design", "test", "process", "training", "configuration")


def risk(severity: str, likelihood: str) -> int:
    """The DCB0160 risk rating of a severity and likelihood."""
    return _MATRIX[LIKELIHOOD.index(likelihood)][SEVERITY.index(severity)]


@dataclass(frozen=True, slots=True)
class Control:
    """One control of a hazard, with the tests that prove it."""

    text: str
    kind: str
    tests: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Hazard:
    """One entry of the hazard log."""

    id: str
    title: str
    cause: str
    effect: str
    harm: str
    severity: str
    likelihood: str
    residual_severity: str
    residual_likelihood: str
    status: str
    owner: str
    controls: tuple[Control, ...]
    notes: str = ""

    @property
    def initial_risk(self) -> int:
        """Risk before the controls."""
        return risk(self.severity, self.likelihood)

    @property
    def residual_risk(self) -> int:
        """Risk with the controls in place."""
        return risk(self.residual_severity, self.residual_likelihood)


@dataclass(frozen=True, slots=True)
class HazardLog:
    """The hazard log and the facts of the system it covers."""

    path: Path
    system: str
    intended_use: str
    scope: str
    assumptions: tuple[str, ...]
    clinical_safety_officer: str
    hazards: tuple[Hazard, ...]


class HazardLogError(Exception):
    """The log cannot be read at all (not TOML, a required table missing)."""


def _text(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise HazardLogError(f"{where}: {key} must be text")
    return " ".join(value.split())


def load_log(path: Path) -> HazardLog:
    """Read the hazard log. Raises HazardLogError naming the file and the problem."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise HazardLogError(f"{path}: cannot be read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise HazardLogError(f"{path}: not valid TOML: {exc}") from exc
    system = data.get("system")
    if not isinstance(system, Mapping):
        raise HazardLogError(f"{path}: the [system] table is missing")
    hazards = []
    for number, entry in enumerate(data.get("hazard", []), start=1):
        where = f"{path}: hazard {entry.get('id') or number}"
        controls = tuple(
            Control(
                text=_text(control, "control", where),
                kind=_text(control, "kind", where),
                tests=tuple(str(test) for test in control.get("tests", [])),
            )
            for control in entry.get("control", [])
        )
        hazards.append(
            Hazard(
                id=_text(entry, "id", where),
                title=_text(entry, "title", where),
                cause=_text(entry, "cause", where),
                effect=_text(entry, "effect", where),
                harm=_text(entry, "harm", where),
                severity=_text(entry, "severity", where),
                likelihood=_text(entry, "likelihood", where),
                residual_severity=_text(entry, "residual_severity", where),
                residual_likelihood=_text(entry, "residual_likelihood", where),
                status=_text(entry, "status", where),
                owner=_text(entry, "owner", where),
                controls=controls,
                notes=_text(entry, "notes", where),
            )
        )
    return HazardLog(
        path=path,
        system=_text(system, "name", f"{path}: [system]"),
        intended_use=_text(system, "intended_use", f"{path}: [system]"),
        scope=_text(system, "scope", f"{path}: [system]"),
        assumptions=tuple(" ".join(str(a).split()) for a in system.get("assumptions", [])),
        clinical_safety_officer=_text(system, "clinical_safety_officer", f"{path}: [system]"),
        hazards=tuple(hazards),
    )


def _test_exists(root: Path, node: str) -> bool:
    """Whether `file::name` or `file::Class::name` is a test function defined in the file."""
    file, _, rest = node.partition("::")
    path = root / file
    if not rest or not path.is_file():
        return False
    names = rest.split("[", 1)[0].split("::")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    scope: Iterable[ast.stmt] = tree.body
    for depth, name in enumerate(names):
        last = depth == len(names) - 1
        wanted = (ast.FunctionDef, ast.AsyncFunctionDef) if last else (ast.ClassDef,)
        found = next((n for n in scope if isinstance(n, wanted) and n.name == name), None)
        if found is None:
            return False
        scope = getattr(found, "body", [])
    return True


def check_log(log: HazardLog, root: Path) -> list[str]:
    """Every problem with the log, in plain words (empty: none). `root`: the repository, to
    find the tests the controls name."""
    problems: list[str] = []
    seen: set[str] = set()
    for field in ("system", "intended_use", "scope", "clinical_safety_officer"):
        if not getattr(log, field):
            problems.append(f"[system] {field} is empty")
    for hazard in log.hazards:
        label = f"hazard {hazard.id or '(no id)'}"
        if not hazard.id:
            problems.append("a hazard has no id")
        elif hazard.id in seen:
            problems.append(f"{label}: the id is used twice")
        seen.add(hazard.id)
        for field in ("title", "cause", "effect", "harm", "owner"):
            if not getattr(hazard, field):
                problems.append(f"{label}: {field} is empty")
        scales_ok = True
        for field, scale in (
            ("severity", SEVERITY),
            ("residual_severity", SEVERITY),
            ("likelihood", LIKELIHOOD),
            ("residual_likelihood", LIKELIHOOD),
        ):
            value = getattr(hazard, field)
            if value not in scale:
                scales_ok = False
                problems.append(f"{label}: {field} {value!r} is not one of {', '.join(scale)}")
        if hazard.status not in STATUSES:
            problems.append(f"{label}: status {hazard.status!r} is not one of {STATUSES}")
        if scales_ok and hazard.status == "closed" and hazard.residual_risk >= 4:
            problems.append(
                f"{label}: closed with a residual risk of {hazard.residual_risk} "
                f"({RISK_MEANING[hazard.residual_risk]}): it cannot be accepted"
            )
        if not hazard.controls:
            problems.append(f"{label}: has no control")
        for number, control in enumerate(hazard.controls, start=1):
            where = f"{label} control {number}"
            if not control.text:
                problems.append(f"{where}: says nothing")
            if control.kind not in CONTROL_KINDS:
                problems.append(f"{where}: kind {control.kind!r} is not one of {CONTROL_KINDS}")
            if not control.tests:
                problems.append(f"{where}: names no test that proves it")
            for test in control.tests:
                if not _test_exists(root, test):
                    problems.append(f"{where}: the test {test} does not exist")
    return problems


def named_tests(log: HazardLog) -> set[str]:
    """Every test the controls name."""
    return {test for hazard in log.hazards for control in hazard.controls for test in control.tests}


def unproven_controls(log: HazardLog, outcomes: Mapping[str, str]) -> list[str]:
    """The tests named by controls that did not run, or ran and did not pass, in a test run
    whose node ids and outcomes ("passed", "failed", "skipped") are `outcomes`."""
    problems = []
    for test in sorted(named_tests(log)):
        ran = [
            outcome
            for node, outcome in outcomes.items()
            if node == test or node.startswith(test + "[") or node.startswith(test + "::")
        ]
        if not ran:
            problems.append(f"{test}: named by the hazard log, did not run")
        elif any(outcome != "passed" for outcome in ran):
            bad = sorted({outcome for outcome in ran if outcome != "passed"})
            problems.append(f"{test}: named by the hazard log, {' and '.join(bad)}")
    return problems


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_summary(log: HazardLog, release: str) -> str:
    """The safety case summary (Markdown) for `release`, generated from the log."""
    hazards = sorted(log.hazards, key=lambda h: h.id)
    open_ = [h for h in hazards if h.status == "open"]
    lines = [
        f"# Clinical safety case summary: {log.system} {release}",
        "",
        "Generated from `safety/hazard-log.toml` by `safetynet safety report`; do not edit by "
        "hand. Prepared in the form of DCB0129 (Clinical Risk Management: its Application in "
        "the Manufacture of Health IT Systems).",
        "",
        "## 1. System and intended use",
        "",
        log.intended_use,
        "",
        "## 2. Scope of this safety case",
        "",
        log.scope,
        "",
        "## 3. Clinical risk management",
        "",
        "Hazards are identified, assessed and controlled in the hazard log. Each hazard is "
        "rated before and after its controls on the DCB0160 scales (severity: "
        + ", ".join(SEVERITY)
        + "; likelihood: "
        + ", ".join(LIKELIHOOD)
        + ") and the risk read from the matrix below. Every control names the automated "
        "tests that prove it; continuous integration fails when a named test is missing or "
        "does not pass, so no release carries a control without current evidence.",
        "",
        "| likelihood \\ severity | " + " | ".join(SEVERITY) + " |",
        "|---|" + "---|" * len(SEVERITY),
    ]
    for row, likelihood in reversed(list(enumerate(LIKELIHOOD))):
        lines.append(f"| {likelihood} | " + " | ".join(str(v) for v in _MATRIX[row]) + " |")
    lines += [
        "",
        "Risk ratings: "
        + "; ".join(f"{level} {meaning}" for level, meaning in RISK_MEANING.items())
        + ".",
        "",
        "## 4. Hazards",
        "",
        "| id | hazard | initial risk | residual risk | status | owner |",
        "|---|---|---|---|---|---|",
    ]
    for h in hazards:
        lines.append(
            f"| {h.id} | {_cell(h.title)} | {h.initial_risk} ({h.severity}, {h.likelihood}) "
            f"| {h.residual_risk} ({h.residual_severity}, {h.residual_likelihood}) "
            f"| {h.status} | {_cell(h.owner)} |"
        )
    lines += ["", "## 5. Hazards, controls and evidence", ""]
    for h in hazards:
        lines += [
            f"### {h.id}: {h.title}",
            "",
            f"- **Cause:** {h.cause}",
            f"- **Effect:** {h.effect}",
            f"- **Possible harm:** {h.harm}",
            f"- **Risk:** initial {h.initial_risk}, residual {h.residual_risk} "
            f"({RISK_MEANING[h.residual_risk]})",
            "- **Controls:**",
        ]
        for control in h.controls:
            lines.append(f"  - ({control.kind}) {control.text}")
            lines += [f"    - evidence: `{test}`" for test in control.tests]
        if h.notes:
            lines.append(f"- **Notes:** {h.notes}")
        lines.append("")
    lines += ["## 6. Assumptions and conditions of use", ""]
    lines += [f"- {assumption}" for assumption in log.assumptions]
    lines += ["", "## 7. Outstanding hazards", ""]
    if open_:
        lines += [f"- {h.id}: {h.title} (residual risk {h.residual_risk})" for h in open_]
    else:
        lines.append("None: every hazard in the log is closed or transferred.")
    highest = max((h.residual_risk for h in hazards), default=1)
    lines += [
        "",
        "## 8. Conclusion and declaration",
        "",
        f"{len(hazards)} hazards are recorded; {len(open_)} remain open. The highest residual "
        f"risk is {highest} ({RISK_MEANING[highest]}). Every control is evidenced by tests that "
        "passed in the continuous integration run of this release.",
        "",
        "I have reviewed this safety case and the hazard log it summarises, and I am satisfied "
        "that the residual clinical risk of this release is acceptable for its intended use.",
        "",
        f"Clinical safety officer: {log.clinical_safety_officer}",
        "",
        "Signature: ______________________  Date: ______________  Registration: ____________",
        "",
    ]
    return "\n".join(lines)

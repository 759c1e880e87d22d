"""`safetynet rules test` and `safetynet rules check`: the rule catalogue, read out for the
clinical governance leads who own it. They are clinicians, not programmers: every line says
what is wrong in words, and which file to change.

* `rules test` runs rule cases through the real engine (adapters.cases) and prints one line
  per case, PASS or FAIL, with a sentence per difference ("expected an urgent Task from ...
  owned by the attending (C1001); none was raised"). Exit 0 all passed, 1 any failed, 2 a
  case file could not be read (named, with the problem).
* `rules check` checks each rule folder without running it: the rule card (`rule.toml`), both
  kinds of case, the README's parameter table against the card, and the version lock.

The version lock, `rule-versions.lock` in the rules folder (TOML: one table per rule, version
-> fingerprint), makes "a rule whose logic or defaults change gets a new version" (STYLE 9)
checkable. A fingerprint is the sha256 of the rule's `rule.py` and of the card's behaviour:
its parameter defaults, hard limits (`max`) and `[tasks]` table; not its status (the site's
decision), nor its title, summary, docs or units (words). `--update-lock` records the versions
not yet in the lock; it never rewrites the fingerprint of a version already recorded, so a
changed rule cannot keep its old version number. What rule.py imports from `engine/` is not
fingerprinted: shared code is tested and versioned with the engine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeGuard
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from adapters.cases import Case, CaseResult, load_case, run_case
from engine.catalogue import STATUSES, Catalogue, load_catalogue
from engine.errors import ConfigurationError
from engine.tasks import PRIORITIES

__all__ = [
    "KNOWN_UNITS",
    "LOCK_NAME",
    "CaseOutcome",
    "CheckReport",
    "Finding",
    "case_title",
    "check_command",
    "check_rules",
    "fingerprint",
    "read_lock",
    "rule_fingerprint",
    "run_cases",
    "select_cases",
    "test_command",
    "write_lock",
]

LOCK_NAME = "rule-versions.lock"
UPDATE_HINT = "run `safetynet rules check --update-lock`"
TIME_UNITS = ("minutes", "hours", "days", "weeks", "months", "years")
KNOWN_UNITS = (*TIME_UNITS, "FHIR priority")
# rule.toml keys, with what each is for (said when one is missing).
CARD_KEYS = {
    "id": "the rule's name, the same as its folder's",
    "title": "what the rule is called in plain words",
    "version": "e.g. 1.0.0",
    "status": "active, shadow or off",
    "owner": "the governance lead who answers for the rule",
    "summary": "a paragraph saying what the rule does",
}
OPTIONAL_CARD_KEYS = ("parameters", "tasks")
PARAMETER_KEYS = ("default", "unit", "doc", "max")
TASK_FLAGS = ("discharge_dependent", "safeguarding", "escalates")
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)
README_TITLE = re.compile(r"^#\s+(\S+)\s+\(v([^)\s]+)\)\s*$")
TITLE_WIDTH = 90
HARD_LIMIT = re.compile(r"^(.*?)\s*\(hard limit\s+([^)]*)\)\s*$")


# --- rules test --------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseOutcome:
    """One case file's outcome: its result, or why it could not be read or run."""

    rule: str
    path: Path
    result: CaseResult | None = None
    broken: str = ""

    @property
    def status(self) -> str:
        """PASS, FAIL or BROKEN."""
        if self.result is None:
            return "BROKEN"
        return "PASS" if self.result.passed else "FAIL"


def case_title(case: Case, width: int = TITLE_WIDTH) -> str:
    """The first sentence of the case's description (its file name when it has none), cut at
    a word to at most `width` characters: the listing stays one line per case."""
    text = " ".join(case.description.split())
    if not text:
        return case.path.stem.replace("_", " ")
    end = re.search(r"[.!?](\s|$)", text)
    text = text[: end.start() + 1] if end else text
    if len(text) <= width:
        return text
    return text[: width - 3].rsplit(" ", 1)[0].rstrip(",;:") + "..."


def select_cases(
    catalogue: Catalogue, under: Path | None = None, rule_id: str | None = None
) -> list[tuple[str, Path]]:
    """(rule id, case file) for every case of the catalogue under `under` (a rule folder, a
    cases folder or one case file; None: all), of one rule when `rule_id` is given.
    ConfigurationError when the rule does not exist or nothing is selected."""
    if rule_id is not None and rule_id not in {r.id for r in catalogue.rules}:
        raise ConfigurationError(
            f"no rule {rule_id!r} in {catalogue.path} (rules: "
            + ", ".join(r.id for r in catalogue.rules)
            + ")"
        )
    base = under.resolve() if under is not None else None
    chosen = [
        (rule.id, path)
        for rule in catalogue.rules
        if rule_id is None or rule.id == rule_id
        for path in sorted((rule.path / "cases").glob("*.toml"))
        if base is None or path.resolve() == base or path.resolve().is_relative_to(base)
    ]
    if not chosen:
        where = f"{under}" if under is not None else str(catalogue.path)
        raise ConfigurationError(
            f"{where}: no case files here" + (f" for rule {rule_id}" if rule_id else "")
        )
    return chosen


def run_cases(catalogue: Catalogue, cases: Iterable[tuple[str, Path]]) -> Iterator[CaseOutcome]:
    """Run each case with the catalogue's own settings (the site's overrides included)."""
    tz = catalogue.site.timezone
    for rule_id, path in cases:
        try:
            case = load_case(path, tz)
        except ConfigurationError as exc:
            yield CaseOutcome(rule_id, path, broken=exc.reason)
            continue
        try:
            result = run_case(case, catalogue)
        except Exception as exc:  # the engine refused the case: say so, run the others
            yield CaseOutcome(
                rule_id, path, broken=f"{path}: the engine could not run it: {_exc_words(exc)}"
            )
            continue
        yield CaseOutcome(rule_id, path, result)


def _exc_words(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or str(exc)
    return f"{type(exc).__name__}: {reason}"


def _shown(path: Path) -> str:
    """A path as short as it can be said: relative to the working folder when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _rules_folder_of(target: Path) -> Path:
    for folder in (target, *target.parents):
        if folder.is_dir() and (folder / "settings.toml").is_file():
            return folder
    raise ConfigurationError(
        f"{target}: not inside a rules folder (no settings.toml above it); give --rules"
    )


def test_command(
    target: str | None, rules: str | None, rule_id: str | None, default_rules: Path, out: TextIO
) -> int:
    """`safetynet rules test [DIR] [--rules DIR] [--rule ID]`: print one line per case and a
    summary; 0 all passed, 1 any failed, 2 any case file broken. ConfigurationError when the
    rules folder cannot be loaded or nothing matches."""
    under = Path(target) if target else None
    if under is not None and not under.exists():
        raise ConfigurationError(f"{under}: no such file or folder")
    if rules:
        folder = Path(rules)
    elif under is not None:
        folder = _rules_folder_of(under.resolve())
    else:
        folder = default_rules
    catalogue = load_catalogue(folder)
    outcomes = []
    chosen = select_cases(catalogue, under, rule_id)
    width = max(len(r) for r, _ in chosen)
    for outcome in run_cases(catalogue, chosen):
        outcomes.append(outcome)
        out.write(_outcome_lines(outcome, width))
        out.flush()
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("PASS", "FAIL", "BROKEN")}
    rules_run = len({o.rule for o in outcomes})
    summary = (
        f"\n{len(outcomes)} case(s) of {rules_run} rule(s): {counts['PASS']} passed, "
        f"{counts['FAIL']} failed"
    )
    if counts["BROKEN"]:
        summary += f", {counts['BROKEN']} could not be read or run (fix the case file)"
    out.write(summary + ".\n")
    if counts["BROKEN"]:
        return 2
    return 1 if counts["FAIL"] else 0


def _outcome_lines(outcome: CaseOutcome, width: int) -> str:
    """PASS/FAIL/BROKEN, the rule, the case; under a failure, each difference and the file."""
    head = f"{outcome.status:<6}  {outcome.rule:<{width}}  "
    if outcome.result is None:
        return head + outcome.broken.replace(str(outcome.path), _shown(outcome.path), 1) + "\n"
    result = outcome.result
    line = head + f"{outcome.path.stem}: {case_title(result.case)}\n"
    if result.passed:
        return line
    details = "".join(f"        - {d.text}\n" for d in result.differences)
    return line + details + f"        case file: {_shown(outcome.path)}\n"


# --- rules check -------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One problem `rules check` found: where (a rule id, or a file of the rules folder), and
    the whole finding as a sentence that says what to do."""

    where: str
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass
class CheckReport:
    """What `check_rules` found, and what `--update-lock` recorded."""

    rules: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    recorded: list[tuple[str, str]] = field(default_factory=list)  # (rule id, version)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.findings


def fingerprint(card: Mapping[str, Any], rule_py: bytes) -> str:
    """sha256 of a rule's logic (rule.py, line endings normalised) and of what its card
    decides: parameter defaults, hard limits and the `[tasks]` table."""
    params = card.get("parameters", {})
    params = params if isinstance(params, dict) else {}
    behaviour = {
        "defaults": {n: s.get("default") for n, s in params.items() if isinstance(s, dict)},
        "limits": {n: s["max"] for n, s in params.items() if isinstance(s, dict) and "max" in s},
        "tasks": card.get("tasks", {}),
    }
    digest = hashlib.sha256(rule_py.replace(b"\r\n", b"\n"))
    digest.update(b"\0")
    digest.update(json.dumps(behaviour, sort_keys=True, separators=(",", ":")).encode())
    return "sha256:" + digest.hexdigest()


def rule_fingerprint(folder: Path) -> str:
    """The fingerprint of the rule in `folder` (ConfigurationError if unreadable)."""
    card = _read_toml(folder / "rule.toml")
    try:
        logic = (folder / "rule.py").read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{folder / 'rule.py'}: cannot be read") from exc
    return fingerprint(card, logic)


def read_lock(path: Path) -> dict[str, dict[str, str]]:
    """The lock: rule id -> {version: fingerprint}. ConfigurationError when malformed."""
    raw = _read_toml(path)
    lock: dict[str, dict[str, str]] = {}
    for rule_id, versions in raw.items():
        if not isinstance(versions, dict) or not all(
            isinstance(v, str) and v.startswith("sha256:") for v in versions.values()
        ):
            raise ConfigurationError(
                f"{path}: [{rule_id}] must map each version to a fingerprint "
                '("1.0.0" = "sha256:...")'
            )
        lock[rule_id] = dict(versions)
    return lock


def write_lock(path: Path, lock: Mapping[str, Mapping[str, str]]) -> None:
    """Write the lock (rules in name order, versions oldest first), atomically."""
    lines = [
        "# Rule versions and their fingerprints: the sha256 of rule.py and of rule.toml's",
        "# defaults, hard limits and [tasks]. Written by `safetynet rules check --update-lock`;",
        "# do not edit by hand. A recorded version's fingerprint never changes: a rule whose",
        "# logic or defaults change needs a new version.",
    ]
    for rule_id in sorted(lock):
        lines.append("")
        lines.append(f"[{json.dumps(rule_id)}]")
        for version in sorted(lock[rule_id], key=_version_key):
            lines.append(f"{json.dumps(version)} = {json.dumps(lock[rule_id][version])}")
    text = "\n".join(lines) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _version_key(version: str) -> tuple[Any, ...]:
    """Semantic-version order: 1.0.0-rc.1 < 1.0.0 < 1.0.1 < 1.1.0; unparseable last."""
    found = SEMVER.match(version)
    if found is None:
        return (1, version)
    core = tuple(int(found.group(i)) for i in (1, 2, 3))
    pre = found.group(4)
    if pre is None:
        return (0, core, (1,))
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (0, core, (0, parts))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigurationError(f"{path}: file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path}: not valid TOML: {exc}") from exc


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_card(folder: Path, card: Mapping[str, Any]) -> list[str]:
    """rule.toml's schema: required keys and their types, status, version, parameters."""
    problems: list[str] = []
    for key, meaning in CARD_KEYS.items():
        value = card.get(key)
        if value is None:
            problems.append(f"rule.toml has no {key} ({meaning})")
        elif not isinstance(value, str) or not value.strip():
            problems.append(f"rule.toml: {key} must be text ({meaning})")
    for key in sorted(set(card) - set(CARD_KEYS) - set(OPTIONAL_CARD_KEYS)):
        problems.append(
            f"rule.toml has {key!r}, which safetynet does not read (a misspelling?); it reads "
            + ", ".join([*CARD_KEYS, *OPTIONAL_CARD_KEYS])
        )
    if isinstance(card.get("id"), str) and card["id"] != folder.name:
        problems.append(f"rule.toml: id {card['id']!r} must be the folder's name {folder.name!r}")
    status = card.get("status")
    if isinstance(status, str) and status not in STATUSES:
        problems.append(f"rule.toml: status {status!r} must be active, shadow or off")
    version = card.get("version")
    if isinstance(version, str) and not SEMVER.match(version):
        problems.append(
            f"rule.toml: version {version!r} must be a version number MAJOR.MINOR.PATCH, "
            "e.g. 1.0.0 (1.0.1 for a correction, 1.1.0 for a change in who is recalled)"
        )
    params = card.get("parameters", {})
    if not isinstance(params, dict):
        problems.append("rule.toml: parameters must be tables, one [parameters.<name>] each")
    else:
        for name, spec in params.items():
            problems.extend(_check_parameter(name, spec))
    tasks = card.get("tasks", {})
    if not isinstance(tasks, dict):
        problems.append("rule.toml: [tasks] must be a table")
    else:
        for key, value in tasks.items():
            if key not in TASK_FLAGS:
                problems.append(
                    f"rule.toml: [tasks] has {key!r}, which safetynet does not read; it reads "
                    + ", ".join(TASK_FLAGS)
                )
            elif not isinstance(value, bool):
                problems.append(f"rule.toml: [tasks] {key} must be true or false")
    if not (folder / "rule.py").is_file():
        problems.append("the folder has no rule.py (the rule's logic)")
    return problems


def _check_parameter(name: str, spec: Any) -> list[str]:
    where = f"rule.toml: parameter {name}"
    if not isinstance(spec, dict):
        return [f"{where} must be a table [parameters.{name}] with a default, unit and doc"]
    problems = [
        f"{where} has {key!r}, which safetynet does not read (a misspelling?); a parameter "
        "has default, unit, doc and max"
        for key in sorted(set(spec) - set(PARAMETER_KEYS))
    ]
    if "default" not in spec:
        problems.append(f"{where} has no default")
    default = spec.get("default")
    unit = spec.get("unit")
    if not isinstance(unit, str) or not unit:
        problems.append(f"{where} has no unit (one of: {', '.join(KNOWN_UNITS)})")
    elif unit not in KNOWN_UNITS:
        problems.append(
            f"{where} has the unit {unit!r}, which safetynet does not know "
            f"(known: {', '.join(KNOWN_UNITS)})"
        )
    elif unit in TIME_UNITS and "default" in spec:
        if not _is_number(default):
            problems.append(f"{where}: its default must be a number of {unit}, not {default!r}")
        elif default < 0:
            problems.append(f"{where}: its default {default} {unit} must not be negative")
    elif unit == "FHIR priority" and default not in PRIORITIES:
        problems.append(
            f"{where}: its default must be one of {', '.join(PRIORITIES)}, not {_show(default)}"
        )
    doc = spec.get("doc")
    if not isinstance(doc, str) or not doc.strip():
        problems.append(f"{where} has no doc (one line saying what it means)")
    if "max" in spec:
        limit = spec["max"]
        if not _is_number(limit) or not _is_number(default):
            problems.append(f"{where}: its hard limit (max) and its default must be numbers")
        elif default > limit:
            problems.append(
                f"{where}: its default {_show(default)} is above its hard limit (max) "
                f"{_show(limit)}"
            )
    return problems


def _timezone(rules_dir: Path) -> ZoneInfo:
    try:
        name = _read_toml(rules_dir / "settings.toml").get("timezone", "Europe/London")
        return ZoneInfo(str(name))
    except (ConfigurationError, ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("Europe/London")  # load_catalogue reports the settings problem


def _check_cases(folder: Path, tz: ZoneInfo, rule_ids: set[str]) -> list[str]:
    """Both kinds of case present, each case readable, naming rules that exist."""
    paths = sorted((folder / "cases").glob("*.toml"))
    problems: list[str] = []
    kinds: set[str] = set()
    for path in paths:
        try:
            case = load_case(path, tz)
        except ConfigurationError as exc:
            problems.append(f"cases/{path.name} cannot be read: {_reason_only(exc, path)}")
            continue
        kinds.add(case.kind)
        for exp in case.expect:
            for named in (exp.rule, exp.part_of):
                if named and named not in rule_ids:
                    problems.append(
                        f"cases/{path.name} expects a Task from {named!r}, which is not a rule "
                        "of this folder"
                    )
    if "recall" not in kinds:
        problems.append("no 'recall' case (one where a Task must be raised): add one to cases/")
    if "no-recall" not in kinds:
        problems.append("no 'no-recall' case (one where no Task may be raised): add one to cases/")
    return problems


def _reason_only(exc: ConfigurationError, path: Path) -> str:
    return exc.reason.removeprefix(f"{path}: ")


def _cells(line: str) -> list[str]:
    """A Markdown table row's cells; a | inside `code` or escaped as \\| stays in its cell."""
    cells: list[str] = []
    current: list[str] = []
    code, prev = False, ""
    for ch in line.strip().removeprefix("|").removesuffix("|"):
        if ch == "`":
            code = not code
        if ch == "|" and not code and prev != "\\":
            cells.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
        prev = ch
    cells.append("".join(current).strip())
    return cells


def _cell_value(text: str) -> Any:
    text = text.strip().strip("`").strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _same(value: Any, default: Any) -> bool:
    if _is_number(value) and _is_number(default):
        return bool(value == default)
    return type(value) is type(default) and bool(value == default)


def _section(lines: Sequence[str], title: str) -> list[str] | None:
    for n, line in enumerate(lines):
        if line.strip() == f"## {title}":
            rest = lines[n + 1 :]
            end = next((i for i, x in enumerate(rest) if x.startswith("## ")), len(rest))
            return list(rest[:end])
    return None


def _check_readme(folder: Path, card: Mapping[str, Any]) -> list[str]:
    """README.md: its title names the rule and its version, it has Rationale and Sources, and
    its parameter table lists exactly rule.toml's parameters with their defaults, hard limits
    and units."""
    path = folder / "README.md"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return ["the folder has no README.md (what the rule does, its parameters, rationale)"]
    problems: list[str] = []
    rule_id, version = card.get("id"), card.get("version")
    heading = next((line for line in lines if line.startswith("# ")), "")
    title = README_TITLE.match(heading)
    if title is None:
        problems.append(f"README.md must start with the title '# {rule_id} (v{version})'")
    elif title.group(1) != rule_id or title.group(2) != version:
        problems.append(
            f"README.md's title says {title.group(1)} v{title.group(2)}; rule.toml says "
            f"{rule_id} v{version}: change the title to '# {rule_id} (v{version})'"
        )
    for needed in ("Rationale", "Sources"):
        if _section(lines, needed) is None:
            problems.append(f"README.md has no '## {needed}' section")
    params = card.get("parameters", {})
    params = params if isinstance(params, dict) else {}
    section = _section(lines, "Parameters")
    if section is None:
        return [*problems, "README.md has no '## Parameters' section"]
    table = [_cells(line) for line in section if line.lstrip().startswith("|")]
    if not table:
        if params:
            problems.append(
                "README.md has no parameter table under '## Parameters' "
                "(| name | default | unit | meaning |)"
            )
        return problems
    header = [c.strip("` ").lower() for c in table[0]]
    columns = {}
    for needed in ("name", "default", "unit"):
        if needed not in header:
            return [*problems, f"README.md's parameter table has no '{needed}' column"]
        columns[needed] = header.index(needed)
    rows: dict[str, list[str]] = {}
    for cells in table[1:]:
        if all(re.fullmatch(r":?-+:?", c) for c in cells if c):
            continue  # the |---| line
        cells = cells + [""] * (len(header) - len(cells))
        rows[cells[columns["name"]].strip("` ")] = cells
    for name in params:
        if name not in rows:
            problems.append(f"README.md's parameter table does not list {name} (in rule.toml)")
    for name, cells in rows.items():
        spec = params.get(name)
        if not isinstance(spec, dict):
            problems.append(
                f"README.md's parameter table lists {name}, which rule.toml does not have"
            )
            continue
        problems.extend(
            _row_problems(name, spec, cells[columns["default"]], cells[columns["unit"]])
        )
    return problems


def _row_problems(
    name: str, spec: Mapping[str, Any], default_cell: str, unit_cell: str
) -> list[str]:
    problems = []
    stated, limit_text = default_cell, None
    limit_found = HARD_LIMIT.match(default_cell)
    if limit_found:
        stated, limit_text = limit_found.group(1), limit_found.group(2)
    if "default" in spec and not _same(_cell_value(stated), spec["default"]):
        problems.append(
            f"README.md gives {name} the default {stated.strip() or '(nothing)'}; rule.toml "
            f"says {_show(spec['default'])}"
        )
    if "max" in spec and limit_text is None:
        problems.append(
            f"README.md does not give {name}'s hard limit: write "
            f"'{_show(spec.get('default'))} (hard limit {_show(spec['max'])})'"
        )
    elif limit_text is not None and "max" not in spec:
        problems.append(
            f"README.md gives {name} a hard limit of {limit_text}; rule.toml has none (max)"
        )
    elif limit_text is not None and not _same(_cell_value(limit_text), spec["max"]):
        problems.append(
            f"README.md gives {name} the hard limit {limit_text}; rule.toml says "
            f"{_show(spec['max'])}"
        )
    unit = spec.get("unit")
    if isinstance(unit, str) and unit_cell.strip("` ").casefold() != unit.casefold():
        shown = unit_cell.strip() or "(none)"
        problems.append(f"README.md gives {name} the unit {shown}; rule.toml says {unit}")
    return problems


def _check_lock(
    rule_id: str, version: str, print_: str, lock: dict[str, dict[str, str]], update: bool
) -> tuple[list[str], bool]:
    """The version lock for one rule: (problems, whether `update` recorded its version)."""
    recorded = lock.get(rule_id, {})
    if version in recorded:
        if recorded[version] == print_:
            return [], False
        return [
            f"rule {rule_id} changed (logic or defaults) but its version is still {version}: "
            f"bump the version in rule.toml and {UPDATE_HINT}"
        ], False
    newest = max(recorded, key=_version_key, default=None)
    if newest is not None and _version_key(version) < _version_key(newest):
        return [
            f"rule {rule_id}'s version {version} is lower than {newest}, already recorded: "
            "a new version must be higher than every earlier one"
        ], False
    if not update:
        return [
            f"rule {rule_id} version {version} is not recorded in {LOCK_NAME} yet: {UPDATE_HINT}"
        ], False
    lock.setdefault(rule_id, {})[version] = print_
    return [], True


def check_rules(rules_dir: Path, update_lock: bool = False) -> CheckReport:
    """Check every rule folder of `rules_dir`; with `update_lock`, record new versions in
    its `rule-versions.lock` (created when missing). ConfigurationError when `rules_dir` is
    not a folder."""
    if not rules_dir.is_dir():
        raise ConfigurationError(f"{rules_dir}: rules folder not found")
    report = CheckReport()
    tz = _timezone(rules_dir)
    folders = sorted(p for p in rules_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    rule_folders = [p for p in folders if (p / "rule.toml").is_file()]
    for folder in folders:
        if folder not in rule_folders and (
            (folder / "rule.py").exists() or (folder / "cases").exists()
        ):
            report.findings.append(
                Finding(
                    folder.name,
                    f"folder {folder.name} has no rule.toml, so safetynet does not load it",
                )
            )
    rule_ids = {p.name for p in rule_folders}
    lock_path = rules_dir / LOCK_NAME
    lock: dict[str, dict[str, str]] = {}
    lock_readable = True
    if lock_path.is_file():
        try:
            lock = read_lock(lock_path)
        except ConfigurationError as exc:
            report.findings.append(
                Finding(LOCK_NAME, f"{LOCK_NAME}: {_reason_only(exc, lock_path)}")
            )
            lock_readable = False
    elif not update_lock:
        report.findings.append(
            Finding(LOCK_NAME, f"the rules folder has no {LOCK_NAME}: {UPDATE_HINT} to create it")
        )
        lock_readable = False
    cards_ok = True
    for folder in rule_folders:
        rule_id = folder.name
        report.rules.append(rule_id)
        try:
            card = _read_toml(folder / "rule.toml")
        except ConfigurationError as exc:
            reason = _reason_only(exc, folder / "rule.toml")
            report.findings.append(Finding(rule_id, f"rule {rule_id}: rule.toml {reason}"))
            cards_ok = False
            continue
        problems = _check_card(folder, card)
        card_ok = not problems
        cards_ok = cards_ok and card_ok
        problems += _check_cases(folder, tz, rule_ids)
        problems += _check_readme(folder, card)
        report.findings.extend(Finding(rule_id, f"rule {rule_id}: {p}") for p in problems)
        version = card.get("version")
        if card_ok and lock_readable and isinstance(version, str):
            found, recorded = _check_lock(
                rule_id, version, rule_fingerprint(folder), lock, update_lock
            )
            report.findings.extend(Finding(rule_id, p) for p in found)
            if recorded:
                report.recorded.append((rule_id, version))
    if cards_ok:  # then rule.py must load, and settings.toml's overrides fit the rules
        try:
            load_catalogue(rules_dir)
        except ConfigurationError as exc:
            report.findings.append(
                Finding("the catalogue", f"the catalogue does not load: {exc.reason}")
            )
    if report.recorded:
        write_lock(lock_path, lock)
    return report


def check_command(rules: Path, update_lock: bool, out: TextIO) -> int:
    """`safetynet rules check [--rules DIR] [--update-lock]`: one line per problem and a
    summary; 0 when all is in order, 1 otherwise."""
    report = check_rules(rules, update_lock)
    for rule_id, version in report.recorded:
        out.write(f"rule {rule_id}: recorded version {version} in {LOCK_NAME}\n")
    for finding in report.findings:
        out.write(f"{finding}\n")
    count = len(report.findings)
    out.write(
        f"{len(report.rules)} rule(s) checked: "
        + ("all in order.\n" if not count else f"{count} problem(s) to fix.\n")
    )
    return 0 if report.ok else 1

"""`safetynet backtest`: what a rule change would do, seen on an archive before it reaches a
clinician's worklist.

    safetynet backtest PATH... --rules DIR [--baseline DIR] --out report.html
                       [--until ISO-8601] [--csv DIR] [--json FILE] [--quiet]

The archive is replayed exactly as `safetynet replay` replays it (the same reader, ingest,
processor and simulated clock, `adapters.bootstrap.build_replay_app`) under the candidate rules
and, with `--baseline`, again under the baseline rules, each in its own temporary SQLite
database. Every Task raised is then read back from that database (the record, not a stream of
changes) and reduced to a `TaskRow`, which is what `adapters.governance.report` counts and
renders as the HTML report, the CSV files and the JSON document.

What leaves this module carries no patient details (the report is for governance leads, who
need burden and differences, not people):

* the patient is named by a pseudonym, a keyed hash (HMAC-SHA256) of the internal patient key
  under a key drawn at random for each backtest and never written: the same patient has the
  same pseudonym under both rule sets of one report, and nothing links it to an NHS number
  (an unkeyed hash of a 10-digit number could be reversed by trying every number) or to
  another report;
* a Task's text is its description with ages, sex, times, dates, quoted free text, identifier
  values and long numbers removed (`redact`); owners (clinicians and pools) keep their ids and
  names: the burden on each is what the report is for;
* before anything is returned, every string is checked against the identifiers the archive
  gave its patients (`patient_aliases`): a hit is a bug and stops the backtest (fail closed).

Errors with the command itself (a missing file, a bad rules folder, an output that cannot be
written) raise `BacktestError`, which the CLI turns into exit status 2 with the message.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import itertools
import re
import secrets
import tempfile
import time
import tomllib
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import select

from adapters.bootstrap import App, build_replay_app, default_rules_dir
from adapters.hl7v2.er7 import Hl7ReadError, decode, split_messages
from adapters.store.schema import patient_aliases
from engine.catalogue import Catalogue
from engine.errors import ConfigurationError
from engine.ports import StoredTask

__all__ = [
    "AnyOf",
    "Archive",
    "Backtest",
    "BacktestError",
    "ParameterCard",
    "Pseudonyms",
    "RuleCard",
    "RuleSetRun",
    "TaskRow",
    "add_arguments",
    "archive_files",
    "archive_messages",
    "command",
    "parse_until",
    "redact",
    "rule_cards",
    "run_backtest",
    "site_card",
    "task_row",
]

BATCH = 500  # messages per transaction, as `safetynet replay`
TAG_SHADOW = "shadow"


class BacktestError(Exception):
    """A problem with the backtest command itself (a file, a folder, an option): the CLI
    answers exit status 2 with this message, which names the file and the problem."""


@dataclass(frozen=True, slots=True)
class ParameterCard:
    """One parameter of a rule as the catalogue resolved it."""

    name: str
    value: Any
    default: Any
    unit: str
    source: str  # "default" | "site"


@dataclass(frozen=True, slots=True)
class RuleCard:
    """A rule as loaded from a rules folder: what the report's header shows of it."""

    id: str
    title: str
    version: str
    status: str
    status_source: str
    parameters: tuple[ParameterCard, ...]


@dataclass(frozen=True, slots=True)
class TaskRow:
    """One Task raised in a backtest, without patient details.

    `key` matches a Task between the two rule sets: its identifier (a hash of rule, order and
    trigger, the same under any rule set for the same history) and the patient's pseudonym."""

    identifier: str
    rule_id: str
    rule_version: str
    patient: str  # pseudonym, e.g. "P-3f9a1c2b7d4e"
    order: str  # the procedure the Task is about ("" when it is about no order)
    priority: str
    status: str
    shadow: bool
    owner_id: str
    owner_name: str
    raised: datetime  # authoredOn, in the site's time zone
    text: str  # the description, patient details removed
    reason: str  # the reason code's text, patient details removed
    part_of: str = ""  # the Task this one escalates or belongs to

    @property
    def key(self) -> tuple[str, str]:
        """What matches this Task with the same Task under the other rule set."""
        return (self.identifier, self.patient)


@dataclass(frozen=True)
class RuleSetRun:
    """One replay of the archive under one rules folder."""

    label: str  # "candidate" | "baseline"
    rules_dir: Path
    rules: tuple[RuleCard, ...]
    site: Mapping[str, Any]  # time zone, settle time, and the site settings' other sections
    tasks: tuple[TaskRow, ...]
    messages: int
    rejected: int
    unsupported: int
    seconds: float


@dataclass(frozen=True)
class Archive:
    """The archive replayed: its files, size, messages and the time span of its events."""

    files: tuple[str, ...]
    bytes: int
    messages: int
    rejected: int
    unsupported: int
    first_event: datetime | None
    last_event: datetime | None
    until: datetime | None


@dataclass(frozen=True)
class Backtest:
    """Everything a report is made of."""

    archive: Archive
    candidate: RuleSetRun
    baseline: RuleSetRun | None
    generated_at: datetime
    timezone: str = "UTC"
    problems: tuple[str, ...] = field(default=())  # first rejected/unsupported messages


# --- the archive --------------------------------------------------------------------------


def archive_files(paths: Sequence[str]) -> list[Path]:
    """The files of `paths` in the order replay reads them (a folder's files in name order,
    recursively). Raises BacktestError naming a path that does not exist."""
    out: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            out.append(path)
        else:
            raise BacktestError(f"{name}: no such file or folder")
    return out


def archive_messages(files: Sequence[Path]) -> Iterator[tuple[Path, str | Hl7ReadError]]:
    """Each file's messages (or the reason one cannot be read), in order, as replay reads
    them. Raises BacktestError naming a file that cannot be read."""
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BacktestError(f"{path}: cannot be read: {exc.strerror}") from exc
        for item in split_messages(decode(data)):
            yield path, item


# --- patient details out ------------------------------------------------------------------

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_QUOTED = re.compile(r"\"[^\"]*\"|“[^”]*”")
_WHEN = re.compile(rf"\b\d{{1,2}}:\d{{2}}(?: on \d{{1,2}} (?:{_MONTHS}) \d{{4}})?")
_DATE = re.compile(rf"\b\d{{1,2}} (?:{_MONTHS})(?: \d{{4}})?\b")
_ISO_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}(?:[T ][0-9:.+\-Z]+)?")
_AGE = re.compile(
    r"(?:\b(?P<article>an?) )?(?:"
    r"\b\d+-(?:day|week|month|year)-old(?: (?:boy|girl|man|woman|child|patient|baby|infant))?"
    r"|\b(?:patient|child) of unknown age(?: \(no date of birth on record\))?)",
    re.IGNORECASE,
)
# NHS numbers (also "999 000 0018"), and any word holding six digits or more (MRN000123456)
_LONG_NUMBER = re.compile(r"\b\w*\d(?:[ -]?\d){5,}\w*")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/|\-]*[A-Za-z0-9]|[A-Za-z0-9]")


def _patient_word(match: re.Match[str]) -> str:
    text = match.string
    start = match.start()
    sentence_start = start == 0 or text[:start].rstrip().endswith((".", ":", ";"))
    word = "a patient" if match.group("article") else "patient"
    return word[:1].upper() + word[1:] if sentence_start else word


class AnyOf:
    """Membership in any of several collections, without copying them (the archive's
    identifiers can be many; a Task's own are few)."""

    def __init__(self, *collections: Container[str]) -> None:
        self._collections = collections

    def __contains__(self, item: object) -> bool:
        return any(item in c for c in self._collections)


def redact(text: str, identifiers: Container[str] = (), keep: Iterable[str] = ()) -> str:
    """`text` without patient details: quoted free text (unless it is one of `keep`, e.g. a
    rule's title), identifier values (`identifiers`, matched as whole tokens), times and dates,
    ages and sex, and runs of six or more digits.

    For Task texts written by the rules (`engine.tasks.who`, `when`); it is a net, not a
    parser: the backtest also checks its output against every patient identifier it saw."""
    if '"' in text or "“" in text:
        kept = {k.casefold() for k in keep}
        text = _QUOTED.sub(
            lambda m: m.group(0) if m.group(0)[1:-1].casefold() in kept else "[words removed]",
            text,
        )
    text = _TOKEN.sub(lambda m: "[id]" if m.group(0) in identifiers else m.group(0), text)
    text = _WHEN.sub("[time]", text)
    text = _ISO_DATE.sub("[date]", text)
    text = _DATE.sub("[date]", text)
    text = _AGE.sub(_patient_word, text)
    return _LONG_NUMBER.sub("[number]", text)


def _identifier_values(node: Any, inside: bool = False) -> Iterator[str]:
    """Every `identifier` value in a Task resource but its owner's and requester's."""
    if isinstance(node, Mapping):
        for name, value in node.items():
            if name in ("owner", "requester"):
                continue
            if inside and name == "value" and isinstance(value, str):
                yield value
            elif name == "identifier":
                yield from _identifier_values(value, True)
            else:
                yield from _identifier_values(value, False)
    elif isinstance(node, list):
        for item in node:
            yield from _identifier_values(item, inside)


class Pseudonyms:
    """Keyed pseudonyms of patient keys; the key lives as long as this object (one backtest)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def __call__(self, patient_key: str) -> str:
        digest = hmac.new(self._key, patient_key.encode(), hashlib.sha256).hexdigest()
        return f"P-{digest[:12]}"


def task_row(
    task: StoredTask,
    pseudonym: Callable[[str], str],
    identifiers: Container[str],
    titles: Iterable[str] = (),
) -> TaskRow:
    """A stored Task reduced to what the report may show (see the module's privacy notes).
    `titles`: quoted phrases that are no patient detail (the rules' titles)."""
    res = task.resource
    titles = tuple(titles)
    own = AnyOf(set(_identifier_values(res)), identifiers)
    owner = res.get("owner") or {}
    order = next(
        (
            str((c.get("code") or {}).get("text", ""))
            for c in res.get("contained", ())
            if c.get("resourceType") == "ServiceRequest"
        ),
        "",
    )
    part_of = next(
        (str(p.get("identifier", {}).get("value", "")) for p in res.get("partOf", ())), ""
    )
    tags = {t.get("code") for t in (res.get("meta") or {}).get("tag", ())}
    return TaskRow(
        identifier=task.identifier,
        rule_id=task.rule_id,
        rule_version=task.rule_version,
        patient=pseudonym(task.patient_key),
        order=redact(order, own),
        priority=task.priority,
        status=task.status,
        shadow=task.shadow or TAG_SHADOW in tags,
        owner_id=task.owner,
        owner_name=str(owner.get("display", "")) or task.owner,
        raised=datetime.fromisoformat(str(res["authoredOn"])),
        text=redact(str(res.get("description", "")), own, titles),
        reason=redact(str((res.get("reasonCode") or {}).get("text", "")), own, titles),
        part_of=part_of,
    )


def _leaks(rows: Iterable[TaskRow], identifiers: set[str]) -> list[str]:
    """Task identifiers whose row carries a patient identifier (should never happen)."""
    found = []
    for row in rows:
        text = " ".join((row.order, row.text, row.reason, row.owner_name, row.owner_id))
        if any(tok in identifiers for tok in _TOKEN.findall(text)):
            found.append(row.identifier)
    return found


# --- the catalogue, as the report shows it ------------------------------------------------


def rule_cards(catalogue: Catalogue) -> tuple[RuleCard, ...]:
    """Every rule of a catalogue with its version, status and resolved parameters."""
    return tuple(
        RuleCard(
            rule.id,
            rule.title,
            rule.version,
            rule.status,
            rule.status_source,
            tuple(
                ParameterCard(p.name, p.value, p.default, p.unit, p.source)
                for p in rule.parameters.values()
            ),
        )
        for rule in catalogue.rules
    )


def site_card(catalogue: Catalogue) -> dict[str, Any]:
    """The site settings that change what rules do: time zone, settle time, and a digest of
    each other settings.toml section (so a difference is seen without printing it all)."""
    path = catalogue.path / "settings.toml"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, tomllib.TOMLDecodeError):  # load_catalogue has read it already
        raw = {}

    def digest(value: Any) -> str:
        return hashlib.sha256(repr(value).encode()).hexdigest()[:12]

    sections = {
        name: digest(value)
        for name, value in sorted(raw.items())
        if isinstance(value, dict) and name != "rules"
    }
    scalars = {k: v for k, v in raw.items() if not isinstance(v, dict) and k != "timezone"}
    if scalars:
        sections["(top-level keys)"] = digest(sorted(scalars.items()))
    for extra in ("directory.toml", "terminology.toml"):
        file = catalogue.path / extra
        if file.is_file():
            sections[extra] = hashlib.sha256(file.read_bytes()).hexdigest()[:12]
    return {
        "timezone": str(catalogue.site.timezone),
        "settle_minutes": catalogue.site.settle_minutes,
        "sections": sections,
    }


# --- running ------------------------------------------------------------------------------


@dataclass
class _Counts:
    messages: int = 0
    rejected: int = 0
    unsupported: int = 0
    first: datetime | None = None
    last: datetime | None = None
    problems: list[str] = field(default_factory=list)


def _replay(
    app: App,
    files: Sequence[Path],
    until: datetime | None,
    bar: Any,
    keep_problems: int,
) -> _Counts:
    """`safetynet replay`'s loop (adapters.cli._replay) without printing Tasks: the record
    in the database is read once at the end instead."""
    counts = _Counts()
    clock = app.clock
    stream = archive_messages(files)
    while batch := list(itertools.islice(stream, BATCH)):
        done = 0
        with app.store.begin() as uow:
            for path, item in batch:
                counts.messages += 1
                if isinstance(item, Hl7ReadError):
                    counts.rejected += 1
                    if len(counts.problems) < keep_problems:
                        counts.problems.append(f"{path}: -: rejected: {item.reason}")
                    continue
                done += len(item) + 1
                result = app.ingest.ingest(uow, item, datetime.now(UTC), origin=str(path))
                if counts.first is None and clock.started:
                    counts.first = clock.now()
                if result.ack_code != "AA":
                    if result.unsupported:
                        counts.unsupported += 1
                    else:
                        counts.rejected += 1
                    if len(counts.problems) < keep_problems:
                        what = "unsupported" if result.unsupported else "rejected"
                        counts.problems.append(
                            f"{path}: {result.control_id or '-'}: {what}: {result.reason}"
                        )
        if bar is not None:
            bar.update(done)
            bar.set_postfix_str(f"{counts.messages:,} messages", refresh=False)
    if bar is not None and bar.total > bar.n:  # line endings and BOMs are not counted
        bar.update(bar.total - bar.n)
    counts.last = clock.now() if clock.started else None
    if until is not None:
        clock.advance(until)
        while True:
            with app.store.begin() as uow:
                if not uow.due_timers(clock.now(), 1):
                    break
                app.processor.fire_due(uow, clock.now())
    return counts


def _progress(err: TextIO, total: int, label: str, enabled: bool) -> Any:
    """A tqdm bar on `err` by bytes read, or None when off (not a terminal, or --quiet)."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=err,
        mininterval=0.5,
        leave=True,
    )


def _open_app(db_dir: Path, rules_dir: Path, option: str) -> App:
    if not rules_dir.is_dir():
        raise BacktestError(f"{option} {rules_dir}: no such folder")
    try:
        return build_replay_app(f"sqlite:///{db_dir / 'backtest.db'}", rules_dir)
    except ConfigurationError as exc:
        raise BacktestError(f"{option} {rules_dir}: {exc}") from exc


def _run_rule_set(
    app: App,
    label: str,
    rules_dir: Path,
    files: Sequence[Path],
    total_bytes: int,
    until: datetime | None,
    pseudonyms: Pseudonyms,
    err: TextIO,
    progress: bool,
) -> tuple[RuleSetRun, _Counts]:
    bar = _progress(err, total_bytes, label, progress)
    began = time.perf_counter()
    try:
        counts = _replay(app, files, until, bar, keep_problems=20)
    finally:
        if bar is not None:
            bar.close()
    with app.store.begin(read_only=True) as uow:
        stored = uow.tasks()
        tokens = uow.connection.execute(select(patient_aliases.c.token)).scalars().all()
    seconds = time.perf_counter() - began
    identifiers = _patient_identifiers(str(t) for t in tokens)
    titles = [r.title for r in app.catalogue.rules] + [
        r.id.replace("-", " ") for r in app.catalogue.rules
    ]
    rows = tuple(task_row(t, pseudonyms, identifiers, titles) for t in stored)
    leaked = _leaks(rows, identifiers)
    if leaked:  # a bug in redact(): refuse to write anything rather than leak
        raise RuntimeError(
            f"{len(leaked)} Task text(s) still carry a patient identifier after redaction "
            f"(first: {leaked[0]}); nothing was written"
        )
    run = RuleSetRun(
        label=label,
        rules_dir=rules_dir,
        rules=rule_cards(app.catalogue),
        site=site_card(app.catalogue),
        tasks=rows,
        messages=counts.messages,
        rejected=counts.rejected,
        unsupported=counts.unsupported,
        seconds=seconds,
    )
    return run, counts


def _patient_identifiers(tokens: Iterable[str]) -> set[str]:
    """Identifier values of `system|value` tokens long enough to mean something (>= 4)."""
    out = set()
    for token in tokens:
        value = token.rsplit("|", 1)[-1]
        if len(value) >= 4:
            out.add(value)
            out.add(value.replace(" ", ""))
    return out


def run_backtest(
    paths: Sequence[str],
    rules_dir: Path,
    baseline_dir: Path | None = None,
    until: datetime | None = None,
    err: TextIO | None = None,
    progress: bool = False,
) -> Backtest:
    """Replay `paths` under `rules_dir` (and `baseline_dir`), each in its own temporary
    database, and return what the report needs. Raises BacktestError for a missing file or
    a bad rules folder (both folders are loaded before the first message is replayed)."""
    files = archive_files(paths)
    if not files:
        raise BacktestError(f"{' '.join(paths)}: no files to replay")
    total = sum(p.stat().st_size for p in files)
    sink = err if err is not None else io.StringIO()
    pseudonyms = Pseudonyms()
    plan = [("candidate", rules_dir, "--rules")]
    if baseline_dir is not None:
        plan.append(("baseline", baseline_dir, "--baseline"))
    runs: list[RuleSetRun] = []
    counts: list[_Counts] = []
    with tempfile.TemporaryDirectory(prefix="safetynet-backtest-") as tmp:
        apps: list[App] = []
        try:
            for label, folder, option in plan:  # both loaded before the first message
                (Path(tmp) / label).mkdir()
                apps.append(_open_app(Path(tmp) / label, folder, option))
            for app, (label, folder, _) in zip(apps, plan, strict=True):
                run, seen = _run_rule_set(
                    app, label, folder, files, total, until, pseudonyms, sink, progress
                )
                if seen.messages == 0:
                    raise BacktestError(f"{' '.join(paths)}: no HL7 v2 messages found")
                runs.append(run)
                counts.append(seen)
        finally:
            for app in apps:
                app.close()
    first = counts[0]
    candidate = runs[0]
    archive = Archive(
        files=tuple(str(p) for p in files),
        bytes=total,
        messages=first.messages,
        rejected=first.rejected,
        unsupported=first.unsupported,
        first_event=first.first,
        last_event=first.last,
        until=until,
    )
    return Backtest(
        archive=archive,
        candidate=candidate,
        baseline=runs[1] if len(runs) > 1 else None,
        generated_at=datetime.now(UTC),
        timezone=str(candidate.site["timezone"]),
        problems=tuple(first.problems),
    )


# --- the command --------------------------------------------------------------------------


def parse_until(value: str) -> datetime:
    """argparse type: an ISO-8601 date/time with a UTC offset."""
    try:
        at = datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 date/time: {value!r}") from exc
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{value!r} needs a UTC offset, e.g. {value}+00:00")
    return at


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `safetynet backtest` (documented in its --help)."""
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="files or folders (a folder's files in name order)"
    )
    parser.add_argument(
        "--rules",
        type=Path,
        metavar="DIR",
        default=default_rules_dir(),
        help="the candidate rules folder (default: the bundled rules/)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="the rules folder to compare with (e.g. what is live now)",
    )
    parser.add_argument(
        "--out", type=Path, metavar="FILE", required=True, help="the HTML report to write"
    )
    parser.add_argument(
        "--until",
        type=parse_until,
        metavar="ISO-8601",
        help="advance the clock to this time at the end so due timers fire (as replay)",
    )
    parser.add_argument("--csv", type=Path, metavar="DIR", help="also write the numbers as CSV")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write them as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_writable(path: Path, option: str, folder: bool = False) -> None:
    """Fail before a long replay, not after it, when an output cannot be written."""
    if folder:
        if path.exists() and not path.is_dir():
            raise BacktestError(f"{option} {path}: exists and is not a folder")
        parent = path if path.exists() else path.parent
    else:
        if path.is_dir():
            raise BacktestError(f"{option} {path}: is a folder, give a file name")
        parent = path.parent
    if not parent.is_dir():
        raise BacktestError(f"{option} {path}: folder {parent} does not exist")
    import os

    if not os.access(parent, os.W_OK):
        raise BacktestError(f"{option} {path}: folder {parent} is not writable")


def command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """`safetynet backtest`: replay, compare, write the report (and CSV/JSON); print where."""
    from adapters.governance import report

    _check_writable(args.out, "--out")
    if args.csv is not None:
        _check_writable(args.csv, "--csv", folder=True)
    if args.json is not None:
        _check_writable(args.json, "--json")
    result = run_backtest(
        args.paths,
        args.rules,
        args.baseline,
        args.until,
        err,
        progress=not args.quiet and err.isatty(),
    )
    numbers = report.numbers(result)
    written = [report.write_html(numbers, args.out)]
    if args.csv is not None:
        written.extend(report.write_csv(numbers, args.csv))
    if args.json is not None:
        written.append(report.write_json(numbers, args.json))
    for problem in result.problems:
        err.write(problem + "\n")
    a = result.archive
    skipped = a.rejected + a.unsupported
    if skipped > len(result.problems):
        err.write(f"... {skipped} message(s) rejected or unsupported in all\n")
    out.write(report.summary_line(numbers) + "\n")
    for path in written:
        out.write(f"written: {path}\n")
    return 0

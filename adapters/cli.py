"""`safetynet` command line: replay archives, generate synthetic traffic.

    safetynet serve [--db URL] [--mllp-port N] [--http-port N] ... (see serve --help)
    safetynet replay PATH... [--db URL] [--rules DIR] [--until ISO-8601] [--format ndjson|text]
    safetynet tasks list [--status S] [--owner ID] [--format ndjson|text] [--db URL]
    safetynet quarantine list [--all] | show ID | retry ID [--by NAME]   [--db URL]
    safetynet outbox status [--db URL]
    safetynet tokens create NAME --role ROLE [--practitioner ID] | revoke NAME | list  [--db URL]
    safetynet rules list [--rules DIR] [--format text|json]
    safetynet rules test [DIR] [--rules DIR] [--rule ID]    (exit 1: a case failed; 2: unreadable)
    safetynet rules check [--rules DIR] [--update-lock]     (exit 1: a problem was found)
    safetynet rules approve RULE --version V --by NAME --reason TEXT [--rules DIR] [--db URL]
    safetynet rules history [RULE] [--db URL]
    safetynet safety check|report [--log FILE] [--out FILE]
    safetynet backtest PATH... --rules DIR [--baseline DIR] --out report.html [--until ISO-8601]
                       [--csv DIR] [--json FILE] [--quiet]
    safetynet synth OUT [--patients N] [--seed S] [--days D]

Commands that read the service's database take `--db`, else `SAFETYNET_DB`, else the embedded
default `sqlite:///var/safetynet.db`.

Errors name the file and the problem and exit with status 2; rejected or unsupported
messages are reported one per line on stderr and do not stop a replay.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from sqlalchemy.exc import SQLAlchemyError

from adapters import package_version
from adapters.bootstrap import App, build_replay_app, default_rules_dir
from adapters.governance.backtest import BacktestError, archive_files, archive_messages
from adapters.hl7v2.er7 import Hl7ReadError
from adapters.store import SqlStore, open_store
from engine.catalogue import load_catalogue
from engine.errors import ConfigurationError
from engine.ports import StoredTask

BATCH = 500


class CliError(Exception):
    """A problem with the command itself: exit status 2 with this message."""


def _files(paths: Sequence[str]) -> list[Path]:
    try:
        return archive_files(paths)
    except BacktestError as exc:
        raise CliError(str(exc)) from exc


def _messages(files: Sequence[Path]) -> Iterator[tuple[Path, str | Hl7ReadError]]:
    try:
        yield from archive_messages(files)
    except BacktestError as exc:
        raise CliError(str(exc)) from exc


def _parse_until(value: str) -> datetime:
    try:
        at = datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 date/time: {value!r}") from exc
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{value!r} needs a UTC offset, e.g. {value}+00:00")
    return at


class TaskPrinter:
    """Writes Tasks as they are created or change: NDJSON, or a readable table at the end."""

    def __init__(self, out: TextIO, fmt: str) -> None:
        self.out, self.fmt = out, fmt
        self.latest: dict[str, StoredTask] = {}

    def emit(self, tasks: Sequence[StoredTask]) -> None:
        """One line per Task change (NDJSON), or remember it for the table."""
        for task in tasks:
            self.latest[task.identifier] = task
            if self.fmt == "ndjson":
                self.out.write(json.dumps(task.resource, separators=(",", ":")) + "\n")

    def finish(self) -> None:
        """Print the table of current Tasks (text format)."""
        if self.fmt != "text":
            return
        tasks = list(self.latest.values())
        shadow = sum(1 for t in tasks if t.shadow)
        self.out.write(
            f"{len(tasks)} task(s)"
            + (f", {shadow} of them shadow (recorded, never delivered)" if shadow else "")
            + "\n"
        )
        for task in tasks:
            owner = task.resource.get("owner", {}).get("display") or task.owner
            mark = "  SHADOW" if task.shadow else ""
            self.out.write(
                f"\n{task.identifier}  {task.status}  {task.priority}{mark}\n"
                f"  rule:  {task.rule_id} {task.rule_version}\n"
                f"  owner: {owner}\n"
                f"  {task.resource.get('description', '')}\n"
            )


def replay(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Replay files of HL7 v2 messages in order, with event time as the clock."""
    files = _files(args.paths)
    with tempfile.TemporaryDirectory(prefix="safetynet-") as tmp:
        db = args.db or f"sqlite:///{Path(tmp) / 'replay.db'}"
        try:
            app = build_replay_app(db, Path(args.rules))
        except ConfigurationError as exc:
            raise CliError(str(exc)) from exc
        progress = Progress(err, sum(p.stat().st_size for p in files)) if err.isatty() else None
        try:
            _replay(app, _messages(files), args.until, TaskPrinter(out, args.format), err, progress)
        finally:
            app.close()
    return 0


class Progress:
    """A one-line progress bar on a terminal, by bytes of input read."""

    WIDTH = 30

    def __init__(self, err: TextIO, total_bytes: int) -> None:
        self.err, self.total, self.done, self.messages = err, max(total_bytes, 1), 0, 0

    def advance(self, message: str) -> None:
        """Count one message (its length approximates the bytes it took)."""
        self.done += len(message) + 1
        self.messages += 1

    def show(self) -> None:
        """Redraw the bar."""
        share = min(self.done / self.total, 1.0)
        filled = int(share * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.err.write(f"\r[{bar}] {share:4.0%} {self.messages:,} messages")
        self.err.flush()

    def close(self) -> None:
        """End the bar's line."""
        self.err.write("\n")


def _replay(
    app: App,
    items: Iterable[tuple[Path, str | Hl7ReadError]],
    until: datetime | None,
    printer: TaskPrinter,
    err: TextIO,
    progress: Progress | None = None,
) -> None:
    stream = iter(items)
    while batch := list(itertools.islice(stream, BATCH)):
        created: list[StoredTask] = []
        with app.store.begin() as uow:
            for path, item in batch:
                if isinstance(item, Hl7ReadError):
                    err.write(f"{path}: -: rejected: {item.reason}\n")
                    continue
                if progress is not None:
                    progress.advance(item)
                result = app.ingest.ingest(uow, item, datetime.now(UTC), origin=str(path))
                created.extend(result.tasks)
                if result.ack_code != "AA":
                    what = "unsupported" if result.unsupported else "rejected"
                    where = f" ({result.location})" if result.location else ""
                    err.write(
                        f"{path}: {result.control_id or '-'}: {what}: {result.reason}{where}\n"
                    )
        printer.emit(created)  # only after the batch is committed
        if progress is not None:
            progress.show()
    if progress is not None:
        progress.close()
    if until is not None:
        app.clock.advance(until)
        while True:
            with app.store.begin() as uow:
                if not uow.due_timers(app.clock.now(), 1):
                    break
                fired = app.processor.fire_due(uow, app.clock.now())
            printer.emit(fired)
    printer.finish()


def backtest(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Replay an archive under candidate (and baseline) rules; write the report."""
    from adapters.governance.backtest import BacktestError, command

    try:
        return command(args, out, err)
    except BacktestError as exc:
        raise CliError(str(exc)) from exc


def synth(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Write synthetic HL7 v2 traffic to a file."""
    from adapters.synth import SynthConfig, synth_to_file

    config = SynthConfig(patients=args.patients, seed=args.seed, days=args.days)
    count = synth_to_file(config, Path(args.out))
    err.write(f"{args.out}: {count} messages\n")
    return 0


DEFAULT_DB = "sqlite:///var/safetynet.db"


def _service_db(args: argparse.Namespace) -> str:
    return str(args.db or os.environ.get("SAFETYNET_DB") or DEFAULT_DB)


def _open(args: argparse.Namespace) -> SqlStore:
    url = _service_db(args)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise CliError(f"{url}: no database here (start `safetynet serve` or give --db)")
    try:
        return open_store(url)
    except (ValueError, SQLAlchemyError) as exc:
        raise CliError(f"{url}: cannot open the database: {exc}") from exc


def serve_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run the live service."""
    from adapters.service.config import load_serve_settings
    from adapters.service.serve import serve

    try:
        settings = load_serve_settings(args)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if settings.db.startswith("sqlite:///"):
        Path(settings.db.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return serve(settings)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise CliError(f"cannot start: {exc}") from exc


def tasks_list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Print current Tasks, oldest first."""
    store = _open(args)
    try:
        with store.begin(read_only=True) as uow:
            tasks = uow.tasks(status=args.status, owner=args.owner)
    finally:
        store.close()
    printer = TaskPrinter(out, args.format)
    printer.emit(tasks)
    printer.finish()
    return 0


def quarantine_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """List, show or retry quarantined messages."""
    from adapters.store import operations

    store = _open(args)
    try:
        if args.action == "list":
            with store.begin(read_only=True) as uow:
                items = operations.quarantine_items(uow, include_resolved=args.all)
            out.write(f"{len(items)} item(s)\n")
            for item in items:
                state = f"resolved: {item.resolution}" if item.resolved_at else "open"
                out.write(
                    f"{item.id}  {item.created_at:%Y-%m-%d %H:%M:%S}Z  {item.ack_code}  "
                    f"{item.message_type or '-'}  {item.sender}  {item.control_id or '-'}  "
                    f"[{state}]\n  {item.reason}"
                    + (f" ({item.location})" if item.location else "")
                    + "\n"
                )
            return 0
        if args.id is None:
            raise CliError(f"quarantine {args.action}: give the item's id")
        if args.action == "show":
            with store.begin(read_only=True) as uow:
                found = operations.quarantine_item(uow, args.id)
            if found is None:
                raise CliError(f"quarantine item {args.id} does not exist")
            for name in (
                "id",
                "inbox_id",
                "created_at",
                "ack_code",
                "reason",
                "location",
                "sender",
                "control_id",
                "message_type",
                "inbox_state",
                "resolved_at",
                "resolution",
            ):
                out.write(f"{name}: {getattr(found, name)}\n")
            out.write("message:\n" + found.raw.replace("\r", "\n").rstrip("\n") + "\n")
            return 0
        try:
            with store.begin() as uow:
                item = operations.retry(uow, args.id, datetime.now(UTC), args.by)
        except LookupError as exc:
            raise CliError(str(exc)) from exc
        out.write(
            f"quarantine item {item.id}: message {item.inbox_id} queued for processing again\n"
        )
        return 0
    finally:
        store.close()


def outbox_status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Delivery state per destination."""
    from adapters.outbox import store as outbox

    store = _open(args)
    try:
        with store.begin(read_only=True) as uow:
            names = outbox.destinations(uow)
            rows = outbox.status(uow, names, datetime.now(UTC))
    finally:
        store.close()
    if not rows:
        out.write("no destinations have been configured (serve --outbox)\n")
    for row in rows:
        oldest = f"{row.oldest_pending_at:%Y-%m-%d %H:%M:%S}Z" if row.oldest_pending_at else "-"
        out.write(
            f"{row.destination}: {row.delivered} delivered, {row.pending} pending "
            f"({row.failing} failing), {row.not_yet_queued} not yet queued; "
            f"oldest pending {oldest}\n"
        )
        if row.last_error:
            out.write(f"  last error: {row.last_error}\n")
    return 0


def rules_approve(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Record a governance approval of one rule version (with its parameters) going active."""
    from adapters.governance import approvals

    try:
        catalogue = load_catalogue(Path(args.rules))
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    store = _open(args)
    try:
        found = approvals.approve(
            store, catalogue, args.rule, args.version, args.by, args.reason, datetime.now(UTC)
        )
    except approvals.ApprovalRefused as exc:
        raise CliError(str(exc)) from exc
    finally:
        store.close()
    out.write(f"recorded {approvals.render_approval(found)}\n")
    return 0


def rules_history(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Which rule versions, statuses and parameters were in force when, and the approvals."""
    from adapters.governance import approvals

    store = _open(args)
    try:
        history = approvals.load_history(store)
    finally:
        store.close()
    try:
        out.write(approvals.render_history(history, args.rule))
    except LookupError as exc:
        raise CliError(str(exc.args[0])) from exc
    return 0


def rules_list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Every rule: id, version, status, and each parameter's value and where it came from."""
    try:
        catalogue = load_catalogue(Path(args.rules))
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    if args.format == "json":
        for rule in catalogue.rules:
            out.write(
                json.dumps(
                    {
                        "id": rule.id,
                        "title": rule.title,
                        "version": rule.version,
                        "status": rule.status,
                        "status_source": rule.status_source,
                        "parameters": {
                            p.name: {
                                "value": p.value,
                                "default": p.default,
                                "unit": p.unit,
                                "source": p.source,
                                **({"max": p.maximum} if p.maximum is not None else {}),
                            }
                            for p in rule.parameters.values()
                        },
                    }
                )
                + "\n"
            )
        return 0
    for rule in catalogue.rules:
        out.write(f"{rule.id}  v{rule.version}  {rule.status} ({rule.status_source})\n")
        out.write(f"  {rule.title}\n")
        for p in rule.parameters.values():
            limit = f", hard limit {p.maximum}" if p.maximum is not None else ""
            source = "site override" if p.source == "site" else "default"
            out.write(f"  {p.name} = {p.value} {p.unit} ({source}{limit})\n")
    return 0


SAFETY_LOG = Path(__file__).resolve().parents[1] / "safety" / "hazard-log.toml"


def safety_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """`safety check`: the hazard log's problems (exit 1 if any); `safety report`: the safety
    case summary generated from it."""
    from adapters.governance.safety_case import (
        HazardLogError,
        check_log,
        load_log,
        render_summary,
    )

    path = Path(args.log)
    try:
        log = load_log(path)
    except HazardLogError as exc:
        raise CliError(str(exc)) from exc
    if args.action == "check":
        problems = check_log(log, path.resolve().parents[1])
        for problem in problems:
            err.write(f"{path}: {problem}\n")
        out.write(
            f"{len(log.hazards)} hazards, "
            f"{sum(len(h.controls) for h in log.hazards)} controls: "
            + (f"{len(problems)} problems\n" if problems else "every control names a test\n")
        )
        return 1 if problems else 0
    summary = render_summary(log, args.release or package_version())
    if args.out:
        Path(args.out).write_text(summary, encoding="utf-8")
    else:
        out.write(summary)
    return 0


def rules_test(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run rule cases; say in plain words how each one differs from what it expects."""
    from adapters.governance.rule_tools import test_command

    try:
        return test_command(args.dir, args.rules, args.rule, default_rules_dir(), out)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc


def rules_check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Check rule cards, cases, READMEs and the version lock (adapters.governance)."""
    from adapters.governance.rule_tools import check_command

    try:
        return check_command(Path(args.rules), args.update_lock, out)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc


def parser() -> argparse.ArgumentParser:
    """The argument parser (documented in --help)."""
    top = argparse.ArgumentParser(prog="safetynet", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="replay HL7 v2 files; print the Tasks raised")
    rp.add_argument(
        "paths", nargs="+", metavar="PATH", help="files or folders (a folder's files in name order)"
    )
    rp.add_argument("--db", help="database URL (default: a temporary SQLite database)")
    rp.add_argument("--rules", default=str(default_rules_dir()), help="rules folder")
    rp.add_argument(
        "--until",
        type=_parse_until,
        help="advance the clock to this time at the end so due timers fire",
    )
    rp.add_argument("--format", choices=("ndjson", "text"), default="ndjson")
    rp.set_defaults(func=replay)
    from adapters.service.config import add_serve_arguments

    sv = sub.add_parser(
        "serve",
        help="run the live service (MLLP, processor, timers, outbox, health and metrics)",
        description="Run the live service. Each setting: flag, else environment variable, else "
        "the config file, else the default.",
    )
    add_serve_arguments(sv)
    sv.set_defaults(func=serve_command)
    db_help = f"database URL (default: $SAFETYNET_DB, else {DEFAULT_DB})"
    tk = sub.add_parser("tasks", help="Tasks in the service's database")
    tk_sub = tk.add_subparsers(dest="action", required=True)
    tl = tk_sub.add_parser("list", help="current Tasks, oldest first")
    tl.add_argument("--status", help="only Tasks in this status (e.g. requested)")
    tl.add_argument("--owner", help="only Tasks owned by this clinician or pool id (e.g. C1001)")
    tl.add_argument("--format", choices=("ndjson", "text"), default="text")
    tl.add_argument("--db", help=db_help)
    tl.set_defaults(func=tasks_list)
    qu = sub.add_parser("quarantine", help="messages kept for human review")
    qu.add_argument("action", choices=("list", "show", "retry"))
    qu.add_argument("id", nargs="?", type=int, help="the item's id (show, retry)")
    qu.add_argument("--all", action="store_true", help="list resolved items too")
    qu.add_argument(
        "--by", default=os.environ.get("USER", "operator"), help="who retries (audit trail)"
    )
    qu.add_argument("--db", help=db_help)
    qu.set_defaults(func=quarantine_command)
    ob = sub.add_parser("outbox", help="delivery of Task changes to destinations")
    ob.add_argument("action", choices=("status",))
    ob.add_argument("--db", help=db_help)
    ob.set_defaults(func=outbox_status)
    from adapters.service.tokens_cli import add_tokens_parser

    add_tokens_parser(sub, db_help)
    ru = sub.add_parser("rules", help="the rule catalogue")
    ru_sub = ru.add_subparsers(dest="action", required=True)
    rl = ru_sub.add_parser("list", help="every rule with its status and parameters")
    rl.add_argument("--rules", default=str(default_rules_dir()), help="rules folder")
    rl.add_argument("--format", choices=("text", "json"), default="text")
    rl.set_defaults(func=rules_list)
    rt = ru_sub.add_parser(
        "test",
        help="run every rule case; say in plain words what differs from what it expects",
        description="Run rule cases through the real engine with the rules folder's settings. "
        "Exit 0: all passed; 1: a case failed; 2: a case file could not be read.",
    )
    rt.add_argument(
        "dir",
        nargs="?",
        metavar="DIR",
        help="a rules folder, one rule's folder or one case file (default: all of --rules)",
    )
    rt.add_argument(
        "--rules", help="rules folder (default: the one DIR is in, else the bundled rules/)"
    )
    rt.add_argument("--rule", metavar="ID", help="only this rule's cases")
    rt.set_defaults(func=rules_test)
    rc = ru_sub.add_parser(
        "check",
        help="check rule.toml, cases, READMEs and that changed rules have a new version",
        description="Check every rule folder: rule.toml, both kinds of case, the README's "
        "parameter table, and rule-versions.lock. Exit 1 when anything is wrong.",
    )
    rc.add_argument("--rules", default=str(default_rules_dir()), help="rules folder")
    rc.add_argument(
        "--update-lock",
        action="store_true",
        help="record new rule versions in the rules folder's rule-versions.lock",
    )
    rc.set_defaults(func=rules_check)
    ra = ru_sub.add_parser(
        "approve", help="record an approval of a rule version going active (governance)"
    )
    ra.add_argument("rule", metavar="RULE", help="the rule's id")
    ra.add_argument("--version", required=True, help="the version approved (as in rule.toml)")
    ra.add_argument("--by", required=True, help="who approves (name and role)")
    ra.add_argument("--reason", required=True, help="why: the review or backtest it rests on")
    ra.add_argument("--rules", default=str(default_rules_dir()), help="the service's rules")
    ra.add_argument("--db", help=db_help)
    ra.set_defaults(func=rules_approve)
    rh = ru_sub.add_parser("history", help="rule versions, statuses and parameters in force when")
    rh.add_argument("rule", metavar="RULE", nargs="?", help="only this rule")
    rh.add_argument("--db", help=db_help)
    rh.set_defaults(func=rules_history)
    sa = sub.add_parser("safety", help="the clinical safety case (DCB0129 hazard log)")
    sa.add_argument("action", choices=("check", "report"))
    sa.add_argument("--log", default=str(SAFETY_LOG), help="hazard log (TOML)")
    sa.add_argument("--out", help="report: write the summary here (default: stdout)")
    sa.add_argument("--release", help="report: the release it is for (default: this version)")
    sa.set_defaults(func=safety_command)
    from adapters.governance.backtest import add_arguments as add_backtest_arguments

    bt = sub.add_parser(
        "backtest",
        help="replay an archive under candidate (and baseline) rules; write an HTML report",
        description="Replay HL7 v2 archives with the simulated clock under the candidate rules "
        "(and the baseline rules, each in its own temporary database) and write a "
        "self-contained HTML report, with the same numbers as CSV and JSON.",
    )
    add_backtest_arguments(bt)
    bt.set_defaults(func=backtest)
    sp = sub.add_parser("synth", help="write synthetic HL7 v2 traffic")
    sp.add_argument("out", help="output file")
    sp.add_argument("--patients", type=int, default=1000, help="number of visits")
    sp.add_argument("--seed", type=int, default=1)
    sp.add_argument("--days", type=float, default=7.0, help="period the visits spread over")
    sp.set_defaults(func=synth)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `safetynet` command."""
    args = parser().parse_args(argv)
    try:
        return int(args.func(args, sys.stdout, sys.stderr))
    except CliError as exc:
        sys.stderr.write(f"safetynet: error: {exc}\n")
        return 2
    except BrokenPipeError:  # `safetynet tasks list | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())

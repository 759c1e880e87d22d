"""`safetynet tokens`: bearer tokens for the HTTP API.

    safetynet tokens create NAME --role ROLE [--role ROLE] [--practitioner ID] [--db URL]
    safetynet tokens revoke NAME [--db URL]
    safetynet tokens list [--format text|ndjson] [--db URL]

`create` prints the new token on standard output and nothing else, so that
`TOKEN=$(safetynet tokens create ...)` captures it; it is shown this once and stored only as
its SHA-256. `create` makes the database if there is none yet, so tokens can be issued before
the service first starts; `revoke` and `list` need it to exist. A revoked token is refused
from the next request on. `list` never shows a hash.

The database is the service's: `--db`, else `SAFETYNET_DB`, else the embedded default, as
for the other commands. A wrong role, a clinician or safeguarding token without
`--practitioner`, a name in use or an unknown name end with status 2 and a message.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy.exc import SQLAlchemyError

from adapters.cli import CliError, _open, _service_db
from adapters.service.auth import ROLES, TokenInfo, TokenStore
from adapters.store import SqlStore, open_store

__all__ = ["add_tokens_parser", "tokens_command"]


def add_tokens_parser(sub: Any, db_help: str) -> None:
    """Add `tokens create|revoke|list` to the `safetynet` subcommands (`sub`: the parser's
    `add_subparsers()` result)."""
    tokens = sub.add_parser("tokens", help="bearer tokens for the HTTP API")
    actions = tokens.add_subparsers(dest="action", required=True)
    create = actions.add_parser(
        "create",
        help="make a token and print it (once)",
        description="Make a bearer token and print it on standard output; only its SHA-256 "
        "is stored, so it cannot be shown again.",
    )
    create.add_argument("name", help="who or what the token is for (the audit trail's actor)")
    create.add_argument(
        "--role",
        action="append",
        required=True,
        metavar="ROLE",
        help=f"a role (repeat for several): {', '.join(ROLES)}",
    )
    create.add_argument(
        "--practitioner",
        default="",
        metavar="ID",
        help="the Task owner id a clinician or safeguarding token acts as (e.g. C9001)",
    )
    create.add_argument("--db", help=db_help)
    revoke = actions.add_parser("revoke", help="revoke a token (refused from the next request)")
    revoke.add_argument("name")
    revoke.add_argument("--db", help=db_help)
    listing = actions.add_parser("list", help="every token: name, roles, practitioner, dates")
    listing.add_argument("--format", choices=("text", "ndjson"), default="text")
    listing.add_argument("--db", help=db_help)
    tokens.set_defaults(func=tokens_command)


def _open_or_create(args: argparse.Namespace) -> SqlStore:
    url = _service_db(args)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return open_store(url)
    except (ValueError, SQLAlchemyError) as exc:
        raise CliError(f"{url}: cannot open the database: {exc}") from exc


def tokens_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run `tokens create`, `revoke` or `list`; a problem is reported on `err` with status 2.

    The error is reported here rather than left to `adapters.cli.main`: under
    `python -m adapters.cli` that module runs as `__main__`, whose CliError is another class
    than the one this module imports."""
    try:
        return _run(args, out)
    except CliError as exc:
        err.write(f"safetynet: error: {exc}\n")
        return 2


def _run(args: argparse.Namespace, out: TextIO) -> int:
    store = _open_or_create(args) if args.action == "create" else _open(args)
    try:
        tokens = TokenStore(store)
        now = datetime.now(UTC)
        if args.action == "create":
            try:
                token = tokens.create(args.name, args.role, now, practitioner=args.practitioner)
            except ValueError as exc:
                raise CliError(f"tokens create: {exc}") from exc
            out.write(token + "\n")
            return 0
        if args.action == "revoke":
            if not tokens.revoke(args.name, now):
                raise CliError(f"tokens revoke: no live token named {args.name!r}")
            out.write(f"token {args.name!r} revoked\n")
            return 0
        _print(tokens.tokens(), out, args.format)
        return 0
    finally:
        store.close()


def _when(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if at is not None else ""


def _print(found: list[TokenInfo], out: TextIO, fmt: str) -> None:
    if fmt == "ndjson":
        for info in found:
            out.write(
                json.dumps(
                    {
                        "name": info.name,
                        "roles": list(info.roles),
                        "practitioner": info.practitioner,
                        "created": _when(info.created_at),
                        "revoked": _when(info.revoked_at) or None,
                    }
                )
                + "\n"
            )
        return
    rows = [("NAME", "ROLES", "PRACTITIONER", "CREATED", "REVOKED")] + [
        (
            info.name,
            ",".join(info.roles),
            info.practitioner or "-",
            _when(info.created_at),
            _when(info.revoked_at) or "-",
        )
        for info in found
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")

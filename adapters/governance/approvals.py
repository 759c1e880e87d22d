"""Rule-set history and approvals: which rule versions, statuses and parameters were in force
when, and who signed off each change to what an active rule does.

When the service starts, `record_rule_set` compares the rule set it is about to run (every
rule's version, status and effective parameters) with the last one recorded in the database,
and records it when anything differs. The first record on a database is the *baseline*, taken
as found: nothing before it can be checked.

**What needs an approval** (`change_needing_approval`): a rule that will run `active` and

- was `shadow` or `off` in the last recorded set, or was not in it (a new rule);
- or was active at another version (its logic changed);
- or was active with other parameters (what it does changed).

Anything that changes what an active rule puts on a clinician's worklist needs sign-off.
Nothing else does: changes to shadow and off rules (shadow is where a rule is tried), and
standing an active rule down to shadow or off, which is the emergency brake for a rule that
floods clinicians and must never wait for a signature (the history shows it all the same).

**An approval** (`approve`, `safetynet rules approve`) is for one rule, exactly one version
and the parameters that rule has in the rules folder when it is given; it authorises one
recorded change (then it is used). Without a matching unused approval, `record_rule_set`
refuses with `ConfigurationError` naming the rule, its version and the command to run, and
records nothing: `safetynet serve` then exits with status 2 before it listens.

Replay and backtests record nothing and need no approval: they run on throw-away databases,
and a replay must not be able to make a change look approved in the service's database.

Tables: `rule_sets`, `rule_activations`, `rule_approvals` (adapters/store/schema.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select, text

from adapters.errors import AdapterError
from adapters.store import SqlStore
from adapters.store import schema as db
from engine.catalogue import Catalogue
from engine.errors import ConfigurationError

__all__ = [
    "Approval",
    "ApprovalRefused",
    "History",
    "RuleSetRecord",
    "RuleState",
    "approve",
    "change_needing_approval",
    "fingerprint",
    "load_history",
    "record_rule_set",
    "render_approval",
    "render_history",
    "rule_states",
    "verify_rule_set",
]

log = logging.getLogger("safetynet.governance")

# Names the PostgreSQL advisory lock that makes recording and approving one at a time (two
# instances starting together must not both record the same change, nor use one approval).
# SQLite needs none: a writing transaction there is already the only one.
_LOCK_ID = 0x5AFE7E8

NEW = "new"  # the from-status of a rule no recorded set held


class ApprovalRefused(AdapterError):
    """`safetynet rules approve` cannot record this approval (the reason says why)."""


@dataclass(frozen=True, slots=True)
class RuleState:
    """One rule as configured: what decides what it does. `parameters`: (name, value) pairs
    in rule.toml order."""

    rule_id: str
    title: str
    version: str
    status: str
    parameters: tuple[tuple[str, Any], ...]

    @property
    def parameter_values(self) -> dict[str, Any]:
        """Parameters by name, as JSON would give them back (for comparisons)."""
        return {name: value for name, value in _json_roundtrip(self.parameters)}


@dataclass(frozen=True, slots=True)
class Approval:
    """A recorded sign-off of one rule version (with its parameters) going active."""

    id: int
    rule_id: str
    version: str
    parameters: tuple[tuple[str, Any], ...]
    approved_at: datetime
    approved_by: str
    reason: str
    from_status: str
    to_status: str
    used_in: int | None = None  # the rule set (record id) whose change it authorised

    def matches(self, state: RuleState) -> bool:
        """Whether this approval is for exactly this version and these parameters."""
        return (
            self.rule_id == state.rule_id
            and self.version == state.version
            and dict(self.parameters) == state.parameter_values
        )


@dataclass(frozen=True, slots=True)
class RuleSetRecord:
    """One recorded rule set: when, by what, and every rule as it was (with the approval
    each change used, by rule id)."""

    id: int
    recorded_at: datetime
    recorded_by: str
    fingerprint: str
    baseline: bool
    rules_path: str
    rules: Mapping[str, RuleState]
    approvals: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class History:
    """Every recorded rule set (oldest first) and every approval (oldest first)."""

    records: tuple[RuleSetRecord, ...]
    approvals: tuple[Approval, ...]


# --- the rule set and what changed -----------------------------------------------------------


def _json_roundtrip(value: Any) -> Any:
    # Values as the database gives them back, so that stored and loaded values compare equal.
    return json.loads(json.dumps(value, default=str))


def rule_states(catalogue: Catalogue) -> tuple[RuleState, ...]:
    """Every rule of the catalogue as it will run, in catalogue order."""
    return tuple(
        RuleState(
            rule.id,
            rule.title,
            rule.version,
            rule.status,
            tuple((name, p.value) for name, p in rule.parameters.items()),
        )
        for rule in catalogue.rules
    )


def fingerprint(states: Sequence[RuleState]) -> str:
    """SHA-256 (hex) of every rule's id, version, status and parameters: equal fingerprints,
    same rule set. Titles and parameter order do not count."""
    canonical = sorted(
        (s.rule_id, s.version, s.status, sorted(s.parameter_values.items())) for s in states
    )
    text_ = json.dumps(canonical, separators=(",", ":"), default=str)
    return hashlib.sha256(text_.encode()).hexdigest()


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _parameter_changes(before: RuleState, after: RuleState) -> list[str]:
    old, new = before.parameter_values, after.parameter_values
    out = []
    for name in dict.fromkeys([*new, *old]):
        if name not in old:
            out.append(f"{name} {_show(new[name])} (new)")
        elif name not in new:
            out.append(f"{name} (removed; was {_show(old[name])})")
        elif old[name] != new[name]:
            out.append(f"{name} {_show(old[name])} -> {_show(new[name])}")
    return out


def change_needing_approval(before: RuleState | None, after: RuleState) -> str | None:
    """Why `after` needs an approval given `before` (the rule in the last recorded set, None
    when it was not in it), in plain English; None when it needs none."""
    if after.status != "active":
        return None
    if before is None:
        return "is configured active but was not in the rule set last recorded"
    if before.status != "active":
        return f"is configured active but was {before.status} in the rule set last recorded"
    if before.version != after.version:
        return (
            f"is active and its version changed from {before.version} since the rule set "
            "last recorded"
        )
    changes = _parameter_changes(before, after)
    if changes:
        return (
            "is active and its parameters changed ("
            + ", ".join(changes)
            + ") since the rule set last recorded"
        )
    return None


# --- reading ---------------------------------------------------------------------------------


def _pairs(value: Any) -> tuple[tuple[str, Any], ...]:
    return tuple((str(name), item) for name, item in value)


def _approval(row: Any, used_in: int | None) -> Approval:
    return Approval(
        id=int(row.id),
        rule_id=row.rule_id,
        version=row.version,
        parameters=_pairs(row.parameters),
        approved_at=row.approved_at,
        approved_by=row.approved_by,
        reason=row.reason,
        from_status=row.from_status,
        to_status=row.to_status,
        used_in=used_in,
    )


def _approvals(connection: Connection, rule_id: str | None = None) -> list[Approval]:
    a, act = db.rule_approvals, db.rule_activations
    query = (
        select(a, act.c.rule_set_id).outerjoin(act, act.c.approval_id == a.c.id).order_by(a.c.id)
    )
    if rule_id is not None:
        query = query.where(a.c.rule_id == rule_id)
    return [_approval(row, row.rule_set_id) for row in connection.execute(query)]


def _records(connection: Connection, last_only: bool = False) -> list[RuleSetRecord]:
    s, act = db.rule_sets, db.rule_activations
    query = select(s).order_by(s.c.id.desc() if last_only else s.c.id)
    heads = connection.execute(query.limit(1) if last_only else query).all()
    if not heads:
        return []
    members = select(act).order_by(act.c.rule_set_id, act.c.rule_id)
    if last_only:
        members = members.where(act.c.rule_set_id == heads[0].id)
    rows = connection.execute(members).all()
    by_set: dict[int, list[Any]] = {}
    for row in rows:
        by_set.setdefault(int(row.rule_set_id), []).append(row)
    return [
        RuleSetRecord(
            id=int(h.id),
            recorded_at=h.recorded_at,
            recorded_by=h.recorded_by,
            fingerprint=h.fingerprint,
            baseline=bool(h.baseline),
            rules_path=h.rules_path,
            rules={
                r.rule_id: RuleState(r.rule_id, r.title, r.version, r.status, _pairs(r.parameters))
                for r in by_set.get(int(h.id), [])
            },
            approvals={
                r.rule_id: int(r.approval_id)
                for r in by_set.get(int(h.id), [])
                if r.approval_id is not None
            },
        )
        for h in heads
    ]


def load_history(store: SqlStore) -> History:
    """Every recorded rule set and every approval, oldest first (read-only)."""
    with store.begin(read_only=True) as uow:
        return History(tuple(_records(uow.connection)), tuple(_approvals(uow.connection)))


# --- recording -------------------------------------------------------------------------------


@contextmanager
def _exclusive(store: SqlStore) -> Iterator[Connection]:
    """A writing transaction that no other recorder or approver runs beside."""
    with store.begin() as uow:
        if store.dialect == "postgresql":
            uow.connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_ID})
        yield uow.connection


def _when(at: datetime) -> str:
    return f"{at:%Y-%m-%d %H:%M} UTC"


def _db_option(store: SqlStore) -> str:
    return store.engine.url.render_as_string(hide_password=True)


def _why_not(state: RuleState, approvals: Sequence[Approval]) -> str:
    """Why the approvals given for this rule do not count, if any were given."""
    unused = [a for a in approvals if a.used_in is None]
    if not unused:
        return ""
    latest = unused[-1]
    if latest.version != state.version:
        return f" (approval {latest.id} is for version {latest.version}, not {state.version})"
    old = RuleState(state.rule_id, state.title, latest.version, "active", latest.parameters)
    changes = _parameter_changes(old, state)
    return f" (approval {latest.id} was given for other parameters: " + ", ".join(changes) + ")"


def _approvals_for(
    connection: Connection,
    store: SqlStore,
    catalogue: Catalogue,
    last: RuleSetRecord | None,
    states: Sequence[RuleState],
) -> tuple[dict[str, int], list[str]]:
    """The unused approval each change needing one will use (by rule id), and a plain-English
    line for each change that has none. The baseline (no `last`) needs none."""
    used: dict[str, int] = {}
    missing: list[str] = []
    if last is None:
        return used, missing
    for state in states:
        why = change_needing_approval(last.rules.get(state.rule_id), state)
        if why is None:
            continue
        given = _approvals(connection, state.rule_id)
        match = next((a for a in reversed(given) if a.used_in is None and a.matches(state)), None)
        if match is not None:
            used[state.rule_id] = match.id
            continue
        missing.append(
            f"rule {state.rule_id} version {state.version} {why} "
            f"({_when(last.recorded_at)}): it needs a recorded approval of version "
            f"{state.version} with its current parameters{_why_not(state, given)}. After "
            f"review, run:\n    safetynet rules approve {state.rule_id} --version "
            f"{state.version} --by NAME --reason TEXT --rules {catalogue.path} "
            f"--db {_db_option(store)}\n  or, to start without it, set its status to shadow "
            "in settings.toml."
        )
    return used, missing


def record_rule_set(store: SqlStore, catalogue: Catalogue, at: datetime, actor: str) -> None:
    """Record the rule set the service is starting with, if it differs from the last one
    recorded; refuse (ConfigurationError, nothing recorded) when a change needs an approval
    that has not been given. Call it once at start, before listening; `actor` says who
    started (e.g. "serve host:1234"). Not for replay or backtests (see the module docstring)."""
    states = rule_states(catalogue)
    print_ = fingerprint(states)
    with _exclusive(store) as connection:
        last = next(iter(_records(connection, last_only=True)), None)
        if last is not None and last.fingerprint == print_:
            return
        used, missing = _approvals_for(connection, store, catalogue, last, states)
        if missing:
            raise ConfigurationError(
                "not starting: a change to what an active rule does needs a recorded "
                "approval.\n  " + "\n  ".join(missing)
            )
        s, act = db.rule_sets, db.rule_activations
        record_id = connection.execute(
            insert(s).returning(s.c.id),
            {
                "recorded_at": at,
                "recorded_by": actor,
                "fingerprint": print_,
                "baseline": last is None,
                "rules_path": str(catalogue.path),
            },
        ).scalar_one()
        connection.execute(
            insert(act),
            [
                {
                    "rule_set_id": record_id,
                    "rule_id": st.rule_id,
                    "title": st.title,
                    "version": st.version,
                    "status": st.status,
                    "parameters": [list(p) for p in _json_roundtrip(st.parameters)],
                    "approval_id": used.get(st.rule_id),
                }
                for st in states
            ],
        )
        connection.execute(
            insert(db.audit),
            {
                "at": at,
                "actor": actor,
                "action": "rules.recorded",
                "subject": f"rule_set:{record_id}",
                "detail": {"fingerprint": print_, "baseline": last is None, "approvals": used},
            },
        )
    for state in states:
        if state.rule_id in used:
            log.info(
                "approved rule change now in force",
                extra={"rule_id": state.rule_id, "rule_version": state.version},
            )
    log.info(
        "rule set recorded",
        extra={"count": len(states), "state": "baseline" if last is None else "changed"},
    )


def verify_rule_set(store: SqlStore, catalogue: Catalogue) -> None:
    """Refuse (ConfigurationError) to run a rule set other than the last one recorded: for a
    process that evaluates rules without recording them (a restarted worker whose rules
    folder may have been edited since the service started)."""
    with store.begin(read_only=True) as uow:
        last = next(iter(_records(uow.connection, last_only=True)), None)
    if last is None or last.fingerprint != fingerprint(rule_states(catalogue)):
        raise ConfigurationError(
            f"the rules in {catalogue.path} are not the rule set recorded when the service "
            "started: restart the service to record (and, if needed, approve) them"
        )


# --- approving -------------------------------------------------------------------------------


def approve(
    store: SqlStore,
    catalogue: Catalogue,
    rule_id: str,
    version: str,
    by: str,
    reason: str,
    at: datetime,
) -> Approval:
    """Record that `by` approved `rule_id` at `version`, with the parameters it has in
    `catalogue` (the rules folder the service runs), going active, for `reason`. Raises
    ApprovalRefused when the rule or version is not the one in the folder, a name or reason
    is missing, or the rule already runs active exactly so (nothing to approve)."""
    if not by.strip():
        raise ApprovalRefused("--by: say who approves (a name the audit trail can show)")
    if not reason.strip():
        raise ApprovalRefused("--reason: say why (e.g. the backtest or review it rests on)")
    try:
        rule = catalogue.rule(rule_id)
    except KeyError:
        raise ApprovalRefused(f"{catalogue.path} has no rule {rule_id!r}") from None
    if rule.version != version:
        raise ApprovalRefused(
            f"{catalogue.path} has {rule_id} at version {rule.version}, not {version}: "
            "approve the version that will run"
        )
    state = next(s for s in rule_states(catalogue) if s.rule_id == rule_id)
    who, why = by.strip(), reason.strip()
    with _exclusive(store) as connection:
        last = next(iter(_records(connection, last_only=True)), None)
        before = last.rules.get(rule_id) if last is not None else None
        as_active = replace(state, status="active")
        if last and before and change_needing_approval(before, as_active) is None:
            raise ApprovalRefused(
                f"nothing to approve: {rule_id} version {version} has been active with "
                f"these parameters since the rule set recorded {_when(last.recorded_at)}"
            )
        from_status = before.status if before is not None else NEW
        parameters = [list(p) for p in _json_roundtrip(state.parameters)]
        a = db.rule_approvals
        approval_id = connection.execute(
            insert(a).returning(a.c.id),
            {
                "rule_id": rule_id,
                "version": version,
                "parameters": parameters,
                "approved_at": at,
                "approved_by": who,
                "reason": why,
                "from_status": from_status,
                "to_status": "active",
            },
        ).scalar_one()
        connection.execute(
            insert(db.audit),
            {
                "at": at,
                "actor": who,
                "action": "rule.approved",
                "subject": f"rule:{rule_id}",
                "detail": {"approval": approval_id, "version": version, "from": from_status},
            },
        )
    return Approval(
        int(approval_id), rule_id, version, _pairs(parameters), at, who, why, from_status, "active"
    )


# --- reading it out --------------------------------------------------------------------------


def render_approval(approval: Approval) -> str:
    """One approval in plain English (one line, then its use)."""
    if approval.from_status == approval.to_status:
        change = f"a change while {approval.to_status} (version or parameters)"
    else:
        before = "a new rule" if approval.from_status == NEW else approval.from_status
        change = f"{before} -> {approval.to_status}"
    return (
        f"approval {approval.id}, given {_when(approval.approved_at)} by "
        f"{approval.approved_by}: {approval.rule_id} version {approval.version}, "
        f"{change}, because: {approval.reason}"
    )


def _params_line(state: RuleState, indent: str) -> str:
    """ "parameters: a 1, b 2, ..." wrapped between parameters (never inside one)."""
    if not state.parameters:
        return "no parameters"
    items = [f"{n} {_show(v)}" for n, v in state.parameters]
    lines, line = [], "parameters:"
    for n, item in enumerate(items):
        piece = item + ("," if n + 1 < len(items) else "")
        if len(indent) + len(line) + 1 + len(piece) > 96 and line.strip():
            lines.append(line)
            line = "  "
        line += ("" if line == "  " else " ") + piece
    lines.append(line)
    return ("\n" + indent).join(lines)


def _same(a: RuleState | None, b: RuleState | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.version, a.status, a.parameter_values) == (b.version, b.status, b.parameter_values)


def _change(before: RuleState | None, after: RuleState) -> list[str]:
    if before is None:
        return ["added to the rule set"]
    out = []
    if before.status != after.status:
        out.append(f"switched from {before.status} to {after.status}")
    if before.version != after.version:
        out.append(f"version {before.version} -> {after.version}")
    changes = _parameter_changes(before, after)
    if changes:
        out.append("parameters changed: " + ", ".join(changes))
    return out


def _rule_lines(history: History, rule_id: str) -> list[str]:
    approvals = {a.id: a for a in history.approvals}
    records = {r.id: r for r in history.records}
    periods: list[tuple[RuleSetRecord, RuleState | None, list[str]]] = []
    previous: RuleState | None = None
    for record in history.records:
        state = record.rules.get(rule_id)
        if periods and _same(previous, state):
            continue
        if not periods and state is None:
            continue  # not yet in any recorded set
        notes: list[str]
        if state is None:
            notes = ["no longer in the rules folder"]
        elif record.baseline:
            notes = [
                "the baseline: the first rule set recorded on this database, taken as "
                "found (no approval needed)"
            ]
        else:
            notes = ["; ".join(_change(previous, state))]
            used = record.approvals.get(rule_id)
            if used is not None and used in approvals:
                a = approvals[used]
                notes.append(
                    f"approved by {a.approved_by} (approval {a.id}, given "
                    f"{_when(a.approved_at)}), because: {a.reason}"
                )
            elif change_needing_approval(previous, state) is None and state.status != "active":
                notes.append(f"no approval needed: the rule is {state.status}")
        periods.append((record, state, notes))
        previous = state
    title = next(
        (r.rules[rule_id].title for r in reversed(history.records) if rule_id in r.rules), ""
    )
    lines = [f"{rule_id}" + (f": {title}" if title else "")]
    if not periods:
        lines.append("  never in a recorded rule set")
    for n, (record, state, notes) in enumerate(periods):
        end = periods[n + 1][0].recorded_at if n + 1 < len(periods) else None
        when = (
            f"from {_when(record.recorded_at)} to {_when(end)}"
            if end is not None
            else f"from {_when(record.recorded_at)}, in force now"
        )
        what = (
            "not in the rule set" if state is None else f"version {state.version}, {state.status}"
        )
        lines.append(f"  {when}: {what}")
        lines.extend(f"    {note}" for note in notes)
        if state is not None:
            lines.append("    " + _params_line(state, "    "))
    given = [a for a in history.approvals if a.rule_id == rule_id]
    if given:
        lines.append("  approvals:")
    for a in given:
        lines.append(f"    {render_approval(a)}")
        if a.used_in is not None and a.used_in in records:
            lines.append(
                f"      used: in force from {_when(records[a.used_in].recorded_at)} "
                f"(rule set {a.used_in})"
            )
        else:
            lines.append(
                f"      not used yet: it takes effect when the service next starts with "
                f"{a.rule_id} {a.version} active with these parameters"
            )
            lines.append(
                "      "
                + _params_line(RuleState(a.rule_id, "", a.version, "", a.parameters), "      ")
            )
    return lines


def render_history(history: History, rule_id: str | None = None) -> str:
    """The history in plain English: each recorded rule set, then, per rule (or only
    `rule_id`), which version, status and parameters were in force from when to when, and its
    approvals. Raises LookupError for a rule never recorded nor approved here."""
    known = dict.fromkeys(
        [
            *(r for rec in history.records for r in rec.rules),
            *(a.rule_id for a in history.approvals),
        ]
    )
    if rule_id is not None and rule_id not in known:
        raise LookupError(f"no rule {rule_id!r} has been recorded or approved on this database")
    lines: list[str] = []
    if not history.records:
        lines.append(
            "No rule set has been recorded on this database yet: the service records one when "
            "it starts (the first is the baseline) and again whenever the rule set changes."
        )
    elif rule_id is None:
        lines.append(f"Rule sets recorded on this database: {len(history.records)}")
        previous: RuleSetRecord | None = None
        for record in history.records:
            if record.baseline:
                what = f"baseline (taken as found, no approval needed), {len(record.rules)} rules"
            else:
                assert previous is not None
                names = [
                    r
                    for r in dict.fromkeys([*previous.rules, *record.rules])
                    if not _same(previous.rules.get(r), record.rules.get(r))
                ]
                what = "changed: " + ", ".join(names)
            lines.append(
                f"  {record.id}. {_when(record.recorded_at)} by {record.recorded_by} "
                f"(rules {record.rules_path}, fingerprint {record.fingerprint[:12]}): {what}"
            )
            previous = record
    for name in [rule_id] if rule_id is not None else list(known):
        lines.append("")
        lines.extend(_rule_lines(history, name))
    return "\n".join(lines) + "\n"

"""Merged record reveals prior safeguarding-relevant history (clinical-rules R13, step 3).

The re-keying itself is the engine's (engine.processor: a merge moves aliases, orders, facts,
open Tasks and timers to the surviving patient and writes a `merge:<prior>` fact summarising
both sides; every rule is then re-evaluated over the combined history, and deterministic Task
identifiers keep Tasks already raised under the prior identity from being raised again).
This rule raises one Task per merge when one side held a safeguarding flag or a bruise or
mark finding and the other side had a history of its own (an attendance, a flag or a
finding): the merge put together what no one could see whole before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from engine.catalogue import Site
from engine.rulecore import c, m, when_all
from engine.tasks import RecallTask, RuleMatch, local_time, plus_hours, role_owner, when, who

CONCERNS = ("flags", "findings")  # safeguarding-relevant history in a merge summary
HISTORY = ("attendances", "flags", "findings")  # anything that makes a record a history


def _pairs() -> list[tuple[str, str, str, str]]:
    """(side with a concern, concern, other side, its history): every way a merge can join a
    concern on one side with a history on the other, each once (the "or" as variants)."""
    out = [("prior", concern, "surviving", seen) for concern in CONCERNS for seen in HISTORY]
    # A concern on the surviving side against a prior flag or finding is already a pair above.
    out += [("surviving", concern, "prior", "attendances") for concern in CONCERNS]
    return out


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """One match per merge fact (per way it qualifies; one Task per merge)."""
    out: dict[str, Mapping[str, Any]] = {}
    for side, concern, other, seen in _pairs():
        out[f"{side}-{concern}-{other}-{seen}"] = when_all(
            c.g
            << (
                (m.kind == "merge")
                & (m.age_months < p["max_age_months"])
                & (getattr(m, f"{side}_{concern}") > 0)
                & (getattr(m, f"{other}_{seen}") > 0)
            )
        ).define()
    return out


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _side(g: Mapping[str, Any], side: str) -> str:
    """What one side of the merge held, e.g. "1 active safeguarding flag and 2 attendances"."""
    parts = [
        _count(n, one, many)
        for n, one, many in (
            (
                int(g.get(f"{side}_flags", 0)),
                "active safeguarding flag",
                "active safeguarding flags",
            ),
            (
                int(g.get(f"{side}_findings", 0)),
                "bruise or mark finding",
                "bruise or mark findings",
            ),
            (int(g.get(f"{side}_attendances", 0)), "attendance", "attendances"),
        )
        if n > 0
    ]
    if not parts:
        return "no attendances, safeguarding flags or bruise or mark findings"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _merge_key(match: RuleMatch, g: Mapping[str, Any]) -> str:
    """The merge fact's key (`merge:<prior patient key>`): one per record merged in."""
    return next(key for key, fact in match.memory if fact is g)


def _history(match: RuleMatch) -> list[tuple[str, str]]:
    """The safeguarding-relevant facts of the combined record, oldest first, for the Task."""
    site = match.site
    rows: list[tuple[int, str, str]] = []
    for flag in match.of_kind("flag"):
        if flag.get("active"):
            rows.append(
                (
                    int(flag["at"]),
                    "Safeguarding flag",
                    f"{flag.get('flag', '')} raised at {when(int(flag['at']), site)}"
                    + (f" ({flag['category']})" if flag.get("category") else ""),
                )
            )
    for finding in match.of_kind("finding"):
        rows.append(
            (
                int(finding["at"]),
                "Finding",
                f"recorded as '{finding.get('words', '')}' at {when(int(finding['at']), site)}"
                f" in the {finding.get('source') or 'clinical note'}",
            )
        )
    return [(label, text) for _, label, text in sorted(rows)]


def recall_task(match: RuleMatch) -> RecallTask:
    """The review Task: whose records were merged, when, what each side held; review."""
    g, site = match.facts["g"], match.site
    at = int(g["at"])
    description = (
        f"Two records of the same {who(g, match.patient())} were merged at {when(at, site)}. "
        f"The record merged in held {_side(g, 'prior')}; the surviving record held "
        f"{_side(g, 'surviving')}. Neither record alone showed the whole history. Review the "
        "combined record with the safeguarding team and act per the local safeguarding "
        "procedure."
    )
    return match.task(
        order=None,
        key=_merge_key(match, g),
        trigger=f"merged:{at}",
        priority=match.p["priority"],
        description=description,
        reason="Merged record reveals prior safeguarding-relevant history",
        owner=role_owner(site, "safeguarding-lead"),
        encounter="",
        authored_on=local_time(at, site),
        deadline=plus_hours(at, match.p["ack_hours"], site),
        inputs=[
            ("Record merged in", _side(g, "prior")),
            ("Surviving record", _side(g, "surviving")),
            ("Merge message", str(g.get("message_id", ""))),
            *_history(match),
        ],
    )


def wake_times(
    facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
) -> Iterable[datetime]:
    """None: a merge is a message; nothing here changes on the clock alone."""
    return []

"""Cancelled discharge (clinical-rules R12): withdraw the Tasks that depended on it.

An A13 (cancel discharge / end visit) marks the visit's discharge fact cancelled. Every Task
that depended on that discharge (its rule's [tasks] discharge_dependent, and the Task names
the discharge by visit and time) and is still open goes to `cancelled`, with the discharge
named in the reason. Never withdrawn: critical (stat) Tasks and safeguarding Tasks, because
the finding is still real; and Tasks already accepted, in progress or closed (an A13 after a
Task was taken on leaves it with its owner). Open escalation Tasks of a withdrawn Task are
withdrawn by the escalation rule (task-not-accepted). Raises no Tasks of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from engine.catalogue import Site
from engine.rulecore import c, m, when_all
from engine.tasks import RuleMatch, TaskChange, when


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """One match per (open, withdrawable Task that depended on a discharge, that discharge
    now cancelled)."""
    return {
        "withdraw": when_all(
            c.t
            << (
                (m.kind == "task")
                & (m.dependent == 1)
                & (m.open == 1)
                & (m.critical == 0)
                & (m.safeguarding == 0)
            ),
            c.d
            << (
                (m.kind == "discharge")
                & (m.cancelled == 1)
                & (m.enc == c.t.discharge_enc)
                & (m.at == c.t.discharge_at)
            ),
        ).define(),
    }


def recall_task(match: RuleMatch) -> TaskChange | None:
    """The withdrawal, with the cancelled discharge named in the reason."""
    t, d, site = match.facts["t"], match.facts["d"], match.site
    if match.rule.status == "shadow" and not int(t.get("shadow", 0)):
        return None  # a rule in shadow mode changes no live Task
    place = site.place(str(d.get("location", "")), str(d.get("class", "")))
    reason = (
        f"The discharge from {place} at {when(int(d['at']), site)} was cancelled (A13); "
        "this Task depended on it."
    )
    return match.change(str(t["id"]), "cancelled", reason)


def wake_times(
    facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
) -> Iterable[datetime]:
    """None: a withdrawal follows the A13 message itself, never the clock."""
    return []

"""Discharge while the record is incomplete (DESIGN.md non-negotiable 3: fail closed).

A message the engine refused (quarantined: an identity clash, a link it could not make
safely, rules it could not evaluate) marks each patient it names with an
`incomplete:<inbox id>` fact until it is processed. A discharge home while such a fact is
unresolved raises a review Task: the net may be blind to something about this child. When the
message is later processed (a retry after the cause was fixed), the open Task is withdrawn:
the rules have then run on the complete record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from engine.catalogue import Site
from engine.definitions import (
    discharge_trigger,
    discharged_home,
    settle_ends,
    unless_admitted_after,
)
from engine.rulecore import c, m, when_all
from engine.tasks import (
    RecallTask,
    RuleMatch,
    TaskChange,
    local_time,
    plus_hours,
    role_owner,
    when,
    who,
)

RULE_ID = "record-incomplete-at-discharge"


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """`gap`: a discharge home while a refused message is unresolved (one Task per
    discharge, however many messages are held). `withdraw`: this rule's open Task once no
    message of the patient is held any more."""
    return {
        "gap": when_all(
            *discharged_home(p["max_age_months"], site.settle_minutes),
            c.i << ((m.kind == "incomplete") & (m.resolved == 0)),
        ).define(),
        "gap!unless-admitted": unless_admitted_after(site.settle_minutes),
        "withdraw": when_all(
            c.t << ((m.kind == "task") & (m.rule == RULE_ID) & (m.open == 1)),
        ).define(),
        "withdraw!unless-held": when_all(
            c.t << ((m.kind == "task") & (m.rule == RULE_ID)),
            c.i << ((m.kind == "incomplete") & (m.resolved == 0)),
        ).define(),
    }


def recall_task(match: RuleMatch) -> RecallTask | TaskChange:
    """The review Task, or the withdrawal of it once the message has been processed."""
    site = match.site
    if match.variant == "withdraw":
        return match.change(
            str(match.facts["t"]["id"]),
            "cancelled",
            "Every held message about this patient has now been processed; the safety net's "
            "rules have run on the complete record.",
        )
    d = match.facts["d"]
    patient = match.patient()
    held_facts = [f for f in match.of_kind("incomplete") if not f.get("resolved")]
    first = min(held_facts, key=lambda f: int(f["at"]))
    raised = max(int(d["at"]) + site.settle_minutes * 60, int(first["at"]))
    held = len(held_facts)
    inbox = ", ".join(str(f["inbox"]) for f in sorted(held_facts, key=lambda f: int(f["inbox"])))
    messages = "a message" if held == 1 else f"{held} messages"
    subject = "child" if 0 <= int(d["age_months"]) < 18 * 12 else "patient"
    description = (
        f"{who(d, patient).capitalize()} discharged from "
        f"{site.place(str(d.get('location', '')), str(d.get('class', '')))} at "
        f"{when(int(d['at']), site)}; {messages} about this {subject} could not be processed "
        f"and {'is' if held == 1 else 'are'} held for review (since "
        f"{when(int(first['at']), site)}; inbox {inbox}). The safety net may be missing "
        f"results or orders for this {subject}. Resolve the held "
        f"{'message' if held == 1 else 'messages'} today (safetynet quarantine list) so the "
        "rules can run on the full record, and tell the discharging team if it holds a "
        "pending or abnormal result."
    )
    return match.task(
        order=None,
        key="record",
        trigger=discharge_trigger(d),
        priority=match.p["priority"],
        description=description,
        reason="Patient discharged while a message about them was held in quarantine",
        owner=role_owner(site, "identity-pool"),
        encounter=str(d["enc"]),
        discharge=d,
        authored_on=local_time(raised, site),
        deadline=plus_hours(raised, match.p["ack_hours"], site),
    )


def wake_times(
    facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
) -> Iterable[datetime]:
    """The end of each live discharge's settle time."""
    return [local_time(t, site) for t in settle_ends(facts, site.settle_minutes)]

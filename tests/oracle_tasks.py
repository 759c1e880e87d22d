"""A plain-Python statement of the rules over Tasks: escalation (task-not-accepted, R11) and
withdrawal on a cancelled discharge (discharge-cancelled, R12), for differential checks.

Written from the two READMEs, independently of their rule.py files (no durable_rules): the
same input (one patient's working memory, Task facts included) and the same output (the
identifiers of the Tasks the rules raise, with their priority, and of the Tasks they change,
as "change:<status>").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine.catalogue import Catalogue, Site
from engine.tasks import task_identifier

R11 = "task-not-accepted"
R12 = "discharge-cancelled"

# Parameter name pattern and its unit in seconds, per priority.
_UNIT = {
    "stat": ("minutes", 60),
    "urgent": ("hours", 3600),
    "asap": ("hours", 3600),
    "routine": ("hours", 3600),
}


def _offset(params: Mapping[str, Any], priority: str, level: int) -> int:
    name, seconds = _UNIT[priority]
    return int(params[f"{priority}_l{level}_{name}"]) * seconds


def _owners(site: Site, task: Mapping[str, Any]) -> dict[int, str]:
    """Level -> owner id, as the README's "Who gets each level" says."""
    directory, pool = site.directory, site.pool.id
    owner = str(task["owner"])

    def role(name: str) -> str:
        held = directory.roles.get(name)
        return held[0].id if held is not None else pool

    _name, team_id = directory.clinicians.get(owner, ("", ""))
    team = directory.teams.get(team_id)
    if team is not None and team.lead and team.lead != owner:
        first = team.lead
    else:
        first = role("consultant-in-charge")
    if first == owner:
        first = role("on-call-lead")
    wanted = [(1, first), (2, role("on-call-lead"))]
    if task["safeguarding"] == 1:
        wanted.append((3, role("named-doctor-safeguarding")))
    out: dict[int, str] = {}
    taken = {owner}
    for level, who in wanted:
        if who not in taken:
            out[level] = who
            taken.add(who)
    return out


def _escalations(
    facts: Sequence[Mapping[str, Any]], now: int, catalogue: Catalogue
) -> dict[str, str]:
    rule = catalogue.rule(R11)
    if rule.status == "off":
        return {}
    params = rule.params
    tasks = [f for f in facts if f["kind"] == "task"]
    out: dict[str, str] = {}
    for t in tasks:
        if not (
            t["escalates"] == 1
            and t["open"] == 1
            and t["level"] == 0
            and t["shadow"] == 0
            and t["priority"] in _UNIT
        ):
            continue
        for level in _owners(catalogue.site, t):
            if now >= t["deadline_at"] + _offset(params, t["priority"], level):
                trigger = f"escalation:{t['id']}:L{level}"
                out[task_identifier(R11, t["okey"], trigger)] = t["priority"]
    by_id = {t["id"]: t for t in tasks}
    for e in tasks:
        if not (e["rule"] == R11 and e["level"] > 0 and e["open"] == 1):
            continue
        if rule.status == "shadow" and e["shadow"] == 0:
            continue
        parent = by_id.get(e["parent"])
        if parent is None or parent["level"] != 0:
            continue
        taken_on = parent["status"] in ("accepted", "in-progress")
        finished = parent["closed"] == 1 and parent["status"] != "rejected"
        if taken_on or finished or parent["acknowledged"] == 1:
            out[e["id"]] = "change:cancelled"
    return out


def _withdrawals(facts: Sequence[Mapping[str, Any]], catalogue: Catalogue) -> dict[str, str]:
    rule = catalogue.rule(R12)
    if rule.status == "off":
        return {}
    cancelled = {
        (d["enc"], d["at"]) for d in facts if d["kind"] == "discharge" and d["cancelled"] == 1
    }
    out: dict[str, str] = {}
    for t in facts:
        if t["kind"] != "task":
            continue
        if rule.status == "shadow" and t["shadow"] == 0:
            continue
        if (
            t["dependent"] == 1
            and t["open"] == 1
            and t["critical"] == 0
            and t["safeguarding"] == 0
            and (t["discharge_enc"], t["discharge_at"]) in cancelled
        ):
            out[t["id"]] = "change:cancelled"
    return out


def expected(
    memory: Sequence[tuple[str, Mapping[str, Any]]], catalogue: Catalogue
) -> dict[str, str]:
    """{task identifier: priority} for every escalation Task R11 raises over this working
    memory, and {task identifier: "change:cancelled"} for every Task R11 or R12 withdraws."""
    facts = [f for _, f in memory]
    now = next(f["t"] for f in facts if f["kind"] == "now")
    return {**_escalations(facts, now, catalogue), **_withdrawals(facts, catalogue)}

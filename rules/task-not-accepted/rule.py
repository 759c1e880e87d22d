"""Recall Task not accepted in time (clinical-rules R11): escalation, level by level.

Works over the Task facts the processor writes for every Task raised. An original Task (level
0, its rule escalates, not shadow) still not accepted when a step falls due raises an
escalation Task, `partOf` the original, owned by the next level:

    L1  the consultant in charge of the owner's team (the on-call lead when that is the owner)
    L2  the on-call lead
    L3  the named doctor for safeguarding children (safeguarding Tasks only)

Step times are counted from the original's deadline, per priority (parameters). A level
whose owner is the original's owner, or the owner of a lower level, is skipped (nobody is
escalated to themself). Accepting the original, or any escalation of it, stops the
escalation (the processor marks the original acknowledged); open escalation Tasks of an
original that was accepted, completed or withdrawn are then withdrawn too (cancelled, with
the reason). A rejected original keeps its escalation Tasks open: somebody must own it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from engine.catalogue import Site
from engine.errors import ConfigurationError
from engine.events import Clinician
from engine.facts import from_epoch, months_between
from engine.rulecore import c, m, when_all
from engine.tasks import (
    PRIORITIES,
    RecallTask,
    RuleMatch,
    TaskChange,
    age_phrase,
    consultant_in_charge,
    local_time,
    person,
    role_owner,
    when,
)

RULE_ID = "task-not-accepted"
LEVELS = (1, 2, 3)
UNITS = {"stat": 60, "urgent": 3600, "asap": 3600, "routine": 3600}  # parameter unit, seconds
UNIT_NAMES = {60: "minutes", 3600: "hours"}
ROLE_WORDS = {
    "team-lead": "consultant in charge of the owner's team",
    "consultant-in-charge": "consultant in charge",
    "on-call-lead": "on-call lead",
    "named-doctor-safeguarding": "named doctor for safeguarding children",
}
# Ways an original is settled, so that its open escalation Tasks are no longer needed. Not
# "rejected": a Task its owner turned down still needs somebody to own it.
SETTLED = ("accepted", "in-progress", "closed", "acknowledged")


def _settled(how: str) -> Any:
    """The condition on an original Task that is settled in this way."""
    if how == "closed":
        return (m.closed == 1) & (m.status != "rejected")
    if how == "acknowledged":
        return m.acknowledged == 1  # an escalation of it was accepted
    return m.status == how


def _param(p: Mapping[str, Any], priority: str, what: str) -> int:
    """A timing parameter of `priority` in seconds (`what`: l1, l2, l3 or ack)."""
    unit = UNITS[priority]
    return int(p[f"{priority}_{what}_{UNIT_NAMES[unit]}"]) * unit


def step_offsets(p: Mapping[str, Any], priority: str) -> dict[int, int]:
    """Seconds after the original's deadline at which each level falls due."""
    return {level: _param(p, priority, f"l{level}") for level in LEVELS}


def _check(p: Mapping[str, Any]) -> None:
    for priority in PRIORITIES:
        l1, l2, l3 = (step_offsets(p, priority)[level] for level in LEVELS)
        if not 0 <= l1 <= l2 <= l3:
            raise ConfigurationError(
                f"{RULE_ID}: {priority} escalation times must satisfy 0 <= L1 <= L2 <= L3"
            )
        if _param(p, priority, "ack") <= 0:
            raise ConfigurationError(f"{RULE_ID}: {priority} last-step deadline must be > 0")


def _original() -> Any:
    """An original Task (not itself an escalation) that escalates and is still open."""
    return (
        (m.kind == "task") & (m.escalates == 1) & (m.open == 1) & (m.level == 0) & (m.shadow == 0)
    )


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """One variant per (level, priority): the step has fallen due for an open original; and
    one per way an original is settled: an open escalation Task of it is withdrawn."""
    _check(p)
    out: dict[str, Mapping[str, Any]] = {}
    for priority in PRIORITIES:
        for level, offset in step_offsets(p, priority).items():
            task = _original() & (m.priority == priority)
            if level == 3:
                task = task & (m.safeguarding == 1)
            out[f"escalate-L{level}-{priority}"] = when_all(
                c.t << task,
                c.n << ((m.kind == "now") & (m.t >= c.t.deadline_at + offset)),
            ).define()
    for how in SETTLED:
        # The engine overwrites a fact's `id` with its own, so the join is on the subject
        # key and the parent's identifier is checked in recall_task.
        out[f"withdraw-{how}"] = when_all(
            c.e << ((m.kind == "task") & (m.rule == RULE_ID) & (m.level > 0) & (m.open == 1)),
            c.t << ((m.kind == "task") & (m.okey == c.e.okey) & (m.level == 0) & _settled(how)),
        ).define()
    return out


# --- who owns each level ----------------------------------------------------------------------


def ladder(site: Site, task: Mapping[str, Any]) -> dict[int, tuple[Clinician, bool, str]]:
    """The escalation levels of this original Task: level -> (owner, is pool, role words).

    L1 the consultant in charge of the owner's team (the on-call lead when that consultant is
    the owner); L2 the on-call lead; L3 the named doctor for safeguarding children, for
    safeguarding Tasks only. A level whose owner is the original's owner or already owns a
    lower level is left out."""
    owner = str(task["owner"])
    on_call = (*role_owner(site, "on-call-lead"), "on-call-lead")
    in_team = site.directory.team_lead(owner) is not None
    cic = (*consultant_in_charge(site, owner), "team-lead" if in_team else "consultant-in-charge")
    steps: list[tuple[int, tuple[Clinician, bool, str]]] = [
        (1, cic if cic[0].id != owner else on_call),
        (2, on_call),
    ]
    if int(task.get("safeguarding", 0)) == 1:
        steps.append(
            (3, (*role_owner(site, "named-doctor-safeguarding"), "named-doctor-safeguarding"))
        )
    seen = {owner}
    out: dict[int, tuple[Clinician, bool, str]] = {}
    for level, (who, pool, role) in steps:
        if who.id in seen:
            continue
        seen.add(who.id)
        out[level] = (who, pool, role)
    return out


def name_of(site: Site, ident: str, named: str = "") -> str:
    """How the text names a Task's owner: a clinician by the name the directory knows
    ("Dr C1001"); a pool or team with "the" ("the safeguarding children team"); else
    `named` (the name the feed gave), else "its owner"."""
    if ident == site.pool.id:
        return _the(site.pool.name or "results pool")
    name = site.directory.person(ident).name
    if name:
        return name
    for who, pool in site.directory.roles.values():
        if who.id == ident and who.name:
            return _the(who.name) if pool else who.name
    return named or "its owner"


def _the(team: str) -> str:
    return f"the {team[:1].lower()}{team[1:]}"


# --- the Task -------------------------------------------------------------------------------


def duration(seconds: int) -> str:
    """A span as clinicians say it: "30 minutes", "4 hours", "7 days"."""
    minutes = max(0, seconds) // 60
    if minutes < 120 and minutes % 60:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    hours = minutes // 60
    if hours >= 48 and hours % 24 == 0:
        return f"{hours // 24} days"
    return f"{hours} hour{'s' if hours != 1 else ''}"


def _title(task: Mapping[str, Any]) -> str:
    """The original's rule title (task facts carry only the rule id, which reads as a phrase)."""
    title = str(task.get("title", "")) or str(task["rule"]).replace("-", " ")
    return title[:1].upper() + title[1:]


def _about(match: RuleMatch, task: Mapping[str, Any]) -> tuple[str, Mapping[str, Any] | None]:
    """What the original is about, in words, and its order fact (None if not an order)."""
    site, patient = match.site, match.patient()
    birth = patient.get("birth_at")
    months = days = -1
    if birth is not None:
        born = from_epoch(int(birth)).astimezone(site.timezone)
        then = from_epoch(int(task["raised_at"])).astimezone(site.timezone)
        months, days = months_between(born, then), (then - born).days
    age = age_phrase(days, months)
    number = age.split("-", 1)[0]
    article = "an" if number.startswith("8") or number in ("11", "18") else "a"
    patient_words = (
        f"{article} {age} {person(str(patient.get('sex', '')), months)}"
        if age
        else "a patient of unknown age"
    )
    order = next((o for o in match.of_kind("order") if o.get("okey") == task["okey"]), None)
    about = patient_words
    if order is not None and order.get("name"):
        about = f"the {order['name']} of {patient_words}"
    discharge_at = int(task.get("discharge_at", 0) or 0)
    if discharge_at:
        enc = str(task.get("discharge_enc", ""))
        d = next((f for f in match.of_kind("discharge") if f.get("enc") == enc), {})
        place = site.place(str(d.get("location", "")), str(d.get("class", "")))
        about += f" discharged from {place} at {when(discharge_at, site)}"
    return about, order


def _escalate(match: RuleMatch, level: int) -> RecallTask | None:
    t, site, p = match.facts["t"], match.site, match.p
    steps = ladder(site, t)
    if level not in steps:
        return None  # that level's owner already has the Task
    who, pool, role = steps[level]
    priority = str(t["priority"])
    offsets = step_offsets(p, priority)
    deadline_at = int(t["deadline_at"])
    raised = deadline_at + offsets[level]
    later = [lv for lv in steps if lv > level]
    due = deadline_at + offsets[later[0]] if later else raised + _param(p, priority, "ack")
    owner = name_of(site, str(t["owner"]), str(t.get("owner_name", "")))
    original_raised = int(t["raised_at"])
    about, order = _about(match, t)
    before = [name_of(site, steps[lv][0].id, steps[lv][0].name) for lv in steps if lv < level]
    history = (
        f" It was escalated to {' and then '.join(before)} and is still not accepted."
        if before
        else ""
    )
    description = (
        f"{owner[:1].upper() + owner[1:]} has not accepted the safety-net Task "
        f'"{_title(t)}" about {about}. It was raised at {when(original_raised, site)} and was '
        f"due by {when(deadline_at, site)}.{history} As {ROLE_WORDS[role]}, make sure it is "
        f"taken on by {when(due, site)}: accepting this Task takes responsibility for it and "
        "stops the escalation."
    )
    who_missed = owner if not before else f"{owner} or {' or '.join(before)}"
    reason = (
        f"Not accepted by {who_missed} within {duration(raised - original_raised)} of "
        f"{when(original_raised, site)}"
    )
    return match.task(
        order=order,
        key=str(t["okey"]),
        trigger=f"escalation:{t['id']}:L{level}",
        priority=priority,
        description=description,
        reason=reason,
        owner=(who, pool),
        encounter=str(t.get("enc", "")),
        authored_on=local_time(raised, site),
        deadline=local_time(due, site),
        part_of=str(t["id"]),
        level=level,
        inputs=[
            ("Escalated Task", str(t["id"])),
            ("Owner of the escalated Task", owner),
            ("Escalation level", f"L{level} ({ROLE_WORDS[role]})"),
        ],
    )


WITHDRAWN = {
    "accepted": "the Task it escalated has been accepted",
    "in-progress": "the Task it escalated is in progress",
    "completed": "the Task it escalated has been completed",
    "cancelled": "the Task it escalated was withdrawn",
}


def _withdraw(match: RuleMatch) -> TaskChange | None:
    e, t = match.facts["e"], match.facts["t"]
    if str(t["id"]) != str(e["parent"]):
        return None  # same subject, another Task
    if match.rule.status == "shadow" and not int(e.get("shadow", 0)):
        return None  # a rule in shadow mode changes only its own shadow Tasks
    why = WITHDRAWN.get(str(t["status"]))
    if why is None:
        why = (
            "another escalation of the same Task has been accepted"
            if int(t.get("acknowledged", 0))
            else f"the Task it escalated is {t['status']}"
        )
    return match.change(str(e["id"]), "cancelled", f"No longer needed: {why}.")


def recall_task(match: RuleMatch) -> RecallTask | TaskChange | None:
    """An escalation Task for a step that fell due, or the withdrawal of an escalation Task
    whose original has been taken on or withdrawn."""
    if match.variant.startswith("withdraw-"):
        return _withdraw(match)
    level = int(match.variant.split("-")[1][1:])
    return _escalate(match, level)


def wake_times(
    facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
) -> Iterable[datetime]:
    """Every step time of every open original Task that escalates."""
    out: list[datetime] = []
    for _, t in facts:
        if not (
            t.get("kind") == "task"
            and t.get("escalates") == 1
            and t.get("open") == 1
            and t.get("level") == 0
            and t.get("shadow") == 0
            and t.get("priority") in PRIORITIES
        ):
            continue
        offsets = step_offsets(p, str(t["priority"]))
        top = 3 if int(t.get("safeguarding", 0)) == 1 else 2
        out.extend(
            local_time(int(t["deadline_at"]) + offsets[level], site) for level in LEVELS[:top]
        )
    return out

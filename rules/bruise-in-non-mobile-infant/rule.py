"""A "mark" or "bruise" in a non-mobile infant (clinical-rules R10).

Notes reach the rules as finding facts: the terminology map (rules/terminology.toml) turns
"mark", "grip marks", "discolouration", "?bruise" or "squeezed" into the concept "bruise",
leaves negated mentions out ("no bruising"), and keeps the words as written and the
TEN-4-FACESp region. A bruise finding counts in an infant younger than `nim_age_months` (or
`any_bruise_age_months`), or in a child younger than `region_age_months` on a TEN-4-FACESp
region, or younger than `patterned_age_months` when patterned. It raises Tasks when no
safeguarding flag is recorded within `review_hours` of the note: at the end of that time, or
at once when the child goes home from that visit before then. Two Tasks, since a FHIR Task has
one owner: one for the consultant in charge, one for the safeguarding team, `partOf` it.
No module-level state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from engine.catalogue import Site
from engine.definitions import discharged_home, settle_ends, unless_admitted_after
from engine.events import Clinician
from engine.rulecore import c, m, when_all
from engine.tasks import (
    RecallTask,
    RuleMatch,
    age_phrase,
    consultant_in_charge,
    local_time,
    person,
    plus_hours,
    role_owner,
    when,
)

CONCEPT = "bruise"
ANY_AGE = 10**6  # discharged_home's age limit when the cohort is decided at the note
REGIONS = {
    "torso": "the torso",
    "ear": "the ear",
    "neck": "the neck",
    "frenulum": "the frenulum",
    "angle-of-jaw": "the angle of the jaw",
    "cheek": "the cheek",
    "eyelid": "the eyelid",
    "subconjunctiva": "the eye (subconjunctival)",
}


def _cohorts(p: Mapping[str, Any]) -> dict[str, list[Any]]:
    """Why a bruise counts, one list of tests per reason (an "or" is several variants)."""
    young = max(p["nim_age_months"], p["any_bruise_age_months"])
    return {
        "young": [m.age_months < young],
        "region": [m.age_months < p["region_age_months"], m.region != ""],
        "patterned": [m.age_months < p["patterned_age_months"], m.patterned == 1],
    }


def _all(*tests: Any) -> Any:
    """The conjunction of single tests, kept flat. Measured here: durable_rules 2.0.28
    mis-evaluates a comparison with another fact that follows a nested conjunction
    (`a & (b & c) & (m.at >= c.d.at - x)` matched when the last test failed), so a
    conjunction is never put on the right of `&`."""
    out = tests[0]
    for test in tests[1:]:
        out = out & test
    return out


def conditions(p: Mapping[str, Any], site: Site) -> Mapping[str, Mapping[str, Any]]:
    """For each reason: "<reason>-timed", the review time has passed (now `n`), and
    "<reason>-home", the child went home from the note's visit (discharge `d`) before the end
    of it. Each is cancelled by a flag `g` within the review time of the note
    (`!unless-flagged`), and by an earlier note `e` of the same visit within the review time
    that counts for the same reason (`!unless-covered`: its Task covers this one). Each match
    raises the consultant's Task and the safeguarding team's."""
    review = p["review_hours"] * 3600
    out: dict[str, Mapping[str, Any]] = {}
    for reason, cohort in _cohorts(p).items():
        bruise = [m.kind == "finding", m.concept == CONCEPT, *cohort]
        timed, home = f"{reason}-timed", f"{reason}-home"
        out[timed] = when_all(
            c.f << _all(*bruise),
            c.n << _all(m.kind == "now", m.t >= c.f.at + review),
        ).define()
        out[home] = when_all(
            *discharged_home(ANY_AGE, site.settle_minutes),
            c.f << _all(*bruise, m.enc == c.d.enc, m.at >= c.d.at - review),
        ).define()
        out[f"{home}!unless-admitted"] = unless_admitted_after(site.settle_minutes)
        for name in (timed, home):
            out[f"{name}!unless-flagged"] = when_all(
                c.f << (m.kind == "finding"),
                c.g << _all(m.kind == "flag", m.at >= c.f.at - review, m.at <= c.f.at + review),
            ).define()
            out[f"{name}!unless-covered"] = when_all(
                c.f << (m.kind == "finding"),
                c.e
                << _all(
                    *bruise,
                    m.enc != "",
                    m.enc == c.f.enc,
                    m.at < c.f.at,
                    m.at >= c.f.at - review,
                ),
            ).define()
    return out


def _quoted(words: str) -> str:
    """The words as written, each mention quoted: '"grip marks" and "?bruise"'."""
    said = [f'"{w}"' for w in words.split("; ") if w]
    return said[0] if len(said) == 1 else ", ".join(said[:-1]) + " and " + said[-1]


def _limit(months: int) -> str:
    """An age limit in words: "6 months", "4 years"."""
    return f"{months // 12} years" if months % 12 == 0 and months >= 24 else f"{months} months"


def _reasons(f: Mapping[str, Any], p: Mapping[str, Any]) -> list[str]:
    """Why this bruise counts, in words (every reason that holds)."""
    months, young, out = (
        int(f["age_months"]),
        max(p["nim_age_months"], p["any_bruise_age_months"]),
        [],
    )
    if months < 0:
        out.append(
            "the age is unknown (no date of birth on record), so the net assumes a baby who "
            "is not independently mobile"
        )
    elif months < young:
        out.append(f"a baby under {_limit(young)} is not independently mobile")
    if f.get("region") and months < p["region_age_months"]:
        out.append(
            f"it is on {REGIONS.get(str(f['region']), str(f['region']))}, a TEN-4-FACESp region "
            f"(under {_limit(p['region_age_months'])})"
        )
    if f.get("patterned") and months < p["patterned_age_months"]:
        out.append("it is patterned (hand, grip, ligature, implement or bite)")
    return out


def _consultant(site: Site, clinician_id: str) -> tuple[Clinician, bool]:
    """The consultant in charge of the attending's team; the attending, when they lead a team
    themself; else the consultant-in-charge role; else the pool."""
    if clinician_id and any(t.lead == clinician_id for t in site.directory.teams.values()):
        return site.directory.person(clinician_id), False
    return consultant_in_charge(site, clinician_id)


def _a(phrase: str) -> str:
    """`phrase` with its indefinite article: "an 8-week-old boy", "a triage note"."""
    if phrase.startswith(("a ", "an ", "the ")):
        return phrase
    if phrase.endswith(("details", "notes", "records")):  # plural: "the request details"
        return f"the {phrase}"
    first = phrase.split(" ", 1)[0].split("-", 1)[0].lower()
    spoken_vowel = first in ("8", "11", "18") or (first[:1] != "" and first[0] in "8aeiou")
    return f"{'an' if spoken_vowel else 'a'} {phrase}"


def _display(site: Site) -> str:
    try:
        return site.terminology.concept(CONCEPT).display
    except KeyError:
        return CONCEPT


def recall_task(match: RuleMatch) -> list[RecallTask]:
    """The consultant's Task, and the safeguarding team's, `partOf` it."""
    f, site, p = match.facts["f"], match.site, match.p
    d = match.facts.get("d") if "-home" in match.variant else None
    review = int(p["review_hours"])
    months = int(f["age_months"])
    age = age_phrase(int(f["age_days"]), months)
    child = (
        f"{age} {person(str(match.patient().get('sex', '')), months)}"
        if age
        else "child of unknown age (no date of birth on record)"
    )
    source = str(f.get("source", "")) or "clinical note"
    recorded = (
        f"Possible bruising in {_a(child)}: recorded as {_quoted(str(f['words']))} "
        f"(suspected bruise{', patterned' if f.get('patterned') else ''}) in {_a(source)} at "
        f"{when(int(f['at']), site)}. It counts because "
        f"{'; '.join(_reasons(f, p)) or 'it is a bruise in a young child'}."
    )
    if d is not None:
        raised = max(int(f["at"]), int(d["at"]) + site.settle_minutes * 60)
        absent = (
            f"The child went home from "
            f"{site.place(str(d.get('location', '')), str(d.get('class', '')))} at "
            f"{when(int(d['at']), site)} with no safeguarding referral (flag) recorded."
        )
        priority = p["priority_discharged"]
        deadline = local_time(raised, site) + timedelta(minutes=p["ack_minutes_discharged"])
        act = (
            "Arrange for the child to be seen again today and refer under the local "
            "safeguarding procedure"
        )
    else:
        raised = int(f["at"]) + review * 3600
        absent = f"No safeguarding referral (flag) has been recorded in the {review} hours since."
        priority = p["priority"]
        deadline = plus_hours(raised, p["ack_hours"], site)
        act = "Refer under the local safeguarding procedure"
    guidance = (
        f"NICE CG89: suspect maltreatment. {act}; consider a skeletal survey and neuro-imaging "
        "per RCR guidance."
    )
    encounter = next((e for e in match.of_kind("encounter") if e.get("enc") == f["enc"]), {})
    consultant = _consultant(site, str(encounter.get("attending_id", "")))
    key = f"finding:{f['note']}:{f['concept']}"
    common: dict[str, Any] = {
        "order": None,
        "key": key,
        "priority": priority,
        "encounter": str(f.get("enc", "")),
        "authored_on": local_time(raised, site),
        "deadline": deadline,
        "discharge": d,
        "inputs": [
            ("Words recorded", str(f["words"])),
            ("Concept", _display(site)),
            ("Recorded in", source),
            ("Terminology map version", str(f.get("terminology", "")) or site.terminology.version),
        ],
    }
    reason = "Possible bruising in a non-mobile infant or young child; no safeguarding referral"
    own = match.task(
        trigger="finding",
        description=f"{recorded} {absent} {guidance}",
        reason=reason,
        owner=consultant,
        **common,
    )
    team = match.task(
        trigger="finding:lead",
        description=(
            f"For the safeguarding team: {recorded[0].lower()}{recorded[1:]} {absent} "
            f"{consultant[0].name or 'The consultant in charge'} has a Task to act on it "
            "(NICE CG89: suspect maltreatment). Make sure the child is referred under the "
            "local safeguarding procedure and a safeguarding flag is recorded; consider a "
            "skeletal survey and neuro-imaging per RCR guidance."
        ),
        reason=reason,
        owner=role_owner(site, "safeguarding-lead"),
        part_of=own.identifier,
        **common,
    )
    return [own, team]


def wake_times(
    facts: Sequence[tuple[str, Mapping[str, Any]]], p: Mapping[str, Any], site: Site
) -> Iterable[datetime]:
    """The end of each bruise finding's review time, and of each discharge's settle time."""
    ends = [
        int(f["at"]) + int(p["review_hours"] * 3600)
        for _, f in facts
        if f.get("kind") == "finding" and f.get("concept") == CONCEPT
    ]
    return [local_time(t, site) for t in ends + settle_ends(facts, site.settle_minutes)]

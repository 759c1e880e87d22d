"""A plain-Python statement of the merge, identity and repeat-attendance rules (R13-R15).

Written from the rule READMEs (rules/merge-reveals-history, rules/result-identity-unresolved,
rules/repeat-attendance-infant), independently of their rule.py: the same input (one
patient's working memory) and the same output (deterministic Task identifiers with their
priority, and "change:<status>" for a rule's change to an existing Task). A rule whose status
is "off" raises nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from engine.catalogue import Catalogue
from engine.tasks import task_identifier

R13 = "merge-reveals-history"
R14 = "result-identity-unresolved"
R15 = "repeat-attendance-infant"
R2 = "report-final-after-discharge"
DAY = 86_400

Memory = Sequence[tuple[str, Mapping[str, Any]]]


def expected(memory: Memory, catalogue: Catalogue) -> dict[str, str]:
    """{task identifier: priority} of every Task R13-R15 raise over `memory`, and
    {task identifier: "change:<status>"} for every change they make to a Task."""
    out: dict[str, str] = {}
    for rule_id, decide in ((R13, _merge), (R14, _identity), (R15, _repeat)):
        rule = catalogue.rule(rule_id)
        if rule.status != "off":
            out.update(decide(memory, rule.params, catalogue))
    return out


def _of(memory: Memory, kind: str) -> list[tuple[str, Mapping[str, Any]]]:
    return [(key, f) for key, f in memory if f.get("kind") == kind]


def _merge(memory: Memory, p: Mapping[str, Any], catalogue: Catalogue) -> dict[str, str]:
    """R13: a merge joining a flag or finding on one side with any history on the other."""
    out = {}
    for key, g in _of(memory, "merge"):
        if not g["age_months"] < p["max_age_months"]:  # unknown age (-1) is in the cohort
            continue

        def concern(side: str, g: Mapping[str, Any] = g) -> bool:
            return bool(g[f"{side}_flags"] > 0 or g[f"{side}_findings"] > 0)

        def history(side: str, g: Mapping[str, Any] = g) -> bool:
            return concern(side) or g[f"{side}_attendances"] > 0

        if (concern("prior") and history("surviving")) or (
            concern("surviving") and history("prior")
        ):
            out[task_identifier(R13, key, f"merged:{g['at']}")] = p["priority"]
    return out


def _identity(memory: Memory, p: Mapping[str, Any], catalogue: Catalogue) -> dict[str, str]:
    """R14: a placeholder's result after the grace time; a wrong-patient withdrawal of a real
    patient; the withdrawal of an open unresolved Task once the patient is known."""
    out: dict[str, str] = {}
    patients = [f for _, f in _of(memory, "patient")]
    placeholder = any(f.get("unmatched") == 1 for f in patients)
    matched = any(f.get("unmatched") == 0 for f in patients)
    now = next(f["t"] for _, f in _of(memory, "now"))
    orders = {f["okey"] for _, f in _of(memory, "order")}
    for _, r in _of(memory, "report"):
        if r["okey"] not in orders:
            continue
        if placeholder and now >= r["at"] + p["grace_minutes"] * 60:
            out[task_identifier(R14, r["okey"], "unresolved-identity")] = p["priority"]
        if not placeholder and r["wrong_patient"] == 1:
            out[task_identifier(R14, r["okey"], "wrong-patient")] = p["wrong_patient_priority"]
    if matched:
        for _, t in _of(memory, "task"):
            if (
                t["rule"] == R14
                and t["open"] == 1
                and t["level"] == 0
                and t["id"] == task_identifier(R14, t["okey"], "unresolved-identity")
            ):
                out[t["id"]] = "change:cancelled"
    return out


def _months(birth_at: int, at: int, catalogue: Catalogue) -> int:
    tz = catalogue.site.timezone
    born, then = datetime.fromtimestamp(birth_at, tz), datetime.fromtimestamp(at, tz)
    return (then.year - born.year) * 12 + then.month - born.month - (then.day < born.day)


def _repeat(memory: Memory, p: Mapping[str, Any], catalogue: Catalogue) -> dict[str, str]:
    """R15: two emergency attendances within the window, an infant at the second, and a
    bruise at either, a flag active between the first's start and the second's end, or the
    first's imaging reported after discharge."""
    out: dict[str, str] = {}
    birth_at = next((f["birth_at"] for _, f in _of(memory, "patient") if "birth_at" in f), None)
    visits = [
        f
        for _, f in _of(memory, "encounter")
        if f.get("class") == "E" and isinstance(f.get("started_at"), int)
    ]
    findings = [f for _, f in _of(memory, "finding") if f["concept"] == "bruise"]
    flags = [f for _, f in _of(memory, "flag")]
    discharges = [f for _, f in _of(memory, "discharge") if f["cancelled"] == 0]
    late = [f for _, f in _of(memory, "task") if f["rule"] == R2 and f["level"] == 0]
    for first in visits:
        for second in visits:
            start1, start2 = first["started_at"], second["started_at"]
            if not start1 < start2 <= start1 + p["window_days"] * DAY:
                continue
            if birth_at is not None and _months(birth_at, start2, catalogue) >= p["max_age_months"]:
                continue

            def left_before(at: int, second: Mapping[str, Any] = second) -> bool:
                return any(d["enc"] == second["enc"] and d["at"] < at for d in discharges)

            concern = (
                any(f["enc"] in (first["enc"], second["enc"]) for f in findings)
                or any(g["at"] <= start2 and g["cleared_at"] > start1 for g in flags)
                or any(g["at"] > start2 and not left_before(g["at"]) for g in flags)
                or any(t["enc"] == first["enc"] for t in late)
            )
            if concern:
                key = f"attendance:{second['enc']}:{start2}"
                out[task_identifier(R15, key, "repeat-attendance")] = p["priority"]
    return out

"""A plain-Python statement of the rules, for differential checks against the engine.

Written from the rule READMEs, independently of engine/definitions.py: same inputs (the
working memory of one patient), same outputs (deterministic Task identifiers and priorities).
durable_rules' failure modes are silent, so every evaluation is compared with this.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from engine.catalogue import Catalogue
from engine.tasks import task_identifier

R1 = "imaging-pending-at-discharge"
R2 = "report-final-after-discharge"


def went_home(
    facts: Sequence[Mapping[str, Any]], now: int, max_age_months: int, settle: int
) -> Iterator[Mapping[str, Any]]:
    """DESIGN.md "Discharge", in plain Python: discharges that left the hospital's care, not
    cancelled, of a patient younger than `max_age_months` then (unknown age, -1, counts),
    whose settle time (seconds) has passed without an admission in it."""
    for d in facts:
        if d["kind"] != "discharge" or d["leaves_care"] != 1 or d["cancelled"] != 0:
            continue
        if not d["age_months"] < max_age_months or now < d["at"] + settle:
            continue
        if any(
            a["kind"] == "admission"
            and a["cancelled"] == 0
            and d["at"] <= a["at"] <= d["at"] + settle
            for a in facts
        ):
            continue
        yield d


def expected_tasks(
    memory: Sequence[tuple[str, Mapping[str, Any]]],
    max_age_months: int = 24,
    settle_minutes: int = 15,
) -> dict[str, str]:
    """{task identifier: priority} that R1 and R2 raise over this working memory."""
    facts = [f for _, f in memory]
    now = next(f["t"] for f in facts if f["kind"] == "now")
    settle = settle_minutes * 60
    out: dict[str, str] = {}
    for d in went_home(facts, now, max_age_months, settle):
        trigger = f"discharge:{d['enc']}:{d['at']}"
        for o in facts:
            if o["kind"] != "order" or o["imaging"] != 1 or o.get("enc") != d["enc"]:
                continue
            if o["ordered_at"] > d["at"] or o["cancelled_at"] <= d["at"]:
                continue
            reports = [r for r in facts if r["kind"] == "report" and r["okey"] == o["okey"]]
            finals = [r for r in reports if r["status"] in ("F", "C")]
            if any(r["at"] <= d["at"] for r in finals):
                continue
            out[task_identifier(R1, o["okey"], trigger)] = "urgent"
            after = [r for r in finals if r["at"] > d["at"]]
            if not after:
                continue
            first = min(after, key=lambda r: r["at"])
            prelims = [r for r in reports if r["status"] == "P" and r["at"] <= first["at"]]

            def abnormal(r: Mapping[str, Any]) -> frozenset[str]:
                return frozenset(x for x in r["flags"].split(",") if x and x != "N")

            urgent = bool(abnormal(first))
            if prelims:
                latest = max(prelims, key=lambda r: r["at"])
                urgent = urgent or abnormal(latest) != abnormal(first)
            out[task_identifier(R2, o["okey"], trigger + ":final")] = (
                "urgent" if urgent else "routine"
            )
    return out


def all_expected(
    memory: Sequence[tuple[str, Mapping[str, Any]]], catalogue: Catalogue
) -> dict[str, str]:
    """What every rule of the catalogue decides over this working memory, in plain Python:
    {Task identifier: priority} for Tasks raised, {identifier: "change:<status>"} for changes
    to existing Tasks. Each rule group states its rules in tests/oracle_<group>.py."""
    r1 = catalogue.rule(R1).params
    out = expected_tasks(memory, r1["max_age_months"], catalogue.site.settle_minutes)
    out = {k: v for k, v in out.items() if catalogue.rule(k.rsplit("-", 1)[0]).status != "off"}
    for module in _group_oracles():
        for identifier, decision in module.expected(memory, catalogue).items():
            raised = not decision.startswith("change:")
            if raised and catalogue.rule(identifier.rsplit("-", 1)[0]).status == "off":
                continue
            out[identifier] = decision
    return out


def _group_oracles() -> list[ModuleType]:
    here = Path(__file__).resolve().parent
    return [
        importlib.import_module(f"tests.{path.stem}") for path in sorted(here.glob("oracle_*.py"))
    ]

"""Plain-Python statement of record-incomplete-at-discharge (its README), for the
differential check: one review Task per discharge home while a refused message is held,
withdrawn once no message is held."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine.catalogue import Catalogue
from engine.tasks import task_identifier
from tests.oracle import went_home

RULE = "record-incomplete-at-discharge"


def expected(
    memory: Sequence[tuple[str, Mapping[str, Any]]], catalogue: Catalogue
) -> dict[str, str]:
    """{identifier: priority} raised; {identifier: "change:cancelled"} withdrawn."""
    rule = catalogue.rule(RULE)
    if rule.status == "off":
        return {}
    p, settle = rule.params, catalogue.site.settle_minutes * 60
    facts = [f for _, f in memory]
    now = next(f["t"] for f in facts if f["kind"] == "now")
    held = [f for f in facts if f["kind"] == "incomplete" and f["resolved"] == 0]
    out: dict[str, str] = {}
    if held:
        for d in went_home(facts, now, p["max_age_months"], settle):
            out[task_identifier(RULE, "record", f"discharge:{d['enc']}:{d['at']}")] = p["priority"]
    else:
        for t in facts:
            if t["kind"] == "task" and t["rule"] == RULE and t["open"] == 1:
                out[str(t["id"])] = "change:cancelled"
    return out

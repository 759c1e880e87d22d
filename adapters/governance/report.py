"""The backtest report: the numbers once, then the same numbers as HTML, CSV and JSON.

`numbers(backtest)` reduces a `Backtest` (adapters.governance.backtest) to one JSON-able
document: the archive, each rule set's rules and parameters, its Tasks per rule per ISO week,
per owner per day (the burden on each clinician), by priority and by shadow/live, and the
differences between the two rule sets (Tasks only in one, each with its reason, and Tasks in
both whose priority, owner, status or shadow mark differ). `write_json`, `write_csv` and
`render_html` / `write_html` only lay that document out, so the three always agree.

The HTML file is self-contained: inline CSS, inline SVG charts drawn here (bars, stacked bars
and a heat map are a few lines each; no charting library is installed that writes SVG without
a browser), no script, no external reference of any kind. Every chart has a table beside it.

Nothing here sees patient details: `TaskRow` carries a pseudonym and redacted text only.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta
from html import escape
from pathlib import Path
from typing import Any

from adapters.governance.backtest import (
    Backtest,
    BacktestError,
    RuleCard,
    RuleSetRun,
    TaskRow,
)

__all__ = [
    "HTML_LIST_LIMIT",
    "PRIORITIES",
    "csv_tables",
    "numbers",
    "render_html",
    "summary_line",
    "write_csv",
    "write_html",
    "write_json",
]

FORMAT = 1
PRIORITIES = ("stat", "asap", "urgent", "routine")  # most pressing first
HTML_LIST_LIMIT = 1000  # Task rows per difference list in the HTML (all are in CSV/JSON)
TOP_OWNERS = 25  # rows of the burden heat map
PRIVACY = (
    "No patient names, identifiers or dates of birth: patients are named by a pseudonym (a "
    "keyed hash under a key drawn at random for this report and never stored, so it links the "
    "two rule sets of this report and nothing else), and Task texts have ages, sex, times, "
    "dates, quoted free text and identifiers removed. Owners are clinicians and pools, named."
)

# --- the numbers --------------------------------------------------------------------------


def _week(at: datetime) -> str:
    year, week, _ = at.isocalendar()
    return f"{year}-W{week:02d}"


def _split(rows: Iterable[TaskRow]) -> dict[str, int]:
    total = live = 0
    for row in rows:
        total += 1
        live += not row.shadow
    return {"tasks": total, "live": live, "shadow": total - live}


def _rule_card(card: RuleCard) -> dict[str, Any]:
    return {
        "id": card.id,
        "title": card.title,
        "version": card.version,
        "status": card.status,
        "status_source": card.status_source,
        "parameters": [
            {
                "name": p.name,
                "value": p.value,
                "default": p.default,
                "unit": p.unit,
                "source": p.source,
            }
            for p in card.parameters
        ],
    }


def _grouped(rows: Sequence[TaskRow], key: Any) -> dict[Any, list[TaskRow]]:
    out: dict[Any, list[TaskRow]] = defaultdict(list)
    for row in rows:
        out[key(row)].append(row)
    return out


def _rule_set(run: RuleSetRun) -> dict[str, Any]:
    """One rule set's counts. Rules with no Task are listed too (unless switched off)."""
    tasks = run.tasks
    versions = {c.id: c.version for c in run.rules}
    by_rule_rows = _grouped(tasks, lambda r: r.rule_id)
    rule_ids = [c.id for c in run.rules if c.status != "off" or c.id in by_rule_rows]
    rule_ids += sorted(set(by_rule_rows) - set(rule_ids))
    by_rule = [
        {"rule": rid, "version": versions.get(rid, ""), **_split(by_rule_rows.get(rid, []))}
        for rid in rule_ids
    ]
    by_priority_rows = _grouped(tasks, lambda r: r.priority)
    priorities = [p for p in PRIORITIES if p in by_priority_rows]
    priorities += sorted(set(by_priority_rows) - set(PRIORITIES))
    per_owner_day = [
        {"owner_id": owner, "owner_name": name, "day": day.isoformat(), **_split(rows)}
        for (owner, name, day), rows in sorted(
            _grouped(tasks, lambda r: (r.owner_id, r.owner_name, r.raised.date())).items()
        )
    ]
    owners = []
    for (owner, name), rows in _grouped(tasks, lambda r: (r.owner_id, r.owner_name)).items():
        days = Counter(r.raised.date() for r in rows if not r.shadow)
        busiest = max(sorted(days.items()), key=lambda kv: kv[1], default=None)
        split = _split(rows)
        owners.append(
            {
                "owner_id": owner,
                "owner_name": name,
                **split,
                "days_with_live_tasks": len(days),
                "busiest_day": busiest[0].isoformat() if busiest else "",
                "busiest_day_live": busiest[1] if busiest else 0,
                "mean_live_per_day_with_tasks": round(split["live"] / len(days), 2)
                if days
                else 0.0,
            }
        )
    owners.sort(key=lambda o: (-o["live"], -o["tasks"], o["owner_id"]))
    return {
        "label": run.label,
        "rules_dir": str(run.rules_dir),
        "seconds": round(run.seconds, 3),
        "messages_per_second": round(run.messages / run.seconds, 1) if run.seconds else None,
        "rules": [_rule_card(c) for c in run.rules],
        "site": dict(run.site),
        "tasks": _split(tasks),
        "by_rule": by_rule,
        "by_priority": [{"priority": p, **_split(by_priority_rows[p])} for p in priorities],
        "by_status": [
            {"status": s, "tasks": n} for s, n in sorted(Counter(r.status for r in tasks).items())
        ],
        "priority_by_rule": [
            {"rule": rid, "priority": p, **_split(rows)}
            for (rid, p), rows in sorted(
                _grouped(tasks, lambda r: (r.rule_id, r.priority)).items(),
                key=lambda kv: (rule_ids.index(kv[0][0]), _priority_rank(kv[0][1])),
            )
        ],
        "per_rule_week": [
            {"rule": rid, "week": week, **_split(rows)}
            for (week, rid), rows in sorted(
                _grouped(tasks, lambda r: (_week(r.raised), r.rule_id)).items(),
                key=lambda kv: (kv[0][0], rule_ids.index(kv[0][1])),
            )
        ],
        "per_owner_day": per_owner_day,
        "owners": owners,
    }


def _priority_rank(priority: str) -> int:
    return PRIORITIES.index(priority) if priority in PRIORITIES else len(PRIORITIES)


def _value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def rule_changes(candidate: RuleSetRun, baseline: RuleSetRun) -> list[dict[str, str]]:
    """What differs between the two rules folders: rules added or removed, versions,
    statuses, parameter values, and the site settings (time zone, settle time, sections)."""
    out: list[dict[str, str]] = []
    cand = {c.id: c for c in candidate.rules}
    base = {c.id: c for c in baseline.rules}
    for rid in [c.id for c in candidate.rules] + [i for i in base if i not in cand]:
        c, b = cand.get(rid), base.get(rid)
        if c is None or b is None:
            out.append(
                {
                    "rule": rid,
                    "what": "rule",
                    "baseline": "present" if b else "absent",
                    "candidate": "present" if c else "absent",
                }
            )
            continue
        for what, bv, cv in (("version", b.version, c.version), ("status", b.status, c.status)):
            if bv != cv:
                out.append({"rule": rid, "what": what, "baseline": bv, "candidate": cv})
        bp = {p.name: p for p in b.parameters}
        cp = {p.name: p for p in c.parameters}
        for name in list(cp) + [n for n in bp if n not in cp]:
            bval = _value(bp[name].value) if name in bp else "(none)"
            cval = _value(cp[name].value) if name in cp else "(none)"
            if bval != cval:
                unit = (cp.get(name) or bp[name]).unit
                out.append(
                    {
                        "rule": rid,
                        "what": f"parameter {name}" + (f" ({unit})" if unit else ""),
                        "baseline": bval,
                        "candidate": cval,
                    }
                )
    for key in ("timezone", "settle_minutes"):
        if baseline.site.get(key) != candidate.site.get(key):
            out.append(
                {
                    "rule": "(site settings)",
                    "what": key,
                    "baseline": str(baseline.site.get(key)),
                    "candidate": str(candidate.site.get(key)),
                }
            )
    bs, cs = baseline.site.get("sections", {}), candidate.site.get("sections", {})
    for section in sorted(set(bs) | set(cs)):
        if bs.get(section) != cs.get(section):
            out.append(
                {
                    "rule": "(site settings)",
                    "what": section if section.endswith((".toml", ")")) else f"[{section}]",
                    "baseline": "as in the baseline folder",
                    "candidate": "changed" if section in bs and section in cs else "added/removed",
                }
            )
    return out


def _cause(row: TaskRow, changes: Sequence[Mapping[str, str]], differing: Mapping[str, str]) -> str:
    """Why a Task appears, disappears or changes, as far as the settings tell. `differing`:
    the identifiers of Tasks raised under one rule set only, with the side they are on."""
    own = [c for c in changes if c["rule"] == row.rule_id]
    if own:
        return "; ".join(f"{c['what']}: {c['baseline']} → {c['candidate']}" for c in own)
    site = [c for c in changes if c["rule"] == "(site settings)"]
    if row.part_of in differing:
        return (
            f"this rule is unchanged: it acts on {row.part_of}, which is only under the "
            f"{differing[row.part_of]}"
        )
    if site:
        return "this rule is unchanged: the site settings differ"
    return "this rule is unchanged: it follows from other rules' Tasks"


def _task(row: TaskRow, cause: str = "") -> dict[str, Any]:
    return {
        "identifier": row.identifier,
        "rule": row.rule_id,
        "rule_version": row.rule_version,
        "patient": row.patient,
        "order": row.order,
        "priority": row.priority,
        "status": row.status,
        "shadow": row.shadow,
        "owner_id": row.owner_id,
        "owner_name": row.owner_name,
        "raised_day": row.raised.date().isoformat(),
        "week": _week(row.raised),
        "reason": row.reason,
        "text": row.text,
        "part_of": row.part_of,
        **({"cause": cause} if cause else {}),
    }


CHANGED_FIELDS = ("priority", "owner_id", "status", "shadow", "rule_version")


def differences(candidate: RuleSetRun, baseline: RuleSetRun) -> dict[str, Any]:
    """Tasks only under one rule set (matched by identifier, i.e. rule, order and trigger, and
    by patient pseudonym), and Tasks under both that differ in priority, owner, status,
    shadow mark or rule version."""
    changes = rule_changes(candidate, baseline)
    cand = {r.key: r for r in candidate.tasks}
    base = {r.key: r for r in baseline.tasks}
    differing = {r.identifier: "baseline" for k, r in base.items() if k not in cand}
    differing |= {r.identifier: "candidate" for k, r in cand.items() if k not in base}
    only_c = [_task(r, _cause(r, changes, differing)) for k, r in cand.items() if k not in base]
    only_b = [_task(r, _cause(r, changes, differing)) for k, r in base.items() if k not in cand]
    changed = []
    for k, c in cand.items():
        b = base.get(k)
        if b is None:
            continue
        fields = {
            f: {"baseline": getattr(b, f), "candidate": getattr(c, f)}
            for f in CHANGED_FIELDS
            if getattr(b, f) != getattr(c, f)
        }
        if fields:
            item = _task(c, _cause(c, changes, differing))
            item["changes"] = fields
            if "owner_id" in fields:
                item["baseline_owner_name"] = b.owner_name
            changed.append(item)
    rules = [r["rule"] for r in only_c + only_b + changed]
    order = list(dict.fromkeys([c.id for c in candidate.rules] + sorted(set(rules))))
    by_rule = [
        {
            "rule": rid,
            "only_candidate": sum(1 for t in only_c if t["rule"] == rid),
            "only_baseline": sum(1 for t in only_b if t["rule"] == rid),
            "changed": sum(1 for t in changed if t["rule"] == rid),
        }
        for rid in order
        if rid in rules
    ]
    return {
        "rule_changes": changes,
        "summary": {
            "only_candidate": len(only_c),
            "only_baseline": len(only_b),
            "changed": len(changed),
        },
        "by_rule": by_rule,
        "only_candidate": only_c,
        "only_baseline": only_b,
        "changed": changed,
    }


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def numbers(result: Backtest) -> dict[str, Any]:
    """The whole report as one JSON-able document (what `--json` writes)."""
    a = result.archive
    span = (
        round((a.last_event - a.first_event).total_seconds() / 86400, 2)
        if a.first_event and a.last_event
        else None
    )
    rule_sets = {"candidate": _rule_set(result.candidate)}
    if result.baseline is not None:
        rule_sets["baseline"] = _rule_set(result.baseline)
    zone = result.timezone
    return {
        "report": "safetynet backtest",
        "format": FORMAT,
        "generated_at": result.generated_at.isoformat(timespec="seconds"),
        "timezone": zone,
        "archive": {
            "files": list(a.files),
            "file_count": len(a.files),
            "bytes": a.bytes,
            "messages": a.messages,
            "rejected": a.rejected,
            "unsupported": a.unsupported,
            "first_event": _iso(_local(a.first_event, zone)),
            "last_event": _iso(_local(a.last_event, zone)),
            "span_days": span,
            "until": _iso(a.until),
        },
        "rule_sets": rule_sets,
        "differences": differences(result.candidate, result.baseline)
        if result.baseline is not None
        else None,
        "privacy": PRIVACY,
    }


def _local(at: datetime | None, zone: str) -> datetime | None:
    if at is None:
        return None
    from zoneinfo import ZoneInfo

    try:
        return at.astimezone(ZoneInfo(zone))
    except (KeyError, ValueError):
        return at


def summary_line(doc: Mapping[str, Any]) -> str:
    """One line for the terminal: Tasks per rule set and the differences."""
    parts = []
    for label, rs in doc["rule_sets"].items():
        t = rs["tasks"]
        parts.append(f"{label}: {t['tasks']} Task(s) ({t['live']} live, {t['shadow']} shadow)")
    diff = doc["differences"]
    if diff is not None:
        s = diff["summary"]
        parts.append(
            f"{s['only_candidate']} only under the candidate, {s['only_baseline']} only under "
            f"the baseline, {s['changed']} changed"
        )
    return f"{doc['archive']['messages']:,} messages; " + "; ".join(parts)


# --- JSON and CSV -------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise BacktestError(f"{path}: cannot be written: {exc.strerror}") from exc
    return path


def write_json(doc: Mapping[str, Any], path: Path) -> Path:
    """The document as JSON (UTF-8, indented)."""
    return _write(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


TASK_COLUMNS = (
    "identifier",
    "rule",
    "rule_version",
    "patient",
    "order",
    "priority",
    "status",
    "shadow",
    "owner_id",
    "owner_name",
    "raised_day",
    "week",
    "reason",
    "text",
    "part_of",
    "cause",
)


def csv_tables(doc: Mapping[str, Any]) -> dict[str, list[list[Any]]]:
    """The document's tables as CSV rows (header first), by file name. Every table has a
    `rule_set` column so the candidate and the baseline share one file."""
    sets = doc["rule_sets"]
    tables: dict[str, list[list[Any]]] = {}

    def table(name: str, key: str, columns: Sequence[str]) -> None:
        rows: list[list[Any]] = [["rule_set", *columns]]
        for label, rs in sets.items():
            rows.extend([label, *(item[c] for c in columns)] for item in rs[key])
        tables[name] = rows

    table("tasks_per_rule_week.csv", "per_rule_week", ("rule", "week", "tasks", "live", "shadow"))
    table(
        "tasks_per_owner_day.csv",
        "per_owner_day",
        ("owner_id", "owner_name", "day", "tasks", "live", "shadow"),
    )
    table(
        "owners.csv",
        "owners",
        (
            "owner_id",
            "owner_name",
            "tasks",
            "live",
            "shadow",
            "days_with_live_tasks",
            "busiest_day",
            "busiest_day_live",
            "mean_live_per_day_with_tasks",
        ),
    )
    table("priority_mix.csv", "by_priority", ("priority", "tasks", "live", "shadow"))
    table(
        "priority_by_rule.csv", "priority_by_rule", ("rule", "priority", "tasks", "live", "shadow")
    )
    table("tasks_by_rule.csv", "by_rule", ("rule", "version", "tasks", "live", "shadow"))
    params: list[list[Any]] = [
        [
            *("rule_set", "rule", "version", "status", "status_source", "parameter", "value"),
            *("default", "unit", "source"),
        ]
    ]
    for label, rs in sets.items():
        for rule in rs["rules"]:
            head = [label, rule["id"], rule["version"], rule["status"], rule["status_source"]]
            if not rule["parameters"]:
                params.append([*head, "", "", "", "", ""])
            for p in rule["parameters"]:
                value, default = _value(p["value"]), _value(p["default"])
                params.append([*head, p["name"], value, default, p["unit"], p["source"]])
    tables["rules.csv"] = params
    a = doc["archive"]
    tables["archive.csv"] = [
        ["name", "value"],
        *(
            [k, a[k]]
            for k in (
                "file_count",
                "bytes",
                "messages",
                "rejected",
                "unsupported",
                "first_event",
                "last_event",
                "span_days",
                "until",
            )
        ),
    ]
    diff = doc["differences"]
    if diff is not None:
        rows: list[list[Any]] = [["side", *TASK_COLUMNS, "changes"]]
        for side in ("only_candidate", "only_baseline", "changed"):
            for item in diff[side]:
                changes = "; ".join(
                    f"{f}: {v['baseline']} → {v['candidate']}"
                    for f, v in item.get("changes", {}).items()
                )
                rows.append([side, *(item.get(c, "") for c in TASK_COLUMNS), changes])
        tables["differences.csv"] = rows
        tables["rule_changes.csv"] = [
            ["rule", "what", "baseline", "candidate"],
            *([c["rule"], c["what"], c["baseline"], c["candidate"]] for c in diff["rule_changes"]),
        ]
    return tables


def write_csv(doc: Mapping[str, Any], folder: Path) -> list[Path]:
    """Every table of `csv_tables` as a file in `folder` (created if needed)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BacktestError(f"--csv {folder}: cannot be created: {exc.strerror}") from exc
    written = []
    for name, rows in csv_tables(doc).items():
        path = folder / name
        try:
            with path.open("w", encoding="utf-8", newline="") as fh:
                csv.writer(fh).writerows(rows)
        except OSError as exc:
            raise BacktestError(f"{path}: cannot be written: {exc.strerror}") from exc
        written.append(path)
    return written


# --- SVG ----------------------------------------------------------------------------------

RULE_COLOURS = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#1f77b4",
    "#8c564b",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
    "#d62728",
    "#2ca02c",
)
PRIORITY_COLOURS = {"stat": "#b2182b", "asap": "#e66101", "urgent": "#f4a442", "routine": "#4e79a7"}
LIVE, SHADOW = "#1b6ca8", "#c2c2c2"


def _nice_max(value: int) -> int:
    """A round axis maximum at or above `value`."""
    if value <= 5:
        return max(value, 1)
    step = 10 ** (len(str(value)) - 1)
    for m in (1, 2, 2.5, 5, 10):
        top = int(m * step)
        if top >= value:
            return top
    return value


LABEL_CHARS = 48  # longer row labels are shortened (the table beside the chart has them whole)


def _label(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def _margin(labels: Iterable[str]) -> int:
    """Room for row labels at about 6 px a character (11 px type)."""
    return 16 + 6 * max((len(_label(t)) for t in labels), default=8)


def _svg(width: int, height: int, label: str, body: Iterable[str]) -> str:
    return (
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(label)}"><title>{escape(label)}</title>' + "".join(body) + "</svg>"
    )


def svg_stacked_columns(
    categories: Sequence[str],
    series: Sequence[tuple[str, str, Sequence[int]]],
    label: str,
    y_max: int | None = None,
) -> str:
    """Vertical stacked columns: one column per category, one segment per (name, colour,
    values) series. `y_max` shares a scale between charts."""
    n = max(len(categories), 1)
    bar = max(6, min(40, 720 // n))
    left, top, bottom = 44, 10, 58
    width = max(360, left + n * bar + 10)
    height = 240
    plot = height - top - bottom
    totals = [sum(s[2][i] for s in series) for i in range(len(categories))]
    scale_max = _nice_max(y_max if y_max is not None else max(totals, default=0))
    body: list[str] = []
    for k in range(5):
        v = scale_max * k / 4
        y = top + plot - plot * k / 4
        body.append(
            f'<line x1="{left}" x2="{width - 6}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" class="axis" text-anchor="end">{v:g}</text>'
        )
    every = max(1, n // 16)
    for i, cat in enumerate(categories):
        x = left + i * bar
        base = float(top + plot)
        for name, colour, values in series:
            v = values[i]
            if not v:
                continue
            h = plot * v / scale_max
            base -= h
            body.append(
                f'<rect x="{x + 1}" y="{base:.1f}" width="{bar - 2}" height="{h:.1f}" '
                f'fill="{colour}"><title>{escape(cat)} · {escape(name)}: {v}</title></rect>'
            )
        if i % every == 0:
            tx, ty = x + bar / 2, top + plot + 8
            body.append(
                f'<text x="{tx:.1f}" y="{ty:.1f}" class="axis" text-anchor="end" '
                f'transform="rotate(-50 {tx:.1f} {ty:.1f})">{escape(cat)}</text>'
            )
    return _svg(width, height, label, body)


def svg_stacked_rows(
    rows: Sequence[tuple[str, Sequence[tuple[str, str, int]]]],
    label: str,
    shares: bool = False,
    x_max: int | None = None,
) -> str:
    """Horizontal stacked bars: one bar per (row label, segments); each segment (name,
    colour, value). `shares`: every bar is 100% (a mix); else bars share a count scale."""
    left, right, bar, gap = _margin(r[0] for r in rows), 60, 18, 6
    width = left + 520 + right
    height = 10 + len(rows) * (bar + gap) + 6
    plot = width - left - right
    biggest = (
        x_max if x_max is not None else max((sum(s[2] for s in r[1]) for r in rows), default=1)
    )
    biggest = max(biggest, 1)
    body: list[str] = []
    for i, (name, segments) in enumerate(rows):
        y = 10 + i * (bar + gap)
        total = sum(s[2] for s in segments)
        body.append(
            f'<text x="{left - 6}" y="{y + bar - 5}" class="axis" text-anchor="end">'
            f"{escape(_label(name))}</text>"
        )
        x = float(left)
        for seg, colour, value in segments:
            if not value:
                continue
            w = plot * value / (total if shares else biggest)
            share = f" ({100 * value / total:.0f}%)" if total else ""
            body.append(
                f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar}" fill="{colour}">'
                f"<title>{escape(name)} · {escape(seg)}: {value}{share}</title></rect>"
            )
            x += w
        body.append(f'<text x="{x + 4:.1f}" y="{y + bar - 5}" class="axis">{total}</text>')
    return _svg(width, height, label, body)


def svg_heatmap(
    rows: Sequence[str], columns: Sequence[str], values: Sequence[Sequence[int]], label: str
) -> str:
    """A heat map: rows (owners) by columns (days), darker for more."""
    left, top = _margin(rows), 64
    cell = max(4, min(18, 900 // max(len(columns), 1)))
    width = left + len(columns) * cell + 10
    height = top + len(rows) * 16 + 6
    peak = max((v for row in values for v in row), default=0) or 1
    body: list[str] = []
    every = max(1, len(columns) // 20)
    for j, col in enumerate(columns):
        if j % every == 0:
            tx, ty = left + j * cell + cell / 2, top - 6
            body.append(
                f'<text x="{tx:.1f}" y="{ty}" class="axis" '
                f'transform="rotate(-60 {tx:.1f} {ty})">{escape(col)}</text>'
            )
    for i, name in enumerate(rows):
        y = top + i * 16
        body.append(
            f'<text x="{left - 6}" y="{y + 12}" class="axis" text-anchor="end">'
            f"{escape(_label(name))}</text>"
        )
        for j, v in enumerate(values[i]):
            if not v:
                continue
            alpha = 0.15 + 0.85 * v / peak
            body.append(
                f'<rect x="{left + j * cell}" y="{y}" width="{cell - 1}" height="15" '
                f'fill="{LIVE}" fill-opacity="{alpha:.2f}"><title>{escape(name)} · '
                f"{escape(columns[j])}: {v}</title></rect>"
            )
    return _svg(width, height, label, body)


# --- HTML ---------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;color:#1d2330;
margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:34px 0 8px;padding-top:10px;
border-top:2px solid #e3e6eb}h3{font-size:15px;margin:18px 0 6px}
p.lead{color:#4a5262;margin:0 0 14px}nav a{margin-right:14px;color:#1b6ca8}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px}
th,td{border-bottom:1px solid #e3e6eb;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr.sub td{color:#4a5262;font-size:12px;border-bottom:1px solid #cfd4dc}
.box{display:flex;flex-wrap:wrap;gap:12px;margin:10px 0}
.stat{border:1px solid #e3e6eb;border-radius:6px;padding:10px 14px;min-width:150px}
.stat b{display:block;font-size:22px}.stat span{color:#4a5262;font-size:12px}
mark{background:#fff1b8;padding:0 2px}.muted{color:#6b7384;font-size:12px}
.chart{overflow-x:auto;margin:6px 0}svg text{font:11px system-ui,Arial,sans-serif;fill:#333}
svg .grid{stroke:#e6e8ec}ul.legend{list-style:none;padding:0;margin:4px 0 10px;display:flex;
flex-wrap:wrap;gap:4px 14px;font-size:12px}ul.legend span{display:inline-block;width:11px;
height:11px;margin-right:5px;vertical-align:-1px;border-radius:2px}
.plus{color:#1a7f37;font-weight:600}.minus{color:#b42318;font-weight:600}
.scroll{max-height:640px;overflow:auto;border:1px solid #e3e6eb}
@media print{body{background:#fff}.scroll{max-height:none;overflow:visible}}
"""


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else escape(str(value))


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    out = ["<table><thead><tr>"]
    out += [f"<th{' class=n' if i in numeric else ''}>{escape(h)}</th>" for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for i, cell in enumerate(row):
            content = cell if isinstance(cell, _Html) else _n(cell)
            out.append(f"<td{' class=n' if i in numeric else ''}>{content}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


class _Html(str):
    """Text already escaped (a table cell holding markup)."""


def _legend(items: Iterable[tuple[str, str]]) -> str:
    return (
        '<ul class="legend">'
        + "".join(
            f'<li><span style="background:{colour}"></span>{escape(name)}</li>'
            for name, colour in items
        )
        + "</ul>"
    )


def _weeks(first: str, last: str) -> list[str]:
    """Every ISO week from `first` to `last` (e.g. 2026-W02), so quiet weeks show as gaps."""
    start = date.fromisocalendar(int(first[:4]), int(first[6:]), 1)
    end = date.fromisocalendar(int(last[:4]), int(last[6:]), 1)
    out = []
    while start <= end:
        year, week, _ = start.isocalendar()
        out.append(f"{year}-W{week:02d}")
        start += timedelta(days=7)
    return out


def _days(first: str, last: str) -> list[str]:
    start, end = date.fromisoformat(first), date.fromisoformat(last)
    return [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def _size(n: int) -> str:
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{n} bytes"


def _when(value: str | None) -> str:
    if not value:
        return "–"
    at = datetime.fromisoformat(value)
    return f"{at:%Y-%m-%d %H:%M} ({at:%a}, ISO week {_week(at)})"


class _Page:
    """Builds the HTML of one report from its document."""

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.doc = doc
        self.sets: dict[str, Mapping[str, Any]] = dict(doc["rule_sets"])
        self.diff: Mapping[str, Any] | None = doc["differences"]
        rules: list[str] = []
        for rs in self.sets.values():
            rules += [r["id"] for r in rs["rules"]] + [r["rule"] for r in rs["by_rule"]]
        self.rules = list(dict.fromkeys(rules))
        self.colour = {r: RULE_COLOURS[i % len(RULE_COLOURS)] for i, r in enumerate(self.rules)}
        self.changed = {
            (c["rule"], c["what"].split(" (")[0]) for c in (self.diff or {}).get("rule_changes", [])
        }

    def render(self) -> str:
        title = "Backtest: " + (
            "candidate rules against the baseline" if self.diff is not None else "candidate rules"
        )
        sections = [
            ("summary", "Summary", self.summary()),
            ("rule-sets", "Rule sets", self.rule_sets()),
            ("weekly", "Tasks per rule per week", self.weekly()),
            ("burden", "Burden on each owner", self.burden()),
            ("priority", "Priority mix", self.priority()),
            ("shadow", "Shadow and live", self.shadow()),
        ]
        if self.diff is not None:
            sections.append(
                ("differences", "Differences between the rule sets", self.differences())
            )
        sections.append(("about", "About this report", self.about()))
        nav = " ".join(f'<a href="#{sid}">{escape(name)}</a>' for sid, name, _ in sections)
        body = "".join(
            f'<section id="{sid}"><h2>{escape(name)}</h2>{html}</section>'
            for sid, name, html in sections
        )
        a = self.doc["archive"]
        lead = (
            f"{a['messages']:,} messages from {a['file_count']:,} file(s), "
            f"{_when(a['first_event'])} to {_when(a['last_event'])}. Generated "
            f"{escape(self.doc['generated_at'])}."
        )
        return (
            '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{escape(title)}</h1><p class=lead>{lead}</p><nav>{nav}</nav>{body}"
            "</main></body></html>\n"
        )

    # each section

    def summary(self) -> str:
        a = self.doc["archive"]
        stats = [
            (f"{a['messages']:,}", "messages replayed"),
            (_size(a["bytes"]), f"in {a['file_count']:,} file(s)"),
            (
                f"{a['span_days']:g} days" if a["span_days"] is not None else "–",
                "time span of the events",
            ),
            (f"{a['rejected'] + a['unsupported']:,}", "rejected or unsupported messages"),
        ]
        for label, rs in self.sets.items():
            t = rs["tasks"]
            stats.append((f"{t['tasks']:,}", f"Tasks under the {label} ({t['live']:,} live)"))
        if self.diff is not None:
            s = self.diff["summary"]
            stats.append((f"+{s['only_candidate']:,}", "Tasks only under the candidate"))
            stats.append((f"−{s['only_baseline']:,}", "Tasks only under the baseline"))
        boxes = "".join(
            f'<div class="stat"><b>{escape(v)}</b><span>{escape(t)}</span></div>' for v, t in stats
        )
        rows = [
            ["First event", _when(a["first_event"])],
            ["Last event", _when(a["last_event"])],
            ["Clock moved on to (--until)", _when(a["until"])],
            ["Rejected messages", f"{a['rejected']:,}"],
            ["Unsupported messages", f"{a['unsupported']:,}"],
            ["Time zone of the report", self.doc["timezone"]],
        ]
        for label, rs in self.sets.items():
            rows.append(
                [
                    f"Replay under the {label}",
                    f"{rs['seconds']:,.1f} s ({rs['messages_per_second'] or 0:,.0f} messages/s)",
                ]
            )
        files = a["files"]
        shown = ", ".join(Path(f).name for f in files[:5]) + (" …" if len(files) > 5 else "")
        rows.append(["Files", shown])
        return f'<div class="box">{boxes}</div>' + _table(["Archive", ""], rows)

    def rule_sets(self) -> str:
        labels = list(self.sets)
        cards = {label: {r["id"]: r for r in rs["rules"]} for label, rs in self.sets.items()}
        head = ["Rule"]
        for label in labels:
            head += [f"{label}: version", f"{label}: status", f"{label}: parameters"]
        rows = []
        for rid in self.rules:
            row: list[Any] = [_Html(f"<b>{escape(rid)}</b>")]
            for label in labels:
                card = cards[label].get(rid)
                if card is None:
                    row += ["–", "absent", ""]
                    continue
                row.append(self._mark(rid, "version", card["version"]))
                status = f"{card['status']} ({card['status_source']})"
                row.append(self._mark(rid, "status", status))
                params = "<br>".join(
                    self._mark(
                        rid,
                        f"parameter {p['name']}",
                        f"{p['name']} = {_value(p['value'])} {p['unit']}"
                        + (" (site)" if p["source"] == "site" else ""),
                    )
                    for p in card["parameters"]
                )
                row.append(_Html(params))
            rows.append(row)
        out = []
        for label, rs in self.sets.items():
            site = rs["site"]
            out.append(
                f"<p><b>{escape(label)}</b>: <code>{escape(rs['rules_dir'])}</code> · time zone "
                f"{escape(str(site.get('timezone')))} · discharge settle time "
                f"{escape(str(site.get('settle_minutes')))} minutes</p>"
            )
        if self.diff is not None:
            changes = self.diff["rule_changes"]
            out.append("<h3>What differs</h3>")
            if changes:
                out.append(
                    _table(
                        ["Rule", "What", "Baseline", "Candidate"],
                        ([c["rule"], c["what"], c["baseline"], c["candidate"]] for c in changes),
                    )
                )
            else:
                out.append("<p>The two rules folders set the same rules and parameters.</p>")
        out.append("<h3>Rules and parameters</h3>")
        out.append(
            '<p class="muted">Highlighted: differs between the rule sets. "(site)": set in '
            "settings.toml, not the rule's default.</p>"
        )
        out.append('<div class="scroll">' + _table(head, rows) + "</div>")
        return "".join(out)

    def _mark(self, rule: str, what: str, text: str) -> _Html:
        if (rule, what) in self.changed:
            return _Html(f"<mark>{escape(text)}</mark>")
        return _Html(escape(text))

    def weekly(self) -> str:
        weeks = sorted({w["week"] for rs in self.sets.values() for w in rs["per_rule_week"]})
        if not weeks:
            return "<p>No Tasks were raised.</p>"
        axis = _weeks(weeks[0], weeks[-1])
        grids = {}
        for label, rs in self.sets.items():
            grid: dict[str, list[int]] = {r: [0] * len(axis) for r in self.rules}
            for item in rs["per_rule_week"]:
                grid.setdefault(item["rule"], [0] * len(axis))[axis.index(item["week"])] += item[
                    "tasks"
                ]
            grids[label] = grid
        peak = max(sum(g[r][i] for r in g) for g in grids.values() for i in range(len(axis)))
        used = [r for r in self.rules if any(sum(g.get(r, [])) for g in grids.values())]
        out = [
            '<p class="muted">Every Task raised (live and shadow) by the ISO week of the time it '
            "was raised (authoredOn). Both charts share one scale.</p>",
            _legend((r, self.colour[r]) for r in used),
        ]
        for label, grid in grids.items():
            series = [(r, self.colour[r], grid[r]) for r in used]
            out.append(f"<h3>{escape(label.capitalize())}</h3>")
            out.append(
                '<div class="chart">'
                + svg_stacked_columns(
                    axis, series, f"Tasks per rule per ISO week, {label} rules", peak
                )
                + "</div>"
            )
        head = ["Rule", *[w[5:] for w in axis], "Total"]
        rows = []
        for r in used:
            for label, grid in grids.items():
                name = _Html(
                    f'<span style="color:{self.colour[r]}">■</span> {escape(r)}'
                    + (f" <span class=muted>({escape(label)})</span>" if len(grids) > 1 else "")
                )
                rows.append([name, *grid[r], sum(grid[r])])
        numeric = list(range(1, len(axis) + 2))
        years = axis[0][:4] if axis[0][:4] == axis[-1][:4] else f"{axis[0][:4]}–{axis[-1][:4]}"
        out.append(f"<h3>By ISO week of {escape(years)}</h3>")
        out.append('<div class="scroll">' + _table(head, rows, numeric) + "</div>")
        return "".join(out)

    def burden(self) -> str:
        days = sorted({d["day"] for rs in self.sets.values() for d in rs["per_owner_day"]})
        if not days:
            return "<p>No Tasks were raised.</p>"
        axis = _days(days[0], days[-1])
        out = [
            '<p class="muted">Live Tasks (what reaches a worklist; shadow Tasks are never shown '
            "as work) per owner per day raised. Owners are clinicians and pools, by id and name. "
            f"The heat map shows the {TOP_OWNERS} owners with most live Tasks; every owner is in "
            "the table and in the CSV/JSON (per day).</p>"
        ]
        for label, rs in self.sets.items():
            owners = [o for o in rs["owners"] if o["live"]][:TOP_OWNERS]
            out.append(f"<h3>{escape(label.capitalize())}</h3>")
            if not owners:
                out.append("<p>No live Tasks.</p>")
            else:
                cells: dict[tuple[str, str], int] = {
                    (d["owner_id"], d["day"]): d["live"] for d in rs["per_owner_day"]
                }
                names = [f"{o['owner_name']} ({o['owner_id']})" for o in owners]
                values = [[cells.get((o["owner_id"], day), 0) for day in axis] for o in owners]
                out.append(
                    '<div class="chart">'
                    + svg_heatmap(names, axis, values, f"Live Tasks per owner per day, {label}")
                    + "</div>"
                )
            rows = [
                [
                    o["owner_id"],
                    o["owner_name"],
                    o["live"],
                    o["shadow"],
                    o["days_with_live_tasks"],
                    o["busiest_day"] or "–",
                    o["busiest_day_live"],
                    f"{o['mean_live_per_day_with_tasks']:.2f}",
                ]
                for o in rs["owners"]
            ]
            out.append(
                '<div class="scroll">'
                + _table(
                    [
                        "Owner id",
                        "Owner",
                        "Live Tasks",
                        "Shadow",
                        "Days with live Tasks",
                        "Busiest day",
                        "Live that day",
                        "Mean live per day with Tasks",
                    ],
                    rows,
                    (2, 3, 4, 6, 7),
                )
                + "</div>"
            )
        return "".join(out)

    def priority(self) -> str:
        out = [
            '<p class="muted">Every Task by FHIR priority (stat, asap, urgent, routine), as a '
            "share of each rule set's Tasks; by rule in the table.</p>",
            _legend((p, PRIORITY_COLOURS[p]) for p in PRIORITIES),
        ]
        bars = []
        for label, rs in self.sets.items():
            counts = {p["priority"]: p["tasks"] for p in rs["by_priority"]}
            bars.append(
                (
                    f"{label} rules",
                    [(p, PRIORITY_COLOURS.get(p, "#999"), counts.get(p, 0)) for p in PRIORITIES],
                )
            )
        out.append(
            '<div class="chart">'
            + svg_stacked_rows(bars, "Priority mix of the Tasks raised", shares=True)
            + "</div>"
        )
        head = ["Rule", *([f"{p}" for p in PRIORITIES] if len(self.sets) == 1 else [])]
        if len(self.sets) > 1:
            head = ["Rule"] + [f"{p} ({label[0]})" for p in PRIORITIES for label in self.sets]
        rows = []
        for r in self.rules:
            row: list[Any] = [r]
            cells = {
                (label, p["priority"]): p["tasks"]
                for label, rs in self.sets.items()
                for p in rs["priority_by_rule"]
                if p["rule"] == r
            }
            if not cells:
                continue
            for p in PRIORITIES:
                for label in self.sets:
                    row.append(cells.get((label, p), 0))
            rows.append(row)
        totals: list[Any] = ["All rules"]
        for p in PRIORITIES:
            for rs in self.sets.values():
                totals.append(
                    next((x["tasks"] for x in rs["by_priority"] if x["priority"] == p), 0)
                )
        rows.append(totals)
        if len(self.sets) > 1:
            out.append('<p class="muted">(c) candidate, (b) baseline.</p>')
        out.append(_table(head, rows, range(1, len(head))))
        return "".join(out)

    def shadow(self) -> str:
        out = [
            '<p class="muted">Shadow Tasks are recorded and searchable but never delivered or '
            "shown as work; live Tasks reach a worklist. By rule, both rule sets on one scale."
            "</p>",
            _legend((("live", LIVE), ("shadow", SHADOW))),
        ]
        peak = max((r["tasks"] for rs in self.sets.values() for r in rs["by_rule"]), default=0)
        for label, rs in self.sets.items():
            bars = [
                (r["rule"], [("live", LIVE, r["live"]), ("shadow", SHADOW, r["shadow"])])
                for r in rs["by_rule"]
            ]
            out.append(f"<h3>{escape(label.capitalize())}</h3>")
            out.append(
                '<div class="chart">'
                + svg_stacked_rows(bars, f"Live and shadow Tasks per rule, {label}", x_max=peak)
                + "</div>"
            )
        labels = list(self.sets)
        head = ["Rule"] + [f"{label}: {k}" for label in labels for k in ("live", "shadow")]
        per = {label: {r["rule"]: r for r in rs["by_rule"]} for label, rs in self.sets.items()}
        rows = []
        for r in self.rules:
            if not any(r in per[label] for label in labels):
                continue
            row: list[Any] = [r]
            for label in labels:
                item = per[label].get(r, {"live": 0, "shadow": 0})
                row += [item["live"], item["shadow"]]
            rows.append(row)
        total: list[Any] = ["All rules"]
        for label in labels:
            total += [self.sets[label]["tasks"]["live"], self.sets[label]["tasks"]["shadow"]]
        rows.append(total)
        out.append(_table(head, rows, range(1, len(head))))
        return "".join(out)

    def differences(self) -> str:
        diff = self.diff
        assert diff is not None
        s = diff["summary"]
        out = [
            "<p>A Task is the same under both rule sets when its rule, order, trigger and patient "
            "are the same (its identifier is built from the first three; patients by pseudonym). "
            f"<span class=plus>{s['only_candidate']:,} only under the candidate</span> (would "
            f"appear), <span class=minus>{s['only_baseline']:,} only under the baseline</span> "
            f"(would disappear), {s['changed']:,} under both with a different priority, owner, "
            "status or shadow mark.</p>"
        ]
        if diff["by_rule"]:
            out.append(
                _table(
                    ["Rule", "Only candidate", "Only baseline", "Changed"],
                    (
                        [b["rule"], b["only_candidate"], b["only_baseline"], b["changed"]]
                        for b in diff["by_rule"]
                    ),
                    (1, 2, 3),
                )
            )
        for side, title in (
            ("only_candidate", "Only under the candidate (would appear)"),
            ("only_baseline", "Only under the baseline (would disappear)"),
            ("changed", "Under both, changed"),
        ):
            items = diff[side]
            out.append(f"<h3>{escape(title)}: {len(items):,}</h3>")
            if not items:
                out.append("<p>None.</p>")
                continue
            if len(items) > HTML_LIST_LIMIT:
                out.append(
                    f'<p class="muted">The first {HTML_LIST_LIMIT:,} are listed; all '
                    f"{len(items):,} are in differences.csv and the JSON.</p>"
                )
            out.append(
                '<div class="scroll">' + self._task_table(items[:HTML_LIST_LIMIT]) + "</div>"
            )
        return "".join(out)

    def _task_table(self, items: Sequence[Mapping[str, Any]]) -> str:
        head = ["Rule", "Patient", "Order", "Priority", "Owner", "Status", "Raised", "Why"]
        out = ["<table><thead><tr>", *(f"<th>{h}</th>" for h in head), "</tr></thead><tbody>"]
        for t in items:
            changes = t.get("changes", {})

            def cell(field: str, text: str, changes: Mapping[str, Any] = changes) -> str:
                if field in changes:
                    c = changes[field]
                    return (
                        f"<mark>{escape(str(c['baseline']))} → {escape(str(c['candidate']))}</mark>"
                    )
                return escape(text)

            owner = f"{t['owner_name']} ({t['owner_id']})"
            if "owner_id" in changes:
                owner = (
                    f"{t.get('baseline_owner_name', '')} ({changes['owner_id']['baseline']}) → "
                    f"{t['owner_name']} ({t['owner_id']})"
                )
                owner_html = f"<mark>{escape(owner)}</mark>"
            else:
                owner_html = escape(owner)
            status = t["status"] + (" · shadow" if t["shadow"] else "")
            out.append(
                "<tr>"
                f"<td><b>{escape(t['rule'])}</b> {cell('rule_version', t['rule_version'])}"
                f"<br><span class=muted>{escape(t['identifier'])}</span></td>"
                f"<td>{escape(t['patient'])}</td><td>{escape(t['order'] or '–')}</td>"
                f"<td>{cell('priority', t['priority'])}</td><td>{owner_html}</td>"
                f"<td>{cell('status', status) if 'status' in changes else escape(status)}"
                f"{'<br>' + cell('shadow', '') if 'shadow' in changes else ''}</td>"
                f"<td>{escape(t['raised_day'])}</td><td>{escape(t.get('cause', ''))}</td></tr>"
                f'<tr class="sub"><td colspan="{len(head)}">{escape(t["reason"])}. '
                f"{escape(t['text'])}</td></tr>"
            )
        out.append("</tbody></table>")
        return "".join(out)

    def about(self) -> str:
        return (
            "<p>Made by <code>safetynet backtest</code>: the archive was replayed with a simulated "
            "clock (event time drives timers, as <code>safetynet replay</code>) under each rules "
            "folder, in a temporary database of its own; nothing was delivered to anyone. The "
            "same numbers are written as CSV files (<code>--csv</code>) and one JSON document "
            "(<code>--json</code>).</p>"
            f"<p>{escape(PRIVACY)}</p>"
        )


def render_html(doc: Mapping[str, Any]) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, no script, no link)."""
    return _Page(doc).render()


def write_html(doc: Mapping[str, Any], path: Path) -> Path:
    """Write `render_html(doc)` to `path`."""
    return _write(path, render_html(doc))

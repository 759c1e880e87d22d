"""Replay throughput against hl7apy parse-only, measured in one run on the same machine.

    .venv/bin/python bench/bench_replay.py [--patients N] [--seed S] [--hl7apy-sample N]
                                           [--profile] [--out FILE]

Generates `safetynet synth` traffic (SynthConfig defaults apart from `patients` and `seed`) into
a temporary file, then measures:

* replay: the path `safetynet replay` takes (read the file, split, and `adapters.cli._replay`
  with an App from `build_replay_app`: ER7 read, map, store in a temporary SQLite file database,
  rules, Tasks as NDJSON into an in-memory buffer). Building the App (rules load, migrations)
  is timed separately and not counted in the rate;
* hl7apy parse-only: `hl7apy.parser.parse_message(msg)` with its defaults, over a deterministic
  sample (every k-th message of each message type, so types keep their share of the traffic);
* the fast ER7 reader alone (`read_message` over every message): a second ceiling.

The replay is measured twice: with the full rule catalogue (the default, `--rules`), and
with only the two rules the goal was set with (`imaging-pending-at-discharge`,
`report-final-after-discharge`; the others switched off in a copy of the rules folder), so
the core path stays comparable while the catalogue grows.

The goal (issue "HL7 v2 in, recall tasks out") is replay >= 25x hl7apy parse-only, with those
two rules. Ratios,
not absolute times, are what to compare between machines. Never asserts on timing: exits 0
unless the code under test fails. Prints a table and writes the same numbers as JSON
(default bench/out/).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, also without the editable install
    sys.path.insert(0, str(ROOT))

from adapters.bootstrap import build_replay_app, default_rules_dir  # noqa: E402
from adapters.cli import TaskPrinter, _messages, _replay  # noqa: E402
from adapters.hl7v2.er7 import read_message  # noqa: E402
from adapters.synth import SynthConfig, synth_messages  # noqa: E402

GOAL_RATIO = 25.0
CORE_RULES = ("imaging-pending-at-discharge", "report-final-after-discharge")
DEFAULT_OUT = ROOT / "bench" / "out" / "replay.json"


def message_type(msg: str) -> str:
    """MSH-9.1^MSH-9.2 of a synth message (default delimiters, '\\r' segment separators)."""
    msh = msg.split("\r", 1)[0]
    parts = msh.split("|")[8].split("^")
    return "^".join(parts[:2])


def synth(patients: int, seed: int) -> list[str]:
    return [msg for _, msg in synth_messages(SynthConfig(patients=patients, seed=seed))]


def stratified_sample(messages: Sequence[str], target: int) -> tuple[list[int], int]:
    """Indices of every k-th message within each message type (k = len/target), in order."""
    k = max(1, round(len(messages) / max(1, target)))
    seen: Counter[str] = Counter()
    picked: list[int] = []
    for i, msg in enumerate(messages):
        kind = message_type(msg)
        if seen[kind] % k == 0:
            picked.append(i)
        seen[kind] += 1
    return picked, k


def bench_replay(path: Path, rules: Path, profile: bool) -> dict[str, Any]:
    """The CLI's replay of `path` into a temporary SQLite file database."""
    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryDirectory(prefix="safetynet-bench-") as tmp:
        db = f"sqlite:///{Path(tmp) / 'replay.db'}"
        began = time.perf_counter()
        app = build_replay_app(db, rules)
        setup_s = time.perf_counter() - began
        printer = TaskPrinter(out, "ndjson")
        profiler = cProfile.Profile() if profile else None
        try:
            began = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            items = list(_messages([path]))
            _replay(app, items, None, printer, err)
            if profiler is not None:
                profiler.disable()
            replay_s = time.perf_counter() - began
        finally:
            app.close()
    problems = [line for line in err.getvalue().splitlines() if line.strip()]
    result: dict[str, Any] = {
        "messages": len(items),
        "setup_seconds": setup_s,
        "seconds": replay_s,
        "msg_per_s": len(items) / replay_s,
        "tasks_raised": len(printer.latest),
        "task_changes_emitted": sum(1 for line in out.getvalue().splitlines() if line),
        "tasks_by_rule": dict(sorted(Counter(t.rule_id for t in printer.latest.values()).items())),
        "rejected_or_unsupported": len(problems),
        "first_problems": problems[:5],
    }
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
        result["profile_top25_cumulative"] = text.getvalue()
    return result


def core_rules(rules: Path, target: Path) -> Path:
    """A copy of `rules` with every rule but CORE_RULES switched off in its settings."""
    shutil.copytree(rules, target, ignore=shutil.ignore_patterns("__pycache__"))
    others = sorted(
        p.name for p in target.iterdir() if (p / "rule.toml").is_file() and p.name not in CORE_RULES
    )
    settings = target / "settings.toml"
    settings.write_text(
        settings.read_text() + "".join(f'\n[rules.{r}]\nstatus = "off"\n' for r in others)
    )
    return target


def bench_hl7apy(messages: Sequence[str], indices: Sequence[int], k: int) -> dict[str, Any]:
    """hl7apy.parser.parse_message(msg), defaults, over the sampled messages."""
    from hl7apy.parser import parse_message

    sample = [messages[i] for i in indices]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parse_message(messages[0])  # warm-up: hl7apy loads its v2.5 reference on first use
        began = time.perf_counter()
        for msg in sample:
            parse_message(msg)
        seconds = time.perf_counter() - began
    total = Counter(message_type(m) for m in messages)
    taken = Counter(message_type(m) for m in sample)
    return {
        "sample_size": len(sample),
        "every_kth_per_type": k,
        "seconds": seconds,
        "msg_per_s": len(sample) / seconds,
        "ms_per_msg": 1000 * seconds / len(sample),
        "sample_by_type": {t: {"sampled": taken[t], "total": total[t]} for t in sorted(total)},
    }


def bench_er7(messages: Sequence[str]) -> dict[str, Any]:
    """The fast ER7 reader alone over every message (its lazy fields are not touched)."""
    read_message(messages[0])
    began = time.perf_counter()
    for msg in messages:
        read_message(msg)
    seconds = time.perf_counter() - began
    return {"messages": len(messages), "seconds": seconds, "msg_per_s": len(messages) / seconds}


def table(report: dict[str, Any]) -> str:
    r, h, e = report["replay"], report["hl7apy_parse_only"], report["er7_read_only"]
    core = report["replay_core_rules"]
    ratio = report["ratio_replay_over_hl7apy"]
    verdict = "PASS" if ratio >= GOAL_RATIO else "BELOW"
    rows = [
        ("messages (synth default mix)", f"{r['messages']:,}"),
        ("  patients / seed", f"{report['config']['patients']} / {report['config']['seed']}"),
        ("replay setup (rules, migrations)", f"{r['setup_seconds']:.2f} s (not in the rate)"),
        ("replay seconds (full catalogue)", f"{r['seconds']:.2f} s"),
        ("replay msg/s (full catalogue)", f"{r['msg_per_s']:,.0f}"),
        ("tasks raised (distinct)", f"{r['tasks_raised']:,}"),
        (
            "  by rule",
            ", ".join(
                f"{k} {v}" for k, v in sorted(r["tasks_by_rule"].items(), key=lambda kv: -kv[1])
            ),
        ),
        ("replay msg/s (core rules R1, R2)", f"{core['msg_per_s']:,.0f}"),
        ("  tasks raised (core rules)", f"{core['tasks_raised']:,}"),
        ("task changes emitted (NDJSON)", f"{r['task_changes_emitted']:,}"),
        ("rejected/unsupported", f"{r['rejected_or_unsupported']:,}"),
        (
            "hl7apy sample size",
            f"{h['sample_size']:,} (every k={h['every_kth_per_type']} per type)",
        ),
        ("hl7apy parse-only msg/s", f"{h['msg_per_s']:,.1f} ({h['ms_per_msg']:.1f} ms/msg)"),
        (
            "ratio replay (core rules) / hl7apy",
            f"{ratio:,.1f}x  goal >= {GOAL_RATIO:.0f}x  {verdict}",
        ),
        (
            "ratio replay (full catalogue) / hl7apy",
            f"{report['ratio_full_catalogue_over_hl7apy']:,.1f}x",
        ),
        ("ER7 read-only msg/s (ceiling)", f"{e['msg_per_s']:,.0f}"),
        ("ratio replay / ER7 read-only", f"{r['msg_per_s'] / e['msg_per_s']:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append("")
    lines.append("hl7apy sample by type (sampled / total):")
    for kind, n in h["sample_by_type"].items():
        lines.append(f"  {kind:<10} {n['sampled']:>5} / {n['total']:,}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--patients", type=int, default=2500, help="synth visits (default 2500)")
    ap.add_argument("--seed", type=int, default=SynthConfig.seed)
    ap.add_argument("--hl7apy-sample", type=int, default=1000, help="about this many parsed")
    ap.add_argument("--rules", type=Path, default=default_rules_dir())
    ap.add_argument("--profile", action="store_true", help="cProfile the replay (slower)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report file")
    args = ap.parse_args(argv)

    began = time.perf_counter()
    messages = synth(args.patients, args.seed)
    synth_s = time.perf_counter() - began
    if len(messages) < 10_000:
        print(f"note: {len(messages)} messages (< 10,000); raise --patients", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="safetynet-bench-") as tmp:
        path = Path(tmp) / "synth.hl7"
        # As `safetynet synth` writes it: one message a line, segments by '\r'.
        path.write_text("".join(m + "\n" for m in messages), encoding="ascii", newline="")
        replay = bench_replay(path, args.rules, args.profile)
        core = bench_replay(path, core_rules(args.rules, Path(tmp) / "core-rules"), False)
    if replay["messages"] != len(messages):
        raise RuntimeError(
            f"replay read {replay['messages']} messages, synth wrote {len(messages)}"
        )

    indices, k = stratified_sample(messages, args.hl7apy_sample)
    hl7apy = bench_hl7apy(messages, indices, k)
    er7 = bench_er7(messages)

    ratio = core["msg_per_s"] / hl7apy["msg_per_s"]
    profile = replay.pop("profile_top25_cumulative", None)
    report: dict[str, Any] = {
        "benchmark": "replay",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "config": {
            "patients": args.patients,
            "seed": args.seed,
            "synth": "SynthConfig defaults otherwise",
            "hl7apy_sample_target": args.hl7apy_sample,
            "profiled": args.profile,
        },
        "synth_seconds": synth_s,
        "replay": replay,
        "replay_core_rules": core,
        "hl7apy_parse_only": hl7apy,
        "er7_read_only": er7,
        "ratio_replay_over_hl7apy": ratio,
        "ratio_full_catalogue_over_hl7apy": replay["msg_per_s"] / hl7apy["msg_per_s"],
        "ratio_replay_over_er7_read_only": replay["msg_per_s"] / er7["msg_per_s"],
        "goal_ratio": GOAL_RATIO,
        "verdict": "PASS" if ratio >= GOAL_RATIO else "BELOW",
    }
    print(table(report))
    if profile:
        print("\nreplay profile (top 25 by cumulative time; rates above include its overhead):")
        print(profile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

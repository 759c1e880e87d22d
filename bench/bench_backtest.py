"""Backtest throughput against replay, measured in one run on the same archive and machine.

    .venv/bin/python bench/bench_backtest.py [--messages N] [--seed S] [--days D]
                                             [--rules DIR] [--rounds R] [--cache DIR] [--out FILE]

Generates (once, then cached in a temporary folder) a `safetynet synth` archive of exactly
`--messages` messages (100,000 by default): the first N messages of a synth stream with enough
visits, spread over `--days` (70: about the visit density of bench_replay.py). Then measures,
with one rule set (`--rules`, default the bundled catalogue):

* replay: `safetynet replay ARCHIVE --rules DIR` as the command runs it (in process: building
  the App, reading, mapping, storing in a temporary SQLite database, rules, Tasks written as
  NDJSON to a file);
* backtest: `safetynet backtest ARCHIVE --rules DIR --out report.html --csv DIR --json FILE
  --quiet` as the command runs it (the same replay into its own temporary database, then
  reading every Task back, redacting, counting and writing the HTML, CSV and JSON).

Each is timed end to end (setup included, for both) and reported as messages per second; the
goal (issue 6) is backtest >= 80% of replay. The ratio of CPU times (process time: both run in
this process) is printed too: on a machine shared with other work it moves less than the
wall-clock ratio. With `--rounds R` the two alternate R times and the
best of each counts. The Task counts of both must agree (else the bench fails: that is a bug,
not a speed). Never asserts on timing: exits 0 unless the code under test fails. Prints a
table and writes the numbers as JSON (default bench/out/backtest.json).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, also without the editable install
    sys.path.insert(0, str(ROOT))

from adapters import cli  # noqa: E402
from adapters.bootstrap import default_rules_dir  # noqa: E402
from adapters.synth import SynthConfig, synth_messages  # noqa: E402

GOAL = 0.8
MESSAGES_PER_VISIT = 3.6  # about, for the synth default mix; more visits are taken if short
DEFAULT_OUT = ROOT / "bench" / "out" / "backtest.json"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "safetynet-bench"


def archive(messages: int, seed: int, days: float, cache: Path) -> tuple[Path, float, bool]:
    """The cached archive of exactly `messages` synth messages: (path, seconds, reused)."""
    path = cache / f"synth-{messages}-seed{seed}-days{days:g}.hl7"
    if path.is_file():
        return path, 0.0, True
    cache.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    visits = int(messages / MESSAGES_PER_VISIT) + 100
    while True:
        config = SynthConfig(patients=visits, seed=seed, days=days)
        taken = [m for _, m in itertools.islice(synth_messages(config), messages)]
        if len(taken) == messages:
            break
        visits = int(visits * 1.25)
    part = path.with_suffix(".part")
    # As `safetynet synth` writes it: one message a line, segments by '\r'.
    part.write_text("".join(m + "\n" for m in taken), encoding="ascii", newline="")
    part.replace(path)
    return path, time.perf_counter() - began, False


def run_replay(path: Path, rules: Path, work: Path) -> dict[str, Any]:
    """`safetynet replay` end to end; Tasks as NDJSON into a file (counted afterwards)."""
    ndjson = work / "replay.ndjson"
    args = cli.parser().parse_args(["replay", str(path), "--rules", str(rules)])
    err = io.StringIO()
    with ndjson.open("w", encoding="utf-8") as out:
        began, cpu = time.perf_counter(), time.process_time()
        code = cli.replay(args, out, err)
        seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    if code != 0:
        raise RuntimeError(f"replay exited {code}: {err.getvalue()[:500]}")
    latest: dict[str, dict[str, Any]] = {}
    with ndjson.open(encoding="utf-8") as fh:
        for line in fh:
            task = json.loads(line)
            latest[task["id"]] = task
    shadow = sum(
        1
        for t in latest.values()
        if any(tag.get("code") == "shadow" for tag in t.get("meta", {}).get("tag", []))
    )
    return {"seconds": seconds, "cpu_seconds": cpu, "tasks": len(latest), "shadow": shadow}


def run_backtest(path: Path, rules: Path, work: Path) -> dict[str, Any]:
    """`safetynet backtest` end to end, one rule set, with the HTML, CSV and JSON outputs."""
    report, data = work / "report.html", work / "report.json"
    args = cli.parser().parse_args(
        [
            *("backtest", str(path), "--rules", str(rules), "--out", str(report)),
            *("--csv", str(work / "csv"), "--json", str(data), "--quiet"),
        ]
    )
    out, err = io.StringIO(), io.StringIO()
    began, cpu = time.perf_counter(), time.process_time()
    code = cli.backtest(args, out, err)
    seconds, cpu = time.perf_counter() - began, time.process_time() - cpu
    if code != 0:
        raise RuntimeError(f"backtest exited {code}: {err.getvalue()[:500]}")
    doc = json.loads(data.read_text(encoding="utf-8"))
    candidate = doc["rule_sets"]["candidate"]
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "replay_part_seconds": candidate["seconds"],
        "tasks": candidate["tasks"]["tasks"],
        "shadow": candidate["tasks"]["shadow"],
        "messages": doc["archive"]["messages"],
        "report_bytes": report.stat().st_size,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--messages", type=int, default=100_000, help="archive size (100,000)")
    ap.add_argument("--seed", type=int, default=SynthConfig.seed)
    ap.add_argument("--days", type=float, default=70.0, help="period the visits spread over")
    ap.add_argument("--rules", type=Path, default=default_rules_dir(), help="the one rule set")
    ap.add_argument("--rounds", type=int, default=1, help="alternate replay/backtest R times")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the archive is kept")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report file")
    args = ap.parse_args(argv)

    path, synth_s, reused = archive(args.messages, args.seed, args.days, args.cache)
    print(f"archive: {path} ({'cached' if reused else f'generated in {synth_s:.1f} s'})")
    # Warm-up (not timed): imports and first-use costs fall on neither measured command.
    small, _, _ = archive(300, args.seed, args.days, args.cache)
    with tempfile.TemporaryDirectory(prefix="safetynet-bench-") as tmp:
        run_replay(small, args.rules, Path(tmp))
        run_backtest(small, args.rules, Path(tmp))
    replays, backtests = [], []
    for _ in range(max(1, args.rounds)):
        with tempfile.TemporaryDirectory(prefix="safetynet-bench-") as tmp:
            replays.append(run_replay(path, args.rules, Path(tmp)))
        with tempfile.TemporaryDirectory(prefix="safetynet-bench-") as tmp:
            backtests.append(run_backtest(path, args.rules, Path(tmp)))
    replay = min(replays, key=lambda r: r["seconds"])
    backtest = min(backtests, key=lambda r: r["seconds"])
    if backtest["messages"] != args.messages:
        raise RuntimeError(f"backtest read {backtest['messages']} messages of {args.messages}")
    if (backtest["tasks"], backtest["shadow"]) != (replay["tasks"], replay["shadow"]):
        raise RuntimeError(f"Task counts differ: replay {replay}, backtest {backtest}")
    replay_rate = args.messages / replay["seconds"]
    backtest_rate = args.messages / backtest["seconds"]
    ratio = backtest_rate / replay_rate
    cpu_ratio = replay["cpu_seconds"] / backtest["cpu_seconds"]
    verdict = "PASS" if ratio >= GOAL else "BELOW"
    report = {
        "benchmark": "backtest",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "config": {
            "messages": args.messages,
            "seed": args.seed,
            "days": args.days,
            "rules": str(args.rules),
            "rounds": args.rounds,
            "archive": str(path),
            "archive_bytes": path.stat().st_size,
        },
        "replay": {**replay, "msg_per_s": replay_rate, "rounds": replays},
        "backtest": {**backtest, "msg_per_s": backtest_rate, "rounds": backtests},
        "ratio_backtest_over_replay": ratio,
        "ratio_by_cpu_time": cpu_ratio,
        "goal_ratio": GOAL,
        "verdict": verdict,
    }
    rows = [
        ("messages (synth default mix)", f"{args.messages:,} ({path.stat().st_size:,} bytes)"),
        ("rules", str(args.rules)),
        ("replay seconds (end to end)", f"{replay['seconds']:.1f} s"),
        ("replay msg/s", f"{replay_rate:,.0f} (CPU {replay['cpu_seconds']:.1f} s)"),
        ("backtest seconds (end to end)", f"{backtest['seconds']:.1f} s"),
        ("  of which replay and reading Tasks", f"{backtest['replay_part_seconds']:.1f} s"),
        ("backtest msg/s", f"{backtest_rate:,.0f} (CPU {backtest['cpu_seconds']:.1f} s)"),
        ("Tasks (both)", f"{replay['tasks']:,} ({replay['shadow']:,} shadow)"),
        ("report.html", f"{backtest['report_bytes']:,} bytes"),
        ("ratio backtest / replay", f"{ratio:.2f}  goal >= {GOAL:.2f}  {verdict}"),
        ("  the same by CPU time", f"{cpu_ratio:.2f} (less sensitive to a busy machine)"),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The FHIR API of a real `safetynet serve`, measured in one run against ceilings of the same run.

    .venv/bin/python bench/bench_fhir.py [--patients N] [--threads T] [--lone N] [--tasks N]
                                         [--searches N] [--quick] [--out FILE]
                                         [--baseline FILE]

1. Ingest. A fresh SQLite database, the bundled rules, a real `safetynet serve` (its worker
   process processing as resources arrive). `--patients` synthetic children, each the
   Derby-like scenario as six FHIR resources (Patient; Encounter in progress; imaging
   ServiceRequest; preliminary DiagnosticReport; Encounter finished; final DiagnosticReport;
   ids and identifiers of their own, dates moved to the last hours so that no timer is due
   the moment it is set), sent by `--threads` client threads with a feed token (PUT
   [base]/Type/id; each patient's resources in order on one thread). Measured: resources/s
   accepted over HTTP (answers 200/201, each committed to the inbox), and resources/s from
   the first send to the inbox drained by the worker (every resource mapped, the rules run,
   the Tasks raised). Then `--lone` more patients' resources from one thread, one at a time
   (the latency of a PUT that has no other request to share its commit with; the worker
   still processing). Ceiling, same run, same threads: as many authenticated GETs of
   /fhir/metadata (HTTP, auth header, request audit, no work). Reference: the same resources
   validated with the fhir.resources R4B models in this process (no HTTP, no store).
2. Task search. The Tasks the ingest raised, cloned through the store (`put_task`, so their
   search columns are what the service writes) to `--tasks` (10,000) Tasks with 40 owners,
   a mix of statuses and priorities and last-updated times spread over 90 days; the service
   restarted on that database; `--searches` searches over HTTP by `--threads` threads, a mix
   of: owner; owner and status; status (governance); a 7-day `_lastUpdated` window
   (governance); owner sorted by -_lastUpdated, first page and the next page (paging). Each
   search is one request of `_count=50`. Measured: searches/s and p50/p99 per kind;
   ceiling: the same number of authenticated GETs of /fhir/metadata.

Clients share the 2-core machine with the service and its worker: ratios, not absolute rates,
compare between machines. Never asserts on timing: exits 0 unless something under test fails
outright (a non-2xx answer, a Task count short). Prints a summary and writes the numbers as
JSON (default bench/out/fhir.json); with `--baseline FILE` (the JSON of an earlier run, e.g.
before a change) it also prints the two runs side by side, rates and ratios to their own
run's ceilings.

Measured on the shared 2-core machine (SQLite, defaults; medians of interleaved runs of the
code before and after group commit of the HTTP writes, prepared statements in the accept, the
token lookup cache, a larger SQLite pool, searchsets spliced from the stored JSON text and the
total carried by the cursor; the machine's load moves the rates, so compare the ratios):

    figure                                      before    after
    accepted over HTTP, resources/s                 70      138   (ceiling ~1,000 GET/s)
      ratio to the ceiling                        6.8%    13.0%
      PUT p50 (8 threads), ms                      106       39
      a lone PUT p50, ms                          13.9     11.5   (the worker's transaction)
    Task searches/s (10,000 Tasks)                  44       83
      ratio (requests) to the ceiling             4.7%     8.5%
      owner search p50 (8 threads), ms             143       77
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, also without the editable install
    sys.path.insert(0, str(ROOT))

from fhir.resources.R4B import get_fhir_model_class  # noqa: E402

from adapters.service.auth import TokenStore  # noqa: E402
from adapters.store import open_store  # noqa: E402
from engine.ports import StoredTask  # noqa: E402
from tests.service_harness import ServeProcess  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "out" / "fhir.json"
DERBY = ROOT / "tests" / "fixtures" / "fhir" / "derby"
# The scenario's own names, replaced per synthetic patient.
_NAMES = {
    "derby-baby": "bp{n}",
    "derby-visit": "bv{n}",
    "derby-order": "bo{n}",
    "derby-report": "br{n}",
    "RX1000123": "BM{n:07d}",
    "V0001": "BV{n:07d}",
    "ORD-0000001": "BORD-{n:07d}",
    "ACC-0000001": "BACC-{n:07d}",
}
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?([+-]\d{2}:\d{2}|Z)$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
CLINICIANS = [f"C9{n:03d}" for n in range(1, 41)]
STATUSES = ["requested"] * 5 + ["accepted"] * 2 + ["in-progress", "completed", "rejected"]
PRIORITIES = ["routine", "urgent", "urgent", "asap", "stat"]
PAGE = 50


# --- helpers ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def _shift(value: Any, delta: timedelta) -> Any:
    """Every FHIR date and dateTime in `value` moved by `delta` (dates by whole days)."""
    if isinstance(value, dict):
        return {k: _shift(v, delta) for k, v in value.items()}
    if isinstance(value, list):
        return [_shift(v, delta) for v in value]
    if isinstance(value, str) and _DATETIME.match(value):
        return (datetime.fromisoformat(value.replace("Z", "+00:00")) + delta).isoformat()
    if isinstance(value, str) and _DATE.match(value):
        return (date.fromisoformat(value) + timedelta(days=delta.days)).isoformat()
    return value


def scenario(patients: int) -> list[list[dict[str, Any]]]:
    """Per patient, the Derby-like scenario's six resources (in sending order), with its own
    ids and identifiers; the NHS number left out (the MRN identifies the child). The last
    resource is dated an hour ago, the others as far before it as in the scenario."""
    templates = [path.read_text() for path in sorted(DERBY.glob("0*.json"))]
    last = max(datetime.fromisoformat(json.loads(t)["meta"]["lastUpdated"]) for t in templates)
    now = datetime.now(UTC)
    out: list[list[dict[str, Any]]] = []
    for n in range(patients):
        delta = now - timedelta(hours=1, minutes=n % 240) - last
        resources = []
        for text in templates:
            for old, new in _NAMES.items():
                text = text.replace(old, new.format(n=n))
            resource = _shift(json.loads(text), delta)
            if resource["resourceType"] == "Patient":
                resource["identifier"] = [
                    i for i in resource["identifier"] if "nhs-number" not in i.get("system", "")
                ]
            resources.append(resource)
        out.append(resources)
    return out


def run_threads(threads: int, work: Sequence[Any], job: Callable[[Any], None]) -> float:
    """Run `job` over `work` on `threads` threads (item i on thread i % threads); seconds."""
    slices = [work[t::threads] for t in range(threads)]
    errors: list[BaseException] = []

    def worker(items: Sequence[Any]) -> None:
        try:
            for item in items:
                job(item)
        except BaseException as exc:  # reported after the run
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(s,)) for s in slices]
    began = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    return elapsed


class Clients:
    """One keep-alive httpx client per thread, with a bearer token."""

    def __init__(self, base: str, token: str) -> None:
        self._local = threading.local()
        self._base = base
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
        self._all: list[httpx.Client] = []
        self._lock = threading.Lock()

    def get(self) -> httpx.Client:
        http: httpx.Client | None = getattr(self._local, "http", None)
        if http is None:
            http = httpx.Client(base_url=self._base, headers=self._headers, timeout=60)
            self._local.http = http
            with self._lock:
                self._all.append(http)
        return http

    def close(self) -> None:
        for http in self._all:
            http.close()


def metadata_ceiling(base: str, token: str, requests: int, threads: int) -> dict[str, Any]:
    """`requests` authenticated GETs of /fhir/metadata on `threads` threads."""
    clients = Clients(base, token)
    latencies: list[float] = []

    def get(_: int) -> None:
        began = time.perf_counter()
        answer = clients.get().get("/metadata")
        latencies.append(time.perf_counter() - began)
        if answer.status_code != 200:
            raise RuntimeError(f"GET /fhir/metadata answered {answer.status_code}")

    try:
        elapsed = run_threads(threads, list(range(requests)), get)
    finally:
        clients.close()
    return {
        "requests": requests,
        "seconds": elapsed,
        "per_s": requests / elapsed,
        "p50_ms": (percentile(latencies, 50) or 0) * 1000,
        "p99_ms": (percentile(latencies, 99) or 0) * 1000,
    }


def start_serve(db_url: str, tmp: Path, label: str) -> ServeProcess:
    serve = ServeProcess(
        db_url, tmp / f"serve-{label}.log", "--poll-interval", "0.5", "--lease-ttl", "10"
    )
    serve.start(wait_ready=False)
    try:
        serve.wait_ready(timeout=60, processor="active")
    except BaseException:
        serve.kill()
        raise
    return serve


def inbox_states(path: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT state, count(*) FROM inbox GROUP BY state").fetchall()
    return {state: int(n) for state, n in rows}


def wait_drained(path: Path, timeout: float) -> float | None:
    """Seconds until no inbox row is left "received" (None: not within `timeout`)."""
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        if not inbox_states(path).get("received"):
            return time.perf_counter() - began
        time.sleep(0.02)
    return None


# --- 1. ingest -------------------------------------------------------------------------------


def validate_only(patients: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """The same resources through the fhir.resources R4B models alone (this process)."""
    resources = [r for per in patients for r in per]
    began = time.perf_counter()
    for resource in resources:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    elapsed = time.perf_counter() - began
    return {"resources": len(resources), "per_s": len(resources) / elapsed}


def bench_ingest(tmp: Path, patients: int, threads: int, lone: int = 50) -> dict[str, Any]:
    path = tmp / "ingest.db"
    db_url = f"sqlite:///{path}"
    store = open_store(db_url)
    at = datetime.now(UTC)
    tokens = TokenStore(store)
    feed = tokens.create("bench-feed", ["feed"], at)
    store.close()
    everyone = scenario(patients + lone)
    traffic, alone = everyone[:patients], everyone[patients:]
    total = sum(len(per) for per in traffic)
    serve = start_serve(db_url, tmp, "ingest")
    base = f"http://127.0.0.1:{serve.http_port}/fhir"
    try:
        clients = Clients(base, feed)
        codes: Counter[int] = Counter()
        latencies: list[float] = []

        def send(per_patient: Sequence[dict[str, Any]]) -> None:
            http = clients.get()
            for resource in per_patient:
                began = time.perf_counter()
                answer = http.put(f"/{resource['resourceType']}/{resource['id']}", json=resource)
                latencies.append(time.perf_counter() - began)
                codes[answer.status_code] += 1
                if answer.status_code not in (200, 201):
                    raise RuntimeError(f"PUT answered {answer.status_code}: {answer.text[:300]}")

        began = time.perf_counter()
        try:
            sent_s = run_threads(threads, traffic, send)
        finally:
            clients.close()
        drained = wait_drained(path, timeout=900)
        overall = time.perf_counter() - began
        ceiling = metadata_ceiling(base, feed, total, threads)
        lone_put = lone_puts(base, feed, alone)
        lone_get = metadata_ceiling(base, feed, lone_put["requests"], 1)
    finally:
        serve.terminate()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        tasks = dict(conn.execute("SELECT rule_id, count(*) FROM tasks GROUP BY rule_id"))
    return {
        "db": str(path),
        "patients": patients,
        "resources": total,
        "threads": threads,
        "answers": dict(codes),
        "http": {
            "seconds": sent_s,
            "per_s": total / sent_s,
            "p50_ms": (percentile(latencies, 50) or 0) * 1000,
            "p99_ms": (percentile(latencies, 99) or 0) * 1000,
        },
        "processed": {
            "drained_after_last_answer_seconds": drained,
            "per_s": total / overall if drained is not None else None,
            "inbox_states": inbox_states(path),
            "tasks_by_rule": tasks,
        },
        "ceiling_metadata_get": ceiling,
        "lone_put": lone_put,
        "lone_metadata_get": lone_get,
        "reference_r4b_validation": validate_only(traffic),
    }


def lone_puts(
    base: str, token: str, patients: Sequence[Sequence[dict[str, Any]]]
) -> dict[str, Any]:
    """Each resource PUT from one thread, one at a time: the latency of a lone write."""
    clients = Clients(base, token)
    latencies: list[float] = []

    def send(per_patient: Sequence[dict[str, Any]]) -> None:
        http = clients.get()
        for resource in per_patient:
            began = time.perf_counter()
            answer = http.put(f"/{resource['resourceType']}/{resource['id']}", json=resource)
            latencies.append(time.perf_counter() - began)
            if answer.status_code not in (200, 201):
                raise RuntimeError(f"PUT answered {answer.status_code}: {answer.text[:300]}")

    try:
        elapsed = run_threads(1, patients, send)
    finally:
        clients.close()
    return {
        "requests": len(latencies),
        "per_s": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": (percentile(latencies, 50) or 0) * 1000,
        "p99_ms": (percentile(latencies, 99) or 0) * 1000,
    }


# --- 2. Task search --------------------------------------------------------------------------


def populate_tasks(db_url: str, target: int) -> dict[str, Any]:
    """Clone the stored Tasks to `target` Tasks (store `put_task`, one transaction per 500)."""
    store = open_store(db_url)
    try:
        with store.begin(read_only=True) as uow:
            templates = [t for t in uow.tasks() if not t.shadow]
        if not templates:
            raise RuntimeError("no Task to clone: the ingest raised none")
        have = len(templates)
        now = datetime.now(UTC)
        began = time.perf_counter()
        n = 0
        while have + n < target:
            with store.begin() as uow:
                for _ in range(min(500, target - have - n)):
                    uow.put_task(*_clone(templates[n % len(templates)], n, now))
                    n += 1
        return {
            "tasks": have + n,
            "cloned": n,
            "from_ingest": have,
            "seconds": time.perf_counter() - began,
        }
    finally:
        store.close()


def _clone(task: StoredTask, n: int, now: datetime) -> tuple[StoredTask, datetime, str]:
    identifier = f"{task.identifier}-c{n}"
    owner = CLINICIANS[n % len(CLINICIANS)]
    status = STATUSES[(n // 7) % len(STATUSES)]
    priority = PRIORITIES[(n // 3) % len(PRIORITIES)]
    at = now - timedelta(minutes=(n * 37) % (90 * 24 * 60))
    resource = copy.deepcopy(dict(task.resource))
    resource["id"] = identifier
    for entry in resource.get("identifier", []):
        if entry.get("system") == "urn:safetynet:task":
            entry["value"] = identifier
    resource["status"] = status
    resource["priority"] = priority
    resource["owner"] = {
        **resource.get("owner", {}),
        "identifier": {**resource.get("owner", {}).get("identifier", {}), "value": owner},
        "display": f"Dr {owner}",
    }
    resource["lastModified"] = at.isoformat()
    if status == "completed":
        resource["note"] = [{"text": "Reviewed; no further action."}]
    if status == "rejected":
        resource["statusReason"] = {"text": "Not my patient: passed to the team."}
    clone = replace(
        task,
        identifier=identifier,
        owner=owner,
        status=status,
        priority=priority,
        resource=resource,
    )
    return clone, at, "bench clone"


Query = list[tuple[str, str]]


def search_plan(searches: int, now: datetime) -> list[tuple[str, str, Query]]:
    """(kind, whose token, query) for each search, a fixed mix."""
    plan: list[tuple[str, str, Query]] = []
    for n in range(searches):
        owner = CLINICIANS[n % len(CLINICIANS)]
        week = now - timedelta(days=7 + (n % 80))
        kinds: list[tuple[str, str, Query]] = [
            ("owner", owner, [("owner", owner)]),
            ("owner+status", owner, [("owner", owner), ("status", "requested,accepted")]),
            ("status", "governance", [("status", "requested")]),
            (
                "_lastUpdated window",
                "governance",
                [
                    ("_lastUpdated", f"ge{week.date().isoformat()}"),
                    ("_lastUpdated", f"lt{(week + timedelta(days=7)).date().isoformat()}"),
                ],
            ),
            ("owner sorted, 2 pages", owner, [("owner", owner), ("_sort", "-_lastUpdated")]),
        ]
        plan.append(kinds[n % len(kinds)])
    return plan


def bench_search(
    tmp: Path, db_path: Path, target: int, searches: int, threads: int
) -> dict[str, Any]:
    db_url = f"sqlite:///{db_path}"
    populated = populate_tasks(db_url, target)
    store = open_store(db_url)
    at = datetime.now(UTC)
    tokens = TokenStore(store)
    by_role = {"governance": tokens.create("bench-governance", ["governance"], at)}
    for clinician in CLINICIANS:
        by_role[clinician] = tokens.create(
            f"bench-{clinician}", ["clinician"], at, practitioner=clinician
        )
    store.close()
    serve = start_serve(db_url, tmp, "search")
    base = f"http://127.0.0.1:{serve.http_port}/fhir"
    try:
        clients = {role: Clients(base, token) for role, token in by_role.items()}
        latencies: dict[str, list[float]] = {}
        found: Counter[str] = Counter()
        lock = threading.Lock()
        plan = search_plan(searches, datetime.now(UTC))

        def search(item: tuple[str, str, Query]) -> None:
            kind, role, query = item
            params = httpx.QueryParams([*query, ("_count", str(PAGE))])
            http = clients[role].get()
            began = time.perf_counter()
            answer = http.get("/Task", params=params)
            if answer.status_code != 200:
                raise RuntimeError(f"search {kind} answered {answer.status_code}: {answer.text}")
            bundle = answer.json()
            if kind.endswith("2 pages"):
                nxt = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
                if nxt:
                    answer = http.get(nxt[0])
                    if answer.status_code != 200:
                        raise RuntimeError(f"next page answered {answer.status_code}")
            elapsed = time.perf_counter() - began
            with lock:
                latencies.setdefault(kind, []).append(elapsed)
                found[kind] += len(bundle.get("entry", []))

        elapsed = run_threads(threads, plan, search)
        for group in clients.values():
            group.close()
        requests = len(plan) + sum(1 for kind, _, _ in plan if kind.endswith("2 pages"))
        ceiling = metadata_ceiling(base, by_role["governance"], requests, threads)
    finally:
        serve.terminate()
    return {
        "populate": populated,
        "searches": len(plan),
        "requests": requests,
        "threads": threads,
        "seconds": elapsed,
        "searches_per_s": len(plan) / elapsed,
        "requests_per_s": requests / elapsed,
        "by_kind": {
            kind: {
                "count": len(values),
                "p50_ms": (percentile(values, 50) or 0) * 1000,
                "p99_ms": (percentile(values, 99) or 0) * 1000,
                "mean_entries": found[kind] / len(values),
            }
            for kind, values in latencies.items()
        },
        "ceiling_metadata_get": ceiling,
    }


# --- report ----------------------------------------------------------------------------------


def summary(report: dict[str, Any]) -> str:
    ingest, search = report["ingest"], report["search"]
    http_rate = ingest["http"]["per_s"]
    ceiling = ingest["ceiling_metadata_get"]["per_s"]
    processed = ingest["processed"]["per_s"]
    validation = ingest["reference_r4b_validation"]["per_s"]
    lone, lone_get = ingest.get("lone_put"), ingest.get("lone_metadata_get")
    lines = [
        f"FHIR ingest: {ingest['resources']:,} resources ({ingest['patients']:,} patients x 6), "
        f"{ingest['threads']} client threads, SQLite",
        f"  accepted over HTTP (PUT, inbox commit)  {http_rate:8,.0f} resources/s   "
        f"p50 {ingest['http']['p50_ms']:.1f} ms  p99 {ingest['http']['p99_ms']:.1f} ms",
        f"  ceiling: GET /fhir/metadata             {ceiling:8,.0f} requests/s   "
        f"-> ingest = {http_rate / ceiling:.0%} of the ceiling",
    ]
    if lone and lone_get:
        lines.append(
            f"  a lone PUT (1 thread, {lone['requests']} in a row)        "
            f"p50 {lone['p50_ms']:.1f} ms  p99 {lone['p99_ms']:.1f} ms   "
            f"(a lone GET /fhir/metadata: p50 {lone_get['p50_ms']:.1f} ms)"
        )
    lines += [
        "  first send to inbox drained (mapped, rules, Tasks) "
        + (f"{processed:,.0f} resources/s" if processed else "did not drain"),
        f"  reference: R4B validation alone        {validation:8,.0f} resources/s "
        "(no HTTP, no store)",
        f"  Tasks raised: {sum(ingest['processed']['tasks_by_rule'].values()):,}"
        f"   inbox: {ingest['processed']['inbox_states']}",
        "",
        f"Task search: {search['populate']['tasks']:,} Tasks "
        f"({search['populate']['from_ingest']:,} raised by the ingest, the rest cloned), "
        f"{search['threads']} client threads, _count={PAGE}",
        f"  searches                               {search['searches_per_s']:8,.0f} searches/s   "
        f"({search['requests_per_s']:,.0f} requests/s)",
        f"  ceiling: GET /fhir/metadata            {search['ceiling_metadata_get']['per_s']:8,.0f} "
        f"requests/s   -> search requests = "
        f"{search['requests_per_s'] / search['ceiling_metadata_get']['per_s']:.0%} of the ceiling",
    ]
    for kind, row in search["by_kind"].items():
        lines.append(
            f"    {kind:<24} p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms  "
            f"{row['mean_entries']:5.1f} entries"
        )
    return "\n".join(lines)


def _figures(report: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """The headline figures of a report: name -> (value, format)."""
    ingest, search = report["ingest"], report["search"]
    ingest_ceiling = ingest["ceiling_metadata_get"]["per_s"]
    search_ceiling = search["ceiling_metadata_get"]["per_s"]
    out: dict[str, tuple[float, str]] = {
        "ingest: resources/s over HTTP": (ingest["http"]["per_s"], "{:,.0f}"),
        "ingest: ceiling GET /metadata/s": (ingest_ceiling, "{:,.0f}"),
        "ingest: ratio to the ceiling": (ingest["http"]["per_s"] / ingest_ceiling, "{:.1%}"),
        "ingest: PUT p50 ms (8 threads)": (ingest["http"]["p50_ms"], "{:.1f}"),
        "ingest: PUT p99 ms (8 threads)": (ingest["http"]["p99_ms"], "{:.1f}"),
    }
    if ingest.get("processed", {}).get("per_s"):
        out["ingest: drained resources/s"] = (ingest["processed"]["per_s"], "{:,.0f}")
    if ingest.get("lone_put"):
        out["ingest: lone PUT p50 ms"] = (ingest["lone_put"]["p50_ms"], "{:.1f}")
        out["ingest: lone GET /metadata p50 ms"] = (
            ingest["lone_metadata_get"]["p50_ms"],
            "{:.1f}",
        )
    out["search: searches/s"] = (search["searches_per_s"], "{:,.0f}")
    out["search: ceiling GET /metadata/s"] = (search_ceiling, "{:,.0f}")
    out["search: ratio (requests) to the ceiling"] = (
        search["requests_per_s"] / search_ceiling,
        "{:.1%}",
    )
    for kind, row in sorted(search["by_kind"].items()):
        out[f"search p50 ms: {kind}"] = (row["p50_ms"], "{:.1f}")
    return out


def comparison(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The two runs side by side (rates against their own run's ceilings)."""
    old, new = _figures(before), _figures(after)
    lines = [f"{'':42} {'before':>10} {'after':>10} {'after/before':>13}"]
    for name, (value, shape) in new.items():
        if name not in old:
            lines.append(f"{name:42} {'-':>10} {shape.format(value):>10}")
            continue
        was = old[name][0]
        change = f"{value / was:.2f}x" if was else "-"
        lines.append(f"{name:42} {shape.format(was):>10} {shape.format(value):>10} {change:>13}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=500)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--lone", type=int, default=50, help="patients sent from one thread")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--searches", type=int, default=2_000)
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--baseline", type=Path, help="an earlier run's JSON: print both side by side"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.patients, args.lone, args.tasks, args.searches = 40, 10, 1_000, 200
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    with tempfile.TemporaryDirectory(prefix="bench-fhir-") as folder:
        tmp = Path(folder)
        ingest = bench_ingest(tmp, args.patients, args.threads, args.lone)
        search = bench_search(tmp, Path(ingest["db"]), args.tasks, args.searches, args.threads)
    report = {
        "when": datetime.now(UTC).isoformat(),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "config": vars(args) | {"out": str(args.out)},
        "ingest": ingest,
        "search": search,
    }
    print(summary(report))
    if baseline is not None:
        print(f"\nagainst {args.baseline}:")
        print(comparison(baseline, report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

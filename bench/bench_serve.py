"""`safetynet serve` over MLLP against a no-op MLLP echo server, measured in one run.

    .venv/bin/python bench/bench_serve.py [--messages N] [--backend sqlite|postgresql|both]
                                          [--quick] [--rate R] [--latency-seconds S] [--out FILE]

For each backend (a fresh SQLite file database in a temporary folder; a fresh PostgreSQL
database on 127.0.0.1:5432, trust auth, user postgres or root, dropped afterwards):

* echo ceiling: a no-op MLLP server in its own process (asyncio; `FrameReader`, `decode`,
  `read_header`, `build_ack` AA, `encode_frame`: the listener's framing and ACK work, no
  storage), driven by the same client as the service, just before the service is measured;
* ingest: a real `safetynet serve` (its worker processing concurrently, bundled rules),
  `--messages` synthetic messages (`synth_messages`, default mix, a fresh MSH-10 per message
  and run) over 8 concurrent lock-step connections, after a warm-up that is not counted:
  messages/s, ACK latency (send to ACK received) p50/p99, every ACK checked for AA; then how
  long the worker takes to drain the inbox;
* discharge to Task: another `safetynet serve` on another fresh database, with a copy of the
  rules whose `settle_minutes` is 0 and whose clock-driven rules are off (`latency_rules`
  says why), fed at `--rate` messages/s on an open-loop schedule
  (4 lock-step connections, each patient always on the same one so that its messages keep their
  order) with a synthetic stream in which every visit is a child under 2 with imaging, every
  final report after the discharge. A separate read-only connection polls `task_history` every
  `--poll-ms`; a Task counts as committed when a poll first sees it. Latency of a discharge =
  first poll that sees a Task of `imaging-pending-at-discharge` for its encounter minus the
  A03's scheduled send time (so a late send counts against the service: no coordinated
  omission). Resolution: the poll interval (the figure errs high by up to that).

Clients run in their own processes (a separate process from the server), but on the same
machine: on a 2-core machine client, server, worker and database share the CPUs. The JSON has
each process's CPU seconds (client, echo server; listener, worker, PostgreSQL), which show what
limits a figure (measured: the echo server uses one core fully, the client about a quarter).
Ratios, not absolute rates, compare between machines.
Never asserts on timing: exits 0 unless something under test fails outright. Prints a table and
writes the same numbers as JSON (default bench/out/serve.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, also without the editable install
    sys.path.insert(0, str(ROOT))

from adapters.hl7v2.ack import build_ack, read_header  # noqa: E402
from adapters.hl7v2.er7 import decode  # noqa: E402
from adapters.mllp.framing import FrameReader, encode_frame  # noqa: E402
from adapters.synth import SynthConfig, synth_messages  # noqa: E402
from tests.service_harness import CLOCK_DRIVEN_RULES, message_time_rules  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "out" / "serve.json"
PG_HOST, PG_PORT = "127.0.0.1", 5432
END = b"\x1c\x0d"
DISCHARGE_RULE = "imaging-pending-at-discharge"

GOAL_INGEST_MSG_S = 2000.0
GOAL_RATIO_TO_ECHO = 0.25
GOAL_ACK_P99_MS = 20.0
GOAL_TASK_P99_MS = 100.0


# --- small helpers ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def summary_ms(values_ns: Sequence[int]) -> dict[str, Any]:
    """count, mean, p50, p90, p99, max in milliseconds."""
    ms = [v / 1e6 for v in values_ns]
    return {
        "count": len(ms),
        "mean": sum(ms) / len(ms) if ms else None,
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "max": max(ms) if ms else None,
    }


def with_control_id(message: str, control_id: str) -> str:
    """The message with MSH-10 replaced (default delimiters, '\\r' segment separators)."""
    head, sep, rest = message.partition("\r")
    fields = head.split("|")
    fields[9] = control_id
    return "|".join(fields) + sep + rest


def segment(message: str, name: str) -> list[str]:
    """The fields of the first segment `name` ([] when absent); fields[n] is SEG-n."""
    for seg in message.split("\r"):
        if seg.startswith(name + "|"):
            return seg.split("|")
    return []


def message_kind(message: str) -> str:
    """MSH-9.1^MSH-9.2."""
    return "^".join(message.split("\r", 1)[0].split("|")[8].split("^")[:2])


def ack_code_of(ack: bytes) -> str:
    """MSA-1 of an ACK payload ("?" when there is none)."""
    for seg in ack.replace(b"\n", b"\r").split(b"\r"):
        if seg.startswith(b"MSA") and len(seg) > 4:
            return seg.split(seg[3:4])[1].decode("ascii", "replace")
    return "?"


def write_messages(path: Path, messages: Sequence[str]) -> None:
    """As `safetynet synth` writes them: one message a line, segments by '\\r'."""
    path.write_text("".join(m + "\n" for m in messages), encoding="utf-8", newline="")


def read_messages(path: Path) -> list[str]:
    # Not read_text: universal newlines would turn the '\r' segment separators into '\n'.
    return [line for line in path.read_bytes().decode("utf-8").split("\n") if line]


def ingest_stream(count: int, seed: int, run: str) -> list[str]:
    """`count` messages of the synth default mix, each with a fresh MSH-10."""
    patients = max(10, count // 3)
    while True:
        messages = []
        for _, msg in synth_messages(SynthConfig(patients=patients, seed=seed)):
            messages.append(msg)
            if len(messages) == count:
                break
        if len(messages) == count:
            break
        patients *= 2
    return [with_control_id(m, f"{run}I{i:08d}") for i, m in enumerate(messages)]


# Every visit a child under 2 (the rule's default cohort) with imaging, every final report after
# the discharge: most discharges raise an imaging-pending-at-discharge Task.
LATENCY_MIX = {
    "infant_share": 1.0,
    "imaging_share": 1.0,
    "pending_at_discharge_share": 1.0,
}


def latency_stream(count: int, seed: int, run: str) -> list[str]:
    """`count` messages in which every visit is a child under 2 with imaging pending at
    discharge (SynthConfig with LATENCY_MIX), each with a fresh MSH-10."""
    patients = max(10, count // 5)
    while True:
        config = SynthConfig(
            patients=patients,
            seed=seed,
            infant_share=LATENCY_MIX["infant_share"],
            imaging_share=LATENCY_MIX["imaging_share"],
            pending_at_discharge_share=LATENCY_MIX["pending_at_discharge_share"],
        )
        messages = []
        for _, msg in synth_messages(config):
            messages.append(msg)
            if len(messages) == count:
                break
        if len(messages) == count:
            break
        patients *= 2
    return [with_control_id(m, f"{run}L{i:08d}") for i, m in enumerate(messages)]


# --- CPU accounting (Linux /proc; empty elsewhere) -------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(p) for p in (task / "children").read_text().split()]
    return out


def _postgres_pids() -> list[int]:
    pids = []
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if (entry / "comm").read_text().strip() in ("postgres", "postmaster"):
                        pids.append(int(entry.name))
    return pids


class CpuMeter:
    """CPU seconds used by named process sets between `start()` and `stop()`."""

    def __init__(self, groups: dict[str, Any]) -> None:
        self.groups = groups  # name -> callable returning pids
        self.before: dict[str, dict[int, float]] = {}

    def _sample(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for name, pids in self.groups.items():
            out[name] = {}
            for pid in pids():
                cpu = _proc_cpu(pid)
                if cpu is not None:
                    out[name][pid] = cpu
        return out

    def start(self) -> None:
        self.before = self._sample()

    def stop(self) -> dict[str, float]:
        after = self._sample()
        result = {}
        for name, pids in after.items():
            old = self.before.get(name, {})
            # A process started during the measurement counts from zero.
            result[name] = round(sum(v - old.get(pid, 0.0) for pid, v in pids.items()), 2)
        return result


# --- role: the no-op echo server (own process) -----------------------------------------------


async def _echo_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    frames = FrameReader(reader, idle_timeout=None, read_timeout=None)
    try:
        while True:
            frame = await frames.next_frame()
            if frame is None:
                break
            header = read_header(decode(frame.payload))
            ack = build_ack(header, "AA", control_id=uuid.uuid4().hex[:20], now=datetime.now(UTC))
            writer.write(encode_frame(ack.encode("utf-8")))
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _echo_main() -> None:
    server = await asyncio.start_server(_echo_connection, "127.0.0.1", 0, limit=1024 * 1024)
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    loop = asyncio.get_running_loop()
    # Stop when the parent closes our stdin.
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


def role_echo(_: argparse.Namespace) -> int:
    asyncio.run(_echo_main())
    return 0


# --- role: the lock-step load client (own process) -------------------------------------------


class _Lockstep(asyncio.Protocol):
    """One lock-step MLLP connection: send a frame, wait for its ACK, send the next."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.frames: Sequence[bytes] = ()
        self.pos = 0
        self.sent_at = 0
        self.latencies: list[int] = []
        self.codes: Counter[str] = Counter()
        self.bad: list[str] = []
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def run(self, frames: Sequence[bytes]) -> asyncio.Future[None]:
        self.frames, self.pos = frames, 0
        self.latencies, self.codes, self.bad = [], Counter(), []
        self.done = asyncio.get_running_loop().create_future()
        self._next()
        return self.done

    def _next(self) -> None:
        assert self.done is not None and self.transport is not None
        if self.pos == len(self.frames):
            self.done.set_result(None)
            return
        frame = self.frames[self.pos]
        self.pos += 1
        self.sent_at = time.perf_counter_ns()
        self.transport.write(frame)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        self.buf += data
        end = self.buf.find(END)
        if end < 0:
            return
        start = self.buf.find(b"\x0b")
        ack = bytes(self.buf[start + 1 : end])
        del self.buf[: end + 2]
        self.latencies.append(now - self.sent_at)
        code = ack_code_of(ack)
        self.codes[code] += 1
        if code != "AA" and len(self.bad) < 5:
            self.bad.append(ack.decode("utf-8", "replace").replace("\r", " | "))
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))


async def _client_main(args: argparse.Namespace) -> dict[str, Any]:
    messages = read_messages(Path(args.file))
    frames = [encode_frame(m.encode("utf-8")) for m in messages]
    warm, timed = frames[: args.warmup], frames[args.warmup :]
    loop = asyncio.get_running_loop()
    conns: list[_Lockstep] = []
    for _ in range(args.connections):
        _, protocol = await loop.create_connection(_Lockstep, "127.0.0.1", args.port)
        conns.append(protocol)
    n = args.connections
    if warm:
        await asyncio.gather(*(c.run(warm[i::n]) for i, c in enumerate(conns)))
    cpu0 = time.process_time()
    began = time.perf_counter()
    await asyncio.gather(*(c.run(timed[i::n]) for i, c in enumerate(conns)))
    seconds = time.perf_counter() - began
    cpu = time.process_time() - cpu0
    for c in conns:
        assert c.transport is not None
        c.transport.close()
    latencies = [v for c in conns for v in c.latencies]
    codes: Counter[str] = Counter()
    for c in conns:
        codes.update(c.codes)
    bad = [b for c in conns for b in c.bad][:5]
    return {
        "connections": n,
        "warmup_messages": len(warm),
        "messages": len(timed),
        "seconds": seconds,
        "msg_per_s": len(timed) / seconds,
        "ack_ms": summary_ms(latencies),
        "ack_codes": dict(codes),
        "non_aa": sum(v for k, v in codes.items() if k != "AA"),
        "non_aa_examples": bad,
        "client_cpu_seconds": round(cpu, 2),
    }


def role_client(args: argparse.Namespace) -> int:
    result = asyncio.run(_client_main(args))
    Path(args.out).write_text(json.dumps(result), encoding="utf-8")
    return 0


# --- role: the paced open-loop sender (own process) ------------------------------------------


def _patient_of(message: str) -> str:
    pid = segment(message, "PID")
    return pid[3].split("~")[0].split("^")[0] if len(pid) > 3 else ""


async def _paced_main(args: argparse.Namespace) -> dict[str, Any]:
    messages = read_messages(Path(args.file))
    frames = [encode_frame(m.encode("utf-8")) for m in messages]
    n_conn = args.connections
    lanes: dict[str, int] = {}
    lane_of = []
    for m in messages:  # each patient on one connection, patients spread round-robin
        lane_of.append(lanes.setdefault(_patient_of(m), len(lanes) % n_conn))
    count = len(frames)
    scheduled, sent, acked = [0] * count, [0] * count, [0] * count
    codes = [""] * count
    queues: list[asyncio.Queue[int | None]] = [asyncio.Queue() for _ in range(n_conn)]

    async def lane(
        q: asyncio.Queue[int | None], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while (i := await q.get()) is not None:
                sent[i] = time.monotonic_ns()
                writer.write(frames[i])
                ack = await reader.readuntil(END)
                acked[i] = time.monotonic_ns()
                codes[i] = ack_code_of(ack)
        finally:
            writer.close()

    streams = [await asyncio.open_connection("127.0.0.1", args.port) for _ in queues]
    workers = [asyncio.create_task(lane(q, *rw)) for q, rw in zip(queues, streams, strict=True)]
    period = int(1e9 / args.rate)
    t0 = time.monotonic_ns() + 20_000_000
    for i in range(count):
        target = t0 + i * period
        delay = target - time.monotonic_ns()
        if delay > 0:
            await asyncio.sleep(delay / 1e9)
        scheduled[i] = target
        queues[lane_of[i]].put_nowait(i)
    for q in queues:
        q.put_nowait(None)
    await asyncio.gather(*workers)
    return {
        "rate": args.rate,
        "connections": n_conn,
        "scheduled": scheduled,
        "sent": sent,
        "acked": acked,
        "codes": codes,
        "seconds": (max(acked) - t0) / 1e9,
    }


def role_paced(args: argparse.Namespace) -> int:
    result = asyncio.run(_paced_main(args))
    Path(args.out).write_text(json.dumps(result), encoding="utf-8")
    return 0


# --- role: the Task poller (own process, read-only connection) -------------------------------

_POLL_SQLITE = (
    "SELECT id, identifier, rule_id, json_extract(resource, '$.encounter.identifier.value') "
    "FROM task_history WHERE id > ? AND version = 1 ORDER BY id"
)
_POLL_PG = (
    "SELECT id, identifier, rule_id, resource->'encounter'->'identifier'->>'value' "
    "FROM task_history WHERE id > %s AND version = 1 ORDER BY id"
)


def role_poll(args: argparse.Namespace) -> int:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    interval = args.poll_ms / 1000
    if args.db.startswith("sqlite:///"):
        path = args.db[len("sqlite:///") :]
        conn: Any = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        query = _POLL_SQLITE
    else:
        import psycopg

        conn = psycopg.connect(args.db.replace("+psycopg", ""), autocommit=True)
        conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        query = _POLL_PG
    seen: list[tuple[int, str, str, str | None]] = []
    last, polls, poll_ns = 0, 0, 0
    print("ready", flush=True)
    while not stop.is_set():
        began = time.monotonic_ns()
        rows = conn.execute(query, (last,)).fetchall()
        poll_ns += time.monotonic_ns() - began
        polls += 1
        for row_id, identifier, rule_id, encounter in rows:
            # Committed before this poll's snapshot: `began` bounds the commit time from above.
            seen.append((began, identifier, rule_id, encounter))
            last = max(last, row_id)
        time.sleep(interval)
    conn.close()
    result = {"seen": seen, "polls": polls, "mean_poll_ms": poll_ns / max(1, polls) / 1e6}
    Path(args.out).write_text(json.dumps(result), encoding="utf-8")
    return 0


# --- orchestration ---------------------------------------------------------------------------


def _role_cmd(role: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), role, *args]


def run_client(port: int, file: Path, connections: int, warmup: int, tmp: Path) -> dict[str, Any]:
    out = tmp / f"client-{secrets.token_hex(4)}.json"
    cmd = _role_cmd(
        "_client",
        f"--port={port}",
        f"--file={file}",
        f"--connections={connections}",
        f"--warmup={warmup}",
        f"--out={out}",
    )
    subprocess.run(cmd, check=True, cwd=ROOT)
    result: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return result


@contextlib.contextmanager
def echo_server() -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        _role_cmd("_echo"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_echo(file: Path, connections: int, warmup: int, tmp: Path) -> dict[str, Any]:
    with echo_server() as proc:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        meter = CpuMeter({"echo_server": lambda: [proc.pid]})
        meter.start()
        result = run_client(port, file, connections, warmup, tmp)
        result["server_cpu_seconds"] = meter.stop()
    return result


@contextlib.contextmanager
def database(backend: str, tmp: Path, label: str) -> Iterator[str]:
    """A fresh database URL of `backend`, removed afterwards."""
    if backend == "sqlite":
        folder = tmp / f"sqlite-{label}"
        folder.mkdir()
        yield f"sqlite:///{folder / 'safetynet.db'}"
        return
    import psycopg

    admin = None
    user = ""
    for user in ("postgres", "root"):
        try:
            admin = psycopg.connect(
                host=PG_HOST, port=PG_PORT, user=user, dbname="postgres", autocommit=True
            )
            break
        except psycopg.OperationalError:
            continue
    if admin is None:
        raise RuntimeError(f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT} as postgres/root")
    name = f"safetynet_bench_{uuid.uuid4().hex[:12]}"
    try:
        admin.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


class Reader:
    """A read-only connection for counting the inbox (the orchestrating process)."""

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            path = url[len("sqlite:///") :]
            self.conn: Any = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            self.param = "?"
        else:
            import psycopg

            self.conn = psycopg.connect(url.replace("+psycopg", ""), autocommit=True)
            self.param = "%s"

    def inbox_states(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT state, count(*) FROM inbox GROUP BY state").fetchall()
        return {state: int(n) for state, n in rows}

    def tasks_by_rule(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT rule_id, count(*) FROM tasks GROUP BY rule_id").fetchall()
        return {rule: int(n) for rule, n in rows}

    def wait_drained(self, timeout: float) -> float | None:
        """Seconds until no inbox row is left "received" (None: not within `timeout`)."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if not self.inbox_states().get("received"):
                return time.monotonic() - began
            time.sleep(0.02)
        return None

    def close(self) -> None:
        self.conn.close()


def start_serve(url: str, tmp: Path, label: str, *extra: str) -> Any:
    from tests.service_harness import ServeProcess

    serve = ServeProcess(
        url,
        tmp / f"serve-{label}.log",
        # The service's defaults (the harness shortens them for tests).
        "--poll-interval",
        "0.5",
        "--lease-ttl",
        "10",
        *extra,
    )
    serve.start(wait_ready=False)
    try:
        serve.wait_ready(timeout=60, processor="active")
    except BaseException:
        serve.kill()
        raise
    return serve


def stop_serve(serve: Any) -> int | None:
    try:
        code: int = serve.terminate()
        return code
    except subprocess.TimeoutExpired:
        serve.kill()
        return None


def serve_meter(serve: Any, backend: str) -> CpuMeter:
    pid = serve.process.pid
    groups: dict[str, Any] = {
        "listener": lambda: [pid],
        "worker": lambda: _children(pid),
    }
    if backend == "postgresql":
        groups["postgres"] = _postgres_pids
    return CpuMeter(groups)


def bench_ingest(
    backend: str, file: Path, total: int, connections: int, warmup: int, tmp: Path
) -> dict[str, Any]:
    with database(backend, tmp, "ingest") as url:
        serve = start_serve(url, tmp, f"{backend}-ingest")
        reader = Reader(url)
        try:
            meter = serve_meter(serve, backend)
            meter.start()
            began = time.monotonic()
            result = run_client(serve.mllp_port, file, connections, warmup, tmp)
            sent_s = time.monotonic() - began
            drained = reader.wait_drained(timeout=600)
            result["server_cpu_seconds"] = meter.stop()
            result["worker"] = {
                "drained_after_last_ack_seconds": drained,
                "messages_processed": total,
                # From the first message sent (warm-up included) to the inbox drained.
                "msg_per_s_overall": (total / (sent_s + drained) if drained is not None else None),
                "inbox_states": reader.inbox_states(),
                "tasks_by_rule": reader.tasks_by_rule(),
            }
        finally:
            reader.close()
            result_code = stop_serve(serve)
        result["serve_exit_code"] = result_code
    return result


def latency_rules(tmp: Path) -> Path:
    """A copy of the bundled rules with `[discharge] settle_minutes = 0` and the clock-driven
    rules off (tests.service_harness.CLOCK_DRIVEN_RULES). The stream is dated January 2026 and
    sent now: every overdue-report, review-window and escalation timer of each patient would
    fall due the moment it is set, a load live traffic (dated as it is sent) never puts on
    the worker. Their cost is in the ingest phase and in bench_replay."""
    return message_time_rules(tmp / "rules-latency", settle_minutes=0)


def bench_latency(
    backend: str,
    messages: Sequence[str],
    file: Path,
    rules: Path,
    rate: float,
    connections: int,
    poll_ms: float,
    tmp: Path,
) -> dict[str, Any]:
    # The A03 of each encounter: its index in the stream.
    discharge_at: dict[str, int] = {}
    for i, m in enumerate(messages):
        if message_kind(m) == "ADT^A03":
            pv1 = segment(m, "PV1")
            visit = pv1[19].split("^")[0] if len(pv1) > 19 else ""
            discharge_at.setdefault(visit, i)
    with database(backend, tmp, "latency") as url:
        serve = start_serve(url, tmp, f"{backend}-latency", "--rules", str(rules))
        reader = Reader(url)
        poll_out = tmp / f"poll-{backend}.json"
        poller = subprocess.Popen(
            _role_cmd("_poll", f"--db={url}", f"--poll-ms={poll_ms}", f"--out={poll_out}"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        try:
            assert poller.stdout is not None and poller.stdin is not None
            poller.stdout.readline()  # "ready"
            meter = serve_meter(serve, backend)
            meter.start()
            paced_out = tmp / f"paced-{backend}.json"
            subprocess.run(
                _role_cmd(
                    "_paced",
                    f"--port={serve.mllp_port}",
                    f"--file={file}",
                    f"--rate={rate}",
                    f"--connections={connections}",
                    f"--out={paced_out}",
                ),
                check=True,
                cwd=ROOT,
            )
            drained = reader.wait_drained(timeout=600)
            time.sleep(max(0.05, 5 * poll_ms / 1000))  # let the poller see the last commit
            cpu = meter.stop()
            poller.stdin.close()
            poller.wait(30)
            states = reader.inbox_states()
            tasks = reader.tasks_by_rule()
        finally:
            if poller.poll() is None:
                poller.kill()
                poller.wait()
            reader.close()
            code = stop_serve(serve)
    paced = json.loads(paced_out.read_text(encoding="utf-8"))
    polled = json.loads(poll_out.read_text(encoding="utf-8"))
    first_seen: dict[str, int] = {}
    for seen_ns, _identifier, rule_id, encounter in polled["seen"]:
        if rule_id == DISCHARGE_RULE and encounter:
            first_seen.setdefault(encounter, seen_ns)
    latencies, unmatched, early = [], 0, 0
    t0 = paced["scheduled"][0]
    windows: dict[int, list[int]] = {}
    for encounter, seen_ns in first_seen.items():
        index = discharge_at.get(encounter)
        if index is None:
            unmatched += 1
            continue
        delta = seen_ns - paced["scheduled"][index]
        if delta < 0:
            early += 1  # raised before its discharge was sent: not a discharge-to-Task latency
            continue
        latencies.append(delta)
        windows.setdefault(int((paced["scheduled"][index] - t0) // 5e9), []).append(delta)
    by_window = [
        {"from_s": 5 * w, **{k: v for k, v in summary_ms(windows[w]).items() if k != "mean"}}
        for w in sorted(windows)
    ]
    scheduled, sent, acked = paced["scheduled"], paced["sent"], paced["acked"]
    codes = Counter(paced["codes"])
    send_lag = [s - t for s, t in zip(sent, scheduled, strict=True)]
    ack = [a - s for a, s in zip(acked, sent, strict=True)]
    return {
        "offered_msg_per_s": rate,
        "connections": connections,
        "messages": len(messages),
        "messages_by_type": dict(sorted(Counter(message_kind(m) for m in messages).items())),
        "discharges_sent": len(discharge_at),
        "seconds": paced["seconds"],
        "poll_interval_ms": poll_ms,
        "polls": polled["polls"],
        "mean_poll_ms": polled["mean_poll_ms"],
        "discharge_to_task_ms": summary_ms(latencies),
        "discharge_to_task_ms_by_5s_of_run": by_window,
        "discharges_with_task_measured": len(latencies),
        "tasks_unmatched": unmatched,
        "tasks_seen_before_discharge_sent": early,
        "ack_ms": summary_ms(ack),
        "send_lag_ms": summary_ms(send_lag),
        "ack_codes": dict(codes),
        "non_aa": sum(v for k, v in codes.items() if k != "AA"),
        "drained_after_last_ack_seconds": drained,
        "inbox_states": states,
        "tasks_by_rule": tasks,
        "server_cpu_seconds": cpu,
        "serve_exit_code": code,
    }


# --- report ----------------------------------------------------------------------------------


def goals(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    ingest, echo, lat = result["ingest"], result["echo"], result["latency"]
    ratio = ingest["msg_per_s"] / echo["msg_per_s"]
    task_p99 = lat["discharge_to_task_ms"]["p99"]

    def goal(value: float | None, limit: float, at_least: bool) -> dict[str, Any]:
        met = value is not None and (value >= limit if at_least else value <= limit)
        return {"value": value, "goal": (">= " if at_least else "<= ") + f"{limit:g}", "met": met}

    return {
        "ingest_msg_per_s": goal(ingest["msg_per_s"], GOAL_INGEST_MSG_S, True),
        "ratio_to_echo": goal(ratio, GOAL_RATIO_TO_ECHO, True),
        "ack_p99_ms_8_connections": goal(ingest["ack_ms"]["p99"], GOAL_ACK_P99_MS, False),
        "ack_p99_ms_at_rate": goal(lat["ack_ms"]["p99"], GOAL_ACK_P99_MS, False),
        "discharge_to_task_p99_ms": goal(task_p99, GOAL_TASK_P99_MS, False),
        "all_acks_aa": {
            "value": ingest["non_aa"] + lat["non_aa"] + echo["non_aa"],
            "goal": "0 non-AA",
            "met": ingest["non_aa"] + lat["non_aa"] + echo["non_aa"] == 0,
        },
    }


def _f(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _mark(g: dict[str, Any]) -> str:
    return "met" if g["met"] else "NOT MET"


def table(report: dict[str, Any]) -> str:
    backends = list(report["results"])
    res = report["results"]
    rate = report["config"]["rate"]
    rows: list[tuple[str, ...]] = [("", *backends)]

    def row(name: str, fn: Any) -> None:
        rows.append((name, *(fn(res[b]) for b in backends)))

    conns = report["config"]["connections"]
    row(f"echo msg/s ({conns} conns, ceiling)", lambda r: _f(r["echo"]["msg_per_s"]))
    row("echo ACK p50 / p99 ms", lambda r: _ms_pair(r["echo"]["ack_ms"]))
    row(
        f"serve msg/s ({conns} conns)",
        lambda r: f"{_f(r['ingest']['msg_per_s'])} {_mark(r['goals']['ingest_msg_per_s'])}",
    )
    row(
        "serve / echo",
        lambda r: (
            f"{r['goals']['ratio_to_echo']['value']:.1%} {_mark(r['goals']['ratio_to_echo'])}"
        ),
    )
    row(
        f"ACK p50 / p99 ms ({conns} conns)",
        lambda r: (
            f"{_ms_pair(r['ingest']['ack_ms'])} {_mark(r['goals']['ack_p99_ms_8_connections'])}"
        ),
    )
    row(
        "non-AA ACKs (echo/serve/paced)",
        lambda r: f"{r['echo']['non_aa']}/{r['ingest']['non_aa']}/{r['latency']['non_aa']}",
    )
    row(
        "worker: inbox drained after last ACK",
        lambda r: _f(r["ingest"]["worker"]["drained_after_last_ack_seconds"], ".1f") + " s",
    )
    row(
        "worker: msg/s first send to drained",
        lambda r: _f(r["ingest"]["worker"]["msg_per_s_overall"]),
    )
    row(
        f"ACK p50 / p99 ms at {rate:g} msg/s",
        lambda r: f"{_ms_pair(r['latency']['ack_ms'])} {_mark(r['goals']['ack_p99_ms_at_rate'])}",
    )
    row(
        f"discharge->Task p50 / p99 ms at {rate:g}/s",
        lambda r: (
            f"{_ms_pair(r['latency']['discharge_to_task_ms'])} "
            f"{_mark(r['goals']['discharge_to_task_p99_ms'])}"
        ),
    )
    row(
        "  discharges measured / sent",
        lambda r: (
            f"{r['latency']['discharges_with_task_measured']} / {r['latency']['discharges_sent']}"
        ),
    )
    row(
        "  discharge->Task max ms", lambda r: _f(r["latency"]["discharge_to_task_ms"]["max"], ".1f")
    )
    row("  send lag p99 ms (client)", lambda r: _f(r["latency"]["send_lag_ms"]["p99"], ".2f"))
    row(
        "CPU s ingest+drain (client/listener/worker/pg)",
        lambda r: "/".join(
            _f(v, ".1f")
            for v in (
                r["ingest"]["client_cpu_seconds"],
                r["ingest"]["server_cpu_seconds"].get("listener"),
                r["ingest"]["server_cpu_seconds"].get("worker"),
                r["ingest"]["server_cpu_seconds"].get("postgres"),
            )
        ),
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
    lines.insert(1, "-" * len(lines[0]))
    cfg = report["config"]
    lines.append("")
    lines.append(
        f"goals: ingest >= {GOAL_INGEST_MSG_S:,.0f} msg/s and >= {GOAL_RATIO_TO_ECHO:.0%} of echo; "
        f"ACK p99 <= {GOAL_ACK_P99_MS:g} ms; discharge->Task p99 <= {GOAL_TASK_P99_MS:g} ms at "
        f"{rate:g} msg/s (settle_minutes = 0)."
    )
    lines.append(
        f"{cfg['messages']:,} timed messages (+{cfg['warmup']:,} warm-up) per ingest run; "
        f"{cfg['latency_messages']:,} paced messages; Task seen by polling task_history every "
        f"{cfg['poll_ms']:g} ms (a read-only connection in its own process). Clients share this "
        f"{report['machine']['cpus']}-CPU machine with the server, worker and database."
    )
    return "\n".join(lines)


def _ms_pair(s: dict[str, Any]) -> str:
    return f"{_f(s['p50'], '.2f')} / {_f(s['p99'], '.2f')}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ROLES:
        role, rest = argv[0], argv[1:]
        rp = argparse.ArgumentParser(prog=f"bench_serve.py {role}")
        for name in ("port", "file", "connections", "warmup", "out", "rate", "db", "poll-ms"):
            rp.add_argument(f"--{name}")
        ns = rp.parse_args(rest)
        for name in ("port", "connections", "warmup"):
            if getattr(ns, name) is not None:
                setattr(ns, name, int(getattr(ns, name)))
        for name in ("rate", "poll_ms"):
            if getattr(ns, name) is not None:
                setattr(ns, name, float(getattr(ns, name)))
        return ROLES[role](ns)

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--messages", type=int, help="timed ingest messages (default 20000)")
    ap.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    ap.add_argument("--quick", action="store_true", help="a short smoke run (well under 1 min)")
    ap.add_argument("--connections", type=int, default=8, help="lock-step connections (8)")
    ap.add_argument("--rate", type=float, default=200.0, help="offered msg/s for latency (200)")
    ap.add_argument("--latency-seconds", type=float, help="paced run length (default 30)")
    ap.add_argument("--poll-ms", type=float, default=2.0, help="Task poll interval (2 ms)")
    ap.add_argument("--seed", type=int, default=SynthConfig.seed)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report file")
    args = ap.parse_args(argv)
    count = args.messages or (2000 if args.quick else 20_000)
    warmup = min(1000, max(100, count // 20))
    seconds = args.latency_seconds or (4.0 if args.quick else 30.0)
    latency_count = max(1, int(seconds * args.rate))
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    paced_connections = 4
    run = secrets.token_hex(3).upper()

    began = time.perf_counter()
    ingest_messages = ingest_stream(warmup + count, args.seed, run)
    paced_messages = latency_stream(latency_count, args.seed, run)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="safetynet-bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        ingest_file, paced_file = tmp / "ingest.hl7", tmp / "paced.hl7"
        write_messages(ingest_file, ingest_messages)
        write_messages(paced_file, paced_messages)
        rules = latency_rules(tmp)
        for backend in backends:
            print(f"[{backend}] echo ceiling ...", file=sys.stderr, flush=True)
            echo = bench_echo(ingest_file, args.connections, warmup, tmp)
            print(f"[{backend}] serve ingest ...", file=sys.stderr, flush=True)
            ingest = bench_ingest(
                backend, ingest_file, warmup + count, args.connections, warmup, tmp
            )
            print(f"[{backend}] discharge to Task at {args.rate:g}/s ...", file=sys.stderr)
            latency = bench_latency(
                backend,
                paced_messages,
                paced_file,
                rules,
                args.rate,
                paced_connections,
                args.poll_ms,
                tmp,
            )
            results[backend] = {"echo": echo, "ingest": ingest, "latency": latency}
            results[backend]["goals"] = goals(results[backend])
    report: dict[str, Any] = {
        "benchmark": "serve",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "note": "clients, servers, worker and database share this machine",
        },
        "config": {
            "messages": count,
            "warmup": warmup,
            "connections": args.connections,
            "rate": args.rate,
            "latency_seconds": seconds,
            "latency_messages": latency_count,
            "paced_connections": paced_connections,
            "poll_ms": args.poll_ms,
            "seed": args.seed,
            "run": run,
            "ingest_synth": "SynthConfig defaults (patients as needed)",
            "latency_synth": {
                **LATENCY_MIX,
                "settle_minutes": 0,
                "rules_off": list(CLOCK_DRIVEN_RULES),
            },
            "quick": args.quick,
            "task_committed": "first poll of task_history (read-only connection) that sees it",
        },
        "results": results,
        "total_seconds": time.perf_counter() - began,
    }
    print(table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten: {args.out} ({report['total_seconds']:.0f} s)")
    return 0


ROLES = {"_echo": role_echo, "_client": role_client, "_paced": role_paced, "_poll": role_poll}


if __name__ == "__main__":
    raise SystemExit(main())

"""`safetynet serve` when things fail: kill -9 mid-send, two instances on one PostgreSQL
database with the active one killed, and a message that crashes the rule engine.

Traffic is synthetic (adapters.synth), split over several lock-step connections by patient,
as an integration engine keeps one patient's messages in order. The reference is a replay of
the same messages (event time as the clock; the discharge settle time is zero here, so no
Task depends on when a timer happened to fire).
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from adapters.bootstrap import build_replay_app
from adapters.hl7v2.er7 import read_message
from adapters.synth import SynthConfig, synth_messages
from tests.conftest import new_pg_database
from tests.service_harness import (
    END_BYTES,
    START_BYTE,
    ServeProcess,
    message_time_rules,
    msa,
    read_frame,
)

CONNECTIONS = 4


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled rules with the discharge settle time set to zero and the clock-driven
    rules off (tests.service_harness.CLOCK_DRIVEN_RULES): the Tasks must not depend on when
    the worker happened to find the inbox empty."""
    return message_time_rules(tmp_path_factory.mktemp("rules") / "rules", settle_minutes=0)


def _messages(count: int, seed: int = 3) -> list[str]:
    return [m for _, m in itertools.islice(synth_messages(SynthConfig(seed=seed)), count)]


def _streams(messages: Sequence[str], n: int) -> list[list[str]]:
    """Split messages over n connections, each patient's messages on one connection, in order.
    A result that carries no PID follows its order's patient."""
    by_order: dict[str, str] = {}
    streams: list[list[str]] = [[] for _ in range(n)]
    for raw in messages:
        message = read_message(raw)
        pid = message.segment("PID")
        placer = ""
        for name in ("ORC", "OBR"):
            seg = message.segment(name)
            if seg is not None and seg.get(2):
                placer = seg.get(2)
                break
        patient = pid.get(3) if pid is not None else by_order.get(placer, placer)
        if placer:
            by_order.setdefault(placer, patient)
        streams[hash(patient) % n].append(raw)
    return streams


def _reference_tasks(messages: Sequence[str], rules: Path, tmp: Path) -> set[tuple[str, str]]:
    app = build_replay_app(f"sqlite:///{tmp / 'reference.db'}", rules)
    try:
        with app.store.begin() as uow:
            for raw in messages:
                app.ingest.ingest(uow, raw, datetime.now(UTC))
        with app.store.begin(read_only=True) as uow:
            return {(t.identifier, t.rule_id) for t in uow.tasks()}
    finally:
        app.close()


@dataclass
class Sender:
    """One lock-step MLLP connection that resends whatever was not acknowledged."""

    messages: list[str]
    port: Callable[[], int]
    acked: list[str] = field(default_factory=list)  # control ids answered AA
    position: int = 0
    errors: int = 0

    def run(self, stop_after: threading.Event | None = None, give_up_after: float = 120) -> None:
        """Send from the first unacknowledged message to the end; reconnect on failure; give
        up (the test then fails on what was not acknowledged) after `give_up_after` seconds."""
        deadline = time.monotonic() + give_up_after
        while self.position < len(self.messages) and time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port()), timeout=10) as sock:
                    while self.position < len(self.messages):
                        raw = self.messages[self.position]
                        sock.sendall(START_BYTE + raw.encode() + END_BYTES)
                        code, control_id = msa(read_frame(sock))
                        assert code == "AA", (code, control_id)
                        self.acked.append(control_id)
                        self.position += 1
            except (OSError, ConnectionError):
                self.errors += 1
                if stop_after is not None and stop_after.is_set():
                    return
                time.sleep(0.2)


def _run_senders(senders: Sequence[Sender], stop: threading.Event | None = None) -> None:
    threads = [threading.Thread(target=s.run, args=(stop,)) for s in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)


def _wait_processed(db_url: str, expected: int, timeout: float = 120.0) -> None:
    engine = create_engine(db_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                stored, waiting = conn.execute(
                    text("SELECT count(*), count(*) FILTER (WHERE state = 'received') FROM inbox")
                ).one()
            if stored >= expected and waiting == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"inbox not processed in time: {stored} stored, {waiting} waiting")
    finally:
        engine.dispose()


def _query(db_url: str, sql: str) -> list[tuple[object, ...]]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql))]
    finally:
        engine.dispose()


def _check_exactly_once(db_url: str, messages: Sequence[str], acked: set[str]) -> None:
    sent = {read_message(m).control_id for m in messages}
    assert acked == sent, "every message is acknowledged in the end"
    rows = _query(db_url, "SELECT control_id, count(*), min(state) FROM inbox GROUP BY control_id")
    stored = {control_id: (count, state) for control_id, count, state in rows}
    assert set(stored) == sent
    assert all(count == 1 for count, _ in stored.values()), "stored exactly once"
    states = {state for _, state in stored.values()}
    assert states <= {"processed", "unsupported"}, states
    raised = _query(db_url, "SELECT count(*) FROM audit WHERE action = 'task.raised'")[0][0]
    tasks = _query(db_url, "SELECT count(*) FROM tasks")[0][0]
    assert raised == tasks, "no Task raised twice"


def _tasks(db_url: str) -> set[tuple[str, str]]:
    return {(str(i), str(r)) for i, r in _query(db_url, "SELECT identifier, rule_id FROM tasks")}


@pytest.mark.slow
def test_kill_9_mid_send_then_resend_loses_nothing_and_doubles_nothing(
    tmp_path: Path, database_url: str, rules_dir: Path
) -> None:
    messages = _messages(5000)
    expected = _reference_tasks(messages, rules_dir, tmp_path)
    assert len(expected) > 20, "the traffic raises Tasks"
    serve = ServeProcess(database_url, tmp_path / "serve.log", "--rules", str(rules_dir))
    serve.start()
    senders = [
        Sender(stream, lambda: serve.mllp_port) for stream in _streams(messages, CONNECTIONS)
    ]
    killer_done = threading.Event()

    def kill_then_restart() -> None:
        while sum(len(s.acked) for s in senders) < len(messages) // 3:
            time.sleep(0.01)
        serve.kill()
        acked_at_kill = sum(len(s.acked) for s in senders)
        assert acked_at_kill < len(messages)
        time.sleep(0.5)
        serve.start()
        killer_done.set()

    killer = threading.Thread(target=kill_then_restart)
    killer.start()
    try:
        _run_senders(senders)
        killer.join(60)
        assert killer_done.is_set()
        assert sum(s.errors for s in senders) >= 1, "the kill interrupted the senders"
        _wait_processed(database_url, len(messages))
        acked = {c for s in senders for c in s.acked}
        _check_exactly_once(database_url, messages, acked)
        assert _tasks(database_url) == expected
    finally:
        if serve.process is not None and serve.process.poll() is None:
            serve.terminate()


@pytest.mark.slow
@pytest.mark.postgres
def test_two_instances_one_processor_and_takeover_when_it_dies(
    tmp_path: Path, rules_dir: Path, pg_admin: tuple[object, str]
) -> None:
    messages = _messages(3000, seed=5)
    expected = _reference_tasks(messages, rules_dir, tmp_path)
    with new_pg_database(*pg_admin) as db_url:  # type: ignore[arg-type]
        a = ServeProcess(db_url, tmp_path / "a.log", "--rules", str(rules_dir), instance="a")
        b = ServeProcess(db_url, tmp_path / "b.log", "--rules", str(rules_dir), instance="b")
        a.start()
        a.wait_ready(processor="active")
        b.start()
        b.wait_ready(processor="standby")
        streams = _streams(messages, CONNECTIONS)
        # Half the connections go to each instance; after the kill, a's senders fail over to b.
        alive = {"a": True}
        senders = [
            Sender(
                stream,
                (lambda: a.mllp_port if alive["a"] else b.mllp_port)
                if i % 2 == 0
                else (lambda: b.mllp_port),
            )
            for i, stream in enumerate(streams)
        ]
        took_over: list[float] = []

        def kill_active() -> None:
            while sum(len(s.acked) for s in senders) < len(messages) // 3:
                time.sleep(0.01)
            a.kill()
            alive["a"] = False
            killed = time.monotonic()
            b.wait_ready(timeout=30, processor="active")
            took_over.append(time.monotonic() - killed)

        killer = threading.Thread(target=kill_active)
        killer.start()
        try:
            _run_senders(senders)
            killer.join(60)
            assert took_over, "the standby instance took over"
            # The lease lives 2 s here; the standby polls every 0.1 s.
            assert took_over[0] < 10, f"takeover took {took_over[0]:.1f}s"
            _wait_processed(db_url, len(messages))
            acked = {c for s in senders for c in s.acked}
            _check_exactly_once(db_url, messages, acked)
            assert _tasks(db_url) == expected
            processed_by = _query(db_url, "SELECT count(*) FROM inbox WHERE attempts > 1")[0][0]
            assert processed_by <= 200, "at most the batch in hand at the kill was started twice"
        finally:
            for serve in (a, b):
                if serve.process is not None and serve.process.poll() is None:
                    serve.terminate()


CRASH_RULE = '''
"""A rule that kills its process on one marked order: a stand-in for a durable_rules abort."""
import os


def conditions(p, site):
    return {}


def recall_task(match):
    return None


def wake_times(facts, p, site):
    for _, data in facts:
        if "CRASH-TEST" in str(data.get("name", "")):
            os._exit(70)
    return []
'''


def test_a_message_that_crashes_the_worker_is_quarantined_after_k_attempts(
    tmp_path: Path, rules_dir: Path
) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(rules_dir, rules)
    folder = rules / "crash-test"
    folder.mkdir()
    (folder / "rule.toml").write_text(
        'id = "crash-test"\ntitle = "Crash test"\nversion = "0.0.1"\nstatus = "active"\n'
        'owner = "tests"\nsummary = "Exits the process on an order named CRASH-TEST."\n'
    )
    (folder / "rule.py").write_text(CRASH_RULE)
    messages = _messages(300, seed=7)
    orders = [i for i, m in enumerate(messages) if m.split("\r")[0].split("|")[8].startswith("ORM")]
    victim = orders[len(orders) // 2]
    obr = next(s for s in messages[victim].split("\r") if s.startswith("OBR"))
    name = obr.split("|")[4]
    messages[victim] = messages[victim].replace(name, name.split("^")[0] + "^CRASH-TEST")
    db = f"sqlite:///{tmp_path / 'sn.db'}"
    with ServeProcess(
        db, tmp_path / "serve.log", "--rules", str(rules), "--max-attempts", "2"
    ) as serve:
        sender = Sender(messages, lambda: serve.mllp_port)
        sender.run()
        assert len(sender.acked) == len(messages), "the listener answered every message"
        _wait_processed(db, len(messages), timeout=60)
        failed = _query(db, "SELECT id, attempts FROM inbox WHERE state = 'failed'")
        assert len(failed) == 1 and failed[0][1] == 2
        assert _query(db, "SELECT count(*) FROM quarantine WHERE resolved_at IS NULL")[0][0] == 1
        processed = _query(db, "SELECT count(*) FROM inbox WHERE state = 'processed'")[0][0]
        assert processed >= len(messages) - 1 - 10  # the rest went on (a few may be unsupported)
        metrics = serve.metrics()
        assert "safetynet_messages_poisoned_total 1.0" in metrics
        restarts = [
            line
            for line in metrics.splitlines()
            if line.startswith("safetynet_worker_restarts_total")
        ]
        assert restarts and float(restarts[0].split()[-1]) >= 2
        serve.wait_ready(processor="active")


def _lock_free(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_a_dead_or_frozen_worker_never_stops_the_listener(
    tmp_path: Path, how: signal.Signals
) -> None:
    db = f"sqlite:///{tmp_path / 'sn.db'}"
    messages = _messages(40, seed=13)
    with ServeProcess(db, tmp_path / "serve.log") as serve:
        first = Sender(messages[:20], lambda: serve.mllp_port)
        first.run()
        _wait_processed(db, 20)
        [pid] = [
            r["worker_pid"]
            for r in serve.log_records()
            if r.get("message") == "worker process started"
        ]
        time.sleep(0.3)  # idle: the worker is waiting for the doorbell
        lock = tmp_path / "sn.db.writer-lock"
        while True:
            os.kill(pid, how)
            if how == signal.SIGKILL or _lock_free(lock):
                break
            # Frozen inside its periodic lease renewal: a frozen SQLite writer blocks every
            # writer, which is not what this test is about. Let it go and freeze it again.
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.05)
        rest = Sender(messages[20:], lambda: serve.mllp_port)
        rest.run(give_up_after=10)
        assert len(rest.acked) == 20, "ACKs still flow"
        if how == signal.SIGSTOP:
            os.kill(pid, signal.SIGCONT)
        _wait_processed(db, 40, timeout=30)

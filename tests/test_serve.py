"""`safetynet serve` end to end: a real process, real sockets, a real MLLP client, a real
database, a real outbox destination.

The Derby-like scenario goes in through python-hl7's `mllp_send` (the command line tool);
every ACK must be AA; the two Tasks of the replay must appear in `safetynet tasks list` and at
the webhook and FHIR destinations.
"""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from adapters.cli import main as cli_main
from adapters.synth import SynthConfig, synth_messages
from tests.fhir_server import FhirTestServer
from tests.service_harness import (
    END_BYTES,
    ROOT,
    START_BYTE,
    ServeProcess,
    message_time_rules,
    mllp_exchange,
    msa,
    read_frame,
)

DERBY = ROOT / "tests" / "fixtures" / "hl7v2" / "derby"
MLLP_SEND = Path(sys.executable).with_name("mllp_send")


def _derby_messages() -> list[str]:
    # Bytes, not read_text(): universal newlines would turn the segment separator \r into \n.
    files = sorted(p for p in DERBY.iterdir() if p.suffix == ".hl7")
    return [p.read_bytes().decode().strip() for p in files]


@pytest.fixture(scope="module")
def rules_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled rules with the clock-driven ones off (tests.service_harness): the live
    service is compared with a replay of the same 2008 messages in 2026."""
    return message_time_rules(tmp_path_factory.mktemp("rules") / "rules")


def _replay_identifiers(rules_dir: Path) -> set[str]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "adapters.cli",
            "replay",
            str(DERBY),
            "--rules",
            str(rules_dir),
            "--format",
            "ndjson",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {json.loads(line)["identifier"][0]["value"] for line in out.splitlines()}


def _tasks(db_url: str, capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, object]]:
    capsys.readouterr()
    assert cli_main(["tasks", "list", "--format", "ndjson", "--db", db_url, *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _wait_for(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


@pytest.fixture
def destination() -> Iterator[FhirTestServer]:
    with FhirTestServer() as server:
        yield server


def test_derby_scenario_through_mllp_send(
    tmp_path: Path,
    database_url: str,
    destination: FhirTestServer,
    capsys: pytest.CaptureFixture[str],
    rules_dir: Path,
) -> None:
    scenario = tmp_path / "derby.hl7"
    # mllp_send --loose reads messages written one segment per line.
    scenario.write_text("\n".join(m.replace("\r", "\n") for m in _derby_messages()) + "\n")
    outbox = (
        f"fhir=http://127.0.0.1:{destination.port},webhook=http://127.0.0.1:{destination.port}/hook"
    )
    with ServeProcess(
        database_url, tmp_path / "serve.log", "--outbox", outbox, "--rules", str(rules_dir)
    ) as serve:
        sent = subprocess.run(
            [
                str(MLLP_SEND),
                "--loose",
                "-f",
                str(scenario),
                "-p",
                str(serve.mllp_port),
                "127.0.0.1",
            ],
            capture_output=True,
            check=True,
            timeout=60,
        )
        acks = [a for a in sent.stdout.split(b"\x1c") if b"MSA" in a]
        assert len(acks) == len(_derby_messages())
        assert [msa(a.strip(b"\x0b\r\n"))[0] for a in acks] == ["AA"] * len(acks)

        expected = _replay_identifiers(rules_dir)
        assert len(expected) == 3  # pending imaging, the final report, the discrepancy
        _wait_for(lambda: len(_tasks(database_url, capsys)) == len(expected))
        listed = {t["identifier"][0]["value"] for t in _tasks(database_url, capsys)}  # type: ignore[index]
        assert listed == expected
        owner = _tasks(database_url, capsys)[0]["owner"]["identifier"]  # type: ignore[index]
        by_owner = _tasks(database_url, capsys, "--owner", owner["value"])
        assert by_owner and all(t["owner"]["identifier"] == owner for t in by_owner)  # type: ignore[index]
        assert _tasks(database_url, capsys, "--owner", "NOBODY") == []

        _wait_for(lambda: set(destination.task_identifiers()) == expected)
        _wait_for(lambda: {h["task_identifier"] for h in destination.webhooks()} == expected)

        capsys.readouterr()
        assert cli_main(["outbox", "status", "--db", database_url]) == 0
        status = capsys.readouterr().out
        assert "fhir: 3 delivered, 0 pending" in status
        assert "webhook: 3 delivered, 0 pending" in status

        metrics = serve.metrics()
        assert 'safetynet_messages_answered_total{code="AA"' in metrics
        assert "safetynet_tasks_total" in metrics
        assert serve.terminate() == 0
    log = serve.log()
    assert "Testbaby" not in log and "9990000018" not in log, "no patient data in logs"
    records = serve.log_records()
    assert any(r.get("message") == "stopped" for r in records)


def test_sigterm_mid_stream_answers_what_it_holds_and_exits_cleanly(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'sn.db'}"
    messages = [m for _, m in itertools.islice(synth_messages(SynthConfig(seed=11)), 2000)]
    acked: list[str] = []
    closed = threading.Event()

    def send(port: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                for raw in messages:
                    sock.sendall(START_BYTE + raw.encode() + END_BYTES)
                    code, control_id = msa(read_frame(sock))
                    assert code == "AA"
                    acked.append(control_id)
        except (ConnectionError, OSError):
            closed.set()

    serve = ServeProcess(db, tmp_path / "serve.log").start()
    sender = threading.Thread(target=send, args=(serve.mllp_port,))
    sender.start()
    _wait_for(lambda: len(acked) >= 300)
    assert serve.terminate() == 0, "a clean exit"
    sender.join(10)
    assert closed.is_set() and 300 <= len(acked) < len(messages), "stopped mid-stream"
    records = serve.log_records()
    assert any(r.get("message") == "stopped" for r in records)
    assert not any(r.get("level") in ("ERROR", "CRITICAL") for r in records), records
    # Everything acknowledged was stored; what the worker had not reached waits for the next
    # start, which processes it.
    with ServeProcess(db, tmp_path / "serve2.log"):
        engine = create_engine(db)
        try:

            def states() -> dict[str, str]:
                with engine.connect() as conn:
                    rows = conn.execute(text("SELECT control_id, state FROM inbox")).all()
                return {str(c): str(s) for c, s in rows}

            _wait_for(lambda: "received" not in states().values())
            assert set(acked) <= set(states())
        finally:
            engine.dispose()


def test_errors_are_answered_with_err_and_kept_in_quarantine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path / 'sn.db'}"
    good = _derby_messages()[0]
    bad_time = good.replace("20080313", "2008-03-13").replace("DERBY-0001", "BAD-1")
    test_mode = good.replace("|P|2.5", "|T|2.5").replace("DERBY-0001", "TEST-1")
    enhanced = good.replace("|P|2.5", "|P|2.5|||AL|NE").replace("DERBY-0001", "ENH-1")
    with ServeProcess(db, tmp_path / "serve.log") as serve:
        acks = mllp_exchange(serve.mllp_port, [bad_time, test_mode, enhanced, b"garbage"])
    code, control = msa(acks[0])
    assert (code, control) == ("AE", "BAD-1")
    assert b"ERR|" in acks[0] and b"PID^1^7" in acks[0]
    assert msa(acks[1]) == ("AR", "TEST-1") and b"202" in acks[1]
    assert msa(acks[2]) == ("CA", "ENH-1")
    assert msa(acks[3])[0] == "AR"
    capsys.readouterr()
    assert cli_main(["quarantine", "list", "--db", db]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith("2 item(s)")  # the bad date and the garbage; AR for T is not kept
    item_id = int(listing.splitlines()[1].split()[0])
    assert cli_main(["quarantine", "show", str(item_id), "--db", db]) == 0
    shown = capsys.readouterr().out
    assert "BAD-1" in shown and "message:" in shown
    assert cli_main(["quarantine", "retry", str(item_id), "--db", db, "--by", "tester"]) == 0
    assert "queued for processing again" in capsys.readouterr().out
    assert cli_main(["quarantine", "retry", str(item_id), "--db", db]) == 2


def test_an_orphan_cancellation_is_quarantined_then_retried_once_its_order_arrives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = f"sqlite:///{tmp_path / 'sn.db'}"
    registration, order = _derby_messages()[:2]
    # A cancellation with no patient, of an order not yet heard of (an orphan result, by
    # contrast, is kept for the identity rule: tests/test_ingest.py).
    orphan = "\r".join(s for s in order.split("\r") if not s.startswith(("PID", "PV1")))
    orphan = orphan.replace("|NW|", "|CA|", 1).replace("DERBY-0002", "DERBY-0003")
    with ServeProcess(db, tmp_path / "serve.log") as serve:
        acks = mllp_exchange(serve.mllp_port, [registration, orphan])
        # Accepted: it can only be judged against the record, by the processor.
        assert [msa(a)[0] for a in acks] == ["AA", "AA"]

        def open_items() -> list[str]:
            capsys.readouterr()
            assert cli_main(["quarantine", "list", "--db", db]) == 0
            return capsys.readouterr().out.splitlines()[1::2]

        _wait_for(lambda: len(open_items()) == 1)
        [line] = open_items()
        assert "DERBY-0003" in line
        assert "safetynet_quarantine_open 1.0" in serve.metrics()

        assert msa(mllp_exchange(serve.mllp_port, [order])[0])[0] == "AA"
        item_id = line.split()[0]
        assert cli_main(["quarantine", "retry", item_id, "--db", db, "--by", "tester"]) == 0
        _wait_for(lambda: open_items() == [])
        _wait_for(lambda: "safetynet_quarantine_open 0.0" in serve.metrics())
        capsys.readouterr()
        assert cli_main(["quarantine", "list", "--all", "--db", db]) == 0
        assert "retried by tester" in capsys.readouterr().out


def test_outbox_destination_down_for_a_while_then_back(
    tmp_path: Path,
    destination: FhirTestServer,
    capsys: pytest.CaptureFixture[str],
    rules_dir: Path,
) -> None:
    db = f"sqlite:///{tmp_path / 'sn.db'}"
    destination.stop()  # nothing listening at all: connection refused
    outbox = f"fhir={destination.base_url},webhook={destination.hook_url}"
    with ServeProcess(
        db, tmp_path / "serve.log", "--outbox", outbox, "--rules", str(rules_dir)
    ) as serve:
        acks = mllp_exchange(serve.mllp_port, _derby_messages())
        assert {msa(a)[0] for a in acks} == {"AA"}

        def status() -> str:
            capsys.readouterr()
            assert cli_main(["outbox", "status", "--db", db]) == 0
            return capsys.readouterr().out

        # An unreachable destination is probed one change at a time, not flooded.
        _wait_for(lambda: "fhir: 0 delivered, 3 pending (1 failing)" in status())
        assert "last error: connection failed" in status()
        destination.start()
        destination.mode = "down"  # up, but answering 503 with Retry-After
        time.sleep(1.5)
        assert destination.tasks() == []
        destination.mode = "up"
        _wait_for(lambda: "fhir: 3 delivered, 0 pending" in status(), timeout=40)
        _wait_for(lambda: "webhook: 3 delivered, 0 pending" in status(), timeout=40)
    held = destination.tasks_by_identifier("urn:safetynet:task")
    assert len(held) == 3 and all(len(tasks) == 1 for tasks in held.values()), "none twice"
    assert sorted(h["task_identifier"] for h in destination.webhooks()) == sorted(held)

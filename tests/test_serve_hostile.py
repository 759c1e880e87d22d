"""`safetynet serve` under hostile and broken MLLP input: real process, real sockets.

Oversized, truncated, garbage-laden and trickled frames, idle connections, too many
connections, TLS (and mutual TLS) and acknowledgement modes. Each is answered or closed as
specified, the service stays up, and every message that was accepted is stored exactly once
and processed (DESIGN.md non-negotiable 1: nothing acknowledged is lost).

One plain-TCP service is shared by most tests of the module (tests run in file order and
record what they got accepted; the last plain test checks it all against the database); two
TLS services (server-only, and requiring client certificates) are started together.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import sqlite3
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from adapters.cli import main as cli_main
from tests.service_harness import END_BYTES, ROOT, START_BYTE, ServeProcess, msa

DERBY = ROOT / "tests" / "fixtures" / "hl7v2" / "derby"
BASE = (DERBY / "01_adt_a04_registration.hl7").read_text().strip()
SENDER = "PAS^RX1"  # MSH-3^MSH-4 of BASE
MAX_BYTES = 100_000
READ_TIMEOUT = 2.0
IDLE_TIMEOUT = 3.0
MAX_CONNECTIONS = 4
LIMITS = (
    "--max-message-bytes",
    str(MAX_BYTES),
    "--read-timeout",
    str(READ_TIMEOUT),
    "--idle-timeout",
    str(IDLE_TIMEOUT),
    "--max-connections",
    str(MAX_CONNECTIONS),
)
# How late a timeout may close a connection and still count as on time (a loaded CI machine).
MARGIN = 1.5


def good(control_id: str, msh_tail: str = "") -> str:
    """The Derby registration with its own MSH-10 (and, with `msh_tail`, MSH-13 onwards)."""
    text = BASE.replace("DERBY-0001", control_id)
    assert text != BASE
    return text.replace("|P|2.5", "|P|2.5" + msh_tail, 1)


def frame(message: str | bytes) -> bytes:
    data = message.encode() if isinstance(message, str) else message
    return START_BYTE + data + END_BYTES


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not met within {timeout}s: {what}")


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample of a /metrics scrape (0 when absent)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    return 0.0


class Client:
    """One MLLP connection (plain or TLS) with a buffer, so that pipelined ACKs are kept."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def ack(self, timeout: float = 10.0) -> bytes:
        """The next ACK's payload."""
        self.sock.settimeout(timeout)
        while END_BYTES not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed; no ACK after {self.buffer!r}")
            self.buffer += chunk
        end = self.buffer.index(END_BYTES)
        head, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
        assert head.startswith(START_BYTE), head
        return head[1:]

    def exchange(self, message: str | bytes) -> bytes:
        self.send(frame(message))
        return self.ack()

    def until_closed(self, timeout: float) -> bytes:
        """Everything received until the peer closes; fails if it is still open at `timeout`."""
        deadline = time.monotonic() + timeout
        data, self.buffer = self.buffer, b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"connection still open after {timeout}s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except (ConnectionResetError, ssl.SSLError):
                return data
            if not chunk:
                return data
            data += chunk


@contextlib.contextmanager
def connect(port: int, context: ssl.SSLContext | None = None) -> Iterator[Client]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if context is None:
            yield Client(raw)
            return
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as wrapped:
            yield Client(wrapped)


@dataclass
class Served:
    """A running service, its SQLite file, and the control ids (of SENDER) it accepted."""

    serve: ServeProcess
    db_path: Path
    accepted: list[str] = field(default_factory=list)

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.db_path}"

    @property
    def port(self) -> int:
        return self.serve.mllp_port

    def metric(self, name: str, labels: str = "") -> float:
        return metric(self.serve.metrics(), name, labels)

    def inbox(self, control_id: str) -> list[tuple[str, str]]:
        """(sender, state) of each inbox row with this MSH-10."""
        with contextlib.closing(
            sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        ) as db:
            rows = db.execute(
                "SELECT sender, state FROM inbox WHERE control_id = ? ORDER BY id", (control_id,)
            ).fetchall()
        return [(str(s), str(t)) for s, t in rows]

    def accept(self, client: Client, control_id: str, message: str | None = None) -> None:
        """Send one message that must be accepted (AA), and remember it."""
        assert msa(client.exchange(message or good(control_id))) == ("AA", control_id)
        self.accepted.append(control_id)

    def assert_up(self) -> None:
        assert self.serve.process is not None and self.serve.process.poll() is None
        code, body = self.serve.readyz()
        assert code == 200, body


def _start(*services: ServeProcess) -> None:
    for service in services:
        service.start(wait_ready=False)
    for service in services:
        service.wait_ready()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("plain")
    db = root / "sn.db"
    serve = ServeProcess(f"sqlite:///{db}", root / "serve.log", *LIMITS)
    _start(serve)
    try:
        yield Served(serve, db)
    finally:
        serve.__exit__(None, None, None)


# --- 1. oversized ----------------------------------------------------------------------------


def test_oversized_message_is_answered_ae_and_its_head_kept(
    plain: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    big = good("BIG-1") + "\rNTE|1||" + "X" * (3 * MAX_BYTES) + "\rNTE|2||TAILMARKER"
    size = len(big.encode())
    oversized_before = plain.metric("safetynet_mllp_oversized_frames_total")
    with connect(plain.port) as client:
        ack = client.exchange(big)
        assert msa(ack) == ("AE", "BIG-1")
        err = [s for s in ack.decode().split("\r") if s.startswith("ERR|")]
        assert len(err) == 1 and str(MAX_BYTES) in err[0], ack
        # The frame was read to its end: the same connection goes on.
        plain.accept(client, "AFTER-BIG-1")
    assert plain.metric("safetynet_mllp_oversized_frames_total") == oversized_before + 1

    capsys.readouterr()
    assert cli_main(["quarantine", "list", "--db", plain.db_url]) == 0
    listing = capsys.readouterr().out.splitlines()
    found = [i for i, line in enumerate(listing) if " BIG-1 " in line]
    assert len(found) == 1, listing
    item_id = int(listing[found[0]].split()[0])
    reason = listing[found[0] + 1]
    assert f"message of {size} bytes is larger than the limit of {MAX_BYTES} bytes" in reason
    kept = re.search(r"its first (\d+) bytes are kept", reason)
    assert kept is not None, reason
    head_size = int(kept.group(1))
    assert 0 < head_size < MAX_BYTES

    assert cli_main(["quarantine", "show", str(item_id), "--db", plain.db_url]) == 0
    shown = capsys.readouterr().out
    head = shown.split("message:\n", 1)[1].rstrip("\n")
    assert head.startswith("MSH|^~\\&|PAS|RX1|") and "|BIG-1|" in head.split("\n", 1)[0]
    assert len(head) == head_size and "TAILMARKER" not in head
    assert plain.inbox("BIG-1") == [(SENDER, "quarantined")]
    plain.assert_up()


# --- 2. truncated ----------------------------------------------------------------------------


def _log_count(served: Served, message: str) -> int:
    return sum(1 for r in served.serve.log_records() if r.get("message") == message)


def test_truncated_frame_gets_no_ack_and_is_not_stored(plain: Served) -> None:
    data = frame(good("TRUNC-1"))
    truncated_logs = _log_count(plain, "connection closed inside a frame")
    # A sender that half-closes mid-frame: the server closes too, without answering.
    with connect(plain.port) as client:
        client.send(data[: len(data) // 2])
        client.sock.shutdown(socket.SHUT_WR)
        assert client.until_closed(5) == b""
    wait_for(
        lambda: _log_count(plain, "connection closed inside a frame") == truncated_logs + 1,
        what="the truncated frame logged",
    )
    # A sender that vanishes mid-frame (reset).
    with connect(plain.port) as client:
        client.send(data[:-3])
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    plain.assert_up()
    assert plain.inbox("TRUNC-1") == []
    # The sender still has the message (never acknowledged) and sends it again.
    with connect(plain.port) as client:
        plain.accept(client, "TRUNC-1")
    assert plain.inbox("TRUNC-1")[0][0] == SENDER and len(plain.inbox("TRUNC-1")) == 1


# --- 3. garbage ------------------------------------------------------------------------------


def test_garbage_around_frames_is_skipped_and_counted(plain: Served) -> None:
    rng = random.Random(20080501)
    noise = bytes(b for b in rng.randbytes(400) if b != 0x0B)  # 0x0B would open a frame
    before_first = noise[:150] + b"\x1c\r\n\x1c"
    between = b"\r\n\r\n" + noise[150:] + b"\x1c\x1c\r"
    # A sender that gave up on a frame and began again: the partial frame is garbage too.
    abandoned = START_BYTE + good("ABANDONED-1").encode()[:40]
    trailing = b"\n\x1c\r\n"
    sent = len(before_first) + len(between) + len(abandoned) + len(trailing)
    garbage_before = plain.metric("safetynet_mllp_garbage_bytes_total")
    with connect(plain.port) as client:
        client.send(before_first + frame(good("G-1")))
        assert msa(client.ack()) == ("AA", "G-1")
        plain.accepted.append("G-1")
        # Pipelined: garbage, frame, abandoned frame, frame, in one write.
        client.send(between + frame(good("G-2")) + abandoned + frame(good("G-3")))
        assert msa(client.ack()) == ("AA", "G-2")
        assert msa(client.ack()) == ("AA", "G-3")
        plain.accepted += ["G-2", "G-3"]
        client.send(trailing)
        client.sock.shutdown(socket.SHUT_WR)
        assert client.until_closed(5) == b""
    assert plain.metric("safetynet_mllp_garbage_bytes_total") == garbage_before + sent
    assert plain.inbox("ABANDONED-1") == []
    plain.assert_up()


# --- 4. slow and idle senders ----------------------------------------------------------------


def test_trickling_sender_is_cut_off_at_the_read_timeout(plain: Served) -> None:
    data = frame(good("SLOW-1"))
    read_timeouts = plain.metric("safetynet_mllp_timeouts_total", 'kind="read"')
    received = b""
    with connect(plain.port) as client:
        client.send(data[:1])
        started = time.monotonic()
        closed_at = None
        for byte in data[1:]:  # two bytes a second
            assert time.monotonic() - started < READ_TIMEOUT + 3 * MARGIN, "never cut off"
            try:
                client.send(bytes([byte]))
                client.sock.settimeout(0.5)
                received = client.sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                pass
            closed_at = time.monotonic()
            break
    assert received == b"", "no ACK for a message never completed"
    assert closed_at is not None
    assert READ_TIMEOUT - 0.25 <= closed_at - started <= READ_TIMEOUT + MARGIN
    assert plain.metric("safetynet_mllp_timeouts_total", 'kind="read"') == read_timeouts + 1
    assert plain.inbox("SLOW-1") == []
    plain.assert_up()


def test_idle_connection_is_closed_after_the_idle_timeout(plain: Served) -> None:
    idle_timeouts = plain.metric("safetynet_mllp_timeouts_total", 'kind="idle"')
    garbage_before = plain.metric("safetynet_mllp_garbage_bytes_total")
    noise = b"\r\n\x1c\r\n"  # keep-alive noise is not a frame: it does not keep a connection
    with connect(plain.port) as client:
        plain.accept(client, "IDLE-1")
        started = time.monotonic()
        client.send(noise)
        assert client.until_closed(IDLE_TIMEOUT + 3 * MARGIN) == b""
        elapsed = time.monotonic() - started
    assert IDLE_TIMEOUT - 0.25 <= elapsed <= IDLE_TIMEOUT + MARGIN
    text = plain.serve.metrics()
    assert metric(text, "safetynet_mllp_timeouts_total", 'kind="idle"') == idle_timeouts + 1
    # Garbage skipped before the connection timed out is still reported.
    assert metric(text, "safetynet_mllp_garbage_bytes_total") == garbage_before + len(noise)
    plain.assert_up()


# --- 5. connection limit ---------------------------------------------------------------------


def test_connections_past_the_limit_are_closed_at_once(plain: Served) -> None:
    wait_for(
        lambda: plain.metric("safetynet_mllp_connections") == 0,
        what="earlier connections closed",
    )
    refused = plain.metric("safetynet_mllp_connections_refused_total")
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(plain.port)) for _ in range(MAX_CONNECTIONS)]
        for n, client in enumerate(clients):
            plain.accept(client, f"CONN-A{n}")
        assert plain.metric("safetynet_mllp_connections") == MAX_CONNECTIONS
        with connect(plain.port) as extra:
            started = time.monotonic()
            assert extra.until_closed(IDLE_TIMEOUT + MARGIN) == b""
            # At once, not by the idle timeout.
            assert time.monotonic() - started < IDLE_TIMEOUT / 2
        assert plain.metric("safetynet_mllp_connections_refused_total") == refused + 1
        for n, client in enumerate(clients):
            plain.accept(client, f"CONN-B{n}")
        clients[0].sock.close()
        wait_for(
            lambda: plain.metric("safetynet_mllp_connections") == MAX_CONNECTIONS - 1,
            what="the closed connection released",
        )
        with connect(plain.port) as client:
            plain.accept(client, "CONN-C")
    plain.assert_up()


# --- 8. acknowledgement modes, 9. unsupported types (default: reject) ------------------------


def test_enhanced_mode_follows_msh_15(plain: Served) -> None:
    with connect(plain.port) as client:
        # ER: an accept is not answered at all; the connection goes on.
        client.send(frame(good("ENH-ER-1", "|||ER|NE")))
        plain.accepted.append("ENH-ER-1")
        plain.accept(client, "ENH-NEXT-1")
        # ER: an error is answered (CE).
        bad = good("ENH-ER-BAD", "|||ER|NE").replace("20080313", "2008-03-13")
        assert msa(client.exchange(bad)) == ("CE", "ENH-ER-BAD")
        # AL: every answer, in enhanced codes.
        assert msa(client.exchange(good("ENH-AL-1", "|||AL|NE"))) == ("CA", "ENH-AL-1")
        plain.accepted.append("ENH-AL-1")
    # Stored (and committed before the next message was answered), though not answered.
    assert [sender for sender, _ in plain.inbox("ENH-ER-1")] == [SENDER]


SIU = (
    "MSH|^~\\&|SCHED|RX1|SAFETYNET|RX1|20080501113005||SIU^S12^SIU_S12|{id}|P|2.5\r"
    "SCH|APT-1|APT-1\r"
    "PID|1||RX1000999^^^RX1^MR||Testperson^Sam||20000101|F"
)


def test_unsupported_type_is_rejected_by_default(plain: Served) -> None:
    with connect(plain.port) as client:
        ack = client.exchange(SIU.format(id="SIU-R1"))
    assert msa(ack) == ("AR", "SIU-R1")
    err = next(s for s in ack.decode().split("\r") if s.startswith("ERR|"))
    # v2.5 form: ERR-3 is the HL7 table 0357 code (CWE), ERR-1 is empty.
    fields = err.split("|")
    assert fields[1] == "" and fields[3].split("^")[0] == "200", err
    assert [state for _, state in plain.inbox("SIU-R1")] == ["unsupported"]


# --- 7. nothing acknowledged is lost ---------------------------------------------------------


def test_every_accepted_message_is_stored_once_and_processed(plain: Served) -> None:
    with connect(plain.port) as client:
        plain.accept(client, "FINAL-1")
    accepted = plain.accepted
    assert len(accepted) == len(set(accepted)) and "FINAL-1" in accepted

    def all_processed() -> bool:
        return all(plain.inbox(c) == [(SENDER, "processed")] for c in accepted)

    wait_for(all_processed, timeout=20, what="every accepted message processed")
    for control_id in accepted:
        assert plain.inbox(control_id) == [(SENDER, "processed")], control_id
    plain.assert_up()
    assert plain.metric("safetynet_inbox_backlog") == 0


# --- 6. TLS, 9. --unsupported accept ---------------------------------------------------------


@dataclass
class Pki:
    ca: trustme.CA
    cert: Path
    key: Path
    ca_pem: Path

    def client_context(self, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if cert is not None:
            cert.configure_cert(context)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_pem = root / "server.pem", root / "server.key", root / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_pem))
    return Pki(ca, cert, key, ca_pem)


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[tuple[Served, Served]]:
    """A TLS service that accepts unsupported types, and one that requires client certs."""
    tls_root, mtls_root = tmp_path_factory.mktemp("tls"), tmp_path_factory.mktemp("mtls")
    cert = ("--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
    tls = ServeProcess(
        f"sqlite:///{tls_root / 'sn.db'}",
        tls_root / "serve.log",
        *LIMITS,
        *cert,
        "--unsupported",
        "accept",
    )
    mtls = ServeProcess(
        f"sqlite:///{mtls_root / 'sn.db'}",
        mtls_root / "serve.log",
        *LIMITS,
        *cert,
        "--tls-client-ca",
        str(pki.ca_pem),
    )
    try:
        _start(tls, mtls)
        yield Served(tls, tls_root / "sn.db"), Served(mtls, mtls_root / "sn.db")
    finally:
        for serve in (tls, mtls):
            serve.__exit__(None, None, None)


def _refused(port: int, context: ssl.SSLContext | None, message: str) -> bytes:
    """What a client that should be refused gets back for one message (b"" when nothing)."""
    try:
        with connect(port, context) as client:
            client.send(frame(message))
            return client.until_closed(5)
    except (ssl.SSLError, ConnectionError):
        return b""


def test_tls_listener(tls_pair: tuple[Served, Served], pki: Pki) -> None:
    tls, _ = tls_pair
    with connect(tls.port, pki.client_context()) as client:
        tls.accept(client, "TLS-1")
        assert isinstance(client.sock, ssl.SSLSocket) and client.sock.version() in (
            "TLSv1.2",
            "TLSv1.3",
        )
    # Plain MLLP on the TLS port: no ACK, and nothing stored.
    assert b"MSA" not in _refused(tls.port, None, good("PLAIN-1"))
    tls.assert_up()
    with connect(tls.port, pki.client_context()) as client:
        tls.accept(client, "TLS-2")
    wait_for(
        lambda: all(tls.inbox(c) == [(SENDER, "processed")] for c in ("TLS-1", "TLS-2")),
        what="TLS messages processed",
    )
    assert tls.inbox("PLAIN-1") == []


def test_mutual_tls_requires_a_trusted_client_certificate(
    tls_pair: tuple[Served, Served], pki: Pki
) -> None:
    _, mtls = tls_pair
    assert b"MSA" not in _refused(mtls.port, pki.client_context(), good("NOCERT-1"))
    stranger = trustme.CA().issue_cert("intruder@example.org")
    assert b"MSA" not in _refused(mtls.port, pki.client_context(stranger), good("STRANGER-1"))
    mtls.assert_up()
    trusted = pki.ca.issue_cert("integration-engine@example.org")
    with connect(mtls.port, pki.client_context(trusted)) as client:
        mtls.accept(client, "MTLS-1")
    assert mtls.inbox("NOCERT-1") == [] and mtls.inbox("STRANGER-1") == []
    assert mtls.inbox("MTLS-1")[0][0] == SENDER


def test_unsupported_accept_answers_aa_and_keeps_it(
    tls_pair: tuple[Served, Served], pki: Pki
) -> None:
    tls, _ = tls_pair
    with connect(tls.port, pki.client_context()) as client:
        ack = client.exchange(SIU.format(id="SIU-A1"))
    assert msa(ack) == ("AA", "SIU-A1") and b"ERR|" not in ack
    assert tls.inbox("SIU-A1") == [("SCHED^RX1", "unsupported")]

"""A real `safetynet serve` process for tests: real sockets, real database, real signals.

`ServeProcess` starts the command line (`python -m adapters.cli serve ...`) on free ports,
waits until /readyz answers, and can stop it cleanly (SIGTERM) or kill it (SIGKILL). Its
JSON log goes to a file the test can read.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
START_BYTE, END_BYTES = b"\x0b", b"\x1c\x0d"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServeProcess:
    """One `safetynet serve` process."""

    def __init__(
        self,
        db_url: str,
        log_path: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        instance: str = "",
    ) -> None:
        self.db_url = db_url
        self.log_path = log_path
        self.extra = list(extra)
        self.env = env or {}
        self.instance = instance
        self.mllp_port = free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The command line that starts it."""
        cmd = [
            sys.executable,
            "-m",
            "adapters.cli",
            "serve",
            "--db",
            self.db_url,
            "--mllp-host",
            "127.0.0.1",
            "--mllp-port",
            str(self.mllp_port),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            "--poll-interval",
            "0.1",
            "--lease-ttl",
            "2",
            *self.extra,
        ]
        if self.instance:
            cmd += ["--instance", self.instance]
        return cmd

    def start(self, wait_ready: bool = True, timeout: float = 30.0) -> ServeProcess:
        """Start it; by default wait until /readyz says ready (processor up)."""
        env = {**os.environ, **self.env}
        env.pop("SAFETYNET_DB", None)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill() takes the worker too
        )
        log.close()
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """The /readyz status code and body."""
        answer = httpx.get(f"http://127.0.0.1:{self.http_port}/readyz", timeout=2)
        return answer.status_code, answer.json()

    def wait_ready(self, timeout: float = 30.0, processor: str | None = None) -> dict[str, Any]:
        """Wait for /readyz 200 (and, if given, this processor state)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                code, body = self.readyz()
                last = body
                if code == 200 and (processor is None or _processor(body) == processor):
                    return body
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.05)
        raise AssertionError(f"serve not ready after {timeout}s: {last}\n{self.log()}")

    def metrics(self) -> str:
        """The /metrics text."""
        return httpx.get(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5).text

    def log(self) -> str:
        """Everything it logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        """Its JSON log records (lines that are not JSON are skipped)."""
        out = []
        for line in self.log().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def terminate(self, timeout: float = 40.0) -> int:
        """SIGTERM, and wait for it to exit; its exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the whole process group (listener and worker): a power cut."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.terminate()
            except subprocess.TimeoutExpired:
                self.kill()


def _processor(body: dict[str, Any]) -> str:
    detail = body.get("detail", body)
    return str(detail.get("processor", ""))


def mllp_exchange(port: int, messages: Sequence[bytes | str], timeout: float = 10.0) -> list[bytes]:
    """Send messages lock-step on one connection; the ACK payloads, in order."""
    acks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for message in messages:
            data = message.encode() if isinstance(message, str) else message
            sock.sendall(START_BYTE + data + END_BYTES)
            acks.append(read_frame(sock))
    return acks


def read_frame(sock: socket.socket) -> bytes:
    """Read one MLLP frame's payload from a socket."""
    buffer = b""
    while END_BYTES not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed after {buffer!r}")
        buffer += chunk
    start = buffer.index(START_BYTE)
    return buffer[start + 1 : buffer.index(END_BYTES)]


def msa(ack: bytes) -> tuple[str, str]:
    """(MSA-1, MSA-2) of an ACK."""
    for segment in ack.decode().replace("\n", "\r").split("\r"):
        if segment.startswith("MSA"):
            fields = segment.split(segment[3])
            return fields[1], fields[2] if len(fields) > 2 else ""
    raise AssertionError(f"no MSA in {ack!r}")


# Rules whose Tasks depend on the processing clock passing a moment no message marks (an
# overdue report, a review window, an escalation step, a grace time). The live worker moves
# its clock to the wall clock whenever the inbox is drained, by design: sent old traffic
# with gaps, it then judges those moments as passed, where a replay of the same traffic
# judges them by the next message's time. Tests comparing live processing with a replay
# switch these off; their timing is covered by their cases and tests/test_rules_*.py.
CLOCK_DRIVEN_RULES = (
    "final-report-overdue",
    "follow-up-skeletal-survey-due",
    "bruise-in-non-mobile-infant",
    "task-not-accepted",
    "result-identity-unresolved",
)


def message_time_rules(target: Path, settle_minutes: int | None = None) -> Path:
    """A copy of the bundled rules at `target` with CLOCK_DRIVEN_RULES switched off (and,
    optionally, another discharge settle time), for live-versus-replay comparisons."""
    import shutil

    from adapters.bootstrap import default_rules_dir

    shutil.copytree(default_rules_dir(), target)
    settings = target / "settings.toml"
    text = settings.read_text()
    if settle_minutes is not None:
        assert "settle_minutes = 15" in text
        text = text.replace("settle_minutes = 15", f"settle_minutes = {settle_minutes}")
    text += "".join(f'\n[rules.{rule}]\nstatus = "off"\n' for rule in CLOCK_DRIVEN_RULES)
    settings.write_text(text)
    return target

"""`safetynet serve` settings: flags, else environment (`SAFETYNET_<NAME>`), else a TOML config
file (`--config` or `SAFETYNET_CONFIG`, keys as the setting names, under `[serve]` or at the top),
else defaults. Read once, at start; `safetynet serve --help` lists every setting.
"""

from __future__ import annotations

import argparse
import os
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["OPTIONS", "ServeSettings", "add_serve_arguments", "load_serve_settings"]


def _default_rules() -> str:
    from adapters.bootstrap import default_rules_dir

    return str(default_rules_dir())


def _list(value: Any) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


def _seconds_or_none(value: Any) -> float | None:
    number = float(value)
    return None if number <= 0 else number


@dataclass(frozen=True)
class Option:
    """One setting: its name, how to read it from text, its default and what it means."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str = ""

    @property
    def env(self) -> str:
        """The environment variable that sets it."""
        return "SAFETYNET_" + self.name.upper()

    @property
    def flag(self) -> str:
        """The command-line flag that sets it."""
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option(
        "db",
        str,
        "sqlite:///var/safetynet.db",
        "database URL: sqlite:///path or postgresql://user@host/db (psycopg 3)",
        "URL",
    ),
    Option("rules", str, None, "rules folder (default: the bundled rules/)", "DIR"),
    Option("mllp_host", str, "0.0.0.0", "MLLP listen address", "HOST"),
    Option("mllp_port", int, 2575, "MLLP listen port (0: any free port)", "PORT"),
    Option(
        "http_host", str, "0.0.0.0", "HTTP listen address (/healthz, /readyz, /metrics)", "HOST"
    ),
    Option("http_port", int, 8080, "HTTP listen port (0: any free port)", "PORT"),
    Option(
        "max_message_bytes",
        int,
        16 * 1024 * 1024,
        "largest message accepted; a larger one "
        "is read to its end, answered AE and its head kept in quarantine",
        "BYTES",
    ),
    Option(
        "idle_timeout",
        _seconds_or_none,
        600.0,
        "close a connection idle this long between messages (0: never)",
        "SECONDS",
    ),
    Option(
        "read_timeout",
        _seconds_or_none,
        60.0,
        "close a connection that takes longer than "
        "this to send one message once started (0: never)",
        "SECONDS",
    ),
    Option("max_connections", int, 100, "MLLP connections at once; more are closed at once", "N"),
    Option(
        "tls_cert", str, None, "PEM certificate: MLLP over TLS when set (with --tls-key)", "FILE"
    ),
    Option("tls_key", str, None, "PEM private key of --tls-cert", "FILE"),
    Option(
        "tls_client_ca",
        str,
        None,
        "PEM CA bundle: require client certificates signed by it",
        "FILE",
    ),
    Option(
        "unsupported",
        str,
        "reject",
        "answer to a message type safetynet does not handle: "
        "reject (AR/CR) or accept (AA/CA, kept and ignored)",
        "reject|accept",
    ),
    Option(
        "processing_ids",
        _list,
        ("P",),
        "MSH-11 processing ids accepted, comma-separated (empty: any); others are answered AR",
        "IDS",
    ),
    Option(
        "versions",
        _list,
        (),
        "MSH-12 versions accepted, comma-separated (empty: any version the reader can read)",
        "VERSIONS",
    ),
    Option(
        "max_attempts",
        int,
        3,
        "times a message may crash or fail the processor before it is quarantined for review",
        "K",
    ),
    Option("batch", int, 200, "messages the processor takes per transaction", "N"),
    Option(
        "poll_interval",
        float,
        0.5,
        "how often the processor looks for work it was not told "
        "of (messages taken by another instance)",
        "SECONDS",
    ),
    Option(
        "lease_ttl",
        float,
        10.0,
        "processor lease time to live: a stopped instance's processor is taken over within this",
        "SECONDS",
    ),
    Option("instance", str, None, "this instance's name in the lease (default host:pid)", "NAME"),
    Option(
        "outbox",
        _list,
        (),
        "Task destinations, comma-separated: fhir=BASE_URL, webhook=URL, or name:kind=URL",
        "SPECS",
    ),
    Option(
        "webhook_secret",
        str,
        None,
        "HMAC-SHA256 key signing webhook bodies (X-Safetynet-Signature)",
        "SECRET",
    ),
    Option(
        "outbox_alert_after",
        int,
        5,
        "failed attempts after which a delivery counts as failing (alert metric)",
        "N",
    ),
    Option(
        "feed_silence_alarm",
        float,
        3600.0,
        "raise the silent-feed alarm for a sender silent this long (0: off)",
        "SECONDS",
    ),
    Option("log_level", str, "INFO", "DEBUG, INFO, WARNING or ERROR", "LEVEL"),
)


@dataclass(frozen=True)
class ServeSettings:
    """The service's settings, resolved (see the module docstring for the order)."""

    db: str
    rules: str
    mllp_host: str
    mllp_port: int
    http_host: str
    http_port: int
    max_message_bytes: int
    idle_timeout: float | None
    read_timeout: float | None
    max_connections: int
    tls_cert: str | None
    tls_key: str | None
    tls_client_ca: str | None
    unsupported: str
    processing_ids: tuple[str, ...]
    versions: tuple[str, ...]
    max_attempts: int
    batch: int
    poll_interval: float
    lease_ttl: float
    instance: str
    outbox: tuple[str, ...]
    webhook_secret: str | None
    outbox_alert_after: int
    feed_silence_alarm: float
    log_level: str

    # The names `build_live_parts` reads.
    @property
    def db_url(self) -> str:
        """The database URL."""
        return self.db

    @property
    def rules_dir(self) -> str:
        """The rules folder."""
        return self.rules


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config` and one flag per setting (each defaulting to None: "not given")."""
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file of settings (env SAFETYNET_CONFIG)"
    )
    for option in OPTIONS:
        default = option.default
        if isinstance(default, tuple):
            default = ",".join(default) or "(empty)"
        elif default is None:
            default = "(not set)"
        parser.add_argument(
            option.flag,
            dest=option.name,
            metavar=option.metavar or None,
            default=None,
            help=f"{option.help} [env {option.env}; default {default}]",
        )


def _file_values(path: str) -> Mapping[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from exc
    values: Mapping[str, Any] = data.get("serve", data)
    known = {o.name for o in OPTIONS}
    unknown = sorted(set(values) - known - {"serve"})
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    return values


def load_serve_settings(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> ServeSettings:
    """Resolve every setting. Raises ValueError naming the setting and the bad value."""
    environ = os.environ if environ is None else environ
    given = vars(args) if args is not None else {}
    config_path = given.get("config") or environ.get("SAFETYNET_CONFIG")
    from_file = _file_values(config_path) if config_path else {}
    values: dict[str, Any] = {}
    for option in OPTIONS:
        for source, raw in (
            (option.flag, given.get(option.name)),
            (option.env, environ.get(option.env)),
            (f"{config_path} {option.name}", from_file.get(option.name)),
        ):
            if raw is not None:
                try:
                    values[option.name] = option.parse(raw)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{source}: {raw!r} is not valid: {exc}") from exc
                break
        else:
            values[option.name] = option.default
    if values["rules"] is None:
        values["rules"] = _default_rules()
    if values["instance"] is None:
        values["instance"] = f"{socket.gethostname()}:{os.getpid()}"
    if values["unsupported"] not in ("reject", "accept"):
        raise ValueError(f"unsupported: {values['unsupported']!r} must be reject or accept")
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ValueError("tls_cert and tls_key must be given together")
    names = {f.name for f in fields(ServeSettings)}
    return ServeSettings(**{k: v for k, v in values.items() if k in names})

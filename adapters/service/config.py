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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters.service.auth import JwtSettings

__all__ = [
    "OPTIONS",
    "ServeSettings",
    "add_serve_arguments",
    "jwt_settings",
    "load_serve_settings",
]


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
        "http_host",
        str,
        "0.0.0.0",
        "HTTP listen address (/fhir, /healthz, /readyz, /metrics, /openapi.json)",
        "HOST",
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
    Option(
        "fhir_source",
        str,
        None,
        "base URL of the FHIR server whose Subscription notifications arrive (id-only "
        "notifications are read from it, gaps recovered with $status/$events)",
        "URL",
    ),
    Option(
        "fhir_source_token",
        str,
        None,
        "bearer token sent to --fhir-source (if it needs one)",
        "TOKEN",
    ),
    Option(
        "fhir_source_timeout",
        float,
        10.0,
        "seconds per request to --fhir-source before the notification is answered 503",
        "SECONDS",
    ),
    Option(
        "task_wait",
        float,
        10.0,
        "seconds a Task status change waits for the processor before it is answered 202 "
        "(queued) instead of 200 with the changed Task",
        "SECONDS",
    ),
    Option(
        "public_base_url",
        str,
        None,
        "public base URL of /fhir for links and Locations (default: from the request)",
        "URL",
    ),
    Option(
        "jwks_url",
        str,
        None,
        "accept JWT bearer tokens signed by a key of this JSON Web Key Set (http or https; "
        "with --jwt-issuer and --jwt-audience); unset: safetynet tokens only",
        "URL",
    ),
    Option("jwt_issuer", str, None, "the `iss` a JWT must carry", "ISSUER"),
    Option("jwt_audience", str, None, "the `aud` a JWT must carry (this service)", "AUDIENCE"),
    Option(
        "jwt_roles_claim",
        str,
        "roles",
        "the JWT claim holding safetynet roles (dotted for nested: realm_access.roles)",
        "CLAIM",
    ),
    Option(
        "jwt_scope_prefix",
        str,
        "safetynet/",
        "a JWT scope <prefix><role> grants the role (empty: scopes grant nothing)",
        "PREFIX",
    ),
    Option(
        "jwt_practitioner_claim",
        str,
        "fhirUser",
        "the JWT claim naming the Task owner id a clinician acts as (Practitioner/C9001)",
        "CLAIM",
    ),
    Option(
        "jwt_algorithms",
        _list,
        ("RS256", "ES256"),
        "JWT signature algorithms accepted, comma-separated (asymmetric only)",
        "ALGS",
    ),
    Option(
        "jwks_cache",
        float,
        300.0,
        "seconds a fetched JWKS is used before it is fetched again",
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
    fhir_source: str | None
    fhir_source_token: str | None
    fhir_source_timeout: float
    task_wait: float
    public_base_url: str | None
    jwks_url: str | None
    jwt_issuer: str | None
    jwt_audience: str | None
    jwt_roles_claim: str
    jwt_scope_prefix: str
    jwt_practitioner_claim: str
    jwt_algorithms: tuple[str, ...]
    jwks_cache: float
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
    if values["fhir_source_timeout"] <= 0:
        raise ValueError(f"fhir_source_timeout: {values['fhir_source_timeout']!r} must be > 0")
    if values["task_wait"] < 0:
        raise ValueError(f"task_wait: {values['task_wait']!r} must be 0 or more seconds")
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ValueError("tls_cert and tls_key must be given together")
    names = {f.name for f in fields(ServeSettings)}
    settings = ServeSettings(**{k: v for k, v in values.items() if k in names})
    jwt_settings(settings)  # a JWT setup that cannot work fails here, at start
    return settings


def jwt_settings(settings: ServeSettings) -> JwtSettings | None:
    """How the API accepts JWTs (None: no --jwks-url, safetynet tokens only). Raises
    ValueError naming what is missing or wrong."""
    jwt_names = ("jwt_issuer", "jwt_audience")
    if not settings.jwks_url:
        given = [name for name in jwt_names if getattr(settings, name)]
        if given:
            raise ValueError(f"{', '.join(given)} given without jwks_url")
        return None
    from adapters.service.auth import JwtSettings

    try:
        return JwtSettings(
            jwks_url=settings.jwks_url,
            issuer=settings.jwt_issuer or "",
            audience=settings.jwt_audience or "",
            roles_claim=settings.jwt_roles_claim,
            scope_prefix=settings.jwt_scope_prefix,
            practitioner_claim=settings.jwt_practitioner_claim,
            algorithms=settings.jwt_algorithms,
            jwks_cache_seconds=settings.jwks_cache,
        )
    except ValueError as exc:
        raise ValueError(f"jwks_url: {exc}") from exc

"""`safetynet serve` settings: flags over environment over config file over defaults; errors
name the setting and where the bad value came from; the README and --help list every one."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from adapters.cli import main as cli_main
from adapters.service.config import OPTIONS, add_serve_arguments, load_serve_settings

ROOT = Path(__file__).resolve().parents[1]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults() -> None:
    settings = load_serve_settings(_args(), environ={})
    assert settings.db == "sqlite:///var/safetynet.db"
    assert (settings.mllp_port, settings.http_port) == (2575, 8080)
    assert settings.max_message_bytes == 16 * 1024 * 1024
    assert settings.processing_ids == ("P",)
    assert settings.unsupported == "reject"
    assert settings.outbox == ()
    assert Path(settings.rules).name == "rules"


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text(
        '[serve]\nmllp_port = 3000\nhttp_port = 3001\nbatch = 7\noutbox = ["fhir=http://a"]\n'
    )
    env = {
        "SAFETYNET_CONFIG": str(config),
        "SAFETYNET_HTTP_PORT": "4001",
        "SAFETYNET_MLLP_PORT": "4000",
    }
    settings = load_serve_settings(_args("--mllp-port", "5000"), environ=env)
    assert settings.mllp_port == 5000  # flag
    assert settings.http_port == 4001  # environment
    assert settings.batch == 7  # file
    assert settings.outbox == ("fhir=http://a",)  # a TOML list
    assert settings.idle_timeout == 600.0  # default


def test_lists_and_zero_timeouts_from_text() -> None:
    env = {
        "SAFETYNET_PROCESSING_IDS": "P, T",
        "SAFETYNET_IDLE_TIMEOUT": "0",
        "SAFETYNET_VERSIONS": "",
    }
    settings = load_serve_settings(_args(), environ=env)
    assert settings.processing_ids == ("P", "T")
    assert settings.idle_timeout is None  # 0: never
    assert settings.versions == ()


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--mllp-port", "many"], {}, "--mllp-port: 'many' is not valid"),
        ([], {"SAFETYNET_BATCH": "x"}, "SAFETYNET_BATCH: 'x' is not valid"),
        (["--unsupported", "maybe"], {}, "must be reject or accept"),
        (["--tls-cert", "c.pem"], {}, "tls_cert and tls_key must be given together"),
        (["--task-wait", "-1"], {}, "task_wait: -1.0 must be 0 or more"),
        (["--jwks-url", "https://idp.example/jwks"], {}, "jwks_url: JWT validation needs"),
        (["--jwt-audience", "safetynet"], {}, "jwt_audience given without jwks_url"),
        (
            ["--jwks-url", "https://i/jwks", "--jwt-issuer", "i", "--jwt-audience", "a"],
            {"SAFETYNET_JWT_ALGORITHMS": "HS256"},
            "must be asymmetric",
        ),
    ],
)
def test_bad_values_name_the_setting(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_serve_settings(_args(*argv), environ=env)


def test_config_file_problems_name_the_file(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text("mllp_prot = 1\n")
    with pytest.raises(ValueError, match=r"serve.toml: unknown setting\(s\) mllp_prot"):
        load_serve_settings(_args("--config", str(config)), environ={})
    config.write_text("mllp_port = \n")
    with pytest.raises(ValueError, match=r"serve\.toml: not valid TOML"):
        load_serve_settings(_args("--config", str(config)), environ={})
    with pytest.raises(ValueError, match=r"missing\.toml: cannot be read"):
        load_serve_settings(_args("--config", str(tmp_path / "missing.toml")), environ={})


def test_cli_reports_a_bad_setting_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["serve", "--max-connections", "lots"]) == 2
    assert "--max-connections: 'lots' is not valid" in capsys.readouterr().err


def test_help_and_readme_list_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    readme = (ROOT / "README.md").read_text()
    for option in OPTIONS:
        assert option.flag in help_text and option.env in help_text.replace("- ", "-")
        assert f"`{option.flag}` / `{option.env}`" in readme, f"README lacks {option.flag}"

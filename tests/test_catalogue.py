"""Loading the rule catalogue: site overrides, and errors that name the file and the problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.catalogue import load_catalogue
from engine.errors import ConfigurationError

RULES = Path(__file__).resolve().parents[1] / "rules"


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(RULES, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_defaults_and_site_overrides_say_where_each_value_came_from(rules: Path) -> None:
    settings = rules / "settings.toml"
    settings.write_text(
        settings.read_text()
        + '\n[rules.imaging-pending-at-discharge]\nstatus = "shadow"\nmax_age_months = 12\n'
    )
    catalogue = load_catalogue(rules)
    rule = catalogue.rule("imaging-pending-at-discharge")
    assert (rule.status, rule.status_source) == ("shadow", "site")
    assert (rule.parameters["max_age_months"].value, rule.parameters["max_age_months"].source) == (
        12,
        "site",
    )
    assert rule.parameters["ack_hours"].source == "default"
    assert rule.uri == "urn:safetynet:rule:imaging-pending-at-discharge|1.0.0"
    assert catalogue.site.settle_minutes == 15
    assert catalogue.site.place("PAEDED", "E") == "the paediatric emergency department"
    assert catalogue.site.place("XYZ", "E") == "the emergency department"


@pytest.mark.parametrize(
    ("addition", "message"),
    [
        (
            '[rules.imaging-pending-at-discharge]\nstatus = "maybe"\n',
            "status 'maybe' is not one of",
        ),
        ('[rules.imaging-pending-at-discharge]\nmax_age_months = "24"\n', "must be int"),
        ("[rules.imaging-pending-at-discharge]\nmax_age = 24\n", "unknown parameters ['max_age']"),
        ('[rules.no-such-rule]\nstatus = "off"\n', "no rule folder for ['no-such-rule']"),
        ("this is = = not toml\n", "invalid TOML"),
    ],
)
def test_a_wrong_setting_names_the_file_and_the_problem(
    rules: Path, addition: str, message: str
) -> None:
    settings = rules / "settings.toml"
    settings.write_text(settings.read_text() + "\n" + addition)
    with pytest.raises(ConfigurationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_catalogue(rules)


def test_a_broken_rule_folder_names_the_file(rules: Path) -> None:
    (rules / "report-final-after-discharge" / "rule.py").write_text("def conditions(p, s): ...\n")
    with pytest.raises(ConfigurationError, match=r"rule\.py: defines no function recall_task"):
        load_catalogue(rules)
    (rules / "report-final-after-discharge" / "rule.toml").write_text('id = "other"\n')
    with pytest.raises(ConfigurationError, match=r"rule\.toml: missing 'title'"):
        load_catalogue(rules)


def test_the_pool_is_required_so_no_task_is_ever_ownerless(rules: Path) -> None:
    settings = rules / "settings.toml"
    settings.write_text(settings.read_text().replace('id = "SAFETYNET-RESULTS-POOL"', ""))
    with pytest.raises(ConfigurationError, match="no Task is ever ownerless"):
        load_catalogue(rules)


def test_a_rule_switched_off_is_not_evaluated(rules: Path) -> None:
    settings = rules / "settings.toml"
    settings.write_text(
        settings.read_text() + '\n[rules.report-final-after-discharge]\nstatus = "off"\n'
    )
    catalogue = load_catalogue(rules)
    assert [r.id for r in catalogue.evaluated] == ["imaging-pending-at-discharge"]

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
    evaluated = {r.id for r in catalogue.evaluated}
    assert "report-final-after-discharge" not in evaluated
    assert evaluated == {r.id for r in catalogue.rules if r.status != "off"}
    assert "imaging-pending-at-discharge" in evaluated


def test_a_hard_limit_cannot_be_exceeded_by_a_site(rules: Path) -> None:
    card = rules / "imaging-pending-at-discharge" / "rule.toml"
    card.write_text(
        card.read_text().replace("[parameters.ack_hours]\n", "[parameters.ack_hours]\nmax = 72\n")
    )
    settings = rules / "settings.toml"
    base = settings.read_text()
    settings.write_text(base + "\n[rules.imaging-pending-at-discharge]\nack_hours = 72\n")
    rule = load_catalogue(rules).rule("imaging-pending-at-discharge")
    assert (rule.parameters["ack_hours"].value, rule.parameters["ack_hours"].maximum) == (72, 72)
    settings.write_text(base + "\n[rules.imaging-pending-at-discharge]\nack_hours = 96\n")
    with pytest.raises(ConfigurationError, match="ack_hours = 96 exceeds its hard limit 72"):
        load_catalogue(rules)


def test_the_directory_names_teams_and_roles_and_falls_back_to_the_pool(rules: Path) -> None:
    site = load_catalogue(rules).site
    lead = site.directory.team_lead("C1001")
    assert lead is not None and lead[0].id == "C9001"
    assert site.directory.team_lead("C9001") is None  # the lead has no lead above them
    holder, is_pool = site.directory.role("safeguarding-lead", site.pool)
    assert (holder.id, is_pool) == ("SAFEGUARDING-TEAM", True)
    directory = rules / "directory.toml"
    text = directory.read_text()
    directory.write_text(
        text.replace(
            '[roles.on-call-lead]\nid = "C9100"\nname = "Dr C9100 (on-call paediatric lead)"\n', ""
        )
    )
    without = load_catalogue(rules).site
    # Nobody holds the role: the site's pool owns what would have gone to it.
    assert without.directory.role("on-call-lead", without.pool) == (without.pool, True)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t + '\n[roles.chief-wizard]\nid = "X"\n', "unknown role 'chief-wizard'"),
        (lambda t: t + '\n[clinicians.C7]\nteam = "nowhere"\n', "names unknown team 'nowhere'"),
        (lambda t: t + "\n[roles.identity-pool]\nname = 'x'\n", "invalid TOML|needs an id"),
    ],
)
def test_a_wrong_directory_names_the_file_and_the_problem(
    rules: Path, edit: object, message: str
) -> None:
    directory = rules / "directory.toml"
    assert callable(edit)
    directory.write_text(edit(directory.read_text()))
    with pytest.raises(ConfigurationError, match=f"directory.toml.*({message})"):
        load_catalogue(rules)


def test_rules_list_shows_each_rule_its_status_and_where_each_value_came_from(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from adapters.cli import main

    settings = rules / "settings.toml"
    settings.write_text(
        settings.read_text()
        + '\n[rules.imaging-pending-at-discharge]\nstatus = "shadow"\nmax_age_months = 12\n'
    )
    assert main(["rules", "list", "--rules", str(rules)]) == 0
    text = capsys.readouterr().out
    block = text[text.index("imaging-pending-at-discharge  v1.0.0") :]
    assert block.startswith("imaging-pending-at-discharge  v1.0.0  shadow (site)\n")
    assert "  max_age_months = 12 months (site override)\n" in block
    assert "  ack_hours = 24 hours (default)\n" in block
    catalogue = load_catalogue(rules)
    assert all(f"{r.id}  v{r.version}  {r.status}" in text for r in catalogue.rules)
    assert main(["rules", "list", "--rules", str(rules / "nowhere")]) == 2
    assert "rules folder not found" in capsys.readouterr().err


def test_the_readme_rules_table_is_in_step_with_the_catalogue() -> None:
    readme = (RULES.parent / "README.md").read_text()
    catalogue = load_catalogue(RULES)
    rows = {
        line.split("|")[2].strip(" `"): line
        for line in readme.splitlines()
        if line.startswith("| ") and line.count("|") == 6 and "`" in line.split("|")[2]
    }
    assert set(rows) == {r.id for r in catalogue.rules}
    for rule in catalogue.rules:
        row = rows[rule.id]
        assert f"| {rule.version} | {rule.status} |" in row, rule.id
        for p in rule.parameters.values():
            assert f"`{p.name}` {p.default}" in row, f"{rule.id}: {p.name}"


def test_a_shadow_rules_tasks_are_listed_as_shadow(
    rules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from adapters.cli import main

    settings = rules / "settings.toml"
    settings.write_text(
        settings.read_text() + '\n[rules.discrepancy-after-discharge]\nstatus = "shadow"\n'
    )
    derby = RULES.parent / "tests" / "fixtures" / "hl7v2" / "derby"
    assert main(["replay", str(derby), "--rules", str(rules), "--format", "text"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("3 task(s), 1 of them shadow (recorded, never delivered)\n")
    assert "discrepancy-after-discharge-" in text
    shadow_lines = [line for line in text.splitlines() if line.endswith("SHADOW")]
    assert len(shadow_lines) == 1 and shadow_lines[0].startswith("discrepancy-after-discharge-")

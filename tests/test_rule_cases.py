"""Every rule's cases through the real engine, and the rule-folder contract (STYLE 7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.cases import load_case, rule_cases, run_case
from engine.catalogue import Catalogue, load_catalogue

RULES = Path(__file__).resolve().parents[1] / "rules"
CATALOGUE = load_catalogue(RULES)
CASES = [(rule_id, path) for rule_id, paths in rule_cases(CATALOGUE).items() for path in paths]


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return CATALOGUE


@pytest.mark.parametrize(("rule_id", "path"), CASES, ids=[f"{r}/{p.stem}" for r, p in CASES])
def test_case(rule_id: str, path: Path, catalogue: Catalogue) -> None:
    result = run_case(load_case(path, catalogue.site.timezone), catalogue)
    assert result.passed, f"{path.name}: " + "; ".join(result.problems)


@pytest.mark.parametrize("rule", CATALOGUE.rules, ids=lambda r: r.id)
def test_rule_folder_has_recall_and_no_recall_cases_and_readme(rule: object) -> None:
    from engine.catalogue import Rule

    assert isinstance(rule, Rule)
    kinds = {
        load_case(p, CATALOGUE.site.timezone).kind for p in (rule.path / "cases").glob("*.toml")
    }
    assert kinds == {"recall", "no-recall"}, f"{rule.id} needs both kinds of case, has {kinds}"
    readme = (rule.path / "README.md").read_text()
    assert "## Sources" in readme and "## Rationale" in readme
    for name in rule.parameters:
        assert f"`{name}`" in readme, f"{rule.id}/README.md does not document {name}"


def test_a_failing_case_says_what_was_missing_in_plain_words(
    tmp_path: Path, catalogue: Catalogue
) -> None:
    src = RULES / "imaging-pending-at-discharge" / "cases" / "no_recall_final_before_discharge.toml"
    folder = tmp_path / "imaging-pending-at-discharge" / "cases"
    folder.mkdir(parents=True)
    text = src.read_text().replace('kind = "no-recall"', 'kind = "recall"')
    text += (
        '\n[[expect]]\nrule = "imaging-pending-at-discharge"\norder = "ORD-1"\n'
        'priority = "urgent"\n'
    )
    case_path = folder / "wrong.toml"
    case_path.write_text(text)
    result = run_case(load_case(case_path, catalogue.site.timezone), catalogue)
    assert not result.passed
    assert result.problems == (
        "expected an urgent Task from imaging-pending-at-discharge for order ORD-1; "
        "none was raised",
    )

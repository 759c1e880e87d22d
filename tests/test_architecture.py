"""The shape DESIGN.md fixes: the engine's public surface, and what it may import."""

from __future__ import annotations

import ast
from pathlib import Path

import engine

ROOT = Path(__file__).resolve().parents[1]
FOREIGN = ("hl7apy", "hl7", "fhir", "sqlalchemy", "psycopg", "fastapi", "uvicorn", "adapters")


def test_engine_public_surface_is_pinned() -> None:
    assert sorted(engine.__all__) == [
        "AdmissionCancelled",
        "Applied",
        "Catalogue",
        "ClinicalNote",
        "Clinician",
        "Clock",
        "ConfigurationError",
        "DischargeCancelled",
        "EngineError",
        "Event",
        "Fact",
        "IdentityError",
        "ImagingOrdered",
        "InboundMessage",
        "InboxEntry",
        "LinkError",
        "OrderCancelled",
        "OrderChanged",
        "OrderRef",
        "Patient",
        "PatientAdmitted",
        "PatientDischarged",
        "PatientIdentifier",
        "PatientRegistered",
        "PatientTransferred",
        "PatientUpdated",
        "PatientsMerged",
        "Processor",
        "RecallTask",
        "ReportIssued",
        "Rule",
        "RuleEvaluationError",
        "SafeguardingFlagCleared",
        "SafeguardingFlagRaised",
        "SimulatedClock",
        "Site",
        "SourceRef",
        "StatusUpdate",
        "Store",
        "StoredTask",
        "TaskChange",
        "TaskRenderer",
        "TaskRestatus",
        "TaskStateError",
        "TaskStatusChanged",
        "UnitOfWork",
        "Visit",
        "WallClock",
        "is_valid_nhs_number",
        "load_catalogue",
        "task_identifier",
    ]
    for name in engine.__all__:
        assert hasattr(engine, name)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_engine_imports_no_wire_format_database_or_adapter_and_one_module_durable() -> None:
    users_of_durable = []
    for path in sorted((ROOT / "engine").glob("*.py")):
        imported = _imports(path)
        assert not imported & set(FOREIGN), f"{path.name} imports {imported & set(FOREIGN)}"
        if "durable" in imported:
            users_of_durable.append(path.name)
    assert users_of_durable == ["rulecore.py"]


def test_rule_folders_use_only_the_engine() -> None:
    for path in sorted((ROOT / "rules").glob("*/rule.py")):
        imported = _imports(path) - {"__future__", "collections", "datetime", "typing"}
        assert imported == {"engine"}, f"{path} imports {imported}"

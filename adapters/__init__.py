"""Adapters: every protocol and all I/O (HL7 v2, MLLP, FHIR, the database), and the one place
where the application is wired together. The engine never imports from here."""

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed safetynet version ("0+unknown" when run from an uninstalled tree)."""
    try:
        return version("safetynet")
    except PackageNotFoundError:
        return "0+unknown"

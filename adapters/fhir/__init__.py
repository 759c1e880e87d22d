"""FHIR R4 adapters (fhir.resources R4B models for R4 JSON)."""

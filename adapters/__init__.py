"""Adapters: every protocol and all I/O (HL7 v2, MLLP, FHIR, the database), and the one place
where the application is wired together. The engine never imports from here."""

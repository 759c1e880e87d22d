"""HL7 v2: the fast ER7 reader (er7) and, around it, ACKs and hl7apy-based diagnostics."""

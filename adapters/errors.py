"""Exceptions of the adapters layer, each carrying the HL7 ACK code it is answered with.

    AdapterError                 root; `reason`, `location` ("PID-3") and `ack_code`
     +-- Hl7ReadError            (adapters.hl7v2.er7) the ER7 reader's rejection: AR when the
     |                           header cannot be read, AE for a broken segment
     +-- MappingError            content that cannot be understood (AE): names segment-field
     +-- UnsupportedMessage      a message type or event safetynet does not handle (AR unless
                                 the site configures accept-and-ignore)

Engine errors (engine.errors) are translated to AE at the ingest boundary.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Root of the adapters' exceptions.

    `hl7_code` is the HL7 table 0357 error code an ACK's ERR segment carries for it."""

    ack_code = "AE"
    hl7_code = "207"  # application internal error

    def __init__(self, reason: str, location: str = "", hl7_code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.location = location
        if hl7_code is not None:
            self.hl7_code = hl7_code


class MappingError(AdapterError):
    """A message whose content cannot be mapped to canonical events."""

    ack_code = "AE"
    hl7_code = "102"  # data type error: a field holds what it must not


class UnsupportedMessage(AdapterError):
    """A message type or event that safetynet does not process (or a processing id or version
    the site does not accept: the raiser sets `hl7_code` 202 or 203)."""

    ack_code = "AR"
    hl7_code = "200"  # unsupported message type

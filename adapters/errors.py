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
    """Root of the adapters' exceptions."""

    ack_code = "AE"

    def __init__(self, reason: str, location: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.location = location


class MappingError(AdapterError):
    """A message whose content cannot be mapped to canonical events."""

    ack_code = "AE"


class UnsupportedMessage(AdapterError):
    """A message type or event that safetynet does not process."""

    ack_code = "AR"

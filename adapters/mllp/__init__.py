"""MLLP (Minimal Lower Layer Protocol): framing of HL7 v2 messages on a TCP stream.

``framing`` is a pure bytes codec (0x0B <payload> 0x1C 0x0D) over asyncio streams; it knows
nothing about HL7. Reading the payload as HL7 (adapters.hl7v2.er7) and answering it
(adapters.hl7v2.ack) happen above this layer.
"""

"""Exceptions of the engine layer.

    EngineError                      root: anything the engine refuses to do
     +-- ConfigurationError          a rule folder or settings file is wrong (names the file)
     +-- RuleEvaluationError         the rule core could not evaluate a patient: fail closed,
     |                               the message stays unprocessed and a review item is kept
     +-- IdentityError               identifiers that cannot be resolved safely to one patient
     +-- LinkError                   a result that cannot be linked to an order or a patient
     +-- TaskStateError              a Task status change that is not allowed from its state

Foreign exceptions (durable_rules, TOML parsing) are translated at the module that meets them.
Each error carries `ack_code` ("AE": the content is wrong or cannot be acted on safely).
"""

from __future__ import annotations


class EngineError(Exception):
    """Root of the engine's exceptions."""

    ack_code = "AE"

    def __init__(self, reason: str, location: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.location = location


class ConfigurationError(EngineError):
    """A rule folder, rule.toml, case file or settings file is invalid."""


class RuleEvaluationError(EngineError):
    """The rule core could not evaluate; never read as "no task"."""


class IdentityError(EngineError):
    """The message's identifiers name different known patients."""


class LinkError(EngineError):
    """An order message names no known order and carries no patient to attach it to."""


class TaskStateError(EngineError):
    """A Task status change names no known Task, or is not allowed from its current status."""

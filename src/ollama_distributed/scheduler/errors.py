"""Typed planning errors; the API edge maps them to 4xx/503 responses."""

from __future__ import annotations


class SchedulerError(ValueError):
    """Base class of every planning error."""


class InfeasiblePlanError(SchedulerError):
    """The cluster cannot hold the model (for this strategy and workload).

    Attributes carry the numbers so that callers can show or log them without parsing the message.
    """

    def __init__(self, message: str, needed_bytes: int = 0, available_bytes: int = 0, strategy: str = "") -> None:
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        self.strategy = strategy


class ClusterSpecError(SchedulerError):
    """A cluster description is malformed (unknown node in a link, bad unit, duplicate name...)."""


class PlanFormatError(SchedulerError):
    """A serialised plan is malformed or does not cover the model exactly once."""

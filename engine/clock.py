"""Clocks: the wall clock for the live service, a simulated one for replay and backtest."""

from __future__ import annotations

from datetime import UTC, datetime


class WallClock:
    """The real time, in UTC."""

    def now(self) -> datetime:
        """The current wall-clock time."""
        return datetime.now(UTC)


class SimulatedClock:
    """Time that moves only when told to, and never backwards.

    Replay advances it to each message's event time, so timers fire as they would have live.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start

    def now(self) -> datetime:
        """The latest time reached; before any, the wall clock's (so it is always aware)."""
        return self._now if self._now is not None else datetime.now(UTC)

    @property
    def started(self) -> bool:
        """Whether the clock has been set at least once."""
        return self._now is not None

    def advance(self, to: datetime) -> datetime:
        """Move to `to` if it is later than now; returns the (possibly unchanged) time."""
        if self._now is None or to > self._now:
            self._now = to
        return self._now

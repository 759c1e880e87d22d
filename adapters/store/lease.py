"""A lease in the database: which service instance is the active processor.

Two `safetynet serve` instances on one PostgreSQL database both accept messages, but only the
lease holder processes the inbox, fires timers and delivers the outbox. The lease expires
unless renewed; another instance takes it over once it has expired.

Fencing: every processing transaction starts with `renew(uow)`, an UPDATE of the lease row that
names the holder *and* the epoch it acquired. The row lock it takes is held until that
transaction commits, so a takeover (an UPDATE of the same row) waits for it and then sees a
fresh expiry; and a holder that lost the lease while paused finds its epoch gone and rolls back
before writing anything. So no message is processed by two instances, whatever the timing.

Times come from this process's wall clock: instances must run NTP-synchronised clocks, with a
skew far below the lease's time to live (default 10 s).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite

from adapters.store import schema
from adapters.store.sql import SqlStore, SqlUnitOfWork

__all__ = ["Lease", "LeaseLost"]

_leases = schema.leases


class LeaseLost(Exception):
    """This instance no longer holds the lease: stop processing, roll back."""


class Lease:
    """One named lease, as seen by one would-be holder. Not thread-safe: one per worker."""

    def __init__(
        self,
        store: SqlStore,
        name: str,
        holder: str,
        ttl: float,
        now: Callable[[], datetime],
    ) -> None:
        self._store = store
        self.name = name
        self.holder = holder
        self._ttl = timedelta(seconds=ttl)
        self._now = now
        self.epoch: int | None = None  # set while held

    @property
    def held(self) -> bool:
        """Whether this holder believes it holds the lease (checked for real by `renew`)."""
        return self.epoch is not None

    def acquire(self) -> bool:
        """Take the lease if it is free, expired or already ours; True when held."""
        now = self._now()
        expires = now + self._ttl
        with self._store.begin() as uow:
            conn = uow.connection
            insert = (postgresql if self._store.dialect == "postgresql" else sqlite).insert
            conn.execute(
                insert(_leases)
                .values(
                    name=self.name, holder=self.holder, epoch=1, expires_at=expires, acquired_at=now
                )
                .on_conflict_do_nothing(index_elements=["name"])
            )
            conn.execute(
                update(_leases)
                .where(
                    _leases.c.name == self.name,
                    _leases.c.holder != self.holder,
                    _leases.c.expires_at < now,
                )
                .values(
                    holder=self.holder,
                    epoch=_leases.c.epoch + 1,
                    expires_at=expires,
                    acquired_at=now,
                )
            )
            holder, epoch = conn.execute(
                select(_leases.c.holder, _leases.c.epoch).where(_leases.c.name == self.name)
            ).one()
            if holder != self.holder:
                self.epoch = None
                return False
            if self.epoch is not None and epoch != self.epoch:
                self.epoch = None  # someone held it in between: start afresh next time
                return False
            self.epoch = epoch
            self._renew(uow)
            return True

    def renew(self, uow: SqlUnitOfWork) -> None:
        """Extend the lease inside `uow` (first statement of every processing transaction).

        Raises LeaseLost when another instance holds it now."""
        if self.epoch is None or not self._renew(uow):
            self.epoch = None
            raise LeaseLost(f"lease {self.name!r} is no longer held by {self.holder}")

    def _renew(self, uow: SqlUnitOfWork) -> bool:
        result = uow.connection.execute(
            update(_leases)
            .where(
                _leases.c.name == self.name,
                _leases.c.holder == self.holder,
                _leases.c.epoch == self.epoch,
            )
            .values(expires_at=self._now() + self._ttl)
        )
        return result.rowcount == 1

    def release(self) -> None:
        """Give the lease up now (a clean stop), so another instance takes over at once."""
        if self.epoch is None:
            return
        with self._store.begin() as uow:
            uow.connection.execute(
                update(_leases)
                .where(
                    _leases.c.name == self.name,
                    _leases.c.holder == self.holder,
                    _leases.c.epoch == self.epoch,
                )
                .values(expires_at=datetime(1970, 1, 1, tzinfo=self._now().tzinfo))
            )
        self.epoch = None

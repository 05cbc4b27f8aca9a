"""What the greylister asks of a store, whatever database is behind it.

A backend (SQLite: `pool.StorePool`; PostgreSQL: `pgpool.PgBackend`) lends `policy.Facts` for one decision
and commits lots of decisions; any failure of its database reaches the
greylister as one exception, `StoreError`, so nothing above the store
knows which driver raised it. `StoreHealth` turns a run of failures into
one log line when it starts and one when it ends.
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager
from collections.abc import Mapping
from typing import Callable, NamedTuple, Protocol, Sequence

from . import log, metrics
from .policy import Facts, Triplet, Verdict

logger = logging.getLogger(__name__)


class StoreError(Exception):
    """The store could not answer or could not write; the text says why."""


class StoreUnreachable(StoreError):
    """The database server did not answer at all (as opposed to refusing):
    greyd starts without it, and uses it once it answers."""


class Decision(NamedTuple):
    """One verdict to remember: when it was made, and the greylist.max_age it
    was made under (an auto-whitelist count older than that starts over)."""

    verdict: Verdict
    now: float
    max_age: int


COUNTER_MINUTES = 60                 # seconds: counters are kept per minute (the `hour` column
                                     # holds the minute's start), so stats' "last hour" is 60 minutes
COUNTER_KEEP = 8 * 86400             # ... and kept 8 days: stats shows a day (cleanup prunes)
SESSION = "session"                  # the counters' action for ended sessions
SESSION_KINDS = ("tls", "plaintext")  # ... and their reasons
Sessions = Mapping[tuple[int, str], int]   # (hour, kind): sessions that ended


class Backend(Protocol):
    """A store as the greylister uses it. Every method may raise StoreError."""

    local: bool     # on this host (a file): a read waits on no other host

    def open(self) -> None:
        """Create or migrate the schema and check the store can be written."""

    def facts(self, network: str, triplet: Triplet) -> AbstractContextManager[Facts]:
        """`with backend.facts(network, triplet) as facts:` what one decision reads."""

    def record(self, decisions: Sequence[Decision], sessions: Sessions = {}) -> None:
        """Remember the decisions, in order, and count them and the `sessions`
        that ended: all or none."""

    def close(self) -> None:
        """Let go of every connection; the next use opens afresh."""

    def time_base(self, clock: Callable[[], float]) -> Callable[[], float]:
        """The clock decisions are made by, given this host's: the same one
        on every host sharing the store."""


class StoreHealth:
    """Logs a store failure once per incident, and the recovery."""

    def __init__(self):
        self._down = False
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._down

    def failed(self, error: Exception) -> None:
        with self._lock:
            first, self._down = not self._down, True
        metrics.store_failed()
        if first:
            logger.error("store failure: %s", log.fields(error=error))

    def ok(self) -> None:
        if self._down:
            with self._lock:
                was, self._down = self._down, False
            if was:
                metrics.store_recovered()
                logger.warning("store recovered")

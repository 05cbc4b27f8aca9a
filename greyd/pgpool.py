"""The PostgreSQL store of a greyd process: psycopg_pool's connections, bounded.

`PgBackend` is the PostgreSQL `storage.Backend`. Sessions borrow a pooled
connection per decision, the recorder one per lot of verdicts; every
psycopg error leaves here as a `StoreError`. Several greyd hosts share the
database; what makes that safe is in the SQL (upserts, key-ordered writes,
a deadlocked lot retried) and in the time base: `time_base` turns the
host's clock into the database server's, sampled once a minute, so a host
whose clock is off neither shortens nor lengthens another host's delays.

No store operation of a session outlasts `database.timeout`: the wait for a
connection is bounded by the pool, a statement by `statement_timeout`, and
a server that stops answering altogether (a connect that never completes,
a host gone from the network) by `Watchdog`, which cuts the socket of a
connection held past its deadline, so no thread is left stuck. The pool
opens its connections in the background and keeps trying while the server
is away; a database that appears, or comes back, is set up or used again
by itself, and a pooled connection its restart or crash left dead is
found when lent (one poll, no round trip) and replaced within the bound.
It is created in the process that uses it (after the fork).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
import weakref
from typing import Callable, Sequence

import psycopg
from psycopg import conninfo, errors
from psycopg_pool import ConnectionPool

from . import log
from .policy import Facts, Triplet
from .postgres import Connection, PgStore, connect_settings
from .storage import Decision, Sessions, StoreError, StoreUnreachable

MAX_SIZE = 8            # connections a process keeps at most (workers × this per host)
SAMPLE_EVERY = 60.0     # seconds between two readings of the server's clock
RETRY_SAMPLE = 5.0      # ... after a reading failed
DEADLOCK_TRIES = 3      # a lot of verdicts that deadlocked with another host's is retried

logger = logging.getLogger(__name__)
# psycopg_pool warns of every failed connection attempt, and with no handler
# of greyd's on its logger Python printed each to standard error (the
# journal): StoreHealth already tells an incident once, with its end.
logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())


class PgBackend:
    """A pool of connections to one PostgreSQL database, for the threads of a process."""

    local = False

    def __init__(self, url: str, timeout: float):
        self.url, self.timeout = url, timeout
        self._pool: ConnectionPool | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._stores: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._ready = False                 # the schema is known to be current
        self.watchdog = Watchdog(timeout)

    # -- storage.Backend ----------------------------------------------------------

    def open(self) -> None:
        """Check the URL, then set up or migrate the schema and check the role
        may write it. A server that does not answer is StoreUnreachable
        (greyd serves without it); one that refuses (a password, a
        database, a permission) is a StoreError."""
        try:
            conninfo.conninfo_to_dict(self.url)
        except psycopg.Error as error:
            raise StoreError(f"database.url: {_one_line(error)}") from None
        try:
            with PgStore.open(self.url, timeout=self.timeout) as store:
                store.migrate()
                store.check_writable()
        except psycopg.OperationalError as error:
            if error.sqlstate is None:      # no answer from a server, not a refusal
                raise StoreUnreachable(_one_line(error)) from error
            raise StoreError(_one_line(error)) from error
        except psycopg.Error as error:
            raise StoreError(_one_line(error)) from error
        self._ready = True

    def facts(self, network: str, triplet: Triplet) -> "_Lease":
        return _Lease(self, (network, triplet))

    def record(self, decisions: Sequence[Decision], sessions: Sessions = {}) -> None:
        """Commit a lot; one that deadlocked with another host's lot is tried again."""
        for attempt in range(DEADLOCK_TRIES):
            try:
                with _Lease(self) as store:
                    store.record(decisions, sessions)
                return
            except StoreError as error:
                retry = isinstance(error.__cause__, (errors.DeadlockDetected,
                                                     errors.SerializationFailure))
                if not retry or attempt == DEADLOCK_TRIES - 1:
                    raise

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=self.timeout)

    def time_base(self, clock: Callable[[], float]) -> Callable[[], float]:
        return ServerClock(self, clock)

    # -- the pool -----------------------------------------------------------------

    def _connections(self) -> ConnectionPool:
        """This process's pool, opened (in the background) at its first use."""
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = ConnectionPool(
                    self.url, min_size=1, max_size=MAX_SIZE, open=False, name="greyd",
                    kwargs=connect_settings(self.url, self.timeout),
                    configure=self._configure, timeout=self.timeout,
                    reconnect_timeout=max(10.0, 5 * self.timeout))
                self._pool.open(wait=False)
                self._pid = os.getpid()
            return self._pool

    def _configure(self, raw: psycopg.Connection) -> None:
        """A new connection: statements bounded, and the schema set up once."""
        raw.execute(f"SET statement_timeout = {int(self.timeout * 1000)}")
        if not self._ready:
            store = PgStore(Connection(raw))
            if not store.is_current():
                store.migrate()
            self._ready = True

    def _borrow(self, deadline: float) -> tuple[psycopg.Connection, PgStore]:
        """A pooled connection by `deadline`; those the server has closed
        meanwhile (a restart, a crash) are dropped on the way, so a client
        never pays for them with a store error."""
        pool = self._connections()
        while True:
            raw = pool.getconn(timeout=max(0.0, deadline - time.monotonic()))
            if not _stale(raw):
                break
            raw.close()
            self._give_back(raw)            # the pool opens another in its place
        store = self._stores.get(raw)
        if store is None:
            store = self._stores[raw] = PgStore(Connection(raw))
        return raw, store

    def _give_back(self, raw: psycopg.Connection) -> None:
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            try:
                pool.putconn(raw)           # a broken connection is discarded
                return
            except psycopg.Error:
                pass
        raw.close()


class _Lease:
    """A borrowed connection, under the watchdog, given back at the end; a
    psycopg error leaves as a StoreError. It yields the PgStore, or with
    `keys` (network, triplet) the facts of that decision."""

    __slots__ = ("backend", "keys", "raw")

    def __init__(self, backend: PgBackend, keys: tuple[str, Triplet] | None = None):
        self.backend, self.keys = backend, keys

    def __enter__(self) -> PgStore | Facts:
        deadline = time.monotonic() + self.backend.timeout
        try:
            self.raw, store = self.backend._borrow(deadline)
        except psycopg.Error as error:
            raise StoreError(_one_line(error)) from error
        self.backend.watchdog.arm(self.raw, deadline)
        return store if self.keys is None else store.facts(*self.keys)

    def __exit__(self, kind, error, traceback) -> None:
        cut = self.backend.watchdog.disarm(self.raw)
        self.backend._give_back(self.raw)
        if kind is not None and issubclass(kind, psycopg.Error):
            why = (f"no answer within database.timeout ({self.backend.timeout:g} s)"
                   if cut else _one_line(error))
            raise StoreError(why) from error


class Watchdog:
    """Cuts the socket of a connection still busy past its deadline: psycopg
    then fails the statement at once, and the pool drops the connection.
    One thread per process, started by the first `arm`, ticking while
    anything is armed."""

    def __init__(self, timeout: float):
        self._tick = min(0.1, timeout / 10)
        self._armed: dict[int, tuple[float, psycopg.Connection]] = {}
        self._cut: set[int] = set()
        self._wake = threading.Event()
        self._pid = 0

    def arm(self, raw: psycopg.Connection, deadline: float) -> None:
        self._armed[id(raw)] = (deadline, raw)
        if self._pid != os.getpid():
            self._pid = os.getpid()
            threading.Thread(target=self._run, name="greyd-pg-watchdog", daemon=True).start()
        self._wake.set()

    def disarm(self, raw: psycopg.Connection) -> bool:
        """Stop watching; True when the watchdog had cut this connection."""
        self._armed.pop(id(raw), None)
        if id(raw) in self._cut:
            self._cut.discard(id(raw))
            return True
        return False

    def _run(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self._tick)
            now = time.monotonic()
            for key, (deadline, raw) in list(self._armed.items()):
                if now >= deadline and self._armed.pop(key, None) is not None:
                    self._cut.add(key)
                    _cut(raw)
            if not self._armed:
                self._wake.clear()
                if self._armed:             # armed while clearing
                    self._wake.set()


def _stale(raw: psycopg.Connection) -> bool:
    """Whether an idle connection is past use: the server says nothing
    unasked, so anything to read is its farewell (a FATAL message) or the
    end of the stream. One poll, no round trip."""
    if raw.closed or raw.broken:
        return True
    try:
        poller = select.poll()
        poller.register(raw.pgconn.socket, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg.Error):
        return True


def _cut(raw: psycopg.Connection) -> None:
    try:
        fd = raw.pgconn.socket
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error):
        return
    logger.warning("store operation cut %s", log.fields(
        error="no answer within database.timeout"))


class ServerClock:
    """A host's clock set to the database server's: the local clock plus the
    offset read from the server (half a round trip allowed for), once a
    minute; until the first reading, the local clock. A reading is taken
    beside the decisions, by a thread of its own, never in their way: a
    server that does not answer would cost one of them database.timeout.
    The first is taken at once when the store is known to answer."""

    def __init__(self, backend: PgBackend, local: Callable[[], float]):
        self.backend, self.local = backend, local
        self.offset = 0.0
        self._next = 0.0
        self._reading = threading.Lock()    # one reading at a time
        if backend._ready:
            self._sample()

    def __call__(self) -> float:
        if time.monotonic() >= self._next and self._reading.acquire(blocking=False):
            self._next = time.monotonic() + RETRY_SAMPLE
            threading.Thread(target=self._sample, args=(True,), name="greyd-pg-clock",
                             daemon=True).start()
        return self.local() + self.offset

    def _sample(self, release: bool = False) -> None:
        self._next = time.monotonic() + RETRY_SAMPLE
        try:
            with _Lease(self.backend) as store:
                before = self.local()
                server = store.now()
                after = self.local()
        except StoreError:
            return
        finally:
            if release:
                self._reading.release()
        self.offset = server - (before + after) / 2
        self._next = time.monotonic() + SAMPLE_EVERY


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__

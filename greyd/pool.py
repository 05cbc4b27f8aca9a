"""The SQLite store of a greyd process: a few open connections, shared.

`StorePool` is the SQLite `storage.Backend`: sessions borrow a connection
per decision and give it back (opening one costs more than a decision),
and the recorder borrows one per lot of verdicts. Every sqlite3 error
leaves here as a `StoreError`.

A connection keeps the file it opened whatever becomes of the path, so each
borrow looks at the path (`FileWatch`, one stat): when the file was
removed, replaced, or made read-only or writable again, the connections to
the old one are retired, none is opened to the new one until all are back
(two files at one path would share the -wal and -shm, and corrupt each
other), and then the file now there is opened; a missing one is created
with the schema, as at start.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Callable, Sequence

from . import log
from .policy import Facts, Triplet
from .storage import Decision, Sessions, StoreError
from .store import BUSY_TIMEOUT, Store

KEEP = 32               # idle connections a process keeps for its sessions

logger = logging.getLogger(__name__)
_UNSEEN = object()


def file_state(path: str) -> tuple | None:
    """What a connection to `path` depends on: the file (device, inode) and
    who may write it (mode, owner); None when there is no file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise sqlite3.OperationalError(f"cannot stat {path}: {error.strerror}") from None
    return st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid


class FileWatch:
    """The file at a path as last seen: `moved(state)` tells whether the
    state just looked at (`file_state`) is another file, and logs how it
    changed, except a file appearing where there was none (a database greyd
    has just created, or one brought back for it)."""

    def __init__(self, path: Path):
        self.path = path
        self._seen: tuple | None | object = _UNSEEN

    def moved(self, state: tuple | None) -> bool:
        if state == self._seen:
            return False
        if self._seen is not _UNSEEN and self._seen is not None:
            change = ("removed" if state is None else
                      "replaced" if self._seen[:2] != state[:2] else "permissions")
            logger.warning("store file changed %s", log.fields(
                path=self.path, change=change, then="create" if state is None else "reopen"))
        self._seen = state
        return True

    def forget(self) -> None:
        """The next look counts as new, whatever it finds."""
        self._seen = _UNSEEN


class StorePool:
    """SQLite connections to one database file, lent to the threads of a process."""

    local = True

    def __init__(self, path: Path | str, keep: int = KEEP):
        self.path = Path(path)
        self._where = str(self.path)            # for the stat at each borrow: no __fspath__
        self._keep = keep
        self._watch = FileWatch(self.path)
        self._write_lock = threading.Lock()     # one writer at a time in this process
        self._idle: list[Store] = []            # all of the current generation
        self._lent: dict[int, int] = {}         # borrowed connections by generation
        self._generation = 0                    # counts the files seen at the path
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)   # a connection came back
        self._waiters = 0                       # borrowers waiting for it
        self._looks = self._applied = 0         # file looks begun, and the latest applied

    # -- storage.Backend ----------------------------------------------------------

    def open(self) -> None:
        """Create (with its directory) or migrate the database, and check it
        is writable."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create {self.path.parent}: {error.strerror}") from error
        try:
            store = Store(self.path, self._write_lock)
            try:
                store.migrate()
                store.check_writable()
                state = file_state(self._where)
            except BaseException:
                store.close()
                raise
        except sqlite3.Error as error:
            raise StoreError(str(error)) from error
        with self._lock:
            if self._watch.moved(state):
                self._new_generation()
            self._idle.append(store)

    def facts(self, network: str, triplet: Triplet) -> "_Lease":
        """`with pool.facts(network, triplet) as facts:` on a borrowed connection."""
        return _Lease(self, (network, triplet))

    def record(self, decisions: Sequence[Decision], sessions: Sessions = {}) -> None:
        with _Lease(self) as store:
            store.record(decisions, sessions)

    def time_base(self, clock: Callable[[], float]) -> Callable[[], float]:
        """One host on its own file: its own clock."""
        return clock

    def close(self) -> None:
        """Close the idle connections; the next borrow looks at the path afresh."""
        with self._lock:
            while self._idle:
                self._idle.pop().close()
            self._watch.forget()

    # -- lending ------------------------------------------------------------------

    def _borrow(self) -> tuple[Store, int]:
        # The stat releases the GIL: not while holding the lock the other
        # sessions need. Of two looks, only the later-begun one is applied.
        with self._lock:
            self._looks += 1
            look = self._looks
        state = file_state(self._where)
        with self._lock:
            if look > self._applied:
                self._applied = look
                if self._watch.moved(state):
                    self._new_generation()
            generation = self._generation
            self._lent[generation] = self._lent.get(generation, 0) + 1
            if self._idle:
                return self._idle.pop(), generation
            self._wait_for_older(generation)
        try:
            return self._open(), generation
        except BaseException:
            with self._lock:
                self._returned(generation)
            raise

    def _wait_for_older(self, generation: int) -> None:
        """Wait until no connection to an older file is out (lock held)."""
        self._waiters += 1
        try:
            moved_on = self._cond.wait_for(
                lambda: not any(g < generation for g in self._lent), BUSY_TIMEOUT)
        finally:
            self._waiters -= 1
        if not moved_on:
            self._returned(generation)
            raise sqlite3.OperationalError(
                f"{self.path} changed while connections to the old file were in use")

    def _open(self) -> Store:
        """A new connection; a file new to greyd (created empty, or put there by
        an administrator) is migrated first: the schema, WAL."""
        store = Store(self.path, self._write_lock)
        try:
            if not store.is_current():
                store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    def _new_generation(self) -> None:
        """Another file is at the path: the idle connections to the old one go."""
        self._generation += 1
        while self._idle:
            self._idle.pop().retire()

    def _returned(self, generation: int) -> None:
        left = self._lent[generation] - 1
        if left:
            self._lent[generation] = left
        else:
            del self._lent[generation]
        if self._waiters:
            self._cond.notify_all()

    def _give_back(self, store: Store, generation: int, healthy: bool) -> None:
        with self._lock:
            self._returned(generation)
            if generation != self._generation:
                store.retire()
            elif healthy and len(self._idle) < self._keep:
                self._idle.append(store)
            else:
                store.close()


class _Lease:
    """A borrowed connection, given back at the end (closed instead if an
    sqlite3.Error went through, which leaves as a StoreError). It yields the
    Store, or with `keys` (network, triplet) the facts of that decision."""

    __slots__ = ("pool", "keys", "store", "generation")

    def __init__(self, pool: StorePool, keys: tuple[str, Triplet] | None = None):
        self.pool, self.keys = pool, keys

    def __enter__(self) -> Store | Facts:
        try:
            self.store, self.generation = self.pool._borrow()
        except sqlite3.Error as error:
            raise StoreError(str(error)) from error
        return self.store if self.keys is None else self.store.facts(*self.keys)

    def __exit__(self, kind, error, traceback) -> None:
        failed = kind is not None and issubclass(kind, sqlite3.Error)
        self.pool._give_back(self.store, self.generation, healthy=not failed)
        if failed:
            raise StoreError(str(error)) from error

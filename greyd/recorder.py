"""Group commit: the decisions of concurrent sessions, written together.

A session records its verdict before it answers the RCPT, so a 451 is only
said once the deferral is in the database, and a store that cannot be
written is noticed by the very session that needed it (on_store_error), as
when each session wrote alone. What changes is the cost: a session that
finds no commit under way writes at once, alone; sessions that arrive while
a commit is under way queue, and when it is done the first of them writes
all the queued verdicts in one transaction (Store.record_many), then hands
on to the next queue. No writer thread: the writing is done by a session's
own thread, which was running anyway, and the others each wait once.
"""

from __future__ import annotations

import sqlite3
import threading
from typing import TYPE_CHECKING

from .policy import Verdict

if TYPE_CHECKING:
    from .store import Store, StorePool

WAIT_LIMIT = 20.0       # seconds a session waits for its batch at most (4 busy timeouts)


class _Pending:
    __slots__ = ("decision", "done", "error", "leads")

    def __init__(self, decision: tuple[Verdict, float, int]):
        self.decision = decision
        self.done = threading.Lock()
        self.done.acquire()                   # released once written, or to hand on the lead
        self.error: BaseException | None = None
        self.leads = False                    # this one writes the next batch


class Recorder:
    """Store.record for the sessions of one process, over a StorePool."""

    def __init__(self, pool: "StorePool"):
        self.pool = pool
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._writing = False                 # a batch is being written now

    def record(self, verdict: Verdict, now: float, *, max_age: int,
               store: "Store | None" = None) -> None:
        """Store.record, committed with whatever else is queued; raises the
        batch's sqlite3.Error. `store`: a connection the caller holds, used if
        this call writes the batch (no second borrow, no second file check)."""
        pending = _Pending((verdict, now, max_age))
        with self._lock:
            self._queue.append(pending)
            pending.leads = not self._writing
            self._writing = True
        if not pending.leads:
            self._wait(pending)
        if pending.leads:
            self._write(store)
        if pending.error is not None:
            raise pending.error

    def _wait(self, pending: _Pending) -> None:
        if pending.done.acquire(timeout=WAIT_LIMIT):
            return
        with self._lock:
            if pending.leads:                 # handed the lead just now: take it
                return
            if pending in self._queue:
                self._queue.remove(pending)
                pending.error = sqlite3.OperationalError(
                    "the store's writes did not finish in time")
                return
        pending.done.acquire()                # in a batch being written: its end is near

    def _write(self, store: "Store | None") -> None:
        """Write everything queued in one transaction, then hand the lead on."""
        with self._lock:
            batch, self._queue = self._queue, []
        error: BaseException | None = sqlite3.OperationalError("recording interrupted")
        try:
            decisions = [p.decision for p in batch]
            if store is not None:
                store.record_many(decisions)
            else:
                with self.pool.connection() as borrowed:
                    borrowed.record_many(decisions)
            error = None
        except sqlite3.Error as exc:
            error = exc
        except Exception as exc:              # noqa: BLE001 - every waiter must hear of it
            error = sqlite3.OperationalError(f"recording failed: {exc!r}")
        finally:
            for pending in batch:
                pending.error = error
                if not pending.leads:
                    pending.done.release()
            with self._lock:
                if self._queue:
                    following = self._queue[0]
                    following.leads = True
                    following.done.release()
                else:
                    self._writing = False

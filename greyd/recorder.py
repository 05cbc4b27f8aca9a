"""The sessions' writes: queued, and committed by one thread per process.

A session answers its RCPT once the verdict is decided and queued; the
writer thread commits whatever has queued in one transaction (the
backend's `record`), then the next lot, while the sessions go on. Under a
flood of spam that is one commit for dozens of deferrals, and no session
sleeps on a lock.

No decision is made from data that a queued write would change in a way
that lets a triplet pass early:

- a session first waits for this process's queued writes when any of them
  concerns its triplet or its network (`settle`), so a retry, a second
  recipient or an auto-whitelist count is decided on what came before it;
- a write still queued in another worker can only make a decision stricter:
  it would add or restart a triplet (so the triplet reads as new now, and is
  greylisted) or mark one passed that will pass again on its own; and the
  times it writes are those of real attempts.

A failed commit is a store failure. From then on every session waits for
its own verdict's commit before answering, as if it wrote alone, so a store
that stays broken gives on_store_error; the first commit that succeeds ends
it. The verdicts of the failed lot are forgotten: their senders were told
451 and are greylisted once more when they retry. What is queued is
committed before the greylister closes (a stop).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Callable, Sequence

from .policy import ACCEPT, Keys, Verdict
from .storage import COUNTER_MINUTES, Decision, Sessions, StoreError, StoreHealth

GATHER = 0.02          # seconds the writer lets a lot gather once something is queued
WAIT_LIMIT = 20.0       # seconds a session waits for a commit at most (4 busy timeouts)


class Recorder:
    """The queue of one process's verdicts, committed through `write`
    (a backend's `record`), which raises StoreError when it fails."""

    def __init__(self, write: Callable[[Sequence[Decision], Sessions], None],
                 health: StoreHealth):
        self.write, self.health = write, health
        self._reset()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (r := ref()) and r._reset())

    def _reset(self) -> None:
        """A fresh state: at start, and in a forked child (threads do not survive fork)."""
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)       # something was queued
        self._written = threading.Condition(self._lock)    # a lot was committed (or failed)
        # the decision, its number, and a list for its commit's error when a
        # session waits for it (after a failure), else None
        self._queue: list[tuple[Decision, int, list | None]] = []
        self._queued = self._done = 0         # sequence numbers: last queued, last finished
        self._pending: dict = {}              # keys of queued verdicts (see _keys): how many
        self._sessions: dict[tuple[int, str], int] = {}   # ended sessions to count
        self._rounds = 0                      # commits finished (or failed) so far
        self._busy = False                    # a lot is being committed
        self._thread: threading.Thread | None = None

    def record(self, decision: Decision) -> None:
        """Queue the decision; after a failed commit, also wait for it to be
        committed, raising the commit's StoreError."""
        outcome = [] if self.health.down else None
        verdict = decision.verdict
        with self._lock:
            self._queued += 1
            number = self._queued
            self._queue.append((decision, number, outcome))
            pending = self._pending           # a plain dict: Counter's methods are Python
            for key in _keys(verdict):
                pending[key] = pending.get(key, 0) + 1
            if len(self._queue) == 1:
                self._work.notify()
            self._start()
        if outcome is not None:
            if not self._wait(number):
                raise StoreError("the store's writes did not finish in time")
            if outcome[0] is not None:
                raise outcome[0]

    def count_session(self, kind: str, now: float) -> None:
        """Count one ended session of `kind` (tls, plaintext) with the next commit."""
        key = (int(now) - int(now) % COUNTER_MINUTES, kind)
        with self._lock:
            sessions = self._sessions
            sessions[key] = sessions.get(key, 0) + 1
            if not self._queue and len(sessions) == 1 and sessions[key] == 1:
                self._work.notify()
            self._start()

    def start(self) -> None:
        """Start the writer thread now (else it starts at the first verdict)."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
            self._thread.start()

    def settle(self, keys: Keys, wait: bool = True) -> bool:
        """Wait until no queued verdict of this process concerns the network
        or a triplet of `keys`, so a decision about them reads what came
        before it. Not while the store is down: then each session waits for
        its own commit (record), and the writes it would wait for are likely
        to fail. False, at once, when it would wait and `wait` is False."""
        pending = self._pending
        if pending and not self.health.down and (
                keys.network in pending or any(t in pending for t in keys.triplets)):
            if not wait:
                return False
            self._wait(self._queued)
        return True

    def flush(self) -> None:
        """Wait until everything queued so far is committed (or has failed),
        the sessions counted included."""
        self._wait(self._queued)
        with self._lock:
            if self._sessions:
                target = self._rounds + (2 if self._busy else 1)
                self._written.wait_for(lambda: self._rounds >= target, WAIT_LIMIT)

    def _wait(self, number: int) -> bool:
        """Wait until verdict `number` is committed or failed; False after WAIT_LIMIT."""
        with self._lock:
            return self._written.wait_for(lambda: self._done >= number, WAIT_LIMIT)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._sessions:
                    self._work.wait()
            time.sleep(GATHER)
            with self._lock:
                lot, self._queue = self._queue, []
                sessions, self._sessions = self._sessions, {}
                self._busy = True
            error = self._commit([decision for decision, _, _ in lot], sessions)
            with self._lock:
                pending = self._pending
                for decision, _, outcome in lot:
                    if outcome is not None:
                        outcome.append(error)
                    for key in _keys(decision.verdict):
                        left = pending[key] - 1
                        if left:
                            pending[key] = left
                        else:
                            del pending[key]
                if lot:
                    self._done = lot[-1][1]
                self._rounds += 1
                self._busy = False
                self._written.notify_all()

    def _commit(self, decisions: list[Decision], sessions: Sessions) -> StoreError | None:
        try:
            self.write(decisions, sessions)
        except StoreError as error:
            self.health.failed(error)
            return error
        except Exception as exc:              # noqa: BLE001 - every waiter must hear of it
            error = StoreError(f"recording failed: {exc!r}")
            self.health.failed(error)
            return error
        self.health.ok()
        return None


def _keys(verdict: Verdict) -> tuple:
    """What a queued verdict will change that a decision reads: its triplet,
    and its network's auto-whitelist entry when it was accepted."""
    if verdict.triplet is None:
        return (verdict.network,) if verdict.action == ACCEPT and verdict.update else ()
    if verdict.action == ACCEPT:
        return (verdict.triplet, verdict.network)
    return (verdict.triplet,)

"""The Greylister: what happens to this recipient now (SPEC §5).

It owns the rules (from the config), the store behind them (a
`storage.Backend`), the recorder that commits the verdicts, the store's
health and the decision log line. The session, `greyd explain` and the
benchmark all ask it, so what `explain` says is what the daemon does. It
knows nothing of SMTP and nothing of which database answers: every store
failure reaches it as a `StoreError`, and a recipient then gets
greylist.on_store_error.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, NamedTuple

from . import log, policy
from .pool import StorePool
from .recorder import Recorder
from .storage import Backend, Decision, StoreError, StoreHealth

logger = logging.getLogger(__name__)


class Explanation(NamedTuple):
    """What the greylister would do now, and the triplet's record it read."""

    verdict: policy.Verdict
    seen: policy.Seen | None


def backend_for(config) -> Backend:
    """The store the config names ([database])."""
    return StorePool(config.database.path)


class Greylister:
    """The decision for one recipient: rules, store, recorder, health, log line."""

    def __init__(self, config, backend: Backend, *, clock: Callable[[], float] = time.time,
                 recorder: Recorder | None = None, health: StoreHealth | None = None):
        """`recorder` and `health` are shared by the greylisters of one store
        (a reload keeps them); by default the greylister makes its own."""
        self.config = config
        self.rules = policy.Rules.from_config(config.relay, config.greylist)
        self.on_store_error = config.greylist.on_store_error
        self.backend, self.clock = backend, clock
        self.health = health or StoreHealth()
        self.recorder = recorder or Recorder(backend.record, self.health)

    @classmethod
    def open(cls, config, *, clock: Callable[[], float] = time.time) -> "Greylister":
        """A greylister over the store the config names, created or migrated
        and checked writable now (StoreError when it cannot be)."""
        backend = backend_for(config)
        backend.open()
        return cls(config, backend, clock=clock)

    def reconfigured(self, config) -> "Greylister":
        """The greylister for new sessions after a reload: the same store,
        recorder and health when the database is the same, else a new store."""
        if config.database == self.config.database:
            return Greylister(config, self.backend, clock=self.clock,
                              recorder=self.recorder, health=self.health)
        return Greylister(config, backend_for(config), clock=self.clock)

    def count_session(self, tls: bool) -> None:
        """Count an ended session, over TLS or not, for `greyd stats` (by the
        wall clock: nothing is decided on it)."""
        self.recorder.count_session("tls" if tls else "plaintext", time.time())

    def start(self) -> None:
        """Start the recorder's writer thread now (else at the first verdict)."""
        self.recorder.start()

    def close(self) -> None:
        """Commit what is queued, then let go of the store's connections."""
        self.recorder.flush()
        self.backend.close()

    def decide(self, request: policy.Request, session: str = "") -> policy.Verdict:
        """The verdict for one recipient now: queued for the store, and logged
        (with the session's id). A failing store gives on_store_error."""
        now = self.clock()
        rules = self.rules
        try:
            keys = policy.keys(request, rules)
            self.recorder.settle(*keys)
            with self.backend.facts(*keys) as facts:
                verdict = policy.decide(request, rules, facts, now, keys)
            self.recorder.record(Decision(verdict, now, rules.max_age))
            self.health.ok()
        except StoreError as error:
            self.health.failed(error)
            verdict = policy.without_store(request, rules, self.on_store_error)
        log.info("decision " + log.fields(
            id=session, client=request.client, name=request.client_name or "unknown",
            helo=request.helo, **{"from": request.sender}, to=request.recipient,
            action=verdict.action, reason=verdict.reason, delay=verdict.delayed,
            retry_in=verdict.retry_in))
        return verdict

    def explain(self, request: policy.Request) -> Explanation:
        """What `decide` would answer now, and the stored triplet; changes
        nothing and logs nothing. A failing store raises StoreError."""
        keys = policy.keys(request, self.rules)
        with self.backend.facts(*keys) as facts:
            verdict = policy.decide(request, self.rules, facts, self.clock(), keys)
            seen = facts.seen(verdict.triplet) if verdict.triplet else None
        return Explanation(verdict, seen)

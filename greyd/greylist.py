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

from . import log, metrics, policy
from .pool import StorePool
from .recorder import Recorder
from .spfcheck import SpfResult
from .storage import Backend, Decision, StoreError, StoreHealth, StoreUnreachable

logger = logging.getLogger(__name__)


class WouldWait(Exception):
    """A decision asked not to wait would have waited for this process's
    queued writes (`Recorder.settle`); nothing was decided."""


class Explanation(NamedTuple):
    """What the greylister would do now, and the triplet's record it read."""

    verdict: policy.Verdict
    seen: policy.Seen | None
    request: policy.Request      # with the SPF result, when it was asked


def backend_for(config) -> Backend:
    """The store the config names ([database]): PostgreSQL when `url` is
    set (psycopg, the "postgresql" extra), else the SQLite file at `path`."""
    database = config.database
    if not database.url:
        return StorePool(database.path)
    try:
        from .pgpool import PgBackend
    except ImportError:
        raise StoreError("database.url needs psycopg: pip install 'greyd[postgresql]'") from None
    return PgBackend(database.url, database.timeout)


class Greylister:
    """The decision for one recipient: rules, store, recorder, health, log line."""

    def __init__(self, config, backend: Backend, *, clock: Callable[[], float] = time.time,
                 recorder: Recorder | None = None, health: StoreHealth | None = None):
        """`recorder` and `health` are shared by the greylisters of one store
        (a reload keeps them); by default the greylister makes its own."""
        self.config = config
        self.rules = policy.Rules.from_config(config.relay, config.greylist,
                                              config.server.hostname)
        self.on_store_error = config.greylist.on_store_error
        self.backend, self.clock = backend, clock
        self.health = health or StoreHealth()
        self.recorder = recorder or Recorder(backend.record, self.health)

    @classmethod
    def open(cls, config, *, clock: Callable[[], float] | None = None) -> "Greylister":
        """A greylister over the store the config names, created or migrated
        and checked writable now (StoreError when it cannot be). A database
        server that does not answer yet is a store failure, logged, not an
        error: greyd serves per on_store_error until it answers. By default
        the clock is the store's time base (`Backend.time_base`)."""
        backend = backend_for(config)
        try:
            backend.open()
            unreachable = None
        except StoreUnreachable as error:
            unreachable = error
        greylister = cls(config, backend, clock=clock or backend.time_base(time.time))
        if unreachable is not None:
            greylister.health.failed(unreachable)
        return greylister

    def reconfigured(self, config) -> "Greylister":
        """The greylister for new sessions after a reload: the same store,
        recorder and health when the database is the same, else a new store."""
        if config.database == self.config.database:
            return Greylister(config, self.backend, clock=self.clock,
                              recorder=self.recorder, health=self.health)
        backend = backend_for(config)
        local = getattr(self.clock, "local", self.clock)    # under a store's time base
        return Greylister(config, backend, clock=backend.time_base(local))

    @property
    def at_once(self) -> bool:
        """Whether a decision now waits on nothing but this host: a store
        on it (SQLite) that is not failing (after a failure each decision
        waits for its commit)."""
        return self.backend.local and not self.health.down

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

    def decide(self, request: policy.Request, session: str = "",
               spf: Callable[[], SpfResult] | None = None, wait: bool = True) -> policy.Verdict:
        """The verdict for one recipient now: queued for the store, and logged
        (with the session's id). A failing store gives on_store_error.

        `spf` gives the client's SPF result (waiting for a check under way);
        it is asked only when the answer can change the verdict (see
        `wants_spf`), so a whitelisted client, or a triplet passed under
        its network, never waits for it. Not `wait`: WouldWait, and nothing
        decided, rather than wait for this process's queued writes."""
        started = time.perf_counter()
        now = self.clock()
        rules = self.rules
        try:
            request, verdict = self._verdict(request, now, spf, settle=True, wait=wait)
            self.recorder.record(Decision(verdict, now, rules.max_age))
            self.health.ok()
        except StoreError as error:
            self.health.failed(error)
            verdict = policy.without_store(request, rules, self.on_store_error)
        metrics.decision(verdict.action, verdict.reason, time.perf_counter() - started)
        log.info("decision " + log.fields(
            id=session, client=request.client, name=request.client_name or "unknown",
            helo=request.helo, **{"from": request.sender}, to=request.recipient,
            action=verdict.action, reason=verdict.reason, delay=verdict.delayed,
            retry_in=verdict.retry_in, **_key_fields(request, verdict)))
        return verdict

    def _verdict(self, request: policy.Request, now: float,
                 spf: Callable[[], SpfResult] | None, *,
                 settle: bool, wait: bool = True) -> tuple[policy.Request, policy.Verdict]:
        """The verdict, and the request it was made on: with the SPF result
        when `wants_spf` asked for it. `settle`: after this process's queued
        writes about the same keys (a decision that will be recorded)."""
        verdict = self._once(request, now, settle, wait)
        if spf is not None and self.wants_spf(verdict):
            result = spf()
            if result.result:
                request = request._replace(spf=result.result, spf_domain=result.domain)
                verdict = self._once(request, now, settle, wait)
        return request, verdict

    def _once(self, request: policy.Request, now: float, settle: bool,
              wait: bool = True) -> policy.Verdict:
        keys = policy.keys(request, self.rules)
        if settle and not self.recorder.settle(keys, wait):
            raise WouldWait
        with self.backend.facts(keys.network, keys.triplet) as facts:
            return policy.decide(request, self.rules, facts, now, keys)

    def wants_spf(self, verdict: policy.Verdict) -> bool:
        """Whether the client's SPF result could change `verdict`: a
        greylisting at the triplet step (an SPF pass may find the triplet
        under its domain's key), or, in mode "suspicious", an acceptance of
        a client not suspicious so far (an SPF fail would make it so)."""
        if verdict.reason == policy.NOT_SUSPICIOUS:
            return True
        return ("spf" in self.rules.client_key and verdict.triplet is not None
                and verdict.action != policy.ACCEPT)

    def spf_may_matter(self, request: policy.Request) -> bool:
        """Whether an SPF check of this transaction's client and sender (a
        request without a recipient) is worth starting: not for a trusted
        client, nor for one the whitelists or the auto-whitelist accept
        whatever the recipient. A failing store says yes."""
        rules = self.rules
        if not rules.uses_spf or policy.is_trusted(request.client, rules.relay_clients):
            return False
        keys = policy.keys(request, rules)
        try:
            with self.backend.facts(keys.network, keys.triplet) as facts:
                return policy.listed(request, rules, facts, self.clock(), keys.network) is None
        except StoreError:
            return True

    def explain(self, request: policy.Request,
                spf: Callable[[], SpfResult] | None = None) -> Explanation:
        """What `decide` would answer now, and the stored triplet; changes
        nothing and logs nothing. A failing store raises StoreError."""
        request, verdict = self._verdict(request, self.clock(), spf, settle=False)
        seen = None
        if verdict.triplet is not None:
            with self.backend.facts(verdict.network, verdict.triplet) as facts:
                seen = facts.seen(verdict.triplet)
        return Explanation(verdict, seen, request)


def _key_fields(request: policy.Request, verdict: policy.Verdict) -> dict:
    """The decision line's say on SPF and on a triplet keyed other than by network."""
    fields = {}
    if request.spf:
        fields["spf"] = f"{request.spf}:{request.spf_domain}"
    if verdict.triplet is not None and verdict.triplet.network != verdict.network:
        fields["key"] = verdict.triplet.network
    return fields

"""What greyd knows of the upstream MTA's EHLO keywords, shared by the
sessions of one daemon.

greyd offers SMTPUTF8 (RFC 6531) and DSN (RFC 3461) only when the upstream
does, since it passes both on rather than implementing them. `Capabilities`
holds the upstream's keywords that matter (`WATCHED`), or None while they
are unknown (the upstream down at start): then neither is offered. They are
learnt by a probe (connect, EHLO, QUIT, bounded by upstream.timeout) in a
thread of its own: at start and on reload, where the caller waits for it a
moment (`START_WAIT`) so that a live upstream is known before the first
client; while unknown, again at a session's EHLO, at most every `RETRY`
seconds, without holding that EHLO up. A Relay that finds them changed on
its own connection reports them (`update`). Thread-safe; it knows nothing
of sessions.
"""

from __future__ import annotations

import logging
import smtplib
import threading
import time
from collections.abc import Iterable
from typing import Callable

from .log import fields

WATCHED = ("SMTPUTF8", "DSN")     # the keywords greyd passes on, in EHLO order
RETRY = 5.0                       # seconds between probes while unknown
START_WAIT = 2.0                  # seconds start and reload wait for the probe

logger = logging.getLogger(__name__)


class Capabilities:
    """The upstream's watched EHLO keywords, or None while unknown."""

    def __init__(self, host: str, port: int, timeout: float, local_hostname: str,
                 clock: Callable[[], float] = time.monotonic):
        self.host, self.port, self.timeout = host, port, timeout
        self.local_hostname = local_hostname
        self.clock = clock
        self._lock = threading.Lock()
        self._known: frozenset[str] | None = None
        self._probe: threading.Thread | None = None
        self._tried = -RETRY              # when the last probe started

    @classmethod
    def for_config(cls, config, **kwargs) -> "Capabilities":
        upstream = config.upstream
        return cls(upstream.host, upstream.port, upstream.timeout, config.server.hostname,
                   **kwargs)

    @property
    def known(self) -> frozenset[str] | None:
        return self._known

    def offered(self) -> tuple[str, ...]:
        """The watched keywords the upstream offers (none while unknown, and
        then a probe in the background, at most every RETRY seconds)."""
        known = self._known
        if known is None:
            self.refresh(wait=0, unless_recent=True)
            return ()
        return tuple(word for word in WATCHED if word in known)

    def update(self, keywords: Iterable[str]) -> None:
        """What an EHLO reply offered (smtplib's esmtp_features keys will do)."""
        seen = frozenset(word.upper() for word in keywords) & frozenset(WATCHED)
        with self._lock:
            before, self._known = self._known, seen
        if before != seen:
            logger.info("upstream capabilities %s", fields(
                upstream=f"{self.host}:{self.port}", offers=",".join(sorted(seen)) or "none",
                before="unknown" if before is None else ",".join(sorted(before)) or "none"))

    def refresh(self, wait: float = START_WAIT, unless_recent: bool = False) -> None:
        """Probe now in the background (unless a probe is under way, or, with
        `unless_recent`, one started within RETRY seconds); wait for it up to
        `wait` seconds."""
        with self._lock:
            probe = self._probe
            now = self.clock()
            if probe is None and not (unless_recent and now - self._tried < RETRY):
                self._tried = now
                probe = self._probe = threading.Thread(
                    target=self._run, name="upstream-probe", daemon=True)
                probe.start()
        if probe is not None and wait > 0:
            probe.join(wait)

    def _run(self) -> None:
        try:
            self.update(self.probe())
        except (OSError, ValueError) as error:      # smtplib's errors are OSErrors
            logger.warning("upstream capabilities not learnt %s", fields(
                upstream=f"{self.host}:{self.port}", error=str(error),
                offers="unknown" if self._known is None else "as before"))
        finally:
            with self._lock:
                self._probe = None

    def probe(self) -> Iterable[str]:
        """Connect, EHLO, QUIT: the keywords the upstream's EHLO reply offers
        (none when it refuses EHLO with a 5xx: no ESMTP at all)."""
        smtp = smtplib.SMTP(self.host, self.port, local_hostname=self.local_hostname,
                            timeout=self.timeout)
        try:
            code, text = smtp.ehlo()
            if code // 100 not in (2, 5) or code == 421:
                raise smtplib.SMTPHeloError(code, text)
            keywords = list(smtp.esmtp_features) if code == 250 else []
            try:
                smtp.quit()
            except OSError:
                pass
            return keywords
        finally:
            smtp.close()

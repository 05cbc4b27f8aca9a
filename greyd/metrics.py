"""Prometheus metrics ([metrics] listen, SPEC §2): the figures and /metrics.

It owns every Prometheus object: the counters, gauges and histograms
(`greyd_…`), the registry behind them and the HTTP endpoint that serves
them in Prometheus' text format (prometheus_client's WSGI app on a
threading wsgiref server). The rest of greyd calls the small functions
below (`decision`, `session`, `relayed` …); while metrics are off they
return at once, so the hot path pays one global lookup.

A single greyd counts in a registry of its own and serves it. With
server.workers > 1 the master opens the endpoint before it forks:
prometheus_client's multiprocess mode, in a fresh private directory
beside the pidfile, where each worker counts (`record`, after the fork)
and the master serves the sum over them (`MultiProcessCollector`); a dead
worker's live gauges are dropped (`process_gone`), its counts stay. The
directory goes at `close`.

Labels stay few: actions, the first word of a reason (whitelist entries
folded into `whitelist`) and a suspicion rule, end words, reply classes,
DNS error words; never an address, a name or an entry. It imports nothing
from greyd.
"""

from __future__ import annotations

import os
import shutil
import socket
import socketserver
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

SCRAPE_TIMEOUT = 10.0   # seconds a scraper may take to send its request and read the answer
DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
SESSION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
DNS_KINDS = ("timeout", "servfail", "nxdomain", "no-answer", "refused", "no-nameservers",
             "bad-name", "unexpected-answer")


class _Figures:
    """Every greyd_ metric of this process."""

    def __init__(self, registry: CollectorRegistry | None):
        from prometheus_client import Counter, Gauge, Histogram
        r = registry
        self.decisions = Counter("greyd_decisions", "Recipients decided, by action and reason.",
                                 ["action", "reason"], registry=r)
        self.decision_seconds = Histogram("greyd_decision_seconds", "Time to decide a recipient.",
                                          buckets=DECISION_BUCKETS, registry=r)
        self.sessions = Counter("greyd_sessions", "Sessions ended, by how they ended.",
                                ["end"], registry=r)
        self.session_seconds = Histogram("greyd_session_seconds", "Session durations.",
                                         buckets=SESSION_BUCKETS, registry=r)
        self.relayed = Counter("greyd_relayed_messages",
                               "Messages relayed, by the class of upstream's reply to DATA.",
                               ["reply_class"], registry=r)
        self.dns_failures = Counter("greyd_dns_failures", "DNS lookups failed, by kind.",
                                    ["kind"], registry=r)
        self.store_errors = Counter("greyd_store_errors", "Store failures.", registry=r)
        self.store_up = Gauge("greyd_store_up", "1 while the store answers (0: some worker's fails).",
                              multiprocess_mode="livemin", registry=r)
        self.connections_open = Gauge("greyd_connections_open", "Client connections open.",
                                      multiprocess_mode="livesum", registry=r)
        self.store_up.set(1)
        self.children: dict = {}

    def child(self, metric, *labels: str):
        """`metric.labels(*labels)`, kept: finding it costs more than counting."""
        key = (metric, labels)
        found = self.children.get(key)
        if found is None:
            found = self.children[key] = metric.labels(*labels)
        return found


_figures: _Figures | None = None      # None: not counting (metrics off, or not yet started)
_endpoint: Endpoint | None = None


# -- what greyd counts ------------------------------------------------------------------

def decision(action: str, reason: str, seconds: float) -> None:
    figures = _figures
    if figures is not None:
        figures.child(figures.decisions, action, reason_label(reason)).inc()
        figures.decision_seconds.observe(seconds)


def session(end: str, seconds: float) -> None:
    figures = _figures
    if figures is not None:
        figures.child(figures.sessions, end).inc()
        figures.session_seconds.observe(seconds)


def relayed(code: int) -> None:
    """A message upstream answered `code` to (its reply to DATA)."""
    figures = _figures
    if figures is not None:
        figures.child(figures.relayed, f"{code // 100}xx").inc()


def dns_failure(error: str) -> None:
    figures = _figures
    if figures is not None:
        figures.child(figures.dns_failures, dns_kind(error)).inc()


def store_failed() -> None:
    figures = _figures
    if figures is not None:
        figures.store_errors.inc()
        figures.store_up.set(0)


def store_recovered() -> None:
    figures = _figures
    if figures is not None:
        figures.store_up.set(1)


def connections(change: int) -> None:
    """A client connection admitted (+1) or closed (-1)."""
    figures = _figures
    if figures is not None:
        figures.connections_open.inc(change)


def reason_label(reason: str) -> str:
    """A decision's reason as a label: its first word (a whitelist entry
    folded into `whitelist`), and the suspicion rule that greylisted it."""
    if "," not in reason:                     # the common case, made cheap
        return "whitelist" if reason.startswith("whitelist:") else reason
    first, *more = reason.split(",")
    label = "whitelist" if first.startswith("whitelist:") else first
    return ",".join([label, *(part for part in more if part.startswith("suspicious:"))])


def dns_kind(error: str) -> str:
    """A DNS failure's word as dns.py logs it, one of DNS_KINDS or `other`."""
    words = error.split(",")
    return next((kind for kind in DNS_KINDS if kind in words), "other")


# -- the endpoint -----------------------------------------------------------------------

@lru_cache(maxsize=None)
def _http() -> tuple:
    """wsgiref's make_server and the server and handler classes it is given,
    made at the first endpoint: prometheus_client and the HTTP modules are
    imported only where metrics are on, not by every greyd command."""
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        daemon_threads = True

        def __init__(self, address: tuple[str, int], handler):
            self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            super().__init__(address, handler)

    class Handler(WSGIRequestHandler):
        timeout = SCRAPE_TIMEOUT

        def log_message(self, format, *args) -> None:
            """Scrapes are not logged (wsgiref writes each to standard error)."""

    return make_server, Server, Handler


class Endpoint:
    """/metrics on one address: bound at construction (OSError when it
    cannot be), served from `serve`."""

    def __init__(self, address: tuple[str, int], workers: int, beside: Path):
        from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess, values
        self.directory: str | None = None
        self.registry = CollectorRegistry()
        if workers > 1:
            beside.mkdir(parents=True, exist_ok=True)
            self.directory = tempfile.mkdtemp(prefix="greyd-metrics.", dir=beside)
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.directory
            values.ValueClass = values.get_value_class()    # chosen at import: choose again
            multiprocess.MultiProcessCollector(self.registry, path=self.directory)
        self.serving = False
        self.paths = [Path(self.directory)] if self.directory else []   # the workers write here
        try:
            make_server, server, handler = _http()
            self.server = make_server(address[0], address[1], make_wsgi_app(self.registry),
                                      server, handler)
        except BaseException:
            self._remove_directory()
            raise

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def serve(self) -> None:
        """Answer scrapes (a thread); a single greyd counts from now on."""
        threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True).start()
        self.serving = True

    def close(self) -> None:
        """Stop serving; the multiprocess directory goes."""
        if self.serving:
            self.server.shutdown()
        self.server.server_close()
        self._remove_directory()

    def _remove_directory(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


def listen(address: tuple[str, int] | None, workers: int, beside: Path) -> Endpoint | None:
    """The endpoint for [metrics] listen (None: off), bound; OSError when it cannot be."""
    global _endpoint
    if address is None:
        return None
    _endpoint = Endpoint(address, workers, beside)
    return _endpoint


def record() -> None:
    """Start counting in this process, when an endpoint is open: a single
    greyd, or a worker after the fork (the master never counts; its
    workers let go of its socket)."""
    global _figures
    endpoint = _endpoint
    if endpoint is None or _figures is not None:
        return
    if endpoint.directory is not None:
        endpoint.server.server_close()
        _figures = _Figures(None)
    else:
        _figures = _Figures(endpoint.registry)


def process_gone(pid: int) -> None:
    """A worker exited: its live gauges no longer count."""
    endpoint = _endpoint
    if endpoint is not None and endpoint.directory is not None:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid, endpoint.directory)


def close() -> None:
    """Stop counting and serving (the daemon's stop)."""
    global _figures, _endpoint
    endpoint, _endpoint, _figures = _endpoint, None, None
    if endpoint is not None:
        endpoint.close()

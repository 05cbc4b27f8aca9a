"""The main thread of a running greyd: signals in, and the loop that acts on them.

`Signals` turns SIGTERM/SIGINT, SIGHUP and SIGUSR1 into flags and a wake-up;
`serve` runs one Daemon (a single process, or one forked worker) until a
stop; `supervise` is the master of `server.workers > 1`, passing signals on
to its workers and replacing one that died. What a reload or a log reopen
does is given to them as callables (cli_daemon.py owns that).
"""

from __future__ import annotations

import logging
import signal
import threading

from .server import Daemon
from .workers import WATCH, Workers

logger = logging.getLogger(__name__)


class Signals:
    """SIGTERM/SIGINT ask for a stop, SIGHUP for a reload, SIGUSR1 for the
    log files reopened (logrotate; the config is not re-read); the main
    thread acts."""

    def __init__(self):
        self.wake = threading.Event()
        self.stop = self.reload = self.reopen = False
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.signal(signal.SIGUSR1, self._on_reopen)

    def _on_stop(self, *_):
        self.stop = True
        self.wake.set()

    def _on_reload(self, *_):
        self.reload = True
        self.wake.set()

    def _on_reopen(self, *_):
        self.reopen = True
        self.wake.set()


def serve(daemon: Daemon, signals: Signals, reload, reopen_logs, alive=None,
          stopping=None) -> None:
    """Serve until a stop signal (or until `alive()` turns False); reload on
    SIGHUP, reopen the log files on SIGUSR1; then stop gracefully, first
    telling `stopping(open sessions)`."""
    daemon.start()
    while not signals.stop:
        # Never without a timeout: the kernel may give the signal to another
        # thread, and Python's handler then runs when this one next wakes.
        signals.wake.wait(WATCH)
        signals.wake.clear()
        if alive is not None and not alive():
            logger.error("master process gone, stopping")
            break
        if signals.reload and not signals.stop:
            signals.reload = signals.reopen = False      # a reload reopens them too
            reload()
        if signals.reopen and not signals.stop:
            signals.reopen = False
            reopen_logs()
    if stopping is not None:
        stopping(daemon.open_sessions())
    daemon.stop()


def supervise(workers: Workers, signals: Signals, reopen_logs, stopping=None) -> None:
    """The master (server.workers > 1): start the workers, pass SIGHUP and
    SIGUSR1 on to them, replace one that died; on a stop signal, stop them
    all gracefully."""
    for number in range(len(workers.daemons)):
        workers.start(number)
    while not signals.stop:
        signals.wake.wait(WATCH)
        signals.wake.clear()
        if signals.reload and not signals.stop:
            signals.reload = False
            reopen_logs()
            workers.signal(signal.SIGHUP)
        if signals.reopen and not signals.stop:
            signals.reopen = False
            reopen_logs()
            workers.signal(signal.SIGUSR1)
        workers.reap(restart=not signals.stop)
    if stopping is not None:
        stopping(workers.counts.total)
    workers.stop()

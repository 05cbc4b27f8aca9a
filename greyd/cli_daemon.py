"""`greyd start | stop | status | reload | reopen-logs`: running greyd as a daemon.

start binds, opens the store, drops privileges (server.user) and serves;
it detaches unless --foreground. stop, status, reload and reopen-logs find
the running daemon through the pidfile of the same config; a state file beside it
records when it started and where it listens, for `status`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import click

from . import config as configuration, log, values
from .admission import SharedCounts
from .clitools import GreydError, echo_json, load_certificate, load_config, when
from .daemonize import Pidfile, alive, batch_scheduling, detach, drop_privileges, lookup_user
from .greylist import Greylister
from .server import GRACE, Daemon
from .context import Context
from .storage import StoreError
from .values import ConfigError
from .workers import WATCH, Workers, master_alive

STOP_WAIT = GRACE + 15.0    # seconds `greyd stop` waits for the exit

logger = logging.getLogger(__name__)


def state_path(config: configuration.Config) -> Path:
    return config.server.pidfile.with_suffix(".state")


@click.command()
@click.option("--foreground", is_flag=True, help="Stay attached and log to stderr too.")
@click.option("--listen", multiple=True, metavar="HOST:PORT",
              help="Listen here instead of server.listen (repeatable; [::1]:2525 for IPv6).")
@click.pass_context
def start(ctx: click.Context, foreground: bool, listen: tuple[str, ...]) -> None:
    """Start the proxy; without --foreground, return once it is listening.

    \b
    Example:
      greyd start --foreground --listen 127.0.0.1:2525 --listen [::1]:2525
    """
    config = _with_listen(load_config(ctx), listen)
    certificate = load_certificate(config)      # read as the user that starts greyd
    user = _user(config)
    pidfile = Pidfile(config.server.pidfile)
    running = pidfile.running()
    if running:
        raise GreydError(f"already running (pid {running}, pidfile {pidfile.path})")
    batch_scheduling()                  # before any thread: they all inherit it
    try:
        log.setup(config.log, stderr=foreground)
    except OSError as error:
        raise GreydError(f"cannot open log file: {error}") from None
    greylister = _open_greylister(config)
    workers = config.server.workers
    counts = SharedCounts(workers) if workers > 1 else None
    daemons: list[Daemon] = []
    try:
        for _ in range(workers):
            daemons.append(Daemon(Context(config, greylister, tls=certificate),
                                  counts=counts, first=not daemons))
            # The others bind where the first did (a port 0 is now a real one).
            config = _bound(config, daemons[0].addresses)
    except OSError as error:
        for bound in daemons:
            bound.close()
        listen_text = ", ".join(values.format_hostport(*a) for a in config.server.listen)
        raise GreydError(f"cannot listen on {listen_text}: {error.strerror or error}") from None
    daemon = daemons[0]
    notify = None if foreground else detach()
    try:
        pidfile.write()
        _write_state(config, daemon)
        if user is not None:
            drop_privileges(user, _owned_paths(config))
    except OSError as error:
        if notify:
            notify(f"cannot start: {error}")
        raise GreydError(f"cannot start: {error}") from None
    signals = Signals()
    if notify:
        listening = ", ".join(values.format_hostport(*a) for a in daemon.addresses)
        notify("", f"greyd started (pid {os.getpid()}), listening on {listening}")
    try:
        if counts is None:
            serve(daemon, signals, lambda: _reloaded(config, listen, foreground, daemon),
                  lambda: _reopen_logs(daemon.ctx.config, foreground))
        else:
            supervise(Workers(daemons, counts, _worker(config, listen, foreground, signals)),
                      signals, lambda: _reopen_logs(config, foreground))
    finally:
        pidfile.remove()
        state_path(config).unlink(missing_ok=True)


def _bound(config: configuration.Config, addresses) -> configuration.Config:
    server = dataclasses.replace(config.server, listen=tuple(tuple(a) for a in addresses))
    return dataclasses.replace(config, server=server)


def _with_listen(config: configuration.Config, listen) -> configuration.Config:
    try:
        return configuration.with_listen(config, listen)
    except ConfigError as error:
        raise GreydError(str(error)) from None


def _user(config: configuration.Config):
    """The account to run as, when started as root with server.user set."""
    try:
        return lookup_user(config.server.user)
    except KeyError:
        raise GreydError(f"server.user: no such user: {config.server.user}") from None


def _open_greylister(config: configuration.Config) -> Greylister:
    try:
        greylister = Greylister.open(config)
    except StoreError as error:
        raise GreydError(f"database not writable: {config.database.path}: {error}") from None
    greylister.close()        # the store reopens lazily, after the fork and the privilege drop
    return greylister


def _owned_paths(config: configuration.Config) -> list[Path]:
    """What the unprivileged daemon must still be able to write."""
    db = config.database.path
    paths = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), db.parent,
             config.server.pidfile, config.server.pidfile.parent, state_path(config)]
    for logfile in (config.log.file, config.log.debug_file):
        if logfile:
            paths += [logfile, logfile.parent]
    return paths


def _write_state(config: configuration.Config, daemon: Daemon) -> None:
    state = {"started": time.time(), "config": str(config.source or ""),
             "listen": [values.format_hostport(*a) for a in daemon.addresses],
             "database": str(config.database.path)}
    state_path(config).write_text(json.dumps(state) + "\n")


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


def serve(daemon: Daemon, signals: Signals, reload, reopen_logs, alive=None) -> None:
    """Serve until a stop signal (or until `alive()` turns False); reload on
    SIGHUP, reopen the log files on SIGUSR1; then stop gracefully."""
    daemon.start()
    while not signals.stop:
        signals.wake.wait(None if alive is None else WATCH)
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
    daemon.stop()


def supervise(workers: Workers, signals: Signals, reopen_logs) -> None:
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
    workers.stop()


def _worker(config: configuration.Config, listen, foreground: bool, signals: Signals):
    """What a forked worker runs: its Daemon, served as a single-process greyd
    serves, stopping with the master. It keeps the master's signal handlers
    and flags (a signal that came during the fork is not lost)."""
    master = os.getpid()

    def run(daemon: Daemon) -> None:
        signals.wake = threading.Event()
        signals.reload = signals.reopen = False
        serve(daemon, signals, lambda: _reloaded(config, listen, foreground, daemon),
              lambda: _reopen_logs(daemon.ctx.config, foreground),
              alive=lambda: master_alive(master))
    return run


def _reopen_logs(config: configuration.Config, foreground: bool) -> None:
    """The log files of `config` closed and opened again (logrotate moved
    them); a master's part of a reload or a reopen, a worker's SIGUSR1."""
    try:
        log.setup(config.log, stderr=foreground)
    except OSError as error:        # standard error (the journal) rather than nowhere
        log.setup(dataclasses.replace(config.log, file=None, debug_file=None), stderr=True)
        logger.error("cannot reopen log files %s", log.fields(error=error))
        return
    logger.info("log files reopened %s", log.fields(pid=os.getpid()))


def _reloaded(first: configuration.Config, listen, foreground: bool, daemon: Daemon) -> None:
    """SIGHUP: log files reopened, the config re-read for new sessions.

    The file re-read is the one found at start (or the built-in defaults,
    rooted where greyd started): a detached daemon's working directory is /,
    so searching again would find another config, or none.
    """
    try:
        config = configuration.with_listen(
            configuration.load(first.source, cwd=first.root), listen)
    except ConfigError as error:
        log.setup(daemon.ctx.config.log, stderr=foreground)
        logger.error("reload failed, keeping the running config %s", log.fields(error=error))
        return
    try:
        log.setup(config.log, stderr=foreground)
    except OSError as error:
        log.setup(daemon.ctx.config.log, stderr=foreground)
        logger.error("reload: cannot open log file %s", log.fields(error=error))
        return
    daemon.reconfigure(config)


def _find_running(ctx: click.Context) -> tuple[configuration.Config, Pidfile, int | None]:
    config = load_config(ctx)
    pidfile = Pidfile(config.server.pidfile)
    return config, pidfile, pidfile.running()


@click.command()
@click.pass_context
def stop(ctx: click.Context) -> None:
    """Stop greyd gracefully (SIGTERM) and wait until it has exited.

    Open sessions get up to 30 seconds to finish, then 421 4.3.2.

    \b
    Example:
      greyd stop
    """
    _, _, pid = _find_running(ctx)
    if pid is None:
        click.echo("greyd is not running")
        return
    signal_process(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT
    while alive(pid):
        if time.monotonic() > deadline:
            raise GreydError(f"pid {pid} did not exit within {STOP_WAIT:.0f} seconds")
        time.sleep(0.05)
    click.echo(f"greyd stopped (pid {pid})")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Exit 0 with a summary when greyd is running, 3 when it is not.

    \b
    Example:
      greyd status && echo up
    """
    config, pidfile, pid = _find_running(ctx)
    if pid is None:
        if as_json:
            echo_json({"running": False, "pidfile": str(pidfile.path)})
        else:
            click.echo("greyd is not running")
        ctx.exit(3)
    try:
        state = json.loads(state_path(config).read_text())
    except (OSError, ValueError):
        state = {}
    started = state.get("started")
    report = {"running": True, "pid": pid,
              "uptime": int(time.time() - started) if started else None,
              "listen": state.get("listen", []), "config": state.get("config"),
              "database": state.get("database")}
    if as_json:
        echo_json(report)
        return
    click.echo(f"greyd is running (pid {pid})")
    if started:
        click.echo(f"uptime:   {_duration(report['uptime'])}, since "
                   f"{when(int(started))}")
    click.echo(f"listen:   {', '.join(report['listen']) or '-'}")
    click.echo(f"config:   {report['config'] or 'built-in defaults'}")
    click.echo(f"database: {report['database'] or '-'}")


@click.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Re-read the config and reopen log files (SIGHUP); open sessions keep the old config.

    The config is checked first: an invalid one is reported and not sent.

    \b
    Example:
      greyd reload
    """
    config, _, pid = _find_running(ctx)
    if pid is None:
        raise GreydError("not running")
    load_certificate(config)
    signal_process(pid, signal.SIGHUP)
    click.echo(f"greyd reloading (pid {pid})")


@click.command("reopen-logs")
@click.pass_context
def reopen_logs(ctx: click.Context) -> None:
    """Reopen the log files (SIGUSR1), for logrotate; the config is not re-read.

    \b
    Example:
      greyd reopen-logs
      greyd -c /etc/greyd/greyd.toml reopen-logs
    """
    _, _, pid = _find_running(ctx)
    if pid is None:
        raise GreydError("not running")
    signal_process(pid, signal.SIGUSR1)
    click.echo(f"greyd reopening its log files (pid {pid})")


def signal_process(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except PermissionError:
        raise GreydError(f"not allowed to signal pid {pid} (run as its user or root)") from None
    except ProcessLookupError:
        raise GreydError(f"pid {pid} is gone") from None


def _duration(seconds: int) -> str:
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    return " ".join(parts + [f"{hours}h", f"{minutes}m", f"{seconds}s"])

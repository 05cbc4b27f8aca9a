"""`greyd start | stop | status | reload | reopen-logs`: running greyd as a daemon.

start binds, opens the store, drops privileges (server.user) and serves;
it detaches unless --foreground. stop, status, reload and reopen-logs find
the running daemon through the pidfile of the same config; a state file beside it
records when it started and where it listens, for `status` (and, once
stopping, how many sessions the stop waits for, for `stop`). The main loop
a running greyd is in is mainloop.py.
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

from . import config as configuration, log, metrics, values
from .admission import SharedCounts
from .clitools import GreydError, describe, echo_json, load_certificate, load_config, when
from .daemonize import Pidfile, alive, batch_scheduling, detach, drop_privileges, lookup_user
from .greylist import Greylister
from .server import GRACE, Daemon
from .context import Context
from .storage import StoreError
from .values import ConfigError
from .mainloop import Signals, serve, supervise
from .workers import Workers, bind_to_cpu, master_alive

STOP_WAIT = GRACE + 15.0    # seconds `greyd stop` waits for the exit
STOP_NOTICE = 0.5           # ... and says what it waits for once a stop takes longer

logger = logging.getLogger(__name__)


def state_path(config: configuration.Config) -> Path:
    return config.server.pidfile.with_suffix(".state")


@click.command(short_help="Start the proxy (detached unless --foreground).")
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
    if config.server.workers == 1:      # ... and one CPU (workers bind after their fork)
        bind_to_cpu()
    try:
        log.setup(config.log, stderr=foreground)
    except OSError as error:
        raise GreydError(f"cannot open log file: {describe(error)}") from None
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
    endpoint = _metrics_endpoint(config, daemons)
    daemon = daemons[0]
    notify = None if foreground else detach()
    try:
        pidfile.write()
        _write_state(config, daemon)
        if user is not None:
            drop_privileges(user, _owned_paths(config) + (endpoint.paths if endpoint else []))
    except OSError as error:
        metrics.close()
        if notify:
            notify(f"cannot start: {describe(error)}")
        raise GreydError(f"cannot start: {describe(error)}") from None
    signals = Signals()
    if notify:
        listening = ", ".join(values.format_hostport(*a) for a in daemon.addresses)
        notify("", f"greyd started (pid {os.getpid()}), listening on {listening}")
    if endpoint is not None:
        endpoint.serve()
    try:
        if counts is None:
            serve(daemon, signals, lambda: _reloaded(config, listen, foreground, daemon),
                  lambda: _reopen_logs(daemon.ctx.config, foreground),
                  stopping=lambda sessions: _note_stopping(config, sessions))
        else:
            supervise(Workers(daemons, counts, _worker(config, listen, foreground, signals)),
                      signals, lambda: _reopen_logs(config, foreground),
                      stopping=lambda sessions: _note_stopping(config, sessions))
    finally:
        metrics.close()
        pidfile.remove()
        state_path(config).unlink(missing_ok=True)


def _metrics_endpoint(config: configuration.Config, daemons: list[Daemon]):
    """[metrics] listen, bound now (before the detach and the workers' fork), or a refusal."""
    try:
        return metrics.listen(config.metrics.address, config.server.workers,
                              config.server.pidfile.parent)
    except OSError as error:
        for bound in daemons:
            bound.close()
        raise GreydError(f"cannot listen on {config.metrics.listen} (metrics.listen): "
                         f"{error.strerror or error}") from None


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
        what = "database" if config.database.url else "database not writable"
        raise GreydError(f"{what}: {config.database.where}: {error}") from None
    greylister.close()        # the store reopens lazily, after the fork and the privilege drop
    return greylister


def _owned_paths(config: configuration.Config) -> list[Path]:
    """What the unprivileged daemon must still be able to write."""
    db = config.database.path
    paths = [config.server.pidfile, config.server.pidfile.parent, state_path(config)]
    if not config.database.url:
        paths += [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), db.parent]
    for logfile in (config.log.file, config.log.debug_file):
        if logfile:
            paths += [logfile, logfile.parent]
    return paths


def _write_state(config: configuration.Config, daemon: Daemon) -> None:
    state = {"started": time.time(), "config": str(config.source or ""),
             "listen": [values.format_hostport(*a) for a in daemon.addresses],
             "database": config.database.where}
    state_path(config).write_text(json.dumps(state) + "\n")


def _note_stopping(config: configuration.Config, sessions: int) -> None:
    """Tell `greyd stop` how many sessions the stop waits for (the state file)."""
    path = state_path(config)
    try:
        state = json.loads(path.read_text())
        state["stopping"] = {"since": time.time(), "sessions": sessions}
        path.write_text(json.dumps(state) + "\n")
    except (OSError, ValueError):
        pass                  # only `greyd stop`'s message is the poorer for it


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


@click.command(short_help="Stop gracefully (SIGTERM), wait for the exit.")
@click.pass_context
def stop(ctx: click.Context) -> None:
    """Stop greyd gracefully (SIGTERM) and wait until it has exited.

    Open sessions get up to 30 seconds to finish, then 421 4.3.2.

    \b
    Example:
      greyd stop
    """
    config, _, pid = _find_running(ctx)
    if pid is None:
        click.echo("greyd is not running")
        return
    signal_process(pid, signal.SIGTERM)
    started = time.monotonic()
    told = False
    while alive(pid):
        waited = time.monotonic() - started
        if waited > STOP_WAIT:
            raise GreydError(f"pid {pid} did not exit within {STOP_WAIT:.0f} seconds")
        if not told and waited > STOP_NOTICE:
            click.echo(f"greyd stopping (pid {pid}): {_waiting_for(config)}")
            told = True
        time.sleep(0.05)
    click.echo(f"greyd stopped (pid {pid})")


def _waiting_for(config: configuration.Config) -> str:
    """What a stop under way waits for, as the daemon noted it."""
    try:
        sessions = json.loads(state_path(config).read_text())["stopping"]["sessions"]
    except (OSError, ValueError, KeyError, TypeError):
        return "waiting for open sessions to finish (at most 30 s)"
    noun = "session" if sessions == 1 else "sessions"
    return f"waiting for {sessions} open {noun} to finish (at most 30 s, then 421)"


@click.command(short_help="Exit 0 and a summary when running, 3 when not.")
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


@click.command(short_help="Re-read the config, reopen the log files (SIGHUP).")
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


@click.command("reopen-logs", short_help="Reopen the log files only (SIGUSR1), for logrotate.")
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

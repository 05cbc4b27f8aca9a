"""What every `greyd` command shares: one-line errors, the config, the store,
the way times are shown.

Kept apart from cli.py so that command modules (cli_*.py) can use it and
cli.py can register them without a circular import.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import click

from . import config as configuration
from .storage import StoreError
from .queries import Queries
from .store import Store
from .values import ConfigError

if TYPE_CHECKING:       # imported where used: a command that needs neither starts faster
    from .greylist import Greylister
    from .tls import Certificate


class GreydError(click.ClickException):
    """An error shown as one line: 'greyd: <message>', exit status 1."""

    def show(self, file=None) -> None:
        click.echo(f"greyd: {self.format_message()}", err=True)


def load_certificate(config: configuration.Config) -> Certificate | None:
    """STARTTLS's certificate as config.tls names it; a GreydError naming the
    key when it cannot be served."""
    from . import tls
    try:
        return tls.load(config.tls)
    except tls.TlsError as error:
        raise GreydError(str(error)) from None


def load_config(ctx: click.Context, *, announce: bool = True) -> configuration.Config:
    """The config the -c option, $GREYD_CONFIG or the search path names.

    On a terminal, unless `announce` is off, one line on standard error says
    which config that is when it is not the host's system config, so the
    database a command reads or writes is never a surprise.
    """
    try:
        cwd = Path.cwd()
    except FileNotFoundError:
        raise GreydError("the working directory no longer exists; "
                         "change to another one or give -c PATH") from None
    try:
        path = configuration.find(ctx.find_root().obj["config"], os.environ, cwd)
        config = configuration.load(path)
    except ConfigError as error:
        raise GreydError(f"config: {error}") from None
    if announce and path != configuration.SYSTEM_CONFIG and sys.stderr.isatty():
        where = (f"config {config.source}" if config.source
                 else f"built-in defaults (no config file; state under {config.root})")
        click.echo(f"greyd: using {where}", err=True)
    return config


def missing_database(path: Path) -> GreydError:
    return GreydError(f"no database at {path}; is greyd configured here? "
                      "(greyd start creates it; -c names another config)")


@contextmanager
def open_store(config: configuration.Config, *, write: bool = True,
               create: bool | None = None) -> Iterator[Queries]:
    """The store, migrated, for a command: a SQLite Store, or a PgStore when
    database.url is set. Database errors become one line.

    A store that does not exist (no file; no greyd tables in the database)
    is created only when `create` (by default: for a command that writes),
    saying so on a terminal; otherwise the command is refused
    (missing_database), never shown an empty store.
    """
    create = write if create is None else create
    database = config.database
    opener = _open_postgresql if database.url else _open_sqlite
    try:
        store = opener(database, create)
    except database_errors() + (OSError,) as error:
        raise GreydError(f"database: {database.where}: {describe(error)}") from None
    try:
        if write:
            store.migrate()
        yield store
    except database_errors() as error:
        raise GreydError(f"database: {database.where}: {describe(error)}") from None
    finally:
        store.close()


def _open_sqlite(database, create: bool) -> Store:
    path = database.path
    if not path.exists():
        if not create:
            raise missing_database(path)
        if sys.stderr.isatty():
            click.echo(f"greyd: creating the database {path}", err=True)
        path.parent.mkdir(parents=True, exist_ok=True)
    return Store(path)


def _open_postgresql(database, create: bool) -> Queries:
    try:
        from .postgres import PgStore
    except ImportError:
        raise GreydError("database.url needs psycopg: pip install 'greyd[postgresql]'") from None
    store = PgStore.open(database.url, timeout=database.timeout)
    if not create and store.schema_version() == 0:
        store.close()
        raise GreydError(f"no greyd tables in the database {database.where}; is greyd"
                         " configured here? (greyd start creates them; -c names another config)")
    return store


@contextmanager
def open_greylister(config: configuration.Config) -> Iterator[Greylister]:
    """The daemon's greylister over the configured store, for reading
    (`greyd explain`), on the store's time base; a store that does not
    exist is refused, not created. Store errors become one line."""
    from .greylist import Greylister, backend_for
    with open_store(config, write=False):
        pass                     # refuses a missing store, with the command's words
    backend = backend_for(config)
    try:
        yield Greylister(config, backend, clock=backend.time_base(time.time))
    except StoreError as error:
        raise GreydError(f"database: {config.database.where}: {error}") from None
    finally:
        backend.close()


def database_errors() -> tuple[type[BaseException], ...]:
    """What a database driver raises: sqlite3's errors, and psycopg's once loaded."""
    psycopg = sys.modules.get("psycopg")
    return (sqlite3.Error, psycopg.Error) if psycopg else (sqlite3.Error,)


def describe(error: BaseException) -> str:
    """An error as one line without Python's "[Errno N]": what failed, and
    on which file."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return where + error.strerror
    return " ".join(str(error).split())


def when(timestamp: int | None, *, zone: bool = True) -> str:
    """A Unix time as the CLI shows it, in local time; None is "never"."""
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S" + (" %z" if zone else ""),
                         time.localtime(timestamp))


def echo_json(document) -> None:
    """One JSON document on standard output, for scripts."""
    click.echo(json.dumps(document, indent=2, sort_keys=False))

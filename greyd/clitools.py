"""What every `greyd` command shares: one-line errors, the config, the store,
the way times are shown.

Kept apart from cli.py so that command modules (cli_*.py) can use it and
cli.py can register them without a circular import.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from . import config as configuration, tls
from .greylist import Greylister
from .pool import StorePool
from .storage import StoreError
from .store import Store
from .tls import Certificate
from .values import ConfigError


class GreydError(click.ClickException):
    """An error shown as one line: 'greyd: <message>', exit status 1."""

    def show(self, file=None) -> None:
        click.echo(f"greyd: {self.format_message()}", err=True)


def load_certificate(config: configuration.Config) -> Certificate | None:
    """STARTTLS's certificate as config.tls names it; a GreydError naming the
    key when it cannot be served."""
    try:
        return tls.load(config.tls)
    except tls.TlsError as error:
        raise GreydError(str(error)) from None


def load_config(ctx: click.Context) -> configuration.Config:
    """The config the -c option, $GREYD_CONFIG or the search path names."""
    try:
        path = configuration.find(ctx.find_root().obj["config"], os.environ, Path.cwd())
        return configuration.load(path)
    except ConfigError as error:
        raise GreydError(f"config: {error}") from None


@contextmanager
def open_store(config: configuration.Config, *, write: bool = True) -> Iterator[Store]:
    """The database, migrated, for a command; sqlite errors become one line.

    With write=False a database that does not exist yet is not created: the
    command sees an empty in-memory one instead.
    """
    path = config.database.path
    try:
        if write or path.exists():
            if write:
                path.parent.mkdir(parents=True, exist_ok=True)
            store = Store(path)
        else:
            store = Store(":memory:")
        if write or not path.exists():
            store.migrate()
    except (sqlite3.Error, OSError) as error:
        raise GreydError(f"database: {path}: {error}") from None
    try:
        yield store
    except sqlite3.Error as error:
        raise GreydError(f"database: {path}: {error}") from None
    finally:
        store.close()


@contextmanager
def open_greylister(config: configuration.Config) -> Iterator[Greylister]:
    """The daemon's greylister over the configured store, for reading
    (`greyd explain`): a database that does not exist yet is not created,
    an empty in-memory one stands in. Store errors become one line."""
    path = config.database.path
    backend = StorePool(path if path.exists() else ":memory:")
    try:
        yield Greylister(config, backend)
    except StoreError as error:
        raise GreydError(f"database: {path}: {error}") from None
    finally:
        backend.close()


def when(timestamp: int | None, *, zone: bool = True) -> str:
    """A Unix time as the CLI shows it, in local time; None is "never"."""
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S" + (" %z" if zone else ""),
                         time.localtime(timestamp))


def echo_json(document) -> None:
    """One JSON document on standard output, for scripts."""
    click.echo(json.dumps(document, indent=2, sort_keys=False))

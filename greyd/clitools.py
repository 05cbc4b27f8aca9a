"""What every `greyd` command shares: one-line errors, the config, the store.

Kept apart from cli.py so that command modules (cli_*.py) can use it and
cli.py can register them without a circular import.
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click

from . import config as configuration
from .store import Store


class GreydError(click.ClickException):
    """An error shown as one line: 'greyd: <message>', exit status 1."""

    def show(self, file=None) -> None:
        click.echo(f"greyd: {self.format_message()}", err=True)


def load_config(ctx: click.Context) -> configuration.Config:
    """The config the -c option, $GREYD_CONFIG or the search path names."""
    try:
        path = configuration.find(ctx.find_root().obj["config"], os.environ, Path.cwd())
        return configuration.load(path)
    except configuration.ConfigError as error:
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


def echo_json(document) -> None:
    """One JSON document on standard output, for scripts."""
    click.echo(json.dumps(document, indent=2, sort_keys=False))

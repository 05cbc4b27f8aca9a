"""`greyd store copy`: the configured store, copied into another one.

Reads the option and the config, opens both stores (the target created or
migrated by greyd, as any writing command does), refuses a copy onto the
store itself, lets storecopy.py copy, and prints one summary line. Errors
are one line; a password in --to is never shown, not even inside a
driver's message.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import unquote, urlsplit

import click

from . import maintenance, storecopy, values
from .clitools import GreydError, database_errors, describe, load_config, open_store
from .values import ConfigError

NOUNS = {"triplets": ("triplet", "triplets"),
         "whitelist": ("whitelist entry", "whitelist entries"),
         "auto_whitelist": ("auto-whitelist entry", "auto-whitelist entries"),
         "counters": ("counter", "counters")}


@click.group(short_help="Work on the store as a whole: copy it.")
def store() -> None:
    """Work on the store as a whole.

    \b
    Example:
      greyd store copy --to postgresql://greyd@db.example.net/greyd
    """


@store.command(short_help="Copy the store into another database.")
@click.option("--to", "target", required=True, metavar="URL_OR_PATH",
              help="The store to copy into: a postgresql:// URL, libpq keywords "
                   "(host=… dbname=…), or an SQLite file (created if absent).")
@click.pass_context
def copy(ctx: click.Context, target: str) -> None:
    """Copy the configured store into another one, SQLite or PostgreSQL.

    Copies the triplets with all their times, the static whitelist (comments,
    expiry), the auto-whitelist and the decision counters; greyd creates or
    migrates the target's schema when it has none. The source is read in one
    snapshot, so the daemon may keep serving mail on it; the target is
    written in batches of 5,000 rows, each its own transaction.

    Idempotent: a row of the target with the same key as one of the source
    (the same triplet, whitelist entry, network or counter minute) takes the
    source's values, counts included (they are not added up); rows only in
    the target are kept; copying again changes only what has changed in the
    source since. To start the target afresh, copy into an empty one.

    A password in --to is never printed, but a command line is visible to
    the other users of the host: prefer ~/.pgpass or $PGPASSWORD.

    \b
    Examples:
      greyd store copy --to postgresql://greyd@db.example.net:5432/greyd
      greyd store copy --to 'host=db.example.net dbname=greyd user=greyd'
      greyd store copy --to /var/backups/greyd.db
    """
    config = load_config(ctx)
    database = _target(config.database, target)
    try:
        with open_store(config, write=False) as source, \
                open_store(dataclasses.replace(config, database=database),
                           create=True) as copy_:
            if _same_store(source, copy_):
                raise GreydError(f"--to names the configured store itself ({database.where}):"
                                 " nothing to copy")
            counts = _copy(source, copy_, database.where)
    except GreydError as error:
        raise GreydError(_scrub(error.format_message(), target)) from None
    copied = ", ".join(f"{n} {NOUNS[table][n != 1]}" for table, n in counts.items())
    click.echo(f"copied {copied} to {database.where}")


def _target(database, target: str):
    """The [database] settings that name --to: a URL or keywords, else a file."""
    text = target.strip()
    if not text:
        raise click.UsageError("--to: names no store (a postgresql:// URL or a file path)")
    if "://" in text or "=" in text:
        try:
            url = values.database_url(text, "--to")
        except ConfigError as error:
            raise click.UsageError(_scrub(str(error), target)) from None
        return dataclasses.replace(database, url=url)
    return dataclasses.replace(database, url="", path=Path(text).absolute())


def _same_store(source, target) -> bool:
    """Whether two open stores are one: the same file, or the same database
    on the same server (as libpq reached it)."""
    if hasattr(source, "path") and hasattr(target, "path"):
        return os.path.samefile(source.path, target.path)
    if hasattr(source.conn, "raw") and hasattr(target.conn, "raw"):
        return _server(source.conn.raw.info) == _server(target.conn.raw.info)
    return False


def _server(info) -> tuple:
    return info.hostaddr or info.host, info.port, info.dbname


def _copy(source, target, where: str) -> dict[str, int]:
    """storecopy.copy, with a progress bar on a terminal for a large store."""
    total = maintenance.count_triplets(source.conn) if sys.stdout.isatty() else 0
    large = total > maintenance.LARGE_STORE
    bar = click.progressbar(length=total, label="copying triplets") if large else nullcontext()

    def progress(table: str, rows: int) -> None:
        if table == "triplets":
            bar.update(rows)

    try:
        with bar:
            return storecopy.copy(source.conn, target.conn,
                                  progress=progress if large else None)
    except database_errors() as error:
        raise GreydError(f"copying into {where}: {describe(error)}") from None
    except storecopy.SchemaMismatch as error:
        raise GreydError(f"copying into {where}: {error}") from None


def _scrub(message: str, target: str) -> str:
    """`message` without the password of `target`, wherever it appears."""
    message = values.redact_url(message)
    for password in _passwords(target):
        message = message.replace(password, "***")
    return message


def _passwords(target: str) -> set[str]:
    found: set[str] = set()
    if "://" in target:
        try:
            password = urlsplit(target.strip()).password
        except ValueError:
            password = None
        if password:
            found |= {password, unquote(password)}
    for match in re.finditer(r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|[^\s&]+)", target):
        found |= {match.group(1), match.group(1).strip("'")}
    return {password for password in found if password}

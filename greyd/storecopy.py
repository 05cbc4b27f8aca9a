"""Copying one greyd store into another: SQLite or PostgreSQL, either way.

`copy` reads every table that decides or reports (TABLES) from the source
in one read transaction (`snapshot`), a batch at a time in key order, and
upserts each batch into the target in a write transaction of its own, so
memory stays bounded whatever the store's size. A row already in the
target takes the source's values (only a real difference is written, so a
second copy writes nothing); a row only in the target stays. The `meta`
table is each store's own: its schema version, and its whitelist version,
which the target's triggers advance for each whitelist row the copy
changes, so a daemon on the target reloads its whitelist.

Both connections take greyd's SQL (queries.py); creating or migrating the
target's schema is the store's (store.py, postgres.py). No CLI here
(cli_store.py), and nothing that knows which engine is on either side
beyond `snapshot`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator

from .queries import transaction

BATCH_SIZE = 5000        # rows per read of the source and per write transaction of the target

# progress(table, rows copied in this batch)
Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class Table:
    """A table that is copied: its primary key, and the rest of its columns."""

    name: str
    key: tuple[str, ...]
    rest: tuple[str, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return self.key + self.rest


TABLES = (
    Table("triplets", ("network", "sender", "recipient"),
          ("first_seen", "last_seen", "passed_at")),
    Table("whitelist", ("kind", "value"), ("comment", "added", "expires")),
    Table("auto_whitelist", ("network",), ("count", "first_seen", "last_seen", "last_counted")),
    Table("counters", ("hour", "action", "reason"), ("count",)),
)
NOT_COPIED = ("meta",)   # each store's own versions


class SchemaMismatch(Exception):
    """A store's table has other columns than the copy knows: copying would lose some."""


def copy(source, target, *, batch_size: int = BATCH_SIZE,
         progress: Progress | None = None) -> dict[str, int]:
    """Copy every table of TABLES from the `source` connection into the
    `target` connection (both migrated); the rows copied, by table.

    The source is read in one snapshot: the copy is the store as it was at
    one moment, even while a daemon writes to it.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    with snapshot(source):
        for table in TABLES:
            for conn in (source, target):
                _check_columns(conn, table)
        return {table.name: _copy_table(source, target, table, batch_size, progress)
                for table in TABLES}


@contextmanager
def snapshot(conn) -> Iterator[None]:
    """One read transaction on `conn`: every read inside sees the same moment.
    On SQLite a deferred BEGIN (WAL: the snapshot of the first read); a
    PostgreSQL connection brings its own (`Connection.snapshot`)."""
    if hasattr(conn, "snapshot"):
        with conn.snapshot():
            yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.rollback()


def _check_columns(conn, table: Table) -> None:
    cursor = conn.execute(f"SELECT * FROM {table.name} LIMIT 0")
    found = tuple(column[0] for column in cursor.description)
    cursor.fetchall()
    if set(found) != set(table.columns):
        raise SchemaMismatch(f"table {table.name} has the columns {', '.join(found)};"
                             f" this greyd copies {', '.join(table.columns)}")


def _copy_table(source, target, table: Table, batch_size: int,
                progress: Progress | None) -> int:
    copied = 0
    for batch in _batches(source, table, batch_size):
        with transaction(target):
            target.executemany(_upsert_sql(table), batch)
        copied += len(batch)
        if progress is not None:
            progress(table.name, len(batch))
    return copied


def _batches(conn, table: Table, batch_size: int) -> Iterator[list[tuple]]:
    """The rows of `table` in key order, `batch_size` at a time; each batch one
    read that starts where the last ended (a row-value range on the key)."""
    columns, key = ", ".join(table.columns), ", ".join(table.key)
    select = f"SELECT {columns} FROM {table.name}"
    order = f" ORDER BY {key} LIMIT ?"
    after = f" WHERE ({key}) > ({', '.join('?' for _ in table.key)})"
    batch = conn.execute(select + order, (batch_size,)).fetchall()
    while batch:
        yield batch
        if len(batch) < batch_size:
            return
        last = tuple(batch[-1][:len(table.key)])
        batch = conn.execute(select + after + order, (*last, batch_size)).fetchall()


@lru_cache(maxsize=None)
def _upsert_sql(table: Table) -> str:
    """Insert a row, or give the row of the same key the source's values;
    a row that already has them is not written (no trigger fires)."""
    return (f"INSERT INTO {table.name} AS t ({', '.join(table.columns)})"
            f" VALUES ({', '.join('?' for _ in table.columns)})"
            f" ON CONFLICT ({', '.join(table.key)}) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in table.rest)
            + " WHERE "
            + " OR ".join(f"t.{c} IS DISTINCT FROM excluded.{c}" for c in table.rest))

"""greyd's state in PostgreSQL, through psycopg 3: the schema and one connection.

`Connection` wraps a psycopg connection so that it takes the SQL greyd
writes for SQLite (queries.py, maintenance.py): `?` and `:name`
placeholders become psycopg's `%s` and `%(name)s`, and `transaction()` is
psycopg's own. `PgStore` is one such connection and the queries greyd runs
on it (`queries.Queries`); it owns the PostgreSQL schema, versioned in the
`meta` table and migrated forward under an advisory lock, so two hosts
starting at once migrate one after the other. The daemon's connections
are pooled by pgpool.py; a CLI command opens one PgStore.

Connections run in autocommit: a read is its own snapshot, and every
write is an explicit transaction. The text columns of keys are in the "C"
collation, so keys sort by their bytes as on SQLite, and `triplets list`
and cleanup's walk in key order agree on both.
"""

from __future__ import annotations

import itertools
import json
import re
from contextlib import AbstractContextManager, contextmanager
from functools import lru_cache
from typing import Iterator

import psycopg
from psycopg import conninfo, errors, pq

from .queries import FACTS_SQL, Queries, transaction

MIGRATE_LOCK = 0x67726579   # advisory lock key ("grey") held while migrating
CLEANUP_LOCK = 0x67726563   # ... and while a cleanup runs, on any host

_SCHEMA_1 = """
CREATE TABLE triplets (
    network text COLLATE "C" NOT NULL, sender text COLLATE "C" NOT NULL,
    recipient text COLLATE "C" NOT NULL,
    first_seen double precision NOT NULL, last_seen bigint NOT NULL, passed_at bigint,
    PRIMARY KEY (network, sender, recipient));
CREATE TABLE auto_whitelist (
    network text COLLATE "C" PRIMARY KEY, count integer NOT NULL, first_seen bigint,
    last_seen bigint NOT NULL, last_counted bigint);
CREATE TABLE whitelist (
    kind text COLLATE "C" NOT NULL, value text COLLATE "C" NOT NULL,
    comment text NOT NULL DEFAULT '', added bigint, expires bigint,
    PRIMARY KEY (kind, value));
CREATE TABLE counters (
    hour bigint NOT NULL, action text COLLATE "C" NOT NULL, reason text COLLATE "C" NOT NULL,
    count integer NOT NULL, PRIMARY KEY (hour, action, reason));
CREATE TABLE meta (key text PRIMARY KEY, value bigint);
INSERT INTO meta VALUES ('whitelist_version', 0), ('schema_version', 0);
CREATE FUNCTION greyd_whitelist_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN UPDATE meta SET value = value + 1 WHERE key = 'whitelist_version'; RETURN NULL; END $$;
CREATE TRIGGER whitelist_changed AFTER INSERT OR UPDATE OR DELETE ON whitelist
    FOR EACH ROW EXECUTE FUNCTION greyd_whitelist_changed();
"""

MIGRATIONS = [_SCHEMA_1]

_FRESH_JSON = (
    "INSERT INTO triplets (network, sender, recipient, first_seen, last_seen)"
    " SELECT r->>0, r->>1, r->>2, (r->>3)::float8, (r->>4)::bigint"
    " FROM json_array_elements(%s::json) AS r"
    " ON CONFLICT (network, sender, recipient) DO UPDATE SET"
    " first_seen = excluded.first_seen, last_seen = excluded.last_seen, passed_at = NULL")
_COUNTS_JSON = (
    "INSERT INTO counters (hour, action, reason, count)"
    " SELECT (r->>0)::bigint, r->>1, r->>2, (r->>3)::int"
    " FROM json_array_elements(%s::json) AS r"
    " ON CONFLICT (hour, action, reason) DO UPDATE SET count = counters.count + excluded.count")
FACTS_STATEMENT = b"greyd_facts"    # FACTS_SQL, prepared on each connection by its name
_FACTS_TYPES = (int, int, int, float, int, int)     # its columns, read from their text
# SQLSTATEs after which it is prepared again: no such prepared statement, and
# "cached plan must not change result type" (feature not supported).
_PREPARE_AGAIN = (b"26000", b"0A000")

SCHEMA_VERSION = len(MIGRATIONS)

_PLACEHOLDERS = re.compile(r"'(?:[^']|'')*'|::|%|\?|:(\w+)")


def numbered(sql: str) -> str:
    """greyd's SQL with `?` placeholders as libpq itself takes it: $1, $2, …"""
    number = itertools.count(1)
    return _PLACEHOLDERS.sub(
        lambda match: f"${next(number)}" if match.group(0) == "?" else match.group(0), sql)


@lru_cache(maxsize=256)
def translate(sql: str) -> str:
    """greyd's SQL text as psycopg takes it: `?` → `%s`, `:name` → `%(name)s`,
    a literal `%` doubled; quoted strings and `::` casts left alone."""
    def one(match: re.Match) -> str:
        text = match.group(0)
        if text == "?":
            return "%s"
        if text == "%":
            return "%%"
        if match.group(1):
            return f"%({match.group(1)})s"
        return text
    return _PLACEHOLDERS.sub(one, sql)


class Connection:
    """A psycopg connection that runs greyd's SQL (see `translate`)."""

    dialect = "postgresql"

    def __init__(self, raw: psycopg.Connection):
        self.raw = raw

    def execute(self, sql: str, params=()) -> psycopg.Cursor:
        return self.raw.execute(translate(sql), params)

    def executemany(self, sql: str, rows) -> psycopg.Cursor:
        cursor = self.raw.cursor()
        cursor.executemany(translate(sql), list(rows))
        return cursor

    def transaction(self) -> AbstractContextManager:
        return self.raw.transaction()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """One read-only transaction whose reads all see the same moment
        (REPEATABLE READ): a copy of the whole store (storecopy.py)."""
        raw = self.raw
        saved = raw.isolation_level, raw.read_only
        raw.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        raw.read_only = True
        try:
            with raw.transaction():
                yield
        finally:
            if not raw.closed:       # a lost connection keeps its error, not the setter's
                raw.isolation_level, raw.read_only = saved

    def close(self) -> None:
        self.raw.close()


def _checked(result: pq.abc.PGresult) -> pq.abc.PGresult:
    """A libpq result that succeeded, or the psycopg error its SQLSTATE
    names (OperationalError when it has none: the server went away)."""
    if result.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        return result
    sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
    try:
        kind = errors.lookup(sqlstate.decode()) if sqlstate else psycopg.OperationalError
    except KeyError:
        kind = psycopg.DatabaseError
    raise kind(result.error_message.decode(errors="replace").strip() or "no result")


def connect_settings(url: str, timeout: float | None) -> dict:
    """How greyd connects: in autocommit, and within `timeout` (libpq's
    connect_timeout: whole seconds, at least 2) unless the URL sets its own.
    psycopg.ProgrammingError names what is wrong with a bad URL."""
    settings: dict = {"autocommit": True}
    if timeout is not None and "connect_timeout" not in conninfo.conninfo_to_dict(url):
        settings["connect_timeout"] = max(2, -int(-timeout // 1))
    return settings


def connect(url: str, *, timeout: float | None = None) -> psycopg.Connection:
    """A connection to the database `url` names; psycopg.Error when it cannot."""
    return psycopg.connect(url, **connect_settings(url, timeout))


class PgStore(Queries):
    """One PostgreSQL connection, and the queries greyd runs on it."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._facts_ready = False           # FACTS_STATEMENT is prepared on this connection

    @classmethod
    def open(cls, url: str, *, timeout: float | None = None) -> "PgStore":
        return cls(Connection(connect(url, timeout=timeout)))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "PgStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what a decision reads and writes, in one prepared statement each ---------

    def _facts_row(self, params: tuple) -> tuple | None:
        """The facts of one decision (FACTS_SQL), through libpq itself
        (psycopg.pq): a statement prepared once per connection, its
        parameters and columns as text. psycopg's cursor around it (adapting,
        the prepared-statement cache, loading the row) cost about three
        times the CPU of the call itself. The thread still lets go of the
        GIL while it waits for the server."""
        raw = self.conn.raw
        pgconn, encoding = raw.pgconn, raw.info.encoding
        values = [str(value).encode(encoding) for value in params]
        if not self._facts_ready:
            self._prepare_facts(pgconn)
        result = pgconn.exec_prepared(FACTS_STATEMENT, values)
        if result.error_field(pq.DiagnosticField.SQLSTATE) in _PREPARE_AGAIN:
            # Dropped by a reset of the session (DISCARD ALL, a pooler's), or
            # planned before a migration changed a column: once more, anew.
            pgconn.exec_(b"DEALLOCATE " + FACTS_STATEMENT)      # gone already: no matter
            self._prepare_facts(pgconn)
            result = pgconn.exec_prepared(FACTS_STATEMENT, values)
        _checked(result)
        if not result.ntuples:
            return None
        value = result.get_value
        return tuple(None if (text := value(0, column)) is None else kind(text)
                     for column, kind in enumerate(_FACTS_TYPES))

    def _prepare_facts(self, pgconn: pq.abc.PGconn) -> None:
        _checked(pgconn.prepare(FACTS_STATEMENT, numbered(FACTS_SQL).encode()))
        self._facts_ready = True

    def _insert_rows(self, rows: list[tuple]) -> None:
        """The run of new triplets in one statement whatever its length, the
        rows as one JSON array: json.dumps writes it in C, where psycopg
        dumps arrays element by element in Python, and a multi-row VALUES
        list of many placeholders is parsed anew for every lot."""
        self.conn.raw.execute(_FRESH_JSON, (json.dumps(rows),))

    def _add_counts(self, rows: list[tuple]) -> None:
        if rows:
            self.conn.raw.execute(_COUNTS_JSON, (json.dumps(rows),))

    # -- schema -------------------------------------------------------------

    def schema_version(self) -> int:
        """The schema's version here; 0 for a database greyd has not set up."""
        if self.conn.execute("SELECT to_regclass('meta')").fetchone()[0] is None:
            return 0
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return row[0] if row else 0

    def is_current(self) -> bool:
        return self.schema_version() == SCHEMA_VERSION

    def migrate(self) -> None:
        """Bring the schema up to SCHEMA_VERSION. Idempotent; hosts take turns."""
        with transaction(self.conn):
            self.conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATE_LOCK,))
            version = self.schema_version()
            if version > SCHEMA_VERSION:
                raise psycopg.DataError(
                    f"schema version {version} is newer than this greyd ({SCHEMA_VERSION})")
            for number in range(version, SCHEMA_VERSION):
                self.conn.raw.execute(MIGRATIONS[number])
                self.conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                                  (number + 1,))

    def check_writable(self) -> None:
        """Raise psycopg.Error unless this role can write greyd's tables."""
        with self.conn.raw.transaction(force_rollback=True):
            self.conn.execute(
                "UPDATE meta SET value = value WHERE key = 'whitelist_version'")

    def now(self) -> float:
        """The database server's clock: the one time base of every host."""
        return self.conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8"
                                 ).fetchone()[0]

    def lock_cleanup(self) -> bool:
        """Take the cleanup's lock for this connection's life (an advisory lock:
        released when it closes, even by a crash); False when another
        connection, on any host, holds it."""
        return self.conn.execute("SELECT pg_try_advisory_lock(?)", (CLEANUP_LOCK,)).fetchone()[0]

"""The store of the greyd under test: SQLite (a file per greyd) or PostgreSQL.

Owns: --store and --database-url made concrete: the benchmark's own
throwaway PostgreSQL server (bench/pgserver.py: initdb in a temporary
directory, on 127.0.0.1, removed at the end) or the server the URL names;
a fresh greyd store for every greyd started there (greyd's tables dropped);
what the header and --json say about it; and, for the store section,
filling PostgreSQL with triplets (COPY), its size, and expiring its
triplets. Must not: time anything, or change greyd's schema (greyd sets it
up; this only checks the columns it fills).
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from pathlib import Path

from bench.processes import BenchError
from bench.report import progress

SQLITE, POSTGRESQL = "sqlite", "postgresql"
GET_POSTGRESQL = "sudo apt-get install -y postgresql   # the bench runs its own server"
GREYD_TABLES = ("triplets", "auto_whitelist", "whitelist", "counters", "meta")
TRIPLET_COLUMNS = ("network", "sender", "recipient", "first_seen", "last_seen", "passed_at")
COPY_BATCH = 100_000            # triplets per COPY (a transaction each)
DAY = 86400


class Database:
    """Where the greyds of this run keep their state."""

    def __init__(self, store: str, url: str | None = None, where: str = ""):
        self.store, self.url, self.where = store, url, where
        self.version = ""

    @classmethod
    def open(cls, args, workdir: Path, stack: ExitStack) -> Database:
        """SQLite; or PostgreSQL at args.database_url, or on a server of our own
        (stopped and removed by `stack`). BenchError when it cannot be had."""
        if args.store == SQLITE:
            return cls(SQLITE)
        try:
            import psycopg  # noqa: F401  (greyd's postgresql extra)
        except ImportError:
            raise BenchError("--store postgresql needs psycopg: pip install -e '.[postgresql]'")
        if args.database_url:
            database = cls(POSTGRESQL, args.database_url, "given by --database-url")
        else:
            from bench.pgserver import PgServer, binaries
            if binaries() is None:
                raise BenchError("PostgreSQL binaries (initdb, pg_ctl, postgres) not found; "
                                 f"get them with:\n  {GET_POSTGRESQL}")
            progress("postgresql: initdb and start of the benchmark's own server")
            server = PgServer(workdir, durable=True)
            stack.enter_context(server)
            url = server.create_database("greyd_bench")
            database = cls(POSTGRESQL, url, f"the benchmark's own server on 127.0.0.1:"
                           f"{server.port} (initdb in {server.home}; fsync on, defaults)")
        with database.connect() as conn:
            database.version = conn.execute("SHOW server_version").fetchone()[0].split()[0]
        return database

    @property
    def label(self) -> str:
        if self.store == SQLITE:
            return "SQLite (a database file per greyd)"
        return f"PostgreSQL {self.version}, {self.where}"

    def as_json(self) -> dict:
        found = {"store": self.store}
        if self.url:
            from greyd.values import redact_url
            found.update(url=redact_url(self.url), server=self.where, version=self.version)
        return found

    def fresh(self) -> str | None:
        """For a greyd about to start: the URL of an empty PostgreSQL store
        (greyd's tables dropped: greyd sets them up anew); None for SQLite."""
        if self.url is None:
            return None
        with self.connect() as conn:
            conn.execute("DROP TABLE IF EXISTS " + ", ".join(GREYD_TABLES) + " CASCADE")
            conn.execute("DROP FUNCTION IF EXISTS greyd_whitelist_changed() CASCADE")
        return self.url

    def connect(self):
        import psycopg
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except psycopg.Error as error:
            raise BenchError(f"PostgreSQL: {' '.join(str(error).split())}") from None

    # -- the store section ------------------------------------------------------

    def build(self, space, count: int, now: int, rng, rows) -> float:
        """A fresh greyd store holding `count` live triplets, `rows(space, start,
        stop, now, rng)` (bench.triplets), streamed in with COPY in random key
        order, as traffic would; then VACUUM ANALYZE and a checkpoint (as SQLite's
        is checkpointed), so no write-back of the fill runs into what is
        timed next. The seconds it took."""
        from greyd.postgres import PgStore
        started = time.perf_counter()
        self.fresh()
        with PgStore.open(self.url) as store:
            store.migrate()
        with self.connect() as conn:
            self._check_columns(conn)
            conn.execute("SET synchronous_commit = off")    # this session's commits only
            copy_sql = f"COPY triplets ({', '.join(TRIPLET_COLUMNS)}) FROM STDIN"
            for start in range(0, count, COPY_BATCH):
                stop = min(count, start + COPY_BATCH)
                with conn.cursor() as cursor, cursor.copy(copy_sql) as copy:
                    for row in rows(space, start, stop, now, rng):
                        copy.write_row(row)
                progress(f"store: {stop:,} of {count:,} triplets (COPY)")
            settle(conn)
        return time.perf_counter() - started

    @staticmethod
    def _check_columns(conn) -> None:
        columns = {row[0] for row in conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_name = 'triplets' AND table_schema = current_schema()")}
        if not set(TRIPLET_COLUMNS) <= columns:
            raise BenchError(f"the triplets table has changed: columns {sorted(columns)}")

    def figures(self) -> dict:
        """Triplets and the bytes of their table (heap, primary key index, TOAST)."""
        with self.connect() as conn:
            rows = conn.execute("SELECT count(*) FROM triplets").fetchone()[0]
            heap, total = conn.execute(
                "SELECT pg_relation_size('triplets'), pg_total_relation_size('triplets')"
            ).fetchone()
        return {"triplets": rows, "database_bytes": total, "heap_bytes": heap,
                "index_bytes": total - heap, "bytes_per_triplet": total / rows}

    def expire_all(self, cutoff: int) -> int:
        """Every triplet's times moved back 40 days (beyond max_age and
        retry_window), then VACUUM ANALYZE and a checkpoint; how many are
        older than `cutoff`."""
        shift = 40 * DAY
        with self.connect() as conn:
            conn.execute("UPDATE triplets SET first_seen = first_seen - %s,"
                         " last_seen = last_seen - %s, passed_at = passed_at - %s",
                         (shift, shift, shift))
            settle(conn)
        return self.count_expired(cutoff)

    def count_expired(self, cutoff: int) -> int:
        with self.connect() as conn:
            return conn.execute("SELECT count(*) FROM triplets WHERE last_seen < %s",
                                (cutoff,)).fetchone()[0]


def settle(conn) -> None:
    """VACUUM ANALYZE the triplets, then CHECKPOINT when this role may
    (a superuser, or pg_checkpoint's member), then sync: the fill's dead rows,
    statistics and dirty pages dealt with now, not while figures are taken.
    A checkpoint only hands its pages to the kernel, whose write-back to the
    disk would otherwise run under the decisions timed next (a server on
    this host: the benchmark's own)."""
    import psycopg
    conn.execute("VACUUM ANALYZE triplets")
    try:
        conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        pass
    os.sync()

"""greyd's state in SQLite, through sqlite-utils: triplets, whitelists, counters.

`Store` is one SQLite connection: it owns the schema (versioned by `PRAGMA
user_version`, migrated forward on open) and the connection settings (WAL,
a busy timeout so cron and the CLI can work beside the daemon); the
queries it answers are queries.py's, shared with PostgreSQL (postgres.py),
and `transaction` is the one way greyd writes. It knows nothing of SMTP;
`Store` implements `policy.Facts`. The connections of a daemon are pooled
by pool.py; the operator's queries are in maintenance.py.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .queries import Queries, transaction

BUSY_TIMEOUT = 5.0          # seconds a writer waits for another (cron, CLI)
MMAP_SIZE = 1 << 30         # bytes of the database file each connection maps

if TYPE_CHECKING:
    import sqlite_utils


def _migrate_1(db: sqlite_utils.Database) -> None:
    # WITHOUT ROWID keeps a triplet to its key and three numbers; first_seen keeps
    # its fraction (a REAL in an INTEGER column, as SQLite allows), the rest whole seconds.
    db.execute("""
        CREATE TABLE triplets (
            network TEXT NOT NULL, sender TEXT NOT NULL, recipient TEXT NOT NULL,
            first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL,
            passed_at INTEGER,
            PRIMARY KEY (network, sender, recipient)
        ) WITHOUT ROWID""")
    db["auto_whitelist"].create(
        {"network": str, "count": int, "first_seen": int, "last_seen": int,
         "last_counted": int}, pk="network", not_null={"count", "last_seen"})
    db["whitelist"].create(
        {"kind": str, "value": str, "comment": str, "added": int, "expires": int},
        pk=("kind", "value"), not_null={"kind", "value"}, defaults={"comment": ""})
    db["counters"].create(
        {"hour": int, "action": str, "reason": str, "count": int},
        pk=("hour", "action", "reason"), not_null={"count"})
    db["meta"].create({"key": str, "value": int}, pk="key")
    db["meta"].insert({"key": "whitelist_version", "value": 0})
    for event in ("INSERT", "UPDATE", "DELETE"):
        db.execute(f"""
            CREATE TRIGGER whitelist_{event.lower()} AFTER {event} ON whitelist
            BEGIN UPDATE meta SET value = value + 1 WHERE key = 'whitelist_version'; END""")


MIGRATIONS = [_migrate_1]
SCHEMA_VERSION = len(MIGRATIONS)


class Store(Queries):
    """One SQLite connection, and the queries greyd runs on it."""

    def __init__(self, path: Path | str, write_lock: threading.Lock | None = None):
        """`write_lock` is shared by the connections of one process (StorePool):
        its writers queue on it, fairly, instead of in SQLite's busy handler,
        whose sleeps let some of a hundred threads lose for seconds."""
        self.path = Path(path)
        conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT,
                               check_same_thread=False)
        self.conn = conn
        self._write_lock = write_lock or threading.Lock()
        conn.execute("PRAGMA recursive_triggers = on")     # as sqlite-utils sets it
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        # Per connection: with WAL, NORMAL syncs at checkpoints, not every commit.
        conn.execute("PRAGMA synchronous = NORMAL")
        # Pages read from the mapped file: no read() per page after another
        # connection's write has emptied this one's page cache.
        conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE}")

    @property
    def db(self) -> "sqlite_utils.Database":
        """sqlite-utils over this connection, for the schema: imported at the
        first use, since a connection that only queries never needs it and
        every greyd command would pay for its import."""
        import sqlite_utils
        return sqlite_utils.Database(self.conn)

    def close(self) -> None:
        self.conn.close()

    def retire(self) -> None:
        """Close a connection whose file has left the path (removed, replaced).

        SQLite keeps the -wal and -shm of a moved file at the path on close,
        and would replay that WAL into whatever database comes there next: so
        first checkpoint it into the old file and truncate it, without waiting.
        """
        try:
            self.conn.execute("PRAGMA busy_timeout = 0")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:
            pass
        self.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- schema -------------------------------------------------------------

    def is_current(self) -> bool:
        """At the schema version and in WAL mode: nothing for migrate() to do."""
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        mode = self.conn.execute("PRAGMA journal_mode").fetchone()[0]
        return version == SCHEMA_VERSION and mode == "wal"

    def migrate(self) -> None:
        """Bring the schema up to SCHEMA_VERSION; WAL on. Idempotent."""
        db = self.db
        db.enable_wal()
        # IMMEDIATE: two processes opening a new database migrate one after the other.
        with transaction(self.conn):
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this greyd ({SCHEMA_VERSION})")
            for number in range(version, SCHEMA_VERSION):
                MIGRATIONS[number](db)
                self.conn.execute(f"PRAGMA user_version = {number + 1}")

    def check_writable(self) -> None:
        """Raise sqlite3.Error unless this process can write the database."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            # A read-only file still lets BEGIN through; a real write does not.
            self.conn.execute(
                "UPDATE meta SET value = value WHERE key = 'whitelist_version'")
        finally:
            self.conn.execute("ROLLBACK")

    def now(self) -> float:
        """The time decisions are made by: this host's clock."""
        return time.time()

    def lock_cleanup(self) -> bool:
        """One host per file: cleanups take turns on SQLite's write lock."""
        return True

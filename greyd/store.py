"""greyd's state in SQLite, through sqlite-utils: triplets, whitelists, counters.

Owns the schema (versioned by `PRAGMA user_version`, migrated forward on
open), the connection settings (WAL, a busy timeout so cron and the CLI can
work beside the daemon) and every query. All SQL is parameterized. The hot
path of a decision is a handful of primary-key lookups and one short write
transaction. It knows nothing of SMTP; `Store` implements `policy.Facts`.
"""

from __future__ import annotations

import queue
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import sqlite_utils

from . import policy
from .policy import AutoEntry, Entry, Seen, Triplet, Verdict

BUSY_TIMEOUT = 5.0          # seconds a writer waits for another (cron, CLI)
AUTO_COUNT_INTERVAL = 3600  # a network earns at most one pass per hour
WHITELIST_KINDS = ("client", "hostname", "sender", "recipient")


def _migrate_1(db: sqlite_utils.Database) -> None:
    # WITHOUT ROWID keeps a triplet to its key and three integers.
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


class Store:
    """One SQLite connection and the queries greyd runs on it."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT,
                               check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self.conn = conn
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        self._whitelist: policy.Whitelist | None = None
        self._whitelist_version = -1

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- schema -------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema up to SCHEMA_VERSION; WAL on. Idempotent."""
        self.db.enable_wal()
        self.conn.execute("PRAGMA synchronous = NORMAL")
        # IMMEDIATE: two processes opening a new database migrate one after the other.
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this greyd ({SCHEMA_VERSION})")
            for number in range(version, SCHEMA_VERSION):
                MIGRATIONS[number](self.db)
                self.conn.execute(f"PRAGMA user_version = {number + 1}")
        except BaseException:
            self.conn.rollback()
            raise
        self.conn.commit()

    def check_writable(self) -> None:
        """Raise sqlite3.Error unless this process can write the database."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            # A read-only file still lets BEGIN through; a real write does not.
            self.conn.execute(
                "UPDATE meta SET value = value WHERE key = 'whitelist_version'")
        finally:
            self.conn.execute("ROLLBACK")

    # -- what the decision reads (policy.Facts) ------------------------------

    def whitelist(self) -> policy.Whitelist:
        """The static whitelist, reloaded only when it has changed."""
        version = self.conn.execute(
            "SELECT value FROM meta WHERE key = 'whitelist_version'").fetchone()[0]
        if version != self._whitelist_version or self._whitelist is None:
            rows = self.conn.execute("SELECT kind, value, expires FROM whitelist")
            self._whitelist = policy.Whitelist.build(Entry(*row) for row in rows)
            self._whitelist_version = version
        return self._whitelist

    def auto_entry(self, network: str) -> AutoEntry | None:
        row = self.conn.execute(
            "SELECT count, last_seen FROM auto_whitelist WHERE network = ?",
            (network,)).fetchone()
        return AutoEntry(*row) if row else None

    def seen(self, triplet: Triplet) -> Seen | None:
        row = self.conn.execute(
            "SELECT first_seen, last_seen, passed_at FROM triplets"
            " WHERE network = ? AND sender = ? AND recipient = ?",
            (triplet.network, triplet.sender, triplet.recipient)).fetchone()
        return Seen(*row) if row else None

    # -- what a decision writes ------------------------------------------------

    def record(self, verdict: Verdict, now: float, *, max_age: int) -> None:
        """Remember the outcome of one decision, and count it, in one transaction.

        `max_age` is greylist.max_age: an auto-whitelist count older than that
        starts again from one rather than reviving.
        """
        now = int(now)
        with self.db.atomic():
            self._apply(verdict, now, max_age)
            self.conn.execute(
                "INSERT INTO counters (hour, action, reason, count) VALUES (?, ?, ?, 1)"
                " ON CONFLICT (hour, action, reason) DO UPDATE SET count = count + 1",
                (now - now % 3600, verdict.action, counter_reason(verdict.reason)))

    def _apply(self, verdict: Verdict, now: int, max_age: int) -> None:
        update, t = verdict.update, verdict.triplet
        key = (t.network, t.sender, t.recipient) if t else ()
        if update in (policy.NEW, policy.RESTART):
            self.conn.execute(
                "INSERT INTO triplets (network, sender, recipient, first_seen, last_seen)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (network, sender, recipient)"
                " DO UPDATE SET first_seen = excluded.first_seen,"
                " last_seen = excluded.last_seen, passed_at = NULL",
                (*key, now, now))
        elif update == policy.EARLY:
            self.conn.execute(
                "UPDATE triplets SET last_seen = ?"
                " WHERE network = ? AND sender = ? AND recipient = ?", (now, *key))
        elif update in (policy.PASS, policy.KNOWN):
            self.conn.execute(
                "UPDATE triplets SET last_seen = ?, passed_at = coalesce(passed_at, ?)"
                " WHERE network = ? AND sender = ? AND recipient = ?", (now, now, *key))
            self._count_delivery(verdict.network, now, max_age)
        elif update == policy.AUTO:
            self.conn.execute(
                "UPDATE auto_whitelist SET last_seen = ? WHERE network = ?",
                (now, verdict.network))

    def _count_delivery(self, network: str, now: int, max_age: int) -> None:
        """One passed delivery for the auto-whitelist, counted at most hourly;
        a network unseen for max_age starts over."""
        self.conn.execute(
            "INSERT INTO auto_whitelist (network, count, first_seen, last_seen, last_counted)"
            " VALUES (:network, 1, :now, :now, :now) ON CONFLICT (network) DO UPDATE SET"
            " count = CASE WHEN :now - last_seen > :max_age THEN 1"
            "   ELSE count + (:now - last_counted >= :interval) END,"
            " first_seen = CASE WHEN :now - last_seen > :max_age THEN :now ELSE first_seen END,"
            " last_counted = CASE WHEN :now - last_seen > :max_age"
            "   OR :now - last_counted >= :interval THEN :now ELSE last_counted END,"
            " last_seen = :now",
            {"network": network, "now": now, "max_age": max_age,
             "interval": AUTO_COUNT_INTERVAL})

    # -- whitelist maintenance -------------------------------------------------

    def add_whitelist(self, kind: str, value: str, comment: str | None = None,
                      expires: int | None = None, now: float = 0) -> bool:
        """Add an entry; False when it was there already.

        An existing entry takes the new expiry (None: never), and the new
        comment when one is given; it keeps its `added` time.
        """
        _check_kind(kind)
        with self._writing():
            existed = self.conn.execute(
                "SELECT 1 FROM whitelist WHERE kind = ? AND value = ?",
                (kind, value)).fetchone()
            # Only a real change fires the triggers, so a daemon reloads only then.
            self.conn.execute(
                "INSERT INTO whitelist (kind, value, comment, added, expires)"
                " VALUES (:kind, :value, coalesce(:comment, ''), :now, :expires)"
                " ON CONFLICT (kind, value) DO UPDATE SET"
                " comment = coalesce(:comment, comment), expires = :expires"
                " WHERE comment IS NOT coalesce(:comment, comment) OR expires IS NOT :expires",
                {"kind": kind, "value": value, "comment": comment, "now": int(now),
                 "expires": expires})
        return existed is None

    def import_whitelist(self, entries: Iterable[tuple[str, str]], comment: str,
                         now: float) -> list[bool]:
        """Add many (kind, value) entries in one transaction; for each, whether
        it was added. A live entry is left as it is; an expired one is renewed."""
        now = int(now)
        added = []
        with self._writing():
            for kind, value in entries:
                _check_kind(kind)
                cursor = self.conn.execute(
                    "INSERT INTO whitelist (kind, value, comment, added, expires)"
                    " VALUES (?, ?, ?, ?, NULL) ON CONFLICT (kind, value) DO UPDATE SET"
                    " comment = excluded.comment, added = excluded.added, expires = NULL"
                    " WHERE expires IS NOT NULL AND expires <= excluded.added",
                    (kind, value, comment, now))
                added.append(cursor.rowcount == 1)
        return added

    def remove_whitelist(self, kind: str, value: str) -> bool:
        """Remove an entry; False when there was none."""
        _check_kind(kind)
        with self._writing():
            cursor = self.conn.execute(
                "DELETE FROM whitelist WHERE kind = ? AND value = ?", (kind, value))
        return cursor.rowcount == 1

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A write transaction that takes the write lock first (waiting up to the
        busy timeout), so a read inside it cannot go stale and fail with 'locked'."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.rollback()
            raise
        self.conn.commit()

    def whitelist_entries(self, kind: str | None = None) -> list[dict]:
        """Every entry (or every entry of one kind), expired ones included,
        by kind then value."""
        sql = "SELECT kind, value, comment, added, expires FROM whitelist"
        params: tuple = ()
        if kind is not None:
            _check_kind(kind)
            sql += " WHERE kind = ?"
            params = (kind,)
        columns = ("kind", "value", "comment", "added", "expires")
        rows = [dict(zip(columns, row)) for row in self.conn.execute(sql, params)]
        rank = {k: i for i, k in enumerate(WHITELIST_KINDS)}
        return sorted(rows, key=lambda row: (rank.get(row["kind"], len(rank)), row["value"]))


def _check_kind(kind: str) -> None:
    if kind not in WHITELIST_KINDS:
        raise ValueError(f"unknown whitelist kind: {kind}")


def counter_reason(reason: str) -> str:
    """The reason as counted: whitelist entries fold into one `whitelist`."""
    return "whitelist" if reason.startswith("whitelist:") else reason


class StorePool:
    """A few open Store connections shared by the sessions of one process.

    Opening an SQLite connection costs more than a whole decision, so
    sessions borrow one per decision and give it back.
    """

    def __init__(self, path: Path | str, keep: int = 8):
        self.path = Path(path)
        self._idle: queue.LifoQueue[Store] = queue.LifoQueue()
        self._keep = keep

    def open(self) -> None:
        """Create or migrate the database and check it is writable."""
        store = Store(self.path)
        try:
            store.migrate()
            store.check_writable()
        except BaseException:
            store.close()
            raise
        self._idle.put(store)

    @contextmanager
    def connection(self) -> Iterator[Store]:
        try:
            store = self._idle.get_nowait()
        except queue.Empty:
            store = Store(self.path)
        healthy = True
        try:
            yield store
        except sqlite3.Error:
            healthy = False
            raise
        finally:
            if healthy and self._idle.qsize() < self._keep:
                self._idle.put(store)
            else:
                store.close()

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

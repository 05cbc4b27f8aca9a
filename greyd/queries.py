"""The queries greyd runs on its store, the same on SQLite and PostgreSQL.

`Queries` is what a store connection answers for the daemon and the CLI:
the facts of one decision (`LazyFacts`: one statement of primary-key
lookups), the record of decisions (a share of one write transaction), the
whitelist's maintenance. It runs on `self.conn`: a sqlite3 connection
(store.Store) or greyd's PostgreSQL connection (postgres.Connection),
which takes the same SQL text, `?` and `:name` placeholders, and the same
`transaction`. So the SQL here is the subset both engines share: upserts
name the table's columns (`counters.count`), booleans are never summed,
`IS DISTINCT FROM` compares what may be NULL. All SQL is parameterized.
The facts' read (`_facts_row`) and two writes of `record` (`_insert_rows`,
`_add_counts`) are hooks that PostgreSQL (postgres.PgStore) does its own
way, each in one prepared statement.
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from typing import Iterable, Iterator, Sequence

from . import policy
from .policy import AutoEntry, Seen, Triplet, Verdict
from .storage import COUNTER_MINUTES, SESSION, Decision, Sessions
from .whitelist import KINDS as WHITELIST_KINDS, Entry, Whitelist

FRESH_ROWS = 256             # triplets per multi-row insert at most
AUTO_COUNT_INTERVAL = 3600  # a network earns at most one pass per hour


class Queries:
    """What greyd asks of one connection (`self.conn`), whichever the engine."""

    conn: object
    _write_lock: threading.Lock | nullcontext = nullcontext()
    _whitelist: Whitelist | None = None
    _whitelist_version = -1

    # -- what the decision reads (policy.Facts) ------------------------------

    def whitelist(self) -> Whitelist:
        """The static whitelist, reloaded only when it has changed."""
        version = self.conn.execute(
            "SELECT value FROM meta WHERE key = 'whitelist_version'").fetchone()[0]
        return self._whitelist_at(version)

    def _whitelist_at(self, version: int) -> Whitelist:
        if version != self._whitelist_version or self._whitelist is None:
            rows = self.conn.execute("SELECT kind, value, expires FROM whitelist")
            self._whitelist = Whitelist.build(Entry(*row) for row in rows)
            self._whitelist_version = version
        return self._whitelist

    def facts(self, network: str, triplet: Triplet) -> "LazyFacts":
        """Everything a decision about `triplet` from `network` may read, in one
        statement run when first asked: one read transaction."""
        return LazyFacts(self, network, triplet)

    def _facts_row(self, params: tuple) -> tuple | None:
        """FACTS_SQL's row for (network, triplet's network, sender,
        recipient, whitelist version held), or None (see LazyFacts)."""
        return self.conn.execute(FACTS_SQL, params).fetchone()

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

    def record(self, decisions: Sequence[Decision], sessions: Sessions = {}) -> None:
        """Remember decisions, and count them and the sessions that ended, in
        one transaction.

        A run of new (or restarted) triplets, all a flood of spam brings, goes
        in a few multi-row statements rather than one statement each.

        Table after table (triplets, auto_whitelist, counters), each in key
        order: two hosts' (or two workers') lots lock the rows they share in
        the same order, so neither waits on the other in a cycle. The sort is
        stable, so the decisions about one key keep their order.
        """
        counts: Counter[tuple[int, str, str]] = Counter()
        with self._write_lock, transaction(self.conn):
            fresh: list[tuple] = []
            for verdict, clock, max_age in sorted(decisions, key=_by_triplet):
                now = int(clock)
                minute = now - now % COUNTER_MINUTES
                counts[minute, verdict.action, counter_reason(verdict.reason)] += 1
                if verdict.update in (policy.NEW, policy.RESTART):
                    # With its fraction: a retry waits the whole delay (policy.judge).
                    t = verdict.triplet
                    fresh.append((t.network, t.sender, t.recipient, clock, now))
                    continue
                self._insert_fresh(fresh)
                self._apply(verdict, now)
            self._insert_fresh(fresh)
            for verdict, clock, max_age in sorted(decisions, key=_by_network):
                self._apply_network(verdict, int(clock), max_age)
            for (hour, kind), n in sessions.items():
                counts[hour, SESSION, kind] += n
            self._add_counts([(*key, n) for key, n in sorted(counts.items())])

    def _insert_fresh(self, rows: list[tuple]) -> None:
        """Insert (or restart) triplets; empties `rows`.

        A triplet twice in the run is written once, as its last decision
        would leave it (as one statement each would): one statement may not
        touch a row twice (PostgreSQL). Rows go in key order, so that two
        hosts' lots lock the triplets they share in the same order."""
        unique = {row[:3]: row for row in rows}
        rows.clear()
        if unique:
            self._insert_rows(sorted(unique.values()))

    def _insert_rows(self, rows: list[tuple]) -> None:
        """(network, sender, recipient, first_seen, last_seen) rows, in
        multi-row statements of power-of-two sizes, so that the few texts
        stay in the connection's statement cache."""
        while rows:
            size = min(FRESH_ROWS, 1 << (len(rows).bit_length() - 1))
            chunk, rows = rows[:size], rows[size:]
            self.conn.execute(_fresh_sql(size), [v for row in chunk for v in row])

    def _add_counts(self, rows: list[tuple]) -> None:
        """Add (hour, action, reason, count) rows to the counters."""
        self.conn.executemany(
            "INSERT INTO counters (hour, action, reason, count) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (hour, action, reason) DO UPDATE SET"
            " count = counters.count + excluded.count", rows)

    def _apply(self, verdict: Verdict, now: int) -> None:
        """A decision's write to its triplet, but NEW and RESTART, which
        `record` inserts in runs."""
        update, t = verdict.update, verdict.triplet
        key = (t.network, t.sender, t.recipient) if t else ()
        if update == policy.EARLY:
            self.conn.execute(
                "UPDATE triplets SET last_seen = ?"
                " WHERE network = ? AND sender = ? AND recipient = ?", (now, *key))
        elif update in (policy.PASS, policy.KNOWN):
            self.conn.execute(
                "UPDATE triplets SET last_seen = ?, passed_at = coalesce(passed_at, ?)"
                " WHERE network = ? AND sender = ? AND recipient = ?", (now, now, *key))

    def _apply_network(self, verdict: Verdict, now: int, max_age: int) -> None:
        """A decision's write to its network's auto-whitelist entry, if any."""
        update = verdict.update
        if update in (policy.PASS, policy.KNOWN, policy.COUNT):
            self._count_delivery(verdict.network, now, max_age)
        elif update == policy.AUTO:
            self.conn.execute(
                "UPDATE auto_whitelist SET last_seen = ? WHERE network = ?",
                (now, verdict.network))

    def _count_delivery(self, network: str, now: int, max_age: int) -> None:
        """One passed delivery for the auto-whitelist, counted at most hourly;
        a network unseen for max_age starts over."""
        self.conn.execute(
            "INSERT INTO auto_whitelist AS a (network, count, first_seen, last_seen,"
            " last_counted) VALUES (:network, 1, :now, :now, :now)"
            " ON CONFLICT (network) DO UPDATE SET"
            " count = CASE WHEN :now - a.last_seen > :max_age THEN 1"
            "   WHEN :now - a.last_counted >= :interval THEN a.count + 1 ELSE a.count END,"
            " first_seen = CASE WHEN :now - a.last_seen > :max_age THEN :now"
            "   ELSE a.first_seen END,"
            " last_counted = CASE WHEN :now - a.last_seen > :max_age"
            "   OR :now - a.last_counted >= :interval THEN :now ELSE a.last_counted END,"
            " last_seen = :now",
            {"network": network, "now": now, "max_age": max_age,
             "interval": AUTO_COUNT_INTERVAL})

    # -- whitelist maintenance -------------------------------------------------

    def add_whitelist(self, kind: str, value: str, comment: str | None = None,
                      expires: int | None = None, now: float = 0, *,
                      keep_expiry: bool = False) -> bool:
        """Add an entry; False when it was there already.

        An existing entry takes the new expiry (None: never) unless keep_expiry
        and it is live, and the new comment when one is given; it keeps its `added` time.
        """
        _check_kind(kind)
        with transaction(self.conn):
            existed = self.conn.execute(
                "SELECT expires FROM whitelist WHERE kind = ? AND value = ?",
                (kind, value)).fetchone()
            if keep_expiry and existed and (existed[0] is None or existed[0] > now):
                expires = existed[0]
            # Only a real change fires the triggers, so a daemon reloads only then.
            self.conn.execute(
                "INSERT INTO whitelist AS w (kind, value, comment, added, expires)"
                " VALUES (:kind, :value, coalesce(:comment, ''), :now, :expires)"
                " ON CONFLICT (kind, value) DO UPDATE SET"
                " comment = coalesce(:comment, w.comment), expires = :expires"
                " WHERE w.comment IS DISTINCT FROM coalesce(:comment, w.comment)"
                " OR w.expires IS DISTINCT FROM :expires",
                {"kind": kind, "value": value, "comment": comment, "now": int(now),
                 "expires": expires})
        return existed is None

    def import_whitelist(self, entries: Iterable[tuple[str, str]], comment: str,
                         now: float) -> list[bool]:
        """Add many (kind, value) entries in one transaction; for each, whether
        it was added. A live entry is left as it is; an expired one is renewed."""
        now = int(now)
        added = []
        with transaction(self.conn):
            for kind, value in entries:
                _check_kind(kind)
                cursor = self.conn.execute(
                    "INSERT INTO whitelist AS w (kind, value, comment, added, expires)"
                    " VALUES (?, ?, ?, ?, NULL) ON CONFLICT (kind, value) DO UPDATE SET"
                    " comment = excluded.comment, added = excluded.added, expires = NULL"
                    " WHERE w.expires IS NOT NULL AND w.expires <= excluded.added",
                    (kind, value, comment, now))
                added.append(cursor.rowcount == 1)
        return added

    def remove_whitelist(self, kind: str, value: str) -> bool:
        """Remove an entry; False when there was none."""
        _check_kind(kind)
        with transaction(self.conn):
            cursor = self.conn.execute(
                "DELETE FROM whitelist WHERE kind = ? AND value = ?", (kind, value))
        return cursor.rowcount == 1

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


@contextmanager
def transaction(conn) -> Iterator[None]:
    """One write transaction, committed at the end and rolled back on any
    exception. On SQLite it takes the write lock at BEGIN (waiting up to the
    busy timeout), so no read inside it can go stale and fail with 'locked';
    a PostgreSQL connection brings its own (`Connection.transaction`)."""
    if hasattr(conn, "transaction"):
        with conn.transaction():
            yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.rollback()
        raise
    conn.commit()


@lru_cache(maxsize=16)
def _fresh_sql(rows: int) -> str:
    """Insert `rows` new triplets; one already there starts over (RESTART)."""
    return ("INSERT INTO triplets (network, sender, recipient, first_seen, last_seen) VALUES "
            + ", ".join(["(?, ?, ?, ?, ?)"] * rows)
            + " ON CONFLICT (network, sender, recipient) DO UPDATE SET"
              " first_seen = excluded.first_seen, last_seen = excluded.last_seen,"
              " passed_at = NULL")


def _by_triplet(decision: Decision) -> tuple:
    triplet = decision.verdict.triplet
    return tuple(triplet) if triplet is not None else ()


def _by_network(decision: Decision) -> str:
    return decision.verdict.network


def _check_kind(kind: str) -> None:
    if kind not in WHITELIST_KINDS:
        raise ValueError(f"unknown whitelist kind: {kind}")


def counter_reason(reason: str) -> str:
    """The reason as counted: whitelist entries fold into one `whitelist`."""
    return "whitelist" if reason.startswith("whitelist:") else reason


FACTS_SQL = (
    "SELECT m.value, a.count, a.last_seen, t.first_seen, t.last_seen, t.passed_at"
    " FROM meta AS m"
    " LEFT JOIN auto_whitelist AS a ON a.network = ?"
    " LEFT JOIN triplets AS t ON t.network = ? AND t.sender = ? AND t.recipient = ?"
    " WHERE m.key = 'whitelist_version'"
    " AND (m.value != ? OR a.network IS NOT NULL OR t.network IS NOT NULL)")


class LazyFacts:
    """policy.Facts for one decision, read by one statement (FACTS_SQL) at the
    first question, so a decision that needs no facts (a relay denial, a
    trusted client) reads nothing: the whitelist version, the network's
    auto-whitelist entry and the triplet, each a primary-key search. Asked
    about another network or triplet, it asks the store directly.

    The statement yields no row when it has nothing to tell: the whitelist
    is still the version this connection holds, and neither entry exists,
    as for every new triplet of a spam flood.
    """

    def __init__(self, store: Queries, network: str, triplet: Triplet):
        self.store, self.network, self.triplet = store, network, triplet
        self._row: tuple | None = None

    def _read(self) -> tuple:
        if self._row is None:
            t, known = self.triplet, self.store._whitelist_version
            self._row = self.store._facts_row(
                (self.network, t.network, t.sender, t.recipient, known),
            ) or (known, None, None, None, None, None)
        return self._row

    def whitelist(self) -> Whitelist:
        return self.store._whitelist_at(self._read()[0])

    def auto_entry(self, network: str) -> AutoEntry | None:
        if network != self.network:
            return self.store.auto_entry(network)
        count, last_seen = self._read()[1:3]
        return None if count is None else AutoEntry(count, last_seen)

    def seen(self, triplet: Triplet) -> Seen | None:
        if triplet != self.triplet:
            return self.store.seen(triplet)
        first, last, passed = self._read()[3:6]
        return None if first is None else Seen(first, last, passed)

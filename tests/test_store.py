"""greyd.store, greyd.pool and greyd.recorder: schema and migrations, the
queries of a decision, the pool, the writer thread, and the policy deciding
on what the store remembers of earlier decisions.

Every test has its own SQLite file (conftest's `database` and `store`); other
connections to it are plain sqlite3 connections, as the cron cleanup or the
CLI would hold.
"""

import ast
import dataclasses
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from greyd import policy, queries, store as storage
from greyd.policy import (
    ACCEPT, GREYLIST, REJECT, AutoEntry, Request, Rules, Seen, Triplet, Verdict, decide)
from greyd.pool import StorePool
from greyd.recorder import Recorder
from greyd.storage import Decision, StoreError, StoreHealth
from greyd.queries import counter_reason
from greyd.store import SCHEMA_VERSION, Store

pytestmark = pytest.mark.timeout(30)

T = 1_700_000_000                 # 22:13:20 UTC; its hour starts at T - 800
MINUTE_OF_T = T - T % 60       # counters are per minute
HOUR, DAY = 3600, 86400
MAX_AGE = 35 * DAY                # greylist.max_age by default
NET = "198.51.100.0/24"
TRIPLET = Triplet(NET, "alice@sender.example", "bob@localhost")
RULES = Rules(relay_clients=())

# The hot-database SELECTs, as store.py sends them.
SEEN_SQL = ("SELECT first_seen, last_seen, passed_at FROM triplets"
            " WHERE network = ? AND sender = ? AND recipient = ?")
AUTO_SQL = "SELECT count, last_seen FROM auto_whitelist WHERE network = ?"
WHITELIST_VERSION_SQL = "SELECT value FROM meta WHERE key = 'whitelist_version'"
EARLY_SQL = ("UPDATE triplets SET last_seen = ?"
             " WHERE network = ? AND sender = ? AND recipient = ?")


def raw(database) -> sqlite3.Connection:
    """A separate plain connection to the same file."""
    return sqlite3.connect(str(database), isolation_level=None, check_same_thread=False)


def verdict(update, action=GREYLIST, reason="new", triplet=TRIPLET, network=NET):
    return Verdict(action, reason, network, triplet=triplet, update=update)


def remember(store, v, now, max_age=MAX_AGE):
    """One decision written as the recorder writes a lot: in one transaction."""
    store.record([Decision(v, now, max_age)])


def triplet_row(store, triplet=TRIPLET):
    return store.conn.execute(
        "SELECT first_seen, last_seen, passed_at FROM triplets"
        " WHERE network = ? AND sender = ? AND recipient = ?",
        (triplet.network, triplet.sender, triplet.recipient)).fetchone()


def counters(store):
    return {(h, a, r): c for h, a, r, c in store.conn.execute(
        "SELECT hour, action, reason, count FROM counters")}


def tables(conn):
    return {name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}


# -- schema ---------------------------------------------------------------------

def test_new_database_is_at_schema_version_in_wal_mode(store, database):
    conn = raw(database)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert {"triplets", "whitelist", "auto_whitelist", "counters", "meta"} <= tables(conn)
    finally:
        conn.close()


def test_busy_timeout_is_set_on_every_store(store):
    assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


def test_migrate_twice_is_harmless(store, database):
    remember(store, verdict(policy.NEW), T)
    store.add_whitelist("client", "192.0.2.1", now=T)
    store.migrate()
    again = Store(database)
    try:
        again.migrate()
        assert again.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert again.seen(TRIPLET) == Seen(T, T, None)
        assert again.whitelist().match(
            Request("192.0.2.1", "a@b.example", "c@localhost"), T) == "192.0.2.1"
    finally:
        again.close()


def test_newer_schema_is_refused(database):
    conn = raw(database)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    s = Store(database)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="newer"):
            s.migrate()
    finally:
        s.close()
    with pytest.raises(StoreError, match="newer"):
        StorePool(database).open()
    conn = raw(database)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    assert "triplets" not in tables(conn)
    conn.close()


# -- the hot database is index lookups ------------------------------------------------------

def primary_key_indexes(conn, table):
    return {name for _, name, _, origin, _ in conn.execute(f"PRAGMA index_list({table})")
            if origin == "pk"}


@pytest.mark.parametrize("sql, table, args", [
    (SEEN_SQL, "triplets", (NET, "a@b", "c@d")),
    (AUTO_SQL, "auto_whitelist", (NET,)),
    (WHITELIST_VERSION_SQL, "meta", ()),
    (EARLY_SQL, "triplets", (T, NET, "a@b", "c@d")),
])
def test_hot_path_query_is_a_primary_key_search(store, sql, table, args):
    plan = [row[3] for row in store.conn.execute("EXPLAIN QUERY PLAN " + sql, args)]
    assert len(plan) == 1, plan
    detail = plan[0]
    assert detail.startswith(f"SEARCH {table} "), detail
    assert "SCAN" not in detail
    # WITHOUT ROWID tables say PRIMARY KEY; others name the primary key's own index
    pk_index = primary_key_indexes(store.conn, table)
    assert "USING PRIMARY KEY" in detail or any(
        f"USING INDEX {name} " in detail for name in pk_index), (detail, pk_index)


def test_hot_path_sql_is_the_text_store_py_sends():
    """Keeps the plans above honest: the SQL under test is queries.py's own."""
    tree = ast.parse(Path(queries.__file__).read_text())
    literals = {node.value for node in ast.walk(tree)
                if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    for sql in (SEEN_SQL, AUTO_SQL, WHITELIST_VERSION_SQL, EARLY_SQL):
        assert sql in literals, sql


# -- record -----------------------------------------------------------------------

def test_record_new_creates_the_triplet_and_counts(store):
    remember(store, verdict(policy.NEW), T)
    assert triplet_row(store) == (T, T, None)
    assert store.seen(TRIPLET) == Seen(first=T, last=T, passed=None)
    assert counters(store) == {(MINUTE_OF_T, GREYLIST, "new"): 1}


def test_record_early_updates_last_seen_only(store):
    remember(store, verdict(policy.NEW), T)
    remember(store, verdict(policy.EARLY, reason="too-early"), T + 100)
    assert triplet_row(store) == (T, T + 100, None)
    assert store.conn.execute("SELECT count(*) FROM auto_whitelist").fetchone()[0] == 0


def test_record_pass_sets_passed_at_and_counts_a_delivery(store):
    remember(store, verdict(policy.NEW), T)
    remember(store, verdict(policy.PASS, ACCEPT, "passed"), T + 300)
    assert triplet_row(store) == (T, T + 300, T + 300)
    assert store.auto_entry(NET) == AutoEntry(count=1, last_seen=T + 300)
    # a later KNOWN keeps passed_at, moves last_seen
    remember(store, verdict(policy.KNOWN, ACCEPT, "known"), T + DAY)
    assert triplet_row(store) == (T, T + DAY, T + 300)
    assert store.auto_entry(NET) == AutoEntry(count=2, last_seen=T + DAY)


def test_auto_whitelist_counts_at_most_once_an_hour(store):
    remember(store, verdict(policy.NEW), T)
    for offset in (300, 600, 300 + HOUR - 1):
        remember(store, verdict(policy.KNOWN, ACCEPT, "known"), T + offset)
    assert store.auto_entry(NET) == AutoEntry(count=1, last_seen=T + 300 + HOUR - 1)
    remember(store, verdict(policy.KNOWN, ACCEPT, "known"), T + 300 + HOUR)
    assert store.auto_entry(NET).count == 2


def test_record_restart_resets_first_seen_and_clears_passed_at(store):
    remember(store, verdict(policy.NEW), T)
    remember(store, verdict(policy.PASS, ACCEPT, "passed"), T + 300)
    remember(store, verdict(policy.RESTART, reason="expired-retry"), T + 3 * DAY)
    assert triplet_row(store) == (T + 3 * DAY, T + 3 * DAY, None)


def test_record_new_over_a_forgotten_triplet_starts_it_over(store):
    remember(store, verdict(policy.NEW), T)
    remember(store, verdict(policy.PASS, ACCEPT, "passed"), T + 300)
    remember(store, verdict(policy.NEW), T + 40 * DAY)
    assert triplet_row(store) == (T + 40 * DAY, T + 40 * DAY, None)
    assert store.conn.execute("SELECT count(*) FROM triplets").fetchone()[0] == 1


def test_record_auto_refreshes_the_network(store):
    remember(store, verdict(policy.NEW), T)
    remember(store, verdict(policy.PASS, ACCEPT, "passed"), T + 300)
    remember(store, Verdict(ACCEPT, "auto-whitelist", NET, update=policy.AUTO), T + DAY)
    assert store.auto_entry(NET) == AutoEntry(count=1, last_seen=T + DAY)
    assert store.conn.execute("SELECT count(*) FROM triplets").fetchone()[0] == 1


def test_counters_per_minute_action_and_reason(store):
    assert T - MINUTE_OF_T == 20                   # so T + 39 is still T's minute
    remember(store, verdict(policy.NEW), T)
    remember(store, verdict(policy.NEW, triplet=Triplet(NET, "x@y", "z@localhost")), T + 10)
    remember(store, Verdict(REJECT, "relay-denied", NET), T + 20)
    remember(store, Verdict(ACCEPT, "whitelist:192.0.2.1", NET), T + 25)
    remember(store, Verdict(ACCEPT, "whitelist:@sender.example", NET), T + 30)
    remember(store, Verdict(ACCEPT, "dnswl:list.dnswl.example", NET), T + 39)
    remember(store, Verdict(REJECT, "relay-denied", NET), T + HOUR)
    assert counters(store) == {
        (MINUTE_OF_T, GREYLIST, "new"): 2,
        (MINUTE_OF_T, REJECT, "relay-denied"): 1,
        (MINUTE_OF_T, ACCEPT, "whitelist"): 2,
        (MINUTE_OF_T, ACCEPT, "dnswl:list.dnswl.example"): 1,
        (MINUTE_OF_T + HOUR, REJECT, "relay-denied"): 1,
    }


@pytest.mark.parametrize("reason, counted", [
    ("whitelist:192.0.2.0/24", "whitelist"),
    ("whitelist:postmaster", "whitelist"),
    ("new", "new"),
    ("new,dnsbl:bl.example", "new,dnsbl:bl.example"),
    ("auto-whitelist", "auto-whitelist"),
    ("trusted-client", "trusted-client"),
])
def test_counter_reason(reason, counted):
    assert counter_reason(reason) == counted


def test_decide_and_record_through_the_store(store):
    req = Request("198.51.100.7", "Alice@Sender.example", "Bob@localhost")
    for now, reason in ((T, "new"), (T + 60, "too-early"), (T + 300, "passed"),
                        (T + DAY, "known")):
        v = decide(req, RULES, store, now)
        remember(store, v, now)
        assert v.reason == reason
    assert store.seen(TRIPLET) == Seen(T, T + DAY, T + 300)


# -- the policy on what the store remembers ------------------------------------------------
# Each RCPT as a session handles it: decide on the store, then record the verdict. What
# the store makes of the records (first, last and passed times; the auto-whitelist's
# count, at most once an hour, forgotten after max_age) is what the next decision reads.
# The policy alone, on facts given in memory, is test_policy.py.

STRANGER = "198.51.100.7"            # in NET; neither trusted nor whitelisted
AUTO2 = dataclasses.replace(RULES, auto_whitelist_after=2)


def mail_from(sender: str = "alice@sender.example", *, client: str = STRANGER,
              recipient: str = "bob@localhost", **extra) -> Request:
    """One recipient of mail from `sender` at a stranger's address."""
    return Request(client, sender, recipient, **extra)


def step(store, req, now, rules=RULES):
    """One RCPT as the daemon handles it: decide, then record."""
    verdict = decide(req, rules, store, now)
    remember(store, verdict, now, rules.max_age)
    return verdict


def pass_triplet(store, req, start, rules=RULES):
    """Greylist `req` at `start` and let its retry pass `delay` seconds later."""
    assert step(store, req, start, rules).reason == "new"
    verdict = step(store, req, start + rules.delay, rules)
    assert verdict.reason == "passed"
    return verdict


def test_full_life_of_a_triplet(store):
    req = mail_from()
    v = step(store, req, T)
    assert (v.action, v.reason, v.retry_in) == (GREYLIST, "new", 300)
    assert v.network == NET
    assert v.triplet == TRIPLET
    assert store.seen(v.triplet) == Seen(first=T, last=T, passed=None)

    v = step(store, req, T + 100)
    assert (v.action, v.reason, v.retry_in, v.delayed) == (GREYLIST, "too-early", 200, 100)
    assert store.seen(v.triplet) == Seen(first=T, last=T + 100, passed=None)

    v = step(store, req, T + 300)
    assert (v.action, v.reason, v.delayed) == (ACCEPT, "passed", 300)
    assert store.seen(v.triplet) == Seen(first=T, last=T + 300, passed=T + 300)

    v = step(store, req, T + 10 * DAY)
    assert (v.action, v.reason) == (ACCEPT, "known")
    assert store.seen(v.triplet) == Seen(first=T, last=T + 10 * DAY, passed=T + 300)


def test_expired_retry_restarts_the_triplet(store):
    req = mail_from()
    step(store, req, T)
    v = step(store, req, T + 2 * DAY + 1)
    assert (v.action, v.reason, v.retry_in) == (GREYLIST, "expired-retry", 300)
    assert store.seen(v.triplet) == Seen(first=T + 2 * DAY + 1, last=T + 2 * DAY + 1)
    v = step(store, req, T + 2 * DAY + 301)
    assert (v.action, v.reason, v.delayed) == (ACCEPT, "passed", 300)


def test_forgotten_triplet_is_greylisted_again(store):
    req = mail_from()
    pass_triplet(store, req, T)
    v = step(store, req, T + 300 + 35 * DAY + 1)
    assert (v.action, v.reason) == (GREYLIST, "new")
    assert store.seen(v.triplet).passed is None


@pytest.mark.parametrize("entry, overrides, reason", [
    (None, {"recipient": "victim@elsewhere.example"}, "relay-denied"),
    (None, {"dnswl": "list.dnswl.example"}, "dnswl:list.dnswl.example"),
    (("client", "198.51.100.0/24"), {}, "whitelist:198.51.100.0/24"),
    (("client", "198.51.100.7"), {"client": "::ffff:198.51.100.7"}, "whitelist:198.51.100.7"),
    (("sender", "@sender.example"), {}, "whitelist:@sender.example"),
    (("recipient", "bob@"), {}, "whitelist:bob@"),
    (("hostname", r"/^out-\d+\.mx\.sender\.example$/"),
     {"client_name": "out-7.mx.sender.example"}, r"whitelist:/^out-\d+\.mx\.sender\.example$/"),
], ids=["relay-denied", "dnswl", "network", "mapped", "sender", "recipient", "hostname"])
def test_a_decision_without_a_triplet_writes_none(store, entry, overrides, reason):
    """Relay-denied, DNSWL-listed, or whitelisted by an entry added through the store."""
    req = mail_from(**overrides)
    if entry is not None:
        assert decide(req, RULES, store, T).action == GREYLIST
        assert store.add_whitelist(*entry, now=T) is True
    v = step(store, req, T)
    assert v.reason == reason and v.triplet is None
    assert store.conn.execute("SELECT count(*) FROM triplets").fetchone()[0] == 0


def test_whitelist_entries_expire_as_stored(store):
    store.add_whitelist("client", STRANGER, expires=T - 1, now=T - DAY)
    store.add_whitelist("sender", "alice@sender.example", expires=T, now=T - DAY)
    v = decide(mail_from(), RULES, store, T)
    assert (v.action, v.reason) == (GREYLIST, "new")
    store.add_whitelist("sender", "@sender.example", expires=T + 60, now=T)
    assert decide(mail_from(), RULES, store, T + 59).reason == "whitelist:@sender.example"
    assert decide(mail_from(), RULES, store, T + 60).reason == "new"


def test_auto_whitelist_after_two_passes_an_hour_apart(store):
    pass_triplet(store, mail_from("a@sender.example"), T, AUTO2)
    newcomer = mail_from("c@sender.example")
    assert decide(newcomer, AUTO2, store, T + 400).reason == "new"
    pass_triplet(store, mail_from("b@sender.example"), T + HOUR, AUTO2)
    assert store.auto_entry(NET) == AutoEntry(count=2, last_seen=T + HOUR + 300)

    v = step(store, newcomer, T + HOUR + 400, AUTO2)
    assert (v.action, v.reason) == (ACCEPT, "auto-whitelist")
    assert v.update == policy.AUTO and v.triplet is None
    # its mail creates no new triplets, and keeps the network's entry fresh
    assert store.seen(Triplet(NET, "c@sender.example", "bob@localhost")) is None
    assert store.auto_entry(NET).last_seen == T + HOUR + 400
    # any address in the same network benefits
    other = mail_from("z@other.example", client="198.51.100.250", recipient="x@localhost")
    assert decide(other, AUTO2, store, T + HOUR + 500).reason == "auto-whitelist"


def test_known_deliveries_count_toward_the_auto_whitelist(store):
    req = mail_from("a@sender.example")
    pass_triplet(store, req, T, AUTO2)
    assert step(store, req, T + 300 + HOUR, AUTO2).reason == "known"
    assert decide(mail_from("new@sender.example"), AUTO2, store,
                  T + 400 + HOUR).reason == "auto-whitelist"


def test_passes_within_the_same_hour_count_once(store):
    pass_triplet(store, mail_from("a@sender.example"), T, AUTO2)
    pass_triplet(store, mail_from("b@sender.example"), T + 600, AUTO2)
    pass_triplet(store, mail_from("d@sender.example"), T + HOUR - 1, AUTO2)
    assert store.auto_entry(NET).count == 1
    v = decide(mail_from("c@sender.example"), AUTO2, store, T + HOUR + 400)
    assert (v.action, v.reason) == (GREYLIST, "new")


def test_auto_whitelist_count_is_forgotten_after_max_age(store):
    pass_triplet(store, mail_from("a@sender.example"), T, AUTO2)
    pass_triplet(store, mail_from("b@sender.example"), T + HOUR, AUTO2)
    later = T + HOUR + 300 + 35 * DAY + 1          # network unseen past max_age
    pass_triplet(store, mail_from("c@sender.example"), later, AUTO2)
    # one pass since it was forgotten: not yet auto-whitelisted
    v = decide(mail_from("d@sender.example"), AUTO2, store, later + 400)
    assert (v.action, v.reason) == (GREYLIST, "new")


# -- concurrency -------------------------------------------------------------------

def test_record_waits_for_another_writer(store, database):
    other = raw(database)
    other.execute("BEGIN IMMEDIATE")
    impatient = sqlite3.connect(str(database), timeout=0)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            impatient.execute("INSERT INTO meta (key, value) VALUES ('probe', 1)")
    finally:
        impatient.close()
    release = threading.Timer(0.3, other.execute, ("COMMIT",))
    release.start()
    try:
        started = time.monotonic()
        remember(store, verdict(policy.NEW), T)
        waited = time.monotonic() - started
    finally:
        release.join()
        other.close()
    assert waited > 0.1
    assert store.seen(TRIPLET) == Seen(T, T, None)
    assert counters(store) == {(MINUTE_OF_T, GREYLIST, "new"): 1}


# -- injection ------------------------------------------------------------------------

def test_sql_metacharacters_in_a_sender_are_data(store):
    sender = "x'); DROP TABLE triplets;--@example.com"
    req = Request("198.51.100.7", sender, "bob@localhost")
    v = decide(req, RULES, store, T)
    remember(store, v, T)
    assert v.triplet.sender == "x'); drop table triplets;--@example.com"
    stored = store.conn.execute("SELECT sender FROM triplets").fetchall()
    assert stored == [(v.triplet.sender,)]
    assert store.seen(v.triplet) == Seen(T, T, None)
    assert decide(req, RULES, store, T + 300).reason == "passed"
    assert {"triplets", "whitelist", "auto_whitelist", "counters", "meta"} <= tables(store.conn)


def test_sql_metacharacters_in_a_whitelist_entry_are_data(store):
    value = "o'brien\"; DELETE FROM whitelist; --@example.com"
    comment = "it's \"quoted\"; DROP TABLE meta;--"
    assert store.add_whitelist("sender", value, comment=comment, now=T) is True
    assert store.add_whitelist("sender", "plain@example.com", now=T) is True
    rows = store.conn.execute(
        "SELECT value, comment FROM whitelist WHERE kind = 'sender' ORDER BY value").fetchall()
    assert rows == [(value, comment), ("plain@example.com", "")]
    req = Request("198.51.100.7", value, "bob@localhost")
    assert store.whitelist().match(req, T) == value
    assert {"triplets", "whitelist", "auto_whitelist", "counters", "meta"} <= tables(store.conn)


# -- whitelist maintenance and its cache ------------------------------------------------

def test_add_whitelist_new_then_existing(store):
    assert store.add_whitelist("client", "192.0.2.0/24", comment="ours", now=T) is True
    assert store.add_whitelist("client", "192.0.2.0/24", comment="ours", now=T) is False
    assert store.add_whitelist("client", "192.0.2.0/24", comment="later",
                               expires=T + DAY, now=T + 10) is False
    assert store.conn.execute(
        "SELECT comment, expires FROM whitelist WHERE kind = 'client'").fetchall() == [
        ("later", T + DAY)]
    assert store.add_whitelist("hostname", "192.0.2.0/24", now=T) is True


def test_add_whitelist_refuses_an_unknown_kind(store):
    with pytest.raises(ValueError):
        store.add_whitelist("helo", "mx.example", now=T)
    assert store.conn.execute("SELECT count(*) FROM whitelist").fetchone()[0] == 0


def test_whitelist_is_cached_until_another_connection_changes_it(store, database):
    first = store.whitelist()
    assert store.whitelist() is first
    req = Request("198.51.100.7", "alice@sender.example", "bob@localhost")
    assert first.match(req, T) is None
    remember(store, verdict(policy.NEW), T)            # other tables: cache kept
    assert store.whitelist() is first

    writer = Store(database)
    try:
        assert writer.add_whitelist("sender", "@sender.example", now=T) is True
    finally:
        writer.close()
    second = store.whitelist()
    assert second is not first
    assert second.match(req, T) == "@sender.example"
    assert store.whitelist() is second


def test_whitelist_cache_sees_a_removal(store, database):
    store.add_whitelist("client", NET, now=T)
    req = Request("198.51.100.7", "a@b.example", "c@localhost")
    assert store.whitelist().match(req, T) == NET
    conn = raw(database)
    conn.execute("DELETE FROM whitelist WHERE kind = 'client'")
    conn.close()
    assert store.whitelist().match(req, T) is None


# -- the pool ---------------------------------------------------------------------

def lease(pool):
    """A connection of the pool, as a decision borrows it (with the facts it reads)."""
    return pool.facts(NET, TRIPLET)


def test_pool_open_creates_and_migrates(database):
    pool = StorePool(database)
    pool.open()
    try:
        conn = raw(database)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
        pool.record([Decision(verdict(policy.NEW), T, MAX_AGE)])
        with lease(pool) as facts:
            assert facts.seen(TRIPLET) == Seen(T, T, None)
    finally:
        pool.close()


def test_pool_open_creates_the_directory(tmp_path):
    pool = StorePool(tmp_path / "var" / "db" / "greyd.db")
    pool.open()
    pool.close()
    assert (tmp_path / "var" / "db" / "greyd.db").is_file()


def test_pool_reuses_its_connection(database):
    pool = StorePool(database)
    pool.open()
    try:
        with lease(pool) as first:
            pass
        with lease(pool) as second:
            assert second.store is first.store
            assert second.seen(TRIPLET) is None      # still open and usable
    finally:
        pool.close()


def test_pool_discards_a_connection_after_a_database_error(database):
    pool = StorePool(database)
    pool.open()
    try:
        with pytest.raises(StoreError, match="no such table"):
            with lease(pool) as broken:
                broken.store.conn.execute("SELECT * FROM no_such_table")
        with pytest.raises(sqlite3.ProgrammingError):
            broken.store.conn.execute("SELECT 1")          # it was closed
        with lease(pool) as fresh:
            assert fresh.store is not broken.store
            assert fresh.seen(TRIPLET) is None
    finally:
        pool.close()


def test_pool_keeps_at_most_keep_connections(database):
    pool = StorePool(database, keep=1)
    pool.open()
    try:
        with lease(pool) as outer:
            with lease(pool) as inner:
                assert inner.store is not outer.store
                remember(inner.store, verdict(policy.NEW), T)
                assert outer.seen(TRIPLET) == Seen(T, T, None)
        with lease(pool) as again:
            assert again.store is inner.store
        with pytest.raises(sqlite3.ProgrammingError):
            outer.store.conn.execute("SELECT 1")
    finally:
        pool.close()


def test_pool_close_closes_idle_connections(database):
    pool = StorePool(database)
    pool.open()
    with lease(pool) as facts:
        pass
    pool.close()
    with pytest.raises(sqlite3.ProgrammingError):
        facts.store.conn.execute("SELECT 1")


def test_check_writable_passes_on_a_writable_database(store):
    store.check_writable()
    remember(store, verdict(policy.NEW), T)          # no transaction left open
    assert not store.conn.in_transaction


def test_check_writable_refuses_a_read_only_database(database):
    pool = StorePool(database)
    pool.open()
    pool.close()
    os.chmod(database, 0o444)
    # Root writes through 0444; without CAP_DAC_OVERRIDE it cannot, like any user.
    prefix = ["setpriv", "--bounding-set=-dac_override", "--"] if os.geteuid() == 0 else []
    probe = ("import sys, sqlite3\n"
             "from greyd.pool import StorePool\n"
             "from greyd.storage import StoreError\n"
             "from greyd.store import Store\n"
             "s = Store(sys.argv[1])\n"
             "try:\n    s.check_writable()\nexcept sqlite3.Error as e:\n    print('check:', e)\n"
             "try:\n    StorePool(sys.argv[1]).open()\nexcept StoreError as e:\n    print('open:', e)\n")
    result = subprocess.run([*prefix, sys.executable, "-c", probe, str(database)],
                            capture_output=True, text=True, timeout=20)
    assert result.stdout.splitlines() == ["check: attempt to write a readonly database",
                                          "open: attempt to write a readonly database"], result.stderr


def test_pool_connections_commit_without_fsync_in_wal(database):
    pool = StorePool(database)
    pool.open()
    with lease(pool) as first, lease(pool) as second:
        for s in (first.store, second.store):
            assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert s.conn.execute("PRAGMA synchronous").fetchone()[0] == 1   # NORMAL
    pool.close()


def test_a_hundred_concurrent_writers_all_succeed(database):
    """Writers of one process queue on the pool's lock, not in SQLite's busy handler."""
    pool = StorePool(database)
    pool.open()
    failures = []

    def write(n: int) -> None:
        try:
            for k in range(20):
                t = Triplet(NET, f"s{n}-{k}@x.example", "bob@localhost")
                pool.record([Decision(verdict(policy.NEW, triplet=t), T, MAX_AGE)])
        except Exception as error:          # any error at all is the failure shown
            failures.append(error)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failures == []
    with Store(database) as s:
        assert s.conn.execute("SELECT count(*) FROM triplets").fetchone()[0] == 2000


# -- one statement per decision's reads; many decisions per write ------------------------

def test_the_facts_of_a_decision_are_three_primary_key_searches(store):
    args = (NET, NET, "a@b", "c@d", 0)
    plan = [row[3] for row in store.conn.execute("EXPLAIN QUERY PLAN " + queries.FACTS_SQL, args)]
    assert [detail.split()[:2] for detail in plan] == [["SEARCH", "m"], ["SEARCH", "a"],
                                                       ["SEARCH", "t"]], plan
    for detail in plan:
        assert "PRIMARY KEY" in detail or "sqlite_autoindex" in detail, detail


def test_a_snapshot_answers_as_the_separate_queries_do(store):
    other = Triplet(NET, "carol@sender.example", "bob@localhost")
    assert store.facts(NET, TRIPLET).seen(TRIPLET) is None
    remember(store, verdict(policy.NEW), T)
    store.conn.execute("INSERT INTO auto_whitelist VALUES (?, 3, ?, ?, ?)", (NET, T, T + 5, T))
    store.conn.commit()
    store.add_whitelist("sender", "vip@example.org")
    facts = store.facts(NET, TRIPLET)
    assert facts.seen(TRIPLET) == store.seen(TRIPLET) == Seen(first=T, last=T, passed=None)
    assert facts.auto_entry(NET) == store.auto_entry(NET) == AutoEntry(3, T + 5)
    assert facts.whitelist() == store.whitelist()
    assert facts.seen(other) is None and facts.auto_entry("192.0.2.0/24") is None


def test_a_new_triplet_reads_no_row_yet_sees_another_connections_whitelist(store, database):
    """Nothing to tell (the whitelist this connection holds, no entries) is
    no row at all; a whitelist changed elsewhere still comes through."""
    store.facts(NET, TRIPLET).whitelist()           # the connection now holds version 0
    args = (NET, NET, TRIPLET.sender, TRIPLET.recipient, 0)
    assert store.conn.execute(queries.FACTS_SQL, args).fetchone() is None
    facts = store.facts(NET, TRIPLET)
    assert facts.seen(TRIPLET) is None and facts.auto_entry(NET) is None
    assert facts.whitelist() == store.whitelist()
    with Store(database) as other:
        other.add_whitelist("sender", "vip@example.org")
    assert store.conn.execute(queries.FACTS_SQL, args).fetchone() is not None
    request = policy.Request(client="192.0.2.1", sender="vip@example.org",
                             recipient="bob@localhost")
    assert store.facts(NET, TRIPLET).whitelist().match(request, T) is not None


def table(store, name):
    return sorted(store.conn.execute(f"SELECT * FROM {name}").fetchall())


def test_record_many_writes_what_recording_one_by_one_writes(tmp_path):
    """A run of 300 new triplets (chunks of 256, 32, 8, 4), one of them twice,
    between other kinds of updates, in their order."""
    t1, t2 = (Triplet(NET, f"s{i}@sender.example", "bob@localhost") for i in (1, 2))
    decisions = [(verdict(policy.NEW, triplet=t1), T, MAX_AGE),
                 (verdict(policy.EARLY, reason="too-early", triplet=t1), T + 10, MAX_AGE)]
    decisions += [(verdict(policy.NEW, triplet=Triplet(NET, f"x{i}@e.example", "b@localhost")),
                   T + 20, MAX_AGE) for i in range(300)]
    decisions += [(verdict(policy.NEW, triplet=Triplet(NET, "x7@e.example", "b@localhost")),
                   T + 25, MAX_AGE),
                  (verdict(policy.NEW, triplet=t2), T + 30, MAX_AGE),
                  (verdict(policy.PASS, ACCEPT, "passed", triplet=t1), T + 400, MAX_AGE),
                  (verdict(policy.RESTART, reason="expired", triplet=t2), T + 9 * DAY, MAX_AGE)]
    together, alone = Store(tmp_path / "a.db"), Store(tmp_path / "b.db")
    for s in (together, alone):
        s.migrate()
    together.record([Decision(*d) for d in decisions])
    for v, now, max_age in decisions:
        remember(alone, v, now, max_age)
    for name in ("triplets", "auto_whitelist", "counters"):
        assert table(together, name) == table(alone, name), name
    assert len(table(together, "triplets")) == 302
    assert together.seen(Triplet(NET, "x7@e.example", "b@localhost")).first == T + 25


# -- the writer thread (greyd.recorder) ----------------------------------------------------

class Counted:
    """A pool whose commits are counted."""

    def __init__(self, pool):
        self.pool, self.commits = pool, 0

    def record(self, decisions, sessions={}):
        self.commits += 1
        self.pool.record(decisions, sessions)


@pytest.fixture
def pool(database):
    pool = StorePool(database)
    pool.open()
    yield pool
    pool.close()


def test_the_writer_commits_concurrent_sessions_together(pool):
    counted = Counted(pool)
    recorder = Recorder(counted.record, StoreHealth())
    barrier = threading.Barrier(20)

    def session(i):
        barrier.wait()
        for j in range(25):
            t = Triplet(NET, f"s{i}@sender.example", f"r{j}@localhost")
            recorder.record(Decision(verdict(policy.NEW, triplet=t), T, MAX_AGE))
    threads = [threading.Thread(target=session, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    recorder.flush()
    with lease(pool) as facts:
        assert len(table(facts.store, "triplets")) == 500
        assert counters(facts.store) == {(MINUTE_OF_T, GREYLIST, "new"): 500}
    assert counted.commits < 500          # some sessions' verdicts shared a transaction


def test_a_decision_waits_for_this_process_s_queued_writes_about_its_triplet(pool, database):
    """settle(): a retry is decided on what came before it, even at once."""
    recorder = Recorder(pool.record, StoreHealth())
    locker = raw(database)
    locker.execute("BEGIN IMMEDIATE")         # the writer thread waits behind this

    def settling(network, triplet) -> threading.Thread:
        thread = threading.Thread(target=recorder.settle,
                                  args=(policy.Keys(network, (triplet,)),), daemon=True)
        thread.start()
        thread.join(0.5)
        return thread
    try:
        recorder.record(Decision(verdict(policy.NEW), T, MAX_AGE))
        recorder.record(Decision(verdict(policy.PASS, ACCEPT, "passed",
                                         triplet=Triplet(NET, "p@example.net", "q@localhost")),
                                 T, MAX_AGE))
        elsewhere = Triplet("203.0.113.0/24", "x@example.net", "y@localhost")
        assert not settling("203.0.113.0/24", elsewhere).is_alive()   # nothing queued about it
        same_triplet = settling(NET, TRIPLET)
        same_network = settling(NET, Triplet(NET, "someone@else.example", "z@localhost"))
        assert same_triplet.is_alive() and same_network.is_alive()    # both wait for the writer
    finally:
        locker.execute("ROLLBACK")
    same_triplet.join(10)
    same_network.join(10)
    assert not same_triplet.is_alive() and not same_network.is_alive()
    with lease(pool) as facts:
        assert facts.seen(TRIPLET) == Seen(first=T, last=T, passed=None)
        assert facts.auto_entry(NET).count == 1
    locker.close()


def test_after_a_failed_commit_sessions_wait_for_their_own_until_one_succeeds(pool, database):
    health = StoreHealth()
    recorder = Recorder(pool.record, health)
    locker = raw(database)
    locker.execute("PRAGMA busy_timeout = 0")
    locker.execute("BEGIN IMMEDIATE")         # the write lock, held past greyd's busy timeout
    lost = [Triplet(NET, f"s{i}@sender.example", "bob@localhost") for i in range(5)]
    original, storage.BUSY_TIMEOUT = storage.BUSY_TIMEOUT, 0.2
    try:
        pool.close()
        for t in lost:                        # answered at once: queued
            recorder.record(Decision(verdict(policy.NEW, triplet=t), T, MAX_AGE))
        recorder.flush()                      # their commit failed: the store is down
        assert health.down
        with pytest.raises(StoreError, match="locked"):
            recorder.record(Decision(verdict(policy.NEW, triplet=lost[0]), T, MAX_AGE))
    finally:
        storage.BUSY_TIMEOUT = original
        locker.execute("ROLLBACK")
    recorder.record(Decision(verdict(policy.NEW), T, MAX_AGE))   # waits for its commit: it works
    assert not health.down
    with lease(pool) as facts:
        assert facts.seen(TRIPLET) == Seen(first=T, last=T, passed=None)
        assert [facts.seen(t) for t in lost] == [None] * 5    # the failed lot is forgotten
    locker.close()

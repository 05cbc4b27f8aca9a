"""greyd.greylist: the one path from a recipient to its verdict.

The Greylister decides, queues the verdict for the store, logs the decision
line; `explain` runs the same decision and changes nothing; a store that
fails gives greylist.on_store_error. On real stores, a SQLite file in
tmp_path and a PostgreSQL database (conftest's `any_database`), with a clock
moved by hand.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import pytest

from conftest import MemoryFacts
from smtpclient import deliver

from greyd import config as configuration, policy
from greyd.greylist import Greylister, backend_for
from greyd.policy import Request, Seen
from greyd.storage import StoreError

pytestmark = pytest.mark.timeout(30)

T = 1_700_000_000
REQUEST = Request("198.51.100.7", "Alice+news@Sender.example", "bob@localhost",
                  helo="mail.sender.example")
TRIPLET = policy.Triplet("198.51.100.0/24", "alice@sender.example", "bob@localhost")


@pytest.fixture
def config(tmp_path):
    base = configuration.load(None, cwd=tmp_path)
    return dataclasses.replace(
        base, relay=dataclasses.replace(base.relay, clients=()),
        database=dataclasses.replace(base.database, path=tmp_path / "var" / "greyd.db"))


@pytest.fixture
def any_config(config, any_database):
    """`config` on SQLite, then on PostgreSQL."""
    return dataclasses.replace(config, database=dataclasses.replace(
        config.database, **any_database.section))


def rows(database) -> list[list[tuple]]:
    return [database.rows(table)
            for table in ("triplets", "auto_whitelist", "counters", "whitelist")]


def test_decide_queues_the_verdict_and_logs_the_decision(any_config, clock, logs):
    config = any_config
    greylister = Greylister.open(config, clock=clock)
    try:
        first = greylister.decide(REQUEST, "5e55105e55")
        clock.advance(60)
        early = greylister.decide(REQUEST, "5e55105e56")   # reads what the first queued
        clock.advance(300)
        passed = greylister.decide(REQUEST, "5e55105e57")
    finally:
        greylister.close()
    assert [(v.action, v.reason) for v in (first, early, passed)] == [
        (policy.GREYLIST, "new"), (policy.GREYLIST, "too-early"), (policy.ACCEPT, "passed")]
    assert passed.delayed == 360
    lines = logs.matching(r"^decision ")
    assert lines[0] == (
        "decision id=5e55105e55 client=198.51.100.7 name=unknown helo=mail.sender.example"
        " from=Alice+news@Sender.example to=bob@localhost action=greylist reason=new"
        " delay=0 retry_in=300")
    assert len(lines) == 3 and "reason=passed delay=360 retry_in=0" in lines[2]
    backend = backend_for(config)
    with backend.facts(TRIPLET.network, TRIPLET) as facts:
        assert facts.seen(TRIPLET) == Seen(int(clock.now) - 360, int(clock.now),
                                           int(clock.now))
    backend.close()


def test_explain_decides_the_same_and_changes_nothing(any_config, any_database, clock,
                                                     logs):
    config = any_config
    greylister = Greylister.open(config, clock=clock)
    greylister.decide(REQUEST)
    greylister.close()
    before, lines = rows(any_database), len(logs.messages)
    clock.advance(100)
    explaining = Greylister(config, backend_for(config), clock=clock)
    verdict, seen, _ = explaining.explain(REQUEST)
    explaining.close()
    assert (verdict.action, verdict.reason, verdict.retry_in) == (policy.GREYLIST,
                                                                  "too-early", 200)
    assert seen == Seen(T, T, None)
    assert rows(any_database) == before
    assert len(logs.messages) == lines


class BrokenStore:
    """A store that cannot be reached, as a backend reports it."""

    def facts(self, network, triplet):
        raise StoreError("unable to open database file")

    def record(self, decisions, sessions=None):
        raise StoreError("unable to open database file")

    def open(self):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("on_store_error, action", [("accept", policy.ACCEPT),
                                                    ("tempfail", policy.TEMPFAIL)])
def test_a_failing_store_gives_on_store_error_and_is_logged_once(config, clock, logs,
                                                                 on_store_error, action):
    config = dataclasses.replace(config, greylist=dataclasses.replace(
        config.greylist, on_store_error=on_store_error))
    greylister = Greylister(config, BrokenStore(), clock=clock)
    verdicts = [greylister.decide(REQUEST) for _ in range(3)]
    assert {(v.action, v.reason) for v in verdicts} == {(action, "store-error")}
    denied = greylister.decide(REQUEST._replace(recipient="victim@elsewhere.example"))
    assert (denied.action, denied.reason) == (policy.REJECT, "relay-denied")
    postmaster = greylister.decide(REQUEST._replace(recipient="postmaster"))
    assert postmaster.action == policy.ACCEPT
    assert len(logs.matching(r"^store failure: ")) == 1
    assert len(logs.matching(r"^decision ")) == 5


def test_the_store_recovering_is_logged(any_config, clock, logs):
    greylister = Greylister.open(any_config, clock=clock)
    working = greylister.backend
    greylister.backend = BrokenStore()
    assert greylister.decide(REQUEST).reason == "store-error"
    greylister.backend = working
    assert greylister.decide(REQUEST).reason == "new"
    greylister.close()
    assert logs.matching(r"^store failure: ") and logs.matching(r"^store recovered$")


def test_a_reload_keeps_the_store_and_recorder_unless_the_database_moves(config, tmp_path):
    greylister = Greylister.open(config)
    stricter = dataclasses.replace(config, greylist=dataclasses.replace(config.greylist,
                                                                        delay=600))
    same = greylister.reconfigured(stricter)
    assert same.rules.delay == 600
    assert (same.backend, same.recorder, same.health) == (greylister.backend,
                                                          greylister.recorder,
                                                          greylister.health)
    moved = greylister.reconfigured(dataclasses.replace(config, database=dataclasses.replace(
        config.database, path=tmp_path / "other.db")))
    assert moved.backend is not greylister.backend and moved.recorder is not greylister.recorder
    greylister.close()


class MemoryStore:
    """A store that is not SQLite: the storage.Backend protocol, over MemoryFacts.

    Remembers triplets only (no auto-whitelist, no counters): enough to show
    that the greylister and the session need nothing of a store but the
    protocol, so another database is one module beside store.py.
    """

    local = True            # in this process: a read waits on no other host

    def __init__(self):
        self.memory = MemoryFacts()
        self.opened = self.closed = False

    def open(self) -> None:
        self.opened = True

    @contextmanager
    def facts(self, network, triplet):
        yield self.memory

    def record(self, decisions, sessions=None) -> None:
        triplets = self.memory.triplets
        for verdict, now, _ in decisions:
            now, seen = int(now), triplets.get(verdict.triplet)
            if verdict.update in (policy.NEW, policy.RESTART):
                triplets[verdict.triplet] = Seen(now, now)
            elif verdict.update == policy.EARLY:
                triplets[verdict.triplet] = dataclasses.replace(seen, last=now)
            elif verdict.update in (policy.PASS, policy.KNOWN):
                triplets[verdict.triplet] = dataclasses.replace(
                    seen, last=now, passed=seen.passed or now)

    def close(self) -> None:
        self.closed = True


def test_a_store_other_than_sqlite_serves_sessions_unchanged(start_greyd, upstream, clock):
    store = MemoryStore()
    g = start_greyd(upstream.port, store=store, greylist={"delay": 60})
    assert deliver(g.port, "alice@example.net")[0][0] == 451
    clock.advance(61)
    rcpt, data = deliver(g.port, "alice@example.net", body=b"Subject: hi\r\n\r\nHi.\r\n")
    assert rcpt[0] == 250 and data[0] == 250
    assert upstream.wait_for(1)[0].rcpt_tos == ["bob@localhost"]
    g.ctx.greylister.recorder.flush()
    assert store.memory.triplets == {
        policy.Triplet("127.0.0.0/24", "alice@example.net", "bob@localhost"):
            Seen(int(clock.now) - 61, int(clock.now), int(clock.now))}
    assert not (g.config.database.path).exists()


def test_the_delay_is_the_delay_to_the_fraction_of_a_second(any_config, clock, logs):
    """A first attempt at :40.933 with a 3 s delay: a retry at :43.084 is too
    early (2.151 s), as is one at :43.932; one at :43.933 passes, and it
    reports the 3 s the sender really waited."""
    config = dataclasses.replace(any_config, greylist=dataclasses.replace(
        any_config.greylist, delay=3))
    greylister = Greylister.open(config, clock=clock)
    clock.now = T + 0.933
    assert greylister.decide(REQUEST).reason == "new"
    greylister.recorder.flush()
    clock.now = T + 3.084
    early = greylister.decide(REQUEST)
    assert (early.reason, early.retry_in) == ("too-early", 1)
    clock.now = T + 3.932
    assert greylister.decide(REQUEST).reason == "too-early"
    clock.now = T + 3.933
    passed = greylister.decide(REQUEST)
    greylister.close()
    assert (passed.reason, passed.delayed) == ("passed", 3)

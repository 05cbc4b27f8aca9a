"""PgStore's own statements: a lot of verdicts is written to PostgreSQL all
or nothing, and the facts' prepared statement outlives a reset of its session."""

from __future__ import annotations

import psycopg
import pytest

from greyd import policy
from greyd.policy import ACCEPT, GREYLIST, Seen, Triplet, Verdict
from greyd.postgres import PgStore
from greyd.storage import Decision

NET = "192.0.2.0/24"
T = 1_700_000_000
MAX_AGE = 35 * 86400


def verdict(action, reason, recipient, update):
    return Verdict(action, reason, NET, Triplet(NET, "a@b.example", recipient), update=update)


def test_a_lot_is_recorded_all_or_nothing(pg_url):
    with PgStore.open(pg_url) as store:
        store.migrate()
        store.record([Decision(verdict(GREYLIST, "new", f"r{n}@x.example", policy.NEW), T, MAX_AGE)
                      for n in range(3)])
        store.record([Decision(verdict(ACCEPT, "passed", "r0@x.example", policy.PASS), T + 400,
                               MAX_AGE),
                      Decision(verdict(GREYLIST, "too-early", "r1@x.example", policy.EARLY),
                               T + 60, MAX_AGE)])
        seen = store.seen(Triplet(NET, "a@b.example", "r0@x.example"))
        assert (seen.last, seen.passed) == (T + 400, T + 400)
        assert store.seen(Triplet(NET, "a@b.example", "r1@x.example")).last == T + 60
        assert store.auto_entry(NET).count == 1
        counted = store.conn.execute("SELECT sum(count) FROM counters").fetchone()[0]
        assert counted == 5
        # A statement that fails in the middle of a lot: nothing of the lot stays.
        bad = verdict(GREYLIST, "new", "r9@x.example", policy.NEW)._replace(
            triplet=Triplet(NET, "a@b.example\x00", "r9@x.example"))     # NUL: refused
        with pytest.raises(psycopg.Error):
            store.record([Decision(verdict(GREYLIST, "new", "r8@x.example", policy.NEW),
                                   T, MAX_AGE),
                          Decision(verdict(ACCEPT, "known", "r0@x.example", policy.KNOWN),
                                   T + 900, MAX_AGE),
                          Decision(bad, T, MAX_AGE)])
        assert store.seen(Triplet(NET, "a@b.example", "r8@x.example")) is None
        assert store.seen(Triplet(NET, "a@b.example", "r0@x.example")).last == T + 400
        assert store.conn.execute("SELECT sum(count) FROM counters").fetchone()[0] == 5
        store.record([Decision(verdict(GREYLIST, "new", "r7@x.example", policy.NEW), T, MAX_AGE)])
        assert store.seen(Triplet(NET, "a@b.example", "r7@x.example")) is not None


@pytest.mark.parametrize("reset", ["DEALLOCATE ALL", "DISCARD ALL"])
def test_the_facts_read_prepares_its_statement_again_after_a_session_reset(pg_url, reset):
    """An administrator's or a connection pooler's reset of the session drops
    the prepared statements; the next decision's facts are read all the same."""
    triplet = Triplet(NET, "a@b.example", "r0@x.example")
    with PgStore.open(pg_url) as store:
        store.migrate()
        store.record([Decision(verdict(GREYLIST, "new", "r0@x.example", policy.NEW),
                               T + 0.25, MAX_AGE)])
        assert store.facts(NET, triplet).seen(triplet) == Seen(T + 0.25, T, None)
        store.conn.raw.execute(reset)
        assert store.facts(NET, triplet).seen(triplet) == Seen(T + 0.25, T, None)
        assert store.facts(NET, triplet._replace(recipient="r1@x.example")).seen(
            triplet._replace(recipient="r1@x.example")) is None

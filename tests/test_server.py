"""The listening side: sessions share pooled database connections."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.timeout(30)


def open_database_files(path) -> int:
    """How many descriptors of this process have the database file open."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
        except OSError:
            pass
    return count


def test_sessions_borrow_pooled_connections_instead_of_opening_their_own(greyd):
    database = greyd.config.database.path
    assert open_database_files(database) == 1   # the pool's first connection
    for n in range(30):
        client = greyd.smtp()
        client.mail(f"sender{n}@example.net")
        assert client.rcpt("bob@localhost")[0] == 451
        client.quit()
    assert open_database_files(database) == 1
    with greyd.store() as store:
        pending = store.conn.execute("SELECT count(*) FROM triplets").fetchone()[0]
    assert pending == 1   # digit runs fold: sender0..sender29 are one normalized sender

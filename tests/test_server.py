"""The listening side: pooled connections, graceful stop, limits on idle clients."""

from __future__ import annotations

import os
import threading
import time

import pytest

from conftest import write_config
from greyd import config as configuration, replies
from greyd.server import Daemon
from greyd.smtp import JUNK_LIMIT, STRESS_TIMEOUT, Context
from greyd.store import StorePool
from smtpclient import Raw

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


def test_stop_closes_idle_sessions_at_once_and_lets_transactions_finish(tmp_path, upstream):
    config = configuration.load(write_config(tmp_path, upstream.port))
    pool = StorePool(config.database.path)
    config.database.path.parent.mkdir(parents=True, exist_ok=True)
    pool.open()
    daemon = Daemon(Context(config, pool), grace=30)
    daemon.start()
    port = daemon.addresses[0][1]
    idle, busy = Raw(port), Raw(port)
    assert busy.cmd("EHLO client.example.net")[0] == 250
    assert busy.cmd("MAIL FROM:<a@example.net>") == (250, replies.SENDER_OK.text)
    started = time.monotonic()
    stopper = threading.Thread(target=daemon.stop)
    stopper.start()
    assert idle.reply() == (421, replies.SHUTTING_DOWN.text)     # no transaction: at once
    assert time.monotonic() - started < 5
    assert busy.cmd("RCPT TO:<b@localhost>")[0] == 451          # the transaction goes on
    assert busy.cmd("RSET") == (250, replies.RESET.text)
    assert busy.cmd("QUIT") == (221, replies.closing("mx.greyd.test").text)  # a QUIT still gets 221
    stopper.join(10)
    assert not stopper.is_alive() and time.monotonic() - started < 10
    idle.close()
    busy.close()


def test_junk_commands_beyond_the_limit_count_as_errors(start_greyd, upstream):
    g = start_greyd(upstream.port, server={"max_errors": 3})
    with g.raw() as client:
        for _ in range(JUNK_LIMIT):
            assert client.cmd("NOOP") == (250, replies.OK.text)
        assert client.cmd("NOOP") == (250, replies.OK.text)          # error 1
        assert client.cmd("RSET") == (250, replies.RESET.text)       # error 2
        assert client.cmd("NOOP") == (421, replies.TOO_MANY_ERRORS.text)
        assert client.closed()


def test_idle_timeouts_shrink_while_connections_are_scarce(start_greyd, upstream):
    g = start_greyd(upstream.port, server={"max_connections": 5, "max_connections_per_client": 5})
    held = [g.raw() for _ in range(3)]
    with g.raw(timeout=20) as client:      # the fourth of five: 80 % in use
        started = time.monotonic()
        assert client.reply() == (421, replies.TIMEOUT.text)
        assert STRESS_TIMEOUT - 1 < time.monotonic() - started < STRESS_TIMEOUT + 5
    for conn in held:
        conn.close()

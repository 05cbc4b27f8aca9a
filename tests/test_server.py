"""The listening side: pooled connections, graceful stop, limits on idle clients."""

from __future__ import annotations

import os
import select
import socket
import sqlite3
import struct
import threading
import time

import pytest

from conftest import until, write_config
from greyd import config as configuration, replies
from greyd.dialogue import STRESS_TIMEOUT
from greyd.connection import READ_WAKE as IDLE_TIMEOUT
from greyd.smtp import JUNK_LIMIT

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


def test_stop_closes_idle_sessions_at_once_and_lets_transactions_finish(start_greyd, upstream):
    g = start_greyd(upstream.port, grace=30)
    daemon = g.daemon
    idle, busy = g.raw(), g.raw()
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


def session_socket(g) -> socket.socket:
    """The server side of the one session `g` serves now."""
    assert until(lambda: len(g.daemon.admission.sockets) == 1, 5)
    return next(iter(g.daemon.admission.sockets))


def timeval(sock: socket.socket, option: int) -> float:
    seconds, micros = struct.unpack("@ll", sock.getsockopt(socket.SOL_SOCKET, option, 16))
    return seconds + micros / 1e6


def test_a_rcpt_that_would_wait_for_a_commit_waits_on_a_thread_of_its_own(greyd):
    """A decision about a triplet whose verdict is still queued waits for
    its commit (`Recorder.settle`): that session goes on in a thread of its
    own, and the other sessions are answered by the reactor meanwhile."""
    locker = sqlite3.connect(greyd.config.database.path, isolation_level=None)
    first, retry, other = greyd.smtp(), greyd.smtp(), greyd.smtp()
    for client, sender in ((first, "alice"), (retry, "alice"), (other, "carol")):
        client.mail(f"{sender}@example.net")
    locker.execute("BEGIN IMMEDIATE")              # the store's writer waits behind this
    try:
        assert first.rcpt("bob@localhost")[0] == 451         # queued, not committed
        retry.putcmd("rcpt", "TO:<bob@localhost>")          # the same triplet: waits
        assert other.rcpt("dave@localhost")[0] == 451
        assert select.select([retry.sock], [], [], 0.2)[0] == []
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert retry.getreply()[0] == 451
    for client in (first, retry, other):
        assert client.quit()[0] == 221


def test_sessions_get_their_socket_options_from_the_listener_and_a_reload(
        start_greyd, upstream, tmp_path):
    """TCP_NODELAY and the timeouts are set on the listening socket, once, and
    each accepted socket inherits them; a reload's command_timeout reaches
    the clients that come after it."""
    g = start_greyd(upstream.port, server={"command_timeout": 7})
    with g.raw() as client:
        assert client.cmd("EHLO client.example.net")[0] == 250
        sock = session_socket(g)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert timeval(sock, socket.SO_SNDTIMEO) == 7
        assert timeval(sock, socket.SO_RCVTIMEO) == IDLE_TIMEOUT   # a brisk session sets none
    assert g.daemon.admission.wait_idle(5)
    reloaded = configuration.load(write_config(tmp_path, upstream.port,
                                               server={"command_timeout": 9}))
    g.daemon.reconfigure(reloaded)
    with g.raw() as client:
        assert client.cmd("EHLO client.example.net")[0] == 250
        assert timeval(session_socket(g), socket.SO_SNDTIMEO) == 9


def test_a_quiet_client_outlasts_the_reads_wake_up_and_times_out_at_its_deadline(
        start_greyd, upstream):
    """A read sleeps IDLE_TIMEOUT at most, then looks at its deadline and sleeps
    again: a client quiet for longer than that is still served, and one
    quiet for command_timeout is told 421."""
    timeout = int(2 * IDLE_TIMEOUT) + 1
    g = start_greyd(upstream.port, server={"command_timeout": timeout})
    with g.raw(timeout=timeout + 10) as client:
        time.sleep(IDLE_TIMEOUT + 0.5)
        assert client.cmd("NOOP") == (250, replies.OK.text)
        started = time.monotonic()
        assert client.reply() == (421, replies.TIMEOUT.text)
        assert timeout - 0.6 < time.monotonic() - started < timeout + 2
        assert client.closed()

"""The PostgreSQL test fixtures are real: a server on 127.0.0.1 that wants the
password, not running as root, a database per test, and faults that happen."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psycopg
import pytest

from pgserver import PASSWORD, PgServer


def connect(url: str, timeout: float = 5) -> psycopg.Connection:
    return psycopg.connect(url, connect_timeout=timeout, autocommit=True)


@pytest.fixture
def own_server(tmp_path, pg_server):
    """A server of this test's own, to crash and hang (after pg_server's skip or fail)."""
    with PgServer(tmp_path) as server:
        yield server


@pytest.mark.timeout(30)
def test_pg_url_is_the_password_user_on_loopback(pg_url):
    assert f":{PASSWORD}@127.0.0.1:" in pg_url
    with connect(pg_url) as conn:
        address, user, directory = conn.execute(
            "SELECT inet_server_addr()::text, current_user,"
            " current_setting('data_directory')").fetchone()
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
    assert address == "127.0.0.1/32"
    assert user == "postgres"
    if os.geteuid() == 0:     # the server runs as nobody, which owns its data
        assert Path(directory).stat().st_uid != 0


@pytest.mark.timeout(30)
def test_a_wrong_password_is_refused(pg_server, pg_url):
    wrong = pg_url.replace(PASSWORD, "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(wrong)
    with pytest.raises(psycopg.OperationalError):
        connect(pg_server.url(password=False))


@pytest.mark.timeout(30)
def test_each_pg_url_is_a_database_of_its_own(pg_server, pg_url):
    other = pg_server.create_database("t_other")
    try:
        assert other != pg_url
        with connect(pg_url) as conn:
            conn.execute("CREATE TABLE mine (x int)")
        with connect(other) as conn:
            assert conn.execute("SELECT to_regclass('mine')").fetchone() == (None,)
    finally:
        pg_server.drop_database("t_other")


@pytest.mark.timeout(60)
def test_a_killed_server_refuses_then_starts_again(own_server):
    url = own_server.create_database("crash")
    with connect(url) as conn:
        conn.execute("CREATE TABLE kept (x int)")
    own_server.kill()
    assert not own_server.running
    with pytest.raises(psycopg.OperationalError):
        connect(url, timeout=2)
    own_server.start()
    assert own_server.running
    with connect(url) as conn:   # crash recovery kept what was committed
        assert conn.execute("SELECT to_regclass('kept')::text").fetchone() == ("kept",)


@pytest.mark.timeout(60)
def test_a_paused_server_hangs_then_answers_again(own_server):
    own_server.pause()
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        connect(own_server.url(), timeout=2)
    assert time.monotonic() - started < 3.5
    own_server.resume()
    with connect(own_server.url()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

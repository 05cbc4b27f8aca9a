"""Faults of the PostgreSQL store, made on a real server of the test's own:
nothing lost, no hang (SPEC §5 on_store_error, §10 database.timeout).

PostgreSQL down when greyd starts, stopped and started again, killed
(SIGKILL), hung (SIGSTOP: the kernel still completes the TCP handshake,
nothing answers) and a loopback listener that accepts and never speaks.
Through each, a few clients send RCPTs without pause and time each reply:
none takes longer than database.timeout (plus a margin for a busy
machine), no greyd thread is left stuck, the failure and the recovery are
logged once each, and once the server is back greyd records decisions
again by itself. A pooled connection that a restart left stale costs no
client a store error.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from pathlib import Path

import psycopg
import pytest

from conftest import toml, until
from daemon import Foreground, threads, wait_listening
from greyd import config as configuration, replies
from greyd.context import Context
from greyd.greylist import Greylister
from greyd.pgpool import PgBackend
from greyd.server import Daemon
from pgserver import PgServer
from smtpclient import R, Raw
from upstream import Upstream, free_port

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 1.0                   # database.timeout of every greyd here
BOUND = TIMEOUT + 0.5           # the slowest RCPT reply allowed on a fault path
FAULT = 1.5                     # seconds a fault lasts under traffic
HEAL = 8.0                      # seconds to record again once the server is back
DELAY = 300                     # greylist.delay
LOCAL_ERROR = R(replies.LOCAL_ERROR)
UPSTREAM_OK = (250, "2.1.5 OK")
_databases = itertools.count(1)


def greylisted(reply: tuple[int, str]) -> bool:
    return reply[0] == 451 and reply[1].startswith("4.7.1 Greylisted")


def pg_config(root: Path, url: str, mode: str, upstream_port: int, listen: int = 0) -> Path:
    """A config for greyd on PostgreSQL at `url`, database.timeout 1 s."""
    path = root / "etc" / "greyd.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml({
        "server": {"listen": [f"127.0.0.1:{listen}"], "hostname": "mx.greyd.test",
                   "command_timeout": 10, "max_errors": 100,
                   "pidfile": str(root / "var/greyd.pid")},
        "upstream": {"host": "127.0.0.1", "port": upstream_port, "timeout": 5},
        "relay": {"domains": ["localhost"], "clients": ["192.0.2.0/24"]},
        "greylist": {"delay": DELAY, "on_store_error": mode},
        "dns": {"enabled": False},
        "log": {"file": str(root / "var/log/greyd.log")},
        "database": {"url": url, "timeout": f"{TIMEOUT:g}s"},
    }))
    return path


class Running:
    """greyd serving in this process on the PostgreSQL store."""

    def __init__(self, config_path: Path, clock):
        config = configuration.load(config_path)
        self.ctx = Context(config, Greylister.open(config, clock=clock))
        self.daemon = Daemon(self.ctx, grace=1)
        self.daemon.start()
        self.port = self.daemon.addresses[0][1]

    def flush(self) -> None:
        self.ctx.greylister.recorder.flush()

    def stop(self) -> float:
        """Stop it (once); the seconds that took."""
        started = time.monotonic()
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None
        return time.monotonic() - started


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, pg_server):
    """A PostgreSQL server of this module's own, to stop, crash and hang (not
    the session's pg_server, which other tests share; required for its skip)."""
    with PgServer(tmp_path_factory.mktemp("pg-faults")) as own:
        yield own


@pytest.fixture
def server(faulty):
    """The module's server, running; running again after the test, whatever it did."""
    faulty.start()
    yield faulty
    faulty.resume()
    faulty.start()


@pytest.fixture
def database(server) -> str:
    """The URL of a new database of this test's own on `server`."""
    return server.create_database(f"greyd_{next(_databases)}")


@pytest.fixture
def run_greyd(tmp_path, clock):
    """run_greyd(url, mode, upstream_port) -> Running, stopped at the end."""
    running: list[Running] = []

    def start(url: str, mode: str = "tempfail", upstream_port: int | None = None) -> Running:
        path = pg_config(tmp_path, url, mode, upstream_port or free_port())
        running.append(Running(path, clock))
        return running[-1]

    yield start
    for each in running:
        each.stop()


def rcpt(port: int, recipient: str,
         sender: str = "a@example.net") -> tuple[tuple[int, str], float]:
    """One session with one RCPT: its reply and how long that reply took."""
    with Raw(port, timeout=10) as raw:
        assert raw.cmd("EHLO mail.example.net")[0] == 250
        assert raw.cmd(f"MAIL FROM:<{sender}>")[0] == 250
        started = time.monotonic()
        reply = raw.cmd(f"RCPT TO:<{recipient}>")
        took = time.monotonic() - started
        raw.cmd("QUIT")
    return reply, took


def stored(url: str, recipient: str) -> bool:
    with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM triplets WHERE recipient = %s",
                            (recipient,)).fetchone()[0] == 1


def store_lines(logs) -> tuple[int, int]:
    return len(logs.matching(r"^store failure")), len(logs.matching(r"^store recovered"))


# -- 1. PostgreSQL down when greyd starts -----------------------------------------------------

@pytest.mark.parametrize("mode", ["tempfail", "accept"])
def test_greyd_starts_without_postgresql_and_heals(server, database, run_greyd, clock, logs,
                                                    mode):
    """Started with the server down, greyd answers per on_store_error within
    the timeout, logs one failure; the server started, greyd greylists and
    records again by itself, logs one recovery, and the retry passes."""
    server.stop()
    with Upstream() as upstream:
        greyd = run_greyd(database, mode, upstream.port)
        during = [rcpt(greyd.port, f"down{i}@localhost") for i in range(2)]
        expected = LOCAL_ERROR if mode == "tempfail" else UPSTREAM_OK
        assert [reply for reply, _ in during] == [expected] * 2
        assert max(took for _, took in during) < BOUND, during
        assert store_lines(logs) == (1, 0)

        server.start()
        up = time.monotonic()
        healed = until(lambda: greylisted(rcpt(greyd.port, "after@localhost")[0]), HEAL)
        print(f"down at start, {mode}: slowest {max(t for _, t in during):.3f} s, "
              f"healed in {time.monotonic() - up:.2f} s")
        assert healed, "greyd did not use the database once it was up"
        greyd.flush()
        assert stored(database, "after@localhost")
        assert store_lines(logs) == (1, 1)
        clock.advance(DELAY + 1)
        assert rcpt(greyd.port, "after@localhost")[0] == UPSTREAM_OK   # passed
    assert not logs.matching("Traceback|internal error")


def test_the_daemon_starts_without_postgresql_and_heals(tmp_path, server, database):
    """The same, through the real `greyd start --foreground`."""
    port = free_port()
    config = pg_config(tmp_path, database, "tempfail", free_port(), listen=port)
    logfile = tmp_path / "var/log/greyd.log"
    server.stop()
    with Foreground(config) as daemon:
        wait_listening(port)
        during = [rcpt(port, f"down{i}@localhost") for i in range(2)]
        assert [reply for reply, _ in during] == [LOCAL_ERROR] * 2
        server.start()
        after: list[float] = []

        def recorded() -> bool:
            reply, took = rcpt(port, "after@localhost")
            after.append(took)
            return greylisted(reply)
        assert until(recorded, HEAL)
        slowest = max(took for _, took in during + [(None, t) for t in after])
        print(f"daemon down at start: slowest {slowest:.3f} s")
        assert slowest < BOUND      # the server's clock is read beside, not before, a decision
        assert until(lambda: stored(database, "after@localhost"), 5)
        assert daemon.stop() == 0
    log = logfile.read_text()
    assert log.count("store failure") == 1 and log.count("store recovered") == 1, log
    assert "Traceback" not in log
    # nor a line per connection attempt of the pool on standard error (the journal)
    assert daemon.stderr.count("store failure") == 1
    assert "error connecting" not in daemon.stderr, daemon.stderr


# -- 2. Faults mid-traffic: every reply within the timeout, no thread stuck, healed ------------

class Traffic:
    """A few clients sending RCPTs without pause, each reply timed by the client."""

    def __init__(self, port: int, clients: int = 3):
        self.port = port
        self.stopping = threading.Event()
        self.replies: list[tuple[float, float, str, tuple[int, str]]] = []  # at, took, to, reply
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True)
                         for n in range(clients)]

    def __enter__(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(10)

    def _client(self, n: int) -> None:
        count = 0
        while not self.stopping.is_set():
            try:
                with Raw(self.port, timeout=10) as raw:
                    raw.cmd("EHLO mail.example.net")
                    raw.cmd(f"MAIL FROM:<c{n}@example.net>")
                    for _ in range(20):
                        if self.stopping.is_set():
                            break
                        count += 1
                        to = f"c{n}-{count}@localhost"
                        started = time.monotonic()
                        reply = raw.cmd(f"RCPT TO:<{to}>")
                        self.replies.append((started, time.monotonic() - started, to, reply))
                    raw.cmd("QUIT")
            except OSError as error:
                self.errors.append(error)
                return

    def since(self, moment: float) -> list[tuple[float, float, str, tuple[int, str]]]:
        return [each for each in list(self.replies) if each[0] >= moment]

    def slowest(self) -> float:
        return max(took for _, took, _, _ in self.replies)


def recorded_since(traffic: Traffic, greyd: Running, url: str, moment: float) -> str | None:
    """A recipient greylisted after `moment` and found in the database, if any."""
    for _, _, to, reply in reversed(traffic.since(moment)):
        if greylisted(reply):
            greyd.flush()
            return to if stored(url, to) else None
    return None


def settled_threads(baseline: int) -> int:
    """This process's thread count once back to `baseline` (idle session
    threads end after a while), else after 5 s."""
    return until(lambda: threading.active_count() <= baseline and threading.active_count(),
                 5) or threading.active_count()


FAULTS = {
    "restart": (lambda s: s.stop("fast"), lambda s: s.start()),
    "kill": (lambda s: s.kill(), lambda s: s.start()),
    "pause": (lambda s: s.pause(), lambda s: s.resume()),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_replies_stay_within_the_timeout_and_the_pool_heals(server, database, run_greyd,
                                                            logs, fault):
    """Clients send RCPTs throughout a fault: every reply within the
    timeout, none but greylisted or on_store_error; afterwards no thread
    left over, and decisions recorded again within seconds, no restart."""
    break_it, mend_it = FAULTS[fault]
    greyd = run_greyd(database)
    assert greylisted(rcpt(greyd.port, "warm@localhost")[0])
    greyd.flush()
    baseline = threading.active_count()
    with Traffic(greyd.port) as traffic:
        time.sleep(0.3)
        break_it(server)
        time.sleep(FAULT)
        mend_it(server)
        mended = time.monotonic()
        healed = until(lambda: recorded_since(traffic, greyd, database, mended), HEAL)
        heal_time = time.monotonic() - mended
    answers = {reply for _, _, _, reply in traffic.replies}
    errors = sum(reply == LOCAL_ERROR for _, _, _, reply in traffic.replies)
    print(f"{fault}: {len(traffic.replies)} RCPTs ({errors} on_store_error), slowest "
          f"{traffic.slowest():.3f} s, healed in {heal_time:.2f} s, "
          f"failure/recovery lines {store_lines(logs)}")
    assert not traffic.errors
    assert traffic.slowest() < BOUND, sorted(t for _, t, _, _ in traffic.replies)[-5:]
    assert all(greylisted(reply) or reply == LOCAL_ERROR for reply in answers), answers
    assert healed, f"nothing recorded within {HEAL} s of the server's return"
    assert settled_threads(baseline) <= baseline
    assert store_lines(logs) == (1, 1), logs.messages       # once each, not per RCPT
    if fault == "pause":
        assert logs.matching("^store operation cut")
    assert not logs.matching("Traceback|internal error")


class Silent:
    """A loopback listener that accepts every connection and never says a word."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            conn.settimeout(1)
            self.held.append(conn)

    def __enter__(self) -> "Silent":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self._thread.join(5)
        for conn in [self.listener, *self.held]:
            conn.close()


def test_a_connect_that_never_completes_holds_no_reply(run_greyd, logs):
    """The database URL leads to a listener that never answers: greyd starts,
    every RCPT is answered per on_store_error within the timeout, and a
    stop meanwhile is not held up by the store."""
    with Silent() as silent:
        url = f"postgresql://postgres:x@127.0.0.1:{silent.port}/greyd"
        started = time.monotonic()
        greyd = run_greyd(url)
        print(f"started in {time.monotonic() - started:.2f} s")
        assert rcpt(greyd.port, "warm@localhost")[0] == LOCAL_ERROR   # the pool's threads
        baseline = threading.active_count()
        with Traffic(greyd.port) as traffic:
            time.sleep(FAULT)
        print(f"silent: {len(traffic.replies)} RCPTs, slowest {traffic.slowest():.3f} s")
        assert not traffic.errors and traffic.replies
        assert traffic.slowest() < BOUND
        assert {reply for _, _, _, reply in traffic.replies} == {LOCAL_ERROR}
        assert settled_threads(baseline) <= baseline
        assert store_lines(logs) == (1, 0)
        with Traffic(greyd.port, clients=2):     # stopped while sessions wait on the store
            time.sleep(0.3)
            took = greyd.stop()
        print(f"silent: stopped in {took:.2f} s")
        # the sessions' grace (1 s), then the pool's workers end their connect
        # attempts (libpq's connect_timeout: 2 s at least) one after the other
        assert took < 8


def test_the_daemon_keeps_no_thread_stuck_on_a_hung_server(tmp_path, server, database):
    """`greyd start --foreground` through a SIGSTOPped server: replies within
    the timeout, its thread count back to where it was, healed on SIGCONT."""
    port = free_port()
    config = pg_config(tmp_path, database, "tempfail", free_port(), listen=port)
    with Foreground(config) as daemon:
        wait_listening(port)
        assert greylisted(rcpt(port, "warm@localhost")[0])
        baseline = threads(daemon.proc.pid)
        with Traffic(port) as traffic:
            time.sleep(0.3)
            server.pause()
            time.sleep(FAULT)
            server.resume()
            mended = time.monotonic()
            assert until(lambda: any(greylisted(r) for _, _, _, r in traffic.since(mended)),
                         HEAL)
        print(f"daemon pause: slowest {traffic.slowest():.3f} s")
        assert not traffic.errors
        assert traffic.slowest() < BOUND
        assert until(lambda: threads(daemon.proc.pid) <= baseline, 5), \
            (threads(daemon.proc.pid), baseline)
        assert daemon.stop() == 0
    log = (tmp_path / "var/log/greyd.log").read_text()
    assert "store operation cut" in log and "Traceback" not in log


# -- 3. A restart leaves stale pooled connections: no client pays for them --------------------

@pytest.mark.parametrize("fault", ["restart", "kill"])
def test_a_stale_pooled_connection_costs_no_store_error(server, database, run_greyd, logs,
                                                        fault):
    """After a fast restart or a crash every pooled connection is dead; the
    first RCPT after the server is back is greylisted and recorded as
    usual, not answered per on_store_error, and no failure is logged."""
    greyd = run_greyd(database)
    with Traffic(greyd.port, clients=4):     # several connections into the pool
        time.sleep(0.5)
    greyd.flush()
    pooled = greyd.ctx.greylister.backend._pool.get_stats()["pool_size"]
    print(f"stale after {fault}: {pooled} pooled connections")
    assert pooled >= 2
    if fault == "kill":
        server.kill()
    else:
        server.stop("fast")
    server.start()
    first, took = rcpt(greyd.port, "first@localhost")
    assert greylisted(first), first
    print(f"stale after {fault}: first RCPT in {took:.3f} s")
    assert took < BOUND
    greyd.flush()
    assert stored(database, "first@localhost")
    assert store_lines(logs) == (0, 0), logs.messages


# -- the time base is still the server's, read beside the decisions ----------------------------

def test_the_server_clock_is_read_beside_decisions_and_at_once_when_up(pg_url):
    """A host clock 1000 s fast still decides by the server's: read by a
    thread of its own (the first call answers at once, by the local clock),
    or at once when the store answered at start."""
    def skewed() -> float:                          # a host clock 1000 s fast
        return time.time() + 1000.0
    backend = PgBackend(pg_url, TIMEOUT)
    try:
        beside = backend.time_base(skewed)           # not opened: nothing read yet
        assert abs(beside() - time.time()) > 900
        assert until(lambda: abs(beside() - time.time()) < 5, 5)
        backend.open()
        assert abs(backend.time_base(skewed)() - time.time()) < 5
    finally:
        backend.close()

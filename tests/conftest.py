"""Shared fixtures and helpers: a fake clock, config files, greyd in-process on
loopback, a store of the test's own, the policy's facts in memory, polling.

greyd runs on ("127.0.0.1", 0) in threads of the test process; the upstream
MTA is a real aiosmtpd server (tests/upstream.py). The test client comes from
127.0.0.1, which the fixtures leave out of relay.clients so that it is
greylisted like any stranger. greyd as a subprocess is tests/daemon.py; the
SMTP clients are tests/smtpclient.py.
"""

from __future__ import annotations

import compileall
import json
import logging
import re
import smtplib
import threading
import time
from collections.abc import Callable
from typing import TypeVar
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from greyd import config as configuration, log, policy, whitelist
from greyd.greylist import Greylister
from greyd.server import Daemon
from greyd.context import Context
from greyd.store import Store

from smtpclient import Raw
from upstream import Upstream, free_port

START = 1_700_000_000.0
Value = TypeVar("Value")


def pytest_sessionstart(session) -> None:
    """greyd's modules compiled once for the hundreds of greyd processes the
    tests start: where PYTHONDONTWRITEBYTECODE is set (some CI images set
    it), each of them would compile its modules anew, about 0.3 s a start."""
    compileall.compile_dir(Path(configuration.__file__).parent, quiet=1)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = START):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def toml(sections: dict) -> str:
    """A TOML document from {section: {key: value}} (strings, numbers, bools, lists)."""
    out = []
    for section, values in sections.items():
        out.append(f"[{section}]")
        out.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    return "\n".join(out) + "\n"


def merge(base: dict, overrides: dict) -> dict:
    merged = {section: dict(values) for section, values in base.items()}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return merged


def base_sections(root: Path, upstream_port: int) -> dict:
    return {
        "server": {"listen": ["127.0.0.1:0"], "hostname": "mx.greyd.test",
                   "command_timeout": 10, "data_timeout": 10,
                   "pidfile": str(root / "var/greyd.pid")},
        "upstream": {"host": "127.0.0.1", "port": upstream_port, "timeout": 5},
        "relay": {"domains": ["localhost", "example.org"], "clients": ["192.0.2.0/24"]},
        "greylist": {"delay": "5m"},
        "dns": {"enabled": False},
        "log": {"file": ""},
        "database": {"path": str(root / "var/greyd.db")},
    }


def write_config(root: Path, upstream_port: int, **overrides) -> Path:
    """conftest's config with `overrides`; a database `url` replaces the file."""
    sections = merge(base_sections(root, upstream_port), overrides)
    if sections["database"].get("url"):
        sections["database"].pop("path", None)
    path = root / "etc" / "greyd.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml(sections))
    return path


@dataclass
class Greyd:
    """greyd serving in this process."""

    daemon: Daemon
    ctx: Context
    clock: Clock

    @property
    def port(self) -> int:
        return self.daemon.addresses[0][1]

    @property
    def config(self) -> configuration.Config:
        return self.ctx.config

    def smtp(self, source: str | None = None) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=5,
                              source_address=(source, 0) if source else None)
        client.ehlo("client.example.net")
        return client

    def raw(self, **kwargs) -> Raw:
        return Raw(self.port, **kwargs)

    def store(self) -> Store:
        """A connection of the test's own, once the daemon's queued writes are committed."""
        self.ctx.greylister.recorder.flush()
        return Store(self.config.database.path)

    def whitelist(self, kind: str = "client", value: str = "127.0.0.1/32") -> None:
        """Add a static whitelist entry; by default the test client, so that every
        recipient that passes the relay check goes straight to the upstream."""
        with self.store() as store:
            store.add_whitelist(kind, value)


class LogLines(logging.Handler):
    """What the "greyd" loggers say, from any thread: `lines` as the log file
    has them, `messages` without the timestamp and level."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter(log.FORMAT))
        self.lines: list[str] = []
        self.messages: list[str] = []
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._changed:
            self.lines.append(self.format(record))
            self.messages.append(record.getMessage())
            self._changed.notify_all()

    def matching(self, pattern: str) -> list[str]:
        with self._changed:
            return [m for m in self.messages if re.search(pattern, m)]

    def wait_for(self, pattern: str, timeout: float = 5) -> list[str]:
        with self._changed:
            self._changed.wait_for(
                lambda: any(re.search(pattern, m) for m in self.messages), timeout)
        found = self.matching(pattern)
        assert found, f"no log message matches {pattern!r}: {self.messages}"
        return found


@pytest.fixture
def logs():
    """The log of this test, by a handler of our own (propagation may be off)."""
    logger = logging.getLogger(log.LOGGER)
    handler, level = LogLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def until(condition: Callable[[], Value], timeout: float, step: float = 0.05) -> Value:
    """Poll `condition` until it returns a true value, and return that value; its
    last, false, value once `timeout` seconds pass. The one waiting loop of the tests."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            return result
        time.sleep(step)
    return result


def greeted(port: int, *, source: str | None = None, timeout: float = 5) -> Raw | None:
    """A new connection to greyd that it greets with 220, tried again while it
    refuses (421) for up to `timeout` seconds; None if it never greets one."""
    def attempt() -> Raw | None:
        probe = Raw(port, source=source)
        if probe.greeting[0] == 220:
            return probe
        probe.close()
        return None
    return until(attempt, timeout)


# -- the store, and the policy's facts without one -------------------------------------------

@pytest.fixture
def database(tmp_path) -> Path:
    """This test's own database file (not created)."""
    return tmp_path / "greyd.db"


@pytest.fixture
def store(database):
    """A migrated Store on this test's own database file."""
    with Store(database) as opened:
        opened.migrate()
        yield opened


@dataclass
class MemoryFacts:
    """policy.Facts in memory: what a decision reads, given as literals.

    `entries` are the static whitelist, `networks` the auto-whitelist entries
    by client network, `triplets` what is known of each triplet. Nothing is
    written: a policy test says what the store would hold, and `decide` reads it.
    """

    entries: list[whitelist.Entry] = field(default_factory=list)
    networks: dict[str, policy.AutoEntry] = field(default_factory=dict)
    triplets: dict[policy.Triplet, policy.Seen] = field(default_factory=dict)

    def whitelist(self) -> policy.Whitelist:
        return whitelist.Whitelist.build(self.entries)

    def auto_entry(self, network: str) -> policy.AutoEntry | None:
        return self.networks.get(network)

    def seen(self, triplet: policy.Triplet) -> policy.Seen | None:
        return self.triplets.get(triplet)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def upstream():
    with Upstream() as server:
        yield server


@pytest.fixture
def port() -> int:
    """A free loopback port for a greyd started in a subprocess."""
    return free_port()


@pytest.fixture
def start_greyd(tmp_path, clock):
    """start_greyd(upstream_port, grace=1, store=None, **{section: {key: value}}) ->
    Greyd, stopped at teardown; `grace`: the seconds a stop lets sessions finish;
    `store`: a storage.Backend instead of the configured database."""
    running: list[Daemon] = []

    def start(upstream_port: int, *, grace: float = 1, store=None, **overrides) -> Greyd:
        config = configuration.load(write_config(tmp_path, upstream_port, **overrides))
        greylister = (Greylister.open(config, clock=clock) if store is None
                      else Greylister(config, store, clock=clock))
        ctx = Context(config, greylister)
        daemon = Daemon(ctx, grace=grace)
        daemon.start()
        running.append(daemon)
        return Greyd(daemon, ctx, clock)

    yield start
    for daemon in running:
        daemon.stop()


@pytest.fixture
def greyd(start_greyd, upstream) -> Greyd:
    return start_greyd(upstream.port)


# -- PostgreSQL: one throwaway server for the run, a fresh database per test ------------------

import itertools  # noqa: E402  (this section's own imports, kept with it)
import os  # noqa: E402

from pgserver import PgServer, binaries  # noqa: E402

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    """One PostgreSQL server on 127.0.0.1 for the whole run (tests/pgserver.py),
    stopped and removed at the end. Without the binaries the test is skipped,
    except in CI (the env var CI set), where .ci/run installs them: there it fails."""
    if binaries() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries not found, yet CI is set: "
                        ".ci/run installs Debian's postgresql", pytrace=False)
        pytest.skip("PostgreSQL binaries not found (Debian package postgresql); "
                    "the PostgreSQL tests need them")
    with PgServer(tmp_path_factory.mktemp("pg")) as server:
        yield server


@pytest.fixture
def pg_url(pg_server) -> str:
    """The URL (with the password) of a new empty database of this test's own,
    dropped at the end with whatever sessions the test left open."""
    name = f"t_{next(_databases)}"
    url = pg_server.create_database(name)
    yield url
    pg_server.drop_database(name)


# -- either store: the decision and CLI tests run on SQLite and on PostgreSQL -----------------

@dataclass
class Database:
    """The store a parametrized test runs on: `section` is its [database]
    section (conftest's file, or a fresh PostgreSQL database); `open()` a
    migrated connection of the test's own, with greyd's queries."""

    kind: str
    section: dict

    def open(self):
        if self.kind == "sqlite":
            path = Path(self.section["path"])
            path.parent.mkdir(parents=True, exist_ok=True)
            store = Store(path)
        else:
            from greyd.postgres import PgStore
            store = PgStore.open(self.section["url"], timeout=5)
        store.migrate()
        return store

    def rows(self, table: str) -> list[tuple]:
        """Every row of `table`, sorted, as plain tuples."""
        with self.open() as store:
            return sorted(tuple(row) for row in store.conn.execute(f"SELECT * FROM {table}"))


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database(request, tmp_path) -> Database:
    """conftest's SQLite file, then a fresh database on the run's PostgreSQL server."""
    if request.param == "sqlite":
        return Database("sqlite", {"path": str(tmp_path / "var" / "greyd.db")})
    return Database("postgresql", {"url": request.getfixturevalue("pg_url")})

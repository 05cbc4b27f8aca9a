"""Two greyd hosts, one PostgreSQL greylist (the test suite's real server).

Hosts A and B are the real `greyd` command in subprocesses, two workers
each, on ports of their own, with the same [database] url; they are started
once for the module and every test uses client networks, senders and
recipients of its own (a source address in 127.0.N.0/24 per test). What
one host records, whitelists or counts, the other sees at its next RCPT;
the same new triplet at both at once is one row and no error; two hosts'
writes over the same triplets, in opposite orders, never deadlock; one time
base (the database server's clock) for hosts whose clocks disagree; two
cleanups at once neither deadlock nor count twice.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from conftest import merge, until, write_config
from daemon import GREYD, Foreground, greyd, wait_listening
from greyd import config as configuration, policy
from greyd.greylist import Greylister, backend_for
from greyd.pgpool import PgBackend
from greyd.postgres import PgStore
from greyd.storage import Decision, StoreError
from smtpclient import Raw, deliver
from upstream import Upstream, free_port

pytestmark = pytest.mark.timeout(60)

DELAY = 2                # seconds: greylist.delay of both hosts (short; a loaded machine's
                         # early retries and 40 simultaneous RCPTs still fall within it)
AUTO_AFTER = 3           # greylist.auto_whitelist_after of both hosts
BODY = b"Subject: multihost\r\n\r\nHello.\r\n"


def host_config(root: Path, upstream_port: int, url: str, port: int | None = None,
                **overrides) -> Path:
    """conftest's base config for a host at `root`, its store the PostgreSQL `url`."""
    return write_config(root, upstream_port, **merge({
        "server": {"listen": [f"127.0.0.1:{port or free_port()}"], "workers": 2,
                   "max_connections_per_client": 50},
        "greylist": {"delay": DELAY, "auto_whitelist_after": AUTO_AFTER},
        "log": {"file": str(root / "var/log/greyd.log")},
        "database": {"url": url, "timeout": "2s"},
    }, overrides))


@dataclass
class Host:
    """One greyd host: its config, its port, its daemon and its log file."""

    name: str
    root: Path
    config: Path
    port: int
    daemon: Foreground

    @property
    def log(self) -> str:
        path = self.root / "var/log/greyd.log"
        return path.read_text() if path.exists() else ""

    def decisions(self, sender: str) -> list[str]:
        """The reasons of this host's decision lines about `sender`, in order."""
        return re.findall(rf" decision .*from={re.escape(sender)} .*reason=(\S+)", self.log)


@pytest.fixture(scope="module")
def shared_url(pg_server):
    """A database of this module's own, shared by hosts A and B."""
    url = pg_server.create_database("multihost_hosts")
    yield url
    pg_server.drop_database("multihost_hosts")


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, shared_url):
    """Hosts A and B, started once for the module, stopped (exit 0) at its end."""
    with Upstream() as upstream:
        started = []
        try:
            for name in ("a", "b"):
                root = tmp_path_factory.mktemp(f"host-{name}")
                port = free_port()
                config = host_config(root, upstream.port, shared_url, port)
                started.append(Host(name, root, config, port, Foreground(config)))
            for host in started:
                wait_listening(host.port)
            yield started
        finally:
            codes = [host.daemon.stop() for host in started]
        assert codes == [0, 0], [host.daemon.stderr for host in started]


def rows(url: str, sql: str, *params) -> list[tuple]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        return conn.execute(sql, params or None).fetchall()


def triplets_of(url: str, sender: str) -> list[tuple]:
    return rows(url, "SELECT network, sender, recipient, first_seen, passed_at FROM triplets"
                     " WHERE sender = %s", sender)


def explain(host: Host, client: str, sender: str, recipient: str) -> dict:
    result = greyd("explain", "--client", client, "--sender", sender, "--recipient", recipient,
                   "--json", config=host.config)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- 1. a triplet recorded at one host passes at the other ------------------------------------

def test_a_first_attempt_at_a_passes_on_retry_at_b(hosts, shared_url):
    a, b = hosts
    source, sender = "127.0.1.1", "alice@example.net"
    first, _ = deliver(a.port, sender, "bob@localhost", source=source)
    assert first[0] == 451 and first[1].startswith(b"4.7.1 Greylisted"), first
    recorded = time.monotonic()
    assert until(lambda: triplets_of(shared_url, sender), 10), "A did not record the triplet"
    early, _ = deliver(b.port, sender, "bob@localhost", source=source)
    assert early[0] == 451, early               # B knows it: too early, not new
    time.sleep(max(0.0, recorded + DELAY + 0.3 - time.monotonic()))
    passed, data = deliver(b.port, sender, "bob@localhost", BODY, source=source)
    assert passed == (250, b"2.1.5 OK") and data[0] == 250
    assert until(lambda: a.decisions(sender) == ["new"], 10), a.log
    assert until(lambda: b.decisions(sender) == ["too-early", "passed"], 10), b.log
    assert [row[:3] for row in triplets_of(shared_url, sender)] == [
        ("127.0.1.0/24", sender, "bob@localhost")]


# -- 2. A's whitelist CLI reaches B's next RCPT -----------------------------------------------

def test_a_whitelist_entry_added_through_a_takes_effect_at_b(hosts):
    a, b = hosts
    source, sender = "127.0.2.1", "carol@example.net"
    before, _ = deliver(b.port, sender, "dave@localhost", source=source)
    assert before[0] == 451
    added = greyd("whitelist", "add", "--sender", sender, "--comment", "from host A",
                  config=a.config)
    assert added.returncode == 0, added.stderr
    after, data = deliver(b.port, sender, "dave@localhost", BODY, source=source)
    assert after == (250, b"2.1.5 OK") and data[0] == 250
    assert until(lambda: len(b.decisions(sender)) == 2, 10), b.log
    new, whitelisted = b.decisions(sender)
    assert new == "new" and whitelisted.startswith("whitelist:") and sender in whitelisted


# -- 3. the auto-whitelist counts the passes of both hosts ------------------------------------

def an_hour_passes(url: str, network: str) -> None:
    """A network earns at most one count an hour (SPEC §5.5): move its last
    count an hour back, instead of waiting the hour."""
    rows(url, "UPDATE auto_whitelist SET last_counted = last_counted - 3600"
              " WHERE network = %s RETURNING network", network)


def counted(url: str, network: str) -> int:
    found = rows(url, "SELECT count FROM auto_whitelist WHERE network = %s", network)
    return found[0][0] if found else 0


def test_the_auto_whitelist_counts_passes_at_both_hosts(hosts, shared_url):
    a, b = hosts
    source, network, sender = "127.0.3.1", "127.0.3.0/24", "erin@example.net"
    first, _ = deliver(a.port, sender, "frank@localhost", source=source)
    assert first[0] == 451
    recorded = time.monotonic()
    assert until(lambda: triplets_of(shared_url, sender), 10)
    time.sleep(max(0.0, recorded + DELAY + 0.3 - time.monotonic()))
    # Passes alternate: B (the retry that passes), A (known), B (known); after
    # each, a new sender from the network at the other host is greylisted,
    # until the passes of both add up to AUTO_AFTER.
    for n, host in enumerate([b, a, b], 1):
        rcpt, data = deliver(host.port, sender, "frank@localhost", BODY, source=source)
        assert rcpt[0] == 250 and data[0] == 250
        assert until(lambda: counted(shared_url, network) == n, 10), counted(shared_url, network)
        if n == AUTO_AFTER:
            break
        other, stranger = (a if host is b else b), f"stranger-{chr(96 + n)}@example.org"
        rcpt, _ = deliver(other.port, stranger, "frank@localhost", source=source)
        assert rcpt[0] == 451
        assert until(lambda: other.decisions(stranger) == ["new"], 10), other.log
        an_hour_passes(shared_url, network)
    report = explain(a, "127.0.3.9", "grace@example.org", "frank@localhost")
    assert (report["action"], report["reason"]) == ("accept", "auto-whitelist"), report
    assert until(lambda: a.decisions(sender) == ["new", "known"], 10), a.log
    assert until(lambda: b.decisions(sender) == ["passed", "known"], 10), b.log
    # A new sender from the network now passes at either host at once.
    for host in (a, b):
        rcpt, _ = deliver(host.port, f"{host.name}-new@example.org", "frank@localhost", BODY,
                          source=source)
        assert rcpt == (250, b"2.1.5 OK")
        assert until(lambda: host.decisions(f"{host.name}-new@example.org")
                     == ["auto-whitelist"], 10), host.log


# -- 4. the same new triplet at both hosts at once ---------------------------------------------

CLIENTS_PER_HOST = 20
ROUNDS = 3


def hammer(ports: list[int], source: str, sender: str, recipient: str) -> list[tuple]:
    """CLIENTS_PER_HOST sessions at each port, all at MAIL, then every RCPT at once."""
    sessions = [Raw(port, source=source) for port in ports for _ in range(CLIENTS_PER_HOST)]
    replies: list[tuple] = [()] * len(sessions)
    go = threading.Barrier(len(sessions), timeout=20)

    def one(i: int, raw: Raw) -> None:
        try:
            assert raw.cmd("EHLO mail.example.net")[0] == 250
            assert raw.cmd(f"MAIL FROM:<{sender}>")[0] == 250
            go.wait()
            replies[i] = raw.cmd(f"RCPT TO:<{recipient}>")
            raw.cmd("QUIT")
        finally:
            raw.close()

    threads = [threading.Thread(target=one, args=(i, raw)) for i, raw in enumerate(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return replies


def test_the_same_new_triplet_at_both_hosts_at_once_is_one_row_and_no_error(hosts, shared_url):
    a, b = hosts
    source, network, recipient = "127.0.4.1", "127.0.4.0/24", "henry@localhost"
    for n in range(ROUNDS):
        sender = f"hammer{chr(97 + n)}@example.net"    # digits would be folded to '#'
        replies = hammer([a.port, b.port], source, sender, recipient)
        ended = time.monotonic()
        assert len(replies) == 2 * CLIENTS_PER_HOST
        assert all(code == 451 and text.startswith("4.7.1 Greylisted")
                   for code, text in replies), replies
        assert until(lambda: len(a.decisions(sender)) + len(b.decisions(sender))
                     == 2 * CLIENTS_PER_HOST, 10)
        reasons = set(a.decisions(sender) + b.decisions(sender))
        assert reasons <= {"new", "too-early"} and "new" in reasons, reasons
        found = triplets_of(shared_url, sender)
        assert [row[:3] for row in found] == [(network, sender, recipient)]
        assert found[0][4] is None                      # pending, never passed
    # The last one's retries, at both hosts at once: all pass, one network count.
    time.sleep(max(0.0, ended + DELAY + 0.3 - time.monotonic()))
    replies = hammer([a.port, b.port], source, sender, recipient)
    assert all(reply == (250, "2.1.5 OK") for reply in replies), replies
    assert until(lambda: len(a.decisions(sender)) + len(b.decisions(sender))
                 == 4 * CLIENTS_PER_HOST, 10)
    assert set(a.decisions(sender)[CLIENTS_PER_HOST:]
               + b.decisions(sender)[CLIENTS_PER_HOST:]) <= {"passed", "known"}
    found = triplets_of(shared_url, sender)
    assert len(found) == 1 and found[0][4] is not None
    assert until(lambda: counted(shared_url, network) == 1, 10)   # once an hour, however many
    for host in (a, b):
        log = host.log
        assert not re.search(r"Traceback|store-error|deadlock", log), log
        assert [line for line in log.splitlines() if " INFO " not in line] == [], log


# -- 5. one time base for hosts whose clocks disagree ------------------------------------------

SKEW = 600      # seconds: one host's clock this far ahead, the other's this far behind


@pytest.fixture
def skewed_hosts(tmp_path, pg_url):
    """Two greylisters (hosts) on one database, in this process: `fast`'s local
    clock SKEW ahead, `slow`'s SKEW behind, each under its store's time base."""
    config = configuration.load(host_config(tmp_path, free_port(), pg_url))
    opened = {}
    for name, skew in (("fast", SKEW), ("slow", -SKEW)):
        backend = backend_for(config)
        backend.open()
        local = (lambda skew: lambda: time.time() + skew)(skew)
        opened[name] = Greylister(config, backend, clock=backend.time_base(local))
    yield opened
    for greylister in opened.values():
        greylister.close()


def passes_after(recorder_host: Greylister, other: Greylister, request: policy.Request) -> float:
    """Record `request` at one host; the seconds until the other would pass it."""
    assert recorder_host.decide(request).reason == "new"
    started = time.monotonic()
    recorder_host.recorder.flush()
    verdict = until(lambda: (v := other.explain(request).verdict).action == "accept" and v, 10,
                    step=0.02)
    waited = time.monotonic() - started
    assert verdict and verdict.reason == "passed", verdict
    assert other.decide(request).reason == "passed"
    return waited


def test_a_skewed_clock_neither_shortens_nor_lengthens_the_delay(skewed_hosts):
    fast, slow = skewed_hosts["fast"], skewed_hosts["slow"]
    ahead = policy.Request("198.51.100.7", "ivan@example.net", "judy@localhost")
    behind = policy.Request("198.51.100.8", "kim@example.net", "judy@localhost")
    # Recorded by the slow host: the fast one does not pass it early ...
    assert DELAY - 0.1 <= passes_after(slow, fast, ahead) <= DELAY + 2
    # ... and recorded by the fast host, the slow one does not wait longer.
    assert DELAY - 0.1 <= passes_after(fast, slow, behind) <= DELAY + 2
    # The contrast: on their raw clocks, the fast host would pass a triplet
    # the slow one just recorded, and the slow one make a retry wait SKEW more.
    raw_fast = Greylister(fast.config, fast.backend, clock=lambda: time.time() + SKEW)
    raw_slow = Greylister(slow.config, slow.backend, clock=lambda: time.time() - SKEW)
    fresh = policy.Request("198.51.100.9", "leo@example.net", "judy@localhost")
    assert slow.decide(fresh).reason == "new"
    slow.recorder.flush()
    assert raw_fast.explain(fresh).verdict.reason == "passed"
    assert fast.explain(fresh).verdict.reason == "too-early"
    again = policy.Request("198.51.100.10", "mia@example.net", "judy@localhost")
    assert fast.decide(again).reason == "new"
    fast.recorder.flush()
    assert raw_slow.explain(again).verdict.retry_in > SKEW
    assert slow.explain(again).verdict.retry_in <= DELAY


# -- 4b. two hosts' lots over the same triplets, in opposite orders --------------------------

def deadlocks(url: str) -> int:
    return rows(url, "SELECT deadlocks FROM pg_stat_database"
                     " WHERE datname = current_database()")[0][0]


def test_lots_over_shared_triplets_in_any_order_never_deadlock(pg_url):
    """Two hosts' writers (two threads each) commit lots that touch the same
    pending and passed triplets of two networks, one host in the opposite
    order of the other: every lot commits, and PostgreSQL saw no deadlock."""
    hosts = [PgBackend(pg_url, 2.0) for _ in range(2)]
    for backend in hosts:
        backend.open()
    now = time.time()
    pending = [policy.Triplet(f"10.0.{i % 2}.0/24", f"p{chr(97 + i)}@example.net",
                              "olga@localhost") for i in range(4)]
    passed = [policy.Triplet(f"10.0.{i % 2}.0/24", f"k{chr(97 + i)}@example.net",
                             "olga@localhost") for i in range(4)]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for t in pending + passed:
            conn.execute("INSERT INTO triplets VALUES (%s, %s, %s, %s, %s, %s)",
                         (*t, now, int(now), int(now) if t in passed else None))

    def lot(reverse: bool) -> list[Decision]:
        verdicts = [policy.Verdict("greylist", "too-early", t.network, t, update=policy.EARLY)
                    for t in pending]
        verdicts += [policy.Verdict("accept", "known", t.network, t, update=policy.KNOWN)
                     for t in passed]
        verdicts = [v for pair in zip(verdicts[:4], verdicts[4:]) for v in pair]
        return [Decision(v, time.time(), 86400) for v in (verdicts[::-1] if reverse else verdicts)]

    errors: list[str] = []
    committed = [0, 0, 0, 0]
    stop = time.monotonic() + 3

    def writer(i: int) -> None:
        while time.monotonic() < stop:
            try:
                hosts[i % 2].record(lot(reverse=bool(i % 2)))
                committed[i] += 1
            except StoreError as error:
                errors.append(str(error))

    try:
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        for backend in hosts:
            backend.close()
    assert errors == [], (errors, committed)
    assert all(committed), committed
    assert deadlocks(pg_url) == 0


# -- 6. two cleanups at once on the shared store ----------------------------------------------

EXPIRED_PENDING = 8_000
EXPIRED_PASSED = 2_000
LIVE = 5_000


def fill(url: str) -> None:
    """Expired pending and passed triplets, and live ones, in three statements."""
    with PgStore.open(url) as store:
        store.migrate()
    day = 86400
    with psycopg.connect(url, autocommit=True) as conn:
        now = conn.execute("SELECT extract(epoch FROM now())::bigint").fetchone()[0]
        insert = ("INSERT INTO triplets (network, sender, recipient, first_seen, last_seen,"
                  " passed_at) SELECT '10.' || (i / 256) || '.' || (i %% 256) || '.0/24',"
                  " %s::text || i || '@example.net', 'nick@localhost',"
                  " %s::float8, %s::bigint, %s::bigint FROM generate_series(1, %s) AS i")
        conn.execute(insert, ("pending", now - 3 * day, now - 3 * day, None, EXPIRED_PENDING))
        conn.execute(insert, ("passed", now - 40 * day, now - 36 * day, now - 40 * day,
                              EXPIRED_PASSED))
        conn.execute(insert, ("live", now - 60, now - 60, None, LIVE))


def removed(stdout: str, kind: str) -> int:
    found = re.search(rf"^removed (\d+) {kind} ", stdout, re.M)
    return int(found.group(1)) if found else 0


def test_two_cleanups_at_once_neither_deadlock_nor_count_twice(tmp_path, pg_url):
    fill(pg_url)
    configs = [host_config(tmp_path / name, free_port(), pg_url) for name in ("a", "b")]
    started = time.monotonic()
    procs = [subprocess.Popen([GREYD, "-c", str(config), "cleanup"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for config in configs]
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        results.append((proc.returncode, stdout, stderr))
    took = time.monotonic() - started
    assert [code for code, _, _ in results] == [0, 0], results
    assert all(not stderr for _, _, stderr in results), results
    outputs = [stdout for _, stdout, _ in results]
    skipped = [out for out in outputs if "another cleanup is running" in out]
    assert len(skipped) <= 1, outputs
    assert sum(removed(out, "pending") for out in outputs) == EXPIRED_PENDING, outputs
    assert sum(removed(out, "passed") for out in outputs) == EXPIRED_PASSED, outputs
    left = rows(pg_url, "SELECT sender LIKE 'live%', count(*) FROM triplets GROUP BY 1")
    assert left == [(True, LIVE)], left
    assert took < 30

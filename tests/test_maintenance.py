"""The operator's toolkit: `greyd triplets list|delete`, `greyd cleanup`, `greyd stats`,
and the cron wrapper scripts/greyd-cleanup.

The commands run as the real `greyd` in a subprocess against real stores, a
SQLite file and a PostgreSQL database (conftest's `any_database`), filled with
realistic rows (timestamps relative to now and to the config's
retry_window / max_age). The concurrency promise (SPEC §9: cleanup and traffic
at the same time, no client sees an error) is shown against a real daemon
(`greyd start --foreground`) and a real aiosmtpd upstream.
"""

from __future__ import annotations

import json
import os
import pty
import re
import smtplib
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import Database, write_config
from greyd import cli_maintenance, maintenance
from greyd.queries import transaction
from greyd.store import Store
from daemon import GREYD, Foreground, config_for, greyd, wait_listening
from smtpclient import deliver
from upstream import free_port

pytestmark = pytest.mark.timeout(120)

HOUR, DAY = 3600, 86400
RETRY_WINDOW, MAX_AGE = 2 * DAY, 20 * DAY   # what the tests' configs say ("2d", "20d")
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "greyd-cleanup"
CRON = Path(__file__).resolve().parent.parent / "etc" / "greyd.cron"
TRIPLET_SQL = "INSERT INTO triplets VALUES (?, ?, ?, ?, ?, ?)"


def make_config(tmp_path: Path, db=None, **overrides) -> Path:
    """A config for the CLI alone (no daemon runs; the upstream port is never dialled),
    on conftest's SQLite file or on the store `db` (a conftest.Database)."""
    if db is not None:
        overrides["database"] = db.section
    overrides["greylist"] = {"retry_window": "2d", "max_age": "20d",
                             **overrides.get("greylist", {})}
    return write_config(tmp_path, free_port(), **overrides)


def open_db(tmp_path: Path) -> Store:
    path = tmp_path / "var" / "greyd.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(path)
    store.migrate()
    return store


def fill(store: Store, triplets=(), auto=()) -> None:
    with transaction(store.conn):
        store.conn.executemany(TRIPLET_SQL, triplets)
        store.conn.executemany("INSERT INTO auto_whitelist VALUES (?, ?, ?, ?, ?)", auto)


def rows(store: Store, table: str) -> list[tuple]:
    return store.conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()


def listed(config: Path, *args: str) -> list[tuple]:
    """`greyd triplets list --json ARGS`: the (network, sender, recipient) keys it lists."""
    result = greyd("triplets", "list", "--json", *args, config=config)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["count"] == len(document["triplets"])
    return [(t["network"], t["sender"], t["recipient"]) for t in document["triplets"]]


def when(timestamp: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


# -- triplets list / delete -----------------------------------------------------------

NOW = int(time.time())
ALICE_PENDING = ("192.0.2.0/24", "alice@example.net", "bob@localhost", NOW - 600, NOW - 300, None)
BOUNCE_PASSED = ("192.0.2.0/24", "bounce-#-#@lists.example.net", "bob@localhost",
                 NOW - 2 * HOUR, NOW - HOUR, NOW - HOUR)
NULL_PENDING = ("198.51.100.0/24", "<>", "carol@example.org", NOW - 100, NOW - 100, None)
ALICE_PASSED = ("198.51.100.0/24", "alice@example.net", "dave@example.org",
                NOW - 3 * DAY, NOW - DAY, NOW - 3 * DAY + 400)
SRS_PENDING = ("2001:db8:1::/64", "srs#=example.com=joe@forwarder.example", "bob@localhost",
               NOW - 60, NOW - 60, None)
SAMPLE = [ALICE_PENDING, BOUNCE_PASSED, NULL_PENDING, ALICE_PASSED, SRS_PENDING]


def key(row: tuple) -> tuple:
    return row[:3]


@pytest.fixture
def sample(tmp_path, any_database) -> Path:
    config = make_config(tmp_path, any_database)
    with any_database.open() as store:
        fill(store, SAMPLE)
    return config


def test_list_shows_every_triplet_with_its_fields(sample):
    result = greyd("triplets", "list", "--json", config=sample)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["count"] == 5 and document["more"] is False and document["limit"] == 100
    by_key = {(t["network"], t["sender"], t["recipient"]): t for t in document["triplets"]}
    assert by_key[key(ALICE_PASSED)] == {
        "network": "198.51.100.0/24", "sender": "alice@example.net",
        "recipient": "dave@example.org", "first_seen": NOW - 3 * DAY, "last_seen": NOW - DAY,
        "passed_at": NOW - 3 * DAY + 400, "state": "passed"}
    assert by_key[key(NULL_PENDING)]["state"] == "pending"
    assert by_key[key(NULL_PENDING)]["passed_at"] is None
    assert list(by_key) == sorted(map(key, SAMPLE))   # key order


def test_list_human_table(sample):
    result = greyd("triplets", "list", config=sample)
    assert result.returncode == 0 and result.stderr == ""
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["NETWORK", "SENDER", "RECIPIENT", "FIRST", "SEEN", "LAST", "SEEN",
                              "STATE"]
    assert len(lines) == 5
    for row in SAMPLE:
        network, sender, recipient, first, last, passed = row
        line = next(line for line in lines if line.startswith(network + " ")
                    and f" {sender} " in line and f" {recipient} " in line)
        assert f"{when(first)}  {when(last)}" in line
        assert line.endswith("pending" if passed is None else "passed")


@pytest.mark.parametrize("args, expected", [
    (["--pending"], [ALICE_PENDING, NULL_PENDING, SRS_PENDING]),
    (["--passed"], [BOUNCE_PASSED, ALICE_PASSED]),
    (["--client", "192.0.2.77"], [ALICE_PENDING, BOUNCE_PASSED]),     # the network of the IP
    (["--client", "::ffff:198.51.100.9"], [NULL_PENDING, ALICE_PASSED]),
    (["--client", "2001:db8:1::beef"], [SRS_PENDING]),
    (["--client", "198.51.100.0/24"], [NULL_PENDING, ALICE_PASSED]),  # a network as listed
    (["--client", "203.0.113.5"], []),
    (["--sender", "Bounce-1234-5678@Lists.Example.NET"], [BOUNCE_PASSED]),  # normalized
    (["--sender", "bounce-#-#@lists.example.net"], [BOUNCE_PASSED]),        # as stored
    (["--sender", "prvs=0123abcd=Alice+promo@EXAMPLE.net"], [ALICE_PENDING, ALICE_PASSED]),
    (["--sender", "SRS0=HHH=TT=example.com=joe@forwarder.example"], [SRS_PENDING]),
    (["--sender", "<>"], [NULL_PENDING]),
    (["--sender", "@example.net"], [ALICE_PENDING, ALICE_PASSED]),
    (["--recipient", "BOB@LocalHost"], [ALICE_PENDING, BOUNCE_PASSED, SRS_PENDING]),
    (["--recipient", "@example.org"], [NULL_PENDING, ALICE_PASSED]),
    (["--client", "192.0.2.1", "--passed"], [BOUNCE_PASSED]),
    (["--sender", "alice@example.net", "--recipient", "dave@example.org"], [ALICE_PASSED]),
])
def test_list_filters(sample, args, expected):
    assert listed(sample, *args) == sorted(map(key, expected))


def test_list_limit(sample):
    result = greyd("triplets", "list", "--limit", "2", "--json", config=sample)
    document = json.loads(result.stdout)
    assert [key(tuple(t.values())) for t in document["triplets"]] == sorted(map(key, SAMPLE))[:2]
    assert document["more"] is True
    human = greyd("triplets", "list", "--limit", "2", config=sample)
    assert len(human.stdout.splitlines()) == 1 + 2
    assert "showing the first 2; more match: --limit 0 lists all" in human.stderr
    assert len(listed(sample, "--limit", "0")) == 5
    assert len(listed(sample, "--limit", "5")) == 5
    exact = greyd("triplets", "list", "--limit", "5", config=sample)
    assert exact.stderr == ""      # no note when nothing more matches


def test_list_with_a_client_prefix_from_the_config(tmp_path):
    config = make_config(tmp_path, greylist={"ipv4_prefix": 32})
    with open_db(tmp_path) as store:
        fill(store, [("192.0.2.7/32", "a@example.net", "b@localhost", NOW, NOW, None),
                     ("192.0.2.8/32", "a@example.net", "b@localhost", NOW, NOW, None)])
    assert listed(config, "--client", "192.0.2.7") == [("192.0.2.7/32", "a@example.net",
                                                        "b@localhost")]


def test_list_errors_are_one_line(sample):
    bad = greyd("triplets", "list", "--client", "mail.example.net", config=sample)
    assert bad.returncode == 1
    assert bad.stderr.splitlines() == [
        "greyd: --client: not an IP address or network: mail.example.net"]
    both = greyd("triplets", "list", "--pending", "--passed", config=sample)
    assert both.returncode == 2 and "--pending and --passed exclude each other" in both.stderr
    negative = greyd("triplets", "list", "--limit", "-1", config=sample)
    assert negative.returncode == 2


def test_list_of_a_database_that_does_not_exist_is_refused_and_creates_nothing(tmp_path):
    config = make_config(tmp_path)
    result = greyd("triplets", "list", config=config)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"greyd: no database at {tmp_path}/var/greyd.db; ")
    assert not (tmp_path / "var" / "greyd.db").exists()


def test_delete_removes_exactly_what_matches(sample, any_database):
    dry = greyd("triplets", "delete", "--client", "192.0.2.9", "--dry-run", config=sample)
    assert dry.returncode == 0 and dry.stdout == "would delete 2 triplets\n"
    assert len(listed(sample, "--limit", "0")) == 5

    gone = greyd("triplets", "delete", "--client", "192.0.2.9", config=sample)
    assert gone.returncode == 0 and gone.stdout == "deleted 2 triplets\n"
    assert listed(sample) == sorted(map(key, [NULL_PENDING, ALICE_PASSED, SRS_PENDING]))

    one = greyd("triplets", "delete", "--sender", "Alice+x@Example.NET", "--passed", config=sample)
    assert one.stdout == "deleted 1 triplet\n"
    assert listed(sample) == sorted(map(key, [NULL_PENDING, SRS_PENDING]))

    none = greyd("triplets", "delete", "--recipient", "nobody@localhost", config=sample)
    assert none.returncode == 0 and none.stdout == "deleted 0 triplets\n"

    assert any_database.rows("triplets") == sorted([NULL_PENDING, SRS_PENDING])


def test_delete_refuses_without_a_filter_unless_all(sample):
    refused = greyd("triplets", "delete", config=sample)
    assert refused.returncode == 2
    assert "refusing to delete every triplet (add --all if that is what you mean)" in refused.stderr
    assert len(listed(sample)) == 5
    mixed = greyd("triplets", "delete", "--all", "--pending", config=sample)
    assert mixed.returncode == 2 and "--all takes no filter" in mixed.stderr
    assert len(listed(sample)) == 5
    everything = greyd("triplets", "delete", "--all", config=sample)
    assert everything.returncode == 0 and everything.stdout == "deleted 5 triplets\n"
    assert listed(sample) == []


# -- cleanup --------------------------------------------------------------------------

def expiring_store(db, tmp_path: Path, now: int) -> tuple[Path, dict[str, list],
                                                         dict[str, list]]:
    """The store `db` with rows of each kind, some expired and some not;
    (config, expired, kept)."""
    config = make_config(tmp_path, db)
    net, other = "203.0.113.0/24", "198.51.100.0/24"
    expired = {
        "triplets": [
            (net, "old@example.net", "a@localhost", now - RETRY_WINDOW - HOUR,
             now - RETRY_WINDOW - HOUR, None),                                  # never retried
            (other, "<>", "b@localhost", now - RETRY_WINDOW - 1, now - HOUR,
             None),                                                           # retried too late
            (net, "gone@example.net", "a@localhost", now - 60 * DAY, now - MAX_AGE - 1,
             now - 60 * DAY + 300),                                           # passed, unseen
            (other, "gone@example.net", "c@localhost", now - 90 * DAY, now - MAX_AGE - DAY,
             now - 90 * DAY + 300),
            (other, "gone@example.net", "d@localhost", now - 90 * DAY, now - 40 * DAY,
             now - 90 * DAY + 300),
        ],
        "auto_whitelist": [
            ("192.0.2.0/24", 9, now - 90 * DAY, now - MAX_AGE - 1, now - MAX_AGE - 1),
            ("2001:db8::/64", 2, now - 90 * DAY, now - 50 * DAY, now - 50 * DAY),
        ],
        "whitelist": [("recipient", "temp@localhost", "for a week", now - 8 * DAY, now - 60)],
    }
    kept = {
        "triplets": [
            (net, "new@example.net", "a@localhost", now - RETRY_WINDOW + HOUR,
             now - RETRY_WINDOW + HOUR, None),                                  # may still retry
            (other, "new@example.net", "a@localhost", now - 300, now - 300, None),
            (net, "known@example.net", "a@localhost", now - 60 * DAY, now - MAX_AGE + HOUR,
             now - 60 * DAY + 300),                                           # passed, seen lately
            (other, "known@example.net", "c@localhost", now - 3 * DAY, now - 10,
             now - 3 * DAY + 300),   # first seen before retry_window, but passed
        ],
        "auto_whitelist": [("198.51.100.0/24", 7, now - 90 * DAY, now - HOUR, now - HOUR)],
        "whitelist": [("client", "192.0.2.0/24", "partner", now - DAY, None),
                      ("sender", "@example.com", "until tomorrow", now - DAY, now + DAY)],
    }
    with db.open() as store:
        fill(store, expired["triplets"] + kept["triplets"],
             expired["auto_whitelist"] + kept["auto_whitelist"])
        for kind, value, comment, added, expires in expired["whitelist"] + kept["whitelist"]:
            store.add_whitelist(kind, value, comment, expires, now=added)
    return config, expired, kept


def contents(db) -> dict[str, list]:
    return {table: db.rows(table) for table in ("triplets", "auto_whitelist", "whitelist")}


CLEANUP_LINES = [
    "{verb} 2 pending triplets (not retried within retry_window)",
    "{verb} 3 passed triplets (unseen for max_age)",
    "{verb} 2 auto-whitelisted networks (unseen for max_age)",
    "{verb} 1 expired whitelist entries",
    "{verb} 0 decision counters (older than eight days)",
]


def test_cleanup_dry_run_counts_and_changes_nothing(tmp_path, any_database):
    config, _, _ = expiring_store(any_database, tmp_path, int(time.time()))
    before = contents(any_database)
    result = greyd("cleanup", "--dry-run", config=config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [line.format(verb="would remove")
                                          for line in CLEANUP_LINES]
    assert contents(any_database) == before


def test_cleanup_removes_exactly_the_expired_rows(tmp_path, any_database):
    config, expired, kept = expiring_store(any_database, tmp_path, int(time.time()))
    result = greyd("cleanup", config=config)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.splitlines() == [line.format(verb="removed") for line in CLEANUP_LINES]
    after = contents(any_database)
    assert after["triplets"] == sorted(kept["triplets"])
    assert after["auto_whitelist"] == sorted(kept["auto_whitelist"])
    assert [row[:2] for row in after["whitelist"]] == sorted(row[:2] for row in kept["whitelist"])

    again = greyd("cleanup", config=config)
    assert again.stdout.splitlines() == [re.sub(r"\d+", "0", line.format(verb="removed"))
                                         for line in CLEANUP_LINES]


def test_cleanup_quiet_prints_nothing_and_still_cleans(tmp_path, any_database):
    config, _, kept = expiring_store(any_database, tmp_path, int(time.time()))
    result = greyd("cleanup", "--quiet", config=config)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert contents(any_database)["triplets"] == sorted(kept["triplets"])


def run_script(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "GREYD_CONFIG"}
    env["PATH"] = f"{Path(GREYD).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**env, **(env_extra or {})}, cwd="/")


def test_cron_wrapper_is_silent_on_success(tmp_path):
    db = Database("sqlite", {"path": str(tmp_path / "var" / "greyd.db")})
    config, _, kept = expiring_store(db, tmp_path, int(time.time()))
    result = run_script(env_extra={"GREYD_CONFIG": str(config)})
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert contents(db)["triplets"] == sorted(kept["triplets"])

    with db.open() as store:      # the config as an argument
        fill(store, [("192.0.2.0/24", "late@example.net", "x@localhost", 1, 1, None)])
    result = run_script(str(config))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert contents(db)["triplets"] == sorted(kept["triplets"])


def test_cron_wrapper_passes_failures_to_stderr(tmp_path):
    bad = make_config(tmp_path / "bad", greylist={"max_ages": "20d"})
    result = run_script(str(bad))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == ["greyd: config: greylist.max_ages: unknown key"]

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    unwritable = make_config(tmp_path / "unwritable",
                             database={"path": str(blocker / "greyd.db")})
    result = run_script(env_extra={"GREYD_CONFIG": str(unwritable)})
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"greyd: no database at {blocker}/greyd.db; ")

    usage = run_script("one", "two")
    assert usage.returncode == 2 and usage.stderr == "usage: greyd-cleanup [CONFIG]\n"


def test_cron_file_runs_cleanup_quietly_hourly():
    lines = [line for line in CRON.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    settings = dict(line.split("=", 1) for line in lines if re.match(r"^[A-Z_]+=", line))
    assert {"SHELL", "PATH", "MAILTO"} <= settings.keys()
    jobs = [line.split(None, 6) for line in lines if not re.match(r"^[A-Z_]+=", line)]
    assert len(jobs) == 1
    minute, hour, dom, month, dow, user, command = jobs[0]
    assert minute.isdigit() and (hour, dom, month, dow) == ("*", "*", "*", "*")
    assert user == "greyd" and re.fullmatch(r"\S+/greyd -c \S+ cleanup --quiet", command)


def test_cleanup_commits_in_batches(tmp_path):
    now = int(time.time())
    with open_db(tmp_path) as store:
        fill(store, [(f"10.{i // 256 % 256}.{i % 256}.0/24", "bounce-#@lists.example.net",
                      f"user{i}@localhost", now - RETRY_WINDOW - DAY, now - RETRY_WINDOW - DAY,
                      None) for i in range(20_000)]
             + [(f"10.{i % 256}.0.0/24", "alice@example.net", f"keep{i}@localhost",
                 now - 60, now - 60, None) for i in range(500)])
        path = store.path
    watcher = sqlite3.connect(str(path), timeout=0, isolation_level=None)
    seen: list[tuple[str, int, int, int]] = []

    def progress(table: str, walked: int, removed: int) -> None:
        visible = watcher.execute("SELECT count(*) FROM triplets").fetchone()[0]
        watcher.execute("BEGIN IMMEDIATE")   # the write lock is free between batches
        watcher.execute("ROLLBACK")
        seen.append((table, walked, removed, visible))

    with Store(path) as store:
        removed = maintenance.cleanup(store.conn, retry_window=RETRY_WINDOW, max_age=MAX_AGE,
                                      now=now, batch_size=1000, progress=progress)
    assert removed == {"pending_triplets": 20_000, "passed_triplets": 0,
                       "auto_whitelist": 0, "whitelist": 0, "counters": 0}
    chunks = [entry for entry in seen if entry[0] == "triplets"]
    assert len(chunks) == 21 and sum(walked for _, walked, _, _ in chunks) == 20_500
    assert max(walked for _, walked, _, _ in chunks) == 1000
    # Each chunk was committed before the next began: another connection saw it.
    assert all(visible == 20_500 - removed for _, _, removed, visible in chunks)
    assert len({visible for *_, visible in chunks}) > 15
    assert chunks[-1][3] == 500
    watcher.close()


def test_progress_bar_on_a_terminal_for_a_large_store(tmp_path):
    now = int(time.time())
    config = make_config(tmp_path)
    with open_db(tmp_path) as store:
        fill(store, [(f"10.{i // 256 % 256}.{i % 256}.0/24", "a@example.net", f"u{i}@localhost",
                      now - 40 * DAY, now - 40 * DAY, now - 40 * DAY) for i in range(60_000)])
    master, slave = pty.openpty()
    proc = subprocess.Popen([GREYD, "-c", str(config), "cleanup"], stdout=slave,
                            stderr=subprocess.PIPE, text=True)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:   # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    text = output.decode()
    assert "cleaning triplets" in text and "100%" in text
    assert "removed 60000 passed triplets (unseen for max_age)" in text

    piped = greyd("cleanup", config=config)     # not a terminal: counts only
    assert "cleaning" not in piped.stdout and piped.stdout.startswith("removed 0 pending")


# -- the concurrency promise: cleanup while the daemon serves ----------------------------

class Client(threading.Thread):
    """Delivers until told to stop: a new triplet (greylisted) and a whitelisted
    recipient (relayed) per transaction; keeps every reply and how long RCPT took."""

    def __init__(self, number: int, port: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.number, self.port, self.stop = number, port, stop
        # (when, what, code, text, seconds RCPT took)
        self.replies: list[tuple[float, str, int, bytes, float]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        sequence = 0
        while not self.stop.is_set():
            sequence += 1
            try:
                self.transaction(f"c{self.number}-{sequence}@localhost")
            except (OSError, smtplib.SMTPException) as error:
                self.errors.append(f"{type(error).__name__}: {error}")

    def transaction(self, recipient: str) -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=15) as smtp:
            smtp.ehlo("mail.example.net")
            smtp.mail("newsletter@example.net")
            for address in (recipient, "vip@localhost"):
                started = time.monotonic()
                code, text = smtp.rcpt(address)
                self.replies.append((started, address, code, text, time.monotonic() - started))
            code, text = smtp.data(b"Subject: load\r\n\r\nhello\r\n")
            self.replies.append((time.monotonic(), "DATA", code, text, 0.0))


def test_cleanup_while_the_daemon_serves_mail_gives_no_client_an_error(tmp_path, upstream):
    port = free_port()
    config = config_for(tmp_path, upstream.port, port,
                        greylist={"delay": "1h", "retry_window": "2d", "max_age": "20d",
                                  "on_store_error": "tempfail"},
                        server={"max_connections_per_client": 200})
    now = int(time.time())
    expired = [(f"10.{i // 256 % 256}.{i % 256}.0/24", f"sender-{chr(97 + i % 26)}@example.net",
                f"user{i}@example.org", now - RETRY_WINDOW - HOUR, now - RETRY_WINDOW - HOUR,
                None) if i % 5 else
               (f"10.{i // 256 % 256}.{i % 256}.0/24", f"sender-{chr(97 + i % 26)}@example.net",
                f"user{i}@example.org", now - 90 * DAY, now - MAX_AGE - DAY, now - 90 * DAY)
               for i in range(100_000)]
    with open_db(tmp_path) as store:
        fill(store, expired)
        store.add_whitelist("recipient", "vip@localhost", "load test", now=now)
        path = store.path

    with Foreground(config) as daemon:
        wait_listening(port)
        stop = threading.Event()
        clients = [Client(number, port, stop) for number in range(20)]
        began = time.monotonic()
        for client in clients:
            client.start()
        time.sleep(0.3)                                     # traffic is flowing
        cleanup_started = time.monotonic()
        cleaner = subprocess.run([GREYD, "-c", str(config), "cleanup"], capture_output=True,
                                 text=True, timeout=60)
        cleanup_ended = time.monotonic()
        time.sleep(max(0.0, 2.5 - (cleanup_ended - began)))  # a couple of seconds in all
        stop.set()
        for client in clients:
            client.join(30)
        assert daemon.stop() == 0

    assert cleaner.returncode == 0, cleaner.stderr
    assert cleaner.stdout.splitlines()[:2] == [
        "removed 80000 pending triplets (not retried within retry_window)",
        "removed 20000 passed triplets (unseen for max_age)"]
    replies = [reply for client in clients for reply in client.replies]
    assert [error for client in clients for error in client.errors] == []
    during = [r for r in replies if cleanup_started <= r[0] <= cleanup_ended]
    assert len(during) >= 20, "the clients did not deliver while cleanup ran"
    for _, what, code, text, _ in replies:
        if what == "vip@localhost":
            assert (code, text) == (250, b"2.1.5 OK")
        elif what == "DATA":
            assert code == 250, (code, text)
        else:
            assert code == 451 and text.startswith(b"4.7.1 Greylisted"), (what, code, text)
    assert "store failure" not in daemon.stderr

    greylisted = {what for _, what, code, _, _ in replies if code == 451}
    with Store(path) as store:
        left = store.conn.execute("SELECT network, recipient FROM triplets").fetchall()
    assert {recipient for network, recipient in left} == greylisted   # every new one kept
    assert all(network == "127.0.0.0/24" for network, _ in left)       # every expired one gone
    longest = max(wait for *_, wait in replies)
    print(f"\ncleanup of 100,000 expired triplets: {cleanup_ended - cleanup_started:.2f} s;"
          f" {len(replies)} client replies, {len(during)} during cleanup;"
          f" longest RCPT wait {longest * 1000:.0f} ms")


# -- stats ------------------------------------------------------------------------------

def test_stats_counts_decisions_triplets_and_whitelists(tmp_path, upstream):
    port = free_port()
    config = config_for(tmp_path, upstream.port, port,
                        greylist={"delay": "1h", "retry_window": "2d", "max_age": "20d"})
    now = int(time.time())
    this_hour = now - now % HOUR
    local = "127.0.0.0/24"
    with open_db(tmp_path) as store:
        fill(store,
             triplets=[(local, "carol@example.net", "dave@localhost", now - 2 * HOUR,
                        now - 2 * HOUR, None),                               # will pass
                       (local, "eve@example.net", "frank@localhost", now - 5 * DAY, now - DAY,
                        now - 5 * DAY + 3000),                               # known
                       ("192.0.2.0/24", "x@example.net", "y@localhost", now - 60, now - 60, None)],
             auto=[("198.51.100.0/24", 5, now - 9 * DAY, now - HOUR, now - HOUR),   # whitelisted
                   ("203.0.113.0/24", 2, now - 9 * DAY, now - HOUR, now - HOUR),    # too few
                   ("2001:db8::/64", 9, now - 60 * DAY, now - 30 * DAY, now - 30 * DAY)])  # stale
        store.conn.executemany(
            "INSERT INTO counters VALUES (?, ?, ?, ?)",
            [(this_hour - 5 * HOUR, "greylist", "new", 7),      # in the day, not the hour
             (this_hour - 30 * HOUR, "accept", "known", 100)])  # in neither
        store.conn.commit()
        for kind, value in [("client", "192.0.2.0/24"), ("client", "2001:db8:5::/48"),
                            ("hostname", ".example.com"), ("sender", "news@lists.example.com"),
                            ("recipient", "vip@localhost")]:
            store.add_whitelist(kind, value, now=now)
        store.add_whitelist("recipient", "old@localhost", expires=now - 10, now=now - DAY)

    with Foreground(config) as daemon:
        wait_listening(port)
        outcomes = [
            deliver(port, "alice@example.net", "bob@localhost")[0][0],        # new
            deliver(port, "alice@example.net", "bob@localhost")[0][0],        # too-early
            deliver(port, "Carol+x@example.net", "dave@localhost")[0][0],     # passed
            deliver(port, "eve@example.net", "frank@localhost")[0][0],        # known
            deliver(port, "spam@example.net", "victim@elsewhere.example")[0][0],  # relay-denied
            deliver(port, "boss@example.com", "vip@localhost")[0][0],         # whitelist
        ]
        assert daemon.stop() == 0
    assert outcomes == [451, 451, 250, 250, 550, 250]

    result = greyd("stats", "--json", config=config)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    hour, day = report["decisions"]["hour"], report["decisions"]["day"]
    assert hour["actions"] == {"greylist": 2, "accept": 3, "reject": 1}
    assert hour["reasons"] == {"greylist": {"new": 1, "too-early": 1},
                               "accept": {"known": 1, "passed": 1, "whitelist": 1},
                               "reject": {"relay-denied": 1}}
    assert hour["total"] == 6 and now - HOUR - 60 < hour["since"] <= now - HOUR
    assert day["actions"] == {"greylist": 9, "accept": 3, "reject": 1} and day["total"] == 13
    assert day["reasons"]["greylist"] == {"new": 8, "too-early": 1}
    assert report["triplets"] == {"pending": 2, "passed": 2, "total": 4}
    # 127.0.0.0/24 is tracked now too: a passed and a known delivery, counted once an hour
    assert report["auto_whitelist"] == {"whitelisted": 1, "tracked": 4, "after": 5}
    assert report["whitelist"] == {"client": 2, "hostname": 1, "sender": 1, "recipient": 1,
                                   "expired": 1}

    human = greyd("stats", config=config)
    assert human.returncode == 0
    out = human.stdout
    assert re.search(r"^triplets: +4 \(2 pending, 2 passed\)$", out, re.M)
    assert re.search(r"^auto-whitelist: +1 networks whitelisted, 4 tracked", out, re.M)
    assert "client 2, hostname 1, sender 1, recipient 1; 1 expired" in out
    for label, in_hour, in_day in [("deferred", 2, 9), ("new", 1, 8), ("too-early", 1, 1),
                                   ("accepted", 3, 3), ("passed", 1, 1), ("known", 1, 1),
                                   ("whitelist", 1, 1), ("relay-denied", 1, 1),
                                   ("total", 6, 13)]:
        assert re.search(rf"^ +{label} +{in_hour} +{in_day}$", out, re.M), label


def test_stats_shows_each_count_once_over_the_last_60_minutes_and_24_hours(tmp_path,
                                                                         any_database):
    """Counters are per minute: "last hour" is the last 60 minutes, not up to
    two clock hours; relay-denied, its own only reason, is shown once."""
    config = make_config(tmp_path, any_database)
    now = int(time.time())
    minute = now - now % 60
    with any_database.open() as store, transaction(store.conn):
        store.conn.executemany("INSERT INTO counters VALUES (?, ?, ?, ?)", [
            (minute, "reject", "relay-denied", 2),
            (minute - 59 * 60, "reject", "relay-denied", 3),        # within the hour
            (minute - 61 * 60, "reject", "relay-denied", 5),        # the day's only
            (minute - 23 * HOUR, "greylist", "new", 7),             # the day's only
            (minute - 25 * HOUR, "greylist", "new", 11)])           # in neither
    report = json.loads(greyd("stats", "--json", config=config).stdout)
    hour, day = report["decisions"]["hour"], report["decisions"]["day"]
    assert now - HOUR - 60 < hour["since"] <= now - HOUR
    assert now - DAY - 60 < day["since"] <= now - DAY
    assert hour["actions"]["reject"] == 5 and day["actions"]["reject"] == 10
    assert day["reasons"]["reject"] == {"relay-denied": 10}     # JSON keeps the breakdown

    human = greyd("stats", config=config)
    assert human.returncode == 0, human.stderr
    out = human.stdout
    assert re.search(r"^decisions +last hour +last day$", out, re.M), out
    assert re.findall(r"^ +relay-denied .*$", out, re.M) == [
        f"  relay-denied{5:>30}{10:>16}"]                           # once, not again as reason
    assert re.search(r"^  deferred +0 +7$", out, re.M) and re.search(r"^    new +0 +7$", out, re.M)
    assert re.search(r"^  total +5 +17$", out, re.M)
    assert "(counted per minute: the last 60 minutes, the last 24 hours)" in out


def test_cleanup_prunes_counters_older_than_eight_days(tmp_path, any_database):
    config = make_config(tmp_path, any_database)
    now = int(time.time())
    with any_database.open() as store, transaction(store.conn):
        store.conn.executemany("INSERT INTO counters VALUES (?, ?, ?, ?)", [
            (now - now % 60, "greylist", "new", 1), (now - 7 * DAY, "greylist", "new", 1),
            (now - 9 * DAY, "greylist", "new", 1), (now - 30 * DAY, "accept", "known", 1)])
    result = greyd("cleanup", config=config)
    assert result.returncode == 0, result.stderr
    assert "removed 2 decision counters (older than eight days)" in result.stdout
    assert len(any_database.rows("counters")) == 2


# -- stats: what greylisting cost the mail that passed ------------------------------------------

CLOCK = 1_800_000_000                # the stats' clock in the tests that pass `now` in


def passed(sender: str, delay: int, ago: int, network: str = "192.0.2.0/24",
           recipient: str | None = None) -> tuple:
    """A triplet first seen `delay` s before it passed, `ago` s before CLOCK."""
    at = CLOCK - ago
    return (network, sender, recipient or f"to{delay}.{ago}@localhost", at - delay, at, at)


DELAYED = [
    # in the last day: 301, 312, 330, 400, 600, 900, 1200, 3000, 7200, 9000 (n = 10)
    passed("alice@example.net", 312, HOUR),
    passed("bob@example.net", 600, 2 * HOUR),
    passed("<>", 9000, 3 * HOUR),
    passed("news@lists.example.org", 301, 4 * HOUR),
    passed("news@lists.example.org", 330, 5 * HOUR, network="spf:example.org"),
    passed("billing@slow.example", 7200, 6 * HOUR),
    passed("carol@example.net", 400, 7 * HOUR),
    passed("\"x@y\"@relay.example", 900, 8 * HOUR),
    passed("dave@example.net", 1200, 9 * HOUR, network="2001:db8::/64"),
    passed("mx#@bounce.example", 3000, DAY - 1),       # the day's last second
    # in the week only: 303, 305, 500, 86400 (n = 14 with the day's)
    passed("erin@example.net", 500, DAY),              # exactly a day ago: the week's
    passed("frank@other.example", 303, 3 * DAY),
    passed("alice@example.net", 86400, 5 * DAY),
    passed("grace@tiny.example", 305, 7 * DAY - 1),
    # in neither: passed too early, passed "after" CLOCK, still pending
    passed("old@example.net", 99999, 7 * DAY),
    passed("future@example.net", 99999, -60),
    ("192.0.2.0/24", "slow@example.net", "z@localhost", CLOCK - 5 * DAY, CLOCK - HOUR, None),
]


def test_greylist_delay_over_the_day_and_week_by_nearest_rank(tmp_path, any_database):
    """Nearest rank: the p-th percentile of n delays is the ceil(p/100 * n)-th smallest."""
    with any_database.open() as store:
        fill(store, DELAYED)
        report = maintenance.stats(store.conn, auto_whitelist_after=5, max_age=MAX_AGE, now=CLOCK)
    # day, sorted: 301 312 330 400 600 | 900 1200 3000 7200 9000: median rank 5, p90 rank 9
    assert report["greylist_delay"]["day"] == {
        "since": CLOCK - DAY, "passed": 10, "median": 600, "p90": 7200, "max": 9000}
    # week: 301 303 305 312 330 400 500 | 600 900 1200 3000 7200 9000 86400:
    # median rank 7, p90 rank ceil(12.6) = 13
    assert report["greylist_delay"]["week"] == {
        "since": CLOCK - 7 * DAY, "passed": 14, "median": 500, "p90": 9000, "max": 86400}


def test_greylist_delay_of_one_and_of_none(tmp_path):
    with open_db(tmp_path) as store:
        fill(store, [passed("alice@example.net", 420, 3 * DAY)])
        one = maintenance.stats(store.conn, auto_whitelist_after=5, max_age=MAX_AGE, now=CLOCK)
    assert one["greylist_delay"]["week"] == {
        "since": CLOCK - 7 * DAY, "passed": 1, "median": 420, "p90": 420, "max": 420}
    assert one["greylist_delay"]["day"] == {
        "since": CLOCK - DAY, "passed": 0, "median": None, "p90": None, "max": None}
    assert one["held_longest"] == [
        {"domain": "example.net", "passed": 1, "max": 420, "median": 420}]
    with open_db(tmp_path / "empty") as store:
        none = maintenance.stats(store.conn, auto_whitelist_after=5, max_age=MAX_AGE, now=CLOCK)
    assert none["greylist_delay"]["week"]["passed"] == 0 and none["held_longest"] == []


def test_held_longest_names_the_five_sender_domains_held_longest_in_the_week(tmp_path, any_database):
    with any_database.open() as store:
        fill(store, DELAYED)
        held = maintenance.held_longest(store.conn, CLOCK - 7 * DAY, CLOCK)
    assert held == [
        # example.net: 312 400 500 600 1200 86400 -> median rank 3
        {"domain": "example.net", "passed": 6, "max": 86400, "median": 500},
        {"domain": "<>", "passed": 1, "max": 9000, "median": 9000},        # the null sender
        {"domain": "slow.example", "passed": 1, "max": 7200, "median": 7200},
        {"domain": "bounce.example", "passed": 1, "max": 3000, "median": 3000},
        {"domain": "relay.example", "passed": 1, "max": 900, "median": 900},  # after the last @
    ]   # lists.example.org (330, SPF-keyed or not), other.example, tiny.example: held less
    with any_database.open() as store:
        assert maintenance.held_longest(store.conn, CLOCK - 7 * DAY, CLOCK, limit=9)[5:] == [
            {"domain": "lists.example.org", "passed": 2, "max": 330, "median": 301},
            {"domain": "tiny.example", "passed": 1, "max": 305, "median": 305},
            {"domain": "other.example", "passed": 1, "max": 303, "median": 303}]


@pytest.mark.parametrize("seconds, shown", [
    (None, "-"), (0, "0s"), (45, "45s"), (312, "5m 12s"), (3600, "1h 0m 0s"),
    (7325, "2h 2m 5s"), (90061, "1d 1h 1m 1s"), (172800, "2d 0h 0m 0s")])
def test_durations_as_stats_shows_them(seconds, shown):
    assert cli_maintenance.duration(seconds) == shown


def test_stats_command_shows_the_greylisting_delay(tmp_path, any_database):
    config = make_config(tmp_path, any_database)
    now = int(time.time())
    with any_database.open() as store:
        fill(store, [
            ("192.0.2.0/24", "alice@example.net", "bob@localhost", now - HOUR - 312, now - HOUR,
             now - HOUR),
            ("spf:example.org", "news@lists.example.org", "bob@localhost",
             now - 2 * HOUR - 7325, now - 2 * HOUR, now - 2 * HOUR),
            ("192.0.2.0/24", "<>", "carol@localhost", now - 3 * DAY - 90061, now - 3 * DAY,
             now - 3 * DAY)])
    result = greyd("stats", "--json", config=config)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    delay = report["greylist_delay"]
    assert {key: delay["day"][key] for key in ("passed", "median", "p90", "max")} == \
        {"passed": 2, "median": 312, "p90": 7325, "max": 7325}
    assert {key: delay["week"][key] for key in ("passed", "median", "p90", "max")} == \
        {"passed": 3, "median": 7325, "p90": 90061, "max": 90061}
    assert report["held_longest"] == [
        {"domain": "<>", "passed": 1, "max": 90061, "median": 90061},
        {"domain": "lists.example.org", "passed": 1, "max": 7325, "median": 7325},
        {"domain": "example.net", "passed": 1, "max": 312, "median": 312}]

    human = greyd("stats", config=config)
    assert human.returncode == 0, human.stderr
    out = human.stdout
    for label, day, week in [("passed triplets", "2", "3"), ("median", "5m 12s", "2h 2m 5s"),
                             ("90th percentile", "2h 2m 5s", "1d 1h 1m 1s"),
                             ("longest", "2h 2m 5s", "1d 1h 1m 1s")]:
        assert re.search(rf"^  {label} +{day} +{week}$", out, re.M), (label, out)
    assert re.search(r"^held longest \(last week\) +passed +longest +median$", out, re.M)
    for domain, n, longest, median in [("<>", 1, "1d 1h 1m 1s", "1d 1h 1m 1s"),
                                       ("lists.example.org", 1, "2h 2m 5s", "2h 2m 5s"),
                                       ("example.net", 1, "5m 12s", "5m 12s")]:
        assert re.search(rf"^  {re.escape(domain)} +{n} +{longest} +{median}$", out, re.M)


def test_stats_command_with_no_mail_delayed_says_so(tmp_path, any_database):
    config = make_config(tmp_path, any_database)
    with any_database.open() as store:
        fill(store, [("192.0.2.0/24", "a@example.net", "b@localhost", int(time.time()) - 60,
                      int(time.time()) - 60, None)])          # pending: delayed, not passed
    human = greyd("stats", config=config)
    assert human.returncode == 0, human.stderr
    assert "greylisting delay: no mail delayed (no triplet passed in the last week)" in \
        human.stdout.splitlines()
    assert "held longest" not in human.stdout and "percentile" not in human.stdout
    report = json.loads(greyd("stats", "--json", config=config).stdout)
    assert report["greylist_delay"]["week"]["passed"] == 0
    assert report["greylist_delay"]["day"]["median"] is None
    assert report["held_longest"] == []

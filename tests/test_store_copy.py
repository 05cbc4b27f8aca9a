"""`greyd store copy`: SQLite to PostgreSQL and back, every column of every
table; idempotent; a greyd on the copy decides as a greyd on the source
(`greyd explain`, the daemon's own path, in a subprocess); bad targets are
one line without the password. Real SQLite files, the test PostgreSQL
server (conftest's pg_url), the real `greyd` command."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from conftest import toml
from daemon import greyd
from greyd import storecopy
from greyd.maintenance import network_of
from greyd.postgres import PgStore
from greyd.queries import transaction
from greyd.store import Store
from pgserver import PASSWORD
from upstream import free_port

pytestmark = pytest.mark.timeout(120)

DAY = 86400


def config_for(tmp_path: Path, name: str, **database) -> Path:
    """A config whose store is `database` (path= or url=); no DNS, no log file."""
    path = tmp_path / f"{name}.toml"
    path.write_text(toml({
        "relay": {"domains": ["example.org"], "clients": ["127.0.0.1/32"]},
        "greylist": {"delay": "5m", "retry_window": "2d", "max_age": "35d",
                     "auto_whitelist_after": 5},
        "dns": {"enabled": False},
        "log": {"file": ""},
        "server": {"pidfile": str(tmp_path / f"{name}.pid")},
        "database": {key: str(value) for key, value in database.items()},
    }))
    return path


def opened(database: Path | str):
    """A migrated store on a file or a PostgreSQL URL."""
    store = PgStore.open(database) if str(database).startswith("postgresql://") \
        else Store(database)
    store.migrate()
    return store


def net(client: str) -> str:
    return network_of(client, 24, 64)


# (client, sender, recipient) -> (action, reason) a greyd on the filled store decides now
CASES = {
    ("198.51.100.7", "new@example.net", "bob@example.org"): ("greylist", "new"),
    ("198.51.100.7", "early@example.net", "bob@example.org"): ("greylist", "too-early"),
    ("198.51.100.7", "due@example.net", "bob@example.org"): ("accept", "passed"),
    ("198.51.100.7", "known@example.net", "bob@example.org"): ("accept", "known"),
    ("198.51.100.7", "late@example.net", "bob@example.org"): ("greylist", "expired-retry"),
    ("203.0.113.7", "any@example.net", "bob@example.org"):
        ("accept", "whitelist:203.0.113.7/32"),
    ("198.51.100.9", "boss@partner.example", "bob@example.org"):
        ("accept", "whitelist:@partner.example"),
    ("198.51.100.9", "any@example.net", "abuse@example.org"):
        ("accept", "whitelist:abuse@"),
    ("203.0.113.9", "any@example.net", "bob@example.org"): ("greylist", "new"),  # expired entry
    ("198.18.0.7", "any@example.net", "bob@example.org"): ("accept", "auto-whitelist"),
    ("198.18.1.7", "any@example.net", "bob@example.org"): ("greylist", "new"),  # auto: stale
}


def fill(store, now: float) -> None:
    """A store with a row for every case above, times around `now` (whole
    seconds: the fractions are the rows' own), and more."""
    now = float(int(now))
    client = net("198.51.100.7")
    triplets = [
        (client, "early@example.net", "bob@example.org", now - 60.25, int(now) - 60, None),
        (client, "due@example.net", "bob@example.org", now - 600.5, int(now) - 600, None),
        (client, "known@example.net", "bob@example.org", now - 5 * DAY, int(now) - 3600,
         int(now) - 5 * DAY + 900),
        (client, "late@example.net", "bob@example.org", now - 3 * DAY, int(now) - 3 * DAY, None),
        ("spf:example.com", "a@example.com", "bob@example.org", now - 7, int(now) - 7, None),
    ]
    whitelist = [
        ("client", "203.0.113.7/32", "partner's MX", int(now) - DAY, None),
        ("client", "203.0.113.9/32", "expired", int(now) - 2 * DAY, int(now) - 10),
        ("sender", "@partner.example", "", int(now) - DAY, int(now) + 7 * DAY),
        ("recipient", "abuse@", "role address", None, None),
        ("hostname", ".mail.example.com", "pool", int(now) - 3 * DAY, None),
    ]
    auto = [
        (net("198.18.0.7"), 9, int(now) - 10 * DAY, int(now) - 3600, int(now) - 3600),
        (net("198.18.1.7"), 9, int(now) - 80 * DAY, int(now) - 40 * DAY, int(now) - 40 * DAY),
        (net("198.18.2.7"), 2, None, int(now) - 60, None),
    ]
    minute = int(now) - int(now) % 60
    counters = [(minute, "greylist", "new", 7), (minute, "accept", "whitelist", 3),
                (minute - 60, "session", "plaintext", 12)]
    with transaction(store.conn):
        for table, rows in (("triplets", triplets), ("whitelist", whitelist),
                            ("auto_whitelist", auto), ("counters", counters)):
            columns = next(t for t in storecopy.TABLES if t.name == table).columns
            store.conn.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES"
                f" ({', '.join('?' for _ in columns)})", rows)


def dump(database: Path | str) -> dict[str, list[tuple]]:
    """Every column of every copied table, in key order."""
    with opened(database) as store:
        return {t.name: [tuple(row) for row in store.conn.execute(
                    f"SELECT {', '.join(t.columns)} FROM {t.name}"
                    f" ORDER BY {', '.join(t.key)}")]
                for t in storecopy.TABLES}


def whitelist_version(database: Path | str) -> int:
    with opened(database) as store:
        return store.conn.execute(
            "SELECT value FROM meta WHERE key = 'whitelist_version'").fetchone()[0]


def explain_all(config: Path) -> dict[tuple, dict]:
    """`greyd explain --json` for every case, as a subprocess sees it; each
    report with `asked`, the (start, end) of its call."""
    reports = {}
    for client, sender, recipient in CASES:
        start = time.time()
        result = greyd("explain", "--client", client, "--sender", sender,
                       "--recipient", recipient, "--json", config=config)
        assert result.returncode == 0, result.stderr
        reports[client, sender, recipient] = {**json.loads(result.stdout),
                                              "asked": (start, time.time())}
    return reports


def same_decisions(before: dict, after: dict) -> None:
    """Equal reports, but for the seconds a triplet has waited (`delayed`) and
    has still to wait (`retry_in`), which run on between two calls: there the
    moment they count from or to must be the same, give or take the calls'
    durations (and a second of rounding)."""
    assert before.keys() == after.keys()
    for case in before:
        one, other = dict(before[case]), dict(after[case])
        (start, end), (start2, end2) = one.pop("asked"), other.pop("asked")
        for key, sign in (("retry_in", 1), ("delayed", -1)):
            a, b = one.pop(key), other.pop(key)
            if a != b:
                assert None not in (a, b), (case, key)
                assert start + sign * a - 1 <= end2 + sign * b, (case, key)
                assert start2 + sign * b - 1 <= end + sign * a, (case, key)
        one["reply"], other["reply"] = (re.sub(r"\d+ seconds", "N seconds", r["reply"])
                                        for r in (one, other))
        assert one == other, case


def copy(config: Path, to: Path | str):
    return greyd("store", "copy", "--to", str(to), config=config)


# -- the copy is the store -------------------------------------------------------------

def test_every_table_greyd_has_is_copied_or_its_own(tmp_path, pg_url):
    with opened(tmp_path / "a.db") as store:
        tables = {name for (name,) in store.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    with opened(pg_url) as store:
        pg_tables = {name for (name,) in store.conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema()")}
    expected = {t.name for t in storecopy.TABLES} | set(storecopy.NOT_COPIED)
    assert tables == expected and pg_tables == expected


def test_sqlite_to_postgresql_and_back_keeps_every_column(tmp_path, pg_url):
    source, back = tmp_path / "source.db", tmp_path / "back.db"
    with opened(source) as store:
        fill(store, time.time())
    config = config_for(tmp_path, "source", path=source)
    original = dump(source)

    to_pg = copy(config, pg_url)
    assert to_pg.returncode == 0, to_pg.stderr
    assert to_pg.stdout.splitlines() == [
        "copied 5 triplets, 5 whitelist entries, 3 auto-whitelist entries, 3 counters to "
        + pg_url.replace(PASSWORD, "***")]
    assert PASSWORD not in to_pg.stdout + to_pg.stderr
    assert dump(pg_url) == original

    to_sqlite = copy(config_for(tmp_path, "pg", url=pg_url), back)
    assert to_sqlite.returncode == 0, to_sqlite.stderr
    assert to_sqlite.stdout.startswith("copied 5 triplets,") and str(back) in to_sqlite.stdout
    assert dump(back) == original
    # first_seen keeps its fraction on both engines
    [early] = [row for row in dump(back)["triplets"] if row[1] == "early@example.net"]
    assert early[3] % 1 == pytest.approx(0.75)
    assert dump(source) == original


def test_copying_twice_changes_nothing_and_keeps_what_only_the_target_has(tmp_path, pg_url):
    source = tmp_path / "source.db"
    now = time.time()
    with opened(source) as store:
        fill(store, now)
    with opened(pg_url) as target:     # the target's own: one row also in the source
        target.add_whitelist("client", "203.0.113.7/32", "the target's", now=now)
        target.add_whitelist("sender", "only@target.example", "kept", now=now)
    config = config_for(tmp_path, "source", path=source)

    first = copy(config, pg_url)
    assert first.returncode == 0, first.stderr
    once, version = dump(pg_url), whitelist_version(pg_url)
    second = copy(config, pg_url)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert dump(pg_url) == once and whitelist_version(pg_url) == version

    entries = {row[:3] for row in once["whitelist"]}
    assert ("client", "203.0.113.7/32", "partner's MX") in entries      # the source's won
    assert ("sender", "only@target.example", "kept") in entries
    assert {k: v for k, v in once.items() if k != "whitelist"} == \
        {k: v for k, v in dump(source).items() if k != "whitelist"}


@pytest.mark.timeout(300)     # 33 runs of `greyd explain` on a busy machine
def test_the_copy_decides_as_the_source_does(tmp_path, pg_url):
    """THE promise: greyd on the copy, on either engine, explains every case
    (new, early, due, known, expired retry, whitelists, auto-whitelist) as
    greyd on the source did before the copy."""
    source, back = tmp_path / "source.db", tmp_path / "back.db"
    with opened(source) as store:
        fill(store, time.time())
    on_source = config_for(tmp_path, "source", path=source)
    on_pg = config_for(tmp_path, "pg", url=pg_url)

    before = explain_all(on_source)
    assert {case: (r["action"], r["reason"]) for case, r in before.items()} == CASES
    assert copy(on_source, pg_url).returncode == 0
    same_decisions(before, explain_all(on_pg))
    assert copy(on_pg, back).returncode == 0
    same_decisions(before, explain_all(config_for(tmp_path, "back", path=back)))


# -- how it copies -------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_batches_walk_every_row_once_from_one_snapshot(tmp_path, pg_url, engine):
    """Batches of 3 over keys that share their first columns; rows the daemon
    writes meanwhile are not in this copy (the next one takes them)."""
    database = tmp_path / "source.db" if engine == "sqlite" else pg_url
    rows = [(f"net{i % 2}", f"s{i % 3}@example.net", f"r{i}@example.org", 1.5, 2, None)
            for i in range(10)]
    columns = storecopy.TABLES[0].columns
    insert = (f"INSERT INTO triplets ({', '.join(columns)}) VALUES"
              f" ({', '.join('?' for _ in columns)})")
    with opened(database) as store, transaction(store.conn):
        store.conn.executemany(insert, rows)
    batches = []
    with opened(database) as source, opened(tmp_path / "target.db") as target, \
            opened(database) as daemon:
        def progress(table: str, count: int) -> None:
            batches.append((table, count))
            with transaction(daemon.conn):
                daemon.conn.execute(insert, ("zzz", f"late{len(batches)}@x", "r", 1, 1, None))
        counts = storecopy.copy(source.conn, target.conn, batch_size=3, progress=progress)
    assert counts == {"triplets": 10, "whitelist": 0, "auto_whitelist": 0, "counters": 0}
    assert batches == [("triplets", 3)] * 3 + [("triplets", 1)]
    assert sorted(dump(tmp_path / "target.db")["triplets"]) == sorted(rows)


# -- refusals: one line, exit 1, no password ---------------------------------------------------

def test_an_unreachable_target_is_one_line_without_the_password(tmp_path):
    source = tmp_path / "source.db"
    opened(source).close()
    url = f"postgresql://greyd:{PASSWORD}@127.0.0.1:{free_port()}/greyd"
    result = copy(config_for(tmp_path, "source", path=source), url)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("greyd: database: postgresql://greyd:***@127.0.0.1:")
    assert "Connection refused" in line and PASSWORD not in result.stdout + line


def test_a_malformed_target_keeps_its_password_secret(tmp_path):
    source = tmp_path / "source.db"
    opened(source).close()
    config = config_for(tmp_path, "source", path=source)
    result = copy(config, f"host=127.0.0.1 password={PASSWORD} dbname")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert PASSWORD not in result.stderr and "password=***" in result.stderr
    result = copy(config, f"mysql://greyd:{PASSWORD}@127.0.0.1/greyd")
    assert result.returncode == 2 and PASSWORD not in result.stderr
    assert "must be a postgresql:// URL" in result.stderr


def test_an_unwritable_target_path_is_one_line(tmp_path):
    source = tmp_path / "source.db"
    opened(source).close()
    (tmp_path / "a-file").write_text("")
    result = copy(config_for(tmp_path, "source", path=source), tmp_path / "a-file" / "copy.db")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"greyd: database: {tmp_path / 'a-file' / 'copy.db'}: ")
    not_a_database = tmp_path / "notes.txt"
    not_a_database.write_text("not SQLite\n" * 100)
    result = copy(config_for(tmp_path, "source", path=source), not_a_database)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_copying_a_store_onto_itself_is_refused(tmp_path, pg_url):
    source = tmp_path / "source.db"
    with opened(source) as store:
        fill(store, time.time())
    original = dump(source)
    config = config_for(tmp_path, "source", path=source)
    (tmp_path / "link.db").symlink_to(source)
    for same in (source, tmp_path / "link.db", Path(source.name)):
        result = greyd("store", "copy", "--to", str(same), config=config, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"greyd: --to names the configured store itself ({tmp_path / same}): nothing to copy"]
    assert dump(source) == original
    on_pg = config_for(tmp_path, "pg", url=pg_url)
    opened(pg_url).close()
    result = copy(on_pg, pg_url.replace("127.0.0.1", "localhost"))
    assert result.returncode == 1 and "configured store itself" in result.stderr
    assert PASSWORD not in result.stderr


def test_a_missing_source_is_refused_and_nothing_is_created(tmp_path):
    target = tmp_path / "copy.db"
    result = copy(config_for(tmp_path, "source", path=tmp_path / "none.db"), target)
    assert result.returncode == 1 and result.stderr.startswith("greyd: no database at ")
    assert not target.exists() and not (tmp_path / "none.db").exists()

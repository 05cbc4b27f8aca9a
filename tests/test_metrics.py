"""[metrics] listen: the real `greyd start`, real SMTP sessions to a real
upstream, then /metrics scraped over HTTP and parsed with prometheus_client's
own parser; one greyd process, and a master with two workers whose figures
are summed."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import until
from daemon import Foreground, config_for, greyd, take_backup, wait_listening
from greyd import config as configuration, metrics
from greyd.values import ConfigError
from smtpclient import Raw, deliver
from upstream import free_port

pytestmark = pytest.mark.timeout(90)
FRIEND = "friend@example.net"      # on the static whitelist (sender)
BODY = b"Subject: metrics\r\n\r\nhello\r\n"

Figures = dict[tuple[str, tuple], float]


def scrape(port: int) -> Figures:
    """Every sample of http://127.0.0.1:port/metrics, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(figures: Figures, name: str, **labels: str) -> float | None:
    return figures.get((name, tuple(sorted(labels.items()))))


def total(figures: Figures, name: str) -> float:
    return sum(v for (n, _), v in figures.items() if n == name)


def start_config(tmp_path: Path, upstream, port: int, metrics_port: int, **sections) -> Path:
    config = config_for(tmp_path, upstream.port, port,
                        metrics={"listen": f"127.0.0.1:{metrics_port}"},
                        log={"file": str(tmp_path / "var/log/greyd.log")}, **sections)
    assert greyd("whitelist", "add", "--sender", FRIEND, config=config).returncode == 0
    return config


def sessions_ended(metrics_port: int, n: int) -> Figures:
    """The figures once `n` sessions have ended (a session ends just after its 221)."""
    figures = until(lambda: (f := scrape(metrics_port)) and
                    total(f, "greyd_sessions_total") >= n and f, 10)
    assert figures, scrape(metrics_port)
    return figures


def test_one_process_counts_decisions_sessions_relays_and_open_connections(
        tmp_path, upstream, port):
    metrics_port = free_port()
    config = start_config(tmp_path, upstream, port, metrics_port)
    with Foreground(config) as daemon:
        wait_listening(port)                         # one session, ended by a disconnect
        before = sessions_ended(metrics_port, 1)
        assert value(before, "greyd_store_up") == 1
        assert value(before, "greyd_connections_open") == 0
        greylisted = [deliver(port, f"s{i}@example.net", f"r{i}@localhost")[0] for i in range(2)]
        denied = deliver(port, "s@example.net", "someone@elsewhere.test")[0]
        relayed = deliver(port, FRIEND, "bob@localhost", BODY)
        with Raw(port) as client:
            assert client.greeting[0] == 220
            figures = sessions_ended(metrics_port, 5)
            assert value(figures, "greyd_connections_open") == 1
        after = until(lambda: value(f := scrape(metrics_port), "greyd_connections_open") == 0
                      and total(f, "greyd_sessions_total") == 6 and f, 10)
        assert daemon.stop() == 0
    assert [reply[0] for reply in greylisted] == [451, 451]
    assert denied[0] == 550 and relayed[1][0] == 250
    assert len(upstream.messages) == 1
    assert value(figures, "greyd_decisions_total", action="greylist", reason="new") == 2
    assert value(figures, "greyd_decisions_total", action="reject", reason="relay-denied") == 1
    assert value(figures, "greyd_decisions_total", action="accept", reason="whitelist") == 1
    assert total(figures, "greyd_decisions_total") == 4
    assert value(figures, "greyd_decision_seconds_count") == 4
    assert value(figures, "greyd_relayed_messages_total", reply_class="2xx") == 1
    assert total(figures, "greyd_relayed_messages_total") == 1
    assert value(figures, "greyd_sessions_total", end="quit") == 4
    assert value(figures, "greyd_sessions_total", end="disconnect") == 1   # wait_listening's
    assert value(figures, "greyd_session_seconds_count") == 5
    assert value(figures, "greyd_store_errors_total") == 0
    assert value(figures, "greyd_store_up") == 1
    assert total(figures, "greyd_dns_failures_total") == 0
    assert value(after, "greyd_sessions_total", end="disconnect") == 2
    assert value(after, "greyd_session_seconds_count") == 6


def stored(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM triplets").fetchone()[0]
    finally:
        conn.close()


def test_a_broken_store_counts_errors_and_store_up_falls_and_rises(tmp_path, upstream, port):
    """Garbage renamed over the database, then the backup back over it."""
    metrics_port = free_port()
    db = tmp_path / "db" / "greyd.db"
    db.parent.mkdir()
    config = start_config(tmp_path, upstream, port, metrics_port, database={"path": str(db)},
                          greylist={"on_store_error": "tempfail"})
    with Foreground(config) as daemon:
        wait_listening(port)
        before = deliver(port, "before@example.net", "before@localhost")[0]
        assert until(lambda: stored(db) == 1, 10), "greyd's writer never committed"
        take_backup(db, db.with_name("backup.db"))
        garbage = db.with_name("garbage")
        garbage.write_bytes(b"not a database " * 4096)
        os.rename(garbage, db)
        during = deliver(port, "during@example.net", "during@localhost")[0]
        broken = sessions_ended(metrics_port, 3)
        os.rename(db.with_name("backup.db"), db)
        after = deliver(port, "after@example.net", "after@localhost")[0]
        healed = sessions_ended(metrics_port, 4)
        assert daemon.stop() == 0
    assert (before[0], during[0], after[0]) == (451, 451, 451)
    assert value(broken, "greyd_store_up") == 0
    assert value(broken, "greyd_store_errors_total") == 1
    assert value(broken, "greyd_decisions_total", action="tempfail", reason="store-error") == 1
    assert value(healed, "greyd_store_up") == 1
    assert value(healed, "greyd_decisions_total", action="greylist", reason="new") == 2


def worker_pids(log: str) -> set[int]:
    return {int(pid) for pid in re.findall(r"greyd\[(\d+)\]: INFO session end ", log)}


def test_workers_figures_are_the_sum_over_both_workers(tmp_path, upstream, port):
    metrics_port = free_port()
    config = start_config(tmp_path, upstream, port, metrics_port,
                          server={"workers": 2, "max_connections_per_client": 50})
    sessions = 40
    with Foreground(config) as daemon:
        wait_listening(port)
        replies = [deliver(port, f"s{i}@example.net", f"r{i}@localhost")[0]
                   for i in range(sessions - 1)]
        relayed = deliver(port, FRIEND, "bob@localhost", BODY)
        figures = sessions_ended(metrics_port, sessions + 1)
        directories = list((tmp_path / "var").glob("greyd-metrics.*"))
        assert daemon.stop() == 0
    assert {reply[0] for reply in replies} == {451} and relayed[1][0] == 250
    log = (tmp_path / "var/log/greyd.log").read_text()
    assert len(worker_pids(log)) == 2                  # both workers served
    assert value(figures, "greyd_decisions_total", action="greylist", reason="new") == 39
    assert value(figures, "greyd_decisions_total", action="accept", reason="whitelist") == 1
    assert value(figures, "greyd_decision_seconds_count") == 40
    assert value(figures, "greyd_relayed_messages_total", reply_class="2xx") == 1
    assert value(figures, "greyd_sessions_total", end="quit") == 40
    assert value(figures, "greyd_session_seconds_count") == 41
    assert value(figures, "greyd_connections_open") == 0
    assert value(figures, "greyd_store_up") == 1      # the least over the live workers
    assert value(figures, "greyd_store_errors_total") == 0
    # The workers counted in a private directory; it is gone with the daemon.
    assert len(directories) == 1 and not directories[0].exists()


def listening_ports(pid: int) -> set[int]:
    """The TCP ports the process listens on (its sockets in /proc/net/tcp*, state 0A)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_off_by_default_nothing_but_smtp_listens(tmp_path, upstream, port):
    config = config_for(tmp_path, upstream.port, port)
    assert configuration.load(config).metrics.listen == ""
    with Foreground(config) as daemon:
        wait_listening(port)
        ports = listening_ports(daemon.proc.pid)
        assert daemon.stop() == 0
    assert ports == {port}


def test_a_busy_metrics_address_is_one_line_and_exit_1(tmp_path, upstream, port):
    metrics_port = free_port()
    config = config_for(tmp_path, upstream.port, port,
                        metrics={"listen": f"127.0.0.1:{metrics_port}"})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", metrics_port))
        taken.listen()
        result = greyd("start", "--foreground", config=config)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"greyd: cannot listen on 127.0.0.1:{metrics_port} (metrics.listen): "
        "Address already in use"]
    with socket.socket() as again:             # the SMTP port was let go
        again.bind(("127.0.0.1", port))


@pytest.mark.parametrize("listen, error", [
    ("localhost", 'metrics.listen: missing port, expected "host:port", got "localhost"'),
    ("9125", 'metrics.listen: not a valid host name or IP address, got "9125"'),
    ("::1:9125", "metrics.listen: an IPv6 address with a port must be bracketed"),
    ("127.0.0.1:0", "metrics.listen: port must be from 1 to 65535"),
    ("127.0.0.1:http", "metrics.listen: port must be from 1 to 65535"),
    (9125, 'metrics.listen: must be a "host:port" string, got 9125'),
])
def test_a_bad_listen_value_is_a_config_error_naming_the_key(tmp_path, listen, error):
    path = tmp_path / "greyd.toml"
    path.write_text(f"[metrics]\nlisten = {listen!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError) as raised:
        configuration.load(path)
    assert str(raised.value).startswith(error)


def test_ipv6_listen_is_bracketed_and_round_trips(tmp_path):
    path = tmp_path / "greyd.toml"
    path.write_text('[metrics]\nlisten = "[0:0::1]:9125"\n')
    loaded = configuration.load(path).metrics
    assert (loaded.listen, loaded.address) == ("[::1]:9125", ("::1", 9125))
    assert configuration.load(None).metrics.address is None


def test_labels_stay_few():
    """No address, entry or zone reaches a label."""
    assert metrics.reason_label("whitelist:sender friend@example.net") == "whitelist"
    assert metrics.reason_label("new,dnsbl:bl.example,suspicious:no-name") == \
        "new,suspicious:no-name"
    assert metrics.reason_label("early-retry") == "early-retry"
    assert metrics.dns_kind("servfail,timeout") == "timeout"
    assert metrics.dns_kind("nxdomain") == "nxdomain"
    assert metrics.dns_kind("OSError: [Errno 101] Network is unreachable") == "other"

"""The real `greyd` command in a subprocess: start, serve, explain, stop.

These tests run greyd as an administrator would, against a real aiosmtpd
upstream, with a short greylisting delay (daemon.DELAY) instead of the real one.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import signal
import socket
import time

import pytest

from conftest import until
from daemon import DELAY, ROOT, UNPRIVILEGED, Foreground, config_for, greyd, threads, wait_listening
from greyd.reactor import IDLE_TIMEOUT
from smtpclient import deliver
from upstream import free_port

pytestmark = pytest.mark.timeout(60)
SYS_TGKILL = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)


def test_the_end_to_end_story(tmp_path, upstream, port):
    config = config_for(tmp_path, upstream.port, port)
    body = b"From: alice@example.net\r\nSubject: story\r\n\r\nHello Bob.\r\n"
    with Foreground(config) as daemon:
        wait_listening(port)
        first, _ = deliver(port, "alice@example.net", "bob@localhost", body)
        early, _ = deliver(port, "alice@example.net", "bob@localhost", body)
        time.sleep(DELAY + 0.2)  # the short, test-configured delay
        passed, data = deliver(port, "alice@example.net", "bob@localhost", body)
        again, data_again = deliver(port, "alice@example.net", "bob@localhost", body)
        assert daemon.stop() == 0

    assert first[0] == 451 and first[1].startswith(b"4.7.1 Greylisted, please try again in %d seconds" % DELAY)
    assert early[0] == 451 and early[1].startswith(b"4.7.1 Greylisted")
    assert passed == (250, b"2.1.5 OK") and data[0] == 250
    assert again == (250, b"2.1.5 OK") and data_again[0] == 250
    delayed, direct = upstream.wait_for(2)
    assert delayed.rcpt_tos == ["bob@localhost"] and delayed.mail_from == "alice@example.net"
    head, _, rest = delayed.data.partition(b"X-Greylist: delayed ")
    assert head.startswith(b"Received: from mail.example.net (unknown [127.0.0.1])")
    assert re.match(rb"\d+ seconds by greyd-\S+ at mx\.greyd\.test; ", rest)
    assert delayed.data.endswith(body)
    assert direct.data.startswith(b"Received: ") and b"X-Greylist" not in direct.data
    assert direct.data.endswith(body)

    decisions = [line for line in daemon.stderr.splitlines() if " decision " in line]
    reasons = [re.search(r"reason=(\S+)", line).group(1) for line in decisions]
    assert reasons == ["new", "too-early", "passed", "known"]
    for line in decisions:
        for key in ("client=127.0.0.1", "helo=mail.example.net", "from=alice@example.net",
                    "to=bob@localhost", "action=", "delay="):
            assert key in line
    assert daemon.stderr.count(" session end ") == 5  # four deliveries and the readiness probe


def test_sigterm_stops_gracefully_with_exit_0(tmp_path, upstream, port):
    config = config_for(tmp_path, upstream.port, port)
    with Foreground(config) as daemon:
        wait_listening(port)
        pidfile = tmp_path / "var/greyd.pid"
        assert int(pidfile.read_text()) == daemon.proc.pid
        assert daemon.stop() == 0
    assert not pidfile.exists()
    assert "stopped" in daemon.stderr


def test_a_stop_signal_taken_by_another_thread_still_stops_it(tmp_path, upstream, port):
    """The kernel gives a process's signal to any of its threads that does not
    block it; Python runs the handler in the main thread only when that one
    runs, so a SIGTERM taken by a session or accept thread must still wake it."""
    if SYS_TGKILL is None:
        pytest.skip(f"tgkill's number on {os.uname().machine} is not known here")
    config = config_for(tmp_path, upstream.port, port)
    with Foreground(config) as daemon:
        wait_listening(port)
        pid = daemon.proc.pid
        others = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
        assert others
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.syscall(SYS_TGKILL, pid, others[0], signal.SIGTERM) == 0, ctypes.get_errno()
        assert daemon.proc.wait(timeout=10) == 0
        daemon.stop()
    assert "stopped" in daemon.stderr


def reply(lines) -> int:
    """The code of the next reply on the client's line reader (multi-line read whole)."""
    while (line := lines.readline())[3:4] == b"-":
        pass
    return int(line[:3])


def test_sessions_run_on_the_reactor_until_one_would_wait_then_on_a_thread(
        tmp_path, upstream, port):
    """Sessions that answer at once take no thread of their own: here the
    IPv4 clients', greylisted. A recipient accepted (the upstream is opened)
    moves its session to a thread: here the IPv6 clients', trusted. Such a
    thread waits for the next session after its own, and leaves once
    IDLE_TIMEOUT passes without one."""
    probe = socket.socket(socket.AF_INET6)
    try:
        probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    finally:
        probe.close()
    v6 = free_port("::1")
    config = config_for(tmp_path, upstream.port, port, relay={"clients": ["::1/128"]})
    with Foreground(config, "--listen", f"127.0.0.1:{port}", "--listen", f"[::1]:{v6}") as daemon:
        wait_listening(port)
        wait_listening(v6, "::1")
        # the main thread, the log and store writers, one reactor per listener
        pid, base = daemon.proc.pid, 3 + 2
        assert until(lambda: threads(pid) == base, 5)
        clients = [socket.create_connection(("::1" if i % 2 else "127.0.0.1",
                                             v6 if i % 2 else port), timeout=5)
                   for i in range(12)]
        lines = [client.makefile("rb") for client in clients]
        for i, (client, said) in enumerate(zip(clients, lines)):
            assert said.readline().startswith(b"220 mx.greyd.test ESMTP greyd")
            sender = b"sender-" + bytes([ord("a") + i])          # a triplet of its own
            client.sendall(b"EHLO client.example.net\r\nMAIL FROM:<%s@example.net>\r\n" % sender)
            assert (reply(said), reply(said)) == (250, 250)
        assert until(lambda: threads(pid) == base, 5)
        for i, (client, said) in enumerate(zip(clients, lines)):
            client.sendall(b"RCPT TO:<user@example.org>\r\n")
            assert reply(said) == (250 if i % 2 else 451)
        assert threads(pid) == base + 6
        for client, said in zip(clients, lines):
            said.close()
            client.close()
        assert until(lambda: threads(pid) == base, 4 * IDLE_TIMEOUT + 5)
        assert daemon.stop() == 0


def test_a_busy_port_is_one_line_and_exit_1(tmp_path, upstream, port):
    config = config_for(tmp_path, upstream.port, port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = greyd("start", "--foreground", config=config)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"greyd: cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_permission_denied_on_bind_is_one_line(tmp_path, upstream):
    config = config_for(tmp_path, upstream.port, 25)
    result = greyd("start", "--foreground", config=config, prefix=UNPRIVILEGED if ROOT else [])
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["greyd: cannot listen on 127.0.0.1:25: Permission denied"]


def test_an_unwritable_database_is_one_line(tmp_path, upstream, port):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    config = config_for(tmp_path, upstream.port, port, database={"path": str(locked / "greyd.db")})
    result = greyd("start", "--foreground", config=config, prefix=UNPRIVILEGED if ROOT else [])
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"greyd: database not writable: {locked}/greyd.db")


def test_a_bad_config_stops_the_start_naming_the_key(tmp_path, upstream, port):
    config = config_for(tmp_path, upstream.port, port, server={"max_conections": 5})
    result = greyd("start", "--foreground", config=config)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert "server.max_conections" in result.stderr and "Traceback" not in result.stderr


def test_check_prints_the_effective_settings(tmp_path, upstream, port):
    config = config_for(tmp_path, upstream.port, port, greylist={"delay": "90s"})
    result = greyd("check", config=config)
    assert result.returncode == 0
    assert f"# config: {config}" in result.stdout
    assert "delay = 90" in result.stdout
    assert f'path = "{tmp_path}/var/greyd.db"' in result.stdout


def test_the_config_is_found_through_greyd_config(tmp_path, upstream, port):
    config = config_for(tmp_path, upstream.port, port)
    env = {**os.environ, "GREYD_CONFIG": str(config)}
    result = greyd("check", env=env, cwd="/")
    assert result.returncode == 0 and f"# config: {config}" in result.stdout


def test_explain_uses_the_daemons_decision_and_changes_nothing(tmp_path, upstream, port):
    config = config_for(tmp_path, upstream.port, port, greylist={"delay": "1h"})
    with Foreground(config) as daemon:
        wait_listening(port)
        rcpt, _ = deliver(port, "Carol+news@Example.net", "dave@localhost")
        assert rcpt[0] == 451
        assert daemon.stop() == 0
    database = tmp_path / "var/greyd.db"
    before = hashlib.sha256(database.read_bytes()).hexdigest()

    result = greyd("explain", "--client", "127.0.0.1", "--sender", "carol+other@example.net",
                   "--recipient", "dave@localhost", "--json", config=config)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["action"] == "greylist" and report["reason"] == "too-early"
    assert report["triplet"] == "127.0.0.0/24 carol@example.net dave@localhost"
    assert 0 < report["retry_in"] <= 3600 and report["first_seen"]
    assert hashlib.sha256(database.read_bytes()).hexdigest() == before

    denied = greyd("explain", "--client", "198.51.100.4", "--sender", "x@example.net",
                   "--recipient", "victim@elsewhere.example", config=config)
    assert denied.returncode == 0
    assert re.search(r"^action: +reject$", denied.stdout, re.M)
    assert re.search(r"^reason: +relay-denied$", denied.stdout, re.M)


def test_explain_rejects_a_bad_address_in_one_line(tmp_path, upstream, port):
    config = config_for(tmp_path, upstream.port, port)
    result = greyd("explain", "--client", "not-an-ip", "--sender", "a@b.example",
                   "--recipient", "c@localhost", config=config)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["greyd: --client: not an IP address: not-an-ip"]

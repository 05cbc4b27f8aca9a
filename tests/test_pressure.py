"""Connection pressure on the real daemon (SPEC §2 limits, §9 promises).

greyd runs as `greyd start --foreground` in a subprocess (tests/daemon.py's
`Foreground`) so that its threads and descriptors can be counted in
/proc/<pid>: the connection limits, a flood of 1,000 idle and dribbling
connections beside a well-behaved client, the per-command and per-line
deadlines against slow clients, and the graceful stop on SIGTERM.
Clients come from several loopback addresses (127.0.0.x) to tell the
per-client limit from the total one; 127.0.0.200 is a trusted client
(relay.clients), so its mail goes straight to the upstream.
"""

from __future__ import annotations

import resource
import select
import signal
import smtplib
import socket
import threading
import time

import pytest

from certs import Certs
from conftest import greeted, until
from daemon import BASE_THREADS, Foreground, config_for, descriptors, threads, wait_listening
from greyd import replies
from greyd.reactor import IDLE_TIMEOUT
from greyd.server import GRACE
from smtpclient import R, Raw, deliver, greetings

pytestmark = pytest.mark.timeout(120)

TRUSTED = "127.0.0.200"               # in relay.clients below: never greylisted
HOST = "mx.greyd.test"                # server.hostname in conftest's base config


# -- /proc --------------------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- clients ------------------------------------------------------------------------------------

def closed_by_server(sock: socket.socket, timeout: float = 5) -> bool:
    """True when the server has closed the connection (end of stream or reset)."""
    sock.settimeout(timeout)
    try:
        while True:
            if sock.recv(4096) == b"":
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def dribble(sock: socket.socket, data: bytes, interval: float, limit: float):
    """Send `data` one byte every `interval` s until the server answers or closes.

    Returns (what the server sent, seconds it took, bytes sent by then).
    """
    started = time.monotonic()
    sent, received = 0, b""
    while time.monotonic() - started < limit and not received.endswith(b"\r\n"):
        if sent < len(data):
            try:
                sock.send(data[sent:sent + 1])
                sent += 1
            except OSError:
                break
        ready, _, _ = select.select([sock], [], [], interval)
        if ready:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return received, time.monotonic() - started, sent


def parse_reply(data: bytes) -> tuple[int, str]:
    line = data.decode("utf-8", "replace").rstrip("\r\n")
    return (int(line[:3]), line[4:]) if line[:3].isdigit() else (0, line)


def pressure_config(tmp_path, upstream_port: int, port: int, **server):
    return config_for(tmp_path, upstream_port, port, server=server,
                      relay={"domains": ["localhost"], "clients": [f"{TRUSTED}/32"]})


# -- the connection limits ----------------------------------------------------------------------

def test_connection_limits_total_and_per_client(tmp_path, upstream, port):
    config = pressure_config(tmp_path, upstream.port, port,
                             max_connections=5, max_connections_per_client=2)
    greeting = R(replies.greeting(HOST, "greyd"))
    opened: list[Raw] = []
    with Foreground(config) as daemon:
        wait_listening(port)
        pid = daemon.proc.pid
        assert until(lambda: threads(pid) == BASE_THREADS, 10), threads(pid)
        database = str(tmp_path / "var/greyd.db")
        sockets = descriptors(pid, database)["socket"]
        try:
            opened += [Raw(port, source="127.0.0.2") for _ in range(2)]
            assert [c.greeting for c in opened] == [greeting] * 2
            with Raw(port, source="127.0.0.2") as third:         # over the per-client limit
                assert third.greeting == R(replies.TOO_MANY_FROM_CLIENT)
                assert third.closed()
            opened += [Raw(port, source="127.0.0.3") for _ in range(2)]
            opened.append(Raw(port, source="127.0.0.4"))
            assert [c.greeting for c in opened] == [greeting] * 5
            for source in ("127.0.0.5", "127.0.0.4"):            # over the total limit
                with Raw(port, source=source) as sixth:
                    assert sixth.greeting == R(replies.TOO_MANY_CONNECTIONS)
                    assert sixth.closed()
            assert threads(pid) == BASE_THREADS    # the admitted are on the reactor; no thread
            for c in opened:                                       # the admitted are served
                assert c.cmd("NOOP") == R(replies.OK)

            opened.pop(2).close()                                  # one of 127.0.0.3 leaves
            newcomer = greeted(port, source="127.0.0.5")
            assert newcomer is not None, "a slot freed by a closed session was not reused"
            opened.append(newcomer)
            with Raw(port, source="127.0.0.6") as seventh:
                assert seventh.greeting == R(replies.TOO_MANY_CONNECTIONS)
        finally:
            for c in opened:
                c.close()
        # every session ended (`sockets` may have counted a probe of wait_listening too)
        assert until(lambda: descriptors(pid, database)["socket"] <= sockets, 10)
        assert threads(pid) == BASE_THREADS
        assert greetings(port, 2, source="127.0.0.2") == [greeting] * 2   # both slots free again
        assert daemon.stop() == 0
    refused = [line for line in daemon.stderr.splitlines() if "connection refused" in line]
    assert len(refused) >= 4
    assert any("Too many connections from your address" in line for line in refused)


# -- a flood beside a well-behaved client ---------------------------------------------------

FLOOD = 1000
PER_SOURCE = 20                       # max_connections_per_client's default
TRICKLE_LIMIT = 60                    # seconds the trickler runs at most


@pytest.fixture
def descriptor_room():
    """Enough descriptors for the flood, in this process and the daemon it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * FLOOD + 500
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def trickle(sockets: list[socket.socket], stop: threading.Event) -> None:
    """One byte a second to each socket, of a command line that never ends (bounded)."""
    for _ in range(TRICKLE_LIMIT):
        for sock in sockets:
            try:
                sock.send(b"x")
            except OSError:
                pass
        if stop.wait(1.0):
            return


def test_a_thousand_connections_do_not_stop_a_good_client(tmp_path, upstream, port,
                                                          descriptor_room):
    config = pressure_config(tmp_path, upstream.port, port, max_connections=FLOOD + 100,
                             command_timeout=300)
    database = str(tmp_path / "var/greyd.db")
    body = b"Subject: through the flood\r\n\r\nHello.\r\n"
    with Foreground(config) as daemon:
        wait_listening(port)
        pid = daemon.proc.pid
        # A first transaction opens the store's pooled connection, part of the baseline.
        assert deliver(port, "warm@example.net", "bob@localhost", body, source=TRUSTED)[1][0] == 250
        assert until(lambda: threads(pid) == BASE_THREADS, 10), threads(pid)
        base_fds = descriptors(pid, database)
        rss_before = rss_kib(pid)

        flood: list[Raw] = []
        stop = threading.Event()
        trickler = threading.Thread(target=trickle, args=([], stop), daemon=True)
        try:
            for i in range(FLOOD):
                flood.append(Raw(port, source=f"127.0.0.{2 + i // PER_SOURCE}", timeout=10))
            codes = [c.greeting[0] for c in flood]
            assert codes.count(220) == FLOOD, f"not admitted: {FLOOD - codes.count(220)}"
            assert threads(pid) == BASE_THREADS          # the reactor serves them all
            sockets = descriptors(pid, database)["socket"]
            assert sockets >= base_fds["socket"] + FLOOD
            rss_with = rss_kib(pid)
            with Raw(port, source="127.0.0.2") as extra:      # the per-client limit still holds
                assert extra.greeting == R(replies.TOO_MANY_FROM_CLIENT)
            idle, slow = flood[0::2], flood[1::2]
            for c in slow:
                c.send(b"EHLO slow")
            trickler = threading.Thread(target=trickle, args=([c.sock for c in slow], stop),
                                        daemon=True)
            trickler.start()
            time.sleep(2)                    # the slow ones are dribbling by now

            started = time.monotonic()
            rcpt, data = deliver(port, "good@example.net", "bob@localhost", body, source=TRUSTED)
            took = time.monotonic() - started
            assert rcpt == (250, b"2.1.5 OK") and data == (250, b"2.0.0 OK queued")
            good = upstream.wait_for(2)[-1]
            assert good.mail_from == "good@example.net" and good.data.endswith(body)
            assert took < 10, f"a good client took {took:.1f} s beside {FLOOD} connections"
            # nobody of the flood was dropped; the good session's thread leaves
            assert descriptors(pid, database)["socket"] >= sockets
            assert until(lambda: threads(pid) == BASE_THREADS, 5 + IDLE_TIMEOUT), threads(pid)

            stop.set()
            trickler.join(5)
            for c in idle[:5]:                               # the flood is served too
                assert c.cmd("NOOP") == R(replies.OK)
            for c in slow[:5]:                               # its dribbled line, finished
                assert c.cmd(b"")[0] == 250
        finally:
            stop.set()
            if trickler.is_alive():
                trickler.join(5)
            for c in flood:
                c.close()
        print(f"\n{FLOOD} connections: daemon RSS {rss_before} KiB before, {rss_with} KiB with "
              f"({(rss_with - rss_before) / FLOOD:.1f} KiB each); good transaction {took:.2f} s")

        assert until(lambda: threads(pid) == BASE_THREADS, 20), threads(pid)
        assert until(lambda: descriptors(pid, database) == base_fds, 10), \
            (descriptors(pid, database), base_fds)
        after = deliver(port, "after@example.net", "bob@localhost", body, source=TRUSTED)
        assert after[1][0] == 250
        again = greetings(port, PER_SOURCE, source="127.0.0.2")
        assert [code for code, _ in again] == [220] * PER_SOURCE           # no slot leaked
        assert daemon.stop() == 0


# -- slow clients -------------------------------------------------------------------------------

COMMAND_TIMEOUT = 1
DATA_TIMEOUT = 2


def test_idle_and_dribbling_clients_meet_their_deadlines(tmp_path, upstream, port):
    config = pressure_config(tmp_path, upstream.port, port, command_timeout=COMMAND_TIMEOUT,
                             data_timeout=DATA_TIMEOUT)
    database = str(tmp_path / "var/greyd.db")
    timings = {}
    with Foreground(config) as daemon:
        wait_listening(port)
        pid = daemon.proc.pid
        warm = deliver(port, "warm@example.net", "bob@localhost", b"warm\r\n", source=TRUSTED)
        assert warm[1][0] == 250                                      # pools a store connection
        assert until(lambda: threads(pid) == BASE_THREADS, 10), threads(pid)
        base_fds = descriptors(pid, database)

        with Raw(port, timeout=10) as idle:
            started = time.monotonic()
            assert idle.reply() == R(replies.TIMEOUT)
            timings["idle"] = time.monotonic() - started
            assert idle.closed()
        assert until(lambda: threads(pid) == BASE_THREADS, 5), "the idle session's thread stayed"

        with Raw(port, timeout=10) as slow:         # 0.3 s apart: no single read ever waits 1 s
            got, timings["command"], sent = dribble(slow.sock, b"EHLO " + b"a" * 200, 0.3, 15)
            assert parse_reply(got) == R(replies.TIMEOUT)
            assert sent >= 3
            assert closed_by_server(slow.sock)
        assert until(lambda: threads(pid) == BASE_THREADS, 5), "the slow session's thread stayed"

        with Raw(port, source=TRUSTED, timeout=10) as slow:
            assert slow.cmd("EHLO slow.example.net")[0] == 250
            assert slow.cmd("MAIL FROM:<slow@example.net>") == R(replies.SENDER_OK)
            assert slow.cmd("RCPT TO:<bob@localhost>") == (250, "2.1.5 OK")
            assert slow.cmd("DATA") == R(replies.START_DATA)
            slow.send(b"Subject: slow\r\n\r\n")
            got, timings["data"], sent = dribble(slow.sock, b"a line that never ends " * 5, 0.3, 15)
            assert parse_reply(got) == R(replies.TIMEOUT)
            assert closed_by_server(slow.sock)
        assert until(lambda: threads(pid) == BASE_THREADS, 5)
        assert [m.mail_from for m in upstream.messages] == ["warm@example.net"]  # no half message
        assert upstream.transactions[-1].data_code is None
        assert until(lambda: descriptors(pid, database) == base_fds, 5)
        assert daemon.stop() == 0
    print(f"\nseconds to 421 4.4.2: idle {timings['idle']:.2f}, dribbled command "
          f"{timings['command']:.2f} (command_timeout {COMMAND_TIMEOUT}), dribbled DATA line "
          f"{timings['data']:.2f} (data_timeout {DATA_TIMEOUT})")
    assert 0.8 * COMMAND_TIMEOUT <= timings["idle"] <= COMMAND_TIMEOUT + 4
    assert 0.8 * COMMAND_TIMEOUT <= timings["command"] <= COMMAND_TIMEOUT + 4
    assert 0.8 * DATA_TIMEOUT <= timings["data"] <= DATA_TIMEOUT + 4


# -- graceful stop ------------------------------------------------------------------------------

def open_data(port: int, n: int) -> Raw:
    """A trusted session inside DATA with the head of message n sent."""
    c = Raw(port, source=TRUSTED, timeout=45)
    assert c.cmd("EHLO client.example.net")[0] == 250
    assert c.cmd(f"MAIL FROM:<sender{n}@example.net>") == R(replies.SENDER_OK)
    assert c.cmd("RCPT TO:<bob@localhost>") == (250, "2.1.5 OK")
    assert c.cmd("DATA") == R(replies.START_DATA)
    c.send(f"Subject: message {n}\r\n\r\nfirst line\r\n".encode())
    return c


def finish(c: Raw, n: int, lines: int, pause: float, outcome: dict) -> None:
    """Send the rest of message n slowly, its end, then QUIT; record the replies."""
    try:
        for k in range(lines):
            time.sleep(pause)
            c.send(f"line {k}\r\n".encode())
        outcome["data"] = c.cmd(".")
        outcome["quit"] = c.cmd("QUIT")
        outcome["closed"] = c.closed()
    except OSError as error:
        outcome["error"] = repr(error)


def stall(c: Raw, signalled: float, outcome: dict) -> None:
    """Dribble a body line that never ends; record the reply and when it came."""
    got, _, _ = dribble(c.sock, b"x" * 200, 0.5, GRACE + 15)
    outcome["reply"] = parse_reply(got)
    outcome["after"] = time.monotonic() - signalled
    outcome["closed"] = closed_by_server(c.sock)


def body_of(n: int, lines: int) -> bytes:
    return (f"Subject: message {n}\r\n\r\nfirst line\r\n".encode()
            + b"".join(f"line {k}\r\n".encode() for k in range(lines)))


def test_sigterm_lets_messages_finish_and_421s_the_rest(tmp_path, upstream, port):
    config = pressure_config(tmp_path, upstream.port, port, command_timeout=120,
                             data_timeout=120)
    # (lines still to send, seconds between them): done ~1 s, ~5 s and ~15 s after SIGTERM
    finishing = {0: (3, 0.3), 1: (5, 1.0), 2: (10, 1.5)}
    stalling = (3, 4, 5)
    outcomes = {n: {} for n in (*finishing, *stalling)}
    with Foreground(config) as daemon:
        wait_listening(port)
        sessions = {n: open_data(port, n) for n in outcomes}
        daemon.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        workers = [threading.Thread(target=finish, args=(sessions[n], n, *finishing[n], outcomes[n]))
                   for n in finishing]
        workers += [threading.Thread(target=stall, args=(sessions[n], signalled, outcomes[n]))
                    for n in stalling]
        try:
            for worker in workers:
                worker.start()

            def refused() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return False
                except ConnectionRefusedError:
                    return True
                except OSError:          # reset: the listener closed during the handshake
                    return False
            assert until(refused, 5), "still accepting connections after SIGTERM"
            code = daemon.proc.wait(timeout=GRACE + 15)
            exited = time.monotonic() - signalled
            for worker in workers:
                worker.join(10)
        finally:
            for c in sessions.values():
                c.close()
        assert daemon.stop() == 0 and code == 0
    print(f"\nSIGTERM: exit 0 after {exited:.1f} s; 421 to the stalled after "
          + ", ".join(f"{outcomes[n]['after']:.1f} s" for n in stalling))

    for n in finishing:
        assert outcomes[n].get("data") == (250, "2.0.0 OK queued"), (n, outcomes[n])
        assert outcomes[n]["quit"] == R(replies.closing(HOST)) and outcomes[n]["closed"]
    for n in stalling:
        assert outcomes[n]["reply"] == R(replies.SHUTTING_DOWN), (n, outcomes[n])
        assert GRACE - 2 <= outcomes[n]["after"] <= GRACE + 8, outcomes[n]
        assert outcomes[n]["closed"]
    assert exited <= GRACE + 5
    # The upstream has the finished messages, whole, and nothing of the stalled ones.
    got = sorted(upstream.messages, key=lambda m: m.mail_from)
    assert [m.mail_from for m in got] == [f"sender{n}@example.net" for n in finishing]
    for n, message in zip(finishing, got):
        assert message.data.endswith(body_of(n, finishing[n][0])), message.data
    stalled = [t for t in upstream.transactions if t.mail_from in
               {f"sender{n}@example.net" for n in stalling}]
    assert len(stalled) == len(stalling) and all(t.data_code is None for t in stalled)
    assert "stopped" in daemon.stderr


# -- a flood of bad handshakes beside a well-behaved TLS client ---------------------------------

HANDSHAKE_TIMEOUT = 5


def starttls_flood(port: int, n: int) -> list[Raw]:
    """`n` connections that said EHLO and STARTTLS and were answered 220 2.0.0."""
    flood = []
    for i in range(n):
        c = Raw(port, source=f"127.0.0.{2 + i // PER_SOURCE}", timeout=10)
        c.send(b"EHLO flood\r\nSTARTTLS\r\n")
        flood.append(c)
    for c in flood:
        assert c.reply()[0] == 250
        assert c.reply() == R(replies.READY_TO_START_TLS)
    return flood


def test_a_thousand_bad_handshakes_do_not_stop_a_good_tls_client(tmp_path, upstream, port,
                                                                  descriptor_room):
    certs = Certs(tmp_path)
    cert, key = certs.issue(HOST, "127.0.0.1")         # smtplib checks the name it connected to
    config = config_for(tmp_path, upstream.port, port,
                        server={"max_connections": FLOOD + 100},
                        relay={"domains": ["localhost"], "clients": [f"{TRUSTED}/32"]},
                        tls={"cert": str(cert), "key": str(key),
                             "handshake_timeout": f"{HANDSHAKE_TIMEOUT}s"})
    database = str(tmp_path / "var/greyd.db")
    body = b"Subject: through a flood of handshakes\r\n\r\nHello.\r\n"

    def good_transaction() -> float:
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=(TRUSTED, 0)) as client:
            client.ehlo("good.example.net")
            client.starttls(context=certs.client())
            client.ehlo("good.example.net")
            client.mail("good@example.net")
            assert client.rcpt("bob@localhost")[0] == 250
            assert client.data(body)[0] == 250
        return time.monotonic() - started

    with Foreground(config) as daemon:
        wait_listening(port)
        pid = daemon.proc.pid
        good_transaction()                   # the store's pooled connection: part of the baseline
        # and the thread that watches the certificate
        base = BASE_THREADS + 1
        assert until(lambda: threads(pid) == base, 10), threads(pid)
        base_fds = descriptors(pid, database)

        flood = starttls_flood(port, FLOOD)
        try:
            stalled, garbage = flood[0::2], flood[1::2]
            for c in garbage:                # in place of a ClientHello
                c.send(b"\x16\x03\x01\x00\x05garbage, not a TLS handshake\r\n" * 4)
            took = good_transaction()
            assert took < 10, f"a good TLS client took {took:.1f} s beside {FLOOD} handshakes"
            good = upstream.wait_for(2)[-1]
            assert good.mail_from == "good@example.net" and good.data.endswith(body)
            assert "with ESMTPS id" in good.data.decode()
            assert all(closed_by_server(c.sock, 5) for c in garbage[:20])
            # the stalled ones are let go at handshake_timeout, not later
            assert all(closed_by_server(c.sock, HANDSHAKE_TIMEOUT + 5) for c in stalled[:20])
        finally:
            for c in flood:
                c.close()
        print(f"\n{FLOOD} bad handshakes: good TLS transaction {took:.2f} s")
        assert until(lambda: threads(pid) == base, 20), threads(pid)
        assert until(lambda: descriptors(pid, database) == base_fds, 10), \
            (descriptors(pid, database), base_fds)
        assert good_transaction() < 10
        assert daemon.stop() == 0
    failed = [line for line in daemon.stderr.splitlines() if "end=tls-failed" in line]
    assert len(failed) == FLOOD              # each bad handshake: one line, no more
    assert not [line for line in daemon.stderr.splitlines() if "Traceback" in line]

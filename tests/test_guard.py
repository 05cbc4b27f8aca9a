"""One error path: every phase of a session made to raise (STYLE: one guard per session).

Each test plants one fault through what a session is given, never by patching
greyd: its DNS lookup (the greeting), its store (a command), its channel's
deadline (the message), its clock (the end of data), its relay class (the
upstream). It checks the client's reply (451 4.3.0 when a reply is due and the
dialogue can go on, else 421 4.3.0 and a close, never a bare disconnect), the
ERROR line with its traceback, and `end=error` on the session-end line. The
last tests run the real command detached, with one fault planted by
tests/faulty_greyd.py, and read the daemon's own log file.
"""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import until, write_config
from greyd import config as configuration, log, replies
from greyd.channel import Channel
from greyd.dialogue import Dialogue
from greyd.greylist import Greylister
from greyd.relay import Relay
from greyd.context import Context
from greyd.smtp import Session
from daemon import descriptors, greyd, threads, wait_listening
from smtpclient import R, Raw

pytestmark = pytest.mark.timeout(60)

TRUSTED = "192.0.2.7"        # in the test config's relay.clients: accepted, relayed
STRANGER = "198.51.100.7"    # greylisted: its RCPT asks the store
DATA_TIMEOUT = 9             # tells the message phase's deadline from a command's (10)
MESSAGE = b"Subject: guard\r\n\r\nHello.\r\n.\r\n"
FAULTY_GREYD = Path(__file__).with_name("faulty_greyd.py")


class PlantedFault(Exception):
    """The one fault a test plants."""


class FailingLookup:
    """DNS whose start raises: a fault in the greeting."""

    def start(self, client):
        raise PlantedFault("in the DNS lookup")

    def close(self) -> None:
        pass


class FailingStore:
    """A store whose facts raise something other than a StoreError."""

    def __init__(self, backend):
        self.backend = backend
        self.record, self.close = backend.record, backend.close

    def facts(self, network, triplet):
        raise PlantedFault("in the store")


class FailingRcptRelay(Relay):
    """A relay whose RCPT raises."""

    def rcpt(self, recipient, dsn=()):
        raise PlantedFault("in the relay's RCPT")


class FailingDataRelay(Relay):
    """A relay whose DATA raises."""

    def data(self, message):
        raise PlantedFault("in the relay's DATA")


class Clock:
    """time.time, raising once it is told to (`arm`)."""

    def __init__(self):
        self.armed = False

    def arm(self) -> None:
        self.armed = True

    def __call__(self) -> float:
        if self.armed:
            raise PlantedFault("in the clock")
        return time.time()


def raising_expect(seconds: float) -> None:
    """A channel deadline that fails for the message's lines (DATA_TIMEOUT)."""
    if seconds == DATA_TIMEOUT:
        raise PlantedFault("while reading the message")


class Conversation:
    """One session's Dialogue run in a thread over a socketpair; `client` is its peer."""

    def __init__(self, tmp_path, upstream, client: str, *, lookup=None, relay=Relay,
                 store=None, clock=time.time, expect=lambda seconds: None):
        config = configuration.load(write_config(
            tmp_path, upstream.port, server={"data_timeout": DATA_TIMEOUT}))
        greylister = Greylister.open(config, clock=clock)
        if store is not None:
            greylister = Greylister(config, store(greylister.backend), clock=clock)
        self.greylister = greylister
        ctx = Context(config, greylister, lookup=lookup, relay=relay)
        ours, theirs = socket.socketpair()
        ours.settimeout(5)
        self._sock, self._rfile = ours, ours.makefile("rb")
        channel = Channel(self._rfile, ours.sendall, expect)
        self.thread = threading.Thread(target=self._run,
                                       args=(Dialogue(Session(ctx, client), channel),))
        self.thread.start()
        self.client = Raw.over(theirs)

    def _run(self, dialogue: Dialogue) -> None:
        try:
            dialogue.run()
        finally:                            # as the server closes a client's socket
            self._rfile.close()
            self._sock.close()

    def finish(self) -> None:
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.client.close()
        self.greylister.close()


def hung_up(client: Raw) -> bool:
    """True when greyd has closed the connection (a reset, if it left
    unread what the client had sent)."""
    try:
        return client.file.read(1) == b""
    except ConnectionResetError:
        return True


def refused_rcpt(client: Raw) -> None:
    """EHLO, MAIL, and an RCPT answered 451 4.3.0 (the planted fault)."""
    assert client.cmd("EHLO mail.example.net")[0] == 250
    assert client.cmd("MAIL FROM:<alice@example.net>") == R(replies.SENDER_OK)
    assert client.cmd("RCPT TO:<bob@localhost>") == R(replies.LOCAL_ERROR)


def transaction(client: Raw, recipient: str = "bob@localhost") -> None:
    assert client.cmd("EHLO mail.example.net")[0] == 250
    assert client.cmd("MAIL FROM:<alice@example.net>") == R(replies.SENDER_OK)
    assert client.cmd(f"RCPT TO:<{recipient}>")[0] == 250


def assert_logged(logs, phase: str, fault: str) -> None:
    """One ERROR line for the phase, its traceback naming the fault; end=error."""
    errors = [line for line in logs.lines if " ERROR session error " in line]
    assert len(errors) == 1, logs.lines
    assert errors[0].splitlines()[0].endswith(" " + log.fields(phase=phase))
    assert "Traceback (most recent call last)" in errors[0]
    assert f"PlantedFault: {fault}" in errors[0]
    assert re.search(r"session end .* end=error ", logs.wait_for("session end")[0] + " ")


def test_a_fault_in_the_greeting_is_421_and_a_close(tmp_path, upstream, logs):
    talk = Conversation(tmp_path, upstream, TRUSTED, lookup=FailingLookup())
    assert talk.client.greeting == R(replies.LOCAL_ERROR_CLOSING)
    assert hung_up(talk.client)
    talk.finish()
    assert_logged(logs, "greeting", "in the DNS lookup")


def test_a_fault_in_a_command_is_451_and_the_session_goes_on(tmp_path, upstream, logs):
    talk = Conversation(tmp_path, upstream, STRANGER, store=FailingStore)
    client = talk.client
    refused_rcpt(client)
    assert client.cmd("DATA") == R(replies.NEED_MAIL)        # the transaction was dropped
    assert client.cmd("MAIL FROM:<alice@example.net>") == R(replies.SENDER_OK)
    assert client.cmd("QUIT")[0] == 221
    talk.finish()
    assert_logged(logs, "command", "in the store")


def test_a_fault_in_the_relay_at_rcpt_is_451(tmp_path, upstream, logs):
    talk = Conversation(tmp_path, upstream, TRUSTED, relay=FailingRcptRelay)
    client = talk.client
    refused_rcpt(client)
    assert client.cmd("QUIT")[0] == 221
    talk.finish()
    assert_logged(logs, "command", "in the relay's RCPT")
    assert upstream.messages == []


def test_a_fault_while_reading_the_message_is_421_and_a_close(tmp_path, upstream, logs):
    talk = Conversation(tmp_path, upstream, TRUSTED, expect=raising_expect)
    client = talk.client
    transaction(client)
    client.send(b"DATA\r\n" + MESSAGE)          # all sent before greyd can hang up
    assert client.reply()[0] == 354
    assert client.reply() == R(replies.LOCAL_ERROR_CLOSING)
    assert hung_up(client)
    talk.finish()
    assert_logged(logs, "message", "while reading the message")
    assert upstream.messages == []


def test_a_fault_at_the_end_of_data_is_451_and_nothing_is_relayed(tmp_path, upstream, logs):
    clock = Clock()
    talk = Conversation(tmp_path, upstream, TRUSTED, clock=clock)
    client = talk.client
    transaction(client)
    assert client.cmd("DATA")[0] == 354
    clock.arm()                           # the Received: header asks the clock
    client.send(MESSAGE)
    assert client.reply() == R(replies.LOCAL_ERROR)
    assert client.cmd("QUIT")[0] == 221
    talk.finish()
    assert_logged(logs, "end of data", "in the clock")
    assert upstream.messages == []        # the client keeps the message and retries


def test_a_fault_in_the_relay_at_data_is_451_and_the_next_transaction_works(
        tmp_path, upstream, logs):
    talk = Conversation(tmp_path, upstream, TRUSTED, relay=FailingDataRelay)
    client = talk.client
    transaction(client)
    assert client.cmd("DATA")[0] == 354
    client.send(MESSAGE)
    assert client.reply() == R(replies.LOCAL_ERROR)
    assert client.cmd("RSET") == R(replies.RESET)
    assert client.cmd("MAIL FROM:<carol@example.net>") == R(replies.SENDER_OK)
    assert client.cmd("RCPT TO:<dave@localhost>")[0] == 250   # a fresh upstream connection
    assert client.cmd("QUIT")[0] == 221
    talk.finish()
    assert_logged(logs, "end of data", "in the relay's DATA")
    assert upstream.messages == []
    assert [t.mail_from for t in upstream.transactions] == ["alice@example.net",
                                                            "carol@example.net"]


# -- the real daemon, detached --------------------------------------------------------------

def faulty_message(port: int, plant: bool) -> tuple[int, bytes]:
    """One message from a trusted client; the DATA reply (code, text)."""
    body = (b"X-Plant-Fault: yes\r\n" if plant else b"") + b"Subject: guard\r\n\r\nHi.\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("mail.example.net")
        client.mail("alice@example.net")
        assert client.rcpt("bob@localhost")[0] == 250
        try:
            return client.data(body)
        except smtplib.SMTPDataError as refused:
            return refused.smtp_code, refused.smtp_error


def census(pid: int, database: Path) -> dict[str, int]:
    """The daemon's threads and open descriptors (by kind)."""
    return {"threads": threads(pid), **descriptors(pid, str(database))}


def within(now: dict[str, int], before: dict[str, int]) -> bool:
    return all(now[kind] <= before[kind] for kind in before)


def test_a_detached_daemon_logs_the_traceback_to_its_file_and_serves_on(
        tmp_path, upstream, port):
    logfile = tmp_path / "var/log/greyd.log"
    config = write_config(tmp_path, upstream.port,
                          server={"listen": [f"127.0.0.1:{port}"]},
                          relay={"clients": ["127.0.0.0/8"]},
                          log={"file": str(logfile)})
    started = subprocess.run([sys.executable, str(FAULTY_GREYD), "-c", str(config), "start"],
                             capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    pid = int((tmp_path / "var/greyd.pid").read_text())
    database = tmp_path / "var/greyd.db"
    try:
        wait_listening(port)
        assert faulty_message(port, plant=False)[0] == 250
        # after one whole session, once its thread waits in accept() again
        time.sleep(0.5)
        before = census(pid, database)
        replies_seen = [faulty_message(port, plant=True) for _ in range(5)]
        assert faulty_message(port, plant=False)[0] == 250
        settled = until(lambda: within(census(pid, database), before), 15)
        after = census(pid, database)
    finally:
        stopped = greyd("stop", config=config)
    assert stopped.returncode == 0, stopped.stderr
    assert replies_seen == [(451, replies.LOCAL_ERROR.text.encode())] * 5
    assert settled, (before, after)          # no thread, no descriptor left over
    assert len(upstream.messages) == 2
    log = logfile.read_text()
    assert log.count("ERROR session error ") == 5
    assert log.count("Traceback (most recent call last)") == 5
    assert log.count("PlantedFault: planted at the end of data") == 5
    assert len(re.findall(r" session end .* end=error ", log)) == 5
    assert "stopped" in log

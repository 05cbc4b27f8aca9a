"""greyd.smtp: the SMTP dialogue of SPEC §4 and the message handling of §4/§6.

greyd runs in-process on loopback in front of a real aiosmtpd upstream
(tests/upstream.py); a raw client sends exact bytes and every reply is
compared with the constants of greyd.replies. The fake clock passes greylist
delays; nothing here sleeps for them and nothing is mocked.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from email.utils import parsedate_to_datetime

import pytest

from conftest import START, greeted
from daemon import Foreground, config_for, wait_listening
from greyd import replies
from greyd.replies import Reply
from smtpclient import R, Raw
from upstream import DroppingServer, Upstream, dead_port

pytestmark = pytest.mark.timeout(30)

HOST = "mx.greyd.test"              # server.hostname in the fixtures' config
HELO_NAME = "client.example.net"
SENDER = "alice@example.net"
RECIPIENT = "bob@example.org"        # a relayed domain: greylisted for 127.0.0.1
MAX_SIZE = 25 * 1024 * 1024          # server.max_message_size default "25M"

RCPT_OK = (250, "2.1.5 OK")          # the upstream's own replies (tests/upstream.py)
QUEUED = (250, "2.0.0 OK queued")

ENHANCED = re.compile(r"\d\.\d{1,3}\.\d{1,3} ")


class Client(Raw):
    """Raw, checking that every reply greyd composes carries an enhanced status code.

    Exempt (SPEC §4): the 220 greeting, the 250 to HELO/EHLO and the 354 to DATA.
    """

    def __init__(self, port: int, **kwargs):
        self._exempt = {220}                    # the greeting
        super().__init__(port, **kwargs)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        raw = line.encode() if isinstance(line, str) else line
        verb = raw.split(b" ", 1)[0].upper()
        self._exempt = {250} if verb in (b"HELO", b"EHLO") else set()
        return super().cmd(line)

    def reply(self, check: bool = True) -> tuple[int, str]:
        code, text = super().reply()
        exempt, self._exempt = self._exempt | {354}, set()
        if check and code and code not in exempt:
            for line in text.split("\n"):
                assert ENHANCED.match(line), f"no enhanced status code in {code} {line!r}"
        return code, text


@pytest.fixture
def connect():
    """connect(greyd, ehlo=True) -> Client after the greeting (and EHLO); closed at teardown."""
    clients: list[Client] = []

    def open_client(g, *, ehlo: bool = True, **kwargs) -> Client:
        client = Client(g.port, **kwargs)
        clients.append(client)
        assert client.greeting == R(replies.greeting(HOST, "greyd"))
        if ehlo:
            assert client.cmd(f"EHLO {HELO_NAME}") == R(
                replies.ehlo(HOST, g.config.server.max_message_size))
        return client

    yield open_client
    for client in clients:
        client.close()


def relaying(start_greyd, upstream_port: int, **overrides):
    """greyd in front of the upstream, the test client whitelisted: its recipients go
    straight to the upstream."""
    g = start_greyd(upstream_port, **overrides)
    g.whitelist()
    return g


def open_transaction(c: Client, *recipients: str, sender: str = SENDER) -> None:
    """MAIL and RCPTs that the upstream accepts (client whitelisted or postmaster)."""
    assert c.cmd(f"MAIL FROM:<{sender}>") == R(replies.SENDER_OK)
    for recipient in recipients or (RECIPIENT,):
        assert c.cmd(f"RCPT TO:<{recipient}>") == RCPT_OK


def send_data(c: Client, body: bytes) -> tuple[int, str]:
    """DATA, then `body` (already dot-stuffed) and the terminator; the final reply."""
    assert c.cmd("DATA") == R(replies.START_DATA)
    c.send(body + b".\r\n")
    return c.reply()


def split_trace(data: bytes, body: bytes) -> bytes:
    """What greyd put in front of `body` in a relayed message; asserts the body is exact."""
    assert data.endswith(body), data[-200:]
    return data[:len(data) - len(body)]


def unfold(headers: bytes) -> list[bytes]:
    """Header fields, one per item, continuation lines joined (RFC 5322 2.2.3)."""
    assert headers.endswith(b"\r\n")
    return re.sub(rb"\r\n[ \t]", b" ", headers)[:-2].split(b"\r\n")


def assert_received(field: bytes, when: float = START) -> None:
    """A Received: field naming the client 127.0.0.1, greyd's hostname and the clock's time."""
    assert field.startswith(f"Received: from {HELO_NAME} ".encode())
    assert b"[127.0.0.1]" in field
    assert f" by {HOST} ".encode() in field
    date = field.rsplit(b";", 1)[1].strip().decode()
    assert parsedate_to_datetime(date).timestamp() == when


# -- greeting, EHLO/HELO, verbs -------------------------------------------------------------

def test_greeting_names_hostname_and_banner(greyd, connect):
    c = connect(greyd, ehlo=False)
    assert c.greeting == R(replies.greeting(HOST, "greyd"))
    assert c.greeting == (220, "mx.greyd.test ESMTP greyd")


def test_ehlo_advertises_extensions(greyd, connect):
    c = connect(greyd, ehlo=False)
    code, text = c.cmd(f"EHLO {HELO_NAME}")
    assert (code, text) == R(replies.ehlo(HOST, MAX_SIZE))
    lines = text.split("\n")
    assert lines[0] == HOST
    assert {"PIPELINING", f"SIZE {MAX_SIZE}", "8BITMIME", "ENHANCEDSTATUSCODES"} <= set(lines[1:])


def test_helo_answers_hostname(greyd, connect):
    c = connect(greyd, ehlo=False)
    assert c.cmd(f"HELO {HELO_NAME}") == R(replies.helo(HOST))
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)


@pytest.mark.parametrize("line", ["HELO", "EHLO", "EHLO ", "helo   "])
def test_helo_ehlo_without_name(greyd, connect, line):
    c = connect(greyd, ehlo=False)
    assert c.cmd(line) == R(replies.NEED_HOSTNAME)
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.NEED_HELO)   # not greeted


def test_verbs_are_case_insensitive(greyd, connect):
    c = connect(greyd, ehlo=False)
    assert c.cmd(f"ehlo {HELO_NAME}") == R(replies.ehlo(HOST, MAX_SIZE))
    assert c.cmd(f"mAiL fRoM:<{SENDER}>") == R(replies.SENDER_OK)
    assert c.cmd(f"RcPt To:<{RECIPIENT}>") == R(replies.greylisted(300))
    assert c.cmd("nOoP") == R(replies.OK)
    assert c.cmd("rset") == R(replies.RESET)
    assert c.cmd("QuIt") == R(replies.closing(HOST))
    assert c.closed()


# -- sequence errors -----------------------------------------------------------------------

SEQUENCES = {
    "mail-before-helo": (False, [(f"MAIL FROM:<{SENDER}>", replies.NEED_HELO)]),
    "nested-mail": (True, [(f"MAIL FROM:<{SENDER}>", replies.SENDER_OK),
                           (f"MAIL FROM:<{SENDER}>", replies.NESTED_MAIL)]),
    "rcpt-before-mail": (True, [(f"RCPT TO:<{RECIPIENT}>", replies.NEED_MAIL)]),
    "data-before-mail": (True, [("DATA", replies.NEED_MAIL)]),
    "data-without-rcpt": (True, [(f"MAIL FROM:<{SENDER}>", replies.SENDER_OK),
                                 ("DATA", replies.NEED_RCPT)]),
    "data-after-greylisted-only": (True, [
        (f"MAIL FROM:<{SENDER}>", replies.SENDER_OK),
        (f"RCPT TO:<{RECIPIENT}>", replies.greylisted(300)),
        ("RCPT TO:<carol@localhost>", replies.greylisted(300)),
        ("DATA", replies.NEED_RCPT)]),
    "data-after-denied-only": (True, [
        (f"MAIL FROM:<{SENDER}>", replies.SENDER_OK),
        ("RCPT TO:<carol@example.com>", replies.RELAY_DENIED),
        ("DATA", replies.NEED_RCPT)]),
}


@pytest.mark.parametrize("ehlo,dialogue", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_sequence_errors(greyd, connect, upstream, ehlo, dialogue):
    c = connect(greyd, ehlo=ehlo)
    for line, expected in dialogue:
        assert c.cmd(line) == R(expected), line
    assert dialogue[-1][1].code == 503
    assert c.cmd("NOOP") == R(replies.OK)          # the session goes on
    assert upstream.transactions == []


# -- syntax ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arg", [
    f"FROM:{SENDER}", "FROM:<alice>", "FROM:<alice@>", f"FROM:<{SENDER}",
    "FROM:<al ice@example.net>",
])
def test_malformed_sender_path(greyd, connect, arg):
    c = connect(greyd)
    assert c.cmd(f"MAIL {arg}") == R(replies.BAD_SENDER)
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)   # nothing was opened


@pytest.mark.parametrize("arg", [
    "TO:<>", f"TO:{RECIPIENT}", "TO:<bob>", f"TO:<{RECIPIENT}", "TO:<bob@exa mple.org>",
])
def test_malformed_recipient_path(greyd, connect, upstream, arg):
    c = connect(greyd)
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)
    assert c.cmd(f"RCPT {arg}") == R(replies.BAD_RECIPIENT)
    assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == R(replies.greylisted(300))
    assert upstream.transactions == []


@pytest.mark.parametrize("line,expected", [
    (f"MAIL FROM <{SENDER}>", replies.SYNTAX),
    (f"MAIL TO:<{SENDER}>", replies.SYNTAX),
    (f"MAIL FROM:<{SENDER}> SIZE=big", replies.BAD_PARAMETER),
    (f"MAIL FROM:<{SENDER}> BODY=9BIT", replies.BAD_PARAMETER),
    (f"MAIL FROM:<{SENDER}> SIZE=1 SIZE=2", replies.BAD_PARAMETER),
    (f"MAIL FROM:<{SENDER}> FOO=bar", replies.UNKNOWN_PARAMETER),
])
def test_malformed_mail_parameters(greyd, connect, line, expected):
    c = connect(greyd)
    assert c.cmd(line) == R(expected)
    assert expected.code in (501, 555)
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)


@pytest.mark.parametrize("data", [
    b"NOOP a\rb\r\n",                                            # bare CR inside
    b"NOOP\r\r\n",                                               # bare CR before CRLF
    b"NOOP a\x00b\r\n",                                          # NUL
    b"MAIL FROM:<alice@example.net>\x00\r\n",
    b"MAIL FROM:<alice@example.net>\n",                          # ends in bare LF
    b"MAIL FROM:<alice@example.net>\rRCPT TO:<bob@example.org>\r\n",   # smuggled command
], ids=["cr", "cr-before-crlf", "nul", "nul-in-mail", "bare-lf", "cr-smuggling"])
def test_bad_characters_in_command(greyd, connect, data):
    c = connect(greyd)
    c.send(data)
    assert c.reply() == R(replies.BAD_CHARACTERS)
    assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == R(replies.NEED_MAIL)   # no MAIL took effect
    assert c.cmd("NOOP") == R(replies.OK)


@pytest.mark.parametrize("line", ["FOO", "XYZZY bar", "", "\xe9HLO x"])
def test_unknown_command(greyd, connect, line):
    c = connect(greyd)
    assert c.cmd(line.encode("latin-1")) == R(replies.UNKNOWN_COMMAND)
    assert c.cmd("NOOP") == R(replies.OK)


@pytest.mark.parametrize("line", ["EXPN staff", "STARTTLS", "AUTH PLAIN"])
def test_unsupported_command(greyd, connect, line):
    c = connect(greyd)
    assert c.cmd(line) == R(replies.NOT_IMPLEMENTED)


def padded(prefix: str, octets: int) -> bytes:
    """A command line of exactly `octets` octets, CRLF included."""
    line = prefix.encode() + b" " + b"x" * (octets - len(prefix) - 3) + b"\r\n"
    assert len(line) == octets
    return line


@pytest.mark.parametrize("octets", [513, 2000, 200_000])
def test_command_line_too_long(greyd, connect, octets):
    c = connect(greyd)
    c.send(padded("NOOP", octets))
    assert c.reply() == R(replies.LINE_TOO_LONG)
    assert c.cmd("NOOP") == R(replies.OK)           # the session continues


def test_command_line_of_512_octets_is_accepted(greyd, connect):
    c = connect(greyd)
    c.send(padded("NOOP", 512))
    assert c.reply() == R(replies.OK)
    c.send(padded("RCPT", 513))                     # the MAIL allowance is MAIL's alone
    assert c.reply() == R(replies.LINE_TOO_LONG)


def mail_line(octets: int) -> bytes:
    """MAIL with SIZE= and BODY=, padded with spaces to exactly `octets` octets."""
    params = b"SIZE=1000 BODY=8BITMIME\r\n"
    head = f"MAIL FROM:<{SENDER}>".encode()
    line = head + b" " * (octets - len(head) - len(params)) + params
    assert len(line) == octets
    return line


def test_mail_with_parameters_up_to_the_allowance(start_greyd, upstream, connect):
    g = relaying(start_greyd, upstream.port)
    c = connect(g)
    c.send(mail_line(553))                           # 512 plus SIZE's and BODY's allowance
    assert c.reply() == R(replies.SENDER_OK)
    assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == RCPT_OK
    assert upstream.transactions[0].mail_options == ["SIZE=1000", "BODY=8BITMIME"]
    assert c.cmd("RSET") == R(replies.RESET)
    c.send(mail_line(554))
    assert c.reply() == R(replies.LINE_TOO_LONG)
    assert c.cmd("NOOP") == R(replies.OK)


@pytest.mark.parametrize("params", ["BODY=7BIT", f"SIZE={MAX_SIZE} BODY=8bitmime", "size=0"])
def test_mail_size_and_body_within_limits(greyd, connect, params):
    c = connect(greyd)
    assert c.cmd(f"MAIL FROM:<{SENDER}> {params}") == R(replies.SENDER_OK)


def test_mail_parameters_need_ehlo(greyd, connect):
    c = connect(greyd, ehlo=False)
    assert c.cmd("HELO client.example.net") == R(replies.helo(HOST))
    assert c.cmd(f"MAIL FROM:<{SENDER}> SIZE=100") == R(replies.UNKNOWN_PARAMETER)
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)


# -- size limits -------------------------------------------------------------------------------

def test_mail_size_over_limit(greyd, connect):
    c = connect(greyd)
    assert c.cmd(f"MAIL FROM:<{SENDER}> SIZE={MAX_SIZE + 1}") == R(replies.MESSAGE_TOO_BIG)
    assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == R(replies.NEED_MAIL)
    assert c.cmd(f"MAIL FROM:<{SENDER}> SIZE={MAX_SIZE}") == R(replies.SENDER_OK)


def body_of(octets: int) -> bytes:
    line = b"y" * 78 + b"\r\n"
    body = (b"Subject: size\r\n\r\n" + line * (octets // len(line) + 1))[:octets - 2] + b"\r\n"
    assert len(body) == octets
    return body


def test_message_over_limit_never_reaches_upstream(start_greyd, upstream, connect):
    g = relaying(start_greyd, upstream.port, server={"max_message_size": 4096})
    c = connect(g)
    open_transaction(c)
    assert send_data(c, body_of(4097)) == R(replies.MESSAGE_TOO_BIG)
    assert upstream.messages == []
    assert upstream.transactions[0].data_code is None
    # the connection goes on, and a message of exactly the limit is relayed
    open_transaction(c)
    assert send_data(c, body_of(4096)) == QUEUED
    [message] = upstream.wait_for(1)
    split_trace(message.data, body_of(4096))
    assert len(upstream.transactions) == 2


# -- policy replies ---------------------------------------------------------------------------

@pytest.mark.parametrize("recipient", [
    "carol@example.com", "carol@sub.example.org", "carol%example.com@localhost",
    "carol@[192.0.2.1]",
])
def test_recipient_domain_not_relayed(greyd, connect, upstream, recipient):
    c = connect(greyd)
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)
    assert c.cmd(f"RCPT TO:<{recipient}>") == R(replies.RELAY_DENIED)
    assert upstream.transactions == []


def test_greylisted_recipient_counts_down_then_passes(greyd, clock, upstream, connect):
    c = connect(greyd)
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)
    assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == R(replies.greylisted(300))
    assert replies.greylisted(300).text == "4.7.1 Greylisted, please try again in 300 seconds"
    clock.advance(100)
    assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == R(replies.greylisted(200))
    c2 = connect(greyd)                              # a new connection, the same triplet
    assert c2.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)
    assert c2.cmd(f"RCPT TO:<{RECIPIENT}>") == R(replies.greylisted(200))
    assert upstream.transactions == []               # nothing greylisted reached upstream
    clock.advance(201)
    assert c2.cmd(f"RCPT TO:<{RECIPIENT}>") == RCPT_OK
    body = b"Subject: retried\r\n\r\nhello\r\n"
    assert send_data(c2, body) == QUEUED
    [message] = upstream.wait_for(1)
    received, greylist = unfold(split_trace(message.data, body))
    assert_received(received, when=START + 301)
    assert greylist.startswith(b"X-Greylist: delayed 301 seconds by greyd")
    assert upstream.transactions[0].rcpts == [(RECIPIENT, 250)]


REJECTIONS = {
    "nobody@example.org": (550, "5.1.1 <nobody@example.org>: Recipient address rejected: "
                                "User unknown in local recipient table"),
    "busy@example.org": (450, "4.2.1 Mailbox busy, try again later"),
}


@pytest.mark.parametrize("recipient", [*REJECTIONS, RECIPIENT])
def test_upstream_reply_passed_through(start_greyd, connect, recipient):
    with Upstream(reject=REJECTIONS) as up:
        g = relaying(start_greyd, up.port)
        c = connect(g)
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)
        assert c.cmd(f"RCPT TO:<{recipient}>") == REJECTIONS.get(recipient, RCPT_OK)
        assert up.transactions[0].rcpts == [(recipient, REJECTIONS.get(recipient, RCPT_OK)[0])]
        if recipient in REJECTIONS:
            assert c.cmd("DATA") == R(replies.NEED_RCPT)


def test_upstream_unreachable_at_rcpt(start_greyd, connect):
    g = relaying(start_greyd, dead_port())
    c = connect(g)
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)
    assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == R(replies.UPSTREAM_AT_RCPT)
    assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == R(replies.UPSTREAM_AT_RCPT)
    assert c.cmd("DATA") == R(replies.NEED_RCPT)
    assert c.cmd("NOOP") == R(replies.OK)


def test_upstream_failing_during_data(start_greyd, connect):
    with DroppingServer() as dropping:
        g = relaying(start_greyd, dropping.port)
        c = connect(g)
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)
        assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == (250, "2.0.0 OK")
        assert send_data(c, b"Subject: lost?\r\n\r\nline\r\n") == R(replies.UPSTREAM_AT_DATA)
        assert c.cmd("NOOP") == R(replies.OK)


@pytest.mark.parametrize("recipient", ["postmaster", "PostMaster"])
def test_bare_postmaster_accepted_despite_greylisting(greyd, upstream, connect, recipient):
    c = connect(greyd)
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)
    assert c.cmd("RCPT TO:<postmaster@example.org>") == R(replies.greylisted(300))
    assert c.cmd(f"RCPT TO:<{recipient}>") == RCPT_OK
    body = b"Subject: abuse report\r\n\r\nhello\r\n"
    assert send_data(c, body) == QUEUED
    [message] = upstream.wait_for(1)
    assert message.rcpt_tos == [recipient]
    assert upstream.transactions[0].rcpts == [(recipient, 250)]


# -- RSET NOOP VRFY HELP QUIT -------------------------------------------------------------------

def test_rset_forgets_the_transaction(greyd, connect):
    c = connect(greyd)
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)
    assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == R(replies.greylisted(300))
    assert c.cmd("RSET") == R(replies.RESET)
    assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == R(replies.NEED_MAIL)
    assert c.cmd("DATA") == R(replies.NEED_MAIL)
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)   # not nested


def test_rset_resets_the_upstream_transaction(start_greyd, upstream, connect):
    g = relaying(start_greyd, upstream.port)
    c = connect(g)
    open_transaction(c, "first@example.org", sender="one@example.net")
    assert c.cmd("RSET") == R(replies.RESET)
    open_transaction(c, "second@example.org", sender="two@example.net")
    assert send_data(c, b"Subject: second\r\n\r\n2\r\n") == QUEUED
    [message] = upstream.wait_for(1)
    assert (message.mail_from, message.rcpt_tos) == ("two@example.net", ["second@example.org"])
    first, second = upstream.transactions
    assert first.rcpts == [("first@example.org", 250)] and first.data_code is None
    assert second.data_code == 250


@pytest.mark.parametrize("line,expected", [
    ("NOOP", replies.OK), ("NOOP anything at all", replies.OK),
    ("VRFY bob", replies.VRFY), ("VRFY", replies.SYNTAX),
    ("HELP", replies.HELP), ("HELP MAIL", replies.HELP),
    ("RSET", replies.RESET), ("RSET now", replies.NO_ARGUMENT),
])
def test_simple_commands(greyd, connect, line, expected):
    c = connect(greyd)
    assert c.cmd(line) == R(expected)
    assert c.cmd("NOOP") == R(replies.OK)


def test_quit_closes(greyd, connect):
    c = connect(greyd)
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)
    assert c.cmd("QUIT") == R(replies.closing(HOST))
    assert c.closed()


# -- timeouts and limits -----------------------------------------------------------------------

@pytest.mark.parametrize("pending", [b"", b"NOOP", f"MAIL FROM:<{SENDER}>\r\n".encode()],
                         ids=["idle", "half-a-command", "in-transaction"])
def test_idle_past_command_timeout(start_greyd, upstream, connect, pending):
    g = start_greyd(upstream.port, server={"command_timeout": 1, "data_timeout": 10})
    c = connect(g)
    c.send(pending)
    if pending.endswith(b"\r\n"):
        assert c.reply() == R(replies.SENDER_OK)
    started = time.monotonic()
    assert c.reply() == R(replies.TIMEOUT)
    assert 0.5 < time.monotonic() - started < 4
    assert c.closed()


def test_idle_mid_data_past_data_timeout(start_greyd, upstream, connect):
    g = relaying(start_greyd, upstream.port, server={"command_timeout": 10, "data_timeout": 1})
    c = connect(g)
    open_transaction(c)
    assert c.cmd("DATA") == R(replies.START_DATA)
    c.send(b"Subject: half a message\r\n\r\nand then noth")
    started = time.monotonic()
    assert c.reply() == R(replies.TIMEOUT)
    assert 0.5 < time.monotonic() - started < 4
    assert c.closed()
    assert g.daemon.admission.wait_idle(5)
    assert upstream.messages == []
    assert upstream.transactions[0].data_code is None


def test_client_leaving_mid_data_relays_nothing(start_greyd, upstream, connect):
    g = relaying(start_greyd, upstream.port)
    c = connect(g)
    open_transaction(c)
    assert c.cmd("DATA") == R(replies.START_DATA)
    c.send(b"Subject: half a message\r\n\r\nsome text\r\n")
    c.close()
    assert g.daemon.admission.wait_idle(5)          # the session has ended
    assert upstream.messages == []
    assert upstream.transactions[0].data_code is None


def test_too_many_errors(start_greyd, upstream, connect):
    g = start_greyd(upstream.port, server={"max_errors": 3})
    c = connect(g)
    assert c.cmd("FOO") == R(replies.UNKNOWN_COMMAND)
    assert c.cmd("NOOP") == R(replies.OK)            # not an error
    assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == R(replies.NEED_MAIL)
    assert c.cmd("BAR") == R(replies.TOO_MANY_ERRORS)
    assert c.closed()


def test_greylisting_is_not_a_client_error(start_greyd, upstream, connect):
    g = start_greyd(upstream.port, server={"max_errors": 3})
    c = connect(g)
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)
    for n in range(5):
        assert c.cmd(f"RCPT TO:<user{n}@example.org>") == R(replies.greylisted(300))
    assert c.cmd("NOOP") == R(replies.OK)


def test_too_many_recipients(start_greyd, upstream, connect):
    g = start_greyd(upstream.port, server={"max_recipients": 2})
    c = connect(g)
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)
    assert c.cmd("RCPT TO:<one@example.org>") == R(replies.greylisted(300))
    assert c.cmd("RCPT TO:<two@example.com>") == R(replies.RELAY_DENIED)
    assert c.cmd("RCPT TO:<three@example.org>") == R(replies.TOO_MANY_RECIPIENTS)
    assert c.cmd("RCPT TO:<postmaster>") == R(replies.TOO_MANY_RECIPIENTS)
    assert upstream.transactions == []
    assert c.cmd("RSET") == R(replies.RESET)         # the count is per transaction
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)
    assert c.cmd("RCPT TO:<three@example.org>") == R(replies.greylisted(300))


def test_shutdown_says_421(start_greyd, upstream, connect):
    g = start_greyd(upstream.port)
    c = connect(g)
    assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.SENDER_OK)
    stopper = threading.Thread(target=g.daemon.stop)
    stopper.start()
    try:
        assert c.reply() == R(replies.SHUTTING_DOWN)
        assert c.closed()
    finally:
        stopper.join(10)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", g.port), timeout=2).close()


# -- pipelining ----------------------------------------------------------------------------------

PIPELINE = [
    (f"MAIL FROM:<{SENDER}>", R(replies.SENDER_OK)),
    (f"RCPT TO:<{RECIPIENT}>", R(replies.greylisted(300))),
    ("RCPT TO:<carol@example.com>", R(replies.RELAY_DENIED)),
    ("RCPT TO:<postmaster>", RCPT_OK),
    ("RSET", R(replies.RESET)),
    ("NOOP", R(replies.OK)),
    ("MAIL FROM:<>", R(replies.SENDER_OK)),
    (f"RCPT TO:<{RECIPIENT}>", R(replies.greylisted(300))),
    ("RCPT TO:<postmaster>", RCPT_OK),
    ("DATA", R(replies.START_DATA)),
]


def test_pipelined_replies_in_order_and_as_sequential(greyd, upstream, connect):
    body = b"Subject: pipelined\r\n\r\nhello\r\n"
    c = connect(greyd)
    c.send(b"".join(line.encode() + b"\r\n" for line, _ in PIPELINE))
    pipelined = [c.reply() for _ in PIPELINE]
    c.send(body + b".\r\n")
    pipelined.append(c.reply())
    assert c.cmd("NOOP") == R(replies.OK)            # exactly one reply per command

    s = connect(greyd)
    sequential = [s.cmd(line) for line, _ in PIPELINE]
    s.send(body + b".\r\n")
    sequential.append(s.reply())

    expected = [reply for _, reply in PIPELINE] + [QUEUED]
    assert pipelined == expected
    assert sequential == expected
    first, second = upstream.wait_for(2)
    assert first.mail_from == second.mail_from == ""
    assert first.rcpt_tos == second.rcpt_tos == ["postmaster"]


# -- DATA ----------------------------------------------------------------------------------------

# (sent, what the upstream must get): none of these end the message early
SMUGGLING = {
    "lf-dot-lf": (b"one\n.\nMAIL FROM:<evil@example.com>\r\n",
                  b"one\r\n.\r\nMAIL FROM:<evil@example.com>\r\n"),
    "cr-dot-cr": (b"one\r.\rRCPT TO:<evil@example.com>\r\n",
                  b"one\r\n.\r\nRCPT TO:<evil@example.com>\r\n"),
    "crlf-dot-lf": (b"one\r\n.\nDATA\r\n", b"one\r\n.\r\nDATA\r\n"),
    "lf-dot-crlf": (b"one\n.\r\nQUIT\r\n", b"one\r\n.\r\nQUIT\r\n"),
    "cr-dot-crlf": (b"one\r.\r\nNOOP\r\n", b"one\r\n.\r\nNOOP\r\n"),
    # the line ".\rRSET" starts with a dot and has more: the dot is transparency (RFC 5321 4.5.2)
    "crlf-dot-cr": (b"one\r\n.\rRSET\r\n", b"one\r\n\r\nRSET\r\n"),
}
HEAD = b"From: alice@example.net\r\nSubject: smuggling\r\n\r\n"


@pytest.mark.parametrize("sent,relayed", SMUGGLING.values(), ids=SMUGGLING.keys())
def test_data_ends_only_at_crlf_dot_crlf(start_greyd, upstream, connect, sent, relayed):
    g = relaying(start_greyd, upstream.port)
    c = connect(g)
    open_transaction(c)
    assert send_data(c, HEAD + sent + b"last\r\n") == QUEUED
    assert c.cmd("NOOP") == R(replies.OK)            # nothing after it was read as a command
    [message] = upstream.wait_for(1)
    [received] = unfold(split_trace(message.data, HEAD + relayed + b"last\r\n"))
    assert_received(received)
    assert len(upstream.transactions) == 1
    assert upstream.messages == [message]


@pytest.mark.parametrize("sent", [sent for sent, _ in SMUGGLING.values()], ids=SMUGGLING.keys())
def test_bare_newlines_rejected(start_greyd, upstream, connect, sent):
    g = relaying(start_greyd, upstream.port, server={"bare_newlines": "reject"})
    c = connect(g)
    open_transaction(c)
    assert send_data(c, HEAD + sent + b"last\r\n") == R(replies.BARE_NEWLINE)
    assert c.cmd("NOOP") == R(replies.OK)
    assert upstream.messages == []
    assert upstream.transactions[0].data_code is None
    # a clean message on the same connection still goes through
    open_transaction(c)
    assert send_data(c, HEAD + b"clean\r\n") == QUEUED
    assert len(upstream.wait_for(1)) == 1


def test_lone_cr_and_lf_normalized(start_greyd, upstream, connect):
    g = relaying(start_greyd, upstream.port)
    c = connect(g)
    open_transaction(c)
    sent = HEAD + b"a\rb\nc\r\n\n\r\rd\r\n"
    assert send_data(c, sent) == QUEUED
    [message] = upstream.wait_for(1)
    split_trace(message.data, HEAD + b"a\r\nb\r\nc\r\n\r\n\r\n\r\nd\r\n")


def test_dot_stuffing_undone_and_redone(start_greyd, upstream, connect):
    g = relaying(start_greyd, upstream.port)
    c = connect(g)
    open_transaction(c)
    sent = HEAD + b"..x\r\n..\r\n...\r\n.y.\r\nz.\r\n"
    assert send_data(c, sent) == QUEUED
    [message] = upstream.wait_for(1)
    split_trace(message.data, HEAD + b".x\r\n.\r\n..\r\ny.\r\nz.\r\n")


def test_eight_bit_message_arrives_byte_exact(start_greyd, upstream, connect):
    g = relaying(start_greyd, upstream.port)
    c = connect(g)
    assert c.cmd(f"MAIL FROM:<{SENDER}> BODY=8BITMIME") == R(replies.SENDER_OK)
    assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == RCPT_OK
    high = bytes(range(0x80, 0x100))
    body = (HEAD + "caf\u00e9 \u00fcber \u2603\r\n".encode() + high[:64] + b"\r\n"
            + high[64:] + b"\r\n\tindented \x7f\r\n")
    assert send_data(c, body) == QUEUED
    [message] = upstream.wait_for(1)
    split_trace(message.data, body)
    assert "BODY=8BITMIME" in message.mail_options


def test_received_header_names_client_and_greyd(start_greyd, upstream, connect):
    g = relaying(start_greyd, upstream.port)
    c = connect(g)
    open_transaction(c)
    body = HEAD + b"hello\r\n"
    assert send_data(c, body) == QUEUED
    [message] = upstream.wait_for(1)
    assert message.data.startswith(b"Received: ")
    [received] = unfold(split_trace(message.data, body))
    assert_received(received)
    assert (message.mail_from, message.rcpt_tos) == (SENDER, [RECIPIENT])


def test_second_transaction_on_the_same_connection(start_greyd, upstream, connect):
    g = relaying(start_greyd, upstream.port)
    c = connect(g)
    open_transaction(c, "one@example.org", "two@localhost")
    assert send_data(c, HEAD + b"first\r\n") == QUEUED
    open_transaction(c, "three@example.org", sender="")
    assert send_data(c, HEAD + b"second\r\n") == QUEUED
    first, second = upstream.wait_for(2)
    assert (first.mail_from, first.rcpt_tos) == (SENDER, ["one@example.org", "two@localhost"])
    assert (second.mail_from, second.rcpt_tos) == ("", ["three@example.org"])
    split_trace(first.data, HEAD + b"first\r\n")
    split_trace(second.data, HEAD + b"second\r\n")
    assert upstream.connections == 1                 # one upstream connection per session
    assert c.cmd("QUIT") == R(replies.closing(HOST))


# -- enhanced status codes -----------------------------------------------------------------------

COMPOSED = {name: value for name, value in vars(replies).items()
            if isinstance(value, Reply) and value not in (replies.START_DATA, replies.LATER)}
COMPOSED.update({"greylisted(287)": replies.greylisted(287), "closing": replies.closing(HOST)})


@pytest.mark.parametrize("reply", COMPOSED.values(), ids=COMPOSED.keys())
def test_every_composed_reply_has_an_enhanced_status_code(reply):
    assert reply.lines
    for line in reply.lines:
        assert ENHANCED.match(line), line
        assert line[0] == str(reply.code)[0]         # the class agrees with the code


# -- bugs found ------------------------------------------------------------------------------------

def test_data_end_seen_after_a_line_split_between_cr_and_lf(start_greyd, upstream, connect):
    g = relaying(start_greyd, upstream.port, server={"data_timeout": 2})
    c = connect(g)
    open_transaction(c)
    assert c.cmd("DATA") == R(replies.START_DATA)
    c.send(b"a" * 65535 + b"\r\n" + b".\r\n")        # CR is byte 65536 of the line
    code, text = c.reply(check=False)                # the upstream's own answer, whatever it is
    assert (code, text) != R(replies.TIMEOUT)
    assert code // 100 in (2, 5)
    assert c.cmd("NOOP") == R(replies.OK)


def test_client_leaving_in_an_over_long_line_frees_its_session(tmp_path, port):
    # In a child process: the spinning thread must not stay in the test process.
    config = config_for(tmp_path, dead_port(), port, server={"max_connections_per_client": 1})
    with Foreground(config):
        wait_listening(port)
        c = greeted(port, timeout=5)
        assert c is not None, "greyd greeted no connection"
        with c:
            assert c.greeting == R(replies.greeting(HOST, "greyd"))
            assert c.cmd("NOOP") == R(replies.OK)
            c.send(b"NOOP " + b"x" * 1000)           # over 512 octets, no line end, then leave
        c = greeted(port, timeout=3)                # the only slot for 127.0.0.1 is free again
        assert c is not None, "the session's slot was never freed"
        with c:
            assert c.greeting == R(replies.greeting(HOST, "greyd"))

"""greyd.relay against a real aiosmtpd upstream and raw-socket faults; no mocks."""

import shutil
import time

import pytest

from faultyupstream import Fault, FaultyUpstream
from greyd import replies
from greyd.relay import Relay, xtext
from greyd.replies import Reply
from greyd.upstream import Capabilities
from upstream import DroppingServer, SilentServer, Upstream, dead_port

pytestmark = pytest.mark.timeout(30)

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@localhost\r\n"
    b"Subject: relay test\r\n"
    b"\r\n"
    b".a line that starts with a dot\r\n"
    b".\r\n"
    b"..two dots\r\n"
    b"8-bit: caf\xc3\xa9 \xff\xfe\r\n"
    b"last line\r\n"
)


def make_relay(port, *, host="127.0.0.1", timeout=5, **overrides):
    options = dict(
        host=host, port=port, timeout=timeout, local_hostname="greyd.test",
        client_addr="127.0.0.9", client_name="mail.example.org",
        client_helo="helo.example.org",
    )
    options.update(overrides)
    return Relay(**options)


def send(relay, sender="alice@example.org", recipients=("bob@localhost",), message=MESSAGE):
    """One whole transaction; every reply, in order."""
    got = [relay.mail(sender)]
    got += [relay.rcpt(recipient) for recipient in recipients]
    got.append(relay.data(message))
    return got


@pytest.fixture
def relay(upstream):  # `upstream` (a plain Upstream) comes from conftest.py
    relay = make_relay(upstream.port)
    yield relay
    relay.quit()


def test_message_arrives_byte_for_byte(upstream, relay):
    assert relay.mail("alice@example.org", body="8BITMIME") == Reply(250, ("2.1.0 OK",))
    assert relay.in_transaction
    assert relay.rcpt("bob@localhost") == Reply(250, ("2.1.5 OK",))
    assert relay.data(MESSAGE) == Reply(250, ("2.0.0 OK queued",))
    assert not relay.in_transaction
    [message] = upstream.wait_for(1)
    assert message.data == MESSAGE
    assert message.mail_from == "alice@example.org"
    assert message.rcpt_tos == ["bob@localhost"]
    assert "BODY=8BITMIME" in message.mail_options
    assert message.helo == "greyd.test"


def test_null_sender(upstream, relay):
    assert [r.code for r in send(relay, sender="")] == [250, 250, 250]
    assert upstream.wait_for(1)[0].mail_from == ""


def test_rejected_recipient_gets_upstream_reply_and_no_message():
    with Upstream(reject={"bad@localhost": (550, "5.1.1 No such user")}) as upstream:
        relay = make_relay(upstream.port)
        assert relay.mail("alice@example.org").code == 250
        assert relay.rcpt("bad@localhost") == Reply(550, ("5.1.1 No such user",))
        assert relay.rcpt("good@localhost") == Reply(250, ("2.1.5 OK",))
        assert relay.data(MESSAGE).code == 250
        relay.quit()
        [message] = upstream.wait_for(1)
        assert message.rcpt_tos == ["good@localhost"]
        [transaction] = upstream.transactions
        assert transaction.rcpts == [("bad@localhost", 550), ("good@localhost", 250)]


def test_refused_mail_is_passed_through(upstream, relay):
    reply = relay.mail("alice@example.org", size=10**12)
    assert reply.code == 552
    assert not relay.in_transaction
    assert [r.code for r in send(relay)] == [250, 250, 250]
    assert upstream.connections == 1


@pytest.mark.parametrize("client_addr, name, helo, expected", [
    ("127.0.0.9", "mail.example.org", "helo.example.org",
     {"ADDR": "127.0.0.9", "NAME": "mail.example.org", "HELO": "helo.example.org"}),
    ("::1", None, None, {"ADDR": "IPV6:::1", "NAME": "[UNAVAILABLE]", "HELO": "[UNAVAILABLE]"}),
    ("::ffff:127.0.0.9", "a+b=c.example", "x y",
     {"ADDR": "127.0.0.9", "NAME": "a+b=c.example", "HELO": "x y"}),
])
def test_xclient_tells_upstream_the_real_client(client_addr, name, helo, expected):
    with Upstream(xclient=True) as upstream:
        relay = make_relay(upstream.port, client_addr=client_addr,
                           client_name=name, client_helo=helo)
        assert [r.code for r in send(relay)] == [250, 250, 250]
        relay.quit()
        [message] = upstream.wait_for(1)
        assert message.xclient == expected
        # Postfix takes the EHLO after XCLIENT as the client's HELO name.
        assert message.helo == (helo if helo and " " not in helo else "greyd.test")
        assert message.data == MESSAGE


def test_xclient_never_sends_nothing():
    with Upstream(xclient=True) as upstream:
        relay = make_relay(upstream.port, xclient="never")
        assert [r.code for r in send(relay)] == [250, 250, 250]
        relay.quit()
        [message] = upstream.wait_for(1)
        assert message.xclient == {}
        assert message.helo == "greyd.test"


def test_xclient_not_offered_is_not_sent(upstream, relay):
    assert [r.code for r in send(relay)] == [250, 250, 250]
    assert upstream.wait_for(1)[0].xclient == {}


def test_xtext_encoding():
    assert xtext("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
    assert xtext("IPV6:::1") == "IPV6:::1"


def test_connection_is_reused_for_the_next_transaction(upstream, relay):
    assert [r.code for r in send(relay, recipients=["one@localhost"])] == [250, 250, 250]
    assert [r.code for r in send(relay, recipients=["two@localhost"])] == [250, 250, 250]
    first, second = upstream.wait_for(2)
    assert (first.rcpt_tos, second.rcpt_tos) == (["one@localhost"], ["two@localhost"])
    assert upstream.connections == 1


def test_rset_then_new_transaction(upstream, relay):
    assert relay.mail("first@example.org").code == 250
    assert relay.rcpt("bob@localhost").code == 250
    relay.rset()
    assert not relay.in_transaction
    assert [r.code for r in send(relay, sender="second@example.org")] == [250, 250, 250]
    [message] = upstream.wait_for(1)
    assert message.mail_from == "second@example.org"
    assert [t.data_code for t in upstream.transactions] == [None, 250]
    assert upstream.connections == 1


@pytest.mark.parametrize("last_words", [None, "421 4.4.2 upstream.test Error: timeout exceeded"])
def test_dead_kept_connection_is_replaced_once(upstream, relay, last_words):
    assert [r.code for r in send(relay)] == [250, 250, 250]
    upstream.drop_connections(last_words)
    assert [r.code for r in send(relay)] == [250, 250, 250]
    assert len(upstream.wait_for(2)) == 2
    assert upstream.connections == 2


def test_quit_closes_and_next_mail_reconnects(upstream, relay):
    assert [r.code for r in send(relay)] == [250, 250, 250]
    relay.quit()
    relay.quit()
    assert [r.code for r in send(relay)] == [250, 250, 250]
    assert upstream.connections == 2


def test_unreachable_upstream():
    relay = make_relay(dead_port())
    assert relay.mail("alice@example.org") == replies.UPSTREAM_AT_RCPT
    assert not relay.in_transaction
    assert relay.rcpt("bob@localhost") == replies.UPSTREAM_AT_RCPT
    assert relay.data(MESSAGE) == replies.UPSTREAM_AT_DATA
    relay.quit()


def test_silent_upstream_times_out():
    with SilentServer() as silent:
        relay = make_relay(silent.port, timeout=1)
        started = time.monotonic()
        assert relay.mail("alice@example.org") == replies.UPSTREAM_AT_RCPT
        elapsed = time.monotonic() - started
        assert 0.9 <= elapsed < 3
        assert not relay.in_transaction
        relay.quit()


def test_upstream_hanging_up_during_data():
    with DroppingServer() as dropping:
        relay = make_relay(dropping.port)
        assert relay.mail("alice@example.org").code == 250
        assert relay.rcpt("bob@localhost").code == 250
        assert relay.data(MESSAGE) == replies.UPSTREAM_AT_DATA
        assert not relay.in_transaction
        relay.quit()


def test_upstream_hanging_up_mid_data_records_nothing():
    """The upstream answers DATA with 354, reads 40 octets of the message and hangs
    up: the client is told 451 4.4.2, and the upstream has no message, not even
    from a second try on a new connection (which this upstream would accept)."""
    cut = Fault("message", "drop", at=40, once=True)
    with FaultyUpstream({"t1": cut}) as faulty:
        relay = make_relay(faulty.port)
        assert relay.mail("t1@example.org").code == 250
        assert relay.rcpt("r1.bob@localhost").code == 250
        assert relay.data(MESSAGE) == replies.UPSTREAM_AT_DATA
        assert not relay.in_transaction
        assert faulty.partial == {"t1": MESSAGE[:40]}         # hung up mid-message
        assert faulty.messages == [] and faulty.connections == 1
        # The same transaction, tried again by the client, is delivered.
        again = send(relay, sender="t1@example.org", recipients=["r1.bob@localhost"])
        assert [r.code for r in again] == [250, 250, 250]
        relay.quit()
        [message] = faulty.messages
        assert (message.sender, message.recipients) == ("t1@example.org", ["r1.bob@localhost"])
        assert message.data == MESSAGE and faulty.connections == 2


def test_data_refusal_at_end_is_passed_through():
    with Upstream(data_reply=(554, "5.7.1 rejected")) as upstream:
        relay = make_relay(upstream.port)
        assert send(relay)[-1] == Reply(554, ("5.7.1 rejected",))
        assert not relay.in_transaction
        assert upstream.messages == []
        assert upstream.transactions[0].data_code == 554
        assert relay.mail("alice@example.org").code == 250
        relay.quit()


def test_data_command_refused_is_passed_through_and_connection_stays_usable():
    with Upstream(reject={"bad@localhost": (550, "5.1.1 No such user")}) as upstream:
        relay = make_relay(upstream.port)
        mail, rcpt, data = send(relay, recipients=["bad@localhost"])
        assert (mail.code, rcpt.code) == (250, 550)
        assert data.code == 503
        assert not relay.in_transaction
        assert [r.code for r in send(relay)] == [250, 250, 250]
        relay.quit()
        assert upstream.connections == 1
        assert len(upstream.wait_for(1)) == 1


@pytest.mark.parametrize("step", ["rcpt", "data"])
def test_upstream_421_is_never_passed_to_the_client(step):
    closing = (421, "4.3.2 Service shutting down")
    options = {"reject": {"bob@localhost": closing}} if step == "rcpt" else {"data_reply": closing}
    with Upstream(**options) as upstream:
        relay = make_relay(upstream.port)
        expected = replies.UPSTREAM_AT_RCPT if step == "rcpt" else replies.UPSTREAM_AT_DATA
        assert send(relay)[-2 if step == "rcpt" else -1] == expected
        assert not relay.in_transaction
        assert relay.mail("alice@example.org").code == 250  # on a new connection
        assert upstream.connections == 2
        assert upstream.messages == []
        relay.quit()


def test_size_only_when_advertised():
    with Upstream() as upstream:
        relay = make_relay(upstream.port)
        assert relay.mail("alice@example.org", size=1234, body="8BITMIME").code == 250
        relay.quit()
        assert upstream.transactions[0].mail_options == ["SIZE=1234", "BODY=8BITMIME"]
    with Upstream(hide={"SIZE", "8BITMIME"}) as upstream:
        relay = make_relay(upstream.port)
        assert relay.mail("alice@example.org", size=1234, body="8BITMIME").code == 250
        relay.quit()
        assert upstream.transactions[0].mail_options == []


def test_line_breaks_in_addresses_are_never_sent(upstream, relay):
    assert relay.mail("a@example.org>\r\nRCPT TO:<x@localhost") == replies.BAD_SENDER
    assert relay.mail("alice@example.org").code == 250
    assert relay.rcpt("bob@localhost>\r\nDATA") == replies.BAD_RECIPIENT
    assert relay.rcpt("bob@localhost").code == 250
    assert relay.data(MESSAGE).code == 250
    [transaction] = upstream.transactions
    assert transaction.rcpts == [("bob@localhost", 250)]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("starttls", [True, False])
def test_starttls_when_asked_and_offered(starttls):
    with Upstream(starttls=True, xclient=True) as upstream:
        relay = make_relay(upstream.port, starttls=starttls)
        assert [r.code for r in send(relay)] == [250, 250, 250]
        relay.quit()
        [message] = upstream.wait_for(1)
        assert message.tls is starttls
        assert message.xclient["ADDR"] == "127.0.0.9"
        assert message.data == MESSAGE


def test_ipv6_upstream():
    with Upstream(host="::1") as upstream:
        relay = make_relay(upstream.port, host="::1")
        assert [r.code for r in send(relay)] == [250, 250, 250]
        relay.quit()
        assert upstream.wait_for(1)[0].data == MESSAGE


def test_smtputf8_and_dsn_sent_only_to_an_upstream_that_offers_them():
    with Upstream(smtputf8=True, dsn=True) as full, Upstream() as plain:
        seen = Capabilities("127.0.0.1", full.port, timeout=5, local_hostname="greyd.test")
        relay = make_relay(full.port, capabilities=seen)
        assert relay.mail("j\u00fcrgen@b\u00fccher.example", smtputf8=True,
                          dsn=("RET=HDRS",)) == Reply(250, ("2.1.0 OK",))
        assert seen.offered() == ("SMTPUTF8", "DSN")          # told by the relay's own EHLO
        assert relay.rcpt("s\u00f8ren@b\u00fccher.example", ("NOTIFY=NEVER",)).code == 250
        assert relay.data(MESSAGE).code == 250
        relay.quit()
        [transaction] = full.transactions
        assert transaction.mail_from == "j\u00fcrgen@b\u00fccher.example"
        assert "SMTPUTF8" in transaction.mail_options
        assert (transaction.dsn, transaction.rcpt_dsn) == (["RET=HDRS"], [["NOTIFY=NEVER"]])

        lacking = make_relay(plain.port, capabilities=seen)
        assert lacking.mail("a@example.org", smtputf8=True) == replies.UPSTREAM_LACKS
        assert seen.offered() == ()                           # the change is noticed
        assert lacking.mail("a@example.org", dsn=("RET=FULL",)) == replies.UPSTREAM_LACKS
        assert lacking.mail("a@example.org").code == 250      # the connection still serves
        assert lacking.rcpt("bob@localhost", ("NOTIFY=NEVER",)) == replies.UPSTREAM_LACKS
        lacking.quit()
        assert [t.mail_from for t in plain.transactions] == ["a@example.org"]

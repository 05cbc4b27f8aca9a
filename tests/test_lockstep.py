"""Relaying in lockstep through greyd (SPEC §6): the client hears the upstream's own answers."""

from __future__ import annotations

import pytest

from greyd import replies
from upstream import DroppingServer, SilentServer, Upstream, dead_port

pytestmark = pytest.mark.timeout(30)

BODY = b"Subject: lockstep\r\n\r\nOne message.\r\n"


def test_one_recipient_refused_upstream_the_other_delivered(start_greyd):
    with Upstream(reject={"ghost@localhost": (550, "5.1.1 <ghost@localhost>: no such user")}) as up:
        g = start_greyd(up.port)
        g.whitelist()              # the test client: straight to the upstream
        client = g.smtp()
        assert client.mail("alice@example.net") == (250, replies.SENDER_OK.text.encode())
        assert client.rcpt("ghost@localhost") == (550, b"5.1.1 <ghost@localhost>: no such user")
        assert client.rcpt("bob@localhost") == (250, b"2.1.5 OK")
        assert client.data(BODY) == (250, b"2.0.0 OK queued")
        client.quit()
        [message] = up.wait_for(1)
        assert message.rcpt_tos == ["bob@localhost"]
        assert message.data.endswith(BODY)
        assert [r for r, _ in up.transactions[0].rcpts] == ["ghost@localhost", "bob@localhost"]


def test_the_upstream_learns_the_real_client_through_xclient(start_greyd):
    with Upstream(xclient=True) as up:
        g = start_greyd(up.port)
        g.whitelist()
        client = g.smtp()
        client.mail("alice@example.net")
        assert client.rcpt("bob@localhost")[0] == 250
        assert client.data(BODY)[0] == 250
        client.quit()
        [message] = up.wait_for(1)
        assert message.xclient["ADDR"] == "127.0.0.1"
        assert message.xclient["HELO"] == "client.example.net"
        assert message.xclient["NAME"] == "[UNAVAILABLE]"


def test_the_upstream_refusing_the_message_is_what_the_client_hears(start_greyd):
    with Upstream(data_reply=(554, "5.7.1 message content rejected")) as up:
        g = start_greyd(up.port)
        g.whitelist()
        client = g.smtp()
        client.mail("alice@example.net")
        client.rcpt("bob@localhost")
        assert client.data(BODY) == (554, b"5.7.1 message content rejected")
        client.quit()
        assert up.messages == []


def test_rset_and_quit_are_mirrored_upstream(greyd, upstream):
    greyd.whitelist()
    client = greyd.smtp()
    client.mail("alice@example.net")
    client.rcpt("bob@localhost")
    assert client.rset() == (250, replies.RESET.text.encode())
    client.mail("carol@example.net")
    client.rcpt("bob@localhost")
    assert client.data(BODY)[0] == 250
    client.quit()
    [message] = upstream.wait_for(1)
    assert message.mail_from == "carol@example.net"
    assert [t.mail_from for t in upstream.transactions] == ["alice@example.net", "carol@example.net"]
    assert upstream.transactions[0].data_code is None
    assert upstream.connections == 1


def test_unreachable_upstream_is_451_4_4_1_at_rcpt(start_greyd):
    g = start_greyd(dead_port())
    g.whitelist()
    client = g.smtp()
    client.mail("alice@example.net")
    assert client.rcpt("bob@localhost") == (451, replies.UPSTREAM_AT_RCPT.text.encode())
    assert client.docmd("DATA") == (503, replies.NEED_RCPT.text.encode())  # nothing accepted
    client.quit()


def test_a_silent_upstream_times_out_into_451_4_4_1(start_greyd):
    with SilentServer() as silent:
        g = start_greyd(silent.port, upstream={"timeout": 1})
        g.whitelist()
        client = g.smtp()
        client.mail("alice@example.net")
        assert client.rcpt("bob@localhost") == (451, replies.UPSTREAM_AT_RCPT.text.encode())
        client.quit()


def test_an_upstream_dropping_mid_data_is_451_4_4_2_never_250(start_greyd):
    with DroppingServer() as dropping:
        g = start_greyd(dropping.port)
        g.whitelist()
        client = g.smtp()
        client.mail("alice@example.net")
        assert client.rcpt("bob@localhost")[0] == 250
        assert client.data(BODY) == (451, replies.UPSTREAM_AT_DATA.text.encode())
        client.quit()

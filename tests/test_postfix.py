"""greyd between two real Postfix instances: a sending Postfix relays everything
to greyd from 127.0.0.2, greyd relays to an upstream Postfix that trusts its
XCLIENT (bench/postfix.py builds both as private instances on loopback).

Shown end to end, as an MX on the Internet meets greyd: greylisting and the
sender's retry, the real client reaching the upstream through XCLIENT, the
upstream's refusal of one recipient reaching the sender as that recipient's
own 5xx, and an upstream outage as a 4xx the sender retries until the mail
is delivered; a sender that requires TLS delivers through greyd's STARTTLS;
internationalized addresses (SMTPUTF8) and a DSN request reach the upstream
as the sender gave them. Skipped where Postfix is not installed or we are
not root.
"""

from __future__ import annotations

import time

import pytest
import trustme

from bench import postfix
from conftest import until
from upstream import free_port

pytestmark = [
    pytest.mark.skipif(bool(postfix.unavailable()), reason=postfix.unavailable() or "-"),
    pytest.mark.timeout(60),
]

CLIENT = "127.0.0.2"                      # the sending Postfix's address, not greyd's
SENDER = "alice@sender.test"
BOB, CAROL, DAVE = "bob@example.org", "carol@example.org", "dave@example.org"
UTF8_SENDER, UTF8_RCPT = "jörg@bücher.example", "josé@example.org"
DAVE_REFUSED = "550 5.1.1 dave has left the building"
GREYLISTED = r"said: 451 4\.7\.1 Greylisted"


def message(subject: str) -> str:
    return f"From: <{SENDER}>\nTo: <{BOB}>\nSubject: {subject}\n\nHello through greyd.\n"


@pytest.fixture
def clock():
    """Real time for greyd (conftest's start_greyd takes this): Postfix retries by it."""
    return time.time


@pytest.fixture
def started():
    """started(instance) -> the Postfix instance, started; each removed at teardown."""
    instances: list[postfix.Postfix] = []

    def start(instance: postfix.Postfix) -> postfix.Postfix:
        instances.append(instance)
        instance.start()
        return instance

    yield start
    for instance in reversed(instances):
        instance.remove()


def upstream_mta(**main: str) -> postfix.Postfix:
    """The upstream Postfix behind greyd: Maildirs for BOB, CAROL and UTF8_RCPT; DAVE refused."""
    return postfix.upstream(free_port(), mailboxes=[BOB, CAROL, UTF8_RCPT],
                            reject={DAVE: DAVE_REFUSED}, main=main)


def sending_mta(greyd_port: int, **kwargs) -> postfix.Postfix:
    """The sending Postfix: relays to greyd from CLIENT, retries every 1-2 s; bounces
    to SENDER land in its Maildir."""
    return postfix.sending(greyd_port, bind=CLIENT, mailboxes=[SENDER], **kwargs)


@pytest.fixture
def mta(started):
    return started(upstream_mta())


@pytest.fixture
def proxy(start_greyd, mta):
    """greyd in front of the upstream Postfix, greylisting for one second."""
    return start_greyd(mta.smtpd[1], greylist={"delay": "1s"})


@pytest.fixture
def sender(started, proxy):
    return started(sending_mta(proxy.port))


def test_delivered_after_greylisting_with_the_real_client(proxy, mta, sender):
    sender.sendmail(SENDER, [BOB], message("greylisted once"))

    deferred = sender.wait_log(rf"to=<{BOB}>.*status=deferred.*{GREYLISTED}")
    delivered = mta.wait_messages(BOB)
    sent = sender.wait_log(rf"to=<{BOB}>.*status=sent \(250 ")
    assert len(deferred) >= 1 and len(sent) == 1 and len(delivered) == 1
    assert "in reply to RCPT TO command" in deferred[0]
    # The upstream saw the sending Postfix, not greyd's 127.0.0.1, through XCLIENT.
    received = delivered[0].message.get_all("Received")[0]
    assert "by upstream.test" in received and f"[{CLIENT}]" in received, received
    assert mta.log_lines(rf"client=\S*\[{CLIENT}\]"), mta.tail()
    assert delivered[0].message["Subject"] == "greylisted once"


def test_upstream_refusal_reaches_the_sender_per_recipient(proxy, mta, sender):
    proxy.whitelist(value=f"{CLIENT}/32")     # straight to the upstream
    sender.sendmail(SENDER, [BOB, DAVE], message("two recipients"))

    bounced = sender.wait_log(rf"to=<{DAVE}>.*status=bounced")
    assert (f"said: 550 5.1.1 <{DAVE}>: Recipient address rejected: dave has left the "
            "building") in bounced[0], bounced[0]
    assert "in reply to RCPT TO command" in bounced[0]
    assert sender.wait_log(rf"to=<{BOB}>.*status=sent")
    assert len(mta.wait_messages(BOB)) == 1
    # The bounce reaches the envelope sender with the upstream's own words.
    report = sender.wait_messages(SENDER)[0].raw.decode(errors="replace")
    assert "dave has left the building" in report and f"<{DAVE}>" in report
    assert "Status: 5.1.1" in report


def test_upstream_outage_is_retried_until_delivered(proxy, mta, sender):
    proxy.whitelist(value=f"{CLIENT}/32")
    mta.stop()
    assert not mta.running()
    sender.sendmail(SENDER, [BOB], message("after the outage"))

    outage = sender.wait_log(rf"to=<{BOB}>.*status=deferred.*said: 451 4\.4\.1", count=2)
    assert "in reply to RCPT TO command" in outage[0]
    assert not sender.log_lines(r"status=(bounced|sent)")
    assert until(lambda: [entry["queue_name"] for entry in sender.queue()] == ["deferred"], 5)

    mta.start()
    delivered = mta.wait_messages(BOB)
    assert len(delivered) == 1 and delivered[0].message["Subject"] == "after the outage"
    assert sender.wait_log(rf"to=<{BOB}>.*status=sent")
    assert until(lambda: sender.queue() == [], 10), sender.queue()


# -- what an MX offers today (issue 14) ----------------------------------------------------

@pytest.fixture
def certificate(tmp_path) -> tuple[dict[str, str], bytes]:
    """greyd's [tls] settings (a trustme certificate for its hostname), and the CA's PEM."""
    ca = trustme.CA()
    issued = ca.issue_cert("mx.greyd.test")
    cert, key = tmp_path / "greyd-cert.pem", tmp_path / "greyd-key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return {"cert": str(cert), "key": str(key)}, ca.cert_pem.bytes()


def test_tls_required_by_the_sender_after_greylisting(start_greyd, started, mta, certificate,
                                                      logs):
    tls, ca = certificate
    proxy = start_greyd(mta.smtpd[1], greylist={"delay": "1s"}, tls=tls)
    sender = started(sending_mta(proxy.port, files={"ca.pem": ca}, main={
        "smtp_tls_security_level": "encrypt", "smtp_tls_CAfile": "$config_directory/ca.pem"}))
    sender.sendmail(SENDER, [BOB], message("over TLS"))

    deferred = sender.wait_log(rf"to=<{BOB}>.*status=deferred.*{GREYLISTED}")
    delivered = mta.wait_messages(BOB)
    sent = sender.wait_log(rf"to=<{BOB}>.*status=sent \(250 ")
    assert len(deferred) >= 1 and len(sent) == 1 and len(delivered) == 1
    # Every session was encrypted, with greyd's certificate (it chains to our CA).
    sessions = sender.log_lines(rf"Trusted TLS connection established to "
                                rf"127\.0\.0\.1\[127\.0\.0\.1\]:{proxy.port}: TLSv1\.[23] ")
    assert len(sessions) >= 2, sender.tail()
    assert not sender.log_lines("TLS is required, but")
    # greyd saw as many sessions, each under TLS.
    ends = until(lambda: len(logs.matching(rf"^session end .*client={CLIENT} ")) == len(sessions)
                 and logs.matching(rf"^session end .*client={CLIENT} "), 5)
    assert ends and all(" tls=TLSv1." in end for end in ends), logs.matching("^session end")
    received = delivered[0].message.get_all("Received")
    assert "by upstream.test" in received[0] and f"[{CLIENT}]" in received[0], received[0]
    assert "by mx.greyd.test" in received[1] and "with ESMTPS" in received[1], received[1]
    assert mta.log_lines(rf"client=\S*\[{CLIENT}\]"), mta.tail()


def test_smtputf8_addresses_reach_the_upstream_intact(start_greyd, started):
    mta = started(upstream_mta(debug_peer_list="127.0.0.0/8"))
    proxy = start_greyd(mta.smtpd[1], greylist={"delay": "1s"})
    sender = started(sending_mta(proxy.port, main={"smtputf8_enable": "yes"}))
    body = (f"From: <{UTF8_SENDER}>\nTo: <{UTF8_RCPT}>\nSubject: Grüße\n"
            "Content-Type: text/plain; charset=utf-8\n\nHallo Zoë.\n")
    sender.sendmail(UTF8_SENDER, [UTF8_RCPT], body.encode())

    assert sender.wait_log(rf"to=<{UTF8_RCPT}>.*status=deferred.*{GREYLISTED}")
    delivered = mta.wait_messages(UTF8_RCPT)
    assert sender.wait_log(rf"to=<{UTF8_RCPT}>.*status=sent \(250 ")
    got = delivered[0].message
    assert got["Return-Path"] == f"<{UTF8_SENDER}>"
    assert got["Delivered-To"] == UTF8_RCPT
    assert "with UTF8SMTP" in got.get_all("Received")[0]
    assert mta.log_lines(rf"< \S+\[{CLIENT}\]: MAIL FROM:<{UTF8_SENDER}> .*SMTPUTF8"), mta.tail()
    assert mta.log_lines(rf"< \S+\[{CLIENT}\]: RCPT TO:<{UTF8_RCPT}>")


def test_dsn_request_reaches_the_upstream_unchanged(start_greyd, started):
    # Both Postfixes log every SMTP command (debug_peer_list): what the sender
    # sent to greyd and what the upstream got from greyd, side by side.
    mta = started(upstream_mta(debug_peer_list="127.0.0.0/8"))
    proxy = start_greyd(mta.smtpd[1], greylist={"delay": "1s"})
    proxy.whitelist(value=f"{CLIENT}/32")
    sender = started(sending_mta(proxy.port, main={"debug_peer_list": "127.0.0.1"}))
    # CAROL, a mailbox at the upstream, sends: the upstream's own report comes to her.
    sender.sendmail(CAROL, [BOB], message("with a DSN request"), "-N", "success,delay")

    assert sender.wait_log(rf"to=<{BOB}>.*status=sent \(250 ")
    sent = sender.log_lines(rf"> 127\.0\.0\.1\[127\.0\.0\.1\]:{proxy.port}: RCPT TO:<{BOB}> ")
    received = mta.log_lines(rf"< \S+\[{CLIENT}\]: RCPT TO:<{BOB}> ")
    assert len(sent) == 1 and len(received) == 1, (sender.tail(), mta.tail())
    parameters = sent[0].partition(f"RCPT TO:<{BOB}> ")[2]
    assert sorted(parameters.split()) == ["NOTIFY=SUCCESS,DELAY", f"ORCPT=rfc822;{BOB}"]
    assert received[0].partition(f"RCPT TO:<{BOB}> ")[2] == parameters
    # The upstream acted on NOTIFY=SUCCESS: a success report to the sender.
    assert mta.wait_log(r"sender delivery status notification")
    report = mta.wait_messages(CAROL)[0].raw.decode(errors="replace")
    assert "Successful Mail Delivery Report" in report
    assert f"Original-Recipient: rfc822;{BOB}" in report and "Action: delivered" in report

"""Inbound STARTTLS (RFC 3207): the [tls] table, the handshake, what a session
knows of it, and what happens when it goes wrong. Certificates from trustme;
clients are Python's ssl over real loopback sockets."""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import ssl

import pytest

from certs import HOST, Certs
from conftest import until
from daemon import config_for, greyd as run_greyd
from greyd import config as configuration, replies, tls
from smtpclient import R, Raw
from upstream import Upstream


@pytest.fixture
def certs(tmp_path) -> Certs:
    (tmp_path / "tls").mkdir()
    return Certs(tmp_path / "tls")


@pytest.fixture
def tls_greyd(start_greyd, upstream, certs):
    """tls_greyd(**{key: value} for [tls]) -> Greyd offering STARTTLS, 127.0.0.1 whitelisted."""
    def start(**settings):
        cert, key = certs.issue()
        g = start_greyd(upstream.port, tls={"cert": str(cert), "key": str(key), **settings})
        g.whitelist()
        return g
    return start


def secured(g, certs, **client_options) -> Raw:
    """A client past EHLO, STARTTLS and the handshake (not yet a second EHLO)."""
    c = g.raw()
    assert c.cmd("EHLO client.example.net")[0] == 250
    assert c.starttls(certs.client(**client_options)) == R(replies.READY_TO_START_TLS)
    return c


# -- offered, refused, and the session after the handshake ---------------------------


def test_starttls_is_offered_only_with_a_certificate_and_only_before_tls(
        greyd, tls_greyd, certs):
    plain = greyd.raw()
    code, text = plain.cmd("EHLO client.example.net")
    assert code == 250 and "STARTTLS" not in text.split("\n")
    assert plain.cmd("STARTTLS") == R(replies.NOT_IMPLEMENTED)

    c = tls_greyd().raw()
    code, text = c.cmd("EHLO client.example.net")
    assert "STARTTLS" in text.split("\n")
    assert c.starttls(certs.client()) == (220, "2.0.0 Ready to start TLS")
    code, text = c.cmd("EHLO client.example.net")
    assert code == 250 and "STARTTLS" not in text.split("\n")
    assert c.cmd("STARTTLS") == R(replies.TLS_ALREADY_ACTIVE)


def test_after_the_handshake_the_session_starts_over(tls_greyd, certs, upstream, logs):
    g = tls_greyd()
    c = secured(g, certs)
    assert c.cmd("MAIL FROM:<alice@example.net>") == R(replies.NEED_HELO)   # HELO forgotten
    assert c.cmd("EHLO client.example.net")[0] == 250
    assert c.cmd("MAIL FROM:<alice@example.net>") == R(replies.SENDER_OK)
    assert c.cmd("RCPT TO:<bob@example.org>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    assert c.cmd(b"Subject: over TLS\r\n\r\nhello\r\n.")[0] == 250
    assert c.cmd("QUIT")[0] == 221
    received = upstream.wait_for(1)[0].data.decode()
    protocol, cipher = c.sock.version(), c.sock.cipher()[0]
    assert f"(using {protocol} with cipher {cipher} (" in received
    assert "with ESMTPS id" in received
    end = logs.wait_for(r"^session end ")[0]
    assert f" tls={protocol} cipher={cipher} " in end


def test_plaintext_sessions_say_so(greyd, upstream, logs):
    greyd.whitelist()
    c = greyd.raw()
    c.cmd("EHLO client.example.net")
    c.cmd("MAIL FROM:<alice@example.net>")
    c.cmd("RCPT TO:<bob@example.org>")
    c.cmd("DATA")
    assert c.cmd(b"hello\r\n.")[0] == 250
    c.cmd("QUIT")
    received = upstream.wait_for(1)[0].data.decode()
    assert "with ESMTP id" in received and "(using " not in received
    assert " tls=none " in logs.wait_for(r"^session end ")[0]


def test_pipelined_plaintext_after_starttls_is_never_executed(tls_greyd, certs, logs):
    """CVE-2011-0411: what follows STARTTLS in the same packet is thrown away."""
    g = tls_greyd()
    c = g.raw()
    c.cmd("EHLO client.example.net")
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@example.net>\r\n")
    assert c.reply() == R(replies.READY_TO_START_TLS)
    c.file.close()
    c.sock = certs.client().wrap_socket(c.sock, server_hostname=HOST)
    c.file = c.sock.makefile("rb")
    assert c.cmd("EHLO client.example.net")[0] == 250
    # Had the injected MAIL run, this RCPT would find a transaction, and MAIL be nested.
    assert c.cmd("RCPT TO:<bob@example.org>") == R(replies.NEED_MAIL)
    assert c.cmd("MAIL FROM:<alice@example.net>") == R(replies.SENDER_OK)
    c.cmd("QUIT")
    assert not logs.matching("injected")


def test_starttls_with_an_argument_or_inside_a_transaction_is_refused(tls_greyd):
    c = tls_greyd().raw()
    c.cmd("EHLO client.example.net")
    assert c.cmd("STARTTLS now") == R(replies.NO_ARGUMENT)
    c.cmd("MAIL FROM:<alice@example.net>")
    assert c.cmd("STARTTLS") == R(replies.TLS_IN_TRANSACTION)
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("STARTTLS")[0] == 220            # and once the transaction is gone


def test_require_wants_starttls_before_mail_except_from_relay_clients(
        start_greyd, upstream, certs):
    cert, key = certs.issue()
    g = start_greyd(upstream.port, tls={"cert": str(cert), "key": str(key), "require": True},
                    relay={"clients": ["127.0.0.2/32"]})
    c = g.raw()
    c.cmd("EHLO client.example.net")
    assert c.cmd("MAIL FROM:<alice@example.net>") == (530, "5.7.0 Must issue a STARTTLS command first")
    assert c.starttls(certs.client())[0] == 220
    c.cmd("EHLO client.example.net")
    assert c.cmd("MAIL FROM:<alice@example.net>") == R(replies.SENDER_OK)
    trusted = g.raw(source="127.0.0.2")
    trusted.cmd("EHLO client.example.net")
    assert trusted.cmd("MAIL FROM:<alice@example.net>") == R(replies.SENDER_OK)


def test_tls_1_2_can_be_refused_and_compression_and_renegotiation_are_off(tls_greyd, certs):
    g = tls_greyd(min_version="TLSv1.3")
    options = g.ctx.tls.context.options
    assert options & ssl.OP_NO_COMPRESSION and options & ssl.OP_NO_RENEGOTIATION
    c = g.raw()
    c.cmd("EHLO client.example.net")
    with pytest.raises(ssl.SSLError, match="ALERT_PROTOCOL_VERSION"):   # told why, by an alert
        c.starttls(certs.client(maximum_version=ssl.TLSVersion.TLSv1_2))
    c = secured(g, certs)
    assert c.sock.version() == "TLSv1.3"


# -- handshakes that fail --------------------------------------------------------------


@pytest.mark.parametrize("what", ["garbage", "plaintext", "silence", "hang-up"])
def test_a_failed_handshake_costs_one_line_and_the_connection(tls_greyd, certs, logs, what):
    g = tls_greyd(handshake_timeout="1s")
    c = g.raw()
    c.cmd("EHLO client.example.net")
    assert c.cmd("STARTTLS")[0] == 220
    if what == "garbage":
        c.send(os.urandom(300))
    elif what == "plaintext":
        c.send(b"MAIL FROM:<alice@example.net>\r\n")
    elif what == "hang-up":
        c.sock.shutdown(socket.SHUT_WR)
    assert c.closed()
    line = logs.wait_for(r"^session end ")
    assert len(line) == 1 and " end=tls-failed tls=none error=" in line[0]
    assert len(logs.messages) == len(set(logs.messages))
    if what == "silence":
        assert "error=timeout" in line[0]
    assert until(lambda: not g.daemon.admission.sockets, 5)   # its slot is free
    assert secured(g, certs).cmd("NOOP")[0] == 250              # and the daemon serves


# -- the certificate: start, check, reload, expiry --------------------------------------


def test_start_refuses_an_unreadable_or_mismatched_pair_in_one_line(tmp_path, certs, upstream,
                                                                    port):
    cert, key = certs.issue()
    _, other_key = certs.issue()
    cases = {
        "tls.cert: cannot read": {"cert": str(tmp_path / "missing.pem"), "key": str(key)},
        "tls.key: cannot read": {"cert": str(cert), "key": str(tmp_path / "missing.pem")},
        "tls.key: " + str(other_key) + ": does not match": {"cert": str(cert),
                                                             "key": str(other_key)},
        "tls.cert: " + str(key) + ": no PEM certificate": {"cert": str(key), "key": str(key)},
        "config: tls.key: must be set with tls.cert": {"cert": str(cert)},
    }
    for expected, table in cases.items():
        path = config_for(tmp_path, upstream.port, port, tls=table)
        for command in (["start"], ["check"]):
            run = run_greyd(*command, config=path)
            assert run.returncode == 1, (command, run.stdout, run.stderr)
            assert run.stderr.startswith(f"greyd: {expected}"), run.stderr
            assert len(run.stderr.splitlines()) == 1 and "Traceback" not in run.stderr


def test_check_prints_the_certificate(tmp_path, certs, upstream, port):
    cert, key = certs.issue("mx.example.org", days=90)
    run = run_greyd("check", config=config_for(tmp_path, upstream.port, port,
                                                tls={"cert": str(cert), "key": str(key)}))
    assert run.returncode == 0, run.stderr
    expires = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=90))
    assert "# tls names:   mx.example.org\n" in run.stdout
    assert f"# tls expires: {expires:%Y-%m-%d}" in run.stdout
    assert "# tls subject: " in run.stdout


def _serial(g, certs) -> int:
    c = secured(g, certs)
    serial = int(c.sock.getpeercert()["serialNumber"], 16)
    c.cmd("QUIT")
    return serial


def test_reload_reads_a_renewed_certificate_and_keeps_the_old_when_the_new_is_bad(
        start_greyd, upstream, certs, tmp_path, logs):
    cert, key = certs.issue()
    g = start_greyd(upstream.port, tls={"cert": str(cert), "key": str(key)})
    first = _serial(g, certs)
    open_session = secured(g, certs)
    renewed_cert, renewed_key = certs.issue()
    cert.write_bytes(renewed_cert.read_bytes())           # as certbot's hook leaves it
    key.write_bytes(renewed_key.read_bytes())
    g.daemon.reconfigure(configuration.load(g.config.source))
    second = _serial(g, certs)
    assert second != first
    assert open_session.cmd("EHLO client.example.net")[0] == 250    # keeps its own
    assert int(open_session.sock.getpeercert()["serialNumber"], 16) == first

    key.write_text("not a key\n")                          # a bad renewal
    g.daemon.reconfigure(configuration.load(g.config.source))
    assert logs.wait_for(r"^reload: keeping the running certificate .*tls\.key")
    assert _serial(g, certs) == second


def test_a_certificate_near_its_end_is_warned_of(start_greyd, upstream, certs, logs):
    cert, key = certs.issue(days=5)
    start_greyd(upstream.port, tls={"cert": str(cert), "key": str(key)})
    warning = logs.wait_for(r"^certificate expires soon ")[0]
    assert f"cert={cert}" in warning
    fresh_cert, fresh_key = certs.issue(days=60)
    start_greyd(upstream.port, tls={"cert": str(fresh_cert), "key": str(fresh_key)})
    assert not logs.matching(f"cert={fresh_cert}")


def test_a_detached_daemon_serves_starttls_and_greyd_reload_renews_it(tmp_path, certs,
                                                                      upstream, port):
    cert, key = certs.issue()
    path = config_for(tmp_path, upstream.port, port, tls={"cert": str(cert), "key": str(key)})
    assert run_greyd("start", config=path).returncode == 0

    def serial() -> int:
        c = Raw(port)
        c.cmd("EHLO client.example.net")
        assert c.starttls(certs.client())[0] == 220
        assert c.cmd("EHLO client.example.net")[0] == 250
        number = int(c.sock.getpeercert()["serialNumber"], 16)
        c.cmd("QUIT")
        return number

    try:
        first = serial()
        good_key = key.read_bytes()
        key.write_text("not a key\n")                 # a renewal gone wrong: said, not sent
        run = run_greyd("reload", config=path)
        assert run.returncode == 1 and run.stderr.startswith(f"greyd: tls.key: {key}: ")
        assert serial() == first
        key.write_bytes(good_key)
        renewed_cert, renewed_key = certs.issue()
        cert.write_bytes(renewed_cert.read_bytes())
        key.write_bytes(renewed_key.read_bytes())
        assert run_greyd("reload", config=path).returncode == 0
        assert until(lambda: serial() != first, 5)
    finally:
        assert run_greyd("stop", config=path).returncode == 0


def test_stats_counts_sessions_over_tls_and_in_plaintext(tls_greyd, certs):
    g = tls_greyd()
    for _ in range(2):
        secured(g, certs).cmd("QUIT")
    g.raw().cmd("QUIT")
    assert until(lambda: not g.daemon.admission.sockets, 5)
    g.ctx.greylister.recorder.flush()
    run = run_greyd("stats", "--json", config=g.config.source)
    assert run.returncode == 0, run.stderr
    sessions = json.loads(run.stdout)["sessions"]
    assert (sessions["hour"]["tls"], sessions["hour"]["plaintext"]) == (2, 1)
    assert (sessions["day"]["tls"], sessions["day"]["plaintext"]) == (2, 1)
    human = run_greyd("stats", config=g.config.source).stdout
    assert re.search(r"^  over TLS +2 +2$", human, re.M)
    assert re.search(r"^  plaintext +1 +1$", human, re.M)


def test_a_stop_tells_an_idle_tls_session_421_over_tls(tls_greyd, certs):
    g = tls_greyd()
    c = secured(g, certs)
    assert c.cmd("EHLO client.example.net")[0] == 250
    g.daemon.stop()
    assert c.reply() == R(replies.SHUTTING_DOWN)


@pytest.mark.parametrize("over_tls, protocol", [(True, "UTF8SMTPS"), (False, "UTF8SMTP")])
def test_received_names_smtputf8_with_and_without_tls(start_greyd, certs, over_tls, protocol):
    cert, key = certs.issue()
    with Upstream(smtputf8=True) as upstream:
        g = start_greyd(upstream.port, tls={"cert": str(cert), "key": str(key)},
                        relay={"domains": ["bücher.example"]})
        g.whitelist()
        c = secured(g, certs) if over_tls else g.raw()
        assert "SMTPUTF8" in c.cmd("EHLO client.example.net")[1].split("\n")
        assert c.cmd("MAIL FROM:<jürgen@bücher.example> SMTPUTF8") == R(replies.SENDER_OK)
        assert c.cmd("RCPT TO:<søren@bücher.example>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        assert c.cmd("Subject: grüße\r\n\r\nHallo.\r\n.".encode())[0] == 250
        received = upstream.wait_for(1)[0].data.decode()
    assert f"with {protocol} id " in received
    assert ("(using TLSv1.3 with cipher " in received) == over_tls


def test_the_expiry_watch_looks_again_every_period_until_stopped(certs, logs):
    cert, key = certs.issue(days=3)
    certificate = tls.load(configuration.TlsConfig(cert=cert, key=key))
    watch = tls.ExpiryWatch(lambda: certificate, every=0.05)
    watch.start()
    try:
        assert until(lambda: len(logs.matching(r"^certificate expires soon ")) >= 3, 5)
    finally:
        watch.stop()
    watch._thread.join(5)
    assert not watch._thread.is_alive()
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=10)
    assert certificate.expires_within(tls.EXPIRY_WARNING, later)
    assert not certificate.expires_within(datetime.timedelta(days=1))

"""SMTPUTF8 (RFC 6531) and DSN (RFC 3461) through greyd, and what greyd knows
of the upstream's keywords (greyd.upstream): issue 14, items 4 and 5.

greyd runs in-process on loopback in front of a real aiosmtpd upstream that
offers SMTPUTF8 and DSN or not (tests/upstream.py); the fake clock passes
greylist delays. Nothing is mocked.
"""

from __future__ import annotations

import time

import pytest

from conftest import write_config
from greyd import config as configuration, maintenance, replies
from greyd.greylist import Greylister
from greyd.server import Daemon
from greyd.context import Context
from greyd.upstream import RETRY, Capabilities
from greyd.values import ConfigError
from smtpclient import R, Raw
from upstream import SilentServer, Upstream

pytestmark = pytest.mark.timeout(30)

HOST = "mx.greyd.test"
RCPT_OK = (250, "2.1.5 OK")
QUEUED = (250, "2.0.0 OK queued")
SENDER = "jürgen@bücher.example"
RECIPIENT = "søren@bücher.example"
BODY = "From: jürgen@bücher.example\r\nSubject: grüße\r\n\r\nHallo.\r\n.\r\n"
IDN = {"relay": {"domains": ["localhost", "example.org", "bücher.example"]},
       "server": {"max_errors": 100}}


@pytest.fixture
def intl():
    """An upstream that offers SMTPUTF8 and DSN."""
    with Upstream(smtputf8=True, dsn=True) as server:
        yield server


@pytest.fixture
def greyd_idn(start_greyd, intl):
    """greyd relaying bücher.example to `intl`, the test client (127.0.0.1)
    whitelisted so that every recipient it may relay goes upstream."""
    g = start_greyd(intl.port, **IDN)
    g.whitelist()
    return g


def ehlo_keywords(c: Raw) -> list[str]:
    code, text = c.cmd("EHLO client.example.net")
    assert code == 250
    return text.split("\n")[1:]


def client(g) -> Raw:
    c = g.raw()
    assert c.greeting[0] == 220
    assert c.cmd("EHLO client.example.net")[0] == 250
    return c


# -- what is offered ------------------------------------------------------------------------

@pytest.mark.parametrize("smtputf8, dsn, offered", [
    (True, True, ["SMTPUTF8", "DSN"]), (True, False, ["SMTPUTF8"]), (False, True, ["DSN"]),
    (False, False, []),
])
def test_ehlo_offers_smtputf8_and_dsn_only_when_the_upstream_does(start_greyd, smtputf8, dsn,
                                                                   offered):
    with Upstream(smtputf8=smtputf8, dsn=dsn) as upstream:
        g = start_greyd(upstream.port)
        with g.raw() as c:
            keywords = ehlo_keywords(c)
    assert keywords == ["PIPELINING", f"SIZE {g.config.server.max_message_size}", "8BITMIME",
                        "ENHANCEDSTATUSCODES", *offered]
    assert R(replies.ehlo(HOST, g.config.server.max_message_size, tuple(offered))) == (
        250, "\n".join([HOST, *keywords]))
    assert upstream.probes == 1 and upstream.connections == 0   # learnt at start, once


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def serve(tmp_path, clock):
    """serve(upstream_port, capabilities_clock) -> (Daemon, Context): greyd whose
    Capabilities run on the given clock; stopped at teardown."""
    running = []

    def start(port: int, when: Clock):
        config = configuration.load(write_config(tmp_path, port, **IDN))
        upstream = Capabilities.for_config(config, clock=when)
        ctx = Context(config, Greylister.open(config, clock=clock), upstream=upstream)
        daemon = Daemon(ctx, grace=1)
        daemon.start()
        running.append(daemon)
        return daemon, ctx

    yield start
    for daemon in running:
        daemon.stop()


def test_upstream_down_at_start_offers_neither_until_a_later_ehlo_learns_it(serve, logs):
    when = Clock()
    upstream = Upstream(smtputf8=True, dsn=True)         # its port chosen, nothing listening
    daemon, ctx = serve(upstream.port, when)
    assert ctx.upstream.known is None
    logs.wait_for("upstream capabilities not learnt")
    port = daemon.addresses[0][1]
    with upstream:
        with Raw(port) as c:
            assert "SMTPUTF8" not in ehlo_keywords(c)   # unknown, and tried just now
            assert c.cmd("MAIL FROM:<a@b.example> SMTPUTF8") == R(replies.UNKNOWN_PARAMETER)
        assert upstream.probes == 0
        when.now += RETRY                                 # a retry is due: at the next EHLO,
        with Raw(port) as c:                              # in the background
            ehlo_keywords(c)
        logs.wait_for("upstream capabilities .*offers=DSN,SMTPUTF8")
        with Raw(port) as c:
            assert ehlo_keywords(c)[-2:] == ["SMTPUTF8", "DSN"]
    assert upstream.probes == 1


def test_a_relay_notices_the_upstream_changed_and_the_client_gets_4xx(greyd_idn, intl, logs):
    g = greyd_idn
    with client(g) as c:
        assert ehlo_keywords(c)[-2:] == ["SMTPUTF8", "DSN"]
        intl.smtputf8 = intl.dsn = False                  # e.g. the MTA reconfigured
        assert c.cmd(f"MAIL FROM:<{SENDER}> SMTPUTF8") == R(replies.SENDER_OK)
        assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == R(replies.UPSTREAM_LACKS)
        assert c.cmd("RSET")[0] == 250
        assert c.cmd("MAIL FROM:<a@example.net> RET=HDRS") == R(replies.SENDER_OK)
        assert c.cmd("RCPT TO:<bob@localhost>") == R(replies.UPSTREAM_LACKS)
        assert c.cmd("RCPT TO:<bob@localhost> NOTIFY=NEVER") == R(replies.UPSTREAM_LACKS)
        logs.wait_for("upstream capabilities .*offers=none")
        assert ehlo_keywords(c)[-1] == "ENHANCEDSTATUSCODES"      # no longer offered
        assert c.cmd(f"MAIL FROM:<{SENDER}> SMTPUTF8") == R(replies.UNKNOWN_PARAMETER)
    assert intl.transactions == []                        # nothing half-relayed


def test_a_reload_keeps_what_is_known_of_the_same_upstream(start_greyd, intl):
    g = start_greyd(intl.port)
    assert g.ctx.upstream.known == {"SMTPUTF8", "DSN"}
    g.daemon.reconfigure(g.config)
    assert g.daemon.ctx.upstream is g.ctx.upstream
    assert intl.probes == 2                               # learnt again
    with Upstream() as plain:                             # another upstream: learnt afresh
        config = configuration.load(write_config(g.config.root, plain.port))
        g.daemon.reconfigure(config)
        assert g.daemon.ctx.upstream is not g.ctx.upstream
        assert g.daemon.ctx.upstream.known == frozenset()
        assert plain.probes == 1


# -- SMTPUTF8 -----------------------------------------------------------------------------

def test_utf8_without_smtputf8_is_553_5_6_7(start_greyd, intl):
    g = start_greyd(intl.port, **IDN)
    with client(g) as c:
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.NEED_SMTPUTF8)
        assert c.cmd("MAIL FROM:<a@example.net>") == R(replies.SENDER_OK)
        assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == R(replies.NEED_SMTPUTF8)
        assert c.cmd("RCPT TO:<bob@xn--bcher-kva.example>") == R(replies.greylisted(300))
    assert replies.NEED_SMTPUTF8.code == 553 and replies.NEED_SMTPUTF8.text.startswith("5.6.7 ")


def test_smtputf8_not_offered_stays_an_unknown_parameter(start_greyd, upstream):
    g = start_greyd(upstream.port, **IDN)
    with client(g) as c:
        assert c.cmd(f"MAIL FROM:<{SENDER}> SMTPUTF8") == R(replies.UNKNOWN_PARAMETER)
        assert c.cmd(f"MAIL FROM:<{SENDER}>") == R(replies.NEED_SMTPUTF8)


def test_invalid_utf8_and_look_alikes_are_refused(greyd_idn, intl):
    g = greyd_idn
    with client(g) as c:
        assert c.cmd(b"MAIL FROM:<j\xfcrgen@b.example> SMTPUTF8") == R(replies.BAD_SENDER)
        assert c.cmd(f"MAIL FROM:<{SENDER}> SMTPUTF8") == R(replies.SENDER_OK)
        assert c.cmd(b"RCPT TO:<s\xc3\xb8ren@b\xfccher.example>") == R(replies.BAD_RECIPIENT)
        for look_alike in ("bob@\uff4cocalhost",            # fullwidth l
                           "bob@b\u00fccher.\uff45xample",  # fullwidth e
                           "bob@\u212aamaelia.example.org"):  # KELVIN SIGN
            assert c.cmd(f"RCPT TO:<{look_alike}>") == R(replies.BAD_RECIPIENT), look_alike
        for other in ("bob@l\u043ecalhost",                  # Cyrillic o: another name
                      "bob@b\u00fccher.example.evil.example",
                      "bob\uff20evil.example@localhost",      # fullwidth @ in the local part
                      "bob\uff05evil.example@localhost"):     # fullwidth %
            assert c.cmd(f"RCPT TO:<{other}>") == R(replies.RELAY_DENIED), other
    assert intl.transactions == []


def test_utf8_sender_and_recipient_relayed_intact(greyd_idn, intl):
    g = greyd_idn
    with client(g) as c:
        assert c.cmd(f"MAIL FROM:<{SENDER}> SMTPUTF8") == R(replies.SENDER_OK)
        assert c.cmd(f"RCPT TO:<{RECIPIENT}>") == RCPT_OK
        assert c.cmd("RCPT TO:<ju\u0308rgen@BU\u0308CHER.example>") == RCPT_OK  # as written
        assert c.cmd("DATA")[0] == 354
        assert c.cmd(BODY.encode().removesuffix(b"\r\n")) == QUEUED
    [message] = intl.wait_for(1)
    assert message.mail_from == SENDER
    assert message.rcpt_tos == [RECIPIENT, "ju\u0308rgen@BU\u0308CHER.example"]
    assert "SMTPUTF8" in message.mail_options
    assert message.data.endswith("Subject: grüße\r\n\r\nHallo.\r\n".encode())


@pytest.mark.parametrize("configured", ["bücher.example", "xn--bcher-kva.example",
                                        "BÜCHER.example"])
def test_both_forms_are_one_triplet_and_one_relay_domain(start_greyd, intl, configured):
    g = start_greyd(intl.port, relay={"domains": [configured]})
    assert g.config.relay.domains == ("xn--bcher-kva.example",)
    with client(g) as c:
        assert c.cmd("MAIL FROM:<alice@example.net> SMTPUTF8") == R(replies.SENDER_OK)
        assert c.cmd("RCPT TO:<bob@bücher.example>") == R(replies.greylisted(300))
        g.clock.advance(301)
        assert c.cmd("RCPT TO:<bob@xn--bcher-kva.example>") == RCPT_OK   # the same triplet
        assert c.cmd("RCPT TO:<Bob@BÜCHER.example>") == RCPT_OK         # known now
        assert c.cmd("RCPT TO:<bob@bucher.example>") == R(replies.RELAY_DENIED)
    with g.store() as store:
        rows = store.db.execute("SELECT recipient FROM triplets").fetchall()
    assert rows == [("bob@xn--bcher-kva.example",)]
    assert [a for t in intl.transactions for a, _ in t.rcpts] == [
        "bob@xn--bcher-kva.example", "Bob@BÜCHER.example"]


def test_one_whitelist_entry_for_both_forms(start_greyd, intl):
    g = start_greyd(intl.port, **IDN)
    g.whitelist("recipient", "@xn--bcher-kva.example")     # as `greyd whitelist add` keeps it
    with client(g) as c:
        assert c.cmd("MAIL FROM:<alice@example.net> SMTPUTF8") == R(replies.SENDER_OK)
        assert c.cmd("RCPT TO:<bob@bücher.example>") == RCPT_OK
        assert c.cmd("RCPT TO:<bob@xn--bcher-kva.example>") == RCPT_OK
        assert c.cmd("RCPT TO:<bob@localhost>") == R(replies.greylisted(300))


# -- DSN ----------------------------------------------------------------------------------

def test_dsn_parameters_relayed_unchanged(greyd_idn, intl):
    g = greyd_idn
    orcpt = "ORCPT=rfc822;Bob+2Bx@Example.ORG"
    with client(g) as c:
        assert c.cmd("MAIL FROM:<alice@example.net> RET=hdrs ENVID=QQ314159+2Bx SIZE=99") == \
            R(replies.SENDER_OK)
        assert c.cmd(f"RCPT TO:<bob@localhost> NOTIFY=success,DELAY {orcpt}") == RCPT_OK
        assert c.cmd("RCPT TO:<carol@localhost>") == RCPT_OK
        assert c.cmd("RCPT TO:<dave@localhost> NOTIFY=NEVER") == RCPT_OK
        assert c.cmd("DATA")[0] == 354
        assert c.cmd(b"Subject: dsn\r\n\r\nx\r\n.") == QUEUED
    [transaction] = intl.transactions
    assert transaction.dsn == ["RET=hdrs", "ENVID=QQ314159+2Bx"]
    assert transaction.rcpt_dsn == [["NOTIFY=success,DELAY", orcpt], [], ["NOTIFY=NEVER"]]
    assert transaction.data_code == 250


def test_utf8_orcpt_under_smtputf8_relayed_unchanged(greyd_idn, intl):
    g = greyd_idn
    with client(g) as c:
        assert c.cmd(f"MAIL FROM:<{SENDER}> SMTPUTF8") == R(replies.SENDER_OK)
        assert c.cmd(f"RCPT TO:<{RECIPIENT}> ORCPT=utf-8;{RECIPIENT}") == RCPT_OK
    assert intl.transactions[0].rcpt_dsn == [[f"ORCPT=utf-8;{RECIPIENT}"]]


@pytest.mark.parametrize("command", [
    "MAIL FROM:<a@example.net> RET=BODY", "MAIL FROM:<a@example.net> ENVID=a+2",
    "MAIL FROM:<a@example.net> RET=FULL RET=FULL",
    "MAIL FROM:<a@example.net> ENVID=" + "x" * 101,
    "RCPT TO:<bob@localhost> NOTIFY=NEVER,DELAY", "RCPT TO:<bob@localhost> NOTIFY=SOMETIMES",
    "RCPT TO:<bob@localhost> ORCPT=bob@localhost", "RCPT TO:<bob@localhost> ORCPT=rfc822;b+zz",
    "RCPT TO:<bob@localhost> ORCPT=rfc822;a ORCPT=rfc822;b",
    "RCPT TO:<bob@localhost> ORCPT=utf-8;søren@localhost",     # unitext without SMTPUTF8
])
def test_bad_dsn_parameters_are_501_5_5_4(start_greyd, intl, command):
    g = start_greyd(intl.port)
    g.whitelist()
    with client(g) as c:
        if command.startswith("RCPT"):
            assert c.cmd("MAIL FROM:<a@example.net>") == R(replies.SENDER_OK)
        code, text = c.cmd(command)
        assert (code, text[:6]) == (501, "5.5.4 ")
    assert intl.transactions == []


def test_dsn_parameters_without_dsn_offered_stay_555(start_greyd):
    with Upstream(smtputf8=True) as upstream:
        g = start_greyd(upstream.port)
        with client(g) as c:
            assert c.cmd("MAIL FROM:<a@example.net> RET=FULL") == R(replies.UNKNOWN_PARAMETER)
            assert c.cmd("MAIL FROM:<a@example.net>") == R(replies.SENDER_OK)
            assert c.cmd("RCPT TO:<bob@localhost> NOTIFY=NEVER") == R(replies.UNKNOWN_PARAMETER)


def test_dsn_lengthens_rcpt_and_mail_lines_only_when_offered(start_greyd, intl, upstream):
    orcpt = "ORCPT=rfc822;" + "b" * 480 + "@localhost"
    rcpt = f"RCPT TO:<bob@localhost> NOTIFY=SUCCESS,FAILURE,DELAY {orcpt}"
    domain = ".".join(["e" * 60] * 3)
    mail = f"MAIL FROM:<{'a' * 60}@{domain}> SIZE=10 BODY=8BITMIME RET=HDRS ENVID=" \
           + "+41" * 100 + " SMTPUTF8"
    assert 512 < len(rcpt) + 2 <= 512 + 600 and 512 + 41 < len(mail) + 2 <= 512 + 41 + 120
    g = start_greyd(intl.port)
    g.whitelist()
    with client(g) as c:
        assert c.cmd(mail) == R(replies.SENDER_OK)
        assert c.cmd(rcpt) == RCPT_OK
    plain = start_greyd(upstream.port)
    with client(plain) as c:
        assert c.cmd(mail) == R(replies.LINE_TOO_LONG)
        assert c.cmd("MAIL FROM:<a@example.net>") == R(replies.SENDER_OK)
        assert c.cmd(rcpt) == R(replies.LINE_TOO_LONG)


# -- the pieces ---------------------------------------------------------------------------

def test_a_black_holed_upstream_never_holds_the_start(logs):
    with SilentServer() as silent:
        capabilities = Capabilities("127.0.0.1", silent.port, timeout=1, local_hostname="mx")
        started = time.monotonic()
        capabilities.refresh(wait=0.2)
        assert time.monotonic() - started < 0.9
        assert capabilities.known is None and capabilities.offered() == ()
        logs.wait_for("upstream capabilities not learnt .*offers=unknown")
        capabilities.update(["SIZE", "dsn", "8BITMIME"])          # as a relay reports them
        assert capabilities.offered() == ("DSN",)
        capabilities.refresh(wait=2)                              # a failed probe: kept as known
        assert capabilities.offered() == ("DSN",)


def test_triplets_filters_take_either_form_of_a_domain():
    for typed in ("@BÜCHER.example", "@xn--bcher-kva.example", "@bu\u0308cher.example"):
        where = maintenance.triplet_filter(recipient=typed)
        assert list(where.params.values()) == ["%@xn--bcher-kva.example"], typed
    where = maintenance.triplet_filter(sender="Jürgen+news@BÜCHER.example")
    assert "jürgen@xn--bcher-kva.example" in where.params.values()


@pytest.mark.parametrize("domain", ["\uff4cocalhost", "\u212aamaelia.org", "b\u00fccher..example",
                                    ".\uff42\u00fccher.example"])
def test_a_look_alike_or_invalid_relay_domain_stops_the_start(tmp_path, domain):
    path = write_config(tmp_path, 10025, relay={"domains": ["localhost", domain]})
    with pytest.raises(ConfigError, match=r"^relay\.domains: each entry must be a domain name"):
        configuration.load(path)


def test_relay_domains_take_either_form_and_keep_the_a_label(tmp_path):
    path = write_config(tmp_path, 10025, relay={"domains": [
        "B\u00dcCHER.example", ".bu\u0308cher.example", "xn--bcher-kva.example."]})
    assert configuration.load(path).relay.domains == (
        "xn--bcher-kva.example", ".xn--bcher-kva.example", "xn--bcher-kva.example")

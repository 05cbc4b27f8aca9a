"""greyd.dns through greyd: verified names, DNSWL/DNSBL, failures, caching, `explain`.

Every test talks to a real UDP DNS server on 127.0.0.1 (tests/dnsserver.py)
that greyd is configured to use; nothing here ever queries a real nameserver.
The SMTP client connects from 127.0.0.1, 127.0.0.2 … or ::1, so the reverse
names are 1.0.0.127.in-addr.arpa and the like.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import select
import smtplib
import time

import dns.name
import dns.resolver
import pytest

from greyd.config import DnsConfig
from greyd.dns import Lookup, hostname, list_query
from greyd.store import Store

from conftest import LogLines, until, write_config
from daemon import greyd as run_greyd
from dnsserver import MALFORMED, NXDOMAIN, SERVFAIL, TIMEOUT, DnsServer
from upstream import Upstream

pytestmark = pytest.mark.timeout(60)

PTR1 = "1.0.0.127.in-addr.arpa"
PTR2 = "2.0.0.127.in-addr.arpa"
PTR6 = "1." + "0." * 31 + "ip6.arpa"
NIBBLES6 = "1." + "0." * 31            # ::1 reversed, for DNSxL zones
BODY = b"From: alice@example.net\r\nSubject: dns\r\n\r\nHello.\r\n"


# -- fixtures and helpers -----------------------------------------------------------

@pytest.fixture
def dns_server():
    with DnsServer() as server:
        yield server


def fields(line: str) -> dict[str, str]:
    """key=value pairs of one log line (values may be JSON-quoted)."""
    return {key: json.loads(value) if value.startswith('"') else value
            for key, value in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line)}


def decisions(logs: LogLines) -> list[dict[str, str]]:
    return [fields(line) for line in logs.matching(r"^decision ")]


def dns_sections(server: DnsServer, **dns) -> dict:
    return {"enabled": True, "nameservers": [server.address], "timeout": 2, **dns}


def start(start_greyd, upstream_port: int, server: DnsServer, *, greylist=None, listen=None,
          **dns):
    sections = {"dns": dns_sections(server, **dns)}
    if greylist:
        sections["greylist"] = greylist
    if listen:
        sections["server"] = {"listen": listen}
    return start_greyd(upstream_port, **sections)


def attempt(client: smtplib.SMTP, recipients, sender="alice@example.net",
            data: bytes | None = None) -> list[int]:
    """One transaction on an open connection; the RCPT codes (DATA if any passed); QUIT."""
    with client:
        client.mail(sender)
        codes = [client.rcpt(recipient)[0] for recipient in recipients]
        if data is not None and 250 in codes:
            assert client.data(data)[0] == 250
    return codes


def verified(server: DnsServer, reverse: str, name: str, address: str, *, ttl: int = 300):
    """PTR reverse -> name, and name -> address (A or AAAA): forward-confirmed."""
    server.add(reverse, "PTR", name + ".", ttl=ttl)
    server.add(name, "AAAA" if ":" in address else "A", address, ttl=ttl)


def headers(message) -> bytes:
    return message.data.split(b"\r\n\r\n", 1)[0]


# -- 1. forward-confirmed reverse DNS --------------------------------------------------

def test_a_verified_name_reaches_xclient_and_received_and_is_looked_up_once_per_session(
        start_greyd, dns_server, logs, clock):
    verified(dns_server, PTR1, "mx.example.test", "127.0.0.1", ttl=0)  # ttl 0: never cached
    with Upstream(xclient=True) as upstream:
        g = start(start_greyd, upstream.port, dns_server)
        rcpts = ["a@localhost", "b@localhost", "c@localhost"]
        assert attempt(g.smtp("127.0.0.1"), rcpts) == [451, 451, 451]
        assert dns_server.count(PTR1, "PTR") == 1
        assert dns_server.count("mx.example.test", "A") == 1
        assert dns_server.count("mx.example.test", "AAAA") == 0   # an IPv4 client: A only

        clock.advance(301)
        assert attempt(g.smtp("127.0.0.1"), rcpts[:2], data=BODY) == [250, 250]
        [message] = upstream.wait_for(1)
    assert dns_server.count(PTR1, "PTR") == 2                      # once per session
    assert message.xclient["NAME"] == "mx.example.test"
    assert message.xclient["ADDR"] == "127.0.0.1"
    assert b"Received: from client.example.net (mx.example.test [127.0.0.1])" in headers(message)
    assert [d["name"] for d in decisions(logs)] == ["mx.example.test"] * 5
    ends = logs.wait_for(r"^session end .*messages=1")
    assert fields(ends[-1])["name"] == "mx.example.test"


def test_a_ptr_that_does_not_lead_back_gives_no_name(start_greyd, dns_server, logs):
    dns_server.add(PTR2, "PTR", "mx.example.test.")             # claims a name ...
    dns_server.add("mx.example.test", "A", "127.0.0.1")         # ... that is someone else's
    with Upstream(xclient=True) as upstream:
        g = start(start_greyd, upstream.port, dns_server)
        g.whitelist("sender", "friend@example.net")
        assert attempt(g.smtp("127.0.0.2"), ["a@localhost"], sender="friend@example.net",
                       data=BODY) == [250]
        [message] = upstream.wait_for(1)
    assert dns_server.count("mx.example.test", "A") == 1
    assert message.xclient["NAME"] == "[UNAVAILABLE]"
    assert b"(unknown [127.0.0.2])" in headers(message)
    [decision] = decisions(logs)
    assert decision["name"] == "unknown" and decision["reason"] == "whitelist:friend@example.net"
    [unverified] = logs.matching(r"^dns unverified ")
    assert fields(unverified) == {"client": "127.0.0.2", "ptr": "mx.example.test"}
    assert fields(logs.wait_for(r"^session end ")[-1])["name"] == "unknown"


def test_ipv6_client_name_by_aaaa_and_dnsbl_by_reversed_nibbles(start_greyd, dns_server, logs):
    verified(dns_server, PTR6, "mx6.example.test", "::1")
    dns_server.add(NIBBLES6 + "bl.test", "A", "127.0.0.2")
    with Upstream(xclient=True) as upstream:
        g = start(start_greyd, upstream.port, dns_server, dnsbl=["bl.test"],
                  listen=["127.0.0.1:0", "[::1]:0"])
        g.whitelist("recipient", "friend@localhost")
        port6 = g.daemon.addresses[1][1]
        client = smtplib.SMTP("::1", port6, timeout=5)
        client.ehlo("client.example.net")
        assert attempt(client, ["friend@localhost", "other@localhost"], data=BODY) == [250, 451]
        [message] = upstream.wait_for(1)
    assert message.xclient["NAME"] == "mx6.example.test"
    assert b"(mx6.example.test [::1])" in headers(message)
    assert dns_server.count("mx6.example.test", "AAAA") == 1
    assert dns_server.count("mx6.example.test", "A") == 0
    assert (NIBBLES6 + "bl.test", "A") in dns_server.seen()
    accepted, greylisted = decisions(logs)
    assert accepted["reason"] == "whitelist:friend@localhost"
    assert greylisted["reason"] == "new,dnsbl:bl.test"
    assert greylisted["name"] == "mx6.example.test"


# -- 2. configuration -------------------------------------------------------------------

def test_disabled_dns_sends_no_query_at_all(start_greyd, upstream, dns_server, logs):
    verified(dns_server, PTR1, "mx.example.test", "127.0.0.1")
    g = start(start_greyd, upstream.port, dns_server, enabled=False,
              dnswl=["wl.test"], dnsbl=["bl.test"])
    g.whitelist("hostname", "mx.example.test")
    assert attempt(g.smtp("127.0.0.1"), ["a@localhost"]) == [451]
    assert dns_server.seen() == []
    [decision] = decisions(logs)
    assert decision["name"] == "unknown" and decision["reason"] == "new"


def test_the_system_resolver_is_built_from_the_system_config_without_a_query(dns_server):
    lookup = Lookup(DnsConfig(enabled=True, nameservers=()))
    try:
        if lookup.resolver is not None:   # a machine without /etc/resolv.conf gets none
            system = dns.resolver.Resolver()
            assert lookup.resolver.nameservers == system.nameservers
            assert isinstance(lookup.resolver.cache, dns.resolver.LRUCache)
        explicit = Lookup(DnsConfig(nameservers=(("127.0.0.1", dns_server.port),)))
        assert [(ns.address, ns.port) for ns in explicit.resolver.nameservers] == [
            ("127.0.0.1", dns_server.port)]
        explicit.close()
    finally:
        lookup.close()
    assert dns_server.seen() == []


def test_a_reload_keeps_the_cache_or_turns_dns_off(start_greyd, upstream, dns_server):
    verified(dns_server, PTR1, "mx.example.test", "127.0.0.1")
    g = start(start_greyd, upstream.port, dns_server)
    assert attempt(g.smtp("127.0.0.1"), ["a@localhost"]) == [451]
    assert dns_server.count(PTR1) == 1

    g.daemon.reconfigure(g.config)                 # same [dns]: the same cache serves
    assert attempt(g.smtp("127.0.0.1"), ["a@localhost"]) == [451]
    assert dns_server.count(PTR1) == 1

    off = dataclasses.replace(g.config, dns=dataclasses.replace(g.config.dns, enabled=False))
    g.daemon.reconfigure(off)
    queries = sum(dns_server.queries.values())
    assert attempt(g.smtp("127.0.0.3"), ["a@localhost"]) == [451]
    assert sum(dns_server.queries.values()) == queries


# -- 3. hostname whitelist ------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["mx.example.test", ".example.test", r"/^MX\.Example\.TEST$/"])
def test_hostname_entries_match_a_verified_name_only(start_greyd, upstream, dns_server, logs,
                                                     entry):
    verified(dns_server, PTR1, "mx.example.test", "127.0.0.1")
    dns_server.add(PTR2, "PTR", "mx.example.test.")              # spoofed: leads to .1
    g = start(start_greyd, upstream.port, dns_server)
    g.whitelist("hostname", entry)
    assert attempt(g.smtp("127.0.0.1"), ["a@localhost"]) == [250]
    assert attempt(g.smtp("127.0.0.2"), ["a@localhost"]) == [451]
    verified_one, spoofed = decisions(logs)
    assert (verified_one["name"], verified_one["reason"]) == ("mx.example.test", f"whitelist:{entry}")
    assert (spoofed["name"], spoofed["reason"]) == ("unknown", "new")


def test_a_postgrey_domain_line_imported_matches_the_verified_name(
        start_greyd, upstream, dns_server, logs, tmp_path):
    verified(dns_server, PTR1, "mx.example.test", "127.0.0.1")
    g = start(start_greyd, upstream.port, dns_server)
    postgrey = tmp_path / "whitelist_clients"
    postgrey.write_text("# postgrey whitelist_clients\nexample.test\n")
    result = run_greyd("whitelist", "import", str(postgrey), config=g.config.source)
    assert result.returncode == 0, result.stderr
    assert attempt(g.smtp("127.0.0.1"), ["a@localhost"]) == [250]
    [decision] = decisions(logs)
    assert decision["reason"] == "whitelist:.example.test"


# -- 4. DNSWL and DNSBL ------------------------------------------------------------------------

def test_a_dnswl_listing_accepts_at_once(start_greyd, upstream, dns_server, logs):
    dns_server.add("1.0.0.127.wl.test", "A", "127.0.2.3")
    g = start(start_greyd, upstream.port, dns_server, dnswl=["other-wl.test", "wl.test"])
    assert attempt(g.smtp("127.0.0.1"), ["a@localhost"], data=BODY) == [250]
    upstream.wait_for(1)
    [decision] = decisions(logs)
    assert decision["action"] == "accept" and decision["reason"] == "dnswl:wl.test"
    assert {("1.0.0.127.wl.test", "A"), ("1.0.0.127.other-wl.test", "A")} <= set(dns_server.seen())
    assert logs.matching(r"^dns failure .*wl\.test") == []   # NXDOMAIN: "not listed"


def test_a_dnsbl_listed_client_is_greylisted_and_never_auto_whitelisted(
        start_greyd, upstream, dns_server, logs, clock):
    dns_server.add("1.0.0.127.bl.test", "A", "127.0.0.2", "127.0.0.4")
    g = start(start_greyd, upstream.port, dns_server, dnsbl=["bl.test"],
              greylist={"auto_whitelist_after": 1})
    assert attempt(g.smtp("127.0.0.1"), ["a@localhost"]) == [451]
    clock.advance(301)
    assert attempt(g.smtp("127.0.0.1"), ["a@localhost"], data=BODY) == [250]   # passed
    upstream.wait_for(1)
    clock.advance(3601)
    assert attempt(g.smtp("127.0.0.1"), ["b@localhost"]) == [451]      # still greylisted
    assert attempt(g.smtp("127.0.0.2"), ["b@localhost"]) == [250]      # its network earned it
    reasons = [(d["client"], d["reason"]) for d in decisions(logs)]
    assert reasons == [("127.0.0.1", "new,dnsbl:bl.test"), ("127.0.0.1", "passed"),
                       ("127.0.0.1", "new,dnsbl:bl.test"), ("127.0.0.2", "auto-whitelist")]
    assert ("1.0.0.127.bl.test", "A") in dns_server.seen()
    assert ("2.0.0.127.bl.test", "A") in dns_server.seen()


@pytest.mark.parametrize("zone_kind", ["dnswl", "dnsbl"])
@pytest.mark.parametrize("code", ["127.255.255.254", "127.0.0.255", "198.51.100.7"])
def test_refusal_codes_and_foreign_answers_are_not_listings(
        start_greyd, upstream, dns_server, logs, clock, zone_kind, code):
    dns_server.add("1.0.0.127.zone.test", "A", code)
    g = start(start_greyd, upstream.port, dns_server, greylist={"auto_whitelist_after": 1},
              **{zone_kind: ["zone.test"]})
    assert attempt(g.smtp("127.0.0.1"), ["a@localhost"]) == [451]
    clock.advance(301)
    assert attempt(g.smtp("127.0.0.1"), ["a@localhost"]) == [250]
    clock.advance(3601)
    assert attempt(g.smtp("127.0.0.1"), ["b@localhost"]) == [250]     # auto-whitelisted
    assert [d["reason"] for d in decisions(logs)] == ["new", "passed", "auto-whitelist"]
    failure = fields(logs.matching(r"^dns failure .*zone\.test")[0])
    assert failure["query"] == "1.0.0.127.zone.test" and failure["answer"] == code
    assert failure["error"] == ("unexpected-answer" if code.startswith("198.") else "refused")


# -- 5. failures are no information --------------------------------------------------------------

@pytest.mark.parametrize("mode, error", [(TIMEOUT, "timeout"), (SERVFAIL, "servfail"),
                                         (NXDOMAIN, "nxdomain"), (MALFORMED, "timeout")])
def test_a_dns_failure_decides_as_if_dns_were_off(start_greyd, upstream, dns_server, logs,
                                                  mode, error):
    verified(dns_server, PTR1, "mx.example.test", "127.0.0.1")
    dns_server.add("1.0.0.127.wl.test", "A", "127.0.0.2")
    dns_server.mode(PTR1, mode)
    dns_server.mode("1.0.0.127.wl.test", mode)
    g = start(start_greyd, upstream.port, dns_server, timeout=1, dnswl=["wl.test"])
    g.whitelist("hostname", "mx.example.test")
    assert attempt(g.smtp("127.0.0.1"), ["a@localhost"]) == [451]
    [decision] = decisions(logs)
    assert (decision["name"], decision["reason"]) == ("unknown", "new")
    assert dns_server.count(PTR1, "PTR") >= 1
    if mode == NXDOMAIN:                       # no reverse name: not a failure
        [no_name] = logs.wait_for(rf"^dns no-name .*query={re.escape(PTR1)} ")
        assert fields(no_name)["answer"] == error
        assert logs.matching(r"^dns failure ") == []
    else:
        [failure] = logs.wait_for(rf"^dns failure .*query={re.escape(PTR1)} ")
        assert fields(failure) == {"client": "127.0.0.1", "query": PTR1, "type": "PTR",
                                   "error": error}
    zone = r"^dns failure .*query=1\.0\.0\.127\.wl\.test "
    if mode == NXDOMAIN:
        assert logs.matching(zone) == []       # NXDOMAIN from a zone: "not listed"
    else:
        [zone_failure] = logs.wait_for(zone)
        assert fields(zone_failure)["error"] == error


def test_a_client_without_a_reverse_name_is_a_debug_line_not_a_failure(
        start_greyd, upstream, dns_server, logs):
    dns_server.add(PTR2, "A", "192.0.2.9")     # PTR2 exists, without a PTR: NOERROR, no answer
    g = start(start_greyd, upstream.port, dns_server)    # PTR1 is unknown: NXDOMAIN
    assert attempt(g.smtp("127.0.0.1"), ["a@localhost"]) == [451]
    assert attempt(g.smtp("127.0.0.2"), ["b@localhost"]) == [451]
    assert [d["name"] for d in decisions(logs)] == ["unknown", "unknown"]
    logs.wait_for(r"^dns no-name client=127\.0\.0\.2 ")
    no_names = [line for line in logs.lines if " dns no-name " in line]
    assert all(" DEBUG dns no-name " in line for line in no_names), no_names
    found = sorted((fields(line.split(" DEBUG ", 1)[1]) for line in no_names),
                   key=lambda line: line["client"])
    assert found == [{"client": "127.0.0.1", "query": PTR1, "answer": "nxdomain"},
                     {"client": "127.0.0.2", "query": PTR2, "answer": "no-answer"}]
    assert logs.matching(r"^dns (failure|unverified) ") == []


def test_a_reverse_lookup_that_fails_is_still_a_warning(start_greyd, upstream, dns_server, logs):
    dns_server.mode(PTR1, SERVFAIL)
    g = start(start_greyd, upstream.port, dns_server)
    assert attempt(g.smtp("127.0.0.1"), ["a@localhost"]) == [451]
    logs.wait_for(rf"^dns failure .*query={re.escape(PTR1)} ")
    [failure] = [line for line in logs.lines if " dns failure " in line]
    assert " WARNING dns failure " in failure and "error=servfail" in failure
    assert logs.matching(r"^dns no-name ") == []


@pytest.mark.parametrize("silent", ["everything", "the forward lookup"])
def test_a_silent_resolver_delays_the_rcpt_by_at_most_dns_timeout(
        start_greyd, upstream, dns_server, silent):
    timeout = 1
    if silent == "everything":
        dns_server.default = TIMEOUT
    else:
        dns_server.add(PTR1, "PTR", "mx.example.test.")
        dns_server.mode("mx.example.test", TIMEOUT)
    g = start(start_greyd, upstream.port, dns_server, timeout=timeout,
              dnswl=["wl.test", "wl2.test"], dnsbl=["bl.test", "bl2.test"])
    g.whitelist("hostname", "mx.example.test")
    started = time.monotonic()
    client = g.smtp("127.0.0.1")
    client.mail("alice@example.net")
    code, _ = client.rcpt("bob@localhost")
    elapsed = time.monotonic() - started
    client.quit()
    assert code == 451
    assert elapsed < timeout + 1.0, f"RCPT answered after {elapsed:.2f} s"
    assert dns_server.count(PTR1, "PTR") >= 1


def test_a_rcpt_that_waits_for_the_resolver_keeps_no_other_session_waiting(
        start_greyd, upstream, dns_server):
    """The sessions that answer at once share one thread (the reactor); a
    RCPT that must wait for its client's lookups is answered on a thread of
    its own, the other sessions are served meanwhile, and then the session
    is the reactor's again."""
    dns_server.mode(PTR1, TIMEOUT)
    g = start(start_greyd, upstream.port, dns_server, timeout=2)
    slow = g.smtp("127.0.0.1")
    slow.mail("alice@example.net")
    slow.putcmd("rcpt", "TO:<bob@localhost>")       # answered once the lookups time out
    quick = g.smtp("127.0.0.2")
    quick.mail("carol@example.net")
    assert quick.rcpt("dave@localhost")[0] == 451
    assert quick.quit()[0] == 221
    assert select.select([slow.sock], [], [], 0)[0] == []     # still waiting
    assert slow.getreply()[0] == 451
    reactor = g.daemon.listeners[0].reactor
    assert until(lambda: len(reactor.early) == 1, 5)          # back on the reactor's thread
    assert slow.rset()[0] == 250
    assert slow.quit()[0] == 221


# -- 6. cache ----------------------------------------------------------------------------------

def test_a_client_that_connects_five_times_costs_one_lookup(start_greyd, upstream, dns_server):
    verified(dns_server, PTR1, "mx.example.test", "127.0.0.1")
    g = start(start_greyd, upstream.port, dns_server, dnsbl=["bl.test"])
    for _ in range(5):
        assert attempt(g.smtp("127.0.0.1"), ["a@localhost"]) == [451]
    assert dns_server.count(PTR1, "PTR") == 1
    assert dns_server.count("mx.example.test", "A") == 1
    assert dns_server.count("1.0.0.127.bl.test", "A") == 1        # NXDOMAIN is cached too


# -- 7. greyd explain ------------------------------------------------------------------------

def test_explain_shows_the_name_and_the_listings(tmp_path, dns_server):
    verified(dns_server, PTR1, "mx.example.test", "127.0.0.1")
    dns_server.add("1.0.0.127.wl.test", "A", "127.0.0.2")
    dns_server.add("2.0.0.127.bl.test", "A", "127.0.0.2")
    config = write_config(tmp_path, 10025,
                          dns=dns_sections(dns_server, dnswl=["wl.test"], dnsbl=["bl.test"]))
    (tmp_path / "var").mkdir()
    with Store(tmp_path / "var" / "greyd.db") as store:     # as a first `greyd start` leaves it
        store.migrate()

    def explain(client, *extra):
        result = run_greyd("explain", "--client", client, "--sender", "alice@example.net",
                           "--recipient", "bob@localhost", *extra, config=config)
        assert result.returncode == 0, result.stderr
        return result.stdout

    text = explain("127.0.0.1")
    assert re.search(r"^name: +mx\.example\.test$", text, re.M)
    assert re.search(r"^dnswl: +wl\.test$", text, re.M)
    assert re.search(r"^dnsbl: +-$", text, re.M)
    assert re.search(r"^reason: +dnswl:wl\.test$", text, re.M)

    listed = json.loads(explain("127.0.0.2", "--json"))
    assert (listed["name"], listed["dnswl"], listed["dnsbl"]) == (None, None, "bl.test")
    assert (listed["action"], listed["reason"]) == ("greylist", "new,dnsbl:bl.test")


# -- the pure pieces ---------------------------------------------------------------------------

def test_query_names_and_host_names():
    mapped = ipaddress.ip_address("::ffff:192.0.2.10").ipv4_mapped   # as greyd unmaps a client
    assert list_query(ipaddress.ip_address("192.0.2.10"), "bl.test") == "10.2.0.192.bl.test."
    assert list_query(mapped, "bl.test.") == "10.2.0.192.bl.test."
    assert list_query(ipaddress.ip_address("2001:db8::1"), "bl.test") == (
        "1." + "0." * 23 + "8.b.d.0.1.0.0.2.bl.test.")
    assert hostname(dns.name.from_text("MX.Example.TEST.")) == "mx.example.test"
    assert hostname(dns.name.from_text(r"evil\010name.example.test.")) is None
    assert hostname(dns.name.from_text(r"a\ b.example.test.")) is None
    assert hostname(dns.name.root) is None

"""SPF-keyed triplets (greylist.client_key): a sender that passes SPF is keyed
by its domain, so a retry from any host the domain authorizes matches.

Every test runs greyd with a real UDP DNS server (tests/dnsserver.py) serving
the SPF records, and real SMTP sessions from distinct loopback addresses
(127.x.y.z are all this host's), with the fake clock standing in for the
greylisting delay. pyspf does the evaluation, over greyd's own resolver.
"""

from __future__ import annotations

import json
import re
import smtplib

import pytest

from greyd import config as configuration, policy
from greyd.spfcheck import identity
from greyd.store import Store

from conftest import LogLines, write_config
from dnsserver import TIMEOUT, DnsServer
from upstream import Upstream

pytestmark = pytest.mark.timeout(60)

DOMAIN = "pool.example"
POOL = "v=spf1 ip4:127.16.0.0/12 ip6:::1 -all"     # every host of the big sender
BODY = b"From: news@pool.example\r\nSubject: spf\r\n\r\nHello.\r\n"


@pytest.fixture
def dns_server():
    with DnsServer() as server:
        server.add(DOMAIN, "TXT", f'"{POOL}"', ttl=0)    # ttl 0: the resolver never caches it
        yield server


@pytest.fixture
def upstream():
    with Upstream() as server:
        yield server


def start(start_greyd, upstream, nameserver: DnsServer, *, greylist=None, timeout=2, **more):
    sections = {"dns": {"enabled": True, "nameservers": [nameserver.address],
                        "timeout": timeout},
                "greylist": {"delay": "5m", "auto_whitelist_after": 0, **(greylist or {})},
                **more}
    return start_greyd(upstream.port, **sections)


def fields(line: str) -> dict[str, str]:
    return {key: json.loads(value) if value.startswith('"') else value
            for key, value in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line)}


def decisions(logs: LogLines) -> list[dict[str, str]]:
    return [fields(line) for line in logs.matching(r"^decision ")]


def send(greyd, source: str, sender: str = f"news@{DOMAIN}", recipient="bob@example.org",
         *, helo: str = "mail.pool.example", port: int | None = None) -> int:
    """One message from `source`: the RCPT code (250 once DATA was accepted too)."""
    host = "::1" if ":" in source else "127.0.0.1"
    with smtplib.SMTP(host, port or greyd.port, timeout=10,
                      source_address=(source, 0)) as client:
        client.ehlo(helo)
        client.mail(sender)
        code = client.rcpt(recipient)[0]
        if code == 250:
            assert client.data(BODY)[0] == 250
    return code


def created_database(root) -> None:
    """The empty database a first `greyd start` leaves (explain reads it)."""
    (root / "var").mkdir(exist_ok=True)
    with Store(root / "var" / "greyd.db") as store:
        store.migrate()


# -- the key ------------------------------------------------------------------------------

def test_a_pool_retrying_from_another_network_passes_on_its_first_retry(
        start_greyd, upstream, dns_server, clock, logs):
    g = start(start_greyd, upstream, dns_server)
    assert send(g, "127.16.1.10") == 451
    clock.advance(299)
    assert send(g, "127.17.2.20") == 451                 # another /24, still too early
    clock.advance(2)
    assert send(g, "127.18.3.30") == 250                 # a third one: the domain's retry
    [message] = upstream.wait_for(1)
    assert b"\r\nX-Greylist: delayed 301 seconds by greyd" in message.data
    new, early, passed = decisions(logs)
    assert (new["reason"], new["key"], new["spf"]) == ("new", "spf:pool.example",
                                                      "pass:pool.example")
    assert (early["reason"], early["key"], early["retry_in"]) == (
        "too-early", "spf:pool.example", "1")
    assert (passed["reason"], passed["key"], passed["delay"]) == (
        "passed", "spf:pool.example", "301")
    [row] = g.store().conn.execute("SELECT network, sender FROM triplets").fetchall()
    assert row == ("spf:pool.example", "news@pool.example")


def test_a_dual_stack_sender_is_one_triplet_over_ipv4_and_ipv6(
        start_greyd, upstream, dns_server, clock, logs):
    g = start(start_greyd, upstream, dns_server,
              server={"listen": ["127.0.0.1:0", "[::1]:0"]})
    port6 = g.daemon.addresses[1][1]
    assert send(g, "::1", port=port6) == 451
    clock.advance(301)
    assert send(g, "127.16.0.5") == 250
    assert [d["key"] for d in decisions(logs)] == ["spf:pool.example"] * 2


@pytest.mark.parametrize("record, result", [
    ("v=spf1 -all", "fail"), ("v=spf1 ~all", "softfail"), ("v=spf1 ?all", "neutral"),
    ("v=spf1 include:nowhere.example -all", "permerror"),
    (None, "none"),
])
def test_anything_but_a_pass_keeps_the_network_key(start_greyd, upstream, dns_server, clock,
                                                   logs, record, result):
    dns_server.remove(DOMAIN, "TXT")
    if record:
        dns_server.add(DOMAIN, "TXT", f'"{record}"')
    g = start(start_greyd, upstream, dns_server)
    assert send(g, "127.16.1.10") == 451
    clock.advance(301)
    assert send(g, "127.17.2.20") == 451                 # another network: a new triplet
    assert send(g, "127.16.1.99") == 250                 # the first network's retry
    first, other, retry = decisions(logs)
    assert first["spf"] == f"{result}:pool.example" and "key" not in first
    assert (other["reason"], retry["reason"]) == ("new", "passed")
    networks = {row[0] for row in g.store().conn.execute("SELECT network FROM triplets")}
    assert networks == {"127.16.1.0/24", "127.17.2.0/24"}


def test_a_dns_timeout_is_no_information_within_dns_timeout(start_greyd, upstream, dns_server,
                                                             logs):
    dns_server.mode(DOMAIN, TIMEOUT)
    g = start(start_greyd, upstream, dns_server, timeout=1)
    assert send(g, "127.16.1.10") == 451
    [decision] = decisions(logs)
    assert decision["reason"] == "new" and decision["spf"] == "temperror:pool.example"
    assert "key" not in decision


def test_the_lookup_limits_of_rfc_7208_hold(start_greyd, upstream, dns_server, logs):
    """Eleven DNS-querying terms: permerror (RFC 7208 4.6.4), and no 12th query."""
    includes = " ".join(f"a:h{i}.pool.example" for i in range(11))
    dns_server.remove(DOMAIN, "TXT")
    dns_server.add(DOMAIN, "TXT", f'"v=spf1 {includes} -all"')
    for i in range(11):
        dns_server.add(f"h{i}.pool.example", "A", "192.0.2.1")
    g = start(start_greyd, upstream, dns_server)
    assert send(g, "127.16.1.10") == 451
    assert decisions(logs)[0]["spf"] == "permerror:pool.example"
    assert sum(dns_server.count(f"h{i}.pool.example", "A") for i in range(11)) <= 10


def test_the_null_sender_is_keyed_by_the_helo_name(start_greyd, upstream, dns_server, clock,
                                                   logs):
    dns_server.add("mail.pool.example", "TXT", f'"{POOL}"')
    g = start(start_greyd, upstream, dns_server)
    assert send(g, "127.16.1.10", sender="") == 451
    clock.advance(301)
    assert send(g, "127.19.9.9", sender="") == 250
    assert [d["key"] for d in decisions(logs)] == ["spf:mail.pool.example"] * 2


def test_a_triplet_stored_under_the_network_key_keeps_working(start_greyd, upstream,
                                                              dns_server, clock, logs):
    """What an upgrade finds: triplets keyed by network. A known one stays
    known and a pending one passes, though the sender now passes SPF."""
    g = start(start_greyd, upstream, dns_server, greylist={"client_key": ["network"]})
    assert send(g, "127.16.1.10", recipient="known@example.org") == 451
    clock.advance(301)
    assert send(g, "127.16.1.10", recipient="known@example.org") == 250
    assert send(g, "127.16.1.10", recipient="pending@example.org") == 451
    g.daemon.stop()
    upgraded = start(start_greyd, upstream, dns_server)
    clock.advance(301)
    assert send(upgraded, "127.16.1.11", recipient="known@example.org") == 250
    assert send(upgraded, "127.16.1.12", recipient="pending@example.org") == 250
    known, passed = decisions(logs)[-2:]
    assert (known["reason"], passed["reason"]) == ("known", "passed")
    assert "key" not in known and "key" not in passed
    assert "spf" not in known and "spf" not in passed     # decided without asking SPF


def test_no_spf_check_for_trusted_or_whitelisted_clients(start_greyd, upstream, dns_server,
                                                          logs):
    g = start(start_greyd, upstream, dns_server,
              relay={"domains": ["example.org"], "clients": ["127.30.0.0/16"]})
    g.whitelist("client", "127.31.0.0/16")
    g.whitelist("sender", f"@{DOMAIN}")
    assert send(g, "127.30.0.1", sender="a@other.example") == 250     # trusted
    assert send(g, "127.31.0.1", sender="a@other.example") == 250     # whitelisted client
    assert send(g, "127.16.1.10") == 250                               # whitelisted sender
    assert dns_server.count(DOMAIN, "TXT") == dns_server.count("other.example", "TXT") == 0
    assert [d["reason"] for d in decisions(logs)] == [
        "trusted-client", "whitelist:127.31.0.0/16", f"whitelist:@{DOMAIN}"]


def test_an_spf_result_is_cached_per_client_and_domain(start_greyd, upstream, dns_server, logs):
    g = start(start_greyd, upstream, dns_server)
    for recipient in ("a@example.org", "b@example.org", "c@example.org"):
        assert send(g, "127.16.1.10", recipient=recipient) == 451
    # The record has TTL 0, so each evaluation asks for it: once for the
    # client, once for the canary address that shows it does not pass everyone.
    assert dns_server.count(DOMAIN, "TXT") == 2
    assert send(g, "127.16.1.11") == 451
    assert dns_server.count(DOMAIN, "TXT") == 4           # another client: checked again


def test_explain_shows_the_spf_result_and_the_key(tmp_path, dns_server, clock):
    from greyd.cli import cli
    from click.testing import CliRunner
    path = write_config(tmp_path, 10025, dns={"enabled": True,
                                              "nameservers": [dns_server.address]})
    created_database(tmp_path)
    result = CliRunner().invoke(cli, ["-c", str(path), "explain", "--client", "127.16.1.10",
                                      "--sender", f"news@{DOMAIN}", "--recipient",
                                      "bob@example.org", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["spf"] == "pass (pool.example)"
    assert report["triplet"] == "spf:pool.example news@pool.example bob@example.org"
    assert report["network"] == "127.16.1.0/24"


# -- the pieces ----------------------------------------------------------------------------

@pytest.mark.parametrize("sender, helo, domain", [
    ("a@Pool.Example", "x", "pool.example"),
    ("a@bücher.example", "x", "xn--bcher-kva.example"),
    ("", "mail.pool.example.", "mail.pool.example"),
    ("", "[127.0.0.1]", None), ("", "localhost", None), ("", "192.0.2.1", None),
    ("postmaster", "mail.pool.example", None),
])
def test_the_identity_spf_checks(sender, helo, domain):
    assert identity(sender, helo) == domain


def test_keys_follow_client_key_order():
    request = policy.Request("127.16.1.10", "a@pool.example", "b@example.org",
                             spf="pass", spf_domain="pool.example")
    rules = policy.Rules()
    assert [t.network for t in policy.keys(request, rules).triplets] == [
        "spf:pool.example", "127.16.1.0/24"]
    only_network = policy.Rules(client_key=("network",))
    assert [t.network for t in policy.keys(request, only_network).triplets] == ["127.16.1.0/24"]
    failed = request._replace(spf="softfail")
    assert [t.network for t in policy.keys(failed, rules).triplets] == ["127.16.1.0/24"]


@pytest.mark.parametrize("value, problem", [
    ('["spf"]', 'must end with "network"'), ('["network", "spf"]', 'must end with "network"'),
    ('["spf", "spf", "network"]', "names a key twice"), ('["ptr", "network"]', "must be one of"),
    ("[]", 'must end with "network"'),
])
def test_client_key_is_checked(tmp_path, value, problem):
    path = tmp_path / "greyd.toml"
    path.write_text(f"[greylist]\nclient_key = {value}\n")
    with pytest.raises(configuration.ConfigError, match=r"^greylist\.client_key: .*" + problem):
        configuration.load(path)


# -- mode = "suspicious", and the "name" key --------------------------------------------------

def verified(server: DnsServer, address: str, name: str) -> None:
    """A forward-confirmed reverse name for an IPv4 `address`."""
    reverse = ".".join(reversed(address.split("."))) + ".in-addr.arpa"
    server.add(reverse, "PTR", name + ".")
    server.add(name, "A", address)


def suspicious(start_greyd, upstream, dns_server, **greylist):
    return start(start_greyd, upstream, dns_server, greylist={"mode": "suspicious", **greylist})


def test_a_client_with_nothing_suspicious_is_not_delayed_and_earns_the_auto_whitelist(
        start_greyd, upstream, dns_server, logs):
    verified(dns_server, "127.16.1.10", "mail-a17.out.pool.example")
    g = suspicious(start_greyd, upstream, dns_server)
    assert send(g, "127.16.1.10") == 250
    [decision] = decisions(logs)
    assert (decision["reason"], decision["spf"]) == ("not-suspicious", "pass:pool.example")
    assert len(upstream.wait_for(1)) == 1
    count = g.store().conn.execute("SELECT count FROM auto_whitelist").fetchall()
    assert count == [(1,)]
    assert g.store().conn.execute("SELECT count(*) FROM triplets").fetchone() == (0,)


@pytest.mark.parametrize("setup, helo, rule", [
    (None, "mail.pool.example", "no-name"),
    ("dyn-42.pool.example", "mail.pool.example", "dynamic-name"),
    ("pool-127-16-1-10.isp.example", "mail.pool.example", "dynamic-name"),
    ("mail-a17.out.pool.example", "mailer", "helo-bare"),
    ("mail-a17.out.pool.example", "[192.0.2.1]", "helo-literal"),
    ("mail-a17.out.pool.example", "mx.greyd.test", "helo-ours"),
    ("mail-a17.out.pool.example", "example.org", "helo-ours"),
])
def test_a_suspicious_client_is_greylisted_and_the_rule_named(start_greyd, upstream, dns_server,
                                                              logs, setup, helo, rule):
    if setup:
        verified(dns_server, "127.16.1.10", setup)
    g = suspicious(start_greyd, upstream, dns_server)
    assert send(g, "127.16.1.10", helo=helo) == 451
    assert decisions(logs)[0]["reason"] == f"new,suspicious:{rule}"


@pytest.mark.parametrize("record, rule", [("v=spf1 ~all", "spf-softfail"),
                                          ("v=spf1 -all", "spf-fail")])
def test_an_spf_failure_makes_a_named_client_suspicious(start_greyd, upstream, dns_server, logs,
                                                        record, rule):
    verified(dns_server, "127.16.1.10", "mail-a17.out.pool.example")
    dns_server.add(DOMAIN, "TXT", f'"{record}"')
    g = suspicious(start_greyd, upstream, dns_server)
    assert send(g, "127.16.1.10") == 451
    assert decisions(logs)[0]["reason"] == f"new,suspicious:{rule}"


def test_a_dnsbl_listing_makes_a_named_client_suspicious(start_greyd, upstream, dns_server,
                                                         logs):
    verified(dns_server, "127.16.1.10", "mail-a17.out.pool.example")
    dns_server.add("10.1.16.127.bl.test", "A", "127.0.0.2")
    g = start_greyd(upstream.port, dns={"enabled": True, "nameservers": [dns_server.address],
                                        "dnsbl": ["bl.test"]},
                    greylist={"mode": "suspicious", "auto_whitelist_after": 0})
    assert send(g, "127.16.1.10") == 451
    assert decisions(logs)[0]["reason"] == "new,dnsbl:bl.test,suspicious:dnsbl"


def test_the_name_key_joins_the_hosts_of_one_registered_domain(start_greyd, upstream,
                                                               dns_server, clock, logs):
    dns_server.remove(DOMAIN, "TXT")                       # no SPF: the name decides
    verified(dns_server, "127.16.1.10", "mail-a17.out.pool.example")
    verified(dns_server, "127.17.2.20", "mail-b3.out.pool.example")
    verified(dns_server, "127.18.3.30", "dsl-127-18-3-30.pool.example")    # looks dynamic
    g = start(start_greyd, upstream, dns_server, greylist={"client_key": ["name", "network"]})
    assert send(g, "127.16.1.10") == 451
    clock.advance(301)
    assert send(g, "127.17.2.20") == 250
    assert send(g, "127.18.3.30", recipient="carol@example.org") == 451
    first, retry, dynamic = decisions(logs)
    assert first["key"] == retry["key"] == "name:pool.example"
    assert (retry["reason"], retry["delay"]) == ("passed", "301")
    assert "key" not in dynamic                           # keyed by its network


def test_explain_names_the_suspicion_rule(tmp_path, dns_server):
    from greyd.cli import cli
    from click.testing import CliRunner
    path = write_config(tmp_path, 10025, dns={"enabled": True,
                                              "nameservers": [dns_server.address]},
                        greylist={"mode": "suspicious"})
    created_database(tmp_path)
    result = CliRunner().invoke(cli, ["-c", str(path), "explain", "--client", "127.16.1.10",
                                      "--sender", f"news@{DOMAIN}", "--recipient",
                                      "bob@example.org", "--helo", "mail.pool.example"])
    assert result.exit_code == 0, result.output
    assert "reason:     new,suspicious:no-name" in result.output
    assert "spf:        pass (pool.example)" in result.output


@pytest.mark.parametrize("record", ["v=spf1 +all", "v=spf1 ip4:0.0.0.0/0 ip6:::/0 -all"])
def test_a_record_that_authorizes_everyone_keeps_a_botnet_on_the_network_key(
        start_greyd, upstream, dns_server, clock, logs, record):
    """A spammer's domain whose SPF passes any address: a bot retrying from
    another network is a new triplet, as without SPF."""
    dns_server.remove(DOMAIN, "TXT")
    dns_server.add(DOMAIN, "TXT", f'"{record}"')
    g = start(start_greyd, upstream, dns_server)
    assert send(g, "127.16.1.10") == 451
    clock.advance(301)
    assert send(g, "127.17.2.20") == 451
    first, retry = decisions(logs)
    assert first["spf"] == retry["spf"] == "pass-any:pool.example"
    assert "key" not in first and retry["reason"] == "new"
    assert upstream.messages == []

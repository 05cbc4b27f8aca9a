"""greyd.suspicion: the rules of `[greylist] mode = "suspicious"`, on literal names.

Names are real-world shapes (ISP pools that should be greylisted, big senders'
outbound hosts that should not); addresses come from the documentation ranges
unless a real name only makes sense with the address it was made from.
"""

import ast
import pathlib
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from greyd import suspicion as suspicion_module
from greyd.suspicion import (DYNAMIC_WORDS, helo_rule, looks_dynamic, registered_domain,
                             suspicion)

pytestmark = pytest.mark.timeout(30)

CLIENT = "192.0.2.10"
CLIENT6 = "2001:db8::1"
OTHER = "198.51.100.7"            # an address no name below spells out
OWN = ("mx.example.org", "example.org", ".example.net")


# -- looks_dynamic: the client's address, spelled out ------------------------

@pytest.mark.parametrize("name", [
    "192-0-2-10.dyn.example.net",
    "192.0.2.10.example.net",
    "mail_192_0_2_10.example.net",
    "10-2-0-192.example.net",                # reversed
    "static.10.2.0.192.clients.your-server.de",
    "192-000-002-010.example.net",           # zero-padded
    "x192000002010.example.net",
    "n3221225994.example.net",               # one decimal number
    "pc3221225994x.example.net",
    "c000020a.example.net",                  # eight hex digits
    "IPC000020A.Example.NET.",               # case and a trailing dot do not matter
    "h0-2-10.example.net",                   # the last three octets, next to letters
    "10-2-0-h.example.net",
])
def test_name_spelling_the_ipv4_address_is_dynamic(name):
    assert looks_dynamic(name, CLIENT)


@pytest.mark.parametrize("name", [
    "2001-db8--1.example.net",
    "2001-0db8-0000-0000-0000-0000-0000-0001.example.net",
    "2001-db8-0-0-0-0-0-1.example.net",
    "v6-20010db8000000000000000000000001.example.net",
])
def test_name_spelling_the_ipv6_address_is_dynamic(name):
    assert looks_dynamic(name, CLIENT6)


def test_ipv4_mapped_client_is_its_ipv4_address():
    assert looks_dynamic("c-192-0-2-10.example.net", "::ffff:192.0.2.10")


@pytest.mark.parametrize("name, client", [
    ("192-0-2-10.dyn.example.net", "192.0.2.10"),
    ("c-73-15-22-4.hsd1.ca.comcast.net", "73.15.22.4"),
    ("dsl-187-141-12-5-dyn.prod-infinitum.com.mx", "187.141.12.5"),
    ("host86-150-12-7.range86-150.btcentralplus.com", "86.150.12.7"),
    ("pool-71-105-44-12.nycmny.fios.verizon.net", "71.105.44.12"),
    ("ppp-94-65-12-3.home.otenet.gr", "94.65.12.3"),
    ("static-203-0-113-7.example.net", "203.0.113.7"),
    ("cpe-172-100-1-2.twcny.res.rr.com", "172.100.1.2"),
    ("ip5f5a0a1b.dynamic.kabel-deutschland.de", "95.90.10.27"),
    ("p5B5A0A1B.dip0.t-ipconnect.de", "91.90.10.27"),
    ("ec2-54-1-2-3.compute-1.amazonaws.com", "54.1.2.3"),
])
def test_isp_pool_names_are_dynamic(name, client):
    assert looks_dynamic(name, client)


@pytest.mark.parametrize("name, client", [
    ("192-0-2-11.example.net", CLIENT),      # a neighbour's name, no word in it
    ("192-0-2-100.example.net", CLIENT),     # digits run on: another address
    ("1192-0-2-10.example.net", CLIENT),
    ("c000020b.example.net", CLIENT),
    ("2001-db8--10.example.net", CLIENT6),
    ("2001-db8--1.example.net", "2001:db8::1:0"),
])
def test_other_addresses_are_not_the_clients(name, client):
    assert not looks_dynamic(name, client)


# -- looks_dynamic: generic words next to digits -------------------------------

@pytest.mark.parametrize("word", DYNAMIC_WORDS)
def test_each_word_next_to_digits_is_dynamic(word):
    assert looks_dynamic(f"{word}-12.example.net", OTHER)
    assert looks_dynamic(f"{word}123.example.net", OTHER)
    assert looks_dynamic(f"x-12-{word}.example.net", OTHER)
    assert looks_dynamic(f"a.b7_{word}.example.net", OTHER)


@pytest.mark.parametrize("word", DYNAMIC_WORDS)
def test_each_word_without_digits_is_not_dynamic(word):
    assert not looks_dynamic(f"mail.{word}.example.net", OTHER)
    assert not looks_dynamic(f"{word}-mail.example7.net", OTHER)   # digits in another label


@pytest.mark.parametrize("name", [
    "dyn-12.example.net", "dhcp123.example.net", "pool-71-2.example.net",
    "static-2.example.net", "host-12.example.net", "ip-10-0-0-1.ec2.internal",
    "client-123.example.net", "ppp-45.example.net", "dhcp-5-6.example.org",
    "dynamicip-7.example.net", "dslpool12.example.net",      # words run together
    "cpc91234-brnt4-2-0-cust123.4-2.cable.virginm.net",
])
def test_words_next_to_digits(name):
    assert looks_dynamic(name, OTHER)


@pytest.mark.parametrize("name, client", [
    ("mail-sor-f41.google.com", "209.85.220.41"),
    ("mail-ej1-f54.google.com", "209.85.218.54"),
    ("a8-27.smtp-out.amazonses.com", "54.240.8.27"),           # last two octets only
    ("mail132-5.atl131.mcdlv.net", "198.2.132.5"),
    ("o1.ptr1234.example.net", "192.0.2.1"),
    ("mx.example.org", "192.0.2.1"),
    ("smtp2.example.com", "192.0.2.1"),
    ("mail.host-europe.de", "192.0.2.1"),
    ("mail-am6eur05on2102.outbound.protection.outlook.com", "40.107.22.102"),
    ("mta-65-12.sendgrid.net", "192.0.65.12"),
    ("mx0a-00123401.pphosted.com", "192.0.2.1"),
    ("sonic301-20.consmr.mail.ne1.yahoo.com", "192.0.2.1"),
    ("chip7.example.net", "192.0.2.1"),                        # 'ip' inside a word
    ("resolver1.example.net", "192.0.2.1"),                    # 'res' inside a word
    ("static.example.com", "192.0.2.1"),
])
def test_mail_server_names_are_not_dynamic(name, client):
    assert not looks_dynamic(name, client)


def test_a_client_that_is_no_address_only_checks_words():
    assert not looks_dynamic("192-0-2-10.example.net", "unknown")
    assert looks_dynamic("dyn-1.example.net", "unknown")


IPV4 = st.ip_addresses(v=4).map(str)


@given(IPV4)
def test_dashed_ipv4_under_a_fixed_domain_is_always_dynamic(client):
    assert looks_dynamic(client.replace(".", "-") + ".example.net", client)


@given(IPV4, st.sampled_from("-._"), st.booleans(), st.sampled_from(["", "c-", "x"]))
def test_every_separator_and_order_is_dynamic(client, sep, reverse, prefix):
    octets = client.split(".")
    spelled = sep.join(octets[::-1] if reverse else octets)
    assert looks_dynamic(f"{prefix}{spelled}.example.net", client)


@given(st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str))
def test_dashed_ipv6_is_always_dynamic(client):
    assert looks_dynamic(client.replace(":", "-") + ".example.net", client)


@given(st.from_regex(r"[g-z]{1,12}(-[g-z]{1,12})?(\.[g-z]{1,12}){1,3}", fullmatch=True), IPV4)
def test_a_name_without_digits_is_never_dynamic(name, client):
    """Letters from g on: a-f could spell an address in hex."""
    assert not looks_dynamic(name, client)


# -- helo_rule ----------------------------------------------------------------

@pytest.mark.parametrize("helo", ["localhost", "User", "ylmf-pc", "WIN-7GH2K", ""])
def test_bare_word_helo(helo):
    assert helo_rule(helo, CLIENT, OWN) == "helo-bare"


@pytest.mark.parametrize("helo", [
    "[192.0.2.11]", "[IPv6:2001:db8::2]", "198.51.100.7", "2001:db8::2", "[not an address]",
    "[ipv6:192.0.2.10x]",
])
def test_literal_other_than_the_client(helo):
    assert helo_rule(helo, CLIENT, OWN) == "helo-literal"


@pytest.mark.parametrize("helo, client", [
    ("[192.0.2.10]", CLIENT),
    ("192.0.2.10", CLIENT),                   # unbracketed, but its own
    ("[IPv6:2001:db8::1]", CLIENT6),
    ("[ipv6:2001:0DB8:0:0::1]", CLIENT6),     # another spelling of the same address
    ("[192.0.2.10]", "::ffff:192.0.2.10"),
    ("[IPv6:::ffff:192.0.2.10]", CLIENT),
])
def test_clients_own_literal_is_accepted(helo, client):
    """RFC 5321 4.1.4: a client with no name may give its address as a literal."""
    assert helo_rule(helo, client, OWN) is None


@pytest.mark.parametrize("helo", ["mx.example.org", "MX.Example.ORG.", "example.org", "example.net"])
def test_helo_claiming_our_names(helo):
    assert helo_rule(helo, CLIENT, OWN) == "helo-ours"


def test_own_names_compare_as_a_labels():
    assert helo_rule("xn--bcher-kva.example", CLIENT, ["bücher.example"]) == "helo-ours"


@pytest.mark.parametrize("helo", ["mail.sender.example", "sub.example.org", "smtp2.example.com."])
def test_a_normal_fqdn_is_accepted(helo):
    assert helo_rule(helo, CLIENT, OWN) is None


# -- suspicion: the first rule that holds ---------------------------------------

FINE = dict(client=CLIENT, helo="mail.sender.example", name="mail.sender.example",
            dnsbl=None, spf="pass", own_names=OWN)


def test_a_well_named_client_is_not_suspicious():
    assert suspicion(**FINE) is None


@pytest.mark.parametrize("spf", ["pass", "neutral", "none", "temperror", "permerror", ""])
def test_spf_results_other_than_fail_are_no_reason(spf):
    assert suspicion(**{**FINE, "spf": spf}) is None


# Each row breaks one more rule than the row below it; the first broken wins.
ORDER = [
    ("dnsbl", dict(dnsbl="zen.example")),
    ("no-name", dict(name=None)),
    ("dynamic-name", dict(name="192-0-2-10.pool.example.net")),
    ("spf-fail", dict(spf="fail")),
    ("spf-softfail", dict(spf="softfail")),
    ("helo-bare", dict(helo="localhost")),
    ("helo-literal", dict(helo="[198.51.100.7]")),
    ("helo-ours", dict(helo="mx.example.org")),
]


@pytest.mark.parametrize("at", range(len(ORDER)))
def test_suspicion_order(at):
    arguments = dict(FINE)
    for _, broken in reversed(ORDER[at:]):
        arguments.update(broken)
    assert suspicion(**arguments) == ORDER[at][0]


def test_an_empty_name_is_no_name():
    assert suspicion(**{**FINE, "name": ""}) == "no-name"


def test_an_empty_dnsbl_zone_is_not_a_listing():
    assert suspicion(**{**FINE, "dnsbl": ""}) is None


# -- registered_domain ------------------------------------------------------------

@pytest.mark.parametrize("name, domain", [
    ("mail-a12.out.example.co.uk", "example.co.uk"),
    ("example.co.uk", "example.co.uk"),
    ("MX.Example.COM.", "example.com"),
    ("mail-sor-f41.google.com", "google.com"),
    ("a8-27.smtp-out.amazonses.com", "amazonses.com"),
    ("c-73-15-22-4.hsd1.ca.comcast.net", "comcast.net"),
    ("cpe-172-100-1-2.twcny.res.rr.com", "rr.com"),
    ("mail.city.kawasaki.jp", "city.kawasaki.jp"),   # an exception rule (!city.kawasaki.jp)
    ("a.b.c.kawasaki.jp", "b.c.kawasaki.jp"),        # a wildcard rule (*.kawasaki.jp)
    ("mail.bücher.de", "bücher.de"),
])
def test_registered_domain(name, domain):
    assert registered_domain(name) == domain


@pytest.mark.parametrize("name", ["co.uk", "com", "uk", "github.io", "localhost", "", "."])
def test_a_public_suffix_has_no_registered_domain(name):
    assert registered_domain(name) is None


# -- the module's place -------------------------------------------------------------

def test_does_not_import_policy():
    """policy imports suspicion; the other way round would be a cycle."""
    tree = ast.parse(pathlib.Path(suspicion_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    outside = {name for name in imported if name not in sys.stdlib_module_names}
    assert outside <= {"publicsuffixlist", ".", ".ip", ".idn"}


def test_words_are_lower_case_and_unique():
    assert all(word.isalpha() and word == word.lower() for word in DYNAMIC_WORDS)
    assert len(set(DYNAMIC_WORDS)) == len(DYNAMIC_WORDS)
    assert {"dyn", "dhcp", "dsl", "pool", "ppp", "cable", "client", "host", "ip", "static",
            "broadband"} <= set(DYNAMIC_WORDS)

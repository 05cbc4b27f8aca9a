"""greyd.policy: the decision of SPEC §5, driven with literal times.

The policy alone: `judge` and the pieces of a triplet are pure; `decide`
reads what a store would hold from conftest's MemoryFacts, given as literals,
so no test here opens a database. The policy deciding on what a real store
remembers of earlier decisions (recording, the auto-whitelist's counting) is
tested in test_store.py.
"""

import dataclasses
import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import MemoryFacts
from greyd import config as configuration
from greyd import policy
from greyd.policy import (
    ACCEPT, GREYLIST, REJECT, TEMPFAIL, AutoEntry, Request, Rules, Seen, Triplet,
    client_network, decide, domain_matches, judge, normalize_sender, relay_allowed,
    without_store)
from greyd.whitelist import Entry, Whitelist

pytestmark = pytest.mark.timeout(30)

T = 1_700_000_000            # a Tuesday, 22:13:20 UTC; the tests' "now"
HOUR, DAY = 3600, 86400

STRANGER = "198.51.100.7"    # neither trusted nor whitelisted
STRANGER_NET = "198.51.100.0/24"
TRUSTED = "192.0.2.10"

RULES = Rules(
    delay=300, retry_window=2 * DAY, max_age=35 * DAY, auto_whitelist_after=5,
    relay_domains=("localhost", "example.org", ".example.net"),
    relay_clients=(ipaddress.ip_network("192.0.2.0/24"),
                   ipaddress.ip_network("2001:db8:ffff::/48")))


def rules(**changes) -> Rules:
    return dataclasses.replace(RULES, **changes)


def request(client=STRANGER, sender="alice@sender.example", recipient="bob@example.org",
            **extra) -> Request:
    return Request(client, sender, recipient, **extra)


# -- judge: the triplet step alone -------------------------------------------

JUDGE_RULES = Rules(delay=300, retry_window=4 * HOUR, max_age=35 * DAY)


def test_judge_unknown_triplet_is_new():
    verdict = judge(None, now=T, rules=JUDGE_RULES)
    assert (verdict.action, verdict.reason) == (GREYLIST, "new")
    assert verdict.retry_in == 300
    assert verdict.delayed == 0
    assert verdict.update == policy.NEW


@pytest.mark.parametrize("now, retry_in", [(0, 300), (100, 200), (299, 1)])
def test_judge_too_early_counts_down(now, retry_in):
    verdict = judge(Seen(first=0, last=0), now=now, rules=JUDGE_RULES)
    assert (verdict.action, verdict.reason) == (GREYLIST, "too-early")
    assert verdict.retry_in == retry_in
    assert verdict.delayed == now
    assert verdict.update == policy.EARLY


def test_judge_exactly_at_delay_passes():
    verdict = judge(Seen(first=0, last=100), now=300, rules=JUDGE_RULES)
    assert (verdict.action, verdict.reason) == (ACCEPT, "passed")
    assert verdict.delayed == 300
    assert verdict.retry_in == 0
    assert verdict.update == policy.PASS


def test_judge_at_retry_window_edge_still_passes():
    verdict = judge(Seen(first=0, last=0), now=4 * HOUR, rules=JUDGE_RULES)
    assert (verdict.action, verdict.reason) == (ACCEPT, "passed")
    assert verdict.delayed == 4 * HOUR
    assert verdict.update == policy.PASS


def test_judge_after_retry_window_starts_over():
    verdict = judge(Seen(first=0, last=0), now=4 * HOUR + 1, rules=JUDGE_RULES)
    assert (verdict.action, verdict.reason) == (GREYLIST, "expired-retry")
    assert verdict.retry_in == 300
    assert verdict.update == policy.RESTART


@pytest.mark.parametrize("now", [1001, 1000 + 10 * DAY, 1000 + 35 * DAY])
def test_judge_passed_triplet_seen_within_max_age_is_known(now):
    verdict = judge(Seen(first=0, last=1000, passed=300), now=now, rules=JUDGE_RULES)
    assert (verdict.action, verdict.reason) == (ACCEPT, "known")
    assert verdict.update == policy.KNOWN
    assert verdict.retry_in == 0


def test_judge_passed_triplet_unseen_past_max_age_is_forgotten():
    seen = Seen(first=0, last=1000, passed=300)
    verdict = judge(seen, now=1000 + 35 * DAY + 1, rules=JUDGE_RULES)
    assert (verdict.action, verdict.reason) == (GREYLIST, "new")
    assert verdict.retry_in == 300
    assert verdict.update == policy.NEW


def test_judge_pending_triplet_retried_late_is_not_known_even_if_recently_seen():
    # last_seen refreshed by early retries does not stretch the retry window
    seen = Seen(first=0, last=4 * HOUR)
    verdict = judge(seen, now=4 * HOUR + 10, rules=JUDGE_RULES)
    assert verdict.reason == "expired-retry"


# -- decide: the whole order, on facts in memory ------------------------------------

TRIPLET = Triplet(STRANGER_NET, "alice@sender.example", "bob@example.org")   # request()'s


def test_a_new_triplet_is_greylisted_and_keyed_by_network_sender_and_recipient():
    v = decide(request(), RULES, MemoryFacts(), T)
    assert (v.action, v.reason, v.retry_in) == (GREYLIST, "new", 300)
    assert v.network == STRANGER_NET
    assert v.triplet == TRIPLET
    assert v.update == policy.NEW


@pytest.mark.parametrize("seen, now, expected", [
    (Seen(first=T, last=T), T + 100, (GREYLIST, "too-early", 200, 100, policy.EARLY)),
    (Seen(first=T, last=T + 100), T + 300, (ACCEPT, "passed", 0, 300, policy.PASS)),
    (Seen(first=T, last=T + 300, passed=T + 300), T + 10 * DAY,
     (ACCEPT, "known", 0, 0, policy.KNOWN)),
    (Seen(first=T, last=T), T + 2 * DAY + 1, (GREYLIST, "expired-retry", 300, 0, policy.RESTART)),
    (Seen(first=T, last=T + 300, passed=T + 300), T + 300 + 35 * DAY + 1,
     (GREYLIST, "new", 300, 0, policy.NEW)),
], ids=["too-early", "passed", "known", "expired-retry", "forgotten"])
def test_a_known_triplet_is_judged_by_what_is_known_of_it(seen, now, expected):
    v = decide(request(), RULES, MemoryFacts(triplets={TRIPLET: seen}), now)
    assert (v.action, v.reason, v.retry_in, v.delayed, v.update) == expected
    assert v.triplet == TRIPLET


def test_same_client_network_shares_the_triplet():
    facts = MemoryFacts(triplets={TRIPLET: Seen(first=T, last=T)})    # 198.51.100.7, at T
    v = decide(request(client="198.51.100.200"), RULES, facts, T + 300)
    assert (v.action, v.reason) == (ACCEPT, "passed")


def test_triplet_is_case_insensitive_and_sender_normalized():
    first = decide(request(sender="prvs=0123abcdef=Alice@Sender.Example",
                           recipient="Bob@Example.ORG"), RULES, MemoryFacts(), T)
    facts = MemoryFacts(triplets={first.triplet: Seen(first=T, last=T)})
    v = decide(request(sender="prvs=9876fedcba=alice@sender.example",
                       recipient="bob@example.org"), RULES, facts, T + 300)
    assert (v.action, v.reason) == (ACCEPT, "passed")


def test_relay_denied_for_foreign_domain():
    v = decide(request(recipient="victim@elsewhere.example"), RULES, MemoryFacts(), T)
    assert (v.action, v.reason) == (REJECT, "relay-denied")
    assert v.triplet is None and v.update == policy.NOTHING


def test_relay_check_comes_before_any_whitelist():
    facts = MemoryFacts(entries=[Entry("client", STRANGER), Entry("sender", "@sender.example"),
                                 Entry("recipient", "@elsewhere.example")])
    v = decide(request(recipient="victim@elsewhere.example", dnswl="list.dnswl.example"),
               RULES, facts, T)
    assert (v.action, v.reason) == (REJECT, "relay-denied")


@pytest.mark.parametrize("recipient", [
    "anyone@elsewhere.example", "bob@example.org", "user%evil.com@localhost", "user"])
def test_trusted_client_may_send_anywhere(recipient):
    v = decide(request(client=TRUSTED, recipient=recipient), RULES, MemoryFacts(), T)
    assert (v.action, v.reason) == (ACCEPT, "trusted-client")
    assert v.triplet is None


def test_trusted_ipv6_client():
    v = decide(request(client="2001:db8:ffff:1::25", recipient="x@elsewhere.example"),
               RULES, MemoryFacts(), T)
    assert (v.action, v.reason) == (ACCEPT, "trusted-client")


@pytest.mark.parametrize("recipient", ["postmaster", "Postmaster", "POSTMASTER"])
def test_bare_postmaster_is_accepted_from_anyone(recipient):
    v = decide(request(recipient=recipient), RULES, MemoryFacts(), T)
    assert (v.action, v.reason) == (ACCEPT, "whitelist:postmaster")


def test_postmaster_at_a_foreign_domain_is_still_relay_denied():
    v = decide(request(recipient="postmaster@elsewhere.example"), RULES, MemoryFacts(), T)
    assert (v.action, v.reason) == (REJECT, "relay-denied")


WHITELIST_CASES = [
    # kind, value, request overrides
    ("client", "198.51.100.7", {}),
    ("client", "198.51.100.7/32", {}),
    ("client", "198.51.100.0/24", {}),
    ("client", "198.51.0.0/16", {}),
    ("client", "198.51.100.7", {"client": "::ffff:198.51.100.7"}),
    ("client", "2001:db8:1:2::25", {"client": "2001:db8:1:2::25"}),
    ("client", "2001:db8::/32", {"client": "2001:db8:1:2::25"}),
    ("sender", "alice@sender.example", {}),
    ("sender", "alice@sender.example", {"sender": "Alice@SENDER.example"}),
    ("sender", "@sender.example", {}),
    ("sender", "alice@", {"sender": "alice@other.example"}),
    ("recipient", "bob@example.org", {}),
    ("recipient", "@example.org", {"recipient": "carol@example.org"}),
    ("recipient", "bob@", {"recipient": "bob@localhost"}),
    ("recipient", "abuse@", {"recipient": "abuse@example.org"}),
    ("hostname", "mx.sender.example", {"client_name": "MX.sender.example."}),
    ("hostname", ".sender.example", {"client_name": "sender.example"}),
    ("hostname", ".sender.example", {"client_name": "out-7.mx.sender.example"}),
    ("hostname", r"/^out-\d+\.mx\.sender\.example$/", {"client_name": "out-7.mx.sender.example"}),
    # recipient patterns: re.search in the address as greyd keys it (idn.address_key)
    ("recipient", "/^postmaster@/", {"recipient": "Postmaster@Example.ORG"}),
    ("recipient", r"/^abuse@.*\.example\.net$/", {"recipient": "abuse@lists.example.net"}),
    ("recipient", r"/^ABUSE@.*\.EXAMPLE\.NET$/", {"recipient": "abuse@lists.example.net"}),
    ("recipient", "/list-/", {"recipient": "my-list-x@example.org"}),     # anchored as written
    ("recipient", r"/^bob@xn--bcher-kva\.example\.net$/", {"recipient": "Bob@B\u00fccher.example.net"}),
]


@pytest.mark.parametrize("kind, value, overrides", WHITELIST_CASES)
def test_static_whitelist_accepts(kind, value, overrides):
    req = request(**overrides)
    assert decide(req, RULES, MemoryFacts(), T).action == GREYLIST
    v = decide(req, RULES, MemoryFacts(entries=[Entry(kind, value)]), T)
    assert (v.action, v.reason) == (ACCEPT, f"whitelist:{value}")
    assert v.triplet is None and v.update == policy.NOTHING


@pytest.mark.parametrize("kind, value, overrides", [
    ("client", "198.51.100.8", {}),
    ("client", "198.51.101.0/24", {}),
    ("client", "2001:db8:1:3::/64", {"client": "2001:db8:1:2::25"}),
    ("sender", "alice@sender.example", {"sender": "alice@other.example"}),
    ("sender", "@sender.example", {"sender": "alice@sub.sender.example"}),
    ("sender", "alice@", {"sender": "malice@sender.example"}),
    ("sender", "@sender.example", {"sender": ""}),
    ("recipient", "bob@example.org", {"recipient": "bob@sub.example.net"}),
    ("hostname", "mx.sender.example", {}),     # no verified name: hostnames can't match
    ("hostname", "mx.sender.example", {"client_name": "evil-mx.sender.example"}),
    ("hostname", ".sender.example", {"client_name": "sender.example.evil"}),
    ("recipient", "/^postmaster@/", {"recipient": "webmaster@example.org"}),
    ("recipient", "/^postmaster@/", {"recipient": "not-postmaster@example.org"}),
    ("recipient", r"/^abuse@.*\.example\.net$/", {"recipient": "abuse@example.org"}),
    ("recipient", "/^bob@/", {"sender": "bob@sender.example", "recipient": "carol@example.org"}),
])
def test_static_whitelist_does_not_overreach(kind, value, overrides):
    v = decide(request(**overrides), RULES, MemoryFacts(entries=[Entry(kind, value)]), T)
    assert (v.action, v.reason) == (GREYLIST, "new")


def test_expired_whitelist_entry_does_not_match():
    facts = MemoryFacts(entries=[Entry("client", STRANGER, expires=T - 1),
                                 Entry("sender", "alice@sender.example", expires=T)])
    v = decide(request(), RULES, facts, T)
    assert (v.action, v.reason) == (GREYLIST, "new")


def test_whitelist_entry_matches_until_it_expires():
    facts = MemoryFacts(entries=[Entry("sender", "@sender.example", expires=T + 60)])
    assert decide(request(), RULES, facts, T + 59).reason == "whitelist:@sender.example"
    assert decide(request(), RULES, facts, T + 60).reason == "new"


def test_whitelist_comes_before_dnswl():
    facts = MemoryFacts(entries=[Entry("client", STRANGER_NET)])
    v = decide(request(dnswl="list.dnswl.example"), RULES, facts, T)
    assert v.reason == f"whitelist:{STRANGER_NET}"


def test_dnswl_listed_client_is_accepted():
    v = decide(request(dnswl="list.dnswl.example"), RULES, MemoryFacts(), T)
    assert (v.action, v.reason) == (ACCEPT, "dnswl:list.dnswl.example")
    assert v.triplet is None and v.update == policy.NOTHING


AUTO2 = rules(auto_whitelist_after=2)
EARNED = AutoEntry(count=2, last_seen=T)       # two passed deliveries, the last at T


def test_an_auto_whitelisted_network_skips_its_triplets():
    facts = MemoryFacts(networks={STRANGER_NET: EARNED})
    v = decide(request(sender="c@sender.example"), AUTO2, facts, T + 100)
    assert (v.action, v.reason) == (ACCEPT, "auto-whitelist")
    assert v.update == policy.AUTO and v.triplet is None
    # any address in the same network benefits
    other = request(client="198.51.100.250", sender="z@other.example", recipient="x@localhost")
    assert decide(other, AUTO2, facts, T + 200).reason == "auto-whitelist"


def test_a_network_short_of_auto_whitelist_after_goes_through_its_triplets():
    facts = MemoryFacts(networks={STRANGER_NET: AutoEntry(count=1, last_seen=T)})
    v = decide(request(sender="c@sender.example"), AUTO2, facts, T + 100)
    assert (v.action, v.reason) == (GREYLIST, "new")


def test_dnsbl_listed_client_is_never_auto_whitelisted():
    facts = MemoryFacts(networks={STRANGER_NET: EARNED})
    clean = request(sender="c@sender.example")
    assert decide(clean, AUTO2, facts, T + HOUR).reason == "auto-whitelist"

    listed = request(sender="c@sender.example", dnsbl="bl.example")
    v = decide(listed, AUTO2, facts, T + HOUR)
    assert v.action == GREYLIST
    assert v.reason.startswith("new") and "dnsbl:bl.example" in v.reason
    assert v.retry_in == 300
    facts.triplets[v.triplet] = Seen(first=T + HOUR, last=T + HOUR)   # as the store records it
    v = decide(listed, AUTO2, facts, T + HOUR + 100)
    assert v.action == GREYLIST
    assert v.reason.startswith("too-early") and "dnsbl:bl.example" in v.reason
    # it passes through its triplets like anyone new
    v = decide(listed, AUTO2, facts, T + HOUR + 300)
    assert (v.action, v.reason) == (ACCEPT, "passed")


def test_auto_whitelist_after_zero_disables_it():
    facts = MemoryFacts(networks={STRANGER_NET: EARNED})
    assert decide(request(sender="c@sender.example"), AUTO2, facts, T + HOUR).reason == \
        "auto-whitelist"
    off = rules(auto_whitelist_after=0)
    v = decide(request(sender="c@sender.example"), off, facts, T + HOUR)
    assert (v.action, v.reason) == (GREYLIST, "new")


def test_auto_whitelist_lapses_after_max_age():
    facts = MemoryFacts(networks={STRANGER_NET: EARNED})
    req = request(sender="c@sender.example")
    assert decide(req, AUTO2, facts, T + 35 * DAY).reason == "auto-whitelist"
    assert decide(req, AUTO2, facts, T + 35 * DAY + 1).reason == "new"


@pytest.mark.parametrize("recipient", [
    "user%evil.com@localhost",
    '"a@b"@localhost',
    '"user@elsewhere.example"@example.org',
    "evil.com!user@localhost",
    "@relay.example:user@localhost",
    "user",
    "user@[127.0.0.1]",
    "user@localhost.",
    "user@example.org.",
    "@localhost",
    "user@example.net",            # only its subdomains are relayed
    "user@xexample.net",
    "user@example.org.evil.example",
    "user@sub.example.org",        # example.org alone, not its subdomains
    "postmaster@",
])
def test_relay_check_is_strict(recipient):
    v = decide(request(recipient=recipient), RULES, MemoryFacts(), T)
    assert (v.action, v.reason) == (REJECT, "relay-denied")
    assert relay_allowed(recipient, RULES.relay_domains) is False


@pytest.mark.parametrize("recipient", [
    "user@localhost", "User@LocalHost", "user@example.org", "user@a.example.net",
    "user@b.a.example.net", "postmaster", "PostMaster", "postmaster@localhost",
    '"john doe"@example.org',
])
def test_relay_allowed(recipient):
    assert relay_allowed(recipient, RULES.relay_domains) is True


@pytest.mark.parametrize("domain, expected", [
    ("a.example.org", True),
    ("b.a.example.org", True),
    ("example.org", False),
    ("xexample.org", False),
    ("example.org.evil", False),
])
def test_leading_dot_pattern_matches_only_subdomains(domain, expected):
    assert domain_matches(domain, [".example.org"]) is expected


def test_plain_domain_pattern_matches_only_itself():
    assert domain_matches("example.org", ["example.org"])
    assert not domain_matches("a.example.org", ["example.org"])
    assert not domain_matches("example.org", [])


# -- without_store ------------------------------------------------------------------

def test_without_store_still_denies_relay():
    for setting in ("accept", "tempfail"):
        v = without_store(request(recipient="x@elsewhere.example"), RULES, setting)
        assert (v.action, v.reason) == (REJECT, "relay-denied")


def test_without_store_trusted_client_is_accepted():
    v = without_store(request(client=TRUSTED, recipient="x@elsewhere.example"),
                      RULES, "tempfail")
    assert (v.action, v.reason) == (ACCEPT, "trusted-client")


@pytest.mark.parametrize("setting, action", [("accept", ACCEPT), ("tempfail", TEMPFAIL)])
def test_without_store_follows_on_store_error(setting, action):
    v = without_store(request(), RULES, setting)
    assert (v.action, v.reason) == (action, "store-error")
    assert v.network == STRANGER_NET
    assert v.update == policy.NOTHING


# -- the pieces of a triplet -----------------------------------------------------

@pytest.mark.parametrize("client, v4, v6, expected", [
    ("192.0.2.7", 24, 64, "192.0.2.0/24"),
    ("192.0.2.7", 32, 64, "192.0.2.7/32"),
    ("192.0.2.7", 16, 64, "192.0.0.0/16"),
    ("2001:db8:1:2:3:4:5:6", 24, 64, "2001:db8:1:2::/64"),
    ("2001:db8:1:2:3:4:5:6", 24, 128, "2001:db8:1:2:3:4:5:6/128"),
    ("::ffff:192.0.2.7", 24, 64, "192.0.2.0/24"),
    ("::ffff:192.0.2.7", 32, 64, "192.0.2.7/32"),
    ("fe80::1%eth0", 24, 64, "fe80::/64"),
])
def test_client_network(client, v4, v6, expected):
    assert client_network(client, v4, v6) == expected


def test_client_network_unmaps_ipv4_mapped_ipv6():
    assert client_network("::ffff:192.0.2.7", 32, 128) == "192.0.2.7/32"
    assert client_network("2001:db8::1", 32, 128) == "2001:db8::1/128"


@given(st.ip_addresses(), st.integers(0, 32), st.integers(0, 128))
def test_client_network_contains_the_client(address, v4, v6):
    network = ipaddress.ip_network(client_network(str(address), v4, v6))
    assert (getattr(address, "ipv4_mapped", None) or address) in network
    if address.version == 6 and address.ipv4_mapped is not None:
        assert network.version == 4 and network.prefixlen == v4
    else:
        assert network.prefixlen == (v4 if address.version == 4 else v6)


@pytest.mark.parametrize("sender, expected", [
    ("Alice@Example.COM", "alice@example.com"),
    ("", "<>"),
    ("prvs=1234abcdef=user@example.com", "user@example.com"),
    ("PRVS=0123ABCDEF=User@Example.com", "user@example.com"),
    ("msprvs1=abcdefgh=user@example.com", "user@example.com"),
    ("msprvs1=1202020UU5ulBw=bounces-x@bounces.example.com", "bounces-x@bounces.example.com"),
    ("user+tag@x.example", "user@x.example"),
    ("user+tag+more@x.example", "user@x.example"),
    ("bounce-12345@lists.example", "bounce-#@lists.example"),
    ("owner-list-2024-05@lists.example", "owner-list-#-#@lists.example"),
    ("plain@example.com", "plain@example.com"),
])
def test_normalize_sender(sender, expected):
    assert normalize_sender(sender) == expected


def test_normalize_srs0_keeps_original_address_and_forwarder():
    out = normalize_sender("SRS0=HHH=TT=orig.example=alice@fwd.example")
    assert "orig.example" in out and "alice" in out
    assert out.endswith("@fwd.example")
    assert "hhh" not in out and "=tt=" not in out
    assert normalize_sender("SRS0=a1B2=XY=orig.example=alice@fwd.example") == \
        normalize_sender("SRS0=zz9q=AB=orig.example=alice@fwd.example") == out
    assert normalize_sender("SRS0=a1B2=XY=orig.example=alice@fwd.example") != \
        normalize_sender("SRS0=a1B2=XY=orig.example=bob@fwd.example")
    assert normalize_sender("SRS0=a1B2=XY=orig.example=alice@fwd.example") != \
        normalize_sender("SRS0=a1B2=XY=other.example=alice@fwd.example")


def test_normalize_srs1_keeps_first_forwarder_original_address_and_last_forwarder():
    a = normalize_sender("SRS1=HHH=fwd1.example==HHH=TT=orig.example=alice@fwd2.example")
    b = normalize_sender("SRS1=q7Rz=fwd1.example==w3Xy=ZZ=orig.example=alice@fwd2.example")
    assert a == b
    assert "fwd" in a.split("==")[0] and "orig.example=alice" in a
    assert a.endswith(".example") and "@fwd" in a
    assert "hhh" not in a and "=tt=" not in a
    assert a != normalize_sender(
        "SRS1=HHH=fwd1.example==HHH=TT=orig.example=bob@fwd2.example")


def test_verp_addresses_differing_in_digits_normalize_equal():
    assert normalize_sender("bounce-12345-67@lists.example") == \
        normalize_sender("bounce-9-1234567@lists.example")
    assert normalize_sender("bounce-12345@lists.example") != \
        normalize_sender("bounce-12345@other.example")


SENDER_PIECES = st.sampled_from([
    "prvs=", "PRVS=", "msprvs1=", "btv1=", "SRS0=", "SRS1=", "srs0+", "=", "==", "+",
    "@", "-", ".", "a", "Z", "0", "42", "user", "example.com", '"', " ", "\u0130", "ß"])


SENDERS = st.one_of(st.text(), st.lists(SENDER_PIECES, max_size=12).map("".join))


@given(SENDERS)
def test_normalize_sender_never_raises(sender):
    once = normalize_sender(sender)
    assert isinstance(once, str)
    assert not any(ch in once for ch in "0123456789")
    assert once == once.lower()


@given(SENDERS, SENDERS)
def test_normalize_sender_is_idempotent_on_addresses(local, domain):
    # a sender that passed address.parse is "" or has an '@'
    once = normalize_sender(f"{local}@{domain}")
    assert "@" in once
    assert normalize_sender(once) == once
    assert normalize_sender(normalize_sender("")) == normalize_sender("") == "<>"


def test_normalize_sender_strips_nested_batv():
    once = normalize_sender("prvs=1111aaaa=prvs=2222bbbb=user@example.com")
    assert normalize_sender(once) == once
    assert once == "user@example.com"


def test_normalize_sender_strips_barracuda_batv():
    a = normalize_sender("btv1==760cdc7c545==julian@example.ch")
    b = normalize_sender("btv1==34826e458e2==julian@example.ch")
    assert a == b == "julian@example.ch"


# -- static whitelist, pure ----------------------------------------------------------

def test_whitelist_add_rejects_what_build_leaves_out():
    for bad in (Entry("helo", "mx.example"), Entry("client", "not-a-network"),
                Entry("hostname", "/unbalanced(/")):
        with pytest.raises((ValueError, re.error)):
            Whitelist().add(bad)
    wl = Whitelist.build([Entry("helo", "mx.example"), Entry("hostname", "/unbalanced(/"),
                          Entry("client", "not-a-network"), Entry("client", "198.51.100.0/24")])
    assert wl.match(request(client="198.51.100.9"), T) == "198.51.100.0/24"


def test_a_recipient_pattern_that_does_not_compile_is_left_out():
    with pytest.raises(re.error):
        Whitelist().add(Entry("recipient", "/unbalanced(/"))
    wl = Whitelist.build([Entry("recipient", "/unbalanced(/"), Entry("recipient", "/^bob@/")])
    assert wl.match(request(), T) == "/^bob@/"


def test_an_expired_recipient_pattern_does_not_match():
    facts = MemoryFacts(entries=[Entry("recipient", "/^bob@/", expires=T)])
    assert decide(request(), RULES, facts, T - 1).reason == "whitelist:/^bob@/"
    assert (decide(request(), RULES, facts, T).reason) == "new"


def test_whitelist_prefers_no_entry_to_an_expired_one():
    wl = Whitelist.build([Entry("client", "198.51.100.0/24", expires=100)])
    assert wl.match(request(), 99) == "198.51.100.0/24"
    assert wl.match(request(), 100) is None
    assert wl.match(request(recipient="postmaster"), 100) == "postmaster"


@pytest.mark.parametrize("live, expired", [
    (Entry("sender", "Alice@Sender.example"), Entry("sender", "alice@sender.example", 50)),
    (Entry("client", "198.51.100.7"), Entry("client", "198.51.100.7/32", 50)),
])
def test_live_whitelist_entry_is_not_hidden_by_an_expired_twin(live, expired):
    wl = Whitelist.build([live, expired])
    assert wl.match(request(), 100) == live.value


# -- Rules from a Config -------------------------------------------------------------

def test_rules_from_default_config(tmp_path):
    config = configuration.load(None, cwd=tmp_path)
    r = Rules.from_config(config.relay, config.greylist)
    assert r == Rules(
        delay=300, retry_window=2 * DAY, max_age=35 * DAY, ipv4_prefix=24,
        ipv6_prefix=64, auto_whitelist_after=5, relay_domains=("localhost",),
        relay_clients=(ipaddress.ip_network("127.0.0.1/32"),
                       ipaddress.ip_network("::1/128")))
    assert r == Rules()


def test_rules_from_a_config_file(tmp_path):
    path = tmp_path / "etc" / "greyd.toml"
    path.parent.mkdir()
    path.write_text(
        '[relay]\ndomains = ["Example.ORG", ".example.net"]\nclients = ["192.0.2.0/24"]\n'
        '[greylist]\ndelay = "2m"\nretry_window = "1d"\nmax_age = "10d"\n'
        'ipv4_prefix = 32\nipv6_prefix = 56\nauto_whitelist_after = 0\n')
    config = configuration.load(path)
    r = Rules.from_config(config.relay, config.greylist)
    assert (r.delay, r.retry_window, r.max_age) == (120, DAY, 10 * DAY)
    assert (r.ipv4_prefix, r.ipv6_prefix, r.auto_whitelist_after) == (32, 56, 0)
    assert r.relay_domains == ("example.org", ".example.net")
    assert r.relay_clients == (ipaddress.ip_network("192.0.2.0/24"),)
    assert relay_allowed("u@EXAMPLE.org", r.relay_domains)


@pytest.mark.parametrize("on_store_error", ["accept", "tempfail"])
def test_without_store_still_accepts_the_bare_postmaster(on_store_error):
    verdict = without_store(request(recipient="Postmaster"), RULES, on_store_error)
    assert (verdict.action, verdict.reason) == (ACCEPT, "whitelist:postmaster")

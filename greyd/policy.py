"""The greylisting decision of SPEC §5: what happens to one recipient, and why.

Everything here is pure: no I/O, no clock, no logging; of the rest of greyd
it uses only `ip` and `idn`, the address rules (a domain is compared as its
A-label, so either form of an internationalized name is one key),
`whitelist` (step 3's index) and `suspicion` (mode = "suspicious" and the
"name" key). `decide` reads what it needs through the small `Facts`
protocol (the store implements it) and returns a `Verdict` that says what to
answer and what the store should remember; writing it is the caller's job, so
`greyd explain` can run exactly the same code and change nothing.

What the DNS says (verified name, DNSxL listings, the SPF result) arrives in
the `Request`; the client side of a triplet is the first of
`Rules.client_key` that applies (`keys`).
"""

from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, NamedTuple, Protocol

from . import idn, suspicion
from .ip import Network as IPNetwork, client_address
from .whitelist import Whitelist

ACCEPT, GREYLIST, REJECT, TEMPFAIL = "accept", "greylist", "reject", "tempfail"

# What the store must remember after a decision (Verdict.update); COUNT: a
# delivery for the auto-whitelist, with no triplet (mode = "suspicious").
NEW, RESTART, EARLY, PASS, KNOWN, AUTO, COUNT, NOTHING = (
    "new", "restart", "early", "pass", "known", "auto", "count", "")

SUSPICIOUS = "suspicious"           # greylist.mode: only suspicious clients are greylisted
NOT_SUSPICIOUS = "not-suspicious"   # ... and the reason the others are accepted


@dataclass(frozen=True)
class Rules:
    """The settings the decision depends on (from [relay] and [greylist])."""

    delay: int = 300
    retry_window: int = 2 * 86400
    max_age: int = 35 * 86400
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    auto_whitelist_after: int = 5
    relay_domains: tuple[str, ...] = ("localhost",)
    relay_clients: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
    client_key: tuple[str, ...] = ("spf", "network")
    mode: str = "all"                   # or "suspicious": greylist only suspicious clients
    hostname: str = ""                  # server.hostname: with relay_domains, our own names

    @classmethod
    def from_config(cls, relay, greylist, hostname: str = "") -> "Rules":
        """Rules from the [relay] and [greylist] sections of a Config (and
        server.hostname, one of our own names)."""
        return cls(
            delay=greylist.delay, retry_window=greylist.retry_window,
            max_age=greylist.max_age, ipv4_prefix=greylist.ipv4_prefix,
            ipv6_prefix=greylist.ipv6_prefix,
            auto_whitelist_after=greylist.auto_whitelist_after,
            relay_domains=tuple(relay.domains), relay_clients=tuple(relay.clients),
            client_key=tuple(greylist.client_key), mode=greylist.mode,
            hostname=hostname)

    @property
    def own_names(self) -> tuple[str, ...]:
        """Names a client's HELO must not claim (suspicion.helo_rule)."""
        return (self.hostname, *self.relay_domains) if self.hostname else self.relay_domains

    @property
    def uses_spf(self) -> bool:
        """Whether an SPF result can change a decision."""
        return "spf" in self.client_key or self.mode == SUSPICIOUS


# Request, Triplet and Verdict are made once or more per recipient: named
# tuples, immutable as frozen dataclasses are, and built in a quarter of the
# time (a frozen dataclass sets each field through object.__setattr__).

class Request(NamedTuple):
    """One recipient of one transaction, with what is known of its client.

    `client_name` is the forward-confirmed reverse name (None: unknown);
    `dnswl` / `dnsbl` name the zone that lists the client, if any.
    """

    client: str
    sender: str
    recipient: str
    helo: str = ""
    client_name: str | None = None
    dnswl: str | None = None
    dnsbl: str | None = None
    spf: str = ""            # pyspf's result for spf_domain ("pass", "fail" ...); "": not checked
    spf_domain: str = ""     # the sender's domain, or the HELO name for the null sender


class Triplet(NamedTuple):
    """A triplet's key. `network` is its client part: the client's network,
    or `spf:<domain>` / `name:<domain>` (Rules.client_key)."""

    network: str
    sender: str
    recipient: str


class Keys(NamedTuple):
    """What a decision looks up: the client's network (the auto-whitelist's
    key) and the triplets that may identify this recipient's sender, in the
    order of Rules.client_key; the first is the one a new triplet gets, the
    last is always the network's."""

    network: str
    triplets: tuple[Triplet, ...]

    @property
    def triplet(self) -> Triplet:
        return self.triplets[0]


@dataclass(frozen=True)
class Seen:
    """A stored triplet: first and last time seen, and when it passed (or None)."""

    first: int
    last: int
    passed: int | None = None


@dataclass(frozen=True)
class AutoEntry:
    """A client network's record of passed deliveries (counted at most hourly)."""

    count: int
    last_seen: int


class Verdict(NamedTuple):
    action: str
    reason: str
    network: str
    triplet: Triplet | None = None
    retry_in: int = 0     # greylist: seconds until a retry can pass
    delayed: int = 0      # seconds the triplet has been held back so far
    update: str = NOTHING


class Facts(Protocol):
    """What the decision reads from the store."""

    def whitelist(self) -> "Whitelist": ...
    def auto_entry(self, network: str) -> AutoEntry | None: ...
    def seen(self, triplet: Triplet) -> Seen | None: ...


def decide(request: Request, rules: Rules, facts: Facts, now: float,
           known_keys: Keys | None = None) -> Verdict:
    """Decide one recipient; reads `facts`, changes nothing. `known_keys`:
    keys(request, rules), when the caller has them already."""
    network, triplets = known_keys or keys(request, rules)
    verdict = relay_check(request, rules, network)
    if verdict is not None:
        return verdict
    verdict = listed(request, rules, facts, now, network)
    if verdict is not None:
        return verdict
    rule = None
    if rules.mode == SUSPICIOUS:
        rule = suspicion.suspicion(request.client, request.helo, request.client_name,
                                   request.dnsbl, request.spf, rules.own_names)
        if rule is None:
            return Verdict(ACCEPT, NOT_SUSPICIOUS, network, update=COUNT)
    verdict = triplet_step(facts, triplets, now, rules, network)
    if verdict.action == GREYLIST:
        if request.dnsbl:
            verdict = verdict._replace(reason=f"{verdict.reason},dnsbl:{request.dnsbl}")
        if rule is not None:
            verdict = verdict._replace(reason=f"{verdict.reason},suspicious:{rule}")
    return verdict


def listed(request: Request, rules: Rules, facts: Facts, now: float,
           network: str) -> Verdict | None:
    """Steps 3 to 5: accepted by the static whitelist, a DNSWL or the
    auto-whitelist, or None to go on. With no recipient in `request`, only
    the entries that hold for every recipient can match."""
    entry = facts.whitelist().match(request, int(now))
    if entry is not None:
        return Verdict(ACCEPT, f"whitelist:{entry}", network)
    if request.dnswl:
        return Verdict(ACCEPT, f"dnswl:{request.dnswl}", network)
    if not request.dnsbl and rules.auto_whitelist_after > 0:
        auto = facts.auto_entry(network)
        if (auto is not None and auto.count >= rules.auto_whitelist_after
                and now - auto.last_seen <= rules.max_age):
            return Verdict(ACCEPT, "auto-whitelist", network, update=AUTO)
    return None


def triplet_step(facts: Facts, triplets: tuple[Triplet, ...], now: float, rules: Rules,
                 network: str) -> Verdict:
    """Step 6 over the triplets that may identify the sender, in order: the
    first one stored that passes decides; if none does, the first one's own
    record does (a new triplet gets the first key). So a triplet stored
    under a later key (the network's, from before an upgrade or from an
    attempt whose SPF check failed) still lets its retries through."""
    first = judge(facts.seen(triplets[0]), now, rules, network, triplets[0])
    if first.action == ACCEPT:
        return first
    for triplet in triplets[1:]:
        seen = facts.seen(triplet)
        if seen is not None:
            verdict = judge(seen, now, rules, network, triplet)
            if verdict.action == ACCEPT:
                return verdict
    return first


def keys(request: Request, rules: Rules) -> Keys:
    """The client's network and the triplets that `decide` looks up."""
    network = client_network(request.client, rules.ipv4_prefix, rules.ipv6_prefix)
    sender = normalize_sender(request.sender)
    recipient = idn.address_key(request.recipient)
    triplets = tuple(Triplet(client, sender, recipient)
                     for client in client_keys(request, rules.client_key, network))
    return Keys(network, triplets)


def client_keys(request: Request, order: tuple[str, ...], network: str) -> list[str]:
    """The client parts a triplet of this request may have, in `order`:
    `spf:<domain>` when the client passed SPF for it, `name:<domain>` for a
    verified name that does not look dynamic (its registered domain), and
    the network."""
    found = []
    for kind in order:
        if kind == "network":
            found.append(network)
            break
        if kind == "spf" and request.spf == "pass" and request.spf_domain:
            found.append("spf:" + request.spf_domain)
        elif kind == "name" and request.client_name and not suspicion.looks_dynamic(
                request.client_name, request.client):
            domain = suspicion.registered_domain(request.client_name)
            if domain:
                found.append("name:" + domain)
    return found


def relay_check(request: Request, rules: Rules, network: str) -> Verdict | None:
    """Steps 1 and 2: relay-denied or trusted-client, or None to go on."""
    if is_trusted(request.client, rules.relay_clients):
        return Verdict(ACCEPT, "trusted-client", network)
    if not relay_allowed(request.recipient, rules.relay_domains):
        return Verdict(REJECT, "relay-denied", network)
    return None


def without_store(request: Request, rules: Rules, on_store_error: str) -> Verdict:
    """The verdict when the store has failed: the relay check still holds, and
    the bare postmaster is still accepted (RFC 5321 4.5.1)."""
    network = client_network(request.client, rules.ipv4_prefix, rules.ipv6_prefix)
    verdict = relay_check(request, rules, network)
    if verdict is not None:
        return verdict
    if request.recipient.lower() == "postmaster":
        return Verdict(ACCEPT, "whitelist:postmaster", network)
    action = ACCEPT if on_store_error == "accept" else TEMPFAIL
    return Verdict(action, "store-error", network)


def judge(seen: Seen | None, now: float, rules: Rules,
          network: str = "", triplet: Triplet | None = None) -> Verdict:
    """The triplet step (SPEC §5.6) for one triplet: a pure function of its
    record and the time (`network` and `triplet` are only carried into the
    Verdict).

    A triplet's first attempt is stored with the fraction of its second
    (`first_seen`), and the wait is measured from it by the clock's: so a
    retry passes only once `delay` has really gone by, not up to a second
    early, and the wait reported (`delayed`) is the whole seconds the
    sender really waited.
    """
    if seen is None or (seen.passed is not None and now - seen.last > rules.max_age):
        return Verdict(GREYLIST, "new", network, triplet, retry_in=rules.delay, update=NEW)
    if seen.passed is not None:
        return Verdict(ACCEPT, "known", network, triplet, update=KNOWN)
    waited = now - seen.first
    if waited < rules.delay:
        return Verdict(GREYLIST, "too-early", network, triplet,
                       retry_in=math.ceil(rules.delay - waited), delayed=max(0, int(waited)),
                       update=EARLY)
    if waited <= rules.retry_window:
        return Verdict(ACCEPT, "passed", network, triplet, delayed=int(waited), update=PASS)
    return Verdict(GREYLIST, "expired-retry", network, triplet, retry_in=rules.delay,
                   update=RESTART)


# -- the pieces of a triplet ------------------------------------------------

@lru_cache(maxsize=4096)
def client_network(client: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The client's network, e.g. '192.0.2.0/24'; IPv4-mapped IPv6 counts as IPv4."""
    address = client_address(client)
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network((address, prefix), strict=False))


_BATV = re.compile(r"^(?:(?:prvs|msprvs\d*)=[^=@]*=|btv1==[^=@]*==)")
_SRS0 = re.compile(r"^srs0[=+-][^=@]*=[^=@]*=")
_SRS1 = re.compile(r"^srs1[=+-][^=@]*=([^@]*?)==[^=@]*=[^=@]*=")
_DIGITS = re.compile(r"[0-9]+")
_ROUTING = re.compile(r"[%!@:]")     # in a local part: routing an MTA might act on


def normalize_sender(sender: str) -> str:
    """The sender as a triplet keeps it, so per-message rewriting still matches.

    Case folded (NFC, the domain as its A-label); BATV `prvs=TAG=` removed;
    the hash and timestamp of SRS0/SRS1 removed; `+extension` removed; every
    run of digits becomes '#'; the null sender is '<>'.
    """
    if not sender:
        return "<>"
    address = idn.address_key(sender)
    if "=" in address:              # BATV and SRS both need one; most senders have none
        while _BATV.match(address):
            address = _BATV.sub("", address, count=1)
        address = _SRS1.sub(r"srs1=\1==", address)
        address = _SRS0.sub("srs0=", address)
    local, at, domain = address.rpartition("@")
    if at and "+" in local:
        address = local.split("+", 1)[0] + "@" + domain
    return _DIGITS.sub("#", address)


# -- relay check --------------------------------------------------------------

def is_trusted(client: str, networks: Iterable[IPNetwork]) -> bool:
    address = client_address(client)
    return any(address in net for net in networks if net.version == address.version)


def relay_allowed(recipient: str, domains: Iterable[str]) -> bool:
    """True when mail for `recipient` may come from anyone (SPEC §5.1).

    The bare `postmaster` always may. Otherwise the domain must be relayed,
    and the local part must not carry routing of its own ('%', '!', '@' or
    ':', nor a look-alike of one, such as a fullwidth '＠'), which an MTA
    behind us might honour and so become an open relay. The domain compares
    as its A-label: a Unicode look-alike that would map or lower-case into
    a relayed domain (KELVIN SIGN, fullwidth letters) has none, and a
    mixed-script one is another A-label.
    """
    if recipient.isascii() and recipient.lower() == "postmaster":
        return True
    local, at, domain = recipient.rpartition("@")
    if not at or not local or _ROUTING.search(local):
        return False
    if not local.isascii() and _ROUTING.search(unicodedata.normalize("NFKC", local)):
        return False
    name = idn.alabel(domain)
    return name is not None and domain_matches(name, domains)


def domain_matches(domain: str, patterns: Iterable[str]) -> bool:
    """`example.org` matches itself; `.example.org` matches its subdomains."""
    for pattern in patterns:
        if pattern.startswith("."):
            if domain.endswith(pattern) and len(domain) > len(pattern):
                return True
        elif domain == pattern:
            return True
    return False

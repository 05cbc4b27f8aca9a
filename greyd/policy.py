"""The greylisting decision of SPEC §5: what happens to one recipient, and why.

Everything here is pure: no I/O, no clock, no logging; of the rest of greyd
it uses only `ip` and `idn`, the address rules (a domain is compared as its
A-label, so either form of an internationalized name is one key). `decide` reads what it needs through the small `Facts`
protocol (the store implements it) and returns a `Verdict` that says what to
answer and what the store should remember; writing it is the caller's job, so
`greyd explain` can run exactly the same code and change nothing.
"""

from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, NamedTuple, Protocol

from . import idn
from .ip import Network as IPNetwork, client_address

ACCEPT, GREYLIST, REJECT, TEMPFAIL = "accept", "greylist", "reject", "tempfail"

# What the store must remember after a decision (Verdict.update).
NEW, RESTART, EARLY, PASS, KNOWN, AUTO, NOTHING = (
    "new", "restart", "early", "pass", "known", "auto", "")


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
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

    @classmethod
    def from_config(cls, relay, greylist) -> "Rules":
        """Rules from the [relay] and [greylist] sections of a Config."""
        return cls(
            delay=greylist.delay, retry_window=greylist.retry_window,
            max_age=greylist.max_age, ipv4_prefix=greylist.ipv4_prefix,
            ipv6_prefix=greylist.ipv6_prefix,
            auto_whitelist_after=greylist.auto_whitelist_after,
            relay_domains=tuple(relay.domains), relay_clients=tuple(relay.clients))


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


class Triplet(NamedTuple):
    network: str
    sender: str
    recipient: str


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
           known_keys: tuple[str, Triplet] | None = None) -> Verdict:
    """Decide one recipient; reads `facts`, changes nothing. `known_keys`:
    keys(request, rules), when the caller has them already."""
    now = int(now)
    network, triplet = known_keys or keys(request, rules)
    verdict = relay_check(request, rules, network)
    if verdict is not None:
        return verdict
    entry = facts.whitelist().match(request, now)
    if entry is not None:
        return Verdict(ACCEPT, f"whitelist:{entry}", network)
    if request.dnswl:
        return Verdict(ACCEPT, f"dnswl:{request.dnswl}", network)
    if not request.dnsbl and rules.auto_whitelist_after > 0:
        auto = facts.auto_entry(network)
        if (auto is not None and auto.count >= rules.auto_whitelist_after
                and now - auto.last_seen <= rules.max_age):
            return Verdict(ACCEPT, "auto-whitelist", network, update=AUTO)
    verdict = judge(facts.seen(triplet), now, rules, network, triplet)
    if request.dnsbl and verdict.action == GREYLIST:
        verdict = verdict._replace(reason=f"{verdict.reason},dnsbl:{request.dnsbl}")
    return verdict


def keys(request: Request, rules: Rules) -> tuple[str, Triplet]:
    """The client's network and the triplet that `decide` looks up."""
    network = client_network(request.client, rules.ipv4_prefix, rules.ipv6_prefix)
    return network, Triplet(network, normalize_sender(request.sender),
                            idn.address_key(request.recipient))


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


def judge(seen: Seen | None, now: int, rules: Rules,
          network: str = "", triplet: Triplet | None = None) -> Verdict:
    """The triplet step (SPEC §5.6) alone: a pure function of its record and the
    time (`network` and `triplet` are only carried into the Verdict)."""
    if seen is None or (seen.passed is not None and now - seen.last > rules.max_age):
        return Verdict(GREYLIST, "new", network, triplet, retry_in=rules.delay, update=NEW)
    if seen.passed is not None:
        return Verdict(ACCEPT, "known", network, triplet, update=KNOWN)
    waited = now - seen.first
    if waited < rules.delay:
        return Verdict(GREYLIST, "too-early", network, triplet, retry_in=rules.delay - waited,
                       delayed=waited, update=EARLY)
    if waited <= rules.retry_window:
        return Verdict(ACCEPT, "passed", network, triplet, delayed=waited, update=PASS)
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


# -- static whitelist ------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One static whitelist entry: kind is client, hostname, sender or recipient."""

    kind: str
    value: str
    expires: int | None = None


@dataclass
class Whitelist:
    """The static whitelist, indexed for a match per recipient in a few lookups."""

    networks: dict[int, dict[int, dict[IPNetwork, Entry]]] = field(default_factory=dict)
    names: dict[str, Entry] = field(default_factory=dict)
    suffixes: dict[str, Entry] = field(default_factory=dict)
    patterns: list[tuple[re.Pattern, Entry]] = field(default_factory=list)
    senders: dict[str, Entry] = field(default_factory=dict)
    recipients: dict[str, Entry] = field(default_factory=dict)

    @classmethod
    def build(cls, entries: Iterable[Entry]) -> "Whitelist":
        """Index the entries; one that cannot be read (bad CIDR or regex) is left out."""
        wl = cls()
        for entry in entries:
            try:
                wl.add(entry)
            except (ValueError, re.error):
                continue
        return wl

    def add(self, entry: Entry) -> None:
        value = entry.value
        if entry.kind == "client":
            net = ipaddress.ip_network(value, strict=False)
            _keep(self.networks.setdefault(net.version, {}).setdefault(net.prefixlen, {}),
                  net, entry)
        elif entry.kind == "hostname":
            if len(value) > 1 and value.startswith("/") and value.endswith("/"):
                self.patterns.append((re.compile(value[1:-1], re.IGNORECASE), entry))
            elif value.startswith("."):
                _keep(self.suffixes, value.lower(), entry)
            else:
                _keep(self.names, value.lower(), entry)
        elif entry.kind == "sender":
            _keep(self.senders, value.lower(), entry)
        elif entry.kind == "recipient":
            _keep(self.recipients, value.lower(), entry)
        else:
            raise ValueError(f"unknown whitelist kind: {entry.kind}")

    def match(self, request: Request, now: int) -> str | None:
        """The first live entry that covers this request, as shown in reasons."""
        for entry in self._candidates(request):
            if entry is not None and (entry.expires is None or entry.expires > now):
                return entry.value
        if request.recipient.lower() == "postmaster":
            return "postmaster"
        return None

    def _candidates(self, request: Request):
        address = client_address(request.client)
        for prefix, nets in self.networks.get(address.version, {}).items():
            yield nets.get(ipaddress.ip_network((address, prefix), strict=False))
        if request.client_name:
            name = request.client_name.lower().rstrip(".")
            yield self.names.get(name)
            labels = name.split(".")
            for i in range(len(labels)):
                yield self.suffixes.get("." + ".".join(labels[i:]))
            for pattern, entry in self.patterns:
                if pattern.search(name):
                    yield entry
        yield from _address_candidates(self.senders, request.sender)
        yield from _address_candidates(self.recipients, request.recipient)


def _keep(table: dict, key, entry: Entry) -> None:
    """Index `entry` under `key`; of two spellings of one entry, the longer-lived wins."""
    other = table.get(key)
    if other is None or _lifetime(entry) > _lifetime(other):
        table[key] = entry


def _lifetime(entry: Entry) -> float:
    return math.inf if entry.expires is None else entry.expires


def _address_candidates(table: dict[str, Entry], address: str):
    """Entries for `user@dom`, then `@dom`, then `user@`."""
    if not table or not address:
        return
    address = idn.address_key(address)
    local, at, domain = address.rpartition("@")
    yield table.get(address)
    if at:
        yield table.get("@" + domain)
        yield table.get(local + "@")
    else:
        yield table.get(address + "@")

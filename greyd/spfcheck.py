"""SPF (RFC 7208) for the client side of a triplet, through pyspf.

`SpfCheck` evaluates whether a client may send for the sender's domain (the
HELO name's, for the null sender: RFC 7208 2.3) with pyspf, the library
Debian's SPF policy servers use, over greyd's own dnspython resolver (the
[dns] nameservers and its TTL-honouring cache), within a deadline and the
RFC's limits (10 DNS-querying terms, 2 void lookups, which pyspf enforces).
Its result word is pyspf's: "pass", "fail", "softfail", "neutral", "none",
"temperror" or "permerror", or "pass-any" for a record that would pass any
address (see CANARY_V4); a pass lets the policy key the triplet by the
domain (`spf:<domain>`), anything else keeps the network.

Results are kept per (client address, domain) for RESULT_TTL, except
temperror, which the next message asks again. Nothing here raises: a
failure of any kind, a bug in a record's parser included, is "temperror".

pyspf looks its DNS up through one module function, `spf.DNSLookup`; greyd
sets it once to `_lookup`, which answers from the resolver of the check
under way in this thread (a context variable), so every check uses the
resolver of the Lookup that started it.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import OrderedDict
from typing import NamedTuple

import dns.exception
import dns.resolver
import spf as pyspf

from . import idn, log

logger = logging.getLogger(__name__)

RESULT_TTL = 600        # seconds an SPF result is reused for the same client and domain
CACHE_SIZE = 10_000     # (client, domain) results kept at most
PASS = "pass"


class SpfResult(NamedTuple):
    """pyspf's result word for `domain` ("" when nothing could be checked)."""

    result: str
    domain: str


NOT_CHECKED = SpfResult("", "")


def identity(sender: str, helo: str) -> str | None:
    """The domain SPF checks (RFC 7208 2.3, 2.4): the sender's, or for the null
    sender the HELO name's; as an A-label; None when it is no domain name (an
    address literal, a bare word, a local part without a domain)."""
    if sender:
        local, at, domain = sender.rpartition("@")
        if not at or not local:
            return None
    else:
        domain = helo
    if domain.startswith("[") or "." not in domain.strip("."):
        return None
    name = idn.alabel(domain.rstrip("."))
    if name is None or name.replace(".", "").isdigit():
        return None
    return name


_resolver: contextvars.ContextVar[tuple[dns.resolver.Resolver, float]] = \
    contextvars.ContextVar("greyd_spf_resolver")


def _lookup(name, qtype, strict=True, timeout=30):
    """pyspf's DNS lookup (its `DNSLookup` interface) on the resolver of the
    check under way, within its deadline."""
    resolver, deadline = _resolver.get()
    remaining = min(timeout, deadline - time.monotonic())
    if remaining <= 0:
        raise pyspf.TempError("DNS timeout")
    try:
        answer = resolver.resolve(name, qtype, lifetime=remaining, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except (dns.exception.DNSException, OSError) as error:
        raise pyspf.TempError(f"DNS {type(error).__name__}") from None
    found = []
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            found.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            found.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            found.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            found.append(((name, qtype), rdata.strings))
    return found


pyspf.DNSLookup = _lookup


class SpfCheck:
    """SPF checks on one resolver, with their results cached."""

    def __init__(self, resolver: dns.resolver.Resolver):
        self.resolver = resolver
        self._cache: OrderedDict[tuple[str, str], tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, client: str, domain: str, sender: str, helo: str,
              deadline: float) -> SpfResult:
        """The SPF result of `client` for `domain`, the sender's (or the HELO
        name's: `identity`), known by `deadline` (time.monotonic()); never raises."""
        key = (client, domain)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0] > now:
                self._cache.move_to_end(key)
                return SpfResult(cached[1], domain)
        result = self._evaluate(client, sender, helo, domain, deadline)
        if result != "temperror":
            with self._lock:
                self._cache[key] = (now + RESULT_TTL, result)
                self._cache.move_to_end(key)
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        return SpfResult(result, domain)

    def _evaluate(self, client: str, sender: str, helo: str, domain: str,
                  deadline: float) -> str:
        token = _resolver.set((self.resolver, deadline))
        try:
            result = self._query(client, sender, helo, domain, deadline)
            if result == PASS:
                canary = CANARY_V6 if ":" in client else CANARY_V4
                if self._query(canary, sender, helo, domain, deadline) == PASS:
                    result = PASS_ANY
        except Exception as error:   # a bug or a record pyspf chokes on: no information
            logger.warning("spf error %s", log.fields(
                client=client, domain=domain, error=f"{type(error).__name__}: {error}"))
            return "temperror"
        finally:
            _resolver.reset(token)
        return result

    @staticmethod
    def _query(client: str, sender: str, helo: str, domain: str, deadline: float) -> str:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "temperror"
        query = pyspf.query(client, sender, domain if not sender else helo, querytime=remaining)
        result = query.check()[0]
        return result if result in RESULTS else "temperror"


RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
# A pass is checked again for an address no one sends from (RFC 5737, RFC 3849):
# a record that passes it too (+all, ip4:0.0.0.0/0) authorizes everyone, and
# proves nothing about who sent; it is reported as PASS_ANY, not a pass.
CANARY_V4, CANARY_V6 = "192.0.2.1", "2001:db8::1"
PASS_ANY = "pass-any"

"""What the DNS says about a client (SPEC §5): its verified name, DNSWL and DNSBL listings.

`Lookup` owns one dnspython resolver (the [dns] nameservers, or the system's
/etc/resolv.conf when none are given) with a bounded, TTL-honouring cache,
and a small thread pool that runs the queries. `Lookup.start(ip)` starts,
for one client, the forward-confirmed reverse DNS (PTR, then the A or AAAA
records of each name found) and one A query per DNSWL and DNSBL zone;
`Pending.result()` collects them, waiting no longer than `dns.timeout` after
the start in total. Whatever is not known by then is no information.

A DNS failure of any kind (timeout, SERVFAIL, NXDOMAIN, a malformed or
missing reply, no nameserver at all) is never an error to the caller: that
fact is None, and one log line says why. This module must not decide
anything: the policy does that with the `ClientDNS` it returns.

DNSxL answers (RFC 5782): a client is listed when a zone answers with an
address in 127.0.0.0/8, except the codes lists use to refuse a query rather
than to list: 127.255.255.0/24 (Spamhaus: typing error, query through an
open resolver, excessive volume) and 127.0.0.255 (dnswl.org: query blocked).
Those, and answers outside 127.0.0.0/8 (a resolver that rewrites NXDOMAIN),
count as "not listed" and are logged as failures. NXDOMAIN from a zone is
its normal "not listed" answer, not a failure, and is not logged. Nor is
NXDOMAIN (or no PTR record) for a client's reverse name a failure: many
clients have none, so it is a DEBUG line `dns no-name`, not a `dns failure`.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import dns.reversename

from . import log, metrics
from .ip import Address, client_address
from .spfcheck import NOT_CHECKED, SpfCheck, SpfResult, identity

logger = logging.getLogger(__name__)

WORKERS = 16          # threads running queries, shared by all sessions
CACHE_SIZE = 20_000   # answers kept (dnspython's LRU cache; each expires with its TTL)
MAX_NAMES = 4         # PTR names of one client checked forward, at most
LISTED = ipaddress.ip_network("127.0.0.0/8")
REFUSED = (ipaddress.ip_network("127.255.255.0/24"), ipaddress.ip_network("127.0.0.255/32"))
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?", re.ASCII)


@dataclass(frozen=True)
class ClientDNS:
    """The facts about one client: verified name, listing DNSWL / DNSBL zone (None: no)."""

    name: str | None = None
    dnswl: str | None = None
    dnsbl: str | None = None


UNKNOWN = ClientDNS()


class Pending:
    """A client's lookups under way; `result()` collects them once, by the deadline."""

    def __init__(self, deadline: float = 0.0, name=None,
                 dnswl: tuple = (), dnsbl: tuple = (),
                 known: ClientDNS | None = None):
        self.deadline = deadline
        self._name, self._dnswl, self._dnsbl = name, dnswl, dnsbl
        self._result = known

    def ready(self) -> bool:
        """True when `result()` would not wait."""
        if self._result is not None or time.monotonic() >= self.deadline:
            return True
        return all(future.done() for future in self._futures())

    def result(self) -> ClientDNS:
        """What is known by the deadline; anything unfinished counts as no information."""
        if self._result is None:
            concurrent.futures.wait(list(self._futures()),
                                    timeout=max(0.0, self.deadline - time.monotonic()))
            self._result = ClientDNS(
                name=_outcome(self._name),
                dnswl=next((zone for zone, f in self._dnswl if _outcome(f)), None),
                dnsbl=next((zone for zone, f in self._dnsbl if _outcome(f)), None))
        return self._result

    def _futures(self):
        if self._name is not None:
            yield self._name
        for _, future in (*self._dnswl, *self._dnsbl):
            yield future


class PendingSpf:
    """An SPF check under way; `result()` waits for it until its deadline."""

    def __init__(self, future: concurrent.futures.Future | None = None,
                 deadline: float = 0.0, domain: str = ""):
        self._future, self.deadline, self.domain = future, deadline, domain

    def ready(self) -> bool:
        """True when `result()` would not wait."""
        return (self._future is None or self._future.done()
                or time.monotonic() >= self.deadline)

    def result(self) -> SpfResult:
        """The check's result; "temperror" when it is not done by the deadline."""
        if self._future is None:
            return NOT_CHECKED
        concurrent.futures.wait([self._future],
                                timeout=max(0.0, self.deadline - time.monotonic()))
        return _outcome(self._future) or SpfResult("temperror", self.domain)


NO_SPF = PendingSpf()


def _outcome(future):
    if future is None or not future.done() or future.cancelled() or future.exception():
        return None
    return future.result()


class Lookup:
    """DNS lookups for the sessions of one daemon (or one `greyd explain`)."""

    def __init__(self, config):
        self.config = config
        self.resolver: dns.resolver.Resolver | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        if config.enabled:
            self.resolver = self._make_resolver()
        if self.resolver is not None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                WORKERS, thread_name_prefix="greyd-dns")
            self._spf = SpfCheck(self.resolver)

    def _make_resolver(self) -> dns.resolver.Resolver | None:
        try:
            if self.config.nameservers:
                resolver = dns.resolver.Resolver(configure=False)
                resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                        for host, port in self.config.nameservers]
            else:
                resolver = dns.resolver.Resolver()   # /etc/resolv.conf
        except (dns.exception.DNSException, OSError) as error:
            logger.warning("dns failure %s", log.fields(
                query="resolver-configuration", error=_describe(error)))
            return None
        resolver.cache = dns.resolver.LRUCache(CACHE_SIZE)
        resolver.lifetime = self.config.timeout
        # Each nameserver's first try gets a fair share of the budget (of two at most),
        # so a dead first nameserver does not use up all of it.
        resolver.timeout = self.config.timeout / min(2, max(1, len(resolver.nameservers)))
        return resolver

    def start(self, client: str) -> Pending:
        """Start every lookup for `client` (an IP address); never raises."""
        deadline = time.monotonic() + self.config.timeout
        if self._executor is None:
            return Pending(known=UNKNOWN)
        try:
            address = client_address(client)
        except ValueError:
            return Pending(known=UNKNOWN)
        submit = self._executor.submit
        try:
            name = submit(self._guarded, self.verified_name, address, deadline)
            dnswl = tuple((zone, submit(self._guarded, self.listed, address, zone, deadline))
                          for zone in self.config.dnswl)
            dnsbl = tuple((zone, submit(self._guarded, self.listed, address, zone, deadline))
                          for zone in self.config.dnsbl)
        except RuntimeError:         # closed: the daemon is stopping or was reconfigured
            return Pending(known=UNKNOWN)
        return Pending(deadline, name, dnswl, dnsbl)

    @property
    def enabled(self) -> bool:
        """Whether lookups are made at all ([dns] enabled, a resolver)."""
        return self._executor is not None

    def spf(self, client: str, sender: str, helo: str) -> PendingSpf:
        """Start the SPF check of `client` for `sender` (or the HELO name,
        for the null sender); never raises."""
        domain = identity(sender, helo)
        if self._executor is None or domain is None:
            return NO_SPF
        deadline = time.monotonic() + self.config.timeout
        try:
            future = self._executor.submit(self._spf.check, client, domain, sender, helo,
                                           deadline)
        except RuntimeError:         # closed: the daemon is stopping or was reconfigured
            return NO_SPF
        return PendingSpf(future, deadline, domain)

    def check(self, client: str) -> ClientDNS:
        """Every lookup for `client`, done now (for `greyd explain`)."""
        return self.start(client).result()

    def close(self) -> None:
        """No new lookups; those under way finish (each is bounded by its deadline)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    # -- the lookups (run in the pool) --------------------------------------------

    def _guarded(self, lookup: Callable, address: Address, *args):
        try:
            return lookup(address, *args)
        except Exception as error:   # a bug here must cost only the DNS facts
            logger.exception("dns error %s", log.fields(
                client=address, error=_describe(error)))
            return None

    def verified_name(self, address: Address, deadline: float) -> str | None:
        """The first PTR name whose A/AAAA records include `address` (FCrDNS), or None."""
        answer = self._resolve(address, dns.reversename.from_address(str(address)),
                               "PTR", deadline)
        if answer is None:
            return None
        names = []
        for rdata in answer:
            name = hostname(rdata.target)
            if name is None:
                self._failure(address, answer.qname, "PTR", "bad-name",
                              name=rdata.target.to_text())
            elif name not in names:
                names.append(name)
        rdtype = "A" if address.version == 4 else "AAAA"
        for name in names[:MAX_NAMES]:
            forward = self._resolve(address, dns.name.from_text(name), rdtype, deadline)
            if forward is not None and any(
                    ipaddress.ip_address(rdata.address) == address for rdata in forward):
                return name
        if names:
            logger.info("dns unverified %s", log.fields(
                client=address, ptr=",".join(names[:MAX_NAMES])))
        return None

    def listed(self, address: Address, zone: str, deadline: float) -> str | None:
        """`zone` when it lists `address` (RFC 5782), else None."""
        qname = dns.name.from_text(list_query(address, zone))
        answer = self._resolve(address, qname, "A", deadline, missing_is_answer=True)
        if answer is None:
            return None
        codes = [ipaddress.ip_address(rdata.address) for rdata in answer]
        if any(code in LISTED and not _refusal(code) for code in codes):
            return zone
        error = "refused" if any(_refusal(code) for code in codes) else "unexpected-answer"
        self._failure(address, qname, "A", error, answer=",".join(map(str, codes)),
                      level=logging.WARNING)
        return None

    def _resolve(self, address: Address, qname: dns.name.Name, rdtype: str,
                 deadline: float, *, missing_is_answer: bool = False):
        """The answer, or None after logging why there is none."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self._failure(address, qname, rdtype, "timeout")
            return None
        try:
            return self.resolver.resolve(qname, rdtype, lifetime=remaining, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as error:
            if rdtype == "PTR":     # many clients have no reverse name: an answer, not a failure
                logger.debug("dns no-name %s", log.fields(
                    client=address, query=_text(qname), answer=_describe(error)))
            elif not missing_is_answer:
                self._failure(address, qname, rdtype, _describe(error), level=logging.INFO)
        except (dns.exception.DNSException, OSError) as error:
            self._failure(address, qname, rdtype, _describe(error))
        return None

    def _failure(self, address: Address, qname, rdtype: str, error: str,
                 level: int = logging.WARNING, **more) -> None:
        metrics.dns_failure(error)
        logger.log(level, "dns failure %s", log.fields(
            client=address, query=_text(qname), type=rdtype, error=error, **more))


# -- names ---------------------------------------------------------------------------

def list_query(address: Address, zone: str) -> str:
    """The DNSxL query name (RFC 5782 2.1, 2.4): reversed octets or nibbles, then the zone."""
    if address.version == 4:
        labels = reversed(str(address).split("."))
    else:
        labels = reversed(address.exploded.replace(":", ""))
    return ".".join(labels) + "." + zone.rstrip(".") + "."


def hostname(name: dns.name.Name) -> str | None:
    """A PTR target as a plain lower-case host name, or None when it is not one.

    Only letters, digits, '-' and '_' in labels: the name goes into XCLIENT
    and the Received: header, and whoever runs the reverse zone chooses it.
    """
    text = name.to_text(omit_final_dot=True).lower()
    if not 0 < len(text) <= 253 or not all(_LABEL.fullmatch(label)
                                           for label in text.split(".")):
        return None
    return text


def _refusal(code: Address) -> bool:
    return any(code in network for network in REFUSED)


def _text(qname) -> str:
    return qname.to_text(omit_final_dot=True) if isinstance(qname, dns.name.Name) else str(qname)


def _describe(error: BaseException) -> str:
    """A short word or two for a DNS failure, for the log line."""
    if isinstance(error, dns.resolver.NXDOMAIN):
        return "nxdomain"
    if isinstance(error, dns.resolver.NoAnswer):
        return "no-answer"
    if isinstance(error, dns.exception.Timeout):
        return "timeout"
    if isinstance(error, dns.resolver.NoNameservers):
        answers = {str(e[3]).lower() if isinstance(e[3], str) else type(e[3]).__name__
                   for e in error.kwargs.get("errors", ())}
        return ",".join(sorted(answers)) or "no-nameservers"
    if isinstance(error, dns.resolver.NoResolverConfiguration):
        return "no-nameservers"
    return f"{type(error).__name__}: {error}"


"""A real DNS server for the tests and the benchmark's replay: authoritative-style,
UDP, on 127.0.0.1, built with dnspython.

`DnsServer` answers from records a test can change while it runs
(`add`/`remove`), with their TTLs; NXDOMAIN for unknown names and NOERROR
with no records for a known name's missing type, both with an SOA in the
authority section (the name's parent as the zone apex, so resolvers cache
them, RFC 2308). Per name, or for
every name (`default`), it can instead answer SERVFAIL, never answer
("timeout"), or send garbage ("malformed"). It counts every query it got
per (name, type). A helper of the tests (tests/dnsserver.py re-exports it) and of
the replay section of the benchmark; it needs only dnspython.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

NORMAL, NXDOMAIN, SERVFAIL, TIMEOUT, MALFORMED = (
    "normal", "nxdomain", "servfail", "timeout", "malformed")
SOA = "ns.test. hostmaster.test. 1 3600 600 86400 {ttl}"
POLL = 0.05   # seconds between checks for a stop


def _key(name: str) -> str:
    return name.lower().rstrip(".")


class DnsServer:
    """A UDP DNS server on a free loopback port; use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", negative_ttl: int = 60):
        self.records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self.modes: dict[str, str] = {}
        self.default = NORMAL
        self.negative_ttl = negative_ttl
        self.queries: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, 0))
        self._sock.settimeout(POLL)
        self.host, self.port = self._sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)

    @property
    def address(self) -> str:
        """The "host:port" form [dns] nameservers takes."""
        return f"{self.host}:{self.port}"

    def __enter__(self) -> "DnsServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    # -- what it serves -------------------------------------------------------------

    def add(self, name: str, rdtype: str, *values: str, ttl: int = 300) -> None:
        """Serve `values` (rdata text, e.g. "mx.example.test." or "127.0.0.2") for name/type."""
        with self._lock:
            self.records[(_key(name), rdtype.upper())] = (ttl, list(values))

    def remove(self, name: str, rdtype: str) -> None:
        with self._lock:
            self.records.pop((_key(name), rdtype.upper()), None)

    def mode(self, name: str, mode: str) -> None:
        """Answer every query for `name` this way (NORMAL, SERVFAIL, TIMEOUT, MALFORMED …)."""
        with self._lock:
            self.modes[_key(name)] = mode

    def count(self, name: str, rdtype: str | None = None) -> int:
        """Queries received for name (and type, when given)."""
        with self._lock:
            return sum(n for (qname, qtype), n in self.queries.items()
                       if qname == _key(name) and rdtype in (None, qtype))

    def seen(self) -> list[tuple[str, str]]:
        """Every (name, type) queried, in the order first seen."""
        with self._lock:
            return list(self.queries)

    # -- the server ---------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self._sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            reply = self._answer(wire)
            if reply is not None:
                try:
                    self._sock.sendto(reply, peer)
                except OSError:
                    pass

    def _answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
            question = query.question[0]
        except (dns.exception.DNSException, IndexError):
            return None
        name = _key(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self.queries[(name, rdtype)] += 1
            mode = self.modes.get(name, self.default)
            found = self.records.get((name, rdtype))
            exists = any(key[0] == name for key in self.records)
        if mode == TIMEOUT:
            return None
        if mode == MALFORMED:
            return wire[:2] + b"\x81\x80\xff\xff garbage, not a DNS message"
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if mode == SERVFAIL:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif mode == NORMAL and found is not None:
            ttl, values = found
            response.answer.append(dns.rrset.from_text(question.name, ttl, "IN", rdtype, *values))
        else:
            if mode == NXDOMAIN or not exists:
                response.set_rcode(dns.rcode.NXDOMAIN)
            zone = question.name.parent() if len(question.name) > 1 else question.name
            response.authority.append(dns.rrset.from_text(
                zone, self.negative_ttl, "IN", "SOA", SOA.format(ttl=self.negative_ttl)))
        return response.to_wire()

"""The tests' DNS server: bench/dnsserver.py, which the benchmark's replay uses too
(the benchmark must not import from tests/). This is a helper module, not a test module.
"""

from bench.dnsserver import (MALFORMED, NORMAL, NXDOMAIN, SERVFAIL, SOA, TIMEOUT,
                             DnsServer)

__all__ = ["MALFORMED", "NORMAL", "NXDOMAIN", "SERVFAIL", "SOA", "TIMEOUT", "DnsServer"]

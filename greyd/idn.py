"""Internationalized domain names and addresses as greyd compares them.

One mapping for every place that compares a domain (the triplet, the relay
check, the whitelist, `relay.domains`): IDNA 2008 with the UTS 46 mapping,
by the `idna` package, to the A-label (`bücher.example` and
`xn--bcher-kva.example` are one domain). A name whose UTS 46 mapping would
change it beyond case and NFC (fullwidth letters, KELVIN SIGN, long s ...)
has no A-label here: what greyd checks must be what the upstream receives,
so such a look-alike never compares equal to a relayed domain.

Pure functions: no I/O. Imports nothing from greyd.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

import idna


@lru_cache(maxsize=4096)
def alabel(domain: str) -> str | None:
    """The lower-case A-label form of `domain`; None when it has none that greyd
    accepts (not IDNA 2008, or mapped beyond case and NFC). ASCII names are
    only lower-cased."""
    if domain.isascii():
        return domain.lower()
    if any(not ch.isascii() and _folded(ch).isascii() for ch in domain):
        return None         # an ASCII look-alike: KELVIN SIGN, fullwidth "ｌ", long "ſ" ...
    try:
        mapped = idna.uts46_remap(domain, std3_rules=True, transitional=False)
        if mapped != unicodedata.normalize("NFC", domain.lower()):
            return None
        return idna.encode(mapped, uts46=False).decode("ascii")
    except UnicodeError:                # idna.IDNAError is one
        return None


def _folded(ch: str) -> str:
    return unicodedata.normalize("NFKC", ch).lower()


def address_key(address: str) -> str:
    """An address as greyd keys and compares it: NFC, lower case, the domain as
    its A-label (kept NFC and lower-cased when it has none)."""
    if address.isascii():
        return address.lower()
    local, at, domain = address.rpartition("@")
    if not at:
        return unicodedata.normalize("NFC", address).lower()
    domain = alabel(domain) or unicodedata.normalize("NFC", domain).lower()
    return f"{unicodedata.normalize('NFC', local).lower()}@{domain}"

"""Which clients `[greylist] mode = "suspicious"` greylists, and why.

In that mode a client is greylisted only when one of the rules below holds,
and accepted otherwise. Greylisting costs a real mail server one retry; what
it stops comes mostly from hosts nobody runs as mail servers (infected home
computers on an ISP's end-user addresses, throwaway cloud machines), and what
the DNS and the client itself say usually gives those away. The rules, in the
order `suspicion` tries them; the first that holds is the reason:

  dnsbl         a DNS block list lists the client.
  no-name       the client has no forward-confirmed reverse name (its PTR
                name does not resolve back to it): whoever runs a mail server
                sets one up; a PC on a home line seldom has one.
  dynamic-name  the name is one an ISP hands out wholesale (`looks_dynamic`).
  spf-fail      the sender's domain says by SPF that this client may not send
  spf-softfail  its mail, or probably may not (RFC 7208 8.4, 8.5).
  helo-bare     HELO/EHLO gave a bare word ('localhost', 'User', 'ylmf-pc'):
                RFC 5321 4.1.1.1 asks for a fully qualified name and mail
                servers give one; desktop malware gives its PC's name.
  helo-literal  an address literal or bare address that is not the client's
                own; a host with no name may give its own literal (RFC 5321
                4.1.4), so that one passes.
  helo-ours     the client claims one of our own names (our host name or a
                domain we relay for); no honest client does, forgers hope it
                exempts them.

Each rule is a reason to greylist, never to reject: each also matches some
honest server (a small office on a static DSL line, a stale SPF record).

Dynamic names. `looks_dynamic` says yes for either of two things.

The name spells out the client's address. IPv4 192.0.2.10 as 192-0-2-10,
192.0.2.10 or 192_0_2_10, reversed (10-2-0-192, Hetzner's static.10.2.0.192),
zero-padded (192-000-002-010, 192000002010), as one decimal number
(3221225994) or as eight hex digits (c000020a: 'ip5f5a0a1b.dynamic.kabel-
deutschland.de', 'p5B0A0A1B.dip0.t-ipconnect.de'). The last three octets
count when letters stand next to them ('h0-2-10'); the last two alone do
not, because large senders name each sending address that way: Amazon SES's
a8-27.smtp-out.amazonses.com is 54.240.8.27, Mailchimp's
mail132-5.atl131.mcdlv.net is 198.2.132.5. IPv6 2001:db8::1 as its 32
nibbles, or with '-' for ':' in full, unpadded or compressed form
(2001-db8--1); a name holding only the /64 is not taken as the client's.

Or a label holds a word of DYNAMIC_WORDS right next to digits, with at most
one '-' or '_' between: 'dyn-12', 'dhcp123', 'pool-71-2', '5-dyn'. Only a
whole run of letters counts, as one word or several run together
('dynamicip'), so 'chip7' and 'resolver1' do not; nor does a word with no
digits beside it ('mail.host-europe.de', 'static.example.com'). The words are
the generic names ISPs give residential and pooled addresses:

  dyn dynamic dynip dip pool   dynamically assigned pools (dip: Deutsche
                               Telekom's dial-in pool)
  dhcp                         addresses leased by DHCP
  dsl adsl sdsl vdsl xdsl      DSL lines
  ppp pppoe pppoa dial dialup dialin    PPP sessions, dial-up
  cable catv hfc hsd modem     cable (hsd: Comcast's "high-speed data")
  ftth fttb fttc fttp fttx fiber fibre broadband    fibre and other fixed access
  wireless wifi wlan lte mobile    radio access
  client cust customer subscriber user cpe   per-customer names (cpe: the
                               customer premises equipment)
  res resi residential home    residential lines
  host ip                      per-address names ('host86-…', 'ip-10-0-0-1')
  static                       a customer's fixed address still named by the
                               ISP per address, not by whoever runs the host
  generic unassigned           placeholder names

Not words, because those who run mail servers name hosts with them: mail,
mx, smtp, mta, out, relay, ptr, srv, vps and single letters. So Google's
'mail-sor-f41', Outlook's 'mail-am6eur05on2102', 'mta-65-12.sendgrid.net',
SendGrid's 'o1.ptr1234.example.net' and 'smtp2' are not dynamic names.

Pure: no I/O, no DNS, no clock; of greyd it imports only `ip` (`policy` imports this).
"""

from __future__ import annotations

import ipaddress
import re
import threading
from functools import lru_cache
from typing import Iterable

from publicsuffixlist import PublicSuffixList

from . import idn
from .ip import Address, client_address

DYNAMIC_WORDS: tuple[str, ...] = (
    "dyn", "dynamic", "dynip", "dip", "pool", "dhcp",
    "dsl", "adsl", "sdsl", "vdsl", "xdsl",
    "ppp", "pppoe", "pppoa", "dial", "dialup", "dialin",
    "cable", "catv", "hfc", "hsd", "modem",
    "ftth", "fttb", "fttc", "fttp", "fttx", "fiber", "fibre", "broadband",
    "wireless", "wifi", "wlan", "lte", "mobile",
    "client", "cust", "customer", "subscriber", "user", "cpe",
    "res", "resi", "residential", "home",
    "host", "ip", "static", "generic", "unassigned",
)
_WORDS = frozenset(DYNAMIC_WORDS)

_LETTERS = re.compile(r"[a-z]+")
_DIGIT_AFTER = re.compile(r"[-_]?[0-9]")
_DIGIT_BEFORE = re.compile(r"[0-9][-_]?$")


def looks_dynamic(name: str, client: str) -> bool:
    """True when a (verified reverse) host name looks like one an ISP gives an
    end-user address: it spells out `client`'s address, or a label holds one
    of DYNAMIC_WORDS next to digits (see the module docstring)."""
    name = _normal(name)
    pattern = _address_pattern(client)
    if pattern is not None and pattern.search(name):
        return True
    return any(_word_by_digits(label) for label in name.split("."))


def helo_rule(helo: str, client: str, own_names: Iterable[str]) -> str | None:
    """The rule a HELO/EHLO name breaks ("helo-bare", "helo-literal",
    "helo-ours"), or None. `own_names`: server.hostname and the relay domains
    (a leading dot, as in relay.domains, is dropped)."""
    name = _normal(helo)
    if name.startswith("[") and name.endswith("]"):
        literal = name[1:-1].removeprefix("ipv6:")
    else:
        literal = name if _address(name) is not None else None
    if literal is not None:
        own = _address(client)
        return None if own is not None and _address(literal) == own else "helo-literal"
    if "." not in name:
        return "helo-bare"
    if _ascii(name) in {_ascii(_normal(own).lstrip(".")) for own in own_names}:
        return "helo-ours"
    return None


def suspicion(client: str, helo: str, name: str | None, dnsbl: str | None, spf: str,
              own_names: Iterable[str]) -> str | None:
    """The first rule that makes the client suspicious, or None to accept it.

    `name`: the forward-confirmed reverse name (None: there is none);
    `dnsbl`: the zone that lists the client, or None; `spf`: pyspf's result
    word ("pass", "fail", "softfail", "neutral", "none", "temperror",
    "permerror"), or "" when SPF was not checked.
    """
    if dnsbl:
        return "dnsbl"
    if not name:
        return "no-name"
    if looks_dynamic(name, client):
        return "dynamic-name"
    spf = spf.lower()
    if spf in ("fail", "softfail"):
        return f"spf-{spf}"
    return helo_rule(helo, client, own_names)


def registered_domain(name: str) -> str | None:
    """The registered domain of a host name by the Public Suffix List
    ('mail-a12.out.example.co.uk' -> 'example.co.uk'); None when the name is
    itself a public suffix or has none. An unknown top-level domain counts
    as a one-label suffix (the list's default rule "*")."""
    name = _normal(name)
    return _public_suffixes().privatesuffix(name) if name else None


_psl: PublicSuffixList | None = None
_psl_lock = threading.Lock()


def _public_suffixes() -> PublicSuffixList:
    """The one list, parsed at first use (that takes tens of milliseconds);
    lookups only read it, so threads share it."""
    global _psl
    if _psl is None:
        with _psl_lock:
            if _psl is None:
                _psl = PublicSuffixList()
    return _psl


def _normal(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _ascii(name: str) -> str:
    """A name's A-label form (greyd's one IDNA mapping, idn.py) when it has one."""
    return idn.alabel(name) or name


def _address(text: str) -> Address | None:
    try:
        return client_address(text)
    except ValueError:
        return None


def _word_by_digits(label: str) -> bool:
    """True when a run of letters made of DYNAMIC_WORDS has digits beside it."""
    for run in _LETTERS.finditer(label):
        beside = (_DIGIT_AFTER.match(label, run.end())
                  or _DIGIT_BEFORE.search(label[max(0, run.start() - 2):run.start()]))
        if beside and _made_of_words(run.group()):
            return True
    return False


@lru_cache(maxsize=4096)
def _made_of_words(run: str) -> bool:
    """True when `run` is one word of DYNAMIC_WORDS or several run together."""
    return run in _WORDS or any(
        run.startswith(word) and _made_of_words(run[len(word):])
        for word in _WORDS if len(word) < len(run))


@lru_cache(maxsize=1024)
def _address_pattern(client: str) -> re.Pattern[str] | None:
    """What finds `client`'s address spelled out in a name; None when
    `client` is no address."""
    address = _address(client)
    if address is None:
        return None
    if address.version == 4:
        return re.compile(_ipv4_spellings(address))
    return re.compile(_ipv6_spellings(address))


def _ipv4_spellings(address: ipaddress.IPv4Address) -> str:
    octets = str(address).split(".")
    padded = [octet.zfill(3) for octet in octets]
    whole = [sep.join(parts) for parts in (octets, padded, octets[::-1], padded[::-1])
             for sep in "-._"]
    whole += ["".join(padded), "".join(padded[::-1]), str(int(address))]
    tail = [sep.join(parts) for parts in (octets[1:], octets[:0:-1]) for sep in "-_"]
    return (rf"(?<![0-9])(?:{_either(whole)})(?![0-9])"
            rf"|(?:(?<=[a-z])|(?<=[a-z][-_]))(?:{_either(tail)})(?![0-9])"
            rf"|(?<![0-9])(?<![0-9][-_.])(?:{_either(tail)})(?=[-_]?[a-z])"
            rf"|{address.packed.hex()}")


def _ipv6_spellings(address: ipaddress.IPv6Address) -> str:
    groups = address.exploded.split(":")
    dashed = ["-".join(groups), "-".join(group.lstrip("0") or "0" for group in groups),
              address.compressed.replace(":", "-")]
    return rf"{address.packed.hex()}|(?<![0-9])(?:{_either(dashed)})(?![0-9a-f])"


def _either(spellings: Iterable[str]) -> str:
    return "|".join(re.escape(text) for text in sorted(set(spellings), key=len, reverse=True))

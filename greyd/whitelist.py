"""Static whitelist entries as an operator writes them: checked and normalized.

Owns the spelling of an entry (SPEC §3): a client network, a client hostname
(exact, `.domain` or `/regex/`), a sender or recipient (`user@dom`, `@dom`,
`user@`; a recipient also `/regex/`), and the reading of postgrey's
`whitelist_clients` and `whitelist_recipients` files into such entries. Normalized values are what
the store keeps and what `Whitelist` matches, so one entry has one
spelling and adding it twice finds the first.

`Whitelist` indexes the stored entries for the decision (policy step 3),
so one recipient is matched in a few lookups.

Pure functions: no I/O, no clock, no store. `KINDS` is the one list of
whitelist kinds. Every refusal is a ValueError whose text is fit for a
one-line error message.
"""

from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

from . import idn
from .ip import Network as IPNetwork, client_address, unmapped_network

if TYPE_CHECKING:
    from .policy import Request

KINDS = ("client", "hostname", "sender", "recipient")
IMPORT_KINDS = ("client", "recipient")    # postgrey's two whitelist files

_LABEL = re.compile(r"[a-z0-9_-]{1,63}", re.ASCII)
_PARTIAL_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){0,3}\.?", re.ASCII)
_LOOKS_LIKE_IP = re.compile(r"[0-9./]+|.*:.*", re.ASCII | re.DOTALL)
MAX_COMMENT = 500


def normalize(kind: str, text: str) -> str:
    """The stored spelling of a `kind` entry given as `text`; ValueError if invalid."""
    if kind == "client":
        return normalize_client(text)
    if kind == "hostname":
        return normalize_hostname(text)
    if kind == "recipient":
        return normalize_recipient(text)
    if kind == "sender":
        return normalize_address(text)
    raise ValueError(f"unknown whitelist kind: {kind!r}")


def normalize_client(text: str) -> str:
    """An IP address or network as 'address/prefix' ('192.0.2.7' -> '192.0.2.7/32').

    Host bits are dropped ('192.0.2.7/24' -> '192.0.2.0/24'); an IPv4-mapped
    IPv6 network becomes the IPv4 network it covers, as the decision sees
    such clients as IPv4 (SPEC §5). Leading octets alone are postgrey's
    network of them: '10.1' (or '10.1.') is 10.1.0.0/16.
    """
    value = _plain(text, "client")
    if "%" in value:
        raise ValueError(f"client: a zone index (%...) has no place in a network: {value}")
    spelled = value
    if _PARTIAL_IPV4.fullmatch(value):
        octets = value.rstrip(".").split(".")
        spelled = ".".join(octets + ["0"] * (4 - len(octets))) + f"/{8 * len(octets)}"
    try:
        network = ipaddress.ip_network(spelled, strict=False)
    except ValueError:
        raise ValueError(f"client: not an IP address or network: {value}") from None
    network = unmapped_network(network)
    if network.prefixlen == 0:
        raise ValueError(f"client: {network} would whitelist every IPv{network.version} client")
    return str(network)


def normalize_hostname(text: str) -> str:
    """'mx.example.com' (that name), '.example.com' (it and every name under it)
    or '/regex/' (searched in the name, case-insensitively; kept as given)."""
    value = _plain(text, "hostname")
    if is_regex(value):
        check_regex(value[1:-1])
        return value
    if value.startswith("/") or value.endswith("/"):
        raise ValueError(f"hostname: a regular expression is written /like this/: {value}")
    name = value                        # lower-cased by check_domain, after the look-alike check
    suffix = name.startswith(".")
    name = check_domain(name[1:] if suffix else name, "hostname")
    if suffix and "." not in name:
        raise ValueError(f"hostname: .{name} is too broad: give at least two labels")
    return "." + name if suffix else name


def normalize_recipient(text: str) -> str:
    """A recipient as normalize_address spells it, or '/regex/' (kept as given),
    searched in the whole recipient address as greyd keys it (idn.address_key),
    case-insensitively, as postgrey's whitelist_recipients does."""
    value = _plain(text, "recipient")
    if is_regex(value):
        check_regex(value[1:-1])
        return value
    return normalize_address(value)


def normalize_address(text: str) -> str:
    """'user@dom', '@dom' (the whole domain) or 'user@' (that local part anywhere),
    lower-cased (NFC; an internationalized domain as its A-label, as the
    decision compares it); '<user@dom>' loses its brackets."""
    value = _plain(text, "address")
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    if is_regex(value):
        raise ValueError(f"address: a /regex/ entry is for recipients and hostnames only: {value}")
    if value.count("@") != 1:
        hint = "" if "@" in value else \
            " (write @domain for a whole domain, user@ for a local part)"
        raise ValueError(f"address: expected user@domain, @domain or user@: {value}{hint}")
    local, _, domain = value.partition("@")     # the domain as written: see check_domain
    local = unicodedata.normalize("NFC", local).lower()
    if not local and not domain:
        raise ValueError("address: '@' alone names nothing")
    if local:
        if len(local.encode()) > 64:
            raise ValueError(f"address: local part longer than 64 octets: {value}")
        if any(ch in local for ch in '<>()[],;:\\"') or local.startswith(".") \
                or local.endswith(".") or ".." in local:
            raise ValueError(f"address: not a plain local part: {value}")
    if domain:
        domain = check_domain(domain, "address")
    return f"{local}@{domain}"


def check_domain(name: str, what: str) -> str:
    """A lower-case DNS name without its final dot, an internationalized one
    as its A-label; ValueError if it is not one."""
    name = name[:-1] if name.endswith(".") else name
    if not name:
        raise ValueError(f"{what}: empty domain name")
    mapped = idn.alabel(name)
    if mapped is None:
        raise ValueError(f"{what}: not a valid internationalized domain name, or one that "
                         f"looks like another (fullwidth or compatibility letters): {name}")
    name = mapped
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{what}: not a valid domain name: {name}")
    if name.rsplit(".", 1)[-1].isdigit():
        raise ValueError(f"{what}: {name} is an IP address, not a name (use --client)")
    return name


def is_regex(value: str) -> bool:
    """Whether a stored or given value is a '/regex/' entry."""
    return len(value) > 2 and value.startswith("/") and value.endswith("/")


def compile_regex(pattern: str) -> re.Pattern:
    """`pattern` as every regex entry (hostname or recipient) is matched:
    re.search, case-insensitive, anchored only as written."""
    return re.compile(pattern, re.IGNORECASE)


def check_regex(pattern: str) -> None:
    """ValueError unless `pattern` compiles as greyd will use it (compile_regex)."""
    try:
        compile_regex(pattern)
    except (re.error, OverflowError, RecursionError) as error:
        raise ValueError(f"regular expression /{pattern}/ does not compile: {error}") from None


def check_comment(text: str) -> str:
    """A comment fit for a one-line listing."""
    if not text.isprintable():
        raise ValueError(f"comment: no control or unprintable characters allowed: {text!r}")
    if len(text) > MAX_COMMENT:
        raise ValueError(f"comment: longer than {MAX_COMMENT} characters")
    return text


def _plain(text: str, what: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError(f"{what}: empty value")
    if any("\udc80" <= ch <= "\udcff" for ch in value):    # undecodable bytes (surrogateescape)
        raise ValueError(f"{what}: not valid UTF-8: {value!r}")
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise ValueError(f"{what}: no spaces or unprintable characters allowed: {value!r}")
    return value


# -- postgrey's whitelist files ---------------------------------------------------

@dataclass(frozen=True)
class Line:
    """One entry line of a postgrey whitelist file: the entry it gives, or why not."""

    number: int
    text: str
    kind: str | None = None
    value: str | None = None
    reason: str | None = None      # set when the line is skipped


def read_postgrey(lines: Iterable[str], kind: str = "client") -> Iterator[Line]:
    """The entry lines of a postgrey `whitelist_clients` (kind 'client') or
    `whitelist_recipients` (kind 'recipient') file; comments and blank lines left out."""
    if kind not in IMPORT_KINDS:
        raise ValueError(f"unknown whitelist file kind: {kind!r}")
    parse = postgrey_client if kind == "client" else postgrey_recipient
    for number, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()   # postgrey: s/#.*$//, comments anywhere
        if not text:
            continue
        try:
            entry_kind, value = parse(text)
        except ValueError as error:
            yield Line(number, text, reason=str(error))
        else:
            yield Line(number, text, entry_kind, value)


def postgrey_client(text: str) -> tuple[str, str]:
    """(kind, value) for one line of `whitelist_clients`.

    postgrey reads '/regex/' as a pattern for the client's name; digits and
    dots as an address or its leading octets ('10.1' = 10.1.0.0/16); a CIDR
    or an IPv6 address as a network; anything else as a name that the
    client's name ends with, label-wise: 'example.com' covers example.com and
    every name under it, which greyd writes '.example.com'.
    """
    if any(ch.isspace() for ch in text):
        raise ValueError("more than one word on the line")
    if text.startswith("/"):
        return "hostname", normalize_hostname(text)
    if _LOOKS_LIKE_IP.fullmatch(text):      # leading octets too: normalize_client reads them
        return "client", normalize_client(text)
    return "hostname", normalize_hostname(text if text.startswith(".") else "." + text)


def postgrey_recipient(text: str) -> tuple[str, str]:
    """('recipient', value) for one line of `whitelist_recipients`.

    postgrey's 'user@domain', 'user@', '@domain' and '/regex/' are greyd's
    own forms; a plain 'domain.tld' means the whole domain, '@domain.tld'.
    """
    if any(ch.isspace() for ch in text):
        raise ValueError("more than one word on the line")
    if is_regex(text):
        return "recipient", normalize_recipient(text)
    if "@" not in text:
        text = "@" + text
    return "recipient", normalize_address(text)


# -- the index the decision matches against (policy step 3) -------------------------

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
    recipient_patterns: list[tuple[re.Pattern, Entry]] = field(default_factory=list)

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
            if is_regex(value):
                self.patterns.append((compile_regex(value[1:-1]), entry))
            elif value.startswith("."):
                _keep(self.suffixes, value.lower(), entry)
            else:
                _keep(self.names, value.lower(), entry)
        elif entry.kind == "sender":
            _keep(self.senders, value.lower(), entry)
        elif entry.kind == "recipient":
            if is_regex(value):
                self.recipient_patterns.append((compile_regex(value[1:-1]), entry))
            else:
                _keep(self.recipients, value.lower(), entry)
        else:
            raise ValueError(f"unknown whitelist kind: {entry.kind}")

    def match(self, request: "Request", now: int) -> str | None:
        """The first live entry that covers this request, as shown in reasons."""
        for entry in self._candidates(request):
            if entry is not None and (entry.expires is None or entry.expires > now):
                return entry.value
        if request.recipient.lower() == "postmaster":
            return "postmaster"
        return None

    def _candidates(self, request: "Request"):
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
        if self.recipient_patterns and request.recipient:
            recipient = idn.address_key(request.recipient)
            for pattern, entry in self.recipient_patterns:
                if pattern.search(recipient):
                    yield entry


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

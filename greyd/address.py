"""Parsing of SMTP paths and ESMTP parameters (RFC 5321 4.1.2, 4.1.1.2-3).

Pure functions: text in, a `Path` or a `PathError` naming the reply out.
Paths follow RFC 6531's grammar: UTF-8 in atext and qtext, U-labels in
domains (valid IDNA 2008, mapped by UTS 46 no further than case and NFC:
see idn.py); whether the transaction may carry them (SMTPUTF8 declared) is
the session's question. Text that was not UTF-8 on the wire (surrogates
from `surrogateescape`) or is unprintable is refused. Lengths are octets
(RFC 6531 3.3). The DSN parameters (RFC 3461, RFC 6533) are checked here
and kept as the client wrote them, to be passed on unchanged. A source route
(`<@a,@b:user@c>`) is accepted and dropped, as RFC 5321 4.1.1.3 allows, so
it never reaches the upstream. An RFC 2047 encoded-word (`=?cs?Q?...?=`) is
refused: it must not appear in an addr-spec (RFC 2047 5), and an upstream
that decodes it anyway (Python's email parser does) would read routing
characters or CR/LF that the relay check never saw.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from . import idn, replies
from .replies import Reply

# Each class below is ASCII members plus UTF8-non-ascii (RFC 6531 3.3), every
# code point above 0x7f but the surrogates, written as what it excludes: a class
# that lists the non-ASCII ranges costs the re module milliseconds to compile
# (80 ms in all, at every start of greyd and of each CLI command); the same
# set written as a negation costs well under one.
_NOT_UTF8 = r"\x7f\ud800-\udfff"                     # DEL, and the surrogates
_ATEXT = r'[^\x00-\x20"(),.:;<>@\[\\\]' + _NOT_UTF8 + "]"      # RFC 5322 atext
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[^\x00-\x1f"\\' + _NOT_UTF8 + r']|\\[\x20-\x7e])*"'
_LETDIG = r"[^\x00-\x2f\x3a-\x40\x5b-\x60\x7b-" + _NOT_UTF8 + "]"   # idn.alabel checks a U-label
_LABEL = rf"{_LETDIG}+(?:-+{_LETDIG}+)*"             # no backtracking at each label's end
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_MAILBOX = re.compile(rf"(?:{_DOT_STRING}|{_QUOTED})@(?:{_DOMAIN}|{_LITERAL})")
_ROUTE = re.compile(rf"@(?:{_DOMAIN}|{_LITERAL})(?:,@(?:{_DOMAIN}|{_LITERAL}))*:")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
_UTF8_VALUE = re.compile(r"[^\x00-\x20=" + _NOT_UTF8 + "]+")   # RFC 6531 3.3 esmtp-value
_ENCODED_WORD = re.compile(r"=\?[^?]*\?[^?]*\?[^?]*\?=")   # RFC 2047 2

MAX_LOCAL = 64     # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255   # RFC 5321 4.5.3.1.2
MAX_PATH = 256     # RFC 5321 4.5.3.1.3


class PathError(Exception):
    """A path or parameter greyd cannot take; `reply` says why."""

    def __init__(self, reply: Reply):
        super().__init__(reply.text)
        self.reply = reply


class Path(NamedTuple):
    address: str                                   # "" for the null sender
    params: dict[str, str | None]


class MailParams(NamedTuple):
    """The MAIL parameters greyd takes: SIZE (RFC 1870), BODY (RFC 6152),
    SMTPUTF8 (RFC 6531) and DSN's RET and ENVID (RFC 3461), the last as written."""

    size: int | None = None
    body: str | None = None
    smtputf8: bool = False
    dsn: tuple[str, ...] = ()


def parse(arg: str, keyword: str, *, null_ok: bool, bad: Reply,
          utf8_values: bool = False) -> Path:
    """Parse 'FROM:<a@b> SIZE=10' (keyword 'FROM') or 'TO:<...>' into a Path;
    parameter values may hold UTF-8 only with `utf8_values` (an RCPT in a
    transaction that declared SMTPUTF8: RFC 6533's ORCPT=utf-8;...)."""
    head, sep, rest = arg.partition(":")
    if not sep or not head.isascii() or head.strip().upper() != keyword:
        raise PathError(replies.SYNTAX)
    rest = rest.lstrip(" ")
    if not rest.startswith("<"):
        raise PathError(bad)
    end = _closing_bracket(rest)
    if end < 0:
        raise PathError(bad)
    address = _mailbox(rest[1:end], null_ok=null_ok, bad=bad)
    return Path(address, parse_params(rest[end + 1:], utf8_values))


def _closing_bracket(text: str) -> int:
    """Index of the '>' that closes the path, skipping quoted strings."""
    if '"' not in text:
        return text.find(">")
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def _mailbox(inner: str, *, null_ok: bool, bad: Reply) -> str:
    if inner == "":
        if null_ok:
            return ""
        raise PathError(bad)
    if _octets(inner) > MAX_PATH or not (inner.isascii() or inner.isprintable()):
        raise PathError(bad)
    route = _ROUTE.match(inner)
    if route:
        inner = inner[route.end():]
    if not null_ok and inner.isascii() and inner.lower() == "postmaster":
        return inner
    if not _MAILBOX.fullmatch(inner) or ("=?" in inner and _ENCODED_WORD.search(inner)):
        raise PathError(bad)
    local, _, domain = inner.rpartition("@")
    if _octets(local) > MAX_LOCAL or _octets(domain) > MAX_DOMAIN:
        raise PathError(bad)
    if not domain.isascii() and idn.alabel(domain) is None:
        raise PathError(bad)        # not a U-label, or a look-alike of another name
    return inner


def _octets(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))


def parse_params(text: str, utf8_values: bool = False) -> dict[str, str | None]:
    """ESMTP parameters 'KEY=VALUE KEY' into {KEY: VALUE or None}; keys upper-cased;
    values ASCII unless `utf8_values` (RFC 6531 3.3), and printable."""
    value_form = _UTF8_VALUE if utf8_values else _VALUE
    params: dict[str, str | None] = {}
    if text and not text.startswith(" "):
        raise PathError(replies.BAD_PARAMETER)
    for word in filter(None, text.split(" ")):
        key, eq, value = word.partition("=")
        if (not _KEYWORD.fullmatch(key) or (eq and not value_form.fullmatch(value))
                or not (value.isascii() or value.isprintable())):
            raise PathError(replies.BAD_PARAMETER)
        if key.upper() in params:
            raise PathError(replies.BAD_PARAMETER)
        params[key.upper()] = value if eq else None
    return params


def mail_params(params: dict[str, str | None], offered: tuple[str, ...] = ()) -> MailParams:
    """SIZE=, BODY=, and the parameters of the extensions `offered` in EHLO
    (SMTPUTF8, DSN's RET= and ENVID=); any other is refused (555 5.5.4)."""
    size, body, smtputf8, dsn = None, None, False, []
    for key, value in params.items():
        if key == "SIZE" and value and value.isascii() and value.isdigit() and len(value) <= 20:
            size = int(value)
        elif key == "BODY" and value and value.upper() in ("7BIT", "8BITMIME") \
                and value.isascii():
            body = value.upper()
        elif key in ("SIZE", "BODY"):
            raise PathError(replies.BAD_PARAMETER)
        elif key == "SMTPUTF8" and "SMTPUTF8" in offered:
            if value is not None:
                raise PathError(replies.BAD_PARAMETER)
            smtputf8 = True
        elif key in ("RET", "ENVID") and "DSN" in offered:
            if not _DSN_MAIL[key](value or ""):
                raise PathError(replies.BAD_DSN)
            dsn.append(f"{key}={value}")
        else:
            raise PathError(replies.UNKNOWN_PARAMETER)
    return MailParams(size, body, smtputf8, tuple(dsn))


def rcpt_params(params: dict[str, str | None], offered: tuple[str, ...] = (),
                smtputf8: bool = False) -> tuple[str, ...]:
    """DSN's NOTIFY= and ORCPT= (RFC 3461 4.1-4.2; RFC 6533's utf-8 address
    type, its raw UTF-8 form only under `smtputf8`), as written; any other
    parameter, or these without DSN offered, is refused (555 5.5.4)."""
    dsn = []
    for key, value in params.items():
        if key not in ("NOTIFY", "ORCPT") or "DSN" not in offered:
            raise PathError(replies.UNKNOWN_PARAMETER)
        valid = _notify(value or "") if key == "NOTIFY" else _orcpt(value or "", smtputf8)
        if not valid:
            raise PathError(replies.BAD_DSN)
        dsn.append(f"{key}={value}")
    return tuple(dsn)


# -- DSN (RFC 3461 4, RFC 6533 3) -------------------------------------------------------

MAX_ENVID = 100         # RFC 3461 4.4, before xtext encoding
MAX_ORCPT = 500         # RFC 3461 4.2: the original-recipient-address
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")          # RFC 5322 atom
_EMBEDDED = r"\\x\{(?:[1-9A-F][0-9A-F]{1,5})\}"                     # RFC 6533 EmbeddedUnicodeChar
_UTF8_XTEXT = re.compile(rf"(?:[\x21-\x2a\x2c-\x3c\x3e-\x5b\x5d-\x7e]|{_EMBEDDED})+")
_UTF8_UNITEXT = re.compile(rf"(?:[^\x00-\x20+=\\{_NOT_UTF8}]|{_EMBEDDED})+")


def xtext_decoded(value: str) -> str | None:
    """The text an RFC 3461 4 xtext stands for; None when it is not xtext or
    not printable US-ASCII once decoded."""
    if not _XTEXT.fullmatch(value):
        return None
    text = _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), value)
    return text if text.isascii() and text.isprintable() else None


def _envid(value: str) -> bool:
    text = xtext_decoded(value)
    return text is not None and len(text) <= MAX_ENVID


def _notify(value: str) -> bool:
    if not value.isascii():
        return False                    # "ſuccess".upper() is "SUCCESS"
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return True
    return (len(set(words)) == len(words)
            and all(word in ("SUCCESS", "FAILURE", "DELAY") for word in words))


def _orcpt(value: str, smtputf8: bool) -> bool:
    addr_type, sep, address = value.partition(";")
    if not sep or not _ADDR_TYPE.fullmatch(addr_type) or not address:
        return False
    if addr_type.lower() == "utf-8":
        form = _UTF8_UNITEXT if smtputf8 else _UTF8_XTEXT
        return _octets(address) <= MAX_ORCPT and bool(form.fullmatch(address)) \
            and all(_scalar(m) for m in re.findall(r"\\x\{([0-9A-F]+)\}", address))
    text = xtext_decoded(address)
    return text is not None and len(text) <= MAX_ORCPT


def _scalar(hexpoint: str) -> bool:
    """An EmbeddedUnicodeChar names a non-ASCII Unicode scalar value."""
    point = int(hexpoint, 16)
    return 0x80 <= point <= 0x10FFFF and not 0xD800 <= point <= 0xDFFF


_DSN_MAIL = {"RET": lambda value: value.isascii() and value.upper() in ("FULL", "HDRS"),
             "ENVID": _envid}

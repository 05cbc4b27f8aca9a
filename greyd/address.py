"""Parsing of SMTP paths and ESMTP parameters (RFC 5321 4.1.2, 4.1.1.2-3).

Pure functions: text in, a `Path` or a `PathError` naming the reply out.
Only ASCII is accepted (greyd does not offer SMTPUTF8). A source route
(`<@a,@b:user@c>`) is accepted and dropped, as RFC 5321 4.1.1.3 allows, so
it never reaches the upstream. An RFC 2047 encoded-word (`=?cs?Q?...?=`) is
refused: it must not appear in an addr-spec (RFC 2047 5), and an upstream
that decodes it anyway (Python's email parser does) would read routing
characters or CR/LF that the relay check never saw.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from . import replies
from .replies import Reply

_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9]+(?:-+[A-Za-z0-9]+)*"          # no backtracking at each label's end
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_MAILBOX = re.compile(rf"(?:{_DOT_STRING}|{_QUOTED})@(?:{_DOMAIN}|{_LITERAL})")
_ROUTE = re.compile(rf"@(?:{_DOMAIN}|{_LITERAL})(?:,@(?:{_DOMAIN}|{_LITERAL}))*:")
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
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
    """The MAIL parameters greyd takes: SIZE (RFC 1870) and BODY (RFC 6152)."""

    size: int | None = None
    body: str | None = None


def parse(arg: str, keyword: str, *, null_ok: bool, bad: Reply) -> Path:
    """Parse 'FROM:<a@b> SIZE=10' (keyword 'FROM') or 'TO:<...>' into a Path."""
    head, sep, rest = arg.partition(":")
    if not sep or head.strip().upper() != keyword:
        raise PathError(replies.SYNTAX)
    rest = rest.lstrip(" ")
    if not rest.startswith("<"):
        raise PathError(bad)
    end = _closing_bracket(rest)
    if end < 0:
        raise PathError(bad)
    address = _mailbox(rest[1:end], null_ok=null_ok, bad=bad)
    return Path(address, parse_params(rest[end + 1:]))


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
    if len(inner) > MAX_PATH:
        raise PathError(bad)
    route = _ROUTE.match(inner)
    if route:
        inner = inner[route.end():]
    if not null_ok and inner.lower() == "postmaster":
        return inner
    if not _MAILBOX.fullmatch(inner) or ("=?" in inner and _ENCODED_WORD.search(inner)):
        raise PathError(bad)
    local, _, domain = inner.rpartition("@")
    if len(local) > MAX_LOCAL or len(domain) > MAX_DOMAIN:
        raise PathError(bad)
    return inner


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters 'KEY=VALUE KEY' into {KEY: VALUE or None}; keys upper-cased."""
    params: dict[str, str | None] = {}
    if text and not text.startswith(" "):
        raise PathError(replies.BAD_PARAMETER)
    for word in filter(None, text.split(" ")):
        key, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not _VALUE.fullmatch(value)):
            raise PathError(replies.BAD_PARAMETER)
        if key.upper() in params:
            raise PathError(replies.BAD_PARAMETER)
        params[key.upper()] = value if eq else None
    return params


def mail_params(params: dict[str, str | None]) -> MailParams:
    """SIZE= and BODY= from parsed MAIL parameters; any other is refused."""
    size, body = None, None
    for key, value in params.items():
        if key == "SIZE" and value and value.isdigit() and len(value) <= 20:
            size = int(value)
        elif key == "BODY" and value and value.upper() in ("7BIT", "8BITMIME"):
            body = value.upper()
        elif key in ("SIZE", "BODY"):
            raise PathError(replies.BAD_PARAMETER)
        else:
            raise PathError(replies.UNKNOWN_PARAMETER)
    return MailParams(size, body)

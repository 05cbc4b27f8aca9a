"""Every SMTP reply greyd composes, as a named constant or a small factory.

Each reply greyd writes itself carries an RFC 3463 enhanced status code.
Replies from the upstream MTA are wrapped in `Reply` unchanged (see
`Reply.from_upstream`). Nothing here does I/O.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple


class Reply(NamedTuple):
    """One SMTP reply: a code and one or more text lines."""

    code: int
    lines: tuple[str, ...]

    @classmethod
    def of(cls, code: int, text: str) -> "Reply":
        return cls(code, tuple(text.split("\n")))

    @classmethod
    def from_upstream(cls, code: int, message: bytes | str) -> "Reply":
        """Wrap what smtplib returned: lines joined by LF, kept as given."""
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        lines = [_printable(line) for line in message.split("\n")] or [""]
        return cls(code, tuple(lines))

    @property
    def ok(self) -> bool:
        """True for 2xx and 3xx: the step succeeded or may go on."""
        return 200 <= self.code < 400

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def encode(self) -> bytes:
        """The reply as it goes on the wire, RFC 5321 4.2.1 multi-line form."""
        return encoded(self)


@lru_cache(maxsize=256)
def encoded(reply: Reply) -> bytes:
    """Reply.encode, kept for the replies said over and over (most are constants)."""
    last = len(reply.lines) - 1
    out = []
    for i, line in enumerate(reply.lines):
        sep = " " if i == last else "-"
        out.append(f"{reply.code}{sep}{line}\r\n" if line else f"{reply.code}{sep}\r\n")
    return "".join(out).encode("utf-8", "replace")


def _printable(line: str) -> str:
    """Drop CR and other control characters an upstream might send back."""
    return "".join(ch for ch in line if ch >= " " or ch == "\t")


@lru_cache(maxsize=64)
def greeting(hostname: str, banner: str) -> Reply:
    return Reply.of(220, f"{hostname} ESMTP {banner}")


@lru_cache(maxsize=64)
def ehlo(hostname: str, max_size: int, offered: tuple[str, ...] = ()) -> Reply:
    """The EHLO reply: the extensions always offered, then `offered` (those
    that depend on the session, the certificate or the upstream)."""
    return Reply(250, (
        hostname,
        "PIPELINING",
        f"SIZE {max_size}",
        "8BITMIME",
        "ENHANCEDSTATUSCODES",
        *offered,
    ))


@lru_cache(maxsize=64)
def helo(hostname: str) -> Reply:
    return Reply.of(250, hostname)


@lru_cache(maxsize=1024)
def greylisted(seconds: int) -> Reply:
    return Reply.of(451, f"4.7.1 Greylisted, please try again in {seconds} seconds")


@lru_cache(maxsize=64)
def closing(hostname: str) -> Reply:
    return Reply.of(221, f"2.0.0 {hostname} closing connection")


OK = Reply.of(250, "2.0.0 OK")
READY_TO_START_TLS = Reply.of(220, "2.0.0 Ready to start TLS")
SENDER_OK = Reply.of(250, "2.1.0 Sender OK")
RESET = Reply.of(250, "2.0.0 Reset state")
START_DATA = Reply.of(354, "End data with <CR><LF>.<CR><LF>")
VRFY = Reply.of(252, "2.5.2 Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply.of(214, "2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT")

NEED_HOSTNAME = Reply.of(501, "5.5.4 Syntax: HELO/EHLO hostname")
NEED_HELO = Reply.of(503, "5.5.1 Error: send HELO/EHLO first")
NESTED_MAIL = Reply.of(503, "5.5.1 Error: nested MAIL command")
NEED_MAIL = Reply.of(503, "5.5.1 Error: need MAIL command")
NEED_RCPT = Reply.of(503, "5.5.1 Error: need RCPT command")
BAD_CHARACTERS = Reply.of(501, "5.5.2 Syntax error: bare CR, LF or NUL in command")
SYNTAX = Reply.of(501, "5.5.2 Syntax error in parameters or arguments")
NO_ARGUMENT = Reply.of(501, "5.5.4 Syntax error: no arguments allowed")
BAD_SENDER = Reply.of(501, "5.1.7 Bad sender address syntax")
BAD_RECIPIENT = Reply.of(501, "5.1.3 Bad recipient address syntax")
BAD_PARAMETER = Reply.of(501, "5.5.4 Malformed parameter")
UNKNOWN_PARAMETER = Reply.of(555, "5.5.4 Unsupported MAIL/RCPT parameter")
BAD_DSN = Reply.of(501, "5.5.4 Malformed DSN parameter (RFC 3461)")
NEED_SMTPUTF8 = Reply.of(553, "5.6.7 UTF-8 address needs SMTPUTF8 on MAIL")
UNKNOWN_COMMAND = Reply.of(500, "5.5.2 Error: command not recognized")
NOT_IMPLEMENTED = Reply.of(502, "5.5.1 Error: command not implemented")
LINE_TOO_LONG = Reply.of(500, "5.5.6 Error: line too long")
MESSAGE_TOO_BIG = Reply.of(552, "5.3.4 Error: message size exceeds fixed limit")
BARE_NEWLINE = Reply.of(550, "5.5.2 Error: bare CR or LF in message text")
RELAY_DENIED = Reply.of(550, "5.7.1 Relay access denied")
MUST_STARTTLS = Reply.of(530, "5.7.0 Must issue a STARTTLS command first")
TLS_ALREADY_ACTIVE = Reply.of(503, "5.5.1 Error: TLS already active")
TLS_IN_TRANSACTION = Reply.of(503, "5.5.1 Error: MAIL transaction in progress")
TOO_MANY_RECIPIENTS = Reply.of(452, "4.5.3 Error: too many recipients")

UPSTREAM_AT_RCPT = Reply.of(451, "4.4.1 Upstream mail server unavailable, try again later")
UPSTREAM_LACKS = Reply.of(451, "4.3.3 Upstream mail server does not offer SMTPUTF8 or DSN "
                                 "now, try again later")
UPSTREAM_AT_DATA = Reply.of(451, "4.4.2 Upstream mail server failed during delivery, try again later")
LOCAL_ERROR = Reply.of(451, "4.3.0 Temporary local problem, try again later")
LOCAL_ERROR_CLOSING = Reply.of(421, "4.3.0 Temporary local problem, closing connection")

# Never sent: the session's answer to a command whose reply must wait (Session.resume).
LATER = Reply.of(0, "later")

TIMEOUT = Reply.of(421, "4.4.2 Error: timeout exceeded, closing connection")
TOO_MANY_ERRORS = Reply.of(421, "4.7.0 Error: too many errors, closing connection")
SHUTTING_DOWN = Reply.of(421, "4.3.2 Service shutting down, closing connection")
TOO_MANY_CONNECTIONS = Reply.of(421, "4.3.2 Too many connections, try again later")
TOO_MANY_FROM_CLIENT = Reply.of(421, "4.7.0 Too many connections from your address, try again later")

# Replies that count toward server.max_errors: the client's own mistakes.
_ERRORS = frozenset({
    NEED_HOSTNAME, NEED_HELO, NESTED_MAIL, NEED_MAIL, NEED_RCPT, BAD_CHARACTERS,
    SYNTAX, NO_ARGUMENT, BAD_SENDER, BAD_RECIPIENT, BAD_PARAMETER, UNKNOWN_PARAMETER,
    BAD_DSN, NEED_SMTPUTF8, UNKNOWN_COMMAND, NOT_IMPLEMENTED, LINE_TOO_LONG, RELAY_DENIED,
    MUST_STARTTLS, TLS_ALREADY_ACTIVE, TLS_IN_TRANSACTION,
})


ERROR_CODES = frozenset(reply.code for reply in _ERRORS)   # a first look, without a call


def is_error(reply: Reply) -> bool:
    return reply.code in ERROR_CODES and reply in _ERRORS

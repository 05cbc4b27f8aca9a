"""What is done to a message before it is relayed (SPEC §4, §6).

`normalized` makes every line end in CRLF, so the upstream can never read
the stream as more than one message ("SMTP smuggling"); `trace_headers` is
the `Received:` line (RFC 5321 4.4), and `X-Greylist:` when the message was
delayed, prepended on relay. Pure functions: bytes and values in, bytes out.
"""

from __future__ import annotations

import re
from email.utils import formatdate

from . import __version__

_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_ANY_NEWLINE = re.compile(rb"\r\n|\r|\n")


def normalized(message: bytes, bare_newlines: str) -> bytes | None:
    """The message with every line ending in CRLF; None when it has a lone CR
    or LF and server.bare_newlines is "reject"."""
    if _BARE_NEWLINE.search(message):
        if bare_newlines == "reject":
            return None
        message = _ANY_NEWLINE.sub(b"\r\n", message)
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message


def trace_headers(*, helo: str | None, name: str | None, client: str, hostname: str,
                  esmtp: bool, session: str, recipients: list[str], delayed: int,
                  header: bool, now: float, tls: tuple[str, str, int] | None = None,
                  smtputf8: bool = False) -> bytes:
    """`Received:` (RFC 5321 4.4), and postgrey's `X-Greylist:` when a
    recipient was delayed and greylist.header is on.

    With TLS, the comment names the protocol and cipher as Postfix does, and
    the protocol is ESMTPS (RFC 3848), UTF8SMTPS with SMTPUTF8 (RFC 6531).
    """
    date = formatdate(now, localtime=True)
    # RFC 3848 and RFC 6531 3.7.3: SMTP, ESMTP, ESMTPS, UTF8SMTP, UTF8SMTPS
    protocol = ("UTF8SMTP" if smtputf8 else "ESMTP" if esmtp else "SMTP") + ("S" if tls else "")
    lines = [f"Received: from {helo} ({name or 'unknown'} [{client}])\r\n"]
    if tls:
        version, cipher, bits = tls
        lines.append(f"\t(using {version} with cipher {cipher} ({bits}/{bits} bits))\r\n")
    lines.append(f"\tby {hostname} (greyd) with {protocol} id {session}")
    if len(recipients) == 1:
        lines.append(f"\r\n\tfor <{recipients[0]}>")
    lines.append(f"; {date}\r\n")
    if delayed and header:
        lines.append(f"X-Greylist: delayed {delayed} seconds by greyd-"
                     f"{__version__} at {hostname}; {date}\r\n")
    return "".join(lines).encode("utf-8", "replace")

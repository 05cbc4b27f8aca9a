"""The client's side of an SMTP session: command lines and the message in,
replies out.

A `Channel` reads what the session asks for, within its limits (RFC 5321
4.5.3.1: command lines of 512 octets, the message up to max_message_size)
and its deadlines (`expect(seconds)`: what is read next must arrive whole
within that time, RFC 5321 4.5.3.2), and writes replies. A client that
leaves, goes quiet past its deadline or stops reading ends the session:
`Closed`, with the session-end word. It knows nothing of SMTP commands.
"""

from __future__ import annotations

import io
import socket
import ssl
from typing import BinaryIO, Callable, NamedTuple

from . import replies
from .replies import Reply

COMMAND_LIMIT = 512              # RFC 5321 4.5.3.1.4, CRLF included
MAIL_ALLOWANCE = 26 + 15         # RFC 1870 SIZE= and RFC 6152 BODY= (RFC 5321 4.5.3.1.4)
DSN_ALLOWANCE = {"MAIL": 110, "RCPT": 600}  # RFC 3461 RET=, ENVID=; NOTIFY=, ORCPT= (when offered)
SMTPUTF8_ALLOWANCE = 10          # RFC 6531 3.4 (when offered)
LINE_LIMIT = COMMAND_LIMIT + max(MAIL_ALLOWANCE + DSN_ALLOWANCE["MAIL"] + SMTPUTF8_ALLOWANCE,
                                 DSN_ALLOWANCE["RCPT"])   # the longest line read whole
CHUNK = 65536                    # bytes of a message line read at a time, at most
READ_BUFFER = 16384              # the client's read buffer
TLS_READ_BUFFER = 2048           # ... after STARTTLS: the TLS engine holds a whole record


class Closed(Exception):
    """The session is over; the text is the session-end word (quit, timeout,
    disconnect, shutdown, error, tls-failed), `reason` what went wrong when
    the log line should say more."""

    def __init__(self, end: str, reason: str = ""):
        super().__init__(end)
        self.reason = reason


def _why(error: OSError) -> str:
    """A failed handshake in a word or two: OpenSSL's reason, or timeout, eof."""
    if isinstance(error, socket.timeout):
        return "timeout"
    if isinstance(error, ssl.SSLEOFError):
        return "eof"
    return getattr(error, "reason", None) or error.strerror or type(error).__name__


def _ended(error: OSError) -> Closed:
    """The end of a session whose client socket failed: a timeout (the
    deadline passed, or the client stopped reading) or a disconnect."""
    return Closed("timeout" if isinstance(error, socket.timeout) else "disconnect")


class Received(NamedTuple):
    """A message as read: its bytes (none kept once over the limit) and
    whether it went over server.max_message_size."""

    data: bytes
    too_big: bool


class Channel:
    """One client connection: `rfile` to read from, `send(bytes)` to write,
    `expect(seconds)` to set the deadline of the next read."""

    def __init__(self, rfile: BinaryIO, send: Callable[[bytes], None],
                 expect: Callable[[float], None],
                 secure: Callable[[ssl.SSLContext, float], tuple[str, str, int]] | None = None):
        self.rfile, self._send, self.expect, self._secure = rfile, send, expect, secure

    def start_tls(self, context: ssl.SSLContext, timeout: float) -> tuple[str, str, int]:
        """The TLS handshake (`secure`), bounded by `timeout`; the protocol
        version, cipher and its bits. Whatever the client sent after the STARTTLS line
        and before the handshake is thrown away unread, never taken as a
        command (CVE-2011-0411). A failed handshake ends the session."""
        raw = self.rfile.detach()           # with it goes the buffered plaintext
        self.rfile = io.BufferedReader(raw, TLS_READ_BUFFER)
        try:
            return self._secure(context, timeout)
        except OSError as error:
            raise Closed("tls-failed", _why(error)) from None

    def send(self, reply: Reply) -> None:
        self.write(replies.encoded(reply))

    def write(self, data: bytes) -> None:
        try:
            self._send(data)
        except OSError as error:
            raise _ended(error) from None

    def send_quietly(self, reply: Reply) -> None:
        """Send when the client still listens (a last word before closing)."""
        try:
            self.send(reply)
        except Closed:
            pass

    def command(self) -> bytes:
        """One command line; b"" when it was too long (the rest is skipped)."""
        readline = self.rfile.readline
        try:
            line = readline(LINE_LIMIT + 1)
            if line.endswith(b"\n"):
                return line
            if len(line) <= LINE_LIMIT:
                raise Closed("disconnect")          # end of stream within the line
            while not (rest := readline(CHUNK)).endswith(b"\n"):
                if not rest:
                    raise Closed("disconnect")
            return b""
        except OSError as error:
            raise _ended(error) from None

    def message(self, limit: int, timeout: float) -> Received:
        """The message up to CRLF.CRLF, dot-unstuffed (RFC 5321 4.5.2); each
        line must arrive within `timeout`."""
        chunks, size, too_big = [], 0, False
        line_start = True               # what came before ended with CRLF
        after_cr = False                # ... or with CR, if this chunk is the LF
        while True:
            self.expect(timeout)
            try:
                chunk = self.rfile.readline(CHUNK)
            except OSError as error:
                raise _ended(error) from None
            if not chunk:
                raise Closed("disconnect")
            if line_start:
                if chunk == b".\r\n":
                    return Received(b"".join(chunks), too_big)
                if chunk[:1] == b"." and chunk[1:] not in (b"\n", b"\r", b""):
                    chunk = chunk[1:]
            line_start = chunk.endswith(b"\r\n") or (chunk == b"\n" and after_cr)
            after_cr = chunk.endswith(b"\r")
            size += len(chunk)
            if size > limit:
                too_big = True
            elif not too_big:
                chunks.append(chunk)

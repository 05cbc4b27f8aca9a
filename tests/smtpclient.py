"""The tests' SMTP clients: `Raw` for exact bytes (smtplib fixes them up), `R` for
comparing its replies with greyd's constants, `deliver`, one whole transaction
through smtplib, and `greetings`, what many connections at once are told.
This is a helper module, not a test module.
"""

from __future__ import annotations

import smtplib
import socket
import ssl

from greyd.replies import Reply


def R(reply: Reply) -> tuple[int, str]:
    """A reply constant as Raw.cmd() and Raw.reply() return it: (code, text)."""
    return reply.code, reply.text


def deliver(port: int, sender: str, recipient: str = "bob@localhost", body: bytes = b"", *,
            source: str | None = None) -> tuple:
    """One transaction from 127.0.0.1 (or `source`) through smtplib: the RCPT
    reply, and the DATA reply when the RCPT passed (else None)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10,
                      source_address=(source, 0) if source else None) as client:
        client.ehlo("mail.example.net")
        client.mail(sender)
        rcpt = client.rcpt(recipient)
        data = client.data(body) if rcpt[0] == 250 else None
    return rcpt, data


def greetings(port: int, n: int, *, source: str | None = None) -> list[tuple[int, str]]:
    """The greetings of `n` connections from `source`, all open at once; then closed."""
    opened: list[Raw] = []
    try:
        for _ in range(n):
            opened.append(Raw(port, source=source))
        return [client.greeting for client in opened]
    finally:
        for client in opened:
            client.close()


class Raw:
    """One TCP connection to greyd; every read is bounded by `timeout`."""

    def __init__(self, port: int, host: str = "127.0.0.1", *, timeout: float = 5,
                 source: str | None = None, greet: bool = True):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply() if greet else None

    @classmethod
    def over(cls, sock: socket.socket, *, timeout: float = 5) -> "Raw":
        """A client on a socket already connected (one end of a socketpair)."""
        raw = cls.__new__(cls)
        raw.sock = sock
        sock.settimeout(timeout)
        raw.file = sock.makefile("rb")
        raw.greeting = raw.reply()
        return raw

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """(code, text) of one possibly multi-line reply; (0, '') at end of stream."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return 0, "\n".join(lines)
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), "\n".join(lines)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply()

    def starttls(self, context: ssl.SSLContext, hostname: str = "mx.greyd.test") -> tuple[int, str]:
        """STARTTLS, then the handshake when it was answered 220; its reply."""
        reply = self.cmd("STARTTLS")
        if reply[0] == 220:
            self.file.close()
            self.sock = context.wrap_socket(self.sock, server_hostname=hostname)
            self.file = self.sock.makefile("rb")
        return reply

    def closed(self) -> bool:
        """True when the server has closed the connection."""
        try:
            return self.file.read(1) == b""
        except (ConnectionResetError, socket.timeout):
            return False

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

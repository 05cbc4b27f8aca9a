"""A raw SMTP client for tests that need to send exact bytes (smtplib fixes them up)."""

from __future__ import annotations

import socket


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

"""A client's socket as a session reads and writes it: one deadline for
what is read next, and TLS over it once STARTTLS is done.

`Connection` is the raw stream under the session's BufferedReader. It
knows nothing of SMTP: the channel (channel.py) reads lines from it, the
server (server.py) makes one per accepted client.
"""

from __future__ import annotations

import io
import socket
import ssl
import struct
import time

READ_WAKE = 2.0        # seconds a read sleeps at most before it looks at its deadline
TLS_CHUNK = 16709      # one TLS record at most (RFC 8446 5.2), read at a time
TLS_FIRST_READ = 2048  # bytes a TLS read asks for, until one fills them (see _feed)


class Connection(io.RawIOBase):
    """A client socket whose reads share one deadline.

    `expect(seconds)` starts the clock for what the session reads next (a
    command line, a line of the message): it must arrive whole within that
    time, not merely byte by byte, so a client that dribbles one byte at a
    time cannot hold its thread forever (RFC 5321 4.5.3.2). The C
    BufferedReader above it still does the line splitting.

    The socket stays in blocking mode and the kernel keeps the timeouts
    (SO_RCVTIMEO, SO_SNDTIMEO), inherited from the listening socket
    (`Listener.set_socket_options`), among them a receive timeout of `wake`
    seconds: a read wakes at least that often to look at the deadline, and
    the timeout is set anew only when the time left is shorter by more than
    SLACK, so a brisk session sets no option at all.
    """

    SLACK = 0.5

    def __init__(self, sock: socket.socket, wake: float, early: bytes = b""):
        """`early`: what was read from the socket before (by the reactor),
        to be read first."""
        self.sock = sock                # blocking: accepted from a listener without a timeout
        self.deadline = time.monotonic() + wake
        self.wake = wake
        self._armed = wake          # the receive timeout the kernel has now
        self.tls: ssl.SSLObject | None = None   # after STARTTLS
        self._read_size = TLS_FIRST_READ
        self._early = early
        self.untouched = True           # nothing read through it yet

    def readable(self) -> bool:
        return True

    def expect(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def unread(self) -> bytes | None:
        """`early`, when nothing has been read through the connection yet."""
        return self._early if self.untouched else None

    def readinto(self, buffer) -> int:
        self.untouched = False
        if self._early:
            count = min(len(buffer), len(self._early))
            buffer[:count], self._early = self._early[:count], self._early[count:]
            return count
        if self.tls is not None:
            return self._tls_readinto(buffer)
        return self._receive(self.sock.recv_into, buffer)

    def _receive(self, read, argument):
        """`read(argument)` on the socket once something came, within the deadline."""
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("deadline passed")
            wanted = remaining if remaining < self.wake else self.wake
            if abs(wanted - self._armed) > self.SLACK:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(wanted))
                self._armed = wanted
            try:
                return read(argument)
            except BlockingIOError:     # EAGAIN: the kernel's receive timeout ran out,
                continue                # which may be before the deadline

    def send(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)
            data = self._outgoing.read()
        try:
            self.sock.sendall(data)
        except BlockingIOError:     # EAGAIN: the client has not read for send_timeout
            raise socket.timeout("write timed out") from None

    # -- TLS, through memory BIOs: the socket stays as it is, and so do the deadlines

    def start_tls(self, context: ssl.SSLContext, timeout: float) -> tuple[str, str, int]:
        """The server side of a TLS handshake, bounded by `timeout` as a whole;
        then every read and write goes through it. Returns the protocol
        version, the cipher and its secret bits; raises OSError
        (ssl.SSLError, socket.timeout) when the handshake fails."""
        self._early = b""               # plaintext sent ahead of the handshake: never read
        incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, self._outgoing, server_side=True)
        self._incoming = incoming
        self.expect(timeout)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()
            except ssl.SSLError:
                try:
                    self._flush()               # the alert that tells the client why
                except OSError:
                    pass
                raise
        self._flush()
        self.tls = tls
        name, _, bits = tls.cipher()
        return tls.version(), name, bits

    def _tls_readinto(self, buffer) -> int:
        while True:
            try:
                count = self.tls.read(len(buffer), buffer)
            except ssl.SSLWantReadError:
                self._flush()                   # TLS 1.3 may answer, e.g. a key update
                self._feed()
                continue
            except ssl.SSLZeroReturnError:      # close_notify: the end of the stream
                return 0
            self._flush()
            return count

    def _feed(self) -> None:
        """Read what the client sent next (within the deadline) into the TLS engine.

        What an idle connection holds while it waits is the buffer of this
        read: a small one, until a read fills it (a message on its way), then
        a whole record's until one does not."""
        size = self._read_size
        chunk = self._receive(self.sock.recv, size)
        self._read_size = TLS_CHUNK if len(chunk) == size else TLS_FIRST_READ
        if chunk:
            self._incoming.write(chunk)
        else:
            self._incoming.write_eof()

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            try:
                self.sock.sendall(data)
            except BlockingIOError:
                raise socket.timeout("write timed out") from None


def timeval(seconds: float) -> bytes:
    """A struct timeval for SO_RCVTIMEO/SO_SNDTIMEO; never 0, which means no limit."""
    seconds = max(seconds, 0.001)
    return struct.pack("@ll", int(seconds), int(seconds % 1 * 1_000_000))

"""Stand-ins for the upstream MTA in tests: a real one on aiosmtpd, and raw faults.

`Upstream` is an SMTP server on loopback in its own thread that keeps what it
got (messages, MAIL/RCPT transactions, XCLIENT attributes) and can be told to
refuse recipients, refuse DATA, offer XCLIENT like Postfix, STARTTLS, SMTPUTF8
(aiosmtpd's own) or DSN (advertised here; its parameters kept as written).
`dead_port`, `SilentServer` and `DroppingServer` are the upstream failing:
nothing listening, a server that never speaks, one that hangs up mid-DATA.
This is a helper module, not a test module.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import socketserver
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

HOSTNAME = "upstream.test"
FAULT_TIMEOUT = 10.0  # seconds a fault server waits on a silent peer


@dataclass
class Message:
    """One message the upstream accepted at the end of DATA."""

    mail_from: str            # "" for the null sender <>
    rcpt_tos: list[str]       # the recipients it accepted
    data: bytes               # after dot-unstuffing, exactly as received
    xclient: dict[str, str]   # XCLIENT attributes, xtext-decoded; {} if none
    helo: str                 # the name in the last EHLO/HELO
    mail_options: list[str] = field(default_factory=list)  # MAIL parameters, upper case
    tls: bool = False         # the session ran under STARTTLS


@dataclass
class Transaction:
    """Every MAIL the upstream saw, with each RCPT and the code it answered."""

    mail_from: str
    mail_options: list[str]
    rcpts: list[tuple[str, int]] = field(default_factory=list)
    dsn: list[str] = field(default_factory=list)              # MAIL's RET=, ENVID= as written
    rcpt_dsn: list[list[str]] = field(default_factory=list)   # each RCPT's NOTIFY=, ORCPT=
    data_code: int | None = None  # code at the end of DATA; None if DATA never ended


class Upstream:
    """A real SMTP server on a free loopback port; use as a context manager.

    `reject` maps a recipient to the (code, text) its RCPT gets; `data_reply`
    forces the (code, text) at the end of DATA (otherwise 250); `hide` drops
    EHLO keywords (e.g. {"SIZE"}) from what the server advertises; `smtputf8`
    and `dsn` offer those extensions (both may be changed while it runs: the
    next connection sees the change).
    """

    def __init__(self, *, xclient: bool = False,
                 reject: dict[str, tuple[int, str]] | None = None,
                 data_reply: tuple[int, str] | None = None,
                 host: str = "127.0.0.1", starttls: bool = False,
                 hide: Iterable[str] = (), smtputf8: bool = False, dsn: bool = False):
        self.host = host
        self.port = free_port(host)
        self.xclient = xclient
        self.reject = {address.lower(): reply for address, reply in (reject or {}).items()}
        self.data_reply = data_reply
        self.hide = {keyword.upper() for keyword in hide}
        self.smtputf8, self.dsn = smtputf8, dsn
        self.messages: list[Message] = []
        self.transactions: list[Transaction] = []
        self.connections = 0  # connections that said EHLO or HELO, and more than QUIT after it
        self.probes = 0       # connections that said EHLO, then QUIT: greyd learning its keywords
        self._changed = threading.Condition()
        self._tls_dir = tempfile.TemporaryDirectory() if starttls else None
        tls_context = _server_tls(Path(self._tls_dir.name)) if starttls else None
        self._controller = _Controller(_Handler(self), hostname=host, port=self.port,
                                       xclient=xclient, tls_context=tls_context, upstream=self)

    def __enter__(self) -> Upstream:
        self._controller.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._controller.stop()
        if self._tls_dir is not None:
            self._tls_dir.cleanup()

    def drop_connections(self, reply: str | None = None) -> None:
        """Hang up on every open client connection, after `reply` when given (e.g. a 421)."""
        async def drop():
            for server in self._controller.protocols:
                if server.transport is not None:
                    if reply:
                        server.transport.write(reply.encode() + b"\r\n")
                    server.transport.close()
        asyncio.run_coroutine_threadsafe(drop(), self._controller.loop).result(5)

    def wait_for(self, n: int, timeout: float = 5) -> list[Message]:
        """Wait until at least n messages arrived; all messages so far."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.messages) >= n, timeout):
                raise TimeoutError(f"upstream got {len(self.messages)} messages, wanted {n}")
            return list(self.messages)

    def _count_connection(self) -> None:
        self.connections += 1

    def _count_probe(self) -> None:
        self.connections -= 1
        self.probes += 1

    def _record(self, update) -> None:
        with self._changed:
            update()
            self._changed.notify_all()


class _Handler:
    """aiosmtpd hooks; `server` is the per-connection _UpstreamSMTP."""

    def __init__(self, upstream: Upstream):
        self.upstream = upstream

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self._greeted(server, session, hostname)
        lines = [line[4:] for line in responses]
        if self.upstream.xclient:
            lines.insert(-1, "XCLIENT NAME ADDR HELO")
        if server.offers_dsn:
            lines.insert(-1, "DSN")
        lines = [lines[0]] + [line for line in lines[1:]
                              if line.split()[0].upper() not in self.upstream.hide]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_HELO(self, server, session, envelope, hostname):
        self._greeted(server, session, hostname)
        return f"250 {HOSTNAME}"

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        sender = "" if address == "<>" else address
        transaction = Transaction(sender, list(mail_options), dsn=server.dsn_taken)
        server.transaction = transaction
        self.upstream._record(lambda: self.upstream.transactions.append(transaction))
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        code, text = self.upstream.reject.get(address.lower(), (250, "2.1.5 OK"))
        if code == 250:
            envelope.rcpt_tos.append(address)
        def update():
            server.transaction.rcpts.append((address, code))
            server.transaction.rcpt_dsn.append(server.dsn_taken)
        self.upstream._record(update)
        return f"{code} {text}"

    async def handle_DATA(self, server, session, envelope):
        code, text = self.upstream.data_reply or (250, "2.0.0 OK queued")
        message = Message(
            mail_from=server.transaction.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=envelope.original_content,
            xclient=dict(server.xclient),
            helo=session.host_name,
            mail_options=list(envelope.mail_options),
            tls=session.ssl is not None,
        )

        def update():
            server.transaction.data_code = code
            if 200 <= code < 300:
                self.upstream.messages.append(message)
        self.upstream._record(update)
        return f"{code} {text}"

    def _greeted(self, server, session, hostname: str) -> None:
        session.host_name = hostname
        if not server.greeted:
            server.greeted = True
            self.upstream._record(self.upstream._count_connection)


class _UpstreamSMTP(SMTP):
    """aiosmtpd's SMTP plus Postfix's XCLIENT command (when offered)."""

    def __init__(self, handler, *, xclient: bool, dsn: bool, **kwargs):
        super().__init__(handler, **kwargs)
        self.offers_xclient = xclient
        self.offers_dsn = dsn
        if dsn:     # RFC 3461 lengthens MAIL and RCPT lines (aiosmtpd's limits are per class)
            self.command_size_limits = collections.defaultdict(lambda: 1000)
        self.dsn_taken: list[str] = []    # the DSN parameters of the command being handled
        self.only_greeted = True          # nothing but EHLO/HELO so far (a probe, if QUIT follows)
        upstream = handler.upstream
        self.upstream_record, self.upstream_count_probe = upstream._record, upstream._count_probe
        self.greeted = False
        self.xclient: dict[str, str] = {}
        self.transaction: Transaction | None = None

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.only_greeted = False
        await super().smtp_MAIL(self._take_dsn(arg, ("RET", "ENVID")))

    async def smtp_QUIT(self, arg: str | None) -> None:
        if self.greeted and self.only_greeted:
            self.only_greeted = False
            self.upstream_record(self.upstream_count_probe)
        await super().smtp_QUIT(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        await super().smtp_RCPT(self._take_dsn(arg, ("NOTIFY", "ORCPT")))

    def _take_dsn(self, arg: str | None, keys: tuple[str, ...]) -> str | None:
        """The argument without its DSN parameters, which are kept as written
        (aiosmtpd knows no DSN and upper-cases what it keeps)."""
        self.dsn_taken = []
        if not self.offers_dsn or not arg:
            return arg
        kept = []
        for word in arg.split(" "):
            if word.split("=", 1)[0].upper() in keys:
                self.dsn_taken.append(word)
            else:
                kept.append(word)
        return " ".join(kept)

    async def smtp_XCLIENT(self, arg: str | None) -> None:
        """Override client attributes, then restart the session with a 220 greeting."""
        if not self.offers_xclient:
            await self.push('500 Error: command "XCLIENT" not recognized')
            return
        self.only_greeted = False
        if self.envelope.mail_from:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")
            return
        attributes = {}
        for token in (arg or "").split():
            name, equals, value = token.partition("=")
            if not equals or name.upper() not in ("NAME", "ADDR", "HELO"):
                await self.push(f"501 5.5.4 Bad XCLIENT attribute: {name}")
                return
            attributes[name.upper()] = xtext_decode(value)
        if not attributes:
            await self.push("501 5.5.4 Syntax: XCLIENT attribute=value...")
            return
        self.xclient.update(attributes)
        self.session.host_name = None
        self.session.extended_smtp = False
        self._set_rset_state()
        await self.push(f"220 {self.hostname} ESMTP")


class _Controller(Controller):
    def __init__(self, handler, *, hostname, port, xclient, tls_context, upstream):
        super().__init__(handler, hostname=hostname, port=port)
        self.upstream = upstream
        self.xclient = xclient
        self.tls_context = tls_context
        self.protocols: list[_UpstreamSMTP] = []  # one per connection, touched in the loop only

    def factory(self):
        protocol = _UpstreamSMTP(self.handler, xclient=self.xclient, dsn=self.upstream.dsn,
                                 hostname=HOSTNAME, decode_data=False,
                                 enable_SMTPUTF8=self.upstream.smtputf8,
                                 tls_context=self.tls_context)
        self.protocols.append(protocol)
        return protocol


def xtext_decode(value: str) -> str:
    """Undo RFC 3461 4 xtext: "+XX" is the octet with hex value XX."""
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i] == "+":
            out.append(int(value[i + 1:i + 3], 16))
            i += 3
        else:
            out += value[i].encode()
            i += 1
    return out.decode("utf-8", "replace")


def _server_tls(directory: Path) -> ssl.SSLContext:
    """A throwaway self-signed certificate, made with the openssl command."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-subj", f"/CN={HOSTNAME}", "-days", "1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (bound, read, released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def dead_port() -> int:
    """A loopback port with nothing listening: connecting is refused."""
    return free_port("127.0.0.1")


def hang_up(peers) -> None:
    """Shut down both directions of every peer's socket, wherever it is stuck."""
    for peer in peers:
        try:
            peer.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _FaultServer:
    """A threaded TCP server on 127.0.0.1 whose `talk(sock)` plays one peer."""

    def __init__(self):
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.settimeout(FAULT_TIMEOUT)
                with outer._lock:
                    outer._peers.add(self.request)
                try:
                    outer.talk(self.request)
                except OSError:
                    pass
                finally:
                    with outer._lock:
                        outer._peers.discard(self.request)

        self._lock = threading.Lock()
        self._peers: set[socket.socket] = set()
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        with self._lock:
            hang_up(self._peers)
        self._server.server_close()  # joins the handler threads
        self._thread.join(FAULT_TIMEOUT)

    def talk(self, sock: socket.socket) -> None:
        raise NotImplementedError


class SilentServer(_FaultServer):
    """Accepts connections and never says a word (no greeting, no replies)."""

    def talk(self, sock: socket.socket) -> None:
        while sock.recv(4096):
            pass


class DroppingServer(_FaultServer):
    """Says 250 to everything like an SMTP server, then hangs up in the middle of DATA."""

    def talk(self, sock: socket.socket) -> None:
        sock.sendall(f"220 {HOSTNAME} ESMTP\r\n".encode())
        with sock.makefile("rb") as lines:
            for line in lines:
                verb = line.split(b" ", 1)[0].strip().upper()
                if verb == b"DATA":
                    sock.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    lines.readline()  # the first line of the message, then hang up
                    return
                if verb == b"QUIT":
                    sock.sendall(b"221 2.0.0 Bye\r\n")
                    return
                sock.sendall(b"250 2.0.0 OK\r\n")

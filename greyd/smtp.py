"""One SMTP session with one client (RFC 5321): the state machine of greyd.

State is data (the HELO name, the open transaction), not numbered states.
Each command has one `smtp_VERB` method that guards, acts and returns a
Reply; only `run`, the read loop, writes to the client. The session asks
the policy for a decision per recipient and relays accepted ones in lockstep
through its own `Relay`. It knows nothing of threads or listening sockets.
The client's DNS facts (verified name, DNSWL/DNSBL) are looked up while the
client greets, and collected once, at the first recipient.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import BinaryIO, Callable

from . import __version__, log, policy, replies
from .address import PathError, parse
from .dns import ClientDNS, Lookup, Pending
from .relay import Relay
from .replies import Reply
from .store import StorePool

COMMAND_LIMIT = 512              # RFC 5321 4.5.3.1.4, CRLF included
MAIL_ALLOWANCE = 26 + 15         # RFC 1870 SIZE= and RFC 6152 BODY= (RFC 5321 4.5.3.1.4)
DATA_CHUNK = 65536
UNSUPPORTED = {"EXPN", "TURN", "ETRN", "ATRN", "BDAT", "STARTTLS", "AUTH"}
JUNK = {"NOOP", "RSET", "VRFY", "HELP"}   # commands that move no mail
JUNK_LIMIT = 100       # beyond it each junk command counts as an error (as Postfix does)
STRESS_TIMEOUT = 10.0  # command timeout while the daemon is near max_connections
SHUTDOWN_LINGER = 1.0  # seconds to wait for a QUIT on its way when shutting down
_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_ANY_NEWLINE = re.compile(rb"\r\n|\r|\n")


def _reseed() -> None:
    global _session_ids
    _session_ids = itertools.count(int.from_bytes(os.urandom(5), "big"))


def new_session_id() -> str:
    """Ten hex digits naming a session in the log: a counter from a random start
    per process (forked workers start anew), so no system call per session."""
    return f"{next(_session_ids) & 0xFF_FFFF_FFFF:010x}"


_reseed()
os.register_at_fork(after_in_child=_reseed)


@dataclass
class Context:
    """What every session of one daemon shares: settings, store pool, clock, DNS.

    `lookup` is built from config.dns when not given; whoever stops the
    daemon closes it.
    """

    config: object
    pool: StorePool
    clock: Callable[[], float] = time.time
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger(log.LOGGER))
    stopping: threading.Event = field(default_factory=threading.Event)
    # True while connections are scarce; the server sets it (Postfix's "stress").
    under_pressure: Callable[[], bool] = field(default=lambda: False)
    lookup: Lookup | None = None

    def __post_init__(self):
        self.rules = policy.Rules.from_config(self.config.relay, self.config.greylist)
        if self.lookup is None:
            self.lookup = Lookup(self.config.dns, logger=self.logger)


@dataclass
class Envelope:
    sender: str
    size: int | None = None
    body: str | None = None
    recipients: list[str] = field(default_factory=list)
    attempts: int = 0
    delayed: int = 0


class Closed(Exception):
    """The session is over: the client left, timed out, or was sent away."""


class Session:
    def __init__(self, ctx: Context, client: str, rfile: BinaryIO,
                 send: Callable[[bytes], None], expect: Callable[[float], None]):
        self.ctx = ctx
        self.config = ctx.config          # fixed for the whole session (reload-safe)
        self.client = client
        # expect(seconds): what is read next must arrive whole within that time.
        self.rfile, self._send, self._expect = rfile, send, expect
        self.id = new_session_id()
        self.helo: str | None = None
        self.esmtp = False
        self.envelope: Envelope | None = None
        self.relay: Relay | None = None
        self.client_name: str | None = None   # verified (FCrDNS), once DNS is collected
        self.dns: ClientDNS | None = None
        self._pending: Pending | None = None
        self.errors = 0
        self.junk = 0
        self.verb = ""
        self.end = "quit"
        self.messages = 0
        self.receiving = False
        self.done = False

    # -- the read loop -----------------------------------------------------------

    def run(self) -> None:
        started = time.monotonic()
        server = self.config.server
        self._pending = self.ctx.lookup.start(self.client)
        try:
            self.send(replies.greeting(server.hostname, server.banner))
            while not self.done:
                if self.ctx.stopping.is_set() and self.envelope is None:
                    self.last_command()                  # no transaction to finish
                    break
                self._expect(self.command_timeout())       # the whole command line
                reply = self.handle(self.read_command())
                self.send(reply)
                if self.receiving:
                    self.receiving = False
                    self.send(self.finish_data(self.read_message()))
        except socket.timeout:
            self.end = "timeout"
            self.send_quietly(replies.TIMEOUT)
        except Closed as closed:
            self.end = str(closed) or "closed"
            if self.ctx.stopping.is_set() and self.end in ("disconnect", "shutdown"):
                self.end = "shutdown"
                self.send_quietly(replies.SHUTTING_DOWN)
        except OSError:
            self.end = "disconnect"
        finally:
            if self.relay is not None:
                self.relay.quit()
            if self.dns is None and self._pending is not None and self._pending.ready():
                self.client_dns()
            log.info(self.ctx.logger, "session end " + log.fields(
                id=self.id, client=self.client, name=self.client_name or "unknown",
                helo=self.helo, messages=self.messages,
                errors=self.errors, end=self.end, seconds=f"{time.monotonic() - started:.3f}"))

    def send(self, reply: Reply) -> None:
        self._send(replies.encoded(reply))

    def send_quietly(self, reply: Reply) -> None:
        try:
            self.send(reply)
        except OSError:
            pass

    def read_command(self) -> bytes:
        line = self.rfile.readline(COMMAND_LIMIT + MAIL_ALLOWANCE + 1)
        if not line:
            raise Closed("disconnect")
        if not line.endswith(b"\n"):
            if len(line) <= COMMAND_LIMIT + MAIL_ALLOWANCE:
                raise Closed("disconnect")
            while True:                 # skip the rest of the over-long line
                rest = self.rfile.readline(DATA_CHUNK)
                if not rest:
                    raise Closed("disconnect")
                if rest.endswith(b"\n"):
                    return b""
        return line

    def last_command(self) -> None:
        """Shutting down between transactions: a QUIT already on its way gets
        its 221, anything else (or nothing, within a second) 421 4.3.2."""
        try:
            self._expect(SHUTDOWN_LINGER)
            line = self.read_command()
        except (socket.timeout, Closed, OSError):
            line = b""
        quit = line.rstrip(b"\r\n").upper() == b"QUIT"
        self.end = "quit" if quit else "shutdown"
        self.send_quietly(replies.closing(self.config.server.hostname) if quit
                          else replies.SHUTTING_DOWN)

    def command_timeout(self) -> float:
        """server.command_timeout, cut short while connections are scarce."""
        timeout = self.config.server.command_timeout
        return min(timeout, STRESS_TIMEOUT) if self.ctx.under_pressure() else timeout

    @property
    def idle(self) -> bool:
        """No transaction under way: the session may be closed at once on shutdown."""
        return self.envelope is None and not self.receiving

    def handle(self, line: bytes) -> Reply:
        """The reply to one command line, counting errors toward max_errors.

        Junk commands (NOOP, RSET, VRFY, HELP) beyond JUNK_LIMIT count too, so a
        client cannot hold a connection for ever with commands that move no mail.
        """
        self.verb = ""
        reply = self._dispatch(line)
        if self.verb in JUNK:
            self.junk += 1
        if ((reply.code in replies.ERROR_CODES and replies.is_error(reply))
                or (self.verb in JUNK and self.junk > JUNK_LIMIT)):
            self.errors += 1
            if self.errors >= self.config.server.max_errors:
                self.done = True
                self.end = "errors"
                return replies.TOO_MANY_ERRORS
        return reply

    def _dispatch(self, line: bytes) -> Reply:
        if not line:
            return replies.LINE_TOO_LONG
        if not line.endswith(b"\r\n"):
            return replies.BAD_CHARACTERS
        # Looked for in the text, not the bytes: `bytes in bytes` first tries
        # its operand as an int, and raises and clears a TypeError each time.
        text = line[:-2].decode("ascii", "surrogateescape")
        if "\r" in text or "\0" in text:
            return replies.BAD_CHARACTERS
        verb, _, arg = text.partition(" ")
        verb = self.verb = verb.upper()
        limit = COMMAND_LIMIT + (MAIL_ALLOWANCE if verb == "MAIL" else 0)
        if len(line) > limit:
            return replies.LINE_TOO_LONG
        handler = _HANDLERS.get(verb)
        if handler is None:
            return replies.NOT_IMPLEMENTED if verb in UNSUPPORTED else replies.UNKNOWN_COMMAND
        try:
            return handler(self, arg.strip(" "))
        except PathError as error:
            return error.reply
        except Exception:
            self.ctx.logger.exception("internal error %s", log.fields(id=self.id, verb=verb))
            return replies.LOCAL_ERROR

    # -- commands ---------------------------------------------------------------------

    def smtp_HELO(self, arg: str) -> Reply:
        return self._greet(arg, esmtp=False)

    def smtp_EHLO(self, arg: str) -> Reply:
        return self._greet(arg, esmtp=True)

    def _greet(self, arg: str, esmtp: bool) -> Reply:
        if not arg or " " in arg or not arg.isascii() or not arg.isprintable():
            return replies.NEED_HOSTNAME
        self.abort_transaction()
        self.helo, self.esmtp = arg, esmtp
        server = self.config.server
        if esmtp:
            return replies.ehlo(server.hostname, server.max_message_size)
        return replies.helo(server.hostname)

    def smtp_MAIL(self, arg: str) -> Reply:
        if self.helo is None:
            return replies.NEED_HELO
        if self.envelope is not None:
            return replies.NESTED_MAIL
        path = parse(arg, "FROM", null_ok=True, bad=replies.BAD_SENDER)
        if path.params and not self.esmtp:
            return replies.UNKNOWN_PARAMETER    # parameters need EHLO (RFC 5321 4.1.1.2)
        size, body = None, None
        for key, value in path.params.items():
            if key == "SIZE" and value and value.isdigit() and len(value) <= 20:
                size = int(value)
            elif key == "BODY" and value and value.upper() in ("7BIT", "8BITMIME"):
                body = value.upper()
            elif key in ("SIZE", "BODY"):
                return replies.BAD_PARAMETER
            else:
                return replies.UNKNOWN_PARAMETER
        if size is not None and size > self.config.server.max_message_size:
            return replies.MESSAGE_TOO_BIG
        self.envelope = Envelope(path.address, size, body)
        return replies.SENDER_OK

    def smtp_RCPT(self, arg: str) -> Reply:
        envelope = self.envelope
        if envelope is None:
            return replies.NEED_MAIL
        path = parse(arg, "TO", null_ok=False, bad=replies.BAD_RECIPIENT)
        if path.params:
            return replies.UNKNOWN_PARAMETER
        if envelope.attempts >= self.config.server.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        envelope.attempts += 1
        verdict = self.decide(path.address)
        if verdict.action == policy.REJECT:
            return replies.RELAY_DENIED
        if verdict.action == policy.GREYLIST:
            return replies.greylisted(verdict.retry_in)
        if verdict.action == policy.TEMPFAIL:
            return replies.LOCAL_ERROR
        reply = self.forward_rcpt(envelope, path.address)
        if reply.ok:
            envelope.recipients.append(path.address)
            if verdict.reason == "passed":
                envelope.delayed = max(envelope.delayed, verdict.delayed)
        return reply

    def forward_rcpt(self, envelope: Envelope, recipient: str) -> Reply:
        """Open the upstream transaction if needed, then RCPT in lockstep."""
        if self.relay is None:
            upstream = self.config.upstream
            self.relay = Relay(
                host=upstream.host, port=upstream.port, timeout=upstream.timeout,
                local_hostname=self.config.server.hostname, starttls=upstream.starttls,
                xclient=upstream.xclient, client_addr=self.client,
                client_name=self.client_name, client_helo=self.helo)
        if not self.relay.in_transaction:
            reply = self.relay.mail(envelope.sender, size=envelope.size, body=envelope.body)
            if not reply.ok:
                return reply
        return self.relay.rcpt(recipient)

    def client_dns(self) -> ClientDNS:
        """The client's DNS facts, collected once per session (waits at most dns.timeout)."""
        if self.dns is None:
            pending = self._pending or self.ctx.lookup.start(self.client)
            self.dns = pending.result()
            self.client_name = self.dns.name
        return self.dns

    def decide(self, recipient: str) -> policy.Verdict:
        """The policy's verdict for one recipient, recorded and logged."""
        facts = self.client_dns()
        request = policy.Request(self.client, self.envelope.sender, recipient,
                                 helo=self.helo or "", client_name=facts.name,
                                 dnswl=facts.dnswl, dnsbl=facts.dnsbl)
        now = self.ctx.clock()
        rules = self.ctx.rules
        pool = self.ctx.pool
        try:
            known = policy.keys(request, rules)
            pool.settle(*known)
            with pool.connection() as store:
                verdict = policy.decide(request, rules, store.facts(*known), now, known)
            pool.record(verdict, now, max_age=rules.max_age)
            pool.health.ok()
        except sqlite3.Error as error:
            pool.health.failed(error)
            verdict = policy.without_store(request, self.ctx.rules,
                                           self.config.greylist.on_store_error)
        log.info(self.ctx.logger, "decision " + log.fields(
            id=self.id, client=self.client, name=self.client_name or "unknown",
            helo=self.helo, **{"from": request.sender},
            to=recipient, action=verdict.action, reason=verdict.reason,
            delay=verdict.delayed, retry_in=verdict.retry_in))
        return verdict

    def smtp_DATA(self, arg: str) -> Reply:
        if arg:
            return replies.NO_ARGUMENT
        if self.envelope is None:
            return replies.NEED_MAIL
        if not self.envelope.recipients:
            return replies.NEED_RCPT
        self.receiving = True
        return replies.START_DATA

    def smtp_RSET(self, arg: str) -> Reply:
        if arg:
            return replies.NO_ARGUMENT
        self.abort_transaction()
        return replies.RESET

    def smtp_NOOP(self, arg: str) -> Reply:
        return replies.OK

    def smtp_VRFY(self, arg: str) -> Reply:
        return replies.VRFY if arg else replies.SYNTAX

    def smtp_HELP(self, arg: str) -> Reply:
        return replies.HELP

    def smtp_QUIT(self, arg: str) -> Reply:
        if arg:
            return replies.NO_ARGUMENT
        self.done = True
        return replies.closing(self.config.server.hostname)

    def abort_transaction(self) -> None:
        self.envelope = None
        if self.relay is not None and self.relay.in_transaction:
            self.relay.rset()

    # -- the message --------------------------------------------------------------------

    def read_message(self) -> tuple[bytes, bool]:
        """The message up to CRLF.CRLF, dot-unstuffed; (data, too_big). RFC 5321 4.5.2."""
        limit = self.config.server.max_message_size
        chunks, size, too_big = [], 0, False
        line_start = True               # what came before ended with CRLF
        after_cr = False                # ... or with CR, if this chunk is the LF
        while True:
            self._expect(self.config.server.data_timeout)    # per line of the message
            chunk = self.rfile.readline(DATA_CHUNK)
            if not chunk:
                raise Closed("disconnect")
            if line_start:
                if chunk == b".\r\n":
                    return b"".join(chunks), too_big
                if chunk[:1] == b"." and chunk[1:] not in (b"\n", b"\r", b""):
                    chunk = chunk[1:]
            line_start = chunk.endswith(b"\r\n") or (chunk == b"\n" and after_cr)
            after_cr = chunk.endswith(b"\r")
            size += len(chunk)
            if size > limit:
                too_big = True
            elif not too_big:
                chunks.append(chunk)

    def finish_data(self, received: tuple[bytes, bool]) -> Reply:
        """Relay the message and answer with the upstream's own reply."""
        message, too_big = received
        envelope, self.envelope = self.envelope, None
        if too_big:
            self.relay.rset()
            return replies.MESSAGE_TOO_BIG
        if _BARE_NEWLINE.search(message):
            if self.config.server.bare_newlines == "reject":
                self.relay.rset()
                return replies.BARE_NEWLINE
            message = _ANY_NEWLINE.sub(b"\r\n", message)
        if message and not message.endswith(b"\r\n"):
            message += b"\r\n"
        reply = self.relay.data(self.trace_headers(envelope) + message)
        if reply.code == 250:
            self.messages += 1
        log.info(self.ctx.logger, "message " + log.fields(
            id=self.id, client=self.client, **{"from": envelope.sender},
            to=",".join(envelope.recipients), size=len(message), status=reply.code,
            reply=reply.text))
        return reply

    def trace_headers(self, envelope: Envelope) -> bytes:
        server = self.config.server
        date = formatdate(self.ctx.clock(), localtime=True)
        name = self.client_name or "unknown"
        protocol = "ESMTP" if self.esmtp else "SMTP"
        lines = [f"Received: from {self.helo} ({name} [{self.client}])\r\n"
                 f"\tby {server.hostname} (greyd) with {protocol} id {self.id}"]
        if len(envelope.recipients) == 1:
            lines.append(f"\r\n\tfor <{envelope.recipients[0]}>")
        lines.append(f"; {date}\r\n")
        if envelope.delayed and self.config.greylist.header:
            lines.append(f"X-Greylist: delayed {envelope.delayed} seconds by greyd-"
                         f"{__version__} at {server.hostname}; {date}\r\n")
        return "".join(lines).encode("utf-8", "replace")


# "HELO": Session.smtp_HELO, ...: the command table, read once.
_HANDLERS = {name[5:]: getattr(Session, name) for name in dir(Session) if name.startswith("smtp_")}

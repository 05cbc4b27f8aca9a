"""One SMTP session with one client (RFC 5321): the state machine of greyd.

State is data (the HELO name, the open transaction), not numbered states.
Each command has one `smtp_VERB` method that guards, acts and returns a
Reply; the read loop (dialogue.py) is the only writer to the client.

The session asks the Greylister about each recipient and relays accepted
ones in lockstep through its own `Relay`. The client's DNS facts (verified
name, DNSWL/DNSBL) are looked up while the client greets, and collected
once, at the first recipient. It knows nothing of threads, listening
sockets or the store.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

from . import log, message, policy, replies
from .address import PathError, mail_params, parse, rcpt_params
from .channel import COMMAND_LIMIT, DSN_ALLOWANCE, MAIL_ALLOWANCE, SMTPUTF8_ALLOWANCE, Received
from .context import Context
from .dns import NO_SPF, ClientDNS, Pending, PendingSpf
from .greylist import WouldWait
from .relay import Relay
from .replies import Reply

UNSUPPORTED = {"EXPN", "TURN", "ETRN", "ATRN", "BDAT", "AUTH"}
JUNK = {"NOOP", "RSET", "VRFY", "HELP"}   # commands that move no mail
JUNK_LIMIT = 100       # beyond it each junk command counts as an error (as Postfix does)

logger = logging.getLogger(__name__)


def _reseed() -> None:
    global _session_ids
    _session_ids = itertools.count(int.from_bytes(os.urandom(5), "big"))


def new_session_id() -> str:
    """Ten hex digits naming a session in the log: a counter from a random start
    per process (forked workers start anew)."""
    return f"{next(_session_ids) & 0xFF_FFFF_FFFF:010x}"


_reseed()
os.register_at_fork(after_in_child=_reseed)


@dataclass
class Envelope:
    sender: str
    size: int | None = None
    body: str | None = None
    recipients: list[str] = field(default_factory=list)
    attempts: int = 0
    delayed: int = 0
    smtputf8: bool = False                    # MAIL declared SMTPUTF8 (RFC 6531)
    dsn: tuple[str, ...] = ()                 # MAIL's RET= and ENVID=, as the client wrote them


class Session:
    """The state of one client's session and a handler per command; the
    read loop that feeds it is `dialogue.Dialogue`."""

    def __init__(self, ctx: Context, client: str):
        self.ctx = ctx
        self.config = ctx.config          # fixed for the whole session (reload-safe)
        self.greylister = ctx.greylister
        self.client = client
        self.id = new_session_id()
        self.helo: str | None = None
        self.esmtp = False
        self.extensions: tuple[str, ...] = ()   # SMTPUTF8, DSN: what the last EHLO offered
        self.envelope: Envelope | None = None
        self.relay: Relay | None = None
        self.dns: ClientDNS | None = None
        self._pending: Pending | None = None
        self._spf: PendingSpf = NO_SPF      # this transaction's SPF check
        self.errors = self.junk = self.messages = 0
        self.end = "quit"                 # the session-end word
        self.receiving = False            # DATA said 354: the message comes next
        self.starting_tls = False         # STARTTLS said 220: the handshake comes next
        self.tls: tuple[str, str, int] | None = None   # (protocol, cipher, bits) once on
        self.done = False
        # False while the read loop must not wait (see `answers_at_once`): a
        # recipient accepted then is answered LATER, by `resume`.
        self.may_wait = True
        self._later: tuple[str, Callable[[], Reply]] | None = None

    @property
    def idle(self) -> bool:
        """No transaction under way: the session may be closed at once on shutdown."""
        return self.envelope is None and not self.receiving

    @property
    def client_name(self) -> str | None:
        """The verified (FCrDNS) name, once the DNS facts are collected."""
        return self.dns.name if self.dns is not None else None

    def greet(self) -> Reply:
        self._pending = self.ctx.lookup.start(self.client)
        server = self.config.server
        return replies.greeting(server.hostname, server.banner)

    def handle(self, line: bytes) -> Reply:
        """The reply to one command line, counting errors toward max_errors.

        Junk commands (NOOP, RSET, VRFY, HELP) beyond JUNK_LIMIT count too, so a
        client cannot hold a connection for ever with commands that move no mail.
        """
        verb, reply = self.dispatch(line)
        if reply is replies.LATER:
            return reply
        return self.counted(verb, reply)

    def counted(self, verb: str, reply: Reply) -> Reply:
        """`reply`, after counting it toward max_errors (see `handle`)."""
        if verb in JUNK:
            self.junk += 1
        if ((reply.code in replies.ERROR_CODES and replies.is_error(reply))
                or (verb in JUNK and self.junk > JUNK_LIMIT)):
            self.errors += 1
            if self.errors >= self.config.server.max_errors:
                self.done = True
                self.end = "errors"
                return replies.TOO_MANY_ERRORS
        return reply

    def answers_at_once(self, line: bytes) -> bool:
        """Whether `handle(line)` can answer without waiting on the network:
        a read loop that serves many sessions on one thread asks, and hands
        the session to a thread of its own when not. Only a RCPT, and a MAIL
        that may start an SPF check, read the store; a RCPT may also wait for
        the DNS lookups; and one that is accepted would open the upstream,
        which `may_wait` False defers (LATER). The greylister says whether
        its store answers at once (SQLite, and not failing)."""
        verb = line[:4].upper()
        if verb == b"RCPT":
            pending = self._pending
            return (self.greylister.at_once and self._spf.ready()
                    and (self.dns is not None or (pending is not None and pending.ready())))
        if verb == b"MAIL":
            return self.greylister.at_once or not self.ctx.lookup.enabled
        return self.relay is None

    def may_go_back(self) -> bool:
        """Whether the session is as a reactor serves it: no upstream, no
        message or handshake under way, no TLS, not over, not stopping."""
        return (self.relay is None and self.tls is None and not self.done
                and not self.receiving and not self.starting_tls
                and not self.ctx.stopping.is_set())

    def resume(self) -> Reply:
        """The reply to the command `handle` answered LATER: the waiting it
        put off, done now."""
        verb, act = self._later
        self._later = None
        return self.counted(verb, act())

    def dispatch(self, line: bytes) -> tuple[str, Reply]:
        """The command's verb (upper case; "" when unreadable) and its reply."""
        if not line:
            return "", replies.LINE_TOO_LONG
        if not line.endswith(b"\r\n"):
            return "", replies.BAD_CHARACTERS
        # In the text, not the bytes: `b"\r" in bytes` first tries b"\r" as an int.
        # UTF-8 (RFC 6531); bytes that are not stay as surrogates, which no parser takes.
        text = line[:-2].decode("utf-8", "surrogateescape")
        if "\r" in text or "\0" in text:
            return "", replies.BAD_CHARACTERS
        verb, _, arg = text.partition(" ")
        verb = verb.upper() if verb.isascii() else "?"     # "ı".upper() is "I"
        if len(line) > COMMAND_LIMIT + self.allowance(verb):
            return verb, replies.LINE_TOO_LONG
        handler = _HANDLERS.get(verb)
        if handler is None:
            return verb, (replies.NOT_IMPLEMENTED if verb in UNSUPPORTED
                          else replies.UNKNOWN_COMMAND)
        return verb, handler(self, arg.strip(" "))

    # -- commands ---------------------------------------------------------------------

    def smtp_HELO(self, arg: str) -> Reply:
        return self._hello(arg, esmtp=False)

    def smtp_EHLO(self, arg: str) -> Reply:
        return self._hello(arg, esmtp=True)

    def _hello(self, arg: str, esmtp: bool) -> Reply:
        if not arg or " " in arg or not arg.isascii() or not arg.isprintable():
            return replies.NEED_HOSTNAME
        self.abort_transaction()
        self.helo, self.esmtp = arg, esmtp
        server = self.config.server
        if esmtp:
            return replies.ehlo(server.hostname, server.max_message_size, self.offered())
        return replies.helo(server.hostname)

    def allowance(self, verb: str) -> int:
        """Octets a command line may have beyond 512 for the extensions offered."""
        if verb == "MAIL":
            return (MAIL_ALLOWANCE + DSN_ALLOWANCE["MAIL"] * ("DSN" in self.extensions)
                    + SMTPUTF8_ALLOWANCE * ("SMTPUTF8" in self.extensions))
        if verb == "RCPT":
            return DSN_ALLOWANCE["RCPT"] * ("DSN" in self.extensions)
        return 0

    def offered(self) -> tuple[str, ...]:
        """The EHLO extensions this session offers beyond the fixed ones:
        STARTTLS with a certificate and before TLS; SMTPUTF8 and DSN when the
        upstream offers them (`extensions`, kept for MAIL and RCPT)."""
        self.extensions = self.ctx.upstream.offered()
        if self.ctx.tls is not None and self.tls is None:
            return ("STARTTLS", *self.extensions)
        return self.extensions

    def smtp_STARTTLS(self, arg: str) -> Reply:
        if self.ctx.tls is None:
            return replies.NOT_IMPLEMENTED
        if arg:
            return replies.NO_ARGUMENT
        if self.tls is not None:
            return replies.TLS_ALREADY_ACTIVE
        if self.envelope is not None:
            return replies.TLS_IN_TRANSACTION
        self.starting_tls = True
        return replies.READY_TO_START_TLS

    def secured(self, protocol: str, cipher: str, bits: int) -> None:
        """The handshake is done: the session starts over (RFC 3207 4.2),
        knowing nothing the client said before it, the HELO name included."""
        self.starting_tls = False
        self.tls = (protocol, cipher, bits)
        self.helo, self.esmtp, self.extensions = None, False, ()
        self.abort_transaction()

    def smtp_MAIL(self, arg: str) -> Reply:
        if self.helo is None:
            return replies.NEED_HELO
        if self.envelope is not None:
            return replies.NESTED_MAIL
        if self.tls is None and self.config.tls.require and not policy.is_trusted(
                self.client, self.config.relay.clients):
            return replies.MUST_STARTTLS
        try:
            path = parse(arg, "FROM", null_ok=True, bad=replies.BAD_SENDER)
            if path.params and not self.esmtp:
                return replies.UNKNOWN_PARAMETER    # parameters need EHLO (RFC 5321 4.1.1.2)
            params = mail_params(path.params, self.extensions)
        except PathError as error:
            return error.reply
        if not (params.smtputf8 or path.address.isascii()):
            return replies.NEED_SMTPUTF8
        if params.size is not None and params.size > self.config.server.max_message_size:
            return replies.MESSAGE_TOO_BIG
        self.envelope = Envelope(path.address, params.size, params.body,
                                 smtputf8=params.smtputf8, dsn=params.dsn)
        self.start_spf()
        return replies.SENDER_OK

    def start_spf(self) -> None:
        """Start the client's SPF check for this sender, with the DNS work of
        the session, so it is in (or nearly) when the first RCPT needs it;
        unless the greylister says it cannot matter."""
        self._spf = NO_SPF
        if not self.ctx.lookup.enabled:
            return
        probe = policy.Request(self.client, self.envelope.sender, "", helo=self.helo,
                               **self.dns_so_far())
        if self.greylister.spf_may_matter(probe):
            self._spf = self.ctx.lookup.spf(self.client, self.envelope.sender, self.helo)

    def smtp_RCPT(self, arg: str) -> Reply:
        envelope = self.envelope
        if envelope is None:
            return replies.NEED_MAIL
        try:
            path = parse(arg, "TO", null_ok=False, bad=replies.BAD_RECIPIENT,
                         utf8_values=envelope.smtputf8)
            if path.params and not self.esmtp:
                return replies.UNKNOWN_PARAMETER
            dsn = rcpt_params(path.params, self.extensions, envelope.smtputf8)
        except PathError as error:
            return error.reply
        if not (envelope.smtputf8 or path.address.isascii()):
            return replies.NEED_SMTPUTF8
        if envelope.attempts >= self.config.server.max_recipients:
            return replies.TOO_MANY_RECIPIENTS
        try:
            verdict = self.greylister.decide(self.request(path.address), self.id,
                                             spf=self._spf.result, wait=self.may_wait)
        except WouldWait:                   # the whole command again, when it may wait
            self._later = ("RCPT", lambda: self.smtp_RCPT(arg))
            return replies.LATER
        envelope.attempts += 1
        if verdict.action != policy.ACCEPT:
            return refusal(verdict)
        if not self.may_wait:               # the upstream, opened or asked, would keep it
            self._later = ("RCPT", lambda: self.accepted(envelope, path.address, dsn, verdict))
            return replies.LATER
        return self.accepted(envelope, path.address, dsn, verdict)

    def accepted(self, envelope: Envelope, recipient: str, dsn: tuple[str, ...],
                 verdict: policy.Verdict) -> Reply:
        """A recipient the greylister accepted: relayed, and added when the upstream takes it."""
        reply = self.forward_rcpt(envelope, recipient, dsn)
        if reply.ok:
            envelope.recipients.append(recipient)
            if verdict.reason == "passed":
                envelope.delayed = max(envelope.delayed, verdict.delayed)
        return reply

    def request(self, recipient: str) -> policy.Request:
        """What the greylister is asked about one recipient of this transaction."""
        facts = self.client_dns()
        return policy.Request(self.client, self.envelope.sender, recipient,
                              helo=self.helo or "", client_name=facts.name,
                              dnswl=facts.dnswl, dnsbl=facts.dnsbl)

    def dns_so_far(self) -> dict:
        """The DNS facts about the client if they are in already, as Request fields."""
        if self.dns is None and (self._pending is None or not self._pending.ready()):
            return {}
        facts = self.client_dns()
        return {"client_name": facts.name, "dnswl": facts.dnswl, "dnsbl": facts.dnsbl}

    def client_dns(self) -> ClientDNS:
        """The client's DNS facts, collected once per session (waits at most dns.timeout)."""
        if self.dns is None:
            pending = self._pending or self.ctx.lookup.start(self.client)
            self.dns = pending.result()
        return self.dns

    def forward_rcpt(self, envelope: Envelope, recipient: str, dsn: tuple[str, ...] = ()) -> Reply:
        """Open the upstream transaction if needed, then RCPT in lockstep
        (with its DSN parameters, as the client wrote them)."""
        if self.relay is None:
            upstream = self.config.upstream
            self.relay = self.ctx.relay(
                host=upstream.host, port=upstream.port, timeout=upstream.timeout,
                local_hostname=self.config.server.hostname, starttls=upstream.starttls,
                xclient=upstream.xclient, client_addr=self.client,
                client_name=self.client_name, client_helo=self.helo,
                capabilities=self.ctx.upstream)
        if not self.relay.in_transaction:
            reply = self.relay.mail(envelope.sender, size=envelope.size, body=envelope.body,
                                    smtputf8=envelope.smtputf8, dsn=envelope.dsn)
            if not reply.ok:
                return reply
        return self.relay.rcpt(recipient, dsn)

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
        self.envelope, self._spf = None, NO_SPF
        if self.relay is not None and self.relay.in_transaction:
            self.relay.rset()

    def close(self) -> None:
        """The session is over: the upstream let go, and the DNS facts
        collected if they are in (the session-end line names the client),
        and the session counted."""
        self.greylister.count_session(self.tls is not None)
        if self.relay is not None:
            self.relay.quit()
        if self.dns is None and self._pending is not None and self._pending.ready():
            self.client_dns()

    def drop_transaction(self) -> None:
        """After an unexpected error: no transaction, and no upstream
        connection in an unknown state (the next one opens afresh)."""
        self.envelope, self.receiving = None, False
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.quit()

    # -- the message --------------------------------------------------------------------

    def finish_data(self, received: Received) -> Reply:
        """Relay the message and answer with the upstream's own reply."""
        envelope, self.envelope = self.envelope, None
        if received.too_big:
            self.relay.rset()
            return replies.MESSAGE_TOO_BIG
        data = message.normalized(received.data, self.config.server.bare_newlines)
        if data is None:
            self.relay.rset()
            return replies.BARE_NEWLINE
        server = self.config.server
        trace = message.trace_headers(
            helo=self.helo, name=self.client_name, client=self.client,
            hostname=server.hostname, esmtp=self.esmtp, session=self.id,
            recipients=envelope.recipients, delayed=envelope.delayed,
            header=self.config.greylist.header, now=self.greylister.clock(), tls=self.tls,
            smtputf8=envelope.smtputf8)
        reply = self.relay.data(trace + data)
        if reply.code == 250:
            self.messages += 1
        log.info("message " + log.fields(
            id=self.id, client=self.client, **{"from": envelope.sender},
            to=",".join(envelope.recipients), size=len(data), status=reply.code,
            reply=reply.text))
        return reply


def refusal(verdict: policy.Verdict) -> Reply:
    """The reply to a recipient the greylister did not accept."""
    if verdict.action == policy.REJECT:
        return replies.RELAY_DENIED
    if verdict.action == policy.GREYLIST:
        return replies.greylisted(verdict.retry_in)
    return replies.LOCAL_ERROR              # TEMPFAIL: the store failed


# "HELO": Session.smtp_HELO, ...: the command table, read once.
_HANDLERS = {name[5:]: getattr(Session, name) for name in dir(Session) if name.startswith("smtp_")}

"""The read loop of an SMTP session: a `Session` fed from its `Channel`.

It greets the client, reads each command within its timeout (shortened
while connections are scarce) and writes the session's reply, reads the
message after a 354, ends the session (QUIT, timeout, disconnect, too many
errors, shutdown) and writes the session-end log line. It is the only
writer to the client.

Every phase (the greeting, each command, the message, the end of data and
its relay) runs under one guard, `Dialogue.guarded`: an unexpected
exception becomes 451 4.3.0 when a reply is due and the dialogue can go on
(the transaction, and the upstream connection with it, is dropped), else
421 4.3.0 and a close; either way one ERROR line with the traceback, and
`end=error` on the session-end line.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from . import log, metrics, replies, tls
from .channel import Channel, Closed
from .smtp import Session

STRESS_TIMEOUT = 10.0  # command timeout while the daemon is near max_connections
SHUTDOWN_LINGER = 1.0  # seconds to wait for a QUIT on its way when shutting down

logger = logging.getLogger(__name__)


class Dialogue:
    """One session's conversation with its client, from the 220 to the close."""

    def __init__(self, session: Session, channel: Channel):
        self.session, self.channel = session, channel
        self.failed = False               # an unexpected exception happened
        self.reason = ""                  # what ended it, when the end word is not enough
        self.started = time.monotonic()

    def run(self) -> None:
        """The whole session, on this thread."""
        self.finish(self.converse)

    def resume(self, channel: Channel, *, unsent: bytes = b"", line: bytes | None = None,
               later: bool = False, deadline: float | None = None,
               back: Callable[[], bool] | None = None) -> bool:
        """The rest of a session a reactor began (reactor.py), on this
        thread, over `channel`: first the bytes of its last reply it could
        not send; the reply to `line`, a command that may wait, or to the
        command the session answered LATER; then what that reply starts (a
        message, a handshake); then the next command, due by `deadline`
        when the reactor was waiting for it. After such a command, a
        session that would answer at once again (`Session.may_go_back`)
        goes `back()` when that takes it: True, and the session is not
        over."""
        self.channel = channel
        session = self.session
        session.may_wait = True

        def go_on() -> bool:
            if unsent:
                channel.write(unsent)
            if line is not None:
                channel.send(self.guarded("command", session.handle, line))
            elif later:
                channel.send(self.guarded("command", session.resume))
            self.after_reply()
            if back is not None and session.may_go_back() and back():
                return True
            self.commands(deadline)
            return False
        return self.finish(go_on)

    def finish(self, converse: Callable[[], bool | None]) -> bool:
        """`converse()`, then the end of the session, however it came;
        unless `converse` says it went back (True)."""
        went_back = False
        try:
            went_back = bool(converse())
        except Closed as closed:
            self.ended(closed)
        finally:
            if not went_back:
                self.wrap_up(self.started)
        return went_back

    def ended(self, closed: Closed) -> None:
        self.reason = closed.reason
        self.closed(str(closed))

    def converse(self) -> None:
        self.channel.send(self.guarded("greeting", self.session.greet, can_go_on=False))
        self.commands()

    def commands(self, deadline: float | None = None) -> None:
        """Command after command until the session is done; the first one
        due by `deadline` when given, each other within its timeout."""
        session, channel = self.session, self.channel
        stopping = session.ctx.stopping
        while not session.done:
            if stopping.is_set() and session.envelope is None:
                self.last_command()                  # no transaction to finish
                return
            # the whole command line
            channel.expect(self.command_timeout() if deadline is None
                           else deadline - time.monotonic())
            deadline = None
            line = channel.command()
            channel.send(self.guarded("command", session.handle, line))
            self.after_reply()

    def after_reply(self) -> None:
        """What the reply just sent starts: the TLS handshake, or the message."""
        session = self.session
        if session.starting_tls:
            self.guarded("tls", self.start_tls, can_go_on=False)
        elif session.receiving:
            session.receiving = False
            server = session.config.server
            received = self.guarded("message", self.channel.message, server.max_message_size,
                                    server.data_timeout, can_go_on=False)
            self.channel.send(self.guarded("end of data", session.finish_data, received))

    def start_tls(self) -> None:
        """The handshake after STARTTLS's 220, bounded by tls.handshake_timeout
        (cut short while connections are scarce); a failure ends the session."""
        session = self.session
        timeout = session.config.tls.handshake_timeout
        if session.ctx.under_pressure():
            timeout = min(timeout, STRESS_TIMEOUT)
        session.secured(*self.channel.start_tls(session.ctx.tls.context, timeout))

    def guarded(self, phase: str, act: Callable, *args, can_go_on: bool = True):
        """`act(*args)` under the one guard (see the module text)."""
        try:
            return act(*args)
        except Closed:
            raise
        except Exception:
            self.failed = True
            logger.exception("session error %s", log.fields(
                id=self.session.id, client=self.session.client, phase=phase))
            try:
                self.session.drop_transaction()
            except Exception:                   # noqa: BLE001 - logged above already
                pass
            if can_go_on:
                return replies.LOCAL_ERROR
            self.channel.send_quietly(replies.LOCAL_ERROR_CLOSING)
            raise Closed("error") from None

    def closed(self, end: str) -> None:
        """The session ended other than by QUIT or too many errors."""
        session = self.session
        session.end = end
        if end == "timeout":
            self.channel.send_quietly(replies.TIMEOUT)
        elif session.ctx.stopping.is_set() and end in ("disconnect", "shutdown"):
            session.end = "shutdown"
            self.channel.send_quietly(replies.SHUTTING_DOWN)

    def last_command(self) -> None:
        """Shutting down between transactions: a QUIT already on its way gets
        its 221, anything else (or nothing, within a second) 421 4.3.2."""
        try:
            self.channel.expect(SHUTDOWN_LINGER)
            line = self.channel.command()
        except Closed:
            line = b""
        quit = line.rstrip(b"\r\n").upper() == b"QUIT"
        self.session.end = "quit" if quit else "shutdown"
        self.channel.send_quietly(
            replies.closing(self.session.config.server.hostname) if quit
            else replies.SHUTTING_DOWN)

    def command_timeout(self) -> float:
        """server.command_timeout, cut short while connections are scarce."""
        timeout = self.session.config.server.command_timeout
        return min(timeout, STRESS_TIMEOUT) if self.session.ctx.under_pressure() else timeout

    def wrap_up(self, started: float) -> None:
        """The upstream let go, the DNS facts collected if ready, the session-end line."""
        session = self.session
        try:
            session.close()
        except Exception:                       # noqa: BLE001 - logged, the session is over
            self.failed = True
            logger.exception("session error %s", log.fields(
                id=session.id, client=session.client, phase="end"))
        end, seconds = "error" if self.failed else session.end, time.monotonic() - started
        metrics.session(end, seconds)
        log.info("session end " + log.fields(
            id=session.id, client=session.client, name=session.client_name or "unknown",
            helo=session.helo, messages=session.messages, errors=session.errors, end=end,
            **tls.session_fields(*(session.tls or (None, None))[:2]),
            **({"error": self.reason} if self.reason else {}),
            seconds=f"{seconds:.3f}"))

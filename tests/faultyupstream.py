"""An upstream MTA that fails on purpose: a raw-socket SMTP server, one fault per transaction.

Every transaction a test sends through greyd carries a token (`t0042`) as the
local part of its sender, and `plans` maps each token to one `Fault`: a reply
of any code (4xx, 5xx, 421, a code of the wrong class, or a line that is no
reply at all), a hang-up, or a stall at one step of the dialogue. From MAIL on,
the server finds the plan through the token in MAIL FROM. The greeting and
EHLO come before any token, so a test that wants its transaction to meet a
connection-level fault `arm`s the server with its token just before it sends
the RCPT that makes greyd connect: the next connection accepted takes that
token (and the returned event fires). `pause` and `resume` stop and restart
listening, so that a connection attempt is refused outright.

The server keeps every message it completed with a 250 at the end of DATA
(its bytes after dot-unstuffing), every fault reply it sent, and what it had
read of a message it hung up in the middle of, by token.
This is a helper module, not a test module.
"""

from __future__ import annotations

import re
import socket
import struct
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from upstream import free_port, hang_up

HOSTNAME = "upstream.test"
LINE_LIMIT = 1 << 20
STALL_LIMIT = 15.0      # seconds a stall waits for greyd to give up and hang up
STEPS = ("connect", "greeting", "ehlo", "mail", "rcpt", "data", "message", "dot", "after")


@dataclass(frozen=True)
class Fault:
    """What goes wrong in one transaction, and where.

    step: one of STEPS, or "" for nothing. kind: "reply" (send `code` and
    `text`; code 0 sends `text` alone, which is no SMTP reply), "drop" (hang
    up), "stall" (say nothing until greyd hangs up); at "ehlo" also "fallback"
    (refuse EHLO with `code`, accept HELO); at "connect" "refuse" (reset the
    connection at once) or "unlisten" (the test pauses the listener); at
    "after" "hangup" (close once the message is queued). `at`: at "rcpt", the
    number of the recipient refused (1-based); at "message", the octets of the
    message read before hanging up. `once` (a fault from "mail" on): only the
    token's first transaction meets it; those after it go through.
    """

    step: str = ""
    kind: str = ""
    code: int = 0
    text: str = ""
    at: int = 0
    once: bool = False


NO_FAULT = Fault()


@dataclass
class Delivered:
    """A message the upstream answered 250 at the end of DATA."""

    token: str
    sender: str
    recipients: list[str]
    data: bytes


@dataclass
class _Handoff:
    token: str
    taken: threading.Event = field(default_factory=threading.Event)


class FaultyUpstream:
    """The faulty server on a free loopback port; use as a context manager."""

    def __init__(self, plans: dict[str, Fault]):
        self.plans = plans
        self.port = free_port()
        self.messages: list[Delivered] = []
        self.sent: dict[str, list[tuple[int, str]]] = defaultdict(list)   # fault replies by token
        self.partial: dict[str, bytes] = {}   # what a hang-up at "message" had read, by token
        self.mismatches: list[str] = []   # armed for one token, first MAIL for another
        self.connections = 0
        self.stalls = 0
        self._lock = threading.Lock()
        self._armed: _Handoff | None = None
        self._met: set[str] = set()       # tokens whose planned fault has been met
        self._stopping = threading.Event()
        self._peers: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # An explicit port, so that a listener shut down can listen again on it.
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        self._listener.settimeout(0.05)
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> "FaultyUpstream":
        self._acceptor.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopping.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            hang_up(self._peers)
        for thread in self._threads:
            thread.join(5)

    # -- what the test drives ---------------------------------------------------

    def arm(self, token: str) -> threading.Event:
        """The next connection accepted belongs to `token`; the event fires when it comes."""
        handoff = _Handoff(token)
        with self._lock:
            self._armed = handoff
        return handoff.taken

    def disarm(self) -> None:
        with self._lock:
            self._armed = None

    def pause(self) -> None:
        """Stop listening: a connection attempt is refused (the port stays ours)."""
        self._listener.shutdown(socket.SHUT_RDWR)

    def resume(self) -> None:
        self._listener.listen(64)

    # -- the server ----------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:          # paused: not listening for a moment
                time.sleep(0.005)
                continue
            with self._lock:
                handoff, self._armed = self._armed, None
                self.connections += 1
                self._peers.add(sock)
            if handoff is not None:
                handoff.taken.set()
            thread = threading.Thread(target=self._serve, daemon=True,
                                      args=(sock, handoff.token if handoff else None))
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket, token: str | None) -> None:
        sock.settimeout(STALL_LIMIT)
        try:
            _Dialogue(self, sock, token).run()
        except OSError:
            pass
        finally:
            with self._lock:
                self._peers.discard(sock)
            sock.close()

    def _record(self, update) -> None:
        with self._lock:
            update()

    def _plan(self, token: str) -> Fault:
        """The fault planned for a transaction of `token` (a `once` fault: its first only)."""
        fault = self.plans.get(token, NO_FAULT)
        with self._lock:
            if fault.once and token in self._met:
                return NO_FAULT
            self._met.add(token)
        return fault


class _Dialogue:
    """One connection: SMTP as a plain MTA speaks it, except where a plan says otherwise."""

    def __init__(self, server: FaultyUpstream, sock: socket.socket, armed: str | None):
        self.server, self.sock, self.armed = server, sock, armed
        self.file = sock.makefile("rb")
        self.connection_fault = server.plans.get(armed, NO_FAULT) if armed else NO_FAULT
        self.mails = 0
        self.token: str | None = None      # of the open transaction
        self.fault = NO_FAULT
        self.sender = ""
        self.recipients: list[str] = []

    def run(self) -> None:
        fault = self.connection_fault
        if fault.step == "connect" and fault.kind == "refuse":
            # SO_LINGER 0: close() resets the connection instead of ending it.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if fault.step == "greeting":
            if not self.fail(fault, self.armed):
                return
        else:
            self.say(220, f"{HOSTNAME} ESMTP faulty")
        while True:
            line = self.file.readline(LINE_LIMIT)
            if not line:
                return
            verb, _, arg = line.rstrip(b"\r\n").decode("latin-1").partition(" ")
            handler = getattr(self, "on_" + verb.upper(), None) if verb.isalpha() else None
            if handler is None:
                self.say(502, "5.5.2 Error: command not recognized")
            elif handler(arg) is False:
                return

    # -- replies and faults ---------------------------------------------------------

    def say(self, code: int, text: str) -> None:
        if code == 0:
            self.sock.sendall(text.encode() + b"\r\n")
            return
        lines = text.split("\n")
        wire = "".join(f"{code}-{line}\r\n" for line in lines[:-1]) + f"{code} {lines[-1]}\r\n"
        self.sock.sendall(wire.encode())

    def fail(self, fault: Fault, token: str | None) -> bool:
        """Act out a fault; False when the connection is over."""
        if fault.kind in ("reply", "fallback"):
            self.say(fault.code, fault.text)
            self.server._record(lambda: self.server.sent[token].append((fault.code, fault.text)))
            return fault.code != 421
        if fault.kind == "stall":
            self.server._record(lambda: setattr(self.server, "stalls", self.server.stalls + 1))
            self.stall()
        return False                    # "drop", and the end of a stall

    def stall(self) -> None:
        """Say nothing more; wait until the peer gives up and hangs up."""
        try:
            while self.sock.recv(65536):
                pass
        except OSError:
            pass

    # -- commands ----------------------------------------------------------------------

    def on_EHLO(self, arg: str) -> bool:
        fault = self.connection_fault
        if fault.step == "ehlo":
            return self.fail(fault, self.armed)
        self.say(250, f"{HOSTNAME}\nPIPELINING\nSIZE 104857600\n8BITMIME\nENHANCEDSTATUSCODES")
        return True

    def on_HELO(self, arg: str) -> bool:
        fault = self.connection_fault
        if fault.step == "ehlo" and fault.kind == "reply":   # refused like EHLO
            return self.fail(fault, self.armed)
        self.say(250, HOSTNAME)
        return True

    def on_MAIL(self, arg: str) -> bool:
        match = re.match(r"(?i)FROM:<([^>]*)>", arg)
        if match is None:
            self.say(501, "5.5.4 Syntax: MAIL FROM:<address>")
            return True
        sender = match.group(1)
        token = sender.partition("@")[0]
        self.mails += 1
        if self.mails == 1 and self.armed is not None and token != self.armed:
            self.server._record(lambda: self.server.mismatches.append(
                f"connection armed for {self.armed} carried MAIL for {token}"))
        fault = self.server._plan(token)
        if fault.step == "mail":
            return self.fail(fault, token)
        self.token, self.fault, self.sender, self.recipients = token, fault, sender, []
        self.say(250, "2.1.0 Ok")
        return True

    def on_RCPT(self, arg: str) -> bool:
        match = re.match(r"(?i)TO:<(r(\d+)\.[^>]*)>", arg)
        if self.token is None or match is None:
            self.say(503, "5.5.1 Error: need MAIL command")
            return True
        if self.fault.step == "rcpt" and self.fault.at == int(match.group(2)):
            return self.fail(self.fault, self.token)
        self.recipients.append(match.group(1))
        self.say(250, "2.1.5 Ok")
        return True

    def on_DATA(self, arg: str) -> bool:
        if not self.recipients:
            self.say(503, "5.5.1 Error: need RCPT command")
            return True
        fault, token = self.fault, self.token
        if fault.step == "data":
            return self.fail(fault, token)
        self.say(354, "End data with <CR><LF>.<CR><LF>")
        if fault.step == "message":
            read = self.file.read(fault.at)
            self.server._record(lambda: self.server.partial.update({token: read}))
            return False
        lines = []
        while True:
            line = self.file.readline(LINE_LIMIT)
            if not line:
                return False
            if line == b".\r\n":
                break
            lines.append(line[1:] if line.startswith(b".") else line)
        if fault.step == "dot":
            return self.fail(fault, token)
        message = Delivered(token, self.sender, list(self.recipients), b"".join(lines))
        self.reset()
        self.say(250, f"2.0.0 Ok: queued as {token}")
        self.server._record(lambda: self.server.messages.append(message))
        return fault.step != "after"

    def on_RSET(self, arg: str) -> bool:
        self.reset()
        self.say(250, "2.0.0 Ok")
        return True

    def on_NOOP(self, arg: str) -> bool:
        self.say(250, "2.0.0 Ok")
        return True

    def on_QUIT(self, arg: str) -> bool:
        self.say(221, "2.0.0 Bye")
        return False

    def reset(self) -> None:
        self.token, self.fault, self.sender, self.recipients = None, NO_FAULT, "", []

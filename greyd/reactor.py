"""The first steps of every session, many sessions on one thread.

Most sessions an MX sees are short and never wait on anything: greeting,
HELO, MAIL, a RCPT greylisted, RSET or QUIT (spam that will not retry).
With a thread per client, each of those lines wakes the client's thread,
which takes the GIL from another and sleeps again at the next read: two
context switches per command. A `Reactor` instead waits for all of its
listener's clients at once (epoll), reads whatever
lines came, and has each session answer them in turn on its one thread.

It does only what answers at once (`Session.answers_at_once`). As soon as
a session would wait, the reactor hands it over to a thread of the `Crew`
with what it had read and not used yet, and there its `Dialogue` goes on
as if it had run on that thread from the start. A session is handed over

- for one command, and then comes back: a RCPT that waits for the DNS
  lookups, for a store on another host (PostgreSQL) or one that is
  failing, or for a commit about its own triplet;
- for the rest of the session: when a recipient is accepted (the upstream
  is opened and asked in lockstep), when its reply starts a message (354)
  or a TLS handshake (220 to STARTTLS), when its client goes quiet past the
  deadline of its command, sends a line too long, or does not read its
  replies, and when greyd is stopping.

So every edge of the SMTP dialogue (timeouts, the 421s, the message, TLS)
has one implementation, the thread's, and the reactor only the common path.
"""

from __future__ import annotations

import io
import logging
import queue
import select
import socket
import threading
import time
from typing import Callable

from . import metrics, replies
from .channel import LINE_LIMIT, READ_BUFFER, Channel, Closed
from .connection import READ_WAKE, Connection
from .dialogue import Dialogue
from .ip import client_text
from .smtp import Session

ACCEPT_BATCH = 64      # connections accepted per wake-up at most, before the sessions' lines
ACCEPT_PAUSE = 0.05    # seconds before accept() is tried again after it failed (EMFILE)
IDLE_TIMEOUT = 2.0     # seconds an idle crew thread waits for work before it leaves

logger = logging.getLogger(__name__)


class Early:
    """A session while the reactor serves it: the client's socket, the
    dialogue, what was read and not used yet, the deadline of the next
    command line, and what the last reply could not send at once."""

    __slots__ = ("sock", "fd", "address", "dialogue", "buffer", "deadline", "unsent")

    def __init__(self, sock: socket.socket, address):
        self.sock, self.fd, self.address = sock, sock.fileno(), address
        self.dialogue: Dialogue | None = None
        self.buffer = b""
        self.deadline = 0.0
        self.unsent = b""

    def send(self, data: bytes) -> None:
        """What the kernel takes now; the rest waits for the session's thread,
        which also meets again whatever error the socket gave."""
        if not self.unsent:
            try:
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self.unsent += data


class Reactor:
    """The sessions of one listener until each answers at once no longer."""

    def __init__(self, listener, crew: "Crew"):
        self.listener, self.crew = listener, crew
        self.poll = select.epoll()
        self.table: dict[int, Early | Callable[[], None]] = {}    # what each descriptor is
        self.early: set[Early] = set()
        self.earliest = float("inf")          # no deadline before this one
        self.accepting = True
        self.paused_until = 0.0               # accept() failed: tried again then
        self.running = True
        self._lock = threading.Lock()
        self._back: list[Early] = []          # sessions a thread gave back (`_welcome`)
        self._wake, self._woken = socket.socketpair()
        self._listening = listener.socket.fileno()
        self._register(self._woken.fileno(), self._drain)
        self._register(self._listening, self._accept)
        listener.socket.setblocking(False)    # accepted sockets still block (their own flags)

    def start(self) -> None:
        threading.Thread(target=self.run, name="reactor", daemon=True).start()

    def wake(self) -> None:
        """Have the loop look at the listener again (it is closing)."""
        try:
            self._wake.send(b"x", socket.MSG_DONTWAIT)
        except OSError:
            pass

    def run(self) -> None:
        try:
            while True:
                with self._lock:
                    if not (self.accepting or self.early or self._back):
                        self.running = False        # no session comes back from now on
                        break
                self._turn()
        finally:
            self.poll.close()
            self._wake.close()
            self._woken.close()

    def _turn(self) -> None:
        """One wait for the sockets, and what is due then."""
        now = time.monotonic()
        if now >= self.earliest:
            self._sweep(now)
        if self.accepting and self.listener.closing:
            self._stop_accepting()
        timeout = None if not self.early else max(0.0, self.earliest - now)
        if self.paused_until:
            if now >= self.paused_until:
                self.paused_until = 0.0
                self._register(self._listening, self._accept)
            else:
                wait = self.paused_until - now
                timeout = wait if timeout is None else min(timeout, wait)
        table = self.table
        for fd, _ in self.poll.poll(-1 if timeout is None else timeout):
            data = table.get(fd)
            try:
                if type(data) is Early:
                    self._readable(data)
                elif data is not None:
                    data()
            except Exception:                       # noqa: BLE001 - logged, the loop goes on
                logger.exception("reactor error")
                if type(data) is Early and data in self.early:
                    self._forget(data)
                    self._hand_off(data, deadline=data.deadline)

    # -- the listener ---------------------------------------------------------------------

    def _drain(self) -> None:
        """The wake-up: the listener is closing, or sessions came back."""
        try:
            self._woken.recv(64, socket.MSG_DONTWAIT)
        except OSError:
            pass
        with self._lock:
            back, self._back = self._back, []
        now = time.monotonic()
        for early in back:
            self._expect(early, now)
            self.early.add(early)
            self._register(early.fd, early)
            if early.buffer:
                self._answer(early)             # what the client sent on meanwhile

    def _accept(self) -> None:
        listener = self.listener
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = listener.get_request()
            except BlockingIOError:
                return
            except OSError:
                if listener.closing:
                    self._stop_accepting()
                else:                               # EMFILE, ENOBUFS: let sessions end first
                    self._unregister(self._listening)
                    self.paused_until = time.monotonic() + ACCEPT_PAUSE
                return
            if not listener.verify_request(sock, address):
                listener.shutdown_request(sock)     # refused: no session
                continue
            self._begin(sock, address)

    def _stop_accepting(self) -> None:
        self.accepting = False
        if not self.paused_until:
            self._unregister(self._listening)
        self.paused_until = 0.0

    def _register(self, fd: int, what) -> None:
        self.table[fd] = what
        self.poll.register(fd, select.EPOLLIN)

    def _unregister(self, fd: int) -> None:
        if self.table.pop(fd, None) is not None:
            try:
                self.poll.unregister(fd)
            except OSError:                 # closed already: epoll forgot it then
                pass

    # -- sessions -------------------------------------------------------------------------

    def _begin(self, sock: socket.socket, address) -> None:
        listener = self.listener
        metrics.connections(1)
        early = Early(sock, address)
        session = Session(listener.ctx, client_text(address[0]))
        session.may_wait = False
        listener.admission.attach(sock, session)
        dialogue = early.dialogue = Dialogue(session, Channel(None, early.send, None))
        try:
            dialogue.channel.send(dialogue.guarded("greeting", session.greet, can_go_on=False))
        except Closed as closed:
            dialogue.ended(closed)
            self._end(early)
            return
        if early.unsent:
            self._hand_off(early)
            return
        self._expect(early, time.monotonic())
        self.early.add(early)
        self._register(early.fd, early)

    def _expect(self, early: Early, now: float) -> None:
        early.deadline = deadline = now + early.dialogue.command_timeout()
        if deadline < self.earliest:
            self.earliest = deadline

    def _sweep(self, now: float) -> None:
        """Clients quiet past their deadline go to a thread, which says 421."""
        earliest = float("inf")
        for early in list(self.early):
            if early.deadline <= now:
                self._forget(early)
                self._hand_off(early, deadline=early.deadline)
            elif early.deadline < earliest:
                earliest = early.deadline
        self.earliest = earliest

    def _readable(self, early: Early) -> None:
        try:
            data = early.sock.recv(READ_BUFFER, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""                      # a reset: the client is gone as well
        if not data:                        # the client left, or greyd is stopping (421)
            self._forget(early, closing=True)
            early.dialogue.ended(Closed("disconnect"))
            self._end(early)
            return
        early.buffer = early.buffer + data if early.buffer else data
        self._answer(early)

    def _answer(self, early: Early) -> None:
        """Each whole line read, answered, while the session answers at once."""
        dialogue = early.dialogue
        session = dialogue.session
        while True:
            buffer = early.buffer
            end = buffer.find(b"\n")
            if end < 0 and len(buffer) <= LINE_LIMIT:
                return                      # the rest of the line is on its way
            if end < 0 or end > LINE_LIMIT or session.ctx.stopping.is_set():
                self._forget(early)
                self._hand_off(early, deadline=early.deadline)
                return
            line, early.buffer = buffer[:end + 1], buffer[end + 1:]
            if not session.answers_at_once(line):
                self._forget(early)
                self._hand_off(early, line=line)
                return
            reply = dialogue.guarded("command", session.handle, line)
            if reply is replies.LATER:
                self._forget(early)
                self._hand_off(early, later=True)
                return
            dialogue.channel.send(reply)
            if early.unsent or session.starting_tls or session.receiving:
                self._forget(early)
                self._hand_off(early)
                return
            if session.done:
                self._forget(early, closing=True)
                self._end(early)
                return
            self._expect(early, time.monotonic())

    def _forget(self, early: Early, closing: bool = False) -> None:
        """No longer the reactor's; `closing`: its socket is closed next,
        which takes it out of epoll (no system call for that)."""
        self.early.discard(early)
        if closing:
            del self.table[early.fd]
        else:
            self._unregister(early.fd)

    def _end(self, early: Early) -> None:
        """The session ended here (QUIT, too many errors): its last line, the socket closed."""
        listener = self.listener
        try:
            early.dialogue.wrap_up(early.dialogue.started)
        except Exception:                           # noqa: BLE001 - logged by the listener
            listener.handle_error(early.sock, early.address)
        finally:
            listener.shutdown_request(early.sock)
            metrics.connections(-1)
            early.dialogue = None           # its channel sends through `early`: a cycle

    def _hand_off(self, early: Early, *, deadline: float | None = None, later: bool = False,
                  line: bytes | None = None) -> None:
        self.crew.run(lambda: self._go_on(early, deadline, later, line))

    def _go_on(self, early: Early, deadline: float | None, later: bool,
               line: bytes | None) -> None:
        """On a crew thread: the rest of the session (`Dialogue.resume`), or
        only the command that had to wait, when it can come back after it."""
        listener, sock = self.listener, early.sock
        try:
            conn = Connection(sock, READ_WAKE, early.buffer)
            # The channel alone holds the reader: STARTTLS replaces it, and the
            # old one's buffer (and the connection's `early` bytes) must go with it.
            channel = Channel(io.BufferedReader(conn, READ_BUFFER), conn.send, conn.expect,
                              conn.start_tls)
            back = None
            if later or line is not None:
                back = lambda: self._welcome(early, conn)       # noqa: E731
            if early.dialogue.resume(channel, unsent=early.unsent, line=line, later=later,
                                     deadline=deadline, back=back):
                return                              # the reactor has it again
        except Exception:                           # noqa: BLE001 - logged by the listener
            listener.handle_error(sock, early.address)
        listener.shutdown_request(sock)
        metrics.connections(-1)

    def _welcome(self, early: Early, conn: Connection) -> bool:
        """From a crew thread: take the session back, with what the client
        sent that its thread did not read; False when the reactor has
        stopped, or the thread read on."""
        rest = conn.unread()
        if rest is None:
            return False
        with self._lock:
            if not self.running:
                return False
            early.buffer, early.unsent = rest, b""
            early.dialogue.channel = Channel(None, early.send, None)
            early.dialogue.session.may_wait = False
            self._back.append(early)
        self.wake()
        return True


class Crew:
    """Threads for the sessions handed over: an idle one takes the next,
    else a new one starts; an idle one leaves after IDLE_TIMEOUT without
    one. (Under load the same threads serve command after command: a
    thread started per command would cost more than the command.)"""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0              # threads waiting for a job that none is queued for

    def run(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put(job)
                return
        threading.Thread(target=self._work, args=(job,), name="session", daemon=True).start()

    def _work(self, job: Callable[[], None]) -> None:
        while True:
            job()
            job = None                              # the session's objects go now
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=IDLE_TIMEOUT)
            except queue.Empty:
                with self._lock:
                    if self._jobs.empty():
                        self._idle -= 1
                        return
                    job = self._jobs.get_nowait()

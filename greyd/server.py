"""Listening sockets and threads: socketserver glue around `smtp.Session`.

Each accepted client gets a `connection.Connection` (its socket with a
deadline, TLS after STARTTLS), a `channel.Channel` over it and a session.

One `Listener` (a ThreadingTCPServer) per listen address, all sharing one
`Context` and one `Admission` (the connection limits). A thread per client
runs its session's `Dialogue`; the threads take their clients from accept()
themselves (`Listener.serve`). `Daemon` binds everything, serves, and stops
gracefully: no new connections, sessions with no transaction under way are
told 421 4.3.2 at once, the others get up to `grace` seconds to finish,
then the rest are told 421 4.3.2 too. Whatever escapes a session is logged
by `Listener.handle_error`, never only written to standard error.
"""

from __future__ import annotations

import io
import logging
import socket
import socketserver
import threading
import time

from . import log, metrics, tls
from .admission import Admission, LocalCounts, SharedCounts
from .channel import READ_BUFFER, Channel
from .connection import Connection, timeval
from .context import Context
from .dialogue import Dialogue
from .ip import client_text
from .smtp import Session
from .values import format_hostport

GRACE = 30.0           # seconds sessions may finish after a stop (SPEC §3)
REFUSE_TIMEOUT = 2.0   # bound on writing a 421 to a refused connection
IDLE_THREADS = 16      # threads waiting in accept() per listener after a burst; more exit
IDLE_TIMEOUT = 2.0     # seconds a surplus waiting thread stays without a client
ACCEPT_PAUSE = 0.05    # seconds before accept() is tried again after it failed

logger = logging.getLogger(__name__)


class Handler(socketserver.BaseRequestHandler):
    server: "Listener"

    def handle(self) -> None:
        sock = self.request
        conn = Connection(sock, IDLE_TIMEOUT)       # TCP_NODELAY and timeouts: its listener's
        session = Session(self.server.ctx, client_text(self.client_address[0]))
        self.server.admission.attach(sock, session)
        # The channel alone holds the reader: STARTTLS replaces it, and the old
        # one's buffer must go with it.
        channel = Channel(io.BufferedReader(conn, READ_BUFFER), conn.send, conn.expect,
                          conn.start_tls)
        Dialogue(session, channel).run()


class Listener(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], ctx: Context, admission: Admission,
                 reuse_port: bool = False):
        # Several workers each bind their own socket to the address (SO_REUSEPORT),
        # and the kernel spreads the connections among them.
        self.allow_reuse_port = reuse_port
        self._lock = threading.Lock()
        self._waiting = 0           # threads in (or on their way to) accept()
        self._closing = False
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.ctx, self.admission = ctx, admission
        super().__init__(address, Handler, bind_and_activate=False)
        try:
            if self.address_family == socket.AF_INET6:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.server_bind()
            self.set_socket_options()       # before listen(): every client inherits them
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def set_socket_options(self) -> None:
        """What each accepted socket inherits from the listening one (Linux):
        TCP_NODELAY (replies go out at once), the send timeout
        (server.command_timeout: a client that does not read is let go),
        and a receive timeout of IDLE_TIMEOUT, which bounds accept() here
        and, in a session, how long a read sleeps before it looks at its
        deadline again (`Connection`). Set once here, not for each client."""
        sock = self.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        timeval(self.ctx.config.server.command_timeout))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(IDLE_TIMEOUT))

    # -- serving: threads that accept their own clients -----------------------

    def serve(self) -> None:
        """Start serving: one thread waits in accept(); whenever it admits a
        client, it first makes sure another thread waits (starting one if
        none does), then runs the session, then goes back to accept().

        Each client still has a thread of its own for its whole session, as
        with ThreadingMixIn; but no listener thread polls, accepts and hands
        over, and a busy daemon starts no thread per connection. Threads
        left waiting after a burst leave once IDLE_TIMEOUT passes with no
        client (the kernel's SO_RCVTIMEO bounds accept()), down to one.
        """
        with self._lock:
            self._waiting += 1
        self._spawn()

    def _spawn(self) -> None:
        threading.Thread(target=self._accept_loop, name="session", daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                request, client_address = self.get_request()
            except BlockingIOError:             # IDLE_TIMEOUT without a client
                with self._lock:
                    if self._closing or self._waiting > 1:
                        self._waiting -= 1
                        return
                continue
            except OSError:
                if self._closing:
                    return
                time.sleep(ACCEPT_PAUSE)        # EMFILE, ENOBUFS: let sessions end first
                continue
            if not self.verify_request(request, client_address):
                self.shutdown_request(request)  # refused: no session, no new thread
                continue
            with self._lock:
                self._waiting -= 1
                spawn = not self._waiting and not self._closing
                self._waiting += spawn
            if spawn:
                self._spawn()
            metrics.connections(1)
            self.process_request_thread(request, client_address)
            metrics.connections(-1)
            request = client_address = None     # the session's objects go now, not later
            with self._lock:
                if self._closing or self._waiting >= IDLE_THREADS:
                    return
                self._waiting += 1

    def stop_accepting(self) -> None:
        """No new clients: the threads waiting in accept() return (sessions go on)."""
        with self._lock:
            self._closing = True
        try:
            self.socket.shutdown(socket.SHUT_RD)    # wakes every accept() with EINVAL
        except OSError:
            pass

    def verify_request(self, request, client_address) -> bool:
        refusal = self.admission.admit(request, client_text(client_address[0]))
        if refusal is None:
            return True
        try:
            request.settimeout(REFUSE_TIMEOUT)
            request.sendall(refusal.encode())
        except OSError:
            pass
        logger.warning("connection refused %s", log.fields(
            client=client_address[0], reason=refusal.text))
        return False

    def handle_error(self, request, client_address) -> None:
        """Whatever escaped a session goes to greyd's log (socketserver's
        default writes it to standard error, /dev/null for a daemon)."""
        logger.exception("connection error %s", log.fields(client=client_address[0]))

    def shutdown_request(self, request) -> None:
        # close() alone sends the FIN: socketserver's shutdown(SHUT_WR) first is
        # for forked handlers that share the socket, which greyd has none of.
        self.admission.release(request)
        self.close_request(request)


class Daemon:
    """Every listener of one greyd process, started and stopped together."""

    def __init__(self, ctx: Context, grace: float = GRACE,
                 counts: LocalCounts | SharedCounts | None = None, first: bool = True):
        """`counts` shared with the other workers of a daemon (server.workers > 1),
        whose listeners then share their addresses; only the `first` of them
        watches the certificate's expiry."""
        server = ctx.config.server
        self.ctx, self.grace = ctx, grace
        self.expiry = tls.ExpiryWatch(lambda: self.ctx.tls) if first else None
        self.admission = Admission(server.max_connections, server.max_connections_per_client,
                                   counts, ipv6_prefix=ctx.config.greylist.ipv6_prefix)
        ctx.under_pressure = self.admission.under_pressure
        self.listeners: list[Listener] = []
        try:
            for address in server.listen:
                self.listeners.append(Listener(address, ctx, self.admission,
                                               reuse_port=isinstance(counts, SharedCounts)))
        except BaseException:
            self.close()
            raise

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [listener.server_address[:2] for listener in self.listeners]

    def start(self) -> None:
        metrics.record()          # counting starts here (a worker: after its fork)
        self.ctx.greylister.start()
        self._watch_expiry()
        self.ctx.upstream.refresh()       # SMTPUTF8, DSN: waits a moment, never long
        for listener in self.listeners:
            listener.serve()
        logger.info("listening %s", log.fields(
            addresses=",".join(format_hostport(h, p) for h, p in self.addresses)))

    def open_sessions(self) -> int:
        return len(self.admission.sockets)

    def stop(self) -> None:
        """Graceful stop (SPEC §3): stop accepting, let sessions finish, 421 the rest."""
        logger.info("stopping %s", log.fields(sessions=len(self.admission.sockets)))
        self.ctx.stopping.set()
        for listener in self.listeners:
            listener.stop_accepting()
        self.close()
        self.admission.interrupt(only_idle=True)
        if not self.admission.wait_idle(self.grace):
            self.admission.interrupt()
            self.admission.wait_idle(REFUSE_TIMEOUT)
        self.ctx.greylister.close()
        self.ctx.lookup.close()
        if self.expiry is not None:
            self.expiry.stop()
        logger.info("stopped")

    def _watch_expiry(self) -> None:
        """Once there is a certificate, its expiry is watched (a thread)."""
        if self.expiry is not None and self.ctx.tls is not None:
            self.expiry.start()

    def close(self) -> None:
        for listener in self.listeners:
            listener.server_close()

    def reconfigure(self, config) -> None:
        """Serve new sessions with `config`; open sessions keep theirs (SIGHUP)."""
        old = self.ctx
        lookup = old.lookup if config.dns == old.config.dns else None
        try:
            certificate = tls.load(config.tls)      # a renewed one, read anew
        except tls.TlsError as error:
            logger.error("reload: keeping the running certificate %s", log.fields(error=error))
            certificate = old.tls
        same_upstream = (config.upstream, config.server.hostname) == (
            old.config.upstream, old.config.server.hostname)
        self.ctx = Context(config, old.greylister.reconfigured(config), lookup=lookup,
                           tls=certificate, stopping=old.stopping,
                           under_pressure=self.admission.under_pressure,
                           upstream=old.upstream if same_upstream else None)
        self.ctx.upstream.refresh()       # learnt again; the same upstream keeps what it knew
        if lookup is None:
            old.lookup.close()    # its sessions' lookups under way still finish
        for listener in self.listeners:
            listener.ctx = self.ctx
            listener.set_socket_options()     # a new command_timeout, for new clients
        self._watch_expiry()
        self.admission.max_connections = config.server.max_connections
        self.admission.per_client = config.server.max_connections_per_client
        self.admission.ipv6_prefix = config.greylist.ipv6_prefix
        if tuple(config.server.listen) != tuple(old.config.server.listen):
            logger.warning("reload: new listen addresses take a restart")
        if config.metrics != old.config.metrics:
            logger.warning("reload: a new metrics.listen takes a restart")
        logger.info("reloaded %s", log.fields(config=config.source or "defaults"))

"""Listening sockets and threads: socketserver glue around `smtp.Session`.

One `Listener` (a ThreadingTCPServer) per listen address, all sharing one
`Context` and one `Admission` (the connection limits). Each listener's
`reactor.Reactor` accepts its clients and serves their sessions on one
thread while they answer at once; a session that would wait goes on in a
thread of its own (the listener's `Crew`), over a `connection.Connection`
(its socket with a deadline, TLS after STARTTLS) and a `channel.Channel`.
`Daemon` binds everything, serves, and stops gracefully: no new
connections, sessions with no transaction under way are told 421 4.3.2 at
once, the others get up to `grace` seconds to finish, then the rest are
told 421 4.3.2 too. Whatever escapes a session is logged by
`Listener.handle_error`, never only written to standard error.
"""

from __future__ import annotations

import logging
import socket
import socketserver

from . import log, metrics, tls
from .admission import Admission, LocalCounts, SharedCounts
from .connection import READ_WAKE, timeval
from .context import Context
from .ip import client_text
from .reactor import Crew, Reactor
from .values import format_hostport

GRACE = 30.0           # seconds sessions may finish after a stop (SPEC §3)
REFUSE_TIMEOUT = 2.0   # bound on writing a 421 to a refused connection

logger = logging.getLogger(__name__)


class Listener(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], ctx: Context, admission: Admission,
                 reuse_port: bool = False):
        # Several workers each bind their own socket to the address (SO_REUSEPORT),
        # and the kernel spreads the connections among them.
        self.allow_reuse_port = reuse_port
        self.closing = False
        self.reactor: Reactor | None = None
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.ctx, self.admission = ctx, admission
        super().__init__(address, socketserver.BaseRequestHandler, bind_and_activate=False)
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
        and a receive timeout of READ_WAKE, how long a read in a session's
        thread sleeps before it looks at its deadline again (`Connection`).
        Set once here, not for each client."""
        sock = self.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        timeval(self.ctx.config.server.command_timeout))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(READ_WAKE))

    def serve(self) -> None:
        """Start serving: the reactor's thread accepts the clients."""
        self.reactor = Reactor(self, Crew())
        self.reactor.start()

    def stop_accepting(self) -> None:
        """No new clients (sessions go on)."""
        self.closing = True
        try:
            self.socket.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        if self.reactor is not None:
            self.reactor.wake()

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

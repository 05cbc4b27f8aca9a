"""Listening sockets and threads: socketserver glue around `smtp.Session`.

One `Listener` (a ThreadingTCPServer) per listen address, all sharing one
`Context` and one `Admission` (the connection limits). A thread per client
runs its Session. `Daemon` binds everything, serves, and stops gracefully:
no new connections, sessions with no transaction under way are told
421 4.3.2 at once, the others get up to `grace` seconds to finish, then the
rest are told 421 4.3.2 too.
"""

from __future__ import annotations

import io
import socket
import socketserver
import struct
import threading
import time
from collections import Counter

from . import log, replies
from .config import format_hostport
from .smtp import Context, Session
from .store import StorePool

GRACE = 30.0           # seconds sessions may finish after a stop (SPEC §3)
REFUSE_TIMEOUT = 2.0   # bound on writing a 421 to a refused connection
READ_BUFFER = 16384


class Admission:
    """Counts open sessions, overall and per client address, against the limits."""

    def __init__(self, max_connections: int, per_client: int):
        self.max_connections, self.per_client = max_connections, per_client
        self.by_client: Counter[str] = Counter()
        self.sockets: dict[socket.socket, str] = {}
        self.sessions: dict[socket.socket, Session] = {}
        self._cond = threading.Condition()

    def under_pressure(self) -> bool:
        """True when 80 % of max_connections are in use."""
        return len(self.sockets) >= 0.8 * self.max_connections

    def attach(self, sock: socket.socket, session: Session) -> None:
        with self._cond:
            self.sessions[sock] = session

    def admit(self, sock: socket.socket, client: str) -> replies.Reply | None:
        """None when the session may start, else the 421 to send."""
        with self._cond:
            if len(self.sockets) >= self.max_connections:
                return replies.TOO_MANY_CONNECTIONS
            if self.by_client[client] >= self.per_client:
                return replies.TOO_MANY_FROM_CLIENT
            self.sockets[sock] = client
            self.by_client[client] += 1
            return None

    def release(self, sock: socket.socket) -> None:
        with self._cond:
            self.sessions.pop(sock, None)
            client = self.sockets.pop(sock, None)
            if client is not None:
                self.by_client[client] -= 1
                if not self.by_client[client]:
                    del self.by_client[client]
                self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self.sockets, timeout)

    def interrupt(self, only_idle: bool = False) -> None:
        """Make sessions' pending reads return end-of-file (all, or those
        with no transaction under way); they answer 421 4.3.2 and close."""
        with self._cond:
            for sock in list(self.sockets):
                session = self.sessions.get(sock)
                if only_idle and (session is None or not session.idle):
                    continue
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass


def peer_ip(address) -> str:
    host = address[0]
    return host[7:] if host.startswith("::ffff:") and "." in host else host


class Connection(io.RawIOBase):
    """A client socket whose reads share one deadline.

    `expect(seconds)` starts the clock for what the session reads next (a
    command line, a line of the message): it must arrive whole within that
    time, not merely byte by byte, so a client that dribbles one byte at a
    time cannot hold its thread forever (RFC 5321 4.5.3.2). The C
    BufferedReader above it still does the line splitting.

    The socket stays in blocking mode and the kernel keeps the timeouts
    (SO_RCVTIMEO, SO_SNDTIMEO): Python's own socket timeout costs a poll()
    before every recv and an ioctl() at every change, each one more release
    of the GIL to a hundred waiting threads. The receive timeout is set anew
    only when it is more than SLACK away from the time left, so a brisk
    session sets it once.
    """

    SLACK = 0.5

    def __init__(self, sock: socket.socket, send_timeout: float):
        self.sock = sock
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(send_timeout))
        self.deadline = time.monotonic() + send_timeout
        self._armed = 0.0           # the receive timeout the kernel has now

    def readable(self) -> bool:
        return True

    def expect(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def readinto(self, buffer) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("deadline passed")
        if abs(remaining - self._armed) > self.SLACK:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(remaining))
            self._armed = remaining
        try:
            return self.sock.recv_into(buffer)
        except BlockingIOError:     # EAGAIN: the kernel's receive timeout ran out
            raise socket.timeout("read timed out") from None

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except BlockingIOError:     # EAGAIN: the client has not read for send_timeout
            raise socket.timeout("write timed out") from None


def _timeval(seconds: float) -> bytes:
    """A struct timeval for SO_RCVTIMEO/SO_SNDTIMEO; never 0, which means no limit."""
    seconds = max(seconds, 0.001)
    return struct.pack("@ll", int(seconds), int(seconds % 1 * 1_000_000))


class Handler(socketserver.BaseRequestHandler):
    server: "Listener"

    def handle(self) -> None:
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = self.server.ctx
        conn = Connection(sock, ctx.config.server.command_timeout)
        with io.BufferedReader(conn, READ_BUFFER) as rfile:
            session = Session(ctx, peer_ip(self.client_address), rfile, conn.send, conn.expect)
            self.server.admission.attach(sock, session)
            session.run()


class Listener(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], ctx: Context, admission: Admission):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.ctx, self.admission = ctx, admission
        super().__init__(address, Handler, bind_and_activate=False)
        try:
            if self.address_family == socket.AF_INET6:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def verify_request(self, request, client_address) -> bool:
        refusal = self.admission.admit(request, peer_ip(client_address))
        if refusal is None:
            return True
        try:
            request.settimeout(REFUSE_TIMEOUT)
            request.sendall(refusal.encode())
        except OSError:
            pass
        self.ctx.logger.warning("connection refused %s", log.fields(
            client=client_address[0], reason=refusal.text))
        return False

    def shutdown_request(self, request) -> None:
        self.admission.release(request)
        super().shutdown_request(request)


class Daemon:
    """Every listener of one greyd process, started and stopped together."""

    def __init__(self, ctx: Context, grace: float = GRACE):
        server = ctx.config.server
        self.ctx, self.grace = ctx, grace
        self.admission = Admission(server.max_connections, server.max_connections_per_client)
        ctx.under_pressure = self.admission.under_pressure
        self.listeners: list[Listener] = []
        self._threads: list[threading.Thread] = []
        try:
            for address in server.listen:
                self.listeners.append(Listener(address, ctx, self.admission))
        except BaseException:
            self.close()
            raise

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [listener.server_address[:2] for listener in self.listeners]

    def start(self) -> None:
        for listener in self.listeners:
            thread = threading.Thread(target=listener.serve_forever, kwargs={"poll_interval": 0.2},
                                      name=f"listen-{listener.server_address[1]}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.ctx.logger.info("listening %s", log.fields(
            addresses=",".join(format_hostport(h, p) for h, p in self.addresses)))

    def stop(self) -> None:
        """Graceful stop (SPEC §3): stop accepting, let sessions finish, 421 the rest."""
        self.ctx.logger.info("stopping %s", log.fields(sessions=len(self.admission.sockets)))
        self.ctx.stopping.set()
        for listener in self.listeners:
            listener.shutdown()
        self.close()
        self.admission.interrupt(only_idle=True)
        if not self.admission.wait_idle(self.grace):
            self.admission.interrupt()
            self.admission.wait_idle(REFUSE_TIMEOUT)
        self.ctx.pool.close()
        self.ctx.lookup.close()
        self.ctx.logger.info("stopped")

    def close(self) -> None:
        for listener in self.listeners:
            listener.server_close()

    def reconfigure(self, config) -> None:
        """Serve new sessions with `config`; open sessions keep theirs (SIGHUP)."""
        old = self.ctx
        pool = old.pool
        if config.database.path != old.config.database.path:
            pool = StorePool(config.database.path)
        lookup = old.lookup if config.dns == old.config.dns else None
        self.ctx = Context(config, pool, clock=old.clock, logger=old.logger,
                           stopping=old.stopping, lookup=lookup,
                           under_pressure=self.admission.under_pressure)
        if lookup is None:
            old.lookup.close()    # its sessions' lookups under way still finish
        for listener in self.listeners:
            listener.ctx = self.ctx
        self.admission.max_connections = config.server.max_connections
        self.admission.per_client = config.server.max_connections_per_client
        if tuple(config.server.listen) != tuple(old.config.server.listen):
            self.ctx.logger.warning("reload: new listen addresses take a restart")
        self.ctx.logger.info("reloaded %s", log.fields(config=config.source or "defaults"))

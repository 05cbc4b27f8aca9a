"""Connection limits: server.max_connections and max_connections_per_client.

`Admission` counts the open sessions of one process and decides whether a
new one may start. A client is counted by `client_key`: an IPv4 client by
its address, an IPv6 client by its network cut to greylist.ipv6_prefix (one
host may own a whole /64, so counting its addresses would limit nothing).
With server.workers > 1 the limits hold for the whole daemon, so the counts
live in `SharedCounts`, memory mapped before the workers are forked, where
each worker writes only its own region:

- a region is the worker's total and, per client, counters in a small
  count-min sketch (two rows of hashed slots), so no address needs to be
  stored and a client is never counted low: two clients sharing both slots
  can only make a limit bite early, never late;
- a worker adds its connection first and then reads everybody's sum, so two
  workers admitting at the same instant both see each other (and may both
  refuse), and the limit is never exceeded;
- the region of a worker that died is zeroed by the master before its
  replacement starts, so its connections do not stay counted for ever.
"""

from __future__ import annotations

import ipaddress
import mmap
import socket
import threading
from collections import Counter
from functools import lru_cache

from . import replies
from .ip import client_address

ROWS = 2                  # hashed rows of the per-client sketch
SLOTS = 1 << 14           # counters per row
PRESSURE = 0.8            # share of max_connections at which the daemon is "under pressure"


@lru_cache(maxsize=4096)
def client_key(client: str, ipv6_prefix: int) -> str:
    """What max_connections_per_client counts `client` as: an IPv4 address
    as itself (IPv4-mapped IPv6 counts as IPv4), an IPv6 address as its
    network cut to `ipv6_prefix`; anything else as it is written."""
    try:
        address = client_address(client)
    except ValueError:
        return client
    if address.version == 4:
        return str(address)
    return str(ipaddress.ip_network((address, ipv6_prefix), strict=False))


class LocalCounts:
    """Exact counts for a daemon of one process."""

    def __init__(self):
        self.by_client: Counter[str] = Counter()
        self.total = 0

    def add(self, client: str, n: int) -> None:
        self.total += n
        self.by_client[client] += n
        if not self.by_client[client]:
            del self.by_client[client]

    def client(self, client: str) -> int:
        return self.by_client[client]


class SharedCounts:
    """Counts shared by the workers of one daemon (see the module text)."""

    REGION = 1 + ROWS * SLOTS     # 32-bit counters: the total, then the sketch rows

    def __init__(self, workers: int):
        self.workers = workers
        self._map = mmap.mmap(-1, 4 * self.REGION * workers)   # MAP_SHARED, survives fork
        self._all = memoryview(self._map).cast("I")
        self.worker = 0

    def region(self, worker: int) -> memoryview:
        return self._all[worker * self.REGION:(worker + 1) * self.REGION]

    def use(self, worker: int) -> None:
        """This process is worker `worker` from now on (called in the child)."""
        self.worker = worker

    def clear(self, worker: int) -> None:
        """Forget a dead worker's connections (called by the master)."""
        self.region(worker)[:] = memoryview(bytes(4 * self.REGION)).cast("I")

    @staticmethod
    def slots(client: str) -> tuple[int, int]:
        """The client's counter in each row. Python's string hash is salted per
        interpreter, and forked workers share their master's salt."""
        h = hash(client)
        return 1 + (h & (SLOTS - 1)), 1 + SLOTS + ((h >> 16) & (SLOTS - 1))

    def add(self, client: str, n: int) -> None:
        own = self.worker * self.REGION
        first, second = self.slots(client)
        counters = self._all
        counters[own] += n
        counters[own + first] += n
        counters[own + second] += n

    @property
    def total(self) -> int:
        return sum(self._all[::self.REGION])

    def client(self, client: str) -> int:
        first, second = self.slots(client)
        return min(sum(self._all[first::self.REGION]), sum(self._all[second::self.REGION]))


class Admission:
    """Counts open sessions, overall and per client (`client_key`), against the limits."""

    def __init__(self, max_connections: int, per_client: int,
                 counts: LocalCounts | SharedCounts | None = None, ipv6_prefix: int = 64):
        self.max_connections, self.per_client = max_connections, per_client
        self.ipv6_prefix = ipv6_prefix      # a reload may change it: sockets keep their key
        self.counts = counts or LocalCounts()
        self.sockets: dict[socket.socket, str] = {}       # this process's sessions, their key
        self.sessions: dict[socket.socket, object] = {}
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)    # notified when none are left

    def under_pressure(self) -> bool:
        """True when 80 % of max_connections are in use."""
        return self.counts.total >= PRESSURE * self.max_connections

    def attach(self, sock: socket.socket, session) -> None:
        self.sessions[sock] = session

    def admit(self, sock: socket.socket, client: str) -> replies.Reply | None:
        """None when the session may start, else the 421 to send."""
        counts = self.counts
        client = client_key(client, self.ipv6_prefix)
        with self._lock:
            counts.add(client, 1)                 # first counted, then compared
            self.sockets[sock] = client
        # The lock's release is a memory barrier: other workers see the count now.
        refusal = None
        if counts.total > self.max_connections:
            refusal = replies.TOO_MANY_CONNECTIONS
        elif counts.client(client) > self.per_client:
            refusal = replies.TOO_MANY_FROM_CLIENT
        else:
            return None
        self.release(sock)
        return refusal

    def release(self, sock: socket.socket) -> None:
        with self._lock:
            self.sessions.pop(sock, None)
            client = self.sockets.pop(sock, None)
            if client is not None:
                self.counts.add(client, -1)
                if not self.sockets:
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

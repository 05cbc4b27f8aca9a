"""Connection limits, in one process and shared by forked workers."""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greyd import replies
from greyd.admission import Admission, SharedCounts

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def sockets():
    """Socket objects standing for connections (the admission keys by them)."""
    made = []

    def make():
        a, b = socket.socketpair()
        made.extend((a, b))
        return a
    yield make
    for sock in made:
        sock.close()


@pytest.mark.parametrize("shared", [False, True], ids=["one process", "shared"])
def test_limits_per_client_and_overall(sockets, shared):
    admission = Admission(4, 2, SharedCounts(3) if shared else None)
    a1, a2, a3 = sockets(), sockets(), sockets()
    assert admission.admit(a1, "192.0.2.1") is None
    assert admission.admit(a2, "192.0.2.1") is None
    assert admission.admit(a3, "192.0.2.1") == replies.TOO_MANY_FROM_CLIENT
    admission.release(a3)                            # refused: nothing to give back
    b1, b2, b3 = sockets(), sockets(), sockets()
    assert admission.admit(b1, "2001:db8::1") is None
    assert admission.admit(b2, "198.51.100.7") is None
    assert admission.admit(b3, "203.0.113.9") == replies.TOO_MANY_CONNECTIONS
    assert admission.under_pressure()                # 4 of 4
    admission.release(a1)
    assert admission.admit(a3, "192.0.2.1") is None
    for sock in (a2, a3, b1, b2):
        admission.release(sock)
    assert admission.counts.total == 0 and not admission.under_pressure()


def test_workers_see_each_others_connections_and_a_dead_ones_are_cleared(sockets):
    counts = SharedCounts(2)
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:                                     # worker 1 holds two of 192.0.2.1's
        status = 1
        try:
            counts.use(1)
            mine = Admission(5, 2, counts)
            held = [sockets(), sockets()]
            ok = all(mine.admit(sock, "192.0.2.1") is None for sock in held)
            os.write(ready_w, b"y" if ok else b"n")
            os.read(done_r, 1)
            status = 0
        finally:
            os._exit(status)
    try:
        assert os.read(ready_r, 1) == b"y"
        ours = Admission(5, 2, counts)               # worker 0
        assert ours.admit(sockets(), "192.0.2.1") == replies.TOO_MANY_FROM_CLIENT
        others = [sockets() for _ in range(4)]
        assert [ours.admit(sock, f"198.51.100.{i}") for i, sock in enumerate(others)] == \
            [None, None, None, replies.TOO_MANY_CONNECTIONS]
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
    counts.clear(1)                                  # what the master does for a dead worker
    assert counts.total == 3
    assert ours.admit(sockets(), "192.0.2.1") is None


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.ip_addresses().map(str)), max_size=300))
def test_a_client_is_never_counted_low(connections):
    counts = SharedCounts(3)
    exact: dict[str, int] = {}
    for worker, client in connections:
        counts.use(worker)
        counts.add(client, 1)
        exact[client] = exact.get(client, 0) + 1
    assert counts.total == len(connections)
    for client, n in exact.items():
        assert counts.client(client) >= n

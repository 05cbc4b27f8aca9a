"""Connection limits, in one process and shared by forked workers."""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greyd import replies
from greyd.admission import Admission, SharedCounts, client_key
from smtpclient import R, Raw

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


# -- the per-client key: an IPv6 client by its network ----------------------------------------

@pytest.mark.parametrize("client, prefix, key", [
    ("192.0.2.7", 64, "192.0.2.7"),                  # IPv4: the exact address, as before
    ("::ffff:192.0.2.7", 64, "192.0.2.7"),           # IPv4-mapped counts as IPv4
    ("2001:db8::1", 64, "2001:db8::/64"),
    ("2001:db8::ffff:2", 64, "2001:db8::/64"),
    ("2001:db8:0:1::1", 64, "2001:db8:0:1::/64"),
    ("2001:db8:0:1::1", 48, "2001:db8::/48"),
    ("2001:db8::1", 128, "2001:db8::1/128"),         # ipv6_prefix = 128: the exact address
    ("fe80::1%eth0", 64, "fe80::/64"),               # a zone index is no part of an address
])
def test_client_key(client, prefix, key):
    assert client_key(client, prefix) == key


@pytest.mark.parametrize("shared", [False, True], ids=["one process", "shared"])
def test_ipv6_clients_share_their_network_slot_ipv4_clients_do_not(sockets, shared):
    admission = Admission(100, 2, SharedCounts(1) if shared else None, ipv6_prefix=64)
    assert admission.admit(sockets(), "2001:db8::1") is None
    assert admission.admit(sockets(), "2001:db8::2") is None
    assert admission.admit(sockets(), "2001:db8::3") == replies.TOO_MANY_FROM_CLIENT
    assert admission.admit(sockets(), "2001:db8:0:1::1") is None     # the next /64: its own
    assert admission.admit(sockets(), "2001:db8:0:1::2") is None
    for _ in range(2):                                # 192.0.2.1 and .2: one slot each
        assert admission.admit(sockets(), "192.0.2.1") is None
        assert admission.admit(sockets(), "192.0.2.2") is None
    assert admission.admit(sockets(), "::ffff:192.0.2.1") == replies.TOO_MANY_FROM_CLIENT


def test_a_reload_to_another_prefix_releases_what_the_old_one_counted(sockets):
    admission = Admission(100, 2, ipv6_prefix=64)
    held = [sockets(), sockets()]
    for sock, client in zip(held, ["2001:db8::1", "2001:db8::2"]):
        assert admission.admit(sock, client) is None
    admission.ipv6_prefix = 128                       # what Daemon.reconfigure does
    assert admission.admit(sockets(), "2001:db8::1") is None       # the key is the address now
    for sock in held:
        admission.release(sock)
    assert admission.counts.client("2001:db8::/64") == 0


# -- on real sockets ----------------------------------------------------------------------------

def test_a_real_daemon_counts_ipv4_loopback_clients_by_address(start_greyd, upstream):
    """127.0.0.2 and 127.0.0.3 are two clients to max_connections_per_client
    (an IPv4 client is its address, whatever greylist.ipv4_prefix cuts
    triplets to); ::1 is a third, counted by its /64, when there is IPv6."""
    listen = ["127.0.0.1:0"] + (["[::1]:0"] if ipv6_loopback() else [])
    greyd = start_greyd(upstream.port, server={"listen": listen, "max_connections_per_client": 2},
                        greylist={"ipv4_prefix": 24, "ipv6_prefix": 64})
    opened: list[Raw] = []
    try:
        for source in ("127.0.0.2", "127.0.0.3"):
            opened += [Raw(greyd.port, source=source) for _ in range(2)]
            with Raw(greyd.port, source=source) as third:
                assert third.greeting == R(replies.TOO_MANY_FROM_CLIENT)
        assert all(c.greeting[0] == 220 for c in opened)
        if len(listen) > 1:
            v6 = greyd.daemon.addresses[1][1]
            opened += [Raw(v6, "::1") for _ in range(2)]
            assert all(c.greeting[0] == 220 for c in opened[-2:])
            with Raw(v6, "::1") as third:
                assert third.greeting == R(replies.TOO_MANY_FROM_CLIENT)
        for c in opened:
            assert c.cmd("NOOP") == R(replies.OK)
    finally:
        for c in opened:
            c.close()


def ipv6_loopback() -> bool:
    with socket.socket(socket.AF_INET6) as probe:
        try:
            probe.bind(("::1", 0))
        except OSError:
            return False
    return True

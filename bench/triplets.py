"""Realistic triplets, and a greyd database holding any number of them.

Owns: the pools of client networks, senders and local recipients; the i-th
triplet of the space (computed, not stored); and filling a fresh greyd
database with live triplets, straight through SQLite, as traffic would have
left them. Must not: time anything, or change greyd's schema (it only checks
the columns it fills).
"""

from __future__ import annotations

import ipaddress
import math
import random
import sqlite3
import string
import time
from pathlib import Path

from bench.processes import BenchError
from bench.report import progress

FIRST = ("anna", "ben", "carla", "david", "emma", "felix", "greta", "hugo", "ines", "jonas",
         "karin", "lukas", "maria", "nils", "olga", "paul", "rosa", "sven", "tina", "uwe",
         "vera", "walter", "yusuf", "zoe", "amir", "bea", "chen", "dana", "elif", "farid")
LAST = ("mueller", "schmidt", "schneider", "fischer", "weber", "meyer", "wagner", "becker",
        "schulz", "hoffmann", "koch", "richter", "klein", "wolf", "neumann", "schwarz",
        "braun", "zimmermann", "krueger", "hartmann", "lange", "werner", "krause", "lehmann")
WORDS = ("shop", "news", "mail", "cloud", "bank", "travel", "media", "post", "market", "tech",
         "home", "city", "green", "blue", "data", "health", "sport", "music", "book", "food",
         "auto", "energy", "finance", "group", "net", "online", "service", "store", "world",
         "daily", "express", "global", "smart", "prime", "social", "event", "ticket", "deal")
TLDS = ("com", "de", "org", "net", "co.uk", "fr", "nl", "io", "info", "eu")
ROLES = ("info", "news", "noreply", "no-reply", "newsletter", "billing", "support", "hello",
         "team", "alerts", "notifications", "office", "sales", "service", "invoice")
LOCAL_DOMAINS = ("example.org", "example.net", "mail.example.com", "example.de")
BATCH = 50_000                  # triplets inserted per transaction


class TripletSpace:
    """Realistic triplets, the i-th one computed rather than stored.

    Pools of distinct client networks (90 % IPv4 /24, 10 % IPv6 /64), senders
    (distinct once normalized as greyd stores them) and local recipients; the
    i-th triplet is a fixed pseudo-random pick, different for every i, so
    triplet i < N is in the database and any i >= N is not.
    """

    def __init__(self, rng: random.Random, policy, networks=65_521, senders=50_021,
                 recipients=2_003):
        nets: dict[str, str] = {}
        while len(nets) < networks:
            if rng.random() < 0.9:
                net = ipaddress.IPv4Network((rng.randrange(1 << 24) << 8, 24))
            else:
                net = ipaddress.IPv6Network(((0x20010db8 << 96) | (rng.getrandbits(32) << 64), 64))
            client = str(net.network_address + rng.randrange(1, 250))
            nets.setdefault(str(net), client)
        self.networks = list(nets.items())              # (stored network, a client in it)
        seen: dict[str, str] = {}
        while len(seen) < senders:
            raw = self._sender(rng)
            seen.setdefault(policy.normalize_sender(raw), raw)
        self.senders = list(seen.items())               # (stored sender, as sent)
        people: set[str] = set()
        while len(people) < recipients:
            person = f"{rng.choice(FIRST)}.{rng.choice(LAST)}"
            if rng.random() < 0.3:
                person += rng.choice(string.ascii_lowercase)
            people.add(f"{person}@{rng.choice(LOCAL_DOMAINS)}")
        self.recipients = sorted(people)
        self.size = networks * senders * recipients
        self.step = 0x9E3779B97F4A7C15                  # coprime to size: i -> i*step is 1:1
        while math.gcd(self.step, self.size) != 1:
            self.step += 2

    @staticmethod
    def _sender(rng: random.Random) -> str:
        domain = (f"{rng.choice(WORDS)}{rng.choice(WORDS)}.{rng.choice(TLDS)}"
                  if rng.random() < 0.7 else f"mail.{rng.choice(WORDS)}-{rng.choice(WORDS)}.com")
        kind = rng.random()
        if kind < 0.4:
            local = f"{rng.choice(FIRST)}.{rng.choice(LAST)}"
        elif kind < 0.7:
            local = rng.choice(ROLES)
        elif kind < 0.85:
            local = f"bounce-{rng.randrange(10**6)}-{rng.randrange(10**4)}"
        elif kind < 0.95:
            local = f"prvs={rng.randrange(16**10):010x}={rng.choice(FIRST)}"
        else:
            local = f"{rng.choice(FIRST)}+{rng.choice(WORDS)}"
        return f"{local}@{domain}"

    def triplet(self, i: int) -> tuple[tuple[str, str], tuple[str, str], str]:
        j = (i * self.step) % self.size
        j, n = divmod(j, len(self.networks))
        r, s = divmod(j, len(self.senders))
        return self.networks[n], self.senders[s], self.recipients[r]


def build_store(path: Path, space: TripletSpace, count: int, now: int, rng: random.Random,
                store_module) -> float:
    """A greyd database holding `count` live triplets (40 % passed, seen within
    max_age; the rest pending, first seen within retry_window), inserted in
    random key order as traffic would. Returns the seconds it took."""
    started = time.perf_counter()
    store = store_module.Store(path)
    store.migrate()
    store.close()
    conn = sqlite3.connect(path)
    check_columns(conn)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    for start in range(0, count, BATCH):
        with conn:
            conn.executemany(
                "INSERT INTO triplets (network, sender, recipient, first_seen, last_seen,"
                " passed_at) VALUES (?, ?, ?, ?, ?, ?)",
                rows(space, start, min(count, start + BATCH), now, rng))
        progress(f"store: {min(count, start + BATCH):,} of {count:,} triplets")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started


def check_columns(conn: sqlite3.Connection) -> None:
    """Fail unless greyd's triplets table has the columns build_store fills."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(triplets)")}
    wanted = {"network", "sender", "recipient", "first_seen", "last_seen", "passed_at"}
    if not wanted <= columns:
        raise BenchError(f"the triplets table has changed: columns {sorted(columns)}")


def rows(space: TripletSpace, start: int, stop: int, now: int, rng: random.Random):
    """Triplets start..stop as rows of the triplets table, with their times."""
    day = 86400
    for i in range(start, stop):
        (network, _), (sender, _), recipient = space.triplet(i)
        if rng.random() < 0.4:
            first = now - rng.randrange(35 * day)
            passed = first + rng.randrange(300, 4 * 3600)
            last = min(now, passed + rng.randrange(35 * day))
        else:
            first = now - rng.randrange(2 * day)
            passed, last = None, min(now, first + rng.randrange(0, 3600))
        yield network, sender, recipient, first, last, passed

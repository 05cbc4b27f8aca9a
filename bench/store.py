"""The store section: greyd's database at args.triplets triplets.

Owns: building that database (bench.triplets; in PostgreSQL through
bench.database), timing one decision as the daemon makes it, the database's
bytes per triplet, and `greyd cleanup` of every triplet once expired while a
stall client keeps sending RCPTs to a greyd serving that database; their
targets (by store) and the "Store" table. Must not: write the database while
greyd serves it (cleanup does, through greyd).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

from bench.client import (DOMAIN, GREYLISTED, SENDER_DOMAIN, SESSION_TIMEOUT, Unexpected,
                          connect, describe, token)
from bench.daemon import Greyd
from bench.database import POSTGRESQL
from bench.processes import BenchError, Processes, run_bounded
from bench.report import Report, percentile, progress, sig
from bench.sink import start_sink
from bench.triplets import LOCAL_DOMAINS, TripletSpace, build_store, rows

TARGET_DECISION_P99_MS = {"sqlite": 1.0, "postgresql": 2.0}    # by store (the issues')
TARGET_BYTES_PER_TRIPLET = {"sqlite": 150.0}                    # PostgreSQL's: none set
TARGET_CLEANUP_STALL_MS = 100.0
RCPTS_PER_SESSION = 90         # under greyd's default max_recipients (100)
DAY = 86400


def store_section(args, procs: Processes, workdir: Path, report: Report,
                  rng: random.Random) -> None:
    """The store section: decisions and bytes per triplet, then cleanup under load."""
    try:
        from greyd import policy, store as store_module
        from greyd.greylist import Greylister
    except ImportError as error:
        raise BenchError(f"cannot import greyd ({error}); install it: pip install -e .")
    root = workdir / "greyd-store"
    (root / "var").mkdir(parents=True)
    path = root / "var" / "greyd.db"
    db = args.database
    now = int(time.time())
    progress("store: generating realistic networks, senders and recipients")
    space = TripletSpace(random.Random(args.seed), policy)
    if db.store == POSTGRESQL:
        built = db.build(space, args.triplets, now, rng, rows)
    else:
        built = build_store(path, space, args.triplets, now, rng, store_module)
    progress(f"store: timing {args.decisions:,} decisions")
    times = time_decisions(root, space, args.decisions, args.triplets, now, rng, Greylister,
                           db.url)
    decisions = decision_figures(times)
    database = db.figures() if db.store == POSTGRESQL else database_figures(path)
    targets = [
        report.target(f"one decision p99 at {args.triplets:,} triplets",
                      decisions["decision_p99_ms"], TARGET_DECISION_P99_MS[db.store],
                      at_most=True),
        report.target("database bytes per triplet", database["bytes_per_triplet"],
                      TARGET_BYTES_PER_TRIPLET[db.store], at_most=True)
        if db.store in TARGET_BYTES_PER_TRIPLET else None]
    cleanup = cleanup_under_load(args, procs, workdir, root, path, now, report, rng)
    targets.append(report.target("longest RCPT stall during cleanup", cleanup["stall_ms"],
                                 TARGET_CLEANUP_STALL_MS, at_most=True))
    report.data["store"] = {
        "triplets": database["triplets"], "build_seconds": built, **decisions, **database,
        **{f"cleanup_{k}": v for k, v in cleanup.items()}}
    decided = len(times["existing"]) + len(times["new"])
    recorded = args.triplets + (args.decisions + 201) // 2      # the new ones, warm-up's too
    if database["triplets"] < recorded:
        report.anomaly(f"store: {recorded - database['triplets']:,} new triplets decided "
                       "never reached the database (store failures?)")
    store_table(args, path, report, decided, report.data["store"], targets)


def time_decisions(root: Path, space: TripletSpace, count: int, stored: int, now: int,
                   rng: random.Random, greylister_class,
                   url: str | None = None) -> dict[str, list[float]]:
    """Seconds per decision, as the daemon makes one: `Greylister.decide`
    over the database under `root`, or PostgreSQL's at `url` (its store
    pool, its writer thread, its decision line in a log file), with the
    clock at `now`. Half existing triplets, half new."""
    from greyd import config as configuration, log, policy
    config_path = root / "etc" / "greyd.toml"
    config_path.parent.mkdir(exist_ok=True)
    config_path.write_text(
        f"[relay]\ndomains = {json.dumps(list(LOCAL_DOMAINS))}\nclients = []\n"
        '[dns]\nenabled = false\n[log]\nfile = "var/log/decisions.log"\n'
        + ('[database]\npath = "var/greyd.db"\n' if url is None
           else f"[database]\nurl = {json.dumps(url)}\n"))
    config = configuration.load(config_path)
    log.setup(config.log, stderr=False)
    greylister = greylister_class.open(config, clock=lambda: now)
    times: dict[str, list[float]] = {"existing": [], "new": []}
    fresh = stored + 1
    try:
        for n in range(count + 200):
            if n % 2:
                kind, i = "existing", rng.randrange(stored)
            else:
                kind, i, fresh = "new", fresh, fresh + 1
            (_, client), (_, sender), recipient = space.triplet(i)
            request = policy.Request(client=client, sender=sender, recipient=recipient,
                                     helo="mail.bench.test")
            began = time.perf_counter()
            greylister.decide(request, "bench")
            if n >= 200:                        # the first 200 warm the pool up
                times[kind].append(time.perf_counter() - began)
    finally:
        greylister.close()
    return times


def decision_figures(times: dict[str, list[float]]) -> dict[str, float]:
    """Milliseconds per decision: p50, p99 and max of all; p99 of existing and of new."""
    every = times["existing"] + times["new"]
    return {"decision_p50_ms": percentile(every, 50) * 1000,
            "decision_p99_ms": percentile(every, 99) * 1000,
            "decision_max_ms": max(every) * 1000,
            "existing_p99_ms": percentile(times["existing"], 99) * 1000,
            "new_p99_ms": percentile(times["new"], 99) * 1000}


def database_figures(path: Path) -> dict:
    """Triplets, file size and pages of the database, checkpointed first."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    rows = conn.execute("SELECT count(*) FROM triplets").fetchone()[0]
    page_size, pages, free = (conn.execute(f"PRAGMA {p}").fetchone()[0]
                              for p in ("page_size", "page_count", "freelist_count"))
    conn.close()
    size = path.stat().st_size
    return {"triplets": rows, "database_bytes": size, "page_size": page_size, "pages": pages,
            "free_pages": free, "bytes_per_triplet": size / rows}


def store_table(args, path: Path, report: Report, decided: int, figures: dict,
                targets: list) -> None:
    """The "Store" table."""
    decision, density, stall = targets
    db = args.database
    where = (f"SQLite on {filesystem(path)}" if db.url is None
             else f"PostgreSQL {db.version}")
    report.table(f"Store ({args.triplets:,} triplets, {where})",
                 ["figure", "value", "target", ""], [
        ["triplets in the database (after the decisions)", f"{figures['triplets']:,}", "", ""],
        [f"one decision p50 ms ({decided:,} decisions: Greylister.decide)",
         sig(figures["decision_p50_ms"]), "", ""],
        ["one decision p99 ms", sig(figures["decision_p99_ms"]), decision.text,
         decision.verdict],
        ["one decision max ms", sig(figures["decision_max_ms"]), "", ""],
        ["database bytes per triplet (file size ÷ triplets)" if density else
         "database bytes per triplet (table, index and TOAST ÷ triplets)",
         sig(figures["bytes_per_triplet"]), density.text if density else "",
         density.verdict if density else ""],
        ["cleanup: expired triplets removed", f"{figures['cleanup_removed']:,}", "", ""],
        ["cleanup duration s (greyd cleanup --quiet)", sig(figures["cleanup_seconds"]), "", ""],
        [f"RCPT p50 ms during cleanup ({figures['cleanup_rcpts']:,} RCPTs, "
         f"{args.stall_clients} client{'s' if args.stall_clients > 1 else ''} back to back)",
         sig(figures["cleanup_p50_ms"]), "", ""],
        ["RCPT p99 ms during cleanup", sig(figures["cleanup_p99_ms"]), "", ""],
        ["longest RCPT stall during cleanup, ms", sig(figures["cleanup_stall_ms"]), stall.text,
         stall.verdict],
        ["longest RCPT before cleanup, ms (for comparison)",
         sig(figures["cleanup_before_ms"]), "", ""],
    ])


def filesystem(path: Path) -> str:
    """The type of the filesystem `path` is on, and its directory."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return f"{kind} at {path.parent}"


def cleanup_under_load(args, procs: Processes, workdir: Path, root: Path, path: Path,
                       now: int, report: Report, rng: random.Random) -> dict:
    """Every triplet made expired, greyd serving that database, args.stall_clients
    clients sending RCPTs back to back, and `greyd cleanup` run meanwhile."""
    cutoff = now - 30 * DAY
    db = args.database
    expired = db.expire_all(cutoff) if db.url else expire_all(path, cutoff)
    (workdir / "cleanup-sink").mkdir()
    sink = start_sink(args.sink, False, procs, workdir / "cleanup-sink")
    greyd = Greyd(root, procs, upstream=sink.port, trusted=False, workers=args.workers,
                  domains=(DOMAIN, *LOCAL_DOMAINS), database=path, url=db.url)
    greyd.start()
    try:
        load = StallClient(greyd.port, args.stall_clients, f"stall-{token(rng)}@{SENDER_DOMAIN}")
        load.start()
        try:
            time.sleep(args.baseline)
            progress(f"store: greyd cleanup of {expired:,} expired triplets, under load")
            began = time.perf_counter()
            status, out, err, seconds = run_bounded(greyd.command("cleanup", "--quiet"),
                                                    args.cleanup_timeout)
            ended = time.perf_counter()
            time.sleep(min(1.0, args.baseline))
        finally:
            load.stop()
        report.logged(greyd, "cleanup")
    finally:
        greyd.stop()
    if status != 0:
        raise BenchError(f"greyd cleanup exited {status}: {(err or out).strip()[-300:]}")
    left = cleanup_problems(path, cutoff, load, report, db)
    return {"removed": expired - left, "seconds": seconds,
            **stall_figures(load.samples, began, ended)}


def expire_all(path: Path, cutoff: int) -> int:
    """Move every triplet's times back beyond max_age (35 d) and retry_window (2 d);
    how many are older than `cutoff` then."""
    shift = 40 * DAY
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE triplets SET first_seen = first_seen - ?, last_seen = last_seen - ?,"
                     " passed_at = passed_at - ?", (shift, shift, shift))
    expired = count_expired(conn, cutoff)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return expired


def count_expired(conn: sqlite3.Connection, cutoff: int) -> int:
    return conn.execute("SELECT count(*) FROM triplets WHERE last_seen < ?",
                        (cutoff,)).fetchone()[0]


def cleanup_problems(path: Path, cutoff: int, load: StallClient, report: Report,
                     db) -> int:
    """Report the RCPT client's failures and expired triplets left; how many were left."""
    if load.errors:
        detail = ", ".join(f"{what} ×{n}" for what, n in load.errors.most_common(3))
        report.anomaly(f"cleanup: the RCPT client saw {sum(load.errors.values())} failures "
                       f"({detail})")
    if db.url:
        left = db.count_expired(cutoff)
    else:
        conn = sqlite3.connect(path)
        left = count_expired(conn, cutoff)
        conn.close()
    if left:
        report.anomaly(f"cleanup: {left:,} expired triplets were left")
    return left


def stall_figures(samples: list[tuple[float, float]], began: float, ended: float) -> dict:
    """RCPT reply times during the cleanup (p50, p99, the longest) and the longest before."""
    during = [dt for t, dt in samples if t < ended and t + dt > began]
    before = [dt for t, dt in samples if t + dt <= began]
    if not during or not before:
        raise BenchError("cleanup: the RCPT clients got no reply around the cleanup")
    return {"rcpts": len(during), "p50_ms": percentile(during, 50) * 1000,
            "p99_ms": percentile(during, 99) * 1000, "stall_ms": max(during) * 1000,
            "before_ms": max(before) * 1000}


class StallClient:
    """Clients sending RCPTs (fresh triplets, each answered 451) back to back in a
    thread of their own, timing every reply: (start, seconds) per RCPT."""

    def __init__(self, port: int, clients: int, sender: str):
        self.port, self.clients, self.sender = port, clients, sender
        self.samples: list[tuple[float, float]] = []
        self.errors: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(SESSION_TIMEOUT + 5)

    async def _main(self) -> None:
        await asyncio.gather(*(self._client(n) for n in range(self.clients)))

    async def _client(self, number: int) -> None:
        """Sessions one after another, until stopped; failures counted."""
        loop = asyncio.get_running_loop()
        sent = itertools.count(1)
        while not self._stop.is_set():
            try:
                await self._session(loop, number, sent)
            except (OSError, Unexpected) as error:
                self.errors[describe(error)] += 1
                await asyncio.sleep(0.1)

    async def _session(self, loop, number: int, sent: itertools.count) -> None:
        """A session as an MTA sends it: EHLO, MAIL, up to RCPTS_PER_SESSION
        recipients (each timed), QUIT. No RSET: greyd, like Postfix, counts many
        of them as errors."""
        async with asyncio.timeout(SESSION_TIMEOUT):
            proto = await connect(loop, self.port)
        try:
            async with asyncio.timeout(SESSION_TIMEOUT):
                await proto.ask("EHLO", b"EHLO bench.client\r\n", 250)
                await proto.ask("MAIL", b"MAIL FROM:<%s>\r\n" % self.sender.encode(), 250)
            for _ in range(RCPTS_PER_SESSION):
                if self._stop.is_set():
                    break
                line = b"RCPT TO:<c%dr%d@%s>\r\n" % (number, next(sent), DOMAIN.encode())
                began = time.perf_counter()
                try:                # a reply that is wrong still took its time
                    async with asyncio.timeout(SESSION_TIMEOUT):
                        await proto.ask("RCPT", line, GREYLISTED)
                finally:
                    self.samples.append((began, time.perf_counter() - began))
            async with asyncio.timeout(SESSION_TIMEOUT):
                await proto.ask("QUIT", b"QUIT\r\n", 221)
        finally:
            proto.transport.close()

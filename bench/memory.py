"""The memory section: greyd's RSS idle, and with many idle connections held open.

Owns: holding idle connections (each greeted with 220, then silent; or, to a
greyd offering STARTTLS, each through STARTTLS, the handshake and EHLO, then
silent), the RSS per connection of each kind, their targets and the
"Memory" table. Must not: let greyd
relay anything (every recipient here is greylisted; the sink behind it only
tells greyd its capabilities when greyd starts).
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from pathlib import Path

from bench.certificate import Certificate, client_context, make_certificate
from bench.client import SENDER_DOMAIN, SESSION_TIMEOUT, connect, python_run, starttls, token
from bench.daemon import Greyd
from bench.processes import BenchError, Processes
from bench.report import Report, progress, sig
from bench.sink import start_sink

TARGET_KIB_PER_CONNECTION = 32.0
TARGET_KIB_PER_TLS_CONNECTION = 64.0


def memory(args, procs: Processes, workdir: Path, report: Report, rng: random.Random) -> None:
    """The memory section: greyd's RSS idle, with args.idle plaintext connections, and
    (another greyd, offering STARTTLS) with args.idle connections idle after STARTTLS."""
    sink = start_sink(args.sink, False, procs, workdir)    # greyd asks it its EHLO at start
    try:
        plain = measure_hold(args, procs, workdir / "greyd-memory", sink.port, report, rng, None)
        certificate = make_certificate(workdir / "certificate-memory")
        tls = measure_hold(args, procs, workdir / "greyd-memory-tls", sink.port, report, rng,
                           certificate)
    finally:
        procs.stop(sink.proc)
    rows = []
    data = report.data["memory"] = {}
    for figures, bound, kind in ((plain, TARGET_KIB_PER_CONNECTION, ""),
                                 (tls, TARGET_KIB_PER_TLS_CONNECTION, "TLS ")):
        idle, held, after, count = figures
        per = (held - idle) / count
        target = report.target(f"RSS per idle {kind}connection ({args.idle:,} held)", per,
                               bound, at_most=True)
        entry = {"idle_kib": idle, "held_kib": held, "connections": count,
                 "per_connection_kib": per, "after_release_kib": after}
        data.update({"tls": entry} if kind else entry)
        offers = " (STARTTLS offered)" if kind else ""
        rows += [
            [f"greyd{offers} idle, KiB", f"{idle:,}", "", ""],
            [f"greyd with {count:,} idle {kind}connections, KiB", f"{held:,}", "", ""],
            [f"per idle {kind}connection, KiB", sig(per), target.text, target.verdict],
            ["greyd after they closed, KiB", f"{after:,}", "", ""],
        ]
    report.table("Memory (greyd's VmRSS)", ["figure", "value", "target", ""], rows, [
        "Idle connections: greeted with 220, then silent. Idle TLS connections: EHLO, "
        "STARTTLS, a full TLS 1.3 handshake and EHLO again, then silent. Each kind "
        "against a greyd of its own."])


def measure_hold(args, procs: Processes, root: Path, upstream: int, report: Report,
                 rng: random.Random, certificate: Certificate | None
                 ) -> tuple[int, int, int, int]:
    """One greyd's RSS idle, holding args.idle connections (over STARTTLS with a
    `certificate`), and after they closed: (idle, held, after KiB, connections held)."""
    # Every recipient is greylisted here: nothing is relayed.
    greyd = Greyd(root, procs, upstream=upstream, trusted=False, workers=args.workers,
                  url=args.database.fresh(), tls=certificate)
    context = client_context() if certificate else None
    kind = "TLS " if certificate else ""
    greyd.start()
    try:
        # A few sessions first, so the idle figure includes the warm store pool.
        python_run(greyd.port, "deferred", 10, 50, f"warm-{token(rng)}@{SENDER_DOMAIN}", 60,
                   context)
        time.sleep(0.5)
        idle = greyd.rss_kib()
        progress(f"memory: holding {args.idle:,} idle {kind}connections")
        held, failed = hold_connections(greyd, args.idle, context)
        after = greyd.rss_kib()
        if failed:
            report.anomaly(f"memory: {failed} of {args.idle} idle {kind}connections were "
                           "not " + ("through STARTTLS" if certificate else "greeted"))
        if failed == args.idle:
            raise BenchError(f"memory: no idle {kind}connection was set up")
        report.logged(greyd, f"memory {kind}".strip())
    finally:
        greyd.stop()
    return idle, held, after, args.idle - failed


def hold_connections(greyd: Greyd, count: int,
                     context: ssl.SSLContext | None = None) -> tuple[int, int]:
    """Open `count` connections that each get their 220 (with `context`: and go
    through STARTTLS and EHLO), then sit idle; greyd's RSS while they are all open,
    and how many failed. Returns (RSS KiB, failures)."""
    async def main():
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(50)        # not more SYNs at once than a listen queue takes
        protos = []

        async def one():
            async with gate:
                async with asyncio.timeout(SESSION_TIMEOUT):
                    proto = await connect(loop, greyd.port)
                    protos.append(proto)
                    if context is not None:
                        await starttls(loop, proto, context)

        results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        failed = sum(1 for r in results if isinstance(r, BaseException))
        await asyncio.sleep(1.0)            # let greyd's threads settle into their reads
        rss = greyd.rss_kib()
        for proto in protos:
            proto.transport.close()
        await asyncio.sleep(0.2)
        return rss, failed
    rss, failed = asyncio.run(main())
    time.sleep(1.0)
    return rss, failed

"""The memory section: greyd's RSS idle, and with many idle connections held open.

Owns: holding idle connections (each greeted with 220, then silent), the
RSS per connection, its target and the "Memory" table. Must not: let greyd
contact an upstream (every recipient here is greylisted).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

from bench.client import SENDER_DOMAIN, SESSION_TIMEOUT, connect, python_run, token
from bench.daemon import Greyd
from bench.processes import BenchError, Processes, free_port
from bench.report import Report, progress, sig

TARGET_KIB_PER_CONNECTION = 32.0


def memory(args, procs: Processes, workdir: Path, report: Report, rng: random.Random) -> None:
    """The memory section: greyd's RSS idle, with args.idle connections, and after."""
    # Every recipient is greylisted here: the upstream is never contacted.
    greyd = Greyd(workdir / "greyd-memory", procs, upstream=free_port(), trusted=False,
                  workers=args.workers)
    greyd.start()
    try:
        # A few sessions first, so the idle figure includes the warm store pool.
        python_run(greyd.port, "deferred", 10, 50, f"warm-{token(rng)}@{SENDER_DOMAIN}", 60)
        time.sleep(0.5)
        idle = greyd.rss_kib()
        progress(f"memory: holding {args.idle:,} idle connections")
        held, failed = hold_connections(greyd, args.idle)
        after = greyd.rss_kib()
        if failed:
            report.anomaly(f"memory: {failed} of {args.idle} idle connections were not greeted")
        if failed == args.idle:
            raise BenchError("memory: no idle connection was greeted")
        report.logged(greyd, "memory")
    finally:
        greyd.stop()
    per = (held - idle) / (args.idle - failed)
    target = report.target(f"RSS per idle connection ({args.idle:,} held)", per,
                           TARGET_KIB_PER_CONNECTION, at_most=True)
    report.data["memory"] = {"idle_kib": idle, "held_kib": held, "connections": args.idle,
                             "per_connection_kib": per, "after_release_kib": after}
    report.table("Memory (greyd's VmRSS)", ["figure", "value", "target", ""], [
        ["greyd idle, KiB", f"{idle:,}", "", ""],
        [f"greyd with {args.idle:,} idle connections, KiB", f"{held:,}", "", ""],
        ["per idle connection, KiB", sig(per), target.text, target.verdict],
        ["greyd after they closed, KiB", f"{after:,}", "", ""],
    ])


def hold_connections(greyd: Greyd, count: int) -> tuple[int, int]:
    """Open `count` connections that each get their 220, then sit idle; greyd's RSS
    while they are all open, and how many failed. Returns (RSS KiB, failures)."""
    async def main():
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(50)        # not more SYNs at once than a listen queue takes
        protos = []

        async def one():
            async with gate:
                async with asyncio.timeout(SESSION_TIMEOUT):
                    protos.append(await connect(loop, greyd.port))

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

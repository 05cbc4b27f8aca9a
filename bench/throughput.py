"""The throughput section: deferred sessions/s and passed messages/s, and latency.

Owns: running the load client against greyd and straight against a sink,
run by run, at each concurrency point; the ratios to the sink, their targets, the
"Throughput and latency" table and beside it greyd's cost per session (CPU,
user and system, and context switches). Must not: judge latency from
smtp-source (it does not report it), or count a session that went wrong.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from bench.client import SENDER_DOMAIN, Run, python_run, smtp_source_run, token
from bench.daemon import Greyd, Switches
from bench.processes import Processes
from bench.report import Report, percentile, progress, spread
from bench.sink import start_sink

# Targets from the issue, as ratios to the sink so that they compare across machines.
TARGET_DEFERRED_RATIO = {"sqlite": 0.40,       # deferred sessions/s at concurrency 100 / sink's,
                         "postgresql": 0.30}    # by greyd's store
TARGET_PASSED_RATIO = 0.09            # passed messages/s / sink's direct rate
COST_HEADINGS = ["figure", "concurrency", "greyd", "CPU µs", "user µs", "system µs",
                 "voluntary switches", "involuntary switches"]


@dataclass
class Point:
    mode: str
    concurrency: int
    runs: dict = field(default_factory=lambda: {"greyd": [], "sink": []})
    latency_runs: dict = field(default_factory=lambda: {"greyd": [], "sink": []})


def throughput(args, procs: Processes, workdir: Path, report: Report, rng: random.Random):
    client = python_run if args.client == "python" else smtp_source_run
    modes = [m for m in ("deferred", "passed") if m in args.only]
    sinks = {"deferred": start_sink(args.sink, True, procs, workdir),
             "passed": start_sink(args.sink, False, procs, workdir)}
    points: list[Point] = []
    try:
        measure_points(args, procs, workdir, report, rng, client, modes, sinks, points)
    finally:
        for sink in sinks.values():
            procs.stop(sink.proc)
    throughput_table(args, points, sinks, report)


def measure_points(args, procs, workdir, report, rng, client, modes, sinks, points) -> None:
    """One greyd per mode, measured at every concurrency point; `points` gets them."""
    accept_sink = sinks["passed"]
    for mode in modes:
        count = args.sessions if mode == "deferred" else args.messages
        limit = max(60.0, count / 20)
        greyd = Greyd(workdir / f"greyd-{mode}", procs, upstream=accept_sink.port,
                      trusted=(mode == "passed"), workers=args.workers,
                      url=args.database.fresh())
        greyd.start()
        try:
            targets = {"greyd": greyd.port, "sink": sinks[mode].port}
            for concurrency in args.concurrency:
                point = Point(mode, concurrency)
                points.append(point)
                measure_point(args, report, rng, client, greyd, targets, point, count, limit)
            report.logged(greyd, mode)
        finally:
            greyd.stop()


def measure_point(args, report, rng, client, greyd, targets, point, count, limit) -> None:
    """A warm-up (not counted), then args.runs runs against greyd and the sink in turn;
    the Python client's latency runs of their own when the client is smtp-source."""
    mode, concurrency = point.mode, point.concurrency
    for name, port in targets.items():      # warm-up: not counted
        warm = min(count, 2 * concurrency)
        python_run(port, mode, concurrency, warm, f"warm-{token(rng)}@{SENDER_DOMAIN}", limit)
    for number in range(args.runs):
        for name, port in targets.items():
            progress(f"{mode} c={concurrency} run {number + 1}/{args.runs}: {name}")
            where = f"{mode} c={concurrency} {name} run {number + 1}"
            sender = f"bench-{token(rng)}@{SENDER_DOMAIN}"
            before = greyd.usage()
            run = client(port, mode, concurrency, count, sender, limit)
            run.greyd_usage = greyd.usage() - before
            run.greyd_cpu = run.greyd_usage.cpu
            point.runs[name].append(run)
            note_errors(report, run, where)
            if client is python_run:
                point.latency_runs[name].append(run)
                continue
            sender = f"bench-{token(rng)}@{SENDER_DOMAIN}"
            run = python_run(port, mode, concurrency, count, sender, limit)
            point.latency_runs[name].append(run)
            note_errors(report, run, f"{where} (python latency client)")


def note_errors(report: Report, run: Run, where: str) -> None:
    """Sessions that did not go as they should: a problem of greyd's (or the sink's),
    reported; the run's figure counts only the sessions that did."""
    if run.errors:
        failed = sum(run.errors.values())
        detail = ", ".join(f"{what} ×{n}" for what, n in run.errors.most_common(3))
        report.anomaly(f"{where}: {failed} of {failed + run.sessions} sessions went wrong "
                       f"({detail})")


def throughput_table(args, points: list[Point], sinks: dict, report: Report) -> None:
    rows, costs = [], []
    data = report.data.setdefault("throughput", [])
    client_name = "python client" if args.client == "python" else "smtp-source"
    for point in points:
        if not all(run.sessions for runs in point.runs.values() for run in runs):
            report.fail(f"{point.mode} c={point.concurrency}: a run completed no session")
            continue
        row, entry = rate_row(point, client_name, report, args.database.store)
        rows.append(row)
        costs += usage_rows(point, row, entry)
        rows += latency_rows(point, entry, report)
        if args.client != "python":
            entry["python_client_rates"] = {name: [run.rate for run in runs]
                                            for name, runs in point.latency_runs.items()}
        data.append(entry)
    report.table("Throughput and latency",
                 ["figure", "concurrency", "greyd", "sink direct", "ratio", "target", ""],
                 rows, legend(args, sinks, client_name))
    if costs:
        report.table("greyd's cost per session", COST_HEADINGS, costs, [
            "Beside each rate above: what greyd's processes used per session in the "
            "same runs (median [min–max]): CPU time in user and in system mode "
            "(/proc/PID/stat), and context switches, voluntary (a thread waited: for "
            "its client, a lock, the GIL) and involuntary (the scheduler took the CPU "
            "from it), counted per thread (/proc/PID/task/*/status) every "
            f"{Switches.POLL:g} s, so a thread that ends between two looks loses "
            "its last moments: the switches err low, never high."])


def rate_row(point: Point, client_name: str, report: Report,
             store: str) -> tuple[list[str], dict]:
    """The point's rates, greyd's and the sink's, and their ratio against its target;
    the table row and the point's JSON entry."""
    rates = {name: [run.rate for run in runs] for name, runs in point.runs.items()}
    ratios = [g / s for g, s in zip(rates["greyd"], rates["sink"])]
    ratio = statistics.median(ratios)       # greyd and sink runs alternate: pairs
    what = "deferred sessions/s" if point.mode == "deferred" else "passed messages/s (1 KiB)"
    deferred = point.mode == "deferred"
    bound = (TARGET_DEFERRED_RATIO[store] if deferred and point.concurrency == 100
             else TARGET_PASSED_RATIO if point.mode == "passed" else None)
    cells = ["", ""]
    if bound is not None:
        target = report.target(f"{what} at concurrency {point.concurrency}", ratio, bound,
                               at_most=False)
        cells = [target.text, target.verdict]
    row = [what, str(point.concurrency), spread(rates["greyd"]), spread(rates["sink"]),
           spread(ratios, 2), *cells]
    entry = {"mode": point.mode, "concurrency": point.concurrency, "client": client_name,
             "greyd_rates": rates["greyd"], "sink_rates": rates["sink"], "ratio": ratio,
             "greyd_cpu_ms_per_session": [run.greyd_cpu / run.sessions * 1000
                                          for run in point.runs["greyd"]]}
    return row, entry


def usage_rows(point: Point, rate: list[str], entry: dict) -> list[list[str]]:
    """The point's row of greyd's cost per session (bench.daemon.Usage) in
    its runs, beside `rate` (the point's row of rates), so that a cost
    that grows shows in the numbers and not only in the wall clock; `entry`
    gets the figures."""
    runs = [run for run in point.runs["greyd"] if run.greyd_usage is not None]
    if not runs:
        return []
    per = {name: [getattr(run.greyd_usage, name) / run.sessions for run in runs]
           for name in ("user", "system", "voluntary", "involuntary")}
    user = [v * 1e6 for v in per["user"]]
    system = [v * 1e6 for v in per["system"]]
    total = [u + s for u, s in zip(user, system)]
    entry.update(greyd_cpu_us_per_session=total, greyd_user_us_per_session=user,
                 greyd_system_us_per_session=system,
                 greyd_voluntary_switches_per_session=per["voluntary"],
                 greyd_involuntary_switches_per_session=per["involuntary"])
    return [[*rate[:3], spread(total), spread(user), spread(system),
             spread(per["voluntary"], 2), spread(per["involuntary"], 2)]]


def latency_rows(point: Point, entry: dict, report: Report) -> list[list[str]]:
    """The point's p50 and p99 session latency rows; `entry` gets the figures."""
    rows = []
    for p in (50, 99):
        lat = {name: [percentile(run.latencies, p) * 1000 for run in runs if run.latencies]
               for name, runs in point.latency_runs.items()}
        if not (lat["greyd"] and lat["sink"]):
            report.fail(f"{point.mode} c={point.concurrency}: no latency measured")
            continue
        lat_ratios = [g / s for g, s in zip(lat["greyd"], lat["sink"])]
        kind = "deferred" if point.mode == "deferred" else "passed"
        rows.append([f"{kind} session p{p} ms (python client)", str(point.concurrency),
                     spread(lat["greyd"]), spread(lat["sink"]), spread(lat_ratios, 2),
                     "", ""])
        entry[f"greyd_p{p}_ms"], entry[f"sink_p{p}_ms"] = lat["greyd"], lat["sink"]
    return rows


def legend(args, sinks: dict, client_name: str) -> list[str]:
    """The lines above the table: what was run, how often, and what the ratios mean."""
    lines = [
        f"Loopback; client: {client_name}; sink: {sinks['deferred'].label} for deferred, "
        f"{sinks['passed'].label} for passed (also greyd's upstream).",
        f"{args.runs} run(s) per point of {args.sessions:,} deferred sessions / "
        f"{args.messages:,} messages each; median [min–max]. greyd's store: "
        f"{args.database.label}.",
        "ratio = greyd ÷ sink direct, run by run (rates: higher is better; latencies: "
        "lower is better). Latencies come from the Python client"
        + (" in runs of its own." if args.client != "python" else "."),
    ]
    if args.client == "python":
        lines.append("The Python client is slower than smtp-source (about 0.7× its rate "
                     "against smtp-sink): against the sink it may be the bottleneck, so "
                     "these ratios flatter greyd.")
    else:
        lines.append("smtp-source's deferred dialogue: HELO, MAIL, RCPT 4xx, RSET, QUIT "
                     "(the Python client's: EHLO, MAIL, RCPT 4xx, QUIT).")
    return lines

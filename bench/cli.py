"""The benchmark's command line: options, the header, the sections, the summary.

Owns: parsing and checking the options (and their --quick defaults), the
open-file limit, greyd's store for the run (bench.database), the header,
running each wanted section so that one failing
does not stop the others, the summary, the --json file and the exit status;
and the hidden --serve-sink mode the Python sink runs in. Must not: measure
anything itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from pathlib import Path

from bench.daemon import greyd_command, workers_value
from bench.database import GET_POSTGRESQL, POSTGRESQL, SQLITE, Database
from bench.memory import memory
from bench.postgrey import GET_POSTGREY
from bench.processes import BenchError, Processes, run_bounded, tool
from bench.replay import replay_section
from bench.report import Report, sig
from bench.sink import serve_sink
from bench.store import store_section
from bench.throughput import throughput
from bench.tls import tls_section

SECTIONS = ("deferred", "passed", "tls", "memory", "store", "replay")
GET_POSTFIX = ("echo 'postfix postfix/main_mailer_type select No configuration'"
               " | sudo debconf-set-selections && sudo DEBIAN_FRONTEND=noninteractive"
               " apt-get install -y postfix   # no daemon needs to run")
# Counts left unset: (default, --quick default).
DEFAULTS = {"runs": (3, 2), "sessions": (10_000, 300), "messages": (5_000, 200),
            "idle": (1_000, 100), "triplets": (1_000_000, 10_000), "decisions": (4_000, 500)}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark greyd against Postfix's smtp-source/smtp-sink on loopback "
                    "(or a pure-Python client and sink when they are missing).",
        epilog="Get smtp-source and smtp-sink (Debian/Ubuntu):\n  " + GET_POSTFIX
               + "\nGet postgrey, for the tls section's Postfix + postgrey (run as root):\n  "
               + GET_POSTGREY + "\nGet PostgreSQL, for --store postgresql:\n  "
               + GET_POSTGRESQL)
    add_size_options(parser)
    add_run_options(parser)
    return parser


def add_size_options(parser: argparse.ArgumentParser) -> None:
    """What is measured, and how much."""
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: tiny counts, seconds in all (CI); figures mean nothing")
    parser.add_argument("--only",
                        help="comma-separated sections: deferred,passed,tls,memory,store,replay "
                             "(default: all; --quick leaves replay out, whose zeros are "
                             "results, not failed measurements)")
    parser.add_argument("--runs", type=int, help="runs per point (default 3; --quick 2)")
    parser.add_argument("--concurrency", default="20,100",
                        help="comma-separated concurrency points (default 20,100)")
    parser.add_argument("--sessions", type=int,
                        help="deferred sessions per run, plaintext or over STARTTLS "
                             "(default 10000; --quick 300)")
    parser.add_argument("--messages", type=int,
                        help="passed messages per run (default 5000; --quick 200)")
    parser.add_argument("--idle", type=int,
                        help="idle connections held for the memory figure (default 1000; "
                             "--quick 100)")
    parser.add_argument("--triplets", type=int,
                        help="triplets in the store section (default 1000000; --quick 10000)")
    parser.add_argument("--decisions", type=int,
                        help="decisions timed (default 4000; --quick 500)")
    parser.add_argument("--stall-clients", type=int, default=1,
                        help="clients sending RCPTs while cleanup runs (default 1: the "
                             "stall is then cleanup's alone)")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Which greyd, client and sink; what is kept; the Python sink's own mode."""
    parser.add_argument("--workers", default="auto", type=workers_value,
                        help='greyd\'s server.workers: "auto" (two per CPU, the setting a '
                             'busy MX uses) or a number (default auto)')
    parser.add_argument("--tls-workers", default=1, type=workers_value,
                        help="greyd's server.workers in the tls section (default 1, greyd's "
                             "own default: on a small machine the client's TLS work shares "
                             "the cores, and workers pinned two per core fight it for them)")
    parser.add_argument("--client", choices=("auto", "postfix", "python"), default="auto",
                        help="load client: smtp-source, or the Python client (default: "
                             "smtp-source when installed)")
    parser.add_argument("--sink", choices=("auto", "postfix", "python"), default="auto",
                        help="sink: smtp-sink, or the Python sink (default: smtp-sink when "
                             "installed)")
    parser.add_argument("--store", choices=(SQLITE, POSTGRESQL),
                        help="greyd's store in every section but replay (which always runs "
                             "on SQLite: its clock is simulated): sqlite (default), a database "
                             "file per greyd; or postgresql: unless --database-url is given, "
                             "the bench runs a throwaway PostgreSQL server of its own "
                             "(Debian's binaries, /usr/lib/postgresql/*/bin: initdb in a "
                             "temporary directory, as nobody when run as root, on 127.0.0.1 "
                             "and a free port, PostgreSQL's default durability, fsync on) "
                             "and removes it at the end")
    parser.add_argument("--database-url", metavar="URL",
                        help="PostgreSQL database to use instead of a server of the bench's "
                             "own (implies --store postgresql). greyd's tables in it are "
                             "DROPPED before each greyd starts: give it a scratch database")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the store's data")
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configs, logs, databases)")
    parser.add_argument("--serve-sink", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--defer", action="store_true", help=argparse.SUPPRESS)


def parse_args(argv=None):
    """The options, with --quick's defaults filled in and every one checked."""
    options = parser()
    args = options.parse_args(argv)
    for name, (full, small) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, small if args.quick else full)
        if getattr(args, name) < 1:
            options.error(f"--{name} must be at least 1")
    if args.stall_clients < 1:
        options.error("--stall-clients must be at least 1")
    args.baseline = 0.5 if args.quick else 2.0
    args.cleanup_timeout = 120.0 if args.quick else max(600.0, args.triplets / 500)
    if args.only is None:
        args.only = ",".join(s for s in SECTIONS if not (args.quick and s == "replay"))
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    if not args.only or args.only - set(SECTIONS):
        options.error(f"--only takes some of: {','.join(SECTIONS)}")
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        options.error("--concurrency takes numbers: 20,100")
    if any(c < 1 or c > 1000 for c in args.concurrency):
        options.error("--concurrency: each from 1 to 1000")
    choose_tools(args, options)
    if args.database_url and args.store == SQLITE:
        options.error("--database-url is PostgreSQL's: it goes with --store postgresql")
    args.store = args.store or (POSTGRESQL if args.database_url else SQLITE)
    return args


def choose_tools(args, options: argparse.ArgumentParser) -> None:
    """--client and --sink: "auto" becomes postfix when its tool is installed."""
    for kind in ("client", "sink"):
        name = "smtp-source" if kind == "client" else "smtp-sink"
        if getattr(args, kind) == "auto":
            setattr(args, kind, "postfix" if tool(name) else "python")
        elif getattr(args, kind) == "postfix" and not tool(name):
            options.error(f"{name} not found; get it with:\n  {GET_POSTFIX}")


def raise_nofile(wanted: int) -> int:
    """Raise this process's (and so its children's) open-file limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


def header(args, database: Database) -> None:
    try:
        import greyd
        version = getattr(greyd, "__version__", "?")
    except ImportError:
        version = "not importable"
    postfix = "not installed"
    if tool("smtp-source"):
        status, out, _, _ = run_bounded([tool("postconf"), "-d", "-h", "mail_version"], 10) \
            if tool("postconf") else (1, "", "", 0)
        postfix = f"Postfix {out.strip()}" if status == 0 and out.strip() else "installed"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print("# greyd benchmark\n")
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} · {platform.node()} · "
          f"{os.cpu_count()} CPUs · Linux {platform.release()} · Python "
          f"{platform.python_version()}  ")
    print(f"greyd {version} ({' '.join(greyd_command())}) · smtp-source/smtp-sink: "
          f"{postfix} · greyd server.workers = {args.workers} · load average at start: {load}"
          + f"  \ngreyd's store: {database.label}"
          + ("  \nQUICK (smoke mode: the figures mean nothing)" if args.quick else ""))
    if args.client == "python" or args.sink == "python":
        print(f"\nsmtp-source/smtp-sink not used: the pure-Python client/sink stand in. "
              f"For the reference figures get them with:\n  {GET_POSTFIX}")
    sys.stdout.flush()


def main(argv=None) -> int:
    """scripts/bench: the exit status (130 when interrupted)."""
    try:
        return run(parse_args(argv))
    except KeyboardInterrupt:
        print("\ninterrupted; everything started was stopped", file=sys.stderr)
        return 130


def run(args) -> int:
    """The wanted sections, the summary; 1 if a measurement failed, else 0."""
    if args.serve_sink:
        serve_sink(args.serve_sink, args.defer)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    nofile = raise_nofile(max(4096, args.idle * 2 + 512))
    if nofile < args.idle + 256:
        args.idle = max(1, nofile - 256)
    report = Report()
    rng = random.Random(args.seed)
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="greyd-bench-"))
    sections = [("deferred" in args.only or "passed" in args.only, throughput),
                ("tls" in args.only, tls_section), ("memory" in args.only, memory),
                ("store" in args.only, store_section), ("replay" in args.only, replay_section)]
    try:
        with ExitStack() as stack:
            stack.callback(procs.stop_all)
            try:
                args.database = Database.open(args, workdir, stack)
            except (BenchError, OSError, RuntimeError) as error:
                print(f"scripts/bench: greyd's store: {error}", file=sys.stderr)
                return 1
            header(args, args.database)
            report.data["database"] = args.database.as_json()
            for wanted, section in sections:
                if wanted:
                    run_section(section, args, procs, workdir, report, rng)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summarize(args, report)
    if args.keep:
        print(f"(temporary files kept in {workdir})")
    return 1 if report.failures else 0


def run_section(section, args, procs, workdir, report, rng) -> None:
    """One section; its failure goes in the report and the next section runs."""
    try:
        section(args, procs, workdir, report, rng)
    except (BenchError, OSError, sqlite3.Error) as error:
        report.fail(f"{section.__name__}: {error}")
    except Exception as error:     # e.g. greyd's API changed under us
        traceback.print_exc()
        report.fail(f"{section.__name__}: {type(error).__name__}: {error}")


def summarize(args, report: Report) -> None:
    """Problems seen, the targets met and missed; the --json file."""
    if report.anomalies or report.failures:
        print("\n## Problems seen\n")
        for failure in report.failures:
            print(f"- FAILED: {failure}")
        for anomaly in report.anomalies:
            print(f"- {anomaly}")
    met = [t for t in report.targets if t.met]
    missed = [t for t in report.targets if not t.met]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    line = f"\nsummary: {len(met)} of {len(report.targets)} targets met"
    if missed:
        line += "; MISS: " + "; ".join(f"{t.name} ({sig(t.value)}, target {t.text})"
                                       for t in missed)
    if report.anomalies:
        line += f"; {len(report.anomalies)} problem(s) seen in greyd (see above)"
    if report.failures:
        line += f"; {len(report.failures)} measurement(s) FAILED (see above)"
    print(line + f" · load average at end: {load}")
    if args.json:
        report.data["targets"] = [{"name": t.name, "value": t.value, "bound": t.bound,
                                   "at_most": t.at_most, "met": t.met} for t in report.targets]
        report.data["failures"] = report.failures
        report.data["problems"] = report.anomalies
        Path(args.json).write_text(json.dumps(report.data, indent=2) + "\n")

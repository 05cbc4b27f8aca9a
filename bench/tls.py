"""The TLS section: greyd against Postfix + postgrey, deferred sessions over STARTTLS.

Owns: the reference MX (a private Postfix whose smtpd greylists through a
private postgrey, `smtpd_tls_security_level = may`, relaying to the same sink
as greyd), a greyd offering STARTTLS with the same certificate, runs of the
same client against both in turn at concurrency 100 (plaintext with the
bench's client; STARTTLS, TLS 1.3 and a full handshake per session, with the
Python client), the CPU each side spent per session, the ratio's target and
the "TLS" table. Must not: measure anything against one of them alone, or
resume a TLS session.
"""

from __future__ import annotations

import functools
import random
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from bench import postfix
from bench.certificate import Certificate, client_context, make_certificate
from bench.client import DOMAIN, SENDER_DOMAIN, Run, python_run, smtp_source_run, token
from bench.daemon import Greyd
from bench.postgrey import GET_POSTGREY, postgrey_path, start_postgrey
from bench.processes import HOST, Processes, free_port, run_bounded, tool, tree_cpu_seconds
from bench.report import Report, progress, spread
from bench.sink import start_sink

CONCURRENCY = 100
TARGET_TLS_RATIO = 1.5        # greyd's deferred sessions/s over STARTTLS ÷ Postfix + postgrey's
GREYD, REFERENCE = "greyd", "Postfix + postgrey"
NOT_MEASURED = "not measured"


@dataclass
class Contender:
    """A server measured: where it listens, and the CPU seconds it has spent so far."""

    name: str
    port: int
    cpu: Callable[[], float]


@dataclass
class Way:
    """One way of running the dialogue: its label, its client, and the runs per contender."""

    label: str
    client: Callable[..., Run]
    client_name: str
    targeted: bool = False                           # its ratio has the TLS target
    runs: dict = field(default_factory=dict)         # contender name -> [Run]
    server_cpu: dict = field(default_factory=dict)   # contender name -> [CPU s of the server]
    client_cpu: dict = field(default_factory=dict)   # contender name -> [CPU s of the client]


def reference_missing() -> str:
    """Why Postfix + postgrey cannot run here ("" when it can)."""
    if postfix.unavailable():
        return postfix.unavailable()
    if not postgrey_path():
        return f"postgrey is not installed; get it with:\n  {GET_POSTGREY}"
    return ""


def postfix_version() -> str:
    """Postfix's version, as its postconf tells it ("?" when it cannot)."""
    if not tool("postconf"):
        return "?"
    status, out, _, _ = run_bounded([tool("postconf"), "-d", "-h", "mail_version"], 10)
    return out.strip() if status == 0 else "?"


def tls_section(args, procs: Processes, workdir: Path, report: Report,
                rng: random.Random) -> None:
    """The tls section: greyd and (where they can run) Postfix + postgrey started,
    measured in turn plaintext and over STARTTLS, stopped; then the table."""
    certificate = make_certificate(workdir / "certificate")
    context = client_context()
    plain = smtp_source_run if args.client == "postfix" else python_run
    ways = [Way("plaintext", plain, "smtp-source" if args.client == "postfix" else "python"),
            Way("STARTTLS (TLS 1.3, full handshake)", functools.partial(python_run, tls=context),
                "python", targeted=True)]
    missing = reference_missing()
    sink = start_sink(args.sink, False, procs, workdir)      # accepts: both relay here
    try:
        with ExitStack() as stack:
            greyd, contenders = start_contenders(args, procs, workdir, stack, sink.port,
                                                 certificate, missing)
            measure(args, report, rng, contenders, ways)
            report.logged(greyd, "tls")
    finally:
        procs.stop(sink.proc)
    tls_table(args, report, ways, sink.label, missing)


def start_contenders(args, procs, workdir, stack, sink_port, certificate, missing):
    """greyd, and Postfix + postgrey unless `missing`, all stopped by `stack`:
    (greyd, the contenders)."""
    greyd = Greyd(workdir / "greyd-tls", procs, upstream=sink_port, trusted=False,
                  workers=args.tls_workers, url=args.database.fresh(), tls=certificate)
    greyd.start()
    stack.callback(greyd.stop)
    contenders = [Contender(GREYD, greyd.port, greyd.cpu_seconds)]
    if missing:
        return greyd, contenders
    policy_port, policy = start_postgrey(procs, workdir)
    stack.callback(procs.stop, policy)
    mta = reference_postfix(workdir, sink_port, policy_port, certificate)
    stack.callback(mta.remove)
    mta.start()
    contenders.append(Contender(REFERENCE, mta.smtpd[1],
                                lambda: tree_cpu_seconds(mta.pid) + tree_cpu_seconds(policy.pid)))
    return greyd, contenders


def reference_postfix(workdir: Path, sink_port: int, policy_port: int,
                      certificate: Certificate) -> postfix.Postfix:
    """A Postfix MX as postgrey's README sets one up, offering STARTTLS with greyd's
    certificate and relaying the bench's domain to the sink. The bench's client
    (127.0.0.1) is not in mynetworks, so it is greylisted as greyd greylists it,
    and exempt from the per-client connection limits, as greyd's bench config is."""
    return postfix.Postfix("bench-mx", smtpd=(HOST, free_port()), main={
        "mynetworks": "127.0.0.2/32",
        "relay_domains": DOMAIN,
        "relayhost": f"[{HOST}]:{sink_port}",
        "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination, "
                                        f"check_policy_service inet:{HOST}:{policy_port}",
        "smtpd_client_event_limit_exceptions": "127.0.0.0/8",
        "default_process_limit": str(2 * CONCURRENCY),
        "smtpd_tls_security_level": "may",
        "smtpd_tls_loglevel": "0",          # Postfix's default: no log line per handshake
        "smtpd_tls_cert_file": str(certificate.cert),
        "smtpd_tls_key_file": str(certificate.key),
    })


def measure(args, report: Report, rng: random.Random, contenders: list[Contender],
            ways: list[Way]) -> None:
    """A warm-up per contender and way, then args.runs rounds: each way against each
    contender in turn, so both see the same machine."""
    limit = max(60.0, args.sessions / 20)
    for way in ways:
        for contender in contenders:
            for kept in (way.runs, way.server_cpu, way.client_cpu):
                kept[contender.name] = []
            way.client(contender.port, "deferred", CONCURRENCY, min(args.sessions, 200),
                       f"warm-{token(rng)}@{SENDER_DOMAIN}", limit)
    for number in range(args.runs):
        for way in ways:
            for contender in contenders:
                progress(f"tls: {way.label} run {number + 1}/{args.runs}: {contender.name}")
                sender = f"bench-{token(rng)}@{SENDER_DOMAIN}"
                server, client = contender.cpu(), time.process_time()
                run = way.client(contender.port, "deferred", CONCURRENCY, args.sessions,
                                 sender, limit)
                way.server_cpu[contender.name].append(contender.cpu() - server)
                way.client_cpu[contender.name].append(time.process_time() - client)
                way.runs[contender.name].append(run)
                if run.errors:
                    failed = sum(run.errors.values())
                    detail = ", ".join(f"{w} ×{n}" for w, n in run.errors.most_common(3))
                    report.anomaly(f"tls: {way.label}, {contender.name} run {number + 1}: "
                                   f"{failed} of {failed + run.sessions} sessions went wrong "
                                   f"({detail})")


def tls_table(args, report: Report, ways: list[Way], sink_label: str, missing: str) -> None:
    rows, data = [], []
    for way in ways:
        if not all(run.sessions for runs in way.runs.values() for run in runs):
            report.fail(f"tls: {way.label}: a run completed no session")
            continue
        rows += way_rows(way, report, data)
    report.data["tls"] = data
    legend = [
        f"Deferred sessions (fresh triplets) at concurrency {CONCURRENCY}, on loopback; "
        f"{args.runs} run(s) of {args.sessions:,} sessions per point, median [min–max]; "
        "greyd and Postfix + postgrey in turn, with the same client and certificate; "
        f"greyd with server.workers = {args.tls_workers} (--tls-workers).",
        f"Postfix + postgrey: a private Postfix {postfix_version()}, its smtpd "
        "`check_policy_service` to a private postgrey (delay 300 s), "
        "`smtpd_tls_security_level = may`. Both relay to the "
        f"same {sink_label} (which deferred sessions never reach).",
        "STARTTLS: EHLO, STARTTLS, a full TLS 1.3 handshake (no resumption), EHLO, MAIL, "
        "RCPT 4xx, QUIT, with the Python client. CPU ms per session: greyd's master and "
        "workers; Postfix's master and every child, plus postgrey; the client's own.",
        "ratio = greyd ÷ Postfix + postgrey, run by run (sessions/s: higher is better "
        "for greyd; CPU: lower is).",
    ]
    if missing:
        legend.append(f"Postfix + postgrey not measured: {missing}")
    report.table("TLS: greyd against Postfix + postgrey",
                 ["figure", "client", GREYD, REFERENCE, "ratio", "target", ""], rows, legend)


def way_rows(way: Way, report: Report, data: list) -> list[list[str]]:
    """A way's rows: sessions/s (the ratio with its target over STARTTLS), server CPU
    and (Python client) client CPU per session, each greyd ÷ Postfix + postgrey run
    by run; `data` gets the way's JSON entry."""
    figures = {"deferred sessions/s": {name: [run.rate for run in runs]
                                       for name, runs in way.runs.items()},
               "server CPU ms per session": {
                   name: [cpu / run.sessions * 1000 for cpu, run in zip(way.server_cpu[name], runs)]
                   for name, runs in way.runs.items()}}
    if way.client_name == "python":
        figures["client CPU ms per session"] = {
            name: [cpu / run.sessions * 1000 for cpu, run in zip(way.client_cpu[name], runs)]
            for name, runs in way.runs.items()}
    entry = {"way": way.label, "client": way.client_name, "concurrency": CONCURRENCY}
    rows = []
    for what, values in figures.items():
        entry[what] = values
        row = [f"{way.label}: {what}", way.client_name, spread(values[GREYD])]
        if REFERENCE not in values:
            rows.append(row + [NOT_MEASURED, NOT_MEASURED, "", ""])
            continue
        ratios = [g / r for g, r in zip(values[GREYD], values[REFERENCE])]
        entry[f"{what} ratio"] = statistics.median(ratios)
        cells = ["", ""]
        if way.targeted and what == "deferred sessions/s":
            target = report.target(f"deferred sessions/s over STARTTLS at concurrency "
                                   f"{CONCURRENCY}, greyd ÷ Postfix + postgrey",
                                   statistics.median(ratios), TARGET_TLS_RATIO, at_most=False)
            cells = [target.text, target.verdict]
        rows.append(row + [spread(values[REFERENCE]), spread(ratios, 2), *cells])
    data.append(entry)
    return rows

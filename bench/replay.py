"""The replay section: kinds of sender replayed against a real greyd, time compressed.

Owns: the sender kinds (one table, KINDS), their schedules and zones; real SMTP
sessions over loopback to a greyd in this process whose clock is set to each
session's time (never slept through); an aiosmtpd upstream keeping what greyd
relayed; the per-kind table. Must not: sleep for a delay, leave loopback (IPv4
clients bind to 127.x.y.z: the pool's in 127.16.0.0/12, the others' /24 after
/24 in 127.64.0.0/10; IPv6 is ::1), or read greyd's store. greyd: delay 5m,
retry_window 2d, auto_whitelist_after 0 (off: the figures come from triplets
alone, not from which message first earned an auto-whitelisting).

Schedules, in offsets from a message's first attempt (a random time in the
first hour). "postfix" is Postfix's qmgr: a deferred message waits its age in
the queue clamped to minimal_backoff_time 300 s .. maximal_backoff_time 4000 s,
then goes at the next deferred-queue scan (queue_run_delay 300 s, a random
phase per message): 0, 300-600, 600-1200, 1200-2400, 2400-4800, then every
4000-4300 s. "every": a fixed interval plus random jitter. A legitimate sender
gives up after retry_window, a bot when its schedule ends (`gives_up`).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import ipaddress
import json
import logging.handlers
import math
import random
import smtplib
import socket
import statistics
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench.dnsserver import DnsServer
from bench.report import Report, percentile, progress

START = 1_700_000_000.0
DAY = 86400.0
WINDOW = 2 * DAY                  # greylist.retry_window: a legitimate sender gives up then
DOMAIN = "example.org"            # the relayed recipient domain
HOSTNAME = "mx.greyd.test"        # greyd's own name (a bot may claim it in its HELO)
TRUSTED = "192.0.2.1/32"          # relay.clients: no session comes from it
POOL_NETS = ipaddress.IPv4Network("127.16.0.0/12")
FRESH_NETS = ipaddress.IPv4Network("127.64.0.0/10")
MIN_BACKOFF, MAX_BACKOFF, QUEUE_RUN = 300.0, 4000.0, 300.0     # Postfix's defaults
SESSION_TIMEOUT = 10.0            # seconds (real) one SMTP exchange may take
BOT_HELOS = ("desktop", "[10.11.12.13]", HOSTNAME, "user-pc")


@dataclass(frozen=True)
class Kind:
    """A kind of sender. `hosts` in `nets` /24s (nets 0: a new /24 every attempt;
    "dual": an IPv4 host and ::1 in turn); `spf`: "pass" (a record covering the
    hosts), "fail" ("-all") or None (no record); `named`: verified static
    reverse names, given as HELO too."""

    name: str
    messages: int
    schedule: str                   # "postfix" or "every"
    domain: str
    hosts: int | str = 1
    nets: int = 1
    spf: str | None = None
    named: bool = False
    every: float = 300.0
    jitter: float = 30.0
    gives_up: float = WINDOW
    rcpts: int = 1
    bot: bool = False


KINDS = (
    Kind("one-mta", 4, "postfix", "onemta.test", named=True),
    Kind("one-net", 4, "postfix", "smallnet.test", hosts=4),
    Kind("pool", 10, "every", "bigmail.test", hosts=200, nets=169, spf="pass", named=True),
    Kind("dual-stack", 4, "every", "dual.test", hosts="dual", spf="pass", named=True),
    Kind("bot-once", 5, "every", "cheap-pills.test", nets=0, gives_up=0, rcpts=2, bot=True),
    Kind("bot-early", 4, "every", "fast-loans.test", every=60, jitter=0, gives_up=240,
         rcpts=2, bot=True),
    Kind("botnet", 4, "postfix", "botnet.test", nets=0, spf="fail", gives_up=DAY, bot=True),
)


@dataclass(frozen=True)
class Host:
    address: str
    name: str | None = None         # verified reverse name (PTR, and A/AAAA back)


@dataclass
class KindResult:
    """What became of one kind's mail."""

    messages: int = 0
    delivered: int = 0              # messages whose every recipient was delivered
    delays: list[float] = field(default_factory=list)     # first attempt to delivery, s
    deferrals: list[int] = field(default_factory=list)    # per message: sessions with a 451
    sessions: int = 0
    accepted: int = 0               # RCPTs greyd answered 250
    upstream_rcpts: int = 0         # RCPTs the upstream saw
    upstream_messages: int = 0      # messages the upstream accepted
    duplicates: int = 0             # recipients the upstream got more than once
    errors: int = 0                 # sessions that broke off (no reply, 421, 5xx)

    def delay(self, p: float) -> float | None:
        return percentile(self.delays, p) if self.delays else None

    def figures(self) -> dict:
        return {**dataclasses.asdict(self), "delay_p50": self.delay(50),
                "delay_p90": self.delay(90), "delay_max": self.delay(100),
                "deferrals_median": statistics.median(self.deferrals),
                "deferrals_max": max(self.deferrals)}


@dataclass
class Message:
    kind: Kind
    sources: list[Host]
    sender: str
    rcpts: list[str]
    times: list[float]              # the attempts, on the compressed clock
    pending: list[str]              # recipients still to send to
    deferrals: int = 0
    delivered: int = 0              # recipients delivered
    delivered_at: float | None = None


def letters(n: int) -> str:
    """0 -> "a", 26 -> "aa": no digits (greyd folds digits in a sender to "#")."""
    out = ""
    while n >= 0:
        out, n = chr(97 + n % 26) + out, n // 26 - 1
    return out


def schedule(kind: Kind, rng: random.Random) -> list[float]:
    """The offsets of one message's attempts from its first (see the module's docstring)."""
    times, phase = [0.0], rng.uniform(0, QUEUE_RUN)
    while True:
        t, due = times[-1], times[-1] + min(max(times[-1], MIN_BACKOFF), MAX_BACKOFF)
        t = (phase + math.ceil((due - phase) / QUEUE_RUN) * QUEUE_RUN
             if kind.schedule == "postfix" else t + kind.every + rng.uniform(0, kind.jitter))
        if t > kind.gives_up:
            return times
        times.append(t)


def hosts_of(kind: Kind, nets: Iterator[ipaddress.IPv4Network],
             rng: random.Random) -> list[Host]:
    """A kind's hosts ([] when it takes a new /24 every attempt): the pool's
    /24s drawn from POOL_NETS, every other kind's the next of `nets`."""
    if kind.nets == 0:
        return []
    if kind.hosts == "dual":
        return [Host(str(next(nets)[25]), f"mail.{kind.domain}"),
                Host("::1", f"mail.{kind.domain}")]
    chosen = (rng.sample(list(POOL_NETS.subnets(new_prefix=24)), kind.nets)
              if kind.nets > 1 else [next(nets)])
    addresses: set[str] = set()
    while len(addresses) < kind.hosts:      # one in each /24, then anywhere among them
        net = chosen[len(addresses)] if len(addresses) < len(chosen) else rng.choice(chosen)
        addresses.add(str(net[rng.randrange(1, 255)]))
    ordered = sorted(addresses, key=ipaddress.ip_address)
    names = ([f"mail.{kind.domain}"] if len(ordered) == 1 else
             [f"mail-{letters(i)}.out.{kind.domain}" for i in range(len(ordered))])
    return [Host(a, name if kind.named else None) for a, name in zip(ordered, names)]


def spf_record(kind: Kind, hosts: list[Host]) -> str | None:
    """The TXT record at the kind's domain, or None."""
    if kind.spf != "pass":
        return "v=spf1 -all" if kind.spf == "fail" else None
    mechanisms = [f"ip4:{POOL_NETS}"] if kind.nets > 1 else [
        f"ip6:{h.address}/128" if ":" in h.address
        else f"ip4:{ipaddress.ip_network(h.address + '/24', strict=False)}" for h in hosts]
    return "v=spf1 " + " ".join(mechanisms) + " -all"


def publish(server: DnsServer, kind: Kind, hosts: list[Host]) -> None:
    """The kind's SPF record; PTR and A/AAAA for its named hosts."""
    record = spf_record(kind, hosts)
    if record is not None:
        server.add(kind.domain, "TXT", json.dumps(record))
    for host in hosts:      # each name has one address of each family
        if host.name is not None:
            server.add(ipaddress.ip_address(host.address).reverse_pointer, "PTR", host.name + ".")
            server.add(host.name, "AAAA" if ":" in host.address else "A", host.address)


def messages_of(kinds, server: DnsServer, rng: random.Random) -> list[Message]:
    """Every kind's messages, their sources published in the zones."""
    base = int(FRESH_NETS.network_address)
    out, nets = [], (ipaddress.IPv4Network((base + n * 256, 24)) for n in itertools.count())
    for kind in kinds:
        hosts = hosts_of(kind, nets, rng)
        publish(server, kind, hosts)
        for i in range(kind.messages):
            first = START + rng.uniform(0, 3600)
            times = [first + offset for offset in schedule(kind, rng)]
            sources = hosts or [Host(str(next(nets)[rng.randrange(1, 255)]))
                                for _ in times]
            rcpts = [f"{kind.name}-{letters(i)}-{letters(r)}@{DOMAIN}"
                     for r in range(kind.rcpts)]
            out.append(Message(kind, sources, f"{letters(i)}@{kind.domain}", rcpts, times,
                               list(rcpts)))
    return out


class Capture:
    """The upstream MTA's handler (aiosmtpd): keeps every RCPT and message it got."""

    def __init__(self):
        self.rcpts: list[str] = []                  # read once the server has stopped
        self.messages: list[list[str]] = []         # each message's recipients

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.rcpts.append(address.lower())
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append([a.lower() for a in envelope.rcpt_tos])
        return "250 2.0.0 OK queued"


def greyd_config(root: Path, upstream: int, nameserver: str, overrides: dict) -> Path:
    """greyd's config file under `root`: the module's settings, then `overrides`
    ({section: {key: value}})."""
    sections = {
        "server": {"listen": ["127.0.0.1:0", "[::1]:0"], "hostname": HOSTNAME,
                   "command_timeout": 10, "pidfile": str(root / "greyd.pid")},
        "upstream": {"host": "127.0.0.1", "port": upstream},
        "relay": {"domains": [DOMAIN], "clients": [TRUSTED]},
        "greylist": {"delay": "5m", "retry_window": "2d", "auto_whitelist_after": 0},
        "dns": {"enabled": True, "nameservers": [nameserver], "timeout": "1s"},
        "log": {"file": ""}, "database": {"path": str(root / "greyd.db")},
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    path = root / "etc" / "greyd.toml"
    path.parent.mkdir(parents=True)
    path.write_text("".join(f"[{section}]\n" + "".join(
        f"{key} = {json.dumps(value)}\n" for key, value in values.items())
        for section, values in sections.items()))
    return path


def session(ports, host: Host, helo: str, message: Message) -> tuple[list[int], int | None]:
    """One real SMTP session: EHLO, MAIL, a RCPT per pending recipient, DATA
    when one was accepted, QUIT. The RCPT codes and DATA's code (None: no DATA)."""
    family = socket.AF_INET6 if ":" in host.address else socket.AF_INET
    body = (f"From: {message.sender}\r\nTo: {message.pending[0]}\r\n"
            f"Subject: replay {message.kind.name}\r\n\r\nHello.\r\n")
    with smtplib.SMTP("::1" if family == socket.AF_INET6 else "127.0.0.1", ports[family],
                      timeout=SESSION_TIMEOUT, source_address=(host.address, 0)) as client:
        if client.ehlo(helo)[0] != 250 or client.mail(message.sender)[0] != 250:
            return [], None
        codes = [client.rcpt(rcpt)[0] for rcpt in message.pending]
        try:
            return codes, client.data(body)[0] if 250 in codes else None
        except smtplib.SMTPDataError as error:      # refused at DATA, before the message
            return codes, error.smtp_code


def attempt(ports, message: Message, n: int, now: float, rng, result: KindResult) -> bool:
    """The message's n-th attempt at `now`, from its kind's next host; True when
    it needs another. A recipient refused (5xx) is dropped: never delivered."""
    kind, sources = message.kind, message.sources
    in_turn = kind.nets == 0 or kind.hosts == "dual"
    host = sources[n % len(sources)] if in_turn else rng.choice(sources)
    helo = rng.choice(BOT_HELOS) if kind.bot else host.name or f"mail.{kind.domain}"
    result.sessions += 1
    try:
        codes, data = session(ports, host, helo, message)
    except (OSError, smtplib.SMTPException):
        codes, data = [], None
    result.accepted += codes.count(250)
    message.deferrals += 451 in codes
    result.errors += not codes or max(codes) >= 500 or data not in (None, 250)
    passed = [code == 250 and data == 250 for code in codes]
    message.delivered += sum(passed)
    message.pending = [rcpt for rcpt, code, gone in zip(message.pending, codes, passed)
                       if not gone and code < 500] if codes else message.pending
    if message.delivered == len(message.rcpts):
        message.delivered_at = now
    return bool(message.pending)


def run(ports, messages: list[Message], clock: list[float], rng, results) -> None:
    """Every attempt of every message in time order, greyd's clock (clock[0]) set to each."""
    queue = [(m.times[0], i, 0) for i, m in enumerate(messages)]
    heapq.heapify(queue)
    while queue:
        now, i, n = heapq.heappop(queue)
        clock[0] = now
        message = messages[i]
        if attempt(ports, message, n, now, rng, results[message.kind.name]) \
                and n + 1 < len(message.times):
            heapq.heappush(queue, (message.times[n + 1], i, n + 1))


def tally(messages: list[Message], capture: Capture, results: dict[str, KindResult]) -> None:
    """Per kind: delivered, delays, deferrals, and what the upstream saw of it."""
    owner = {rcpt: m for m in messages for rcpt in m.rcpts}      # lower case already
    for message in messages:
        result = results[message.kind.name]
        result.messages += 1
        result.deferrals.append(message.deferrals)
        if message.delivered_at is not None:
            result.delivered += 1
            result.delays.append(message.delivered_at - message.times[0])
    for rcpt in capture.rcpts:
        results[owner[rcpt].kind.name].upstream_rcpts += 1
    for rcpts in capture.messages:
        results[owner[rcpts[0]].kind.name].upstream_messages += 1
    for rcpt, count in Counter(r for rcpts in capture.messages for r in rcpts).items():
        results[owner[rcpt].kind.name].duplicates += count - 1


def replay(config_overrides: dict | None = None, kinds=KINDS, seed: int = 1,
           problems: list[str] | None = None) -> dict[str, KindResult]:
    """Replay `kinds` against a new greyd (its config: this module's, then
    `config_overrides`); what became of each kind's mail. greyd's warnings
    and errors go to `problems` when given."""
    from aiosmtpd.controller import Controller
    from greyd import config as configuration, log
    from greyd.context import Context
    from greyd.greylist import Greylister
    from greyd.server import Daemon

    rng, clock, capture = random.Random(seed), [START], Capture()
    results = {kind.name: KindResult() for kind in kinds}
    logger, logged = logging.getLogger(log.LOGGER), logging.handlers.BufferingHandler(10**6)
    logged.setLevel(logging.WARNING)
    with ExitStack() as stack:
        root = stack.enter_context(tempfile.TemporaryDirectory(prefix="greyd-replay-"))
        zones = stack.enter_context(DnsServer())
        messages = messages_of(kinds, zones, rng)
        with socket.create_server(("127.0.0.1", 0)) as probe:     # a free port
            upstream = Controller(capture, hostname="127.0.0.1", port=probe.getsockname()[1])
        config = configuration.load(
            greyd_config(Path(root), upstream.port, zones.address, config_overrides or {}))
        upstream.start()
        stack.callback(upstream.stop)
        logger.addHandler(logged)
        stack.callback(logger.removeHandler, logged)
        daemon = Daemon(Context(config, Greylister.open(config, clock=lambda: clock[0])), grace=1)
        stack.callback(daemon.stop)
        daemon.start()
        ports = {socket.AF_INET6 if ":" in h else socket.AF_INET: p
                 for h, p in daemon.addresses}
        run(ports, messages, clock, rng, results)
    if problems is not None:
        problems.extend(record.getMessage()[:300] for record in logged.buffer)
    tally(messages, capture, results)
    return results


HEADINGS = ["kind", "messages", "delivered", "delay p50 s", "p90 s", "max s",
            "deferrals median", "max", "sessions", "RCPTs accepted", "upstream got"]
LEGEND = ("Real SMTP over loopback, greyd's clock set to each attempt. delay: first attempt "
          "to delivery on it; deferrals: sessions with a 451, per message.")


def table(results: dict[str, KindResult]) -> str:
    """The per-kind table, in Markdown."""
    lines = [HEADINGS, ["---"] + ["---:"] * (len(HEADINGS) - 1)] + [
        [name, str(r.messages), str(r.delivered),
         *("–" if r.delay(p) is None else f"{r.delay(p):,.0f}" for p in (50, 90, 100)),
         f"{statistics.median(r.deferrals):g}", str(max(r.deferrals)), str(r.sessions),
         str(r.accepted), f"{r.upstream_messages} messages"] for name, r in results.items()]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def replay_section(args, procs, workdir: Path, report: Report, rng: random.Random) -> None:
    """The replay section: a table for the default config (client_key ["spf", "network"],
    mode "all"), for triplets keyed by network alone, and for mode "suspicious"."""
    variants = [("default config", {})] + [
        (f"{key} = {json.dumps(value)}", {"greylist": {key: value}}) for key, value in
        (("client_key", ["network"]), ("mode", "suspicious"))]
    bots = {kind.name for kind in KINDS if kind.bot}
    for label, overrides in variants:
        progress(f"replay: {label}")
        problems: list[str] = []
        results = replay(overrides, KINDS, args.seed, problems)
        print(f"\n## Replay: {label}\n\n{LEGEND}\n\n{table(results)}", flush=True)
        report.data.setdefault("replay", {})[label] = {
            name: r.figures() for name, r in results.items()}
        wrong = [f"{name}: {r.errors} sessions broke off; upstream got {r.upstream_rcpts} "
                 f"RCPTs, {r.duplicates} recipients twice" for name, r in results.items()
                 if r.errors or r.duplicates or (r.upstream_rcpts and name in bots)]
        for line in [f"greyd logged: {p}" for p in dict.fromkeys(problems)] + wrong:
            report.anomaly(f"replay ({label}): {line}")

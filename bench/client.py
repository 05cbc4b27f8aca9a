"""The load clients: the Python asyncio SMTP client and Postfix's smtp-source.

Owns: the SMTP dialogues the benchmark sends (deferred and passed sessions),
one client run of `count` sessions at a concurrency (Run), the addresses and
messages they use, and how failures are named. Must not: start or stop
servers, or judge the figures it returns.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import string
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.processes import HOST, run_bounded, tool
from bench.sink import GREYLIST_REPLY
from bench.certificate import SERVER_NAME

DOMAIN = "bench.test"                 # recipient domain greyd relays in the throughput runs
SENDER_DOMAIN = "sender.bench.test"
BODY_BYTES = 1024
SESSION_TIMEOUT = 30.0                # seconds for one whole session of the Python client
GREYLISTED = 4      # what ClientProtocol.ask wants for a deferred RCPT


class Unexpected(Exception):
    """The server answered a step with a reply the dialogue did not expect."""


class ClientProtocol(asyncio.Protocol):
    """The client side of one SMTP connection: send a line, await the reply's code."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.buffer = bytearray()
        self.waiter: asyncio.Future | None = None
        self.lost: Exception | None = None
        self.last = b""                 # the last reply's final line
        self.lines: list[bytes] = []    # the lines of the reply being read, then of the last

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None:
            self._deliver()

    def connection_lost(self, exc) -> None:
        self.lost = exc or ConnectionResetError("connection closed by the server")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)
        self.waiter = None

    def _deliver(self) -> None:
        while self.waiter is not None:
            end = self.buffer.find(b"\n")
            if end < 0:
                return
            line = bytes(self.buffer[:end + 1])
            del self.buffer[:end + 1]
            self.lines.append(line)
            if line[3:4] == b"-":
                continue                        # a multi-line reply goes on
            waiter, self.waiter = self.waiter, None
            self.last = line
            if not waiter.done():
                waiter.set_result(int(line[:3]) if line[:3].isdigit() else 0)

    def reply(self) -> asyncio.Future:
        waiter = self.loop.create_future()
        self.waiter = waiter
        self.lines = []
        self._deliver()
        if self.waiter is waiter and self.lost is not None:
            self.waiter = None
            waiter.set_exception(self.lost)
        return waiter

    def command(self, line: bytes) -> asyncio.Future:
        self.transport.write(line)
        return self.reply()

    async def ask(self, step: str, line: bytes | None, wanted: int) -> None:
        """Send `line` (None: just read), and raise Unexpected unless the reply is
        `wanted`: a code (250), or GREYLISTED (a 4xx with status 4.7.1, SPEC §4)."""
        code = await (self.reply() if line is None else self.command(line))
        if wanted == GREYLISTED:
            # greyd and the sink say 4.7.1; Postfix + postgrey (DEFER_IF_PERMIT)
            # "450 4.2.0 <rcpt>: Recipient address rejected: Greylisted, see …".
            ok = code // 100 == 4 and (self.last[4:9] == b"4.7.1" or b"Greylisted" in self.last)
        else:
            ok = code == wanted
        if not ok:
            text = self.last.decode("ascii", "replace").strip()
            raise Unexpected(f"{step}: {text[:80]}")


async def connect(loop, port: int) -> ClientProtocol:
    _, proto = await loop.create_connection(lambda: ClientProtocol(loop), HOST, port)
    try:
        await proto.ask("greeting", None, 220)
    except BaseException:
        proto.transport.close()
        raise
    return proto


def token(rng: random.Random, length: int = 8) -> str:
    """Letters only: greyd folds digits in senders to '#', so digits would not make
    a fresh triplet."""
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


def message(sender: str, recipient: str) -> bytes:
    """A message of BODY_BYTES body bytes, headers like smtp-source's, dot-terminated."""
    header = (f"From: <{sender}>\r\nTo: <{recipient}>\r\n"
              f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
              f"Message-Id: <{recipient}.{time.time_ns()}@bench.client>\r\n"
              "Subject: greyd benchmark\r\n\r\n").encode()
    lines, rest = divmod(BODY_BYTES, 80)
    body = b"".join(b"%d" % (i % 10) + b"X" * 77 + b"\r\n" for i in range(lines))
    if rest:
        body += b"X" * (rest - 2) + b"\r\n"
    return header + body + b".\r\n"


async def starttls(loop, proto: ClientProtocol, context: ssl.SSLContext) -> None:
    """EHLO, STARTTLS (RFC 3207) and a full TLS handshake, then EHLO again over TLS."""
    await proto.ask("EHLO", b"EHLO bench.client\r\n", 250)
    if not any(line[4:].strip().upper() == b"STARTTLS" for line in proto.lines):
        raise Unexpected("EHLO: STARTTLS not offered")
    await proto.ask("STARTTLS", b"STARTTLS\r\n", 220)
    proto.transport = await loop.start_tls(proto.transport, proto, context,
                                           server_hostname=SERVER_NAME,
                                           ssl_handshake_timeout=SESSION_TIMEOUT)
    if proto.transport.get_extra_info("ssl_object").session_reused:
        raise Unexpected("STARTTLS: a TLS session was resumed")
    await proto.ask("EHLO over TLS", b"EHLO bench.client\r\n", 250)


async def session(loop, port: int, mode: str, sender: str, recipient: str,
                  tls: ssl.SSLContext | None = None) -> None:
    """One whole session: EHLO (with `tls`: STARTTLS, the handshake, EHLO again), MAIL,
    RCPT (4xx when deferred; else DATA), QUIT."""
    proto = await connect(loop, port)
    try:
        if tls is None:
            await proto.ask("EHLO", b"EHLO bench.client\r\n", 250)
        else:
            await starttls(loop, proto, tls)
        await proto.ask("MAIL", b"MAIL FROM:<%s>\r\n" % sender.encode(), 250)
        rcpt = b"RCPT TO:<%s>\r\n" % recipient.encode()
        if mode == "deferred":
            await proto.ask("RCPT", rcpt, GREYLISTED)
        else:
            await proto.ask("RCPT", rcpt, 250)
            await proto.ask("DATA", b"DATA\r\n", 354)
            await proto.ask("end of data", message(sender, recipient), 250)
        await proto.ask("QUIT", b"QUIT\r\n", 221)
    finally:
        proto.transport.close()


@dataclass
class Run:
    """One run of one client against one target."""

    sessions: int                 # completed as expected
    seconds: float
    latencies: list[float] = field(default_factory=list)    # seconds, Python client only
    errors: Counter = field(default_factory=Counter)
    greyd_cpu: float = 0.0        # CPU seconds greyd used meanwhile (idle during sink runs)
    greyd_usage: tuple | None = None   # bench.daemon.Usage of greyd meanwhile (throughput)

    @property
    def rate(self) -> float:
        return self.sessions / self.seconds if self.seconds > 0 else 0.0


def python_run(port: int, mode: str, concurrency: int, count: int, sender: str,
               time_limit: float, tls: ssl.SSLContext | None = None) -> Run:
    """`count` sessions over `concurrency` connections at a time, within `time_limit`;
    with `tls`, each over STARTTLS with a full handshake of its own."""
    async def main() -> Run:
        loop = asyncio.get_running_loop()
        latencies: list[float] = []
        errors: Counter = Counter()
        started = time.perf_counter()
        deadline = started + time_limit
        issued = 0

        async def worker():
            nonlocal issued
            while issued < count and time.perf_counter() < deadline:
                issued += 1
                recipient = f"{issued}user@{DOMAIN}"
                began = time.perf_counter()
                try:
                    async with asyncio.timeout(SESSION_TIMEOUT):
                        await session(loop, port, mode, sender, recipient, tls)
                except (OSError, Unexpected) as error:
                    errors[describe(error)] += 1
                else:
                    latencies.append(time.perf_counter() - began)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        if issued < count:
            errors[f"not run within the {time_limit:.0f} s limit"] += count - issued
        return Run(len(latencies), time.perf_counter() - started, latencies, errors)
    return asyncio.run(main())


def describe(error: BaseException) -> str:
    """A failed session's error, as counted in the report."""
    if isinstance(error, Unexpected):
        return f"unexpected reply to {error}"
    if isinstance(error, TimeoutError):
        return "timed out"
    return type(error).__name__


def deferral(line: str) -> bool:
    """An smtp-source warning line that reports a greylisted RCPT: greyd's and the
    sink's 451 4.7.1, or Postfix + postgrey's "450 4.2.0 …: Greylisted, see …"."""
    _, found, reply = line.partition("recipient rejected: ")
    return bool(found) and reply[:1] == "4" and (
        reply.startswith(f"{GREYLIST_REPLY[:3]} 4.7.1 ") or "Greylisted" in reply)


def smtp_source_run(port: int, mode: str, concurrency: int, count: int, sender: str,
                    time_limit: float) -> Run:
    """smtp-source: -s parallel sessions, -m sessions in all, one message each (no -d),
    -N a fresh recipient per message. Deferred: -A goes on after the 4xx to RCPT
    (the dialogue is HELO, MAIL, RCPT 4xx, RSET, QUIT) and each deferral is a
    'recipient rejected' warning, counted here. Passed: -l 1024 bytes of body;
    any reply other than the expected 2xx/354 is fatal."""
    argv = [tool("smtp-source"), "-s", str(concurrency), "-m", str(count), "-N",
            "-M", "bench.client", "-f", sender, "-t", f"user@{DOMAIN}"]
    argv[1:1] = ["-A"] if mode == "deferred" else []
    argv += ["-l", str(BODY_BYTES)] if mode == "passed" else []
    argv.append(f"{HOST}:{port}")
    status, _, err, seconds = run_bounded(argv, time_limit)
    errors: Counter = Counter()
    lines = [line for line in err.splitlines() if line.strip()]
    deferred = [line for line in lines if deferral(line)]
    other = Counter(line.split(": ", 1)[-1].strip() for line in lines if not deferral(line))
    said = "; ".join(f"{line[:160]} ×{n}" for line, n in other.most_common(2))
    done = count
    if status != 0:                 # smtp-source stops at its first failure
        done = 0
        errors[f"smtp-source exit {status}: {said or '?'}"] += count
    elif mode == "deferred":
        done = len(deferred)
        if done != count:
            errors["RCPT not answered 451 4.7.1" + (f" (smtp-source: {said})" if said else "")] \
                += count - done
    return Run(done, seconds, [], errors)

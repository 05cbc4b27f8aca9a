"""The sinks: SMTP servers on loopback that accept (or defer) everything, fast.

Owns: starting smtp-sink or the Python sink in a child process, and the
Python sink itself (an asyncio responder, served by `scripts/bench
--serve-sink PORT [--defer]`). Must not: keep or check mail, or measure.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.processes import HOST, BenchError, Processes, free_port, tool, wait_banner

GREYLIST_REPLY = "451 4.7.1 Greylisted, please try again in 300 seconds"
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench"


@dataclass
class Sink:
    port: int
    label: str
    proc: subprocess.Popen


def sink_argv(kind: str, defer: bool, port: int) -> tuple[list[str], str]:
    """The command line of a sink on `port`, and its label in the report."""
    if kind == "postfix":
        # -C: no XCLIENT. smtp-sink answers XCLIENT with 250 where Postfix's
        # smtpd (and greyd's relay) expect 220, so greyd would fail every relay.
        argv = [tool("smtp-sink"), "-C", "-m", "2048"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]      # smtp-sink refuses to run as root without -u
        if defer:
            argv += ["-r", "RCPT", "-b", GREYLIST_REPLY]
        argv += [f"{HOST}:{port}", "1024"]
        return argv, "smtp-sink -C" + (" -r RCPT" if defer else "")
    argv = [sys.executable, str(SCRIPT), "--serve-sink", str(port)]
    argv += ["--defer"] if defer else []
    return argv, "python sink" + (" (RCPT 451)" if defer else "")


def start_sink(kind: str, defer: bool, procs: Processes, workdir: Path) -> Sink:
    """smtp-sink (C) or the Python sink on a free loopback port; `defer`: RCPT gets 4xx."""
    name = "sink-defer" if defer else "sink"
    log = workdir / f"{name}.log"
    for _ in range(3):              # a free port can be taken between probe and bind
        port = free_port()
        argv, label = sink_argv(kind, defer, port)
        proc = procs.start(argv, log)
        try:
            wait_banner(port, proc, log, label)
            return Sink(port, label, proc)
        except BenchError:
            procs.stop(proc)
            if proc.returncode not in (None, 0) and "in use" not in log.read_text(errors="replace"):
                raise
    raise BenchError(f"{label}: could not find a free port")


class SinkProtocol(asyncio.Protocol):
    """A minimal SMTP responder: 250 to everything, 354 to DATA, 4xx to RCPT if deferring."""

    def __init__(self, defer: bool):
        self.defer = defer
        self.buffer = bytearray()
        self.in_data = False
        self.replies = {
            b"EHLO": (b"250-sink.bench.test\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n"
                      b"250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"
                      b"250 DSN\r\n"),
            b"HELO": b"250 sink.bench.test\r\n",
            b"MAIL": b"250 2.1.0 Ok\r\n",
            b"RCPT": (GREYLIST_REPLY.encode() + b"\r\n") if defer else b"250 2.1.5 Ok\r\n",
        }

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(b"220 sink.bench.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out = []
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    del self.buffer[:-4]
                    break
                del self.buffer[:end + 5]
                self.in_data = False
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            end = self.buffer.find(b"\n")
            if end < 0:
                break
            verb = bytes(self.buffer[:4]).upper()
            del self.buffer[:end + 1]
            if verb == b"QUIT":
                self.transport.write(b"".join(out) + b"221 2.0.0 Bye\r\n")
                self.transport.close()
                return
            if verb == b"DATA":
                self.in_data = True
                self.buffer[:0] = b"\r\n"     # so an empty message's "." ends it too
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            else:
                out.append(self.replies.get(verb, b"250 2.0.0 Ok\r\n"))
        if out:
            self.transport.write(b"".join(out))


def serve_sink(port: int, defer: bool) -> None:
    """The Python sink's process: serve until SIGTERM."""
    async def serve():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SinkProtocol(defer), HOST, port,
                                          backlog=1024, reuse_address=True)
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
        async with server:
            await stop
    asyncio.run(serve())

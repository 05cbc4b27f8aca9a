"""Faults around greyd: SPEC §9 "nothing lost" and §5 on_store_error.

The first test drives a few hundred transactions, eight clients at a time,
through greyd to an upstream that fails at random (tests/faultyupstream.py),
each transaction's fault drawn from one seeded generator, and checks both
directions: every 250 to DATA is exactly one intact message upstream, every
message upstream is a 250 a client got, every other ending is a 4xx or the
upstream's own reply. Two small tests pin the two ways mail was lost.

The store tests break the database under the real daemon (another process
holding it locked, made read-only, deleted, replaced by garbage or by another
database) and check that each recipient gets `on_store_error`, the incident
is logged once, and greyd recovers by itself. A deleted database is no
failure: greyd creates a new, empty one at once, as it does at start (its
removal is logged); only when it cannot (the directory closed) do recipients
get `on_store_error`, until it can.
"""

from __future__ import annotations

import os
import queue
import random
import re
import select
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from faultyupstream import NO_FAULT, Fault, FaultyUpstream
from greyd import replies
from greyd.policy import Triplet
from greyd.pool import StorePool
from greyd.store import Store
from conftest import until
from daemon import ROOT, UNPRIVILEGED, Foreground, config_for, take_backup, wait_listening
from smtpclient import Raw
from upstream import Upstream, free_port

pytestmark = pytest.mark.timeout(120)

# -- 1. The upstream fails: nothing is lost (SPEC §6, §9) ---------------------------

SEED = 5321
TRANSACTIONS = 600
CLIENTS = 8
CLIENT_TIMEOUT = 20.0

AT_RCPT = (451, replies.UPSTREAM_AT_RCPT.text)
AT_DATA = (451, replies.UPSTREAM_AT_DATA.text)
RCPT_OK = (250, "2.1.5 Ok")

TEMPORARY = [(421, "4.3.2 Service shutting down, closing connection"),
             (450, "4.2.1 Mailbox busy, try again {t}"),
             (451, "4.3.0 Local error in processing {t}"),
             (452, "4.3.1 Insufficient system storage {t}")]
PERMANENT = [(500, "5.5.2 Syntax error, command unrecognized {t}"),
             (550, "5.7.1 Rejected by local policy {t}"),
             (552, "5.3.4 Message too big for system {t}"),
             (553, "5.1.3 Mailbox name not allowed {t}"),
             (554, "5.7.0 Transaction failed {t}")]
# Replies no MTA should give at that step: greyd must not take them for success.
WRONG = {"greeting": (250, "upstream.test wrong greeting"), "mail": (354, "Go ahead {t}"),
         "rcpt": (354, "Go ahead {t}"), "data": (250, "2.0.0 Ok, but no 354 {t}"),
         "dot": (354, "Go ahead {t}")}
GARBAGE = (0, "this is not an SMTP reply {t}")
STEP_WEIGHTS = {"": 30, "after": 5, "connect": 6, "greeting": 5, "ehlo": 5, "mail": 10,
                "rcpt": 14, "data": 9, "message": 6, "dot": 10}
CONNECTION_STEPS = {"connect", "greeting", "ehlo"}


@dataclass
class Transaction:
    token: str
    recipients: list[str]
    body: bytes                  # the message as the client means it (not dot-stuffed)
    fault: Fault


@dataclass
class Outcome:
    """What one transaction's client saw."""

    rcpts: list[tuple[int, str]] = field(default_factory=list)
    data: tuple[int, str] | None = None
    others: list[tuple[int, str]] = field(default_factory=list)   # MAIL, 354, RSET


def draw_sessions(rng: random.Random) -> list[list[Transaction]]:
    """Sessions of one to three transactions until there are TRANSACTIONS; all from rng."""
    sessions, count = [], 0
    while count < TRANSACTIONS:
        size = rng.choices((1, 2, 3), (60, 25, 15))[0]
        session = []
        for position in range(size):
            count += 1
            token = f"t{count:04d}"
            recipients = rng.choices((1, 2, 3), (60, 25, 15))[0]
            fault = draw_fault(rng, token, first=position == 0, recipients=recipients)
            if fault.kind == "stall" and fault.step in CONNECTION_STEPS | {"mail"}:
                recipients = 1      # each recipient would meet the stall again
            session.append(Transaction(token, [f"r{i}.{token}@localhost" for i in
                                               range(1, recipients + 1)],
                                       make_body(rng, token), fault))
        sessions.append(session)
    return sessions


def draw_fault(rng: random.Random, token: str, *, first: bool, recipients: int) -> Fault:
    """One transaction's fault. Connection-level faults only where greyd must connect
    anew (the first transaction of a session): a later one may reuse the connection."""
    steps = [s for s in STEP_WEIGHTS if first or s not in CONNECTION_STEPS]
    step = rng.choices(steps, [STEP_WEIGHTS[s] for s in steps])[0]
    if step == "":
        return NO_FAULT
    if step == "after":
        return Fault("after", "hangup")
    if step == "connect":
        return Fault("connect", rng.choice(("refuse", "unlisten")))
    if step == "message":
        return Fault("message", "drop", at=rng.choice((0, 1, 100, 5000, 100_000)))
    if step == "ehlo" and rng.random() < 0.25:
        code, text = rng.choice([(500, "5.5.2 EHLO not understood {t}"),
                                 (502, "5.5.1 EHLO not implemented {t}")])
        return Fault("ehlo", "fallback", code, text.format(t=token))
    kind = rng.choices(("temporary", "permanent", "odd", "drop", "stall"),
                       (30, 35, 10, 17, 8))[0]
    at = rng.randint(1, recipients) if step == "rcpt" else 0
    if kind in ("drop", "stall"):
        return Fault(step, kind, at=at)
    if kind == "odd":
        code, text = WRONG[step] if step in WRONG and rng.random() < 0.6 else GARBAGE
    else:
        code, text = rng.choice(TEMPORARY if kind == "temporary" else PERMANENT)
        if rng.random() < 0.3:      # a multi-line reply, passed on line for line
            enhanced = text.split(" ", 1)[0]
            text = f"{text}\n{enhanced} see https://upstream.test/why\n{enhanced} last line"
    return Fault(step, "reply", code, text.format(t=token), at)


_PRINTABLE = bytes(32 + b % 95 for b in range(256))
_EIGHT_BIT = bytes(128 + b % 128 for b in range(256))


def make_body(rng: random.Random, token: str) -> bytes:
    """A message with its id in a header; dots, 8-bit octets, empty and long lines;
    now and then a few hundred kilobytes, so a hang-up can come while greyd sends."""
    head = [f"From: <{token}@sender.example>", f"To: <r1.{token}@localhost>",
            f"Subject: fault injection {token}", f"Message-ID: <{token}@faults.test>",
            f"X-Txn: {token}", ""]
    lines = [line.encode() for line in head]
    count = rng.randint(1000, 5000) if rng.random() < 0.12 else rng.randint(0, 40)
    for _ in range(count):
        shape = rng.random()
        text = rng.randbytes(rng.randint(0, 120))
        if shape < 0.1:
            lines.append(b"." * rng.randint(1, 3) + text.translate(_PRINTABLE))
        elif shape < 0.2:
            lines.append(text.translate(_EIGHT_BIT))
        elif shape < 0.25:
            lines.append(b"")
        else:
            lines.append(text.translate(_PRINTABLE))
    lines.append(b"." if rng.random() < 0.1 else b"-- " + token.encode())
    return b"\r\n".join(lines) + b"\r\n"


def dot_stuffed(body: bytes) -> bytes:
    """The body as it goes on the wire after DATA, with the end-of-data line (RFC 5321 4.5.2)."""
    lines = body[:-2].split(b"\r\n")
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines) + b".\r\n"


def passed_through(fault: Fault, failure: tuple[int, str]) -> tuple[int, str]:
    """The upstream's own 4xx or 5xx goes to the client as it is; 421 (closing),
    a reply of the wrong class, no reply, a hang-up or a stall become greyd's 451."""
    if fault.kind == "reply" and fault.code // 100 in (4, 5) and fault.code != 421:
        return fault.code, fault.text
    return failure


def expected(txn: Transaction) -> tuple[list[tuple[int, str]], tuple[int, str] | None]:
    """The replies the client must get to each RCPT, and to DATA (None: no DATA sent).

    Faults before MAIL are the upstream refusing greyd itself, not this mail:
    always 451 4.4.1 (never the upstream's 5xx, which would bounce mail for a
    local fault). From MAIL on, the upstream's own reply is passed through.
    """
    fault, n = txn.fault, len(txn.recipients)
    queued = (250, f"2.0.0 Ok: queued as {txn.token}")
    if fault.step in CONNECTION_STEPS and fault.kind != "fallback":
        return [AT_RCPT] * n, None
    if fault.step == "mail":
        return [passed_through(fault, AT_RCPT)] * n, None
    if fault.step == "rcpt":
        refused = passed_through(fault, AT_RCPT)
        # After a failure the upstream transaction is lost: the rest of it too.
        later = AT_RCPT if refused == AT_RCPT else RCPT_OK
        rcpts = [RCPT_OK] * (fault.at - 1) + [refused] + [later] * (n - fault.at)
        if RCPT_OK not in rcpts:
            return rcpts, None
        return rcpts, queued if later == RCPT_OK else AT_DATA
    data = {"data": passed_through(fault, AT_DATA), "message": AT_DATA,
            "dot": passed_through(fault, AT_DATA)}.get(fault.step, queued)
    return [RCPT_OK] * n, data


def readable(sock, timeout: float = 0.002) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


class Client:
    """Runs sessions against greyd; every RCPT under one lock, so that the upstream
    connection it may cause takes the right transaction's token (see faultyupstream)."""

    def __init__(self, port: int, upstream: FaultyUpstream):
        self.port, self.upstream = port, upstream
        self.connecting = threading.Lock()
        self.outcomes: dict[str, Outcome] = {}
        self.session_replies: list[tuple[int, str]] = []   # greetings, EHLO, QUIT

    def session(self, transactions: list[Transaction]) -> None:
        with Raw(self.port, timeout=CLIENT_TIMEOUT) as raw:
            seen = [raw.greeting, raw.cmd("EHLO client.faults.test")]
            for txn in transactions:
                self.outcomes[txn.token] = self.transaction(raw, txn)
            seen.append(raw.cmd("QUIT"))
        self.session_replies.extend(seen)

    def transaction(self, raw: Raw, txn: Transaction) -> Outcome:
        outcome = Outcome()
        outcome.others.append(raw.cmd(f"MAIL FROM:<{txn.token}@sender.example>"))
        for recipient in txn.recipients:
            outcome.rcpts.append(self.rcpt(raw, txn, recipient))
        if any(code == 250 for code, _ in outcome.rcpts):
            outcome.others.append(raw.cmd("DATA"))
            raw.send(dot_stuffed(txn.body))
            outcome.data = raw.reply()
        else:
            outcome.others.append(raw.cmd("RSET"))
        return outcome

    def rcpt(self, raw: Raw, txn: Transaction, recipient: str) -> tuple[int, str]:
        unlisten = txn.fault.kind == "unlisten"
        with self.connecting:
            taken = self.upstream.arm(txn.token)
            if unlisten:
                self.upstream.pause()
            try:
                raw.send(f"RCPT TO:<{recipient}>\r\n".encode())
                # Hold the lock until greyd's connection (if any) is accepted, or the reply is here.
                if not until(lambda: readable(raw.sock) or (not unlisten and taken.is_set()),
                             CLIENT_TIMEOUT, step=0):
                    raise TimeoutError(f"{txn.token}: no reply to RCPT")
            finally:
                self.upstream.disarm()
                if unlisten:
                    self.upstream.resume()
        return raw.reply()


def run_sessions(client: Client, sessions: list[list[Transaction]]) -> list[BaseException]:
    work: queue.Queue = queue.Queue()
    for session in sessions:
        work.put(session)
    errors: list[BaseException] = []

    def worker():
        while True:
            try:
                session = work.get_nowait()
            except queue.Empty:
                return
            try:
                client.session(session)
            except BaseException as error:   # reported by the test, with the token
                errors.append(error)

    threads = [threading.Thread(target=worker) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


TRACE = re.compile(rb"Received: from client\.faults\.test \(unknown \[127\.0\.0\.1\]\)\r\n"
                   rb"\tby mx\.greyd\.test \(greyd\) with ESMTP id [0-9a-f]{10}"
                   rb"(\r\n\tfor <[^>\r\n]+>)?; [^\r\n]+\r\n")


def test_nothing_is_lost_whatever_the_upstream_does(start_greyd):
    sessions = draw_sessions(random.Random(SEED))
    transactions = {txn.token: txn for session in sessions for txn in session}
    plans = {token: txn.fault for token, txn in transactions.items()}
    started = time.monotonic()
    with FaultyUpstream(plans) as upstream:
        greyd = start_greyd(upstream.port, upstream={"timeout": 1},
                            relay={"clients": ["127.0.0.0/8"]},
                            server={"max_connections_per_client": 50})
        client = Client(greyd.port, upstream)
        errors = run_sessions(client, sessions)
    elapsed = time.monotonic() - started
    assert not errors, errors[:5]
    assert not upstream.mismatches, upstream.mismatches[:5]   # the harness itself

    problems: list[str] = []
    delivered: dict[str, list] = {}
    for message in upstream.messages:
        found = re.search(rb"\r\nX-Txn: (t\d{4})\r\n", message.data)
        if found is None or found.group(1).decode() not in transactions:
            problems.append(f"upstream has a message nobody sent: {message.data[:200]!r}")
            continue
        delivered.setdefault(found.group(1).decode(), []).append(message)

    for token, txn in transactions.items():
        outcome = client.outcomes[token]
        accepted = [r for r, (code, _) in zip(txn.recipients, outcome.rcpts) if code == 250]
        messages = delivered.get(token, [])
        if outcome.data is not None and outcome.data[0] == 250:
            if len(messages) != 1:
                problems.append(f"{token}: 250 to DATA, {len(messages)} messages upstream")
                continue
            message = messages[0]
            trace = TRACE.match(message.data)
            if (trace is None or message.data[trace.end():] != txn.body
                    or message.sender != f"{token}@sender.example"):
                problems.append(f"{token}: the message upstream is not the one sent")
            if message.recipients != accepted:
                problems.append(f"{token}: upstream delivers to {message.recipients}, "
                                f"the client was told {accepted}")
        elif messages:
            problems.append(f"{token}: {len(messages)} message(s) upstream, "
                            f"the client got {outcome.data}: a duplicate when it retries")
        sent = upstream.sent.get(token, [])
        for code, text in outcome.rcpts + ([outcome.data] if outcome.data else []):
            if code == 421:
                problems.append(f"{token}: greyd said 421 {text!r}")
            elif code >= 500 and (code, text) not in sent:
                problems.append(f"{token}: a 5xx the upstream never sent: {code} {text!r}")
            elif 400 <= code < 500 and (code, text) not in sent + [AT_RCPT, AT_DATA]:
                problems.append(f"{token}: a 4xx that is neither greyd's nor the upstream's: "
                                f"{code} {text!r}")
        want = expected(txn)
        if (outcome.rcpts, outcome.data) != want:
            problems.append(f"{token}: {txn.fault} gave {outcome.rcpts} / {outcome.data}, "
                            f"expected {want[0]} / {want[1]}")
        for code, text in outcome.others:
            if code not in (250, 354):
                problems.append(f"{token}: greyd answered {code} {text!r} to MAIL/DATA/RSET")
    for code, text in client.session_replies:
        if code not in (220, 221, 250):
            problems.append(f"session reply {code} {text!r}")

    print(summary(transactions, client.outcomes, upstream, elapsed))
    assert not problems, "\n".join(problems[:25]) + f"\n({len(problems)} problems)"
    assert len(transactions) >= 300 and len(upstream.messages) > 100


def summary(transactions, outcomes, upstream, elapsed: float) -> str:
    """Figures for the record: faults drawn, how transactions ended."""
    faults = Counter(f"{t.fault.step or 'none'}/{t.fault.kind or '-'}"
                     for t in transactions.values())
    ends = Counter()
    for token, outcome in outcomes.items():
        final = outcome.data or next((r for r in outcome.rcpts if r[0] != 250), outcome.rcpts[-1])
        if final[0] == 250:
            ends["delivered (250 to DATA)"] += 1
        elif final in (AT_RCPT, AT_DATA):
            ends[f"greyd {final[0]} {final[1][:5]}"] += 1
        else:
            ends[f"upstream's own {final[0] // 100}xx passed through"] += 1
    recipients = Counter(code for o in outcomes.values() for code, _ in o.rcpts)
    return (f"\n{len(transactions)} transactions in {elapsed:.1f}s; upstream: "
            f"{upstream.connections} connections, {upstream.stalls} stalls, "
            f"{len(upstream.messages)} messages\nfaults: {dict(sorted(faults.items()))}\n"
            f"endings: {dict(sorted(ends.items()))}\n"
            f"RCPT codes: {dict(sorted(recipients.items()))}")


def one_transaction(start_greyd, fault: Fault, recipients: int):
    """One transaction through greyd to the faulty upstream: RCPT and DATA replies, messages."""
    with FaultyUpstream({"t0001": fault}) as upstream:
        greyd = start_greyd(upstream.port, upstream={"timeout": 1},
                            relay={"clients": ["127.0.0.0/8"]})
        with greyd.raw() as raw:
            raw.cmd("EHLO client.faults.test")
            assert raw.cmd("MAIL FROM:<t0001@sender.example>")[0] == 250
            rcpts = [raw.cmd(f"RCPT TO:<r{i}.t0001@localhost>") for i in range(1, recipients + 1)]
            assert raw.cmd("DATA")[0] == 354
            raw.send(b"Subject: one\r\n\r\nbody\r\n.\r\n")
            data = raw.reply()
            raw.cmd("QUIT")
    return rcpts, data, upstream.messages


def test_a_recipient_accepted_before_the_upstream_failed_is_not_lost(start_greyd):
    # The upstream took r1, then hung up at r2. Relaying r3 on a fresh
    # connection would end in a 250 for a message that never reaches r1.
    rcpts, data, messages = one_transaction(start_greyd, Fault("rcpt", "drop", at=2), 3)
    assert rcpts == [RCPT_OK, AT_RCPT, AT_RCPT]
    assert data == AT_DATA and messages == []


def test_a_250_to_the_data_command_is_no_acceptance(start_greyd):
    rcpts, data, messages = one_transaction(
        start_greyd, Fault("data", "reply", 250, "2.0.0 Ok"), 1)
    assert rcpts == [RCPT_OK]
    assert data == AT_DATA and messages == []


# -- 2. The store fails: on_store_error, logged once, recovered by itself (SPEC §5, §7) --

REFUSED = (550, "5.1.1 No such user here")
UPSTREAM_OK = (250, "2.1.5 OK")
QUEUED = (250, "2.0.0 OK queued")
LOCAL_ERROR = (451, replies.LOCAL_ERROR.text)
# Recipients while the store is broken: two in one session, two more alongside.
DURING = [("s1", ["ok1@localhost", "refused@localhost"]), ("s2", ["ok2@localhost"]),
          ("s3", ["ok3@localhost"])]
TRIPLET = Triplet("192.0.2.0/24", "a@example.net", "b@localhost")
LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""


def companions(db: Path) -> list[Path]:
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


class Locked:
    """Another process holds the database locked (BEGIN EXCLUSIVE) past greyd's busy timeout."""

    fails, keeps = True, {"before", "between"}
    reads = True            # only writes fail: found out by the writer, after the answers

    def start(self, db: Path) -> None:
        self.locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db)], text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.locker.stdout.readline() == "locked\n"

    def end(self, db: Path) -> None:
        self.locker.communicate("\n", timeout=10)
        assert self.locker.returncode == 0


class ReadOnly:
    """chmod 0444 on the database and its -wal and -shm; then 0644 again."""

    fails, keeps = True, {"before", "between"}
    reads = True

    def start(self, db: Path) -> None:
        self.chmod(db, 0o444)

    def end(self, db: Path) -> None:
        self.chmod(db, 0o644)

    @staticmethod
    def chmod(db: Path, mode: int) -> None:
        for path in companions(db):
            if path.exists():
                path.chmod(mode)


class Deleted:
    """The file unlinked (its -wal and -shm left): greyd starts a new, empty
    database at once, as it does at start; no decision fails."""

    fails, keeps = False, set()

    def start(self, db: Path) -> None:
        db.unlink()

    def end(self, db: Path) -> None:
        pass


class DeletedUncreatable:
    """The file unlinked, and the directory closed (0555) so greyd cannot create
    it again until the directory is opened (0755)."""

    fails, keeps = True, set()

    def start(self, db: Path) -> None:
        db.unlink()
        db.parent.chmod(0o555)

    def end(self, db: Path) -> None:
        db.parent.chmod(0o755)


class Replaced:
    """Another valid database (the backup) renamed over the file: greyd moves to
    it at once, and the old file's WAL must not be replayed into it."""

    fails, keeps = False, {"before"}

    def start(self, db: Path) -> None:
        os.rename(db.with_name("backup.db"), db)

    def end(self, db: Path) -> None:
        pass


class Garbage:
    """Random bytes renamed over the file; then the backup renamed over those."""

    fails, keeps = True, {"before"}     # the backup was taken before "between"

    def start(self, db: Path) -> None:
        garbage = db.with_name("garbage")
        garbage.write_bytes(random.Random(SEED).randbytes(64 * 1024))
        os.rename(garbage, db)

    def end(self, db: Path) -> None:
        os.rename(db.with_name("backup.db"), db)


def deliver(port: int, sender: str, recipients: list[str],
            body: bytes = b"Subject: s\r\n\r\nhi\r\n"):
    """One transaction: the reply to each RCPT, and to DATA when a recipient passed."""
    with Raw(port, timeout=CLIENT_TIMEOUT) as raw:
        assert raw.cmd("EHLO mail.example.net")[0] == 250
        assert raw.cmd(f"MAIL FROM:<{sender}@example.net>")[0] == 250
        rcpts = [raw.cmd(f"RCPT TO:<{recipient}>") for recipient in recipients]
        data = None
        if any(code == 250 for code, _ in rcpts):
            assert raw.cmd("DATA")[0] == 354
            raw.send(body + b".\r\n")
            data = raw.reply()
        raw.cmd("QUIT")
    return rcpts, data


def deliver_at_once(port: int, sessions) -> list:
    results: list = [None] * len(sessions)

    def one(i, sender, recipients):
        results[i] = deliver(port, sender, recipients)
    threads = [threading.Thread(target=one, args=(i, *session))
               for i, session in enumerate(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def wait_for_line(logfile: Path, text: str) -> None:
    assert until(lambda: logfile.exists() and text in logfile.read_text(), 30), \
        f"{text!r} was never logged"


def greylisted(reply) -> bool:
    return reply[0] == 451 and reply[1].startswith("4.7.1 Greylisted")


def recipients_in(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return {row[0].partition("@")[0] for row in conn.execute("SELECT recipient FROM triplets")}
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["accept", "tempfail"])
@pytest.mark.parametrize("fault", [Locked, ReadOnly, Deleted, DeletedUncreatable, Replaced,
                                   Garbage],
                         ids=lambda f: f.__name__)
def test_a_broken_store_gets_on_store_error_once_and_heals(tmp_path, mode, fault):
    """Healthy, the store greylists `before` and `between` (a backup is taken in
    between); broken, four recipients in three concurrent sessions get
    on_store_error; healed, `after` is greylisted and recorded, and a whole
    transaction goes through. The log tells one failure and one recovery.

    A store that still reads but cannot be written is found out by the
    writer, after the answer: the first recipient it fails for (`unknown`)
    was greylisted, never accepted, and is forgotten; the four decided once
    the failure is known get on_store_error."""
    fault = fault()
    db = tmp_path / "db" / "greyd.db"
    db.parent.mkdir()
    logfile = tmp_path / "var" / "log" / "greyd.log"
    port = free_port()
    with Upstream(reject={"refused@localhost": REFUSED}) as upstream:
        config = config_for(tmp_path, upstream.port, port, database={"path": str(db)},
                            greylist={"delay": "1h", "on_store_error": mode},
                            log={"file": str(logfile)})
        # As root without the DAC override, so that a file made read-only is read-only to greyd.
        with Foreground(config, prefix=UNPRIVILEGED if ROOT else []) as daemon:
            wait_listening(port)
            before, _ = deliver(port, "before", ["before@localhost"])
            # committed by greyd's writer
            assert until(lambda: "before" in recipients_in(db), 30), "before was never stored"
            take_backup(db, db.with_name("backup.db"))
            between, _ = deliver(port, "between", ["between@localhost"])
            assert until(lambda: "between" in recipients_in(db), 30), "between was never stored"
            fault.start(db)
            try:
                if getattr(fault, "reads", False):
                    unknown, _ = deliver(port, "unknown", ["unknown@localhost"])
                    wait_for_line(logfile, "store failure")
                during = deliver_at_once(port, DURING)
            finally:
                fault.end(db)
            after, _ = deliver(port, "after", ["after@localhost"])
            full = deliver(port, "full", ["postmaster"], b"Subject: full\r\n\r\nafter\r\n")
            assert daemon.stop() == 0
    log = logfile.read_text()

    assert greylisted(before[0]) and greylisted(between[0])
    if getattr(fault, "reads", False):
        assert greylisted(unknown[0])
    rcpts = [reply for replies_, _ in during for reply in replies_]
    datas = [data for _, data in during]
    if not fault.fails:
        assert all(greylisted(reply) for reply in rcpts), rcpts
    elif mode == "accept":         # relayed, the upstream's own reply passed through
        assert rcpts == [UPSTREAM_OK, REFUSED, UPSTREAM_OK, UPSTREAM_OK]
        assert datas == [QUEUED] * 3
    else:
        assert rcpts == [LOCAL_ERROR] * 4 and datas == [None] * 3
    assert greylisted(after[0])                       # decided by the store again
    assert full == ([UPSTREAM_OK], QUEUED)               # and the daemon still serves
    assert len(upstream.messages) == (3 if fault.fails and mode == "accept" else 0) + 1

    failures = [line for line in log.splitlines() if "store failure" in line]
    recovered = [line for line in log.splitlines() if "store recovered" in line]
    store_errors = log.count("reason=store-error")
    assert (len(failures), len(recovered), store_errors) == \
        ((1, 1, 4) if fault.fails else (0, 0, 0)), "\n".join(failures + recovered)
    assert "Traceback" not in log and "internal error" not in log
    changes = re.findall(r"store file changed .* change=(\w+)", log)
    assert changes == {Locked: [], ReadOnly: ["permissions"] * 2, Deleted: ["removed"],
                       DeletedUncreatable: ["removed"], Replaced: ["replaced"],
                       Garbage: ["replaced"] * 2}[type(fault)]
    during_names = {"ok1", "refused", "ok2", "ok3"}
    assert recipients_in(db) == fault.keeps | {"after"} | (set() if fault.fails else during_names)


def test_no_connection_to_a_new_file_while_one_to_the_old_is_in_use(tmp_path):
    # Both would use the same -wal and -shm: the pool waits for the old one first.
    db = tmp_path / "greyd.db"
    pool = StorePool(db)
    pool.open()
    borrowed: list[float] = []

    def decide_meanwhile():
        with pool.facts(TRIPLET.network, TRIPLET) as facts:
            borrowed.append(time.monotonic())
            assert facts.seen(TRIPLET) is None

    try:
        with pool.facts(TRIPLET.network, TRIPLET) as old:
            assert old.seen(TRIPLET) is None
            db.unlink()
            thread = threading.Thread(target=decide_meanwhile)
            thread.start()
            time.sleep(0.3)
            assert borrowed == []
            given_back = time.monotonic()
        thread.join(5)
        assert borrowed and borrowed[0] >= given_back
        with Store(db) as new:
            assert new.is_current()            # created anew, with the schema
    finally:
        pool.close()

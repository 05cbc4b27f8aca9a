"""Private Postfix instances on loopback, for the tests and the benchmark.

Owns: building a Postfix instance of its own under a temporary directory
(config_directory, queue_directory, data_directory, Maildirs, the log file),
starting it with `postfix -c DIR start` and stopping it by its master's pid,
submitting mail with its own `sendmail -C DIR`, and reading what it did: the
log (waits are bounded), the queue, the messages it delivered. `sending` and
`upstream` build the two roles around greyd. Must not: touch the system's
Postfix (/etc/postfix, /var/spool/postfix), listen anywhere but loopback, or
wait without a bound.

Postfix's master starts as root and drops to `mail_owner` (postfix) for its
daemons, so an instance needs root; `unavailable()` says why one cannot run.
As root, `postfix -c DIR` needs no `alternate_config_directories` entry in
the default main.cf (there is none: Debian's "No configuration" install).
The instance's directory is created world-traversable (0755) because the
unprivileged daemons and virtual(8), which writes the Maildirs as `nobody`,
open paths under it after dropping root.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

from bench.processes import HOST, BenchError, tool

START_TIMEOUT = 30.0     # seconds for `postfix start` and the first 220
STOP_TIMEOUT = 20.0      # seconds for the master and its children to exit
COMMAND_TIMEOUT = 30.0   # seconds for postconf, sendmail, postqueue
MAILBOX_OWNER = "nobody"  # virtual(8) delivers as this user

# The services an instance runs; none chrooted (the chroot would need copies
# of /etc files). smtpd's inet line is added when the instance listens.
MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def unavailable() -> str:
    """Why a private Postfix cannot run here ("" when it can)."""
    if not tool("postfix"):
        return "Postfix is not installed (Debian: apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (its master drops to mail_owner)"
    return ""


@dataclass
class Delivered:
    """One message a Maildir holds: its raw bytes and the parsed message."""

    path: Path
    raw: bytes

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.raw, policy=email.policy.SMTPUTF8)


class Postfix:
    """One private Postfix instance under a temporary directory of its own.

    `smtpd`: (host, port) for an smtpd listener, None for none. `mailboxes`:
    addresses virtual(8) delivers to Maildirs (their domains become
    virtual_mailbox_domains; other addresses there get 550 5.1.1 User
    unknown). `reject`: address -> "5NN X.Y.Z text", answered at RCPT by an
    access table. `main`: main.cf settings over the defaults here; `master`:
    extra master.cf lines; `files`: name -> content, written into the config
    directory before the start (certificates, tables), which main.cf can
    name as "$config_directory/NAME". Use as a context manager, or call
    start(), stop() and remove().
    """

    def __init__(self, name: str, *, smtpd: tuple[str, int] | None = None,
                 mailboxes: tuple[str, ...] | list[str] = (), reject: dict[str, str] | None = None,
                 main: dict[str, str] | None = None, master: tuple[str, ...] | list[str] = (),
                 files: dict[str, str | bytes] | None = None, parent: str | Path | None = None):
        if smtpd is not None and not smtpd[0].startswith("127."):
            raise ValueError(f"smtpd must listen on loopback, not {smtpd[0]}")
        self.name = name
        self.smtpd = smtpd
        self.root = Path(tempfile.mkdtemp(prefix=f"greyd-postfix-{name}-", dir=parent))
        self.root.chmod(0o755)
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.mail_dir = self.root / "mail"
        self.log = self.root / "maillog"
        self.mailboxes = {address: f"box{n}/" for n, address in enumerate(mailboxes)}
        self.reject = dict(reject or {})
        self.main = {**self.default_main(), **(main or {})}
        self.master = list(master)
        self.files = dict(files or {})
        self.pid: int | None = None
        self.write()

    # -- configuration ------------------------------------------------------------------------

    def default_main(self) -> dict[str, str]:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": f"{self.name}.test",
            "mydomain": "test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "inet_interfaces": self.smtpd[0] if self.smtpd else HOST,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.1/32",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "maillog_file": str(self.log),
            "maillog_file_prefixes": str(self.root),
            "smtpd_peername_lookup": "no",
            "smtp_host_lookup": "native",
            "delay_warning_time": "0",
            # One line per TLS session ("... TLS connection established ..."), as tests read.
            "smtp_tls_loglevel": "1",
            "smtpd_tls_loglevel": "1",
        }
        domains = sorted({address.rpartition("@")[2] for address in self.mailboxes})
        if domains:
            uid = pwd.getpwnam(MAILBOX_OWNER).pw_uid
            settings.update({
                "virtual_mailbox_domains": ", ".join(domains),
                "virtual_mailbox_maps": f"texthash:{self.config_dir / 'mailboxes'}",
                "virtual_mailbox_base": str(self.mail_dir),
                "virtual_uid_maps": f"static:{uid}",
                "virtual_gid_maps": f"static:{pwd.getpwnam(MAILBOX_OWNER).pw_gid}",
            })
        if self.reject:
            settings["smtpd_recipient_restrictions"] = (
                f"check_recipient_access texthash:{self.config_dir / 'reject'}")
        return settings

    def write(self) -> None:
        """Write main.cf, master.cf and the tables; create the directories."""
        for directory in (self.config_dir, self.queue_dir, self.data_dir, self.mail_dir):
            directory.mkdir(exist_ok=True)
        shutil.chown(self.data_dir, "postfix")
        shutil.chown(self.mail_dir, MAILBOX_OWNER)
        lines = [f"{key} = {value}" for key, value in self.main.items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n", encoding="utf-8")
        master = MASTER_CF
        if self.smtpd:
            host, port = self.smtpd
            master = f"{host}:{port} inet n - n - - smtpd\n" + master
        (self.config_dir / "master.cf").write_text(
            master + "".join(f"{line}\n" for line in self.master), encoding="utf-8")
        (self.config_dir / "mailboxes").write_text(
            "".join(f"{address} {path}\n" for address, path in self.mailboxes.items()),
            encoding="utf-8")
        (self.config_dir / "reject").write_text(
            "".join(f"{address} {action}\n" for address, action in self.reject.items()),
            encoding="utf-8")
        for name, content in self.files.items():
            path = self.config_dir / name
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
        # Postfix rereads a main.cf or table changed within the last second or
        # two ("being edited") every 300 ms until it is older: 2 s per start.
        settled = time.time() - 10
        for path in self.config_dir.iterdir():
            os.utime(path, (settled, settled))

    def postconf(self, *args: str) -> str:
        """`postconf -c DIR args...`: its standard output (e.g. postconf("-h", "relayhost"))."""
        return self.command("postconf", "-c", str(self.config_dir), *args).stdout

    # -- running ------------------------------------------------------------------------------

    def command(self, name: str, *args: str, input: bytes | str | None = None,
                timeout: float = COMMAND_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
        """Run one of Postfix's commands (postfix, postconf, sendmail …), bounded."""
        path = tool(name)
        if not path:
            raise BenchError(f"Postfix's {name} is not installed")
        data = input.encode() if isinstance(input, str) else input
        result = subprocess.run([path, *args], input=data, capture_output=True, timeout=timeout)
        result.stdout, result.stderr = _text(result.stdout), _text(result.stderr)
        if check and result.returncode != 0:
            raise BenchError(f"{name} {' '.join(args)} exited {result.returncode}: "
                             f"{result.stderr.strip()}\n{self.tail()}")
        return result

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """`postfix -c DIR start`, then wait for the master's pid and smtpd's 220."""
        self.command("postfix", "-c", str(self.config_dir), "start", timeout=timeout)
        pidfile = self.queue_dir / "pid" / "master.pid"
        self.pid = int(pidfile.read_text().strip())
        if self.smtpd:
            self.wait_banner(timeout)

    def wait_banner(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(self.smtpd, timeout=2.0) as sock:
                    sock.settimeout(2.0)
                    if sock.recv(512).startswith(b"220"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise BenchError(f"Postfix {self.name} did not answer on {self.smtpd}\n{self.tail()}")

    def running(self) -> bool:
        return self.pid is not None and _alive(self.pid)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """`postfix -c DIR stop`, then wait for the master to exit; SIGKILL its group after
        `timeout` seconds. A stopped instance can be started again."""
        if not self.running():
            self.pid = None
            return
        pid = self.pid
        self.command("postfix", "-c", str(self.config_dir), "stop", timeout=timeout, check=False)
        if not _wait(lambda: not _alive(pid), timeout):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait(lambda: not _alive(pid), 5.0)
        # The daemons leave when the master does; smtpd's listener goes with them.
        if self.smtpd:
            _wait(lambda: not _listening(self.smtpd), timeout)
        self.pid = None

    def remove(self) -> None:
        """Stop the instance and delete its directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Postfix":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # -- mail ---------------------------------------------------------------------------------

    def sendmail(self, sender: str, recipients: list[str], message: bytes | str,
                 *options: str) -> None:
        """Submit a message with this instance's own `sendmail -C DIR -f sender`; `options`
        go before the recipients (e.g. "-N", "success,delay")."""
        data = message.encode() if isinstance(message, str) else message
        self.command("sendmail", "-C", str(self.config_dir), "-f", sender, *options, "--",
                     *recipients, input=data)

    def queue(self) -> list[dict]:
        """The queue as `postqueue -j` lists it: one dict per message (queue_name,
        queue_id, sender, recipients with their delay_reason)."""
        out = self.command("postqueue", "-c", str(self.config_dir), "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def flush(self) -> None:
        """`postqueue -f`: try every deferred message now."""
        self.command("postqueue", "-c", str(self.config_dir), "-f")

    def messages(self, address: str) -> list[Delivered]:
        """What virtual(8) delivered to `address`'s Maildir, oldest first."""
        new = self.mail_dir / self.mailboxes[address] / "new"
        paths = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime) if new.is_dir() else []
        return [Delivered(path, path.read_bytes()) for path in paths]

    def wait_messages(self, address: str, count: int = 1, timeout: float = 20.0) -> list[Delivered]:
        """Wait until `address`'s Maildir holds `count` messages; raise with the log's tail."""
        if _wait(lambda: len(self.messages(address)) >= count, timeout):
            return self.messages(address)
        raise BenchError(f"{address} got {len(self.messages(address))} of {count} messages "
                         f"in {timeout:.0f} s at Postfix {self.name}\n{self.tail()}")

    # -- the log ------------------------------------------------------------------------------

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def log_lines(self, pattern: str) -> list[str]:
        """The log lines that match the regular expression `pattern`."""
        return [line for line in self.log_text().splitlines() if re.search(pattern, line)]

    def wait_log(self, pattern: str, timeout: float = 20.0, count: int = 1) -> list[str]:
        """Wait until `count` log lines match `pattern`, and return the matching lines;
        raise BenchError with the log's tail after `timeout` seconds."""
        if _wait(lambda: len(self.log_lines(pattern)) >= count, timeout):
            return self.log_lines(pattern)
        raise BenchError(f"no {count} lines matching {pattern!r} in {timeout:.0f} s "
                         f"in Postfix {self.name}'s log\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        return "\n".join(f"    {line}" for line in self.log_text().splitlines()[-lines:])


def sending(relay_port: int, *, name: str = "sender", bind: str | None = "127.0.0.2",
            relay_host: str = HOST, mailboxes=(), main: dict[str, str] | None = None,
            **kwargs) -> Postfix:
    """A Postfix that relays every message to [relay_host]:relay_port (greyd), from `bind`
    when given, retrying deferred mail every second or two. `mailboxes` (local
    Maildirs, e.g. the envelope sender's, so bounces land somewhere readable)."""
    settings = {
        "relayhost": f"[{relay_host}]:{relay_port}",
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "smtp_connection_cache_on_demand": "no",
    }
    if bind:
        settings["smtp_bind_address"] = bind
    return Postfix(name, mailboxes=mailboxes, main={**settings, **(main or {})}, **kwargs)


def upstream(port: int, *, name: str = "upstream", host: str = HOST,
             mailboxes=("bob@example.org",), reject: dict[str, str] | None = None,
             main: dict[str, str] | None = None, **kwargs) -> Postfix:
    """A Postfix behind greyd: smtpd on host:port that trusts XCLIENT from 127/8,
    delivers `mailboxes` to Maildirs and answers `reject`'s recipients with their reply."""
    settings = {"smtpd_authorized_xclient_hosts": "127.0.0.0/8"}
    return Postfix(name, smtpd=(host, port), mailboxes=mailboxes, reject=reject,
                   main={**settings, **(main or {})}, **kwargs)


def _text(value: bytes | None) -> str:
    return (value or b"").decode("utf-8", errors="replace")


def _wait(condition, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _listening(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=1.0):
            return True
    except OSError:
        return False

"""What `greyd setup` puts on a mail host, and putting it there.

The system user and group, the state, log and run directories, the config
(/etc/greyd/greyd.toml, written once from the sample and never overwritten),
the systemd unit, the cron file and the logrotate file, all pointing at the
greyd command setup runs from. The templates are the package's data files
(greyd/data/, links to the checkout's etc/ in a checkout: one copy of each).

Every action is one line handed to `say`; a dry run says what it would do
and changes nothing. With a root directory every path goes under it, in the
files' text too, and the host's users, groups and ownerships are left alone.
This module knows nothing of click.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

USER = GROUP = "greyd"
CONFIG = "/etc/greyd/greyd.toml"
STATE, LOGS, RUN = "/var/lib/greyd", "/var/log/greyd", "/run/greyd"
TEMPLATE_GREYD = "/opt/greyd/.venv/bin/greyd"    # the command as the templates name it
FILES = (   # template, where it goes
    ("greyd.service", "/etc/systemd/system/greyd.service"),
    ("greyd.cron", "/etc/cron.d/greyd"),          # cron skips names with a dot
    ("greyd.logrotate", "/etc/logrotate.d/greyd"),
)
# Host paths in the templates' text, moved under --root with everything else.
HOST_PATH = re.compile(r"(?<![\w/.-])(/etc/greyd/|/var/lib/greyd|/var/log/greyd|/run/greyd)")
# The sample config's lines that change on a host (each must occur once).
SAMPLE_LINES = {
    "listen": 'listen = ["127.0.0.1:2525"]',
    "pidfile": 'pidfile = "var/greyd.pid"',
    "file": 'file = "var/log/greyd.log"',
    "path": 'path = "var/greyd.db"',
}


class InstallError(Exception):
    """Setup cannot go on; the message is one line."""


def template(name: str) -> str:
    """A packaged template or the sample config, as text."""
    return resources.files("greyd").joinpath("data", name).read_text(encoding="utf-8")


def running_greyd() -> str:
    """The greyd command this process runs from: the console script beside
    the interpreter (a venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "greyd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute())
    found = shutil.which("greyd")
    if found is None:
        raise InstallError(f"cannot find the greyd command (not beside {sys.executable}, "
                           "not on PATH)")
    return os.path.abspath(found)


@dataclass(frozen=True)
class Host:
    """Where setup installs: the real host (root None) or a directory."""

    greyd: str
    root: Path | None = None
    given: str | None = None    # a config of the operator's (-c): named, not written

    def path(self, absolute: str) -> Path:
        return Path(self.text(absolute))

    def text(self, absolute: str) -> str:
        """A host path as the installed files name it."""
        return absolute if self.root is None else str(self.root) + absolute

    def render(self, name: str) -> str:
        """A template with its paths set for this host."""
        text = HOST_PATH.sub(lambda found: self.text(found.group(1)), template(name))
        return text.replace(TEMPLATE_GREYD, self.greyd).replace(self.text(CONFIG), self.config_path)

    @property
    def config_path(self) -> str:
        """The config the installed files run greyd with."""
        return self.given or self.text(CONFIG)

    def config(self) -> str:
        """The sample config with the paths and the listen addresses of a host."""
        text = template("greyd.toml")
        wanted = {
            "listen": 'listen = ["0.0.0.0:25", "[::]:25"]',
            "pidfile": f"pidfile = {json.dumps(self.text(RUN + '/greyd.pid'))}",
            "file": f"file = {json.dumps(self.text(LOGS + '/greyd.log'))}",
            "path": f"path = {json.dumps(self.text(STATE + '/greyd.db'))}",
        }
        for key, line in SAMPLE_LINES.items():
            text, count = re.subn(f"^{re.escape(line)}", lambda _: wanted[key], text,
                                  flags=re.M)
            if count != 1:
                raise InstallError(f"the sample config has {count} lines {line!r}, not one")
        return (f"# Written by `greyd setup` from greyd's sample config, with the paths\n"
                f"# and listen addresses of this host; setup never overwrites it.\n\n{text}")


class Setup:
    """One run of `greyd setup`: each step says what it did (or would do)."""

    def __init__(self, host: Host, say: Callable[[str], None], dry_run: bool = False):
        self.host, self.say, self.dry_run = host, say, dry_run
        self.changed = False

    def run(self) -> None:
        self.account()
        self.directory("/etc/greyd", 0o755, "root", "root")
        for directory in (STATE, LOGS, RUN):
            self.directory(directory, 0o750, USER, GROUP)
        if self.host.given:
            self.say(f"kept {self.host.given} (given with -c)")
        else:
            self.write(CONFIG, self.host.config(), 0o640, "root", GROUP, keep=True)
        for name, target in FILES:
            self.write(target, self.host.render(name), 0o644, "root", "root")
        if not self.changed:
            self.say("nothing to change")
        config = self.host.config_path
        self.say(f"next: edit {config} (upstream, relay.domains), "
                 f"then greyd -c {config} check")
        self.say("next: systemctl daemon-reload && systemctl enable --now greyd")

    def _act(self, done: str, would: str, action: Callable[[], None]) -> None:
        self.changed = True
        if self.dry_run:
            self.say(f"would {would}")
            return
        action()
        self.say(done)

    def account(self) -> None:
        """The system group and user greyd (only on the real host)."""
        commands = (
            ("group", _exists(grp.getgrnam, GROUP), ["groupadd", "--system", GROUP]),
            ("user", _exists(pwd.getpwnam, USER),
             ["useradd", "--system", "--gid", GROUP, "--home-dir", STATE,
              "--shell", _nologin(), USER]),
        )
        for kind, exists, command in commands:
            if self.host.root is not None:
                self.say(f"not creating {kind} {USER} under --root: {' '.join(command)}")
            elif exists:
                self.say(f"kept {kind} {USER} (exists)")
            else:
                self._act(f"created {kind} {USER}", f"create {kind} {USER}: {' '.join(command)}",
                          lambda command=command: _run(command))

    def directory(self, absolute: str, mode: int, user: str, group: str) -> None:
        path = self.host.path(absolute)
        owner = self._owner(user, group)
        if not path.is_dir():
            self._act(f"created {path} ({self._describe(user, group, mode)})",
                      f"create {path} ({self._describe(user, group, mode)})",
                      lambda: self._make(path, mode, owner))
            return
        stat = path.stat()
        if stat.st_mode & 0o7777 == mode and self._owned(stat, owner):
            self.say(f"kept {path} (exists)")
            return
        self._act(f"set {path} to {self._describe(user, group, mode)}",
                  f"set {path} to {self._describe(user, group, mode)}",
                  lambda: _own(path, mode, owner))

    def write(self, absolute: str, text: str, mode: int, user: str, group: str,
              keep: bool = False) -> None:
        """Install a file; `keep`: never replace one that exists (it may be edited)."""
        path = self.host.path(absolute)
        owner = self._owner(user, group)
        if path.exists() and keep:
            self.say(f"kept {path} (exists)")
            return
        if path.exists():
            stat = path.stat()
            if (path.read_text(encoding="utf-8") == text and stat.st_mode & 0o7777 == mode
                    and self._owned(stat, owner)):
                self.say(f"kept {path} (unchanged)")
                return
            verb, would = "updated", "update"
        else:
            verb, would = ("wrote", "write") if keep else ("installed", "install")
        self._act(f"{verb} {path}", f"{would} {path}", lambda: _write(path, text, mode, owner))

    def _owner(self, user: str, group: str) -> tuple[int, int] | None:
        """(uid, gid) to chown to; None under --root or when not yet created (dry run)."""
        if self.host.root is not None:
            return None
        try:
            return pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid
        except KeyError:
            if self.dry_run:
                return None
            raise InstallError(f"no such user or group: {user}:{group}") from None

    def _owned(self, stat: os.stat_result, owner: tuple[int, int] | None) -> bool:
        """Owned as it should be: anything under --root; on the host, not
        before the user exists (a dry run)."""
        if owner is None:
            return self.host.root is not None
        return (stat.st_uid, stat.st_gid) == owner

    def _describe(self, user: str, group: str, mode: int) -> str:
        if self.host.root is not None:
            return f"{mode:04o}, owner left as is under --root"
        return f"{user}:{group} {mode:04o}"

    def _make(self, path: Path, mode: int, owner: tuple[int, int] | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
        _own(path, mode, owner)


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True


def _nologin() -> str:
    for shell in ("/usr/sbin/nologin", "/sbin/nologin"):
        if os.path.exists(shell):
            return shell
    return "/usr/sbin/nologin"


def _run(command: list[str]) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise InstallError(f"{command[0]}: {error.strerror or error}") from None
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
        raise InstallError(f"{' '.join(command)}: {message}")


def _own(path: Path, mode: int, owner: tuple[int, int] | None) -> None:
    if owner is not None:
        os.chown(path, *owner)
    path.chmod(mode)


def _write(path: Path, text: str, mode: int, owner: tuple[int, int] | None) -> None:
    """Write through a temporary file beside it, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.new")
    with open(temporary, "w", encoding="utf-8") as out:
        out.write(text)
    _own(temporary, mode, owner)
    os.replace(temporary, path)

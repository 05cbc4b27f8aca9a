"""greyd's configuration: finding, reading and checking `greyd.toml` (SPEC §2).

Owns the frozen `Config` (one dataclass per TOML section), the lookup order
(`find`), and the reading and validation of a file into a `Config` (`load`);
the checks of single values are in `values.py`. Every relative path comes
back resolved against the appliance root.

It must not keep configuration in globals, start anything, or touch the
network: the only outside call is `socket.getfqdn()` for an empty hostname.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from . import values
from .ip import Network
from .values import ConfigError

SYSTEM_CONFIG = Path("/etc/greyd/greyd.toml")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)


def _plain(value: Any) -> Any:
    """One setting as JSON: paths and networks as strings, addresses as host:port."""
    if value is None:
        return ""
    if isinstance(value, tuple):
        if value and isinstance(value[0], tuple):
            return [values.format_hostport(host, port) for host, port in value]
        return [str(item) for item in value]
    if isinstance(value, Path | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return value


def _key(default: Any, check: Callable[[Any, str], Any]) -> Any:
    """A setting: its default, and the check that turns a TOML value into it."""
    return field(default=default, metadata={"check": check})


_TIMEOUT = values.positive(values.parse_duration, "duration")
_ZONES = values.array(partial(values.domain, leading_dot=False))


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[tuple[str, int], ...] = _key((("127.0.0.1", 2525),), values.listen)
    hostname: str = _key("", values.text(spaces=False))  # after load(): "" is socket.getfqdn()
    banner: str = _key("greyd", values.text(spaces=True))
    user: str = _key("", values.text(spaces=False))
    max_connections: int = _key(500, values.integer(1))
    max_connections_per_client: int = _key(20, values.integer(1))
    command_timeout: float = _key(300, _TIMEOUT)
    data_timeout: float = _key(600, _TIMEOUT)
    max_message_size: int = _key(25 * 1024 * 1024, values.positive(values.parse_size, "size"))
    max_recipients: int = _key(100, values.integer(1))
    max_errors: int = _key(10, values.integer(1))
    bare_newlines: str = _key("normalize", values.choice("normalize", "reject"))
    pidfile: Path = _key(Path("var/greyd.pid"), values.path(optional=False))
    workers: int = _key(1, values.workers)


@dataclass(frozen=True)
class UpstreamConfig:
    host: str = _key("127.0.0.1", values.host)
    port: int = _key(10025, values.integer(1, 65535))
    timeout: float = _key(60, _TIMEOUT)
    starttls: bool = _key(False, values.boolean)
    xclient: str = _key("auto", values.choice("auto", "never"))


@dataclass(frozen=True)
class TlsConfig:
    """Inbound STARTTLS (RFC 3207); offered only when `cert` is set."""

    cert: Path | None = _key(None, values.path(optional=True))
    key: Path | None = _key(None, values.path(optional=True))
    min_version: str = _key("TLSv1.2", values.choice("TLSv1.2", "TLSv1.3"))
    ciphers: str = _key("", values.text(spaces=False))
    handshake_timeout: float = _key(30, _TIMEOUT)
    require: bool = _key(False, values.boolean)


@dataclass(frozen=True)
class RelayConfig:
    domains: tuple[str, ...] = _key(("localhost",), values.array(values.domain))
    clients: tuple[Network, ...] = _key(
        (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")),
        values.array(values.network))


@dataclass(frozen=True)
class GreylistConfig:
    delay: int = _key(300, values.parse_duration)
    retry_window: int = _key(2 * 86400, values.parse_duration)
    max_age: int = _key(35 * 86400, values.parse_duration)
    ipv4_prefix: int = _key(24, values.integer(0, 32))
    ipv6_prefix: int = _key(64, values.integer(0, 128))
    auto_whitelist_after: int = _key(5, values.integer(0))
    header: bool = _key(True, values.boolean)
    on_store_error: str = _key("accept", values.choice("accept", "tempfail"))
    # What identifies the client side of a triplet, first that applies: "spf"
    # (spf:<domain>, the client passed SPF for it), "name" (name:<registered
    # domain of its verified name>), "network" (its ipv4/ipv6_prefix network).
    client_key: tuple[str, ...] = _key(("spf", "network"), values.client_key)
    mode: str = _key("all", values.choice("all", "suspicious"))


@dataclass(frozen=True)
class DnsConfig:
    enabled: bool = _key(True, values.boolean)
    nameservers: tuple[tuple[str, int], ...] = _key((), values.array(values.nameserver))
    timeout: float = _key(2, _TIMEOUT)
    dnswl: tuple[str, ...] = _key((), _ZONES)
    dnsbl: tuple[str, ...] = _key((), _ZONES)


@dataclass(frozen=True)
class LogConfig:
    file: Path | None = _key(Path("var/log/greyd.log"), values.path(optional=True))
    debug_file: Path | None = _key(None, values.path(optional=True))
    syslog: bool = _key(False, values.boolean)
    level: str = _key("info", values.choice("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class DatabaseConfig:
    """SQLite at `path` (the default), or PostgreSQL when `url` is set."""

    path: Path = _key(Path("var/greyd.db"), values.path(optional=False))
    url: str = _key("", values.database_url)
    timeout: float = _key(2, _TIMEOUT)   # bound on one store operation in a session

    @property
    def where(self) -> str:
        """The store as greyd names it to people: the file, or the URL without
        its password."""
        return values.redact_url(self.url) if self.url else str(self.path)


def _metrics_listen(value: Any, key: str) -> str:
    """'' (off), or HOST:PORT as format_hostport writes it."""
    if value == "":
        return ""
    return values.format_hostport(*values.parse_hostport(value, key))


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus' text format at http://HOST:PORT/metrics; "" is off."""

    listen: str = _key("", _metrics_listen)

    @property
    def address(self) -> tuple[str, int] | None:
        return values.parse_hostport(self.listen, "metrics.listen") if self.listen else None


@dataclass(frozen=True)
class Config:
    """Every setting, one frozen dataclass per TOML section."""

    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    greylist: GreylistConfig = field(default_factory=GreylistConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    root: Path = Path(".")        # the appliance root, absolute after load()
    source: Path | None = None    # the file read; None for the built-in defaults

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """The effective settings as {section: {key: value}}, JSON-serialisable.

        Written back as TOML, the result loads to the same settings, but for
        a password in database.url, which is never shown.
        """
        settings = {name: {f.name: _plain(getattr(getattr(self, name), f.name))
                           for f in dataclasses.fields(section)}
                    for name, section in _SECTIONS.items()}
        settings["database"]["url"] = values.redact_url(self.database.url)  # never shown
        return settings


_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)
             if f.default_factory is not dataclasses.MISSING}


def _quote(name: str) -> str:
    """A TOML key as a message shows it: bare when it can be, else quoted."""
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name)


def _build(data: Mapping[str, Any]) -> Config:
    """A Config from parsed TOML; paths still relative, hostname as given."""
    sections = {}
    for name, table in data.items():
        if name not in _SECTIONS:
            where = "section" if isinstance(table, dict) else "key outside any [section]"
            raise ConfigError(f"{_quote(name)}: unknown {where}")
        if not isinstance(table, dict):
            raise values.fail(name, f"must be a table ([{name}])", table)
        checks = {f.name: f.metadata["check"] for f in dataclasses.fields(_SECTIONS[name])}
        settings = {}
        for key, value in table.items():
            dotted = f"{name}.{_quote(key)}"
            if key not in checks:
                raise ConfigError(f"{dotted}: unknown key")
            settings[key] = checks[key](value, dotted)
        sections[name] = _SECTIONS[name](**settings)
    config = Config(**sections)
    database = data.get("database", {})
    if "path" in database and database.get("url"):
        raise ConfigError("database.url: set either database.path (SQLite) or database.url"
                          " (PostgreSQL), not both")
    greylist = config.greylist
    if greylist.delay >= greylist.retry_window:
        raise ConfigError("greylist.delay: must be shorter than greylist.retry_window")
    if greylist.max_age <= greylist.delay:
        raise ConfigError("greylist.max_age: must be longer than greylist.delay")
    tls = config.tls
    if (tls.cert is None) != (tls.key is None):
        missing = "tls.key" if tls.key is None else "tls.cert"
        raise ConfigError(f"{missing}: must be set with {'tls.cert' if tls.key is None else 'tls.key'}")
    if tls.require and tls.cert is None:
        raise ConfigError("tls.require: needs tls.cert and tls.key (STARTTLS is not offered)")
    return config


# A system config (<R>/etc/greyd/greyd.toml) keeps its files where a Debian
# mail daemon keeps them: a relative path is relative to the directory of its
# kind, under R (R is / on a host; a directory for `greyd setup --root`).
STATE, LOGS, RUN = Path("var/lib/greyd"), Path("var/log/greyd"), Path("run/greyd")


def is_system_config(path: Path | None) -> bool:
    """True for a config file at <R>/etc/greyd/greyd.toml."""
    return (path is not None and path.parent.name == "greyd"
            and path.parent.parent.name == "etc")


def _settle(config: Config, root: Path, source: Path | None) -> Config:
    """Resolve relative paths; fill in an empty hostname.

    In a checkout or an appliance directory, paths are relative to its root
    (the parent of etc/). In a system config they are relative to the Debian
    place of their kind under R: the database to R/var/lib/greyd, log files
    to R/var/log/greyd, the pidfile to R/run/greyd, TLS files to
    R/etc/greyd; a key left at its built-in default (var/greyd.db …) keeps
    only its file name there (R/var/lib/greyd/greyd.db).
    """
    system = is_system_config(source)
    base = source.parent.parent.parent if system else root

    def place(path: Path | None, kind: Path, default: Path | None = None) -> Path | None:
        if path is None:
            return None
        if not system:
            return root / path
        return base / kind / (path.name if path == default else path)

    defaults = Config()
    server = dataclasses.replace(
        config.server, pidfile=place(config.server.pidfile, RUN, defaults.server.pidfile),
        hostname=config.server.hostname or socket.getfqdn())
    log = dataclasses.replace(
        config.log, file=place(config.log.file, LOGS, defaults.log.file),
        debug_file=place(config.log.debug_file, LOGS))
    database = dataclasses.replace(
        config.database, path=place(config.database.path, STATE, defaults.database.path))
    etc = Path("etc/greyd")
    tls = dataclasses.replace(config.tls, cert=place(config.tls.cert, etc),
                              key=place(config.tls.key, etc))
    return dataclasses.replace(config, server=server, log=log, database=database, tls=tls,
                               root=base if system else root, source=source)


def find(cli_path: str | None, environ: Mapping[str, str], cwd: Path,
         *, system: Path = SYSTEM_CONFIG) -> Path | None:
    """The config file to read, or None for the built-in defaults.

    An explicit path (-c, then $GREYD_CONFIG) must exist. Then the system
    config /etc/greyd/greyd.toml, when the host has one: on a host greyd is
    installed on, every command uses it wherever it is typed. Then, for
    development in a checkout, ./etc/greyd.toml.
    """
    for explicit in (cli_path, environ.get("GREYD_CONFIG") or None):
        if explicit is not None:
            path = cwd / explicit
            if not path.is_file():
                raise ConfigError(f"config file not found: {explicit}")
            return path
    for fallback in (system, cwd / "etc" / "greyd.toml"):
        if fallback.is_file():
            return fallback
    return None


def load(path: Path | None, cwd: Path | None = None) -> Config:
    """Read and check one config file (None: the built-in defaults)."""
    cwd = Path.cwd() if cwd is None else cwd
    if path is None:
        return _settle(Config(), cwd.resolve(), None)
    path = (cwd / path).absolute()
    try:
        with path.open("rb") as stream:
            data = tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"{path}: invalid TOML: {message}") from None
    root = path.parent.parent if path.parent.name == "etc" else path.parent
    return _settle(_build(data), root.resolve(), path)


def with_listen(config: Config, listen: Sequence[str]) -> Config:
    """The config with server.listen replaced (`greyd start --listen`); unchanged when empty."""
    if not listen:
        return config
    server = dataclasses.replace(config.server, listen=values.listen(list(listen), "--listen"))
    return dataclasses.replace(config, server=server)

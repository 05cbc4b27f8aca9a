"""greyd's configuration: finding, reading and checking `greyd.toml` (SPEC §2).

Owns the frozen `Config` (one dataclass per TOML section), the lookup order
(`find`), the reading and validation of a file into a `Config` (`load`), and
the parsers for durations, sizes and `host:port` values that the CLI shares.
Every relative path comes back resolved against the appliance root.

It must not keep configuration in globals, start anything, or touch the
network: the only outside call is `socket.getfqdn()` for an empty hostname.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SYSTEM_CONFIG = Path("/etc/greyd/greyd.toml")
MAX_DURATION = 10 * 365 * 86400  # ten years: a sane ceiling, far below timeout overflow
MAX_WORKERS = 64                 # server.workers: processes, far more than a small host has cores

_DURATION = re.compile(r"([0-9]+)([smhd]?)", re.ASCII)
_SIZE = re.compile(r"([0-9]+)([bkmg]?)", re.ASCII | re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_BYTES = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?", re.ASCII)
_DOMAIN = re.compile(r"\.?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
                     r"(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*", re.ASCII)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ConfigError(Exception):
    """One line naming the key: 'server.max_connections: must be a positive integer, got -3'.

    Callers may prefix the file path.
    """


def _plain(value: Any) -> Any:
    """One setting as JSON: paths and networks as strings, addresses as host:port."""
    if value is None:
        return ""
    if isinstance(value, tuple):
        if value and isinstance(value[0], tuple):
            return [format_hostport(host, port) for host, port in value]
        return [str(item) for item in value]
    if isinstance(value, Path | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return value


def format_hostport(host: str, port: int) -> str:
    """'host:port', with IPv6 hosts bracketed: '[::1]:2525'."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _show(value: Any) -> str:
    """A value as an error message shows it: TOML-like, always on one line."""
    if isinstance(value, list | dict):
        return "an array" if isinstance(value, list) else "a table"
    return json.dumps(value) if isinstance(value, str | int | float) else repr(value)


def _fail(key: str, problem: str, value: Any = ...) -> ConfigError:
    got = "" if value is ... else f", got {_show(value)}"
    return ConfigError(f"{key}: {problem}{got}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _with_unit(value: Any, key: str, pattern: re.Pattern, units: dict[str, int],
               what: str) -> int:
    if _is_int(value) and value >= 0:
        return value
    if isinstance(value, str) and (match := pattern.fullmatch(value)):
        return int(match[1]) * units[match[2].lower()]
    raise _fail(key, f"must be {what}", value)


def parse_duration(value: Any, key: str) -> int:
    """Seconds from an int or a string like '300', '90s', '5m', '2h', '35d'."""
    what = 'a duration (seconds, or a string like "90s", "5m", "2h", "35d")'
    seconds = _with_unit(value, key, _DURATION, _SECONDS, what)
    if seconds > MAX_DURATION:
        raise _fail(key, f"must be at most {MAX_DURATION} seconds (ten years)", value)
    return seconds


def parse_size(value: Any, key: str) -> int:
    """Bytes from an int or a string like '512K', '25M', '1G' (powers of 1024)."""
    what = 'a size (bytes, or a string like "512K", "25M", "1G")'
    return _with_unit(value, key, _SIZE, _BYTES, what)


def _address(host: str, key: str, text: str) -> str:
    """An IP address (IPv6 compressed) or a host name, else an error naming key."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]*|.*:.*", host) or len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise _fail(key, "not a valid host name or IP address", text)
    return host


def parse_hostport(text: str, key: str, default_port: int | None = None,
                   *, min_port: int = 1) -> tuple[str, int]:
    """(host, port) from 'host:port' or '[v6]:port'; the port may be left out
    only when there is a default_port, and then a bare IPv6 address is allowed."""
    if not isinstance(text, str):
        raise _fail(key, 'must be a "host:port" string', text)
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", text, re.DOTALL)
    if bracketed:
        host, port_text = bracketed[1], bracketed[2]
        if ":" not in host:
            raise _fail(key, "brackets are for IPv6 addresses only", text)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text and default_port is None:
        raise _fail(key, 'an IPv6 address with a port must be bracketed, like "[::1]:2525"', text)
    else:
        host, port_text = text, None
    host = _address(host, key, text)
    if port_text is None:
        if default_port is None:
            raise _fail(key, 'missing port, expected "host:port"', text)
        return host, default_port
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not min_port <= int(port_text) <= 65535:
        raise _fail(key, f"port must be from {min_port} to 65535", text)
    return host, int(port_text)


def _integer(low: int, high: int | None = None) -> Callable[[Any, str], int]:
    what = {0: "a non-negative integer", 1: "a positive integer"}[low] if high is None \
        else f"an integer from {low} to {high}"

    def convert(value: Any, key: str) -> int:
        if not _is_int(value) or value < low or (high is not None and value > high):
            raise _fail(key, f"must be {what}", value)
        return value
    return convert


def _workers(value: Any, key: str) -> int:
    """A number of processes, or "auto": two per CPU the daemon may run on
    (a worker's threads wait on clients and the database much of the time;
    scripts/bench on 2 CPUs served ~30 % more with 4 workers than with 2)."""
    if value == "auto":
        return min(MAX_WORKERS, 2 * len(os.sched_getaffinity(0)))
    if not _is_int(value) or not 1 <= value <= MAX_WORKERS:
        raise _fail(key, f'must be "auto" or an integer from 1 to {MAX_WORKERS}', value)
    return value


def _boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, "must be true or false", value)
    return value


def _choice(*choices: str) -> Callable[[Any, str], str]:
    def convert(value: Any, key: str) -> str:
        if value not in choices or not isinstance(value, str):
            raise _fail(key, "must be one of " + ", ".join(map(json.dumps, choices)), value)
        return value
    return convert


def _text(*, spaces: bool) -> Callable[[Any, str], str]:
    what = "a string of at most 255 characters, no control characters"
    what += "" if spaces else " or spaces"

    def convert(value: Any, key: str) -> str:
        if not isinstance(value, str) or len(value) > 255 or _CONTROL.search(value) or (
                not spaces and re.search(r"\s", value)):
            raise _fail(key, f"must be {what}", value)
        return value
    return convert


def _positive(parse: Callable[[Any, str], int], what: str) -> Callable[[Any, str], int]:
    def convert(value: Any, key: str) -> int:
        if (number := parse(value, key)) < 1:
            raise _fail(key, f"must be a positive {what}", value)
        return number
    return convert


def _host(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise _fail(key, "must be a string (a host name or IP address)", value)
    bracketed = value.startswith("[") and value.endswith("]")
    return _address(value[1:-1] if bracketed else value, key, value)


def _path(*, optional: bool) -> Callable[[Any, str], Path | None]:
    def convert(value: Any, key: str) -> Path | None:
        if value == "" and optional:
            return None
        if not isinstance(value, str) or value == "" or "\x00" in value:
            raise _fail(key, "must be a file path" + (' or ""' if optional else ""), value)
        return Path(value)
    return convert


def _domain(value: Any, key: str, *, leading_dot: bool = True) -> str:
    name = value.lower().removesuffix(".") if isinstance(value, str) else ""
    if len(name) > 253 or not _DOMAIN.fullmatch(name) or name[0] == "." and not leading_dot:
        what = ' (".example.org" for its subdomains)' if leading_dot else ""
        raise _fail(key, f"each entry must be a domain name{what}", value)
    return name


def _network(value: Any, key: str) -> Network:
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value, strict=False)
        except ValueError:
            pass
    raise _fail(key, "each entry must be an IP address or network (CIDR)", value)


def _nameserver(value: Any, key: str) -> tuple[str, int]:
    host, port = parse_hostport(value, key, 53)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise _fail(key, "each entry must be an IP address, with an optional :port",
                    value) from None


def _array(item: Callable[[Any, str], Any]) -> Callable[[Any, str], tuple]:
    def convert(value: Any, key: str) -> tuple:
        if not isinstance(value, list):
            raise _fail(key, "must be an array", value)
        return tuple(item(entry, key) for entry in value)
    return convert


def _listen(value: Any, key: str) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list | tuple):
        raise _fail(key, 'must be an array of "host:port" strings', value)
    if not value:
        raise _fail(key, "needs at least one address")
    return tuple(parse_hostport(entry, key, min_port=0) for entry in value)


def _key(default: Any, check: Callable[[Any, str], Any]) -> Any:
    """A setting: its default, and the check that turns a TOML value into it."""
    return field(default=default, metadata={"check": check})


_TIMEOUT = _positive(parse_duration, "duration")
_ZONES = _array(partial(_domain, leading_dot=False))


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[tuple[str, int], ...] = _key((("127.0.0.1", 2525),), _listen)
    hostname: str = _key("", _text(spaces=False))  # after load(): "" is socket.getfqdn()
    banner: str = _key("greyd", _text(spaces=True))
    user: str = _key("", _text(spaces=False))
    max_connections: int = _key(500, _integer(1))
    max_connections_per_client: int = _key(20, _integer(1))
    command_timeout: float = _key(300, _TIMEOUT)
    data_timeout: float = _key(600, _TIMEOUT)
    max_message_size: int = _key(25 * 1024 * 1024, _positive(parse_size, "size"))
    max_recipients: int = _key(100, _integer(1))
    max_errors: int = _key(10, _integer(1))
    bare_newlines: str = _key("normalize", _choice("normalize", "reject"))
    pidfile: Path = _key(Path("var/greyd.pid"), _path(optional=False))
    workers: int = _key(1, _workers)


@dataclass(frozen=True)
class UpstreamConfig:
    host: str = _key("127.0.0.1", _host)
    port: int = _key(10025, _integer(1, 65535))
    timeout: float = _key(60, _TIMEOUT)
    starttls: bool = _key(False, _boolean)
    xclient: str = _key("auto", _choice("auto", "never"))


@dataclass(frozen=True)
class RelayConfig:
    domains: tuple[str, ...] = _key(("localhost",), _array(_domain))
    clients: tuple[Network, ...] = _key(
        (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        _array(_network))


@dataclass(frozen=True)
class GreylistConfig:
    delay: int = _key(300, parse_duration)
    retry_window: int = _key(2 * 86400, parse_duration)
    max_age: int = _key(35 * 86400, parse_duration)
    ipv4_prefix: int = _key(24, _integer(0, 32))
    ipv6_prefix: int = _key(64, _integer(0, 128))
    auto_whitelist_after: int = _key(5, _integer(0))
    header: bool = _key(True, _boolean)
    on_store_error: str = _key("accept", _choice("accept", "tempfail"))


@dataclass(frozen=True)
class DnsConfig:
    enabled: bool = _key(True, _boolean)
    nameservers: tuple[tuple[str, int], ...] = _key((), _array(_nameserver))
    timeout: float = _key(2, _TIMEOUT)
    dnswl: tuple[str, ...] = _key((), _ZONES)
    dnsbl: tuple[str, ...] = _key((), _ZONES)


@dataclass(frozen=True)
class LogConfig:
    file: Path | None = _key(Path("var/log/greyd.log"), _path(optional=True))
    debug_file: Path | None = _key(None, _path(optional=True))
    syslog: bool = _key(False, _boolean)
    level: str = _key("info", _choice("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class DatabaseConfig:
    path: Path = _key(Path("var/greyd.db"), _path(optional=False))


@dataclass(frozen=True)
class Config:
    """Every setting, one frozen dataclass per TOML section."""

    server: ServerConfig = field(default_factory=ServerConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    greylist: GreylistConfig = field(default_factory=GreylistConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    root: Path = Path(".")        # the appliance root, absolute after load()
    source: Path | None = None    # the file read; None for the built-in defaults

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """The effective settings as {section: {key: value}}, JSON-serialisable.

        Written back as TOML, the result loads to the same settings.
        """
        return {name: {f.name: _plain(getattr(getattr(self, name), f.name))
                       for f in dataclasses.fields(section)}
                for name, section in _SECTIONS.items()}


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
            raise _fail(name, f"must be a table ([{name}])", table)
        checks = {f.name: f.metadata["check"] for f in dataclasses.fields(_SECTIONS[name])}
        values = {}
        for key, value in table.items():
            dotted = f"{name}.{_quote(key)}"
            if key not in checks:
                raise ConfigError(f"{dotted}: unknown key")
            values[key] = checks[key](value, dotted)
        sections[name] = _SECTIONS[name](**values)
    config = Config(**sections)
    greylist = config.greylist
    if greylist.delay >= greylist.retry_window:
        raise ConfigError("greylist.delay: must be shorter than greylist.retry_window")
    if greylist.max_age <= greylist.delay:
        raise ConfigError("greylist.max_age: must be longer than greylist.delay")
    return config


def _settle(config: Config, root: Path, source: Path | None) -> Config:
    """Resolve relative paths against root; fill in an empty hostname."""
    def under_root(path: Path | None) -> Path | None:
        return None if path is None else root / path

    server = dataclasses.replace(
        config.server, pidfile=under_root(config.server.pidfile),
        hostname=config.server.hostname or socket.getfqdn())
    log = dataclasses.replace(config.log, file=under_root(config.log.file),
                              debug_file=under_root(config.log.debug_file))
    database = dataclasses.replace(config.database, path=under_root(config.database.path))
    return dataclasses.replace(config, server=server, log=log, database=database,
                               root=root, source=source)


def find(cli_path: str | None, environ: Mapping[str, str], cwd: Path,
         *, system: Path = SYSTEM_CONFIG) -> Path | None:
    """The config file to read, per SPEC §2, or None for the built-in defaults.

    An explicit path (-c, then $GREYD_CONFIG) must exist; the fallbacks
    ./etc/greyd.toml and /etc/greyd/greyd.toml are skipped when absent.
    """
    for explicit in (cli_path, environ.get("GREYD_CONFIG") or None):
        if explicit is not None:
            path = cwd / explicit
            if not path.is_file():
                raise ConfigError(f"config file not found: {explicit}")
            return path
    for fallback in (cwd / "etc" / "greyd.toml", system):
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
    server = dataclasses.replace(config.server, listen=_listen(list(listen), "--listen"))
    return dataclasses.replace(config, server=server)

"""The values a setting may take (SPEC §2): durations, sizes, `host:port`,
networks, domains, choices, and the one-line error that names the key.

Each check is `check(value, key) -> value`, turning what TOML gave into what
`Config` keeps, or raising `ConfigError` naming the key. `config.py` builds
its sections from them; the CLI uses the same parsers for its options.
Pure functions: no files, no network, no globals.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import idn
from .ip import Network

MAX_DURATION = 10 * 365 * 86400  # ten years: a sane ceiling, far below timeout overflow
MAX_WORKERS = 64                 # server.workers: processes, far more than a small host has cores

_DURATION = re.compile(r"([0-9]+)([smhdw]?)", re.ASCII)
_SIZE = re.compile(r"([0-9]+)([bkmg]?)", re.ASCII | re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_BYTES = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?", re.ASCII)
_DOMAIN = re.compile(r"\.?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
                     r"(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ConfigError(Exception):
    """One line naming the key: 'server.max_connections: must be a positive integer, got -3'.

    Callers may prefix the file path.
    """


def format_hostport(host: str, port: int) -> str:
    """'host:port', with IPv6 hosts bracketed: '[::1]:2525'."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _show(value: Any) -> str:
    """A value as an error message shows it: TOML-like, always on one line."""
    if isinstance(value, list | dict):
        return "an array" if isinstance(value, list) else "a table"
    return json.dumps(value) if isinstance(value, str | int | float) else repr(value)


def fail(key: str, problem: str, value: Any = ...) -> ConfigError:
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
    raise fail(key, f"must be {what}", value)


def parse_duration(value: Any, key: str) -> int:
    """Seconds from an int or a string like '300', '90s', '5m', '2h', '35d', '1w'."""
    what = 'a duration (seconds, or a string like "90s", "5m", "2h", "35d", "1w")'
    seconds = _with_unit(value, key, _DURATION, _SECONDS, what)
    if seconds > MAX_DURATION:
        raise fail(key, f"must be at most {MAX_DURATION} seconds (ten years)", value)
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
        raise fail(key, "not a valid host name or IP address", text)
    return host


def parse_hostport(text: str, key: str, default_port: int | None = None,
                   *, min_port: int = 1) -> tuple[str, int]:
    """(host, port) from 'host:port' or '[v6]:port'; the port may be left out
    only when there is a default_port, and then a bare IPv6 address is allowed."""
    if not isinstance(text, str):
        raise fail(key, 'must be a "host:port" string', text)
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", text, re.DOTALL)
    if bracketed:
        host, port_text = bracketed[1], bracketed[2]
        if ":" not in host:
            raise fail(key, "brackets are for IPv6 addresses only", text)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text and default_port is None:
        raise fail(key, 'an IPv6 address with a port must be bracketed, like "[::1]:2525"', text)
    else:
        host, port_text = text, None
    host = _address(host, key, text)
    if port_text is None:
        if default_port is None:
            raise fail(key, 'missing port, expected "host:port"', text)
        return host, default_port
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not min_port <= int(port_text) <= 65535:
        raise fail(key, f"port must be from {min_port} to 65535", text)
    return host, int(port_text)


def integer(low: int, high: int | None = None) -> Callable[[Any, str], int]:
    what = {0: "a non-negative integer", 1: "a positive integer"}[low] if high is None \
        else f"an integer from {low} to {high}"

    def convert(value: Any, key: str) -> int:
        if not _is_int(value) or value < low or (high is not None and value > high):
            raise fail(key, f"must be {what}", value)
        return value
    return convert


def workers(value: Any, key: str) -> int:
    """A number of processes, or "auto": two per CPU the daemon may run on
    (a worker's threads wait on clients and the database much of the time)."""
    if value == "auto":
        return min(MAX_WORKERS, 2 * len(os.sched_getaffinity(0)))
    if not _is_int(value) or not 1 <= value <= MAX_WORKERS:
        raise fail(key, f'must be "auto" or an integer from 1 to {MAX_WORKERS}', value)
    return value


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise fail(key, "must be true or false", value)
    return value


def choice(*choices: str) -> Callable[[Any, str], str]:
    def convert(value: Any, key: str) -> str:
        if value not in choices or not isinstance(value, str):
            raise fail(key, "must be one of " + ", ".join(map(json.dumps, choices)), value)
        return value
    return convert


def text(*, spaces: bool) -> Callable[[Any, str], str]:
    what = "a string of at most 255 characters, no control characters"
    what += "" if spaces else " or spaces"

    def convert(value: Any, key: str) -> str:
        if not isinstance(value, str) or len(value) > 255 or _CONTROL.search(value) or (
                not spaces and re.search(r"\s", value)):
            raise fail(key, f"must be {what}", value)
        return value
    return convert


def positive(parse: Callable[[Any, str], int], what: str) -> Callable[[Any, str], int]:
    def convert(value: Any, key: str) -> int:
        if (number := parse(value, key)) < 1:
            raise fail(key, f"must be a positive {what}", value)
        return number
    return convert


def host(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise fail(key, "must be a string (a host name or IP address)", value)
    bracketed = value.startswith("[") and value.endswith("]")
    return _address(value[1:-1] if bracketed else value, key, value)


def path(*, optional: bool) -> Callable[[Any, str], Path | None]:
    def convert(value: Any, key: str) -> Path | None:
        if value == "" and optional:
            return None
        if not isinstance(value, str) or value == "" or "\x00" in value:
            raise fail(key, "must be a file path" + (' or ""' if optional else ""), value)
        return Path(value)
    return convert


def domain(value: Any, key: str, *, leading_dot: bool = True) -> str:
    """A domain name as greyd compares it: lower case, an internationalized
    one as its A-label (either form may be written; a look-alike is refused)."""
    name = value.removesuffix(".") if isinstance(value, str) else ""
    dot = "." if name.startswith(".") else ""
    name = dot + (idn.alabel(name[len(dot):]) or "") if name[len(dot):] else ""
    if len(name) > 253 or not _DOMAIN.fullmatch(name) or name[0] == "." and not leading_dot:
        what = ' (".example.org" for its subdomains)' if leading_dot else ""
        raise fail(key, f"each entry must be a domain name{what}", value)
    return name


def network(value: Any, key: str) -> Network:
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value, strict=False)
        except ValueError:
            pass
    raise fail(key, "each entry must be an IP address or network (CIDR)", value)


def nameserver(value: Any, key: str) -> tuple[str, int]:
    host, port = parse_hostport(value, key, 53)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise fail(key, "each entry must be an IP address, with an optional :port",
                    value) from None


def array(item: Callable[[Any, str], Any]) -> Callable[[Any, str], tuple]:
    def convert(value: Any, key: str) -> tuple:
        if not isinstance(value, list):
            raise fail(key, "must be an array", value)
        return tuple(item(entry, key) for entry in value)
    return convert


CLIENT_KEYS = ("spf", "name", "network")


def client_key(value: Any, key: str) -> tuple[str, ...]:
    """[greylist] client_key: an ordered, duplicate-free choice of CLIENT_KEYS
    that ends with "network", the key every client has."""
    words = array(choice(*CLIENT_KEYS))(value, key)
    if len(set(words)) != len(words):
        raise fail(key, "names a key twice", value)
    if not words or words[-1] != "network":
        raise fail(key, 'must end with "network" (the key every client has)', value)
    return words


def listen(value: Any, key: str) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, list | tuple):
        raise fail(key, 'must be an array of "host:port" strings', value)
    if not value:
        raise fail(key, "needs at least one address")
    return tuple(parse_hostport(entry, key, min_port=0) for entry in value)


_URL_PASSWORD = re.compile(r"(?<=://)([^:@/?#]*):[^@/?#]*@")
_KEYWORD_PASSWORD = re.compile(r"""(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)""")


def database_url(value: Any, key: str) -> str:
    """A PostgreSQL connection string, as libpq takes it: a URL
    (postgresql://user@host:5432/greyd) or keywords (host=… dbname=…); "" = SQLite."""
    text_value = text(spaces=True)(value, key).strip()
    if text_value and not (text_value.startswith(("postgresql://", "postgres://"))
                           or "=" in text_value):
        raise fail(key, "must be a postgresql:// URL or libpq keywords (host=… dbname=…)",
                   redact_url(text_value))
    return text_value


def redact_url(url: str) -> str:
    """A connection string without its password, for logs and listings."""
    url = _URL_PASSWORD.sub(r"\1:***@", url)
    return _KEYWORD_PASSWORD.sub(r"\1***", url)

"""Logging: where log lines go, and the key=value form they take.

`fields()` is the one place that turns values into log text. Any value that
is not a plain printable word is quoted with JSON escapes, so nothing a
client sends (CR, LF, quotes, '=') can split or forge a log line.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
from pathlib import Path

LOGGER = "greyd"
_PLAIN = re.compile(r"[\x21\x23-\x3c\x3e-\x5b\x5d-\x7e]+")
FORMAT = "%(asctime)s greyd[%(process)d]: %(levelname)s %(message)s"


def quote(value: object) -> str:
    text = "" if value is None else str(value)
    if _PLAIN.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=True)


def fields(**values: object) -> str:
    """'key=value key="quoted value"' in the order given."""
    return " ".join(f"{key}={quote(value)}" for key, value in values.items())


def setup(config, *, stderr: bool) -> logging.Logger:
    """Attach the handlers [log] asks for; replaces any earlier ones (reload)."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    level = getattr(logging, config.level.upper())
    logger.setLevel(logging.DEBUG if config.debug_file else level)
    logger.propagate = False
    formatter = logging.Formatter(FORMAT)
    handlers: list[logging.Handler] = []
    if config.file:
        handlers.append(_file_handler(config.file, level))
    if config.debug_file:
        handlers.append(_file_handler(config.debug_file, logging.DEBUG))
    if stderr or not handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(level)
        handlers.append(handler)
    if config.syslog:
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL)
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter("greyd[%(process)d]: %(message)s"))
        logger.addHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def _file_handler(path: Path, level: int) -> logging.Handler:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(level)
    return handler

"""Logging: where log lines go, and the key=value form they take.

`fields()` is the one place that turns values into log text. Any value that
is not a plain printable word is quoted with JSON escapes, so nothing a
client sends (CR, LF, quotes, '=') can split or forge a log line.

`setup()` gives the "greyd" logger one handler, `Batched`: a line is
formatted where it is logged and written, with the lines of the same
moment, by one thread of the process. `info()` is how a session writes its
lines (decision, message, session end) to the "greyd" logger.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import re
import sys
import threading
import time
from pathlib import Path

LOGGER = "greyd"
_PLAIN = re.compile(r"[\x21\x23-\x3c\x3e-\x5b\x5d-\x7e]+")
_PLAIN_LINE = re.compile(r"[a-z_]+=[\x21\x23-\x3c\x3e-\x5b\x5d-\x7e]+"
                         r"(?: [a-z_]+=[\x21\x23-\x3c\x3e-\x5b\x5d-\x7e]+)*")
FORMAT = "%(asctime)s greyd[%(process)d]: %(levelname)s %(message)s"


def quote(value: object) -> str:
    if type(value) is int:
        return str(value)
    text = "" if value is None else str(value)
    if _PLAIN.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=True)


def fields(**values: object) -> str:
    """'key=value key="quoted value"' in the order given."""
    # Most lines need no quoting at all: one look at the whole line then,
    # not one per value. It is the line quote() would make when the line has
    # an '=' per key only (no value holds one, so no value holds a space that
    # the pattern could take for the start of another key) and no value is None.
    line = " ".join([f"{key}={value!s}" for key, value in values.items()])
    if (_PLAIN_LINE.fullmatch(line) and line.count("=") == len(values)
            and None not in values.values()):
        return line
    return " ".join(f"{key}={quote(value)}" for key, value in values.items())


def info(message: str, logger: logging.Logger | None = None) -> None:
    """logger.info(message) (by default on the "greyd" logger), for the
    lines each session writes.

    When `Batched` is the logger's only handler (as `setup` leaves it), the
    line is made here, as that handler's formatter would make it, and
    queued, without a LogRecord. Otherwise (a test's handler, syslog) it
    goes through logging as any other line.
    """
    logger = logger or _logger
    handlers = logger.handlers
    if (len(handlers) == 1 and type(handlers[0]) is Batched and not handlers[0].filters
            and not logger.filters and not logger.propagate
            and logger.isEnabledFor(logging.INFO)):
        handlers[0].queue(logging.INFO, message)
    else:
        logger.info("%s", message)


def setup(config, *, stderr: bool) -> logging.Logger:
    """Attach the handlers [log] asks for; replaces any earlier ones (reload)."""
    logging.logThreads = logging.logMultiprocessing = False     # not in FORMAT
    logger = _logger
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    level = getattr(logging, config.level.upper())
    logger.setLevel(logging.DEBUG if config.debug_file else level)
    logger.propagate = False
    formatter = Formatter(FORMAT)
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
    logger.addHandler(Batched(handlers, formatter))
    return logger


class Formatter(logging.Formatter):
    """logging.Formatter whose time text ("2026-11-21 13:24:18,404") is made
    once a second, not once a line."""

    def __init__(self, fmt: str):
        super().__init__(fmt)
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self.stamp(record.created, record.msecs)

    def stamp(self, created: float, msecs: float) -> str:
        second = int(created)
        cached = self._second               # one read: another thread may replace it
        if cached[0] != second:
            cached = (second, time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second)))
            self._second = cached
        return f"{cached[1]},{int(msecs):03d}"

    def line(self, level: int, message: str) -> str:
        """What format() makes of a record of `message` at `level` logged now,
        with no exception or stack attached (`info`)."""
        created = time.time()
        stamp = self.stamp(created, (created - int(created)) * 1000)
        if self._fmt == FORMAT:             # greyd's own: an f-string, no dict, no getpid()
            return f"{stamp} greyd[{_pid}]: {logging.getLevelName(level)} {message}"
        return self._fmt % {"asctime": stamp, "process": os.getpid(),
                            "levelname": logging.getLevelName(level), "message": message}


def _forked() -> None:
    global _pid
    _pid = os.getpid()


_pid = os.getpid()          # this process's, for log lines (Formatter.line)
_logger = logging.getLogger(LOGGER)
os.register_at_fork(after_in_child=_forked)


# Kept instead of logging.handlers.QueueHandler/QueueListener: through those,
# a deferred session cost 867,000 instructions against 662,000 through this
# (both without info()'s shortcut; callgrind, the daemon under smtp-source),
# and the bench's deferred ratio fell.
class Batched(logging.Handler):
    """The file and stderr handlers, written to by one thread, many lines a write.

    A line is formatted where it is logged (its time and pid are exact) and
    queued; a moment later (DELAY) one thread writes whatever has queued to
    each handler's stream in one write and one flush. Sessions thus never wait
    on the log file or on each other for it. Closing (a reload, a stop, the
    process's exit) and forking write what is queued first.
    """

    DELAY = 0.02

    def __init__(self, targets: list[logging.StreamHandler], formatter: logging.Formatter):
        super().__init__(min((t.level for t in targets), default=logging.NOTSET))
        self.targets = targets
        self.setFormatter(formatter)
        self._reset()
        os.register_at_fork(before=self.flush, after_in_child=self._reset)

    def _reset(self) -> None:
        self._lines: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._writing = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (record.levelno, self.format(record) + "\n")
        except Exception:       # noqa: BLE001 - logging must not break a session
            self.handleError(record)
            return
        self._queue(line)

    def queue(self, level: int, message: str) -> None:
        """What emit() does for a plain record of `message` at `level` (`info`)."""
        if level >= self.level:
            self._queue((level, self.formatter.line(level, message) + "\n"))

    def _queue(self, line: tuple[int, str]) -> None:
        with self._lock:
            if not self._closed:
                self._lines.append(line)
                if len(self._lines) == 1:
                    if self._thread is None:
                        self._thread = threading.Thread(target=self._run, name="log",
                                                        daemon=True)
                        self._thread.start()
                    self._cond.notify()
                return
        with self._writing:             # closed: at once, as a plain handler would
            self._write([line])

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._lines and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            time.sleep(self.DELAY)          # let the lines of this moment gather
            self.flush()

    def handle(self, record: logging.LogRecord) -> bool:
        # emit() takes its own short lock: no handler-wide lock around it.
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def flush(self) -> None:
        with self._cond:
            lines, self._lines = self._lines, []
        with self._writing:             # in order, but not while sessions wait to queue
            self._write(lines)

    def _write(self, lines: list[tuple[int, str]]) -> None:
        for target in self.targets:
            text = "".join(line for level, line in lines if level >= target.level)
            if not text:
                continue
            with target.lock:
                try:
                    target.stream.write(text)
                    target.stream.flush()
                except (OSError, ValueError):
                    pass        # a full disk or a closed stderr must not stop the daemon

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.flush()
        for target in self.targets:
            target.close()
        super().close()


def _file_handler(path: Path, level: int) -> logging.Handler:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(level)
    return handler

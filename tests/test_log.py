"""The log line's form: greyd's formatter writes what logging's own would."""

from __future__ import annotations

import io
import logging
import os
import re
import time

import pytest
from hypothesis import example, given, settings, strategies as st

from greyd import log

pytestmark = pytest.mark.timeout(30)


def record_at(created: float) -> logging.LogRecord:
    record = logging.LogRecord("greyd", logging.INFO, __file__, 1, "decision %s",
                               ("action=greylist",), None)
    record.created, record.msecs = created, (created % 1) * 1000
    return record


@pytest.mark.parametrize("times", [
    [1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.0, 1_700_000_000.5],
    [1_800_000_059.25, 1_800_000_060.75, 1_800_003_600.5],
], ids=["within and across a second, and back", "minute and hour turns"])
def test_time_text_is_logging_s_own(times):
    ours, stdlib = log.Formatter(log.FORMAT), logging.Formatter(log.FORMAT)
    for created in times:
        record = record_at(created)
        assert ours.format(record) == stdlib.format(record)
        assert ours.format(record).endswith("INFO decision action=greylist")


def test_fields_quote_what_is_not_a_plain_word():
    assert log.fields(a=300, b=None, c="x y", d='q"=') == 'a=300 b="" c="x y" d="q\\"="'


# Values that come close to a plain line: spaces and '=' that could pass for
# another key, quotes, backslashes, line ends, nothing at all.
tricky = st.text(alphabet='ab_= "\\\r\n\0é', max_size=8)


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(values=st.dictionaries(st.from_regex(r"[a-z_]{1,6}", fullmatch=True),
                              st.one_of(st.none(), st.integers(), tricky, st.text(max_size=8)),
                              min_size=1, max_size=5))
@example(values={"helo": "x action=accept", "to": "y"})
@example(values={"helo": "x", "to": "a b=c"})
@example(values={"a": "", "b": "c"})
def test_fields_quote_each_value_as_quote_alone_would(values):
    """The whole-line shortcut gives the line that quoting value by value gives."""
    assert log.fields(**values) == " ".join(f"{k}={log.quote(v)}" for k, v in values.items())


STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


@pytest.fixture
def batched():
    """A logger as log.setup leaves it: greyd's batching handler alone, on a stream."""
    stream = io.StringIO()
    target = logging.StreamHandler(stream)
    handler = log.Batched([target], log.Formatter(log.FORMAT))
    # Not through getLogger(): pytest adds its capturing handlers to every
    # registered logger that does not propagate, and log.info would then take
    # logging's way, not its own.
    logger = logging.Logger(f"{log.LOGGER}.test_log")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    yield logger, handler, stream
    assert logger.handlers == [handler]
    logger.removeHandler(handler)
    handler.close()


def test_info_writes_the_line_logging_would(batched):
    logger, handler, stream = batched
    before = time.strftime("%Y-%m-%d %H:%M:%S")
    logger.info("decision %s", 'to=bob action=greylist reason="new"')
    log.info('decision to=bob action=greylist reason="new"', logger)
    handler.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert all(STAMP.match(line) and line[:19] >= before for line in lines), lines
    assert STAMP.sub("", lines[0]) == STAMP.sub("", lines[1]) == \
        f'greyd[{os.getpid()}]: INFO decision to=bob action=greylist reason="new"'


def test_info_names_a_forked_worker_by_its_own_pid(batched):
    logger, handler, stream = batched
    read, write = os.pipe()
    child = os.fork()
    if child == 0:                  # the worker: its line, through the pipe, then out
        try:
            log.info("decision to=bob", logger)
            handler.flush()
            os.write(write, stream.getvalue().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        line = pipe.read().decode()
    assert os.waitpid(child, 0)[1] == 0
    assert STAMP.sub("", line) == f"greyd[{child}]: INFO decision to=bob\n"


def test_info_goes_through_logging_when_another_handler_listens(batched):
    logger, handler, stream = batched
    seen: list[logging.LogRecord] = []
    other = logging.Handler()
    other.emit = seen.append
    logger.addHandler(other)
    try:
        log.info("session end id=1", logger)
    finally:
        logger.removeHandler(other)
    quiet = logging.Logger(logger.name, logging.WARNING)    # (setLevel() would leave the
    quiet.propagate = False                                 # level cache of a logger that
    quiet.addHandler(handler)                               # getLogger() did not make)
    log.info("decision id=2", quiet)                # below the logger's level: nothing
    handler.flush()
    assert [record.getMessage() for record in seen] == ["session end id=1"]
    assert [STAMP.sub("", line) for line in stream.getvalue().splitlines()] == \
        [f"greyd[{os.getpid()}]: INFO session end id=1"]

"""The log line's form: greyd's formatter writes what logging's own would."""

from __future__ import annotations

import logging

import pytest

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

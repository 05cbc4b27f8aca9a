"""bench/replay.py: kinds of sender replayed against a real greyd, time compressed.

Each replay is real SMTP over loopback (clients from 127.x.y.z and ::1), a
real aiosmtpd upstream and a real UDP DNS server serving the senders' SPF
records and reverse names; greyd's clock jumps to each attempt. One replay
per config, shared by the tests that read it: the default (client_key
["spf", "network"], mode "all"), client_key ["network"] (keyed as before
SPF keys) and mode "suspicious".
"""

from __future__ import annotations

import random

import pytest

from bench.replay import (KINDS, MAX_BACKOFF, MIN_BACKOFF, QUEUE_RUN, Kind, letters, replay,
                          schedule, table)

pytestmark = pytest.mark.timeout(120)

LEGITIMATE = [kind.name for kind in KINDS if not kind.bot]
BOTS = [kind.name for kind in KINDS if kind.bot]
NETWORK = {"greylist": {"client_key": ["network"]}}
SUSPICIOUS = {"greylist": {"mode": "suspicious"}}


def replayed(overrides: dict) -> dict:
    problems: list[str] = []
    results = replay(overrides, KINDS, seed=1, problems=problems)
    assert problems == [], problems     # greyd logged no warning or error
    return results


@pytest.fixture(scope="module")
def default():
    """The default config: client_key ["spf", "network"], mode "all" (once they exist)."""
    return replayed({})


@pytest.fixture(scope="module")
def network():
    """Triplets keyed by the client's network alone (greyd before SPF keys)."""
    return replayed(NETWORK)


@pytest.fixture(scope="module")
def suspicious():
    return replayed(SUSPICIOUS)


# -- the schedules -----------------------------------------------------------------------

def test_postfix_schedule_backs_off_by_the_message_age_at_queue_scans():
    times = schedule(Kind("mta", 1, "postfix", "mta.test"), random.Random(3))
    assert times[0] == 0 and 300 <= times[1] < 600
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    for age, gap in zip(times[1:], gaps[1:]):
        backoff = min(max(age, MIN_BACKOFF), MAX_BACKOFF)
        assert backoff <= gap < backoff + QUEUE_RUN
    assert times[-1] <= 2 * 86400 < times[-1] + MAX_BACKOFF + 300


def test_bots_give_up_when_their_schedule_ends():
    early = schedule(Kind("bot", 1, "every", "bot.test", every=60, jitter=0, gives_up=240),
                     random.Random(1))
    assert early == [0, 60, 120, 180, 240]
    assert schedule(Kind("bot", 1, "every", "bot.test", gives_up=0), random.Random(1)) == [0]


def test_indexes_have_no_digits():
    assert [letters(n) for n in (0, 25, 26, 27, 701, 702)] == [
        "a", "z", "aa", "ab", "zz", "aaa"]


# -- what every config must give ---------------------------------------------------------

def delivered_once(results: dict) -> None:
    for name in LEGITIMATE:
        result = results[name]
        assert result.delivered == result.messages == result.upstream_messages, (name, result)
        assert result.duplicates == 0 and result.errors == 0, (name, result)


def nothing_from_bots(results: dict) -> None:
    for name in BOTS:
        result = results[name]
        assert result.delivered == 0 and result.accepted == 0, (name, result)
        assert result.upstream_rcpts == 0 and result.upstream_messages == 0, (name, result)
        assert min(result.deferrals) >= 1, (name, result)


def test_default_every_legitimate_message_is_delivered_exactly_once(default):
    delivered_once(default)


def test_default_no_bot_gets_a_recipient_through(default):
    nothing_from_bots(default)


def test_default_one_mta_and_hosts_in_one_network_are_deferred_once(default):
    for name in ("one-mta", "one-net"):
        assert set(default[name].deferrals) == {1}, (name, default[name])
        assert 300 <= default[name].delay(0) and default[name].delay(100) < 600


def test_network_key_makes_the_pool_retry_until_a_network_repeats(network):
    delivered_once(network)
    nothing_from_bots(network)
    pool = network["pool"]
    assert sum(deferrals > 1 for deferrals in pool.deferrals) > pool.messages / 2, pool
    assert set(network["dual-stack"].deferrals) == {2}    # IPv4 and IPv6: two networks


def test_default_spf_pool_passes_on_its_first_retry(default):
    pool = default["pool"]
    assert set(pool.deferrals) == {1}, pool
    assert all(300 <= delay <= 600 for delay in pool.delays), pool


def test_default_dual_stack_spf_sender_is_deferred_once(default):
    assert set(default["dual-stack"].deferrals) == {1}, default["dual-stack"]


def test_suspicious_mode_lets_the_verified_pool_through_at_once(suspicious):
    delivered_once(suspicious)
    nothing_from_bots(suspicious)
    pool = suspicious["pool"]
    assert set(pool.deferrals) == {0} and set(pool.delays) == {0}, pool


def test_table_has_a_row_per_kind(default):
    lines = table(default).splitlines()
    assert lines[0].startswith("| kind | messages | delivered |")
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[2:]] == [
        kind.name for kind in KINDS]

"""The operator's work on the store: triplets listed and deleted, cleanup, stats.

Owns the SQL of `greyd triplets`, `greyd cleanup` and `greyd stats`, run on a
store's connection: SQLite's (store.py) or PostgreSQL's (postgres.py), which
take the same SQL; `_whole` is the one place the two differ. store.py and
postgres.py keep the schemas, queries.py the daemon's queries. All SQL is
parameterized (table and column names are constants of this module).
Nothing here formats output or reads the config: the CLI (cli_maintenance.py)
passes settings in and turns the results into tables and JSON.

Writes go in short batches, each its own transaction. SQLite has one writer,
and the daemon writes once per RCPT with a 5 s busy timeout, so a transaction
here must hold the write lock for milliseconds, never for a whole table. The
triplets table has no secondary index (bytes per triplet matter), so it is
walked in primary-key order a chunk at a time, and each chunk's expired rows
are deleted by primary key in a transaction of their own.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from . import idn, policy
from .storage import COUNTER_KEEP, COUNTER_MINUTES, SESSION, SESSION_KINDS
from .queries import transaction
from .whitelist import KINDS as WHITELIST_KINDS

BATCH_SIZE = 2000       # rows per chunk of a walk, so at most this many per write transaction
REST = 2.0             # after each write transaction the lock stays free this many times as long
MAX_PAUSE = 0.5        # seconds: the longest rest between two write transactions
LARGE_STORE = 50_000    # triplets from which cleanup shows a progress bar on a terminal
ACTIONS = (policy.GREYLIST, policy.ACCEPT, policy.REJECT)  # always reported, even at 0
CLEANUP_KINDS = ("pending_triplets", "passed_triplets", "auto_whitelist", "whitelist", "counters")
DELAY_WINDOWS = {"day": 86400, "week": 7 * 86400}   # greylisting delay, by passed_at
HELD_LONGEST = 5        # sender domains `stats` shows as the ones held longest

TRIPLET_KEY = ("network", "sender", "recipient")

# progress(table, rows walked in this chunk, rows removed so far in this table)
Progress = Callable[[str, int, int], None]


# -- which triplets -----------------------------------------------------------------

@dataclass(frozen=True)
class TripletFilter:
    """A WHERE clause over triplets, built from what an operator types."""

    clauses: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.clauses

    @property
    def sql(self) -> str:
        return " AND ".join(self.clauses) or "1 = 1"


def triplet_filter(*, state: str | None = None, client: str | None = None,
                   sender: str | None = None, recipient: str | None = None,
                   ipv4_prefix: int = 24, ipv6_prefix: int = 64) -> TripletFilter:
    """The filter for `greyd triplets list|delete`; ValueError names a bad client.

    `state`: "pending" or "passed". `client`: an address, matched by the network
    the daemon would record for it, or a network as stored (192.0.2.0/24).
    `sender`: normalized as the daemon does (an exact normalized value matches
    too). `recipient`: case-insensitive. Either address may be `@domain`; an
    internationalized domain in either form (kept as its A-label).
    """
    clauses: list[str] = []
    params: dict[str, str] = {}
    if state == "pending":
        clauses.append("passed_at IS NULL")
    elif state == "passed":
        clauses.append("passed_at IS NOT NULL")
    elif state is not None:
        raise ValueError(f"unknown triplet state: {state}")
    if client is not None:
        clauses.append("network = :network")
        params["network"] = network_of(client, ipv4_prefix, ipv6_prefix)
    if sender is not None:
        typed = "<>" if sender.strip() in ("", "<>") else idn.address_key(sender.strip())
        values = sorted({policy.normalize_sender(typed if typed != "<>" else ""), typed})
        clauses.append(_address_clause("sender", values, params))
    if recipient is not None:
        clauses.append(_address_clause("recipient", [idn.address_key(recipient.strip())],
                                       params))
    return TripletFilter(tuple(clauses), params)


def network_of(client: str, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The triplet network of an address (cut to the prefixes), a network as
    typed, or a client key as stored (`spf:example.com`, `name:example.com`)."""
    client = client.strip()
    kind, colon, domain = client.partition(":")
    if colon and kind.lower() in ("spf", "name") and domain:
        name = idn.alabel(domain.rstrip("."))
        if name is None:
            raise ValueError(f"not a domain name: {domain}")
        return f"{kind.lower()}:{name}"
    try:
        return policy.client_network(client, ipv4_prefix, ipv6_prefix)
    except ValueError:
        pass
    try:
        return str(ipaddress.ip_network(client, strict=False))
    except ValueError:
        raise ValueError(f"not an IP address or network: {client}") from None


def _address_clause(column: str, values: list[str], params: dict) -> str:
    """`column` equal to one of `values`; a value `@domain` matches the whole domain."""
    tests = []
    for value in values:
        name = f"{column}{len(params)}"
        if value.startswith("@"):
            params[name] = "%" + _like_escape(value)
            tests.append(f"{column} LIKE :{name} ESCAPE '\\'")
        else:
            params[name] = value
            tests.append(f"{column} = :{name}")
    return "(" + " OR ".join(tests) + ")"


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# -- triplets list / delete -----------------------------------------------------------

@dataclass(frozen=True)
class TripletRow:
    network: str
    sender: str
    recipient: str
    first_seen: int
    last_seen: int
    passed_at: int | None

    @property
    def state(self) -> str:
        return "pending" if self.passed_at is None else "passed"

    def as_dict(self) -> dict:
        return {**self.__dict__, "state": self.state}


def list_triplets(conn, where: TripletFilter,
                  limit: int = 0) -> tuple[list[TripletRow], bool]:
    """Matching triplets in key order, at most `limit` (0: all); and whether more match."""
    # first_seen keeps the fraction of the first attempt's second (policy.judge); listed whole.
    columns = f"network, sender, recipient, {_whole(conn, 'first_seen')}, last_seen, passed_at"
    sql = (f"SELECT {columns} FROM triplets WHERE {where.sql}"
           f" ORDER BY {', '.join(TRIPLET_KEY)}")
    params = dict(where.params)
    if limit:
        sql += " LIMIT :limit"
        params["limit"] = limit + 1
    rows = [TripletRow(*row) for row in conn.execute(sql, params)]
    more = bool(limit) and len(rows) > limit
    return rows[:limit] if limit else rows, more


def delete_triplets(conn, where: TripletFilter, *, dry_run: bool = False,
                    batch_size: int = BATCH_SIZE, progress: Progress | None = None) -> int:
    """Delete the matching triplets in short batches; how many (would have) matched."""
    if dry_run:
        return _count(conn, "triplets", where.sql, where.params)
    removed = _sweep(conn, "triplets", TRIPLET_KEY, {"matched": where.sql}, where.params,
                     batch_size=batch_size, progress=progress)
    return removed["matched"]


# -- cleanup ---------------------------------------------------------------------------

def cleanup(conn, *, retry_window: int, max_age: int, now: float,
            dry_run: bool = False, batch_size: int = BATCH_SIZE,
            progress: Progress | None = None) -> dict[str, int]:
    """Forget expired state; rows removed (or, with dry_run, to remove) per kind.

    A pending triplet whose first try is older than retry_window could only
    start over; a passed triplet or an auto-whitelisted network unseen for
    max_age is forgotten (the daemon's decision treats both as new already);
    a whitelist entry whose `expires` is past no longer matches; decision
    counters older than COUNTER_KEEP are past what stats shows.
    """
    params = {"pending_before": int(now) - retry_window,
              "unseen_since": int(now) - max_age, "now": int(now),
              "counted_before": int(now) - COUNTER_KEEP}
    triplets = {
        "pending_triplets": "passed_at IS NULL AND first_seen < :pending_before",
        "passed_triplets": "passed_at IS NOT NULL AND last_seen < :unseen_since",
    }
    auto = {"auto_whitelist": "last_seen < :unseen_since"}
    whitelist = {"whitelist": "expires IS NOT NULL AND expires <= :now"}
    counters = {"counters": "hour < :counted_before"}
    sweeps = [("triplets", TRIPLET_KEY, triplets), ("auto_whitelist", ("network",), auto),
              ("whitelist", ("kind", "value"), whitelist),
              ("counters", ("hour", "action", "reason"), counters)]
    removed: dict[str, int] = {}
    for table, key, kinds in sweeps:
        if dry_run:
            removed.update({kind: _count(conn, table, condition, params)
                            for kind, condition in kinds.items()})
        else:
            removed.update(_sweep(conn, table, key, kinds, params,
                                  batch_size=batch_size, progress=progress))
    return removed


def count_triplets(conn) -> int:
    return conn.execute("SELECT count(*) FROM triplets").fetchone()[0]


def _count(conn, table: str, condition: str, params: dict) -> int:
    return conn.execute(f"SELECT count(*) FROM {table} WHERE {condition}", params).fetchone()[0]


def _sweep(conn, table: str, key: tuple[str, ...], kinds: dict[str, str],
           params: dict, *, batch_size: int, progress: Progress | None) -> dict[str, int]:
    """Walk `table` in key order, `batch_size` rows a chunk, deleting the rows each
    condition of `kinds` names; one short write transaction per chunk.

    The delete re-checks its condition, so a row the daemon refreshed between
    the read and the delete stays. Between transactions the write lock is left
    free REST times as long as it was held, so the daemon's writers (which
    retry with SQLite's busy-handler backoff) get their turn.
    """
    by_key = " AND ".join(f"{column} = :k{i}" for i, column in enumerate(key))
    deletes = [f"DELETE FROM {table} WHERE {by_key} AND ({condition})"
               for condition in kinds.values()]
    removed = dict.fromkeys(kinds, 0)
    for chunk in _chunks(conn, table, key, list(kinds.values()), params, batch_size):
        doomed: list[list[dict]] = [[] for _ in kinds]
        for *values, which in chunk:
            if which >= 0:
                doomed[which].append({**params, **_keys(values)})
        if any(doomed):
            with transaction(conn):
                locked = time.monotonic()
                for kind, sql, keys in zip(kinds, deletes, doomed):
                    if keys:
                        removed[kind] += conn.executemany(sql, keys).rowcount
            time.sleep(min(REST * (time.monotonic() - locked), MAX_PAUSE))
        if progress is not None:
            progress(table, len(chunk), sum(removed.values()))
    return removed


def _chunks(conn, table: str, key: tuple[str, ...], conditions: list[str],
            params: dict, batch_size: int) -> Iterator[list[tuple]]:
    """The rows of `table` in key order, `batch_size` at a time, each row its key
    and the index of the first condition it meets (-1: none).

    Each chunk is one read that starts where the last ended (a row-value
    range on the primary key), so no read or write ever spans the table.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    columns = ", ".join(key)
    marks = ", ".join(f":k{i}" for i in range(len(key)))
    which = " ".join(f"WHEN {condition} THEN {i}" for i, condition in enumerate(conditions))
    select = f"SELECT {columns}, CASE {which} ELSE -1 END FROM {table}"
    order = f" ORDER BY {columns} LIMIT :batch"
    chunk = conn.execute(select + order, {**params, "batch": batch_size}).fetchall()
    while chunk:
        yield chunk
        if len(chunk) < batch_size:
            return
        chunk = conn.execute(f"{select} WHERE ({columns}) > ({marks}){order}",
                             {**params, "batch": batch_size, **_keys(chunk[-1][:-1])}).fetchall()


def _whole(conn, expr: str) -> str:
    """`expr`'s whole seconds, the fraction cut off (PostgreSQL's CAST rounds)."""
    postgresql = getattr(conn, "dialect", "sqlite") == "postgresql"
    return f"CAST(trunc({expr}) AS BIGINT)" if postgresql else f"CAST({expr} AS INTEGER)"


def _keys(values) -> dict[str, object]:
    return {f"k{i}": value for i, value in enumerate(values)}


# -- stats -------------------------------------------------------------------------

def stats(conn, *, auto_whitelist_after: int, max_age: int,
          now: float) -> dict:
    """Sizes of the store and the decisions counted over the last hour and day.

    Counters are kept per clock hour, so "hour" covers the current hour and the
    one before it, and "day" the current hour and the 24 before it: at least
    the period named, never less; `since` says where each begins.
    """
    now = int(now)
    pending, passed = conn.execute(
        "SELECT count(*) - count(passed_at), count(passed_at) FROM triplets").fetchone()
    tracked, whitelisted = conn.execute(
        "SELECT count(*), coalesce(sum(CASE WHEN count >= :after"
        " AND last_seen >= :unseen_since THEN 1 ELSE 0 END), 0) FROM auto_whitelist",
        {"after": auto_whitelist_after, "unseen_since": now - max_age}).fetchone()
    whitelist = dict.fromkeys(WHITELIST_KINDS, 0)
    for kind, count in conn.execute(
            "SELECT kind, count(*) FROM whitelist WHERE expires IS NULL OR expires > :now"
            " GROUP BY kind", {"now": now}):
        whitelist[kind] = count
    whitelist["expired"] = _count(conn, "whitelist", "expires IS NOT NULL AND expires <= :now",
                                  {"now": now})
    hour_ago, day_ago = _minute(now - 3600), _minute(now - 86400)
    return {
        "triplets": {"pending": pending, "passed": passed, "total": pending + passed},
        "auto_whitelist": {"whitelisted": whitelisted if auto_whitelist_after > 0 else 0,
                           "tracked": tracked, "after": auto_whitelist_after},
        "whitelist": whitelist,
        "decisions": {"hour": decisions(conn, hour_ago), "day": decisions(conn, day_ago)},
        "sessions": {"hour": sessions(conn, hour_ago), "day": sessions(conn, day_ago)},
        "greylist_delay": {name: greylist_delay(conn, now - seconds, now)
                           for name, seconds in DELAY_WINDOWS.items()},
        "held_longest": held_longest(conn, now - DELAY_WINDOWS["week"], now),
    }


def _minute(t: int) -> int:
    """The start of the counters' minute that holds `t`."""
    return t - t % COUNTER_MINUTES


def sessions(conn, since: int) -> dict:
    """Sessions ended from the hour `since` on, over TLS and in plaintext."""
    counts = dict.fromkeys(SESSION_KINDS, 0)
    for kind, count in conn.execute(
            "SELECT reason, sum(count) FROM counters WHERE hour >= :since AND action = :action"
            " GROUP BY reason", {"since": since, "action": SESSION}):
        counts[kind] = count
    return {"since": since, **counts}


def decisions(conn, since: int) -> dict:
    """Decisions counted from the hour `since` on: total, per action, per action and reason."""
    actions = dict.fromkeys(ACTIONS, 0)
    reasons: dict[str, dict[str, int]] = {action: {} for action in ACTIONS}
    for action, reason, count in conn.execute(
            "SELECT action, reason, sum(count) FROM counters"
            " WHERE hour >= :since AND action != :session"
            " GROUP BY action, reason ORDER BY action, sum(count) DESC, reason",
            {"since": since, "session": SESSION}):
        actions[action] = actions.get(action, 0) + count
        reasons.setdefault(action, {})[reason] = count
    return {"since": since, "total": sum(actions.values()), "actions": actions,
            "reasons": reasons}


# The delays of the triplets that passed in a window, each with its rank in
# its partition (nearest rank: the p-th percentile of n is the value of rank
# ceil(p * n / 100), 1-based). The triplets table has no index on passed_at,
# so this is one scan of the table and one sort of the window's delays.
_RANKED = """
    SELECT part, delay, row_number() OVER w AS rank,
           count(*) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS n
    FROM (SELECT {partition} AS part, {delay} AS delay
          FROM triplets
          WHERE passed_at > :since AND passed_at <= :now) AS delays
    WINDOW w AS (PARTITION BY part ORDER BY delay)"""
_NEAREST = "({p} * n + 99) / 100"
# The sender's domain: what follows its last '@' (rtrim strips every trailing
# character but '@'); the null sender '<>' has none and stays '<>'.
_DOMAIN = "substr(sender, length(rtrim(sender, replace(sender, '@', ''))) + 1)"


def greylist_delay(conn, since: int, now: int) -> dict:
    """How long greylisting held the triplets that passed after `since` (up to
    `now`): how many, and the median, 90th percentile (nearest rank) and
    longest delay in seconds, None when none passed. Three rows leave SQLite."""
    figures = {"since": since, "passed": 0, "median": None, "p90": None, "max": None}
    ranked = _RANKED.format(partition=0, delay=_whole(conn, "passed_at - first_seen"))
    sql = (f"SELECT n, rank, delay FROM ({ranked}) AS ranked"
           f" WHERE rank IN ({_NEAREST.format(p=50)}, {_NEAREST.format(p=90)}, n)")
    for n, rank, delay in conn.execute(sql, {"since": since, "now": now}):
        figures["passed"] = n
        for name, p in (("median", 50), ("p90", 90), ("max", 100)):
            if rank == (p * n + 99) // 100:
                figures[name] = delay
    return figures


def held_longest(conn, since: int, now: int,
                 limit: int = HELD_LONGEST) -> list[dict]:
    """The sender domains whose mail passing after `since` was held longest:
    by longest delay, then median (nearest rank), then the most triplets."""
    ranked = _RANKED.format(partition=_DOMAIN, delay=_whole(conn, "passed_at - first_seen"))
    sql = (f"SELECT part, n, max(delay), max(CASE WHEN rank = {_NEAREST.format(p=50)}"
           f" THEN delay END) AS median FROM ({ranked}) AS ranked"
           " GROUP BY part, n ORDER BY max(delay) DESC, median DESC, n DESC, part LIMIT :limit")
    return [{"domain": domain, "passed": n, "max": longest, "median": median}
            for domain, n, longest, median in conn.execute(
                sql, {"since": since, "now": now, "limit": limit})]

"""The tests' throwaway PostgreSQL server: bench/pgserver.py's, shared with
scripts/bench --store postgresql (durability off here, for speed).
This is a helper module, not a test module.
"""

from bench.pgserver import PASSWORD, SUPERUSER, PgServer, binaries  # noqa: F401

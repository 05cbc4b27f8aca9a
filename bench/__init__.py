"""greyd's benchmark: how fast greyd is, measured against what loopback SMTP allows.

It starts greyd (a temporary config, database and log) and a fast upstream
sink on 127.0.0.1, drives greyd with a concurrent SMTP client, runs the same
client and dialogues straight against the sink in the same run, and prints
every figure with its ratio to the sink and its target:

  throughput  deferred sessions/s (fresh triplets: connect, HELO/EHLO, MAIL,
              RCPT -> 4xx, QUIT) and passed messages/s (1 KiB, relayed to the
              sink), at concurrency 20 and 100; p50/p99 session latency
  tls         deferred sessions/s at concurrency 100, greyd against Postfix +
              postgrey (private instances, the same sink): plaintext, and over
              STARTTLS (TLS 1.3, a full handshake per session, the Python
              client); the CPU each side spends per session
  memory      greyd's RSS idle, and with 1,000 idle connections held open
              (plaintext; and after STARTTLS, to a greyd offering it)
  store       one decision (Greylister.decide, as the daemon) at 1,000,000
              triplets; database bytes per triplet; `greyd cleanup` removing
              1,000,000 expired triplets while a client keeps sending RCPTs
  replay      sender kinds (one MTA, a /24, a big SPF pool, a dual-stack
              sender, three kinds of bot) replayed against a greyd on the
              injectable clock: per kind, messages delivered, delay and
              deferrals; for the default config, client_key = ["network"]
              and mode = "suspicious" (not under --quick)

greyd's store is SQLite (a file per greyd) unless --store postgresql: then
every section but replay runs greyd on PostgreSQL, a throwaway server the
bench initdb's and starts on 127.0.0.1 (or the one --database-url names),
with PostgreSQL's targets where the issues set them apart.

Postfix's smtp-source and smtp-sink are the reference client and sink when
installed; otherwise a pure-Python asyncio client and sink stand in, and the
output says so. Session latencies always come from the Python client. Speed
is reported, never asserted: the exit status is 0 when every measurement ran,
1 when one failed. Everything started here is stopped on exit, and every load
loop is bounded in count and in time.

The modules, one job each:

  processes   child processes: start, wait for a 220, stop; bounded runs
  sink        the sinks: smtp-sink and the Python sink
  client      the load clients: smtp-source and the Python client (STARTTLS too)
  certificate the certificate the servers present (trustme), the client's TLS
  daemon      the greyd under test: config, start, stop, CPU, RSS, its log
  database    greyd's store for the run: SQLite, or PostgreSQL (filled with COPY)
  pgserver    a throwaway PostgreSQL server on loopback (shared with the tests)
  postfix     private Postfix instances (shared with the tests)
  postgrey    a private postgrey, the tls section's policy server
  report      tables, targets, failures and the statistics they print
  throughput  section: sessions and messages per second, session latency
  tls         section: greyd against Postfix + postgrey, plaintext and TLS
  memory      section: greyd's RSS idle and with idle connections held
  triplets    realistic triplets and a database holding them
  store       section: decision time, bytes per triplet, cleanup under load
  dnsserver   a real UDP DNS server (dnspython), for the replay's zones and the tests
  replay      section: the trace replay of sender kinds (also tests/test_replay.py)
  cli         the command line, the header, the summary

The package needs only the standard library, greyd (its store and policy
modules for the store section; the `greyd` command for the daemon; its
server in-process for the replay, with dnspython) and greyd's test extra:
trustme for TLS, aiosmtpd for the replay's upstream; psycopg (greyd's
postgresql extra) and PostgreSQL's binaries for --store postgresql. Postfix + postgrey need root, Postfix and
postgrey; without them the tls section measures greyd alone and says why.
It is not installed with greyd: scripts/bench puts the repository root on
sys.path.
"""

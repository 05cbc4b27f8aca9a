"""What every session of one daemon shares: its settings, greylister, DNS
lookups, certificate, what the upstream offers, and how a session reaches
the upstream. A reload makes a new Context; open sessions keep theirs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from . import tls
from .dns import Lookup
from .greylist import Greylister
from .relay import Relay
from .tls import Certificate
from .upstream import Capabilities


@dataclass
class Context:
    """What every session of one daemon shares: settings, greylister, DNS,
    how a session reaches the upstream (`relay`, a Relay or a class like
    it) and what the upstream offers (`upstream`).

    `lookup` is built from config.dns when not given; whoever stops the
    daemon closes it. `upstream` is built from config.upstream when not
    given, unknown until probed (`Capabilities.refresh`).
    """

    config: object
    greylister: Greylister
    lookup: Lookup | None = None
    relay: type[Relay] = Relay
    # STARTTLS's certificate (None: not offered); by default loaded from config.tls
    tls: Certificate | None | object = tls.FROM_CONFIG
    stopping: threading.Event = field(default_factory=threading.Event)
    # True while connections are scarce; the server sets it (Postfix's "stress").
    under_pressure: Callable[[], bool] = field(default=lambda: False)
    upstream: Capabilities | None = None

    def __post_init__(self):
        if self.lookup is None:
            self.lookup = Lookup(self.config.dns)
        if self.tls is tls.FROM_CONFIG:
            self.tls = tls.load(self.config.tls)
        if self.upstream is None:
            self.upstream = Capabilities.for_config(self.config)

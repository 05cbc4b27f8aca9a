"""Test certificates: a trustme CA, and certificate and key files it issued.
This is a helper module, not a test module.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import trustme

HOST = "mx.greyd.test"        # server.hostname in conftest's base config


class Certs:
    """A test CA, and certificate/key files it issued, written under `root`."""

    def __init__(self, root: Path):
        self.ca = trustme.CA()
        self.root = root
        self.count = 0
        self.ca.cert_pem.write_to_path(str(root / "ca.pem"))

    def issue(self, *names: str, days: int = 365) -> tuple[Path, Path]:
        """A certificate for `names` (HOST by default), valid `days` more days:
        (cert file with chain, key file)."""
        self.count += 1
        now = datetime.datetime.now(datetime.UTC)
        leaf = self.ca.issue_cert(*(names or (HOST,)), not_before=now - datetime.timedelta(days=1),
                                  not_after=now + datetime.timedelta(days=days))
        cert, key = self.root / f"cert{self.count}.pem", self.root / f"key{self.count}.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        return cert, key

    def client(self, **options) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        for name, value in options.items():
            setattr(context, name, value)
        return context

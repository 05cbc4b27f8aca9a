"""Certificates for the benchmark: the one every server presents, and the client's side.

Owns: a throwaway CA and a server certificate for the bench's servers (made
with trustme, written as PEM files), and the client's SSL context: TLS 1.3
only, no session ever resumed (a fresh full handshake per session). Must
not: speak SMTP, or start anything.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from bench.processes import HOST, BenchError

SERVER_NAME = "mx.bench.test"       # the name the client asks for and verifies


@dataclass(frozen=True)
class Certificate:
    """A server certificate and its key (PEM files), and the CA that signed it."""

    cert: Path                  # the server certificate followed by its chain
    key: Path
    ca: Path


def make_certificate(directory: Path) -> Certificate:
    """A new CA and an ECDSA server certificate for SERVER_NAME and HOST, in `directory`."""
    try:
        import trustme
    except ImportError as error:
        raise BenchError("TLS needs trustme (pip install trustme; it is in greyd's "
                         "test extra)") from error
    directory.mkdir(parents=True, exist_ok=True)
    authority = trustme.CA()
    leaf = authority.issue_cert(SERVER_NAME, HOST)
    paths = Certificate(directory / "server.pem", directory / "server.key",
                        directory / "ca.pem")
    paths.cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(paths.key))
    paths.key.chmod(0o600)
    authority.cert_pem.write_to_path(str(paths.ca))
    return paths


def client_context() -> ssl.SSLContext:
    """TLS 1.3 only; the certificate is not checked, as a sender with opportunistic
    TLS (Postfix's smtp_tls_security_level = may or encrypt) does not check it.
    asyncio never hands a session to a new connection, so every handshake is a
    full one."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context

"""Inbound STARTTLS (RFC 3207): greyd's certificate and its TLS settings.

`load(config.tls)` reads the certificate (the file may hold the chain) and
its key into a server `ssl.SSLContext`, or refuses with one line naming
the key at fault (`TlsError`): an unreadable file, a key that does not
match, a cipher list OpenSSL does not know. The context has compression
and renegotiation off and `tls.min_version` as its floor. `ExpiryWatch`
warns in the log, at start and then once a day, when the certificate
expires within 14 days. Nothing here reads or writes a client socket: the
handshake is the connection's (connection.Connection.start_tls).
"""

from __future__ import annotations

import datetime
import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from . import log
from .values import ConfigError

EXPIRY_WARNING = datetime.timedelta(days=14)
WARN_EVERY = 86400.0        # seconds between two looks at the expiry date

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

FROM_CONFIG = object()      # "load the certificate config.tls names" (context.Context)

logger = logging.getLogger(__name__)


class TlsError(ConfigError):
    """A certificate or key greyd cannot serve; the text names the key."""


@dataclass(frozen=True)
class Certificate:
    """A loaded certificate: the server context built on it, and what an
    operator wants to know of it."""

    context: ssl.SSLContext
    path: Path
    subject: str
    names: tuple[str, ...]
    not_after: datetime.datetime       # UTC

    def expires_within(self, span: datetime.timedelta,
                       now: datetime.datetime | None = None) -> bool:
        now = now or datetime.datetime.now(datetime.UTC)
        return self.not_after - now <= span

    def describe(self) -> list[str]:
        """Lines for `greyd check`."""
        return [f"subject: {self.subject}",
                f"names:   {', '.join(self.names) or '-'}",
                f"expires: {self.not_after:%Y-%m-%d %H:%M:%S} UTC"]


def load(tls_config) -> Certificate | None:
    """The certificate and context of `tls_config`; None when no cert is set."""
    if tls_config.cert is None:
        return None
    cert_pem = _read(tls_config.cert, "tls.cert")
    _read(tls_config.key, "tls.key")
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError:
        raise TlsError(f"tls.cert: {tls_config.cert}: no PEM certificate in it") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls_config.min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    # An end of stream without close_notify ends the reading only: greyd can
    # still say its 421 when a stop cuts an idle session's reads short.
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    if tls_config.ciphers:
        try:
            context.set_ciphers(tls_config.ciphers)
        except ssl.SSLError:
            raise TlsError(f"tls.ciphers: no cipher matches {tls_config.ciphers!r}") from None
    try:
        context.load_cert_chain(tls_config.cert, tls_config.key)
    except ssl.SSLError as error:
        if "KEY_VALUES_MISMATCH" in str(error) or "key values mismatch" in str(error):
            raise TlsError(f"tls.key: {tls_config.key}: does not match the certificate "
                           f"{tls_config.cert}") from None
        raise TlsError(f"tls.key: {tls_config.key}: not a usable PEM private key for "
                       f"{tls_config.cert} ({error.reason or error})") from None
    return Certificate(context, tls_config.cert, _subject(leaf), _names(leaf),
                       leaf.not_valid_after_utc)


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsError(f"{key}: cannot read {path}: {error.strerror or error}") from None


def _subject(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"CN={names[0].value}" if names else cert.subject.rfc4514_string() or "-"


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(name) for name in extension.value.get_values_for_type(x509.DNSName))


def session_fields(version: str | None, cipher: str | None) -> dict[str, str]:
    """`tls=` and `cipher=` of a session's log line (tls=none without TLS)."""
    if version is None:
        return {"tls": "none"}
    return {"tls": version, "cipher": cipher or "unknown"}


class ExpiryWatch:
    """Warns in the log when the certificate `current()` returns expires
    within EXPIRY_WARNING: once at start, then every WARN_EVERY seconds
    until `stop()`."""

    def __init__(self, current, every: float = WARN_EVERY):
        self.current, self.every = current, every
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start watching; again is a no-op."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tls-expiry", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while True:
            self.look()
            if self._stopped.wait(self.every):
                return

    def look(self, now: datetime.datetime | None = None) -> bool:
        """Warn when the certificate expires soon; True when it did."""
        certificate = self.current()
        if certificate is None or not certificate.expires_within(EXPIRY_WARNING, now):
            return False
        logger.warning("certificate expires soon %s", log.fields(
            cert=certificate.path, subject=certificate.subject,
            expires=f"{certificate.not_after:%Y-%m-%dT%H:%M:%SZ}"))
        return True

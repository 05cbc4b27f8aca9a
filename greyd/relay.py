"""The upstream MTA connection of one SMTP session, over smtplib.

A Relay opens the connection to the real MTA when the first recipient passes
policy (EHLO, optional STARTTLS, XCLIENT), then forwards MAIL, each RCPT and
DATA in lockstep and hands back the upstream's own replies. It never raises:
any failure of the upstream becomes a 451 4.4.x reply and drops the
connection, so the client keeps the mail and retries. A transaction the
upstream lost stays lost until the client ends it (DATA, RSET): its later
recipients get 451 4.4.1 as well, never a fresh upstream transaction that
would carry the message without the recipients accepted before. A
transaction that needs SMTPUTF8 or DSN from an upstream that no longer
offers it gets 451 4.3.3 (the client keeps the mail), and the upstream's
keywords, as each new connection finds them, go to the daemon's
`upstream.Capabilities`. Addresses and DSN parameters go upstream exactly
as the client wrote them. It knows nothing of policy, the store, or the
client's socket.
"""

from __future__ import annotations

import logging
import smtplib
import ssl

from . import metrics, replies
from .ip import client_address
from .log import fields
from .replies import Reply

logger = logging.getLogger(__name__)

_XCLIENT_ATTRIBUTES = ("ADDR", "NAME", "HELO")


class Relay:
    """One session's connection to the upstream MTA, relayed in lockstep."""

    def __init__(self, *, host: str, port: int, timeout: float, local_hostname: str,
                 starttls: bool = False, xclient: str = "auto",
                 client_addr: str, client_name: str | None, client_helo: str | None,
                 capabilities=None):
        self.host = host
        self.port = port
        self.timeout = timeout
        self.local_hostname = local_hostname
        self.starttls = starttls
        self.xclient = xclient
        self.client_addr = client_addr
        self.client_name = client_name
        self.client_helo = client_helo
        self.capabilities = capabilities    # upstream.Capabilities, told what EHLO offered
        self.in_transaction = False
        self._smtp: smtplib.SMTP | None = None

    def mail(self, sender: str, *, size: int | None = None, body: str | None = None,
             smtputf8: bool = False, dsn: tuple[str, ...] = ()) -> Reply:
        """Start a transaction: connect if needed, then MAIL FROM:<sender>, with
        SMTPUTF8 and the DSN parameters `dsn` when given."""
        if self.in_transaction:
            self.rset()
        reused = self._smtp is not None
        needs = (("smtputf8",) if smtputf8 else ()) + (("dsn",) if dsn else ())
        reply = self._try_mail(sender, size, body, needs, dsn)
        if reply is None and reused:
            reply = self._try_mail(sender, size, body, needs, dsn)
        return replies.UPSTREAM_AT_RCPT if reply is None else reply

    def rcpt(self, recipient: str, dsn: tuple[str, ...] = ()) -> Reply:
        """Forward one RCPT (with its DSN parameters); the upstream's reply is
        the client's reply.

        After an upstream failure in this transaction, 451 4.4.1 without asking.
        """
        if not self.in_transaction or self._smtp is None:
            return replies.UPSTREAM_AT_RCPT
        if dsn and not self._smtp.has_extn("dsn"):
            return replies.UPSTREAM_LACKS
        try:
            code, text = self._smtp.docmd("RCPT", f"TO:<{recipient}>" + "".join(
                " " + param for param in dsn))
        except ValueError:
            return replies.BAD_RECIPIENT
        except OSError as error:
            return self._fail("rcpt", error, replies.UPSTREAM_AT_RCPT)
        return self._passed("rcpt", code, text, replies.UPSTREAM_AT_RCPT)

    def data(self, message: bytes) -> Reply:
        """Send the message (CRLF lines, not dot-stuffed); the upstream's answer."""
        started, self.in_transaction = self.in_transaction, False
        if not started or self._smtp is None:
            return replies.UPSTREAM_AT_DATA
        try:
            # smtplib dot-stuffs bytes and appends CRLF "." CRLF; line ends are kept.
            code, text = self._smtp.data(message)
        except smtplib.SMTPDataError as refused:
            # DATA itself answered other than 354 (RFC 5321 4.3.2): only a 4xx or
            # 5xx is a refusal to pass on; a 2xx there is no acceptance of a
            # message the upstream has not even seen.
            code, text = refused.smtp_code, refused.smtp_error
            if code // 100 not in (4, 5):
                return self._fail("data", f"reply {code} to DATA", replies.UPSTREAM_AT_DATA)
            if code != 421:
                self._end_upstream_transaction()
        except OSError as error:
            return self._fail("data", error, replies.UPSTREAM_AT_DATA)
        metrics.relayed(code)
        return self._passed("data", code, text, replies.UPSTREAM_AT_DATA)

    def rset(self) -> None:
        """Mirror RSET when a transaction is open; a failure just drops the connection."""
        if self.in_transaction:
            self.in_transaction = False
            if self._smtp is not None:
                self._end_upstream_transaction()

    def quit(self) -> None:
        """Say QUIT if connected, then close; never raises."""
        self.in_transaction = False
        if self._smtp is not None:
            try:
                self._smtp.docmd("QUIT")
            except OSError:
                pass
        self._close()

    def _try_mail(self, sender: str, size: int | None, body: str | None,
                  needs: tuple[str, ...], dsn: tuple[str, ...]) -> Reply | None:
        """MAIL on the current or a new connection; None when the upstream failed."""
        if self._smtp is None:
            try:
                self._smtp = self._open()
            except (OSError, ValueError) as error:
                return self._fail("connect", error, None)
        if not all(self._smtp.has_extn(keyword) for keyword in needs):
            return replies.UPSTREAM_LACKS
        # RFC 6531 3.2: UTF-8 commands only in a transaction that declared SMTPUTF8.
        self._smtp.command_encoding = "utf-8" if "smtputf8" in needs else "ascii"
        try:
            params = self._mail_params(size, body) + "".join(
                " " + param for param in (("SMTPUTF8",) if "smtputf8" in needs else ()) + dsn)
            code, text = self._smtp.docmd("MAIL", f"FROM:<{sender}>{params}")
        except ValueError:
            return replies.BAD_SENDER
        except OSError as error:
            return self._fail("mail", error, None)
        reply = self._passed("mail", code, text, None)
        if reply is not None:
            self.in_transaction = 200 <= reply.code < 300
        return reply

    def _open(self) -> smtplib.SMTP:
        """Connect, greet, STARTTLS and XCLIENT as configured (RFC 5321 3.1, RFC 3207)."""
        smtp = smtplib.SMTP(self.host, self.port, local_hostname=self.local_hostname,
                            timeout=self.timeout)
        try:
            _greet(smtp, self.local_hostname)
            if self.starttls and smtp.has_extn("starttls"):
                smtp.starttls(context=_unverified_tls())
                _greet(smtp, self.local_hostname)
            if self.xclient == "auto" and smtp.has_extn("xclient"):
                self._send_xclient(smtp)
        except BaseException:
            smtp.close()
            raise
        if self.capabilities is not None:
            self.capabilities.update(smtp.esmtp_features)
        return smtp

    def _send_xclient(self, smtp: smtplib.SMTP) -> None:
        """Tell the upstream who the real client is, as Postfix's XCLIENT_README says."""
        offered = smtp.esmtp_features["xclient"].upper().split()
        values = {
            "ADDR": _xclient_addr(self.client_addr),
            "NAME": self.client_name or "[UNAVAILABLE]",
            "HELO": self.client_helo or "[UNAVAILABLE]",
        }
        attributes = [f"{name}={xtext(values[name])}"
                      for name in _XCLIENT_ATTRIBUTES if name in offered]
        if not attributes:
            return
        code, text = smtp.docmd("XCLIENT", " ".join(attributes))
        if code != 220:
            raise smtplib.SMTPResponseException(code, text)
        # Postfix restarts the session; the next EHLO name becomes its HELO name.
        helo = self.client_helo if _is_atom(self.client_helo) else self.local_hostname
        _greet(smtp, helo)

    def _mail_params(self, size: int | None, body: str | None) -> str:
        """SIZE (RFC 1870) and BODY (RFC 6152) only where the upstream offers them."""
        params = ""
        if size is not None and self._smtp.has_extn("size"):
            params += f" SIZE={size}"
        if body and self._smtp.has_extn("8bitmime"):
            params += f" BODY={body}"
        return params

    def _passed(self, step: str, code: int, text: bytes, failure: Reply | None) -> Reply | None:
        """The upstream's reply, unless it is closing (421) or not a final reply."""
        if code == 421 or code // 100 not in (2, 4, 5):
            self._fail(step, f"reply {code}", failure)
            return failure
        return Reply.from_upstream(code, text)

    def _fail(self, step: str, error: object, failure: Reply | None) -> Reply | None:
        """Drop the connection; an open transaction stays open, and lost, until ended."""
        logger.warning("upstream failed %s", fields(
            step=step, upstream=f"{self.host}:{self.port}", error=str(error)))
        self._close()
        return failure

    def _end_upstream_transaction(self) -> None:
        """RSET upstream so the connection can carry the next transaction."""
        try:
            code, _ = self._smtp.docmd("RSET")
        except OSError:
            code = 0
        if code != 250:
            self._close()

    def _close(self) -> None:
        if self._smtp is not None:
            self._smtp.close()
            self._smtp = None


def _greet(smtp: smtplib.SMTP, name: str) -> None:
    """EHLO, falling back to HELO (RFC 5321 4.1.1.1); raises unless accepted."""
    code, text = smtp.ehlo(name)
    if code not in (250, 421):
        code, text = smtp.helo(name)
    if code != 250:
        raise smtplib.SMTPHeloError(code, text)


def _unverified_tls() -> ssl.SSLContext:
    """Encrypt, but do not verify: the upstream is the local MTA."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _xclient_addr(address: str) -> str:
    """ADDR value: IPv4 as is, IPv6 as "IPV6:addr" (IPv4-mapped ones as IPv4)."""
    try:
        ip = client_address(address)
    except ValueError:
        return "[UNAVAILABLE]"
    return f"IPV6:{ip.compressed}" if ip.version == 6 else str(ip)


def xtext(value: str) -> str:
    """Encode per RFC 3461 4: "+", "=" and octets outside 33..126 become +XX."""
    return "".join(chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else f"+{b:02X}"
                   for b in value.encode("utf-8"))


def _is_atom(name: str | None) -> bool:
    """True for a name that can stand as an EHLO argument on the wire."""
    return bool(name) and all(33 <= ord(ch) <= 126 for ch in name)

"""PEM files of a TLS setting, read and checked the same way by every component.

A service (``sluice serve --tls-…``) and the gateway (``sluice gateway --tls-…`` and
``--upstream-tls-…``) take certificates, keys and CA bundles as file paths. Each is read with a
size cap, checked to be PEM of the right kind, and a key is checked to belong to its certificate,
so a wrong file stops a start with one line naming the flag (or, for a renewed file the gateway
watches, is refused while the old one stays in force). A certificate outside its validity window
and a passphrase-protected key are refused too. No crypto package (the services' images have
none): the validity dates are read from the DER by :func:`validity`.

:class:`ReloadingFiles` is what a TLS setting made from files is when they are renewed in place:
made again, checked first, the old one kept when the new files fail. :class:`ReloadingContext`, an
SSL context made so, serves the admin port (mesh/observability/admin_tls.py) and the rollout
controller's scrape (mesh/rollout/figures.py); the service's ports use it through
services/tls.py's :class:`~services.tls.CertificateReloader`.
"""

from __future__ import annotations

import base64
import binascii
import re
import ssl
import threading
import time
from calendar import timegm
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)

MAX_PEM_BYTES = 1024 * 1024
"""Largest certificate, key or CA bundle read (a chain of a few certificates is a few KiB)."""
CERT_MARKER = b"-----BEGIN CERTIFICATE-----"
KEY_MARKER = b"PRIVATE KEY-----"


NOT_BEFORE_LEEWAY_S = 300
"""A certificate that becomes valid this soon is taken (clocks of issuer and host differ a little)."""
_PEM_CERT_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\s*([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----")


T = TypeVar("T")


class TlsFileError(ValueError):
    """A TLS file cannot be used; the message names the flag and what is wrong."""


FileStamps = tuple[tuple[int, int, int] | None, ...]
"""(mtime ns, size, inode) of each watched file, None where it cannot be read: a renewal changes one."""


def file_stamps(paths: tuple[Path, ...] | list[Path]) -> FileStamps:
    """The :data:`FileStamps` of ``paths``, for telling when certificate files were renewed."""
    stamps: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            found = path.stat()
            stamps.append((found.st_mtime_ns, found.st_size, found.st_ino))
        except OSError:
            stamps.append(None)
    return tuple(stamps)


class ReloadingFiles(Generic[T]):
    """A value made by ``make`` from the files at ``paths``, made again when they change: the
    files' :data:`FileStamps` are looked at most once per ``interval`` seconds (:meth:`check`); a
    changed set that ``make`` refuses (TlsFileError naming the flag, ssl.SSLError, OSError) keeps
    the old value and is logged once, as ``events[1]``, and is tried again when the files change
    once more; a new value is logged as ``events[0]``, with ``fields(value)`` (default: the paths).

    ``make`` raises the same at construction: the first value is made from checked files too
    (or is ``first``, made by the caller from the files as they are now).
    Shared by every TLS setting that follows renewed files: :class:`ReloadingContext` (the admin
    port, the rollout controller's scrape) and the service's ports (services/tls.py).
    """

    def __init__(self, paths: Sequence[Path], make: Callable[[], T], *, interval: float = 1.0,
                 events: tuple[str, str] = ("tls_context_reloaded", "tls_context_reload_refused"),
                 fields: Callable[[T], dict[str, object]] | None = None, first: T | None = None) -> None:
        self.paths = tuple(paths)
        self.interval = interval
        self._make = make
        self._events = events
        self._fields = fields
        self._lock = threading.Lock()
        self._stamp = file_stamps(self.paths)
        self._refused: FileStamps | None = None
        self._value = make() if first is None else first
        self._checked_at = time.monotonic()

    @property
    def value(self) -> T:
        """The value now in force (no look at the files)."""
        return self._value

    def check(self) -> tuple[T, bool]:
        """(the value to use now, whether it was made just now from renewed files)."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at < self.interval:
                return self._value, False
            self._checked_at = now
            stamp = file_stamps(self.paths)
            if stamp in (self._stamp, self._refused):
                return self._value, False
            try:
                value = self._make()
            except (TlsFileError, ssl.SSLError, OSError) as exc:
                self._refused = stamp
                log.warning(self._events[1], reason=str(exc)[:300], keeping="the previous certificate")
                return self._value, False
            self._value, self._stamp, self._refused = value, stamp, None
        fields = self._fields(value) if self._fields is not None else {"files": [str(path) for path in self.paths]}
        log.info(self._events[0], **fields)
        return value, True


class ReloadingContext(ReloadingFiles[ssl.SSLContext]):
    """An SSL context made by ``make`` from ``paths``, made again when they change
    (:class:`ReloadingFiles`); called once per connection for the context to use now."""

    def __call__(self) -> ssl.SSLContext:
        return self.check()[0]


def _der_item(data: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER item at ``at``; ValueError if cut short."""
    if at + 2 > len(data):
        raise ValueError("truncated")
    tag, length = data[at], data[at + 1]
    at += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or at + count > len(data):
            raise ValueError("bad length")
        length = int.from_bytes(data[at:at + count], "big")
        at += count
    if at + length > len(data):
        raise ValueError("truncated")
    return tag, at, at + length


def _der_time(tag: int, text: bytes) -> float:
    value = text.decode("ascii")
    if tag == 0x17 and re.fullmatch(r"\d{12}Z", value):  # UTCTime YYMMDDHHMMSSZ
        year = int(value[:2])
        value = f"{year + (2000 if year < 50 else 1900)}{value[2:]}"
    elif tag != 0x18 or not re.fullmatch(r"\d{14}Z", value):  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError("not a UTCTime or GeneralizedTime")
    return float(timegm(time.strptime(value, "%Y%m%d%H%M%SZ")))


def validity(der: bytes) -> tuple[float, float]:
    """(notBefore, notAfter) of a DER certificate, as Unix times; ValueError if it is no certificate."""
    _, at, _ = _der_item(der, 0)  # Certificate
    tag, at, end = _der_item(der, at)  # tbsCertificate
    if tag != 0x30:
        raise ValueError("no tbsCertificate")
    tag, start, stop = _der_item(der, at)
    if tag == 0xA0:  # [0] version, then serialNumber
        tag, start, stop = _der_item(der, stop)
    for _ in range(2):  # signature, issuer
        tag, start, stop = _der_item(der, stop)
    tag, start, stop = _der_item(der, stop)  # validity
    if tag != 0x30 or stop > end:
        raise ValueError("no validity")
    tag1, s1, e1 = _der_item(der, start)
    tag2, s2, e2 = _der_item(der, e1)
    return _der_time(tag1, der[s1:e1]), _der_time(tag2, der[s2:e2])


def _utc(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(moment))


def check_validity(pem: bytes, flag: str, path: Path, now: float | None = None) -> None:
    """TlsFileError unless every certificate in ``pem`` is valid at ``now`` (give or take
    :data:`NOT_BEFORE_LEEWAY_S` before its start)."""
    moment = time.time() if now is None else now
    for index, match in enumerate(_PEM_CERT_RE.finditer(pem)):
        which = "the certificate" if index == 0 else f"certificate {index + 1} of the chain"
        try:
            not_before, not_after = validity(base64.b64decode(b"".join(match.group(1).split()), validate=True))
        except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
            raise TlsFileError(f"{flag} {path}: {which} cannot be read ({exc})") from exc
        if moment > not_after:
            raise TlsFileError(f"{flag} {path}: {which} expired at {_utc(not_after)}")
        if moment + NOT_BEFORE_LEEWAY_S < not_before:
            raise TlsFileError(f"{flag} {path}: {which} is not valid before {_utc(not_before)}")


def _no_passphrase(key: Path, key_flag: str) -> Callable[[], bytes]:
    def refuse() -> bytes:
        raise TlsFileError(f"{key_flag} {key}: the key is protected by a passphrase; give an unencrypted key "
                           "(e.g. openssl pkey -in KEY -out PLAIN)")
    return refuse


def read_pem(path: Path, flag: str, marker: bytes) -> bytes:
    """The bytes of ``path`` if it is at most :data:`MAX_PEM_BYTES` and holds a ``marker`` line."""
    try:
        size = path.stat().st_size
        if size > MAX_PEM_BYTES:
            raise TlsFileError(f"{flag} {path}: {size} bytes, more than a PEM file of {MAX_PEM_BYTES} bytes")
        data = path.read_bytes()
    except OSError as exc:
        raise TlsFileError(f"{flag} {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_PEM_BYTES:  # grew between stat and read
        raise TlsFileError(f"{flag} {path}: more than a PEM file of {MAX_PEM_BYTES} bytes")
    if marker not in data:
        raise TlsFileError(f"{flag} {path}: not PEM (no '{marker.decode()}' line)")
    return data


def read_key_pair(cert: Path, key: Path, cert_flag: str, key_flag: str) -> tuple[bytes, bytes]:
    """(certificate chain, key) as bytes, checked to be PEM and to belong together.

    OpenSSL reads the files by path, so they are read again after the check: a pair that changed
    in between (a renewal writing one file, then the other) is refused rather than half-checked.
    """
    cert_pem = read_pem(cert, cert_flag, CERT_MARKER)
    key_pem = read_pem(key, key_flag, KEY_MARKER)
    if b"ENCRYPTED" in key_pem:  # "BEGIN ENCRYPTED PRIVATE KEY", or "Proc-Type: 4,ENCRYPTED"
        _no_passphrase(key, key_flag)()
    check_validity(cert_pem, cert_flag, cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # A key that wants a passphrase after all gets the callback's refusal, never a prompt on
        # the terminal (OpenSSL's default, from whichever thread is loading).
        context.load_cert_chain(cert, key, password=_no_passphrase(key, key_flag))
    except ssl.SSLError as exc:
        raise TlsFileError(f"{key_flag} {key} does not belong to {cert_flag} {cert} "
                           f"(or one of them is unreadable): {exc.reason or exc}") from exc
    except OSError as exc:
        raise TlsFileError(f"{cert_flag} {cert} / {key_flag} {key}: {exc.strerror or exc}") from exc
    if read_pem(cert, cert_flag, CERT_MARKER) != cert_pem or read_pem(key, key_flag, KEY_MARKER) != key_pem:
        raise TlsFileError(f"{cert_flag} {cert} / {key_flag} {key}: changed while being checked")
    return cert_pem, key_pem


def read_ca(path: Path, flag: str) -> bytes:
    """A CA bundle as bytes, checked to hold certificates OpenSSL can load."""
    data = read_pem(path, flag, CERT_MARKER)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=data.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, ssl.SSLError) else None
        raise TlsFileError(f"{flag} {path}: {reason or exc}") from exc
    return data


def read_server_files(cert: Path | None, key: Path | None, client_ca: Path | None,
                      flag: str = "--tls") -> tuple[bytes, bytes, bytes | None] | None:
    """(certificate, key, client CA or None) of a TLS server's flags ``<flag>-cert``, ``<flag>-key``,
    ``<flag>-client-ca``, checked; None when neither certificate nor key is given (plaintext).

    A key and a certificate go together, and a client CA (mTLS) needs both.
    """
    cert_flag, key_flag, ca_flag = f"{flag}-cert", f"{flag}-key", f"{flag}-client-ca"
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsFileError(f"{ca_flag} needs {cert_flag} and {key_flag} (mTLS is TLS first)")
        return None
    if cert is None or key is None:
        raise TlsFileError(f"{cert_flag} and {key_flag} go together: give both or neither")
    cert_pem, key_pem = read_key_pair(cert, key, cert_flag, key_flag)
    return cert_pem, key_pem, read_ca(client_ca, ca_flag) if client_ca is not None else None

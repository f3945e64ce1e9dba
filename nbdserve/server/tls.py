"""TLS credentials and the server's ``ssl.SSLContext``.

Owns ``TlsServer``: the credentials the configuration names (an X.509 directory laid out as QEMU
and nbdkit lay it out, or a file of pre-shared keys), loaded into a server-side context, and
``reload()`` for SIGHUP.  The session (``server/session.py``) asks ``context(...)`` for the context
of each new TLS handshake and ``identity(...)`` for what the handshake proved about the client.

Invariants:
  * TLS 1.2 or later only; renegotiation off; no session tickets (NBD clients do not resume).
  * With verify-peer, a client must present a certificate that ``ca-cert.pem`` signed and that
    ``ca-crl.pem`` (if present) does not revoke, or the handshake fails.
  * ``reload()`` builds a complete new context before it replaces the old one: a failed reload
    (a missing file, a key that does not match its certificate) keeps the old credentials, and
    established sessions keep the context they were made with.

PSK: Python's ``ssl`` offers TLS-PSK (``SSLContext.set_psk_server_callback``) from Python 3.13 on.
On older Pythons PSK credentials are refused at start-up with a one-line reason.  The PSK
identity is passed only to the callback, so each PSK handshake gets its own (cheap, keyless)
context whose callback records the username for that session.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
from collections.abc import Callable

from ..authz import dn_of_subject, format_dn
from ..config import ConfigError, ServerConfig

log = logging.getLogger("nbdserve")

CA_CERT, SERVER_CERT, SERVER_KEY, CA_CRL = "ca-cert.pem", "server-cert.pem", "server-key.pem", "ca-crl.pem"
PSK_PYTHON_TEXT = "3.13"
HAVE_PSK = hasattr(ssl.SSLContext, "set_psk_server_callback")
# TLS 1.2 PSK cipher suites; TLS 1.3 carries PSKs in every suite.
PSK_CIPHERS = "ECDHE-PSK:DHE-PSK:PSK"


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.num_tickets = 0
    return ctx


def _reason(e: Exception) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


def x509_context(directory: str, *, verify_peer: bool) -> ssl.SSLContext:
    """A server context from DIR/server-cert.pem and server-key.pem (and, with ``verify_peer``,
    DIR/ca-cert.pem and the optional DIR/ca-crl.pem).  Raises ConfigError naming the file."""
    ctx = _base_context()
    cert, key = os.path.join(directory, SERVER_CERT), os.path.join(directory, SERVER_KEY)
    for path in (cert, key):
        if not os.path.isfile(path):
            raise ConfigError(f"TLS credentials: {path}: no such file")
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"TLS credentials: cannot load {cert} with {key}: {_reason(e)}") from None
    if verify_peer:
        ca, crl = os.path.join(directory, CA_CERT), os.path.join(directory, CA_CRL)
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"TLS credentials: {ca} (needed to verify clients): {_reason(e)}") from None
        if os.path.exists(crl):
            try:
                ctx.load_verify_locations(cafile=crl)
            except (ssl.SSLError, OSError) as e:
                raise ConfigError(f"TLS credentials: {crl}: {_reason(e)}") from None
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def read_psk_file(path: str) -> dict[str, bytes]:
    """``username:hexkey`` lines (the format of GnuTLS's psktool, used by QEMU and libnbd)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"TLS PSK file {path}: {_reason(e)}") from None
    keys: dict[str, bytes] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        user, sep, hexkey = line.rpartition(":")
        try:
            key = bytes.fromhex(hexkey.strip())
        except ValueError:
            key = b""
        if not sep or not user or not key:
            raise ConfigError(f"TLS PSK file {path}, line {n}: expected username:hexkey")
        keys[user] = key
    if not keys:
        raise ConfigError(f"TLS PSK file {path}: no keys")
    return keys


def psk_context(keys: dict[str, bytes], on_identity: Callable[[str], None]) -> ssl.SSLContext:
    """A server context that accepts the clients of ``keys`` (username -> key)."""
    if not HAVE_PSK:
        raise ConfigError(
            f"TLS-PSK needs Python {PSK_PYTHON_TEXT} or later (this is {sys.version.split()[0]}): "
            "use X.509 certificates (--tls-creds DIR) instead"
        )
    ctx = _base_context()
    ctx.set_ciphers(PSK_CIPHERS)

    def lookup(identity: str | None) -> bytes:
        key = keys.get(identity or "")
        if key is not None:
            on_identity(identity or "")
        return key or b""  # empty: unknown user, the handshake fails

    ctx.set_psk_server_callback(lookup)
    return ctx


class TlsServer:
    """The credentials of one server; ``context`` gives the context for a new handshake."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.directory = cfg.tls_creds
        self.psk_file = cfg.tls_psk_file
        self.verify_peer = cfg.verify_peer
        self._x509: ssl.SSLContext | None = None
        self._psk: dict[str, bytes] = {}
        self._load()  # ConfigError at start-up
        log.info("TLS: %s", self.describe())

    def describe(self) -> str:
        if self.psk_file:
            return f"pre-shared keys from {self.psk_file} ({len(self._psk)} users)"
        return f"X.509 credentials from {self.directory}" + (", client certificates required" * self.verify_peer)

    def _load(self) -> None:
        if self.psk_file:
            keys = read_psk_file(self.psk_file)
            psk_context(keys, lambda _user: None)  # fails here, at start-up, without PSK support
            self._psk = keys
        else:
            assert self.directory is not None
            self._x509 = x509_context(self.directory, verify_peer=self.verify_peer)

    def reload(self) -> bool:
        """Read the credentials again (SIGHUP); on failure keep the old ones.  True if reloaded."""
        try:
            self._load()
        except ConfigError as e:
            log.error("TLS: reload failed, keeping the old credentials: %s", e)
            return False
        log.warning("TLS: reloaded %s", self.describe())
        return True

    def context(self, on_psk_identity: Callable[[str], None]) -> ssl.SSLContext:
        if self.psk_file:
            return psk_context(self._psk, on_psk_identity)
        assert self._x509 is not None
        return self._x509


def identity(ssl_object: ssl.SSLObject | None) -> tuple[str, tuple[tuple[str, str], ...] | None]:
    """(RFC 4514 text, normalised DN) of the client's verified certificate, or ("", None)."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    subject = cert.get("subject") if cert else None
    if not subject:
        return "", None
    dn = dn_of_subject(subject)
    return format_dn(dn), dn


def describe_session(ssl_object: ssl.SSLObject | None) -> str:
    """'TLSv1.3 TLS_AES_256_GCM_SHA384' for the log."""
    if ssl_object is None:
        return "TLS"
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()} {cipher[0] if cipher else '?'}"

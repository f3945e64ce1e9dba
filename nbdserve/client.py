"""A small blocking NBD client for the handshake only: ``-L/--list``, ``-c/--connect`` and health checks.

Owns ``Client``: connect (TCP or Unix socket), the fixed-newstyle greeting, optional STARTTLS
(X.509, verifying the server against ``ca-cert.pem`` and presenting ``client-cert.pem`` if the
directory has one), and the options ``LIST``, ``INFO``, ``GO``, ``STRUCTURED_REPLY``,
``LIST_META_CONTEXT`` and ``ABORT``.  ``GO`` leaves the socket in the transmission phase for
someone else (the kernel's NBD driver) to use.  ``format_listing`` renders ``-L``'s text.

Everything the server sends is bounded (an option reply is at most ``MAX_REPLY`` bytes) and every
failure is a ``ClientError`` with a one-line reason.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from dataclasses import dataclass, field

from .protocol import constants as C

MAX_REPLY = 1 << 20
TIMEOUT = 30.0
_FLAG_NAMES = (
    (C.FLAG_READ_ONLY, "readonly"),
    (C.FLAG_SEND_FLUSH, "flush"),
    (C.FLAG_SEND_FUA, "fua"),
    (C.FLAG_ROTATIONAL, "rotational"),
    (C.FLAG_SEND_TRIM, "trim"),
    (C.FLAG_SEND_WRITE_ZEROES, "zeroes"),
    (C.FLAG_SEND_DF, "df"),
    (C.FLAG_CAN_MULTI_CONN, "multi"),
    (C.FLAG_SEND_RESIZE, "resize"),
    (C.FLAG_SEND_CACHE, "cache"),
    (C.FLAG_SEND_FAST_ZERO, "fast-zero"),
    (C.FLAG_BLOCK_STATUS_PAYLOAD, "block-status-payload"),
)


class ClientError(Exception):
    """The server could not be reached or answered unexpectedly; the message says why."""


@dataclass
class ExportInfo:
    name: str
    description: str = ""
    size: int = 0
    flags: int = 0
    block_sizes: tuple[int, int, int] | None = None
    contexts: list[str] = field(default_factory=list)


def _reply_error(kind: int, data: bytes) -> str:
    names = {v: k for k, v in vars(C).items() if k.startswith("REP_ERR_")}
    text = data.decode("utf-8", "replace")
    return f"{names.get(kind, hex(kind))}{': ' + text if text else ''}"


class Client:
    def __init__(
        self,
        *,
        host: str | None = None,
        port: int = 10809,
        unix: str | None = None,
        tls_dir: str | None = None,
        tls_hostname: str | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        self.where = unix if unix else f"{host}:{port}"
        try:
            if unix:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(timeout)
                s.connect(unix)
            else:
                s = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise ClientError(f"cannot connect to {self.where}: {e.strerror or e}") from None
        self.sock: socket.socket | ssl.SSLSocket = s
        self.structured = False
        try:
            magic, opt, flags = struct.unpack(">QQH", self._recv(18))
            if magic != C.NBDMAGIC or opt != C.IHAVEOPT:
                raise ClientError(f"{self.where} is not a newstyle NBD server")
            if not flags & C.FLAG_FIXED_NEWSTYLE:
                raise ClientError(f"{self.where} does not speak fixed newstyle")
            cflags = C.FLAG_C_FIXED_NEWSTYLE | (C.FLAG_C_NO_ZEROES if flags & C.FLAG_NO_ZEROES else 0)
            self.sock.sendall(struct.pack(">I", cflags))
            if tls_dir is not None:
                self._starttls(tls_dir, tls_hostname or host)
        except OSError as e:
            self.close()
            raise ClientError(f"{self.where}: {e.strerror or e}") from None
        except ClientError:
            self.close()
            raise

    # -- plumbing -----------------------------------------------------------------------------

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except TimeoutError:
                raise ClientError(f"{self.where}: no answer within {self.sock.gettimeout()}s") from None
            if not chunk:
                raise ClientError(f"{self.where} closed the connection")
            buf += chunk
        return bytes(buf)

    def _send_option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">QII", C.IHAVEOPT, opt, len(data)) + data)

    def _reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, kind, length = struct.unpack(">QIII", self._recv(20))
        if magic != C.REPLY_MAGIC or ropt != opt:
            raise ClientError(f"{self.where}: bad option reply")
        if length > MAX_REPLY:
            raise ClientError(f"{self.where}: option reply of {length} bytes")
        return kind, self._recv(length)

    def _starttls(self, tls_dir: str, hostname: str | None) -> None:
        self._send_option(C.OPT_STARTTLS)
        kind, data = self._reply(C.OPT_STARTTLS)
        if kind != C.REP_ACK:
            raise ClientError(f"{self.where}: STARTTLS refused: {_reply_error(kind, data)}")
        ctx = ssl.create_default_context(cafile=os.path.join(tls_dir, "ca-cert.pem"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        cert = os.path.join(tls_dir, "client-cert.pem")
        if os.path.exists(cert):
            ctx.load_cert_chain(cert, os.path.join(tls_dir, "client-key.pem"))
        ctx.check_hostname = hostname is not None
        try:
            self.sock = ctx.wrap_socket(self.sock, server_hostname=hostname)
        except ssl.SSLError as e:
            raise ClientError(f"{self.where}: TLS handshake failed: {e.reason or e}") from None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- options ------------------------------------------------------------------------------

    def abort(self) -> None:
        try:
            self._send_option(C.OPT_ABORT)
            self._reply(C.OPT_ABORT)
        except (OSError, ClientError):
            pass
        self.close()

    def list_exports(self) -> list[tuple[str, str]]:
        self._send_option(C.OPT_LIST)
        out = []
        while True:
            kind, data = self._reply(C.OPT_LIST)
            if kind == C.REP_ACK:
                return out
            if kind != C.REP_SERVER:
                raise ClientError(f"{self.where}: LIST failed: {_reply_error(kind, data)}")
            (n,) = struct.unpack_from(">I", data)
            out.append((data[4 : 4 + n].decode("utf-8", "replace"), data[4 + n :].decode("utf-8", "replace")))

    def structured_replies(self) -> bool:
        self._send_option(C.OPT_STRUCTURED_REPLY)
        kind, _ = self._reply(C.OPT_STRUCTURED_REPLY)
        self.structured = kind == C.REP_ACK
        return self.structured

    def meta_contexts(self, name: str) -> list[str]:
        raw = name.encode()
        self._send_option(C.OPT_LIST_META_CONTEXT, struct.pack(">I", len(raw)) + raw + struct.pack(">I", 0))
        out = []
        while True:
            kind, data = self._reply(C.OPT_LIST_META_CONTEXT)
            if kind == C.REP_META_CONTEXT:
                out.append(data[4:].decode("utf-8", "replace"))
            else:
                return out  # ACK, or an error: no contexts to show

    def _info_or_go(self, opt: int, name: str) -> ExportInfo:
        raw = name.encode()
        wanted = (C.INFO_DESCRIPTION, C.INFO_BLOCK_SIZE)
        self._send_option(
            opt, struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(wanted)}H", len(wanted), *wanted)
        )
        info = ExportInfo(name)
        seen_export = False
        while True:
            kind, data = self._reply(opt)
            if kind == C.REP_ACK:
                if not seen_export:
                    raise ClientError(f"{self.where}: export {name!r}: no size from the server")
                return info
            if kind & C.REP_FLAG_ERROR:
                raise ClientError(f"{self.where}: export {name!r}: {_reply_error(kind, data)}")
            if kind != C.REP_INFO or len(data) < 2:
                continue
            (itype,) = struct.unpack_from(">H", data)
            if itype == C.INFO_EXPORT and len(data) >= 12:
                _, info.size, info.flags = struct.unpack_from(">HQH", data)
                seen_export = True
            elif itype == C.INFO_DESCRIPTION:
                info.description = data[2:].decode("utf-8", "replace")
            elif itype == C.INFO_BLOCK_SIZE and len(data) >= 14:
                info.block_sizes = struct.unpack_from(">III", data, 2)

    def info(self, name: str) -> ExportInfo:
        return self._info_or_go(C.OPT_INFO, name)

    def go(self, name: str) -> ExportInfo:
        """Enter transmission on export ``name``; the socket then carries simple replies."""
        return self._info_or_go(C.OPT_GO, name)


def describe_flags(flags: int) -> str:
    return " ".join(n for bit, n in _FLAG_NAMES if flags & bit)


def list_server(client: Client) -> list[ExportInfo]:
    """Every export the server lists, with its size, flags, block sizes and meta contexts."""
    names = client.list_exports()
    client.structured_replies()
    out = []
    for name, description in names:
        info = client.info(name)
        info.description = info.description or description
        if client.structured:
            info.contexts = client.meta_contexts(name)
        out.append(info)
    return out


def format_listing(exports: list[ExportInfo]) -> str:
    lines = [f"exports available: {len(exports)}"]
    for e in exports:
        lines.append(f" export: '{e.name}'")
        if e.description:
            lines.append(f"  description: {e.description}")
        lines.append(f"  size:  {e.size}")
        lines.append(f"  flags: 0x{e.flags:x} ( {describe_flags(e.flags)} )")
        if e.block_sizes:
            lines += [f"  min block: {e.block_sizes[0]}", f"  opt block: {e.block_sizes[1]}"]
            lines.append(f"  max block: {e.block_sizes[2]}")
        if e.contexts:
            lines.append(f"  available meta contexts: {len(e.contexts)}")
            lines += [f"   {c}" for c in e.contexts]
    return "\n".join(lines) + "\n"

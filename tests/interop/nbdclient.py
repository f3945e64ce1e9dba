"""A deliberately small, blocking NBD client over a raw socket, for protocol-level tests.

Owns what the real clients on the test machine cannot do: extended headers (Debian's libnbd and
qemu predate them), malformed handshakes and requests, and byte-exact inspection of every reply
chunk.  It encodes and decodes the wire format itself (from the NBD spec), independently of
``nbdserve.protocol``, so a codec bug on the server side cannot cancel out here.

Every receive is bounded by the socket timeout: a test waiting for the server to close a
connection calls ``wait_closed`` instead of sleeping.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass, field

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
EXT_REPLY_MAGIC = 0x6E8A278C

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT, OPT_EXTENDED_HEADERS = 8, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP = (1 << 31) | 1
REP_ERR_POLICY = (1 << 31) | 2
REP_ERR_INVALID = (1 << 31) | 3
REP_ERR_TLS_REQD = (1 << 31) | 5
REP_ERR_UNKNOWN = (1 << 31) | 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO, FLAG_PAYLOAD_LEN = (1 << i for i in range(6))

CHUNK_NONE, CHUNK_DATA, CHUNK_HOLE = 0, 1, 2
CHUNK_BLOCK_STATUS, CHUNK_BLOCK_STATUS_EXT = 5, 6
CHUNK_ERROR, CHUNK_ERROR_OFFSET = 0x8001, 0x8002
REPLY_FLAG_DONE = 1

EINVAL, ENOSPC, EPERM = 22, 28, 1


class Closed(Exception):
    """The server closed the connection."""


@dataclass
class Reply:
    """Everything the server sent for one request."""

    cookie: int
    error: int = 0
    message: str = ""
    data: bytearray | None = None  # READ: the reassembled bytes (holes filled with zeroes)
    chunks: list[tuple[int, int, bytes]] = field(default_factory=list)  # (flags, type, payload)
    offsets: list[int] = field(default_factory=list)  # extended headers: each chunk's offset field
    status: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # context id -> [(len, flags)]


class RawClient:
    """Connects to a Unix socket ``path`` or a TCP ``(host, port)`` (from ``source`` if given), or
    takes over an already connected socket."""

    def __init__(
        self, path: str | tuple[str, int] | socket.socket, timeout: float = 10.0, source: str | None = None
    ) -> None:
        if isinstance(path, socket.socket):
            self.sock = path
            self.sock.settimeout(timeout)
        else:
            if isinstance(path, tuple):
                self.sock = socket.socket(socket.AF_INET6 if ":" in path[0] else socket.AF_INET, socket.SOCK_STREAM)
                if source is not None:
                    self.sock.bind((source, 0))
            else:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path if isinstance(path, tuple) else str(path))
        self.extended = False
        self.structured = False
        self.size = 0
        self.tflags = 0
        self.contexts: dict[str, int] = {}
        self._pending: dict[int, tuple[int, int, int]] = {}  # cookie -> (type, offset, length)
        self._partial: dict[int, Reply] = {}  # structured replies still missing their DONE chunk
        self._cookie = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bytes --------------------------------------------------------------------------------

    def recv_exact(self, n: int) -> bytes:
        out = bytearray(n)
        view, got = memoryview(out), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise Closed(f"server closed after {got} of {n} bytes")
            got += k
        return bytes(out)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_closed(self, timeout: float = 10.0) -> bool:
        """Read and discard until EOF (or a reset); True if the server closed within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
            return True
        except TimeoutError:
            return False
        return True

    # -- handshake ----------------------------------------------------------------------------

    def greet(self, client_flags: int = 3) -> int:
        """Read the greeting, send the client flags; returns the server's handshake flags."""
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT), "not a fixed-newstyle greeting"
        self.send(struct.pack(">I", client_flags))
        return flags

    def send_option(self, option: int, data: bytes = b"", length: int | None = None) -> None:
        self.send(struct.pack(">QII", IHAVEOPT, option, len(data) if length is None else length) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPT_REPLY_MAGIC, f"bad option reply magic 0x{magic:x}"
        return option, rtype, self.recv_exact(length)

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send one option; the replies up to and including ACK or an error, as (type, data)."""
        self.send_option(option, data)
        out = []
        while True:
            opt, rtype, payload = self.option_reply()
            assert opt == option, f"reply for option {opt}, expected {option}"
            out.append((rtype, payload))
            if rtype == REP_ACK or rtype & (1 << 31):
                return out

    def starttls(self, ctx: ssl.SSLContext, hostname: str | None = "localhost") -> None:
        """STARTTLS; on its ACK, run the TLS handshake on this socket (later traffic is TLS)."""
        assert self.option(OPT_STARTTLS) == [(REP_ACK, b"")], "STARTTLS refused"
        self.sock = ctx.wrap_socket(self.sock, server_hostname=hostname)

    def go(self, name: str = "", *, extended: bool = False, structured: bool = True, contexts=()) -> None:
        """Negotiate (extended headers or structured replies, meta contexts) and enter transmission."""
        if extended:
            assert self.option(OPT_EXTENDED_HEADERS)[-1][0] == REP_ACK
            self.extended = self.structured = True
        elif structured:
            assert self.option(OPT_STRUCTURED_REPLY)[-1][0] == REP_ACK
            self.structured = True
        raw = name.encode()
        if contexts:
            qs = b"".join(struct.pack(">I", len(q.encode())) + q.encode() for q in contexts)
            data = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(contexts)) + qs
            replies = self.option(OPT_SET_META_CONTEXT, data)
            assert replies[-1][0] == REP_ACK, replies
            for rtype, payload in replies[:-1]:
                assert rtype == REP_META_CONTEXT
                self.contexts[payload[4:].decode()] = struct.unpack_from(">I", payload)[0]
        replies = self.option(OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, INFO_BLOCK_SIZE))
        assert replies[-1][0] == REP_ACK, f"GO failed: {replies}"
        for rtype, payload in replies:
            if rtype == REP_INFO and struct.unpack_from(">H", payload)[0] == INFO_EXPORT:
                _, self.size, self.tflags = struct.unpack(">HQH", payload)

    # -- transmission -------------------------------------------------------------------------

    def request(
        self, cmd: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> None:
        """Send one request as is (the caller sets PAYLOAD_LEN under extended headers)."""
        if self.extended:
            hdr = struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        else:
            hdr = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        self._pending[cookie] = (cmd, offset, length)
        self.send(hdr + payload)

    def expect(self, cookie: int, cmd: int, offset: int, length: int) -> None:
        """Record a request the caller sent by hand (with ``send``) so its reply can be decoded."""
        self._pending[cookie] = (cmd, offset, length)

    def reply(self) -> Reply:
        """Read chunks until one request's reply is complete; returns it (any cookie)."""
        partial = self._partial
        while True:
            (magic,) = struct.unpack(">I", self.recv_exact(4))
            if magic == SIMPLE_MAGIC:
                assert not self.extended, "simple reply under extended headers"
                error, cookie = struct.unpack(">IQ", self.recv_exact(12))
                cmd, _, length = self._pending.pop(cookie)
                r = Reply(cookie, error)
                if cmd == CMD_READ and not error:
                    r.data = bytearray(self.recv_exact(length))
                return r
            if magic == STRUCTURED_MAGIC and not self.extended:
                flags, ctype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
                offset = None
            elif magic == EXT_REPLY_MAGIC and self.extended:
                flags, ctype, cookie, offset, length = struct.unpack(">HHQQQ", self.recv_exact(28))
            else:
                raise AssertionError(f"unexpected reply magic 0x{magic:x} (extended={self.extended})")
            payload = self.recv_exact(length)
            cmd, req_off, req_len = self._pending[cookie]
            r = partial.setdefault(cookie, Reply(cookie))
            r.chunks.append((flags, ctype, payload))
            if offset is not None:
                r.offsets.append(offset)
            self._absorb(r, ctype, payload, cmd, req_off, req_len)
            if flags & REPLY_FLAG_DONE:
                del partial[cookie]
                del self._pending[cookie]
                return r

    def _absorb(self, r: Reply, ctype: int, payload: bytes, cmd: int, req_off: int, req_len: int) -> None:
        if ctype in (CHUNK_DATA, CHUNK_HOLE) and r.data is None:
            assert cmd == CMD_READ, "a data or hole chunk for a command other than READ"
            r.data = bytearray(req_len)
        if ctype == CHUNK_DATA:
            (off,) = struct.unpack_from(">Q", payload)
            data = memoryview(payload)[8:]
            assert req_off <= off and off + len(data) <= req_off + req_len, "data chunk outside the request"
            r.data[off - req_off : off - req_off + len(data)] = data
        elif ctype == CHUNK_HOLE:
            off, n = struct.unpack(">QI", payload)
            assert req_off <= off and off + n <= req_off + req_len, "hole chunk outside the request"
            r.data[off - req_off : off - req_off + n] = bytes(n)
        elif ctype == CHUNK_BLOCK_STATUS:
            assert not self.extended
            (cid,) = struct.unpack_from(">I", payload)
            vals = struct.unpack_from(f">{(len(payload) - 4) // 4}I", payload, 4)
            r.status[cid] = list(zip(vals[::2], vals[1::2], strict=True))
        elif ctype == CHUNK_BLOCK_STATUS_EXT:
            assert self.extended
            cid, count = struct.unpack_from(">II", payload)
            assert len(payload) == 8 + 16 * count, "BLOCK_STATUS_EXT length does not match its count"
            vals = struct.unpack_from(f">{2 * count}Q", payload, 8)
            r.status[cid] = list(zip(vals[::2], vals[1::2], strict=True))
        elif ctype in (CHUNK_ERROR, CHUNK_ERROR_OFFSET):
            r.error, mlen = struct.unpack_from(">IH", payload)
            r.message = payload[6 : 6 + mlen].decode(errors="replace")
        elif ctype != CHUNK_NONE:
            raise AssertionError(f"unknown chunk type {ctype}")

    def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b"") -> Reply:
        """One request, waiting for its reply."""
        self._cookie += 1
        cookie = self._cookie
        self.request(cmd, cookie, offset, length, flags, payload)
        r = self.reply()
        assert r.cookie == cookie
        return r

    def pread(self, offset: int, length: int, flags: int = 0) -> bytes:
        r = self.call(CMD_READ, offset, length, flags)
        assert r.error == 0, f"read failed: errno {r.error} {r.message}"
        return bytes(r.data)

    def pwrite(self, offset: int, data: bytes, flags: int = 0) -> Reply:
        if self.extended:
            flags |= FLAG_PAYLOAD_LEN
        return self.call(CMD_WRITE, offset, len(data), flags, data)

    def disconnect(self, cookie: int = 0) -> None:
        """Send DISC (which has no reply, so it is not recorded as pending)."""
        self.request(CMD_DISC, cookie)
        del self._pending[cookie]

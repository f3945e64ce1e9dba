"""Sans-IO codec for the transmission phase: requests in, replies out.

Owns:
  * ``RequestParser``: an incremental request decoder shaped like asyncio's BufferedProtocol
    (``get_buffer``/``buffer_updated``), so the server receives straight into it with no copies.
    A WRITE payload that fits the receive buffer (at most ``inline_max``) is handed out where it
    was received (a view of the receive buffer: the final buffer of a write that completes at
    once); a larger one is received straight into its own buffer (``take_payload``), in which
    the write then runs.  ``next_plain`` decodes runs of plain READs and WRITEs without
    ``Request`` objects (the server's fast case).  Compact (28-byte) or extended (32-byte)
    headers.
  * ``check_request``: the protocol's validity rules for one request against an export
    (flags, ranges, alignment, read-only), giving the errno the spec prescribes.
  * ``ReplyEncoder``: simple replies, structured chunks and extended-header chunks, packed into
    caller-owned buffers where a payload follows (one write per reply).

Invariants: a request's payload is buffered only up to ``max_payload``; a larger payload (up to
``drain_limit``) is discarded as it arrives and the request is marked ``oversize``; beyond that the
peer is cut off (``ProtocolError``).  No method performs I/O.

Memory: the parser's receive buffer is taken (``take_buffer``) when bytes are about to arrive and
handed back (``release_idle``) once it holds no unparsed byte, so an idle connection holds no
receive buffer; the server shares one pool of them among all connections.  Views of the receive
buffer handed out (inline payloads) are valid until the next ``get_buffer``, unless the caller
calls ``detach`` first: the parser then moves to a new buffer and leaves the old one (never given
back) to whoever still refers to it.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable

from . import constants as C
from .handshake import ProtocolError, message_bytes

_REQ = struct.Struct(">IHHQQI")
_EXT_REQ = struct.Struct(">IHHQQQ")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_EXT_CHUNK = struct.Struct(">IHHQQQ")
_U64 = struct.Struct(">Q")
_DATA = struct.Struct(">IHHQIQ")  # OFFSET_DATA chunk header + its offset field
_EXT_DATA = struct.Struct(">IHHQQQQ")
_HOLE = struct.Struct(">QI")
_ERR = struct.Struct(">IH")

SIMPLE_REPLY_SIZE = _SIMPLE.size  # 16
CHUNK_SIZE = _CHUNK.size  # 20
EXT_CHUNK_SIZE = _EXT_CHUNK.size  # 32


class Request:
    """One decoded request.  ``payload`` is the WRITE data (or None), ``inline`` when it is a view
    of the receive buffer (see ``RequestParser.detach``); ``oversize`` means the payload exceeded
    ``max_payload`` and was discarded."""

    __slots__ = ("cookie", "flags", "inline", "length", "offset", "oversize", "payload", "type")

    def __init__(self, type_: int, flags: int, cookie: int, offset: int, length: int) -> None:
        self.type = type_
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.payload: memoryview | None = None
        self.inline = False
        self.oversize = False

    def __repr__(self) -> str:
        name = C.CMD_NAMES.get(self.type, str(self.type))
        return f"<Request {name} flags=0x{self.flags:x} cookie={self.cookie} off={self.offset} len={self.length}>"


_HEADER, _PAYLOAD, _DRAIN = 0, 1, 2
# Inline WRITE payloads (received and written where they arrived) are at most this long.
INLINE_MAX = 128 << 10


class RequestParser:
    """Incremental request decoder; see the module docstring.

    ``get_buffer()`` returns where the next bytes must go; after writing ``n`` bytes there call
    ``buffer_updated(n)``; then ``next_plain``/``next_event`` until they return nothing.
    """

    def __init__(
        self,
        *,
        extended: bool = False,
        max_payload: int = C.DEFAULT_MAX_PAYLOAD,
        drain_limit: int = 1 << 30,
        buffer_size: int = 256 << 10,
        inline_max: int = INLINE_MAX,
        take_buffer: Callable[[], bytearray] | None = None,
        give_buffer: Callable[[bytearray], None] | None = None,
        take_payload: Callable[[int], bytearray] | None = None,
    ) -> None:
        self.extended = extended
        self.max_payload = max_payload
        self.drain_limit = drain_limit
        self._hsize = 32 if extended else 28
        # a payload stays inline only if its request fits the receive buffer whole
        self.inline_max = min(inline_max, buffer_size - self._hsize, max_payload)
        self._take = take_buffer or (lambda: bytearray(buffer_size))
        self._give = give_buffer
        self._take_payload = take_payload or bytearray
        self._buf: bytearray | None = None  # the receive buffer, while it is needed
        self._view: memoryview | None = None
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received bytes
        self._state = _HEADER
        self._pending: Request | None = None  # request whose payload is being received
        self._pview: memoryview | None = None  # its payload buffer
        self._pfill = 0
        self._drain = 0
        self._ready: Request | None = None

    @property
    def idle(self) -> bool:
        """True between requests (no partial header or payload buffered)."""
        return self._state == _HEADER and self._start == self._end

    # -- input ------------------------------------------------------------------------------

    def release_idle(self) -> None:
        """Hand the receive buffer back if it holds nothing unparsed (it is taken again by the
        next ``get_buffer``)."""
        if self._start == self._end and self._buf is not None and self._give is not None:
            buf, self._buf, self._view = self._buf, None, None
            self._start = self._end = 0
            self._give(buf)

    def detach(self) -> None:
        """Leave the receive buffer to the inline payloads still in use: move what is unparsed to
        a new buffer; the old one is never written or given back by the parser again."""
        old = self._buf
        if old is None:
            return
        n = self._end - self._start
        new = self._take()
        new[:n] = old[self._start : self._end]
        self._buf, self._view = new, memoryview(new)
        self._start, self._end = 0, n

    def get_buffer(self) -> memoryview:
        if self._state == _PAYLOAD:
            if self._pview is None:
                self._take_prefix()
            return self._pview[self._pfill :]
        if self._buf is None:
            self._buf = self._take()
            self._view = memoryview(self._buf)
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < 4096 or len(self._buf) - self._start < self._needed():
            # compact: move the partial request to the front
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start : self._end]
            self._start, self._end = 0, n
        return self._view[self._end :]

    def _needed(self) -> int:
        """Bytes the request at ``_start`` takes in the receive buffer: its header, plus its
        payload if that is received inline."""
        size = self._hsize
        if self._end - self._start < size:
            return size
        _, flags, type_, _, _, length = (_EXT_REQ if self.extended else _REQ).unpack_from(self._buf, self._start)
        payload = length if (flags & C.CMD_FLAG_PAYLOAD_LEN if self.extended else type_ == C.CMD_WRITE) else 0
        return size + payload if 0 < payload <= self.inline_max else size

    def buffer_updated(self, n: int) -> None:
        if self._state == _PAYLOAD:
            self._pfill += n
        else:
            self._end += n

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Convenience for tests and the stdio path: copy ``data`` in via get_buffer."""
        data = memoryview(data)
        while data:
            buf = self.get_buffer()
            n = min(len(buf), len(data))
            if n == 0:
                raise AssertionError("receive_data: call next_event() before feeding more")
            buf[:n] = data[:n]
            self.buffer_updated(n)
            data = data[n:]
            if self._state == _PAYLOAD and self._pfill == len(self._pview):
                self._ready = self._finish_payload()

    # -- decoding ---------------------------------------------------------------------------

    def next_event(self) -> Request | None:
        if self._ready is not None:
            req, self._ready = self._ready, None
            return req
        if self._state == _PAYLOAD:
            return self._finish_payload() if self._pview is not None and self._pfill == len(self._pview) else None
        if self._state == _DRAIN:
            avail = self._end - self._start
            n = min(avail, self._drain)
            self._start += n
            self._drain -= n
            if self._drain:
                return None
            self._state = _HEADER
        avail = self._end - self._start
        size = self._hsize
        if avail < size:
            return None
        if self.extended:
            magic, flags, type_, cookie, offset, length = _EXT_REQ.unpack_from(self._buf, self._start)
            if magic != C.EXTENDED_REQUEST_MAGIC:
                raise ProtocolError(f"bad extended request magic 0x{magic:x}")
            payload_len = length if flags & C.CMD_FLAG_PAYLOAD_LEN else 0
        else:
            magic, flags, type_, cookie, offset, length = _REQ.unpack_from(self._buf, self._start)
            if magic != C.REQUEST_MAGIC:
                raise ProtocolError(f"bad request magic 0x{magic:x}")
            payload_len = length if type_ == C.CMD_WRITE else 0
        if 0 < payload_len <= self.inline_max and avail < size + payload_len:
            return None  # the rest of the payload arrives in this buffer (see _needed)
        req = Request(type_, flags, cookie, offset, length)
        start = self._start + size
        self._start = start
        if not payload_len:
            return req
        if payload_len <= self.inline_max:
            req.payload = self._view[start : start + payload_len]
            req.inline = True
            self._start = start + payload_len
            return req
        if payload_len > self.max_payload:
            if payload_len > self.drain_limit:
                raise ProtocolError(f"request payload of {payload_len} bytes is over the limit")
            req.oversize = True
            self._drain = payload_len
            self._state = _DRAIN
            n = min(self._end - self._start, self._drain)
            self._start += n
            self._drain -= n
            if not self._drain:
                self._state = _HEADER
            return req
        self._pending = req
        self._pfill = min(self._end - start, payload_len)
        self._state = _PAYLOAD
        if self._pfill < payload_len:
            return None  # its first bytes stay in the receive buffer until _take_prefix
        self._take_prefix()
        return self._finish_payload()

    def _take_prefix(self) -> None:
        """Give the payload in progress its own buffer, holding the bytes of it received with its
        header (until now left in the receive buffer, for ``payload_in_progress``)."""
        n, length = self._pfill, self._pending.length
        self._pview = memoryview(self._take_payload(length))[:length]
        if n:  # (with none, the receive buffer may have been handed back: release_idle)
            self._pview[:n] = self._view[self._start : self._start + n]
            self._start += n

    def next_plain(
        self, *, max_count: int, max_bytes: int, max_read: int, writes: bool
    ) -> list[tuple[int, int, int, memoryview | None]]:
        """The fast case's batch decoder: consume the plain READs (and, with ``writes``, plain
        WRITEs) at the head of the buffer and return ``(cookie, offset, length, payload)`` for
        each, ``payload`` None for a READ and an inline view for a WRITE.

        Plain: no flags (a WRITE under extended headers: PAYLOAD_LEN only), ``0 < length``, a
        READ at most ``max_read`` long, a WRITE's payload inline and all received.  Decoding stops
        before the first other request (which ``next_event`` then decodes, magic checks included),
        after ``max_count`` requests, or once the READ lengths reach ``max_bytes``.  Returns []
        unless the parser is between requests.
        """
        if self._state != _HEADER or self._ready is not None:
            return []
        if self.extended:
            unpack, magic_ok, wflags = _EXT_REQ.unpack_from, C.EXTENDED_REQUEST_MAGIC, C.CMD_FLAG_PAYLOAD_LEN
        else:
            unpack, magic_ok, wflags = _REQ.unpack_from, C.REQUEST_MAGIC, 0
        size, buf, view, pos, end = self._hsize, self._buf, self._view, self._start, self._end
        out: list[tuple[int, int, int, memoryview | None]] = []
        read, write, inline_max = C.CMD_READ, C.CMD_WRITE if writes else -1, self.inline_max
        while len(out) < max_count and max_bytes > 0 and end - pos >= size:
            magic, flags, type_, cookie, offset, length = unpack(buf, pos)
            if magic != magic_ok:
                break
            if type_ == read and not flags and 0 < length <= max_read:
                out.append((cookie, offset, length, None))
                max_bytes -= length
                pos += size
            elif type_ == write and flags == wflags and 0 < length <= inline_max and pos + size + length <= end:
                out.append((cookie, offset, length, view[pos + size : pos + size + length]))
                pos += size + length
            else:
                break
        self._start = pos
        return out

    def payload_in_progress(self) -> tuple[Request, memoryview, int] | None:
        """While a large payload is being received: its request, the payload bytes received so
        far (a view valid until the next ``get_buffer``, ``detach`` or ``release_idle``) and the
        number still to come; else None."""
        if self._state != _PAYLOAD:
            return None
        req, n = self._pending, self._pfill
        if self._pview is None:  # its first bytes are still where they were received
            return req, self._view[self._start : self._start + n] if n else memoryview(b""), req.length - n
        return (req, self._pview[:n], req.length - n) if n < req.length else None

    def payload_taken(self) -> Request:
        """The caller takes the rest of the payload in progress off the stream itself, and must
        consume exactly those bytes before it feeds the parser again: the request (its
        ``payload`` None); the parser now expects the next header."""
        req = self._pending
        assert self._state == _PAYLOAD and req is not None
        if self._pview is None:
            self._start += self._pfill
        self._pending, self._pview = None, None
        self._state = _HEADER
        return req

    def _finish_payload(self) -> Request:
        req = self._pending
        assert req is not None
        req.payload = self._pview
        self._pending, self._pview = None, None
        self._state = _HEADER
        return req


def encode_request(
    type_: int, cookie: int, offset: int, length: int, flags: int = 0, payload: bytes = b"", *, extended: bool = False
) -> bytes:
    """Client-side request encoding (tests and the raw-socket client)."""
    if extended:
        return _EXT_REQ.pack(C.EXTENDED_REQUEST_MAGIC, flags, type_, cookie, offset, length) + payload
    return _REQ.pack(C.REQUEST_MAGIC, flags, type_, cookie, offset, length) + payload


# -- request rules --------------------------------------------------------------------------

_ALLOWED_FLAGS = {
    C.CMD_READ: C.CMD_FLAG_FUA | C.CMD_FLAG_DF,
    C.CMD_WRITE: C.CMD_FLAG_FUA,
    C.CMD_DISC: C.CMD_FLAG_FUA,
    C.CMD_FLUSH: C.CMD_FLAG_FUA,
    C.CMD_TRIM: C.CMD_FLAG_FUA,
    C.CMD_CACHE: C.CMD_FLAG_FUA,
    C.CMD_WRITE_ZEROES: C.CMD_FLAG_FUA | C.CMD_FLAG_NO_HOLE | C.CMD_FLAG_FAST_ZERO,
    C.CMD_BLOCK_STATUS: C.CMD_FLAG_FUA | C.CMD_FLAG_REQ_ONE,
}
_RANGED = (C.CMD_READ, C.CMD_WRITE, C.CMD_TRIM, C.CMD_CACHE, C.CMD_WRITE_ZEROES, C.CMD_BLOCK_STATUS)
_WRITES = (C.CMD_WRITE, C.CMD_TRIM, C.CMD_WRITE_ZEROES)


def check_request(
    req: Request,
    *,
    size: int,
    export_flags: int,
    extended: bool,
    structured: bool,
    max_payload: int,
    have_contexts: bool,
) -> tuple[int, str] | None:
    """None if ``req`` may be executed, else (errno, message) to reply with.

    The rules, in the order applied: unknown command; flags not defined for the command (or not
    advertised); payload rules (extended headers); read-only; range (writes: ENOSPC, others:
    EINVAL); per-command length limits.
    """
    t = req.type
    allowed = _ALLOWED_FLAGS.get(t)
    if allowed is None:
        return errno.EINVAL, f"unknown command {t}"
    flags = req.flags
    if extended:
        allowed |= C.CMD_FLAG_PAYLOAD_LEN
    if flags & ~allowed:
        return errno.EINVAL, f"flags 0x{flags & ~allowed:x} are not valid for {C.CMD_NAMES[t]}"
    if flags & C.CMD_FLAG_DF and not structured:
        return errno.EINVAL, "DF needs structured replies"
    if flags & C.CMD_FLAG_FAST_ZERO and not export_flags & C.FLAG_SEND_FAST_ZERO:
        return errno.EINVAL, "FAST_ZERO was not advertised"
    if extended and t == C.CMD_WRITE and not flags & C.CMD_FLAG_PAYLOAD_LEN:
        return errno.EINVAL, "WRITE without PAYLOAD_LEN under extended headers"
    if req.oversize:
        return errno.EINVAL, f"payload of {req.length} bytes exceeds the maximum of {max_payload}"
    if extended and flags & C.CMD_FLAG_PAYLOAD_LEN and t != C.CMD_WRITE:
        return errno.EINVAL, f"{C.CMD_NAMES[t]} does not take a payload"
    if t in _WRITES and export_flags & C.FLAG_READ_ONLY:
        return errno.EPERM, "export is read-only"
    if t in (C.CMD_DISC, C.CMD_FLUSH):
        return None
    if t in _RANGED:
        end = req.offset + req.length
        if end > size:
            return (errno.ENOSPC if t in (C.CMD_WRITE, C.CMD_WRITE_ZEROES) else errno.EINVAL), (
                f"range {req.offset}+{req.length} is beyond the end of the export ({size})"
            )
    if t == C.CMD_READ and req.length > max_payload:
        return errno.EINVAL, f"read of {req.length} bytes exceeds the maximum of {max_payload}"
    if t == C.CMD_BLOCK_STATUS:
        if not have_contexts:
            return errno.EINVAL, "no metadata context was negotiated"
        if req.length == 0:
            return errno.EINVAL, "block status of zero length"
    return None


# -- replies --------------------------------------------------------------------------------


class ReplyEncoder:
    """Encodes replies for one connection's negotiated mode (simple / structured / extended)."""

    __slots__ = ("extended", "structured")

    def __init__(self, *, structured: bool = False, extended: bool = False) -> None:
        self.extended = extended
        self.structured = structured or extended

    # simple replies ----------------------------------------------------------------------

    def simple(self, cookie: int, error: int = 0) -> bytes:
        assert not self.extended, "simple replies are forbidden with extended headers"
        return _SIMPLE.pack(C.SIMPLE_REPLY_MAGIC, error, cookie)

    @property
    def read_header_size(self) -> int:
        """Bytes before the data in a one-chunk READ reply (see ``pack_read_header``)."""
        if not self.structured:
            return SIMPLE_REPLY_SIZE
        return (EXT_CHUNK_SIZE if self.extended else CHUNK_SIZE) + 8

    def pack_read_header(self, out: bytearray, cookie: int, offset: int, length: int) -> None:
        """Write the header of a successful READ reply carrying all ``length`` bytes at once (a
        simple reply, or one OFFSET_DATA chunk with DONE) at the start of ``out``."""
        if not self.structured:
            _SIMPLE.pack_into(out, 0, C.SIMPLE_REPLY_MAGIC, 0, cookie)
        elif self.extended:
            _EXT_DATA.pack_into(
                out,
                0,
                C.EXTENDED_REPLY_MAGIC,
                C.REPLY_FLAG_DONE,
                C.REPLY_TYPE_OFFSET_DATA,
                cookie,
                offset,
                8 + length,
                offset,
            )
        else:
            _DATA.pack_into(
                out,
                0,
                C.STRUCTURED_REPLY_MAGIC,
                C.REPLY_FLAG_DONE,
                C.REPLY_TYPE_OFFSET_DATA,
                cookie,
                8 + length,
                offset,
            )

    # structured / extended chunks --------------------------------------------------------

    @property
    def chunk_size(self) -> int:
        return EXT_CHUNK_SIZE if self.extended else CHUNK_SIZE

    def _header_into(self, buf, pos: int, flags: int, type_: int, cookie: int, offset: int, length: int) -> None:
        if self.extended:
            _EXT_CHUNK.pack_into(buf, pos, C.EXTENDED_REPLY_MAGIC, flags, type_, cookie, offset, length)
        else:
            _CHUNK.pack_into(buf, pos, C.STRUCTURED_REPLY_MAGIC, flags, type_, cookie, length)

    def chunk(self, flags: int, type_: int, cookie: int, offset: int, payload: bytes = b"") -> bytes:
        out = bytearray(self.chunk_size + len(payload))
        self._header_into(out, 0, flags, type_, cookie, offset, len(payload))
        out[self.chunk_size :] = payload
        return bytes(out)

    def done(self, cookie: int, offset: int) -> bytes:
        """Success with no payload: a simple reply, or NONE+DONE under extended headers."""
        if self.extended:
            return self.chunk(C.REPLY_FLAG_DONE, C.REPLY_TYPE_NONE, cookie, offset)
        return _SIMPLE.pack(C.SIMPLE_REPLY_MAGIC, 0, cookie)

    def data_header(self, cookie: int, req_offset: int, offset: int, length: int, *, done: bool) -> bytearray:
        """The header of an OFFSET_DATA chunk (with its offset field) for ``length`` data bytes
        that the caller sends right after it."""
        hs = self.chunk_size
        out = bytearray(hs + 8)
        self._header_into(
            out, 0, C.REPLY_FLAG_DONE if done else 0, C.REPLY_TYPE_OFFSET_DATA, cookie, req_offset, 8 + length
        )
        _U64.pack_into(out, hs, offset)
        return out

    def hole(self, cookie: int, req_offset: int, offset: int, length: int, *, done: bool) -> bytes:
        return self.chunk(
            C.REPLY_FLAG_DONE if done else 0, C.REPLY_TYPE_OFFSET_HOLE, cookie, req_offset, _HOLE.pack(offset, length)
        )

    def none(self, cookie: int, offset: int) -> bytes:
        return self.chunk(C.REPLY_FLAG_DONE, C.REPLY_TYPE_NONE, cookie, offset)

    def error(
        self, cookie: int, offset: int, error: int, message: str = "", *, error_offset: int | None = None
    ) -> bytes:
        """A final error: a simple reply unless structured replies are on."""
        if not self.structured:
            return _SIMPLE.pack(C.SIMPLE_REPLY_MAGIC, error, cookie)
        msg = message_bytes(message)
        payload = _ERR.pack(error, len(msg)) + msg
        if error_offset is None:
            return self.chunk(C.REPLY_FLAG_DONE, C.REPLY_TYPE_ERROR, cookie, offset, payload)
        return self.chunk(
            C.REPLY_FLAG_DONE, C.REPLY_TYPE_ERROR_OFFSET, cookie, offset, payload + _U64.pack(error_offset)
        )

    def block_status(
        self, cookie: int, offset: int, context_id: int, extents: list[tuple[int, int]], *, done: bool
    ) -> bytes:
        """One status chunk for one context: ``extents`` is a list of (length, flags)."""
        flags = C.REPLY_FLAG_DONE if done else 0
        if self.extended:
            body = struct.pack(f">II{2 * len(extents)}Q", context_id, len(extents), *[v for e in extents for v in e])
            return self.chunk(flags, C.REPLY_TYPE_BLOCK_STATUS_EXT, cookie, offset, body)
        body = struct.pack(f">I{2 * len(extents)}I", context_id, *[v for e in extents for v in e])
        return self.chunk(flags, C.REPLY_TYPE_BLOCK_STATUS, cookie, offset, body)


def decode_reply_header(data: bytes, *, extended: bool = False) -> tuple:
    """Client-side helper for tests: decode one reply header at the start of ``data``.

    Returns ("simple", error, cookie) or ("chunk", flags, type, cookie, offset, length).
    """
    (magic,) = struct.unpack_from(">I", data)
    if magic == C.SIMPLE_REPLY_MAGIC:
        _, err, cookie = _SIMPLE.unpack_from(data)
        return ("simple", err, cookie)
    if magic == C.STRUCTURED_REPLY_MAGIC:
        _, flags, type_, cookie, length = _CHUNK.unpack_from(data)
        return ("chunk", flags, type_, cookie, None, length)
    if magic == C.EXTENDED_REPLY_MAGIC:
        _, flags, type_, cookie, offset, length = _EXT_CHUNK.unpack_from(data)
        return ("chunk", flags, type_, cookie, offset, length)
    raise ValueError(f"bad reply magic 0x{magic:x}")

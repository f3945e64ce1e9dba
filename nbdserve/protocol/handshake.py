"""Sans-IO codec for the server side of the fixed-newstyle handshake.

Owns: parsing client bytes into option events (bytes in, events out) and encoding every option
reply (events in, bytes out).  It does no I/O and makes no policy decisions: which export exists,
whether TLS is offered, what to answer, is the server's business (``server/options.py``).

Error direction (as in h11):
  * ``ProtocolError``: the peer broke the protocol in a way that cannot be answered (bad magic,
    unknown client flags, an oversized known option, too many options).  Drop the connection.
  * ``InvalidOption`` *events*: an option that is malformed but framed correctly; the policy
    answers it with the error type carried in the event and the handshake goes on.
  * ``AssertionError``: we misused the codec.

Invariants: option data of known options is buffered whole, but never more than
``max_option_length`` bytes; unknown options are drained without buffering; strings are decoded
as UTF-8 and limited to ``MAX_STRING`` bytes.

TLS: when the server accepts STARTTLS it calls ``starttls()`` before sending the ACK; the bytes
that follow arrive decrypted (the shell upgrades the transport) and are parsed as before.  A
client may start TLS only after it reads the ACK, so bytes already received behind the STARTTLS
option break the protocol (they could be neither plaintext options nor TLS to us).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import constants as C

_GREETING = struct.Struct(">QQH")
_OPT_HDR = struct.Struct(">QII")
_REP_HDR = struct.Struct(">QIII")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")


class ProtocolError(Exception):
    """The client broke the protocol; the connection must end."""


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientFlags:
    flags: int
    fixed_newstyle: bool
    no_zeroes: bool


@dataclass(frozen=True, slots=True)
class ExportNameOption:
    name: str


@dataclass(frozen=True, slots=True)
class InfoOption:
    """OPT_INFO (``go`` False) or OPT_GO (``go`` True)."""

    go: bool
    name: str
    requests: tuple[int, ...]

    @property
    def option(self) -> int:
        return C.OPT_GO if self.go else C.OPT_INFO


@dataclass(frozen=True, slots=True)
class MetaContextOption:
    """OPT_LIST_META_CONTEXT (``set`` False) or OPT_SET_META_CONTEXT (``set`` True)."""

    set: bool
    export: str
    queries: tuple[str, ...]

    @property
    def option(self) -> int:
        return C.OPT_SET_META_CONTEXT if self.set else C.OPT_LIST_META_CONTEXT


@dataclass(frozen=True, slots=True)
class SimpleOption:
    """An option whose only content is its code: LIST, ABORT, STARTTLS, STRUCTURED_REPLY,
    EXTENDED_HEADERS.  ``has_data`` is True if the client sent data it should not have."""

    option: int
    has_data: bool


@dataclass(frozen=True, slots=True)
class UnknownOption:
    """An option the codec does not know; its ``length`` bytes of data are drained."""

    option: int
    length: int


@dataclass(frozen=True, slots=True)
class InvalidOption:
    """A framed but malformed option; answer with ``error`` (a REP_ERR_*)."""

    option: int
    error: int
    message: str


Event = ClientFlags | ExportNameOption | InfoOption | MetaContextOption | SimpleOption | UnknownOption | InvalidOption

_SIMPLE = (C.OPT_LIST, C.OPT_ABORT, C.OPT_STARTTLS, C.OPT_STRUCTURED_REPLY, C.OPT_EXTENDED_HEADERS)
_KNOWN = (C.OPT_EXPORT_NAME, C.OPT_INFO, C.OPT_GO, C.OPT_LIST_META_CONTEXT, C.OPT_SET_META_CONTEXT, *_SIMPLE)


def _text(raw: bytes | memoryview, what: str) -> str:
    if len(raw) > C.MAX_STRING:
        raise ValueError(f"{what} longer than {C.MAX_STRING} bytes")
    try:
        s = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not valid UTF-8") from None
    if "\0" in s:
        raise ValueError(f"{what} contains NUL")
    return s


class ServerHandshake:
    """Incremental parser of client handshake bytes.

    Usage: send ``greeting()``; feed bytes with ``receive_data``; call ``next_event`` until it
    returns None (more bytes needed).  The first event is ``ClientFlags``; then one event per option.
    """

    def __init__(self, *, max_option_length: int = 64 << 10, max_options: int = 64) -> None:
        self.max_option_length = max_option_length
        self.max_options = max_options
        self.options_seen = 0
        self.fixed_newstyle = False
        self.no_zeroes = False
        self._buf = bytearray()
        self._have_flags = False
        self._drain = 0  # bytes of an unknown option still to discard
        self.tls = False  # STARTTLS accepted: later bytes come through TLS

    @staticmethod
    def greeting() -> bytes:
        return _GREETING.pack(C.NBDMAGIC, C.IHAVEOPT, C.FLAG_FIXED_NEWSTYLE | C.FLAG_NO_ZEROES)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._drain:
            n = min(self._drain, len(data))
            self._drain -= n
            data = memoryview(data)[n:]
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_buffered(self) -> bytes:
        """Bytes received after the last event (the start of transmission after GO)."""
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def starttls(self) -> None:
        """The server accepts STARTTLS (the last event).  Raises ProtocolError if the client sent
        anything after it without waiting for the reply."""
        assert not self.tls, "STARTTLS accepted twice"
        if self._buf or self._drain:
            raise ProtocolError("client sent data after STARTTLS before the server's reply")
        self.tls = True

    def next_event(self) -> Event | None:
        buf = self._buf
        if not self._have_flags:
            if len(buf) < 4:
                return None
            (flags,) = _U32.unpack_from(buf)
            del buf[:4]
            if flags & ~(C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES):
                raise ProtocolError(f"client sent unknown handshake flags 0x{flags:x}")
            self._have_flags = True
            self.fixed_newstyle = bool(flags & C.FLAG_C_FIXED_NEWSTYLE)
            self.no_zeroes = bool(flags & C.FLAG_C_NO_ZEROES)
            return ClientFlags(flags, self.fixed_newstyle, self.no_zeroes)
        if self._drain or len(buf) < _OPT_HDR.size:
            return None
        magic, option, length = _OPT_HDR.unpack_from(buf)
        if magic != C.IHAVEOPT:
            raise ProtocolError(f"bad option magic 0x{magic:x}")
        if option not in _KNOWN:
            self._count()
            del buf[: _OPT_HDR.size]
            n = min(length, len(buf))
            del buf[:n]
            self._drain = length - n
            if not self.fixed_newstyle:
                raise ProtocolError("non-fixed-newstyle client sent an option other than EXPORT_NAME")
            return UnknownOption(option, length)
        if length > self.max_option_length:
            raise ProtocolError(
                f"option {C.OPT_NAMES[option]} length {length} exceeds the limit of {self.max_option_length}"
            )
        if len(buf) < _OPT_HDR.size + length:
            return None
        self._count()
        data = bytes(buf[_OPT_HDR.size : _OPT_HDR.size + length])
        del buf[: _OPT_HDR.size + length]
        if not self.fixed_newstyle and option != C.OPT_EXPORT_NAME:
            raise ProtocolError("non-fixed-newstyle client sent an option other than EXPORT_NAME")
        return _parse_option(option, data)

    def _count(self) -> None:
        self.options_seen += 1
        if self.options_seen > self.max_options:
            raise ProtocolError(f"more than {self.max_options} options in one handshake")


def _parse_option(option: int, data: bytes) -> Event:
    if option in _SIMPLE:
        return SimpleOption(option, bool(data))
    try:
        if option == C.OPT_EXPORT_NAME:
            return ExportNameOption(_text(data, "export name"))
        if option in (C.OPT_INFO, C.OPT_GO):
            return _parse_info(option, data)
        return _parse_meta(option, data)
    except ValueError as e:
        err = C.REP_ERR_TOO_BIG if "longer than" in str(e) else C.REP_ERR_INVALID
        return InvalidOption(option, err, str(e))


def _parse_info(option: int, data: bytes) -> Event:
    if len(data) < 6:
        raise ValueError("option data shorter than 6 bytes")
    (namelen,) = _U32.unpack_from(data)
    if namelen > len(data) - 6:
        raise ValueError("export name length exceeds the option data")
    name = _text(data[4 : 4 + namelen], "export name")
    (n,) = _U16.unpack_from(data, 4 + namelen)
    if 6 + namelen + 2 * n != len(data):
        raise ValueError(f"{n} information requests do not match the option length")
    reqs = struct.unpack_from(f">{n}H", data, 6 + namelen)
    return InfoOption(option == C.OPT_GO, name, reqs)


def _parse_meta(option: int, data: bytes) -> Event:
    if len(data) < 8:
        raise ValueError("option data shorter than 8 bytes")
    (namelen,) = _U32.unpack_from(data)
    if namelen > len(data) - 8:
        raise ValueError("export name length exceeds the option data")
    export = _text(data[4 : 4 + namelen], "export name")
    pos = 4 + namelen
    (nq,) = _U32.unpack_from(data, pos)
    pos += 4
    if nq > (len(data) - pos) // 4:
        raise ValueError(f"{nq} queries cannot fit in the option data")
    queries = []
    for _ in range(nq):
        if pos + 4 > len(data):
            raise ValueError("query length past the end of the option")
        (qlen,) = _U32.unpack_from(data, pos)
        pos += 4
        if qlen > len(data) - pos:
            raise ValueError("query past the end of the option")
        queries.append(_text(data[pos : pos + qlen], "context query"))
        pos += qlen
    if pos != len(data):
        raise ValueError("trailing bytes after the last query")
    return MetaContextOption(option == C.OPT_SET_META_CONTEXT, export, tuple(queries))


# -- replies --------------------------------------------------------------------------------


def message_bytes(message: str) -> bytes:
    """``message`` as UTF-8, cut to at most ``MAX_STRING`` bytes without splitting a character."""
    return message.encode("utf-8")[: C.MAX_STRING].decode("utf-8", "ignore").encode("utf-8")


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return _REP_HDR.pack(C.REPLY_MAGIC, option, reply_type, len(data)) + data


def rep_ack(option: int) -> bytes:
    return option_reply(option, C.REP_ACK)


def rep_error(option: int, error: int, message: str = "") -> bytes:
    assert error & C.REP_FLAG_ERROR, "rep_error needs a REP_ERR_* type"
    return option_reply(option, error, message_bytes(message))


def rep_server(name: str, description: str = "") -> bytes:
    raw = name.encode("utf-8")
    return option_reply(C.OPT_LIST, C.REP_SERVER, _U32.pack(len(raw)) + raw + description.encode("utf-8"))


def rep_info_export(option: int, size: int, flags: int) -> bytes:
    return option_reply(option, C.REP_INFO, _INFO_EXPORT.pack(C.INFO_EXPORT, size, flags))


def rep_info_name(option: int, name: str) -> bytes:
    return option_reply(option, C.REP_INFO, _U16.pack(C.INFO_NAME) + name.encode("utf-8"))


def rep_info_description(option: int, description: str) -> bytes:
    return option_reply(option, C.REP_INFO, _U16.pack(C.INFO_DESCRIPTION) + description.encode("utf-8"))


def rep_info_block_size(option: int, minimum: int, preferred: int, maximum: int) -> bytes:
    return option_reply(option, C.REP_INFO, _INFO_BLOCK_SIZE.pack(C.INFO_BLOCK_SIZE, minimum, preferred, maximum))


def rep_meta_context(option: int, context_id: int, name: str) -> bytes:
    return option_reply(option, C.REP_META_CONTEXT, _U32.pack(context_id) + name.encode("utf-8"))


def export_name_reply(size: int, flags: int, *, no_zeroes: bool) -> bytes:
    """The reply to OPT_EXPORT_NAME: size, transmission flags and (unless NO_ZEROES) 124 zeroes."""
    return struct.pack(">QH", size, flags) + (b"" if no_zeroes else bytes(124))

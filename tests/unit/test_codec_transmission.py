"""Byte tables for the transmission codec (``nbdserve.protocol.transmission``).

Requests (28-byte compact and 32-byte extended headers) and reply chunks are written out by hand
from the NBD spec (``doc/proto.md`` and its ``extension-ext-header`` branch), never produced by the
code under test.  Each request table runs in both directions (bytes -> ``RequestParser`` fed whole,
one byte at a time and through ``get_buffer``/``buffer_updated``; fields -> ``encode_request``), each
reply table too (``ReplyEncoder`` -> bytes; bytes -> ``decode_reply_header``).  ``check_request`` is
table-tested for the errno rules, and a hypothesis property checks that any sequence of valid
requests, split anywhere, decodes to itself.
"""

from __future__ import annotations

import errno
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdserve.protocol import constants as C
from nbdserve.protocol.handshake import ProtocolError
from nbdserve.protocol.transmission import (
    ReplyEncoder,
    Request,
    RequestParser,
    check_request,
    decode_reply_header,
    encode_request,
)

REQ = "25609513"  # NBD_REQUEST_MAGIC
EXT_REQ = "21e41c71"  # NBD_EXTENDED_REQUEST_MAGIC
SIMPLE = "67446698"  # NBD_SIMPLE_REPLY_MAGIC
CHUNK = "668e33ef"  # NBD_STRUCTURED_REPLY_MAGIC
EXT_CHUNK = "6e8a278c"  # NBD_EXTENDED_REPLY_MAGIC
COOKIE = 0x0102030405060708
CK = "0102030405060708"


def h(s: str) -> bytes:
    return bytes.fromhex(s)


def fields(req: Request) -> tuple:
    payload = None if req.payload is None else bytes(req.payload)
    return (req.type, req.flags, req.cookie, req.offset, req.length, payload, req.oversize)


def feed(parser: RequestParser, data: bytes, split: str) -> list[tuple]:
    """Feed ``data`` to ``parser`` in the given way, returning the decoded requests' fields."""
    out: list[tuple] = []

    def drain() -> None:
        while (req := parser.next_event()) is not None:
            out.append(fields(req))

    if split == "whole":
        parser.receive_data(data)
        drain()
    elif split == "bytewise":
        for i in range(len(data)):
            parser.receive_data(data[i : i + 1])
            drain()
    else:  # "protocol": the asyncio BufferedProtocol path, at most 7 bytes per buffer_updated
        pos = 0
        while pos < len(data):
            buf = parser.get_buffer()
            n = min(len(buf), 7, len(data) - pos)
            assert n > 0
            buf[:n] = data[pos : pos + n]
            parser.buffer_updated(n)
            pos += n
            drain()
    return out


SPLITS = ["whole", "bytewise", "protocol"]

# -- requests ------------------------------------------------------------------------------
# Columns: id, extended, hex, [(type, flags, cookie, offset, length, payload, oversize)]

REQUESTS = [
    ("read", False, f"{REQ} 0000 0000 {CK} 0000000000001000 00001000",
     [(C.CMD_READ, 0, COOKIE, 0x1000, 0x1000, None, False)]),
    ("read-fua-df", False, f"{REQ} 0005 0000 {CK} 0000000000000000 00000200",
     [(C.CMD_READ, 5, COOKIE, 0, 0x200, None, False)]),
    ("write-fua-payload", False, f"{REQ} 0001 0001 {CK} 00000000000a0000 00000005 68656c6c6f",
     [(C.CMD_WRITE, 1, COOKIE, 0xA0000, 5, b"hello", False)]),
    ("disc", False, f"{REQ} 0000 0002 0000000000000000 0000000000000000 00000000",
     [(C.CMD_DISC, 0, 0, 0, 0, None, False)]),
    ("flush", False, f"{REQ} 0000 0003 ffffffffffffffff 0000000000000000 00000000",
     [(C.CMD_FLUSH, 0, 0xFFFFFFFFFFFFFFFF, 0, 0, None, False)]),
    ("trim", False, f"{REQ} 0000 0004 {CK} 0000000000010000 00010000",
     [(C.CMD_TRIM, 0, COOKIE, 0x10000, 0x10000, None, False)]),
    ("cache", False, f"{REQ} 0000 0005 {CK} 0000000000000000 00100000",
     [(C.CMD_CACHE, 0, COOKIE, 0, 0x100000, None, False)]),
    ("write-zeroes-no-hole-fast-zero", False, f"{REQ} 0012 0006 {CK} 0000000000000200 ffffffff",
     [(C.CMD_WRITE_ZEROES, 0x12, COOKIE, 0x200, 0xFFFFFFFF, None, False)]),
    ("block-status-req-one", False, f"{REQ} 0008 0007 {CK} 0000000000000000 80000000",
     [(C.CMD_BLOCK_STATUS, 8, COOKIE, 0, 0x80000000, None, False)]),
    ("unknown-command-9", False, f"{REQ} 0000 0009 {CK} 0000000000000000 00000010",
     [(9, 0, COOKIE, 0, 16, None, False)]),
    ("compact-payload-len-flag-has-no-payload", False, f"{REQ} 0020 0000 {CK} 0000000000000000 00000004",
     [(C.CMD_READ, 0x20, COOKIE, 0, 4, None, False)]),
    ("write-then-read", False,
     f"{REQ} 0000 0001 0000000000000001 0000000000000000 00000003 616263 "
     f"{REQ} 0000 0000 0000000000000002 0000000000000000 00000003",
     [(C.CMD_WRITE, 0, 1, 0, 3, b"abc", False), (C.CMD_READ, 0, 2, 0, 3, None, False)]),
    ("ext-read-64bit-length", True, f"{EXT_REQ} 0000 0000 {CK} 0000000000001000 0000000100000000",
     [(C.CMD_READ, 0, COOKIE, 0x1000, 1 << 32, None, False)]),
    ("ext-write-payload-len", True, f"{EXT_REQ} 0021 0001 {CK} ffffffffffff0000 0000000000000005 776f726c64",
     [(C.CMD_WRITE, 0x21, COOKIE, 0xFFFFFFFFFFFF0000, 5, b"world", False)]),
    ("ext-block-status-huge-effect-length", True, f"{EXT_REQ} 0000 0007 {CK} 0000000000000000 ffffffffffffffff",
     [(C.CMD_BLOCK_STATUS, 0, COOKIE, 0, 0xFFFFFFFFFFFFFFFF, None, False)]),
    ("ext-write-zeroes-64bit", True, f"{EXT_REQ} 0002 0006 {CK} 0000000000000000 0000001000000000",
     [(C.CMD_WRITE_ZEROES, 2, COOKIE, 0, 1 << 36, None, False)]),
    ("ext-write-without-payload-len-has-no-payload", True,
     f"{EXT_REQ} 0000 0001 {CK} 0000000000000000 0000000000000004",
     [(C.CMD_WRITE, 0, COOKIE, 0, 4, None, False)]),
    ("ext-trim-with-payload-consumed", True,
     f"{EXT_REQ} 0020 0004 0000000000000001 0000000000000000 0000000000000003 21e41c "
     f"{EXT_REQ} 0000 0003 0000000000000002 0000000000000000 0000000000000000",
     [(C.CMD_TRIM, 0x20, 1, 0, 3, b"\x21\xe4\x1c", False), (C.CMD_FLUSH, 0, 2, 0, 0, None, False)]),
    ("ext-disc", True, f"{EXT_REQ} 0000 0002 0000000000000003 0000000000000000 0000000000000000",
     [(C.CMD_DISC, 0, 3, 0, 0, None, False)]),
]  # fmt: skip


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(("extended", "wire", "expected"), [pytest.param(e, w, x, id=i) for i, e, w, x in REQUESTS])
def test_decode_request(extended: bool, wire: str, expected: list, split: str) -> None:
    parser = RequestParser(extended=extended)
    assert feed(parser, h(wire), split) == expected
    assert parser.idle


@pytest.mark.parametrize(("extended", "wire", "expected"), [pytest.param(e, w, x, id=i) for i, e, w, x in REQUESTS])
def test_encode_request(extended: bool, wire: str, expected: list) -> None:
    out = b""
    for type_, flags, cookie, offset, length, payload, _ in expected:
        out += encode_request(type_, cookie, offset, length, flags, payload or b"", extended=extended)
    assert out.hex(" ") == h(wire).hex(" ")


def test_zero_length_write_has_empty_payload() -> None:
    parser = RequestParser()
    parser.receive_data(h(f"{REQ} 0000 0001 {CK} 0000000000000000 00000000"))
    req = parser.next_event()
    assert req is not None and req.type == C.CMD_WRITE and req.length == 0
    assert not req.payload
    assert parser.next_event() is None and parser.idle


# Oversize payloads: max_payload 16; WRITE of 20 bytes is drained and flagged, the next request parses.
OVERSIZE = [
    ("compact-write-oversize", False,
     f"{REQ} 0000 0001 0000000000000001 0000000000000000 00000014 " + "25" * 20 + " "
     f"{REQ} 0000 0003 0000000000000002 0000000000000000 00000000",
     [(C.CMD_WRITE, 0, 1, 0, 20, None, True), (C.CMD_FLUSH, 0, 2, 0, 0, None, False)]),
    ("compact-write-at-limit", False,
     f"{REQ} 0000 0001 0000000000000001 0000000000000000 00000010 " + "ab" * 16,
     [(C.CMD_WRITE, 0, 1, 0, 16, b"\xab" * 16, False)]),
    ("ext-payload-len-oversize", True,
     f"{EXT_REQ} 0020 0001 0000000000000001 0000000000000000 0000000000000011 " + "21" * 17 + " "
     f"{EXT_REQ} 0000 0000 0000000000000002 0000000000000200 0000000000000200",
     [(C.CMD_WRITE, 0x20, 1, 0, 17, None, True), (C.CMD_READ, 0, 2, 0x200, 0x200, None, False)]),
]  # fmt: skip


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(("extended", "wire", "expected"), [pytest.param(e, w, x, id=i) for i, e, w, x in OVERSIZE])
def test_oversize_payload_drained(extended: bool, wire: str, expected: list, split: str) -> None:
    parser = RequestParser(extended=extended, max_payload=16, drain_limit=32)
    assert feed(parser, h(wire), split) == expected
    assert parser.idle


BAD_REQUESTS = [
    ("compact-bad-magic", False, f"{EXT_REQ} 0000 0000 {CK} 0000000000000000 00000200"),
    ("compact-zero-magic", False, "00000000 0000 0000 0000000000000000 0000000000000000 00000000"),
    ("extended-gets-compact-magic", True, f"{REQ} 0000 0000 {CK} 0000000000000000 00000200 00000000"),
    ("compact-write-over-drain-limit", False, f"{REQ} 0000 0001 {CK} 0000000000000000 00000021"),
    ("ext-payload-over-drain-limit", True, f"{EXT_REQ} 0020 0001 {CK} 0000000000000000 0000000100000000"),
]  # fmt: skip


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize(("extended", "wire"), [pytest.param(e, w, id=i) for i, e, w in BAD_REQUESTS])
def test_request_protocol_error(extended: bool, wire: str, split: str) -> None:
    parser = RequestParser(extended=extended, max_payload=16, drain_limit=32)
    with pytest.raises(ProtocolError):
        feed(parser, h(wire), split)


def test_write_payload_received_into_its_own_buffer() -> None:
    """A payload too large to stay inline: once the header is parsed, get_buffer hands out the
    payload buffer itself (the kernel writes it there, no copy), and it is the request's."""
    parser = RequestParser(inline_max=0x800)
    parser.receive_data(h(f"{REQ} 0000 0001 {CK} 0000000000000000 00001000 0102"))
    assert parser.next_event() is None
    buf = parser.get_buffer()
    assert len(buf) == 0x1000 - 2
    buf[:] = b"\x03" * len(buf)
    parser.buffer_updated(len(buf))
    req = parser.next_event()
    assert req is not None and bytes(req.payload) == b"\x01\x02" + b"\x03" * (0x1000 - 2)
    assert not req.inline and req.payload.obj is buf.obj
    assert parser.idle


def test_payload_taken_by_the_caller_leaves_the_parser_at_the_next_header() -> None:
    """While a large payload arrives, ``payload_in_progress`` shows the request, the bytes so far
    and how many are still to come; once the caller takes the rest off the stream itself
    (``payload_taken``), the next bytes fed are parsed as the next request's header."""
    parser = RequestParser(inline_max=0x800)
    assert parser.payload_in_progress() is None
    parser.receive_data(h(f"{REQ} 0000 0001 {CK} 0000000000000040 00001000 0102"))
    assert parser.next_event() is None
    req, received, left = parser.payload_in_progress()
    assert (req.type, req.offset, req.length, bytes(received), left) == (C.CMD_WRITE, 0x40, 0x1000, b"\x01\x02", 0xFFE)
    assert parser.payload_taken() is req and req.payload is None
    assert parser.idle and parser.payload_in_progress() is None
    parser.receive_data(h(f"{REQ} 0000 0000 {CK} 0000000000000000 00000010"))
    assert fields(parser.next_event()) == (C.CMD_READ, 0, COOKIE, 0, 0x10, None, False)


def test_no_payload_in_progress_once_all_of_it_arrived() -> None:
    parser = RequestParser(inline_max=0x800)
    parser.receive_data(h(f"{REQ} 0000 0001 {CK} 0000000000000000 00001000") + b"\x07" * 0x1000)
    assert parser.payload_in_progress() is None
    assert bytes(parser.next_event().payload) == b"\x07" * 0x1000


def test_small_write_payload_stays_in_the_receive_buffer() -> None:
    """A payload that fits waits in the receive buffer (the partial request moved to the front
    when the buffer's end is near) and is handed out as a view of it."""
    parser = RequestParser(buffer_size=100)
    header = h(f"{REQ} 0000 0001 {CK} 0000000000000000 00000030")
    parser.receive_data(h(f"{REQ} 0000 0000 {CK} 0000000000000000 00000001") + header + b"\x05" * 10)
    assert parser.next_event().type == C.CMD_READ
    assert parser.next_event() is None  # the write's payload is not all here yet
    room = parser.get_buffer()
    assert len(room) >= 0x30 - 10, "the partial write was not moved to make room for its payload"
    room[: 0x30 - 10] = b"\x06" * (0x30 - 10)
    parser.buffer_updated(0x30 - 10)
    req = parser.next_event()
    assert req.inline and bytes(req.payload) == b"\x05" * 10 + b"\x06" * (0x30 - 10)
    assert parser.idle


# -- check_request: the errno rules --------------------------------------------------------

SIZE = 0x100000
WRITABLE = C.FLAG_HAS_FLAGS | C.FLAG_SEND_FLUSH | C.FLAG_SEND_FUA | C.FLAG_SEND_TRIM | C.FLAG_SEND_WRITE_ZEROES
RO = C.FLAG_HAS_FLAGS | C.FLAG_READ_ONLY | C.FLAG_SEND_FLUSH | C.FLAG_SEND_FUA
MAXP = 32 << 20
BASE = {"size": SIZE, "export_flags": WRITABLE, "extended": False, "structured": False, "max_payload": MAXP,
        "have_contexts": False}  # fmt: skip
R, W, D, F, T, CA, WZ, BS = range(8)

CHECKS = [
    # (id, type, flags, offset, length, overrides, expected errno or None)
    ("read-ok", R, 0, 0, SIZE, {}, None),
    ("read-zero-length-ok", R, 0, SIZE, 0, {}, None),
    ("read-past-end", R, 0, SIZE, 1, {}, errno.EINVAL),
    ("read-crossing-end", R, 0, SIZE - 512, 1024, {}, errno.EINVAL),
    ("read-huge-offset", R, 0, (1 << 64) - 512, 1024, {}, errno.EINVAL),
    ("write-ok", W, 0, SIZE - 1, 1, {}, None),
    ("write-past-end-enospc", W, 0, SIZE, 512, {}, errno.ENOSPC),
    ("write-zeroes-past-end-enospc", WZ, 0, SIZE - 512, 1024, {}, errno.ENOSPC),
    ("trim-past-end-einval", T, 0, SIZE - 512, 1024, {}, errno.EINVAL),
    ("cache-past-end-einval", CA, 0, SIZE, 1, {}, errno.EINVAL),
    ("block-status-past-end-einval", BS, 0, SIZE, 1, {"have_contexts": True, "structured": True}, errno.EINVAL),
    ("write-read-only-eperm", W, 0, 0, 512, {"export_flags": RO}, errno.EPERM),
    ("trim-read-only-eperm", T, 0, 0, 512, {"export_flags": RO}, errno.EPERM),
    ("write-zeroes-read-only-eperm", WZ, 0, 0, 512, {"export_flags": RO}, errno.EPERM),
    ("read-read-only-ok", R, 0, 0, 512, {"export_flags": RO}, None),
    ("flush-read-only-ok", F, 0, 0, 0, {"export_flags": RO}, None),
    ("cache-read-only-ok", CA, 0, 0, 512, {"export_flags": RO}, None),
    ("unknown-command-8", 8, 0, 0, 0, {}, errno.EINVAL),
    ("unknown-command-0xffff", 0xFFFF, 0, 0, 0, {}, errno.EINVAL),
    ("unknown-flag-bit6", R, 0x40, 0, 512, {}, errno.EINVAL),
    ("unknown-flag-bit15", F, 0x8000, 0, 0, {}, errno.EINVAL),
    ("no-hole-on-write", W, C.CMD_FLAG_NO_HOLE, 0, 512, {}, errno.EINVAL),
    ("req-one-on-read", R, C.CMD_FLAG_REQ_ONE, 0, 512, {}, errno.EINVAL),
    ("df-on-write", W, C.CMD_FLAG_DF, 0, 512, {"structured": True}, errno.EINVAL),
    ("fua-on-every-command-ok", F, C.CMD_FLAG_FUA, 0, 0, {}, None),
    ("fua-on-read-ok", R, C.CMD_FLAG_FUA, 0, 512, {}, None),
    ("no-hole-write-zeroes-ok", WZ, C.CMD_FLAG_NO_HOLE, 0, 512, {}, None),
    ("df-without-structured", R, C.CMD_FLAG_DF, 0, 512, {}, errno.EINVAL),
    ("df-with-structured-ok", R, C.CMD_FLAG_DF, 0, 512, {"structured": True}, None),
    ("fast-zero-not-advertised", WZ, C.CMD_FLAG_FAST_ZERO, 0, 512, {}, errno.EINVAL),
    ("fast-zero-advertised-ok", WZ, C.CMD_FLAG_FAST_ZERO, 0, 512,
     {"export_flags": WRITABLE | C.FLAG_SEND_FAST_ZERO}, None),
    ("read-over-max-payload", R, 0, 0, MAXP + 1, {"size": 1 << 40}, errno.EINVAL),
    ("read-at-max-payload-ok", R, 0, 0, MAXP, {"size": 1 << 40}, None),
    ("trim-over-max-payload-ok", T, 0, 0, MAXP + 1, {"size": 1 << 40}, None),
    ("write-zeroes-zero-length-ok", WZ, 0, 0, 0, {}, None),
    ("block-status-without-contexts", BS, 0, 0, 512, {"structured": True}, errno.EINVAL),
    ("block-status-zero-length", BS, 0, 0, 0, {"structured": True, "have_contexts": True}, errno.EINVAL),
    ("block-status-ok", BS, C.CMD_FLAG_REQ_ONE, 0, SIZE, {"structured": True, "have_contexts": True}, None),
    ("payload-len-on-compact", W, C.CMD_FLAG_PAYLOAD_LEN, 0, 512, {}, errno.EINVAL),
    ("ext-write-with-payload-len-ok", W, C.CMD_FLAG_PAYLOAD_LEN, 0, 512, {"extended": True}, None),
    ("ext-write-without-payload-len", W, 0, 0, 512, {"extended": True}, errno.EINVAL),
    ("ext-read-with-payload-len", R, C.CMD_FLAG_PAYLOAD_LEN, 0, 512, {"extended": True}, errno.EINVAL),
    ("ext-block-status-64bit-past-end", BS, 0, 0, 1 << 40,
     {"extended": True, "structured": True, "have_contexts": True}, errno.EINVAL),
    ("ext-write-zeroes-64bit-ok", WZ, 0, 0, 1 << 40, {"extended": True, "size": 1 << 41}, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("type_", "flags", "offset", "length", "over", "expected"), [pytest.param(*c[1:], id=c[0]) for c in CHECKS]
)
def test_check_request(type_: int, flags: int, offset: int, length: int, over: dict, expected: int | None) -> None:
    req = Request(type_, flags, COOKIE, offset, length)
    got = check_request(req, **{**BASE, **over})
    if expected is None:
        assert got is None
    else:
        assert got is not None and got[0] == expected, got
        assert got[1]


def test_check_request_oversize_write() -> None:
    req = Request(C.CMD_WRITE, 0, COOKIE, 0, 64)
    req.oversize = True
    got = check_request(req, **{**BASE, "max_payload": 16})
    assert got is not None and got[0] == errno.EINVAL


# -- replies -------------------------------------------------------------------------------
# Columns: id, encoder(structured, extended), call, hex, decode_reply_header result


def _read_into(header: bytearray, data: bytes) -> bytes:
    return bytes(header) + data


def _read_reply(enc: ReplyEncoder, offset: int, data: bytes) -> bytes:
    """The hot path's one-buffer READ reply: pack_read_header, then the data after it."""
    out = bytearray(enc.read_header_size + len(data))
    out[enc.read_header_size :] = data
    enc.pack_read_header(out, COOKIE, offset, len(data))
    return bytes(out)


SIMPLE_ENC = ReplyEncoder()
SR_ENC = ReplyEncoder(structured=True)
EH_ENC = ReplyEncoder(extended=True)

REPLIES = [
    ("simple-ok", lambda: SIMPLE_ENC.simple(COOKIE), f"{SIMPLE} 00000000 {CK}", False, ("simple", 0, COOKIE)),
    ("simple-eio", lambda: SIMPLE_ENC.simple(COOKIE, errno.EIO), f"{SIMPLE} 00000005 {CK}", False,
     ("simple", 5, COOKIE)),
    ("simple-read-reply", lambda: _read_reply(SIMPLE_ENC, 0x1000, b"abcd"),
     f"{SIMPLE} 00000000 {CK} 61626364", False, ("simple", 0, COOKIE)),
    ("simple-done", lambda: SIMPLE_ENC.done(COOKIE, 0x1000), f"{SIMPLE} 00000000 {CK}", False, ("simple", 0, COOKIE)),
    ("simple-error-ignores-message", lambda: SIMPLE_ENC.error(COOKIE, 0, errno.EINVAL, "bad"),
     f"{SIMPLE} 00000016 {CK}", False, ("simple", 22, COOKIE)),
    ("structured-done-is-simple", lambda: SR_ENC.done(COOKIE, 0), f"{SIMPLE} 00000000 {CK}", False,
     ("simple", 0, COOKIE)),
    ("structured-offset-data", lambda: _read_into(SR_ENC.data_header(COOKIE, 0x1000, 0x1200, 3, done=True), b"xyz"),
     f"{CHUNK} 0001 0001 {CK} 0000000b 0000000000001200 78797a", False, ("chunk", 1, 1, COOKIE, None, 11)),
    ("structured-read-reply", lambda: _read_reply(SR_ENC, 0x1200, b"xyz"),
     f"{CHUNK} 0001 0001 {CK} 0000000b 0000000000001200 78797a", False, ("chunk", 1, 1, COOKIE, None, 11)),
    ("structured-offset-data-not-done",
     lambda: _read_into(SR_ENC.data_header(COOKIE, 0, 0, 1, done=False), b"\x00"),
     f"{CHUNK} 0000 0001 {CK} 00000009 0000000000000000 00", False, ("chunk", 0, 1, COOKIE, None, 9)),
    ("structured-offset-hole", lambda: SR_ENC.hole(COOKIE, 0x1000, 0x1000, 0x200, done=False),
     f"{CHUNK} 0000 0002 {CK} 0000000c 0000000000001000 00000200", False, ("chunk", 0, 2, COOKIE, None, 12)),
    ("structured-offset-hole-done", lambda: SR_ENC.hole(COOKIE, 0, 0x10000, 0x10000, done=True),
     f"{CHUNK} 0001 0002 {CK} 0000000c 0000000000010000 00010000", False, ("chunk", 1, 2, COOKIE, None, 12)),
    ("structured-none", lambda: SR_ENC.none(COOKIE, 0x1000), f"{CHUNK} 0001 0000 {CK} 00000000", False,
     ("chunk", 1, 0, COOKIE, None, 0)),
    ("structured-error", lambda: SR_ENC.error(COOKIE, 0, errno.EINVAL, "hello"),
     f"{CHUNK} 0001 8001 {CK} 0000000b 00000016 0005 68656c6c6f", False, ("chunk", 1, 0x8001, COOKIE, None, 11)),
    ("structured-error-no-message", lambda: SR_ENC.error(COOKIE, 0, errno.ENOSPC),
     f"{CHUNK} 0001 8001 {CK} 00000006 0000001c 0000", False, ("chunk", 1, 0x8001, COOKIE, None, 6)),
    ("structured-error-offset", lambda: SR_ENC.error(COOKIE, 0, errno.EIO, "hello", error_offset=0x1234),
     f"{CHUNK} 0001 8002 {CK} 00000013 00000005 0005 68656c6c6f 0000000000001234", False,
     ("chunk", 1, 0x8002, COOKIE, None, 19)),
    ("structured-block-status",
     lambda: SR_ENC.block_status(COOKIE, 0, 1, [(0x1000, 3), (0x2000, 0)], done=True),
     f"{CHUNK} 0001 0005 {CK} 00000014 00000001 00001000 00000003 00002000 00000000", False,
     ("chunk", 1, 5, COOKIE, None, 20)),
    ("structured-block-status-depth-not-done",
     lambda: SR_ENC.block_status(COOKIE, 0, 2, [(0x10000, 2)], done=False),
     f"{CHUNK} 0000 0005 {CK} 0000000c 00000002 00010000 00000002", False, ("chunk", 0, 5, COOKIE, None, 12)),
    ("extended-done-is-none-chunk", lambda: EH_ENC.done(COOKIE, 0x1000),
     f"{EXT_CHUNK} 0001 0000 {CK} 0000000000001000 0000000000000000", True, ("chunk", 1, 0, COOKIE, 0x1000, 0)),
    ("extended-none", lambda: EH_ENC.none(COOKIE, 0xFFFFFFFFFFFFFE00),
     f"{EXT_CHUNK} 0001 0000 {CK} fffffffffffffe00 0000000000000000", True,
     ("chunk", 1, 0, COOKIE, 0xFFFFFFFFFFFFFE00, 0)),
    ("extended-offset-data",
     lambda: _read_into(EH_ENC.data_header(COOKIE, 0x1000, 0x1200, 3, done=True), b"xyz"),
     f"{EXT_CHUNK} 0001 0001 {CK} 0000000000001000 000000000000000b 0000000000001200 78797a", True,
     ("chunk", 1, 1, COOKIE, 0x1000, 11)),
    ("extended-read-reply", lambda: _read_reply(EH_ENC, 0x1200, b"xyz"),
     f"{EXT_CHUNK} 0001 0001 {CK} 0000000000001200 000000000000000b 0000000000001200 78797a", True,
     ("chunk", 1, 1, COOKIE, 0x1200, 11)),
    ("extended-offset-hole", lambda: EH_ENC.hole(COOKIE, 0, 0x200, 0x200, done=False),
     f"{EXT_CHUNK} 0000 0002 {CK} 0000000000000000 000000000000000c 0000000000000200 00000200", True,
     ("chunk", 0, 2, COOKIE, 0, 12)),
    ("extended-error", lambda: EH_ENC.error(COOKIE, 0x200, errno.EPERM, "ro"),
     f"{EXT_CHUNK} 0001 8001 {CK} 0000000000000200 0000000000000008 00000001 0002 726f", True,
     ("chunk", 1, 0x8001, COOKIE, 0x200, 8)),
    ("extended-error-offset", lambda: EH_ENC.error(COOKIE, 0x200, errno.EIO, "", error_offset=0x400),
     f"{EXT_CHUNK} 0001 8002 {CK} 0000000000000200 000000000000000e 00000005 0000 0000000000000400", True,
     ("chunk", 1, 0x8002, COOKIE, 0x200, 14)),
    ("extended-block-status-ext",
     lambda: EH_ENC.block_status(COOKIE, 0, 1, [(0x1000, 3), (0x200000000, 0)], done=True),
     f"{EXT_CHUNK} 0001 0006 {CK} 0000000000000000 0000000000000028 00000001 00000002 "
     "0000000000001000 0000000000000003 0000000200000000 0000000000000000", True,
     ("chunk", 1, 6, COOKIE, 0, 40)),
]  # fmt: skip


@pytest.mark.parametrize(("encode", "wire"), [pytest.param(f, w, id=i) for i, f, w, _, _ in REPLIES])
def test_encode_reply(encode, wire: str) -> None:
    assert encode().hex(" ") == h(wire).hex(" ")


@pytest.mark.parametrize(("wire", "extended", "header"), [pytest.param(w, e, d, id=i) for i, _, w, e, d in REPLIES])
def test_decode_reply_header(wire: str, extended: bool, header: tuple) -> None:
    assert decode_reply_header(h(wire), extended=extended) == header


def test_decode_reply_header_bad_magic() -> None:
    with pytest.raises(ValueError):
        decode_reply_header(h(f"{REQ} 00000000 {CK}"))


def test_reply_encoder_modes() -> None:
    assert (SIMPLE_ENC.structured, SIMPLE_ENC.extended) == (False, False)
    assert (SR_ENC.structured, SR_ENC.extended, SR_ENC.chunk_size) == (True, False, 20)
    assert (EH_ENC.structured, EH_ENC.extended, EH_ENC.chunk_size) == (True, True, 32)
    with pytest.raises(AssertionError):
        EH_ENC.simple(COOKIE)


# -- property: valid requests, split anywhere, decode to themselves ------------------------

_VALID_FLAGS = {R: [0, 1, 4, 5], W: [0, 1], D: [0], F: [0, 1], T: [0, 1], CA: [0, 1], WZ: [0, 1, 2, 16, 19],
                  BS: [0, 1, 8, 9]}  # fmt: skip
u64 = st.integers(0, (1 << 64) - 1)


@st.composite
def _request(draw, extended: bool) -> tuple:
    type_ = draw(st.sampled_from(sorted(_VALID_FLAGS)))
    flags = draw(st.sampled_from(_VALID_FLAGS[type_]))
    cookie, offset = draw(u64), draw(u64)
    if type_ == W:
        payload = draw(st.binary(max_size=300))
        if extended:
            flags |= C.CMD_FLAG_PAYLOAD_LEN
        return (type_, flags, cookie, offset, len(payload), payload, False)
    length = draw(u64 if extended else st.integers(0, (1 << 32) - 1))
    return (type_, flags, cookie, offset, length, None, False)


@st.composite
def _stream(draw) -> tuple:
    extended = draw(st.booleans())
    reqs = draw(st.lists(_request(extended), min_size=1, max_size=12))
    wire = b"".join(encode_request(t, c, o, n, f, p or b"", extended=extended) for t, f, c, o, n, p, _ in reqs)
    cuts = sorted(draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    buffer_size = draw(st.sampled_from([64, 100, 256 << 10]))
    # None: next_event only; else (max_count, max_bytes, max_read, writes) for next_plain batches first
    batch = draw(
        st.none() | st.tuples(st.integers(1, 4), st.integers(1, 1 << 33), st.integers(1, 1 << 33), st.booleans())
    )
    detach = draw(st.booleans())  # the server detaching after every batch (a write in flight)
    return extended, reqs, wire, cuts, buffer_size, batch, detach


@settings(max_examples=300, deadline=None)
@given(_stream())
def test_property_split_requests_decode_to_themselves(case) -> None:
    """Also with the fast case's ``next_plain`` taking plain READs (and WRITEs) first: together
    with ``next_event`` it yields every request once, in order, payloads intact; also when the
    receive buffer is detached after each batch (inline payloads still referred to)."""
    extended, reqs, wire, cuts, buffer_size, batch, detach = case
    parser = RequestParser(extended=extended, buffer_size=buffer_size)
    out = []
    held = []  # inline payloads handed out, with their bytes: must not change after a detach
    bounds = [0, *cuts, len(wire)]
    for a, b in itertools.pairwise(bounds):
        pos = a
        while pos < b:  # the BufferedProtocol path: never more than get_buffer() offers
            buf = parser.get_buffer()
            n = min(len(buf), b - pos)
            assert n > 0, "get_buffer() offered no room"
            buf[:n] = wire[pos : pos + n]
            parser.buffer_updated(n)
            pos += n
            while True:
                if batch is not None:
                    max_count, max_bytes, max_read, writes = batch
                    plain = parser.next_plain(
                        max_count=max_count, max_bytes=max_bytes, max_read=max_read, writes=writes
                    )
                    assert len(plain) <= max_count
                    reads = [n for _, _, n, p in plain if p is None]
                    assert all(0 < n <= max_read for n in reads) and sum(reads[:-1]) < max_bytes
                    assert writes or len(reads) == len(plain)
                    wf = C.CMD_FLAG_PAYLOAD_LEN if extended else 0
                    for c, o, n, p in plain:
                        t, f = (C.CMD_READ, 0) if p is None else (C.CMD_WRITE, wf)
                        out.append((t, f, c, o, n, None if p is None else bytes(p), False))
                        if p is not None:
                            held.append((p, bytes(p)))
                    if plain:
                        continue
                req = parser.next_event()
                if req is None:
                    break
                out.append(fields(req))
                if req.inline:
                    held.append((req.payload, bytes(req.payload)))
            if detach:
                parser.detach()
            else:
                held.clear()
    for view, data in held:
        assert bytes(view) == data, "a detached buffer changed"
    assert out == [(t, f, c, o, n, p or None, ov) for t, f, c, o, n, p, ov in reqs]
    assert parser.idle


@pytest.mark.parametrize("enc", [SR_ENC, EH_ENC], ids=["structured", "extended"])
def test_error_chunk_message_capped_on_a_character_boundary(enc: ReplyEncoder) -> None:
    out = enc.error(COOKIE, 0, errno.EIO, "a" + "\u00e9" * 3000)  # 6001 bytes; byte 4096 splits an 'é'
    payload = out[enc.chunk_size :]
    assert payload[:6] == h("00000005 0fff")
    assert payload[6:].decode("utf-8") == "a" + "\u00e9" * 2047


# -- the fast case's batch decoder ----------------------------------------------------------

PLAIN_READ_1 = f"{REQ} 0000 0000 {CK} 0000000000001000 00001000"
PLAIN_READ_2 = f"{REQ} 0000 0000 0000000000000002 0000000000002000 00000200"
READ_FUA = f"{REQ} 0001 0000 {CK} 0000000000000000 00000200"
READ_EMPTY = f"{REQ} 0000 0000 {CK} 0000000000000000 00000000"
FLUSH_REQ = f"{REQ} 0000 0003 {CK} 0000000000000000 00000000"
BAD_MAGIC = f"25609514 0000 0000 {CK} 0000000000000000 00000200"
EXT_READ = f"{EXT_REQ} 0000 0000 {CK} 0000000000001000 0000000000001000"

PLAIN_WRITE = f"{REQ} 0000 0001 0000000000000003 0000000000003000 00000004 61626364"
WRITE_FUA = f"{REQ} 0001 0001 0000000000000003 0000000000003000 00000004 61626364"
EXT_WRITE = f"{EXT_REQ} 0020 0001 0000000000000003 0000000000003000 0000000000000002 6566"
R1, R2, WR = (COOKIE, 0x1000, 0x1000, None), (2, 0x2000, 0x200, None), (3, 0x3000, 4, b"abcd")

NEXT_PLAIN = [
    # id, extended, wire, (max_count, max_bytes, max_read, writes), batch, then next_event's type
    ("two-plain-then-flush", False, f"{PLAIN_READ_1} {PLAIN_READ_2} {FLUSH_REQ}", (8, 1 << 20, 1 << 20, True),
     [R1, R2], C.CMD_FLUSH),
    ("count-limit", False, f"{PLAIN_READ_1} {PLAIN_READ_2}", (1, 1 << 20, 1 << 20, True), [R1], C.CMD_READ),
    ("bytes-limit-after-reaching-it", False, f"{PLAIN_READ_1} {PLAIN_READ_2}", (8, 0x1000, 1 << 20, True),
     [R1], C.CMD_READ),
    ("length-limit", False, f"{PLAIN_READ_1} {PLAIN_READ_2}", (8, 1 << 20, 0xFFF, True), [], C.CMD_READ),
    ("flags-stop-the-batch", False, f"{READ_FUA} {PLAIN_READ_1}", (8, 1 << 20, 1 << 20, True), [], C.CMD_READ),
    ("zero-length-is-not-plain", False, f"{READ_EMPTY}", (8, 1 << 20, 1 << 20, True), [], C.CMD_READ),
    ("partial-header-waits", False, f"{PLAIN_READ_1} {PLAIN_READ_2[:-2]}", (8, 1 << 20, 1 << 20, True), [R1], None),
    ("extended", True, f"{EXT_READ} {EXT_READ}", (8, 1 << 20, 1 << 20, True), [R1, R1], None),
    ("compact-magic-under-extended-stops", True, f"{PLAIN_READ_1} 00000000", (8, 1 << 20, 1 << 20, True), [],
     "error"),
    ("bad-magic-left-to-next-event", False, f"{PLAIN_READ_1} {BAD_MAGIC}", (8, 1 << 20, 1 << 20, True), [R1],
     "error"),
    ("reads-and-writes-mixed", False, f"{PLAIN_READ_1} {PLAIN_WRITE} {PLAIN_READ_2}", (8, 1 << 20, 1 << 20, True),
     [R1, WR, R2], None),
    ("writes-not-taken", False, f"{PLAIN_READ_1} {PLAIN_WRITE}", (8, 1 << 20, 1 << 20, False), [R1], C.CMD_WRITE),
    ("write-fua-is-not-plain", False, f"{WRITE_FUA} {PLAIN_READ_1}", (8, 1 << 20, 1 << 20, True), [], C.CMD_WRITE),
    ("write-bytes-do-not-count", False, f"{PLAIN_WRITE} {PLAIN_WRITE}", (8, 1, 1 << 20, True), [WR, WR], None),
    ("write-payload-incomplete-waits", False, f"{PLAIN_WRITE[:-2]}", (8, 1 << 20, 1 << 20, True), [], None),
    ("extended-write-payload-len", True, f"{EXT_WRITE}", (8, 1 << 20, 1 << 20, True), [(3, 0x3000, 2, b"ef")],
     None),
]  # fmt: skip


@pytest.mark.parametrize(("extended", "wire", "limits", "batch", "then"),
                         [pytest.param(*case[1:], id=case[0]) for case in NEXT_PLAIN])  # fmt: skip
def test_next_plain(extended: bool, wire: str, limits: tuple, batch: list, then) -> None:
    parser = RequestParser(extended=extended)
    parser.receive_data(h(wire))
    max_count, max_bytes, max_read, writes = limits
    got = parser.next_plain(max_count=max_count, max_bytes=max_bytes, max_read=max_read, writes=writes)
    assert [(c, o, n, None if p is None else bytes(p)) for c, o, n, p in got] == batch
    if then == "error":
        with pytest.raises(ProtocolError):
            parser.next_event()
    elif then is None:
        assert parser.next_event() is None
    else:
        assert parser.next_event().type == then


def test_next_plain_waits_while_a_payload_is_pending() -> None:
    parser = RequestParser(inline_max=2)  # a 4-byte payload goes to its own buffer
    parser.receive_data(h(f"{REQ} 0000 0001 {CK} 0000000000000000 00000004 6162"))  # WRITE, half its payload
    assert parser.next_event() is None
    assert parser.next_plain(max_count=8, max_bytes=1 << 20, max_read=1 << 20, writes=True) == []
    parser.receive_data(h(f"6364 {PLAIN_READ_1}"))
    assert parser.next_plain(max_count=8, max_bytes=1 << 20, max_read=1 << 20, writes=True) == []  # the WRITE first
    assert fields(parser.next_event()) == (C.CMD_WRITE, 0, COOKIE, 0, 4, b"abcd", False)


def test_large_payload_whose_header_came_alone_survives_the_buffer_handed_back() -> None:
    """A WRITE header received without any of its (large) payload: the receive buffer holds no
    unparsed byte, so ``release_idle`` hands it back; the payload is then received into its own
    buffer, or taken by the caller, all the same."""
    given = []
    parser = RequestParser(inline_max=0x800, give_buffer=given.append)
    parser.receive_data(h(f"{REQ} 0000 0001 {CK} 0000000000000000 00001000"))
    assert parser.next_event() is None
    parser.release_idle()
    assert len(given) == 1
    req, received, left = parser.payload_in_progress()
    assert (req.length, bytes(received), left) == (0x1000, b"", 0x1000)
    buf = parser.get_buffer()
    assert len(buf) == 0x1000
    buf[:] = b"\x09" * 0x1000
    parser.buffer_updated(0x1000)
    assert bytes(parser.next_event().payload) == b"\x09" * 0x1000

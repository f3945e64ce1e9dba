"""Extended headers (NBD_OPT_EXTENDED_HEADERS) through a raw-socket client, since the clients on
the test machine predate them: 32-byte requests and replies, 64-bit lengths, PAYLOAD_LEN,
BLOCK_STATUS_EXT, extended error chunks, and the rules that keep the stream in sync.
"""

from __future__ import annotations

import struct

import pytest

from tests.interop import nbdclient as raw
from tests.interop.conftest import MiB
from tests.util import serve

GiB = 1 << 30
BIG = 8 * GiB  # a sparse export larger than any 32-bit length
DATA_AT = 5 * GiB  # 1 MiB of 0x5E here, the rest holes


@pytest.fixture(scope="module")
def big_server(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("ext")
    img = d / "big.img"
    with open(img, "wb") as f:
        f.truncate(BIG)
        f.seek(DATA_AT)
        f.write(b"\x5e" * MiB)
    with serve(d, "--export", f"big={img},format=raw") as srv:
        yield srv, img


@pytest.fixture
def ext(big_server):
    srv, _ = big_server
    with raw.RawClient(srv.sock) as c:
        c.greet()
        c.go("big", extended=True, contexts=("base:allocation", "qemu:allocation-depth"))
        yield c
        assert c.pread(DATA_AT, 16) == b"\x5e" * 16  # still in sync after whatever the test did
    assert srv.alive()


def test_negotiation(big_server) -> None:
    srv, _ = big_server
    with raw.RawClient(srv.sock) as c:
        c.greet()
        assert c.option(raw.OPT_EXTENDED_HEADERS) == [(raw.REP_ACK, b"")]
        # Structured replies are implied; asking for them now is an error of its own kind.
        ((rtype, _),) = c.option(raw.OPT_STRUCTURED_REPLY)
        assert rtype == (1 << 31) | 10  # NBD_REP_ERR_EXT_HEADER_REQD
        c.extended = c.structured = True
        c.go("big", extended=False, structured=False)
        assert c.size == BIG
        assert c.pread(DATA_AT - 8, 16) == bytes(8) + b"\x5e" * 8


def test_export_name_is_refused_after_extended_headers(big_server) -> None:
    srv, _ = big_server
    with raw.RawClient(srv.sock) as c:
        c.greet()
        c.option(raw.OPT_EXTENDED_HEADERS)
        c.send_option(raw.OPT_EXPORT_NAME, b"big")
        assert c.wait_closed()


def test_reads_are_32_byte_chunks_echoing_the_offset(ext: raw.RawClient) -> None:
    off, n = DATA_AT - (64 << 10), 128 << 10
    want = bytes(64 << 10) + b"\x5e" * (64 << 10)
    r = ext.call(raw.CMD_READ, off, n)
    assert r.error == 0
    assert bytes(r.data) == want
    assert r.offsets and all(o == off for o in r.offsets)
    types = [t for _, t, _ in r.chunks]
    assert types == [raw.CHUNK_HOLE, raw.CHUNK_DATA]
    # DF: one data chunk
    r = ext.call(raw.CMD_READ, off, n, raw.FLAG_DF)
    assert [t for _, t, _ in r.chunks] == [raw.CHUNK_DATA]
    assert bytes(r.data) == want


def test_block_status_ext_with_64_bit_lengths(ext: raw.RawClient) -> None:
    r = ext.call(raw.CMD_BLOCK_STATUS, 0, BIG)
    assert r.error == 0
    assert all(t == raw.CHUNK_BLOCK_STATUS_EXT for _, t, _ in r.chunks)
    assert r.offsets == [0] * len(r.chunks)
    alloc = r.status[ext.contexts["base:allocation"]]
    assert alloc == [(DATA_AT, 3), (MiB, 0), (BIG - DATA_AT - MiB, 3)]
    assert alloc[0][0] > 1 << 32  # really a 64-bit length
    assert r.status[ext.contexts["qemu:allocation-depth"]] == [(BIG, 1)]
    r = ext.call(raw.CMD_BLOCK_STATUS, 0, BIG, raw.FLAG_REQ_ONE)
    assert r.status[ext.contexts["base:allocation"]] == [(DATA_AT, 3)]


def test_write_with_payload_len(ext: raw.RawClient, big_server) -> None:
    _, img = big_server
    off = 6 * GiB + 512
    r = ext.pwrite(off, b"\xa1" * 1000)
    assert r.error == 0 and r.offsets == [off]
    assert [t for _, t, _ in r.chunks] == [raw.CHUNK_NONE]
    assert ext.pread(off - 1, 1002) == b"\0" + b"\xa1" * 1000 + b"\0"
    assert ext.call(raw.CMD_FLUSH).error == 0
    with open(img, "rb") as f:
        f.seek(off)
        assert f.read(1000) == b"\xa1" * 1000
    # 64-bit effect lengths on TRIM and WRITE_ZEROES (no payload): zero 1 GiB around it.
    r = ext.call(raw.CMD_WRITE_ZEROES, 6 * GiB - GiB // 2, GiB)
    assert r.error == 0
    assert ext.pread(off, 1000) == bytes(1000)
    r = ext.call(raw.CMD_TRIM, 0, 5 * GiB)
    assert r.error == 0


def test_write_without_payload_len_is_einval(ext: raw.RawClient) -> None:
    # Under extended headers the length of a WRITE without PAYLOAD_LEN is not a payload length:
    # no payload follows, and the server must say EINVAL, not wait for 4096 bytes.
    r = ext.call(raw.CMD_WRITE, 0, 4096, 0)
    assert r.error == raw.EINVAL
    assert [t for _, t, _ in r.chunks] == [raw.CHUNK_ERROR]
    assert r.offsets == [0]
    assert ext.pread(0, 4096) == bytes(4096)


def test_payload_on_a_command_without_one_is_consumed(ext: raw.RawClient) -> None:
    r = ext.call(raw.CMD_READ, 0, 16, raw.FLAG_PAYLOAD_LEN, b"\xff" * 16)
    assert r.error == raw.EINVAL
    r = ext.call(raw.CMD_FLUSH, 0, 8, raw.FLAG_PAYLOAD_LEN, b"\xee" * 8)
    assert r.error == raw.EINVAL


def test_oversize_payload_is_drained_then_refused(ext: raw.RawClient) -> None:
    n = 32 * MiB + 4096
    r = ext.call(raw.CMD_WRITE, 0, n, raw.FLAG_PAYLOAD_LEN, b"\x99" * n)
    assert r.error == raw.EINVAL
    assert ext.pread(0, 4096) == bytes(4096)


def test_extended_error_chunks(ext: raw.RawClient) -> None:
    r = ext.call(raw.CMD_READ, BIG - 10, 20)
    assert r.error == raw.EINVAL
    ((flags, ctype, payload),) = r.chunks
    assert flags & raw.REPLY_FLAG_DONE and ctype in (raw.CHUNK_ERROR, raw.CHUNK_ERROR_OFFSET)
    err, mlen = struct.unpack_from(">IH", payload)
    assert err == raw.EINVAL and len(payload) >= 6 + mlen
    assert r.offsets == [BIG - 10]
    r = ext.pwrite(BIG - 10, b"x" * 20)
    assert r.error == raw.ENOSPC
    r = ext.call(raw.CMD_READ, 0, 1 << 33)  # a 64-bit length, far over the maximum payload
    assert r.error == raw.EINVAL
    r = ext.call(raw.CMD_BLOCK_STATUS, 0, 0)
    assert r.error == raw.EINVAL
    r = ext.call(9, 0, 0)  # unknown command
    assert r.error == raw.EINVAL


def test_pipelined_requests_under_extended_headers(ext: raw.RawClient) -> None:
    base = 7 * GiB
    for i in range(32):
        payload = bytes([i + 1]) * 512
        ext.request(raw.CMD_WRITE, 1000 + i, base + i * 512, 512, raw.FLAG_PAYLOAD_LEN, payload)
    replies = {ext.reply().cookie: None for _ in range(32)}
    assert set(replies) == set(range(1000, 1032))
    assert ext.pread(base, 32 * 512) == b"".join(bytes([i + 1]) * 512 for i in range(32))

"""libnbd's Python bindings against nbdserve: structured reads, block status, every request error,
out-of-order replies, multi-conn, zero-length requests and the request flags (DF, FUA, NO_HOLE,
FAST_ZERO), checked against the image file itself.

Strict mode is switched off where a test wants libnbd to send what it would otherwise refuse
client-side (out-of-range, read-only, unknown flags, zero length, oversize).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import nbd
import pytest

from tests.interop.conftest import DATA_RUNS, SIZE, MiB, expected_bytes, seek_data_ranges, write_sparse_raw
from tests.util import serve


def connect(uri: str, *contexts: str, strict: bool = True) -> nbd.NBD:
    h = nbd.NBD()
    for c in contexts or ("base:allocation",):
        h.add_meta_context(c)
    h.connect_uri(uri)
    if not strict:
        h.set_strict_mode(0)
    return h


def errnum(call, *args, **kw) -> int:
    """The errno the server answered ``call`` with (the call must fail)."""
    with pytest.raises(nbd.Error) as ei:
        call(*args, **kw)
    return ei.value.errnum


@pytest.fixture
def h(served):
    handle = connect(served.uri, strict=False)
    yield handle
    handle.shutdown()


@pytest.fixture
def ro(pool):
    """A handle on the pool's read-only export (its image is ``pool.ro_path``)."""
    handle = connect(pool.srv.uri_for("ro"), strict=False)
    yield handle
    handle.shutdown()


def read_chunks(h: nbd.NBD, count: int, offset: int, flags: int = 0) -> tuple[bytes, list[tuple[int, int, int]]]:
    chunks: list[tuple[int, int, int]] = []

    def chunk(subbuf, off, status, err) -> int:
        chunks.append((off, len(subbuf), status))
        return 0

    data = h.pread_structured(count, offset, chunk, flags)
    return bytes(data), sorted(chunks)


def block_status(h: nbd.NBD, count: int, offset: int, flags: int = 0) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}

    def extent(ctx, off, entries, err) -> int:
        assert off == offset
        out[ctx] = list(zip(entries[::2], entries[1::2], strict=True))
        return 0

    h.block_status(count, offset, extent, flags)
    return out


# -- structured reads and block status ----------------------------------------------------------


def test_structured_read_sends_holes_and_data(h: nbd.NBD) -> None:
    data, chunks = read_chunks(h, 2 * MiB, 0)
    assert data == bytes(expected_bytes()[: 2 * MiB])
    # Chunks tile the request exactly.
    pos = 0
    for off, n, _ in chunks:
        assert off == pos and n > 0
        pos += n
    assert pos == 2 * MiB
    holes = [(o, n) for o, n, s in chunks if s == nbd.READ_HOLE]
    datas = [(o, n) for o, n, s in chunks if s == nbd.READ_DATA]
    assert (64 << 10, 1 * MiB - (64 << 10)) in holes  # the sparse gap between the first two runs
    assert (0, 64 << 10) in datas and (1 * MiB, 128 << 10) in datas


def test_df_read_is_one_data_chunk(h: nbd.NBD) -> None:
    data, chunks = read_chunks(h, 2 * MiB, 0, nbd.CMD_FLAG_DF)
    assert data == bytes(expected_bytes()[: 2 * MiB])
    assert chunks == [(0, 2 * MiB, nbd.READ_DATA)]


def test_read_entirely_in_a_hole_is_one_hole_chunk(h: nbd.NBD) -> None:
    data, chunks = read_chunks(h, 1 * MiB, 2 * MiB)
    assert data == bytes(1 * MiB)
    assert chunks == [(2 * MiB, 1 * MiB, nbd.READ_HOLE)]


def test_block_status_and_req_one(h: nbd.NBD) -> None:
    got = block_status(h, SIZE, 0)["base:allocation"]
    assert sum(n for n, _ in got) == SIZE
    want, pos = [], 0
    for off, n, _ in DATA_RUNS:
        if off > pos:
            want.append((off - pos, nbd.STATE_HOLE | nbd.STATE_ZERO))
        want.append((n, 0))
        pos = off + n
    assert got == want
    one = block_status(h, SIZE, 0, nbd.CMD_FLAG_REQ_ONE)["base:allocation"]
    assert one == [(64 << 10, 0)]
    one = block_status(h, 4096, 2 * MiB, nbd.CMD_FLAG_REQ_ONE)["base:allocation"]
    assert one == [(4096, nbd.STATE_HOLE | nbd.STATE_ZERO)]
    # A request ending inside a run is answered up to its end, not beyond.
    part = block_status(h, 100, 10)["base:allocation"]
    assert part == [(100, 0)]


def test_allocation_depth_context(served) -> None:
    h = connect(served.uri, "base:allocation", "qemu:allocation-depth")
    try:
        assert h.can_meta_context("qemu:allocation-depth")
        got = block_status(h, SIZE, 0)
        assert set(got) == {"base:allocation", "qemu:allocation-depth"}
        # Raw has no backing file: every byte is allocated in the top (and only) layer.
        assert got["qemu:allocation-depth"] == [(SIZE, 1)]
    finally:
        h.shutdown()


# -- errors ------------------------------------------------------------------------------------


def test_out_of_range_requests(h: nbd.NBD) -> None:
    assert errnum(h.pwrite, b"x" * 20, SIZE - 10) == errno.ENOSPC
    assert errnum(h.zero, 20, SIZE - 10) == errno.ENOSPC
    assert errnum(h.pread, 20, SIZE - 10) == errno.EINVAL
    assert errnum(h.trim, 20, SIZE - 10) == errno.EINVAL
    assert errnum(h.cache, 20, SIZE) == errno.EINVAL
    assert errnum(h.pread, 1, 1 << 62) == errno.EINVAL
    # ... and nothing was written past the end or into the last bytes.
    assert h.pread(10, SIZE - 10) == b"\x77" * 10


def test_read_only_refuses_writes(ro: nbd.NBD, pool) -> None:
    assert ro.is_read_only()
    before = pool.ro_path.read_bytes()
    assert errnum(ro.pwrite, b"y" * 512, 0) == errno.EPERM
    assert errnum(ro.trim, 4096, 0) == errno.EPERM
    assert errnum(ro.zero, 4096, 0) == errno.EPERM
    ro.flush()  # allowed (a no-op)
    assert ro.pread(512, 0) == b"\x11" * 512
    assert pool.ro_path.read_bytes() == before


def test_unknown_flags_are_einval(h: nbd.NBD) -> None:
    assert errnum(h.pread, 512, 0, flags=1 << 9) == errno.EINVAL
    assert errnum(h.pwrite, b"z" * 512, 0, flags=nbd.CMD_FLAG_NO_HOLE) == errno.EINVAL
    assert errnum(h.flush, flags=nbd.CMD_FLAG_DF) == errno.EINVAL
    assert errnum(h.trim, 512, 0, flags=nbd.CMD_FLAG_REQ_ONE) == errno.EINVAL
    # The rejected write's payload was consumed: the stream is still in sync, nothing written.
    assert h.pread(512, 0) == b"\x11" * 512


def test_over_max_payload(h: nbd.NBD) -> None:
    limit = h.get_block_size(nbd.SIZE_MAXIMUM)
    assert limit == 32 * MiB
    assert errnum(h.pread, limit + 4096, 0) == errno.EINVAL
    assert h.pread(4096, 0) == b"\x11" * 4096
    assert errnum(h.pwrite, b"\xee" * (limit + 4096), 0) == errno.EINVAL
    assert h.pread(4096, 0) == b"\x11" * 4096


def test_fast_zero_where_zeroing_is_not_cheap() -> None:
    """On tmpfs (no FALLOC_FL_ZERO_RANGE) a NO_HOLE|FAST_ZERO request cannot be fast."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        img = write_sparse_raw(Path(d) / "shm.img", size=4 * MiB, runs=((0, 1 * MiB, 0x44),))
        with serve(Path(d), "-f", "raw", img) as srv:
            h = connect(srv.uri)
            try:
                assert h.can_fast_zero()
                try:
                    h.zero(64 << 10, 0, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
                except nbd.Error as e:
                    assert e.errnum == errno.ENOTSUP
                    assert h.pread(64 << 10, 0) == b"\x44" * (64 << 10)  # untouched
                else:
                    assert h.pread(64 << 10, 0) == bytes(64 << 10)
                # Without FAST_ZERO the same request must succeed (never ENOTSUP).
                h.zero(64 << 10, 0, nbd.CMD_FLAG_NO_HOLE)
                assert h.pread(64 << 10, 0) == bytes(64 << 10)
                # A hole-punching FAST_ZERO is cheap on tmpfs.
                h.zero(64 << 10, 128 << 10, nbd.CMD_FLAG_FAST_ZERO)
                assert h.pread(64 << 10, 128 << 10) == bytes(64 << 10)
                assert h.pread(4096, 192 << 10) == b"\x44" * 4096
            finally:
                h.shutdown()


def test_fast_zero_on_a_sparse_file(h: nbd.NBD, sparse_raw: Path) -> None:
    h.zero(64 << 10, 1 * MiB, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(128 << 10, 1 * MiB) == bytes(64 << 10) + b"\x5a" * (64 << 10)


# -- concurrency -------------------------------------------------------------------------------


def completion(sink: list[int], tag: int):
    """A libnbd completion callback appending ``tag`` to ``sink``."""

    def cb(err) -> int:
        sink.append(tag)
        return 1

    return cb


def test_replies_out_of_order(h: nbd.NBD) -> None:
    """A FLUSH (fdatasync in a worker thread, with 8 MiB dirty) issued before small reads, which
    the server answers at once, completes after them."""
    issued = [-1, *range(32)]
    for _attempt in range(3):
        h.pwrite(os.urandom(8 * MiB), 4 * MiB)  # dirty data, so the flush has work to do
        order: list[int] = []
        bufs = [nbd.Buffer(4096) for _ in range(32)]
        callbacks = [completion(order, t) for t in issued]
        h.aio_flush(completion=callbacks[0])  # issue everything back to back
        for i in range(32):
            h.aio_pread(bufs[i], i * 4096, completion=callbacks[i + 1])
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert sorted(order) == sorted(issued)
        assert b"".join(bytes(b.to_bytearray()) for b in bufs) == b"\x11" * (64 << 10) + bytes(64 << 10)
        if order != issued:
            break
    assert order != issued, f"every reply came in request order: {order}"


def test_many_requests_in_flight(h: nbd.NBD, sparse_raw: Path) -> None:
    n = 200
    bufs = []
    for i in range(n):
        h.aio_pwrite(bytes([i % 256]) * 8192, 2 * MiB + i * 8192)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i in range(n):
        b = nbd.Buffer(8192)
        h.aio_pread(b, 2 * MiB + i * 8192)
        bufs.append(b)
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for i, b in enumerate(bufs):
        assert b.to_bytearray() == bytes([i % 256]) * 8192, i
    h.flush()
    data = sparse_raw.read_bytes()
    for i in range(n):
        assert data[2 * MiB + i * 8192 : 2 * MiB + (i + 1) * 8192] == bytes([i % 256]) * 8192


def test_multi_conn_visibility(served) -> None:
    a, b = connect(served.uri), connect(served.uri)
    try:
        assert a.can_multi_conn() and b.can_multi_conn()
        assert b.pread(4096, 5 * MiB) == bytes(4096)
        a.pwrite(b"\xab" * 4096, 5 * MiB)
        a.flush()
        assert b.pread(4096, 5 * MiB) == b"\xab" * 4096
        b.zero(4096, 5 * MiB, nbd.CMD_FLAG_FUA)
        assert a.pread(4096, 5 * MiB) == bytes(4096)
    finally:
        a.shutdown()
        b.shutdown()


# -- individual commands and flags ------------------------------------------------------------


def test_zero_length_requests(h: nbd.NBD, sparse_raw: Path) -> None:
    before = sparse_raw.read_bytes()
    assert h.pread(0, 100) == b""
    assert h.pread_structured(0, 100, lambda *a: 0) == b""
    h.pwrite(b"", 100)
    h.trim(0, 100)
    h.zero(0, 100)
    h.cache(0, 100)
    assert errnum(block_status, h, 0, 100) == errno.EINVAL
    h.flush()
    assert h.pread(4096, 0) == b"\x11" * 4096
    assert sparse_raw.read_bytes() == before


def test_fua_write_reaches_the_file(h: nbd.NBD, sparse_raw: Path) -> None:
    assert h.can_fua()
    h.pwrite(b"\x99" * 8192, 3 * MiB + 512, nbd.CMD_FLAG_FUA)
    with open(sparse_raw, "rb") as f:
        f.seek(3 * MiB + 512)
        assert f.read(8192) == b"\x99" * 8192
    # FUA is accepted on reads too (SEND_FUA: any command).
    assert h.pread(8192, 3 * MiB + 512, nbd.CMD_FLAG_FUA) == b"\x99" * 8192


def test_cache(h: nbd.NBD) -> None:
    assert h.can_cache()
    h.cache(SIZE, 0)
    h.cache(4096, 1 * MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(4096, 1 * MiB) == b"\x5a" * 4096


def test_trim_reads_back_zero_and_deallocates(h: nbd.NBD, sparse_raw: Path) -> None:
    assert block_status(h, 128 << 10, 1 * MiB)["base:allocation"] == [(128 << 10, 0)]
    h.trim(64 << 10, 1 * MiB)
    h.flush()
    assert h.pread(128 << 10, 1 * MiB) == bytes(64 << 10) + b"\x5a" * (64 << 10)
    assert all(not (s < 1 * MiB + (64 << 10) and e > 1 * MiB) for s, e in seek_data_ranges(sparse_raw))
    # Block status (asked before the trim too) now reports the trimmed part as a hole.
    assert block_status(h, 128 << 10, 1 * MiB)["base:allocation"] == [
        (64 << 10, nbd.STATE_HOLE | nbd.STATE_ZERO),
        (64 << 10, 0),
    ]


def test_write_zeroes_with_and_without_no_hole(h: nbd.NBD, sparse_raw: Path) -> None:
    def blocks() -> int:
        return os.stat(sparse_raw).st_blocks * 512

    h.pwrite(b"\x31" * (1 * MiB), 4 * MiB)
    h.flush()
    allocated = blocks()
    assert block_status(h, 1 * MiB, 4 * MiB)["base:allocation"] == [(1 * MiB, 0)]
    # NO_HOLE: reads back zero and the blocks stay allocated.
    h.zero(512 << 10, 4 * MiB, nbd.CMD_FLAG_NO_HOLE)
    h.flush()
    assert h.pread(1 * MiB, 4 * MiB) == bytes(512 << 10) + b"\x31" * (512 << 10)
    assert blocks() == allocated
    # Without NO_HOLE: the server may punch a hole, and this one does.
    h.zero(512 << 10, 4 * MiB + (512 << 10))
    h.flush()
    assert h.pread(1 * MiB, 4 * MiB) == bytes(1 * MiB)
    assert blocks() <= allocated - (512 << 10)
    assert all(not (s < 5 * MiB and e > 4 * MiB + (512 << 10)) for s, e in seek_data_ranges(sparse_raw))
    assert block_status(h, 512 << 10, 4 * MiB + (512 << 10))["base:allocation"] == [
        (512 << 10, nbd.STATE_HOLE | nbd.STATE_ZERO)
    ]


# -- negotiation variants ----------------------------------------------------------------------


def test_simple_replies(served, sparse_raw: Path) -> None:
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.connect_uri(served.uri)
    h.set_strict_mode(0)
    try:
        assert not h.get_structured_replies_negotiated()
        assert not h.can_df()
        assert h.pread(2 * MiB, 0) == bytes(expected_bytes()[: 2 * MiB])
        h.pwrite(b"\x3c" * 1000, 7000)
        assert h.pread(1000, 7000) == b"\x3c" * 1000
        assert errnum(h.pread, 20, SIZE - 10) == errno.EINVAL
        assert errnum(h.pread, 512, 0, flags=nbd.CMD_FLAG_DF) == errno.EINVAL  # DF needs structured
        assert errnum(h.pwrite, b"x" * 20, SIZE - 10) == errno.ENOSPC
        assert h.pread(0, 0) == b""
        h.flush()
    finally:
        h.shutdown()
    with open(sparse_raw, "rb") as f:
        f.seek(7000)
        assert f.read(1000) == b"\x3c" * 1000


@pytest.mark.parametrize("flags", [0, nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE], ids=["newstyle", "fixed-no-zeroes-off"])
def test_old_handshake_flags(served, flags: int) -> None:
    """Without FIXED_NEWSTYLE only EXPORT_NAME may be used; without NO_ZEROES its reply is padded."""
    h = nbd.NBD()
    h.set_handshake_flags(flags)
    h.connect_uri(served.uri)
    try:
        assert h.get_size() == SIZE
        assert h.pread(4096, 0) == b"\x11" * 4096
    finally:
        h.shutdown()


def test_option_mode_info_list_and_contexts(pool, served) -> None:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(served.uri)
    try:
        names: list[tuple[str, str]] = []
        h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
        assert (served.export, "") in names and ("ro", "") in names
        contexts: list[str] = []
        h.opt_list_meta_context(lambda name: contexts.append(name) or 0)
        assert sorted(contexts) == ["base:allocation", "qemu:allocation-depth"]
        h.set_export_name("no-such-export")
        with pytest.raises(nbd.Error):
            h.opt_info()
        h.set_export_name("ro")
        h.opt_info()
        assert h.is_read_only() and h.get_size() == SIZE
        h.set_export_name(served.export)
        h.add_meta_context("base:allocation")
        h.opt_go()
        assert not h.is_read_only()
        assert h.can_meta_context("base:allocation")
        assert block_status(h, 4096, 0)["base:allocation"] == [(4096, 0)]
    finally:
        h.shutdown()

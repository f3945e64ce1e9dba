"""The VHDX driver against QEMU (the oracle), against a bytearray model and against golden images.

* Differential: images QEMU made (block sizes 1M/8M/32M, ZERO or NOT_PRESENT entries, true fixed,
  a 4 MiB log) and filled by ``imagetest.FILL`` read through ``open_image`` as ``qemu-img convert``
  gives them; block status matches the known layout (QEMU maps all VHDX as data).
* Log replay: a pending log QEMU wrote (its own entry, header put back in the crashed state) is
  replayed as ``qemu-img check -r all`` replays it, read-write and read-only (in memory); logs
  built by ``vhdxgen`` (several entries, wrapped, torn last entry, bad CRC) give known results.
* Writes: hypothesis op sequences in several concurrent streams against a model; afterwards
  ``qemu-img check`` is clean, ``qemu-img compare`` equal, the log empty and the GUIDs new.
* Crash safety: every prefix of the file operations of an allocating workload, with unflushed
  writes kept or lost, opens in QEMU and in nbdserve with every flushed write present.
* What QEMU cannot open: 4096-byte sectors and differencing disks (sector bitmaps, parent
  linkage, missing parent), built by ``tests/vhdxgen.py``; block status at any byte offset of a
  partially present block, the first write into one (the parent's zeroes too), UNDEFINED and
  UNMAPPED reading zeroes (never the parent), also after TRIM.
* Hostile images: one-line ``ImageError`` naming the field; hostile logs (huge zero ranges,
  last_file_offset, targets past the image's extent) refused before any write, zero ranges
  punched or skipped.  Fields QEMU ignores (physical sector size, BAT reserved bits) served with
  a warning (read-only for reserved bits).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import struct
import tracemalloc
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vhdxgen import Vhdx, crc_fill, locator_for

from nbdserve.cache import ClusterCache
from nbdserve.errors import ImageError, NbdError
from nbdserve.image import Image, ImageSpec, open_image
from nbdserve.storage.base import settled
from tests.conftest import SLOW
from tests.imagetest import FILL, FlakyBacking, Recorder, apply_ops, model_ops, run, write_all
from tests.imagetest import file_after as _state
from tests.imagetest import opened as _opened
from tests.imagetest import read_image as read_all
from tests.util import qemu_img, qemu_io
from tests.util import run as run_cmd

K = 1024
M = 1024 * K
CACHE = int(os.environ.get("NBDSERVE_TEST_CACHE", 8 << 20))  # e.g. 65536: one BAT page, eviction everywhere

FILL_RANGES = [
    (0, 64 * K),
    (100 * K, 4 * K),
    (3 * M, M),
    (8 * M, 128 * K),
    (10 * M, 64 * K),
    (20 * M, 512),
    (63 * M, M),
]


async def opened(path: Path | str, *, readonly: bool = False) -> Image:
    return await _opened(Path(path), fmt="vhdx", readonly=readonly, cache=CACHE)


def read_image(path: Path, *, readonly: bool = True) -> bytes:
    async def go():
        img = await opened(path, readonly=readonly)
        try:
            return await read_all(img)
        finally:
            await img.close()

    return run(go())


def qemu_raw(path: Path) -> bytes:
    out = path.with_suffix(".convert.raw")
    qemu_img("convert", "-f", "vhdx", "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def headers(path: Path) -> list[dict]:
    out = []
    with open(path, "rb") as f:
        for off in (64 * K, 128 * K):
            f.seek(off)
            b = f.read(80)
            seq = struct.unpack_from("<Q", b, 8)[0]
            out.append({"seq": seq, "fwg": b[16:32], "dwg": b[32:48], "log_guid": b[48:64]})
    return out


def current_header(path: Path) -> dict:
    return max(headers(path), key=lambda h: h["seq"])


def check_clean(path: Path) -> None:
    p = qemu_img("check", "-f", "vhdx", path, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert current_header(path)["log_guid"] == bytes(16), "log left non-empty"


def compare_raw(path: Path, model: bytes | bytearray) -> None:
    ref = path.with_suffix(".model.raw")
    ref.write_bytes(model)
    p = qemu_img("compare", "-f", "vhdx", "-F", "raw", path, ref, check=False)
    ref.unlink()
    assert p.returncode == 0, p.stdout + p.stderr


async def runs_of(img: Image) -> list[tuple[int, int, int, int]]:
    out, pos = [], 0
    for r in await img.runs(0, img.size):
        out.append((pos, r.length, r.flags, r.depth))
        pos += r.length
    return out


def flags_at(runs: list[tuple[int, int, int, int]], off: int) -> tuple[int, int]:
    for start, length, flags, depth in runs:
        if start <= off < start + length:
            return flags, depth
    raise AssertionError(off)


# -- differential against QEMU -----------------------------------------------------------------

VARIANTS = {
    "bs1M": ["-o", "block_size=1M"],
    "bs8M": ["-o", "block_size=8M"],
    "bs32M": ["-o", "block_size=32M"],
    "not_present": ["-o", "block_state_zero=off"],
    "fixed": ["-o", "subformat=fixed,block_state_zero=off"],
    "log4M": ["-o", "block_size=1M,log_size=4M"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_qemu_images_read_identically(tmp_path: Path, variant: str) -> None:
    path = tmp_path / "q.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", *VARIANTS[variant], path, "64M")
    qemu_io("vhdx", path, *FILL)
    assert read_image(path) == qemu_raw(path)

    async def status():
        img = await opened(path, readonly=True)
        try:
            return await runs_of(img), img.driver.geo.block_size
        finally:
            await img.close()

    runs, bs = run(status())
    touched = {off // bs for start, n in FILL_RANGES for off in range(start, start + n, 512)}
    for block in range(64 * M // bs):
        flags, depth = flags_at(runs, block * bs)
        if variant == "fixed" or block in touched:
            assert (flags, depth) == (0, 1), block  # FULLY_PRESENT: data
        elif variant == "not_present":
            assert (flags, depth) == (3, 0), block  # NOT_PRESENT: unallocated, reads zeroes
        else:
            assert (flags, depth) == (3, 1), block  # ZERO state: allocated zeroes


def test_generator_images_agree_with_qemu(tmp_path: Path) -> None:
    """vhdxgen (used below for what QEMU cannot open) makes images QEMU reads like we do."""
    g = Vhdx(str(tmp_path / "g.vhdx"), 8 * M, block_size=M, lss=512)
    g.put_block(1, b"\x42" * 5000)
    g.put_block(3, bytes(range(256)) * 4096)
    g.set_entry(g.payload_index(4), 2)  # ZERO
    path = Path(g.path)
    data = read_image(path)
    assert data == qemu_raw(path)
    assert data[M : M + 5000] == b"\x42" * 5000 and data[3 * M : 4 * M] == bytes(range(256)) * 4096


# -- writes ------------------------------------------------------------------------------------

VSIZE = 16 * M

op_st = model_ops(VSIZE, write_max=3 * M // 2, zero_max=3 * M, trim_max=3 * M)


async def apply(img: Image, model: bytearray, ops, lo: int, hi: int, bs: int, trim_zeroes: bool) -> None:
    """``apply_ops``; a TRIM makes whole blocks read as zeroes (``trim_zeroes``: no parent) or
    changes nothing."""

    def trimmed(off: int, n: int) -> list[tuple[int, int]]:
        if not trim_zeroes:
            return []
        first, last = -(-off // bs), (off + n) // bs
        if off + n == VSIZE:
            last = -(-VSIZE // bs)
        return [(b * bs, min(VSIZE, (b + 1) * bs)) for b in range(first, last)]

    await apply_ops(img, model, ops, lo, hi, trimmed=trimmed, fua_every=3)


@settings(max_examples=40 if SLOW else 8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op_st, max_size=10), fixed=st.booleans())
def test_write_sequences_match_model(tmp_path: Path, ops, fixed: bool) -> None:
    for p in tmp_path.iterdir():
        p.unlink()
    path = tmp_path / "w.vhdx"
    opts = "block_size=1M" + (",subformat=fixed,block_state_zero=off" if fixed else "")
    qemu_img("create", "-q", "-f", "vhdx", "-o", opts, path, str(VSIZE))
    qemu_io("vhdx", path, "write -P 0x77 1M 1M", "write -P 0x66 6M 100k")
    model = bytearray(qemu_raw(path))
    initial = bytes(model)
    before = current_header(path)

    async def go():
        img = await opened(path)
        try:
            await apply(img, model, ops, 0, VSIZE, M, not fixed)
            assert await read_all(img) == model
        finally:
            await img.close()

    run(go())
    check_clean(path)
    compare_raw(path, model)
    assert read_image(path) == model
    if model != initial:  # a visible change renews the data write GUID
        assert current_header(path)["dwg"] != before["dwg"]


def _disjoint_streams(draw_ops: list[list[tuple]], nstreams: int) -> list[list[tuple[int, int, int]]]:
    """Map each stream's writes into its own 64 KiB stripes (so concurrent writes never overlap)."""
    out = []
    stripe = 64 * K
    for k, ops in enumerate(draw_ops):
        mine = []
        for off, n, byte in ops:
            base = (off // (stripe * nstreams)) * stripe * nstreams + k * stripe
            if base + off % stripe < VSIZE:
                mine.append((base + off % stripe, min(n, stripe - off % stripe, VSIZE - base - off % stripe), byte))
        out.append(mine)
    return out


@settings(max_examples=40 if SLOW else 8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.lists(st.tuples(st.integers(0, VSIZE - 1), st.integers(1, 64 * K), st.integers(1, 255)), max_size=10),
        min_size=2,
        max_size=4,
    ),
    variant=st.sampled_from(["block_size=1M", "block_size=8M", "block_state_zero=off", "block_size=1M,log_size=1M"]),
)
def test_concurrent_streams_match_model(tmp_path: Path, ops, variant: str) -> None:
    for p in tmp_path.iterdir():
        p.unlink()
    path = tmp_path / "c.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", variant, path, str(VSIZE))
    model = bytearray(VSIZE)
    streams = _disjoint_streams(ops, len(ops))

    async def stream(img: Image, writes) -> None:
        for i, (off, n, byte) in enumerate(writes):
            data = bytes([byte]) * n
            await settled(img.write(off, memoryview(data), fua=False))
            model[off : off + n] = data
            if i % 4 == 3:
                await img.flush()

    async def go():
        img = await opened(path)
        try:
            await asyncio.gather(*(stream(img, w) for w in streams))
            assert await read_all(img) == model
        finally:
            await img.close()

    run(go())
    check_clean(path)
    compare_raw(path, model)
    assert read_image(path) == model


def test_concurrent_writes_to_one_block_allocate_it_once(tmp_path: Path) -> None:
    path = tmp_path / "o.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "8M")
    before = path.stat().st_size

    async def go():
        img = await opened(path)
        try:
            await asyncio.gather(
                *(img.write(2 * M + i * 64 * K, memoryview(bytes([i + 1]) * 64 * K), fua=False) for i in range(16))
            )
        finally:
            await img.close()

    run(go())
    assert path.stat().st_size <= -(-before // M) * M + M  # exactly one new block
    data = qemu_raw(path)
    for i in range(16):
        assert data[2 * M + i * 64 * K : 2 * M + (i + 1) * 64 * K] == bytes([i + 1]) * 64 * K
    check_clean(path)


def test_header_guids_and_empty_log_after_close(tmp_path: Path) -> None:
    path = tmp_path / "h.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "8M")
    before = current_header(path)

    async def go():
        img = await opened(path)
        try:
            await settled(img.write(0, memoryview(b"\x01" * 4096), fua=False))
            mid = current_header(path)
            assert mid["dwg"] != before["dwg"] and mid["fwg"] != before["fwg"]
            assert mid["log_guid"] != bytes(16)  # the allocation's log cycle is open until flush
            await img.flush()
            assert current_header(path)["log_guid"] == bytes(16)
        finally:
            await img.close()

    run(go())
    hs = headers(path)
    assert hs[0]["seq"] != hs[1]["seq"]
    check_clean(path)
    # QEMU can open it read-only (no pending log).
    qemu_img("info", "-f", "vhdx", path)


def test_zero_and_trim_set_block_states(tmp_path: Path) -> None:
    path = tmp_path / "z.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M,block_state_zero=off", path, "8M")
    qemu_io("vhdx", path, "write -P 0x11 0 8M")
    size_before = path.stat().st_size

    async def go():
        img = await opened(path)
        try:
            await img.write_zeroes(M, 2 * M, may_trim=True, fast=True, fua=False)
            await img.trim(4 * M, M + 5, fua=False)
            await img.write_zeroes(3 * M, M, may_trim=False, fast=False, fua=False)  # NO_HOLE
            await img.write_zeroes(6 * M + 512, 4096, may_trim=False, fast=False, fua=False)
            try:  # fast zeroing inside a data block: only where the file system zeroes ranges
                await img.write_zeroes(7 * M + 4096, 4096, may_trim=False, fast=True, fua=False)
            except NbdError as e:
                assert e.errno == errno.ENOTSUP and not img.driver.storage.can_zero_fast()
            else:
                assert img.driver.storage.can_zero_fast()
            return await runs_of(img)
        finally:
            await img.close()

    runs = run(go())
    assert flags_at(runs, M) == (3, 1) and flags_at(runs, 2 * M) == (3, 1)  # ZERO state
    assert flags_at(runs, 3 * M) == (0, 1)  # NO_HOLE: zeroed in place, still allocated
    assert flags_at(runs, 4 * M) == (3, 0)  # UNMAPPED: unallocated, reads zeroes
    assert flags_at(runs, 5 * M) == (0, 1)  # partly trimmed block keeps its data
    data = qemu_raw(path)
    assert data[M : 5 * M] == bytes(4 * M)
    assert data[6 * M + 512 : 6 * M + 4608] == bytes(4096) and data[6 * M : 6 * M + 512] == b"\x11" * 512
    assert data[7 * M + 4096 : 7 * M + 8192] in (bytes(4096), b"\x11" * 4096)
    assert path.stat().st_size == size_before  # nothing allocated
    check_clean(path)


# -- log replay --------------------------------------------------------------------------------


def _set_header_log_guid(path: Path, guid: bytes) -> None:
    """Rewrite the current header with ``guid`` as log_guid (as a crash before the reset leaves it)."""
    hs = headers(path)
    slot = 0 if hs[0]["seq"] > hs[1]["seq"] else 1
    with open(path, "r+b") as f:
        f.seek((64 + 64 * slot) * K)
        buf = bytearray(f.read(4096))
        buf[48:64] = guid
        crc_fill(buf, 4)
        f.seek((64 + 64 * slot) * K)
        f.write(buf)


def test_qemu_written_pending_log_replays(tmp_path: Path) -> None:
    path = tmp_path / "a.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "16M")
    qemu_io("vhdx", path, "write -P 0x11 0 1M")
    old = path.read_bytes()
    p = qemu_io_abort(path, "write -P 0x5a 5M 64k")
    assert p.returncode != 0  # aborted
    new = path.read_bytes()
    # QEMU 7.2 replays and resets its log before acknowledging, so abort leaves log_guid 0 and its
    # entry in the log area: put the header and the BAT back as a crash just before replay leaves them.
    entry_guid = new[M + 32 : M + 48]
    assert new[M : M + 4] == b"loge" and entry_guid != bytes(16)
    bat_off = 2 * M + 0  # qemu-img create: log 1 MiB @1 MiB, BAT @2 MiB
    crashed = bytearray(new)
    crashed[bat_off : bat_off + 4096] = old[bat_off : bat_off + 4096]
    path.write_bytes(bytes(crashed))
    _set_header_log_guid(path, entry_guid)
    crashed = path.read_bytes()
    assert current_header(path)["log_guid"] == entry_guid  # the log is really pending
    p = qemu_img("info", "-f", "vhdx", path, check=False)
    assert p.returncode != 0 and "replay" in p.stderr  # QEMU itself refuses read-only

    ro = read_image(path, readonly=True)  # replayed in memory
    assert path.read_bytes() == bytes(crashed)  # ...without touching the file
    qemu_copy = tmp_path / "qemu.vhdx"
    shutil.copy(path, qemu_copy)
    qemu_img("check", "-r", "all", "-f", "vhdx", qemu_copy)
    expected = qemu_raw(qemu_copy)
    assert expected[5 * M : 5 * M + 64 * K] == b"\x5a" * 64 * K
    assert ro == expected
    assert read_image(path, readonly=False) == expected  # replayed into the file
    assert current_header(path)["log_guid"] == bytes(16)
    assert qemu_raw(path) == expected


def qemu_io_abort(path: Path, cmd: str):
    return run_cmd("qemu-io", "-f", "vhdx", "-c", cmd, "-c", "abort", path, check=False)


def _gen_with_blocks(tmp: Path, name: str = "l.vhdx") -> Vhdx:
    g = Vhdx(str(tmp / name), 8 * M, block_size=M, log_length=M)
    g.put_block(0, b"\x01" * M)
    return g


def _bat_change(g: Vhdx, block: int, value: int) -> tuple[int, bytes]:
    off, sector = g.bat_sector(g.payload_index(block))
    struct.pack_into("<Q", sector, (g.payload_index(block) * 8) % 4096, value)
    return off, bytes(sector)


def assert_replays_to(tmp_path: Path, path: Path, expected: bytes | bytearray) -> None:
    """The pending log replays to ``expected``: in memory (read-only), in QEMU (on a copy, with
    ``check -r all``) and in place (read-write); the image is clean afterwards."""
    assert read_image(path, readonly=True) == expected
    qcopy = tmp_path / "q.vhdx"
    shutil.copy(path, qcopy)
    qemu_img("check", "-r", "all", "-f", "vhdx", qcopy)
    assert qemu_raw(qcopy) == expected
    assert read_image(path, readonly=False) == expected
    check_clean(path)


def test_generated_log_later_entries_win(tmp_path: Path) -> None:
    """A data sector replayed by one entry and then covered by a later entry's zero descriptor
    reads as zeroes, and a zeroed range rewritten by a later data descriptor reads as the data:
    log entries apply in sequence order (read-only opens replay in memory, so the in-memory view
    must drop the older sector under a later zero range)."""
    g = _gen_with_blocks(tmp_path)
    b2 = g.new_space(M)
    g.write(b2, b"\x33" * M)
    g.open_log()
    off, s1 = _bat_change(g, 3, b2 | 6)
    pos = g.log_entry(0, 5, 0, [("data", off, s1), ("data", b2 + 4096, b"\x44" * 4096), ("zero", b2 + 65536, 8192)])
    g.log_entry(pos, 6, 0, [("zero", b2, 16384), ("data", b2 + 65536 + 4096, b"\x55" * 4096)])
    expected = bytearray(8 * M)
    expected[:M] = b"\x01" * M
    expected[3 * M : 4 * M] = b"\x33" * M
    expected[3 * M : 3 * M + 16384] = bytes(16384)  # the 0x44 sector of entry 5 lies under it
    expected[3 * M + 65536 : 3 * M + 65536 + 8192] = bytes(8192)
    expected[3 * M + 65536 + 4096 : 3 * M + 65536 + 8192] = b"\x55" * 4096
    assert_replays_to(tmp_path, Path(g.path), expected)


def test_generated_log_several_entries(tmp_path: Path) -> None:
    g = _gen_with_blocks(tmp_path)
    b1 = g.new_space(M)
    g.write(b1, b"\x22" * M)
    b2 = g.new_space(M)
    g.write(b2, b"\x33" * M)
    guid = g.open_log()
    off, s1 = _bat_change(g, 2, b1 | 6)
    pos = g.log_entry(0, 5, 0, [("data", off, s1)])
    sector = bytearray(s1)
    struct.pack_into("<Q", sector, (g.payload_index(3) * 8) % 4096, b2 | 6)
    pos = g.log_entry(pos, 6, 0, [("data", off, bytes(sector)), ("zero", b2 + 4096, 8192)])
    assert guid
    path = Path(g.path)
    expected = bytearray(8 * M)
    expected[:M] = b"\x01" * M
    expected[2 * M : 3 * M] = b"\x22" * M
    expected[3 * M : 4 * M] = b"\x33" * M
    expected[3 * M + 4096 : 3 * M + 12288] = bytes(8192)
    assert_replays_to(tmp_path, path, expected)


def test_generated_log_wrapped(tmp_path: Path) -> None:
    """A sequence of two entries near the end of the circular log; the second wraps to its start."""
    g = _gen_with_blocks(tmp_path)
    b1 = g.new_space(M)
    g.write(b1, b"\x44" * M)
    b2 = g.new_space(M)
    g.write(b2, b"\x45" * M)
    g.open_log()
    off, s1 = _bat_change(g, 5, b1 | 6)
    sector = bytearray(s1)
    struct.pack_into("<Q", sector, (g.payload_index(6) * 8) % 4096, b2 | 6)
    first = g.log_length - 3 * 4096  # entry A: 2 sectors; entry B: descriptor at the end, data at 0
    pos = g.log_entry(first, 7, first, [("data", off, s1)])
    pos = g.log_entry(pos, 8, first, [("data", off, bytes(sector))])
    assert pos == 4096  # wrapped
    expected = bytearray(8 * M)
    expected[:M] = b"\x01" * M
    expected[5 * M : 6 * M] = b"\x44" * M
    expected[6 * M : 7 * M] = b"\x45" * M
    path = Path(g.path)
    assert_replays_to(tmp_path, path, expected)


def test_generated_log_torn_last_entry_is_ignored(tmp_path: Path) -> None:
    g = _gen_with_blocks(tmp_path)
    b1 = g.new_space(M)
    g.write(b1, b"\x55" * M)
    b2 = g.new_space(M)
    g.write(b2, b"\x66" * M)
    g.open_log()
    off, s1 = _bat_change(g, 1, b1 | 6)
    pos = g.log_entry(0, 3, 0, [("data", off, s1)])
    sector = bytearray(s1)
    struct.pack_into("<Q", sector, (g.payload_index(2) * 8) % 4096, b2 | 6)
    g.log_entry(pos, 4, 0, [("data", off, bytes(sector))], torn=True)
    expected = bytearray(8 * M)
    expected[:M] = b"\x01" * M
    expected[M : 2 * M] = b"\x55" * M  # entry 3 replayed, torn entry 4 not
    path = Path(g.path)
    assert read_image(path, readonly=True) == expected
    qcopy = tmp_path / "q.vhdx"
    shutil.copy(path, qcopy)
    qemu_img("check", "-r", "all", "-f", "vhdx", qcopy)
    assert qemu_raw(qcopy) == expected
    assert read_image(path, readonly=False) == expected


def test_generated_log_bad_crc_sequence_ignored(tmp_path: Path) -> None:
    g = _gen_with_blocks(tmp_path)
    b1 = g.new_space(M)
    g.write(b1, b"\x77" * M)
    g.open_log()
    off, s1 = _bat_change(g, 1, b1 | 6)
    g.log_entry(0, 3, 0, [("data", off, s1)], bad_crc=True)
    expected = bytearray(8 * M)
    expected[:M] = b"\x01" * M
    path = Path(g.path)
    assert read_image(path, readonly=True) == expected
    assert read_image(path, readonly=False) == expected
    check_clean(path)


def test_generated_log_wrong_guid_ignored_and_highest_sequence_wins(tmp_path: Path) -> None:
    g = _gen_with_blocks(tmp_path)
    b1 = g.new_space(M)
    g.write(b1, b"\x12" * M)
    b2 = g.new_space(M)
    g.write(b2, b"\x34" * M)
    g.open_log()
    off, s1 = _bat_change(g, 1, b1 | 6)
    _, s2 = _bat_change(g, 1, b2 | 6)
    g.log_entry(0, 3, 0, [("data", off, s1)])  # older sequence
    g.log_entry(64 * K, 9, 64 * K, [("data", off, s2)])  # newer sequence: wins
    g.log_entry(128 * K, 20, 128 * K, [("data", off, s1)], guid=uuid.uuid4().bytes_le)  # other log
    expected = bytearray(8 * M)
    expected[:M] = b"\x01" * M
    expected[M : 2 * M] = b"\x34" * M
    assert read_image(Path(g.path), readonly=True) == expected


@pytest.mark.parametrize(
    "kind,needle",
    [
        ("outside", "descriptor 0 target"),
        ("into_log", "descriptor 0 target"),
        ("flushed", "flushed_file_offset"),
    ],
)
def test_generated_log_hostile_entries(tmp_path: Path, kind: str, needle: str) -> None:
    g = _gen_with_blocks(tmp_path)
    g.open_log()
    sector = bytes(4096)
    if kind == "outside":
        g.log_entry(0, 3, 0, [("data", 1 << 50, sector)])
    elif kind == "into_log":
        g.log_entry(0, 3, 0, [("data", g.log_offset + 8192, sector)])
    else:
        g.log_entry(0, 3, 0, [("data", g.bat_offset, g.bat_sector(0)[1])], flushed=1 << 40)
    for ro in (True, False):
        with pytest.raises(ImageError) as e:
            read_image(Path(g.path), readonly=ro)
        assert needle in str(e.value) and "\n" not in str(e.value)


# -- crash safety ------------------------------------------------------------------------------


def test_crash_at_every_point_of_allocations(tmp_path: Path) -> None:
    path = tmp_path / "k.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "8M")
    qemu_io("vhdx", path, "write -P 0x11 0 1M")
    base = path.read_bytes()
    requests = [(2 * M + 512, 8192, 0x22), (5 * M, M, 0x33), (100, 300, 0x44), (6 * M + 4096, 4096, 0x55)]

    async def workload(out: list[tuple]) -> None:
        img = await opened(path)
        rec = Recorder(img.driver.storage, path)
        try:
            for k, (off, n, byte) in enumerate(requests):
                await settled(img.write(off, memoryview(bytes([byte]) * n), fua=False))
                rec.mark(f"done{k}")
                if k in (0, 2):
                    await img.flush()
                    rec.mark("flushed")
            await img.write_zeroes(M, M, may_trim=True, fast=False, fua=False)
            rec.mark("done4")
            await img.flush()
            rec.mark("flushed")
        finally:
            rec.restore()
            await img.close()
        out.extend(rec.ops)

    ops: list[tuple] = []
    run(workload(ops))
    io_points = [i for i, op in enumerate(ops) if op[0] != "mark"]
    assert len(io_points) > 15
    old = qemu_raw_bytes(base, tmp_path)
    new = bytearray(old)
    for off, n, byte in requests:
        new[off : off + n] = bytes([byte]) * n
    new[M : 2 * M] = bytes(M)
    regions = [(off, n) for off, n, _ in requests] + [(M, M)]
    cuts = [*io_points, len(ops)]
    if not SLOW:  # every point of the first allocation and flush, then a sample
        first_flush = next(i for i, op in enumerate(ops) if op == ("mark", "flushed"))
        cuts = [c for k, c in enumerate(cuts) if c <= first_flush or k % 4 == 0 or c == len(ops)]
    for cut in cuts:
        prefix = ops[:cut]
        done = {op[1] for op in prefix if op[0] == "mark"}
        durable = set()
        pending = set()
        for op in prefix:
            if op[0] == "mark" and op[1].startswith("done"):
                pending.add(int(op[1][4:]))
            elif op[0] == "mark" and op[1] == "flushed":
                durable |= pending
        for lose in (False, True):
            crashed = tmp_path / "crash.vhdx"
            crashed.write_bytes(_state(base, prefix, lose))
            qcopy = tmp_path / "crash-q.vhdx"
            shutil.copy(crashed, qcopy)
            p = qemu_img("check", "-r", "all", "-f", "vhdx", qcopy, check=False)
            assert p.returncode == 0, (cut, lose, p.stdout, p.stderr)
            qdata = qemu_raw(qcopy)
            assert read_image(crashed, readonly=True) == qdata, (cut, lose)
            assert read_image(crashed, readonly=False) == qdata, (cut, lose)
            for k, (off, n) in enumerate(regions):
                got = qdata[off : off + n]
                if k in durable:
                    assert got == new[off : off + n], (cut, lose, k, done)
                else:
                    assert got in (old[off : off + n], new[off : off + n]), (cut, lose, k)
            others = bytearray(qdata)
            for off, n in regions:
                others[off : off + n] = old[off : off + n]
            assert bytes(others) == old, (cut, lose)


def qemu_raw_bytes(image: bytes, tmp: Path) -> bytes:
    p = tmp / "base-copy.vhdx"
    p.write_bytes(image)
    data = qemu_raw(p)
    p.unlink()
    return data


# -- 4096-byte sectors and differencing disks (vhdxgen) ----------------------------------------


def test_4k_sector_round_trip(tmp_path: Path) -> None:
    g = Vhdx(str(tmp_path / "4k.vhdx"), 16 * M, block_size=2 * M, lss=4096, pss=4096)
    g.put_block(1, b"\x31" * (2 * M))
    path = Path(g.path)
    model = bytearray(16 * M)
    model[2 * M : 4 * M] = b"\x31" * (2 * M)
    p = qemu_img("info", "-f", "vhdx", path, check=False)
    assert p.returncode != 0  # QEMU 7.2 cannot open 4096-byte sectors; we can

    async def go():
        img = await opened(path)
        try:
            assert img.align == 4096
            assert await read_all(img) == model
            await settled(img.write(100, memoryview(b"\x01" * 10), fua=False))  # sub-sector: RMW above us
            model[100:110] = b"\x01" * 10
            await settled(img.write(3 * M - 4096, memoryview(b"\x02" * 12288), fua=False))
            model[3 * M - 4096 : 3 * M + 8192] = b"\x02" * 12288
            await settled(img.write(15 * M, memoryview(b"\x03" * M), fua=True))
            model[15 * M : 16 * M] = b"\x03" * M
            await img.write_zeroes(8 * M, 4 * M, may_trim=True, fast=False, fua=False)
            assert await read_all(img) == model
        finally:
            await img.close()

    run(go())
    assert read_image(path) == model
    assert read_image(path, readonly=False) == model
    assert current_header(path)["log_guid"] == bytes(16)


def _make_parent(tmp: Path) -> tuple[Path, bytes]:
    parent = tmp / "parent.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", parent, "8M")
    qemu_io("vhdx", parent, "write -P 0xa1 0 8M")
    pdata = qemu_raw(parent)
    return parent, pdata


def _make_child(tmp: Path, parent: Path, *, linkage: bytes | None = None, locator: dict | None = None) -> Vhdx:
    dwg = current_header(parent)["dwg"] if linkage is None else linkage
    loc = locator or {"parent_linkage": "{" + str(uuid.UUID(bytes_le=dwg)) + "}", "relative_path": ".\\" + parent.name}
    return Vhdx(str(tmp / "child.vhdx"), 8 * M, block_size=M, lss=512, has_parent=True, locator=loc)


def test_differencing_reads_through_bitmap_and_parent(tmp_path: Path) -> None:
    parent, pdata = _make_parent(tmp_path)
    g = _make_child(tmp_path, parent)
    g.put_block(1, b"\xc1" * M)  # fully present
    present = [i % 3 == 0 for i in range(M // 512)]
    g.put_partial(2, b"\xc2" * M, present)
    g.set_entry(g.payload_index(3), 2)  # ZERO: zeroes, not the parent
    expected = bytearray(pdata)
    expected[M : 2 * M] = b"\xc1" * M
    for i, p in enumerate(present):
        if p:
            expected[2 * M + i * 512 : 2 * M + (i + 1) * 512] = b"\xc2" * 512
    expected[3 * M : 4 * M] = bytes(M)
    path = Path(g.path)

    async def go():
        img = await opened(path, readonly=True)
        try:
            assert img.backing is not None and img.backing.path == str(parent.resolve())
            assert await read_all(img) == expected
            runs = await runs_of(img)
            assert flags_at(runs, 0) == (0, 2)  # parent data
            assert flags_at(runs, M) == (0, 1)
            assert flags_at(runs, 2 * M) == (0, 1) and flags_at(runs, 2 * M + 512) == (0, 2)
            assert flags_at(runs, 3 * M) == (3, 1)
        finally:
            await img.close()

    run(go())


def test_differencing_writes_copy_from_parent(tmp_path: Path) -> None:
    parent, pdata = _make_parent(tmp_path)
    g = _make_child(tmp_path, parent)
    present = [i % 2 == 0 for i in range(M // 512)]
    g.put_partial(2, b"\xc2" * M, present)
    model = bytearray(pdata)
    for i, p in enumerate(present):
        if p:
            model[2 * M + i * 512 : 2 * M + (i + 1) * 512] = b"\xc2" * 512
    path = Path(g.path)
    parent_before = parent.read_bytes()

    async def go():
        img = await opened(path)
        try:
            await settled(img.write(4 * M + 1000, memoryview(b"\x09" * 5000), fua=False))  # NOT_PRESENT block
            model[4 * M + 1000 : 4 * M + 6000] = b"\x09" * 5000
            await settled(img.write(2 * M + 512 * 7, memoryview(b"\x08" * 1024), fua=False))  # partial block
            model[2 * M + 3584 : 2 * M + 4608] = b"\x08" * 1024
            await img.write_zeroes(6 * M, M, may_trim=True, fast=True, fua=False)
            model[6 * M : 7 * M] = bytes(M)
            with pytest.raises(NbdError) as e:  # part of a parent-backed block: needs a data write
                await img.write_zeroes(7 * M + 512, 512, may_trim=False, fast=True, fua=False)
            assert e.value.errno == errno.ENOTSUP
            await img.write_zeroes(7 * M + 512, 512, may_trim=False, fast=False, fua=False)
            model[7 * M + 512 : 7 * M + 1024] = bytes(512)
            assert await read_all(img) == model
        finally:
            await img.close()

    run(go())
    assert parent.read_bytes() == parent_before
    assert read_image(path) == model
    assert current_header(path)["log_guid"] == bytes(16)


def test_differencing_failed_parent_read_leaves_no_block(tmp_path: Path) -> None:
    """A write into a parent-backed block whose parent read fails (EIO) fails, every concurrent
    writer of that block with it, and leaves the file as it was: no half-filled block past the
    end (each failure would otherwise grow the file by a block nothing points at).  Once the
    parent reads again, the same writes succeed and allocate the block once."""
    parent, pdata = _make_parent(tmp_path)
    g = _make_child(tmp_path, parent)
    path = Path(g.path)
    size = path.stat().st_size
    model = bytearray(pdata)
    writes = [(4 * M + i * 4096 + 512, bytes([i + 1]) * 1024) for i in range(4)]
    writes.append((5 * M - 512, b"\x55" * 1024))  # spans blocks 4 and 5

    async def go():
        img = await opened(path)
        backing = FlakyBacking(img)
        try:
            results = await write_all(img, writes, errors=True)
            assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results), results
            assert path.stat().st_size == size
            backing.failing = False
            await write_all(img, writes)
            for o, d in writes:
                model[o : o + len(d)] = d
            assert await read_all(img) == model
        finally:
            await img.close()

    run(go())
    assert path.stat().st_size == _round_up_m(size) + 2 * M  # blocks 4 and 5, allocated once each
    assert read_image(path) == model


def _round_up_m(n: int) -> int:
    return -(-n // M) * M


def test_differencing_4k_child_of_4k_parent(tmp_path: Path) -> None:
    pg = Vhdx(str(tmp_path / "p4k.vhdx"), 8 * M, block_size=M, lss=4096)
    pg.put_block(0, b"\x5e" * M)
    parent = Path(pg.path)
    loc = {
        "parent_linkage": "{" + str(uuid.UUID(bytes_le=pg.data_write_guid)) + "}",
        "absolute_win32_path": str(parent),
    }
    g = Vhdx(str(tmp_path / "c4k.vhdx"), 8 * M, block_size=M, lss=4096, has_parent=True, locator=loc)
    g.put_partial(0, b"\x6f" * M, [i < 10 for i in range(M // 4096)])
    expected = bytearray(8 * M)
    expected[:M] = b"\x5e" * M
    expected[: 10 * 4096] = b"\x6f" * 10 * 4096
    assert read_image(Path(g.path)) == expected


def test_differencing_missing_parent_and_bad_linkage(tmp_path: Path) -> None:
    parent, _ = _make_parent(tmp_path)
    g = _make_child(tmp_path, parent)
    os.rename(parent, tmp_path / "moved.vhdx")
    with pytest.raises(ImageError) as e:
        read_image(Path(g.path))
    msg = str(e.value)
    assert "parent VHDX not found" in msg and "relative_path" in msg and "\n" not in msg
    os.rename(tmp_path / "moved.vhdx", parent)
    Path(g.path).unlink()
    g = _make_child(tmp_path, parent, linkage=uuid.uuid4().bytes_le)
    with pytest.raises(ImageError) as e:
        read_image(Path(g.path))
    assert "parent_linkage" in str(e.value) and "\n" not in str(e.value)


# -- hostile images ----------------------------------------------------------------------------


def _hostile(tmp: Path, what: str) -> Path:
    g = Vhdx(str(tmp / "bad.vhdx"), 8 * M, block_size=M)
    g.put_block(0, b"\x01" * 4096)
    regions = [
        (bytes.fromhex("6677c22d23f600429d64115e9bfd4a08"), g.bat_offset, g.bat_length, 1),
        (bytes.fromhex("06a27c8b90479a4bb8fe575f050f886e"), g.metadata_offset, M, 1),
    ]
    if what == "identifier":
        g.write(0, b"vhdxfilX")
    elif what == "both_headers":
        g.write_header(0, 1, bytes(16), corrupt=True)
        g.write_header(1, 2, bytes(16), corrupt=True)
    elif what == "header_version":
        g.write_header(0, 100, bytes(16), version=2)
        g.write_header(1, 101, bytes(16), version=2)
    elif what == "log_offset":
        g.write_header(1, 50, bytes(16), log_offset=M + 4096)
    elif what == "log_past_eof":
        g.write_header(1, 50, bytes(16), log_length=0xFFF00000)
    elif what == "region_crc":
        g.write_region_table(192 * K, regions, corrupt=True)
        g.write_region_table(256 * K, regions, corrupt=True)
    elif what == "region_huge":
        r = [regions[0], (regions[1][0], g.metadata_offset, 0xFFF00000, 1)]
        g.write_region_table(192 * K, r)
        g.write_region_table(256 * K, r)
    elif what == "region_overlap":
        r = [regions[0], (regions[1][0], g.bat_offset, M, 1)]
        g.write_region_table(192 * K, r)
        g.write_region_table(256 * K, r)
    elif what == "region_unknown_required":
        r = [*regions, (uuid.uuid4().bytes_le, g.end, M, 1)]
        g.new_space(M)
        g.write_region_table(192 * K, r)
        g.write_region_table(256 * K, r)
    elif what == "region_missing_bat":
        g.write_region_table(192 * K, regions[1:])
        g.write_region_table(256 * K, regions[1:])
    elif what == "metadata_signature":
        g.write(g.metadata_offset, b"metadatX")
    elif what == "metadata_unknown_required":
        g.write_metadata([*g.metadata_items(), (uuid.uuid4().bytes_le, b"x" * 8, 4)])
    elif what == "metadata_missing":
        g.write_metadata(g.metadata_items()[1:])
    elif what == "block_size":
        items = g.metadata_items()
        items[0] = (items[0][0], struct.pack("<II", 3 * M, 0), 4)
        g.write_metadata(items)
    elif what == "sector_size":
        items = g.metadata_items()
        items[3] = (items[3][0], struct.pack("<I", 1024), 6)
        g.write_metadata(items)
    elif what == "disk_size":
        items = g.metadata_items()
        items[1] = (items[1][0], struct.pack("<Q", 1 << 60), 6)
        g.write_metadata(items)
    elif what == "bat_past_eof":
        g.set_entry(g.payload_index(3), (1 << 40) | 6)
    elif what == "bat_overlap":
        g.set_entry(g.payload_index(3), g.entry(0))
    elif what == "bat_into_metadata":
        g.set_entry(g.payload_index(3), g.metadata_offset | 6)
    elif what == "bat_state":
        g.set_entry(g.payload_index(3), 4)
    elif what == "bat_partial_without_parent":
        g.set_entry(g.payload_index(3), g.entry(0) | 7)
    elif what == "bat_too_small":
        items = g.metadata_items()
        items[1] = (items[1][0], struct.pack("<Q", 1 << 40), 6)  # 1 TiB of 1 MiB blocks: BAT of 8 MiB
        g.write_metadata(items)
    elif what == "metadata_item_outside":
        g.write(g.metadata_offset + 32 + 16, struct.pack("<I", M - 4))  # File Parameters offset
    elif what == "headers_equal_sequence":
        g.write_header(0, 77, bytes(16))
        g.write_header(1, 77, bytes(16))
    elif what == "log_version":
        buf = bytearray(g.read(128 * K, 4096))
        buf[64:66] = b"\x01\x00"
        crc_fill(buf, 4)
        g.write(128 * K, bytes(buf))
    elif what == "locator_missing":
        items = g.metadata_items()
        items[0] = (items[0][0], struct.pack("<II", M, 2), 4)
        g.write_metadata(items)
    else:
        raise AssertionError(what)
    return Path(g.path)


HOSTILE = {
    "identifier": "file identifier",
    "both_headers": "no valid VHDX header",
    "header_version": "version 2",
    "log_offset": "log_offset",
    "log_past_eof": "log at",
    "region_crc": "region table 1: bad checksum",
    "region_huge": "metadata region",
    "region_overlap": "overlaps",
    "region_unknown_required": "unknown required region",
    "region_missing_bat": "no BAT region",
    "metadata_signature": "metadata table: bad signature",
    "metadata_unknown_required": "unknown required",
    "metadata_missing": "no File Parameters",
    "block_size": "block_size",
    "sector_size": "Logical Sector Size",
    "disk_size": "Virtual Disk Size",
    "bat_past_eof": "points after end of file",
    "bat_overlap": "overlaps BAT entry",
    "bat_into_metadata": "overlaps VHDX metadata",
    "bat_state": "invalid payload block state 4",
    "bat_partial_without_parent": "invalid payload block state 7",
    "bat_too_small": "BAT region",
    "locator_missing": "Parent Locator",
    "metadata_item_outside": "File Parameters: offset",
    "headers_equal_sequence": "sequence number 77 but differ",
    "log_version": "log_version 1",
}


@pytest.mark.parametrize("what", sorted(HOSTILE))
def test_hostile_images_refused_with_one_line(tmp_path: Path, what: str) -> None:
    path = _hostile(tmp_path, what)
    for ro in (True, False):
        with pytest.raises(ImageError) as e:
            read_image(path, readonly=ro)
        msg = str(e.value)
        assert HOSTILE[what] in msg, msg
        assert "\n" not in msg and msg.startswith(str(path))


def test_one_bad_header_uses_the_other(tmp_path: Path) -> None:
    g = Vhdx(str(tmp_path / "h.vhdx"), 4 * M, block_size=M)
    g.put_block(1, b"\x0b" * M)
    g.write_header(1, 99, bytes(16), corrupt=True)  # the newer copy is torn
    data = read_image(Path(g.path), readonly=False)
    assert data[M : 2 * M] == b"\x0b" * M


def test_hostile_log_claims_stay_bounded(tmp_path: Path) -> None:
    """Entries claiming the whole log and 2^32-1 descriptors cost bounded memory, and are ignored."""
    g = Vhdx(str(tmp_path / "m.vhdx"), 8 * M, block_size=M, log_length=4 * M)
    guid = g.open_log()
    for pos in range(0, 4 * M, 64 * K):
        head = struct.pack("<4sIIIQII16sQQ", b"loge", 0, 4 * M, 0, 5, 0xFFFFFFFF, 0, guid, 0, 0)
        g.write(g.log_offset + pos, head)
    tracemalloc.start()
    try:
        data = read_image(Path(g.path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data == bytes(8 * M)
    assert peak < 40 * M, peak


def test_cached_io_in_a_present_block_never_suspends(tmp_path: Path) -> None:
    path = tmp_path / "p.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "8M")
    qemu_io("vhdx", path, "write -P 0x3c 0 1M")

    async def go():
        img = await opened(path)
        try:
            d = img.driver
            buf = memoryview(bytearray(4096))
            await img.cache_hint(0, img.size)  # BAT page now cached
            await settled(img.write(0, memoryview(b"\x3c" * 4096), fua=False))  # session GUIDs written
            assert d.read(8192, buf) is None  # completed at once: nothing to wait for
            assert d.write(4096, memoryview(b"\x3d" * 4096), fua=False) is None
            assert bytes(buf) == b"\x3c" * 4096
        finally:
            await img.close()

    run(go())
    data = qemu_raw(path)
    assert data[4096:8192] == b"\x3d" * 4096


def test_allocating_write_over_many_blocks_syncs_three_times(tmp_path: Path) -> None:
    """New blocks of one request share one data sync and one log entry (plus the log header)."""
    path = tmp_path / "b.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "8M")

    async def go():
        img = await opened(path)
        try:
            await settled(img.write(0, memoryview(b"\x01" * 4096), fua=False))
            await img.flush()
            rec = Recorder(img.driver.storage, path)
            try:
                await settled(img.write(M + 512, memoryview(b"\x02" * (4 * M)), fua=False))
            finally:
                rec.restore()
            assert [op[0] for op in rec.ops].count("sync") == 3
        finally:
            await img.close()

    run(go())
    data = qemu_raw(path)
    assert data[M + 512 : 5 * M + 512] == b"\x02" * (4 * M) and data[M : M + 512] == bytes(512)
    check_clean(path)


def test_partially_present_block_needs_its_sector_bitmap(tmp_path: Path) -> None:
    parent, _ = _make_parent(tmp_path)
    g = _make_child(tmp_path, parent)
    off = g.new_space(M)
    g.set_entry(g.payload_index(4), off | 7)  # no sector bitmap block for its chunk
    with pytest.raises(ImageError) as e:
        read_image(Path(g.path))
    assert "without a sector bitmap" in str(e.value) and "\n" not in str(e.value)


def test_generated_log_replays_from_the_tail_of_the_last_entry(tmp_path: Path) -> None:
    """MS-VHDX: the active sequence runs from the last entry's tail; older entries before it in
    the chain are already applied and must not be replayed again (QEMU ignores the tail)."""
    g = _gen_with_blocks(tmp_path)
    block0 = g.entry(g.payload_index(0)) & ~0xFFFFF
    b1 = g.new_space(M)
    g.write(b1, b"\x21" * M)
    g.open_log()
    pos = g.log_entry(0, 3, 0, [("data", block0, b"\xee" * 4096)])  # before the tail: not replayed
    off, s1 = _bat_change(g, 1, b1 | 6)
    g.log_entry(pos, 4, pos, [("data", off, s1)])
    expected = bytearray(8 * M)
    expected[:M] = b"\x01" * M
    expected[M : 2 * M] = b"\x21" * M
    path = Path(g.path)
    assert read_image(path, readonly=True) == expected
    assert read_image(path, readonly=False) == expected


def test_many_bat_pages_with_a_one_page_cache(tmp_path: Path) -> None:
    """A 20 GiB disk of 1 MiB blocks has a BAT of several 64 KiB pages; with a cache of one page,
    concurrent writes all over it evict and re-read pages while allocations are in flight."""
    path = tmp_path / "big.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "20G")
    offsets = [i * 1_234_567_891 % (20 << 30) // 512 * 512 for i in range(1, 25)]

    async def go():
        img = await open_image(ImageSpec(str(path), format="vhdx"), ClusterCache(64 * K))
        try:
            await asyncio.gather(
                *(img.write(off, memoryview(bytes([i + 1]) * 1000), fua=False) for i, off in enumerate(offsets))
            )
            for i, off in enumerate(offsets):
                buf = bytearray(1000)
                await settled(img.read(off, memoryview(buf)))
                assert buf == bytes([i + 1]) * 1000
        finally:
            await img.close()

    run(go())
    check_clean(path)
    cmds = [f"read -P {i + 1} {off} 1000" for i, off in enumerate(offsets)]
    p = qemu_io("vhdx", path, *cmds)
    assert "Pattern verification failed" not in p.stdout + p.stderr


def test_generated_log_entry_with_several_descriptor_sectors(tmp_path: Path) -> None:
    """130 data descriptors and a zero descriptor: the descriptors span two log sectors.
    (QEMU 7.2 cannot replay this: it reads every descriptor sector into the same buffer.)"""
    g = _gen_with_blocks(tmp_path)
    block0 = g.entry(g.payload_index(0)) & ~0xFFFFF
    g.open_log()
    descs = [("data", block0 + i * 4096, bytes([i % 250 + 2]) * 4096) for i in range(130)]
    descs.append(("zero", block0 + 200 * 4096, 8192))
    g.log_entry(0, 3, 0, descs)
    expected = bytearray(8 * M)
    expected[:M] = b"\x01" * M
    for i in range(130):
        expected[i * 4096 : (i + 1) * 4096] = bytes([i % 250 + 2]) * 4096
    expected[200 * 4096 : 202 * 4096] = bytes(8192)
    path = Path(g.path)
    assert read_image(path, readonly=True) == expected
    assert read_image(path, readonly=False) == expected
    check_clean(path)


def test_zeroing_many_bat_sectors_logs_entries_qemu_can_replay(tmp_path: Path) -> None:
    """A WRITE_ZEROES over 130 BAT sectors' worth of data blocks is logged as several entries of
    at most 126 descriptors (the most QEMU 7.2 can replay), each applied before the next."""
    path = tmp_path / "z.vhdx"
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "66G")
    blocks = [k * 512 for k in range(130)]  # one data block in each of 130 BAT sectors

    async def go():
        img = await opened(path)
        try:
            for b in blocks:
                await settled(img.write(b * M, memoryview(b"\x5c" * 512), fua=False))
            await img.flush()
            rec = Recorder(img.driver.storage, path)
            try:
                await img.write_zeroes(0, img.size, may_trim=True, fast=True, fua=False)
            finally:
                rec.restore()
            log_writes = [op for op in rec.ops if op[0] == "w" and op[3][:4] == b"loge"]
            counts = [struct.unpack_from("<I", op[3], 24)[0] for op in log_writes]
            assert sum(counts) == 130 and max(counts) <= 126, counts
            buf = bytearray(512)
            for b in blocks[::17]:
                await settled(img.read(b * M, memoryview(buf)))
                assert buf == bytes(512)
        finally:
            await img.close()

    run(go())
    check_clean(path)
    p = qemu_io("vhdx", path, *(f"read -P 0 {b}M 512" for b in blocks[::13]))
    assert "Pattern verification failed" not in p.stdout + p.stderr


diff_op_st = model_ops(8 * M, write_max=3 * M // 2, zero_max=3 * M)


@settings(max_examples=30 if SLOW else 6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(diff_op_st, max_size=8), lss=st.sampled_from([512, 4096]))
def test_differencing_write_sequences_match_model(tmp_path: Path, ops, lss: int) -> None:
    for p in tmp_path.iterdir():
        p.unlink()
    pg = Vhdx(str(tmp_path / "parent.vhdx"), 8 * M, block_size=M, lss=lss)
    for b in range(8):
        pg.put_block(b, bytes([0xA0 + b]) * M)
    parent = Path(pg.path)
    loc = {"parent_linkage": "{" + str(uuid.UUID(bytes_le=pg.data_write_guid)) + "}", "relative_path": "parent.vhdx"}
    g = Vhdx(str(tmp_path / "child.vhdx"), 8 * M, block_size=M, lss=lss, has_parent=True, locator=loc)
    present = [i % 5 < 2 for i in range(M // lss)]
    g.put_partial(2, b"\xc2" * M, present)
    g.put_block(5, b"\xc5" * M)
    g.set_entry(g.payload_index(6), 2)
    model = bytearray(read_image(parent))
    for i, p in enumerate(present):
        if p:
            model[2 * M + i * lss : 2 * M + (i + 1) * lss] = b"\xc2" * lss
    model[5 * M : 6 * M] = b"\xc5" * M
    model[6 * M : 7 * M] = bytes(M)
    path = Path(g.path)
    assert read_image(path) == model

    async def go():
        img = await opened(path)
        try:
            await apply(img, model, ops, 0, 8 * M, M, False)
            assert await read_all(img) == model
        finally:
            await img.close()

    run(go())
    assert read_image(path) == model
    assert read_image(path, readonly=False) == model
    assert current_header(path)["log_guid"] == bytes(16)


# -- differencing: unaligned block status, the first write into a partial block, trim ----------


def _one_partial_child(tmp: Path, lss: int, parent_block: bytes) -> tuple[Vhdx, Vhdx, list[bool], bytes]:
    """Parent block 0 holds ``parent_block``; the child's block 0 is PARTIALLY_PRESENT with a stale
    payload under its clear bits."""
    pg = Vhdx(str(tmp / "parent.vhdx"), 8 * M, block_size=M, lss=lss)
    if parent_block:
        pg.put_block(0, parent_block)
    g = Vhdx(str(tmp / "child.vhdx"), 8 * M, block_size=M, lss=lss, has_parent=True, locator=locator_for(pg))
    present = [i % 5 < 2 or i % 7 == 3 for i in range(M // lss)]
    payload = bytes(range(1, 256)) * (M // 255) + b"\x01" * (M % 255)
    g.put_partial(0, payload, present)
    return pg, g, present, payload


@pytest.mark.parametrize("lss", [512, 4096])
def test_differencing_block_status_at_unaligned_offsets(tmp_path: Path, lss: int) -> None:
    """Runs start at any byte: each one's depth matches the bitmap bit of every sector it covers,
    and together they cover the request exactly (no EIO, no run shifted to sector boundaries)."""
    _, g, present, _ = _one_partial_child(tmp_path, lss, b"\xa0" * M)
    rng = __import__("random").Random(lss)
    asks = [(0, 10), (10, 65536), (100, 300000), (lss - 1, 2), (lss + 1, lss), (M - 3, 7), (300000, 100)]
    asks += [(rng.randrange(2 * M), rng.randrange(1, 3 * lss)) for _ in range(40)]

    async def go():
        img = await opened(g.path, readonly=True)
        try:
            for off, n in asks:
                pos = off
                for r in await img.runs(off, n):
                    for at in range(pos, pos + r.length):
                        want = (1 if present[at // lss] else 2) if at < M else 0  # the parent has block 0 only
                        assert r.depth == want, (off, n, pos, r)
                    pos += r.length
                assert pos == off + n, (off, n)
        finally:
            await img.close()

    run(go())


@pytest.mark.parametrize("lss", [512, 4096])
@pytest.mark.parametrize("parent", ["zero", "data"])
def test_first_write_into_partially_present_block_keeps_the_parent(tmp_path: Path, lss: int, parent: str) -> None:
    """A small write completes the block from the parent, zeroes included: sectors whose bit was
    clear read the parent's bytes afterwards, never the stale payload behind them."""
    pblock = b"" if parent == "zero" else bytes(M // 2) + b"\xa5" * (M // 2)
    _, g, present, payload = _one_partial_child(tmp_path, lss, pblock)
    model = bytearray(pblock.ljust(M, b"\0")) + bytearray(7 * M)
    for i, here in enumerate(present):
        if here:
            model[i * lss : (i + 1) * lss] = payload[i * lss : (i + 1) * lss]
    path = Path(g.path)

    async def go():
        img = await opened(path)
        try:
            await settled(img.write(lss + 5, memoryview(b"\x77" * 100), fua=False))
            model[lss + 5 : lss + 105] = b"\x77" * 100
            assert await read_all(img) == model
        finally:
            await img.close()

    run(go())
    assert read_image(path) == model


def test_unmapped_and_undefined_blocks_never_read_the_parent(tmp_path: Path) -> None:
    """MS-VHDX: UNDEFINED, ZERO and UNMAPPED read as zeroes (or previous contents), never as the
    parent's data; only NOT_PRESENT defers to the parent.  TRIM (which leaves UNMAPPED) therefore
    makes a differencing block read zeroes, and block status says so at this layer."""
    pg = Vhdx(str(tmp_path / "parent.vhdx"), 8 * M, block_size=M, lss=512)
    for b in range(8):
        pg.put_block(b, bytes([0xA0 + b]) * M)
    g = Vhdx(str(tmp_path / "child.vhdx"), 8 * M, block_size=M, lss=512, has_parent=True, locator=locator_for(pg))
    for b, state in ((0, 0), (1, 1), (2, 2), (3, 3), (4, 5)):
        g.set_entry(g.payload_index(b), state)
    g.put_block(5, b"\xc5" * M)
    g.put_partial(6, b"\xc6" * M, [i < 100 for i in range(M // 512)])
    expected = bytearray(b"".join(bytes([0xA0 + b]) * M for b in range(8)))
    expected[M : 5 * M] = bytes(4 * M)
    expected[5 * M : 6 * M] = b"\xc5" * M
    expected[6 * M : 6 * M + 51200] = b"\xc6" * 51200
    path = Path(g.path)
    assert read_image(path) == expected

    async def go():
        img = await opened(path)
        try:
            await img.trim(5 * M, 2 * M, fua=False)
            expected[5 * M : 7 * M] = bytes(2 * M)
            assert await read_all(img) == expected
            runs = await runs_of(img)
            for b in (1, 2, 3, 4, 5, 6):
                assert flags_at(runs, b * M) == (3, 1), b  # hole + zero, decided here
            assert flags_at(runs, 0) == (0, 2) and flags_at(runs, 7 * M) == (0, 2)
        finally:
            await img.close()

    run(go())
    assert read_image(path) == expected


# -- hostile logs: replay is bounded by the file and the image -----------------------------------


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize(
    "kind,needle",
    [
        ("zero_512M_past_end", "beyond the image's extent"),
        ("zero_1T", "beyond the image's extent"),
        ("last_file_offset_1T", "last_file_offset"),
        ("data_past_extent", "beyond the image's extent"),
    ],
)
def test_hostile_log_is_refused_without_touching_the_file(tmp_path: Path, kind: str, needle: str) -> None:
    """One small log entry that claims a huge range (and a last_file_offset to match, which used
    to let it through) is refused with a one-line reason before anything is written: the file
    keeps its size, its allocation and its bytes."""
    g = _gen_with_blocks(tmp_path)
    g.open_log()
    if kind == "zero_512M_past_end":
        g.log_entry(0, 3, 0, [("zero", g.end, 512 * M)], last=g.end + 512 * M)
    elif kind == "zero_1T":
        g.log_entry(0, 3, 0, [("zero", 2 * M, 1 << 40)], last=2 * M + (1 << 40))
    elif kind == "last_file_offset_1T":
        g.log_entry(0, 3, 0, [("data", g.bat_offset, g.bat_sector(0)[1])], last=1 << 40)
    else:
        g.log_entry(0, 3, 0, [("data", 64 * M, bytes(4096))], last=65 * M)
    path = Path(g.path)
    before, size, used = path.read_bytes(), path.stat().st_size, _allocated(path)
    # (read-write last: without the bound it would allocate the range, or fill the disk for 1 TiB)
    for ro in (True, False) if kind != "zero_1T" else (True,):
        with pytest.raises(ImageError) as e:
            read_image(path, readonly=ro)
        msg = str(e.value)
        assert needle in msg and "\n" not in msg and msg.startswith(str(path)), msg
        assert path.stat().st_size == size and _allocated(path) <= used
        assert path.read_bytes() == before


def test_log_zero_ranges_punch_inside_the_file_and_skip_past_its_end(tmp_path: Path) -> None:
    """A zero descriptor over data in the file deallocates it (no zero bytes written); one past the
    end of the file (within the image's extent, up to last_file_offset) costs nothing."""
    g = _gen_with_blocks(tmp_path)
    g.put_block(1, b"\x02" * M)
    tail = g.end
    g.open_log()
    off, sector = _bat_change(g, 3, tail | 6)  # block 3 -> the (not yet written) space past EOF
    host0 = g.entry(g.payload_index(0)) & ~0xFFFFF
    g.log_entry(0, 3, 0, [("zero", host0, M), ("data", off, sector), ("zero", tail, M)], last=tail + M)
    path = Path(g.path)
    used = _allocated(path)
    expected = bytearray(8 * M)
    expected[M : 2 * M] = b"\x02" * M
    assert read_image(path, readonly=True) == expected
    assert read_image(path, readonly=False) == expected
    assert path.stat().st_size == tail + M
    # block 0 punched, nothing allocated past the old end (the filesystem may add an extent block)
    assert _allocated(path) <= used - M + 64 * K
    check_clean(path)
    assert qemu_raw(path) == expected


# -- fields QEMU ignores: served, with a warning naming the field ---------------------------------


def test_odd_physical_sector_size_is_served_with_a_warning(tmp_path: Path, caplog) -> None:
    """The physical sector size is a hint nothing in the format depends on (QEMU ignores it):
    any value is served read-write, with a warning."""
    g = Vhdx(str(tmp_path / "p.vhdx"), 8 * M, block_size=M, pss=1234)
    g.put_block(2, b"\x22" * M)
    path = Path(g.path)
    expected = bytearray(8 * M)
    expected[2 * M : 3 * M] = b"\x22" * M
    assert qemu_raw(path) == expected

    async def go():
        img = await opened(path)
        try:
            assert not img.readonly
            await settled(img.write(5 * M + 3, memoryview(b"\x55" * 10), fua=False))
            expected[5 * M + 3 : 5 * M + 13] = b"\x55" * 10
            assert await read_all(img) == expected
        finally:
            await img.close()

    run(go())
    assert "Physical Sector Size 1234" in caplog.text
    check_clean(path)
    assert qemu_raw(path) == expected


def test_bat_reserved_bits_are_served_read_only_with_a_warning(tmp_path: Path, caplog) -> None:
    """Reserved BAT bits set: state and offset are still unambiguous (QEMU reads them), but the
    entry is not what any writer we know makes, so the image is served read-only."""
    g = Vhdx(str(tmp_path / "r.vhdx"), 8 * M, block_size=M)
    host = g.put_block(1, b"\x11" * M)
    g.set_entry(g.payload_index(1), host | 6 | 0x100)
    g.set_entry(g.payload_index(3), 2 | 0x800)
    path = Path(g.path)
    expected = bytearray(8 * M)
    expected[M : 2 * M] = b"\x11" * M
    assert qemu_raw(path) == expected
    before = path.read_bytes()

    async def go():
        img = await opened(path)
        try:
            assert img.readonly
            return await read_all(img)
        finally:
            await img.close()

    assert run(go()) == expected
    assert "BAT entry 1: reserved bits set" in caplog.text and "read-only" in caplog.text
    assert path.read_bytes() == before

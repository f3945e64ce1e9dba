"""The VDI driver against QEMU (the oracle), a bytearray model and VirtualBox's discard rules.

* Differential: dynamic and static images QEMU made and filled, and a VirtualBox-style image
  (its header text and size, data at 1 MiB, blocks out of order) read as ``qemu-img convert``
  and map as ``qemu-img map``.
* Writes: hypothesis op sequences (several concurrent streams, unaligned, a one-byte cache)
  against a model; afterwards ``qemu-img check`` is clean, ``qemu-img compare`` equal and the
  allocation the same as QEMU sees it.
* Discard as VirtualBox does it: a freed block's slot is filled with the last block, the count
  drops and the file shrinks; partial discards free a block only when the rest of it is zeroes.
* Crash states after every single write (unsynced writes kept, lost, or lost but the last):
  reopened read-write they are repaired, pass ``qemu-img check`` and keep every flushed write.
* Repair of what a crash (or another tool) leaves; hostile headers and block maps.
"""

from __future__ import annotations

import asyncio
import struct
import tracemalloc
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserve.cache import ClusterCache
from nbdserve.errors import CorruptImage, ImageError, UnsupportedImage
from nbdserve.formats import probe
from nbdserve.formats.base import OpenOptions
from nbdserve.formats.vdi import VdiDriver
from nbdserve.image import Image
from nbdserve.storage.base import settled
from nbdserve.storage.local import LocalFile
from tests.conftest import SLOW
from tests.imagetest import (
    FILL,
    Recorder,
    apply_ops,
    file_after,
    model_ops,
    opened,
    oracle,
    run,
    with_writes,
    write_concurrently,
)
from tests.imagetest import read_image as read_all
from tests.util import qemu_img, qemu_io

check_clean, compare_raw, our_map, qemu_map, qemu_raw = oracle("vdi")

K = 1024
M = 1024 * K
FREE = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE


def header(path: Path) -> dict:
    raw = path.read_bytes()
    bmap, data = struct.unpack_from("<II", raw, 0x154)
    blocks, allocated = struct.unpack_from("<II", raw, 0x180)
    entries = list(struct.unpack_from(f"<{blocks}I", raw, bmap))
    return {"bmap": bmap, "data": data, "blocks": blocks, "allocated": allocated, "entries": entries}


def set_entries(path: Path, changes: dict[int, int], allocated: int | None = None) -> None:
    raw = bytearray(path.read_bytes())
    bmap = struct.unpack_from("<I", raw, 0x154)[0]
    for k, v in changes.items():
        struct.pack_into("<I", raw, bmap + 4 * k, v)
    if allocated is not None:
        struct.pack_into("<I", raw, 0x184, allocated)
    path.write_bytes(raw)


def data_map(rows: list[tuple]) -> list[tuple]:
    """A map without the zero flag of data runs (QEMU adds it for host holes inside blocks)."""
    from tests.imagetest import merge

    return merge([(s, n, d, z and not d, p, depth) for s, n, d, z, p, depth in rows])


async def read_and_map(path: Path) -> tuple[bytes, list[tuple]]:
    img = await opened(path, readonly=True)
    try:
        return await read_all(img), await our_map(img)
    finally:
        await img.close()


# -- differential -------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [False, True])
def test_qemu_images_read_like_qemu(tmp_path: Path, static: bool) -> None:
    path = tmp_path / "a.vdi"
    qemu_img("create", "-q", "-f", "vdi", "-o", f"static={'on' if static else 'off'}", path, "64M")
    qemu_io("vdi", path, *FILL)
    data, runs = run(read_and_map(path))
    assert data == qemu_raw(path, tmp_path)
    if static:  # QEMU adds "zero" for host holes: compare what is data
        assert data_map(runs) == data_map(qemu_map(path))
    else:
        assert runs == qemu_map(path)


def vbox_image(path: Path, size: int, blocks: dict[int, bytes], order: list[int]) -> None:
    """A dynamic image laid out as VirtualBox writes it: its header text and size (0x190, with
    the LCHS geometry), data at 1 MiB, data blocks in ``order`` (not the virtual order)."""
    n = -(-size // M)
    head = bytearray(512)
    head[:40] = b"<<< Oracle VM VirtualBox Disk Image >>>\n"
    struct.pack_into("<IIIII", head, 0x40, 0xBEDA107F, 0x00010001, 0x190, 1, 0)
    struct.pack_into("<IIIIIII", head, 0x154, 0x200, M, 0, 0, 0, 512, 0)
    struct.pack_into("<QIIII", head, 0x170, size, M, 0, n, len(order))
    head[0x188:0x1A8] = uuid.uuid4().bytes + uuid.uuid4().bytes
    struct.pack_into("<IIII", head, 0x1C8, 1024, 16, 63, 512)
    bmap = [FREE] * n
    for idx, vb in enumerate(order):
        bmap[vb] = idx
    with open(path, "wb") as f:
        f.write(head)
        f.write(struct.pack(f"<{n}I", *bmap))
        f.truncate(M + len(order) * M)
        for idx, vb in enumerate(order):
            f.seek(M + idx * M)
            f.write(blocks[vb])


def test_virtualbox_layout_reads_like_qemu(tmp_path: Path) -> None:
    path = tmp_path / "vbox.vdi"
    blocks = {vb: bytes([vb + 1]) * M for vb in (0, 3, 9, 10)}
    vbox_image(path, 12 * M, blocks, [10, 0, 9, 3])
    set_entries(path, {5: DISCARDED})
    data, runs = run(read_and_map(path))
    assert data == qemu_raw(path, tmp_path)
    assert runs == qemu_map(path)
    assert data[3 * M : 4 * M] == b"\x04" * M and data[10 * M : 11 * M] == b"\x0b" * M
    check_clean(path)


# -- writes against a model ---------------------------------------------------------------------

VSIZE = 9 * M + 512  # a short last block

op_st = model_ops(VSIZE, write_max=2 * M, zero_max=3 * M, trim_max=3 * M)


@settings(max_examples=30 if SLOW else 15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    streams=st.lists(st.lists(op_st, max_size=10), min_size=1, max_size=4),
    static=st.booleans(),
    tiny_cache=st.booleans(),
    prefill=st.booleans(),
)
def test_write_sequences_match_model(tmp_path: Path, streams, static: bool, tiny_cache: bool, prefill: bool) -> None:
    for p in tmp_path.iterdir():
        p.unlink()
    path = tmp_path / "w.vdi"
    qemu_img("create", "-q", "-f", "vdi", "-o", f"static={'on' if static else 'off'}", path, str(VSIZE))
    model = bytearray(VSIZE)
    if prefill:  # blocks QEMU allocated, in its order
        qemu_io("vdi", path, "write -P 0x61 5M 1M", "write -P 0x62 1M 1536k", "write -P 0x63 8M 1M")
        model[5 * M : 6 * M] = b"\x61" * M
        model[1 * M : 1 * M + 1536 * K] = b"\x62" * (1536 * K)
        model[8 * M : 9 * M] = b"\x63" * M
    bounds = [0, *(VSIZE * (k + 1) // len(streams) - 1000 * (k + 1) for k in range(len(streams) - 1)), VSIZE]

    async def go():
        img = await opened(path, cache=1 if tiny_cache else 8 << 20)
        try:
            await asyncio.gather(
                *(apply_ops(img, model, ops, bounds[k], bounds[k + 1]) for k, ops in enumerate(streams))
            )
            assert await read_all(img) == model
        finally:
            await img.close()
        return await read_and_map(path)

    data, runs = run(go())
    assert data == model
    check_clean(path)
    compare_raw(path, model, tmp_path)
    assert data_map(runs) == data_map(qemu_map(path))
    h = header(path)
    used = sorted(e for e in h["entries"] if e < DISCARDED)
    assert used == list(range(h["allocated"]))  # dense, as QEMU and VirtualBox allocate
    if not static:
        assert path.stat().st_size == h["data"] + h["allocated"] * M


def test_concurrent_writes_to_one_block_allocate_it_once(tmp_path: Path) -> None:
    path = tmp_path / "c.vdi"
    qemu_img("create", "-q", "-f", "vdi", path, "8M")
    writes = [(M + k * 4 * K + 100, bytes([k + 1]) * 3000) for k in range(16)]
    write_concurrently(path, writes)
    assert header(path)["allocated"] == 1
    check_clean(path)
    compare_raw(path, with_writes(8 * M, writes), tmp_path)


# -- discard as VirtualBox does it ------------------------------------------------------------


def test_discard_moves_the_last_block_and_shrinks(tmp_path: Path) -> None:
    path = tmp_path / "d.vdi"
    qemu_img("create", "-q", "-f", "vdi", path, "8M")
    qemu_io("vdi", path, "write -P 1 0 1M", "write -P 2 2M 1M", "write -P 3 4M 1M", "write -P 4 6M 1M")
    qemu_io("vdi", path, "write -P 5 7M 4k")  # block 7: data only in its first 4 KiB
    model = bytearray(qemu_raw(path, tmp_path))
    start = path.stat().st_size

    async def go():
        img = await opened(path)
        try:
            await img.trim(2 * M, M, fua=False)  # whole block 2 (index 1): block 7 (index 4) moves there
            h = header(path)
            assert h["allocated"] == 4 and h["entries"][2] == DISCARDED and h["entries"][7] == 1
            assert path.stat().st_size == start - M
            await img.trim(4 * M + 100, M - 200, fua=False)  # partial, rest is data: kept
            assert header(path)["allocated"] == 4
            await img.write_zeroes(7 * M, 4 * K, may_trim=False, fast=False, fua=False)
            await img.trim(7 * M + 4 * K, M - 4 * K, fua=False)  # partial, the rest now zeroes: freed
            assert header(path)["allocated"] == 3 and header(path)["entries"][7] == DISCARDED
            await img.write_zeroes(0, M, may_trim=True, fast=False, fua=False)  # whole, may trim: freed
            await img.write_zeroes(6 * M, M, may_trim=False, fast=False, fua=False)  # in place: stays
            h = header(path)
            assert h["allocated"] == 2 and h["entries"][0] == DISCARDED and h["entries"][6] < DISCARDED
            await settled(img.write(2 * M + 5, memoryview(b"\x09" * 10), fua=False))  # a discarded block again
            return await read_all(img)
        finally:
            await img.close()

    data = run(go())
    for a, b in ((2 * M, 3 * M), (7 * M, 8 * M), (0, M), (6 * M, 7 * M)):
        model[a:b] = bytes(b - a)
    model[2 * M + 5 : 2 * M + 15] = b"\x09" * 10
    assert data == model
    check_clean(path)
    compare_raw(path, model, tmp_path)
    assert path.stat().st_size == header(path)["data"] + 3 * M


class LateFile(LocalFile):
    """A local file that completes one chosen write later, as RBD or S3 may: ``hold_next`` holds
    the next write (not yet on the file, its Pending not done) until ``release``."""

    sync_io = False

    def __init__(self, path: str) -> None:
        super().__init__(path, readonly=False)
        self.hold_next = False
        self.held: list[tuple[int, bytes, asyncio.Future]] = []

    def write(self, offset, data):
        if not self.hold_next:
            return super().write(offset, data)
        self.hold_next = False
        fut = asyncio.get_running_loop().create_future()
        self.held.append((offset, bytes(data), fut))
        return fut

    def release(self) -> None:
        for offset, data, fut in self.held:
            super().write(offset, data)
            fut.set_result(None)
        self.held.clear()


def test_removal_waits_for_a_write_in_flight(tmp_path: Path) -> None:
    """TRIM of block 0 moves the last block (1) into its slot while a write to block 1 is still
    in flight: the copy must include that write (and a read in flight must not see the move)."""
    path = tmp_path / "late.vdi"
    qemu_img("create", "-q", "-f", "vdi", path, "4M")
    qemu_io("vdi", path, "write -P 1 0 1M", "write -P 2 1M 1M")

    async def go():
        cache = ClusterCache(8 << 20)
        file = LateFile(str(path))
        img = Image(await VdiDriver.open(file, readonly=False, cache=cache, options=OpenOptions()), None, cache)
        try:
            await settled(img.read(M, memoryview(bytearray(4 * K))))  # the map page is cached
            file.hold_next = True
            pending = img.write(M + 10, memoryview(b"\x07" * 100), fua=False)
            assert pending is not None and file.held  # started, not landed
            trim = asyncio.ensure_future(img.trim(0, M, fua=False))
            while not (trim.done() or len(getattr(img.driver, "_idle", ()))):  # done, or waiting for the write
                await asyncio.sleep(0)
            file.release()
            await pending
            await trim
            assert header(path)["entries"][:2] == [DISCARDED, 0]  # block 1 moved into slot 0
            return await read_all(img)
        finally:
            await img.close()

    data = run(go())
    want = bytearray(4 * M)
    want[M : 2 * M] = b"\x02" * M
    want[M + 10 : M + 110] = b"\x07" * 100
    assert data == want
    check_clean(path)


def test_static_images_keep_their_blocks(tmp_path: Path) -> None:
    path = tmp_path / "s.vdi"
    qemu_img("create", "-q", "-f", "vdi", "-o", "static=on", path, "4M")
    qemu_io("vdi", path, "write -P 1 0 4M")
    size = path.stat().st_size

    async def go():
        img = await opened(path)
        try:
            await img.trim(0, 2 * M, fua=False)
            await img.write_zeroes(2 * M, M, may_trim=True, fast=False, fua=False)
        finally:
            await img.close()

    run(go())
    h = header(path)
    assert path.stat().st_size == size and h["entries"] == [0, 1, 2, 3] and h["allocated"] == 4
    expect = b"\x01" * (2 * M) + bytes(M) + b"\x01" * M
    compare_raw(path, expect, tmp_path)
    check_clean(path)


# -- crash safety and repair -----------------------------------------------------------------------


def test_crash_at_every_point(tmp_path: Path) -> None:
    path = tmp_path / "k.vdi"
    qemu_img("create", "-q", "-f", "vdi", path, "8M")
    qemu_io("vdi", path, "write -P 0x11 0 1M", "write -P 0x12 3M 1M", "write -P 0x13 6M 64k")
    base = path.read_bytes()
    old = qemu_raw(path, tmp_path)
    steps = [
        ("write", 2 * M + 512, 8192, 0x22),
        ("write", 4 * M - 100, 200, 0x33),
        ("flush",),
        ("trim", 0, M),  # moves the block of 6M into slot 0
        ("write", 5 * M, M, 0x44),
        ("flush",),
        ("write", 6 * M + 10, 20, 0x55),
        ("zero", 3 * M, M),
    ]

    async def workload(out: list[tuple]) -> None:
        img = await opened(path)
        rec = Recorder(img.driver.storage, path)
        try:
            for k, step in enumerate(steps):
                if step[0] == "flush":
                    await img.flush()
                    rec.mark("flushed")
                    continue
                if step[0] == "write":
                    await settled(img.write(step[1], memoryview(bytes([step[3]]) * step[2]), fua=False))
                elif step[0] == "trim":
                    await img.trim(step[1], step[2], fua=False)
                else:
                    await img.write_zeroes(step[1], step[2], may_trim=True, fast=False, fua=False)
                rec.mark(f"done{k}")
        finally:
            rec.restore()
            await img.close()
        out.extend(rec.ops)

    ops: list[tuple] = []
    run(workload(ops))
    states = [bytes(old)]  # the disk after each step
    for step in steps:
        if step[0] == "flush":
            continue
        disk = bytearray(states[-1])
        off, n = step[1], step[2]
        disk[off : off + n] = bytes([step[3]]) * n if step[0] == "write" else bytes(n)
        states.append(bytes(disk))
    cuts = [i for i, op in enumerate(ops) if op[0] != "mark"] + [len(ops)]
    assert len(cuts) > 12
    for cut in cuts:
        prefix = ops[:cut]
        flushed = done = 0
        last = -1  # index in ``steps`` of the last step done
        for op in prefix:
            if op[0] == "mark" and op[1].startswith("done"):
                done += 1
                last = int(op[1][4:])
            elif op == ("mark", "flushed"):
                flushed = done
        in_flight = next((k for k in range(last + 1, len(steps)) if steps[k][0] != "flush"), len(steps))
        for lose, keep_last in ((False, False), (True, False), (True, True)):
            crashed = tmp_path / "crash.vdi"
            crashed.write_bytes(file_after(base, prefix, lose, keep_last))
            data = run(_read_rw(crashed))  # repairs
            check_clean(crashed)
            assert qemu_raw(crashed, tmp_path) == data, (cut, lose, keep_last)
            # Each 512-byte sector holds its content after the last flushed step or a later one;
            # a trimmed range holds anything.
            trimmed = [(s[1], s[2]) for s in steps[: in_flight + 1] if s[0] == "trim"]
            for i in range(0, len(data), 512):
                if any(a <= i < a + n for a, n in trimmed):
                    continue
                allowed = {st[i : i + 512] for st in states[flushed:]}
                assert data[i : i + 512] in allowed, (cut, lose, keep_last, i)


async def _read_rw(path: Path) -> bytes:
    img = await opened(path)
    try:
        return await read_all(img)
    finally:
        await img.close()


def test_repair_on_read_write_open(tmp_path: Path) -> None:
    path = tmp_path / "r.vdi"
    qemu_img("create", "-q", "-f", "vdi", path, "8M")
    qemu_io("vdi", path, "write -P 1 0 1M", "write -P 2 2M 1M", "write -P 3 4M 1M")
    expect = qemu_raw(path, tmp_path)
    size = path.stat().st_size
    # What a crash in the middle of a discard leaves: block 0 (index 0) freed, block 4 (index 2)
    # not yet moved; the count not yet lowered; and a leaked block past the end.
    set_entries(path, {0: DISCARDED})
    with open(path, "ab") as f:
        f.write(b"\xee" * M)
    assert qemu_img("check", "-f", "vdi", path, check=False).returncode != 0
    expect = bytes(M) + expect[M:]

    async def ro():
        img = await opened(path, readonly=True)  # read-only: served as it is
        try:
            return await read_all(img)
        finally:
            await img.close()

    assert run(ro()) == expect
    assert run(_read_rw(path)) == expect
    h = header(path)
    assert h["allocated"] == 2 and sorted(e for e in h["entries"] if e < DISCARDED) == [0, 1]
    assert path.stat().st_size == size - M
    check_clean(path)
    compare_raw(path, expect, tmp_path)


# -- hostile images ---------------------------------------------------------------------------------


def _patched(tmp: Path, **patch) -> bytes:
    path = tmp / "src.vdi"
    if not path.exists():
        qemu_img("create", "-q", "-f", "vdi", path, "4M")
        qemu_io("vdi", path, "write -P 1 0 1M", "write -P 2 2M 1M")
    raw = bytearray(path.read_bytes())
    at = {"signature": (0x40, "I"), "version": (0x44, "I"), "header_size": (0x48, "I"), "type": (0x4C, "I")}
    at |= {"offset_bmap": (0x154, "I"), "offset_data": (0x158, "I"), "sector_size": (0x168, "I")}
    at |= {"disk_size": (0x170, "Q"), "block_size": (0x178, "I"), "block_extra": (0x17C, "I")}
    at |= {"blocks": (0x180, "I"), "allocated": (0x184, "I"), "link": (0x1A8, "16s"), "parent": (0x1B8, "16s")}
    for name, value in patch.items():
        if name in at:
            struct.pack_into("<" + at[name][1], raw, at[name][0], value)
    if "entry1" in patch:
        struct.pack_into("<I", raw, 0x200 + 4 * 2, patch["entry1"])
    if "cut" in patch:
        raw = raw[: patch["cut"]]
    return bytes(raw)


HOSTILE = [
    ("signature", dict(signature=0xBEDA1070), CorruptImage),
    ("version", dict(version=0x00020000), UnsupportedImage),
    ("image_type", dict(type=4), UnsupportedImage),
    ("differencing", dict(link=b"\x01" * 16), UnsupportedImage),
    ("differencing", dict(parent=b"\x01" * 16), UnsupportedImage),
    ("sector_size", dict(sector_size=4096), UnsupportedImage),
    ("block_size", dict(block_size=3 * M), UnsupportedImage),
    ("block_size", dict(block_size=1 << 30), UnsupportedImage),
    ("block_extra", dict(block_extra=512), UnsupportedImage),
    ("blocks_in_image", dict(blocks=0x40000000), CorruptImage),
    ("offset_bmap", dict(blocks=0x3FFFFFFF, disk_size=1 << 40), CorruptImage),  # huge map, tiny file
    ("disk_size", dict(disk_size=1 << 50), CorruptImage),
    ("blocks_allocated", dict(allocated=99), CorruptImage),
    ("header_size", dict(header_size=0x100), CorruptImage),
    ("header_size", dict(header_size=0x10000), CorruptImage),
    ("offset_bmap", dict(offset_bmap=0x201), CorruptImage),
    ("offset_bmap", dict(offset_bmap=1 << 31), CorruptImage),
    ("offset_data", dict(offset_data=0x200), CorruptImage),  # on the block map
    ("offset_data", dict(offset_data=0x401), CorruptImage),
    ("offset_data", dict(offset_data=1 << 31), CorruptImage),
    ("block map entry 2", dict(entry1=7), CorruptImage),  # not a block index
    ("both use data block 0", dict(entry1=0), CorruptImage),
    ("past the end of the file", dict(cut=0x400 + M + 4096), CorruptImage),
    ("shorter than a VDI header", dict(cut=100), CorruptImage),
]


@pytest.mark.parametrize("field,kw,exc", HOSTILE, ids=[f"{h[0]}-{i}" for i, h in enumerate(HOSTILE)])
@pytest.mark.parametrize("readonly", [True, False])
def test_hostile_headers(tmp_path: Path, field: str, kw: dict, exc: type, readonly: bool) -> None:
    path = tmp_path / "bad.vdi"
    path.write_bytes(_patched(tmp_path, **kw))
    tracemalloc.start()
    try:
        with pytest.raises(exc) as e:
            run(opened(path, readonly=readonly, fmt="vdi"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)) and field in msg, msg
    assert peak < 4 * M, peak


def test_probe() -> None:
    head = bytearray(512)
    struct.pack_into("<I", head, 0x40, 0xBEDA107F)
    assert VdiDriver.probe(bytes(head), 1 << 20) == 100
    assert VdiDriver.probe(bytes(512), 1 << 20) == 0
    assert probe(bytes(head), 1 << 20, "x", raw_fallback=False) is VdiDriver


def test_open_errors_are_image_errors(tmp_path: Path) -> None:
    path = tmp_path / "empty.vdi"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="shorter than a VDI header"):
        run(opened(path, fmt="vdi"))

"""The QED driver against QEMU (the oracle) and against a bytearray model.

* Differential: images QEMU made and filled (every geometry QEMU can open, backing chains) read
  through ``open_image`` give the bytes of ``qemu-img convert -O raw`` and the allocation of
  ``qemu-img map``.
* Writes: hypothesis op sequences (several concurrent streams) against a model; afterwards
  ``qemu-img check`` is clean and ``qemu-img compare`` equal.
* Golden cases QEMU gets wrong or cannot make: partial write into a zero cluster over a backing
  file, table_size 1.
* NEED_CHECK: repair on a read-write open; crash states (the file after every single write of a
  workload) all reopen clean and keep every flushed write.
* Hostile headers and tables: one-line ``ImageError`` naming the field, bounded memory.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserve.errors import CorruptImage, ImageError, NbdError, UnsupportedImage
from nbdserve.formats.qed import QedDriver
from nbdserve.formats.qed.header import F_NEED_CHECK
from nbdserve.image import Image
from nbdserve.storage.base import settled
from tests.imagetest import FILL, apply_ops, model_ops, opened, oracle, run, with_writes, write_concurrently
from tests.imagetest import read_image as read_all
from tests.util import qemu_img, qemu_io
from tests.util import run as run_cmd

check_clean, compare_raw, our_map, qemu_map, qemu_raw = oracle("qed")

SLOW = os.environ.get("NBDSERVE_SLOW") == "1"
K = 1024
M = 1024 * K


def features(path: Path) -> int:
    return struct.unpack_from("<Q", path.read_bytes(), 16)[0]


def make_base(tmp: Path, size: int = 64 * M, byte: int = 0x5A) -> Path:
    """A raw base image with data everywhere (no host holes: QEMU maps those specially)."""
    base = tmp / "base.raw"
    with open(base, "wb") as f:
        chunk = bytes([byte]) * M
        for _ in range(size // M):
            f.write(chunk)
    return base


# -- differential against QEMU-made images -------------------------------------------------


@pytest.mark.parametrize(
    "opts",
    [
        "",
        "cluster_size=4k,table_size=2",
        "cluster_size=4k,table_size=16",
        "cluster_size=64k,table_size=16",
        "cluster_size=256k,table_size=2",
        "cluster_size=1M,table_size=4",
    ],
)
def test_qemu_images_read_like_qemu(tmp_path: Path, opts: str) -> None:
    img_path = tmp_path / "e.qed"
    qemu_img("create", "-q", "-f", "qed", *(["-o", opts] if opts else []), img_path, "64M")
    qemu_io("qed", img_path, *FILL)

    async def go():
        img = await opened(img_path, readonly=True)
        try:
            assert img.format == "qed" and img.size == 64 * M
            assert await read_all(img) == qemu_raw(img_path, tmp_path)
            assert await our_map(img) == qemu_map(img_path)
        finally:
            await img.close()

    run(go())


def test_converted_image_reads_like_qemu(tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(range(256)) * (4 * K) + bytes(M) + b"\x01" * M)
    img_path = tmp_path / "c.qed"
    qemu_img("convert", "-f", "raw", "-O", "qed", raw, img_path)

    async def go():
        img = await opened(img_path, readonly=True)
        try:
            assert await read_all(img) == raw.read_bytes()
            assert await our_map(img) == qemu_map(img_path)
        finally:
            await img.close()

    run(go())


def test_backing_chain_raw_qed_qed(tmp_path: Path) -> None:
    base = make_base(tmp_path, 32 * M)
    mid, top = tmp_path / "mid.qed", tmp_path / "top.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4k", "-b", base.name, "-F", "raw", mid, "64M")
    qemu_img("create", "-q", "-f", "qed", "-b", mid.name, "-F", "qed", top, "64M")
    assert features(mid) == 0x05 and features(top) == 0x01  # NO_PROBE only for a raw backing file
    qemu_io("qed", mid, "write -P 0x61 1M 6k", "write -z 2M 64k", "write -P 0x62 40M 1M")
    qemu_io("qed", top, *FILL)

    async def go():
        img = await opened(top, readonly=True)
        try:
            assert [i.format for i in img.chain()] == ["qed", "qed", "raw"]
            assert await read_all(img) == qemu_raw(top, tmp_path)
            assert await our_map(img) == qemu_map(top)
        finally:
            await img.close()

    run(go())


# -- writes against a model ---------------------------------------------------------------

VSIZE = 6 * M  # crosses an L2 table boundary with 4 KiB clusters and table_size 2 (4 MiB per table)

op_st = model_ops(VSIZE, write_max=70 * K, zero_max=200 * K, trim_max=200 * K, fast_zero=True)


def whole_clusters(cs: int):
    """A TRIM's effect here: the whole clusters inside its range read as zeroes."""
    return lambda off, n: [(-(-off // cs) * cs, (off + n) // cs * cs)] if (off + n) // cs > -(-off // cs) else []


async def apply(img: Image, model: bytearray, ops, lo: int, hi: int, cs: int) -> None:
    await apply_ops(img, model, ops, lo, hi, trimmed=whole_clusters(cs), fast_unit=cs)


def _write_test(tmp: Path, streams, *, backing: bool, cs: int, table_size: int, cache: int = 8 << 20) -> None:
    for p in tmp.iterdir():
        p.unlink()
    path = tmp / "w.qed"
    opts = f"cluster_size={cs},table_size={table_size}"
    if backing:
        base = make_base(tmp, 4 * M, 0x77)  # shorter than the overlay: the rest reads as zeroes
        qemu_img("create", "-q", "-f", "qed", "-o", opts, "-b", base.name, "-F", "raw", path, str(VSIZE))
        model = bytearray(base.read_bytes() + bytes(VSIZE - 4 * M))
    else:
        qemu_img("create", "-q", "-f", "qed", "-o", opts, path, str(VSIZE))
        model = bytearray(VSIZE)
    # Stream regions are not cluster-aligned, so neighbouring streams contend for clusters.
    bounds = [0, *(VSIZE * (k + 1) // len(streams) - 1000 * (k + 1) for k in range(len(streams) - 1)), VSIZE]

    async def go():
        img = await opened(path, cache=cache)
        try:
            await asyncio.gather(
                *(apply(img, model, ops, bounds[k], bounds[k + 1], cs) for k, ops in enumerate(streams))
            )
            assert await read_all(img) == model
        finally:
            await img.close()
        assert not features(path) & F_NEED_CHECK  # clean close
        img = await opened(path, readonly=True)
        try:
            assert await read_all(img) == model
            return await our_map(img)
        finally:
            await img.close()

    allocation = run(go())
    check_clean(path)
    compare_raw(path, model, tmp)
    assert allocation == qemu_map(path)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    streams=st.lists(st.lists(op_st, max_size=12), min_size=1, max_size=4),
    backing=st.booleans(),
    tiny_cache=st.booleans(),
)
def test_write_sequences_match_model(tmp_path: Path, streams, backing: bool, tiny_cache: bool) -> None:
    """``tiny_cache``: a one-byte budget, so every L2 table is evicted as soon as it is unpinned."""
    _write_test(tmp_path, streams, backing=backing, cs=4 * K, table_size=2, cache=1 if tiny_cache else 8 << 20)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(streams=st.lists(st.lists(op_st, max_size=8), min_size=1, max_size=3), backing=st.booleans())
def test_write_sequences_default_geometry(tmp_path: Path, streams, backing: bool) -> None:
    _write_test(tmp_path, streams, backing=backing, cs=64 * K, table_size=4)


def test_concurrent_writes_to_one_cluster_allocate_it_once(tmp_path: Path) -> None:
    path = tmp_path / "c.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=64k", path, "8M")
    qemu_io("qed", path, "write -P 1 0 64k")  # L2 table exists: growth below is data only
    before = path.stat().st_size
    writes = [(M + k * 4 * K + 100, bytes([k + 1]) * 3000) for k in range(16)]
    write_concurrently(path, writes)
    assert path.stat().st_size == before + 64 * K
    check_clean(path)
    compare_raw(path, with_writes(8 * M, [(0, b"\x01" * (64 * K)), *writes]), tmp_path)


def test_zero_and_trim_make_zero_clusters(tmp_path: Path) -> None:
    path = tmp_path / "z.qed"
    base = make_base(tmp_path, 4 * M, 0x77)
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=64k", "-b", base.name, "-F", "raw", path, "4M")

    async def go():
        img = await opened(path)
        try:
            await settled(img.write(0, memoryview(b"\x01" * (128 * K)), fua=False))
            await img.write_zeroes(0, 64 * K, may_trim=True, fast=True, fua=False)  # allocated: zeroed in place
            await img.write_zeroes(256 * K, 128 * K, may_trim=False, fast=True, fua=False)  # backing -> zero clusters
            with pytest.raises(NbdError) as e:
                await img.write_zeroes(512 * K + 1, 64 * K, may_trim=False, fast=True, fua=False)
            assert e.value.errno == errno.ENOTSUP
            await img.trim(1 * M - 100, 64 * K + 200, fua=False)  # whole cluster 1M..1M+64k only
            runs = await img.runs(0, 2 * M)
            assert [(r.length, r.flags, r.depth) for r in runs] == [
                (128 * K, 0, 1),  # allocated data (part of it zeroed in place)
                (128 * K, 0, 2),  # backing
                (128 * K, 3, 1),  # zero clusters
                (640 * K, 0, 2),
                (64 * K, 3, 1),  # trimmed cluster
                (M - 64 * K, 0, 2),
            ]
            data = await read_all(img)
        finally:
            await img.close()
        expect = bytearray(base.read_bytes())
        expect[: 128 * K] = bytes(64 * K) + b"\x01" * (64 * K)
        expect[256 * K : 384 * K] = bytes(128 * K)
        expect[M : M + 64 * K] = bytes(64 * K)
        assert data == expect
        return expect

    expect = run(go())
    check_clean(path)
    compare_raw(path, expect, tmp_path)
    assert qemu_map(path)[:3] == [  # (start, length, data, zero, present, depth)
        (0, 128 * K, True, False, True, 0),
        (128 * K, 128 * K, True, False, True, 1),
        (256 * K, 128 * K, False, True, True, 0),
    ]


def test_allocated_read_does_not_suspend(tmp_path: Path) -> None:
    """With the L2 table cached, a read of allocated clusters completes without yielding."""
    path = tmp_path / "h.qed"
    qemu_img("create", "-q", "-f", "qed", path, "16M")
    qemu_io("qed", path, "write -P 0x42 0 1M")

    async def go():
        img = await opened(path, readonly=True)
        try:
            buf = bytearray(4 * K)
            await settled(img.driver.read(8 * K, memoryview(buf)))  # loads the L2 table
            buf = bytearray(4 * K)
            assert img.driver.read(12 * K, memoryview(buf)) is None  # done, nothing to wait for
            assert buf == b"\x42" * (4 * K)
        finally:
            await img.close()

    run(go())


# -- golden tests for what QEMU cannot do ------------------------------------------------------


def test_partial_write_into_zero_cluster_does_not_resurrect_backing(tmp_path: Path) -> None:
    base = make_base(tmp_path, 1 * M, 0x77)
    ours, theirs = tmp_path / "ours.qed", tmp_path / "theirs.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=64k", "-b", base.name, "-F", "raw", ours, "1M")
    qemu_io("qed", ours, "write -z 0 128k")  # two zero clusters, made by QEMU
    shutil.copy(ours, theirs)

    async def go():
        img = await opened(ours)
        try:
            await settled(img.write(1000, memoryview(b"\x01" * 1000), fua=False))
            await settled(img.write(64 * K + 60 * K, memoryview(b"\x02" * (8 * K)), fua=False))  # spans into backing
        finally:
            await img.close()

    run(go())
    expect = bytearray(base.read_bytes())
    expect[: 128 * K] = bytes(128 * K)
    expect[1000:2000] = b"\x01" * 1000
    expect[124 * K : 132 * K] = b"\x02" * (8 * K)
    check_clean(ours)
    compare_raw(ours, expect, tmp_path)
    # QEMU 7.2 copies backing data into the rest of the cluster (the bug we do not copy).
    qemu_io("qed", theirs, "write -P 1 1000 1000")
    theirs_data = qemu_raw(theirs, tmp_path)
    assert theirs_data[:512] == theirs_data[2048:2560] == b"\x77" * 512


def test_table_size_one(tmp_path: Path) -> None:
    """QEMU creates table_size=1 images but cannot open them; we serve and write them."""
    path = tmp_path / "t1.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=1", path, "2M")
    assert qemu_img("info", "-f", "qed", path, check=False).returncode != 0

    async def go():
        model = bytearray(2 * M)
        img = await opened(path)
        try:
            for k, off in enumerate((0, 4 * K - 3, M - 10, 2 * M - 5000)):  # 512 entries x 4 KiB per table
                data = bytes([k + 1]) * 5000
                await settled(img.write(off, memoryview(data), fua=False))
                model[off : off + 5000] = data
            await img.write_zeroes(1 * M + 4 * K, 8 * K, may_trim=True, fast=False, fua=False)
            model[M + 4 * K : M + 12 * K] = bytes(8 * K)
        finally:
            await img.close()
        img = await opened(path, readonly=True)
        try:
            assert await read_all(img) == model
        finally:
            await img.close()

    run(go())


# -- NEED_CHECK ----------------------------------------------------------------------------


def test_need_check_set_while_allocating_and_cleared_by_flush(tmp_path: Path) -> None:
    """Set (and synced) before the first metadata change; cleared by a flush once metadata has
    been idle for ``need_check_idle`` seconds, and by close."""
    path = tmp_path / "n.qed"
    qemu_img("create", "-q", "-f", "qed", path, "4M")

    async def go():
        img = await opened(path)
        try:
            await settled(img.write(0, memoryview(b"x" * 512), fua=False))
            assert features(path) & F_NEED_CHECK
            await img.flush()  # metadata changed less than 5 s ago: the flag stays (QEMU's idle rule)
            assert features(path) & F_NEED_CHECK
            img.driver.need_check_idle = 0.0
            await img.flush()
            assert not features(path) & F_NEED_CHECK
            await settled(img.write(0, memoryview(b"y" * 512), fua=False))  # in place: no metadata change
            assert not features(path) & F_NEED_CHECK
            await img.write_zeroes(M, 64 * K, may_trim=True, fast=False, fua=False)  # a zero cluster
            assert features(path) & F_NEED_CHECK
        finally:
            await img.close()
        assert not features(path) & F_NEED_CHECK

    run(go())
    check_clean(path)


def _set_features(path: Path, bits: int) -> None:
    with open(path, "r+b") as f:
        f.seek(16)
        old = struct.unpack("<Q", f.read(8))[0]
        f.seek(16)
        f.write(struct.pack("<Q", old | bits))


def test_need_check_repair_on_open(tmp_path: Path) -> None:
    """Invalid L1/L2 offsets are cleared and leaked clusters at the end of the file cut off before
    serving.  The clusters the cleared entries used to reach stay leaked here, because an L2 table
    is the last thing in the file (only data clusters are moved down; QEMU reclaims nothing), and
    qemu-img check then reports leaks only."""
    path = tmp_path / "r.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", path, "16M")
    qemu_io("qed", path, "write -P 1 0 8k", "write -P 2 4M 4k", "write -P 3 8M 4k")
    size = path.stat().st_size
    raw = bytearray(path.read_bytes())
    l1 = struct.unpack_from("<Q", raw, 40)[0]
    l1e = list(struct.unpack_from("<4Q", raw, l1))
    assert all(l1e[:3]) and not l1e[3]
    # L1 entry 1 (4M..8M) -> past the end of the file; L1 entry 2's L2 entry 0 -> unaligned.
    struct.pack_into("<Q", raw, l1 + 8, size + 64 * K)
    struct.pack_into("<Q", raw, l1e[2], 12345)
    raw += b"\xee" * (12 * K)  # three leaked clusters at the end
    path.write_bytes(raw)
    _set_features(path, F_NEED_CHECK)
    p = qemu_img("check", "--output=json", "-f", "qed", path, check=False)
    assert p.returncode == 2 and json.loads(p.stdout)["corruptions"] == 2

    data = run(_read_image(path))
    assert not features(path) & F_NEED_CHECK
    assert path.stat().st_size == size
    p = qemu_img("check", "--output=json", "-f", "qed", path, check=False)
    info = json.loads(p.stdout)
    assert p.returncode == 3 and "corruptions" not in info and info["leaks"] == 4, p.stdout  # 2 L2 + 2 data
    expect = bytearray(16 * M)
    expect[: 8 * K] = b"\x01" * (8 * K)  # the 4M and 8M writes were lost with their table entries
    assert data == expect
    compare_raw(path, expect, tmp_path)


def test_need_check_interior_leak_compacted(tmp_path: Path) -> None:
    """A leak in the middle of the file is filled by moving the last data cluster into it."""
    path = tmp_path / "m.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", path, "4M")
    qemu_io("qed", path, "write -P 1 0 4k", "write -P 2 4k 4k", "write -P 3 8k 4k", "write -P 4 12k 4k")
    size = path.stat().st_size
    raw = bytearray(path.read_bytes())
    l2 = struct.unpack_from("<Q", raw, struct.unpack_from("<Q", raw, 40)[0])[0]
    entries = struct.unpack_from("<4Q", raw, l2)
    assert entries[3] == size - 4 * K and entries[1] < entries[3]  # guest 12k is the last cluster
    struct.pack_into("<Q", raw, l2 + 8, 0)  # drop guest 4k..8k: its cluster leaks, mid-file
    path.write_bytes(raw)
    _set_features(path, F_NEED_CHECK)
    assert qemu_img("check", "-f", "qed", path, check=False).returncode == 3

    data = run(_read_image(path))
    assert path.stat().st_size == size - 4 * K
    check_clean(path)
    expect = bytearray(4 * M)
    expect[: 16 * K] = b"\x01" * (4 * K) + bytes(4 * K) + b"\x03" * (4 * K) + b"\x04" * (4 * K)
    assert data == expect
    compare_raw(path, expect, tmp_path)
    moved = struct.unpack_from("<4Q", path.read_bytes(), l2)
    assert moved == (entries[0], 0, entries[2], entries[1])


def test_need_check_trailing_leaks_truncated(tmp_path: Path) -> None:
    """What a crash leaves (clusters appended, tables not yet pointing at them) is repaired fully."""
    path = tmp_path / "t.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=64k", path, "16M")
    qemu_io("qed", path, "write -P 1 0 64k", "write -P 2 1M 64k")
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\xee" * (3 * 64 * K + 100))  # three leaked clusters and a partial one
    _set_features(path, F_NEED_CHECK)
    assert qemu_img("check", "-f", "qed", path, check=False).returncode == 3  # leaks

    data = run(_read_image(path))
    assert path.stat().st_size == size and not features(path) & F_NEED_CHECK
    check_clean(path)
    assert data[: 64 * K] == b"\x01" * (64 * K) and data[M : M + 64 * K] == b"\x02" * (64 * K)


def test_need_check_after_qemu_abort(tmp_path: Path) -> None:
    path = tmp_path / "a.qed"
    qemu_img("create", "-q", "-f", "qed", path, "16M")
    p = run_cmd("qemu-io", "-f", "qed", "-c", "write -P 9 1M 64k", "-c", "abort", path, check=False)
    assert p.returncode != 0
    assert features(path) & F_NEED_CHECK

    async def go():
        img = await opened(path, readonly=True)  # read-only: no repair, served as is
        try:
            assert (await read_all(img))[M : M + 64 * K] == b"\x09" * (64 * K)
        finally:
            await img.close()
        assert features(path) & F_NEED_CHECK
        img = await opened(path)
        await img.close()

    run(go())
    assert not features(path) & F_NEED_CHECK
    check_clean(path)


async def _crash_workload(path: Path, model: bytearray, ops, cs: int) -> list[tuple[bytes, list[bytes]]]:
    """Run ``ops`` (as ``apply`` takes them), recording after every single write or truncate of
    the image file: (file bytes, the model states a crash may expose: at the last flush and after
    each later op)."""
    snapshots: list[tuple[bytes, list[bytes]]] = []
    states = [bytes(model)]
    img = await opened(path)
    f = img.driver.storage
    real_write, real_truncate = f.write, f.truncate

    def write(offset, data):
        real_write(offset, data)
        snapshots.append((path.read_bytes(), states))

    async def truncate(size):
        await real_truncate(size)
        snapshots.append((path.read_bytes(), states))

    f.write, f.truncate = write, truncate
    try:
        for op in ops:
            await apply(img, model, [op], 0, len(model), cs)
            if op[0] == "flush":
                states = [bytes(model)]
            else:
                states.append(bytes(model))  # a later snapshot of this op may show it
    finally:
        f.write, f.truncate = real_write, real_truncate
        await img.close()
    return snapshots


async def _read_image(path: Path) -> bytes:
    img = await opened(path)
    try:
        return await read_all(img)
    finally:
        await img.close()


def _crash_image(tmp: Path, backing: bool) -> tuple[Path, bytearray]:
    path = tmp / "k.qed"
    opts = ["-o", "cluster_size=4k,table_size=2"]
    if backing:
        base = make_base(tmp, 2 * M, 0x77)
        qemu_img("create", "-q", "-f", "qed", *opts, "-b", base.name, "-F", "raw", path, str(VSIZE))
        return path, bytearray(base.read_bytes() + bytes(VSIZE - 2 * M))
    qemu_img("create", "-q", "-f", "qed", *opts, path, str(VSIZE))
    return path, bytearray(VSIZE)


def _verify_crash_states(tmp: Path, snapshots, every: int) -> None:
    """Each recorded state (every ``every``-th, and the last) reopens read-write, repairs itself,
    passes qemu-img check, and every sector reads as at the last flush or as after a later op."""
    for n, (state, allowed) in enumerate(snapshots):
        if n % every and n != len(snapshots) - 1:
            continue
        crashed = tmp / f"crash{n}.qed"
        crashed.write_bytes(state)
        data = run(_read_image(crashed))
        check_clean(crashed)
        bad = [i for i in range(0, len(data), 512) if all(data[i : i + 512] != a[i : i + 512] for a in allowed)]
        assert not bad, (n, bad[:4])
        crashed.unlink()


CRASH_OPS = [
    ("write", 100, 5000, 1),
    ("write", 4 * M - 2000, 9000, 2),  # across the L2 table boundary: a new table
    ("flush",),
    ("write", M + 7, 300, 3),
    ("write", 5 * M, 4096, 4),
    ("flush",),
    ("write", 150, 100, 5),  # in place
    ("zero", 2 * M, 64 * K, 0, True, False),  # zero clusters
    ("trim", 100, 8 * K),
]


@pytest.mark.parametrize("backing", [False, True])
def test_every_crash_state_reopens_clean(tmp_path: Path, backing: bool) -> None:
    """Kill -9 at every point of a workload: the file as it was after each single write or
    truncate (what a killed process leaves behind) reopens read-write, repairs itself, passes
    qemu-img check and keeps every write flushed before that point."""
    path, model = _crash_image(tmp_path, backing)
    snapshots = run(_crash_workload(path, model, CRASH_OPS, 4 * K))
    assert len(snapshots) > 10
    _verify_crash_states(tmp_path, snapshots, 1 if SLOW else 3)


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="random crash workloads run with NBDSERVE_SLOW=1")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op_st, min_size=1, max_size=10), backing=st.booleans())
def test_random_crash_states_reopen_clean(tmp_path: Path, ops, backing: bool) -> None:
    for p in tmp_path.iterdir():
        p.unlink()
    path, model = _crash_image(tmp_path, backing)
    ops = [op if op[0] != "zero" else (*op[:4], False) for op in ops]  # no ENOTSUP in the replay
    snapshots = run(_crash_workload(path, model, ops, 4 * K))
    _verify_crash_states(tmp_path, snapshots, 2)


# -- hostile images ----------------------------------------------------------------------------


def build(
    *,
    magic=b"QED\0",
    cluster_size=4096,
    table_size=1,
    header_size=1,
    features_=0,
    l1_table_offset=4096,
    image_size=1 * M,
    name_off=0,
    name_size=0,
    l1=(),
    extra=b"",
    file_size=None,
) -> bytes:
    head = struct.pack(
        "<4sIIIQQQQQII",
        magic,
        cluster_size,
        table_size,
        header_size,
        features_,
        0,
        0,
        l1_table_offset,
        image_size,
        name_off,
        name_size,
    )
    data = bytearray(head.ljust(4096, b"\0"))
    data += b"\0" * (table_size * cluster_size if cluster_size <= 64 * K else 0)
    for i, v in enumerate(l1):
        struct.pack_into("<Q", data, l1_table_offset + 8 * i, v)
    data += extra
    if file_size is not None:
        data = data[:file_size].ljust(file_size, b"\0")
    return bytes(data)


HOSTILE = [
    ("magic", dict(magic=b"QEF\0"), CorruptImage),
    ("features", dict(features_=0x10), UnsupportedImage),
    ("cluster_size", dict(cluster_size=512), CorruptImage),
    ("cluster_size", dict(cluster_size=12288), CorruptImage),
    ("cluster_size", dict(cluster_size=128 * M), CorruptImage),
    ("table_size", dict(table_size=3), CorruptImage),
    ("table_size", dict(table_size=32), CorruptImage),
    ("table_size", dict(table_size=0), CorruptImage),
    ("table_size", dict(cluster_size=64 * M, table_size=1, l1_table_offset=64 * M), UnsupportedImage),
    ("header_size", dict(header_size=0), CorruptImage),
    ("header_size", dict(cluster_size=64 * K, header_size=0x10000, l1_table_offset=64 * K), CorruptImage),
    ("image_size", dict(image_size=M + 1), CorruptImage),
    ("image_size", dict(image_size=(512 * 512 * 4096) + 512), CorruptImage),  # over nelems^2 * cs
    ("l1_table_offset", dict(l1_table_offset=4097), CorruptImage),
    ("l1_table_offset", dict(l1_table_offset=0), CorruptImage),  # inside the header
    ("l1_table_offset", dict(l1_table_offset=1 << 62), CorruptImage),
    ("l1_table_offset", dict(table_size=2, file_size=2 * 4096 + 100), CorruptImage),  # table runs past the end of file
    ("backing_filename_size", dict(features_=1, name_off=64, name_size=0), CorruptImage),
    ("backing_filename_size", dict(features_=1, name_off=64, name_size=5000), CorruptImage),
    ("backing_filename_offset", dict(features_=1, name_off=4090, name_size=10), CorruptImage),
    ("backing_filename_offset", dict(features_=1, name_off=8, name_size=4), CorruptImage),  # over the header
    ("L1 entry 0", dict(l1=(4096,)), CorruptImage),  # points at the L1 table itself
    ("L1 entry 1", dict(l1=(0, 8192 + 1)), CorruptImage),
    ("L1 entry 0", dict(l1=(1 << 40,)), CorruptImage),
    ("overlap", dict(l1=(8192, 8192), extra=b"\0" * 4096), CorruptImage),
    ("too small", dict(file_size=40), CorruptImage),
]


@pytest.mark.parametrize("field,kw,exc", HOSTILE, ids=[f"{h[0]}-{i}" for i, h in enumerate(HOSTILE)])
@pytest.mark.parametrize("readonly", [True, False])
def test_hostile_headers(tmp_path: Path, field: str, kw: dict, exc: type, readonly: bool) -> None:
    path = tmp_path / "bad.qed"
    path.write_bytes(build(**kw))
    tracemalloc.start()
    try:
        with pytest.raises(exc) as e:
            run(opened(path, readonly=readonly, fmt="qed"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)) and field in msg, msg
    assert peak < 4 * M, peak


def test_hostile_duplicate_cluster_refused_on_repair(tmp_path: Path) -> None:
    path = tmp_path / "dup.qed"
    l2 = bytearray(4096)
    struct.pack_into("<2Q", l2, 0, 3 * 4096, 3 * 4096)  # two guest clusters, one host cluster
    path.write_bytes(build(features_=F_NEED_CHECK, l1=(8192,), extra=bytes(l2) + b"\x01" * 4096))
    with pytest.raises(CorruptImage, match="referenced twice"):
        run(opened(path))

    async def readonly_open():  # read-only: served as it is, without the check
        img = await opened(path, readonly=True)
        await img.close()

    run(readonly_open())


def test_hostile_table_entries_fail_requests(tmp_path: Path) -> None:
    """Bad L2 entries fail the request with EINVAL (as QEMU); data never lands on a table."""
    path = tmp_path / "l2.qed"
    l2 = bytearray(4096)
    struct.pack_into("<4Q", l2, 0, 3 * 4096, 5 * 4096, 3 * 4096 + 8, 4096)  # ok, past EOF, unaligned, on L1
    path.write_bytes(build(l1=(8192,), extra=bytes(l2) + b"\x01" * 4096))

    async def go():
        img = await opened(path, fmt="qed")
        try:
            buf = memoryview(bytearray(4096))
            await settled(img.read(0, buf))
            assert bytes(buf) == b"\x01" * 4096
            for k, field in ((1, "L2 entry"), (2, "L2 entry")):
                with pytest.raises(NbdError) as e:
                    await settled(img.read(k * 4096, buf))
                assert e.value.errno == errno.EINVAL and field in str(e.value)
                with pytest.raises(NbdError):
                    await img.runs(k * 4096, 4096)
            with pytest.raises(CorruptImage, match="overlaps the table"):
                await settled(img.write(3 * 4096, memoryview(b"\xff" * 10), fua=False))
            assert path.read_bytes()[4096:4104] == struct.pack("<Q", 8192)  # L1 untouched
        finally:
            await img.close()

    run(go())


def test_probe() -> None:
    assert QedDriver.probe(b"QED\0" + bytes(60), 1 << 20) == 100
    assert QedDriver.probe(b"QFI\xfb" + bytes(60), 1 << 20) == 0


def test_open_errors_are_image_errors(tmp_path: Path) -> None:
    path = tmp_path / "empty.qed"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="too small"):
        run(opened(path, fmt="qed"))
    assert os.path.exists(path)


def test_failed_allocation_leaves_no_leak(tmp_path: Path) -> None:
    """A copy-on-write read that fails gives the new clusters back: no leak, the next write fits."""
    base = make_base(tmp_path, 1 * M, 0x77)
    path = tmp_path / "f.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4k", "-b", base.name, "-F", "raw", path, "1M")
    qemu_io("qed", path, "write -P 1 0 4k")
    size = path.stat().st_size

    async def failing(offset: int, buf: memoryview) -> None:
        raise OSError(errno.EIO, "injected backing read failure")

    async def go():
        img = await opened(path)
        try:
            good = img.driver.read_backing
            img.driver.read_backing = failing
            with pytest.raises(OSError):
                await settled(img.write(64 * K + 100, memoryview(b"\x02" * 100), fua=False))
            assert path.stat().st_size == size and img.driver.file_end == size
            img.driver.read_backing = good
            await settled(img.write(64 * K + 100, memoryview(b"\x02" * 100), fua=False))
        finally:
            await img.close()

    run(go())
    assert path.stat().st_size == size + 4 * K
    check_clean(path)
    expect = bytearray(base.read_bytes())
    expect[: 4 * K] = b"\x01" * (4 * K)
    expect[64 * K + 100 : 64 * K + 200] = b"\x02" * 100
    compare_raw(path, expect, tmp_path)

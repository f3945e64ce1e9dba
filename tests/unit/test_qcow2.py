"""The qcow2 driver against QEMU (the oracle) and against a bytearray model.

* Differential reads: images qemu-img/qemu-io made for every variant (v2/v3, cluster sizes
  512 B..2 MiB, refcount widths 1..64, extended L2, deflate and zstd compressed clusters, lazy
  refcounts, metadata preallocation, internal snapshots, backing chains raw -> qcow2 -> qcow2)
  read through ``open_image`` equal ``qemu-img convert -O raw``; block status equals
  ``qemu-img map`` (data/zero/present, and the depth for chains).
* Writes: hypothesis op sequences (write / zero / zero without holes / trim / flush, unaligned,
  cross-cluster) on an image and on a bytearray model; afterwards ``qemu-img check`` finds no
  errors and no leaks and ``qemu-img compare`` is equal.  Concurrent writers hit the same
  unallocated clusters (per-cluster allocation serialisation).
* Dirty images (lazy refcounts after a crash) are repaired on a read-write open.
* Hostile images, one per item of the qcow2 bad-input checklist (docs/qcow2.md, "Opening"): a
  one-line ``ImageError`` naming the field, bounded memory; or, where QEMU reads the image and
  only writing would be unsafe, read-only service with a warning naming the field.
* Cache budget: many L2 tables through a small cache stay within budget and stay correct.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import os
import random
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserve.cache import ClusterCache
from nbdserve.errors import CorruptImage, ImageError, UnsupportedImage
from nbdserve.formats.base import OpenOptions
from nbdserve.formats.qcow2 import Qcow2Driver
from nbdserve.formats.qcow2.create import create_qcow2
from nbdserve.image import Image, ImageSpec, open_image
from nbdserve.storage.base import settled
from tests.imagetest import FILL, CountingQueue, check_clean, opened, our_map, qemu_map, qemu_raw, run, served_read_only
from tests.imagetest import compare_with_model as _compare_with_model
from tests.imagetest import read_image as read_all
from tests.util import qemu_img, qemu_io
from tests.util import run as run_cmd

compare_with_model = functools.partial(_compare_with_model, fmt="qcow2")

K = 1024
M = 1024 * K
SLOW = os.environ.get("NBDSERVE_SLOW") == "1"


def cluster_size_of(opts: str) -> int:
    for part in opts.split(","):
        if part.startswith("cluster_size="):
            v = part.split("=", 1)[1]
            return int(v[:-1]) * (K if v.endswith("k") else M) if v[-1] in "kM" else int(v)
    return 64 * K


def make_filled(path: Path, opts: str, size: str = "64M") -> Path:
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, path, size)
    cs = cluster_size_of(opts)
    compressed = [] if "preallocation" in opts else [f"write -c -P 0x44 4M {max(cs, 64 * K)}"]
    qemu_io("qcow2", path, *FILL, *compressed)  # QEMU compresses only into unallocated clusters
    return path


# -- maps -------------------------------------------------------------------------------------


# -- differential reads -----------------------------------------------------------------------

VARIANTS = [
    "compat=0.10",
    "compat=1.1",
    "cluster_size=512",
    "cluster_size=4k",
    "cluster_size=64k",
    "cluster_size=2M",
    "refcount_bits=1",
    "refcount_bits=2",
    "refcount_bits=4",
    "refcount_bits=8",
    "refcount_bits=32",
    "refcount_bits=64",
    "extended_l2=on,cluster_size=64k",
    "extended_l2=on,cluster_size=16k",
    "compression_type=zstd",
    "lazy_refcounts=on",
    "preallocation=metadata",
]


@pytest.mark.parametrize("opts", VARIANTS)
def test_read_matches_qemu(tmp_path, opts):
    img_path = make_filled(tmp_path / "t.qcow2", opts)
    expected = qemu_raw(img_path, tmp_path)

    async def main():
        img = await opened(img_path, readonly=True)
        try:
            assert img.format == "qcow2" and img.size == 64 * M
            assert await read_all(img) == expected
            assert await our_map(img) == qemu_map(img_path)
        finally:
            await img.close()

    run(main())


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_all_compressed_image(tmp_path, ctype):
    src = tmp_path / "src.raw"
    qemu_img("create", "-q", "-f", "raw", src, "8M")
    rnd = random.Random(7)
    with open(src, "r+b") as f:
        for i in range(0, 8 * M, 192 * K):  # compressible text with some random bytes
            f.seek(i)
            f.write((b"qcow2 compressed cluster %d " % i) * 500 + rnd.randbytes(300))
    out = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={ctype}", src, out)

    async def main():
        img = await opened(out, readonly=True)
        try:
            assert await read_all(img) == src.read_bytes()
            assert await our_map(img) == qemu_map(out)
            # Unaligned small reads across compressed cluster boundaries.
            for off in (65536 - 7, 3 * 65536 + 100, 8 * M - 5):
                buf = bytearray(min(4096, 8 * M - off))
                await settled(img.read(off, memoryview(buf)))
                assert buf == src.read_bytes()[off : off + len(buf)]
        finally:
            await img.close()

    run(main())


def test_internal_snapshots_listed_and_served(tmp_path):
    p = make_filled(tmp_path / "s.qcow2", "compat=1.1")
    qemu_img("snapshot", "-c", "s1", p)
    qemu_io("qcow2", p, "write -P 0x55 0 4k", "write -P 0x66 3M 64k", "write -z 20M 512")
    qemu_img("snapshot", "-c", "second", p)
    qemu_io("qcow2", p, "write -P 0x77 5M 64k")
    active = qemu_raw(p, tmp_path)
    snap1 = qemu_raw(p, tmp_path, "-l", "snapshot.name=s1")
    snap2 = qemu_raw(p, tmp_path, "-l", "snapshot.id=2")

    async def main():
        img = await opened(p, readonly=True)
        try:
            assert [(s.id, s.name) for s in img.driver.snapshots] == [("1", "s1"), ("2", "second")]
            assert await read_all(img) == active
        finally:
            await img.close()
        for key, expected in (("s1", snap1), ("2", snap2), ("second", snap2)):
            img = await opened(p, options=OpenOptions(snapshot=key))
            try:
                assert img.readonly
                assert await read_all(img) == expected
            finally:
                await img.close()
        with pytest.raises(UnsupportedImage, match="no internal snapshot 'nope'"):
            await opened(p, options=OpenOptions(snapshot="nope"))

    run(main())


def test_backing_chain_raw_qcow2_qcow2(tmp_path):
    base = tmp_path / "base.raw"
    qemu_img("create", "-q", "-f", "raw", base, "64M")
    qemu_io("raw", base, "write -P 0x01 0 2M", "write -P 0x02 40M 3M")
    mid = tmp_path / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "64M")
    qemu_io("qcow2", mid, "write -P 0x03 512k 64k", "write -z 1M 128k", "write -P 0x04 41M 100k")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "mid.qcow2", "-F", "qcow2", top, "64M")
    qemu_io("qcow2", top, *FILL)
    expected = qemu_raw(top, tmp_path)

    async def main():
        img = await opened(top)
        try:
            assert [i.format for i in img.chain()] == ["qcow2", "qcow2", "raw"]
            assert await read_all(img) == expected
            assert await our_map(img, depth=True) == qemu_map(top, depth=True)
            # Copy-on-write from two levels down into a partial cluster of the top image.
            await settled(img.write(41 * M + 50, memoryview(b"\xee" * 10), fua=False))
            await settled(img.write(40 * M + 4095, memoryview(b"\xdd" * 2), fua=False))
            await img.flush()
        finally:
            await img.close()
        ref = bytearray(expected)
        ref[41 * M + 50 : 41 * M + 60] = b"\xee" * 10
        ref[40 * M + 4095 : 40 * M + 4097] = b"\xdd" * 2
        assert qemu_raw(top, tmp_path) == ref
        check_clean(top)

    run(main())


def test_backing_file_name_and_format_reported(tmp_path):
    base = tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    top = tmp_path / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", top, "1M")

    async def main():
        img = await opened(top, readonly=True)
        try:
            assert img.driver.backing.name == "b.qcow2" and img.driver.backing.format == "qcow2"
        finally:
            await img.close()

    run(main())


# -- writes -----------------------------------------------------------------------------------


SIZE = 4 * M
op_st = st.tuples(
    st.sampled_from(["write", "write", "write", "zero", "zero_nohole", "trim", "flush"]),
    st.integers(0, SIZE - 1),
    st.integers(1, 200 * K),
    st.integers(1, 255),
)

WRITE_VARIANTS = {
    "v3": ("compat=1.1", False),
    "v2": ("compat=0.10", False),
    "512-refcount64": ("cluster_size=512,refcount_bits=64", False),
    "refcount1-4k": ("refcount_bits=1,cluster_size=4k", False),
    "extl2": ("extended_l2=on,cluster_size=32k", False),
    "backing": ("compat=1.1,cluster_size=4k", True),
    "v2-backing": ("compat=0.10,cluster_size=4k", True),
    "extl2-backing": ("extended_l2=on,cluster_size=16k", True),
}


def make_write_image(tmp: Path, opts: str, with_backing: bool) -> tuple[Path, bytearray]:
    """A prefilled image (data, zero and compressed clusters, a snapshot) and its contents."""
    path = tmp / "w.qcow2"
    if path.exists():
        path.unlink()
    backing: Path | None = None
    args = ["create", "-q", "-f", "qcow2", "-o", opts]
    if with_backing:
        backing = tmp / "wb.raw"
        if not backing.exists():
            qemu_img("create", "-q", "-f", "raw", backing, str(SIZE))
            qemu_io("raw", backing, "write -P 0x5b 0 1M", "write -P 0x6c 2500k 700k")
        args += ["-b", "wb.raw", "-F", "raw"]
    qemu_img(*args, path, str(SIZE))
    cs = cluster_size_of(opts)
    qemu_io("qcow2", path, "write -P 0xab 64k 64k", "write -z 1M 128k", f"write -c -P 0x44 2M {max(cs, 64 * K)}")
    if "refcount_bits=1" not in opts:  # 1-bit refcounts cannot share clusters
        qemu_img("snapshot", "-c", "snap", path)
        qemu_io("qcow2", path, "write -P 0x99 3M 8k")
    model = bytearray(qemu_raw(path, tmp))
    return path, model


async def apply_ops(img: Image, model: bytearray, ops, *, v2_backing: bool, backing: bytes | None) -> None:
    cs = img.driver.cs
    for kind, off, length, byte in ops:
        length = min(length, img.size - off)
        if kind == "write":
            data = bytes([byte]) * length
            await settled(img.write(off, memoryview(data), fua=byte % 7 == 0))
            model[off : off + length] = data
        elif kind in ("zero", "zero_nohole"):
            await img.write_zeroes(off, length, may_trim=kind == "zero", fast=False, fua=False)
            model[off : off + length] = bytes(length)
        elif kind == "trim":
            await img.trim(off, length, fua=False)
            start = -(-off // cs) * cs
            end = off + length if off + length == img.size else (off + length) // cs * cs
            if end > start:
                # v3: trimmed clusters read as zeroes; v2 drops them (the backing shows through).
                model[start:end] = backing[start:end] if v2_backing else bytes(end - start)
        else:
            await img.flush()


@pytest.mark.parametrize("variant", sorted(WRITE_VARIANTS))
def test_writes_against_model(tmp_path, variant):
    opts, with_backing = WRITE_VARIANTS[variant]

    @settings(max_examples=60 if SLOW else 6, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ops=st.lists(op_st, min_size=1, max_size=25))
    def check(ops):
        path, model = make_write_image(tmp_path, opts, with_backing)
        backing = (tmp_path / "wb.raw").read_bytes() if with_backing else None

        async def main():
            img = await opened(path)
            try:
                await apply_ops(img, model, ops, v2_backing=with_backing and "0.10" in opts, backing=backing)
                assert await read_all(img) == model
            finally:
                await img.close()

        run(main())
        check_clean(path)
        compare_with_model(path, model, tmp_path)

    check()


def test_write_zero_semantics_match_qemu_nbd(tmp_path):
    """WRITE_ZEROES deallocates (ZERO_PLAIN) unless NO_HOLE; partial zeroing of an unallocated
    cluster makes the whole cluster a zero cluster; TRIM leaves zero clusters (docs/qcow2.md,
    "Zeroing and trimming")."""
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    for p in (ours, theirs):
        qemu_img("create", "-q", "-f", "qcow2", p, "8M")
        qemu_io("qcow2", p, "write -P 1 0 1M")
    qemu_io(
        "qcow2",
        theirs,
        "write -z -u 0 128k",
        "write -z 256k 128k",
        "write -z -u 2M 4k",
        "discard 512k 64k",
        "write -z -u 4M 64k",
    )

    async def main():
        img = await opened(ours)
        try:
            await img.write_zeroes(0, 128 * K, may_trim=True, fast=False, fua=False)
            await img.write_zeroes(256 * K, 128 * K, may_trim=False, fast=False, fua=False)
            await img.write_zeroes(2 * M, 4 * K, may_trim=True, fast=False, fua=False)
            await img.trim(512 * K, 64 * K, fua=False)
            await img.write_zeroes(4 * M, 64 * K, may_trim=True, fast=True, fua=False)
        finally:
            await img.close()

    run(main())
    assert qemu_map(ours) == qemu_map(theirs)
    check_clean(ours)
    compare_with_model(ours, qemu_raw(theirs, tmp_path), tmp_path)


def test_concurrent_writers_share_cluster_allocations(tmp_path):
    """Writers to disjoint bytes of the same unallocated clusters, interleaved at every backing
    read: each cluster is allocated once, nothing is lost, nothing leaks."""
    base = tmp_path / "b.raw"
    qemu_img("create", "-q", "-f", "raw", base, "4M")
    qemu_io("raw", base, "write -P 0x3c 0 4M")
    path = tmp_path / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "b.raw", "-F", "raw", path, "4M")
    model = bytearray(base.read_bytes())

    async def main():
        img = await opened(path)
        drv = img.driver
        real = drv.read_backing

        async def yielding_backing(off, buf):  # the real backing read, after a yield
            await asyncio.sleep(0)
            await settled(real(off, buf))

        drv.read_backing = yielding_backing
        drv._inflight_q = queue = CountingQueue()
        rnd = random.Random(3)

        async def stream(slot: int) -> None:
            # Stream ``slot`` owns bytes [slot*512, slot*512+512) of every 4 KiB cluster, and
            # sometimes writes a run of clusters at once.
            for _ in range(40):
                c = rnd.randrange(0, 1024 - 4)
                n = rnd.choice([1, 1, 3])
                for k in range(n):
                    off = (c + k) * 4096 + slot * 512
                    data = bytes([slot + 1]) * 512
                    await settled(img.write(off, memoryview(data), fua=False))
                    model[off : off + 512] = data

        try:
            await asyncio.gather(*(stream(s) for s in range(8)))
            await img.flush()
            assert await read_all(img) == model
        finally:
            await img.close()
        assert queue.waits > 0  # some writer really found its cluster in flight

    run(main())
    check_clean(path)
    compare_with_model(path, model, tmp_path)


@settings(max_examples=40 if SLOW else 5, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    streams=st.lists(
        st.lists(st.tuples(st.integers(0, 255 * 1024), st.integers(1, 20 * K), st.booleans()), min_size=1, max_size=8),
        min_size=2,
        max_size=5,
    )
)
def test_concurrent_overlapping_writers(tmp_path_factory, streams):
    """Streams writing overlapping ranges at once (yielding at every backing read): afterwards
    every byte holds a value some operation wrote there (or the backing data if none did), and
    the image is consistent (a double allocation would lose a cluster or leak one)."""
    tmp = tmp_path_factory.mktemp("overlap")
    base = tmp / "b.raw"
    qemu_img("create", "-q", "-f", "raw", base, "256K")
    qemu_io("raw", base, "write -P 0xfe 0 256K")
    path = tmp / "o.qcow2"
    opts = "cluster_size=4k" if len(streams) % 2 else "extended_l2=on,cluster_size=16k"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", "b.raw", "-F", "raw", path, "256K")
    size = 256 * K
    ops = []
    value = 1
    for s_ops in streams:
        mine = []
        for off, n, zero in s_ops:
            n = min(n, size - off)
            mine.append((off, n, 0 if zero else value))
            value = value % 250 + 1
        ops.append(mine)

    async def main():
        img = await opened(path)
        real = img.driver.read_backing

        async def yielding_backing(off, buf):  # the real backing read, after a yield
            await asyncio.sleep(0)
            await settled(real(off, buf))

        img.driver.read_backing = yielding_backing

        async def stream(mine):
            for off, n, v in mine:
                await asyncio.sleep(0)
                if v == 0:
                    await img.write_zeroes(off, n, may_trim=True, fast=False, fua=False)
                else:
                    await settled(img.write(off, memoryview(bytes([v]) * n), fua=False))

        try:
            await asyncio.gather(*(stream(m) for m in ops))
            return await read_all(img)
        finally:
            await img.close()

    got = run(main())
    flat = [op for mine in ops for op in mine]
    cuts = sorted({0, size} | {off for off, _, _ in flat} | {off + n for off, n, _ in flat})
    for lo, hi in itertools.pairwise(cuts):
        allowed = {v for off, n, v in flat if off <= lo and hi <= off + n} or {0xFE}
        assert set(got[lo:hi]) <= allowed, (lo, hi, set(got[lo:hi]), allowed)
    check_clean(path)
    compare_with_model(path, got, tmp)


def test_concurrent_mixed_ops(tmp_path):
    path = tmp_path / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "4M")
    model = bytearray(4 * M)

    async def main():
        img = await opened(path, cache=ClusterCache(32 * K))
        rnd = random.Random(11)

        async def stream(slot: int) -> None:
            # Each stream owns a disjoint 512 KiB region but shares L2 tables and refcount blocks.
            base = slot * 512 * K
            for _i in range(60):
                off = base + rnd.randrange(0, 500 * K)
                n = rnd.randrange(1, 12 * K)
                op = rnd.random()
                if op < 0.6:
                    data = rnd.randbytes(n)
                    await settled(img.write(off, memoryview(data), fua=False))
                    model[off : off + n] = data
                elif op < 0.9:
                    await img.write_zeroes(off, n, may_trim=op < 0.75, fast=False, fua=False)
                    model[off : off + n] = bytes(n)
                else:
                    await img.flush()

        try:
            await asyncio.gather(*(stream(s) for s in range(8)))
            assert await read_all(img) == model
        finally:
            await img.close()

    run(main())
    check_clean(path)
    compare_with_model(path, model, tmp_path)


def test_refcount_table_growth(tmp_path):
    """512-byte clusters with 64-bit refcounts: the refcount table must grow several times."""
    path = tmp_path / "g.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", path, "6M")
    before = struct.unpack_from(">QI", path.read_bytes(), 48)
    data = random.Random(5).randbytes(6 * M)

    async def main():
        img = await opened(path)
        try:
            for pos in range(0, 6 * M, 1 * M):
                await settled(img.write(pos, memoryview(data)[pos : pos + M], fua=False))
        finally:
            await img.close()

    run(main())
    after = struct.unpack_from(">QI", path.read_bytes(), 48)
    assert after[1] > before[1]
    check_clean(path)
    compare_with_model(path, data, tmp_path)


def test_writes_into_compressed_and_snapshot_shared_clusters(tmp_path):
    path = make_filled(tmp_path / "cs.qcow2", "compat=1.1")
    qemu_img("snapshot", "-c", "s1", path)
    model = bytearray(qemu_raw(path, tmp_path))
    snap = qemu_raw(path, tmp_path, "-l", "snapshot.name=s1")

    async def main():
        img = await opened(path)
        try:
            for off, n in ((4 * M + 100, 10), (3 * M + 65530, 20), (100, 4096), (63 * M + 5, 3), (20 * M, 1)):
                data = bytes([0xE1]) * n
                await settled(img.write(off, memoryview(data), fua=False))
                model[off : off + n] = data
            await img.write_zeroes(4 * M, 64 * K, may_trim=True, fast=False, fua=False)
            model[4 * M : 4 * M + 64 * K] = bytes(64 * K)
            assert await read_all(img) == model
        finally:
            await img.close()

    run(main())
    check_clean(path)
    compare_with_model(path, model, tmp_path)
    assert qemu_raw(path, tmp_path, "-l", "snapshot.name=s1") == snap  # the snapshot is untouched


@pytest.mark.parametrize("extra", ["plain", "snapshot", "bitmap"])
def test_dirty_image_is_repaired_on_read_write_open(tmp_path, extra):
    path = tmp_path / "lazy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "64M")
    if extra == "bitmap":  # its clusters are counted in the rebuilt refcounts; it stays in use (a crash)
        qemu_img("bitmap", "--add", path, "b")
    qemu_io("qcow2", path, "write -P 0xab 0 64k", "write -P 0x11 3M 1M", "write -P 0x12 9M 4k")
    if extra == "snapshot":  # shared clusters: refcounts 2, COPIED clear in the active tables
        qemu_img("snapshot", "-c", "s1", path)
        qemu_io("qcow2", path, "write -c -P 0x14 12M 64k", "write -P 0x15 3M 4k")
    p = run_cmd("qemu-io", "-f", "qcow2", "-c", "write -P 0x13 20M 64k", "-c", "abort", path, check=False)
    assert p.returncode != 0
    assert run_cmd("qemu-img", "check", path, check=False).returncode == 2  # refcounts stale
    expected = bytearray(qemu_raw(path, tmp_path))

    async def main():
        img = await opened(path, readonly=True)  # read-only: served as is
        try:
            assert await read_all(img) == expected
        finally:
            await img.close()
        img = await opened(path)
        try:
            await settled(img.write(30 * M, memoryview(b"x" * 70000), fua=True))
            expected[30 * M : 30 * M + 70000] = b"x" * 70000
        finally:
            await img.close()

    run(main())
    check_clean(path)
    compare_with_model(path, expected, tmp_path)
    if extra == "bitmap":
        info = json.loads(qemu_img("info", "--output=json", path).stdout)
        assert info["format-specific"]["data"]["bitmaps"][0]["flags"] == ["in-use", "auto"]


def test_unknown_autoclear_bits_cleared_and_extensions_kept(tmp_path):
    path = tmp_path / "a.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    raw = bytearray(path.read_bytes())
    struct.pack_into(">Q", raw, 88, 1 << 40)
    # An unknown header extension at the end of the list (replacing the end marker).
    pos = 112
    while struct.unpack_from(">I", raw, pos)[0]:
        pos += 8 + ((struct.unpack_from(">I", raw, pos + 4)[0] + 7) & ~7)
    struct.pack_into(">II8s", raw, pos, 0x12345678, 8, b"opaque!!")
    struct.pack_into(">II", raw, pos + 16, 0, 0)
    path.write_bytes(raw)

    async def main():
        img = await opened(path)
        try:
            assert img.driver.header.unknown_extensions == [0x12345678]
            await settled(img.write(0, memoryview(b"y" * 512), fua=True))
        finally:
            await img.close()

    run(main())
    after = path.read_bytes()
    assert struct.unpack_from(">Q", after, 88)[0] == 0
    assert after[pos : pos + 16] == raw[pos : pos + 16]
    check_clean(path)


def test_corrupt_bit_opens_read_only(tmp_path, caplog):
    path = tmp_path / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "1M")
    raw = bytearray(path.read_bytes())
    struct.pack_into(">Q", raw, 72, 2)
    path.write_bytes(raw)

    async def main():
        with caplog.at_level(logging.WARNING, logger="nbdserve.qcow2"):
            img = await opened(path)
        try:
            assert img.readonly
        finally:
            await img.close()

    run(main())
    assert "marked corrupt" in caplog.text


def test_create_and_overlay(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "8M")
    qemu_io("qcow2", base, "write -P 0x21 0 1M")
    before = base.read_bytes()
    mine = tmp_path / "mine.qcow2"
    create_qcow2(str(mine), 3 * M + 512, backing_file="base.qcow2", backing_format="qcow2", cluster_bits=12)
    check_clean(mine)
    info = json.loads(qemu_img("info", "--output=json", mine).stdout)
    assert info["virtual-size"] == 3 * M + 512 and info["backing-filename-format"] == "qcow2"
    assert info["cluster-size"] == 4096

    async def main():
        img = await open_image(ImageSpec(str(base), snapshot_overlay=True), ClusterCache())
        overlay = img.path
        try:
            assert img.format == "qcow2" and img.backing.path == str(base.resolve())
            await settled(img.write(4096, memoryview(b"\x77" * 8192), fua=True))
            data = await read_all(img)
            assert data[:4096] == b"\x21" * 4096 and data[4096:12288] == b"\x77" * 8192
            assert os.path.exists(overlay)
        finally:
            await img.close()
        assert not os.path.exists(overlay)

    run(main())
    assert base.read_bytes() == before


def test_cache_budget_with_many_l2_tables(tmp_path):
    """512-byte clusters: one L2 table per 32 KiB of disk.  A 16-table cache must evict, stay
    within budget (plus the few pinned tables) and keep the data right."""
    path = tmp_path / "many.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "8M")
    budget = 16 * 512
    cache = ClusterCache(budget)
    model = bytearray(8 * M)
    rnd = random.Random(9)

    async def main():
        img = await opened(path, cache=cache)
        try:
            for _ in range(3):
                for span in rnd.sample(range(256), 256):  # 256 L2 tables, visited in random order
                    off = span * 32 * K + rnd.randrange(0, 31 * K)
                    data = rnd.randbytes(rnd.randrange(1, 1500))
                    await settled(img.write(off, memoryview(data), fua=False))
                    model[off : off + len(data)] = data
            assert await read_all(img) == model
        finally:
            await img.close()

    run(main())
    stats = cache.stats()
    assert stats["evictions"] > 100
    assert stats["peak"] <= budget + 4 * 512, stats
    check_clean(path)
    compare_with_model(path, model, tmp_path)


def test_hot_read_does_not_suspend(tmp_path):
    """A 4 KiB read of an allocated cluster whose L2 table is cached completes without yielding."""
    path = make_filled(tmp_path / "h.qcow2", "compat=1.1")

    async def main():
        img = await opened(path, readonly=True)
        try:
            buf = memoryview(bytearray(4096))
            await settled(img.read(3 * M, buf))  # loads the L2 table
            assert img.read(3 * M + 8192, buf) is None  # completed at once: nothing to wait for
            assert bytes(buf) == b"\x11" * 4096
        finally:
            await img.close()

    run(main())


def test_cache_hint_loads_l2_tables(tmp_path):
    path = make_filled(tmp_path / "ch.qcow2", "cluster_size=4k")  # one L2 table per 2 MiB
    cache = ClusterCache()

    async def main():
        img = await opened(path, readonly=True, cache=cache)
        try:
            await img.cache_hint(0, 64 * M)
            loaded = cache.stats()["misses"]
            assert loaded >= 7  # the L2 tables of the seven 2 MiB spans the fill script touched
            await read_all(img)
            assert cache.stats()["misses"] == loaded  # every table was already there
        finally:
            await img.close()

    run(main())


# -- hostile images ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> bytes:
    """A small v3 image with data, a zero cluster, a compressed cluster and a snapshot."""
    d = tmp_path_factory.mktemp("hostile")
    p = d / "p.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "4M")
    qemu_io("qcow2", p, "write -P 1 0 64k", "write -z 64k 64k", "write -c -P 2 128k 64k")
    qemu_img("snapshot", "-c", "s", p)
    return p.read_bytes()


def fields(raw: bytes) -> dict[str, int]:
    names = (
        "l1_size",
        "l1_table_offset",
        "refcount_table_offset",
        "refcount_table_clusters",
        "nb_snapshots",
        "snapshots_offset",
    )
    vals = struct.unpack_from(">IQQIIQ", raw, 36)
    return dict(zip(names, vals, strict=True))


def l2_offset(raw: bytes) -> int:
    l1 = fields(raw)["l1_table_offset"]
    return struct.unpack_from(">Q", raw, l1)[0] & 0x00FFFFFFFFFFFE00


def open_error(tmp_path: Path, raw: bytes | bytearray, *, read: bool = False, write: bool = False) -> ImageError:
    path = tmp_path / "h.qcow2"
    path.write_bytes(bytes(raw))

    async def main():
        img = await open_image(ImageSpec(str(path), format="qcow2", readonly=not write), ClusterCache(1 << 20))
        try:
            if read:
                await read_all(img)
            if write:
                await settled(img.write(0, memoryview(b"z" * 512), fua=False))
                await settled(img.write(128 * K, memoryview(b"z" * 512), fua=False))
        finally:
            await img.close()

    with pytest.raises(ImageError) as info:
        run(main())
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path))
    return info.value


def patched(raw: bytes, fmt: str, offset: int, *values) -> bytearray:
    out = bytearray(raw)
    struct.pack_into(fmt, out, offset, *values)
    return out


HEADER_CASES = [
    ("magic", ">4s", 0, (b"QFI\x00",), "bad magic"),
    ("version", ">I", 4, (4,), "version 4"),
    ("cluster_bits low", ">I", 20, (8,), "cluster_bits 8"),
    ("cluster_bits high", ">I", 20, (22,), "cluster_bits 22"),
    ("header_length short", ">I", 100, (96,), "header_length 96"),
    ("header_length odd", ">I", 100, (108,), "header_length 108"),
    ("header_length big", ">I", 100, (1 << 17,), "larger than the cluster size"),
    ("refcount_order", ">I", 96, (7,), "refcount_order 7"),
    ("refcount_table_clusters 0", ">I", 56, (0,), "refcount_table_clusters is 0"),
    ("refcount_table_clusters big", ">I", 56, (1 << 20,), "refcount_table_clusters"),
    ("unknown incompatible", ">Q", 72, (1 << 5,), "incompatible_features"),
    ("compression bit without type", ">Q", 72, (1 << 3,), "compression_type"),
    ("compression type 2", ">B", 104, (2,), "compression_type 2"),
    ("compression type without bit", ">B", 104, (1,), "compression_type"),
    ("external data file", ">Q", 72, (1 << 2,), "external data file"),
    ("data_file_raw", ">Q", 88, (2,), "data_file_raw"),
    ("encryption method", ">I", 32, (3,), "crypt_method 3"),
    ("luks without header", ">I", 32, (2,), "without the full-disk encryption header extension"),
    ("aes without key", ">I", 32, (1,), "needs its passphrase"),
    ("l1_size too small", ">I", 36, (0,), "l1_size 0 too small"),
    ("l1_size huge", ">I", 36, (1 << 31,), "l1_size"),
    ("l1 unaligned", ">Q", 40, (0x30200,), "l1_table_offset"),
    ("reftable unaligned", ">Q", 48, (0x10100,), "refcount_table_offset"),
    ("backing_file_offset", ">QI", 8, (1 << 20, 4), "backing_file_offset"),
    ("backing_file_size", ">QI", 8, (512, 2000), "backing_file_size"),
    ("nb_snapshots", ">I", 60, (70000,), "nb_snapshots"),
    ("snapshots_offset", ">Q", 64, (0x10001,), "snapshots_offset"),
    ("size", ">Q", 24, (1 << 63,), "size"),
]


@pytest.mark.parametrize("case", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_hostile_header(tmp_path, pristine, case):
    _, fmt, off, values, needle = case
    err = open_error(tmp_path, patched(pristine, fmt, off, *values))
    assert needle in str(err)


def test_hostile_extended_l2_small_clusters(tmp_path):
    p = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", p, "1M")
    err = open_error(tmp_path, patched(p.read_bytes(), ">Q", 72, 1 << 4))
    assert "extended_l2" in str(err)


def ext_image(tmp_path: Path, ext_type: int, payload: bytes, *, length: int | None = None) -> bytearray:
    p = tmp_path / "e.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    raw = bytearray(p.read_bytes())
    struct.pack_into(">II", raw, 112, ext_type, len(payload) if length is None else length)
    raw[120 : 120 + len(payload)] = payload
    end = 120 + ((len(payload) + 7) & ~7)
    raw[end : end + 8] = bytes(8)
    return raw


@pytest.mark.parametrize(
    ("ext_type", "payload", "length", "needle"),
    [
        (0xE2792ACA, b"q" * 16, None, "backing format extension too long"),
        (0x23852875, bytes(23), None, "bitmaps extension length 23"),
        (0x23852875, struct.pack(">IIQQ", 0, 0, 0, 0x10000), None, "bitmaps extension invalid"),
        (0x0537BE77, bytes(16), None, "encryption header extension"),
        (0x44415441, b"data.raw", None, "external data file"),
        (0x12345678, b"x", 1 << 20, "runs past the extension area"),
    ],
)
def test_hostile_header_extensions(tmp_path, ext_type, payload, length, needle):
    err = open_error(tmp_path, ext_image(tmp_path, ext_type, payload, length=length))
    assert needle in str(err)


def test_hostile_l1_entry_reserved_bits(tmp_path, pristine):
    raw = bytearray(pristine)
    l1 = fields(raw)["l1_table_offset"]
    struct.pack_into(">Q", raw, l1, struct.unpack_from(">Q", raw, l1)[0] | 1)
    err = open_error(tmp_path, raw)
    assert "L1 table entry 0" in str(err)


@pytest.mark.parametrize(
    ("field", "offset", "value"),
    [("l1_table_offset", 40, 1 << 40), ("refcount_table_offset", 48, 1 << 40)],
)
def test_table_past_eof_is_served_read_only(tmp_path, pristine, caplog, field, offset, value):
    """QEMU reads such images (the part past the end reads as zeroes); so do we, read-only."""
    assert field in served_read_only(tmp_path, patched(pristine, ">Q", offset, value), caplog)


def test_hostile_reftable_entry(tmp_path, pristine, caplog):
    """Refcounts matter only for writing: a bad refcount table entry means read-only."""
    raw = bytearray(pristine)
    rt = fields(raw)["refcount_table_offset"]
    struct.pack_into(">Q", raw, rt, 0x20001)
    assert "refcount table entry 0" in served_read_only(tmp_path, raw, caplog)
    struct.pack_into(">Q", raw, rt, 1 << 45)
    assert "beyond end of file" in served_read_only(tmp_path, raw, caplog)


@pytest.mark.parametrize(
    ("entry_fn", "needle"),
    [
        (lambda e: e | 2, "reserved bits"),
        (lambda e: (e & ~0x00FFFFFFFFFFFE00) | 0x30200, "unaligned host offset"),
        (lambda e: 0x8000000000000000 | (1 << 50), "beyond end of file"),
    ],
)
def test_hostile_l2_entries(tmp_path, pristine, entry_fn, needle):
    raw = bytearray(pristine)
    l2 = l2_offset(raw)
    struct.pack_into(">Q", raw, l2, entry_fn(struct.unpack_from(">Q", raw, l2)[0]))
    err = open_error(tmp_path, raw, read=True)
    assert isinstance(err, CorruptImage) and needle in str(err)


def test_hostile_zero_flag_in_v2(tmp_path):
    p = tmp_path / "v2.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", p, "1M")
    qemu_io("qcow2", p, "write -P 1 0 64k")
    raw = bytearray(p.read_bytes())
    l2 = l2_offset(raw)
    struct.pack_into(">Q", raw, l2, struct.unpack_from(">Q", raw, l2)[0] | 1)
    assert "zero cluster entry in a version 2 image" in str(open_error(tmp_path, raw, read=True))


def test_hostile_compressed_entries(tmp_path, pristine):
    raw = bytearray(pristine)
    l2 = l2_offset(raw)
    e = struct.unpack_from(">Q", raw, l2 + 16)[0]
    assert e & (1 << 62)
    x = 62 - (16 - 8)
    host = e & ((1 << x) - 1)
    # Host range past the end of the file.
    past = bytearray(raw)
    struct.pack_into(">Q", past, l2 + 16, (e & ~((1 << x) - 1)) | (len(raw) + 4096))
    assert "outside the file" in str(open_error(tmp_path, past, read=True))
    # Garbage instead of a deflate stream.
    garbage = bytearray(raw)
    garbage[host : host + 64] = b"\xff" * 64
    assert "compressed cluster" in str(open_error(tmp_path, garbage, read=True))
    # A valid stream that is too short: the descriptor names fewer sectors than the data needs
    # is fine for QEMU, but decompressing to less than a cluster is corruption.
    import zlib

    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    short = c.compress(b"a" * 1000) + c.flush()
    small = bytearray(raw)
    small[host : host + len(short)] = short
    assert "decompresses to 1000 bytes" in str(open_error(tmp_path, small, read=True))


def test_hostile_extended_l2_bitmaps(tmp_path):
    p = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", p, "1M")
    qemu_io("qcow2", p, "write -P 1 0 4k")
    raw = bytearray(p.read_bytes())
    l2 = l2_offset(raw)
    both = patched(raw, ">Q", l2 + 8, 0x1_00000001)
    assert "both allocated and zero" in str(open_error(tmp_path, both, read=True))
    nohost = patched(patched(raw, ">Q", l2, 0), ">Q", l2 + 8, 1)
    assert "no host cluster" in str(open_error(tmp_path, nohost, read=True))


def test_hostile_snapshot_table(tmp_path, pristine):
    raw = bytes(pristine)
    so = fields(raw)["snapshots_offset"]
    assert "extra_size 2000 too large" in str(open_error(tmp_path, patched(raw, ">I", so + 36, 2000)))
    assert "extra_size 8 too small" in str(open_error(tmp_path, patched(raw, ">I", so + 36, 8)))
    assert "not cluster aligned" in str(open_error(tmp_path, patched(raw, ">Q", so, 0x10008)))
    assert "l1_size" in str(open_error(tmp_path, patched(raw, ">I", so + 8, 1 << 30)))
    assert "id or name extends" in str(open_error(tmp_path, patched(raw, ">H", so + 14, 0xFFFF)))
    # The snapshot table runs past the end of the file.
    two = patched(raw, ">I", 60, 2)
    cut = two[: so + 200] if so + 200 < len(two) else two
    err = open_error(tmp_path, patched(cut, ">I", 60, 60000))
    assert "snapshot table entry" in str(err)


def test_hostile_refcount_underflow(tmp_path, caplog):
    """A data cluster whose refcount is 0 (its reference would be dropped below zero, and the
    cluster handed out again): found at open, served read-only."""
    p = tmp_path / "u.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    qemu_io("qcow2", p, "write -P 1 0 64k")
    raw = bytearray(p.read_bytes())
    rb = struct.unpack_from(">Q", raw, fields(raw)["refcount_table_offset"])[0]
    data_host = struct.unpack_from(">Q", raw, l2_offset(raw))[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">H", raw, rb + 2 * (data_host >> 16), 0)
    text = served_read_only(tmp_path, raw, caplog)
    assert f"cluster 0x{data_host:x} has refcount 0 but 1 reference(s)" in text


def test_hostile_refcount_overflow(tmp_path, caplog):
    """1-bit refcounts, two L2 entries sharing one data cluster: the count (2) does not fit,
    which no rebuild can fix: read-only, even when the image is dirty."""
    p = tmp_path / "ov.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", p, "1M")
    qemu_io("qcow2", p, "write -P 1 0 64k")
    raw = bytearray(p.read_bytes())
    l2 = l2_offset(raw)
    struct.pack_into(">Q", raw, l2 + 8, struct.unpack_from(">Q", raw, l2)[0])  # cluster 1 -> same host
    struct.pack_into(">Q", raw, 72, 1)  # dirty
    assert "more than refcount_bits allow" in served_read_only(tmp_path, raw, caplog)


def test_hostile_data_cluster_on_metadata_is_served_read_only(tmp_path, caplog):
    p = tmp_path / "o.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    qemu_io("qcow2", p, "write -P 1 0 64k")
    raw = bytearray(p.read_bytes())
    l1 = fields(raw)["l1_table_offset"]
    struct.pack_into(">Q", raw, l2_offset(raw), 0x8000000000000000 | l1)  # data "at" the L1 table
    assert "data cluster at 0x30000 overlaps metadata" in served_read_only(tmp_path, raw, caplog)


def test_hostile_l2_table_on_the_refcount_table_is_served_read_only(tmp_path, caplog):
    p = tmp_path / "l2rt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", p, "1M")
    raw = bytearray(p.read_bytes())
    f = fields(raw)
    struct.pack_into(">Q", raw, f["l1_table_offset"], 0x8000000000000000 | f["refcount_table_offset"])
    assert "L2 table at 0x10000 overlaps other metadata" in served_read_only(tmp_path, raw, caplog)


def test_hostile_l1_size_does_not_allocate(tmp_path, pristine):
    raw = patched(pristine, ">I", 36, (1 << 31) - 1)
    tracemalloc.start()
    try:
        err = open_error(tmp_path, raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "l1_size" in str(err)
    assert peak < 4 * M


def test_probe_and_driver_registered(tmp_path, pristine):
    assert Qcow2Driver.probe(pristine[:512], len(pristine)) == 100
    assert Qcow2Driver.probe(b"QFI\x00" + bytes(508), 512) == 0
    p = tmp_path / "probe.qcow2"
    p.write_bytes(pristine)

    async def main():
        img = await opened(p, readonly=True)
        try:
            assert img.format == "qcow2"
        finally:
            await img.close()

    run(main())


def test_truncated_image_is_refused(tmp_path, pristine):
    err = open_error(tmp_path, pristine[:100])
    assert "truncated" in str(err) or "bad magic" in str(err)


@pytest.mark.parametrize("opts", VARIANTS)
def test_consistent_images_open_read_write_quietly(tmp_path, opts, caplog):
    """The open-time check finds nothing in images QEMU made (no false alarm turns a good image
    read-only), with an internal snapshot and a bitmap where the variant allows them."""
    path = make_filled(tmp_path / "q.qcow2", opts)
    if "refcount_bits=1" not in opts:
        qemu_img("snapshot", "-c", "s", path)
    if "compat=0.10" not in opts:
        qemu_img("bitmap", "--add", path, "b")
    expected = qemu_raw(path, tmp_path)

    async def main():
        with caplog.at_level(logging.WARNING, logger="nbdserve.qcow2"):
            img = await opened(path)
        try:
            assert not img.readonly
            await settled(img.write(7 * M + 3, memoryview(b"\x42" * 9), fua=False))
        finally:
            await img.close()

    run(main())
    assert caplog.text == ""
    expected = bytearray(expected)
    expected[7 * M + 3 : 7 * M + 12] = b"\x42" * 9
    check_clean(path)
    compare_with_model(path, expected, tmp_path)


def test_hostile_tables_named_many_times_are_read_once_at_most(tmp_path, caplog):
    """Every refcount table entry naming the same block: the open-time check stops once the
    tables add up to more than the file holds, instead of reading without bound."""
    p = tmp_path / "many.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", p, "1M")
    raw = bytearray(p.read_bytes())
    rt = fields(raw)["refcount_table_offset"]
    block = struct.unpack_from(">Q", raw, rt)[0]
    struct.pack_into(">512Q", raw, rt, *([block] * 512))
    assert "more than the file holds" in served_read_only(tmp_path, raw, caplog)

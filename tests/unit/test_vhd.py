"""VHD ("vpc") driver tests: QEMU as the oracle where QEMU can judge, our own generator elsewhere.

* differential against qemu-img for every variant QEMU makes (bytes, size, allocation);
* random write/zero/trim/flush sequences (also concurrent) against a bytearray model, then
  ``qemu-img compare`` and the structural verifier of ``tests/vhdgen.py``;
* differencing chains, partial sector bitmaps and odd block sizes from ``tests/vhdgen.py``;
* crash safety at every write and sync of block allocation (fault injection in the file layer);
* hostile images: one-line ImageError naming the field, bounded memory.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import shutil
import struct
import tracemalloc
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserve.cache import ClusterCache
from nbdserve.errors import ImageError
from nbdserve.formats import probe
from nbdserve.formats.base import OpenOptions
from nbdserve.formats.vhd import VhdDriver, bit_run, set_bits
from nbdserve.image import Image
from nbdserve.storage.base import settled
from nbdserve.storage.local import LocalFile
from tests import vhdgen
from tests.conftest import SLOW
from tests.imagetest import FILL, opened, read_image, run
from tests.imagetest import qemu_raw as _qemu_raw
from tests.util import qemu_img, qemu_io

qemu_raw = functools.partial(_qemu_raw, fmt="vpc")

MiB = 1 << 20


async def _open(path, *, fmt="vpc", readonly=True, vpc_size="auto", cache=None) -> Image:
    return await opened(path, fmt=fmt, readonly=readonly, cache=cache, options=OpenOptions(vpc_size=vpc_size))


async def _read_all(path, **kw) -> bytes:
    img = await _open(path, **kw)
    try:
        return await read_image(img, step=8 * MiB)
    finally:
        await img.close()


def read_all(path, **kw) -> bytes:
    return run(_read_all(path, **kw))


def qemu_size(path) -> int:
    return json.loads(qemu_img("info", "--output=json", "-f", "vpc", path).stdout)["virtual-size"]


def data_ranges_qemu(path) -> list[tuple[int, int, bool]]:
    """qemu-img map as merged (start, length, data) runs."""
    out: list[tuple[int, int, bool]] = []
    for e in json.loads(qemu_img("map", "--output=json", "-f", "vpc", path).stdout):
        _append(out, e["start"], e["length"], e["data"])
    return out


def _append(out, start, length, data):
    if out and out[-1][2] == data and out[-1][0] + out[-1][1] == start:
        out[-1] = (out[-1][0], out[-1][1] + length, data)
    else:
        out.append((start, length, data))


async def _data_ranges_ours(path) -> list[tuple[int, int, bool]]:
    img = await _open(path)
    try:
        out: list[tuple[int, int, bool]] = []
        pos = 0
        for r in await img.runs(0, img.size):
            _append(out, pos, r.length, not (r.flags & 1))
            pos += r.length
        return out
    finally:
        await img.close()


# -- differential against QEMU --------------------------------------------------------------

VARIANTS = {
    "dynamic": ["-f", "vpc"],
    "fixed": ["-f", "vpc", "-o", "subformat=fixed"],
    "force_size": ["-f", "vpc", "-o", "force_size=on"],
}


@pytest.fixture(scope="module")
def qemu_images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vhd_qemu")
    out = {}
    for name, opts in VARIANTS.items():
        p = d / f"{name}.vhd"
        qemu_img("create", "-q", *opts, p, "64M")
        qemu_io("vpc", p, *FILL)
        out[name] = p
    golden = d / "golden.raw"
    qemu_img("create", "-q", "-f", "raw", golden, "64M")
    qemu_io("raw", golden, *FILL)
    conv = d / "converted.vhd"
    qemu_img("convert", "-f", "raw", "-O", "vpc", golden, conv)
    out["converted"] = conv
    return out


@pytest.mark.parametrize("variant", [*VARIANTS, "converted"])
def test_differential_vs_qemu(qemu_images, variant, tmp_path):
    path = qemu_images[variant]
    ours = read_all(path)
    assert len(ours) == qemu_size(path)
    assert ours == qemu_raw(path, tmp_path)
    if variant != "fixed":
        assert run(_data_ranges_ours(path)) == data_ranges_qemu(path)


def test_fixed_is_not_probed_but_dynamic_is(qemu_images):
    fixed = qemu_images["fixed"].read_bytes()[:512]
    dynamic = qemu_images["dynamic"].read_bytes()[:512]
    assert VhdDriver.probe(fixed, 0) == 0
    assert probe(dynamic, 0, "d.vhd", raw_fallback=False) is VhdDriver


def test_size_rules(qemu_images):
    # qemu (CHS-rounded 67125248): CHS and current agree by construction; force_size 'qem2': CHS max.
    dyn, forced = qemu_images["dynamic"], qemu_images["force_size"]
    assert run(_size(dyn, "auto")) == 67125248
    assert run(_size(forced, "auto")) == 64 * MiB
    assert run(_size(forced, "chs")) == 64 * MiB  # CHS max geometry: current_size regardless


async def _size(path, rule) -> int:
    img = await _open(path, vpc_size=rule)
    await img.close()
    return img.size


def test_size_rule_creator_app(tmp_path):
    # A Virtual PC image whose current_size exceeds its CHS size: auto and chs use CHS.
    spec = vhdgen.Spec(size=10 * MiB, creator_app=b"vpc ", geometry=(300, 4, 17))
    p = tmp_path / "vpc.vhd"
    vhdgen.write(p, spec)
    assert run(_size(p, "auto")) == 300 * 4 * 17 * 512
    assert run(_size(p, "current")) == 10 * MiB
    assert qemu_size(p) == 300 * 4 * 17 * 512
    spec.creator_app = b"win "
    vhdgen.write(p, spec)
    assert run(_size(p, "auto")) == 10 * MiB
    assert run(_size(p, "chs")) == 300 * 4 * 17 * 512
    with pytest.raises(ImageError, match="size rule"):
        run(_size(p, "bogus"))


def test_chs_geometry_matches_qemu_create(tmp_path):
    for mib in (1, 64, 100, 1000):
        p = tmp_path / f"g{mib}.vhd"
        qemu_img("create", "-q", "-f", "vpc", p, f"{mib}M")
        raw = p.read_bytes()[:512]
        c, h, s = struct.unpack_from(">HBB", raw, 56)
        assert c * h * s * 512 == qemu_size(p)
        assert vhdgen.geometry(c * h * s) == (c, h, s)  # the generator's CHS rule agrees


# -- bitmaps --------------------------------------------------------------------------------


@given(st.lists(st.tuples(st.integers(0, 4095), st.integers(1, 300)), max_size=6), st.integers(0, 4095))
def test_bit_run_and_set_bits(sets, start):
    bm = bytearray(512)
    ref = [False] * 4096
    for s, n in sets:
        e = min(4096, s + n)
        set_bits(bm, s, e)
        ref[s:e] = [True] * (e - s)
    for s in range(4096):
        assert bool(bm[s >> 3] & (0x80 >> (s & 7))) == ref[s]
    end = min(4096, start + 777)
    n, v = bit_run(bm, start, end)
    assert v == ref[start]
    assert all(x == v for x in ref[start : start + n])
    assert start + n == end or ref[start + n] != v


# -- random write sequences against a model -------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 8 * MiB - 1), st.integers(1, 300_000), st.integers(1, 255)),
        st.tuples(st.just("zero"), st.integers(0, 8 * MiB - 1), st.integers(1, 300_000), st.booleans()),
        st.tuples(st.just("trim"), st.integers(0, 8 * MiB - 1), st.integers(1, 300_000), st.just(0)),
        st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0)),
        st.tuples(st.just("batch"), st.integers(0, 8 * MiB - 1), st.integers(2, 6), st.integers(1, 255)),
    ),
    min_size=1,
    max_size=12,
)


async def _apply(img: Image, model: bytearray, ops) -> None:
    size = img.size
    for op, off, n, arg in ops:
        off %= size
        n = min(n, size - off)
        if op == "write":
            data = bytes([arg]) * n
            await settled(img.write(off, memoryview(data), fua=False))
            model[off : off + n] = data
        elif op == "zero":
            await img.write_zeroes(off, n, may_trim=arg, fast=False, fua=False)
            model[off : off + n] = bytes(n)
        elif op == "trim":
            await img.trim(off, n, fua=False)  # a hint: the model keeps the old contents
        elif op == "flush":
            await img.flush()
        else:  # concurrent writes, disjoint, inside one 64 KiB window (often one unallocated block)
            chunk = 65536 // n
            jobs = []
            for i in range(n):
                o = min(off + i * chunk + (i * 37) % 512, size - 1)
                ln = min(chunk - 600, size - o)
                if ln <= 0 or o < off + i * chunk:
                    continue
                data = bytes([(arg + i) & 0xFF or 1]) * ln
                model[o : o + ln] = data
                jobs.append(img.write(o, memoryview(data), fua=i == 0))
            await asyncio.gather(*jobs)
    await img.flush()


def _check_against_model(path: Path, model: bytes, tmp: Path, parent: Path | None = None) -> None:
    assert read_all(path) == model
    gold = tmp / "model.raw"
    gold.write_bytes(model)
    if parent is None:  # QEMU ignores differencing parents: compare only standalone images
        r = qemu_img("compare", "-f", "vpc", "-F", "raw", path, gold, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    vhdgen.verify(path)


@pytest.fixture(scope="module")
def small_qemu_vhd(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("vhd_small")
    p = d / "s.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", p, "8M")
    qemu_io("vpc", p, "write -P 0x5a 1M 64k", "write -P 0x6b 6M 4k")
    return p


@settings(max_examples=200 if SLOW else 25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_random_writes_qemu_image(small_qemu_vhd, tmp_path, ops):
    p = tmp_path / "w.vhd"
    shutil.copyfile(small_qemu_vhd, p)
    model = bytearray(read_all(p))

    async def go():
        img = await _open(p, readonly=False)
        try:
            await _apply(img, model, ops)
        finally:
            await img.close()

    run(go())
    _check_against_model(p, bytes(model), tmp_path)


@settings(max_examples=100 if SLOW else 15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, bs_shift=st.sampled_from([12, 16, 20]))
def test_random_writes_small_blocks(tmp_path, ops, bs_shift):
    """Block sizes QEMU never creates (4 KiB .. 1 MiB): many allocations, QEMU still agrees.

    (Below 4 KiB QEMU computes a 0-byte sector bitmap, against the specification.)"""
    p = tmp_path / "b.vhd"
    size = 8 * MiB - 12288  # with 4 KiB blocks: 2045 BAT entries, so a short last BAT page
    vhdgen.write(p, vhdgen.Spec(size=size, block_size=1 << bs_shift))
    model = bytearray(size)

    async def go():
        img = await _open(p, readonly=False)
        try:
            await _apply(img, model, ops)
        finally:
            await img.close()

    run(go())
    _check_against_model(p, bytes(model), tmp_path)


def test_concurrent_writes_allocate_once(tmp_path):
    p = tmp_path / "c.vhd"
    qemu_img("create", "-q", "-f", "vpc", p, "8M")
    before = p.stat().st_size

    async def go():
        img = await _open(p, readonly=False)
        try:
            jobs = [img.write(3 * MiB + i * 8192, memoryview(bytes([i + 1]) * 4096), fua=False) for i in range(16)]
            await asyncio.gather(*jobs)
            await img.flush()
        finally:
            await img.close()

    run(go())
    assert p.stat().st_size == before + 512 + 2 * MiB  # one bitmap sector + one block
    vhdgen.verify(p)
    data = qemu_raw(p, tmp_path)
    for i in range(16):
        assert data[3 * MiB + i * 8192 : 3 * MiB + i * 8192 + 4096] == bytes([i + 1]) * 4096


def test_write_zeroes_does_not_allocate(tmp_path):
    p = tmp_path / "z.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", p, "8M")
    qemu_io("vpc", p, "write -P 0x77 2M 1M")
    before = p.stat().st_size

    async def go():
        img = await _open(p, readonly=False)
        try:
            await img.write_zeroes(0, 8 * MiB - 4096, may_trim=True, fast=False, fua=True)
        finally:
            await img.close()

    run(go())
    assert p.stat().st_size == before
    assert qemu_raw(p, tmp_path) == bytes(8 * MiB)
    assert read_all(p) == bytes(8 * MiB)


def test_parent_loop_is_refused(tmp_path):
    me = uuid.uuid4()
    spec = vhdgen.Spec(size=MiB, block_size=65536, disk_type=4, unique_id=me, parent_uuid=me, parent_name="self.vhd")
    vhdgen.write(tmp_path / "self.vhd", spec)
    with pytest.raises(ImageError, match="loops"):
        read_all(tmp_path / "self.vhd")


def test_sector_exact_block_status_after_write(tmp_path):
    p = tmp_path / "m.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "force_size=on", p, "8M")

    async def go():
        img = await _open(p, readonly=False)
        try:
            await settled(img.write(2 * MiB + 1024, memoryview(b"x" * 1536), fua=True))
            return await img.runs(0, img.size)
        finally:
            await img.close()

    runs = run(go())
    assert [(r.length, r.flags) for r in runs] == [(2 * MiB + 1024, 3), (1536, 0), (6 * MiB - 2560, 3)]


def test_cached_read_does_not_suspend(small_qemu_vhd):
    async def go():
        img = await _open(small_qemu_vhd)
        try:
            buf = memoryview(bytearray(4096))
            await img.cache_hint(0, img.size)  # NBD_CMD_CACHE warms the BAT page and the bitmap
            cache = img.cache
            before = cache.stats()
            assert img.driver.read(1 * MiB + 16384, buf) is None  # completed: nothing to wait for
            assert bytes(buf) == b"\x5a" * 4096
            after = cache.stats()
            assert after["misses"] == before["misses"]  # metadata came from the cache
            assert after["hits"] == before["hits"] + 1  # one BAT page peek; no bitmap lookup at all
        finally:
            await img.close()

    run(go())


# -- differencing and generator-made images -------------------------------------------------


def _pattern(seed: int, n: int) -> bytes:
    """A different non-zero byte per sector."""
    return b"".join(bytes([(seed * 7 + k) & 0xFF or 1]) * 512 for k in range(-(-n // 512)))[:n]


def _chain(tmp: Path, levels: int, bs: int = 64 * 1024) -> tuple[Path, bytes]:
    """base.vhd <- c1.vhd <- ... with partial bitmaps; returns the top and its expected contents."""
    size = 1 * MiB
    base = vhdgen.Spec(
        size=size, block_size=bs, blocks={0: vhdgen.Block(_pattern(1, bs)), 3: vhdgen.Block(_pattern(2, bs))}
    )
    vhdgen.write(tmp / "base.vhd", base)
    contents = vhdgen.expected(base)
    parent, parent_spec = "base.vhd", base
    for lvl in range(1, levels + 1):
        spec = vhdgen.Spec(
            size=size,
            block_size=bs,
            disk_type=4,
            parent_uuid=parent_spec.unique_id,
            parent_name=parent,
            locators=[(b"W2ru", f".\\{parent}"), (b"W2ku", f"C:\\vms\\{parent}")],
            blocks={
                0: vhdgen.Block(_pattern(10 + lvl, bs), {0, 1, 2, 64 + lvl, 127}),
                3 + lvl: vhdgen.Block(_pattern(20 + lvl, bs), set(range(8 * lvl, 8 * lvl + 9))),
                15: vhdgen.Block(_pattern(30 + lvl, bs), None),
            },
        )
        name = f"c{lvl}.vhd"
        vhdgen.write(tmp / name, spec)
        contents = vhdgen.expected(spec, contents)
        parent, parent_spec = name, spec
    return tmp / parent, contents


@pytest.mark.parametrize("levels", [1, 2])
def test_differencing_chain(tmp_path, levels):
    top, want = _chain(tmp_path, levels)
    assert read_all(top) == want

    async def depth_map():
        img = await _open(top)
        try:
            return [(r.length, r.depth) for r in await img.runs(0, img.size)]
        finally:
            await img.close()

    runs = run(depth_map())
    # sectors 0-2 of block 0 come from the top; 3..64 from the base (no level above has them)
    assert runs[:2] == [(1536, 1), (62 * 512, levels + 1)]
    assert sum(n for n, _ in runs) == MiB


@settings(max_examples=100 if SLOW else 15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_random_writes_differencing(tmp_path, ops):
    for f in tmp_path.iterdir():
        f.unlink()
    top, want = _chain(tmp_path, 1)
    model = bytearray(want)

    async def go():
        img = await _open(top, readonly=False)
        try:
            await _apply(img, model, ops)
        finally:
            await img.close()

    run(go())
    _check_against_model(top, bytes(model), tmp_path, parent=tmp_path / "base.vhd")


def test_differencing_writes(tmp_path):
    top, want = _chain(tmp_path, 2)
    model = bytearray(want)
    ops = [("write", 5000, 70000, 9), ("write", 3 * 65536 + 100, 600, 8), ("zero", 900_000, 20000, False)]

    async def go():
        img = await _open(top, readonly=False)
        try:
            await _apply(img, model, ops)
        finally:
            await img.close()

    run(go())
    assert read_all(top) == bytes(model)
    vhdgen.verify(top)


def test_other_block_sizes_read_like_qemu(tmp_path):
    for shift in (12, 20, 22):
        bs = 1 << shift
        spec = vhdgen.Spec(size=8 * MiB, block_size=bs, blocks={1: vhdgen.Block(_pattern(shift, bs))})
        p = tmp_path / f"bs{shift}.vhd"
        vhdgen.write(p, spec)
        assert read_all(p) == vhdgen.expected(spec) == qemu_raw(p, tmp_path)
    # 512-byte blocks: QEMU gets the bitmap size wrong, so only the generator is the oracle
    spec = vhdgen.Spec(size=MiB, block_size=512, blocks={i: vhdgen.Block(_pattern(i, 512)) for i in (0, 7, 2047)})
    vhdgen.write(tmp_path / "bs9.vhd", spec)
    assert read_all(tmp_path / "bs9.vhd") == vhdgen.expected(spec)


def test_dynamic_partial_bitmap_reads_zero_for_clear_sectors(tmp_path):
    spec = vhdgen.Spec(size=1 * MiB, block_size=65536, blocks={2: vhdgen.Block(_pattern(5, 65536), {0, 5, 6})})
    p = tmp_path / "pb.vhd"
    vhdgen.write(p, spec)
    assert read_all(p) == vhdgen.expected(spec)


def test_fixed_parent(tmp_path):
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on", tmp_path / "fx.vhd", "1M")
    qemu_io("vpc", tmp_path / "fx.vhd", "write -P 0x61 0 1M")
    parent_id = uuid.UUID(bytes=(tmp_path / "fx.vhd").read_bytes()[-512 + 68 : -512 + 84])
    spec = vhdgen.Spec(
        size=MiB,
        block_size=65536,
        disk_type=4,
        parent_uuid=parent_id,
        locators=[(b"W2ru", ".\\fx.vhd")],
        blocks={3: vhdgen.Block(b"\x62" * 65536, {1})},
    )
    vhdgen.write(tmp_path / "c.vhd", spec)
    assert read_all(tmp_path / "c.vhd") == vhdgen.expected(spec, b"\x61" * MiB)


def test_missing_parent(tmp_path):
    top, _ = _chain(tmp_path, 1)
    (tmp_path / "base.vhd").unlink()
    with pytest.raises(ImageError, match=r"base\.vhd.*not found"):
        read_all(top)


def test_mismatched_parent_uuid(tmp_path):
    top, _ = _chain(tmp_path, 1)
    vhdgen.write(tmp_path / "base.vhd", vhdgen.Spec(size=MiB, block_size=65536))  # new unique_id
    with pytest.raises(ImageError, match="unique_id") as ei:
        read_all(top)
    assert "\n" not in str(ei.value)


# -- crash safety ---------------------------------------------------------------------------


class Crash(Exception):
    pass


class CrashFile(LocalFile):
    """Fault injection: the ``budget``-th pwrite or flush raises ``Crash``.

    ``mode`` says what reached the disk of the writes since the last completed flush:
    "process" all of them (kill -9: the page cache survives), "power" none (the worst power
    cut), "reorder" a random subset (the disk reordered them), chosen by ``seed``.
    """

    def __init__(self, path: str, budget: int, mode: str, seed: int = 0) -> None:
        super().__init__(path, readonly=False)
        self.budget = budget
        self.mode = mode
        self.rng = random.Random(seed)
        self.unsynced: list[tuple[int, bytes, int, bytes]] = []  # offset, old bytes, old size, new bytes

    def _tick(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            if self.mode != "process":
                for off, old, size, _ in reversed(self.unsynced):
                    os.pwrite(self.fd, old, off)
                    os.ftruncate(self.fd, size)
            if self.mode == "reorder":
                for off, _, _, new in self.unsynced:
                    if self.rng.random() < 0.5:
                        os.pwrite(self.fd, new, off)
            raise Crash

    def write(self, offset: int, data) -> None:
        self._tick()
        new = b"".join(data) if isinstance(data, list) else bytes(data)
        self.unsynced.append((offset, os.pread(self.fd, len(new), offset), os.fstat(self.fd).st_size, new))
        super().write(offset, data)

    async def flush(self) -> None:
        self._tick()
        await super().flush()
        self.unsynced.clear()


# byte offset, fill byte; the image has blocks 0 and 3 allocated, 1 and 2 get allocated here
WORKLOAD = [(4096, 0x41), (2 * MiB + 4096, 0x42), (4 * MiB + 512, 0x43), (3 * MiB, 0x45), (5 * MiB - 4096, 0x46)]


async def _crash_run(path: Path, budget: int, mode: str, seed: int, done: list[int], parent=None) -> None:
    cache = ClusterCache()
    file = CrashFile(str(path), budget, mode, seed)
    drv = await VhdDriver.open(file, readonly=False, cache=cache, options=OpenOptions())
    backing = await _open(parent, cache=cache) if parent is not None else None
    img = Image(drv, backing, cache)
    try:
        for i, (off, val) in enumerate(WORKLOAD):
            await settled(img.write(off, memoryview(bytes([val]) * 8192), fua=False))
            if i % 2 == 0:
                await img.flush()
                done.append(i)
    finally:
        cache.discard_storage(file)
        file.close_now()
        if backing is not None:
            await backing.close()


async def _write_one(path: Path, offset: int, data: bytes) -> None:
    img = await _open(path, readonly=False)
    try:
        await settled(img.write(offset, memoryview(data), fua=True))
    finally:
        await img.close()


def _check_crash_contents(got: bytes, base: bytes, flushed: int, budget: int) -> None:
    for i, (off, val) in enumerate(WORKLOAD):
        if any(j > i and abs(o2 - off) < 8192 for j, (o2, _) in enumerate(WORKLOAD)):
            continue  # overwritten later
        piece = got[off : off + 8192]
        if i <= flushed:
            assert piece == bytes([val]) * 8192, f"budget {budget}: flushed write {i} lost"
        else:
            for s in range(0, 8192, 512):
                assert piece[s : s + 512] in (bytes([val]) * 512, base[off + s : off + s + 512])
    written = bytearray(base)
    for off, _ in WORKLOAD:
        written[off : off + 8192] = got[off : off + 8192]
    assert bytes(written) == got, f"budget {budget}: bytes outside the written ranges changed"


@pytest.mark.parametrize(
    "mode, seed", [("process", 0), ("power", 0), *(("reorder", i) for i in range(5 if SLOW else 1))]
)
def test_crash_at_every_step(tmp_path, small_qemu_vhd, mode, seed):
    base = read_all(small_qemu_vhd)
    budget = 0
    while True:
        p = tmp_path / f"crash{budget}.vhd"
        shutil.copyfile(small_qemu_vhd, p)
        done: list[int] = []
        try:
            run(_crash_run(p, budget, mode, seed * 1000 + budget, done))
            finished = True
        except Crash:
            finished = False
        assert "vpc" in qemu_img("info", "-f", "vpc", p).stdout
        flushed = max(done, default=-1)
        # QEMU reads an allocated block whole; we honour the bitmap: after a crash between the
        # data write and the bitmap update the two differ, but each must be "old or new".
        for got in (qemu_raw(p, tmp_path), read_all(p)):
            _check_crash_contents(got, base, flushed, budget)
        assert p.read_bytes()[-512:][:8] == b"conectix"
        vhdgen.verify(p)
        # and the image stays writable: a new write (maybe allocating past an orphan) reads back
        after = bytes(read_all(p))
        run(_write_one(p, 4 * MiB + 65536, b"\x99" * 8192))
        vhdgen.verify(p)
        want = after[: 4 * MiB + 65536] + b"\x99" * 8192 + after[4 * MiB + 65536 + 8192 :]
        assert read_all(p) == want
        assert qemu_raw(p, tmp_path)[4 * MiB + 65536 : 4 * MiB + 65536 + 8192] == b"\x99" * 8192
        if finished:
            break
        budget += 1
    assert budget > 10  # the workload really passed through many crash points


def _crash_chain(d: Path) -> None:
    """parent.vhd (every sector data) <- child.vhd (block 0 partly present, block 3 full)."""
    bs = 2 * MiB
    parent = vhdgen.Spec(size=8 * MiB, blocks={i: vhdgen.Block(_pattern(i + 40, bs)) for i in range(4)})
    vhdgen.write(d / "parent.vhd", parent)
    child = vhdgen.Spec(
        size=8 * MiB,
        disk_type=4,
        parent_uuid=parent.unique_id,
        locators=[(b"W2ru", ".\\parent.vhd")],
        blocks={0: vhdgen.Block(_pattern(50, bs), set(range(0, 4096, 3))), 3: vhdgen.Block(_pattern(51, bs))},
    )
    vhdgen.write(d / "child.vhd", child)


@pytest.mark.parametrize("mode, seed", [("power", 0), *(("reorder", i) for i in range(5 if SLOW else 2))])
def test_crash_differencing(tmp_path, mode, seed):
    """A differencing child: a bitmap bit reaching the disk before its data would expose zeroes
    where the parent's data belongs, which "old or new" catches (QEMU cannot judge: it ignores
    the parent)."""
    ref = tmp_path / "ref"
    ref.mkdir()
    _crash_chain(ref)
    base = read_all(ref / "child.vhd")
    budget = 0
    while True:
        d = tmp_path / f"b{budget}"
        shutil.copytree(ref, d)
        done: list[int] = []
        try:
            run(_crash_run(d / "child.vhd", budget, mode, seed * 1000 + budget, done, parent=d / "parent.vhd"))
            finished = True
        except Crash:
            finished = False
        _check_crash_contents(read_all(d / "child.vhd"), base, max(done, default=-1), budget)
        vhdgen.verify(d / "child.vhd")
        if finished:
            break
        budget += 1
    assert budget > 10


# -- hostile images -------------------------------------------------------------------------


def _hostile(tmp: Path, mutate, **spec_kw) -> Path:
    blocks = {1: vhdgen.Block(b"a" * 65536), 2: vhdgen.Block(b"b" * 65536)}
    spec = vhdgen.Spec(size=4 * MiB, block_size=65536, blocks=blocks, **spec_kw)
    buf = vhdgen.build(spec)
    mutate(buf)
    p = tmp / "h.vhd"
    p.write_bytes(bytes(buf))
    return p


def _set(off: int, fmt: str, value, fix=True):
    def m(buf):
        struct.pack_into(fmt, buf, off, value)
        if fix:
            vhdgen.fix_checksums(buf)

    return m


def _footers(off: int, fmt: str, value):
    return lambda buf: vhdgen.patch_footers(buf, off, fmt, value)


BAT = 1536
HOSTILE = {
    "short": (lambda buf: buf.__delitem__(slice(100, None)), "shorter than a VHD footer"),
    "no footer": (lambda buf: buf.__setitem__(slice(None), bytes(len(buf))), "no valid VHD footer"),
    "both checksums": (
        lambda buf: [struct.pack_into(">I", buf, at + 64, 1) for at in (0, len(buf) - 512)],
        "checksum",
    ),
    "disk type": (_footers(60, ">I", 5), "disk_type"),
    "too large": (_footers(48, ">Q", 1 << 45), "2040 GiB"),  # qem2 with CHS max: current_size rules
    "data_offset": (_footers(16, ">Q", 1 << 40), "data_offset"),
    "dyn cookie": (_set(512, "8s", b"cxsparsX"), "cxsparse"),
    "block_size odd": (_set(512 + 32, ">I", 3000), "block_size"),
    "block_size small": (_set(512 + 32, ">I", 256), "block_size"),
    "entries huge": (_set(512 + 28, ">I", 1 << 31), "max_table_entries"),
    "entries small": (_set(512 + 28, ">I", 2), "max_table_entries"),
    "table_offset": (_set(512 + 16, ">Q", 1 << 40), "table_offset"),
    "bat past eof": (_set(BAT + 4, ">I", 0x100000), "BAT entry 1"),
    "bat overlaps header": (_set(BAT + 4, ">I", 1), "overlaps"),
    "bat all zero": (lambda buf: buf.__setitem__(slice(BAT, BAT + 256), bytes(256)), "allocated blocks"),
    "blocks overlap": (lambda buf: _set(BAT + 8, ">I", struct.unpack_from(">I", buf, BAT + 4)[0] + 1)(buf), "overlaps"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile(tmp_path, case):
    mutate, field = HOSTILE[case]
    p = _hostile(tmp_path, mutate)
    tracemalloc.start()
    try:
        with pytest.raises(ImageError) as ei:
            read_all(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(ei.value)
    assert field in msg and "\n" not in msg and msg.startswith(str(p))
    assert peak < 16 * MiB


def test_hostile_locators(tmp_path):
    parent = vhdgen.Spec(size=MiB, block_size=65536)
    vhdgen.write(tmp_path / "p.vhd", parent)
    common = dict(size=MiB, block_size=65536, disk_type=4, parent_uuid=parent.unique_id)
    vhdgen.write(tmp_path / "n.vhd", vhdgen.Spec(**common))
    with pytest.raises(ImageError, match="names no parent"):
        read_all(tmp_path / "n.vhd")
    buf = vhdgen.build(vhdgen.Spec(**common, locators=[(b"W2ru", ".\\p.vhd")]))
    struct.pack_into(">Q", buf, 512 + 576 + 16, 1 << 40)  # locator 0 data_offset
    vhdgen.fix_checksums(buf)
    (tmp_path / "l.vhd").write_bytes(bytes(buf))
    with pytest.raises(ImageError, match="parent locator 0"):
        read_all(tmp_path / "l.vhd")
    for code in (b"W2ru", b"MacX"):  # locator text that does not decode (UTF-16-LE, UTF-8)
        buf = vhdgen.build(vhdgen.Spec(**common, locators=[(code, "p.vhd")]))
        data_at = struct.unpack_from(">Q", buf, 512 + 576 + 16)[0]
        buf[data_at : data_at + 2] = b"\x00\xd8" if code == b"W2ru" else b"\xff\xfe"
        vhdgen.fix_checksums(buf)
        (tmp_path / "t.vhd").write_bytes(bytes(buf))
        with pytest.raises(ImageError, match=f"parent locator 0 \\({code.decode()}\\) is not valid text"):
            read_all(tmp_path / "t.vhd")
    buf = vhdgen.build(vhdgen.Spec(**common, locators=[(b"W2ku", "C:\\x\\p.vhd")]))
    buf[512 + 64 : 512 + 68] = b"\xd8\x00\x00\x41"  # parent_unicode_name: a lone high surrogate
    vhdgen.fix_checksums(buf)
    (tmp_path / "u.vhd").write_bytes(bytes(buf))
    with pytest.raises(ImageError, match="parent_unicode_name is not valid UTF-16"):
        read_all(tmp_path / "u.vhd")
    vhdgen.write(tmp_path / "ok.vhd", vhdgen.Spec(**common, locators=[(b"W2ku", "C:\\x\\p.vhd")]))
    assert read_all(tmp_path / "ok.vhd") == bytes(MiB)
    url = f"file://localhost{tmp_path}/p.vhd"
    vhdgen.write(tmp_path / "mac.vhd", vhdgen.Spec(**common, locators=[(b"MacX", url)]))
    assert read_all(tmp_path / "mac.vhd") == bytes(MiB)


def test_bad_trailing_footer_uses_copy_and_repairs(tmp_path):
    spec = vhdgen.Spec(size=4 * MiB, block_size=65536, blocks={1: vhdgen.Block(b"q" * 65536)})
    buf = vhdgen.build(spec)
    struct.pack_into(">I", buf, len(buf) - 512 + 64, 0)  # trailing footer checksum broken
    p = tmp_path / "t.vhd"
    p.write_bytes(bytes(buf))
    assert read_all(p) == vhdgen.expected(spec)
    read_all(p, readonly=False)  # writable open appends a fresh footer
    assert p.read_bytes()[-512:] == bytes(buf[:512])
    assert read_all(p) == vhdgen.expected(spec)


@pytest.mark.parametrize("how", ["size_field", "truncated"])
def test_fixed_shorter_than_its_size_is_served_read_only_like_qemu(tmp_path, caplog, how):
    """A fixed VHD whose data area is shorter than its size: QEMU reads it (the file's bytes, the
    footer included, then zeroes); so do we, read-only, with a warning naming the size field."""
    p = tmp_path / "f.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on", p, "3M")
    qemu_io("vpc", p, "write -P 0x5c 0 3M")
    buf = bytearray(p.read_bytes())
    if how == "size_field":
        vhdgen.patch_footers(buf, 48, ">Q", 5 * MiB)
    else:
        buf[2 * MiB : 3 * MiB] = b""  # the data area lost its last MiB, the footer is still there
    p.write_bytes(bytes(buf))
    want = qemu_raw(p, tmp_path)

    async def go():
        img = await _open(p, readonly=False)
        try:
            assert img.readonly
            data = await read_image(img)
            head = [(r.length, r.flags) for r in await img.runs(0, img.size)]
            return data, head
        finally:
            await img.close()

    data, runs = run(go())
    assert data == want
    assert "current_size" in caplog.text and "read-only" in caplog.text
    assert sum(n for n, _ in runs) == len(want)
    assert p.read_bytes() == bytes(buf)


def test_fixed_writes(tmp_path):
    p = tmp_path / "fx.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed", p, "4M")
    footer = p.read_bytes()[-512:]

    async def go():
        img = await _open(p, readonly=False)
        try:
            await settled(img.write(1000, memoryview(b"z" * 5000), fua=True))
            await img.write_zeroes(2000, 100, may_trim=True, fast=False, fua=False)
            return img.size
        finally:
            await img.close()

    size = run(go())
    want = bytearray(size)
    want[1000:6000] = b"z" * 5000
    want[2000:2100] = bytes(100)
    assert qemu_raw(p, tmp_path) == bytes(want)
    assert p.read_bytes()[-512:] == footer

"""The image layer over real files: read-modify-write for sub-alignment requests (also under
concurrency), zero emulation rules, block-status runs, and backing-name resolution policy."""

from __future__ import annotations

import asyncio
import errno
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdserve.cache import ClusterCache
from nbdserve.errors import ImageError, NbdError, UnsupportedImage
from nbdserve.formats.base import Limits
from nbdserve.formats.raw import RawDriver
from nbdserve.image import Image, ImageSpec, open_image, resolve_backing
from nbdserve.protocol.constants import STATE_HOLE, STATE_ZERO
from nbdserve.storage.base import settled
from nbdserve.storage.local import LocalFile

SIZE = 64 * 1024


class SectorRaw(RawDriver):
    """The raw driver with 512-byte request alignment, as sector-based formats (VHD) have."""

    def __init__(self, file, readonly):
        super().__init__(file, readonly)
        self.limits = Limits(align=512, max_transfer=8192)


def make_image(path, align512: bool) -> Image:
    with open(path, "wb") as f:
        f.truncate(SIZE)
    bf = LocalFile(str(path), readonly=False)
    drv = (SectorRaw if align512 else RawDriver)(bf, False)
    return Image(drv, None, ClusterCache(1 << 20))


ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "zero", "zero_nohole", "trim"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 9000),
        st.integers(0, 255),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, align512=st.booleans())
def test_random_ops_match_a_byte_model(tmp_path, ops, align512):
    path = tmp_path / f"m{random.random()}.img"

    async def main():
        img = make_image(path, align512)
        model = bytearray(SIZE)
        for op, off, n, byte in ops:
            n = min(n, SIZE - off)
            if op == "write":
                await settled(img.write(off, memoryview(bytes([byte]) * n), fua=False))
                model[off : off + n] = bytes([byte]) * n
            elif op.startswith("zero"):
                await img.write_zeroes(off, n, may_trim=op == "zero", fast=False, fua=False)
                model[off : off + n] = bytes(n)
            else:
                await img.trim(off, n, fua=False)
                # TRIM is a hint: afterwards the range is either old data or zero; make it known
                got = bytearray(n)
                await settled(img.read(off, memoryview(got)))
                for i in range(n):
                    assert got[i] in (model[off + i], 0)
                model[off : off + n] = got
        out = bytearray(SIZE)
        await settled(img.read(0, memoryview(out)))
        assert out == model
        odd = bytearray(777)
        await settled(img.read(1234, memoryview(odd)))
        assert odd == model[1234 : 1234 + 777]
        await img.close()

    asyncio.run(main())
    os.unlink(path)


def test_concurrent_unaligned_writes_into_one_sector_all_survive(tmp_path):
    async def main():
        img = make_image(tmp_path / "c.img", align512=True)
        # 64 writers, each owning 8 bytes of the same two sectors: RMW must not lose any of them
        await asyncio.gather(*(img.write(100 + 8 * i, memoryview(bytes([i + 1]) * 8), fua=False) for i in range(64)))
        out = bytearray(512)
        await settled(img.read(100, memoryview(out)))
        assert out == b"".join(bytes([i + 1]) * 8 for i in range(64))
        await img.close()

    asyncio.run(main())


class GatedSectorRaw(SectorRaw):
    """SectorRaw whose writes to sector 1 reach the file only once ``gate`` is opened, as a write
    to storage that answers later (RBD, S3 overlays) does."""

    def __init__(self, file, readonly):
        super().__init__(file, readonly)
        self.gate = asyncio.get_running_loop().create_future()

    def write(self, offset, data, *, fua):
        if offset != 512:
            return super().write(offset, data, fua=fua)

        async def later():
            await self.gate
            await settled(SectorRaw.write(self, offset, data, fua=fua))

        return later()


def test_read_modify_write_waits_only_for_writes_to_its_sectors(tmp_path):
    """An aligned write of sector 1 is in flight.  A 100-byte write inside sector 1 waits for it
    (reading the sector before that write lands and writing it back after would undo it); a
    100-byte write inside sector 5 does not wait."""

    async def main():
        path = tmp_path / "r.img"
        with open(path, "wb") as f:
            f.truncate(SIZE)
        drv = GatedSectorRaw(LocalFile(str(path), readonly=False), False)
        img = Image(drv, None, ClusterCache(1 << 20))

        async def write(offset, data):
            await settled(img.write(offset, memoryview(data), fua=False))

        aligned = asyncio.ensure_future(write(512, b"\xaa" * 512))
        inside = asyncio.ensure_future(write(600, b"\xbb" * 100))
        elsewhere = asyncio.ensure_future(write(5 * 512 + 7, b"\xcc" * 100))
        for _ in range(100):  # bounded: turns of the loop, no clock
            if elsewhere.done():
                break
            await asyncio.sleep(0)
        assert elsewhere.done() and not aligned.done() and not inside.done()
        drv.gate.set_result(None)
        await asyncio.gather(aligned, inside, elsewhere)
        out = bytearray(6 * 512)
        await settled(img.read(0, memoryview(out)))
        expect = bytearray(6 * 512)
        expect[512:1024] = b"\xaa" * 512
        expect[600:700] = b"\xbb" * 100  # written after the aligned write, over it
        expect[5 * 512 + 7 : 5 * 512 + 107] = b"\xcc" * 100
        assert out == expect
        await img.close()

    asyncio.run(main())


def test_fast_zero_refused_for_partial_sectors(tmp_path):
    async def main():
        img = make_image(tmp_path / "z.img", align512=True)
        with pytest.raises(NbdError) as e:
            await img.write_zeroes(100, 1000, may_trim=True, fast=True, fua=False)
        assert e.value.errno == errno.ENOTSUP
        await img.write_zeroes(512, 4096, may_trim=True, fast=True, fua=False)  # whole sectors: fine
        await img.close()

    asyncio.run(main())


def test_runs_report_holes_and_data_merged(tmp_path):
    async def main():
        img = make_image(tmp_path / "r.img", align512=False)
        await settled(img.write(0, memoryview(b"x" * 4096), fua=False))
        runs = await img.runs(0, SIZE)
        assert runs[0].flags == 0 and runs[0].length == 4096 and runs[0].depth == 1
        assert all(r.flags == STATE_HOLE | STATE_ZERO for r in runs[1:])
        assert sum(r.length for r in runs) == SIZE
        one = await img.runs(0, SIZE, limit=1)
        assert len(one) == 1
        await img.close()

    asyncio.run(main())


def test_backing_names_are_confined(tmp_path):
    inner = tmp_path / "images"
    inner.mkdir()
    top = inner / "top.qcow2"
    top.write_bytes(b"")
    (inner / "base.raw").write_bytes(b"")
    (tmp_path / "secret.raw").write_bytes(b"")
    allowed = (str(inner),)
    assert resolve_backing(str(top), "base.raw", allowed) == str(inner / "base.raw")
    with pytest.raises(ImageError, match="outside the allowed directories"):
        resolve_backing(str(top), "../secret.raw", allowed)
    with pytest.raises(ImageError, match="outside the allowed directories"):
        resolve_backing(str(top), "/etc/passwd", allowed)
    with pytest.raises(UnsupportedImage, match="protocol or json"):
        resolve_backing(str(top), 'json:{"file.driver":"file"}', allowed)
    with pytest.raises(UnsupportedImage, match="protocol or json"):
        resolve_backing(str(top), "nbd://evil/x", allowed)
    with pytest.raises(ImageError, match="not found"):
        resolve_backing(str(top), "missing.raw", allowed)


def test_open_refuses_missing_file_with_one_line(tmp_path):
    async def main():
        with pytest.raises(ImageError) as e:
            await open_image(ImageSpec(str(tmp_path / "nope.img")), ClusterCache())
        assert "\n" not in str(e.value) and "nope.img" in str(e.value)

    asyncio.run(main())

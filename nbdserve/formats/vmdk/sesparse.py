"""seSparse extents (VMware ESXi's space-efficient snapshot deltas), read-only.

Owns one seSparse extent file: the constant header (sector 0), the volatile header, the grain
directory (in memory) and the grain tables (in the shared cluster cache).  The layout, as QEMU
reads it (VMware does not publish it), is in docs/vmdk.md ("seSparse"); in short: 4 KiB grains,
grain tables of 4096 little-endian u64 entries (16 MiB of disk each), a GD entry 0x1000000 in its
top 32 bits plus a table index, and a grain entry whose top nibble says unallocated (0: ask the
parent), unmapped (1) or zero (2), or allocated (3, a grain index spread over the other bits).

Writes are not supported (QEMU cannot write seSparse either): the driver serves such an image
read-only.  A journal that still needs replaying is refused.

Open-time checks: both headers' magics, version, geometry, flags, reserved fields and padding as
QEMU checks them; every region inside the file and no two overlapping; the GD covering the
capacity; each GD entry naming a table inside the grain-table region.  Grain entries are checked
when used (inside the grains region and the file; else the request fails with EIO).
"""

from __future__ import annotations

import itertools
import struct
from array import array
from typing import TYPE_CHECKING

from ...cache import ClusterCache
from ...errors import CorruptImage, UnsupportedImage
from ...storage.base import Storage, read_at
from ..base import ALLOCATED, DATA, ZERO
from ..tables import decode_le64, encode_le
from .extent import PLAIN, UNALLOCATED, ZEROED, GrainTableExtent

if TYPE_CHECKING:
    from .driver import VmdkDriver

SECTOR = 512
CONST_MAGIC = 0xCAFEBABE
VOLATILE_MAGIC = 0xCAFECAFE
VERSION = 0x0000000200000001
GRAIN_SECTORS = 8
GT_SECTORS = 64
GT_ENTRIES = GT_SECTORS * SECTOR // 8  # 4096
GRAIN = GRAIN_SECTORS * SECTOR
SPAN = GT_ENTRIES * GRAIN  # guest bytes per grain table: 16 MiB
MAX_CAPACITY = 1 << 37  # sectors: 64 TiB
GD_ALLOCATED = 0x10000000  # the top 32 bits of an allocated GD entry

CONST = struct.Struct("<26Q")
REGIONS = (  # (index of the offset field in CONST, name); the size field follows
    (10, "the volatile header"),
    (12, "the journal header"),
    (14, "the journal"),
    (16, "the grain directory"),
    (18, "the grain tables"),
    (20, "the free bitmap"),
    (22, "the backmap"),
    (24, "the grains"),
)
VOLATILE = struct.Struct("<4Q")

_STATE = {UNALLOCATED: 0, ZEROED: ALLOCATED | ZERO, PLAIN: ALLOCATED | DATA}
NO_TABLE = array("Q")


class SeSparseExtent(GrainTableExtent):
    readonly = True
    span = SPAN
    no_table = NO_TABLE
    grain_bits = GRAIN.bit_length() - 1

    def __init__(self, owner: VmdkDriver, start: int, storage: Storage, cache: ClusterCache, what: str) -> None:
        self.storage = storage
        self.path = storage.name
        self.what = what
        self.why_readonly = f"{what} is a seSparse extent (no writing, as in QEMU)"
        super().__init__(owner, start, 0)  # the size comes with the headers (``load``)
        self.cache = cache
        size = GT_SECTORS * SECTOR
        self.gt_kind = cache.kind(storage, name="seSparse grain table", size=size, decode=decode_le64, encode=encode_le)

    async def load(self) -> None:
        """Read and check the headers and the grain directory (before the extent is used)."""
        f = await self._read_headers()
        self.size = f[2] * SECTOR
        what = self.what
        self.tables_at, self.tables_end = f[18] * SECTOR, (f[18] + f[19]) * SECTOR
        self.grains_at, self.grains_end = f[24] * SECTOR, (f[24] + f[25]) * SECTOR
        n = -(-f[2] // (GT_ENTRIES * GRAIN_SECTORS))
        if n > f[17] * SECTOR // 8:
            raise CorruptImage(self.path, f"{what}: grain directory of {f[17]} sectors does not cover {f[2]} sectors")
        self.gd = decode_le64(await read_at(self.storage, f[16] * SECTOR, n * 8))
        for i, e in enumerate(self.gd):
            if e and self._table_at(i, e) + GT_SECTORS * SECTOR > self.tables_end:
                raise CorruptImage(self.path, f"{what}: grain directory entry {i} names a table past the grain tables")

    async def _read_headers(self) -> tuple[int, ...]:
        path, what, storage = self.path, self.what, self.storage
        if storage.size < 2 * SECTOR:
            raise CorruptImage(path, f"{what}: file too small for seSparse headers")
        raw = await read_at(storage, 0, SECTOR)
        f = CONST.unpack_from(raw)
        if f[0] != CONST_MAGIC:
            raise CorruptImage(path, f"{what}: seSparse constant header magic 0x{f[0]:x} is not 0xcafebabe")
        if f[1] != VERSION:
            raise UnsupportedImage(path, f"{what}: seSparse version 0x{f[1]:x} is not 0x200000001")
        if f[3] != GRAIN_SECTORS or f[4] != GT_SECTORS:
            raise UnsupportedImage(path, f"{what}: seSparse grain_size {f[3]} / grain_table_size {f[4]} are not 8 / 64")
        if f[5] or any(f[6:10]) or any(raw[CONST.size :]):
            raise UnsupportedImage(path, f"{what}: seSparse flags, reserved fields or padding are not zero")
        if f[2] > MAX_CAPACITY:
            raise CorruptImage(path, f"{what}: seSparse capacity {f[2]} sectors exceeds 64 TiB")
        sectors = storage.size // SECTOR
        regions = [(0, 1, "the constant header")]
        for k, name in REGIONS:
            at, n = f[k], f[k + 1]
            if n and not 0 < at <= sectors - n:
                raise CorruptImage(path, f"{what}: seSparse {name} (sector {at}, {n} sectors) is not inside the file")
            if n:
                regions.append((at, n, name))
        regions.sort()
        for (a, n, name), (b, _, other) in itertools.pairwise(regions):
            if b < a + n:
                raise CorruptImage(path, f"{what}: seSparse {other} overlaps {name}")
        if not f[11]:
            raise CorruptImage(path, f"{what}: seSparse volatile header has size 0")
        vraw = await read_at(storage, f[10] * SECTOR, SECTOR)
        magic, _, _, replay = VOLATILE.unpack_from(vraw)
        if magic != VOLATILE_MAGIC:
            raise CorruptImage(path, f"{what}: seSparse volatile header magic 0x{magic:x} is not 0xcafecafe")
        if replay:
            raise UnsupportedImage(path, f"{what}: seSparse journal needs replaying (the image is dirty)")
        if any(vraw[VOLATILE.size :]):
            raise UnsupportedImage(path, f"{what}: seSparse volatile header padding is not zero")
        return f

    def _table_at(self, gdi: int, e: int) -> int:
        if e >> 32 != GD_ALLOCATED:
            raise CorruptImage(self.path, f"{self.what}: grain directory entry {gdi} (0x{e:x}) is not a table")
        return self.tables_at + (e & 0xFFFFFFFF) * GT_SECTORS * SECTOR

    def _peek(self, gdi: int) -> array | None:
        e = self.gd[gdi]
        if not e:
            return NO_TABLE
        entry = self.cache.peek(self.gt_kind, self._table_at(gdi, e))
        return None if entry is None else entry.value

    async def _table(self, gdi: int) -> array:
        table = self._peek(gdi)
        if table is not None:
            return table
        entry = await self.cache.get(self.gt_kind, self._table_at(gdi, self.gd[gdi]))
        self.cache.release(entry)
        return entry.value

    def _entry(self, pos: int, e: int) -> tuple[int, int]:
        """(kind, host of the grain) for grain table entry ``e`` of guest ``pos``."""
        t = e >> 60
        if t == 0 and e == 0:
            return UNALLOCATED, 0
        if t in (1, 2):  # unmapped or zero
            return ZEROED, 0
        if t == 3:
            index = ((e >> 48) & 0xFFF) | ((e & 0x0000FFFFFFFFFFFF) << 12)
            host = self.grains_at + index * GRAIN
            if host + GRAIN > min(self.grains_end, self.storage.size):
                sector = (self.start + pos) // SECTOR
                raise CorruptImage(self.path, f"{self.what}: grain entry for guest sector {sector} is past the grains")
            return PLAIN, host
        sector = (self.start + pos) // SECTOR
        raise CorruptImage(self.path, f"{self.what}: grain entry for guest sector {sector} (0x{e:x}) is not valid")

    def _run(self, table: array, pos: int, end: int, contiguous: bool = True) -> tuple[int, int, int]:
        """(kind, run_end, host) as in ``sparse.SparseExtent._run``."""
        g = pos // GRAIN
        i = i0 = g % GT_ENTRIES
        last = i0 + (end - 1) // GRAIN - g
        kind, host = self._entry(pos, table[i])
        want = host + GRAIN
        while i < last:
            k, h = self._entry((g + i - i0 + 1) * GRAIN, table[i + 1])
            if k != kind or (kind == PLAIN and contiguous and h != want):
                break
            i += 1
            want += GRAIN
        stop = min((g + i - i0 + 1) * GRAIN, end)
        return kind, stop, host + pos % GRAIN if kind == PLAIN else 0

    def map_now(self, rel: int) -> int | None:
        table = self._peek(rel // SPAN)
        if table is None or table is NO_TABLE:
            return None
        try:
            kind, host = self._entry(rel, table[(rel // GRAIN) % GT_ENTRIES])
        except CorruptImage:
            return None
        return host + rel % GRAIN if kind == PLAIN else None

    async def status(self, rel: int, end: int) -> tuple[int, int]:
        gdi = rel // SPAN
        seg_end = min(end, (gdi + 1) * SPAN)
        table = await self._table(gdi)
        if table is NO_TABLE:
            return 0, seg_end
        kind, stop, _ = self._run(table, rel, seg_end, contiguous=False)
        return _STATE[kind], stop

    async def _load_for_read(self, rel: int, buf: memoryview, pos: int, pendings: list) -> int:
        """The grain table ``_read_cached`` stopped at (see ``TableReads``)."""
        await self._table(pos // SPAN)
        return pos

    async def cache_hint(self, rel: int, length: int) -> None:
        for gdi in range(rel // SPAN, min((rel + length - 1) // SPAN, rel // SPAN + 63) + 1):
            await self._table(gdi)

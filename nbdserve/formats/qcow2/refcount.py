"""qcow2 refcounts: the refcount table, refcount blocks of any width (1..64 bits), allocation.

Owns:
  * ``RefBlock``: one decoded refcount block.  Widths of 8 bits and more are an ``array`` of the
    matching type, byte-swapped once per load/store; widths 1, 2 and 4 stay packed in a
    ``bytearray`` (LSB-first inside each byte, as the spec says).
  * ``Refcounts``: the in-memory refcount table (``array('Q')``, validated at open), refcount
    blocks through the shared cache, the allocation cursor (lowest cluster that may be free),
    allocation of contiguous cluster runs, increments/decrements with range checks, creation of
    missing refcount blocks (placed inside the range they describe, so they describe themselves)
    and growth of the refcount table (new blocks + new table past the covered area, then one
    12-byte header switch).  On a read-write image every new refcount structure is checked
    against the overlap map (``overlap.MetadataMap``) before it is written, and entered into it.

Every method is called with the driver's metadata lock held.  The table is validated at open
only as far as reading needs: a bad entry is recorded in ``problems`` (the driver then serves
the image read-only), since refcounts matter only for writing.

Ordering (crash consistency): a new refcount block is durable before the table entry that
points at it; a new refcount table (and its blocks) is durable before the header points at it;
the old table is freed only after that.  The caller makes L2 tables depend on the refcount blocks
returned by ``alloc`` (refcount durable before the reference) and writes back the L2 tables
that dropped a reference before it calls ``decref`` (no reference on disk to a free cluster).
"""

from __future__ import annotations

import errno
import struct
import sys
from array import array
from collections.abc import Callable
from typing import NoReturn

from ...cache import CacheEntry, ClusterCache
from ...errors import CorruptImage, NbdError
from ...storage.base import Storage, settled
from .header import FIELD_REFCOUNT_TABLE
from .overlap import REFBLOCK, REFTABLE, MetadataMap
from .tables import decode_be64, encode_be64

REFTABLE_RESERVED = 0x1FF
MAX_HOST_OFFSET = 1 << 56
_SWAP = sys.byteorder == "little"
_TYPECODE = {8: "B", 16: "H", 32: "I", 64: "Q"}


class RefBlock:
    """One refcount block; ``get(i)``/``set(i, v)`` by entry index."""

    __slots__ = ("bits", "data", "mask")

    def __init__(self, bits: int, data: array | bytearray) -> None:
        self.bits = bits
        self.data = data
        self.mask = (1 << bits) - 1

    @classmethod
    def decode(cls, bits: int, raw: bytearray) -> RefBlock:
        if bits >= 8:
            a = array(_TYPECODE[bits])
            a.frombytes(raw)
            if _SWAP and bits > 8:
                a.byteswap()
            return cls(bits, a)
        return cls(bits, raw)

    @classmethod
    def empty(cls, bits: int, cluster_size: int) -> RefBlock:
        return cls.decode(bits, bytearray(cluster_size))

    def encode(self) -> bytes | bytearray:
        if self.bits < 8:
            return self.data
        if _SWAP and self.bits > 8:
            a = array(self.data.typecode, self.data)
            a.byteswap()
            return a.tobytes()
        return self.data.tobytes()

    def get(self, i: int) -> int:
        if self.bits >= 8:
            return self.data[i]
        bit = i * self.bits
        return (self.data[bit >> 3] >> (bit & 7)) & self.mask

    def set(self, i: int, value: int) -> None:
        if self.bits >= 8:
            self.data[i] = value
            return
        bit = i * self.bits
        shift = bit & 7
        byte = self.data[bit >> 3]
        self.data[bit >> 3] = (byte & ~(self.mask << shift)) | (value << shift)

    def first_free(self, start: int, stop: int) -> int:
        """Index of the first zero entry in [start, stop), or -1."""
        if self.bits >= 8:
            try:
                return self.data.index(0, start, stop)
            except ValueError:
                return -1
        for i in range(start, stop):
            if self.get(i) == 0:
                return i
        return -1


class Refcounts:
    """Refcount table + blocks of one image.  All methods: called with the driver lock held."""

    def __init__(
        self,
        path: str,
        storage: Storage,
        cache: ClusterCache,
        cluster_bits: int,
        refcount_order: int,
        table_offset: int,
        table_clusters: int,
        raw_table: bytes | bytearray,
    ) -> None:
        """``raw_table``: the refcount table as stored (``table_clusters`` clusters)."""
        self.path = path
        self.storage = storage
        self.cache = cache
        self.cluster_bits = cluster_bits
        self.cs = 1 << cluster_bits
        self.bits = 1 << refcount_order
        self.max = (1 << self.bits) - 1
        self.block_entries = self.cs * 8 // self.bits
        self.block_shift = self.block_entries.bit_length() - 1
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        bits = self.bits
        self.kind = cache.kind(
            storage,
            name="refcount block",
            size=self.cs,
            decode=lambda raw: RefBlock.decode(bits, raw),
            encode=RefBlock.encode,
        )
        self.table = decode_be64(raw_table)
        # Refcounts matter only for writing: a bad entry makes the image read-only, not unreadable.
        self.problems: list[str] = []
        mask = REFTABLE_RESERVED | (self.cs - 1)
        for i, e in enumerate(self.table):
            if e & mask:
                self.problems.append(f"refcount table entry {i} (0x{e:x}) has reserved bits set or is unaligned")
            elif e and e + self.cs > storage.size:
                self.problems.append(f"refcount table entry {i}: block 0x{e:x} extends beyond end of file")
            if len(self.problems) >= 3:
                break
        self.cursor = 0  # every cluster below it is in use
        # Read-write images: the overlap map new refcount structures are checked against and
        # entered into, and the driver's refusal (marks the image corrupt, raises).
        self.meta: MetadataMap | None = None
        self.refuse: Callable[[str], NoReturn] = _refuse_unchecked

    def get_entry(self, cluster: int) -> tuple[int, int]:
        """(refcount block index, index inside it) of ``cluster``."""
        return cluster >> self.block_shift, cluster & (self.block_entries - 1)

    async def get(self, cluster: int) -> int:
        """The refcount of ``cluster`` (0 where no block covers it)."""
        index, i = self.get_entry(cluster)
        entry = await self._block(index)
        if entry is None:
            return 0
        try:
            return entry.value.get(i)
        finally:
            self.cache.release(entry)

    # -- lookups ----------------------------------------------------------------------------

    async def _block(self, index: int) -> CacheEntry | None:
        """The refcount block ``index`` pinned, or None if the table has no block there."""
        if index >= len(self.table) or self.table[index] == 0:
            return None
        return await self.cache.get(self.kind, self.table[index])

    # -- updates ----------------------------------------------------------------------------

    async def decref(self, clusters) -> None:
        """Drop one reference from each cluster.  The caller has made the dropping L2 durable.

        A refcount that would go below zero is corruption (never wrapped).
        """
        for cluster in clusters:
            entry = await self._block(cluster >> self.block_shift)
            if entry is None:
                raise CorruptImage(self.path, f"cluster {cluster} in use but no refcount block covers it")
            try:
                blk: RefBlock = entry.value
                i = cluster & (self.block_entries - 1)
                value = blk.get(i) - 1
                if value < 0:
                    raise CorruptImage(self.path, f"refcount of cluster {cluster} would drop below zero")
                blk.set(i, value)
                self.cache.mark_dirty(entry)
                if value == 0 and cluster < self.cursor:
                    self.cursor = cluster
            finally:
                self.cache.release(entry)

    async def alloc(self, count: int) -> tuple[int, int, CacheEntry]:
        """Allocate up to ``count`` contiguous free clusters (refcount 0 -> 1).

        Returns (first cluster, how many, the refcount block entry that now counts them); a
        run never crosses a refcount block, so callers loop for more.
        """
        while True:
            c = self.cursor
            index = c >> self.block_shift
            if index >= len(self.table):
                await self._grow_table(index)
                continue
            if self.table[index] == 0:
                entry = await self._new_block(index, c)  # takes cluster c itself
                self.cache.release(entry)
                continue
            entry = await self.cache.get(self.kind, self.table[index])
            try:
                blk: RefBlock = entry.value
                base = index << self.block_shift
                first = blk.first_free(c - base, self.block_entries)
                if first < 0:
                    self.cursor = base + self.block_entries
                    continue
                start = base + first
                if (start + count) << self.cluster_bits > MAX_HOST_OFFSET:
                    raise NbdError(errno.ENOSPC, "image file offsets exhausted")
                n = 1
                blk.set(first, 1)
                stop = min(first + count, self.block_entries)
                while first + n < stop and blk.get(first + n) == 0:
                    blk.set(first + n, 1)
                    n += 1
                self.cache.mark_dirty(entry)
                self.cursor = start + n
                return start, n, entry
            finally:
                self.cache.release(entry)

    async def _new_block(self, index: int, at_cluster: int) -> CacheEntry:
        """Create refcount block ``index`` (whose range is all free) at ``at_cluster`` inside it.

        Written and synced before the table entry pointing at it is written (and synced).
        Returns the entry pinned.
        """
        assert at_cluster >> self.block_shift == index
        blk = RefBlock.empty(self.bits, self.cs)
        blk.set(at_cluster & (self.block_entries - 1), 1)
        offset = at_cluster << self.cluster_bits
        self._place(offset, self.cs, REFBLOCK, "refcount block")
        entry = self.cache.put_new(self.kind, offset, blk)
        await self.cache.writeback([entry])
        self.table[index] = offset
        await settled(self.storage.write(self.table_offset + index * 8, struct.pack(">Q", offset)))
        await self.storage.flush()
        if self.cursor == at_cluster:
            self.cursor += 1
        await self.cache.make_room()  # ``entry`` is pinned, so it stays
        return entry

    async def _grow_table(self, need_index: int) -> None:
        """Make the table cover block ``need_index``: new blocks + new table past the covered area."""
        old_n = len(self.table)
        start = old_n << self.block_shift  # first cluster no block covers: all free
        new_n = max(2 * old_n, need_index + 1)
        while True:
            table_clusters = -(-new_n * 8 // self.cs)
            nblocks = 1
            while -(-(nblocks + table_clusters) // self.block_entries) > nblocks:
                nblocks += 1
            if new_n >= old_n + nblocks:
                break
            new_n = old_n + nblocks
        if table_clusters * self.cs > 8 << 20:
            raise NbdError(errno.ENOSPC, "refcount table would exceed 8 MiB")
        used = nblocks + table_clusters
        self._place(start << self.cluster_bits, nblocks * self.cs, REFBLOCK, "refcount block")
        self._place((start + nblocks) << self.cluster_bits, table_clusters * self.cs, REFTABLE, "refcount table")
        new_table = array("Q", self.table)
        new_table.extend([0] * (table_clusters * self.cs // 8 - old_n))
        entries = []
        for j in range(nblocks):
            blk = RefBlock.empty(self.bits, self.cs)
            lo = start + j * self.block_entries
            for c in range(lo, min(lo + self.block_entries, start + used)):
                blk.set(c - lo, 1)
            offset = (start + j) << self.cluster_bits
            new_table[old_n + j] = offset
            entries.append(self.cache.put_new(self.kind, offset, blk))
        await self.cache.writeback(entries)
        for e in entries:
            self.cache.release(e)
        await self.cache.make_room()
        table_offset = (start + nblocks) << self.cluster_bits
        await settled(self.storage.write(table_offset, encode_be64(new_table)))
        await self.storage.flush()
        await settled(self.storage.write(FIELD_REFCOUNT_TABLE, struct.pack(">QI", table_offset, table_clusters)))
        await self.storage.flush()
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.table = new_table
        self.table_offset, self.table_clusters = table_offset, table_clusters
        first_old = old_offset >> self.cluster_bits
        if self.meta is not None:
            self.meta.remove(old_offset, old_clusters * self.cs, REFTABLE)
        await self.decref(range(first_old, first_old + old_clusters))
        self.cursor = min(self.cursor, first_old)

    def _place(self, offset: int, length: int, kind: int, what: str) -> None:
        """New refcount structures go to clusters the refcounts call free: refuse if the
        overlap map knows them as metadata, else enter them into it."""
        if self.meta is None:
            return
        bad = self.meta.conflict(offset, length)
        if bad is not None:
            self.refuse(f"new {what} at 0x{offset:x} would overwrite {bad}")
        self.meta.add(offset, length, kind)


def _refuse_unchecked(reason: str) -> NoReturn:
    raise AssertionError(f"refcount update on an image opened without its overlap map: {reason}")

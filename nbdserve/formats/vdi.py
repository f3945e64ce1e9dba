"""The VDI driver (VirtualBox Disk Image): dynamic and static images, read-write.

Owns one VDI file: the header (sector 0, little-endian, field names as in QEMU's and
VirtualBox's sources), the block map (one u32 per virtual block, 512-byte pages in the shared
cluster cache), the reverse map (data block index -> virtual block, in memory) and the count of
allocated blocks.  The on-disk facts are in docs/vdi.md.  A block map entry is a data block
index (its data lies at ``offset_data + index * block_size``), 0xFFFFFFFF (never allocated) or
0xFFFFFFFE (discarded: zeroes).  VDI has no parent here: both kinds of unallocated block read as
zeroes and are reported as this layer's zeroes (as QEMU reports them).  Differencing, undo and
linked images are refused.

Invariant (of every image this driver leaves, at any crash point): the header's
``blocks_allocated`` is at least one more than every index the block map uses, so an allocator
that appends at ``blocks_allocated`` (QEMU, VirtualBox, us) never hands out a used block.
  * Allocation: the block's data (at index ``blocks_allocated``; any stale bytes there zeroed
    first) -> [flush: fdatasync] -> header with the count + 1 -> fdatasync -> block map entry.
  * Removal (TRIM of a whole block, or of part of a block whose other bytes are all zero; and
    WRITE_ZEROES that may trim), as VirtualBox does it but in a crash-safe order: the freed
    entry becomes 0xFFFFFFFE (written, synced); the last data block is copied into the freed
    slot (synced); the moved block's entry points at its new slot (synced); the header's count
    drops by one (synced); the file is cut after the last block.  (VirtualBox copies first, so
    a crash can show the moved block's bytes where zeroes were promised.)  Each table change is
    made in memory together with ``mappings_changed``, and while the block being checked or
    moved is read or copied, lock-free writes to it are held back (``_moving``: they take the
    slow path and wait for the lock), so no write lands in a slot after it was read.  Lock-free
    I/O already in flight on a storage that completes later (RBD, S3) is waited for first
    (``_in_flight``, ``_quiesce``): every lock-free read and write of block data is counted
    until it completes, and on such a storage there is no mapping memo (``map_bits`` 0), so
    every read of block data passes through here and is counted.  (On a local file each read
    and write completes before it returns: nothing is ever in flight.)
A crash between those writes leaves a count that disagrees with the map (``qemu-img check``
reports it) or a hole in the index space; a read-write open repairs both (moving blocks down
into holes, fixing the count, cutting leaked blocks off the end) before serving.

Static images keep their preallocated blocks: TRIM does nothing and zeroes are written in place.

Open-time checks (one-line ``ImageError`` naming the field): signature, version 1.1, header
size, image type, sector size, block size (a power of two, 512 B .. 64 MiB), block_extra 0,
disk size against the block count and the limit, offsets aligned and inside the file, the block
map before the data and inside the file, every entry a valid index used once, each block's data
inside the file.  Memory: the map is scanned a chunk at a time; the reverse map and the "used
once" bitmap are bounded by the map's size in the file.

Locking: ``self.lock`` (a CoMutex) guards the block map, the header, the count and the reverse
map.  Reads and writes of allocated blocks take no lock and do not suspend once the map page is
cached; allocation re-checks the entry under the lock.  Zeroing in place looks the block up and
zeroes it under the lock (a removal may move the block meanwhile otherwise).
"""

from __future__ import annotations

import errno
import logging
import struct
import uuid
from array import array
from collections.abc import Awaitable
from typing import NamedTuple

from ..cache import CacheEntry, ClusterCache
from ..errors import CorruptImage, NbdError, UnsupportedImage
from ..locks import CoMutex, CoQueue
from ..storage.base import Pending, Storage, joined, read_at, settled
from .base import (
    ALLOCATED,
    DATA,
    ZERO,
    Caps,
    Extent,
    FormatDriver,
    InPlaceWrites,
    Limits,
    OpenOptions,
    TableReads,
    zero_in_place,
)
from .tables import decode_le32, encode_le

log = logging.getLogger(__name__)

SECTOR = 512
SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
TYPE_DYNAMIC = 1
TYPE_STATIC = 2
UNALLOCATED = 0xFFFFFFFF
DISCARDED = 0xFFFFFFFE
MAX_BLOCKS = 0x3FFFFFFF
MIN_BLOCK, MAX_BLOCK = SECTOR, 64 << 20
PRE_HEADER = 0x48  # text, signature, version
MIN_HEADER_SIZE = 0x180
PAGE = SECTOR  # bytes of block map per cache entry (one sector: written atomically)
PAGE_ENTRIES = PAGE // 4
SCAN_CHUNK = 1 << 20  # bytes of block map decoded at a time at open
STATUS_BLOCKS = 4096

HEADER = struct.Struct("<64sIIIII256sIIIIIIIQIIII16s16s16s16s")


class Header(NamedTuple):
    """The header's fields, in their order on disk (``HEADER``)."""

    text: bytes
    signature: int
    version: int
    header_size: int
    image_type: int
    image_flags: int
    description: bytes
    offset_bmap: int
    offset_data: int
    cylinders: int
    heads: int
    sectors: int
    sector_size: int
    unused1: int
    disk_size: int
    block_size: int
    block_extra: int
    blocks_in_image: int
    blocks_allocated: int
    uuid_image: bytes
    uuid_last_snap: bytes
    uuid_link: bytes
    uuid_parent: bytes


BLOCKS_ALLOCATED_AT = 0x184


def _identity(buf: bytearray) -> bytearray:
    return buf


class VdiDriver(TableReads, InPlaceWrites, FormatDriver):
    format_name = "vdi"
    guest_positions = False

    def __init__(self, storage: Storage, readonly: bool, cache: ClusterCache, h: Header) -> None:
        self.storage = storage
        self.path = storage.name
        self.readonly = readonly
        self.cache = cache
        self.lock = CoMutex(f"vdi {storage.name}")
        self.static = h.image_type == TYPE_STATIC
        self.offset_bmap, self.offset_data = h.offset_bmap, h.offset_data
        self.block_size = h.block_size
        self.block_bits = self.block_size.bit_length() - 1
        self.blocks = h.blocks_in_image
        self.allocated = h.blocks_allocated  # the header's count, as we keep it
        self.size = -(-h.disk_size // SECTOR) * SECTOR
        self.limits = Limits(align=1)
        writable = not readonly
        self.caps = Caps(native_zero=writable, native_trim=writable)
        # The memo's reads would bypass ``_in_flight``: only where nothing is ever in flight.
        self.map_bits = self.block_bits if storage.sync_io else 0
        self.rev = array("I")  # data block index -> virtual block (UNALLOCATED: unused)
        # The virtual block whose data ``_remove`` is copying to another slot (-1: none); writes
        # to it wait for the lock, so none lands in the old slot after it was read.
        self._moving = -1
        # Lock-free block data I/O started and not yet completed (only a storage that completes
        # later has any); ``_quiesce`` waits in ``_idle`` until there is none.
        self._in_flight: dict[int, int] = {}  # generation -> count
        self._gen = 0
        self._idle = CoQueue()
        self.bmap_kind = cache.kind(storage, name="VDI block map page", size=PAGE, decode=decode_le32, encode=encode_le)
        self.header_kind = cache.kind(storage, name="VDI header", size=SECTOR, decode=bytearray, encode=_identity)

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        return 100 if len(head) >= 0x48 and struct.unpack_from("<I", head, 0x40)[0] == SIGNATURE else 0

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    async def open(cls, storage: Storage, *, readonly: bool, cache: ClusterCache, options: OpenOptions) -> VdiDriver:
        drv = cls(storage, readonly or storage.readonly, cache, await _parse_header(storage))
        await drv._scan()
        if not drv.readonly:
            await drv._repair()
        return drv

    async def _scan(self) -> None:
        """Check every block map entry; build the reverse map."""
        path, bs, storage = self.path, self.block_size, self.storage
        rev = array("I", [UNALLOCATED]) * self.blocks
        for first in range(0, self.blocks, SCAN_CHUNK // 4):
            n = min(SCAN_CHUNK // 4, self.blocks - first)
            chunk = decode_le32(await read_at(storage, self.offset_bmap + first * 4, n * 4))
            for k, e in enumerate(chunk):
                if e >= DISCARDED:
                    continue
                vb = first + k
                if e >= self.blocks:
                    raise CorruptImage(path, f"block map entry {vb} ({e}) is not a block index below {self.blocks}")
                if rev[e] != UNALLOCATED:
                    raise CorruptImage(path, f"block map entries {rev[e]} and {vb} both use data block {e}")
                need = min(bs, self.size - vb * bs) if vb * bs < self.size else 0
                if self.offset_data + e * bs + need > storage.size:
                    raise CorruptImage(path, f"block map entry {vb} ({e}): its data lies past the end of the file")
                rev[e] = vb
        self.rev = rev

    async def _repair(self) -> None:
        """Make the data block indices dense and the header's count true (after a crash, or an
        image some other tool left so).  Runs before anything is served: no lock."""
        used = len(self.rev) - self.rev.count(UNALLOCATED)
        end = self.offset_data + used * self.block_size
        cut = not self.static and self.storage.size > end
        if used == self.allocated and not self.rev[:used].count(UNALLOCATED) and not cut:
            return
        log.warning("%s: block count %d, %d blocks in use: repairing", self.path, self.allocated, used)
        hole = 0
        top = len(self.rev) - 1
        while True:
            while hole < len(self.rev) and self.rev[hole] != UNALLOCATED:
                hole += 1
            while top >= 0 and self.rev[top] == UNALLOCATED:
                top -= 1
            if top < hole:
                break
            vb = self.rev[top]
            await self._copy_block(top, hole)
            await self.storage.flush()
            page = await self._page(vb)
            try:
                page.value[vb % PAGE_ENTRIES] = hole
                self.rev[hole], self.rev[top] = vb, UNALLOCATED
                self.cache.mark_dirty(page)
                await self.cache.writeback([page])
            finally:
                self.cache.release(page)
        header = await self.cache.get(self.header_kind, 0)
        try:
            self.allocated = used
            struct.pack_into("<I", header.value, BLOCKS_ALLOCATED_AT, used)
            self.cache.mark_dirty(header)
            await self.cache.writeback([header])
        finally:
            self.cache.release(header)
        if cut:
            await self.storage.truncate(end)
            await self.storage.flush()

    # -- lookups ----------------------------------------------------------------------------

    def _host(self, index: int) -> int:
        return self.offset_data + index * self.block_size

    def _counted(self, pending: Pending, pendings: list) -> None:
        """Add ``pending`` (lock-free block data I/O just started) to ``pendings``, counted in
        ``_in_flight`` under the current generation until it completes."""
        if pending is not None:
            gen = self._gen
            self._in_flight[gen] = self._in_flight.get(gen, 0) + 1
            pendings.append(self._uncount_after(pending, gen))

    async def _uncount_after(self, pending: Awaitable[None], gen: int) -> None:
        try:
            await pending
        finally:
            left = self._in_flight[gen] - 1
            if left:
                self._in_flight[gen] = left
            else:
                del self._in_flight[gen]
                self._idle.wake_all()

    async def _quiesce(self) -> None:
        """Wait until the lock-free block data I/O started before this call has completed (I/O
        started later is not waited for, so a busy storage cannot starve a removal).  Called
        with self.lock held and ``_moving`` set, so no new write to the block being moved
        starts meanwhile."""
        self.lock.assert_locked()
        gen = self._gen
        self._gen += 1
        while any(g <= gen for g in self._in_flight):
            await self._idle.wait()

    async def _copy_block(self, src: int, dst: int) -> None:
        """Copy data block ``src`` into the slot of data block ``dst``."""
        block = await read_at(self.storage, self._host(src), self.block_size)
        await settled(self.storage.write(self._host(dst), block))

    def _entry_now(self, vb: int) -> int | None:
        """Block map entry ``vb`` if its page is cached, else None (never suspends)."""
        e = self.cache.peek(self.bmap_kind, self.offset_bmap + vb // PAGE_ENTRIES * PAGE)
        return None if e is None else e.value[vb % PAGE_ENTRIES]

    async def _page(self, vb: int) -> CacheEntry:
        """The block map page holding entry ``vb``, pinned (the caller releases it)."""
        return await self.cache.get(self.bmap_kind, self.offset_bmap + vb // PAGE_ENTRIES * PAGE)

    async def _entry(self, vb: int) -> int:
        value = self._entry_now(vb)
        if value is None:
            page = await self._page(vb)
            self.cache.release(page)
            value = page.value[vb % PAGE_ENTRIES]
        return value

    def map_now(self, offset: int) -> int | None:
        e = self._entry_now(offset >> self.block_bits)
        return None if e is None or e >= DISCARDED else self._host(e)

    # -- reads ------------------------------------------------------------------------------

    def _read_cached(self, offset: int, buf: memoryview, pos: int, pendings: list) -> int:
        """Start the reads of ``buf`` (guest ``offset``) from ``pos`` (relative to ``buf``) on,
        block by block, while the map pages are cached; returns where it stopped.  Synchronous:
        each storage read starts right after its lookup."""
        bits, bs, n, storage = self.block_bits, self.block_size, len(buf), self.storage
        while pos < n:
            off = offset + pos
            inblk = off & (bs - 1)
            cnt = min(bs - inblk, n - pos)
            e = self._entry_now(off >> bits)
            if e is None:
                return pos
            if e >= DISCARDED:
                buf[pos : pos + cnt] = bytes(cnt)
            else:
                self._counted(storage.read(self._host(e) + inblk, buf[pos : pos + cnt]), pendings)
            pos += cnt
        return pos

    async def _load_for_read(self, offset: int, buf: memoryview, pos: int, pendings: list) -> int:
        """The map page ``_read_cached`` stopped at (see ``TableReads``)."""
        await self._entry((offset + pos) >> self.block_bits)
        return pos

    async def block_status(self, offset: int, length: int) -> Extent:
        bits = self.block_bits
        end = min(offset + length, ((offset >> bits) + STATUS_BLOCKS) << bits)
        pos, state = offset, None
        while pos < end:
            st = ALLOCATED | ZERO if await self._entry(pos >> bits) >= DISCARDED else ALLOCATED | DATA
            if state is None:
                state = st
            elif st != state:
                break
            pos = min(end, ((pos >> bits) + 1) << bits)
        return Extent(pos - offset, state)

    async def cache_hint(self, offset: int, length: int) -> None:
        first = offset >> self.block_bits
        last = min((offset + length - 1) >> self.block_bits, first + STATUS_BLOCKS - 1)
        for page in range(first // PAGE_ENTRIES, last // PAGE_ENTRIES + 1):
            await self._entry(page * PAGE_ENTRIES)

    # -- writes -----------------------------------------------------------------------------

    def _write_in_place(self, offset: int, data: memoryview) -> list | None:
        """Start the writes without the lock if every block is allocated, its map page cached
        and not being moved (returns their Pendings); else None, and nothing written."""
        bits, bs, n = self.block_bits, self.block_size, len(data)
        plan = []
        pos = 0
        while pos < n:
            off = offset + pos
            inblk = off & (bs - 1)
            cnt = min(bs - inblk, n - pos)
            e = self._entry_now(off >> bits)
            if e is None or e >= DISCARDED or off >> bits == self._moving:
                return None
            plan.append((pos, cnt, self._host(e) + inblk))
            pos += cnt
        pendings: list = []
        for pos, cnt, host in plan:
            self._counted(self.storage.write(host, data[pos : pos + cnt]), pendings)
        return pendings

    async def _write_slow(self, offset: int, data: memoryview, fua: bool) -> None:
        """``write`` block by block: in place where allocated, else allocating under the lock."""
        bits, bs = self.block_bits, self.block_size
        n = len(data)
        pos = 0
        while pos < n:
            off = offset + pos
            inblk = off & (bs - 1)
            cnt = min(bs - inblk, n - pos)
            vb = off >> bits
            e = self._entry_now(vb)
            if e is None:
                e = await self._entry(vb)
            if e < DISCARDED and vb != self._moving:
                pendings: list = []
                self._counted(self.storage.write(self._host(e) + inblk, data[pos : pos + cnt]), pendings)
                await settled(joined(pendings))
            else:
                async with self.lock:
                    await self._allocate(vb, inblk, data[pos : pos + cnt])
            pos += cnt
        if fua:
            await self.flush()

    async def _allocate(self, vb: int, inblk: int, data: memoryview) -> None:
        """Write ``data`` at ``inblk`` of virtual block ``vb``, allocating it unless a
        concurrent write already did.  Called with self.lock held."""
        self.lock.assert_locked()
        page = await self._page(vb)
        header = await self.cache.get(self.header_kind, 0)
        try:
            e = page.value[vb % PAGE_ENTRIES]
            if e < DISCARDED:
                await settled(self.storage.write(self._host(e) + inblk, data))
                return
            index = self.allocated
            if index >= self.blocks:
                raise NbdError(errno.ENOSPC, f"{self.path}: every data block is in use")
            host = self._host(index)
            size = self.storage.size
            if host < size:
                await zero_in_place(self.storage, host, min(self.block_size, size - host), False)
            await settled(self.storage.write(host + inblk, data))
            if self.storage.size < host + self.block_size:
                await self.storage.truncate(host + self.block_size)
            self.allocated = index + 1
            struct.pack_into("<I", header.value, BLOCKS_ALLOCATED_AT, index + 1)
            self.cache.mark_dirty(header, sync_before=True)
            page.value[vb % PAGE_ENTRIES] = index
            self.rev[index] = vb
            self.cache.mark_dirty(page, after=[header])
        finally:
            self.cache.release(header)
            self.cache.release(page)
        await self.cache.make_room()

    async def pwrite_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        """Unallocated blocks already read as zeroes; whole allocated blocks are removed when
        trimming is allowed (dynamic images); everything else is zeroed in place."""
        if fast:
            raise NbdError(errno.ENOTSUP, "VDI zeroing is not metadata-only")
        bits, bs = self.block_bits, self.block_size
        pos, end = offset, offset + length
        while pos < end:
            vb = pos >> bits
            inblk = pos & (bs - 1)
            cnt = min(bs - inblk, end - pos)
            if await self._entry(vb) < DISCARDED:
                async with self.lock:
                    if may_trim and cnt == bs and not self.static:
                        await self._remove(vb, 0, bs)
                    else:
                        await self._zero_locked(vb, inblk, cnt, may_trim)
            pos += cnt
        if fua:
            await self.flush()

    async def _zero_locked(self, vb: int, inblk: int, n: int, may_trim: bool) -> None:
        """Zero ``[inblk, inblk+n)`` of virtual block ``vb`` in place if it is allocated.  Called
        with self.lock held (so the block is not moved meanwhile)."""
        self.lock.assert_locked()
        e = await self._entry(vb)
        if e < DISCARDED:
            await zero_in_place(self.storage, self._host(e) + inblk, n, may_trim)

    async def pdiscard(self, offset: int, length: int) -> None:
        """VirtualBox's discard: a block goes away when the range covers it or when the rest of
        it reads as zeroes.  Static images keep their blocks."""
        if self.static:
            return
        bits, bs = self.block_bits, self.block_size
        pos, end = offset, offset + length
        while pos < end:
            inblk = pos & (bs - 1)
            cnt = min(bs - inblk, end - pos)
            if await self._entry(pos >> bits) < DISCARDED:
                async with self.lock:
                    await self._remove(pos >> bits, inblk, cnt)
            pos += cnt

    async def _remove(self, vb: int, a: int, n: int) -> None:
        """Remove virtual block ``vb`` (see the module docstring) if it is allocated and, outside
        ``[a, a+n)``, all zeroes.  Called with self.lock held."""
        self.lock.assert_locked()
        d = await self._entry(vb)
        if d >= DISCARDED or not await self._rest_is_zero(d, a, n):
            return
        await self.cache.flush(self.storage)  # nothing else pending: the writes below go in order
        freed = await self._page(vb)
        header = await self.cache.get(self.header_kind, 0)
        try:
            # (1) The entry says "zeroes" on disk before anything overwrites the block's slot.
            # Checked again: in-place writes take no lock and may have landed meanwhile.
            d = freed.value[vb % PAGE_ENTRIES]
            self._moving = vb
            try:
                await self._quiesce()  # a write to the block started before may still land
                if d >= DISCARDED or not await self._rest_is_zero(d, a, n):
                    return
            finally:
                self._moving = -1
            freed.value[vb % PAGE_ENTRIES] = DISCARDED
            self.rev[d] = UNALLOCATED
            self.mappings_changed()
            self.cache.mark_dirty(freed)
            await self.cache.writeback([freed])
            # (2) The last block moves into the slot (data synced first), then the count drops.
            last = self.allocated - 1
            if d != last:
                moved_vb = self.rev[last]
                moved = await self._page(moved_vb)
                self._moving = moved_vb  # in-place writes to it now wait for the lock
                try:
                    await self._quiesce()  # and those started before have landed
                    await self._copy_block(last, d)
                    moved.value[moved_vb % PAGE_ENTRIES] = d
                    self.rev[d], self.rev[last] = moved_vb, UNALLOCATED
                    self.mappings_changed()
                    self.cache.mark_dirty(moved, sync_before=True)
                    self.cache.mark_dirty(header, after=[moved])
                finally:
                    self._moving = -1
                    self.cache.release(moved)
            self.allocated = last
            struct.pack_into("<I", header.value, BLOCKS_ALLOCATED_AT, last)
            self.cache.mark_dirty(header)
            await self.cache.writeback([header])
        finally:
            self.cache.release(header)
            self.cache.release(freed)
        await self._quiesce()  # reads of the moved block's old slot, started before the move
        await self.storage.truncate(self._host(self.allocated))

    async def _rest_is_zero(self, index: int, a: int, n: int) -> bool:
        """Whether data block ``index`` holds only zero bytes outside ``[a, a+n)``."""
        if a == 0 and n == self.block_size:
            return True
        block = await read_at(self.storage, self._host(index), self.block_size)
        return block[:a].count(0) == a and block[a + n :].count(0) == self.block_size - a - n

    async def flush(self) -> None:
        await self.cache.flush(self.storage)

    async def close(self) -> None:
        if not self.readonly:
            await self.flush()


async def _parse_header(storage: Storage) -> Header:
    """The header fields of a VDI file, validated (see the module docstring)."""
    path, size = storage.name, storage.size
    if size < SECTOR:
        raise CorruptImage(path, f"file of {size} bytes is shorter than a VDI header")
    f = Header._make(HEADER.unpack_from(await read_at(storage, 0, SECTOR)))
    signature, version, header_size, image_type = f.signature, f.version, f.header_size, f.image_type
    offset_bmap, offset_data, sector_size, disk_size = f.offset_bmap, f.offset_data, f.sector_size, f.disk_size
    block_size, block_extra, blocks, allocated = f.block_size, f.block_extra, f.blocks_in_image, f.blocks_allocated
    link, parent = f.uuid_link, f.uuid_parent
    if signature != SIGNATURE:
        raise CorruptImage(path, f"signature 0x{signature:08x} is not 0xbeda107f")
    if version != VERSION_1_1:
        raise UnsupportedImage(path, f"version {version >> 16}.{version & 0xFFFF} is not 1.1")
    if image_type not in (TYPE_DYNAMIC, TYPE_STATIC):
        raise UnsupportedImage(path, f"image_type {image_type} is not dynamic (1) or static (2)")
    if uuid.UUID(bytes=link).int or uuid.UUID(bytes=parent).int:
        raise UnsupportedImage(path, "uuid_link / uuid_parent set: differencing VDI images are not supported")
    if sector_size != SECTOR:
        raise UnsupportedImage(path, f"sector_size {sector_size} is not 512")
    if not MIN_BLOCK <= block_size <= MAX_BLOCK or block_size & (block_size - 1):
        raise UnsupportedImage(path, f"block_size {block_size} is not a power of two in [512, 64 MiB]")
    if block_extra:
        raise UnsupportedImage(path, f"block_extra {block_extra} is not 0")
    if blocks > MAX_BLOCKS:
        raise CorruptImage(path, f"blocks_in_image {blocks} exceeds {MAX_BLOCKS}")
    if disk_size > blocks * block_size:
        raise CorruptImage(path, f"disk_size {disk_size} exceeds blocks_in_image {blocks} x block_size {block_size}")
    if allocated > blocks:
        raise CorruptImage(path, f"blocks_allocated {allocated} exceeds blocks_in_image {blocks}")
    if header_size < MIN_HEADER_SIZE or PRE_HEADER + header_size > offset_bmap:
        raise CorruptImage(path, f"header_size {header_size} is below 0x180 or runs into the block map")
    bmap_end = -(-(offset_bmap + blocks * 4) // SECTOR) * SECTOR
    if offset_bmap % SECTOR or bmap_end > size:
        raise CorruptImage(path, f"offset_bmap 0x{offset_bmap:x} (block map) is unaligned or not inside the file")
    if offset_data % SECTOR or offset_data < bmap_end or (allocated and offset_data >= size):
        raise CorruptImage(path, f"offset_data 0x{offset_data:x} is unaligned, on the block map or past the end")
    return f

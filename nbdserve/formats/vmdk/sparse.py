"""Hosted sparse extents (monolithicSparse, twoGbMaxExtentSparse, streamOptimized), read-write.

Owns one sparse extent file: its grain directory (GD, in memory, written through), the
redundant grain directory (RGD) when the header keeps one, the grain tables (GT) and redundant
grain tables (RGT) in the shared cluster cache, and the allocation cursor ``next_alloc``.  The
on-disk facts are in docs/vmdk.md; in short: GD entry = sector of a GT (0: no table), GT entry =
sector of a grain (0: unallocated, ask the parent; 1 with the zeroed-grain flag: zeroes).

Invariants of an image this module wrote:
  * a GT entry points at a grain only once the grain's bytes are durable (the GT's cache entry
    is marked ``sync_before``: the file is synced before the table reaches it);
  * every GT change is made to the RGT too, in the same step: an RGT touched in this session is a
    copy of its GT (it is taken from the GT when first needed, so a stale RGT is repaired);
  * a new GT (and RGT) is written whole and synced before the GD (and RGD) entry points at it;
  * grains never move and are never unmapped: zeroing or trimming an allocated grain zeroes (or
    punches) it in place, so ``map_now`` answers stay true while the image is open.
Crash order of an allocating write: grain data (copy-on-write head and tail included) appended
at ``next_alloc`` -> [flush: fdatasync] -> GT and RGT sectors -> fdatasync.  A crash before the
GT write leaves a leaked grain at the end of the file and the old content in place.

streamOptimized (compressed grains with markers): reads inflate whole grains (a few are kept,
inflated).  Writes follow QEMU's rule: only whole grains (or the last, short grain of the
extent), only into grains not yet written (unallocated or zeroed); each is deflated and
appended after a grain marker, sector-aligned, and then the GT and RGT point at it.  A stream
whose GD lies at the end of the file (VMware's layout, read from the footer) is read-only.

Open-time checks (bad input is a one-line ``ImageError`` naming the field): every GD and RGD
entry is 0 or points at a table inside the file, the two agree on which tables exist, the
tables fit in the file and no table, directory, descriptor or header overlaps another.  Grain
entries are checked when used: a grain must lie inside the file, at or past ``overHead`` and on
no table or directory (else the request fails with EIO naming the entry).

Reads and writes (the extent contract's one route): the fast case walks the cached grain tables
synchronously and starts each run's storage or backing read (a compressed grain not inflated
yet is the slow case), and writes in place when every grain is allocated and plain; otherwise a
coroutine loads tables or allocates under the lock.

Locking: the driver's ``lock`` guards the GD/RGD, table updates and ``next_alloc``.  Reads and
writes into allocated grains take no lock: a grain's mapping is looked up and its storage I/O
started with no await in between.
"""

from __future__ import annotations

import bisect
import errno
import zlib
from array import array
from collections import OrderedDict
from typing import TYPE_CHECKING

from ...cache import CacheEntry, ClusterCache
from ...errors import CorruptImage, NbdError
from ...storage.base import Pending, Storage, joined, read_at, settled
from ..base import ALLOCATED, DATA, ZERO, ZEROES, zero_in_place
from ..tables import decode_le32, encode_le
from .extent import PLAIN, UNALLOCATED, ZEROED, GrainTableExtent
from .header import FLAG_RGD, FLAG_ZERO_GRAIN, GRAIN_MARKER, SECTOR, SparseHeader

if TYPE_CHECKING:
    from .driver import VmdkDriver

COMPRESSED = 3  # a run kind beside extent's three: one compressed grain
_STATE = {UNALLOCATED: 0, ZEROED: ALLOCATED | ZERO, PLAIN: ALLOCATED | DATA, COMPRESSED: ALLOCATED | DATA}

NO_TABLE = array("I")  # sentinel: the GD entry is 0 (compared by identity)
INFLATED_BYTES = 1 << 20  # inflated grains kept per stream extent
STATUS_TABLES = 64  # grain tables looked at per cache_hint


class SparseExtent(GrainTableExtent):
    no_table = NO_TABLE

    def __init__(
        self, owner: VmdkDriver, start: int, storage: Storage, h: SparseHeader, cache: ClusterCache, what: str
    ) -> None:
        super().__init__(owner, start, h.capacity * SECTOR)
        self.storage = storage
        self.path = storage.name
        self.what = what
        self.h = h
        self.cache = cache
        self.grain = h.grain_size * SECTOR
        self.grain_bits = self.grain.bit_length() - 1
        self.grain_mask = self.grain - 1
        self.grain_sectors = h.grain_size
        self.ngte = h.num_gtes_per_gt
        self.span = self.ngte * self.grain  # guest bytes per grain table
        self.gt_bytes = self.ngte * 4
        self.compressed = h.compressed
        self.zero_grain = bool(h.flags & FLAG_ZERO_GRAIN)
        self.overhead = h.overhead * SECTOR
        self.gd = array("I")
        self.rgd: array | None = None
        codec = dict(size=self.gt_bytes, decode=decode_le32, encode=encode_le)
        self.gt_kind = cache.kind(storage, name="VMDK grain table", **codec)
        self.rgt_kind = cache.kind(storage, name="VMDK redundant grain table", **codec)
        # Tables and directories at or past overHead, sorted: grains must not overlap them.
        self.meta_starts: list[int] = []
        self.meta_ends: list[int] = []
        self.readonly = storage.readonly
        self.why_readonly = f"{what} ({storage.name}) is not writable"
        if h.footer:
            self.readonly = True
            self.why_readonly = f"{what} is a streamOptimized extent with its grain directory at the end"
        elif h.version == 3 and not self.compressed:
            self.readonly = True
            self.why_readonly = f"{what} has version 3 (changed block tracking), which QEMU only reads too"
        align = SECTOR if self.compressed else self.grain
        self.next_alloc = -(-storage.size // align) * align
        self.inflated: OrderedDict[int, bytes] = OrderedDict()
        self.inflated_max = max(1, INFLATED_BYTES >> self.grain_bits)

    # -- opening ----------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the GD (and RGD) and check every table they name (see the module docstring)."""
        h, storage, what = self.h, self.storage, self.what
        n = h.gd_entries
        self.gd = decode_le32(await read_at(storage, h.gd_offset * SECTOR, n * 4))
        if h.flags & FLAG_RGD and h.rgd_offset:
            self.rgd = decode_le32(await read_at(storage, h.rgd_offset * SECTOR, n * 4))
        tables = n - self.gd.count(0)
        copies = 2 if self.rgd is not None else 1
        if tables * copies * self.gt_bytes > storage.size:
            raise CorruptImage(
                self.path, f"{what}: {tables * copies} grain tables of {self.gt_bytes} bytes cannot fit in the file"
            )
        regions = [(0, SECTOR, "the header")]
        if h.descriptor_size:
            regions.append((h.descriptor_offset * SECTOR, h.descriptor_size * SECTOR, "the descriptor"))
        gd_bytes = -(-n * 4 // SECTOR) * SECTOR
        regions.append((h.gd_offset * SECTOR, gd_bytes, "the grain directory"))
        if self.rgd is not None:
            regions.append((h.rgd_offset * SECTOR, gd_bytes, "the redundant grain directory"))
        if h.footer:
            regions.append((storage.size - 3 * SECTOR, 3 * SECTOR, "the footer"))
        for name, directory in (("", self.gd), ("redundant ", self.rgd)):
            if directory is None:
                continue
            for i, sector in enumerate(directory):
                if not sector:
                    continue
                at = sector * SECTOR
                if at + self.gt_bytes > storage.size:
                    raise CorruptImage(
                        self.path, f"{what}: {name}grain directory entry {i} (sector {sector}) is past the end of file"
                    )
                regions.append((at, self.gt_bytes, f"{name}grain table {i}"))
        if self.rgd is not None:
            for i in range(n):
                if (self.gd[i] == 0) != (self.rgd[i] == 0):
                    raise CorruptImage(
                        self.path, f"{what}: grain directory entry {i} and its redundant copy disagree on the table"
                    )
        regions.sort()
        end, last = 0, ""
        for at, length, name in regions:
            if at < end:
                raise CorruptImage(self.path, f"{what}: {name} at 0x{at:x} overlaps {last}")
            end, last = at + length, name
            if at + length > self.overhead:
                self.meta_starts.append(at)
                self.meta_ends.append(at + length)

    # -- lookups ----------------------------------------------------------------------------

    def _bad(self, pos: int, value: int, why: str) -> CorruptImage:
        sector = (self.start + pos) // SECTOR
        return CorruptImage(self.path, f"{self.what}: grain table entry for guest sector {sector} ({value}) {why}")

    def _check_host(self, pos: int, value: int, host: int, length: int) -> None:
        """Data for guest ``pos`` at host ``[host, host+length)``: past overHead, inside the file,
        on no table or directory."""
        if host < self.overhead:
            raise self._bad(pos, value, f"points below overHead ({self.h.overhead} sectors)")
        if host + length > self.storage.size:
            raise self._bad(pos, value, "points beyond the end of the file")
        k = bisect.bisect_left(self.meta_starts, host + length) - 1
        if k >= 0 and self.meta_ends[k] > host:
            raise self._bad(pos, value, f"overlaps metadata at 0x{self.meta_starts[k]:x}")

    def _kind(self, value: int) -> int:
        if value == 0:
            return UNALLOCATED
        if value == 1 and self.zero_grain:
            return ZEROED
        return COMPRESSED if self.compressed else PLAIN

    def _run(self, table: array, pos: int, end: int, contiguous: bool = True) -> tuple[int, int, int]:
        """(kind, run_end, host) for guest ``[pos, end)`` inside one grain table: the run of
        grains of one kind from ``pos``; for plain data with ``contiguous`` only while the grains
        follow each other in the file, ``host`` being where ``pos`` lies.  Compressed: one grain.
        Plain grains are checked (``_check_host``)."""
        gb, gs = self.grain_bits, self.grain_sectors
        g = pos >> gb
        i = i0 = g % self.ngte
        last = i0 + ((end - 1) >> gb) - g  # index of the range's last grain
        value = table[i]
        kind = self._kind(value)
        if kind == COMPRESSED:
            return kind, min((g + 1) << gb, end), value * SECTOR
        if kind == PLAIN:
            host = value * SECTOR + (pos & self.grain_mask)
            if contiguous:
                want = value + gs
                while i < last and table[i + 1] == want:
                    i += 1
                    want += gs
                stop = min((g + i - i0 + 1) << gb, end)
                self._check_host(pos, value, host, stop - pos)
                return kind, stop, host
            self._check_host(pos, value, host, min((g + 1) << gb, end) - pos)
            while i < last and self._kind(table[i + 1]) == PLAIN:
                i += 1
                at = (g + i - i0) << gb
                self._check_host(at, table[i], table[i] * SECTOR, min(at + self.grain, end) - at)
            return kind, min((g + i - i0 + 1) << gb, end), host
        while i < last and table[i + 1] == value:
            i += 1
        return kind, min((g + i - i0 + 1) << gb, end), 0

    def _peek(self, gdi: int) -> array | None:
        """Grain table ``gdi`` if it is cached (NO_TABLE if the GD has none), else None."""
        sector = self.gd[gdi]
        if not sector:
            return NO_TABLE
        e = self.cache.peek(self.gt_kind, sector * SECTOR)
        return None if e is None else e.value

    async def _table(self, gdi: int) -> array:
        """Grain table ``gdi`` (NO_TABLE if none); valid until the next await."""
        table = self._peek(gdi)
        if table is not None:
            return table
        e = await self.cache.get(self.gt_kind, self.gd[gdi] * SECTOR)
        self.cache.release(e)
        return e.value

    async def _get(self, gdi: int) -> CacheEntry | None:
        """Grain table ``gdi`` pinned (the caller releases it), or None if the GD has none."""
        sector = self.gd[gdi]
        return await self.cache.get(self.gt_kind, sector * SECTOR) if sector else None

    def map_now(self, rel: int) -> int | None:
        table = self._peek(rel // self.span)
        if table is None or table is NO_TABLE:
            return None
        value = table[(rel >> self.grain_bits) % self.ngte]
        if self._kind(value) != PLAIN:
            return None
        host = value * SECTOR + (rel & self.grain_mask)
        try:
            self._check_host(rel, value, host, 1 << self.owner.map_bits)
        except CorruptImage:
            return None
        return host

    async def status(self, rel: int, end: int) -> tuple[int, int]:
        gdi = rel // self.span
        seg_end = min(end, (gdi + 1) * self.span)
        table = await self._table(gdi)
        if table is NO_TABLE:
            return 0, seg_end
        kind, stop, _ = self._run(table, rel, seg_end, contiguous=False)
        while kind == COMPRESSED and stop < seg_end:
            nxt, more, _ = self._run(table, stop, seg_end, contiguous=False)
            if nxt != COMPRESSED:
                break
            stop = more
        return _STATE[kind], stop

    async def cache_hint(self, rel: int, length: int) -> None:
        first = rel // self.span
        last = min((rel + length - 1) // self.span, first + STATUS_TABLES - 1)
        for gdi in range(first, last + 1):
            await self._table(gdi)

    # -- reads ------------------------------------------------------------------------------

    def _place(self, kind: int, host: int, pos: int, stop: int, part: memoryview) -> bool:
        """A compressed grain: copied from the inflated grains if it is among them."""
        grain = self.inflated.get(host)
        if grain is None:
            return False
        self.inflated.move_to_end(host)
        g0 = pos & ~self.grain_mask
        part[:] = grain[pos - g0 : stop - g0]
        return True

    async def _load_for_read(self, rel: int, buf: memoryview, pos: int, pendings: list) -> int:
        """The grain table ``_read_cached`` stopped at, or the compressed grain it could not
        place, inflated and copied (see ``TableReads``)."""
        gdi = pos // self.span
        table = await self._table(gdi)
        if table is not NO_TABLE:
            kind, stop, host = self._run(table, pos, min(rel + len(buf), (gdi + 1) * self.span))
            if kind == COMPRESSED:
                g0 = pos & ~self.grain_mask
                grain = await self._inflate(g0, host)
                buf[pos - rel : stop - rel] = grain[pos - g0 : stop - g0]
                return stop
        return pos

    async def _inflate(self, g0: int, host: int) -> bytes:
        """The grain at guest ``g0`` stored compressed at ``host`` (marker first), inflated."""
        grain = self.inflated.get(host)
        if grain is not None:
            self.inflated.move_to_end(host)
            return grain
        value = host // SECTOR
        self._check_host(g0, value, host, GRAIN_MARKER.size)
        head = await read_at(self.storage, host, min(SECTOR, self.storage.size - host))
        lba, size = GRAIN_MARKER.unpack_from(head)
        if lba != g0 // SECTOR:
            raise self._bad(g0, value, f"leads to a grain marker for sector {lba}")
        if not 0 < size <= 2 * self.grain + SECTOR:
            raise self._bad(g0, value, f"leads to a grain marker of {size} compressed bytes")
        self._check_host(g0, value, host, GRAIN_MARKER.size + size)
        data = await read_at(self.storage, host + GRAIN_MARKER.size, size)
        need = min(self.grain, self.size - g0)
        try:
            d = zlib.decompressobj()
            grain = d.decompress(data, self.grain)
        except zlib.error as e:
            raise self._bad(g0, value, f"leads to a grain that does not inflate ({e})") from None
        if len(grain) < need:
            raise self._bad(g0, value, f"leads to a grain that inflates to {len(grain)} bytes, not {need}")
        self.inflated[host] = grain
        if len(self.inflated) > self.inflated_max:
            self.inflated.popitem(last=False)
        return grain

    # -- writes -----------------------------------------------------------------------------

    def write(self, rel: int, data: memoryview) -> Pending:
        pendings = None if self.compressed else self._write_in_place(rel, data)
        if pendings is None:
            return self._write_slow(rel, data)
        return joined(pendings)

    async def _write_slow(self, rel: int, data: memoryview) -> None:
        """``write`` that allocates (or appends compressed grains): under the owner's lock."""
        async with self.owner.lock:
            if self.compressed:
                await self._write_stream(rel, data)
            else:
                await self._write_locked(rel, data)

    def _write_in_place(self, rel: int, data: memoryview) -> list | None:
        """Start the writes without the lock if every grain is allocated and its GT cached
        (returns their Pendings); else None, and nothing written."""
        end = rel + len(data)
        pos = rel
        plan: list[tuple[int, int, int]] = []
        while pos < end:
            gdi = pos // self.span
            table = self._peek(gdi)
            if table is None or table is NO_TABLE:
                return None
            kind, stop, host = self._run(table, pos, min(end, (gdi + 1) * self.span))
            if kind != PLAIN:
                return None
            plan.append((pos, stop, host))
            pos = stop
        pendings = []
        for start, stop, host in plan:
            p = self.storage.write(host, data[start - rel : stop - rel])
            if p is not None:
                pendings.append(p)
        return pendings

    async def _write_locked(self, rel: int, data: memoryview) -> None:
        """Write, allocating grains as needed.  Called with owner.lock held."""
        end = rel + len(data)
        pos = rel
        while pos < end:
            gdi = pos // self.span
            seg_end = min(end, (gdi + 1) * self.span)
            entry = await self._get(gdi)
            if entry is None:
                await self._allocate(pos, seg_end, data[pos - rel : seg_end - rel], gdi, None)
                pos = seg_end
                continue
            try:
                kind, stop, host = self._run(entry.value, pos, seg_end)
                if kind == PLAIN:
                    await settled(self.storage.write(host, data[pos - rel : stop - rel]))
                else:
                    stop = self._unallocated_end(entry.value, pos, seg_end)
                    await self._allocate(pos, stop, data[pos - rel : stop - rel], gdi, entry)
            finally:
                self.cache.release(entry)
            pos = stop

    def _unallocated_end(self, table: array, pos: int, seg_end: int) -> int:
        """End of the run of unallocated or zeroed grains (mixed) from ``pos``."""
        gb = self.grain_bits
        i = (pos >> gb) % self.ngte
        nxt = ((pos >> gb) + 1) << gb
        while nxt < seg_end and self._kind(table[i + 1]) in (UNALLOCATED, ZEROED):
            i += 1
            nxt += self.grain
        return min(nxt, seg_end)

    async def _alloc(self, length: int) -> int:
        """Reserve ``length`` bytes at the cursor; anything past it (a failed allocation's
        leftovers) is cut off first, so the new space reads as zeroes.  Called with owner.lock held."""
        if self.storage.size > self.next_alloc:
            await self.storage.truncate(self.next_alloc)
        host = self.next_alloc
        self.next_alloc += length
        return host

    async def _unalloc(self, host: int) -> None:
        """Give back what ``_alloc`` reserved from ``host`` on.  Called with owner.lock held."""
        self.next_alloc = host
        if self.storage.size > host:
            await self.storage.truncate(host)

    async def _allocate(self, pos: int, stop: int, data: memoryview, gdi: int, entry: CacheEntry | None) -> None:
        """New grains for guest ``[pos, stop)`` (unallocated or zeroed grains of one GT, or all of
        a missing GT): data plus copy-on-write of the partial head and tail grains, then the
        tables.  Called with owner.lock held."""
        gs = self.grain
        first = pos & ~self.grain_mask
        last = -(-stop // gs) * gs
        n = (last - first) >> self.grain_bits
        table = None if entry is None else entry.value
        host = await self._alloc(n * gs)
        try:
            if pos > first:
                await self._cow(first, pos, host, table)
            await settled(self.storage.write(host + (pos - first), data))
            if last > stop:
                await self._cow(stop, last, host + (stop - first), table)
            if self.storage.size < host + n * gs:
                await self.storage.truncate(host + n * gs)
        except BaseException:
            await self._unalloc(host)
            raise
        i0 = (first >> self.grain_bits) % self.ngte
        sector = host // SECTOR
        values = range(sector, sector + n * self.grain_sectors, self.grain_sectors)
        if entry is None:
            await self._new_table(gdi, i0, values)
        else:
            self._set_entries(gdi, entry, i0, values)
        await self.cache.make_room()

    async def _cow(self, start: int, stop: int, host: int, table: array | None) -> None:
        """Fill guest ``[start, stop)`` of a new grain at ``host`` with what it read before: the
        parent's bytes for an unallocated grain, zeroes (already there: the grain is new space
        past the old end of file) for a zeroed one.  Called with owner.lock held."""
        value = 0 if table is None else table[(start >> self.grain_bits) % self.ngte]
        if value != 0 or self.owner.backing is None:
            return
        buf = bytearray(stop - start)
        inside = min(stop, self.size) - start
        if inside > 0:
            await settled(self.owner.read_backing(self.start + start, memoryview(buf)[:inside]))
        await settled(self.storage.write(host, buf))

    def _set_entries(self, gdi: int, entry: CacheEntry, i0: int, values: range | list[int]) -> None:
        """Point GT ``gdi`` entries ``i0..`` (and the RGT's) at ``values``: both tables dirty,
        written after a sync of the grains.  Synchronous.  Called with owner.lock held."""
        table = entry.value
        copy = None
        if self.rgd is not None:
            at = self.rgd[gdi] * SECTOR
            copy = self.cache.peek(self.rgt_kind, at)
            if copy is None:
                copy = self.cache.put_new(self.rgt_kind, at, array("I", table))
                self.cache.release(copy)
        new = array("I", values)
        table[i0 : i0 + len(new)] = new
        self.cache.mark_dirty(entry, sync_before=True)
        if copy is not None:
            copy.value[i0 : i0 + len(new)] = new
            self.cache.mark_dirty(copy, sync_before=True)

    async def _new_table(self, gdi: int, i0: int, values: range | list[int]) -> None:
        """Create GT ``gdi`` (and its RGT) holding ``values`` at ``i0..``: appended, written and
        synced (after the grains they point at), then the GD (and RGD) entry.  Called with
        owner.lock held."""
        size = -(-self.gt_bytes // SECTOR) * SECTOR
        copies = 1 if self.rgd is None else 2
        region = -(-size * copies // self.grain) * self.grain
        at = await self._alloc(region)
        await self.storage.truncate(at + region)
        table = array("I", bytes(self.gt_bytes))
        table[i0 : i0 + len(values)] = array("I", values)
        entries = [self.cache.put_new(self.gt_kind, at, table)]
        if self.rgd is not None:
            entries.append(self.cache.put_new(self.rgt_kind, at + size, array("I", table)))
        try:
            for e in entries:
                self.cache.mark_dirty(e, sync_before=True)
            await self.cache.writeback(entries)
        finally:
            for e in entries:
                self.cache.release(e)
        for k, e in enumerate(entries):
            directory = self.gd if k == 0 else self.rgd
            offset = self.h.gd_offset if k == 0 else self.h.rgd_offset
            directory[gdi] = e.offset // SECTOR
            await settled(self.storage.write(offset * SECTOR + gdi * 4, encode_le(directory[gdi : gdi + 1])))
            i = bisect.bisect_left(self.meta_starts, e.offset)
            self.meta_starts.insert(i, e.offset)
            self.meta_ends.insert(i, e.offset + self.gt_bytes)

    async def _write_stream(self, rel: int, data: memoryview) -> None:
        """streamOptimized: whole grains into grains not yet written, deflated and appended.
        Called with owner.lock held."""
        end = rel + len(data)
        pos = rel
        while pos < end:
            g0 = pos & ~self.grain_mask
            g1 = min(g0 + self.grain, self.size)
            if pos != g0 or end < g1:
                raise NbdError(
                    errno.EINVAL, "streamOptimized VMDK: a write must cover whole grains (QEMU allows no other writes)"
                )
            gdi = pos // self.span
            entry = await self._get(gdi)
            if entry is None:
                raise NbdError(errno.EIO, f"streamOptimized VMDK: no grain table for guest offset {self.start + pos}")
            try:
                i = (pos >> self.grain_bits) % self.ngte
                if self._kind(entry.value[i]) not in (UNALLOCATED, ZEROED):
                    raise NbdError(
                        errno.EIO, "streamOptimized VMDK: a grain can be written once only (QEMU allows no more)"
                    )
                host = await self._append_grain(g0, data[pos - rel : g1 - rel])
                self._set_entries(gdi, entry, i, [host // SECTOR])
            finally:
                self.cache.release(entry)
            pos = g1
        await self.cache.make_room()

    async def _append_grain(self, g0: int, chunk: memoryview) -> int:
        """Deflate ``chunk`` (the grain at guest ``g0``) and append it after a grain marker,
        padded to a sector.  Called with owner.lock held."""
        packed = zlib.compress(chunk)
        blob = bytearray(GRAIN_MARKER.pack(g0 // SECTOR, len(packed)))
        blob += packed
        blob += bytes(-len(blob) % SECTOR)
        host = await self._alloc(len(blob))
        try:
            await settled(self.storage.write(host, blob))
        except BaseException:
            await self._unalloc(host)
            raise
        return host

    # -- zeroes and trim --------------------------------------------------------------------

    async def zero(self, rel: int, length: int, may_trim: bool) -> None:
        """Make the range read as zeroes without allocating where it already does: allocated
        grains are zeroed in place; unallocated grains need nothing without a parent; over a
        parent, whole grains become zeroed grains (if the header allows it) and the rest is
        written as zero bytes."""
        async with self.owner.lock:
            end = rel + length
            pos = rel
            while pos < end:
                gdi = pos // self.span
                seg_end = min(end, (gdi + 1) * self.span)
                entry = await self._get(gdi)
                if entry is None:
                    if self.owner.backing is not None:
                        await self._zero_over_parent(pos, seg_end, gdi, None)
                    pos = seg_end
                    continue
                try:
                    while pos < seg_end:
                        kind, stop, host = self._run(entry.value, pos, seg_end)
                        if kind == PLAIN:
                            await zero_in_place(self.storage, host, stop - pos, may_trim)
                        elif kind == COMPRESSED:
                            raise NbdError(errno.EIO, "streamOptimized VMDK: a written grain cannot be zeroed")
                        elif kind == UNALLOCATED and self.owner.backing is not None:
                            await self._zero_over_parent(pos, stop, gdi, entry)
                        pos = stop
                finally:
                    self.cache.release(entry)

    async def _zero_over_parent(self, pos: int, stop: int, gdi: int, entry: CacheEntry | None) -> None:
        """Hide the parent's bytes under unallocated grains ``[pos, stop)`` of GT ``gdi``.
        Called with owner.lock held."""
        gs = self.grain
        a = min(stop, -(-pos // gs) * gs)
        b = max(a, stop & ~self.grain_mask)
        if self.zero_grain and b > a:
            values = [1] * ((b - a) >> self.grain_bits)
            i0 = (a >> self.grain_bits) % self.ngte
            if entry is None:
                if self.compressed:
                    raise NbdError(errno.EIO, f"streamOptimized VMDK: no grain table for guest offset {self.start + a}")
                await self._new_table(gdi, i0, values)
            else:
                self._set_entries(gdi, entry, i0, values)
            await self._write_zero_bytes(pos, a)
            await self._write_zero_bytes(b, stop)
        else:
            await self._write_zero_bytes(pos, stop)

    async def _write_zero_bytes(self, pos: int, stop: int) -> None:
        """Called with owner.lock held."""
        write = self._write_stream if self.compressed else self._write_locked
        while pos < stop:
            n = min(len(ZEROES), stop - pos)
            await write(pos, memoryview(ZEROES)[:n])
            pos += n

    async def trim(self, rel: int, length: int) -> None:
        """Punch the host space of whole plain grains in the range (they stay mapped, reading as
        zeroes); everything else is left alone (TRIM is a hint)."""
        if self.compressed:
            return
        pos = -(-rel // self.grain) * self.grain
        end = (rel + length) & ~self.grain_mask
        while pos < end:
            gdi = pos // self.span
            seg_end = min(end, (gdi + 1) * self.span)
            table = await self._table(gdi)
            if table is NO_TABLE:
                pos = seg_end
                continue
            kind, stop, host = self._run(table, pos, seg_end)
            if kind == PLAIN:
                await self.storage.discard(host, stop - pos)
            pos = stop

    async def flush(self) -> None:
        await self.cache.flush(self.storage)

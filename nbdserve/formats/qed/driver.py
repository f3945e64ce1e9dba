"""The QED driver: reads, allocating writes, zero clusters, block status, NEED_CHECK handling.

Owns one open QED image: its header (``QedHeader``), the L1 table (in memory, written through),
the L2 tables (decoded in the shared cluster cache, written through) and the allocation cursor
``file_end`` (new clusters are appended there).

Reads and writes (``read``/``write``, see ``formats.base``): the fast case walks the cached L2
tables synchronously and starts the storage I/O of every run (data: a storage read or write;
zero clusters: zeroes; unallocated: the backing image); a read that meets a table not cached
returns a coroutine that loads it and walks on from there; a write that is not all in place
(allocated clusters, cached tables, no FUA) returns the coroutine that takes the lock.

Locking: ``self.lock`` (one CoMutex per image) guards the header, the L1 table, every L2 update and
the allocation cursor.  Allocating requests hold it from lookup to table update, so one allocating
request runs at a time and the lookup is repeated after waiting for it (two writes to one
unallocated cluster never allocate it twice).  Reads, and writes whose clusters are all allocated,
take no lock: a mapping is looked up and its storage I/O started with no await in between.

Crash ordering (docs/qed.md):
  * NEED_CHECK is set in the header and synced before the first allocation after open or after a
    flush cleared it (with or without a backing file, so a crash always triggers the repair);
  * data clusters are written (copy-on-write head and tail included) before the L2 entry that
    points at them; with a backing file the data is synced first, since a lost data cluster would
    otherwise hide the backing data it replaced;
  * a new L2 table is written whole and synced before the L1 entry points at it;
  * a flush syncs, then, if no metadata changed for 5 s (QEMU's idle timer), clears NEED_CHECK and
    syncs the header again; close always does (a crash with it still set only costs a check).
Opening read-write with NEED_CHECK set runs ``check_and_repair`` first.

Zero clusters (L2 entry 1) read as zeroes.  A partial write into one fills the rest of the new
cluster with zeroes, never with backing data (QEMU 7.2 copies backing data there; we follow the
spec).  WRITE_ZEROES and TRIM turn whole unallocated or zero clusters into zero clusters and zero
allocated clusters in place (punching host holes where allowed).  So a data cluster, once mapped,
never moves or goes away while the image is open: ``map_now`` answers stay true, and a landing
(``landing``, docs/landing.md) needs nothing held.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import time
from array import array
from bisect import bisect_right

from ...cache import CacheEntry, ClusterCache
from ...errors import CorruptImage, NbdError
from ...locks import CoMutex
from ...storage.base import Storage, joined, read_at, settled
from ..base import (
    ALLOCATED,
    DATA,
    ZERO,
    BackingRef,
    Caps,
    Extent,
    FormatDriver,
    InPlaceWrites,
    Landing,
    Limits,
    OpenOptions,
    TableReads,
    start_writes,
    zero_in_place,
)
from .check import check_and_repair
from .header import (
    F_BACKING_FILE,
    F_BACKING_FORMAT_NO_PROBE,
    F_NEED_CHECK,
    HEADER_LEN,
    MAGIC,
    QedHeader,
)
from .tables import SECTOR, UNALLOCATED, ZERO_CLUSTER, decode_table, encode_table, entry_sectors

log = logging.getLogger(__name__)

# Kinds of run returned by ``_run``.
RUN_UNALLOCATED = 0
RUN_ZERO = 1
RUN_DATA = 2

_STATE = {RUN_UNALLOCATED: 0, RUN_ZERO: ALLOCATED | ZERO, RUN_DATA: ALLOCATED | DATA}

NO_TABLE = array("Q")  # sentinel for "the L1 entry is empty" (compared by identity)

NEED_CHECK_IDLE = 5.0  # seconds; see QedDriver.need_check_idle


class QedDriver(TableReads, InPlaceWrites, FormatDriver):
    format_name = "qed"

    def __init__(
        self, storage: Storage, readonly: bool, cache: ClusterCache, h: QedHeader, l1: array, file_end: int
    ) -> None:
        self.storage = storage
        self.path = storage.name
        self.readonly = readonly
        self.cache = cache
        self.h = h
        self.l1 = l1
        self.file_end = file_end  # cluster-aligned; the next allocation goes here
        self.size = h.image_size
        self.limits = Limits(align=1)
        writable = not readonly
        self.caps = Caps(native_zero=writable, native_trim=writable, fast_zero=writable)
        self.lock = CoMutex(f"qed {storage.name}")
        self.cluster_size = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.map_bits = h.cluster_bits
        self.cluster_mask = h.cluster_size - 1
        self.header_bytes = h.header_bytes
        nelems = h.table_nelems
        self.l2_mask = nelems - 1
        self.l1_shift = self.cluster_bits + nelems.bit_length() - 1
        self.l2_kind = cache.kind(
            storage, name="QED L2 table", size=h.table_bytes, decode=decode_table, encode=encode_table
        )
        self.tables: list[int] = []  # sorted start offsets of the L1 and all L2 tables (overlap guard)
        # A flush clears NEED_CHECK only this many seconds after the last metadata change (as
        # QEMU's 5 s timer): flush-heavy allocating workloads then do not pay two extra header
        # writes and syncs per flush.  Close always clears it.
        self.need_check_idle = NEED_CHECK_IDLE
        self._last_change = 0.0  # time.monotonic() of the last metadata change
        self._sector0 = bytearray()  # the first header sector as read (header updates rewrite it whole)

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        return 100 if head[:4] == MAGIC else 0

    @classmethod
    async def open(cls, storage: Storage, *, readonly: bool, cache: ClusterCache, options: OpenOptions) -> QedDriver:
        path = storage.name
        head = await read_at(storage, 0, min(SECTOR, storage.size))
        h = QedHeader.parse(path, head, storage.size)
        file_end = storage.size & ~(h.cluster_size - 1)
        l1 = decode_table(await read_at(storage, h.l1_table_offset, h.table_bytes))
        drv = cls(storage, readonly, cache, h, l1, file_end)
        drv._sector0 = head
        if h.features & F_BACKING_FILE:
            name = await read_at(storage, h.backing_filename_offset, h.backing_filename_size)
            raw = bytes(name).split(b"\0", 1)[0]
            if not raw:
                raise CorruptImage(
                    path, f"backing file name at backing_filename_offset 0x{h.backing_filename_offset:x} is empty"
                )
            fmt = "raw" if h.features & F_BACKING_FORMAT_NO_PROBE else None
            drv.backing = BackingRef(os.fsdecode(raw), fmt)
        if not readonly:
            if h.features & F_NEED_CHECK:
                await drv._repair()
            if h.autoclear_features:  # no autoclear bits are defined: clear them all
                h.autoclear_features = 0
                await drv._write_header()
                await storage.flush()
        drv._index_tables()
        return drv

    async def _repair(self) -> None:
        """Run the consistency check with repairs, then mark the image clean.

        Called during open, before anything is served (no lock needed).
        """
        r = await check_and_repair(self.storage, self.h, self.l1, self.file_end)
        self.file_end = r.file_end
        if r.cleared_l1 or r.cleared_l2 or r.truncated_leaks or r.leaks or r.relocated:
            log.warning(
                "%s: repaired after an unclean shutdown: %d invalid L1 and %d invalid L2 entries cleared, "
                "%d data clusters moved, %d leaked clusters truncated, %d leaked clusters left",
                self.path,
                r.cleared_l1,
                r.cleared_l2,
                r.relocated,
                r.truncated_leaks,
                r.leaks,
            )
        await self.storage.flush()
        self.h.features &= ~F_NEED_CHECK
        await self._write_header()
        await self.storage.flush()

    def _index_tables(self) -> None:
        """Validate every L1 entry and record where the tables are; tables must not overlap."""
        h, end = self.h, self.file_end
        found = [(h.l1_table_offset, "the L1 table")]
        for i, off in enumerate(self.l1):
            if off == UNALLOCATED:
                continue
            if not h.table_offset_ok(off, end):
                raise CorruptImage(
                    self.path,
                    f"L1 entry {i}: L2 table offset 0x{off:x} is unaligned, in the header or beyond end of file",
                )
            found.append((off, f"L1 entry {i}'s L2 table"))
        found.sort()
        for (a, what_a), (b, what_b) in itertools.pairwise(found):
            if a + h.table_bytes > b:
                raise CorruptImage(self.path, f"{what_b} at 0x{b:x} overlaps {what_a} at 0x{a:x}")
        self.tables = [off for off, _ in found]

    async def _write_header(self) -> None:
        """Rewrite the first header sector with the current header.  Called with self.lock held
        (or during open)."""
        sector = bytearray(self._sector0)
        sector[:HEADER_LEN] = self.h.encode()
        self._sector0 = sector
        await settled(self.storage.write(0, sector))

    # -- lookup -----------------------------------------------------------------------------

    def _peek_table(self, l1_index: int) -> array | None:
        """The cached L2 table for ``l1_index``, ``NO_TABLE`` if the L1 entry is empty, else None."""
        off = self.l1[l1_index]
        if off == UNALLOCATED:
            return NO_TABLE
        e = self.cache.peek(self.l2_kind, off)
        return None if e is None else e.value

    async def _get_table(self, l1_index: int) -> CacheEntry | None:
        """The L2 table entry for ``l1_index``, pinned (release it), or None if the L1 entry is empty."""
        off = self.l1[l1_index]
        if off == UNALLOCATED:
            return None
        return await self.cache.get(self.l2_kind, off)

    async def _table(self, l1_index: int) -> array:
        """The L2 table for a read (``NO_TABLE`` for an empty L1 entry); valid until the next await."""
        table = self._peek_table(l1_index)
        if table is None:  # the L1 entry is set, the table not cached
            e = await self.cache.get(self.l2_kind, self.l1[l1_index])
            self.cache.release(e)
            table = e.value
        return table

    def _bad_entry(self, pos: int, value: int) -> NbdError:
        return NbdError(
            errno.EINVAL,
            f"{self.path}: L2 entry for guest offset 0x{pos:x} holds invalid data cluster offset 0x{value:x}",
        )

    def _run(self, table: array, pos: int, seg_end: int, contiguous: bool) -> tuple[int, int, int]:
        """(kind, end, host offset of ``pos``) of the run of like clusters starting at ``pos``.

        ``seg_end`` must not pass the end of ``table``'s range.  With ``contiguous`` a data run
        also requires consecutive host clusters (for I/O); without, any valid data clusters (for
        block status).  Raises ``NbdError(EINVAL)`` for an invalid data offset at ``pos``.
        """
        cb, cs = self.cluster_bits, self.cluster_size
        i = (pos >> cb) & self.l2_mask
        value = table[i]
        next_pos = ((pos >> cb) + 1) << cb
        if value > ZERO_CLUSTER:
            file_end = self.file_end
            if value & self.cluster_mask or not self.header_bytes <= value < file_end:
                raise self._bad_entry(pos, value)
            want = value + cs
            while next_pos < seg_end:
                i += 1
                nxt = table[i]
                if contiguous:
                    if nxt != want or want >= file_end:
                        break
                    want += cs
                elif nxt <= ZERO_CLUSTER or nxt & self.cluster_mask or not self.header_bytes <= nxt < file_end:
                    break
                next_pos += cs
            return RUN_DATA, min(next_pos, seg_end), value + (pos & self.cluster_mask)
        while next_pos < seg_end and table[i + 1] == value:
            i += 1
            next_pos += cs
        return (RUN_ZERO if value == ZERO_CLUSTER else RUN_UNALLOCATED), min(next_pos, seg_end), 0

    def _guard(self, host: int, length: int) -> None:
        """Refuse data I/O that would land on the L1 table or an L2 table."""
        tables = self.tables
        k = bisect_right(tables, host + length - 1) - 1
        if k >= 0 and tables[k] + self.h.table_bytes > host:
            raise CorruptImage(
                self.path, f"data cluster range 0x{host:x}+{length} overlaps the table at 0x{tables[k]:x}"
            )

    # -- reads ------------------------------------------------------------------------------

    def map_now(self, offset: int) -> int | None:
        """A data cluster whose L2 table is cached."""
        l2_offset = self.l1[offset >> self.l1_shift]
        e = self.cache.peek(self.l2_kind, l2_offset) if l2_offset else None
        if e is None:
            return None
        value = e.value[(offset >> self.cluster_bits) & self.l2_mask]
        if value > ZERO_CLUSTER and not value & self.cluster_mask and self.header_bytes <= value < self.file_end:
            return value
        return None

    def _read_cached(self, offset: int, buf: memoryview, pos: int, pendings: list) -> int:
        """Start the reads of ``buf`` (guest ``offset``) from ``pos`` on, run by run, as long as
        the L2 tables are cached; returns where it stopped (the end, or a table to load).
        Synchronous: each run's storage or backing read starts right after its lookup."""
        end = offset + len(buf)
        shift, l1, peek, kind, storage = self.l1_shift, self.l1, self.cache.peek, self.l2_kind, self.storage
        while pos < end:
            l1_index = pos >> shift
            seg_end = min(end, (l1_index + 1) << shift)
            l2_offset = l1[l1_index]
            if l2_offset == UNALLOCATED:
                run, run_end, host = RUN_UNALLOCATED, seg_end, 0
            else:
                e = peek(kind, l2_offset)
                if e is None:
                    return pos
                run, run_end, host = self._run(e.value, pos, seg_end, True)
            part = buf[pos - offset : run_end - offset]
            if run == RUN_DATA:
                p = storage.read(host, part)
            elif run == RUN_ZERO:
                part[:] = bytes(len(part))
                p = None
            else:
                p = self.read_backing(pos, part)
            if p is not None:
                pendings.append(p)
            pos = run_end
        return pos

    async def _load_for_read(self, offset: int, buf: memoryview, pos: int, pendings: list) -> int:
        """The L2 table ``_read_cached`` stopped at (see ``TableReads``)."""
        await self._table(pos >> self.l1_shift)
        return pos

    async def block_status(self, offset: int, length: int) -> Extent:
        l1_index = offset >> self.l1_shift
        seg_end = min(offset + length, (l1_index + 1) << self.l1_shift)
        table = self._peek_table(l1_index)
        if table is None:
            table = await self._table(l1_index)
        if table is NO_TABLE:
            return Extent(seg_end - offset, 0)
        kind, run_end, _ = self._run(table, offset, seg_end, False)
        return Extent(run_end - offset, _STATE[kind])

    async def cache_hint(self, offset: int, length: int) -> None:
        """Load the L2 tables covering the range."""
        for l1_index in range(offset >> self.l1_shift, ((offset + length - 1) >> self.l1_shift) + 1):
            if self._peek_table(l1_index) is None:
                await self._table(l1_index)

    # -- writes -----------------------------------------------------------------------------

    async def _write_slow(self, offset: int, data: memoryview, fua: bool) -> None:
        """``write`` that allocates (or carries FUA): in place if it can, else under the lock."""
        pendings = self._write_in_place(offset, data)
        if pendings is None:
            async with self.lock:
                await self._write_locked(offset, data)
        else:
            await settled(joined(pendings))
        if fua:
            await self.storage.flush()

    def landing(self, offset: int, length: int) -> Landing | None:
        """Where clusters that ``_write_in_place`` would write form one run of file bytes (and the
        file takes bytes by splice).  Nothing to hold: a data cluster never moves or goes away
        while the image is open (see the module docstring)."""
        fd = self.storage.splice_fd
        if fd is None:
            return None
        end, pos, shift = offset + length, offset, self.l1_shift
        first = -1
        while pos < end:
            l1_index = pos >> shift
            table = self._peek_table(l1_index)
            if table is None or table is NO_TABLE:
                return None
            try:
                kind, run_end, host = self._run(table, pos, min(end, (l1_index + 1) << shift), True)
            except NbdError:  # a bad entry: ``write`` reports it
                return None
            if kind != RUN_DATA or (first >= 0 and host != first + pos - offset):
                return None
            if first < 0:
                first = host
            pos = run_end
        try:
            self._guard(first, length)
        except CorruptImage:  # over a table: ``write`` refuses it
            return None
        return Landing(fd, first)

    def _write_in_place(self, offset: int, data: memoryview) -> list | None:
        """Start the writes without the lock if every cluster is allocated and its L2 table cached
        (returns their Pendings); else None, and nothing written."""
        end = offset + len(data)
        pos = offset
        shift = self.l1_shift
        plan: list[tuple[int, int, int]] = []
        while pos < end:
            l1_index = pos >> shift
            table = self._peek_table(l1_index)
            if table is None or table is NO_TABLE:
                return None
            seg_end = min(end, (l1_index + 1) << shift)
            kind, run_end, host = self._run(table, pos, seg_end, True)
            if kind != RUN_DATA:
                return None
            self._guard(host, run_end - pos)
            plan.append((host, pos - offset, run_end - pos))
            pos = run_end
        return start_writes(self.storage, data, plan)

    async def _write_locked(self, offset: int, data: memoryview) -> None:
        """Write, allocating clusters as needed.  Called with self.lock held."""
        end = offset + len(data)
        pos = offset
        shift = self.l1_shift
        while pos < end:
            l1_index = pos >> shift
            seg_end = min(end, (l1_index + 1) << shift)
            entry = await self._get_table(l1_index)
            if entry is None:
                await self._allocate(pos, seg_end, data[pos - offset : seg_end - offset], l1_index, None)
                pos = seg_end
                continue
            try:
                kind, run_end, host = self._run(entry.value, pos, seg_end, True)
                if kind == RUN_DATA:
                    self._guard(host, run_end - pos)
                    await settled(self.storage.write(host, data[pos - offset : run_end - offset]))
                else:
                    run_end = self._unallocated_end(entry.value, pos, seg_end)
                    await self._allocate(pos, run_end, data[pos - offset : run_end - offset], l1_index, entry)
            finally:
                self.cache.release(entry)
            pos = run_end

    def _unallocated_end(self, table: array, pos: int, seg_end: int) -> int:
        """End of the run of clusters (unallocated or zero, mixed) that an allocation covers."""
        cb = self.cluster_bits
        i = (pos >> cb) & self.l2_mask
        next_pos = ((pos >> cb) + 1) << cb
        while next_pos < seg_end and table[i + 1] <= ZERO_CLUSTER:
            i += 1
            next_pos += self.cluster_size
        return min(next_pos, seg_end)

    async def _ensure_need_check(self) -> None:
        """Set NEED_CHECK on disk before metadata changes.  Called with self.lock held."""
        self.lock.assert_locked()
        self._last_change = time.monotonic()
        if not self.h.features & F_NEED_CHECK:
            self.h.features |= F_NEED_CHECK
            await self._write_header()
            await self.storage.flush()

    async def _alloc_clusters(self, n: int) -> int:
        """Reserve ``n`` clusters at the end of the file.  Called with self.lock held.

        The file never extends past ``file_end`` between allocations, so the new clusters read as
        zeroes until written (a partial cluster left at the end of the file is cut off first).
        """
        if self.storage.size > self.file_end:
            await self.storage.truncate(self.file_end)
        host = self.file_end
        self.file_end += n * self.cluster_size
        return host

    async def _unalloc(self, host: int) -> None:
        """Give back the clusters from ``host`` on after a failed allocation, so that no leak is
        left in the middle of the file.  Called with self.lock held (nothing was allocated since)."""
        self.file_end = host
        if self.storage.size > host:
            await self.storage.truncate(host)

    async def _allocate(self, pos: int, stop: int, data: memoryview, l1_index: int, entry: CacheEntry | None) -> None:
        """Allocate clusters for the guest range ``[pos, stop)`` (unallocated or zero clusters of
        one L2 table, or all of an absent table), write ``data`` there with copy-on-write of the
        partial head and tail clusters, then point the tables at them.  Called with self.lock held.
        """
        cs, cb = self.cluster_size, self.cluster_bits
        first = pos & ~self.cluster_mask
        last = -(-stop // cs) * cs
        n = (last - first) >> cb
        table = None if entry is None else entry.value
        await self._ensure_need_check()
        host = await self._alloc_clusters(n)
        try:
            if pos > first:
                await self._cow(first, pos, host, table)
            await settled(self.storage.write(host + (pos - first), data))
            if last > stop:
                await self._cow(stop, last, host + (stop - first), table)
            if self.storage.size < host + n * cs:
                await self.storage.truncate(host + n * cs)
            if self.backing is not None:
                await self.storage.flush()  # the data must be durable before a table points at it
        except BaseException:
            await self._unalloc(host)
            raise
        i0 = (first >> cb) & self.l2_mask
        values = range(host, host + n * cs, cs)
        if entry is None:
            await self._new_table(l1_index, i0, values)
        else:
            await self._update_table(entry, i0, values)

    async def _cow(self, start: int, stop: int, host: int, table: array | None) -> None:
        """Fill ``[start, stop)`` (part of one newly allocated cluster) with what it read as
        before: backing data for an unallocated cluster, zeroes for a zero cluster.  The new
        cluster lies past the old end of file, so zeroes need no write.  Called with self.lock held.
        """
        value = UNALLOCATED if table is None else table[(start >> self.cluster_bits) & self.l2_mask]
        if value != UNALLOCATED or self.backing is None:
            return
        buf = bytearray(stop - start)
        inside = min(stop, self.size) - start
        if inside > 0:
            await settled(self.read_backing(start, memoryview(buf)[:inside]))
        await settled(self.storage.write(host, buf))

    async def _update_table(self, entry: CacheEntry, i0: int, values: range | list[int]) -> None:
        """Set L2 entries ``i0..`` and write their sectors through.  Called with self.lock held."""
        table = entry.value
        i1 = i0 + len(values) - 1
        table[i0 : i1 + 1] = array("Q", values)
        rel, blob = entry_sectors(table, i0, i1)
        await settled(self.storage.write(entry.offset + rel, blob))

    async def _new_table(self, l1_index: int, i0: int, values: range | list[int]) -> None:
        """Create the L2 table for ``l1_index`` holding ``values`` at ``i0..``: write it whole and
        sync, then point the L1 entry at it.  Called with self.lock held."""
        h = self.h
        off = await self._alloc_clusters(h.table_size)
        table = array("Q", [0]) * h.table_nelems
        table[i0 : i0 + len(values)] = array("Q", values)
        entry = self.cache.put_new(self.l2_kind, off, table)
        try:
            await self.cache.writeback([entry])  # written and synced before the L1 points at it
        finally:
            self.cache.release(entry)
        self.tables.append(off)  # allocated past every existing table: the list stays sorted
        self.l1[l1_index] = off
        rel, blob = entry_sectors(self.l1, l1_index, l1_index)
        await settled(self.storage.write(h.l1_table_offset + rel, blob))

    # -- zeroing ----------------------------------------------------------------------------

    async def pwrite_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        cs = self.cluster_size
        end = offset + length
        head_end = min(end, -(-offset // cs) * cs)
        tail_start = max(head_end, end & ~self.cluster_mask)
        if fast and (head_end > offset or tail_start < end):
            raise NbdError(errno.ENOTSUP, "fast zeroing needs whole clusters")
        if fast and not self.storage.can_zero_fast():
            raise NbdError(errno.ENOTSUP, "the host file cannot zero ranges quickly")
        await self.lock.lock()
        try:
            if head_end > offset:
                await self._zero_partial(offset, head_end)
            if tail_start > head_end:
                await self._zero_clusters(head_end, tail_start, may_trim)
            if end > tail_start:
                await self._zero_partial(tail_start, end)
        finally:
            self.lock.unlock()
        if fua:
            await self.storage.flush()

    async def pdiscard(self, offset: int, length: int) -> None:
        """TRIM the whole clusters in the range; partial ones are kept.

        Allocated clusters stay mapped and have their host space punched (they read as zeroes):
        QED has no refcounts, so unmapping a cluster would leave it leaked for ``qemu-img check``.
        Unallocated clusters become zero clusters, hiding any backing data.
        """
        cs = self.cluster_size
        start = -(-offset // cs) * cs
        stop = (offset + length) & ~self.cluster_mask
        if stop > start:
            await self.lock.lock()
            try:
                await self._zero_clusters(start, stop, True)
            finally:
                self.lock.unlock()

    async def _zero_partial(self, start: int, stop: int) -> None:
        """Zero part of one cluster: nothing to do if it already reads as zeroes, else write
        zero bytes.  Called with self.lock held."""
        table = await self._table(start >> self.l1_shift)
        value = UNALLOCATED if table is NO_TABLE else table[start >> self.cluster_bits & self.l2_mask]
        if value == ZERO_CLUSTER or (value == UNALLOCATED and self.backing is None):
            return
        await self._write_locked(start, memoryview(bytes(stop - start)))

    async def _zero_clusters(self, start: int, stop: int, may_trim: bool) -> None:
        """Make whole clusters ``[start, stop)`` read as zeroes: unallocated and zero clusters become
        zero clusters (entry 1), allocated ones are zeroed in place.  Called with self.lock held."""
        cb, shift = self.cluster_bits, self.l1_shift
        pos = start
        while pos < stop:
            l1_index = pos >> shift
            seg_end = min(stop, (l1_index + 1) << shift)
            i0 = (pos >> cb) & self.l2_mask
            count = (seg_end - pos) >> cb
            entry = await self._get_table(l1_index)
            if entry is None:
                await self._ensure_need_check()
                await self._new_table(l1_index, i0, [ZERO_CLUSTER] * count)
                pos = seg_end
                continue
            try:
                table = entry.value
                while pos < seg_end:
                    kind, run_end, host = self._run(table, pos, seg_end, True)
                    if kind == RUN_DATA:
                        self._guard(host, run_end - pos)
                        await zero_in_place(self.storage, host, run_end - pos, may_trim)
                    elif kind == RUN_UNALLOCATED:
                        await self._ensure_need_check()
                        n = (run_end - pos) >> cb
                        await self._update_table(entry, (pos >> cb) & self.l2_mask, [ZERO_CLUSTER] * n)
                    pos = run_end
            finally:
                self.cache.release(entry)

    # -- flush and close --------------------------------------------------------------------

    async def flush(self) -> None:
        """Sync everything; mark the image clean if no metadata changed for ``need_check_idle``."""
        await self._flush(time.monotonic() - self._last_change >= self.need_check_idle)

    async def _flush(self, mark_clean: bool) -> None:
        """Sync, then (``mark_clean``) clear NEED_CHECK and sync the header.  Holding the lock
        means no allocation is half done."""
        await self.lock.lock()
        try:
            await self.storage.flush()
            if mark_clean and self.h.features & F_NEED_CHECK:
                self.h.features &= ~F_NEED_CHECK
                await self._write_header()
                await self.storage.flush()
        finally:
            self.lock.unlock()

    async def close(self) -> None:
        if not self.readonly:
            await self._flush(True)

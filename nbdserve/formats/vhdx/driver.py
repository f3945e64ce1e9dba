"""The VHDX driver: dynamic, fixed and differencing images, 512 and 4096-byte logical sectors.

Owns one open VHDX file: open-time validation (``header``, ``metadata``, ``bat``), log replay
(into the file when writable; into an in-memory overlay when read-only; bounded by the file's
size and the image's possible extent), reads through the BAT (payload block states, sector
bitmaps of differencing disks, the parent via ``read_backing``), allocating writes (a partially
present block is completed in place from the parent), WRITE_ZEROES / TRIM as block-state
changes, block status at any byte offset, and NBD_CMD_CACHE (loads BAT pages).  The format facts
this relies on (bitmap layout, how each block state reads, the replay rules) are written up in
docs/vhdx.md.

Crash-consistency protocol (every step that matters is ordered by an fdatasync):
  1. Before the first visible change of a session the header is rewritten (non-current slot,
     sequence + 1) with a new file_write_guid and data_write_guid, and synced.
  2. An allocation writes the whole payload block at ``ROUND_UP(EOF, 1 MiB)`` (the rest of the
     block is zeroes or, in a differencing disk, the parent's data) and syncs it.
  3. The BAT sectors that change go into one log entry, which is synced; the first entry of a
     log cycle (log_guid 0 in the header) is followed by a header naming a new log_guid, synced.
  4. Only then are the BAT sectors written in place (not synced: replay covers them).
  5. ``flush`` syncs the file and, if a log cycle is open, writes a header with log_guid 0 and
     syncs again: after a flush the log is empty and QEMU can open the file read-only.
A crash anywhere leaves either the old mapping (leaked space) or a log whose replay gives the new.

Reads and writes (``read``/``write``, see ``formats.base``): the fast case walks the cached BAT
pages synchronously and starts each block's storage or backing read (a PARTIALLY_PRESENT block,
whose sector bitmap is read from the file, is the slow case); a write goes to the storage at once
when every block it touches is FULLY_PRESENT, its BAT page cached and this session's header
already written, else it returns the coroutine that takes the lock.

Locking: ``self.lock`` (one CoMutex) guards the BAT, the log, the headers and allocation.  Data
I/O to FULLY_PRESENT blocks runs without it: its mapping is looked up and its storage I/O
started with no await in between.  A payload landing by splice (``landing``) spans loop turns
instead: its blocks are counted in ``_landings`` until it ends, and zeroing and trim (the only
changes of a FULLY_PRESENT block's state) wait for them under the lock (``_wait_landings``).
Allocation happens only with the lock held, after re-reading the entry, so two writers never
allocate one block twice.  BAT pages live in the shared cluster cache and are
never dirty there: they are updated in memory and on disk together under the lock.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from array import array

from ...cache import ClusterCache
from ...errors import CorruptImage, ImageError, NbdError, UnsupportedImage
from ...locks import CoMutex, CoQueue
from ...storage.base import Pending, Storage, joined, read_at, settled, write_zero_bytes
from ...storage.local import LocalFile
from ..base import (
    ALLOCATED,
    DATA,
    ZERO,
    ZEROES,
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
from . import bat as B
from .bat import Geometry, check_bat, decode_page, encode_page, reads_from
from .header import (
    FILE_IDENTIFIER,
    HEADER_OFFSETS,
    HEADER_SIZE,
    REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE,
    ZERO_GUID,
    Header,
    MiB,
    Regions,
    choose_header,
    guid_str,
    parse_region_tables,
)
from .log import MAX_DESCRIPTORS, SECTOR, LogReader, build_entry, desc_sectors, find_active_sequence, iter_changes
from .metadata import Metadata, parse_linkage, parse_metadata

log = logging.getLogger(__name__)

OVERLAY_LIMIT = 64 << 20  # bytes of replayed log data a read-only open keeps in memory
COPY_CHUNK = 4 << 20  # parent data copied per step when a differencing block is allocated


def _new_guid() -> bytes:
    return uuid.uuid4().bytes_le


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class _ReplayedView(Storage):
    """A read-only view of a file with a pending log applied in memory (read-only opens).

    ``sectors`` maps 4 KiB-aligned file offsets to replayed contents and is always newer than any
    of the ``zeroes`` ranges (replaying a zero range drops the older sectors it covers), so a read
    applies the zero ranges first and the sectors last.
    """

    def __init__(self, storage: Storage, changes: list[tuple[int, bytes | None, int]], size: int) -> None:
        self.storage = storage
        self.name = storage.name
        self.size = size
        self.readonly = True
        self.sectors: dict[int, bytes] = {}
        self.zeroes: list[tuple[int, int]] = []
        for foff, data, length in changes:
            if data is not None:
                self.sectors[foff] = data
            else:
                self.zeroes.append((foff, foff + length))
                for k in [k for k in self.sectors if foff <= k < foff + length]:
                    del self.sectors[k]

    def read(self, offset: int, buf: memoryview) -> Pending:
        pending = self.storage.read(offset, buf)
        if pending is None:
            self._apply(offset, buf)
            return None
        return self._apply_after(pending, offset, buf)

    async def _apply_after(self, pending: Pending, offset: int, buf: memoryview) -> None:
        await pending
        self._apply(offset, buf)

    def _apply(self, offset: int, buf: memoryview) -> None:
        """Lay the replayed zero ranges and sectors over ``buf``, just read from ``offset``."""
        end = offset + len(buf)
        view = memoryview(buf)
        for zs, ze in self.zeroes:
            lo, hi = max(offset, zs), min(end, ze)
            if lo < hi:
                view[lo - offset : hi - offset] = bytes(hi - lo)
        first = offset - offset % SECTOR
        if (end - first) // SECTOR < len(self.sectors):
            keys = [k for k in range(first, end, SECTOR) if k in self.sectors]
        else:
            keys = [k for k in self.sectors if first <= k < end]
        for k in keys:
            lo, hi = max(offset, k), min(end, k + SECTOR)
            view[lo - offset : hi - offset] = self.sectors[k][lo - k : hi - k]


class VhdxDriver(TableReads, InPlaceWrites, FormatDriver):
    format_name = "vhdx"

    def __init__(self, storage: Storage, readonly: bool, cache: ClusterCache) -> None:
        self.storage = storage
        self.path = storage.name
        self.readonly = readonly
        self.cache = cache
        self.lock = CoMutex("vhdx")
        self.rf: Storage = storage  # what reads see: the storage, or a view with a log replayed
        self.header: Header
        self.meta: Metadata
        self.geo: Geometry
        self.bat_offset = 0
        self._bs = self._cr = 1  # block size and chunk ratio (hot-path copies of self.geo's)
        self.session_guid = _new_guid()
        self._visible = False  # header GUIDs updated in this session
        self._log_dirty = False  # the header names a log_guid that flush must clear
        self._log_pos = -1  # next write position in the current log cycle; -1: no cycle open
        self._log_seq = 0
        self._landings: dict[int, int] = {}  # block -> payloads landing in it (see ``landing``)
        self._landed = CoQueue()  # woken when a landing ends

    # -- open -------------------------------------------------------------------------------

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        return 100 if head[:8] == FILE_IDENTIFIER else 0

    @classmethod
    async def open(cls, storage: Storage, *, readonly: bool, cache: ClusterCache, options: OpenOptions) -> VhdxDriver:
        self = cls(storage, readonly or storage.readonly, cache)
        await self._open()
        return self

    async def _open(self) -> None:
        storage, path = self.storage, self.path
        if storage.size < MiB:
            raise CorruptImage(path, f"file size {storage.size} is smaller than the 1 MiB VHDX header section")
        if bytes(await read_at(storage, 0, 8)) != FILE_IDENTIFIER:
            raise CorruptImage(path, "file identifier is not 'vhdxfile'")
        copies = [bytes(await read_at(storage, off, HEADER_SIZE)) for off in HEADER_OFFSETS]
        self.header = choose_header(path, tuple(copies), storage.size)
        # The region tables sit in the header section, which no log entry may touch: read them first.
        tables = tuple([bytes(await read_at(storage, off, REGION_TABLE_SIZE)) for off in REGION_TABLE_OFFSETS])
        regions = parse_region_tables(path, tables, self.header, storage.size)  # type: ignore[arg-type]
        await self._replay_log(regions)
        rf = self.rf
        moff = regions.metadata_offset
        self.meta = meta = await parse_metadata(
            path, lambda off, n: read_at(rf, moff + off, n), regions.metadata_length
        )
        for note in meta.warnings:
            log.warning("%s: %s", path, note)
        self.size = meta.virtual_disk_size
        self.geo = geo = Geometry(meta.virtual_disk_size, meta.block_size, meta.logical_sector_size, meta.has_parent)
        self._bs, self._cr = geo.block_size, geo.chunk_ratio
        # The memo reads ``storage``; a log replayed into memory (``rf``) keeps every read here.
        self.map_bits = geo.block_size.bit_length() - 1 if self.rf is self.storage else 0
        if geo.entries * 8 > regions.bat_length:
            raise CorruptImage(path, f"BAT region of {regions.bat_length} bytes is too small for {geo.entries} entries")
        self.bat_offset = regions.bat_offset
        self.bat_kind = self.cache.kind(
            rf,
            name="VHDX BAT page",
            size=B.PAGE_SIZE,
            decode=decode_page,
            encode=encode_page,  # type: ignore[arg-type]
        )
        h = self.header
        reserved = [(0, MiB), (regions.bat_offset, regions.bat_offset + regions.bat_length)]
        reserved.append((regions.metadata_offset, regions.metadata_offset + regions.metadata_length))
        if h.log_length:
            reserved.append((h.log_offset, h.log_offset + h.log_length))
        odd = await check_bat(path, self._bat_pages(geo.entries), geo, rf.size, reserved)
        if odd is not None and not self.readonly:
            log.warning("%s: %s; serving the image read-only", path, odd)
            self.readonly = True
        elif odd is not None:
            log.warning("%s: %s (ignored: only state and offset are read)", path, odd)
        if meta.has_parent:
            self.backing = await self._find_parent()
        self.limits = Limits(align=meta.logical_sector_size)
        writable = not self.readonly
        self.caps = Caps(native_zero=writable, native_trim=writable, fast_zero=writable)
        if writable and h.log_length == 0:
            raise UnsupportedImage(path, "header log_length is 0: metadata writes cannot be journalled")
        self._log_dirty = h.log_guid != ZERO_GUID

    async def _bat_pages(self, entries: int):
        """(first index, decoded entries) for the used part of the BAT, 1 MiB at a time."""
        per = MiB // 8
        for base in range(0, entries, per):
            n = min(per, entries - base)
            yield base, decode_page(await read_at(self.rf, self.bat_offset + base * 8, n * 8))

    async def _replay_log(self, regions: Regions) -> None:
        """Replay a pending log: into the file when writable, into a view when read-only.

        Every entry is checked (structure, then the bound of ``_replay_limit``) before the first
        write.  Zero ranges are punched where the filesystem can; the part of one past the end
        of the file is skipped (the final extension reads as zeroes), so replay never allocates
        more than the data sectors it writes.
        """
        storage = self.storage
        reader = LogReader(storage, self.header)
        entries = await find_active_sequence(reader)
        if not entries:
            return
        path = self.path
        size = storage.size
        limit = await self._replay_limit(reader, entries, regions)
        end = max([size] + [_round_up(e.last_file_offset, MiB) for e in entries])
        if self.readonly:
            changes: list[tuple[int, bytes | None, int]] = []
            held = 0
            for e in entries:
                async for change in iter_changes(reader, e, size, limit):
                    held += SECTOR
                    if held > OVERLAY_LIMIT:
                        raise UnsupportedImage(path, "log too large to replay in memory for a read-only open")
                    changes.append(change)
            self.rf = _ReplayedView(storage, changes, end)
            return
        for e in entries:  # validate every descriptor before the first write
            async for _ in iter_changes(reader, e, size, limit):
                pass
        for e in entries:
            async for foff, data, length in iter_changes(reader, e, size, limit):
                if data is not None:
                    await settled(storage.write(foff, data))
                    continue
                n = min(length, storage.size - foff)
                if n > 0:
                    await zero_in_place(storage, foff, n, True)
        if storage.size < end:
            await storage.truncate(end)
        await storage.flush()
        await self._write_header(log_guid=ZERO_GUID)

    async def _replay_limit(self, reader: LogReader, entries: list, regions: Regions) -> int:
        """Where a log may write: below the file's size (or the end of the header section, log
        and regions, if that is larger) plus the image's possible extent, every block the
        metadata allows.  A replay may grow a file by at most what the whole image can hold.

        The metadata is read as the log leaves it (an entry may rewrite it) and as it is now;
        the larger extent counts, and if neither parses the open fails on the replayed one.
        Memory: only the logged sectors that fall in the metadata region are held.
        """
        path, size, h = self.path, self.storage.size, self.header
        mlo, mlen = regions.metadata_offset, regions.metadata_length
        logged: list[tuple[int, bytes | None, int]] = []
        for e in entries:
            async for foff, data, length in iter_changes(reader, e, size):
                if foff < mlo + mlen and mlo < foff + length:
                    logged.append((foff, data, length))
                    if len(logged) * SECTOR > OVERLAY_LIMIT:
                        raise UnsupportedImage(path, "log rewrites more metadata than nbdserve replays")
        fixed = max(MiB, h.log_offset + h.log_length, regions.bat_offset + regions.bat_length, mlo + mlen)
        extents, failure = [], None
        for view in (_ReplayedView(self.storage, logged, size), self.storage):
            try:
                meta = await parse_metadata(path, lambda off, n, v=view: read_at(v, mlo + off, n), mlen)
            except ImageError as exc:
                failure = failure or exc
                continue
            geo = Geometry(meta.virtual_disk_size, meta.block_size, meta.logical_sector_size, meta.has_parent)
            extents.append(geo.extent)
        if not extents:
            raise failure  # type: ignore[misc]
        return max(_round_up(size, MiB), fixed) + max(extents)

    async def _find_parent(self) -> BackingRef:
        """The parent named by the locator (relative_path first), with its linkage checked."""
        path = self.path
        loc = self.meta.parent_locator
        here = os.path.dirname(os.path.realpath(path))
        tried = []
        for key in ("relative_path", "volume_path", "absolute_win32_path"):
            value = loc.get(key)
            if not value:
                continue
            name = value.replace("\\", "/")
            if key == "relative_path":
                name = os.path.join(here, name)
            elif not name.startswith("/"):
                tried.append(f"{key} {value!r}")
                continue
            tried.append(f"{key} {value!r} -> {name}")
            if os.path.isfile(name):
                await self._check_linkage(name, loc)
                return BackingRef(os.path.realpath(name), "vhdx")
        raise ImageError(path, "parent VHDX not found (" + "; ".join(tried) + ")")

    async def _check_linkage(self, parent: str, loc: dict[str, str]) -> None:
        path = self.path
        try:
            pf = LocalFile(parent, readonly=True)
        except OSError as e:
            raise ImageError(path, f"cannot open parent {parent}: {e.strerror}") from None
        try:
            if pf.size < MiB or bytes(await read_at(pf, 0, 8)) != FILE_IDENTIFIER:
                raise CorruptImage(path, f"parent {parent} is not a VHDX file")
            copies = [bytes(await read_at(pf, off, HEADER_SIZE)) for off in HEADER_OFFSETS]
            ph = choose_header(parent, tuple(copies), pf.size)
        finally:
            pf.close_now()
        wanted = [parse_linkage(path, loc[k]) for k in ("parent_linkage", "parent_linkage2") if k in loc]
        if ph.data_write_guid not in wanted:
            raise CorruptImage(
                path,
                f"parent_linkage {loc['parent_linkage']} does not match data_write_guid "
                f"{guid_str(ph.data_write_guid)} of parent {parent}",
            )

    # -- BAT access -------------------------------------------------------------------------

    def _peek(self, index: int) -> int | None:
        e = self.cache.peek(self.bat_kind, self.bat_offset + (index >> B.PAGE_SHIFT) * B.PAGE_SIZE)
        return None if e is None else e.value[index & B.PAGE_MASK]

    async def _entry(self, index: int) -> int:
        e = await self.cache.get(self.bat_kind, self.bat_offset + (index >> B.PAGE_SHIFT) * B.PAGE_SIZE)
        try:
            return e.value[index & B.PAGE_MASK]
        finally:
            self.cache.release(e)

    async def _bitmap_runs(self, block: int, in_block: int, length: int) -> list[tuple[int, bool]]:
        """(bytes, present here) runs of a PARTIALLY_PRESENT block covering exactly
        ``[in_block, in_block + length)``; the range may start and end inside sectors (a
        sector's bit decides all of its bytes).  Bit i of the chunk's bitmap is its sector i."""
        geo = self.geo
        sb = await self._entry(geo.bitmap_index(block))
        if sb & B.STATE_MASK != B.SB_PRESENT:
            raise CorruptImage(self.path, f"block {block} is partially present but its sector bitmap is not")
        lss = geo.logical_sector_size
        s0, s1 = in_block // lss, -(-(in_block + length) // lss)  # the sectors the range touches
        first = (block % geo.chunk_ratio) * (geo.block_size // lss) + s0
        count = s1 - s0
        raw = await read_at(self.rf, (sb & B.OFFSET_MASK) + first // 8, (first + count + 7) // 8 - first // 8)
        bits = int.from_bytes(raw, "little") >> (first % 8)
        runs: list[tuple[int, bool]] = []
        i, pos, end = 0, in_block, in_block + length
        while i < count:
            y = bits >> i
            lowest = (~y & (y + 1)) if y & 1 else (y & -y)  # first bit that differs from bit 0
            run = min(lowest.bit_length() - 1 if lowest else count - i, count - i)
            i += run
            stop = min(end, (s0 + i) * lss)
            runs.append((stop - pos, bool(y & 1)))
            pos = stop
        return runs

    # -- reads ------------------------------------------------------------------------------

    def map_now(self, offset: int) -> int | None:
        """Where the fully present block holding ``offset`` starts in ``rf``, its BAT page
        cached; else None.  (The image layer asks only while ``rf`` is ``storage``: map_bits.)"""
        block = offset // self._bs
        index = block + block // self._cr
        page = self.cache.peek(self.bat_kind, self.bat_offset + (index >> B.PAGE_SHIFT) * B.PAGE_SIZE)
        if page is None:
            return None
        e = page.value[index & B.PAGE_MASK]
        if e & B.STATE_MASK != B.FULLY_PRESENT:
            return None
        return e & B.OFFSET_MASK

    def _read_cached(self, offset: int, buf: memoryview, pos: int, pendings: list) -> int:
        """Start the reads of ``buf`` (guest ``offset``) from ``pos`` on, block by block, while
        the BAT pages are cached and no block reads through its sector bitmap; returns where it
        stopped.  Synchronous."""
        bs, cr, has_parent, end = self._bs, self._cr, self.geo.has_parent, offset + len(buf)
        while pos < end:
            block = pos // bs
            e = self._peek(block + block // cr)
            if e is None:
                return pos
            how = reads_from(e & B.STATE_MASK, has_parent)
            if how == B.READ_BITMAP:
                return pos
            pos = self._read_block(offset, buf, pos, e, how, pendings)
        return pos

    def _read_block(self, offset: int, buf: memoryview, pos: int, e: int, how: int, pendings: list) -> int:
        """Start the read of the part of one block (BAT entry ``e``, read ``how``, not through
        its bitmap) from guest ``pos``; returns the next guest offset."""
        bs = self._bs
        in_block = pos % bs
        seg = min(offset + len(buf) - pos, bs - in_block)
        view = buf[pos - offset : pos - offset + seg]
        if how == B.READ_FILE:
            p = self.rf.read((e & B.OFFSET_MASK) + in_block, view)
        elif how == B.READ_ZERO:
            view[:] = ZEROES[:seg] if seg <= len(ZEROES) else bytes(seg)
            p = None
        else:
            p = self.read_backing(pos, view)
        if p is not None:
            pendings.append(p)
        return pos + seg

    async def _load_for_read(self, offset: int, buf: memoryview, pos: int, pendings: list) -> int:
        """The BAT page ``_read_cached`` stopped at; a block that reads through its sector
        bitmap is read here (see ``TableReads``)."""
        bs, end = self._bs, offset + len(buf)
        block, in_block = divmod(pos, bs)
        e = await self._entry(block + block // self._cr)
        how = reads_from(e & B.STATE_MASK, self.geo.has_parent)
        if how == B.READ_BITMAP:
            seg = min(end - pos, bs - in_block)
            await self._read_partial(block, in_block, buf[pos - offset : pos - offset + seg], e)
            return pos + seg
        return self._read_block(offset, buf, pos, e, how, pendings)

    async def _read_partial(self, block: int, in_block: int, view: memoryview, e: int) -> None:
        host = (e & B.OFFSET_MASK) + in_block
        at = 0
        base = block * self.geo.block_size + in_block
        for length, here in await self._bitmap_runs(block, in_block, len(view)):
            part = view[at : at + length]
            if here:
                await settled(self.rf.read(host + at, part))
            else:
                await settled(self.read_backing(base + at, part))
            at += length

    # -- writes -----------------------------------------------------------------------------

    def _write_in_place(self, offset: int, data: memoryview) -> list | None:
        """Start the writes if every block is FULLY_PRESENT with its BAT page cached and this
        session's header is written (returns their Pendings); else None, and nothing written."""
        if not self._visible:
            return None
        bs, cr = self._bs, self._cr
        plan = []
        pos, n = 0, len(data)
        while pos < n:
            block, in_block = divmod(offset + pos, bs)
            e = self._peek(block + block // cr)
            if e is None or e & B.STATE_MASK != B.FULLY_PRESENT:
                return None
            seg = min(n - pos, bs - in_block)
            plan.append(((e & B.OFFSET_MASK) + in_block, pos, seg))
            pos += seg
        return start_writes(self.storage, data, plan)

    def landing(self, offset: int, length: int) -> Landing | None:
        """Where blocks that ``_write_in_place`` would write form one run of file bytes (and the
        file takes bytes by splice): the blocks are counted in ``_landings`` until ``release``.
        Only while the lock is free: a zeroing or trim that holds it may already have read these
        blocks' entries and be about to change them."""
        fd = self.storage.splice_fd
        if fd is None or not self._visible or self.lock.locked():
            return None
        bs, cr = self._bs, self._cr
        first, last = offset // bs, (offset + length - 1) // bs
        host = -1
        for block in range(first, last + 1):
            e = self._peek(block + block // cr)
            if e is None or e & B.STATE_MASK != B.FULLY_PRESENT:
                return None
            at = (e & B.OFFSET_MASK) - (block - first) * bs
            if block == first:
                host = at
            elif at != host:
                return None  # not one run of file bytes
        blocks = range(first, last + 1)
        landings = self._landings
        for block in blocks:
            landings[block] = landings.get(block, 0) + 1

        def release() -> None:
            for block in blocks:
                n = landings.pop(block) - 1
                if n:
                    landings[block] = n
            self._landed.wake_all()

        return Landing(fd, host + offset - first * bs, release)

    async def _wait_landings(self, offset: int, length: int) -> None:
        """Until no payload lands in a block of ``[offset, offset + length)``.  Called with
        self.lock held (and ``landing`` refuses while it is held, so none starts meanwhile)."""
        self.lock.assert_locked()
        first, last = offset // self._bs, (offset + length - 1) // self._bs
        while any(first <= b <= last for b in self._landings):
            await self._landed.wait(self.lock)

    async def _write_slow(self, offset: int, data: memoryview, fua: bool) -> None:
        """``write`` that allocates (or carries FUA): blocks that need it under the lock."""
        bs = self._bs
        pos, n = 0, len(data)
        slow: list[tuple[int, int, memoryview]] = []
        pendings = []
        while pos < n:
            off = offset + pos
            block, in_block = divmod(off, bs)
            seg = min(n - pos, bs - in_block)
            e = self._peek(block + block // self._cr) if self._visible else None
            if e is not None and e & B.STATE_MASK == B.FULLY_PRESENT:
                p = self.storage.write((e & B.OFFSET_MASK) + in_block, data[pos : pos + seg])
                if p is not None:
                    pendings.append(p)
            else:
                slow.append((block, in_block, data[pos : pos + seg]))
            pos += seg
        await settled(joined(pendings))
        if slow:
            async with self.lock:
                await self._write_locked(slow)
        if fua:
            await self.storage.flush()

    async def _write_locked(self, segments: list[tuple[int, int, memoryview]]) -> None:
        """Write (block, offset in block, data) segments, allocating blocks as needed: all new
        blocks are synced together, then their BAT entries go into one log entry.
        Called with self.lock held."""
        self.lock.assert_locked()
        await self._make_visible()
        changes: dict[int, int] = {}
        end = self.storage.size
        try:
            for block, in_block, view in segments:
                e = await self._entry(self.geo.payload_index(block))
                if e & B.STATE_MASK == B.FULLY_PRESENT:
                    await settled(self.storage.write((e & B.OFFSET_MASK) + in_block, view))
                else:
                    changes.update(await self._fill_block(block, in_block, view, e))
        except BaseException:
            # (A parent read failed, say.)  No BAT entry points past ``end`` yet: cut the new
            # blocks off again, so that a failed write leaves no block nothing points at.
            if self.storage.size > end:
                await self.storage.truncate(end)
            raise
        if changes:
            await self.storage.flush()
            await self._commit(changes)

    async def _fill_block(self, block: int, in_block: int, view: memoryview, e: int) -> dict[int, int]:
        """Make a FULLY_PRESENT copy of ``block`` holding ``view`` at ``in_block`` (not synced).

        Returns the BAT change to commit once the caller has synced the data.  A
        PARTIALLY_PRESENT block is completed in place from the parent; any other state gets a new
        block at the 1 MiB-rounded end of file, filled with zeroes or the parent's data.
        Called with self.lock held.
        """
        geo, storage = self.geo, self.storage
        bs = geo.block_size
        start = block * bs
        inside = min(bs, self.size - start)  # bytes of this block inside the virtual disk
        how = reads_from(e & B.STATE_MASK, geo.has_parent)
        if how == B.READ_BITMAP:
            # In place: the sectors whose bit is clear hold stale bytes, so every byte the parent
            # gives (zeroes too) is written over them before the block becomes FULLY_PRESENT.
            host = e & B.OFFSET_MASK
            at = 0
            for length, here in await self._bitmap_runs(block, 0, inside):
                if not here:
                    await self._copy_parent(start + at, host + at, length, fresh=False)
                at += length
        else:
            host = _round_up(storage.size, MiB)
            await storage.truncate(host + bs)
            if how == B.READ_PARENT:
                await self._copy_parent(start, host, in_block, fresh=True)
                tail = in_block + len(view)
                await self._copy_parent(start + tail, host + tail, max(0, inside - tail), fresh=True)
        await settled(storage.write(host + in_block, view))
        return {geo.payload_index(block): host | B.FULLY_PRESENT}

    async def _copy_parent(self, vpos: int, host: int, length: int, *, fresh: bool) -> None:
        """Copy the parent's data for virtual ``[vpos, vpos+length)`` to ``host``.  ``fresh``:
        the target is new space that reads as zeroes, so all-zero chunks are skipped.  Lock held."""
        done = 0
        while done < length:
            n = min(COPY_CHUNK, length - done)
            buf = memoryview(bytearray(n))
            await settled(self.read_backing(vpos + done, buf))
            if not fresh or any(buf):
                await settled(self.storage.write(host + done, buf))
            done += n

    async def _make_visible(self) -> None:
        """Before the first change of a session: new file and data write GUIDs.  Lock held."""
        if not self._visible:
            await self._write_header(file_write_guid=self.session_guid, data_write_guid=_new_guid())
            self._visible = True

    async def _write_header(self, **changes: bytes) -> None:
        """Write the next header into the non-current slot and sync.  Lock held (or opening)."""
        new = self.header.successor(**changes)
        await settled(self.storage.write(HEADER_OFFSETS[new.slot], new.encode()))
        await self.storage.flush()
        self.header = new

    async def _commit(self, changes: dict[int, int]) -> None:
        """Apply BAT ``changes`` {index: entry}: for each group of at most MAX_DESCRIPTORS BAT
        sectors, a synced log entry, then the sectors in place (disk and cache).  Lock held."""
        self.lock.assert_locked()
        pages = {}
        try:
            for index in changes:
                page_off = self.bat_offset + (index >> B.PAGE_SHIFT) * B.PAGE_SIZE
                if page_off not in pages:
                    pages[page_off] = await self.cache.get(self.bat_kind, page_off)
            sectors: dict[int, array] = {}
            for index, value in changes.items():
                sector_off = self.bat_offset + index * 8 // SECTOR * SECTOR
                if sector_off not in sectors:
                    page = pages[self.bat_offset + (index >> B.PAGE_SHIFT) * B.PAGE_SIZE].value
                    first = (sector_off - self.bat_offset) // 8 & B.PAGE_MASK
                    sectors[sector_off] = array("Q", page[first : first + SECTOR // 8])
                sectors[sector_off][index % (SECTOR // 8)] = value
            ordered = sorted(sectors.items())
            for at in range(0, len(ordered), MAX_DESCRIPTORS):
                group = ordered[at : at + MAX_DESCRIPTORS]
                encoded = [(off, encode_page(a)) for off, a in group]
                await self._log_write(encoded)
                self.mappings_changed()  # (this loop runs without an await)
                for off, a in group:
                    rel = off - self.bat_offset
                    first = rel // 8 & B.PAGE_MASK
                    pages[self.bat_offset + rel // B.PAGE_SIZE * B.PAGE_SIZE].value[first : first + SECTOR // 8] = a
                await settled(joined([p for off, data in encoded if (p := self.storage.write(off, data)) is not None]))
        finally:
            for entry in pages.values():
                self.cache.release(entry)

    async def _log_write(self, sectors: list[tuple[int, bytes]]) -> None:
        """Append one synced log entry for ``sectors``; open a log cycle if needed.  Lock held."""
        h = self.header
        length = (desc_sectors(len(sectors)) + len(sectors)) * SECTOR
        if length > h.log_length:
            raise NbdError(errno.ENOSPC, f"{self.path}: log too small for a {length}-byte entry")
        if self._log_pos >= 0 and self._log_pos + length > h.log_length:
            await self._flush_locked()  # log full: checkpoint, then a new cycle
        new_cycle = self._log_pos < 0
        # A cycle starts at log offset 0 with sequence 1 under a fresh GUID; its entries' tail is 0.
        pos, seq, guid = (0, 1, _new_guid()) if new_cycle else (self._log_pos, self._log_seq, h.log_guid)
        entry = build_entry(guid, seq, 0, sectors, self.storage.size)
        await settled(self.storage.write(h.log_offset + pos, entry))
        await self.storage.flush()
        if new_cycle:  # the entry is durable before any header names its GUID
            await self._write_header(log_guid=guid)
            self._log_dirty = True
        self._log_pos, self._log_seq = pos + length, seq + 1

    # -- zeroes and trim --------------------------------------------------------------------

    def _segments(self, offset: int, length: int):
        bs = self.geo.block_size
        end = offset + length
        while offset < end:
            block, in_block = divmod(offset, bs)
            seg = min(end - offset, bs - in_block)
            whole = in_block == 0 and (seg == bs or offset + seg == self.size)
            yield block, in_block, seg, whole
            offset += seg

    async def pwrite_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        """Whole blocks become ZERO (freeing their space) unless they hold data that must stay
        allocated (NO_HOLE, or LeaveBlockAllocated); those and partial blocks holding data are
        zeroed in place; partial blocks that read from the parent are allocated.  ``fast``
        refuses (ENOTSUP, before any change) whatever needs data writes."""
        geo = self.geo
        async with self.lock:
            await self._wait_landings(offset, length)
            plan = []
            for block, in_block, seg, whole in self._segments(offset, length):
                e = await self._entry(geo.payload_index(block))
                state = e & B.STATE_MASK
                how = reads_from(state, geo.has_parent)
                keep = state == B.FULLY_PRESENT and (self.meta.leave_block_allocated or not may_trim)
                if whole and not keep:
                    if state != B.ZERO:
                        plan.append(("state", block, e, 0, 0))
                elif how != B.READ_ZERO:
                    plan.append(("data", block, e, in_block, seg))
            if fast and any(p[0] == "data" for p in plan):
                in_place = all(p[2] & B.STATE_MASK == B.FULLY_PRESENT for p in plan if p[0] == "data")
                if not (in_place and self.storage.can_zero_fast()):
                    raise NbdError(errno.ENOTSUP, "zeroing part of a VHDX block needs data writes")
            if not plan:
                return
            await self._make_visible()
            changes: dict[int, int] = {}
            filled = False
            freed: list[int] = []
            for kind, block, e, in_block, seg in plan:
                if kind == "state":
                    changes[geo.payload_index(block)] = B.ZERO
                    if e & B.STATE_MASK == B.FULLY_PRESENT:
                        freed.append(e & B.OFFSET_MASK)
                else:
                    e = await self._entry(geo.payload_index(block))
                    if e & B.STATE_MASK == B.FULLY_PRESENT:
                        host = (e & B.OFFSET_MASK) + in_block
                        if not await self.storage.write_zeroes(host, seg, may_unmap=False):
                            if fast:
                                raise NbdError(errno.ENOTSUP, "the file system cannot zero a range quickly")
                            await write_zero_bytes(self.storage, host, seg)
                    else:
                        changes.update(await self._fill_block(block, in_block, memoryview(bytes(seg)), e))
                        filled = True
            if filled:
                await self.storage.flush()  # new blocks are durable before the log names them
            if changes:
                await self._commit(changes)
            for host in freed:
                await self.storage.discard(host, geo.block_size)
        if fua:
            await self.storage.flush()

    async def pdiscard(self, offset: int, length: int) -> None:
        """Whole blocks that hold data become UNMAPPED (their space is punched); a hint only."""
        if self.meta.leave_block_allocated:
            return
        geo = self.geo
        async with self.lock:
            await self._wait_landings(offset, length)
            changes: dict[int, int] = {}
            freed: list[int] = []
            for block, _, _, whole in self._segments(offset, length):
                if not whole:
                    continue
                e = await self._entry(geo.payload_index(block))
                if e & B.STATE_MASK in (B.FULLY_PRESENT, B.PARTIALLY_PRESENT):
                    changes[geo.payload_index(block)] = B.UNMAPPED
                    freed.append(e & B.OFFSET_MASK)
            if not changes:
                return
            await self._make_visible()
            await self._commit(changes)
            for host in freed:
                await self.storage.discard(host, geo.block_size)

    # -- flush, status, close ---------------------------------------------------------------

    async def flush(self) -> None:
        async with self.lock:
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        """Sync data and in-place BAT writes, then empty the log (log_guid 0).  Lock held."""
        await self.storage.flush()
        if self._log_dirty:
            await self._write_header(log_guid=ZERO_GUID)
            self._log_dirty = False
        self._log_pos = -1

    async def block_status(self, offset: int, length: int) -> Extent:
        geo = self.geo
        bs = geo.block_size
        block, in_block = divmod(offset, bs)
        e = await self._entry(geo.payload_index(block))
        how = reads_from(e & B.STATE_MASK, geo.has_parent)
        if how == B.READ_BITMAP:
            n, here = (await self._bitmap_runs(block, in_block, min(length, bs - in_block)))[0]
            return Extent(n, ALLOCATED | DATA if here else 0)
        state = self._status_of(e)
        n = min(length, bs - in_block)
        while n < length and n < (1 << 30):
            block += 1
            e = await self._entry(geo.payload_index(block))
            if reads_from(e & B.STATE_MASK, geo.has_parent) == B.READ_BITMAP or self._status_of(e) != state:
                break
            n = min(length, n + bs)
        return Extent(n, state)

    async def cache_hint(self, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: load the BAT pages that map the range."""
        first = self.geo.payload_index(offset // self._bs) >> B.PAGE_SHIFT
        last = self.geo.payload_index((offset + length - 1) // self._bs) >> B.PAGE_SHIFT
        for page in range(first, last + 1):
            self.cache.release(await self.cache.get(self.bat_kind, self.bat_offset + page * B.PAGE_SIZE))

    def _status_of(self, e: int) -> int:
        """Block status of a block that does not read through its bitmap: data; zeroes this
        layer decides (ZERO, and in a differencing image UNDEFINED / UNMAPPED too, which must
        hide the parent); or unallocated (NOT_PRESENT, and anything without a parent)."""
        s = e & B.STATE_MASK
        how = reads_from(s, self.geo.has_parent)
        if how == B.READ_FILE:
            return ALLOCATED | DATA
        if how == B.READ_ZERO and (s == B.ZERO or self.geo.has_parent):
            return ALLOCATED | ZERO
        return 0

    async def close(self) -> None:
        if not self.readonly:
            await self.flush()
        if self.rf is not self.storage:
            self.cache.discard_storage(self.rf)

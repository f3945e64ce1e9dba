"""qcow2 persistent dirty bitmaps (the bitmaps header extension): directory, tables, tracking.

Owns:
  * the on-disk encoding (names and limits as in the spec, QEMU's ``docs/interop/qcow2.txt``):
    directory entries (``BitmapEntry``, ``parse_directory``), bitmap table entries
    (``decode_table``), bitmap data (bit ``i`` is bit ``i % 8`` of byte ``i // 8``; bit ``i``
    stands for guest bytes ``[i << granularity_bits, (i + 1) << granularity_bits)``);
  * ``DirtyBitmap``: one bitmap in memory, dense, with ``mark`` (a guest range was written, so
    every granule it touches, partial ones included, becomes dirty) and ``extents`` (the runs of
    clean and dirty granules that ``qemu:dirty-bitmap:NAME`` block status reports);
  * ``BitmapSet``: an image's bitmaps and their life cycle, used by the driver
    (docs/qcow2.md, "Persistent dirty bitmaps"):
      - at open, the directory is read and checked; a problem is recorded (one line), never
        raised: it makes a read-write open read-only and a ``-B`` export of the image refused;
      - ``load_tracked`` (read-write open, before the first write): every enabled (``auto``)
        bitmap not ``in_use`` is loaded into memory;
      - ``set_in_use``: the ``in_use`` flag of every bitmap not already in use is set on disk and
        synced before the first guest write (the driver calls it last in the open);
      - ``mark``: every write, write-zeroes and trim sets the bits of the granules it touches,
        in memory, before any of its data reaches the file;
      - ``store`` (clean close): changed bitmap data is written in place (or into new clusters),
        the bitmap tables updated, everything synced, and only then the ``in_use`` flags set at
        open are cleared and synced.  After a crash the bitmaps stay ``in_use``, as QEMU leaves
        them: inconsistent, never trusted again.
      - ``bitmap(name)`` gives a consistent bitmap for an NBD export, loading it if needed; an
        ``in_use`` bitmap (left by a crash) is refused, as qemu-nbd refuses it.

Invariants:
  * bits past the last granule of a loaded bitmap are zero (tail bits in the file are ignored);
  * memory: the dense bitmaps one image holds add up to at most ``MEMORY_CAP`` bytes; a bitmap
    that would exceed it is refused with one line (before anything is allocated);
  * on disk, the ``in_use`` flags set by ``set_in_use`` stay set while any bitmap in memory may
    be newer than its data in the file;
  * nothing here writes anything but bitmap structures, and every write goes through the
    driver's overlap guard with kind ``BITMAPS``.

Locking: ``mark`` and ``extents`` are synchronous (atomic on the event loop).  ``store`` is called
with the driver's lock held (it allocates clusters); the other methods run before the image is
shared (open) or are pure reads.
"""

from __future__ import annotations

import mmap
import re
import struct
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import ImageError
from ...storage.base import Storage, read_at, settled
from .header import AUTOCLEAR_BITMAPS, Header
from .overlap import BITMAPS
from .tables import decode_be64

if TYPE_CHECKING:
    from .driver import Qcow2Driver

# Directory entry flags.
IN_USE = 1 << 0
AUTO = 1 << 1
RESERVED_FLAGS = 0xFFFFFFFC  # QEMU supports no extra data, so extra_data_compatible is refused too
TYPE_DIRTY_TRACKING = 1
# Limits (QEMU's): beyond them QEMU refuses the directory, and so does nbdserve.
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME = 1023
MAX_TABLE_ENTRIES = 0x8000000
MAX_BITMAP_BYTES = 512 << 20  # table entries x cluster size
# nbdserve's own: the dense bitmaps one image holds in memory (a 1 TiB disk at 512-byte granularity,
# or 128 TiB at the default 64 KiB).
MEMORY_CAP = 256 << 20
# Bitmap table entries.
TABLE_RESERVED = 0xFF000000000001FE
TABLE_OFFSET = 0x00FFFFFFFFFFFE00
ALL_ONES = 1 << 0

_ENTRY = struct.Struct(">QIIBBHI")  # 24 bytes, then extra data, name, padding to 8
_NOT_ZERO = re.compile(rb"[^\x00]")
_NOT_ONES = re.compile(rb"[^\xff]")
_ONES = memoryview(b"\xff" * (1 << 20))
_MMAP_MIN = 1 << 20  # bitmaps at least this large live in anonymous memory (zero pages cost nothing)


class BitmapError(Exception):
    """A bitmap or the directory cannot be used; the message is one line naming what is wrong."""


@dataclass(slots=True)
class BitmapEntry:
    """One bitmap directory entry, decoded and checked (``parse_directory``)."""

    name: str
    pos: int  # where the entry starts inside the directory
    table_offset: int
    table_size: int  # entries
    flags: int
    granularity_bits: int

    @property
    def in_use(self) -> bool:
        return bool(self.flags & IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & AUTO)


def granules(disk_size: int, granularity_bits: int) -> int:
    """Bits in a bitmap of a ``disk_size`` disk (the last granule may be partial)."""
    return -(-disk_size >> granularity_bits)


def table_entries(nbits: int, cluster_size: int) -> int:
    """Bitmap table entries a bitmap of ``nbits`` bits needs (one cluster of data each)."""
    return -(-nbits // (8 * cluster_size))


def parse_directory(raw: bytes | bytearray, count: int, cluster_size: int, disk_size: int) -> list[BitmapEntry]:
    """The ``count`` entries of directory ``raw``, checked as QEMU checks them (sizes, flags,
    type, granularity, table place and size) plus names (UTF-8, no NUL, unique: they become NBD
    context names).  Raises ``BitmapError``."""
    out: list[BitmapEntry] = []
    names: set[str] = set()
    pos, end = 0, len(raw)
    while pos < end:
        if len(out) == count:
            raise BitmapError(f"bitmap directory holds more than the {count} bitmaps the header says")
        if pos + _ENTRY.size > end:
            raise BitmapError(f"bitmap directory entry {len(out)} runs past the directory")
        t_off, t_size, flags, btype, gbits, name_size, extra = _ENTRY.unpack_from(raw, pos)
        size = (_ENTRY.size + extra + name_size + 7) & ~7
        if pos + size > end:
            raise BitmapError(f"bitmap directory entry {len(out)} runs past the directory")
        raw_name = bytes(raw[pos + _ENTRY.size + extra : pos + _ENTRY.size + extra + name_size])
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise BitmapError(f"bitmap {len(out)}: name {raw_name[:40]!r} is not UTF-8") from None
        what = f"bitmap {name[:64]!r}"
        if not name_size or name_size > MAX_NAME or "\0" in name:
            raise BitmapError(f"bitmap {len(out)}: bad name {raw_name[:40]!r} (1..{MAX_NAME} bytes, no NUL)")
        if name in names:
            raise BitmapError(f"{what} appears twice in the bitmap directory")
        names.add(name)
        if extra:
            raise BitmapError(f"{what} has {extra} bytes of extra data (not supported)")
        if btype != TYPE_DIRTY_TRACKING:
            raise BitmapError(f"{what} has type {btype} (only 1, dirty tracking, exists)")
        if flags & RESERVED_FLAGS:
            raise BitmapError(f"{what} has reserved flags set (0x{flags:x})")
        if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            raise BitmapError(f"{what}: granularity_bits {gbits} out of range (9..31)")
        if not t_off or t_off & (cluster_size - 1) or not t_size:
            raise BitmapError(f"{what}: bitmap table at 0x{t_off:x} ({t_size} entries) is empty or unaligned")
        if t_size > MAX_TABLE_ENTRIES or t_size * cluster_size > MAX_BITMAP_BYTES:
            raise BitmapError(f"{what}: bitmap table of {t_size} entries is too large (512 MiB of data at most)")
        if not flags & IN_USE and t_size != table_entries(granules(disk_size, gbits), cluster_size):
            raise BitmapError(f"{what}: bitmap table of {t_size} entries does not fit the disk size")
        out.append(BitmapEntry(name, pos, t_off, t_size, flags, gbits))
        pos += size
    if len(out) != count:
        raise BitmapError(f"bitmap directory holds {len(out)} bitmaps, the header says {count}")
    return out


def decode_table(raw: bytes | bytearray, cluster_size: int, what: str) -> array:
    """A bitmap table, every entry checked (reserved bits, alignment, all-ones with an offset)."""
    t = decode_be64(raw)
    for i, e in enumerate(t):
        off = e & TABLE_OFFSET
        if e & TABLE_RESERVED or (off and (e & ALL_ONES or off & (cluster_size - 1))):
            raise BitmapError(f"{what}: bitmap table entry {i} (0x{e:016x}) is malformed")
    return t


def _set_bits(buf, a: int, b: int) -> None:
    """Set bits [a, b) of ``buf`` (bit i is bit i % 8 of byte i // 8)."""
    if a >= b:
        return
    ia, ib = a >> 3, b >> 3
    if ia == ib:
        buf[ia] |= ((1 << (b - a)) - 1) << (a & 7)
        return
    if a & 7:
        buf[ia] |= (0xFF << (a & 7)) & 0xFF
        ia += 1
    while ia < ib:
        n = min(ib - ia, len(_ONES))
        buf[ia : ia + n] = _ONES[:n]
        ia += n
    if b & 7:
        buf[ib] |= (1 << (b & 7)) - 1


def _lowest(x: int) -> int:
    return (x & -x).bit_length() - 1


class DirtyBitmap:
    """One bitmap in memory: ``nbits`` bits, dense, plus which data clusters changed."""

    __slots__ = (
        "bits",
        "changed",
        "chunk_bits",
        "chunk_shift",
        "enabled",
        "entry",
        "gbits",
        "name",
        "nbits",
        "nbytes",
        "table",
    )

    def __init__(self, entry: BitmapEntry, disk_size: int, cluster_size: int) -> None:
        self.entry = entry
        self.name = entry.name
        self.gbits = entry.granularity_bits
        self.enabled = entry.auto
        self.nbits = granules(disk_size, self.gbits)
        self.nbytes = -(-self.nbits // 8)
        self.bits = mmap.mmap(-1, self.nbytes) if self.nbytes >= _MMAP_MIN else bytearray(self.nbytes)
        self.chunk_bits = 8 * cluster_size  # bits per data cluster (per table entry)
        self.chunk_shift = self.chunk_bits.bit_length() - 1
        self.changed = bytearray(table_entries(self.nbits, cluster_size))  # 1: not stored yet
        self.table = array("Q")  # the bitmap table as loaded

    # -- updates ----------------------------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Guest bytes [offset, offset+length) changed: set every granule they touch.  (On the
        write path: the common case, a few granules in one byte, takes no call.)"""
        g0 = offset >> self.gbits
        g1 = (offset + length - 1) >> self.gbits  # the last granule touched
        if g1 >= self.nbits:
            g1 = self.nbits - 1
            if g0 > g1:
                return
        if g0 >> 3 == g1 >> 3:
            self.bits[g0 >> 3] |= ((2 << (g1 - g0)) - 1) << (g0 & 7)
        else:
            _set_bits(self.bits, g0, g1 + 1)
        c0, c1 = g0 >> self.chunk_shift, g1 >> self.chunk_shift
        if c0 == c1:
            self.changed[c0] = 1
        else:
            self.changed[c0 : c1 + 1] = b"\x01" * (c1 + 1 - c0)

    # -- queries ----------------------------------------------------------------------------

    def get(self, g: int) -> int:
        return (self.bits[g >> 3] >> (g & 7)) & 1

    def _next_change(self, g: int, v: int, stop: int) -> int:
        """The first granule in [g, stop) whose bit is not ``v``, or ``stop``."""
        buf = self.bits
        i = g >> 3
        x = (buf[i] ^ (0xFF if v else 0)) & (0xFF << (g & 7)) & 0xFF
        if x:
            return min(stop, (i << 3) | _lowest(x))
        m = (_NOT_ONES if v else _NOT_ZERO).search(buf, i + 1, (stop + 7) >> 3)
        if m is None:
            return stop
        j = m.start()
        return min(stop, (j << 3) | _lowest(buf[j] ^ (0xFF if v else 0)))

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        """(length, 1 if dirty else 0) runs from ``offset``, at most ``limit`` of them, covering
        ``length`` bytes unless the limit cuts them short.  Past the bitmap's end: clean."""
        out: list[tuple[int, int]] = []
        pos, end, gb = offset, offset + length, self.gbits
        last = ((end - 1) >> gb) + 1
        while pos < end and len(out) < limit:
            g = pos >> gb
            if g >= self.nbits:
                if out and out[-1][1] == 0:
                    out[-1] = (out[-1][0] + end - pos, 0)
                else:
                    out.append((end - pos, 0))
                break
            v = self.get(g)
            nxt = min(end, self._next_change(g, v, min(self.nbits, last)) << gb)
            out.append((nxt - pos, v))
            pos = nxt
        return out

    def chunk(self, i: int, cluster_size: int) -> bytes:
        """Data cluster ``i`` as stored: the bitmap's bytes, zero padded to a cluster."""
        data = bytes(self.bits[i * cluster_size : min(self.nbytes, (i + 1) * cluster_size)])
        return data + bytes(cluster_size - len(data))


class BitmapSet:
    """An image's bitmaps (see the module docstring).  ``problem``: why they cannot be used."""

    def __init__(self, path: str, storage: Storage, h: Header, disk_size: int) -> None:
        self.path = path
        self.storage = storage
        self._header = h
        self.cs = h.cluster_size
        self.disk_size = disk_size
        self.entries: list[BitmapEntry] = []
        self.problem: str | None = None
        self.stale = False  # the extension exists but a program without bitmap support wrote the image
        self.loaded: dict[str, DirtyBitmap] = {}
        self.tracked: list[DirtyBitmap] = []  # enabled bitmaps kept up to date (read-write)
        self.memory = 0
        self.directory = (0, 0)  # (offset, size)
        self.inconsistent: set[str] = set()  # in use at open: left by a crash, never trusted
        self._raw = bytearray()
        self._set_by_us: list[BitmapEntry] = []  # in_use flags set at open, cleared at close

    async def read_directory(self) -> None:
        """Read and check the bitmap directory (every open, before anything else uses the set)."""
        h, storage = self._header, self.storage
        if h.bitmap_directory is None:
            return
        if h.version < 3 or not h.autoclear_features & AUTOCLEAR_BITMAPS:
            self.stale = True
            return
        offset, size, count = h.bitmap_directory
        self.directory = (offset, size)
        try:
            if not size or offset + size > storage.size:
                raise BitmapError(f"bitmap directory at 0x{offset:x} (+{size}) is empty or beyond the end of the file")
            self._raw = await read_at(storage, offset, size)
            self.entries = parse_directory(self._raw, count, self.cs, self.disk_size)
            for e in self.entries:
                if e.table_offset + 8 * e.table_size > storage.size:
                    raise BitmapError(f"bitmap {e.name!r}: bitmap table lies beyond the end of the file")
            self.inconsistent = {e.name for e in self.entries if e.in_use}
        except BitmapError as err:
            self.problem = f"bitmaps unusable: {err}"
            self.entries = []

    @property
    def valid(self) -> bool:
        """The extension exists, is consistent and was read without problems."""
        return bool(self.entries)

    def find(self, name: str) -> BitmapEntry | None:
        for e in self.entries:
            if e.name == name:
                return e
        return None

    # -- loading ----------------------------------------------------------------------------

    async def _load(self, e: BitmapEntry) -> DirtyBitmap:
        """Read bitmap ``e`` into memory (within ``MEMORY_CAP``).  Raises ``BitmapError``."""
        bm = self.loaded.get(e.name)
        if bm is not None:
            return bm
        what = f"bitmap {e.name!r}"
        need = -(-granules(self.disk_size, e.granularity_bits) // 8)
        if self.memory + need > MEMORY_CAP:
            raise BitmapError(
                f"{what} needs {need >> 20} MiB in memory; with the image's other bitmaps that is more "
                f"than the {MEMORY_CAP >> 20} MiB cap (a larger granularity needs less)"
            )
        cs, file = self.cs, self.storage
        table = decode_table(await read_at(file, e.table_offset, 8 * e.table_size), cs, what)
        bm = DirtyBitmap(e, self.disk_size, cs)
        bm.table = table
        for i, t in enumerate(table):
            off = t & TABLE_OFFSET
            if off:
                if off + cs > file.size:
                    raise BitmapError(f"{what}: data cluster 0x{off:x} lies beyond the end of the file")
                lo, hi = i * cs, min(bm.nbytes, (i + 1) * cs)
                bm.bits[lo:hi] = await read_at(file, off, hi - lo)
            elif t & ALL_ONES:
                _set_bits(bm.bits, i * bm.chunk_bits, min(bm.nbits, (i + 1) * bm.chunk_bits))
        if bm.nbits & 7:
            bm.bits[bm.nbytes - 1] &= (1 << (bm.nbits & 7)) - 1
        self.memory += need
        self.loaded[e.name] = bm
        return bm

    async def load_tracked(self) -> None:
        """Load every enabled bitmap that is not in use (read-write open, before any write).
        Raises ``BitmapError``: the image must then be served read-only."""
        self.tracked = [await self._load(e) for e in self.entries if e.auto and not e.in_use]

    async def bitmap(self, name: str) -> DirtyBitmap | None:
        """Bitmap ``name`` for an NBD export (None: the image has none of that name).  Raises
        ``ImageError`` when it exists but cannot be used (in use, the directory is broken, too
        large)."""
        if self.problem is not None:
            raise ImageError(self.path, self.problem)
        e = self.find(name)
        if e is None:
            return None
        if name in self.inconsistent:
            raise ImageError(
                self.path,
                f"bitmap {name!r} is inconsistent (in use: the program that had the image open did not "
                "close it) and cannot be used; remove it with qemu-img bitmap --remove",
            )
        try:
            return await self._load(e)
        except BitmapError as err:
            raise ImageError(self.path, str(err)) from None

    # -- the in_use protocol ----------------------------------------------------------------

    async def set_in_use(self, drv: Qcow2Driver) -> None:
        """Set ``in_use`` on every bitmap not in use, durably, before the first write."""
        todo = [e for e in self.entries if not e.in_use]
        if not todo:
            return
        for e in todo:
            e.flags |= IN_USE
        await self._write_flags(drv)
        await self.storage.flush()
        self._set_by_us = todo

    def mark(self, offset: int, length: int) -> None:
        """A write, write-zeroes or trim of guest bytes [offset, offset+length) is starting."""
        for bm in self.tracked:
            bm.mark(offset, length)

    async def store(self, drv: Qcow2Driver) -> None:
        """Clean close: write the tracked bitmaps, then clear the ``in_use`` flags set at open.

        Called with the driver's lock held, after the guest data and tables were flushed.
        Order: data clusters (changed ones in place, new ones after their refcounts), the
        refcount blocks synced, the table entries naming new clusters, a sync, then the flags
        and a last sync.  A crash anywhere before the flags leaves the bitmaps in use."""
        if not self._set_by_us:
            return
        cs, file = self.cs, self.storage
        new_entries: list[tuple[DirtyBitmap, int, int]] = []  # (bitmap, table index, cluster offset)
        for bm in self.tracked:
            for i in (i for i, c in enumerate(bm.changed) if c):
                t = bm.table[i]
                off = t & TABLE_OFFSET
                if not off and t & ALL_ONES:
                    continue  # already all dirty
                if not off:
                    start, _n, _rb = await drv.refs.alloc(1)
                    off = start << drv.cb
                    drv._guard(off, cs, "new bitmap data cluster")
                    drv.meta.add(off, cs, BITMAPS)
                    new_entries.append((bm, i, off))
                else:
                    drv._guard(off, cs, "bitmap data", BITMAPS)
                await settled(file.write(off, bm.chunk(i, cs)))
        await drv.cache.flush(file)  # the data, and the refcounts of new clusters (then synced)
        if new_entries:
            for bm, i, off in new_entries:
                bm.table[i] = off
                where = bm.entry.table_offset + 8 * i
                drv._guard(where, 8, "bitmap table", BITMAPS)
                await settled(file.write(where, struct.pack(">Q", off)))
            await file.flush()
        for bm in self.tracked:
            bm.changed[:] = bytes(len(bm.changed))
        for e in self._set_by_us:
            e.flags &= ~IN_USE
        await self._write_flags(drv)
        await file.flush()
        self._set_by_us = []

    async def _write_flags(self, drv: Qcow2Driver) -> None:
        """Write the directory with the entries' current flags.  Only the 4-byte flags fields
        change, so a torn write leaves each bitmap with its old or its new flags, both valid."""
        for e in self.entries:
            struct.pack_into(">I", self._raw, e.pos + 12, e.flags)
        offset, size = self.directory
        drv._guard(offset, size, "bitmap directory", BITMAPS)
        await settled(self.storage.write(offset, self._raw))

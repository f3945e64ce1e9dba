"""The VHD driver ("vpc"): fixed, dynamic and differencing Virtual Hard Disk images, read-write.

Owns one VHD file: the 512-byte footer (at EOF-512, plus a copy at offset 0 in dynamic and
differencing images), the 1024-byte dynamic header, the block allocation table (BAT) and the
per-block sector bitmaps.  All fields are big-endian; names follow the VHD specification.  The
format facts this relies on are written up in docs/vhd.md.

Probing: a footer cookie ``conectix`` at offset 0 means a dynamic or differencing image (score
100).  A **fixed** VHD keeps its footer only at EOF-512, which the 512-byte probe cannot see, so a
fixed VHD is not probed (QEMU does not probe it either): serve it with ``-f vpc``.

Virtual size (``OpenOptions.vpc_size``):
  * ``auto`` (the rule of QEMU >= 10.0): the footer's cylinders*heads*sectors_per_track*512 when
    the creator application is Virtual PC (``vpc ``) or QEMU (``qemu``), which size disks by
    their CHS geometry; the footer's current_size for everything else (``qem2``, Hyper-V ``win ``,
    Disk2vhd, XenServer, Azure, ...).  QEMU 7.2 used CHS for unknown creators too; the images
    QEMU itself writes are sized identically by both rules.
  * ``chs`` / ``current`` force one or the other.
  * Whatever the choice, a geometry of exactly 65535/16/255 (the largest CHS can describe) means
    "the size did not fit in CHS": current_size is used.
  current_size is rounded down to whole sectors; sizes above 0xff000000 sectors are refused.

Footers: the trailing footer is authoritative; if its cookie or checksum is bad and the copy at
offset 0 is good, the copy is used (with a warning) and, when writable, a fresh footer is
appended at the end of the file.  The dynamic header's checksum is checked with a warning only
(QEMU does not check it at all).

Block layout: BAT entry = sector number of the block's sector bitmap (0xFFFFFFFF: unallocated);
the bitmap (one bit per sector rounded up to whole sectors, bit 7 of byte 0 = first sector; QEMU
computes 0 bytes for blocks under 4 KiB, we follow the specification) is followed by
``block_size`` bytes of data.  Any power-of-two block size from 512 bytes up is read and written.
A set bit means "this image holds the sector"; a clear bit means "ask the parent"
(differencing) or "zeroes" (dynamic).  Block status is exact per sector, so ``limits.align`` is
512.  QEMU ignores the bitmaps (it reads an allocated block whole and sets every bit when it
writes): in the dynamic blocks we allocate, sectors left clear were never written, so QEMU reads
them as zeroes too.  ``_full`` (one bit per BAT entry) remembers blocks whose bitmap is all set;
bits are never cleared, so the hint stays true and the hot read path skips the bitmap.  Blocks
never move or go away either, so a full block's mapping (``map_now``) never changes.

WRITE_ZEROES is native: ranges that already read as zeroes (unallocated dynamic blocks, clear
sectors of a dynamic image) are left alone and present sectors are zeroed in place (punch /
zero-range / zero bytes), so zeroing never allocates in a dynamic image.  A differencing image
must hide its parent, so there zeroes are written like data.  TRIM is not supported (a hint:
the image layer drops it).  FAST_ZERO is refused (not metadata-only).

Differencing images name their parent in the locators (``W2ru`` relative and ``W2ku`` absolute
Windows paths, UTF-16LE; ``MacX`` file URLs) and in the UTF-16BE parent name.  The first
candidate that exists and whose footer UUID equals the child's parent_uuid is reported as
``backing`` with format "vpc"; the image layer opens it and feeds ``read_backing``.

Invariants of an image this driver wrote (crash-consistent at every step):
  * the file always ends with a valid footer;
  * every BAT entry points at a block that lies inside the file, after a durable bitmap;
  * a bitmap bit is set only after the sector's data was written (and synced before the
    bitmap reaches disk), so a crash never exposes a sector as present that holds no data.
Block allocation order: (1) append the new trailing footer after the new block and fdatasync;
(2) the block's all-clear bitmap replaces the old footer (cache, written back before the BAT);
(3) the BAT entry (cache, ``after`` the bitmap).  Data goes to the block outside the lock; the
bitmap bits are set afterwards, written back with ``sync_before`` (data durable first).

Open-time checks (bad input gives a one-line ``ImageError`` naming the field): footer cookie and
checksum, disk_type, size limit (a fixed VHD whose size exceeds its data area is not refused:
QEMU reads it as the file's bytes, its footer included, then zeroes; so do we, read-only, with
a warning naming the size field); dynamic header cookie, block_size, max_table_entries (capped
before anything is read), table_offset; every BAT entry inside the file; blocks not overlapping
each other, the footer copy, the dynamic header, the BAT or parent-locator data; at most
MAX_BLOCKS allocated blocks (memory stays bounded: the BAT is scanned a chunk at a time).

Reads and writes (``read``/``write``, see ``formats.base``): a fixed image passes straight to the
storage.  Otherwise the fast case walks the cached BAT pages (and sector bitmaps) synchronously
and starts each piece's storage or backing read; a read that meets a page or bitmap not cached
returns a coroutine that loads it and walks on; a write goes to the storage at once when every
block it touches is allocated, fully present and its BAT page cached (no bitmap changes), else
it returns the coroutine that allocates and sets bitmap bits.

Locking: ``self.lock`` (a CoMutex) guards the BAT, the bitmaps, ``free_offset`` and the footer.
Reads and writes of data in allocated blocks run without it.  Allocation re-checks the BAT entry
under the lock, so concurrent writes into one unallocated block allocate it once.
"""

from __future__ import annotations

import bisect
import errno
import itertools
import logging
import os
import struct
import sys
import urllib.parse
import uuid
from array import array
from typing import Any

from ..cache import CacheEntry, ClusterCache, TableKind
from ..errors import CorruptImage, ImageError, NbdError, UnsupportedImage
from ..locks import CoMutex
from ..storage.base import Pending, Storage, read_at, settled
from .base import (
    ALLOCATED,
    DATA,
    ZERO,
    ZEROES,
    BackingRef,
    Caps,
    Extent,
    FormatDriver,
    InPlaceWrites,
    Limits,
    OpenOptions,
    TableReads,
    start_writes,
    zero_in_place,
)

log = logging.getLogger(__name__)

SECTOR = 512
FOOTER_SIZE = 512
DYN_HEADER_SIZE = 1024
COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"
UNALLOCATED = 0xFFFFFFFF
MAX_SECTORS = 0xFF000000  # 2040 GiB, the largest disk VHD tools accept
CHS_MAX = (65535, 16, 255)
CHS_CREATORS = (b"vpc ", b"qemu")
MAX_TABLE_ENTRIES = 0x7FFFFFFF // 4  # INT_MAX/4, the BAT cap of the bad-input checklist
MAX_BLOCK_SIZE = 1 << 31
BAT_PAGE = 4096  # bytes of BAT per cache entry
BAT_PAGE_ENTRIES = BAT_PAGE // 4
SCAN_CHUNK = 1 << 20  # bytes of BAT decoded at a time during the open-time scan
MAX_BLOCKS = 1 << 21  # allocated blocks; 2M x 2 MiB blocks is twice the largest VHD
MAX_LOCATOR = 64 << 10  # bytes; a parent path longer than this is not a path
STATUS_BLOCKS = 4096  # blocks looked at per block_status call
SWAP = sys.byteorder == "little"  # BAT entries are big-endian

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4

# Footer: cookie, features, file_format_version, data_offset, time_stamp, creator_application,
# creator_version, creator_host_os, original_size, current_size, disk_geometry (cylinders,
# heads, sectors_per_track), disk_type, checksum, unique_id, saved_state.
FOOTER = struct.Struct(">8sIIQI4sI4sQQHBBII16sB")
FOOTER_CHECKSUM_AT = 64
# Dynamic header: cookie, data_offset, table_offset, header_version, max_table_entries,
# block_size, checksum, parent_unique_id, parent_time_stamp, reserved, parent_unicode_name.
DYN_HEADER = struct.Struct(">8sQQIIII16sII512s")
DYN_CHECKSUM_AT = 36
LOCATORS_AT = 576
LOCATOR = struct.Struct(">4sIIIQ")  # platform_code, data_space, data_length, reserved, data_offset


def vhd_checksum(buf: bytes | bytearray, at: int) -> int:
    """One's complement of the byte sum, with the 4-byte checksum field at ``at`` counted as 0."""
    total = sum(buf) - sum(buf[at : at + 4])
    return ~total & 0xFFFFFFFF


class Footer:
    """The decoded footer plus its raw 512 bytes (rewritten verbatim when the file grows)."""

    __slots__ = ("creator_app", "current_size", "data_offset", "disk_type", "geometry", "raw", "unique_id")

    def __init__(self, raw: bytes) -> None:
        f = FOOTER.unpack_from(raw)
        self.raw = raw
        self.data_offset = f[3]
        self.creator_app = f[5]
        self.current_size = f[9]
        self.geometry = (f[10], f[11], f[12])
        self.disk_type = f[13]
        self.unique_id = f[15]


def parse_footer(raw: bytes | bytearray) -> tuple[Footer | None, str]:
    """(footer, "") if ``raw`` is a footer with a valid checksum, else (None, why not)."""
    if raw[:8] != COOKIE:
        return None, "no 'conectix' cookie"
    stored = struct.unpack_from(">I", raw, FOOTER_CHECKSUM_AT)[0]
    want = vhd_checksum(raw, FOOTER_CHECKSUM_AT)
    if stored != want:
        return None, f"footer checksum 0x{stored:08x} does not match the computed 0x{want:08x}"
    return Footer(bytes(raw)), ""


def virtual_size(footer: Footer, rule: str, path: str) -> tuple[int, str]:
    """The disk size in bytes under ``rule`` (auto | chs | current), and the footer field it
    came from (``disk_geometry`` or ``current_size``); see the module docstring."""
    if rule not in ("auto", "chs", "current"):
        raise ImageError(path, f"vpc size rule {rule!r} is not one of auto, chs, current")
    c, h, s = footer.geometry
    use_chs = rule == "chs" or (rule == "auto" and footer.creator_app in CHS_CREATORS)
    if footer.geometry == CHS_MAX:
        use_chs = False
    sectors = c * h * s if use_chs else footer.current_size // SECTOR
    if sectors > MAX_SECTORS:
        raise UnsupportedImage(path, f"virtual size {sectors * SECTOR} exceeds the VHD maximum of 2040 GiB")
    return sectors * SECTOR, "disk_geometry" if use_chs else "current_size"


# -- sector bitmaps (bit 7 of byte 0 is the block's first sector) -----------------------------


def bit_run(bm: bytearray, s: int, e: int) -> tuple[int, bool]:
    """Length of the run of equal bits starting at sector ``s`` (capped at ``e``) and its value."""
    want = bool(bm[s >> 3] & (0x80 >> (s & 7)))
    i = s
    while i < e and i & 7:  # up to a byte boundary
        if bool(bm[i >> 3] & (0x80 >> (i & 7))) != want:
            return i - s, want
        i += 1
    j, jend = i >> 3, e >> 3
    if jend > j:  # whole bytes at once
        span = bm[j:jend]
        i += (len(span) - len(span.lstrip(b"\xff" if want else b"\x00"))) * 8
    while i < e and bool(bm[i >> 3] & (0x80 >> (i & 7))) == want:  # the byte where it changes, or the tail
        i += 1
    return i - s, want


def set_bits(bm: bytearray, s: int, e: int) -> None:
    """Set the bits of sectors ``[s, e)``."""
    while s < e and s & 7:
        bm[s >> 3] |= 0x80 >> (s & 7)
        s += 1
    if e - s >= 8:
        j, jend = s >> 3, e >> 3
        bm[j:jend] = b"\xff" * (jend - j)
        s = jend << 3
    while s < e:
        bm[s >> 3] |= 0x80 >> (s & 7)
        s += 1


def _decode_bat(buf: bytearray) -> array:
    a = array("I")
    a.frombytes(buf)
    if SWAP:
        a.byteswap()
    return a


def _encode_bat(a: array) -> bytes:
    if not SWAP:
        return a.tobytes()
    b = array("I", a)
    b.byteswap()
    return b.tobytes()


def _identity(buf: Any) -> Any:
    return buf


class VhdDriver(TableReads, InPlaceWrites, FormatDriver):
    format_name = "vpc"

    def __init__(self, storage: Storage, readonly: bool, footer: Footer, size: int) -> None:
        self.storage = storage
        self.path = storage.name
        self.readonly = readonly
        self.footer = footer
        self.size = size
        self.fixed = footer.disk_type == DISK_FIXED
        self.limits = Limits(align=SECTOR)
        self.caps = Caps(native_zero=not readonly)
        self.lock = CoMutex(f"vhd {storage.name}")
        self.backing = None
        # dynamic / differencing only (set by _open_dynamic)
        self.cache: ClusterCache | None = None
        self.block_size = 0
        self.block_shift = 0
        self.bitmap_size = 0
        self.table_offset = 0
        self.entries = 0
        self.free_offset = 0
        self._bat_kind: TableKind | None = None
        self._bat_tail_kind: TableKind | None = None
        self._bitmap_kind: TableKind | None = None
        self._tail_page = -1  # index of the short last BAT page, if any
        self._full = bytearray()  # bit per BAT entry: every sector present (a derived hint)

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        return 100 if head[:8] == COOKIE else 0

    # -- open -------------------------------------------------------------------------------

    @classmethod
    async def open(cls, storage: Storage, *, readonly: bool, cache: ClusterCache, options: OpenOptions) -> VhdDriver:
        path = storage.name
        if storage.size < FOOTER_SIZE:
            raise CorruptImage(path, f"file of {storage.size} bytes is shorter than a VHD footer (512)")
        tail_at = storage.size - FOOTER_SIZE
        tail, tail_err = parse_footer(await read_at(storage, tail_at, FOOTER_SIZE))
        footer, repair = tail, False
        if tail is None:
            head, head_err = parse_footer(await read_at(storage, 0, FOOTER_SIZE))
            if head is None or head.disk_type not in (DISK_DYNAMIC, DISK_DIFFERENCING):
                why = head_err or f"its disk_type is {head.disk_type}"
                raise CorruptImage(path, f"no valid VHD footer (at end of file: {tail_err}; copy at offset 0: {why})")
            log.warning("%s: trailing footer unusable (%s); using the copy at offset 0", path, tail_err)
            footer, repair = head, True
        if footer.disk_type not in (DISK_FIXED, DISK_DYNAMIC, DISK_DIFFERENCING):
            kind = footer.disk_type
            raise UnsupportedImage(path, f"footer disk_type {kind} is not fixed (2), dynamic (3) or differencing (4)")
        size, field = virtual_size(footer, options.vpc_size, path)
        if footer.disk_type == DISK_FIXED and size > tail_at:
            log.warning(
                "%s: fixed VHD: virtual size %d (footer %s) exceeds the data area of %d bytes; serving it "
                "read-only, the missing part reading (as QEMU reads it) as the footer, then zeroes",
                path, size, field, tail_at,
            )  # fmt: skip
            readonly = True
        drv = cls(storage, readonly, footer, size)
        if drv.fixed:
            return drv
        await drv._open_dynamic(cache)
        if repair and not readonly:
            at = max(drv.free_offset, -(-storage.size // SECTOR) * SECTOR)
            await settled(storage.write(at, footer.raw))
            await storage.flush()
        return drv

    async def _open_dynamic(self, cache: ClusterCache) -> None:
        storage, path, footer = self.storage, self.path, self.footer
        hdr_at = footer.data_offset
        if hdr_at % SECTOR or hdr_at < FOOTER_SIZE or hdr_at + DYN_HEADER_SIZE > storage.size - FOOTER_SIZE:
            raise CorruptImage(path, f"footer data_offset 0x{hdr_at:x} (dynamic header) is not inside the file")
        raw = await read_at(storage, hdr_at, DYN_HEADER_SIZE)
        (cookie, _, table_offset, _, entries, block_size, checksum, parent_uuid, _, _, parent_name) = (
            DYN_HEADER.unpack_from(raw)
        )
        if cookie != DYN_COOKIE:
            raise CorruptImage(path, f"dynamic header cookie {cookie!r} is not 'cxsparse'")
        if checksum != vhd_checksum(raw, DYN_CHECKSUM_AT):
            log.warning("%s: dynamic header checksum mismatch (ignored, as QEMU does)", path)
        if block_size < SECTOR or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise CorruptImage(path, f"dynamic header block_size {block_size} is not a power of two in [512, 2 GiB]")
        if entries > MAX_TABLE_ENTRIES or entries > MAX_SECTORS * SECTOR // block_size:
            raise CorruptImage(path, f"dynamic header max_table_entries {entries} is too large")
        if entries * block_size < self.size:
            raise CorruptImage(
                path, f"max_table_entries {entries} x block_size {block_size} is smaller than the disk size {self.size}"
            )
        bat_end = table_offset + 4 * entries
        if table_offset % SECTOR or table_offset < FOOTER_SIZE or bat_end > storage.size - FOOTER_SIZE:
            raise CorruptImage(
                path,
                f"dynamic header table_offset 0x{table_offset:x} (BAT of {entries} entries) is not inside the file",
            )
        self.cache = cache
        self.block_size = block_size
        self.block_shift = block_size.bit_length() - 1
        self.map_bits = self.block_shift
        # one bit per sector, whole sectors (QEMU's formula gives 0 below 4 KiB blocks; the spec's does not)
        self.bitmap_size = -(-(block_size // SECTOR) // (8 * SECTOR)) * SECTOR
        self.table_offset = table_offset
        self.entries = entries
        regions = [(0, FOOTER_SIZE, "footer copy"), (hdr_at, hdr_at + DYN_HEADER_SIZE, "dynamic header")]
        regions.append((table_offset, bat_end, "BAT"))
        if footer.disk_type == DISK_DIFFERENCING:
            self.backing = await self._find_parent(raw, parent_uuid, parent_name, regions)
        await self._scan_bat(regions)
        self._bat_kind = cache.kind(storage, name="VHD BAT page", size=BAT_PAGE, decode=_decode_bat, encode=_encode_bat)
        self._full = bytearray((entries + 7) // 8)
        tail = entries % BAT_PAGE_ENTRIES
        if tail:
            self._tail_page = entries // BAT_PAGE_ENTRIES
            self._bat_tail_kind = cache.kind(
                storage, name="VHD BAT tail", size=tail * 4, decode=_decode_bat, encode=_encode_bat
            )
        self._bitmap_kind = cache.kind(
            storage, name="VHD sector bitmap", size=self.bitmap_size, decode=_identity, encode=_identity
        )

    async def _scan_bat(self, regions: list[tuple[int, int, str]]) -> None:
        """Check every BAT entry (inside the file, no overlaps) and find where free space starts.

        Memory stays bounded: the BAT is decoded a chunk at a time, allocated entries are kept
        as 4-byte array items, and their number is capped (by what fits in the file, and at
        MAX_BLOCKS) before anything is sorted.
        """
        storage, path = self.storage, self.path
        span = self.bitmap_size + self.block_size
        fits = min(MAX_BLOCKS, storage.size // span)
        blocks = array("I")
        pos, end = self.table_offset, self.table_offset + 4 * self.entries
        while pos < end:
            n = min(SCAN_CHUNK, end - pos)
            chunk = _decode_bat(await read_at(storage, pos, n))
            used = [x for x in chunk if x != UNALLOCATED]
            if used:
                top = max(used)
                if top * SECTOR + span > storage.size:
                    idx = (pos - self.table_offset) // 4 + chunk.index(top)
                    raise CorruptImage(
                        path, f"BAT entry {idx} (sector 0x{top:x}): block past the end of the file (truncated image?)"
                    )
                blocks.extend(used)
                if len(blocks) > fits:
                    why = (
                        "they cannot all fit in the file" if fits < MAX_BLOCKS else f"nbdserve's limit is {MAX_BLOCKS}"
                    )
                    raise CorruptImage(path, f"BAT has more than {fits} allocated blocks ({why})")
            pos += n
        starts = sorted(blocks)
        del blocks
        for a, b in itertools.pairwise(starts):
            if (b - a) * SECTOR < span:
                raise CorruptImage(path, f"block at 0x{b * SECTOR:x} overlaps the block at 0x{a * SECTOR:x}")
        regions.sort()
        for (s0, e0, n0), (s1, _, n1) in itertools.pairwise(regions):
            if s1 < e0:
                raise CorruptImage(path, f"{n1} at 0x{s1:x} overlaps {n0} at 0x{s0:x}-0x{e0:x}")
        for r0, r1, name in regions:
            i = bisect.bisect_left(starts, -(-r1 // SECTOR))  # first block starting at or after r1
            if i and starts[i - 1] * SECTOR + span > r0:
                raise CorruptImage(path, f"block at 0x{starts[i - 1] * SECTOR:x} overlaps the {name} at 0x{r0:x}")
        top_end = max(r1 for _, r1, _ in regions)
        if starts:
            top_end = max(top_end, starts[-1] * SECTOR + span)
        self.free_offset = -(-top_end // SECTOR) * SECTOR

    async def _find_parent(
        self, raw: bytearray, parent_uuid: bytes, parent_name: bytes, regions: list[tuple[int, int, str]]
    ) -> BackingRef:
        """Choose the parent among the locators and the parent name; check its footer's UUID."""
        storage, path = self.storage, self.path
        candidates: list[str] = []
        by_kind: dict[bytes, list[str]] = {b"W2ru": [], b"W2ku": [], b"MacX": []}
        for i in range(8):
            code, _space, length, _res, offset = LOCATOR.unpack_from(raw, LOCATORS_AT + i * LOCATOR.size)
            if code not in by_kind or length == 0:
                continue
            if length > MAX_LOCATOR or offset + length > storage.size:
                where = f"0x{offset:x}+{length}"
                raise CorruptImage(path, f"parent locator {i} ({code.decode()}) data at {where} is not inside the file")
            regions.append((offset, offset + length, f"parent locator {i}"))
            data = bytes(await read_at(storage, offset, length))
            try:
                text = data.decode("utf-8") if code == b"MacX" else data.decode("utf-16-le")
            except UnicodeDecodeError:
                raise CorruptImage(path, f"parent locator {i} ({code.decode()}) is not valid text") from None
            text = text.rstrip("\0")
            if code == b"MacX":  # file:// URL
                text = urllib.parse.unquote(urllib.parse.urlsplit(text).path)
            else:
                text = text.replace("\\", "/")
                if len(text) >= 2 and text[1] == ":":  # C:/dir/parent.vhd: only the name means anything here
                    text = os.path.basename(text)
            if text:
                by_kind[code].append(text)
        for code in (b"W2ru", b"W2ku", b"MacX"):
            candidates.extend(by_kind[code])
        try:
            name = parent_name.decode("utf-16-be").split("\0", 1)[0]
        except UnicodeDecodeError:
            raise CorruptImage(path, "dynamic header parent_unicode_name is not valid UTF-16") from None
        if name:
            candidates.append(os.path.basename(name.replace("\\", "/")))
        if not candidates:
            raise CorruptImage(path, "differencing VHD names no parent (no W2ru/W2ku/MacX locator, empty parent name)")
        base = os.path.dirname(os.path.realpath(path))
        want = uuid.UUID(bytes=parent_uuid)
        mismatched = None
        for cand in dict.fromkeys(candidates):
            full = os.path.join(base, cand)
            if not os.path.isfile(full):
                continue
            got = _footer_uuid(full)
            if got == want:
                return BackingRef(cand, "vpc")
            mismatched = mismatched or (cand, got)
        if mismatched is not None:
            cand, got = mismatched
            raise CorruptImage(
                path, f"parent {cand!r} has unique_id {got or 'unreadable'}, the child's parent_unique_id is {want}"
            )
        return BackingRef(candidates[0], "vpc")  # the image layer reports it as not found

    # -- lookups ----------------------------------------------------------------------------

    def _bat_loc(self, idx: int) -> tuple[TableKind, int]:
        page = idx // BAT_PAGE_ENTRIES
        kind = self._bat_tail_kind if page == self._tail_page else self._bat_kind
        return kind, self.table_offset + page * BAT_PAGE

    def _bat_cached(self, idx: int) -> int | None:
        """BAT entry ``idx`` if its page is cached, else None (never suspends)."""
        page = idx // BAT_PAGE_ENTRIES
        kind = self._bat_tail_kind if page == self._tail_page else self._bat_kind
        e = self.cache.peek(kind, self.table_offset + page * BAT_PAGE)
        return None if e is None else e.value[idx % BAT_PAGE_ENTRIES]

    async def _bat(self, idx: int) -> int:
        """BAT entry ``idx`` (no suspension when its page is cached)."""
        value = self._bat_cached(idx)
        if value is not None:
            return value
        kind, off = self._bat_loc(idx)
        e = await self.cache.get(kind, off)
        value = e.value[idx % BAT_PAGE_ENTRIES]
        self.cache.release(e)
        return value

    async def _bitmap(self, block: int) -> bytearray:
        """The sector bitmap of the block whose BAT entry is ``block`` (valid until the next await)."""
        cache, kind, off = self.cache, self._bitmap_kind, block * SECTOR
        e = cache.peek(kind, off)
        if e is not None:
            return e.value
        e = await cache.get(kind, off)
        cache.release(e)
        return e.value

    def _is_full(self, idx: int) -> bool:
        return bool(self._full[idx >> 3] & (1 << (idx & 7)))

    def _note_full(self, idx: int, bm: bytearray) -> None:
        """Remember that block ``idx`` has every sector present (bits are never cleared)."""
        spb = self.block_size >> 9
        if bit_run(bm, 0, spb) == (spb, True):
            self._full[idx >> 3] |= 1 << (idx & 7)

    # -- reads ------------------------------------------------------------------------------

    def map_now(self, offset: int) -> int | None:
        """A dynamic image's block whose sectors are all present, its BAT page cached."""
        idx = offset >> self.block_shift
        block = self._bat_cached(idx)
        if block is not None and block != UNALLOCATED and self._full[idx >> 3] & (1 << (idx & 7)):
            return block * SECTOR + self.bitmap_size
        return None

    def read(self, offset: int, buf: memoryview) -> Pending:
        if self.fixed:
            return self.storage.read(offset, buf)
        return TableReads.read(self, offset, buf)

    def _read_cached(self, offset: int, buf: memoryview, pos: int, pendings: list) -> int:
        """Start the reads of ``buf`` (guest ``offset``) from ``pos`` on, block by block, as long
        as the BAT pages and the bitmaps needed are cached; returns where it stopped.
        Synchronous (no lock: a block's mapping never changes once it is allocated)."""
        shift, end = self.block_shift, offset + len(buf)
        while pos < end:
            idx = pos >> shift
            block = self._bat_cached(idx)
            if block is None:
                return pos
            bm = None
            if block != UNALLOCATED and not self._full[idx >> 3] & (1 << (idx & 7)):
                e = self.cache.peek(self._bitmap_kind, block * SECTOR)
                if e is None:
                    return pos
                bm = e.value
            pos = self._read_block(offset, buf, pos, block, bm, pendings)
        return pos

    def _read_block(
        self, offset: int, buf: memoryview, pos: int, block: int, bm: bytearray | None, pendings: list
    ) -> int:
        """Start the reads of the part of block ``block`` (its BAT entry) from guest ``pos``;
        ``bm`` is its sector bitmap (None: unallocated or fully present).  Returns the next
        guest offset."""
        bs = self.block_size
        inblk = pos & (bs - 1)
        cnt = min(bs - inblk, offset + len(buf) - pos)
        view = buf[pos - offset : pos - offset + cnt]
        if block == UNALLOCATED:
            p = self.read_backing(pos, view)
            if p is not None:
                pendings.append(p)
            return pos + cnt
        data_at = block * SECTOR + self.bitmap_size
        if bm is None:
            p = self.storage.read(data_at + inblk, view)
            if p is not None:
                pendings.append(p)
            return pos + cnt
        self._note_full(pos >> self.block_shift, bm)
        s0 = inblk >> 9
        s, e = s0, s0 + (cnt >> 9)
        while s < e:
            run, present = bit_run(bm, s, e)
            part = view[(s - s0) << 9 : (s - s0 + run) << 9]
            p = (
                self.storage.read(data_at + (s << 9), part)
                if present
                else self.read_backing(pos + ((s - s0) << 9), part)
            )
            if p is not None:
                pendings.append(p)
            s += run
        return pos + cnt

    async def _load_for_read(self, offset: int, buf: memoryview, pos: int, pendings: list) -> int:
        """The BAT page and bitmap ``_read_cached`` stopped at; the block is then read from the
        values loaded, even if loading one evicted the other (see ``TableReads``)."""
        idx = pos >> self.block_shift
        block = await self._bat(idx)
        bm = None
        if block != UNALLOCATED and not self._is_full(idx):
            bm = await self._bitmap(block)
        return self._read_block(offset, buf, pos, block, bm, pendings)

    # -- writes -----------------------------------------------------------------------------

    def write(self, offset: int, data: memoryview, *, fua: bool) -> Pending:
        if self.fixed:
            pending = self.storage.write(offset, data)
            return self._flush_after(pending) if fua else pending
        return InPlaceWrites.write(self, offset, data, fua=fua)

    async def _flush_after(self, pending: Pending) -> None:
        await settled(pending)
        await self.flush()

    def _write_in_place(self, offset: int, data: memoryview) -> list | None:
        """Start the writes if every block is allocated, fully present (no bitmap to change) and
        its BAT page cached (returns their Pendings); else None, and nothing written."""
        shift, bs = self.block_shift, self.block_size
        plan = []
        pos, n = 0, len(data)
        while pos < n:
            off = offset + pos
            idx = off >> shift
            block = self._bat_cached(idx)
            if block is None or block == UNALLOCATED or not self._full[idx >> 3] & (1 << (idx & 7)):
                return None
            inblk = off & (bs - 1)
            cnt = min(bs - inblk, n - pos)
            plan.append((block * SECTOR + self.bitmap_size + inblk, pos, cnt))
            pos += cnt
        return start_writes(self.storage, data, plan)

    async def _write_slow(self, offset: int, data: memoryview, fua: bool) -> None:
        """``write`` that allocates blocks or sets bitmap bits (or carries FUA)."""
        shift, bs = self.block_shift, self.block_size
        pos, n = 0, len(data)
        while pos < n:
            off = offset + pos
            inblk = off & (bs - 1)
            cnt = min(bs - inblk, n - pos)
            idx = off >> shift
            block = await self._bat(idx)
            if block == UNALLOCATED:
                async with self.lock:
                    block = await self._allocate(idx)
            await settled(self.storage.write(block * SECTOR + self.bitmap_size + inblk, data[pos : pos + cnt]))
            if not self._is_full(idx):
                s, e = inblk >> 9, (inblk + cnt) >> 9
                run, present = bit_run(await self._bitmap(block), s, e)
                if not present or run < e - s:
                    async with self.lock:
                        await self._mark_present(idx, block, s, e)
            pos += cnt
        if fua:
            await self.flush()

    async def _allocate(self, idx: int) -> int:
        """Allocate the block of BAT entry ``idx`` unless a concurrent write already did.

        Called with self.lock held.
        """
        self.lock.assert_locked()
        block = await self._bat(idx)
        if block != UNALLOCATED:
            return block
        storage, cache = self.storage, self.cache
        # Never reuse bytes between free_offset and the old footer: they may hold anything.
        at = max(self.free_offset, (storage.size - FOOTER_SIZE) // SECTOR * SECTOR)
        new_end = at + self.bitmap_size + self.block_size
        if at // SECTOR >= UNALLOCATED:
            raise NbdError(errno.ENOSPC, f"{self.path}: VHD file would grow past 2 TiB of BAT-addressable space")
        # (1) the new trailing footer, durable before anything overwrites the old one
        await settled(storage.write(new_end, self.footer.raw))
        await storage.flush()
        # (2) the block's bitmap (all clear) takes the old footer's place; (3) then the BAT entry
        kind, page_off = self._bat_loc(idx)
        page = await cache.get(kind, page_off)
        try:
            assert page.value[idx % BAT_PAGE_ENTRIES] == UNALLOCATED, "BAT changed without the lock"
            block = at // SECTOR
            bm = cache.put_new(self._bitmap_kind, at, bytearray(self.bitmap_size))
            page.value[idx % BAT_PAGE_ENTRIES] = block
            self.free_offset = new_end
            cache.mark_dirty(page, after=[bm])
            cache.release(bm)
        finally:
            cache.release(page)
        return block

    async def _mark_present(self, idx: int, block: int, s: int, e: int) -> None:
        """Set the bits of sectors ``[s, e)`` of block ``idx`` whose data was just written.

        Called with self.lock held.
        """
        self.lock.assert_locked()
        cache = self.cache
        entry: CacheEntry = await cache.get(self._bitmap_kind, block * SECTOR)
        try:
            set_bits(entry.value, s, e)
            cache.mark_dirty(entry, sync_before=True)
            self._note_full(idx, entry.value)
        finally:
            cache.release(entry)

    async def pwrite_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        """Zero without allocating: ranges that already read as zeroes are left alone.

        Fixed: like raw (punch, zero-range, or zero bytes).  Dynamic: unallocated blocks and
        clear sectors already read as zeroes; present sectors are zeroed in place.  Differencing:
        clear sectors would show the parent, so they are written like data (allocating).
        """
        if self.fixed:
            await zero_in_place(self.storage, offset, length, may_trim)
        else:
            diff = self.footer.disk_type == DISK_DIFFERENCING
            shift, bs = self.block_shift, self.block_size
            pos, end = offset, offset + length
            while pos < end:
                inblk = pos & (bs - 1)
                cnt = min(bs - inblk, end - pos)
                block = await self._bat(pos >> shift)
                if block == UNALLOCATED:
                    if diff:
                        await self._write_zero_bytes(pos, cnt)
                else:
                    s0 = s = inblk >> 9
                    e = s + (cnt >> 9)
                    while s < e:
                        run, present = bit_run(await self._bitmap(block), s, e)
                        if present:
                            at = block * SECTOR + self.bitmap_size + (s << 9)
                            await zero_in_place(self.storage, at, run << 9, may_trim)
                        elif diff:
                            await self._write_zero_bytes(pos + ((s - s0) << 9), run << 9)
                        s += run
                pos += cnt
        if fua:
            await self.flush()

    async def _write_zero_bytes(self, offset: int, n: int) -> None:
        end = offset + n
        while offset < end:
            k = min(len(ZEROES), end - offset)
            await settled(self.write(offset, memoryview(ZEROES)[:k], fua=False))
            offset += k

    async def flush(self) -> None:
        if self.fixed:
            await self.storage.flush()
        else:
            await self.cache.flush(self.storage)

    # -- block status -----------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
        end = offset + length
        if self.fixed:  # past the file (a short fixed image, read-only): a hole, zeroes
            run, is_data = await self.storage.extent(offset, length)
            if is_data:  # a file ending inside a sector: the whole sector is data
                return Extent(min(length, -(-run // SECTOR) * SECTOR), ALLOCATED | DATA)
            return Extent(run, ALLOCATED | ZERO)
        shift, bs = self.block_shift, self.block_size
        state = None
        pos = offset
        end = min(end, offset + STATUS_BLOCKS * bs)  # one call stays short; the image layer loops
        while pos < end:
            inblk = pos & (bs - 1)
            cnt = min(bs - inblk, end - pos)
            block = await self._bat(pos >> shift)
            if block == UNALLOCATED:
                run, st = cnt, 0
            elif self._is_full(pos >> shift):
                run, st = cnt, ALLOCATED | DATA
            else:  # whole sectors, even if a caller asks about a byte range inside one
                bm = await self._bitmap(block)
                s = inblk >> 9
                nsec, present = bit_run(bm, s, (inblk + cnt + SECTOR - 1) >> 9)
                run, st = min(cnt, ((s + nsec) << 9) - inblk), (ALLOCATED | DATA) if present else 0
            if state is None:
                state = st
            elif st != state:
                break
            pos += run
            if run < cnt:
                break
        return Extent(pos - offset, state)

    async def cache_hint(self, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: load the BAT pages and sector bitmaps of the range (at most STATUS_BLOCKS)."""
        if self.fixed:
            return
        first = offset >> self.block_shift
        last = min((offset + length - 1) >> self.block_shift, first + STATUS_BLOCKS - 1)
        for idx in range(first, last + 1):
            block = await self._bat(idx)
            if block != UNALLOCATED and not self._is_full(idx):
                self._note_full(idx, await self._bitmap(block))

    async def close(self) -> None:
        if not self.readonly:
            await self.flush()


def _footer_uuid(path: str) -> uuid.UUID | None:
    """The unique_id of the VHD at ``path`` (trailing footer, else the copy at 0), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < FOOTER_SIZE:
            return None
        for at in (size - FOOTER_SIZE, 0):
            footer, _ = parse_footer(os.pread(fd, FOOTER_SIZE, at))
            if footer is not None:
                return uuid.UUID(bytes=footer.unique_id)
        return None
    finally:
        os.close(fd)

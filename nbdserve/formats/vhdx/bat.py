"""VHDX block allocation table: geometry, entry states and the open-time check (MS-VHDX 2.5).

Owns (the facts are written up in docs/vhdx.md):
  * ``Geometry``: block size, chunk ratio (payload blocks per sector-bitmap block), and where
    payload block k's entry lives: BAT index ``k + k // chunk_ratio``; chunk c's sector-bitmap
    entry is at ``c * (chunk_ratio + 1) + chunk_ratio``; ``extent``, the bytes of every block
    the image can have (what bounds log replay);
  * the payload states and how they read (``reads_from``): only NOT_PRESENT defers to the
    parent; UNDEFINED, ZERO and UNMAPPED read as zeroes in every kind of VHDX; and the entry
    encoding (bits 0-2 state, 3-19 reserved, 20-63 file offset in MiB);
  * ``check_bat``: one bulk pass over the whole table at open, so that afterwards every entry
    the driver looks up is known to be well formed (reserved bits set are reported, not refused:
    state and offset still mean one thing, the caller serves the image read-only).

BAT pages (``PAGE_SIZE`` bytes, decoded as ``array('Q')``) live in the shared cluster cache.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import AsyncIterable
from dataclasses import dataclass
from itertools import pairwise

from ...errors import CorruptImage
from .header import MiB

PAGE_SIZE = 64 << 10
ENTRIES_PER_PAGE = PAGE_SIZE // 8
PAGE_SHIFT = 13  # log2(ENTRIES_PER_PAGE)
PAGE_MASK = ENTRIES_PER_PAGE - 1
SECTOR_BITMAP_BLOCK = MiB

NOT_PRESENT = 0
UNDEFINED = 1
ZERO = 2
UNMAPPED = 3
UNMAPPED_V095 = 5
FULLY_PRESENT = 6
PARTIALLY_PRESENT = 7
SB_PRESENT = 6

STATE_MASK = 7
RESERVED_MASK = 0xFFFF8
OFFSET_MASK = ~0xFFFFF & 0xFFFFFFFFFFFFFFFF

# How a payload block reads.
READ_ZERO = 0  # zeroes
READ_FILE = 1  # from this file at the entry's offset
READ_PARENT = 2  # from the parent
READ_BITMAP = 3  # per sector, through the sector bitmap


def reads_from(state: int, has_parent: bool) -> int:
    """How a block in ``state`` reads.  MS-VHDX lets UNDEFINED and UNMAPPED read as zeroes or
    old contents, never as the parent's data, so those read as zeroes like ZERO does."""
    if state == FULLY_PRESENT:
        return READ_FILE
    if state == PARTIALLY_PRESENT:
        return READ_BITMAP
    if state == NOT_PRESENT and has_parent:
        return READ_PARENT
    return READ_ZERO


def decode_page(buf: bytearray) -> array:
    a = array("Q", buf)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def encode_page(a: array) -> bytes:
    if sys.byteorder != "little":
        b = array("Q", a)
        b.byteswap()
        return b.tobytes()
    return a.tobytes()


@dataclass(frozen=True)
class Geometry:
    size: int
    block_size: int
    logical_sector_size: int
    has_parent: bool

    @property
    def chunk_ratio(self) -> int:
        return ((1 << 23) * self.logical_sector_size) // self.block_size

    @property
    def blocks(self) -> int:
        return -(-self.size // self.block_size)

    @property
    def entries(self) -> int:
        n, cr = self.blocks, self.chunk_ratio
        if self.has_parent:
            return -(-n // cr) * (cr + 1)
        return n + (n - 1) // cr if n else 0

    @property
    def bitmap_blocks(self) -> int:
        """Sector bitmap blocks a differencing image can have (one per chunk)."""
        return -(-self.blocks // self.chunk_ratio) if self.has_parent else 0

    @property
    def extent(self) -> int:
        """Bytes of all the payload and sector bitmap blocks the image can have."""
        return self.blocks * self.block_size + self.bitmap_blocks * SECTOR_BITMAP_BLOCK

    def payload_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def bitmap_index(self, block: int) -> int:
        cr = self.chunk_ratio
        return (block // cr) * (cr + 1) + cr


async def check_bat(
    path: str, pages: AsyncIterable[tuple[int, array]], geo: Geometry, file_size: int, reserved: list[tuple[int, int]]
) -> str | None:
    """Validate every entry: states, offsets inside the file and not overlapping, and a present
    sector bitmap for every chunk with a PARTIALLY_PRESENT block.  Returns None, or a note on
    the entries with reserved bits set (the first one and how many).

    ``pages`` yields (first BAT index, entries) covering the used part of the table; ``reserved``
    lists (start, end) host ranges that blocks must not touch (first MiB, log, regions).
    Memory: one page plus one span per present block (present blocks lie inside the file).
    """
    spans: list[tuple[int, int, int, int]] = []
    odd: list[tuple[int, int]] = []  # (index, entry) of the first entry with reserved bits, and more
    async for base, page in pages:
        if page.count(NOT_PRESENT) + page.count(ZERO) == len(page):
            continue  # the common all-empty page: nothing to check
        for j, e in enumerate(page):
            if e:
                if e & RESERVED_MASK and len(odd) < 2:
                    odd.append((base + j, e))
                _check_entry(path, base + j, e & ~RESERVED_MASK, geo, file_size, spans)
    cr = geo.chunk_ratio
    with_bitmap = {i // (cr + 1) for _, _, i, state in spans if i % (cr + 1) == cr}
    for _, _, i, state in spans:
        if state == PARTIALLY_PRESENT and i // (cr + 1) not in with_bitmap:
            raise CorruptImage(path, f"BAT entry {i}: partially present block without a sector bitmap block")
    spans.sort()
    for a, b in pairwise(spans):
        if b[0] < a[1]:
            raise CorruptImage(path, f"BAT entry {b[2]}: block at 0x{b[0]:x} overlaps BAT entry {a[2]}")
    for start, end, i, _ in spans:
        for rs, re_ in reserved:
            if start < re_ and rs < end:
                raise CorruptImage(path, f"BAT entry {i}: block at 0x{start:x} overlaps VHDX metadata or the log")
    if not odd:
        return None
    i, e = odd[0]
    more = " (and more entries)" if len(odd) > 1 else ""
    return f"BAT entry {i}: reserved bits set (0x{e:x}){more}"


def _check_entry(
    path: str, i: int, e: int, geo: Geometry, file_size: int, spans: list[tuple[int, int, int, int]]
) -> None:
    state = e & STATE_MASK
    off = e & OFFSET_MASK
    is_bitmap = i % (geo.chunk_ratio + 1) == geo.chunk_ratio
    what = f"BAT entry {i}"
    if is_bitmap:
        if state not in (NOT_PRESENT, SB_PRESENT) or (state == SB_PRESENT and not geo.has_parent):
            raise CorruptImage(path, f"{what}: invalid sector bitmap state {state}")
        need = SECTOR_BITMAP_BLOCK
        present = state == SB_PRESENT
    else:
        if state == 4 or (state == PARTIALLY_PRESENT and not geo.has_parent):
            raise CorruptImage(path, f"{what}: invalid payload block state {state}")
        need = _last_block_bytes(i, geo)
        present = state in (FULLY_PRESENT, PARTIALLY_PRESENT)
    if not present:
        return
    if off < MiB:
        raise CorruptImage(path, f"{what}: file offset 0x{off:x} inside the header section")
    if off + need > file_size:
        raise CorruptImage(path, f"{what}: block at 0x{off:x} points after end of file")
    spans.append((off, off + (SECTOR_BITMAP_BLOCK if is_bitmap else geo.block_size), i, state))


def _last_block_bytes(index: int, geo: Geometry) -> int:
    """Bytes of the payload block at BAT ``index`` that lie inside the virtual disk."""
    cr = geo.chunk_ratio
    block = index - index // (cr + 1)
    return max(1, min(geo.block_size, geo.size - block * geo.block_size))

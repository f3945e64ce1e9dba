"""The hosted sparse extent header (``KDMV``), the streamOptimized footer and markers.

Owns ``SparseHeader`` (the little-endian 512-byte header at the start of a sparse extent, field
names as in VMware's "Virtual Disk Format 1.1" specification) and ``read_sparse_header``, which
returns a header whose geometry is safe to use or raises an ``ImageError`` naming the field.
A streamOptimized extent written by VMware has ``gdOffset`` = ``GD_AT_END`` in its header: the
real header is the footer, found in the second-to-last sector, between a footer marker and an
end-of-stream marker (docs/vmdk.md, "streamOptimized").

Layout (offset: field): 0 magic "KDMV", 4 version, 8 flags, 12 capacity, 20 grainSize,
28 descriptorOffset, 36 descriptorSize, 44 numGTEsPerGT, 48 rgdOffset, 56 gdOffset, 64 overHead,
72 uncleanShutdown, 73..76 the newline check bytes "\\n \\r\\n", 77 compressAlgorithm.
Sizes and offsets are in 512-byte sectors.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...errors import CorruptImage, UnsupportedImage
from ...storage.base import Storage, read_at

SECTOR = 512
MAGIC = b"KDMV"
COWD_MAGIC = b"COWD"  # the older VMware sparse format (VMDK3), not supported
HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")

FLAG_NL_DETECT = 1 << 0  # the newline check bytes are valid
FLAG_RGD = 1 << 1  # a redundant grain directory is kept
FLAG_ZERO_GRAIN = 1 << 2  # grain table entry 1 means "a grain of zeroes"
FLAG_COMPRESSED = 1 << 16  # grains are compressed
FLAG_MARKERS = 1 << 17  # compressed grains and metadata carry markers

NL_CHECK = b"\n \r\n"
COMPRESS_NONE = 0
COMPRESS_DEFLATE = 1
GD_AT_END = 0xFFFFFFFFFFFFFFFF

# Markers (streamOptimized): a grain marker is (lba u64, size u32) followed by ``size`` bytes of
# compressed data; a metadata marker is (sectors u64, 0 u32, type u32) padded to a sector.
GRAIN_MARKER = struct.Struct("<QI")
META_MARKER = struct.Struct("<QII")
MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3

MAX_GRAIN_SECTORS = 4096  # 2 MiB
MAX_GTES = 512
MAX_CAPACITY = 1 << 40  # sectors
MAX_DESCRIPTOR_SECTORS = 2048  # 1 MiB
MAX_GD_ENTRIES = 1 << 18  # 1 MiB of grain directory: 8 TiB with the standard geometry


@dataclass
class SparseHeader:
    version: int
    flags: int
    capacity: int
    grain_size: int
    descriptor_offset: int
    descriptor_size: int
    num_gtes_per_gt: int
    rgd_offset: int
    gd_offset: int
    overhead: int
    unclean_shutdown: int
    nl_check: bytes
    compress_algorithm: int
    footer: bool = False  # the values come from a streamOptimized footer

    @property
    def compressed(self) -> bool:
        return self.compress_algorithm == COMPRESS_DEFLATE

    @property
    def gd_entries(self) -> int:
        span = self.num_gtes_per_gt * self.grain_size
        return -(-self.capacity // span)


def _decode(raw: bytes | bytearray) -> SparseHeader:
    f = HEADER.unpack_from(raw)
    return SparseHeader(*f[1:])


async def read_sparse_header(storage: Storage, what: str) -> SparseHeader:
    """The validated header of the sparse extent in ``storage`` (``what`` names it in messages)."""
    path = storage.name
    if storage.size < SECTOR:
        raise CorruptImage(path, f"{what}: file of {storage.size} bytes is shorter than a sparse header")
    raw = await read_at(storage, 0, SECTOR)
    if raw[:4] == COWD_MAGIC:
        raise UnsupportedImage(path, f"{what}: COWD (VMware 3) sparse extents are not supported")
    if raw[:4] != MAGIC:
        raise CorruptImage(path, f"{what}: magic {bytes(raw[:4])!r} is not 'KDMV'")
    h = _decode(raw)
    if h.gd_offset == GD_AT_END:
        h = await _read_footer(storage, what)
    if h.version not in (1, 2, 3):
        raise UnsupportedImage(path, f"{what}: version {h.version} is not 1, 2 or 3")
    if h.flags & FLAG_NL_DETECT and h.nl_check != NL_CHECK:
        raise CorruptImage(path, f"{what}: newline check bytes {h.nl_check!r} are damaged (a text-mode copy?)")
    gs = h.grain_size
    if not 0 < gs <= MAX_GRAIN_SECTORS or gs & (gs - 1):
        raise UnsupportedImage(path, f"{what}: grainSize {gs} sectors is not a power of two in [1, 4096]")
    if not 0 < h.num_gtes_per_gt <= MAX_GTES:
        raise CorruptImage(path, f"{what}: numGTEsPerGT {h.num_gtes_per_gt} is not in [1, 512]")
    if h.capacity > MAX_CAPACITY:
        raise CorruptImage(path, f"{what}: capacity {h.capacity} sectors exceeds 2^40")
    if h.compress_algorithm not in (COMPRESS_NONE, COMPRESS_DEFLATE):
        raise UnsupportedImage(path, f"{what}: compressAlgorithm {h.compress_algorithm} is not 0 or 1 (deflate)")
    if h.compressed and not h.flags & FLAG_MARKERS:
        raise UnsupportedImage(path, f"{what}: compressed grains without markers are not supported")
    if h.gd_entries > MAX_GD_ENTRIES:
        raise UnsupportedImage(path, f"{what}: grain directory of {h.gd_entries} entries exceeds {MAX_GD_ENTRIES}")
    sectors = storage.size // SECTOR
    if h.overhead > sectors:
        raise CorruptImage(path, f"{what}: overHead {h.overhead} sectors lies beyond the end of the file")
    if h.descriptor_size > MAX_DESCRIPTOR_SECTORS:
        raise CorruptImage(path, f"{what}: descriptorSize {h.descriptor_size} sectors exceeds 2048")
    if h.descriptor_size and not 0 < h.descriptor_offset <= sectors - h.descriptor_size:
        raise CorruptImage(path, f"{what}: descriptorOffset {h.descriptor_offset} is not inside the file")
    gd_sectors = -(-h.gd_entries * 4 // SECTOR)
    if not 0 < h.gd_offset <= sectors - gd_sectors:
        raise CorruptImage(path, f"{what}: gdOffset {h.gd_offset} (grain directory) is not inside the file")
    if h.flags & FLAG_RGD and h.rgd_offset and not 0 < h.rgd_offset <= sectors - gd_sectors:
        raise CorruptImage(path, f"{what}: rgdOffset {h.rgd_offset} (redundant grain directory) is not inside the file")
    return h


async def _read_footer(storage: Storage, what: str) -> SparseHeader:
    """The footer of a streamOptimized extent: footer marker, footer, end-of-stream marker."""
    path = storage.name
    if storage.size < 3 * SECTOR or storage.size % SECTOR:
        raise CorruptImage(path, f"{what}: gdOffset says 'at the end' but the file has no room for a footer")
    tail = await read_at(storage, storage.size - 3 * SECTOR, 3 * SECTOR)
    _, size, kind = META_MARKER.unpack_from(tail, 0)
    eos = META_MARKER.unpack_from(tail, 2 * SECTOR)
    if size != 0 or kind != MARKER_FOOTER or tail[SECTOR : SECTOR + 4] != MAGIC or eos != (0, 0, MARKER_EOS):
        raise CorruptImage(path, f"{what}: gdOffset says 'at the end' but no footer and end-of-stream marker end it")
    h = _decode(tail[SECTOR : 2 * SECTOR])
    if h.gd_offset == GD_AT_END:
        raise CorruptImage(path, f"{what}: the footer's gdOffset is 'at the end' too")
    h.footer = True
    return h

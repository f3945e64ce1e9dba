"""The QED header: decoding, validation against the file, encoding.

Owns ``QedHeader`` (the 64-byte little-endian structure at offset 0, field names as in QEMU's
``qed_spec.rst``) and every open-time check on it.  ``QedHeader.parse`` either returns a header
whose derived geometry is safe to use (sizes capped before anything is allocated, the L1 table
inside the file, the backing name inside the header clusters) or raises an ``ImageError`` whose
one-line reason names the offending field.

Layout (offset:size): 0:4 magic ``QED\\0``, 4:4 cluster_size, 8:4 table_size, 12:4 header_size,
16:8 features, 24:8 compat_features, 32:8 autoclear_features, 40:8 l1_table_offset,
48:8 image_size, 56:4 backing_filename_offset, 60:4 backing_filename_size.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ...errors import CorruptImage, UnsupportedImage

MAGIC = b"QED\0"
HEADER_STRUCT = struct.Struct("<4sIIIQQQQQII")
HEADER_LEN = HEADER_STRUCT.size  # 64

# features
F_BACKING_FILE = 0x01
F_NEED_CHECK = 0x02
F_BACKING_FORMAT_NO_PROBE = 0x04
KNOWN_FEATURES = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE

MIN_CLUSTER_SIZE = 4 << 10
MAX_CLUSTER_SIZE = 64 << 20
MAX_TABLE_SIZE = 16  # clusters per table
MAX_TABLE_BYTES = 32 << 20  # our cap on one L1/L2 table in memory
MAX_BACKING_NAME = 4096  # PATH_MAX, as QEMU
UINT32_MAX = 0xFFFFFFFF


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass
class QedHeader:
    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int
    backing_filename_size: int

    # -- derived geometry -------------------------------------------------------------------

    @property
    def cluster_bits(self) -> int:
        return self.cluster_size.bit_length() - 1

    @property
    def table_bytes(self) -> int:
        return self.table_size * self.cluster_size

    @property
    def table_nelems(self) -> int:
        return self.table_bytes // 8

    @property
    def header_bytes(self) -> int:
        return self.header_size * self.cluster_size

    @property
    def max_image_size(self) -> int:
        return self.table_nelems * self.table_nelems * self.cluster_size

    # -- (de)serialisation ------------------------------------------------------------------

    def encode(self) -> bytes:
        return HEADER_STRUCT.pack(
            MAGIC,
            self.cluster_size,
            self.table_size,
            self.header_size,
            self.features,
            self.compat_features,
            self.autoclear_features,
            self.l1_table_offset,
            self.image_size,
            self.backing_filename_offset,
            self.backing_filename_size,
        )

    @classmethod
    def parse(cls, path: str, head: bytes | bytearray, file_size: int) -> QedHeader:
        """Decode and validate the header of a file of ``file_size`` bytes (first bytes ``head``)."""
        if len(head) < HEADER_LEN:
            raise CorruptImage(path, f"file too small for a QED header ({len(head)} bytes)")
        fields = HEADER_STRUCT.unpack_from(head, 0)
        if fields[0] != MAGIC:
            raise CorruptImage(path, "magic is not QED\\0")
        h = cls(*fields[1:])
        if h.features & ~KNOWN_FEATURES:
            raise UnsupportedImage(path, f"unsupported QED features 0x{h.features & ~KNOWN_FEATURES:x}")
        cs = h.cluster_size
        if not _pow2(cs) or not MIN_CLUSTER_SIZE <= cs <= MAX_CLUSTER_SIZE:
            raise CorruptImage(path, f"cluster_size {cs} is not a power of two in [4 KiB, 64 MiB]")
        if not _pow2(h.table_size) or h.table_size > MAX_TABLE_SIZE:
            raise CorruptImage(path, f"table_size {h.table_size} is not a power of two in [1, 16]")
        if h.table_bytes > MAX_TABLE_BYTES:
            raise UnsupportedImage(
                path, f"table_size {h.table_size} x cluster_size {cs} = {h.table_bytes} bytes per table exceeds 32 MiB"
            )
        if h.header_size == 0:
            raise CorruptImage(path, "header_size is 0 clusters")
        if h.header_bytes > UINT32_MAX:
            raise CorruptImage(path, f"header_size {h.header_size} clusters exceeds 4 GiB")
        if h.image_size % 512:
            raise CorruptImage(path, f"image_size {h.image_size} is not a multiple of 512")
        if h.image_size > h.max_image_size:
            raise CorruptImage(
                path, f"image_size {h.image_size} exceeds the maximum {h.max_image_size} for this geometry"
            )
        end = file_size & ~(cs - 1)
        if not h.table_offset_ok(h.l1_table_offset, end):
            raise CorruptImage(
                path,
                f"l1_table_offset 0x{h.l1_table_offset:x} is unaligned, inside the header or beyond end of file",
            )
        if h.features & F_BACKING_FILE:
            n, off = h.backing_filename_size, h.backing_filename_offset
            if n == 0 or n >= MAX_BACKING_NAME:
                raise CorruptImage(path, f"backing_filename_size {n} is not in [1, 4095]")
            if off < HEADER_LEN or off + n > h.header_bytes:
                raise CorruptImage(path, f"backing_filename_offset 0x{off:x} + size {n} is outside the header clusters")
        return h

    # -- offset checks (QEMU's qed_check_cluster_offset / qed_check_table_offset) -----------

    def cluster_offset_ok(self, offset: int, file_end: int) -> bool:
        """A data cluster offset: cluster-aligned, past the header, starting below ``file_end``."""
        return not offset & (self.cluster_size - 1) and self.header_bytes <= offset < file_end

    def table_offset_ok(self, offset: int, file_end: int) -> bool:
        """A table offset: aligned, past the header, the whole table inside ``file_end``.

        Unlike QEMU (which rejects every table of table_size 1) a one-cluster table is accepted.
        """
        return (
            not offset & (self.cluster_size - 1)
            and self.header_bytes <= offset
            and offset + self.table_bytes <= file_end
        )

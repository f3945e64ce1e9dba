"""qcow2 L1 and L2 tables: entry layout, bulk decoding, classification.

Owns the bit layout of L1 and L2 entries (standard and extended/subcluster), the cache
``TableKind`` codec for L2 tables (one ``array('Q')`` per table, big-endian swapped once per
load/store, never entry by entry) and the validated load of an L1 table.

An L2 table value is an ``array('Q')`` of host-order integers.  Standard L2: entry i at [i].
Extended L2: entry i at [2i], its subcluster bitmap at [2i+1] (bits 0-31 "allocated", bits 32-63
"reads as zeroes").

Invariants: an L1 returned by ``load_l1`` has no reserved bits set and only cluster-aligned L2
offsets; L2 entries are validated where they are used (``Qcow2Driver``), since a table is only
trusted entry by entry.
"""

from __future__ import annotations

import sys
from array import array

from ...errors import CorruptImage

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1
OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1_RESERVED = 0x7F000000000001FF
L2_RESERVED = 0x3F000000000001FE  # standard L2 (bit 0 is the ZERO flag)
L2_RESERVED_EXT = 0x3F000000000001FF  # extended L2 (bit 0 reserved)
ALL_ALLOC = 0xFFFFFFFF
ALL_ZERO = 0xFFFFFFFF00000000

_SWAP = sys.byteorder == "little"


def decode_be64(raw: bytes | bytearray) -> array:
    a = array("Q")
    a.frombytes(raw)
    if _SWAP:
        a.byteswap()
    return a


def encode_be64(a: array) -> bytes:
    if not _SWAP:
        return a.tobytes()
    b = array("Q", a)
    b.byteswap()
    return b.tobytes()


def load_l1(path: str, raw: bytes | bytearray, cluster_size: int, what: str = "L1 table") -> array:
    """Decode an L1 table and check every entry (reserved bits, alignment) in one pass."""
    l1 = decode_be64(raw)
    mask = L1_RESERVED | (cluster_size - 1 & OFFSET_MASK)
    bad = [i for i, e in enumerate(l1) if e & mask]
    if bad:
        i = bad[0]
        raise CorruptImage(path, f"{what} entry {i} (0x{l1[i]:016x}) has reserved bits set or is unaligned")
    return l1


def compressed_geometry(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, byte count to read) of a compressed L2 entry."""
    x = 62 - (cluster_bits - 8)
    host = entry & ((1 << x) - 1)
    sectors = ((entry >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return host, sectors * 512 - (host & 511)


def compressed_host_clusters(entry: int, cluster_bits: int) -> range:
    """Host clusters a compressed entry's 512-aligned byte range touches (each holds +1 for it)."""
    host, length = compressed_geometry(entry, cluster_bits)
    first = host >> cluster_bits
    last = (host + length - 1) >> cluster_bits
    return range(first, last + 1)

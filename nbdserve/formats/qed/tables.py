"""QED L1/L2 tables: bulk decoding and encoding, and the meaning of an entry.

A table is ``table_size`` clusters of little-endian u64 entries, decoded in one go into an
``array('Q')`` (byte-swapped on big-endian hosts).  Entry values in an L2 table:
``UNALLOCATED`` (0: ask the backing image), ``ZERO_CLUSTER`` (1: reads as zeroes) or the
cluster-aligned host offset of a data cluster.  In the L1 table: 0 or the offset of an L2 table.
"""

from __future__ import annotations

import sys
from array import array

UNALLOCATED = 0
ZERO_CLUSTER = 1
SECTOR = 512  # entry updates are written as whole sectors

_SWAP = sys.byteorder != "little"


def decode_table(buf: bytes | bytearray | memoryview) -> array:
    table = array("Q")
    table.frombytes(buf)
    if _SWAP:
        table.byteswap()
    return table


def encode_table(table: array) -> bytes:
    if _SWAP:
        table = array("Q", table)
        table.byteswap()
    return table.tobytes()


def entry_sectors(table: array, first: int, last: int) -> tuple[int, bytes]:
    """The whole sectors holding entries ``first..last`` (inclusive): (byte offset in the table, bytes)."""
    per_sector = SECTOR // 8
    lo = first - first % per_sector
    hi = min(len(table), last - last % per_sector + per_sector)
    return lo * 8, encode_table(table[lo:hi])

"""Bulk codecs for little-endian tables (VMDK grain directories and tables, VDI block maps).

A table is decoded in one go into an ``array`` (``I``: u32, ``Q``: u64), byte-swapped only on
big-endian hosts, and encoded back the same way; entries are never parsed one by one.
"""

from __future__ import annotations

import sys
from array import array

_SWAP = sys.byteorder != "little"


def decode_le(code: str, buf: bytes | bytearray | memoryview) -> array:
    table = array(code)
    table.frombytes(buf)
    if _SWAP:
        table.byteswap()
    return table


def encode_le(table: array) -> bytes:
    if _SWAP:
        table = array(table.typecode, table)
        table.byteswap()
    return table.tobytes()


def decode_le32(buf: bytes | bytearray | memoryview) -> array:
    return decode_le("I", buf)


def decode_le64(buf: bytes | bytearray | memoryview) -> array:
    return decode_le("Q", buf)

"""Creation of an empty qcow2 version 3 image (used for ``-s`` snapshot overlays).

Owns ``create_qcow2``.  Layout (as qemu-img lays out a fresh image): cluster 0 header, its
extensions and the backing file name; cluster 1 the refcount table; cluster 2 the one refcount
block (16-bit refcounts) counting the first clusters; clusters 3.. the L1 table (all zero).
The file is written with plain writes and synced once; it is not shared until this returns.
"""

from __future__ import annotations

import os
import struct

from .header import EXT_BACKING_FORMAT, MAGIC, l1_entries_needed


def create_qcow2(
    path: str,
    size: int,
    *,
    backing_file: str | None = None,
    backing_format: str | None = None,
    cluster_bits: int = 16,
) -> None:
    cs = 1 << cluster_bits
    l1_size = l1_entries_needed(size, cluster_bits, cs // 8)
    l1_clusters = max(1, -(-l1_size * 8 // cs))
    used = 3 + l1_clusters
    refcount_bits = 16
    if used > cs * 8 // refcount_bits:
        raise ValueError("image too large for a single refcount block")

    header = bytearray(cs)
    struct.pack_into(
        ">4sIQIIQIIQQIIQQQQII",
        header,
        0,
        MAGIC,
        3,
        0,  # backing_file_offset, filled below
        0,
        cluster_bits,
        size,
        0,  # crypt_method
        l1_size,
        3 * cs,  # l1_table_offset
        cs,  # refcount_table_offset
        1,  # refcount_table_clusters
        0,
        0,
        0,  # incompatible
        0,  # compatible
        0,  # autoclear
        4,  # refcount_order
        112,  # header_length (compression type byte + padding)
    )
    pos = 112
    if backing_format:
        fmt = backing_format.encode()
        struct.pack_into(">II", header, pos, EXT_BACKING_FORMAT, len(fmt))
        header[pos + 8 : pos + 8 + len(fmt)] = fmt
        pos += 8 + ((len(fmt) + 7) & ~7)
    pos += 8  # end-of-extensions marker (zeroes)
    if backing_file:
        name = backing_file.encode()
        if pos + len(name) > cs or len(name) > 1023:
            raise ValueError("backing file name too long")
        header[pos : pos + len(name)] = name
        struct.pack_into(">QI", header, 8, pos, len(name))

    reftable = bytearray(cs)
    struct.pack_into(">Q", reftable, 0, 2 * cs)
    refblock = bytearray(cs)
    struct.pack_into(f">{used}H", refblock, 0, *([1] * used))

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, bytes(header) + bytes(reftable) + bytes(refblock) + bytes(l1_clusters * cs), 0)
        os.fsync(fd)
    finally:
        os.close(fd)

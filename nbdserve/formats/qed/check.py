"""The QED consistency check and repair run when an image with NEED_CHECK is opened read-write.

Owns ``check_and_repair``.  It repairs what QEMU's ``qed_check(fix=true)`` repairs and a little more:
  * an L1 entry that is not a valid table offset is cleared (that part of the disk then reads from
    the backing image: its data is lost, as in QEMU);
  * an L2 entry that is not a valid data-cluster offset is cleared likewise;
  * leaked clusters at the end of the file (allocated by a write whose table update never reached
    the disk) are cut off by truncating the file; QEMU only counts them.  Leaks in the middle of
    the file cannot be reclaimed in QED (there is no free list) and are only counted.
A cluster referenced twice cannot be repaired safely and is refused (``CorruptImage``).

Memory is bounded by one bit per cluster of the file plus one table at a time.  Runs before the
driver serves anything, so it takes no lock; the caller syncs and clears NEED_CHECK afterwards.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from ...blockfile import BlockFile
from ...errors import CorruptImage
from .header import QedHeader
from .tables import UNALLOCATED, ZERO_CLUSTER, decode_table, encode_table


@dataclass
class CheckResult:
    cleared_l1: int = 0  # invalid L1 entries cleared
    cleared_l2: int = 0  # invalid L2 entries cleared
    truncated_leaks: int = 0  # leaked clusters cut off the end of the file
    leaks: int = 0  # leaked clusters left in the middle of the file
    file_end: int = 0  # the cluster-aligned end of the file after the repair


class _Used:
    """One bit per cluster of the file; a second reference to a cluster is a corruption."""

    def __init__(self, path: str, cluster_bits: int, nclusters: int) -> None:
        self.path = path
        self.bits = cluster_bits
        self.map = bytearray((nclusters + 7) // 8)
        self.last = -1

    def mark(self, offset: int, count: int, what: str) -> None:
        first = offset >> self.bits
        for c in range(first, first + count):
            byte, bit = c >> 3, 1 << (c & 7)
            if self.map[byte] & bit:
                raise CorruptImage(self.path, f"cluster at 0x{c << self.bits:x} ({what}) is referenced twice")
            self.map[byte] |= bit
        self.last = max(self.last, first + count - 1)

    def count(self) -> int:
        return int.from_bytes(self.map, "little").bit_count()


def check_and_repair(file: BlockFile, h: QedHeader, l1: array, file_end: int) -> CheckResult:
    """Check every table of the image and repair it in place (see the module docstring).

    ``l1`` is the driver's in-memory L1 table and is updated along with the file.
    """
    path = file.path
    cs, bits = h.cluster_size, h.cluster_bits
    used = _Used(path, bits, file_end >> bits)
    used.mark(h.l1_table_offset, h.table_size, "L1 table")
    result = CheckResult()
    for i, l2_offset in enumerate(l1):
        if l2_offset == UNALLOCATED:
            continue
        if not h.table_offset_ok(l2_offset, file_end):
            l1[i] = UNALLOCATED
            result.cleared_l1 += 1
            continue
        used.mark(l2_offset, h.table_size, f"L2 table of L1 entry {i}")
        table = decode_table(file.pread(h.table_bytes, l2_offset))
        cleared = 0
        for j, offset in enumerate(table):
            if offset in (UNALLOCATED, ZERO_CLUSTER):
                continue
            if not h.cluster_offset_ok(offset, file_end):
                table[j] = UNALLOCATED
                cleared += 1
                continue
            used.mark(offset, 1, f"L2 table 0x{l2_offset:x} entry {j}")
        if cleared:
            file.pwrite(encode_table(table), l2_offset)
            result.cleared_l2 += cleared
    if result.cleared_l1:
        file.pwrite(encode_table(l1), h.l1_table_offset)
    first = h.header_size
    new_end = max(used.last + 1, first) << bits
    if new_end < file_end or file.size > file_end:
        result.truncated_leaks = (file_end - new_end) // cs if new_end < file_end else 0
        file.truncate(new_end)
    result.leaks = (new_end >> bits) - first - used.count()  # only clusters past the header are marked
    result.file_end = new_end
    return result

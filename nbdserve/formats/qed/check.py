"""The QED consistency check and repair run when an image with NEED_CHECK is opened read-write.

Owns ``check_and_repair``.  It repairs what QEMU's ``qed_check(fix=true)`` repairs and a little more:
  * an L1 entry that is not a valid table offset is cleared (that part of the disk then reads from
    the backing image: its data is lost, as in QEMU);
  * an L2 entry that is not a valid data-cluster offset is cleared likewise;
  * leaked clusters at the end of the file (allocated by a write whose table update never reached
    the disk) are cut off by truncating the file; QEMU only counts them.  Leaks in the middle of
    the file (QED has no free list) are filled by moving data clusters down from the end of the
    file, as far as the last table; whatever cannot be moved is only counted.
A cluster referenced twice cannot be repaired safely and is refused (``CorruptImage``).

Memory is bounded by one bit per cluster of the file plus one table at a time (compaction adds
an entry per table cluster and per cluster it moves).  Runs before the driver serves anything, so
it takes no lock; the caller syncs and clears NEED_CHECK afterwards.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from ...errors import CorruptImage
from ...storage.base import Storage, read_at, settled
from .header import QedHeader
from .tables import UNALLOCATED, ZERO_CLUSTER, decode_table, encode_table


@dataclass
class CheckResult:
    cleared_l1: int = 0  # invalid L1 entries cleared
    cleared_l2: int = 0  # invalid L2 entries cleared
    truncated_leaks: int = 0  # leaked clusters cut off the end of the file
    relocated: int = 0  # data clusters moved down into leaked clusters (then cut off the end)
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

    def is_set(self, c: int) -> bool:
        return bool(self.map[c >> 3] & (1 << (c & 7)))

    def clear(self, c: int) -> None:
        self.map[c >> 3] &= ~(1 << (c & 7)) & 0xFF
        while self.last >= 0 and not self.is_set(self.last):
            self.last -= 1


async def _compact(storage: Storage, h: QedHeader, l1: array, used: _Used) -> int:
    """Move data clusters from the end of the file down into leaked clusters, so the leaks end up
    at the end of the file where truncation reclaims them.  Tables are not moved: compaction
    stops at the last table.  Returns the number of clusters moved.

    Crash-safe: the copies are synced before any L2 entry points at them (until then they are
    leaks themselves), and the L2 updates are synced before the caller truncates the old clusters.
    """
    bits, first = h.cluster_bits, h.header_size
    target = first + used.count()  # the end of the file if every leak were reclaimed
    table_clusters = {
        (start >> bits) + k for start in {h.l1_table_offset, *l1} - {UNALLOCATED} for k in range(h.table_size)
    }
    # Where each data cluster at or past ``target`` is referenced: cluster -> (L2 offset, index).
    refs: dict[int, tuple[int, int]] = {}
    for l2_offset in sorted(set(l1) - {UNALLOCATED}):
        for j, offset in enumerate(decode_table(await read_at(storage, l2_offset, h.table_bytes))):
            if offset > ZERO_CLUSTER and offset >> bits >= target:
                refs[offset >> bits] = (l2_offset, j)
    free = (c for c in range(first, target) if not used.is_set(c))
    moves: list[tuple[int, int]] = []
    for c in range(used.last, target - 1, -1):
        if not used.is_set(c):
            continue
        if c in table_clusters or c not in refs:
            break
        dst = next(free, None)
        if dst is None or dst >= c:
            break
        moves.append((c, dst))
    if not moves:
        return 0
    for src, dst in moves:
        await settled(storage.write(dst << bits, await read_at(storage, src << bits, h.cluster_size)))
    await storage.flush()
    by_table: dict[int, list[tuple[int, int]]] = {}
    for src, dst in moves:
        l2_offset, j = refs[src]
        by_table.setdefault(l2_offset, []).append((j, dst << bits))
    for l2_offset, changes in by_table.items():
        table = decode_table(await read_at(storage, l2_offset, h.table_bytes))
        for j, offset in changes:
            table[j] = offset
        await settled(storage.write(l2_offset, encode_table(table)))
    await storage.flush()
    for src, dst in moves:
        used.map[dst >> 3] |= 1 << (dst & 7)
        used.clear(src)
    return len(moves)


async def check_and_repair(storage: Storage, h: QedHeader, l1: array, file_end: int) -> CheckResult:
    """Check every table of the image and repair it in place (see the module docstring).

    ``l1`` is the driver's in-memory L1 table and is updated along with the file.
    """
    path = storage.name
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
        table = decode_table(await read_at(storage, l2_offset, h.table_bytes))
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
            await settled(storage.write(l2_offset, encode_table(table)))
            result.cleared_l2 += cleared
    if result.cleared_l1:
        await settled(storage.write(h.l1_table_offset, encode_table(l1)))
    first = h.header_size
    if (used.last + 1) - first > used.count():  # free clusters below the last used one
        result.relocated = await _compact(storage, h, l1, used)
    new_end = max(used.last + 1, first) << bits
    if new_end < file_end or storage.size > file_end:
        result.truncated_leaks = (file_end - new_end) // cs if new_end < file_end else 0
        await storage.truncate(new_end)
    result.leaks = (new_end >> bits) - first - used.count()  # only clusters past the header are marked
    result.file_end = new_end
    return result

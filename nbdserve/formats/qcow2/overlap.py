"""Where qcow2 metadata lives: the map every write is checked against before it lands.

Owns ``MetadataMap``: host cluster index -> the set of metadata kinds stored there (a bitmask of
``HEADER``, ``L1``, ``L2``, ``REFTABLE``, ``REFBLOCK``, ``SNAPSHOTS``, ``SNAP_L1``, ``SNAP_L2``,
``BITMAPS``).  It is built by the open-time consistency check (``check.scan``) from every
structure the image names, and kept up to date by the driver as tables are allocated and freed.
A check is one dict lookup per cluster written: as cheap as QEMU's default overlap check, and
wider (QEMU's default skips the L2 tables of snapshots).

Invariants (for an image opened read-write):
  * every cluster holding metadata of the image is in the map with its kinds;
  * a data write may land only on clusters not in the map;
  * a metadata write of kind K may land only on clusters whose kinds are exactly K (an active
    L2 table shared with a snapshot is ``L2 | SNAP_L2`` and must be copied, never written).
See docs/qcow2.md, "Metadata overlap".

Updates happen with the driver's metadata lock held (or before the image is shared); checks are
synchronous lookups, also made by the unlocked in-place write path (no await between the check
and the write it guards).
"""

from __future__ import annotations

HEADER = 1 << 0
L1 = 1 << 1
L2 = 1 << 2
REFTABLE = 1 << 3
REFBLOCK = 1 << 4
SNAPSHOTS = 1 << 5
SNAP_L1 = 1 << 6
SNAP_L2 = 1 << 7
BITMAPS = 1 << 8
CRYPTO = 1 << 9

NAMES = {
    HEADER: "the header",
    L1: "the L1 table",
    L2: "an L2 table",
    REFTABLE: "the refcount table",
    REFBLOCK: "a refcount block",
    SNAPSHOTS: "the snapshot table",
    SNAP_L1: "a snapshot's L1 table",
    SNAP_L2: "a snapshot's L2 table",
    BITMAPS: "the bitmap directory or a bitmap table",
    CRYPTO: "the encryption (LUKS) header",
}


def describe(kinds: int) -> str:
    return " and ".join(name for bit, name in NAMES.items() if kinds & bit) or "nothing"


class MetadataMap:
    """Host cluster index -> bitmask of metadata kinds (see the module docstring)."""

    __slots__ = ("cb", "kinds")

    def __init__(self, cluster_bits: int) -> None:
        self.cb = cluster_bits
        self.kinds: dict[int, int] = {}

    def clusters(self, offset: int, length: int) -> range:
        return range(offset >> self.cb, ((offset + max(length, 1) - 1) >> self.cb) + 1)

    def add(self, offset: int, length: int, kind: int) -> None:
        kinds = self.kinds
        for c in self.clusters(offset, length):
            kinds[c] = kinds.get(c, 0) | kind

    def remove(self, offset: int, length: int, kind: int) -> None:
        kinds = self.kinds
        for c in self.clusters(offset, length):
            k = kinds.get(c, 0) & ~kind
            if k:
                kinds[c] = k
            else:
                kinds.pop(c, None)

    def conflict(self, offset: int, length: int, kind: int = 0) -> str | None:
        """None if a write of ``kind`` (0: guest data) may cover ``[offset, offset+length)``,
        else what it would overwrite."""
        kinds = self.kinds
        for c in self.clusters(offset, length):
            k = kinds.get(c)
            if k is not None and k != kind:
                return describe(k & ~kind or k)
        return None

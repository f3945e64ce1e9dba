"""Opening a qcow2 image for writing, and serving its internal snapshots.

Owns the decision a read-write open makes before the first write (docs/qcow2.md, "Consistency
at open"): run the consistency check (``check.scan``), repair what the export's ``repair``
option allows (``off``, ``leaks``, ``all``; a dirty image's refcounts are always rebuilt, as
QEMU does), and otherwise serve the image read-only with a warning naming the problem.  After it
the overlap map is complete, the refcounts can be trusted, the enabled persistent bitmaps are in
memory and every bitmap is marked in use on disk (docs/qcow2.md, "Persistent dirty bitmaps").

Runs before the image is shared: no lock is needed.
"""

from __future__ import annotations

import logging
import struct

from ...errors import CorruptImage, UnsupportedImage
from ...storage.base import read_at, settled
from ..base import Caps
from .bitmaps import BitmapError
from .check import fix_harmless, rebuild, scan
from .header import AUTOCLEAR_BITMAPS, FIELD_AUTOCLEAR, FIELD_INCOMPATIBLE, INCOMPAT_CORRUPT, INCOMPAT_DIRTY
from .refcount import Refcounts
from .snapshot import find_snapshot
from .tables import load_l1

log = logging.getLogger("nbdserve.qcow2")


class OpeningMixin:
    """Read-write open: check, repair or go read-only; internal snapshots."""

    def _read_only_because(self, reason: str) -> None:
        """Serve read-only, saying why (a warning naming the field or the inconsistency)."""
        log.warning("%s: %s; %s", self.path, reason, "reading it anyway" if self.readonly else "serving it read-only")
        self.readonly = True
        self.caps = Caps()
        self._refusal = "image is read-only"

    async def _prepare_writes(self, repair: str) -> None:
        """Before the first write: check the refcounts, repair what ``repair`` allows, or go
        read-only (docs/qcow2.md, "Consistency at open").  Never serves read-write an image
        whose refcounts or COPIED flags could make a write overwrite live data."""
        h = self.header
        dirty = bool(h.incompatible_features & INCOMPAT_DIRTY)
        corrupt = bool(h.incompatible_features & INCOMPAT_CORRUPT)
        if corrupt and repair != "all":
            return self._read_only_because("image is marked corrupt (--repair=all checks and repairs it)")
        bitmaps = self.bitmaps
        if bitmaps.problem is not None:
            return self._read_only_because(bitmaps.problem)
        try:
            await bitmaps.load_tracked()
        except BitmapError as err:
            return self._read_only_because(f"bitmaps cannot be kept up to date: {err}")
        found = await scan(self)
        if found.fatal:
            return self._read_only_because(f"inconsistent beyond repair: {found.summary()}")
        if dirty or found.n_errors:
            # A dirty image's refcounts are stale by design (lazy refcounts): QEMU rebuilds them too.
            if not dirty and repair != "all":
                return self._read_only_because(f"refcounts are wrong: {found.summary()} (--repair=all rebuilds them)")
            why = "image is dirty (lazy refcounts)" if dirty else found.summary()
            log.warning("%s: %s; rebuilding refcounts", self.path, why)
            offset, clusters = await rebuild(self, found)
            h.refcount_table_offset, h.refcount_table_clusters = offset, clusters
            self.refs = await self._refcounts()
            found = await scan(self)
        elif found.leaks or found.missing_copied:
            if repair in ("leaks", "all"):
                log.warning("%s: %s; repairing", self.path, found.summary())
                await fix_harmless(self, found)
                found = await scan(self)
            else:
                log.warning("%s: %s (harmless; --repair=leaks fixes it)", self.path, found.summary())
        if found.harmful:
            return self._read_only_because(f"still inconsistent after repair: {found.summary()}")
        if dirty or corrupt:
            h.incompatible_features &= ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
            await settled(self.storage.write(FIELD_INCOMPATIBLE, struct.pack(">Q", h.incompatible_features)))
            await self.storage.flush()
        self.meta = found.meta
        self.refs.meta, self.refs.refuse = found.meta, self._refuse
        # Autoclear bits we do not maintain must be clear before the first write; the bitmaps bit
        # stays set: we keep the bitmaps consistent.
        keep = AUTOCLEAR_BITMAPS if bitmaps.valid else 0
        if h.version >= 3 and h.autoclear_features & ~keep:
            h.autoclear_features &= keep
            await settled(self.storage.write(FIELD_AUTOCLEAR, struct.pack(">Q", h.autoclear_features)))
            await self.storage.flush()
        await bitmaps.set_in_use(self)  # durable before any guest write
        if bitmaps.tracked:
            self._track = bitmaps.mark

    def _report_bitmaps(self) -> None:
        """Warn about bitmaps that cannot be used (any open; QEMU warns about stale ones too)."""
        b = self.bitmaps
        if b.stale:
            log.warning(
                "%s: the bitmaps extension was invalidated by a program without bitmap support; its bitmaps are "
                "ignored (their clusters are leaks: --repair=leaks frees them)",
                self.path,
            )
        elif b.problem is not None and self.readonly:
            log.warning("%s: %s", self.path, b.problem)
        if b.inconsistent:
            names = ", ".join(repr(n) for n in sorted(b.inconsistent))
            log.warning(
                "%s: bitmap(s) %s in use (not closed cleanly): inconsistent, never updated or exported; "
                "qemu-img bitmap --remove deletes them",
                self.path,
                names,
            )

    async def _refcounts(self) -> Refcounts:
        h = self.header
        raw = await read_at(self.storage, h.refcount_table_offset, h.refcount_table_clusters * self.cs)
        return Refcounts(
            self.path,
            self.storage,
            self.cache,
            self.cb,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
            raw,
        )

    async def _use_snapshot(self, key: str) -> None:
        sn = find_snapshot(self.snapshots, key)
        if sn is None:
            names = ", ".join(f"{s.id}:{s.name}" for s in self.snapshots) or "none"
            raise UnsupportedImage(self.path, f"no internal snapshot {key!r} (have: {names})")
        raw = await read_at(self.storage, sn.l1_table_offset, sn.l1_size * 8)
        self.l1 = load_l1(self.path, raw, self.cs, "snapshot L1")
        self.l1_offset = sn.l1_table_offset
        if sn.disk_size is not None:
            self.size = sn.disk_size & ~511
        if len(self.l1) < -(-self.size >> self.l1_shift):
            raise CorruptImage(self.path, f"snapshot {key!r}: L1 table too small for its disk size")

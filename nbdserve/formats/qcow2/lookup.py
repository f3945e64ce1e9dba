"""qcow2 cluster lookup: L2 entries classified and merged into runs.

Owns the kinds of a (sub)cluster (``K_UNALLOC``, ``K_ZERO``, ``K_DATA``, ``K_COMPRESSED``), the
validation of an L2 entry where it is used (reserved bits, alignment, the zero flag of a
version 2 image, contradictory subcluster bitmaps: ``CorruptImage``), and ``_run``: the longest
run of one kind from a guest offset inside one L2 table (a data run is host-contiguous).

Synchronous: a table handed in is valid until the caller's next await.
"""

from __future__ import annotations

from array import array

from ...errors import CorruptImage
from .tables import (
    ALL_ALLOC,
    COMPRESSED,
    L2_RESERVED,
    L2_RESERVED_EXT,
    OFFSET_MASK,
    ZERO_FLAG,
    compressed_host_clusters,
)

# Kinds of a (sub)cluster run.
K_UNALLOC = 0
K_ZERO = 1
K_DATA = 2
K_COMPRESSED = 3

NOT_PLAIN = COMPRESSED | ZERO_FLAG | L2_RESERVED  # flags of a standard entry that is not plain data


class LookupMixin:
    """Guest offset -> L2 entry -> run of one kind."""

    def _bad(self, what: str, entry: int) -> CorruptImage:
        return CorruptImage(self.path, f"{what} 0x{entry:016x}")

    def _run(self, t: array, off: int, maxlen: int) -> tuple[int, int, int]:
        """(kind, length, host offset) of the run at guest ``off`` within L2 table ``t``.

        The run stays inside the table and ``maxlen``; a data run is host-contiguous.
        """
        cb, cs = self.cb, self.cs
        ci = (off >> cb) & (self.l2_entries - 1)
        in_c = off & self.cmask
        limit = min(maxlen, ((self.l2_entries - ci) << cb) - in_c)
        if self.ext:
            return self._run_ext(t, ci, in_c, limit)
        e = t[ci]
        kind, host = self._classify(e)
        length = cs - in_c
        if kind == K_COMPRESSED:
            return kind, min(length, limit), 0
        step = cs if kind == K_DATA else 0
        want = e + step  # the next entry of the run, if its flags are the same (no re-check)
        while length < limit:
            ci += 1
            e2 = t[ci]
            if e2 != want:
                k2, h2 = self._classify(e2)
                if k2 != kind or (kind == K_DATA and h2 != want & OFFSET_MASK):
                    break
                want = e2
            want += step
            length += cs
        return kind, min(length, limit), host + in_c if kind == K_DATA else 0

    def _classify(self, e: int) -> tuple[int, int]:
        """Standard L2 entry -> (kind, host cluster offset)."""
        if e & COMPRESSED:
            return K_COMPRESSED, 0
        if e & L2_RESERVED:
            raise self._bad("L2 entry has reserved bits set:", e)
        host = e & OFFSET_MASK
        if host & self.cmask:
            raise self._bad("L2 entry has an unaligned host offset:", e)
        if e & ZERO_FLAG:
            if self.version < 3:
                raise self._bad("zero cluster entry in a version 2 image:", e)
            return K_ZERO, host
        if host == 0:
            return K_UNALLOC, 0
        return K_DATA, host

    def _check_ext(self, e: int, bm: int) -> int:
        """Validate an extended L2 entry; returns its host cluster offset (0 if compressed/none)."""
        if e & COMPRESSED:
            if bm:
                raise self._bad("compressed extended L2 entry with a subcluster bitmap:", bm)
            return 0
        if e & L2_RESERVED_EXT:
            raise self._bad("L2 entry has reserved bits set:", e)
        host = e & OFFSET_MASK
        if host & self.cmask:
            raise self._bad("L2 entry has an unaligned host offset:", e)
        if (bm & ALL_ALLOC) & (bm >> 32):
            raise self._bad("subcluster bitmap marks subclusters both allocated and zero:", bm)
        if host == 0 and bm & ALL_ALLOC:
            raise self._bad("subcluster bitmap has allocated subclusters but no host cluster:", bm)
        return host

    def _sc_kind(self, e: int, bm: int, sc: int) -> int:
        if e & COMPRESSED:
            return K_COMPRESSED
        if (bm >> sc) & 1:
            return K_DATA
        if (bm >> (32 + sc)) & 1:
            return K_ZERO
        return K_UNALLOC

    def _run_ext(self, t: array, ci: int, in_c: int, limit: int) -> tuple[int, int, int]:
        scb = self.sc_bits
        e, bm = t[2 * ci], t[2 * ci + 1]
        host = self._check_ext(e, bm)
        sc = in_c >> scb
        kind = self._sc_kind(e, bm, sc)
        start_host = host + in_c if kind == K_DATA else 0
        if kind == K_COMPRESSED:
            return kind, min(self.cs - in_c, limit), 0
        length = ((sc + 1) << scb) - in_c
        nxt = host + ((sc + 1) << scb)
        sc += 1
        while length < limit:
            if sc == 32:
                ci += 1
                e, bm = t[2 * ci], t[2 * ci + 1]
                host = self._check_ext(e, bm)
                sc = 0
                if kind == K_DATA and host != nxt:
                    break
            k2 = self._sc_kind(e, bm, sc)
            if k2 != kind:
                break
            length += 1 << scb
            nxt += 1 << scb
            sc += 1
        return kind, min(length, limit), start_host

    async def _table(self, l1i: int) -> array | None:
        """The L2 table for L1 index ``l1i`` (None if unallocated).  Valid until the next await."""
        l2off = self.l1[l1i] & OFFSET_MASK if l1i < len(self.l1) else 0
        if not l2off:
            return None
        e = self.cache.peek(self.l2kind, l2off)
        if e is None:
            e = await self.cache.get(self.l2kind, l2off)
            self.cache.release(e)
        return e.value

    def _refs_of(self, e: int) -> list[int]:
        """Host clusters an L2 entry holds a reference on."""
        if e & COMPRESSED:
            return list(compressed_host_clusters(e, self.cb))
        host = e & OFFSET_MASK
        return [host >> self.cb] if host else []

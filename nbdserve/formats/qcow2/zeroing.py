"""qcow2 WRITE_ZEROES and TRIM.

Semantics as qemu-nbd 7.2 with ``--discard=unmap`` (docs/qcow2.md, "Zeroing and trimming"):
WRITE_ZEROES that may trim frees allocated clusters and leaves zero clusters without a host
cluster, without it keeps them allocated with the zero flag; a partial cluster becomes a zero
cluster only when it already reads as zeroes, else zeroes are written.  TRIM works on whole
clusters.  A version 2 image has no zero flag: zeroing frees clusters (no backing file) or
writes zeroes (backing file).
"""

from __future__ import annotations

import errno

from ...errors import NbdError
from ...storage.base import settled
from ..base import ZEROES
from .lookup import K_COMPRESSED, K_UNALLOC, K_ZERO
from .tables import (
    ALL_ALLOC,
    ALL_ZERO,
    COMPRESSED,
    OFFSET_MASK,
    ZERO_FLAG,
)


class ZeroMixin:
    """WRITE_ZEROES and TRIM (called with the lock held where noted)."""

    async def pwrite_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        self._check_writable()
        if self._track is not None:
            self._track(offset, length)  # the whole request, as QEMU marks it (failures too)
        gran = 1 << self.sc_bits
        end = offset + length
        if self.version < 3 and self.backing is not None:
            if fast:
                raise NbdError(errno.ENOTSUP, "zeroing a version 2 image with a backing file writes data")
            await self._write_zeroes_explicit(offset, length)
        else:
            head_end = min(end, -(-offset // gran) * gran)
            tail_start = max(head_end, end & ~(gran - 1) if end < self.size else end)
            if fast and (head_end > offset or tail_start < end):
                raise NbdError(errno.ENOTSUP, "fast zeroing needs whole clusters")
            for lo, hi in ((offset, head_end), (tail_start, end)):
                if hi > lo and not await self._zero_partial(lo, hi):
                    await self._write_zeroes_explicit(lo, hi - lo)
            if tail_start > head_end:
                await self._zero_range(head_end, tail_start, may_trim, fast)
        if fua:
            await self.flush()

    async def _write_zeroes_explicit(self, offset: int, length: int) -> None:
        zero = memoryview(ZEROES)
        pos = 0
        while pos < length:
            n = min(len(zero), length - pos)
            await settled(self.write(offset + pos, zero[:n], fua=False))
            pos += n

    async def _zero_partial(self, lo: int, hi: int) -> bool:
        """Part of one (sub)cluster: mark it zero if the whole (sub)cluster reads as zeroes already."""
        gran = 1 << self.sc_bits
        start = lo & ~(gran - 1)
        stop = min(start + gran, self.size)
        await self.lock.lock()
        try:
            await self._wait_inflight(lo >> self.cb, lo >> self.cb)
            t = await self._table(lo >> self.l1_shift)
            if t is None:
                k = K_UNALLOC
            else:
                k, _, _ = self._run(t, start, gran)
            if k == K_ZERO:
                return True
            if k != K_UNALLOC or self.backing is not None:
                return False
            if self.version < 3:
                return True  # unallocated, no backing: already reads as zeroes
            await self._locked_zero(start, stop, may_trim=False)  # an unallocated cluster: no leftovers
            return True
        finally:
            self.lock.unlock()

    async def _zero_range(self, start: int, stop: int, may_trim: bool, fast: bool) -> None:
        """Whole (sub)clusters [start, stop) (stop may be the disk end).

        ``fast``: ENOTSUP rather than writing zeroes (the client then zeroes the range itself,
        so what was already zeroed here does no harm).
        """
        pos = start
        while pos < stop:
            span_end = min(stop, ((pos >> self.l1_shift) + 1) << self.l1_shift)
            await self.lock.lock()
            try:
                await self._wait_inflight(pos >> self.cb, (span_end - 1) >> self.cb)
                leftovers = await self._locked_zero(pos, span_end, may_trim)
            finally:
                self.lock.unlock()
            if leftovers and fast:
                raise NbdError(errno.ENOTSUP, "zeroing part of a compressed cluster writes data")
            for lo, n in leftovers:
                await self._write_zeroes_explicit(lo, n)
            pos = span_end

    async def _locked_zero(self, start: int, stop: int, may_trim: bool) -> list[tuple[int, int]]:
        """Zero whole (sub)clusters inside one L2 span.  Called with self.lock held.

        Returns the (offset, length) ranges that need explicit zeroes instead (part of a
        compressed cluster), to be written after the lock is dropped.
        """
        cb, cs = self.cb, self.cs
        leftovers: list[tuple[int, int]] = []
        if self.version < 3:
            # No zero flag: without a backing file a free cluster reads as zeroes.
            if self.l1[start >> self.l1_shift] & OFFSET_MASK:
                await self._deallocate(start, stop, v2=True)
            return leftovers
        l2e = await self._l2_for_write(start >> self.l1_shift)
        try:
            t = l2e.value
            free: list[int] = []
            changed = False
            self.mappings_changed()  # (the loop below runs without an await)
            c = start >> cb
            while (c << cb) < stop:
                base = c << cb
                a, b = max(start, base) - base, min(stop, base + cs) - base
                whole = a == 0 and (b == cs or base + b >= self.size)
                idx = c & (self.l2_entries - 1)
                if self.ext:
                    e, bm = t[2 * idx], t[2 * idx + 1]
                    host = self._check_ext(e, bm)
                    if e & COMPRESSED and not whole:
                        leftovers.append((base + a, b - a))
                        c += 1
                        continue
                    if whole and (e & COMPRESSED or (may_trim and host)):
                        new_e, new_bm = 0, ALL_ZERO
                        free.extend(self._refs_of(e))
                    else:
                        sa, sb = a >> self.sc_bits, (b - 1) >> self.sc_bits
                        m = ((2 << sb) - 1) & ~((1 << sa) - 1)
                        new_e, new_bm = e, (bm & ALL_ALLOC & ~m) | (((bm >> 32) | m) << 32)
                    if (new_e, new_bm) != (e, bm):
                        t[2 * idx], t[2 * idx + 1] = new_e, new_bm
                        changed = True
                else:
                    e = t[idx]
                    kind, host = self._classify(e)
                    if kind == K_COMPRESSED or (may_trim and host):
                        new_e = ZERO_FLAG
                        free.extend(self._refs_of(e))
                    else:
                        new_e = e | ZERO_FLAG
                    if new_e != e:
                        t[idx] = new_e
                        changed = True
                c += 1
            if changed:
                self.cache.mark_dirty(l2e)
            if free:
                await self._free_after(l2e, free)
        finally:
            self.cache.release(l2e)
        return leftovers

    async def pdiscard(self, offset: int, length: int) -> None:
        self._check_writable()
        if self._track is not None:
            self._track(offset, length)  # the whole request, even the parts left allocated
        end = offset + length
        start = -(-offset // self.cs) * self.cs
        stop = end & ~self.cmask if end < self.size else end
        pos = start
        while pos < stop:
            span_end = min(stop, ((pos >> self.l1_shift) + 1) << self.l1_shift)
            await self.lock.lock()
            try:
                await self._wait_inflight(pos >> self.cb, (span_end - 1) >> self.cb)
                if self.l1[pos >> self.l1_shift] & OFFSET_MASK or self.backing is not None:
                    await self._deallocate(pos, span_end, v2=self.version < 3)
            finally:
                self.lock.unlock()
            pos = span_end

    async def _deallocate(self, start: int, stop: int, *, v2: bool) -> None:
        """Free whole clusters [start, stop) of one L2 span (TRIM; v2 zeroing).

        v3: entries become zero clusters when a backing file exists or they were allocated;
        v2: entries become unallocated.  Called with self.lock held.
        """
        l2e = await self._l2_for_write(start >> self.l1_shift)
        try:
            t = l2e.value
            free: list[int] = []
            changed = False
            self.mappings_changed()  # (the loop below runs without an await)
            for c in range(start >> self.cb, -(-stop >> self.cb)):
                idx = c & (self.l2_entries - 1)
                if self.ext:
                    e, bm = t[2 * idx], t[2 * idx + 1]
                    self._check_ext(e, bm)
                    refs = self._refs_of(e)
                    if refs or self.backing is not None:
                        if (e, bm) != (0, ALL_ZERO):
                            t[2 * idx], t[2 * idx + 1] = 0, ALL_ZERO
                            changed = True
                        free.extend(refs)
                    continue
                e = t[idx]
                self._classify(e)
                refs = self._refs_of(e)
                if v2:
                    new_e = 0
                elif refs or self.backing is not None:
                    new_e = ZERO_FLAG
                else:
                    new_e = e
                if new_e != e:
                    t[idx] = new_e
                    changed = True
                    free.extend(refs)
            if changed:
                self.cache.mark_dirty(l2e)
            if free:
                await self._free_after(l2e, free)
        finally:
            self.cache.release(l2e)

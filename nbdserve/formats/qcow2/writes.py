"""qcow2 writes: entry points, in-place writes, the overlap guard, allocating writes.

Owns ``write`` (see ``formats.base``): the fast case writes in place to allocated COPIED
clusters without the lock, synchronously; anything else (or FUA) returns the coroutine of the
slow case: allocating writes as plan (locked) -> data (unlocked with a backing file) -> link (locked),
see the locking notes in ``driver``.  Owns the overlap guard: every data or metadata write is
checked against the metadata map first; a write that would land on metadata is refused with
EIO, the image is marked corrupt and every later write is refused (docs/qcow2.md, "Metadata
overlap").
"""

from __future__ import annotations

import errno
import logging
import struct
from typing import TYPE_CHECKING, NoReturn

from ... import coro
from ...cache import CacheEntry
from ...errors import CorruptImage, NbdError
from ...storage.base import Pending, joined, settled
from ..base import Landing
from .header import FIELD_INCOMPATIBLE, INCOMPAT_CORRUPT
from .lookup import NOT_PLAIN
from .tables import (
    COMPRESSED,
    COPIED,
    L2_RESERVED,
    L2_RESERVED_EXT,
    OFFSET_MASK,
    ZERO_FLAG,
)

if TYPE_CHECKING:
    from .allocation import Plan

log = logging.getLogger("nbdserve.qcow2")


class WriteMixin:
    """Write entry points, in-place writes, the overlap guard, the allocating-write sequence."""

    def write(self, offset: int, data: memoryview, *, fua: bool) -> Pending:
        if not fua:
            done = self._write_now(offset, data)
            if done is not None:
                return joined(done)
        return self._write_slow(offset, data, fua)

    def _write_now(self, offset: int, data: memoryview) -> list | None:
        """The fast case: every cluster allocated, COPIED, its table cached.  Returns the
        Pendings of the storage writes it started (an empty list: all done), or None, having
        written nothing."""
        in_c = offset & self.cmask
        if self._refusal is not None:
            return None
        if self._track is not None:
            self._track(offset, len(data))  # before any of the data lands
        if in_c + len(data) > self.cs or self.ext:
            return self._write_in_place(offset, data)
        # Hot path: one standard cluster, allocated, COPIED, its table cached.  (A cluster being
        # allocated never has a plain COPIED entry; one being landed has, and this write is just
        # another unordered write to it: no in-flight check is needed here.)
        l1e = self.l1[offset >> self.l1_shift]
        e = self.cache.peek(self.l2kind, l1e & OFFSET_MASK) if l1e & COPIED else None
        ent = e.value[(offset >> self.cb) & self.l2_mask] if e is not None else 0
        host = ent & OFFSET_MASK
        if ent & COPIED and host and not ent & NOT_PLAIN and not host & self.cmask and host < self.storage.size:
            if (host >> self.cb) in self.meta.kinds:  # (the overlap check, inlined: one cluster)
                self._guard(host + in_c, len(data))
            p = self._write_data_at(data, offset, host + in_c)
            return [] if p is None else [p]
        return None

    def _write_in_place(self, offset: int, data: memoryview) -> list | None:
        """Write to clusters that are allocated, COPIED and uncompressed, without the lock.

        Synchronous: the mapping is read and used with no await in between.  Returns the
        Pendings of the writes started, or None (having written nothing) if any part of the
        range needs metadata changes.
        """
        pieces = self._in_place_pieces(offset, len(data))
        if pieces is None:
            return None
        for host, _p, length in pieces:
            self._guard(host, length)
        started = []
        for host, p, length in pieces:
            w = self._write_data_at(data[p : p + length], offset + p, host)
            if w is not None:
                started.append(w)
        return started

    def landing(self, offset: int, length: int) -> Landing | None:
        """Where clusters that ``_write_in_place`` would write land one run of file bytes (and
        the file takes bytes by splice, the image is not encrypted, no write was refused): the
        clusters are registered in ``_inflight`` until ``release`` (zeroing, trim and allocating
        writes touching them wait there: nothing frees or moves them meanwhile) and the dirty
        bitmaps marked.  Only while the lock is free: a locked section may already have checked
        ``_inflight`` and be about to change these clusters."""
        fd = self.storage.splice_fd
        if fd is None or self.crypt is not None or self._refusal is not None or self.lock.locked():
            return None
        pieces = self._in_place_pieces(offset, length)
        if pieces is None:
            return None
        host = pieces[0][0]
        if any(h != host + p for h, p, _n in pieces) or self.meta.conflict(host, length, 0) is not None:
            return None  # not one run; or over metadata, which ``write`` refuses and reports
        clusters = range(offset >> self.cb, ((offset + length - 1) >> self.cb) + 1)
        inflight = self._inflight
        inflight.update(clusters)
        if self._track is not None:
            self._track(offset, length)

        def release() -> None:
            inflight.difference_update(clusters)
            self._inflight_q.wake_all()

        return Landing(fd, host, release)

    def _in_place_pieces(self, offset: int, n: int) -> list[tuple[int, int, int]] | None:
        """``(host offset, offset in the request, length)`` of each cluster piece of guest
        ``[offset, offset + n)`` if every cluster is allocated, COPIED, uncompressed (all of its
        subclusters in the range allocated), not in flight, its table cached; else None."""
        pieces = []
        pos = 0
        cb, cmask, l1, ext = self.cb, self.cmask, self.l1, self.ext
        inflight = self._inflight
        while pos < n:
            off = offset + pos
            l1i = off >> self.l1_shift
            if l1i >= len(l1) or not l1[l1i] & COPIED:
                return None
            e = self.cache.peek(self.l2kind, l1[l1i] & OFFSET_MASK)
            if e is None:
                return None
            c = off >> cb
            if c in inflight:
                return None
            ci = c & (self.l2_entries - 1)
            in_c = off & cmask
            chunk = min(n - pos, self.cs - in_c)
            if ext:
                ent, bm = e.value[2 * ci], e.value[2 * ci + 1]
                if ent & (COMPRESSED | L2_RESERVED_EXT) or not ent & COPIED:
                    return None
                sa, sb = in_c >> self.sc_bits, (in_c + chunk - 1) >> self.sc_bits
                m = ((2 << sb) - 1) & ~((1 << sa) - 1)
                if bm & m != m:
                    return None
            else:
                ent = e.value[ci]
                if ent & (COMPRESSED | ZERO_FLAG | L2_RESERVED) or not ent & COPIED:
                    return None
            host = ent & OFFSET_MASK
            if not host or host & cmask or host >= self.storage.size:
                return None
            pieces.append((host + in_c, pos, chunk))
            pos += chunk
        return pieces

    async def _write_slow(self, offset: int, data: memoryview, fua: bool) -> None:
        """``write`` where it must wait: in place if it can, else allocating span by span."""
        done = self._write_now(offset, data)
        if done is not None:
            await settled(joined(done))
        else:
            self._check_writable()
            pos, n = 0, len(data)
            while pos < n:
                off = offset + pos
                chunk = min(n - pos, (((off >> self.l1_shift) + 1) << self.l1_shift) - off)
                await self._write_span(off, data[pos : pos + chunk])
                pos += chunk
        if fua:
            await self.flush()

    async def _write_span(self, off: int, data: memoryview) -> None:
        """An allocating write inside one L2 table's span.

        Without a backing file no copy-on-write read can wait, so the whole write happens in one
        critical section; with one, the data phase runs unlocked with the clusters in flight.
        """
        cb = self.cb
        first, last = off >> cb, (off + len(data) - 1) >> cb
        await self.lock.lock()
        try:
            await self._wait_inflight(first, last)
            l2e = await self._l2_for_write(off >> self.l1_shift)
            try:
                started: list = []
                plans = self._plan_write(l2e.value, off, data, started)
                await settled(joined(started))
                deps = await self._allocate(plans)
            except BaseException:
                self.cache.release(l2e)
                raise
            if self.backing is None:
                try:
                    cow = await self._write_data(plans, off, data)  # never suspends here
                except BaseException:
                    await self._undo_allocation(plans, l2e)
                    raise
                await self._link(plans, l2e, deps, cow)
                return
            for p in plans:
                self._inflight.add(p.c)
        finally:
            self.lock.unlock()
        try:
            cow = await self._write_data(plans, off, data)
        except BaseException:
            async with self.lock:
                await self._undo_allocation(plans, l2e)
            raise
        async with self.lock:
            await self._link(plans, l2e, deps, cow)

    async def _wait_inflight(self, first: int, last: int) -> None:
        """Wait until no cluster in [first, last] is being allocated.  Called with self.lock held."""
        self.lock.assert_locked()
        while self._inflight and any(c in self._inflight for c in range(first, last + 1)):
            await self._inflight_q.wait(self.lock)

    async def _undo_allocation(self, plans: list[Plan], l2e: CacheEntry) -> None:
        """The data phase failed: free the new clusters.  Called with self.lock held."""
        try:
            await self.refs.decref([p.host >> self.cb for p in plans if p.new])
        finally:
            self._done_inflight(plans, l2e)

    async def _link(self, plans: list[Plan], l2e: CacheEntry, deps: list[CacheEntry], cow: bool) -> None:
        """Point the L2 entries at the written clusters, drop old references, end the flight.

        Called with self.lock held.
        """
        try:
            t = l2e.value
            free: list[int] = []
            if any(p.old & OFFSET_MASK for p in plans):  # a data cluster moves (copy-on-write)
                self.mappings_changed()
            for p in plans:
                if self.ext:
                    t[2 * p.idx] = p.host | COPIED
                    t[2 * p.idx + 1] = p.new_bm
                else:
                    t[p.idx] = p.host | COPIED
                free.extend(p.free)
            self.cache.mark_dirty(l2e, after=deps, sync_before=cow)
            if free:
                await self._free_after(l2e, free)
        finally:
            self._done_inflight(plans, l2e)

    def _done_inflight(self, plans: list[Plan], l2e: CacheEntry) -> None:
        """Called with self.lock held."""
        if self._inflight:
            for p in plans:
                self._inflight.discard(p.c)
            self._inflight_q.wake_all()
        self.cache.release(l2e)

    def _guard(self, host: int, length: int, what: str = "data", kind: int = 0) -> None:
        """The overlap check: a write of ``kind`` (0: guest data) must not land on other metadata.

        Synchronous, with or without self.lock: the caller issues the write it guards with no
        await in between."""
        bad = self.meta.conflict(host, length, kind)
        if bad is not None:
            self._refuse(f"{what} write at 0x{host:x} would overwrite {bad}")

    def _refuse(self, reason: str) -> NoReturn:
        """A write was about to land on metadata: refuse it (EIO), mark the image corrupt (as
        QEMU does) and refuse every later write.  Metadata already updated stays valid (each
        table was checked when it was placed), so flushes still write it.  Synchronous, with or
        without self.lock (the header field is one 8-byte write)."""
        if not self.corrupt:
            self.corrupt = True
            self._refusal = "image marked corrupt after a refused write"
            log.error("%s: %s; refusing the write and marking the image corrupt", self.path, reason)
            h = self.header
            h.incompatible_features |= INCOMPAT_CORRUPT
            if h.version >= 3:  # started now; a storage that must wait finishes it in the background
                pending = self.storage.write(FIELD_INCOMPATIBLE, struct.pack(">Q", h.incompatible_features))
                if pending is not None:
                    coro.start(pending, _ignore)
        raise CorruptImage(self.path, f"{reason} (metadata overlap: image marked corrupt)")

    def _check_writable(self) -> None:
        if self.corrupt:
            raise CorruptImage(self.path, f"{self._refusal}: writes refused")
        if self._refusal is not None:
            raise NbdError(errno.EROFS, f"{self.path}: {self._refusal}")


def _ignore(_result: object, _exc: BaseException | None) -> None:
    """The corrupt mark is best effort: the refused write already fails with its own error."""

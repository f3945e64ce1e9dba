"""qcow2 allocation and copy-on-write.

Owns the plan of an allocating write (``Plan``: per guest cluster, the bytes written, the bytes
to fill, the host cluster, the references dropped), new data clusters, new and copied L2 tables
(with COPIED flags equal to "refcount is 1", docs/qcow2.md, "COPIED"), copy-on-write reads of the
old contents, and the data phase.  The file always covers every allocated cluster whole.

Crash ordering (docs/qcow2.md, "Crash ordering"): refcount blocks durable before an L2 table that
references the new clusters; copy-on-write data durable before that L2 table; a new L2 table
durable before its L1 entry; an L2 table that dropped references durable before the refcounts
are decremented.  Refcounts stay consistent (no lazy mode): a crash can leak clusters, never
corrupt.
"""

from __future__ import annotations

import struct
from array import array

from ...cache import CacheEntry
from ...errors import CorruptImage
from ...storage.base import Pending, settled
from .lookup import K_COMPRESSED, K_DATA, K_UNALLOC, K_ZERO
from .overlap import L2
from .tables import (
    ALL_ALLOC,
    COMPRESSED,
    COPIED,
    OFFSET_MASK,
    ZERO_FLAG,
    compressed_host_clusters,
)


class Plan:
    """One guest cluster an allocating write changes (planned under the lock)."""

    __slots__ = ("a", "b", "c", "dpos", "fa", "fb", "free", "fresh", "host", "idx", "new", "new_bm", "old", "old_bm")

    def __init__(self, c: int, idx: int, a: int, b: int, dpos: int, old: int, old_bm: int) -> None:
        self.c, self.idx, self.a, self.b, self.dpos = c, idx, a, b, dpos  # cluster, L2 index, bytes [a, b)
        self.old, self.old_bm = old, old_bm  # the L2 entry (and subcluster bitmap) before the write
        self.fa, self.fb = a, b  # the bytes of the new host cluster to fill ([fa, fb) covers [a, b))
        self.host = 0
        self.new = False  # a freshly allocated host cluster
        self.fresh = False  # ... lying past EOF when allocated (reads as zeroes without writing)
        self.new_bm = 0
        self.free: list[int] = []  # host clusters whose reference the new entry drops


class AllocationMixin:
    """Plans, new clusters, new and copied L2 tables, copy-on-write."""

    def _plan_write(self, t: array, off: int, data: memoryview, started: list) -> list[Plan]:
        """Decide, per cluster, how the write lands.  In-place parts are written right away
        (their storage writes started; the Pendings of those that must wait go to ``started``).

        Called with self.lock held; synchronous.
        """
        cb, cs = self.cb, self.cs
        plan = self._plan_ext if self.ext else self._plan_std
        end = off + len(data)
        plans: list[Plan] = []
        c = off >> cb
        while (c << cb) < end:
            base = c << cb
            a, b = max(off, base) - base, min(end, base + cs) - base
            dpos = base + a - off
            idx = c & (self.l2_entries - 1)
            p = plan(t, c, idx, a, b, dpos, data, started)
            if p is not None:
                plans.append(p)
            c += 1
        return plans

    def _plan_std(
        self, t: array, c: int, idx: int, a: int, b: int, dpos: int, data: memoryview, started: list
    ) -> Plan | None:
        """One standard-L2 cluster (see ``_plan_write``).  Called with self.lock held."""
        e = t[idx]
        kind, host = self._classify(e)
        if kind == K_DATA and e & COPIED:
            if host >= self.storage.size:
                raise CorruptImage(self.path, f"data cluster 0x{host:x} beyond end of file")
            self._guard(host + a, b - a)
            _keep(started, self._write_data_at(data[dpos : dpos + b - a], (c << self.cb) + a, host + a))
            return None
        p = Plan(c, idx, a, b, dpos, e, 0)
        p.fa, p.fb = 0, self.cs
        if kind == K_COMPRESSED:
            p.free = list(compressed_host_clusters(e, self.cb))
        elif kind == K_ZERO and host and e & COPIED and host < self.storage.size:
            self._guard(host, self.cs)
            p.host = host  # ZERO_ALLOC: reuse the preallocated cluster in place
        elif host:
            p.free = [host >> self.cb]
        return p

    def _plan_ext(
        self, t: array, c: int, idx: int, a: int, b: int, dpos: int, data: memoryview, started: list
    ) -> Plan | None:
        """One extended-L2 cluster (see ``_plan_write``).  Called with self.lock held."""
        e, bm = t[2 * idx], t[2 * idx + 1]
        host = self._check_ext(e, bm)
        scb = self.sc_bits
        sa, sb = a >> scb, (b - 1) >> scb
        m = ((2 << sb) - 1) & ~((1 << sa) - 1)
        alloc, zero = bm & ALL_ALLOC, bm >> 32
        if host and e & COPIED and not e & COMPRESSED:
            if alloc & m == m:
                self._guard(host + a, b - a)
                _keep(started, self._write_data_at(data[dpos : dpos + b - a], (c << self.cb) + a, host + a))
                return None
            self._guard(host, self.cs)
            p = Plan(c, idx, a, b, dpos, e, bm)
            p.host = host
            # Fill only the touched subclusters that are not allocated yet (allocated ones may be
            # written concurrently by in-place writers).
            p.fa = a if (alloc >> sa) & 1 else sa << scb
            p.fb = b if (alloc >> sb) & 1 else (sb + 1) << scb
            p.new_bm = (alloc | m) | ((zero & ~m) << 32)
            return p
        p = Plan(c, idx, a, b, dpos, e, bm)
        if host == 0 and not e & COMPRESSED:
            p.fa, p.fb = sa << scb, (sb + 1) << scb
            p.new_bm = m | ((zero & ~m) << 32)
        else:
            # Compressed or shared: copy the whole cluster's current contents.
            p.fa, p.fb = 0, self.cs
            p.new_bm = ALL_ALLOC
            p.free = list(compressed_host_clusters(e, self.cb)) if e & COMPRESSED else [host >> self.cb]
        return p

    async def _allocate(self, plans: list[Plan]) -> list[CacheEntry]:
        """Give every plan without a host cluster a new one (contiguous where possible).

        Called with self.lock held.  Returns the refcount blocks the new clusters depend on.
        """
        need = [p for p in plans if not p.host]
        deps: list[CacheEntry] = []
        i = 0
        try:
            while i < len(need):
                start, n, rb = await self.refs.alloc(len(need) - i)
                deps.append(rb)
                for k in range(n):
                    p = need[i + k]
                    p.host = (start + k) << self.cb
                    p.new = True
                    p.fresh = p.host >= self.storage.size
                    self._guard(p.host, self.cs)
                i += n
        except BaseException:
            await self.refs.decref([p.host >> self.cb for p in need if p.new])
            raise
        return deps

    async def _l2_for_write(self, l1i: int) -> CacheEntry:
        """The L2 table of ``l1i`` pinned, allocated or copied (if shared) first.

        Called with self.lock held.  A new table is durable before the L1 entry points at it.
        COPIED flags of a new table's entries say exactly "refcount is 1" (``_set_copied``).
        """
        cb = self.cb
        l1e = self.l1[l1i]
        l2off = l1e & OFFSET_MASK
        if l2off and not l1e & COPIED and await self.refs.get(l2off >> cb) == 1:
            # Not shared, only the flag is missing (QEMU calls that an error; the data is
            # fine): set it instead of copying, and make the entries' flags right.
            self._guard(l2off, self.cs, "L2 table", L2)
            entry = await self.cache.get(self.l2kind, l2off)
            try:
                if await self._set_copied(entry.value):
                    self.cache.mark_dirty(entry)
                    await self.cache.writeback([entry])
            except BaseException:
                self.cache.release(entry)
                raise
            self.l1[l1i] = l2off | COPIED
            await self._write_l1_entry(l1i)
            return entry
        if l2off and l1e & COPIED:
            self._guard(l2off, self.cs, "L2 table", L2)
            return await self.cache.get(self.l2kind, l2off)
        if l2off:
            old = await self.cache.get(self.l2kind, l2off)
            value = array("Q", old.value)
            self.cache.release(old)
            await self._set_copied(value)
        else:
            value = array("Q", bytes(self.cs))
        start, _n, rb = await self.refs.alloc(1)
        new_off = start << cb
        try:
            self._guard(new_off, self.cs, "new L2 table")
        except BaseException:
            await self.refs.decref([start])
            raise
        self.meta.add(new_off, self.cs, L2)
        entry = self.cache.put_new(self.l2kind, new_off, value)
        self.cache.mark_dirty(entry, after=[rb])
        await self.cache.writeback([entry])
        self.l1[l1i] = new_off | COPIED
        await self._write_l1_entry(l1i)
        if l2off:
            await self.storage.flush()  # the L1 switch is durable before the old table loses a reference
            self.meta.remove(l2off, self.cs, L2)  # (a snapshot's table stays SNAP_L2)
            await self.refs.decref([l2off >> cb])
        await self.cache.make_room()  # ``entry`` is pinned, so it stays
        return entry

    async def _write_l1_entry(self, l1i: int) -> None:
        """Write L1 entry ``l1i`` through.  Called with self.lock held."""
        await settled(self.storage.write(self.l1_offset + l1i * 8, struct.pack(">Q", self.l1[l1i])))

    def _write_data_at(self, data: memoryview, guest: int, host: int) -> Pending:
        """Start writing guest ``data`` (at guest offset ``guest``) to ``host``, encrypted."""
        return self.storage.write(host, self._ciphertext(data, guest, host))

    async def _set_copied(self, t: array) -> bool:
        """Make COPIED of every entry of table ``t`` say "refcount is 1" (compressed and
        unallocated entries never have it).  Returns whether anything changed.  Called with
        self.lock held; ``t`` is pinned or private."""
        changed = False
        step = 2 if self.ext else 1
        known: dict[int, int] = {}
        for i in range(0, len(t), step):
            e = t[i]
            host = e & OFFSET_MASK
            if e & COMPRESSED or not host:
                continue
            c = host >> self.cb
            rc = known.get(c)
            if rc is None:
                rc = known[c] = await self.refs.get(c)
            want = (e & ~COPIED) | (COPIED if rc == 1 else 0)
            if want != e:
                t[i] = want
                changed = True
        return changed

    async def _free_after(self, l2e: CacheEntry, clusters: list[int]) -> None:
        """Drop references once the L2 table without them is durable.  Called with self.lock held."""
        await self.cache.writeback([l2e])
        self._zc_key = -1
        await self.refs.decref(clusters)

    def _old_known_zero(self, p: Plan, lo: int, hi: int) -> bool:
        """True if the old contents of cluster bytes [lo, hi) read as zeroes without any I/O."""
        if lo >= hi:
            return True
        e = p.old
        if e & COMPRESSED:
            return False
        if self.ext:
            for sc in range(lo >> self.sc_bits, ((hi - 1) >> self.sc_bits) + 1):
                k = self._sc_kind(e, p.old_bm, sc)
                if k == K_DATA or (k == K_UNALLOC and self.backing is not None):
                    return False
            return True
        if e & ZERO_FLAG:
            return True
        return not (e & OFFSET_MASK) and self.backing is None

    async def _read_old(self, p: Plan, start: int, view: memoryview) -> None:
        """Read the cluster's current contents at bytes [start, start+len) via its old entry."""
        if not len(view):
            return
        e, guest = p.old, p.c << self.cb
        if e & COMPRESSED:
            view[:] = (await self._load_compressed(e))[start : start + len(view)]
            return
        host = e & OFFSET_MASK
        if not self.ext:
            if e & ZERO_FLAG:
                view[:] = bytes(len(view))
            elif host:
                await settled(self._read_data(view, guest + start, host + start))
            else:
                await settled(self.read_backing(guest + start, view))
            return
        pos, end = start, start + len(view)
        scs = 1 << self.sc_bits
        while pos < end:
            sc = pos >> self.sc_bits
            n = min(end, (sc + 1) * scs) - pos
            k = self._sc_kind(e, p.old_bm, sc)
            v = view[pos - start : pos - start + n]
            if k == K_DATA:
                await settled(self._read_data(v, guest + pos, host + pos))
            elif k == K_ZERO:
                v[:] = bytes(n)
            else:
                await settled(self.read_backing(guest + pos, v))
            pos += n

    async def _write_data(self, plans: list[Plan], off: int, data: memoryview) -> bool:
        """Data and copy-on-write for planned clusters (lock not held; clusters are in flight).

        Returns True if copy-on-write data was written (the L2 update must wait for a sync).
        """
        cow = False
        run_host = run_pos = run_len = 0
        for p in plans:
            head_zero = self._old_known_zero(p, p.fa, p.a)
            tail_zero = self._old_known_zero(p, p.b, p.fb)
            # (Encrypted: a hole decrypts to noise, so the zeroes around a write are written too.)
            if (p.fa == p.a and p.fb == p.b) or (p.fresh and head_zero and tail_zero and self.crypt is None):
                host = p.host + p.a
                if run_len and run_host + run_len == host and run_pos + run_len == p.dpos:
                    run_len += p.b - p.a
                else:
                    if run_len:
                        await settled(self._write_data_at(data[run_pos : run_pos + run_len], off + run_pos, run_host))
                    run_host, run_pos, run_len = host, p.dpos, p.b - p.a
                continue
            buf = memoryview(bytearray(p.fb - p.fa))
            if not head_zero:
                await self._read_old(p, p.fa, buf[: p.a - p.fa])
            if not tail_zero:
                await self._read_old(p, p.b, buf[p.b - p.fa :])
            buf[p.a - p.fa : p.b - p.fa] = data[p.dpos : p.dpos + p.b - p.a]
            await settled(self._write_data_at(buf, (p.c << self.cb) + p.fa, p.host + p.fa))
            cow = True
        if run_len:
            await settled(self._write_data_at(data[run_pos : run_pos + run_len], off + run_pos, run_host))
        # The file covers every allocated cluster whole, as QEMU's files do: a small write into
        # a fresh cluster at the end would otherwise leave the file ending inside it, and other
        # readers take that for a short (corrupt) cluster.  Extending leaves a hole: zeroes.
        end = max((p.host for p in plans), default=-self.cs) + self.cs
        if end > self.storage.size:
            await self.storage.truncate(end)
        return cow


def _keep(started: list, pending: Pending) -> None:
    if pending is not None:
        started.append(pending)

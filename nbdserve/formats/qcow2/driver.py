"""The qcow2 driver: reads, allocating writes, zero/trim, block status (versions 2 and 3).

Owns the guest-to-host mapping of one qcow2 file: the active L1 table (in memory, written back
entry by entry), L2 tables (shared cluster cache), refcounts (``Refcounts``), the in-flight
allocation list, and the decompressed-cluster memo.

Locking:
  * ``self.lock`` (CoMutex) guards L1/L2/refcount/header state and allocation.  Every method
    named ``_locked_*`` or documented "called with self.lock held" assumes it.
  * Reads and in-place writes to allocated clusters (COPIED, not compressed) run without it:
    they look the entry up with ``cache.peek`` and do the host I/O with no await in between, so
    the mapping they use cannot change under them.  After any await the lookup starts over.
  * Allocating writes are serialised per guest cluster.  With a backing file (copy-on-write
    reads may wait) the planner (locked) registers each cluster it will change in
    ``self._inflight``; the data I/O (copy-on-write reads, writes) runs unlocked; the linker
    (locked) updates the L2 entries, unregisters and wakes ``self._inflight_q``.  A writer, zero
    or trim touching an in-flight cluster waits there and looks the cluster up again.  Without a
    backing file nothing in the data phase can wait, so plan, data and link run in one critical
    section.

Crash ordering (formats.md §2.7): refcount blocks durable before an L2 table referencing the
new clusters (``mark_dirty(l2, after=[refblocks])``); copy-on-write data durable before that L2
(``sync_before``); a new L2 table durable before its L1 entry; an L2 that dropped references
durable before the refcounts are decremented.  Refcounts are always kept consistent (no lazy
mode, the dirty bit is never set); a crash can leak clusters but never corrupt.

Zero/trim semantics follow qemu-nbd 7.2 (formats.md §2.8): WRITE_ZEROES with may_trim frees
allocated clusters and leaves ZERO_PLAIN entries, without it keeps them as ZERO_ALLOC; partial
clusters become zero clusters only when they already read as zeroes, else zeroes are written.
TRIM works on whole clusters and behaves like ``--discard=unmap``.
"""

from __future__ import annotations

import errno
import logging
import struct
from array import array
from typing import NoReturn

from ...blockfile import BlockFile
from ...cache import CacheEntry, ClusterCache
from ...errors import CorruptImage, NbdError, UnsupportedImage
from ...locks import CoMutex, CoQueue
from ..base import ALLOCATED, DATA, ZERO, BackingRef, Caps, Extent, FormatDriver, Limits, OpenOptions
from .check import fix_harmless, rebuild, scan
from .compress import decompress_cluster
from .header import (
    FIELD_AUTOCLEAR,
    FIELD_INCOMPATIBLE,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MAGIC,
    Header,
    parse_header,
)
from .overlap import BITMAPS, L2, MetadataMap
from .refcount import Refcounts
from .snapshot import Snapshot, find_snapshot, read_snapshots
from .tables import (
    ALL_ALLOC,
    ALL_ZERO,
    COMPRESSED,
    COPIED,
    L2_RESERVED,
    L2_RESERVED_EXT,
    OFFSET_MASK,
    ZERO_FLAG,
    compressed_geometry,
    compressed_host_clusters,
    decode_be64,
    encode_be64,
    load_l1,
)

log = logging.getLogger("nbdserve.qcow2")

# Kinds of a (sub)cluster run.
K_UNALLOC = 0
K_ZERO = 1
K_DATA = 2
K_COMPRESSED = 3

_NOT_PLAIN = COMPRESSED | ZERO_FLAG | L2_RESERVED
_KIND_STATE = {K_UNALLOC: 0, K_ZERO: ALLOCATED | ZERO, K_DATA: ALLOCATED | DATA, K_COMPRESSED: ALLOCATED | DATA}


class _Plan:
    """One guest cluster an allocating write changes (planned under the lock)."""

    __slots__ = ("a", "b", "c", "dpos", "fa", "fb", "free", "fresh", "host", "idx", "new", "new_bm", "old", "old_bm")

    def __init__(self, c: int, idx: int, a: int, b: int, dpos: int, old: int, old_bm: int) -> None:
        self.c, self.idx, self.a, self.b, self.dpos = c, idx, a, b, dpos
        self.old, self.old_bm = old, old_bm
        self.fa, self.fb = a, b
        self.host = 0
        self.new = False  # a freshly allocated host cluster
        self.fresh = False  # ... lying past EOF when allocated (reads as zeroes without writing)
        self.new_bm = 0
        self.free: list[int] = []


class Qcow2Driver(FormatDriver):
    format_name = "qcow2"

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        return 100 if head[:4] == MAGIC else 0

    def __init__(self, file: BlockFile, cache: ClusterCache, h: Header, readonly: bool) -> None:
        self.file = file
        self.path = file.path
        self.cache = cache
        self.header = h
        self.readonly = readonly
        self.version = h.version
        self.cb = h.cluster_bits
        self.cs = h.cluster_size
        self.cmask = self.cs - 1
        self.ext = h.extended_l2
        self.l2_entries = h.l2_entries
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.l2_mask = self.l2_entries - 1
        self.l1_shift = self.cb + self.l2_bits
        self.sc_bits = self.cb - 5 if self.ext else self.cb
        self.map_bits = 0 if self.ext else self.cb
        self.size = h.size & ~511
        self.compression = h.compression_type
        self.lock = CoMutex(f"qcow2 {file.path}")
        self._inflight: set[int] = set()
        self._inflight_q = CoQueue()
        self._zc_key = -1
        self._zc_data = b""
        self._data_region = (0, 0)  # host bytes known to be data (see _host_state)
        self.l2kind = cache.kind(file, name="L2 table", size=self.cs, decode=decode_be64, encode=encode_be64)
        self.refs = self._refcounts()
        self.meta = MetadataMap(self.cb)  # filled by the consistency check of a read-write open
        self.corrupt = False  # a write was refused: no more writes
        self._refusal: str | None = "image is read-only" if readonly else None  # why writes fail
        self.l1_offset = h.l1_table_offset
        self.l1 = load_l1(self.path, file.pread(h.l1_size * 8, h.l1_table_offset), self.cs) if h.l1_size else array("Q")
        self.snapshots: list[Snapshot] = []
        self.snapshot_table_bytes = 0
        if h.nb_snapshots:
            self.snapshots, self.snapshot_table_bytes = read_snapshots(self.path, h, file)
        if h.backing_file:
            self.backing = BackingRef(h.backing_file, h.backing_format)
        self.limits = Limits(align=1)
        self.caps = Caps(native_zero=not readonly, native_trim=not readonly, fast_zero=not readonly)

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    async def open(cls, file: BlockFile, *, readonly: bool, cache: ClusterCache, options: OpenOptions) -> Qcow2Driver:
        path = file.path

        def read(off: int, n: int) -> bytearray:
            return file.pread(max(0, min(n, file.size - off)), off)

        h = parse_header(path, bytes(read(0, 112)), read, file.size)
        readonly = readonly or file.readonly or options.snapshot is not None
        drv = cls(file, cache, h, readonly)
        if options.snapshot is not None:
            drv._use_snapshot(options.snapshot)
        for doubt in h.doubts + drv.refs.problems:
            drv._read_only_because(doubt)
        if not drv.readonly:
            await drv._prepare_writes(options.repair)
        return drv

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
        if dirty and h.has_bitmaps:
            return self._read_only_because("image is dirty and has bitmaps (not rebuilt)")
        found = scan(self)
        if found.fatal:
            return self._read_only_because(f"inconsistent beyond repair: {found.summary()}")
        if dirty or found.n_errors:
            # A dirty image's refcounts are stale by design (lazy refcounts): QEMU rebuilds them too.
            if not dirty and repair != "all":
                return self._read_only_because(f"refcounts are wrong: {found.summary()} (--repair=all rebuilds them)")
            why = "image is dirty (lazy refcounts)" if dirty else found.summary()
            log.warning("%s: %s; rebuilding refcounts", self.path, why)
            offset, clusters, _ = await rebuild(self, found)
            h.refcount_table_offset, h.refcount_table_clusters = offset, clusters
            self.refs = self._refcounts()
            found = scan(self)
        elif found.leaks or found.missing_copied:
            if repair in ("leaks", "all"):
                log.warning("%s: %s; repairing", self.path, found.summary())
                await fix_harmless(self, found)
                found = scan(self)
            else:
                log.warning("%s: %s (harmless; --repair=leaks fixes it)", self.path, found.summary())
        if found.harmful:
            return self._read_only_because(f"still inconsistent after repair: {found.summary()}")
        if dirty or corrupt:
            h.incompatible_features &= ~(INCOMPAT_DIRTY | INCOMPAT_CORRUPT)
            self.file.pwrite(struct.pack(">Q", h.incompatible_features), FIELD_INCOMPATIBLE)
            await self.file.flush()
        self.meta = found.meta
        self.refs.meta, self.refs.refuse = found.meta, self._refuse
        if h.version >= 3 and h.autoclear_features:
            # Bits we do not maintain (bitmaps, unknown ones) must be clear before the first write.
            self.file.pwrite(struct.pack(">Q", 0), FIELD_AUTOCLEAR)
            await self.file.flush()
            if found.bitmap_refs:  # the bitmaps are invalid now: free their clusters
                self.meta.remove(*h.bitmap_directory[:2], BITMAPS)
                for c in found.bitmap_refs:
                    self.meta.remove(c << self.cb, self.cs, BITMAPS)
                await self.refs.decref(found.bitmap_refs)
                await self.cache.flush(self.file)
            h.autoclear_features = 0

    def _refcounts(self) -> Refcounts:
        h = self.header
        return Refcounts(
            self.path,
            self.file,
            self.cache,
            self.cb,
            h.refcount_order,
            h.refcount_table_offset,
            h.refcount_table_clusters,
        )

    def _use_snapshot(self, key: str) -> None:
        sn = find_snapshot(self.snapshots, key)
        if sn is None:
            names = ", ".join(f"{s.id}:{s.name}" for s in self.snapshots) or "none"
            raise UnsupportedImage(self.path, f"no internal snapshot {key!r} (have: {names})")
        self.l1 = load_l1(self.path, self.file.pread(sn.l1_size * 8, sn.l1_table_offset), self.cs, "snapshot L1")
        self.l1_offset = sn.l1_table_offset
        if sn.disk_size is not None:
            self.size = sn.disk_size & ~511
        if len(self.l1) < -(-self.size >> self.l1_shift):
            raise CorruptImage(self.path, f"snapshot {key!r}: L1 table too small for its disk size")

    # -- lookup -----------------------------------------------------------------------------

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

    # -- reads ------------------------------------------------------------------------------

    def read_now(self, offset: int, buf: memoryview) -> bool:
        """Hot path: inside one standard cluster of plain data (see ``map_now``)."""
        in_c = offset & self.cmask
        if in_c + len(buf) > self.cs or self.ext:
            return False
        host = self.map_now(offset)
        if host is None:
            return False
        self.file.pread_into(buf, host + in_c)
        return True

    def map_now(self, offset: int) -> int | None:
        """A standard cluster holding plain data, its L2 table cached (extended L2: map_bits 0)."""
        l1, l1i = self.l1, offset >> self.l1_shift
        e = self.cache.peek(self.l2kind, l1[l1i] & OFFSET_MASK) if l1i < len(l1) else None
        if e is None:
            return None
        ent = e.value[(offset >> self.cb) & self.l2_mask]
        host = ent & OFFSET_MASK
        if host and not ent & _NOT_PLAIN and not host & self.cmask and host < self.file.size:
            return host
        return None

    async def preadv(self, offset: int, buf: memoryview) -> None:
        if self.read_now(offset, buf):
            return
        pos, n = 0, len(buf)
        peek, kind, l1, file = self.cache.peek, self.l2kind, self.l1, self.file
        while pos < n:
            off = offset + pos
            l1i = off >> self.l1_shift
            span = min(n - pos, ((l1i + 1) << self.l1_shift) - off)
            l2off = l1[l1i] & OFFSET_MASK if l1i < len(l1) else 0
            if not l2off:
                await self.read_backing(off, buf[pos : pos + span])
                pos += span
                continue
            e = peek(kind, l2off)
            if e is None:
                self.cache.release(await self.cache.get(kind, l2off))
                continue  # look up again: the table may have changed while we waited
            t = e.value
            end = pos + span
            while pos < end:
                k, length, host = self._run(t, offset + pos, end - pos)
                if k == K_DATA:
                    if host + length > file.size + self.cs:
                        raise CorruptImage(self.path, f"data cluster 0x{host:x} beyond end of file")
                    file.pread_into(buf[pos : pos + length], host)
                elif k == K_ZERO:
                    buf[pos : pos + length] = bytes(length)
                elif k == K_COMPRESSED:
                    off = offset + pos
                    data = self._decompressed(t, off)
                    in_c = off & self.cmask
                    buf[pos : pos + length] = data[in_c : in_c + length]
                else:
                    await self.read_backing(offset + pos, buf[pos : pos + length])
                    pos += length
                    break  # after an await, look the table up again
                pos += length

    def _decompressed(self, t: array, off: int) -> bytes:
        ci = (off >> self.cb) & (self.l2_entries - 1)
        e = t[2 * ci] if self.ext else t[ci]
        return self._decompress_entry(e)

    def _decompress_entry(self, e: int) -> bytes:
        if e == self._zc_key:
            return self._zc_data
        if e & COPIED:
            raise self._bad("compressed L2 entry with the COPIED flag:", e)
        host, length = compressed_geometry(e, self.cb)
        if host + length > self.file.size + 512 or host < self.cs:
            raise CorruptImage(self.path, f"compressed cluster at 0x{host:x} (+{length}) outside the file")
        data = decompress_cluster(self.path, self.compression, self.file.pread(length, host), self.cs)
        self._zc_key, self._zc_data = e, data
        return data

    # -- block status -----------------------------------------------------------------------

    async def block_status(self, offset: int, length: int) -> Extent:
        pos, end = offset, offset + length
        state = -1
        while pos < end:
            l1i = pos >> self.l1_shift
            span_end = min(end, (l1i + 1) << self.l1_shift)
            t = await self._table(l1i)
            while pos < span_end:  # no await in here: ``t`` stays valid
                if t is None:
                    s, n = 0, span_end - pos
                else:
                    k, n, host = self._run(t, pos, span_end - pos)
                    s = _KIND_STATE[k]
                    if k == K_DATA:
                        s, n = self._host_state(host, n)
                if state == -1:
                    state = s
                elif s != state:
                    return Extent(pos - offset, state)
                pos += n
        return Extent(pos - offset, state)

    def _host_state(self, host: int, n: int) -> tuple[int, int]:
        """Allocated data at ``host``: holes in the host file also read as zeroes (as QEMU says).

        The last host data region found is remembered (``_data_region``): writes only ever turn
        holes into data here (nothing is punched), so it stays valid and sequential block status
        costs no lseek per request (SEEK_HOLE can scan far on some filesystems).
        """
        lo, hi = self._data_region
        if lo <= host < hi:
            return ALLOCATED | DATA, min(n, hi - host)
        f = self.file
        if host >= f.size:
            return ALLOCATED | DATA | ZERO, n
        hole = f.next_hole(host)
        if hole > host:
            self._data_region = (host, hole)
            return ALLOCATED | DATA, min(n, hole - host)
        data = f.next_data(host)
        if data <= host:
            return ALLOCATED | DATA, n
        return ALLOCATED | DATA | ZERO, min(n, data - host)

    # -- writes -----------------------------------------------------------------------------

    def _guard(self, host: int, length: int, what: str = "data", kind: int = 0) -> None:
        """The overlap check: a write of ``kind`` (0: guest data) must not land on other metadata."""
        bad = self.meta.conflict(host, length, kind)
        if bad is not None:
            self._refuse(f"{what} write at 0x{host:x} would overwrite {bad}")

    def _refuse(self, reason: str) -> NoReturn:
        """A write was about to land on metadata: refuse it (EIO), mark the image corrupt (as
        QEMU does) and refuse every later write.  Metadata already updated stays valid (each
        table was checked when it was placed), so flushes still write it."""
        if not self.corrupt:
            self.corrupt = True
            self._refusal = "image marked corrupt after a refused write"
            log.error("%s: %s; refusing the write and marking the image corrupt", self.path, reason)
            h = self.header
            h.incompatible_features |= INCOMPAT_CORRUPT
            if h.version >= 3:
                self.file.pwrite(struct.pack(">Q", h.incompatible_features), FIELD_INCOMPATIBLE)
        raise CorruptImage(self.path, f"{reason} (metadata overlap: image marked corrupt)")

    def _check_writable(self) -> None:
        if self.corrupt:
            raise CorruptImage(self.path, f"{self._refusal}: writes refused")
        if self._refusal is not None:
            raise NbdError(errno.EROFS, f"{self.path}: {self._refusal}")

    def _write_in_place(self, offset: int, data: memoryview) -> bool:
        """Write to clusters that are allocated, COPIED and uncompressed, without the lock.

        Synchronous: the mapping is read and used with no await in between.  Returns False
        (having written nothing) if any part of the range needs metadata changes.
        """
        pieces = []
        pos, n = 0, len(data)
        cb, cmask, l1, ext = self.cb, self.cmask, self.l1, self.ext
        inflight = self._inflight
        while pos < n:
            off = offset + pos
            l1i = off >> self.l1_shift
            if l1i >= len(l1) or not l1[l1i] & COPIED:
                return False
            e = self.cache.peek(self.l2kind, l1[l1i] & OFFSET_MASK)
            if e is None:
                return False
            c = off >> cb
            if c in inflight:
                return False
            ci = c & (self.l2_entries - 1)
            in_c = off & cmask
            chunk = min(n - pos, self.cs - in_c)
            if ext:
                ent, bm = e.value[2 * ci], e.value[2 * ci + 1]
                if ent & (COMPRESSED | L2_RESERVED_EXT) or not ent & COPIED:
                    return False
                sa, sb = in_c >> self.sc_bits, (in_c + chunk - 1) >> self.sc_bits
                m = ((2 << sb) - 1) & ~((1 << sa) - 1)
                if bm & m != m:
                    return False
            else:
                ent = e.value[ci]
                if ent & (COMPRESSED | ZERO_FLAG | L2_RESERVED) or not ent & COPIED:
                    return False
            host = ent & OFFSET_MASK
            if not host or host & cmask or host >= self.file.size:
                return False
            pieces.append((host + in_c, pos, chunk))
            pos += chunk
        for host, _p, length in pieces:
            self._guard(host, length)
        for host, p, length in pieces:
            self.file.pwrite(data[p : p + length], host)
        return True

    def write_now(self, offset: int, data: memoryview) -> bool:
        in_c = offset & self.cmask
        if self._refusal is not None:
            return False
        if in_c + len(data) > self.cs or self.ext:
            return self._write_in_place(offset, data)
        # Hot path: one standard cluster, allocated, COPIED, its table cached.  (A cluster in
        # flight never has a plain COPIED entry, so no in-flight check is needed here.)
        l1e = self.l1[offset >> self.l1_shift]
        e = self.cache.peek(self.l2kind, l1e & OFFSET_MASK) if l1e & COPIED else None
        ent = e.value[(offset >> self.cb) & self.l2_mask] if e is not None else 0
        host = ent & OFFSET_MASK
        if ent & COPIED and host and not ent & _NOT_PLAIN and not host & self.cmask and host < self.file.size:
            if (host >> self.cb) in self.meta.kinds:  # (the overlap check, inlined: one cluster)
                self._guard(host + in_c, len(data))
            self.file.pwrite(data, host + in_c)
            return True
        return False

    async def pwritev(self, offset: int, data: memoryview, *, fua: bool) -> None:
        if not self.write_now(offset, data):
            self._check_writable()
            pos, n = 0, len(data)
            while pos < n:
                off = offset + pos
                chunk = min(n - pos, (((off >> self.l1_shift) + 1) << self.l1_shift) - off)
                await self._write_span(off, data[pos : pos + chunk])
                pos += chunk
        if fua:
            await self.flush()

    async def _wait_inflight(self, first: int, last: int) -> None:
        """Wait until no cluster in [first, last] is being allocated.  Called with self.lock held."""
        self.lock.assert_locked()
        while self._inflight and any(c in self._inflight for c in range(first, last + 1)):
            await self._inflight_q.wait(self.lock)

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
            self.file.pwrite(struct.pack(">Q", l2off | COPIED), self.l1_offset + l1i * 8)
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
        self.file.pwrite(struct.pack(">Q", new_off | COPIED), self.l1_offset + l1i * 8)
        if l2off:
            await self.file.flush()  # the L1 switch is durable before the old table loses a reference
            self.meta.remove(l2off, self.cs, L2)  # (a snapshot's table stays SNAP_L2)
            await self.refs.decref([l2off >> cb])
        await self.cache.make_room()  # ``entry`` is pinned, so it stays
        return entry

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
                plans = self._plan_write(l2e.value, off, data)
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

    async def _undo_allocation(self, plans: list[_Plan], l2e: CacheEntry) -> None:
        """The data phase failed: free the new clusters.  Called with self.lock held."""
        try:
            await self.refs.decref([p.host >> self.cb for p in plans if p.new])
        finally:
            self._done_inflight(plans, l2e)

    async def _link(self, plans: list[_Plan], l2e: CacheEntry, deps: list[CacheEntry], cow: bool) -> None:
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

    def _done_inflight(self, plans: list[_Plan], l2e: CacheEntry) -> None:
        """Called with self.lock held."""
        if self._inflight:
            for p in plans:
                self._inflight.discard(p.c)
            self._inflight_q.wake_all()
        self.cache.release(l2e)

    async def _free_after(self, l2e: CacheEntry, clusters: list[int]) -> None:
        """Drop references once the L2 table without them is durable.  Called with self.lock held."""
        await self.cache.writeback([l2e])
        self._zc_key = -1
        await self.refs.decref(clusters)

    def _plan_write(self, t: array, off: int, data: memoryview) -> list[_Plan]:
        """Decide, per cluster, how the write lands.  In-place parts are written right away.

        Called with self.lock held; synchronous.
        """
        cb, cs = self.cb, self.cs
        plan = self._plan_ext if self.ext else self._plan_std
        end = off + len(data)
        plans: list[_Plan] = []
        c = off >> cb
        while (c << cb) < end:
            base = c << cb
            a, b = max(off, base) - base, min(end, base + cs) - base
            dpos = base + a - off
            idx = c & (self.l2_entries - 1)
            p = plan(t, c, idx, a, b, dpos, data)
            if p is not None:
                plans.append(p)
            c += 1
        return plans

    def _plan_std(self, t: array, c: int, idx: int, a: int, b: int, dpos: int, data: memoryview) -> _Plan | None:
        """One standard-L2 cluster (see ``_plan_write``).  Called with self.lock held."""
        e = t[idx]
        kind, host = self._classify(e)
        if kind == K_DATA and e & COPIED:
            if host >= self.file.size:
                raise CorruptImage(self.path, f"data cluster 0x{host:x} beyond end of file")
            self._guard(host + a, b - a)
            self.file.pwrite(data[dpos : dpos + b - a], host + a)
            return None
        p = _Plan(c, idx, a, b, dpos, e, 0)
        p.fa, p.fb = 0, self.cs
        if kind == K_COMPRESSED:
            p.free = list(compressed_host_clusters(e, self.cb))
        elif kind == K_ZERO and host and e & COPIED and host < self.file.size:
            p.host = host  # ZERO_ALLOC: reuse the preallocated cluster in place
        elif host:
            p.free = [host >> self.cb]
        return p

    def _plan_ext(self, t: array, c: int, idx: int, a: int, b: int, dpos: int, data: memoryview) -> _Plan | None:
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
                self.file.pwrite(data[dpos : dpos + b - a], host + a)
                return None
            p = _Plan(c, idx, a, b, dpos, e, bm)
            p.host = host
            # Fill only the touched subclusters that are not allocated yet (allocated ones may be
            # written concurrently by in-place writers).
            p.fa = a if (alloc >> sa) & 1 else sa << scb
            p.fb = b if (alloc >> sb) & 1 else (sb + 1) << scb
            p.new_bm = (alloc | m) | ((zero & ~m) << 32)
            return p
        p = _Plan(c, idx, a, b, dpos, e, bm)
        if host == 0 and not e & COMPRESSED:
            p.fa, p.fb = sa << scb, (sb + 1) << scb
            p.new_bm = m | ((zero & ~m) << 32)
        else:
            # Compressed or shared: copy the whole cluster's current contents.
            p.fa, p.fb = 0, self.cs
            p.new_bm = ALL_ALLOC
            p.free = list(compressed_host_clusters(e, self.cb)) if e & COMPRESSED else [host >> self.cb]
        return p

    async def _allocate(self, plans: list[_Plan]) -> list[CacheEntry]:
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
                    p.fresh = p.host >= self.file.size
                    self._guard(p.host, self.cs)
                i += n
        except BaseException:
            await self.refs.decref([p.host >> self.cb for p in need if p.new])
            raise
        return deps

    def _old_known_zero(self, p: _Plan, lo: int, hi: int) -> bool:
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

    async def _read_old(self, p: _Plan, start: int, view: memoryview) -> None:
        """Read the cluster's current contents at bytes [start, start+len) via its old entry."""
        if not len(view):
            return
        e, guest = p.old, p.c << self.cb
        if e & COMPRESSED:
            view[:] = self._decompress_entry(e)[start : start + len(view)]
            return
        host = e & OFFSET_MASK
        if not self.ext:
            if e & ZERO_FLAG:
                view[:] = bytes(len(view))
            elif host:
                self.file.pread_into(view, host + start)
            else:
                await self.read_backing(guest + start, view)
            return
        pos, end = start, start + len(view)
        scs = 1 << self.sc_bits
        while pos < end:
            sc = pos >> self.sc_bits
            n = min(end, (sc + 1) * scs) - pos
            k = self._sc_kind(e, p.old_bm, sc)
            v = view[pos - start : pos - start + n]
            if k == K_DATA:
                self.file.pread_into(v, host + pos)
            elif k == K_ZERO:
                v[:] = bytes(n)
            else:
                await self.read_backing(guest + pos, v)
            pos += n

    async def _write_data(self, plans: list[_Plan], off: int, data: memoryview) -> bool:
        """Data and copy-on-write for planned clusters (lock not held; clusters are in flight).

        Returns True if copy-on-write data was written (the L2 update must wait for a sync).
        """
        cow = False
        run_host = run_pos = run_len = 0
        file = self.file
        for p in plans:
            head_zero = self._old_known_zero(p, p.fa, p.a)
            tail_zero = self._old_known_zero(p, p.b, p.fb)
            if (p.fa == p.a and p.fb == p.b) or (p.fresh and head_zero and tail_zero):
                host = p.host + p.a
                if run_len and run_host + run_len == host and run_pos + run_len == p.dpos:
                    run_len += p.b - p.a
                else:
                    if run_len:
                        file.pwrite(data[run_pos : run_pos + run_len], run_host)
                    run_host, run_pos, run_len = host, p.dpos, p.b - p.a
                continue
            buf = memoryview(bytearray(p.fb - p.fa))
            if not head_zero:
                await self._read_old(p, p.fa, buf[: p.a - p.fa])
            if not tail_zero:
                await self._read_old(p, p.b, buf[p.b - p.fa :])
            buf[p.a - p.fa : p.b - p.fa] = data[p.dpos : p.dpos + p.b - p.a]
            file.pwrite(buf, p.host + p.fa)
            cow = True
        if run_len:
            file.pwrite(data[run_pos : run_pos + run_len], run_host)
        # The file covers every allocated cluster whole, as QEMU's files do: a small write into
        # a fresh cluster at the end would otherwise leave the file ending inside it, and other
        # readers take that for a short (corrupt) cluster.  Extending leaves a hole: zeroes.
        end = max((p.host for p in plans), default=-self.cs) + self.cs
        if end > file.size:
            file.truncate(end)
        return cow

    # -- zero / trim ------------------------------------------------------------------------

    async def pwrite_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        self._check_writable()
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
        zero = memoryview(bytes(min(length, 1 << 20)))
        pos = 0
        while pos < length:
            n = min(len(zero), length - pos)
            await self.pwritev(offset + pos, zero[:n], fua=False)
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

    def _refs_of(self, e: int) -> list[int]:
        """Host clusters an L2 entry holds a reference on."""
        if e & COMPRESSED:
            return list(compressed_host_clusters(e, self.cb))
        host = e & OFFSET_MASK
        return [host >> self.cb] if host else []

    async def pdiscard(self, offset: int, length: int) -> None:
        self._check_writable()
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

    async def cache_hint(self, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: load the L2 tables of the range into the cache."""
        for l1i in range(offset >> self.l1_shift, ((offset + length - 1) >> self.l1_shift) + 1):
            await self._table(l1i)

    # -- flush / close ----------------------------------------------------------------------

    async def flush(self) -> None:
        async with self.lock:
            await self.cache.flush(self.file)

    async def close(self) -> None:
        if not self.readonly:
            await self.flush()

"""The open-time consistency check of a qcow2 image, and its repairs.

Owns:
  * ``scan``: recounts every reference the image holds (header, L1 and L2 tables of the active
    state and of every snapshot, data and compressed clusters, refcount table and blocks,
    snapshot table, bitmap directory, tables and data) and compares the counts with the stored
    refcounts and the active tables' COPIED flags.  It also builds the ``MetadataMap`` the driver
    checks writes against.  The work is bounded by the image's metadata, not its virtual size:
    each L1, L2, refcount and bitmap table is read once (an L2 table shared by snapshots is read
    once and counted once per reference), and the counts live in one array per refcount block
    that has references, capped at ``MAX_COUNTED`` clusters.
  * ``Findings``: what the scan found, sorted by harm (docs/qcow2.md, "Consistency at open"):
      - ``fatal``: references that cannot be repaired without guessing (metadata tables that
        overlap each other, data clusters on metadata, references past the end of the file or
        past what refcount_bits can count, malformed entries);
      - ``errors``: harmful and repairable: a refcount lower than its references (that cluster
        would be handed out again and overwritten), a missing refcount block, COPIED set on a
        shared or compressed cluster (a write would change a snapshot);
      - ``leaks`` and ``missing_copied``: harmless (a refcount higher than its references wastes
        space; a missing COPIED flag only costs a copy), repaired on request.
  * ``fix_harmless``: lowers leaked refcounts and sets missing COPIED flags in place;
  * ``rebuild``: writes fresh refcount blocks and table past the end of the file from the
    counts, switches the header to them, and corrects every COPIED flag.

Crash ordering of the repairs: new refcount structures are durable before the header points at
them (the old ones simply become free); flag and leak fixes are single in-place writes of
entries whose old and new values are both safe, synced at the end.  Called before the image is
shared (no lock needed).
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_left
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from ...errors import CorruptImage
from ...storage.base import Storage, read_at, settled
from .bitmaps import TABLE_OFFSET, BitmapError, decode_table
from .header import FIELD_REFCOUNT_TABLE, MAX_HOST_OFFSET, MAX_REFTABLE_BYTES
from .overlap import BITMAPS, CRYPTO, HEADER, L1, L2, REFBLOCK, REFTABLE, SNAP_L1, SNAP_L2, SNAPSHOTS, MetadataMap
from .refcount import RefBlock
from .tables import (
    COMPRESSED,
    COPIED,
    L2_RESERVED,
    L2_RESERVED_EXT,
    OFFSET_MASK,
    ZERO_FLAG,
    compressed_host_clusters,
    decode_be64,
    encode_be64,
    load_l1,
)

if TYPE_CHECKING:
    from .driver import Qcow2Driver

MAX_COUNTED = 1 << 26  # clusters counted at most (256 MiB of counts): larger images are not checked
_SAMPLES = 3  # problems named per kind in the warning


@dataclass
class Findings:
    fatal: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    n_errors: int = 0
    leaks: dict[int, int] = field(default_factory=dict)  # cluster -> its true count
    missing_copied: int = 0
    l1_fixes: dict[int, int] = field(default_factory=dict)  # active L1 index -> corrected entry
    l2_fixes: dict[int, dict[int, int]] = field(default_factory=dict)  # L2 offset -> {index: entry}
    counts: dict[int, array] = field(default_factory=dict)  # refcount block index -> counts
    meta: MetadataMap | None = None

    @property
    def harmful(self) -> bool:
        return bool(self.fatal or self.n_errors)

    @property
    def clean(self) -> bool:
        return not (self.harmful or self.leaks or self.missing_copied)

    def fail(self, text: str) -> None:
        """Record an unrepairable problem (the first few are kept: a hostile image may have
        millions)."""
        if len(self.fatal) < _SAMPLES:
            self.fatal.append(text)

    def error(self, text: str) -> None:
        self.n_errors += 1
        if len(self.errors) < _SAMPLES:
            self.errors.append(text)

    def summary(self) -> str:
        """One line: the worst problems found, with counts."""
        parts = []
        if self.fatal:
            parts.append("; ".join(self.fatal[:_SAMPLES]))
        if self.n_errors:
            parts.append(f"{self.n_errors} refcount/COPIED error(s): " + "; ".join(self.errors))
        if self.leaks:
            parts.append(f"{len(self.leaks)} leaked cluster(s) (refcount above references)")
        if self.missing_copied:
            parts.append(f"{self.missing_copied} missing COPIED flag(s)")
        return "; ".join(parts) or "consistent"


class _Counter:
    """Reference counts per host cluster, one array per refcount block with references."""

    def __init__(self, f: Findings, block_shift: int, file_clusters: int) -> None:
        self.f = f
        self.shift = block_shift
        self.mask = (1 << block_shift) - 1
        self.nfile = file_clusters
        self.left = MAX_COUNTED
        self.meta_sorted: list[int] = []  # metadata clusters, sorted (for the fast path)

    def add(self, c: int, n: int, what: str) -> None:
        if c >= self.nfile:
            self.f.fail(f"{what} at 0x{c << self.f.meta.cb:x} lies beyond the end of the file")
            return
        bi = c >> self.shift
        a = self.f.counts.get(bi)
        if a is None:
            size = min(self.mask + 1, self.nfile - (bi << self.shift))
            self.left -= size
            if self.left < 0:
                raise _TooLarge
            a = self.f.counts[bi] = array("I", bytes(4 * size))
        a[c & self.mask] += n

    def add_range(self, lo: int, hi: int, n: int) -> None:
        """``add`` for every cluster of [lo, hi), all inside the file, by slices."""
        while lo < hi:
            self.add(lo, 0, "")  # makes sure the block's array exists
            a = self.f.counts[lo >> self.shift]
            s = lo & self.mask
            e = min(len(a), s + hi - lo)
            seg = a[s:e]
            if seg.count(0) == len(seg):
                a[s:e] = array("I", [n]) * len(seg)
            else:
                a[s:e] = array("I", [x + n for x in seg])
            lo += e - s

    def how_many(self, lo: int, hi: int, value: int) -> int:
        """How many clusters of [lo, hi) (inside the file, counted) have the count ``value``."""
        total = 0
        while lo < hi:
            a = self.f.counts[lo >> self.shift]
            s = lo & self.mask
            e = min(len(a), s + hi - lo)
            total += a[s:e].count(value)
            lo += e - s
        return total

    def get(self, c: int) -> int:
        a = self.f.counts.get(c >> self.shift)
        i = c & self.mask
        return a[i] if a is not None and i < len(a) else 0


class _TooLarge(Exception):
    pass


class _Overread(Exception):
    pass


class _Reader:
    """Reads tables for the scan within a budget of the file's size: the tables of a valid
    image never overlap, so together they fit in the file; more means tables named many times
    over (hostile), which would otherwise make the scan read without bound."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.left = storage.size

    async def __call__(self, length: int, offset: int) -> bytearray:
        self.left -= length
        if self.left < 0:
            raise _Overread
        return await read_at(self.storage, offset, length)


async def scan(drv: Qcow2Driver) -> Findings:
    """Recount the image (see the module docstring).  Raises CorruptImage for unreadable tables."""
    f = Findings(meta=MetadataMap(drv.cb))
    try:
        await _scan(drv, f)
    except _TooLarge:
        f.fail(f"image too large to check (more than {MAX_COUNTED} clusters referenced)")
    except _Overread:
        f.fail("metadata tables add up to more than the file holds (tables named more than once)")
    except OverflowError:
        f.fail("a cluster has more than 2^32 references")
    return f


async def _scan(drv: Qcow2Driver, f: Findings) -> None:
    file, cb, cs, h, refs = drv.storage, drv.cb, drv.cs, drv.header, drv.refs
    meta = f.meta
    assert meta is not None
    nfile = -(-file.size // cs)
    counter = _Counter(f, refs.block_shift, nfile)
    read = _Reader(file)

    def add_meta(offset: int, length: int, kind: int, what: str, n: int = 1) -> None:
        if length <= 0:
            return
        for c in meta.clusters(offset, length):
            other = meta.kinds.get(c, 0) & ~kind
            if other and kind | other != L2 | SNAP_L2:
                f.fail(f"{what} at 0x{c << cb:x} overlaps other metadata")
            counter.add(c, n, what)
        meta.add(offset, length, kind)

    add_meta(0, cs, HEADER, "header")
    if len(drv.l1):
        add_meta(drv.l1_offset, len(drv.l1) * 8, L1, "L1 table")
    add_meta(refs.table_offset, refs.table_clusters * cs, REFTABLE, "refcount table")
    for e in refs.table:
        if e:
            add_meta(e, cs, REFBLOCK, "refcount block")
    l1s = [drv.l1]
    if drv.snapshot_table_bytes:
        add_meta(h.snapshots_offset, drv.snapshot_table_bytes, SNAPSHOTS, "snapshot table")
    for sn in drv.snapshots:
        if sn.l1_size:
            add_meta(sn.l1_table_offset, sn.l1_size * 8, SNAP_L1, f"snapshot {sn.id!r} L1 table")
            raw = await read(sn.l1_size * 8, sn.l1_table_offset)
            l1s.append(load_l1(drv.path, raw, cs, f"snapshot {sn.id!r} L1 table"))
    # Every L2 table, with the number of L1 entries naming it.
    l2_refs: dict[int, tuple[int, int]] = {}  # offset -> (references, kinds)
    for n, l1 in enumerate(l1s):
        kind = L2 if n == 0 else SNAP_L2
        for e in l1:
            off = e & OFFSET_MASK
            if off:
                refs, kinds = l2_refs.get(off, (0, 0))
                l2_refs[off] = (refs + 1, kinds | kind)
    for off, (n, kinds) in l2_refs.items():
        add_meta(off, cs, kinds, "L2 table", n)
    await _count_bitmaps(drv, f, add_meta, counter, read)
    if h.crypto_header is not None:
        add_meta(*h.crypto_header, CRYPTO, "encryption header")
    # Data and compressed clusters: each L2 table read once, counted once per reference to it.
    active_tables: dict[int, tuple[array, int]] = {}  # offset -> (table, first cluster of its run)
    counter.meta_sorted = sorted(meta.kinds)
    for off, (n, kinds) in l2_refs.items():
        if off + cs > file.size:
            continue  # already reported beyond the end of the file
        t = decode_be64(await read(cs, off))
        run = _count_run(drv, f, t, n, counter)
        if not run:
            _count_l2(drv, f, t, n, counter)
        if kinds & L2:
            active_tables[off] = (t, run)
    if f.fatal:
        return
    await _compare_refcounts(drv, f, read)
    _check_copied(drv, f, counter, active_tables)


def _run_start(drv: Qcow2Driver, t: array) -> int:
    """The first host cluster of L2 table ``t`` if its entries all map one host-contiguous run
    of plain clusters with the same flags (what sequential allocation and preallocation make),
    else 0.  No per-entry Python work: entry i must be ``e0 + i * cs``, and read as one big
    little-endian integer the table must then equal ``e0 * ONES + cs * STEPS`` where ONES and
    STEPS are the integers whose 64-bit words are 1, 1, 1, ... and 0, 1, 2, ... (no word carries
    into the next, so the identity holds exactly when every entry does)."""
    entries = t[::2] if drv.ext else t
    e0 = entries[0]
    host = e0 & OFFSET_MASK
    flags = COMPRESSED | (L2_RESERVED_EXT if drv.ext else L2_RESERVED | ZERO_FLAG) | drv.cmask & OFFSET_MASK
    if not host or e0 & flags:
        return 0
    k = len(entries)
    ones, steps = _word_patterns(k)
    if host + k * drv.cs > MAX_HOST_OFFSET or int.from_bytes(entries.tobytes(), sys.byteorder) != e0 * ones + (
        steps << drv.cb
    ):
        return 0
    return host >> drv.cb


@lru_cache(maxsize=4)
def _word_patterns(k: int) -> tuple[int, int]:
    """(ONES, STEPS) of ``_run_start`` for ``k`` words, in the host's byte order."""
    ones = array("Q", [1]) * k
    steps = array("Q", range(k))
    return int.from_bytes(ones.tobytes(), sys.byteorder), int.from_bytes(steps.tobytes(), sys.byteorder)


def _count_run(drv: Qcow2Driver, f: Findings, t: array, n: int, counter: _Counter) -> int:
    """The fast path of ``_count_l2`` (see ``_run_start``), by slices.  Returns the run's first
    cluster, or 0: not taken."""
    lo = _run_start(drv, t)
    hi = lo + len(t) // (2 if drv.ext else 1)
    i = bisect_left(counter.meta_sorted, lo)
    if not lo or hi > counter.nfile or (i < len(counter.meta_sorted) and counter.meta_sorted[i] < hi):
        return 0  # (the slow path reports what is wrong)
    counter.add_range(lo, hi, n)
    return lo


def _count_l2(drv: Qcow2Driver, f: Findings, t: array, n: int, counter: _Counter) -> None:
    """Count the clusters one L2 table references (``n`` references to the table)."""
    cb, cmask, kinds = drv.cb, drv.cmask, f.meta.kinds
    entries = t[::2] if drv.ext else t
    bad = L2_RESERVED_EXT if drv.ext else L2_RESERVED | (ZERO_FLAG if drv.version < 3 else 0)
    special = [e for e in entries if e & (COMPRESSED | bad | cmask & OFFSET_MASK)]
    for e in special:
        if not e & COMPRESSED:
            f.fail(f"L2 entry 0x{e:016x} is malformed")
            return
        for c in compressed_host_clusters(e, cb):
            if c in kinds:
                f.fail(f"compressed cluster at 0x{c << cb:x} overlaps metadata")
            counter.add(c, n, "compressed cluster")
    # Plain entries, in bulk: the common case is thousands of distinct clusters per table.
    clusters = [(e & OFFSET_MASK) >> cb for e in entries if e & OFFSET_MASK and not e & COMPRESSED]
    if not clusters:
        return
    on_meta = kinds.keys() & set(clusters)
    if on_meta:
        f.fail(f"data cluster at 0x{min(on_meta) << cb:x} overlaps metadata")
    if max(clusters) >= counter.nfile:
        counter.add(max(clusters), n, "data cluster")  # reports it
        clusters = [c for c in clusters if c < counter.nfile]
    shift, mask, counts = counter.shift, counter.mask, f.counts
    for c in clusters:
        a = counts.get(c >> shift)
        if a is None:
            counter.add(c, n, "data cluster")
        else:
            a[c & mask] += n


async def _count_bitmaps(drv: Qcow2Driver, f: Findings, add_meta, counter: _Counter, read: _Reader) -> None:
    """Persistent bitmaps count only while the autoclear bit says they are valid (as QEMU does),
    in use or not.  Every bitmap cluster (directory, tables, data) must be used once: the driver
    rewrites them in place."""
    bitmaps = drv.bitmaps
    if not bitmaps.valid:
        return
    cs = drv.cs
    seen: set[int] = set()

    def claim(offset: int, length: int, what: str) -> None:
        clusters = f.meta.clusters(offset, length)
        if seen.intersection(clusters):
            f.fail(f"{what} at 0x{offset:x} shares a cluster with another bitmap structure")
        seen.update(clusters)
        add_meta(offset, length, BITMAPS, what)

    claim(*bitmaps.directory, "bitmap directory")
    for e in bitmaps.entries:
        what = f"bitmap {e.name!r}"
        claim(e.table_offset, 8 * e.table_size, f"{what} table")
        try:
            table = decode_table(await read(8 * e.table_size, e.table_offset), cs, what)
        except BitmapError as err:
            f.fail(str(err))
            continue
        for t in table:
            if t & TABLE_OFFSET:
                claim(t & TABLE_OFFSET, cs, f"{what} data cluster")
        if len(f.fatal) >= _SAMPLES:
            return


async def _compare_refcounts(drv: Qcow2Driver, f: Findings, read: _Reader) -> None:
    refs, cs = drv.refs, drv.cs
    limit = refs.max
    for bi in sorted(set(f.counts) | {i for i, e in enumerate(refs.table) if e}):
        want = f.counts.get(bi)
        base = bi << refs.block_shift
        off = refs.table[bi] if bi < len(refs.table) else 0
        if not off:
            f.error(f"clusters from 0x{base * cs:x} are in use but no refcount block covers them")
            continue
        blk = RefBlock.decode(refs.bits, await read(cs, off))
        if want is None:
            want = array("I")
        n = len(want)
        if refs.bits >= 8:
            if blk.data[:n] == want and not any(blk.data[n:]):
                continue
            stored = blk.data
        else:
            stored = [blk.get(i) for i in range(refs.block_entries)]
        for i in range(refs.block_entries):
            s, w = stored[i], want[i] if i < n else 0
            if s == w:
                continue
            c = base + i
            if w > limit:
                f.fail(f"cluster 0x{c * cs:x} has {w} references, more than refcount_bits allow")
            elif s < w:
                f.error(f"cluster 0x{c * cs:x} has refcount {s} but {w} reference(s)")
            else:
                f.leaks[c] = w


def _check_copied(drv: Qcow2Driver, f: Findings, counter: _Counter, tables: dict[int, tuple[array, int]]) -> None:
    """COPIED in the active L1 and L2 tables must say exactly "refcount is 1"."""
    cb, shift, mask, counts = drv.cb, counter.shift, counter.mask, f.counts
    for i, e in enumerate(drv.l1):
        off = e & OFFSET_MASK
        if off and bool(e & COPIED) != (counter.get(off >> cb) == 1):
            f.l1_fixes[i] = e ^ COPIED
            _flag(f, e, off, "L2 table")
    step = 2 if drv.ext else 1
    for off, (t, lo) in tables.items():
        if lo:
            # One run, all flags alike: COPIED everywhere needs every count 1, nowhere none.
            ones = counter.how_many(lo, lo + len(t) // step, 1)
            if ones == (len(t) // step if t[0] & COPIED else 0):
                continue
        fixes: dict[int, int] = {}
        for i in range(0, len(t), step):
            e = t[i]
            host = e & OFFSET_MASK
            if not host:
                continue
            if e & COMPRESSED:
                if e & COPIED:
                    fixes[i] = e & ~COPIED
                    f.error(f"compressed L2 entry 0x{e:016x} has COPIED set")
                continue
            c = host >> cb  # (inside the file: the scan stopped before this otherwise)
            if bool(e & COPIED) != (counts[c >> shift][c & mask] == 1):
                fixes[i] = e ^ COPIED
                _flag(f, e, host, "data cluster")
        if fixes:
            f.l2_fixes[off] = fixes


def _flag(f: Findings, e: int, host: int, what: str) -> None:
    if e & COPIED:
        f.error(f"{what} at 0x{host:x} is shared but has COPIED set")
    else:
        f.missing_copied += 1


# -- repairs ------------------------------------------------------------------------------------


async def fix_harmless(drv: Qcow2Driver, f: Findings) -> None:
    """Lower leaked refcounts to their references and correct COPIED flags, in place."""
    refs, file, cs = drv.refs, drv.storage, drv.cs
    by_block: dict[int, list[int]] = {}
    for c in f.leaks:
        by_block.setdefault(c >> refs.block_shift, []).append(c)
    for bi, clusters in by_block.items():
        off = refs.table[bi]
        blk = RefBlock.decode(refs.bits, await read_at(file, off, cs))
        for c in clusters:
            blk.set(c & (refs.block_entries - 1), f.leaks[c])
        await settled(file.write(off, blk.encode()))
    await _fix_flags(drv, f)
    await file.flush()


async def _fix_flags(drv: Qcow2Driver, f: Findings) -> None:
    file, cs = drv.storage, drv.cs
    for off, fixes in f.l2_fixes.items():
        t = decode_be64(await read_at(file, off, cs))
        for i, e in fixes.items():
            t[i] = e
        await settled(file.write(off, encode_be64(t)))
    for i, e in f.l1_fixes.items():
        drv.l1[i] = e
        await settled(file.write(drv.l1_offset + 8 * i, struct.pack(">Q", e)))


async def rebuild(drv: Qcow2Driver, f: Findings) -> tuple[int, int]:
    """New refcount blocks and table past the end of the file holding the counts, the header
    switched to them, COPIED flags corrected.  Returns (table offset, table clusters).  The old
    refcount structures are no longer counted: they become free."""
    refs, file, cb, cs = drv.refs, drv.storage, drv.cb, drv.cs
    be, shift = refs.block_entries, refs.block_shift
    start = -(-file.size // cs)
    nblocks = 1
    while True:
        table_clusters = -(-nblocks * 8 // cs)
        need = -(-(start + nblocks + table_clusters) // be)
        if need <= nblocks:
            break
        nblocks = need
    if table_clusters * cs > MAX_REFTABLE_BYTES:
        raise CorruptImage(drv.path, "image too large to rebuild its refcount table")
    # The old table and blocks are counted in ``f.counts``: they are not referenced any more.
    old = list(range(refs.table_offset >> cb, (refs.table_offset >> cb) + refs.table_clusters))
    old += [e >> cb for e in refs.table if e]
    for c in old:
        a = f.counts.get(c >> shift)
        if a is not None and (c & (be - 1)) < len(a) and a[c & (be - 1)]:
            a[c & (be - 1)] -= 1
    table = array("Q", bytes(table_clusters * cs))
    new_clusters = range(start, start + nblocks + table_clusters)
    for j in range(nblocks):
        blk = RefBlock.empty(refs.bits, cs)
        want = f.counts.get(j)
        if want is not None:
            for i, n in enumerate(want):
                if n:
                    blk.set(i, n)
        for c in new_clusters:
            if c >> shift == j:
                blk.set(c & (be - 1), 1)
        offset = (start + j) << cb
        table[j] = offset
        await settled(file.write(offset, blk.encode()))
    table_offset = (start + nblocks) << cb
    await settled(file.write(table_offset, encode_be64(table)))
    await file.flush()
    await settled(file.write(FIELD_REFCOUNT_TABLE, struct.pack(">QI", table_offset, table_clusters)))
    await file.flush()
    await _fix_flags(drv, f)
    await file.flush()
    return table_offset, table_clusters

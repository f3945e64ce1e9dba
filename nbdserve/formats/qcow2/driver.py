"""The qcow2 driver (versions 2 and 3): one open qcow2 file as a ``FormatDriver``.

Owns the driver's state and its life cycle: the header, the active L1 table (in memory, written
back entry by entry), the L2 tables (through the shared cluster cache), the refcounts
(``Refcounts``), the metadata overlap map, the in-flight allocation set, and the memo of the
last decompressed cluster.  The work is done by one mixin per idea, each in its own module:

  * ``opening.OpeningMixin``: what a read-write open does before the first write (consistency
    check, repair or read-only), internal snapshots;
  * ``lookup.LookupMixin``: L2 entries -> runs of one kind (unallocated, zero, data, compressed);
  * ``reads.ReadMixin``: reads, decompression, block status;
  * ``writes.WriteMixin``: write entry points, in-place writes, the overlap guard, the
    plan -> data -> link sequence of an allocating write;
  * ``allocation.AllocationMixin``: planning, new clusters, new and copied L2 tables, COPIED
    flags, copy-on-write data;
  * ``zeroing.ZeroMixin``: WRITE_ZEROES and TRIM;
  * ``crypt.CryptMixin``: the key of an encrypted image and the transform of data clusters.

Persistent dirty bitmaps live in ``self.bitmaps`` (``bitmaps.BitmapSet``): read at open, the
enabled ones kept up to date through ``self._track`` (called by every write, write-zeroes and
trim before its data reaches the file), stored at a clean close.

Locking (every mixin follows it):
  * ``self.lock`` (CoMutex) guards L1/L2/refcount/header state, the overlap map and allocation.
    Every method named ``_locked_*`` or documented "called with self.lock held" assumes it.
  * Reads and in-place writes to allocated clusters (COPIED, not compressed) run without it:
    they look the entry up with ``cache.peek`` and do the host I/O with no await in between, so
    the mapping they use cannot change under them.  After any await the lookup starts over.
  * Allocating writes are serialised per guest cluster.  With a backing file (copy-on-write
    reads may wait) the planner (locked) registers each cluster it will change in
    ``self._inflight``; the data I/O (copy-on-write reads, writes) runs unlocked; the linker
    (locked) updates the L2 entries, unregisters and wakes ``self._inflight_q``.  A writer, zero
    or trim touching an in-flight cluster waits there and looks the cluster up again.
  * A payload landing by splice (``landing``, docs/landing.md) registers its allocated COPIED
    clusters in ``self._inflight`` too, while the lock is free, until the session releases it:
    nothing frees or reallocates them while the payload still arrives.  Without a
    backing file nothing in the data phase can wait, so plan, data and link run in one critical
    section.

Crash safety and the rules the code relies on are written in docs/qcow2.md.
"""

from __future__ import annotations

from array import array

from ...cache import ClusterCache
from ...locks import CoMutex, CoQueue
from ...storage.base import Storage, read_at
from ..base import BackingRef, Caps, FormatDriver, Limits, OpenOptions
from .allocation import AllocationMixin
from .bitmaps import BitmapSet, DirtyBitmap
from .crypt import CryptMixin
from .header import MAGIC, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, Header, parse_header
from .lookup import LookupMixin
from .opening import OpeningMixin
from .overlap import MetadataMap
from .reads import ReadMixin
from .snapshot import Snapshot, read_snapshots
from .tables import decode_be64, encode_be64, load_l1
from .writes import WriteMixin
from .zeroing import ZeroMixin


class Qcow2Driver(
    OpeningMixin, ReadMixin, WriteMixin, AllocationMixin, ZeroMixin, LookupMixin, CryptMixin, FormatDriver
):
    format_name = "qcow2"

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        return 100 if head[:4] == MAGIC else 0

    def __init__(self, storage: Storage, cache: ClusterCache, h: Header, readonly: bool) -> None:
        """The state from the header; ``_load`` reads the tables it names."""
        self.storage = storage
        self.path = storage.name
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
        self.lock = CoMutex(f"qcow2 {storage.name}")
        self._inflight: set[int] = set()
        self._inflight_q = CoQueue()
        self._zc_key = -1
        self._zc_data = b""
        self._data_region = (0, 0)  # host bytes known to be data (see _host_state)
        self.l2kind = cache.kind(storage, name="L2 table", size=self.cs, decode=decode_be64, encode=encode_be64)
        self.meta = MetadataMap(self.cb)  # filled by the consistency check of a read-write open
        self.corrupt = False  # a write was refused: no more writes
        self._refusal: str | None = "image is read-only" if readonly else None  # why writes fail
        self.l1_offset = h.l1_table_offset
        self.l1 = array("Q")
        self.snapshots: list[Snapshot] = []
        self.snapshot_table_bytes = 0
        if h.backing_file:
            self.backing = BackingRef(h.backing_file, h.backing_format)
        self.limits = Limits(align=1)
        self.caps = Caps(native_zero=not readonly, native_trim=not readonly, fast_zero=not readonly)
        self.bitmaps = BitmapSet(self.path, storage, h, h.size & ~511)
        self._track = None  # BitmapSet.mark once the enabled bitmaps are tracked (read-write)

    @classmethod
    async def open(cls, storage: Storage, *, readonly: bool, cache: ClusterCache, options: OpenOptions) -> Qcow2Driver:
        path, size = storage.name, storage.size
        # The header, its extensions and the backing file name all lie in the first cluster.
        head = await read_at(storage, 0, min(112, size))
        bits = int.from_bytes(head[20:24], "big") if len(head) >= 24 else 0
        first = bytes(await read_at(storage, 0, min(size, 1 << min(max(bits, MIN_CLUSTER_BITS), MAX_CLUSTER_BITS))))

        def read(off: int, n: int) -> bytes:
            return first[off : off + n]

        h = parse_header(path, first[:112], read, size)
        readonly = readonly or storage.readonly or options.snapshot is not None
        drv = cls(storage, cache, h, readonly)
        await drv._load()
        drv._report_bitmaps()
        if options.snapshot is not None:
            await drv._use_snapshot(options.snapshot)
        if h.crypt_method:
            await drv._open_crypto(options.passphrase)
        for doubt in h.doubts + drv.refs.problems:
            drv._read_only_because(doubt)
        if not drv.readonly:
            await drv._prepare_writes(options.repair)
        return drv

    async def _load(self) -> None:
        """Read the tables the header names: L1, refcount table, snapshots, bitmap directory."""
        h = self.header
        if h.l1_size:
            self.l1 = load_l1(self.path, await read_at(self.storage, h.l1_table_offset, h.l1_size * 8), self.cs)
        self.refs = await self._refcounts()
        if h.nb_snapshots:
            self.snapshots, self.snapshot_table_bytes = await read_snapshots(self.path, h, self.storage)
        await self.bitmaps.read_directory()

    async def cache_hint(self, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: load the L2 tables of the range into the cache."""
        for l1i in range(offset >> self.l1_shift, ((offset + length - 1) >> self.l1_shift) + 1):
            await self._table(l1i)

    async def flush(self) -> None:
        async with self.lock:
            await self.cache.flush(self.storage)

    async def dirty_bitmap(self, name: str) -> DirtyBitmap | None:
        return await self.bitmaps.bitmap(name)

    async def close(self) -> None:
        if not self.readonly:
            await self.flush()
            if not self.corrupt:  # after a refused write nothing more is written: bitmaps stay in use
                async with self.lock:
                    await self.bitmaps.store(self)

"""The VMDK driver: the extent set, the descriptor's CID, the parent, and the driver contract.

Owns one open VMDK image: either a sparse extent file with its descriptor embedded
(monolithicSparse, streamOptimized) or a descriptor file naming its extent files (monolithicFlat,
twoGbMaxExtentSparse/Flat, vmfs, vmfsSparse, seSparse).  The extents are laid end to end in
descriptor order; requests are split at extent boundaries (``_find``: bisect over the starts).
Extent files are opened through ``options.resolve``, so they obey the same directory policy as
backing files (relative to the descriptor, never outside the allowed directories).

Parent: ``parentFileNameHint`` is reported as ``backing`` (format "vmdk"); the image layer
opens it.  When the parent can be read here, its descriptor's CID must equal our parentCID
(VMware's guard against a parent changed under its children; QEMU fails such reads).

CID: the first write (or zero or trim) after open replaces the CID with a new random value of
the same width, in place, and syncs it before the data changes (as QEMU and VMware do), so
children made from the old content notice.

Read-only: seSparse, ZERO and RDONLY extents, version-3 (changed block tracking) sparse extents
and VMware-layout streamOptimized extents cannot be written; a read-write open of such an image
serves it read-only with a warning (as the qcow2 driver does with images it must not write).

Reads and writes: ``read``/``write`` pass a request that lies in one extent to that extent's own
one-route ``read``/``write`` (the fast case: no coroutine); a request across extents is split,
each piece started in turn.  A write before this session's CID is written (the first change)
is the slow case.

Mapping memo: ``map_bits`` is the smallest grain of the sparse extents (1 MiB if all are flat);
``map_storage`` is the first extent's storage, and only extents in it answer ``map_now``
(twoGbMaxExtent images beyond their first 2 GiB take the ordinary read path).

Locking: ``self.lock`` (one CoMutex) guards every extent's metadata and the CID update.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import secrets

from ...cache import ClusterCache
from ...errors import CorruptImage, ImageError, NbdError, UnsupportedImage
from ...locks import CoMutex
from ...storage.base import Pending, Storage, joined, read_at, settled
from ...storage.local import LocalFile, open_locked
from ..base import BackingRef, Caps, Extent, FormatDriver, Limits, OpenOptions
from .descriptor import (
    DESCRIPTOR_FILE_TYPES,
    MAX_DESCRIPTOR,
    NO_PARENT,
    Descriptor,
    ExtentLine,
    looks_like_descriptor,
    parse_descriptor,
)
from .extent import Extent as VmdkExtent
from .flat import FlatExtent
from .header import COWD_MAGIC, MAGIC, SECTOR, read_sparse_header
from .sesparse import SeSparseExtent
from .sparse import SparseExtent

log = logging.getLogger(__name__)

MAX_SIZE = 1 << 56
FLAT_MAP_BITS = 20


class VmdkDriver(FormatDriver):
    format_name = "vmdk"

    def __init__(self, storage: Storage, readonly: bool, cache: ClusterCache) -> None:
        self.storage = storage
        self.path = storage.name
        self.readonly = readonly
        self.cache = cache
        self.lock = CoMutex(f"vmdk {storage.name}")
        self.extents: list[VmdkExtent] = []
        self.starts: list[int] = []
        self.size = 0
        self.limits = Limits(align=1)
        self.desc: Descriptor | None = None
        self.desc_at = 0  # where the descriptor starts in ``storage``
        self._cid_done = False
        self._dirty: set[Storage] = set()
        self._files: list[LocalFile] = []  # extent files we opened (not ``storage``)
        self._claims: dict[tuple[int, int], list[tuple[str, int | None, int]]] = {}  # file -> extents in it

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        if head[:4] in (MAGIC, COWD_MAGIC):
            return 100
        return 100 if looks_like_descriptor(head) else 0

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    async def open(cls, storage: Storage, *, readonly: bool, cache: ClusterCache, options: OpenOptions) -> VmdkDriver:
        drv = cls(storage, readonly or storage.readonly, cache)
        try:
            await drv._open(options)
        except BaseException:
            drv._close_files()
            raise
        return drv

    async def _open(self, options: OpenOptions) -> None:
        storage, path = self.storage, self.path
        head = await read_at(storage, 0, min(SECTOR, storage.size))
        if head[:4] in (MAGIC, COWD_MAGIC):
            h = await read_sparse_header(storage, "sparse extent")
            if not h.descriptor_size:
                raise CorruptImage(path, "sparse extent has no embedded descriptor (descriptorSize 0)")
            self.desc_at = h.descriptor_offset * SECTOR
            self.desc = parse_descriptor(path, await read_at(storage, self.desc_at, h.descriptor_size * SECTOR))
            await self._add(SparseExtent(self, 0, storage, h, self.cache, "sparse extent"))
        else:
            if storage.size > MAX_DESCRIPTOR:
                raise CorruptImage(path, f"descriptor file of {storage.size} bytes exceeds {MAX_DESCRIPTOR} bytes")
            self.desc = parse_descriptor(path, await read_at(storage, 0, storage.size))
            if self.desc.create_type not in DESCRIPTOR_FILE_TYPES:
                raise UnsupportedImage(path, f"descriptor createType {self.desc.create_type!r} is not supported")
            if not self.desc.extents:
                raise CorruptImage(path, "descriptor names no extent")
            for line in self.desc.extents:
                await self._open_extent(line, options)
        if self.size > MAX_SIZE:
            raise CorruptImage(path, f"virtual size {self.size} exceeds 2^56 bytes")
        self._setup()
        if self.desc.parent_hint is not None:
            await self._check_parent(self.desc.parent_hint, options)
            self.backing = BackingRef(self.desc.parent_hint, "vmdk")

    async def _open_extent(self, line: ExtentLine, options: OpenOptions) -> None:
        """Open the extent of descriptor ``line``; errors name the descriptor, then the extent."""
        what = f"extent {line.name!r} (descriptor line {line.line})"
        if line.type == "ZERO":
            await self._add(VmdkExtent(self, self.size, line.sectors * SECTOR))
            return
        if options.resolve is None:
            raise UnsupportedImage(self.path, f"{what}: extent files can only be opened through the image layer")
        where = options.resolve(self.path, line.name, what="extent file")
        if os.path.samefile(where, self.path):  # before opening: our own lock would answer first
            raise CorruptImage(self.path, f"{what}: the extent file is the descriptor itself")
        readonly = self.readonly or line.access != "RW"
        ext_file = self._opened(where, readonly)
        if ext_file is None:
            try:  # locked like the descriptor (docs/image-locks.md): an extent is the disk's data
                ext_file = open_locked(where, readonly=readonly, force_share=options.force_share)
            except ImageError as e:
                raise ImageError(self.path, f"{what}: {e}") from None
            self._files.append(ext_file)
        size = line.sectors * SECTOR
        self._claim(ext_file, what, line.offset * SECTOR if line.type in ("FLAT", "VMFS") else None, size)
        try:
            if line.type in ("FLAT", "VMFS"):
                at = line.offset * SECTOR
                if at + size > ext_file.size:
                    raise CorruptImage(where, f"{what}: {ext_file.size} bytes, short of offset {at} + size {size}")
                ext: VmdkExtent = FlatExtent(self, self.size, size, ext_file, at)
            elif line.type == "SESPARSE":
                ext = SeSparseExtent(self, self.size, ext_file, self.cache, what)
                await ext.load()
            else:
                h = await read_sparse_header(ext_file, what)
                ext = SparseExtent(self, self.size, ext_file, h, self.cache, what)
            if ext.size != size:
                raise CorruptImage(
                    where, f"{what}: the descriptor says {line.sectors} sectors, the extent holds {ext.size // SECTOR}"
                )
            if line.access != "RW":
                ext.readonly, ext.why_readonly = True, f"{what} is RDONLY"
            await self._add(ext)
        except ImageError as e:
            raise type(e)(self.path, e.reason) from None

    def _opened(self, where: str, readonly: bool) -> LocalFile | None:
        """The file of an earlier extent if it is ``where`` and open as needed: extents sharing
        a file share its one open (a second open would conflict with the first's lock)."""
        st = os.stat(where)
        for f in self._files:
            fst = os.fstat(f.fd)
            if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino) and (readonly or not f.readonly):
                return f
        return None

    def _claim(self, file: LocalFile, what: str, at: int | None, size: int) -> None:
        """Refuse a file that two extents would share, unless both are flat and their byte
        ranges are disjoint (``at`` None: a sparse extent, which owns its whole file)."""
        st = os.fstat(file.fd)
        ranges = self._claims.setdefault((st.st_dev, st.st_ino), [])
        for other, a, n in ranges:
            if at is None or a is None or (at < a + n and a < at + size):
                raise CorruptImage(self.path, f"{what}: shares its file with {other}")
        ranges.append((what, at, size))

    async def _add(self, ext: VmdkExtent) -> None:
        if isinstance(ext, SparseExtent):
            await ext.load()
        self.extents.append(ext)
        self.starts.append(ext.start)
        self.size += ext.size

    def _setup(self) -> None:
        """Read-only decision, capabilities and the mapping memo, once the extents are known."""
        stuck = [e for e in self.extents if e.readonly]
        if stuck and not self.readonly:
            log.warning("%s: %s; serving the image read-only", self.path, stuck[0].why_readonly)
            self.readonly = True
        writable = not self.readonly
        self.caps = Caps(native_zero=writable, native_trim=writable)
        grains = [e.grain_bits for e in self.extents if e.grain_bits]
        self.map_bits = min(grains) if grains else FLAT_MAP_BITS
        self.map_storage = self.extents[0].storage
        if self.map_storage is None:
            self.map_bits = 0

    async def _check_parent(self, hint: str, options: OpenOptions) -> None:
        """Refuse a parent whose CID is not our parentCID (if the parent can be read here)."""
        assert self.desc is not None
        if options.resolve is None or self.desc.parent_cid == NO_PARENT:
            return
        try:
            where = options.resolve(self.path, hint)
            cid = await read_cid(where)
        except (ImageError, OSError):
            return  # the image layer reports a missing or forbidden parent
        if cid is not None and cid != self.desc.parent_cid:
            raise CorruptImage(
                self.path, f"parentCID {self.desc.parent_cid:08x} does not match the CID {cid:08x} of parent {hint!r}"
            )

    # -- extents ----------------------------------------------------------------------------

    def _find(self, offset: int) -> VmdkExtent:
        if len(self.extents) == 1:
            return self.extents[0]
        return self.extents[bisect.bisect_right(self.starts, offset) - 1]

    def map_now(self, offset: int) -> int | None:
        ext = self._find(offset)
        if ext.storage is not self.map_storage:
            return None
        g = offset >> self.map_bits << self.map_bits
        rel = g - ext.start
        if rel < 0 or rel + (1 << self.map_bits) > ext.size:
            return None
        return ext.map_now(rel)

    def read(self, offset: int, buf: memoryview) -> Pending:
        ext = self._find(offset)
        n = len(buf)
        if offset + n <= ext.start + ext.size:
            return ext.read(offset - ext.start, buf)
        pendings = []
        pos = 0
        while pos < n:
            ext = self._find(offset + pos)
            k = min(n - pos, ext.start + ext.size - offset - pos)
            p = ext.read(offset + pos - ext.start, buf[pos : pos + k])
            if p is not None:
                pendings.append(p)
            pos += k
        return joined(pendings)

    def write(self, offset: int, data: memoryview, *, fua: bool) -> Pending:
        if not self._cid_done or fua:
            return self._write_slow(offset, data, fua)
        ext = self._find(offset)
        if offset + len(data) <= ext.start + ext.size and ext.storage is not None:
            self._dirty.add(ext.storage)
            return ext.write(offset - ext.start, data)
        return joined(self._each_write(offset, data))

    def _each_write(self, offset: int, data: memoryview) -> list:
        """Start the write of each extent's part of ``data``; their Pendings."""
        pendings = []
        pos, end = offset, offset + len(data)
        while pos < end:
            ext = self._find(pos)
            k = min(end, ext.start + ext.size) - pos
            if ext.storage is not None:
                self._dirty.add(ext.storage)
            p = ext.write(pos - ext.start, data[pos - offset : pos - offset + k])
            if p is not None:
                pendings.append(p)
            pos += k
        return pendings

    async def _write_slow(self, offset: int, data: memoryview, fua: bool) -> None:
        """``write`` before the session's new CID is written, or with FUA."""
        if not self._cid_done:
            await self._new_cid()
        await settled(joined(self._each_write(offset, data)))
        if fua:
            await self.flush()

    async def _each(self, offset: int, length: int, op) -> None:
        """Run ``await op(extent, rel, k)`` over the extents of ``[offset, offset+length)``."""
        pos, end = offset, offset + length
        while pos < end:
            ext = self._find(pos)
            k = min(end, ext.start + ext.size) - pos
            if ext.storage is not None:
                self._dirty.add(ext.storage)
            await op(ext, pos - ext.start, k)
            pos += k

    async def pwrite_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        if fast:
            raise NbdError(errno.ENOTSUP, "VMDK zeroing is not metadata-only")
        if not self._cid_done:
            await self._new_cid()
        await self._each(offset, length, lambda e, rel, k: e.zero(rel, k, may_trim))
        if fua:
            await self.flush()

    async def pdiscard(self, offset: int, length: int) -> None:
        if not self._cid_done:
            await self._new_cid()
        await self._each(offset, length, lambda e, rel, k: e.trim(rel, k))

    async def _new_cid(self) -> None:
        """Give the image a new CID before its first change (same width, written in place, synced)."""
        async with self.lock:
            if self._cid_done:
                return
            desc = self.desc
            if desc is not None and desc.cid_span is not None:
                a, b = desc.cid_span
                cid = desc.cid
                while cid == desc.cid:
                    cid = secrets.randbits(4 * (b - a))
                await settled(self.storage.write(self.desc_at + a, f"{cid:0{b - a}x}".encode()))
                await self.storage.flush()
                desc.cid = cid
            self._cid_done = True

    async def flush(self) -> None:
        """Sync every file written since the last flush (extent metadata written back first)."""
        dirty, self._dirty = self._dirty, set()
        try:
            for ext in self.extents:
                if ext.storage in dirty:
                    await ext.flush()
                    dirty.discard(ext.storage)
            while dirty:
                f = next(iter(dirty))
                await f.flush()
                dirty.discard(f)
        finally:
            self._dirty |= dirty  # a failed flush leaves the rest for the next one

    async def block_status(self, offset: int, length: int) -> Extent:
        ext = self._find(offset)
        rel = offset - ext.start
        state, stop = await ext.status(rel, min(offset + length, ext.start + ext.size) - ext.start)
        return Extent(stop - rel, state)

    async def cache_hint(self, offset: int, length: int) -> None:
        ext = self._find(offset)
        rel = offset - ext.start
        await ext.cache_hint(rel, min(length, ext.size - rel))

    async def close(self) -> None:
        try:
            if not self.readonly:
                await self.flush()
        finally:
            self._close_files()

    def _close_files(self) -> None:
        for f in self._files:
            self.cache.discard_storage(f)
            f.close_now()
        self._files.clear()


async def read_cid(path: str) -> int | None:
    """The CID in the descriptor of the VMDK at ``path`` (None if it is no VMDK or has none)."""
    f = LocalFile(path, readonly=True)
    try:
        head = await read_at(f, 0, min(SECTOR, f.size))
        if head[:4] == MAGIC:
            h = await read_sparse_header(f, "parent")
            raw = await read_at(f, h.descriptor_offset * SECTOR, h.descriptor_size * SECTOR)
        elif looks_like_descriptor(bytes(head)) and f.size <= MAX_DESCRIPTOR:
            raw = await read_at(f, 0, f.size)
        else:
            return None
        return parse_descriptor(path, raw).cid
    finally:
        f.close_now()

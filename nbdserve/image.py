"""The image layer: one open image (a chain of format drivers) as the server sees it.

Owns, between the protocol and the drivers:
  * the one way in for reads and writes: ``read(offset, buf) -> Pending`` and
    ``write(offset, data, *, fua) -> Pending`` (``storage.base.Pending``: None when the request
    completed synchronously, else an awaitable to wait for);
  * alignment: read-modify-write for requests smaller than the driver's ``limits.align``
    (serialised against writes that overlap its covering sectors by the image's range lock,
    ``locks.CoRangeLock``: aligned writes hold their range shared, a read-modify-write holds its
    covering sectors exclusively, so it waits only for writes to those sectors);
  * splitting to ``limits.max_transfer``;
  * the mapping memo, inside ``read``: granule -> host offset for granules of plain data
    (``FormatDriver.map_now``), dropped whenever the driver says a mapping changed (see
    ``formats.base``), so a hot read costs one dict lookup and one storage read.  All images'
    memos together hold at most the cache's ``memo_limit`` entries (a small share of
    ``--cache-size``); at the limit they start over;
  * emulation of what a driver lacks: WRITE_ZEROES -> writes of zero bytes (ENOTSUP when FAST_ZERO
    asks for speed), TRIM -> nothing (it is a hint), FUA -> flush;
  * backing chains: opening them (relative names, allowed directories, loop and depth limits,
    recorded formats honoured, never raw-by-guess), feeding each driver's ``read_backing``, and
    walking the chain for block status (aligned to each layer's ``limits.align``), which yields
    ``base:allocation`` flags and the ``qemu:allocation-depth`` value (0 unallocated, 1 this
    image, 2 its backing, ...);
  * persistent dirty bitmaps for ``-B``: the first layer of the chain that has one of the name
    (as qemu-nbd looks them up);
  * overlays, one path for both kinds (``_open_overlay``): ``-s``, a temporary qcow2 over the
    image (opened read-only), removed at close, so the image itself is never written; and
    ``--overlay PATH``, the same qcow2 kept at PATH, which records the image's location as its
    backing (``storage.location.backing_name``) and is reused by the next open that names the
    same location (anything else is refused);
  * opening the image's storage through ``storage.open_storage`` (a local file, an RBD image, an
    S3 object; the drivers run on any of them, probing included): read-write exactly when asked
    (a file this process may not write is an error, not a silent read-only export); local files
    are locked the way QEMU locks images (``lock_perms``; docs/image-locks.md) on the image and
    every backing file; everything is probed safely (``formats.probe``; a probed-raw image
    guards its first sector, see ``formats.raw``).  Images in RBD or S3 may not name backing
    files (an overlay over them is the way to layer).

The call chains (session -> image -> driver -> storage):
  * READ of plain data: ``Session._read`` -> ``Image.read`` (memo hit, or ``driver.map_now``
    fills it) -> ``storage.read`` (``LocalFile.read``: one ``preadv``).  Otherwise
    ``Image.read`` -> ``driver.read`` (fast case: cached tables -> ``storage.read``; slow case: a
    coroutine that loads tables through the cluster cache, reads the backing image through
    ``read_backing`` -> the backing ``Image.read``, decompresses...).
  * WRITE: ``Session._write`` -> ``Image.write`` (alignment, the range lock of sector formats) ->
    ``driver.write`` (fast case: allocated, cached, no FUA -> ``storage.write``, one ``pwritev``
    of the payload buffer, or of a run of payloads on a vectored image; slow case: a coroutine
    that allocates under the driver lock).  A large payload may land instead (docs/landing.md):
    ``Session._land`` -> ``Image.landing`` (whole sectors, their range held shared) ->
    ``driver.landing`` (raw, qcow2, QED, VHDX: where the range lies in the file, held there until
    ``Landing.release``) -> splice into ``storage.splice_fd``.
  * BLOCK_STATUS: ``Session._block_status`` -> ``Image.runs`` -> ``driver.block_status`` (asked
    about whole sectors, answering in whole sectors) -> the cluster cache and ``storage.extent``.

The caller (the server) guarantees ``0 <= offset``, ``offset + length <= size`` and
``length > 0``; it also refuses writes to a read-only image.  Everything below is then trusted.

Lock order: image range lock (only when align > 1) -> driver CoMutex -> cache.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from .cache import ClusterCache
from .errors import ImageError, NbdError, UnsupportedImage
from .formats import PROBE_SIZE, driver_for, identify, probe
from .formats.base import ALLOCATED, DATA, ZERO, DirtyBitmapView, FormatDriver, Landing, OpenOptions
from .formats.qcow2 import Qcow2Driver
from .formats.qcow2.create import create_qcow2
from .locks import CoRangeLock
from .protocol.constants import STATE_HOLE, STATE_ZERO
from .storage import close_storage, open_storage
from .storage.base import ZERO_CHUNK, Pending, joined, read_at, settled
from .storage.local import LocalFile, lock_perms, open_locked
from .storage.location import LocalLocation, Location, backing_name, same_backing

log = logging.getLogger("nbdserve")


class Run(NamedTuple):
    """A block-status run: ``flags`` for base:allocation, ``depth`` for qemu:allocation-depth."""

    length: int
    flags: int
    depth: int


@dataclass(frozen=True)
class BackingPolicy:
    """Which backing files an image may name.  ``allowed_dirs`` empty: the top image's directory."""

    allowed_dirs: tuple[str, ...] = ()
    max_depth: int = 16


@dataclass
class ImageSpec:
    path: str  # a local path, or the location's name (rbd:pool/image, s3://bucket/key)
    location: Location | None = None  # None: the local file ``path``
    overlay: str | None = None  # --overlay: a persistent local qcow2 over the image takes the writes
    format: str | None = None  # None: probe
    readonly: bool = False
    snapshot_overlay: bool = False  # -s: writes go to a throw-away overlay
    force_share: bool = False  # -U: a read-only image (and its chain) may be open by a writer
    direct: bool = False  # O_DIRECT for every file of the chain (--cache=none/directsync)
    options: OpenOptions = field(default_factory=OpenOptions)
    backing: BackingPolicy = field(default_factory=BackingPolicy)


class Image:
    """One layer of an open chain; the top one is what an export serves."""

    def __init__(self, driver: FormatDriver, backing: Image | None, cache: ClusterCache) -> None:
        self.driver = driver
        self.backing = backing
        self.cache = cache
        self.path = driver.storage.name
        self.format = driver.format_name
        self.size = driver.size
        self.readonly = driver.readonly
        self.align = driver.limits.align
        if self.size % self.align:
            raise ImageError(self.path, f"disk size {self.size} is not a multiple of the {self.align}-byte sector")
        self.max_transfer = driver.limits.max_transfer
        self.can_fast_zero = not self.readonly and driver.caps.fast_zero
        # A run of buffers may be handed to the driver whole (see ``write``).
        self.vectored = driver.vectored and self.align == 1
        self._align_mask = self.align - 1
        self._rmw = CoRangeLock() if self.align > 1 else None
        self._cleanup: list[str] = []  # files to remove at close (snapshot overlays)
        if backing is not None:
            driver.read_backing = self._read_backing
        # Mapping memo (see formats.base): granule index -> host offset of plain data.
        self._memo: dict[int, int] = {}
        self._map_bits = driver.map_bits
        self._map_mask = (1 << driver.map_bits) - 1
        self._data = driver.map_storage or driver.storage
        driver.mappings_changed = self.forget_mappings
        cache.memo_owners.add(self)

    # -- reads ------------------------------------------------------------------------------

    def read(self, offset: int, buf: memoryview) -> Pending:
        """Fill ``buf`` with the disk contents at ``offset``: the one way in for reads.

        Inside one granule of plain data the memo gives the host offset at the cost of one dict
        lookup (a miss asks ``driver.map_now`` once and remembers the answer); anything the memo
        cannot place goes to ``driver.read``.  Takes no lock: the memo is used with no await
        between the lookup and the storage read it starts.
        """
        n = len(buf)
        if (offset | n) & self._align_mask or n > self.max_transfer:
            return self._read_pieces(offset, buf)
        bits = self._map_bits
        if not bits:
            return self.driver.read(offset, buf)
        mask = self._map_mask
        if (offset & mask) + n > mask + 1:
            return self._read_granules(offset, buf)
        g = offset >> bits
        host = self._memo.get(g)
        if host is None:
            host = self.driver.map_now(offset)
            if host is None:
                return self.driver.read(offset, buf)
            self._remember(g, host)
        return self._data.read(host + (offset & mask), buf)

    def _read_granules(self, offset: int, buf: memoryview) -> Pending:
        """``read`` across granules: the memo places the leading granules (host-contiguous ones
        read together), the driver reads from the first one it cannot place.  Synchronous up to
        the storage and driver calls it starts."""
        bits, mask, memo, map_now, data = self._map_bits, self._map_mask, self._memo, self.driver.map_now, self._data
        pendings = []
        pos, end = offset, offset + len(buf)
        run_pos = run_host = run_len = 0
        while pos < end:
            g = pos >> bits
            host = memo.get(g)
            if host is None:
                host = map_now(pos)
                if host is None:
                    break
                self._remember(g, host)
            at = host + (pos & mask)
            seg = min(end, (g + 1) << bits) - pos
            if run_len and run_host + run_len == at:
                run_len += seg
            else:
                if run_len:
                    p = data.read(run_host, buf[run_pos - offset : run_pos - offset + run_len])
                    if p is not None:
                        pendings.append(p)
                run_pos, run_host, run_len = pos, at, seg
            pos += seg
        if run_len:
            p = data.read(run_host, buf[run_pos - offset : run_pos - offset + run_len])
            if p is not None:
                pendings.append(p)
        if pos < end:
            p = self.driver.read(pos, buf[pos - offset :])
            if p is not None:
                pendings.append(p)
        return joined(pendings)

    async def _read_pieces(self, offset: int, buf: memoryview) -> None:
        """``read`` of a range that is not whole sectors (through a bounce buffer of the
        covering sectors) or longer than ``max_transfer`` (in pieces)."""
        align, n = self.align, len(buf)
        start = offset & ~(align - 1)
        end = -(-(offset + n) // align) * align
        target = buf if (start, end) == (offset, offset + n) else memoryview(bytearray(end - start))
        step = self.max_transfer
        for pos in range(0, end - start, step):
            await settled(self.read(start + pos, target[pos : pos + step]))
        if target is not buf:
            buf[:] = target[offset - start : offset - start + n]

    def _remember(self, granule: int, host: int) -> None:
        cache = self.cache
        if cache.memo_used >= cache.memo_limit:
            for owner in list(cache.memo_owners):
                owner.forget_mappings()
        self._memo[granule] = host
        cache.memo_used += 1

    def forget_mappings(self) -> None:
        """Drop the memo (the driver's ``mappings_changed``, the shared limit, close)."""
        self.cache.memo_used -= len(self._memo)
        self._memo.clear()

    def _read_backing(self, offset: int, buf: memoryview) -> Pending:
        """Read from the backing image (the driver's ``read_backing``); the part past its end
        reads as zeroes."""
        backing = self.backing
        assert backing is not None
        n = max(0, min(len(buf), backing.size - offset))
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)
        return backing.read(offset, buf[:n]) if n else None

    # -- writes -----------------------------------------------------------------------------

    def write(self, offset: int, data: memoryview | list[memoryview], *, fua: bool) -> Pending:
        """Write ``data`` at ``offset``: the one way in for writes.  ``data`` may be a list of
        buffers (one guest-contiguous run) only when ``vectored``.

        Whole sectors hold their range of the image's range lock shared (without waiting when
        nothing conflicts) for as long as the driver's write runs; anything smaller is
        read-modify-write with its covering sectors held exclusively.
        """
        if self.vectored and type(data) is list:
            return self.driver.write(offset, data, fua=fua)
        n = len(data)
        rmw = self._rmw
        if rmw is None:
            if n > self.max_transfer:
                return self._write_pieces(offset, data, fua)
            return self.driver.write(offset, data, fua=fua)
        if (offset | n) & self._align_mask:
            return self._rmw_write(offset, data, fua)
        token = None if n > self.max_transfer else rmw.try_shared(offset, offset + n)
        if token is None:
            return self._write_shared(offset, data, fua)
        try:
            pending = self.driver.write(offset, data, fua=fua)
        except BaseException:
            rmw.unlock(token)
            raise
        if pending is None:
            rmw.unlock(token)
            return None
        return self._unlock_after(pending, token)

    def landing(self, offset: int, length: int) -> Landing | None:
        """Where a plain WRITE of ``[offset, offset + length)`` may be put byte for byte instead
        of calling ``write`` (``FormatDriver.landing``); None for a write ``write`` would split
        or read-modify-write.  Whole sectors hold their range shared until ``release``, as
        ``write`` holds it while the driver's write runs (only when nothing conflicts: no waiting
        here), so a read-modify-write of those sectors waits for the landing and no other does."""
        if length > self.max_transfer:
            return None
        rmw = self._rmw
        if rmw is None:
            return self.driver.landing(offset, length)
        if (offset | length) & self._align_mask:
            return None
        token = rmw.try_shared(offset, offset + length)
        if token is None:
            return None
        target = self.driver.landing(offset, length)
        if target is None:
            rmw.unlock(token)
            return None

        def release() -> None:
            target.release()
            rmw.unlock(token)

        return target._replace(release=release)

    async def _unlock_after(self, pending: Pending, token: int) -> None:
        """Wait for a write started with its range held shared (``token``), then release it."""
        try:
            await pending
        finally:
            self._rmw.unlock(token)

    async def _write_shared(self, offset: int, data: memoryview, fua: bool) -> None:
        """Whole sectors, when their range is contended or the write is split: wait to hold it
        shared."""
        token = await self._rmw.shared(offset, offset + len(data))
        try:
            await self._write_pieces(offset, data, fua)
        finally:
            self._rmw.unlock(token)

    async def _write_pieces(self, offset: int, data: memoryview, fua: bool) -> None:
        """The driver's write in pieces of at most ``max_transfer`` (FUA on the last).  Called with
        the range held (shared or exclusive) where there is a range lock."""
        step = self.max_transfer
        for pos in range(0, len(data), step):
            last = pos + step >= len(data)
            await settled(self.driver.write(offset + pos, data[pos : pos + step], fua=fua and last))

    async def _rmw_write(self, offset: int, data: memoryview, fua: bool) -> None:
        """Sub-alignment write: read the covering aligned range, patch it, write it back.

        Holds the covering sectors exclusively, so no other write touches them meanwhile; writes
        elsewhere go on.
        """
        align = self.align
        start = offset & ~(align - 1)
        end = -(-(offset + len(data)) // align) * align
        token = await self._rmw.exclusive(start, end)
        try:
            bounce = memoryview(bytearray(end - start))
            await settled(self.read(start, bounce))
            bounce[offset - start : offset - start + len(data)] = data
            await self._write_pieces(start, bounce, fua)
        finally:
            self._rmw.unlock(token)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        """Make the range read as zeroes.  ``fast``: fail with ENOTSUP unless metadata-only."""
        if fast and not self.can_fast_zero:
            raise NbdError(errno.ENOTSUP, "fast zeroing is not supported by this image")
        align = self.align
        head_end = min(offset + length, -(-offset // align) * align)
        tail_start = max(head_end, (offset + length) & ~(align - 1))
        if fast and (head_end > offset or tail_start < offset + length):
            raise NbdError(errno.ENOTSUP, "fast zeroing needs whole sectors")
        if head_end > offset:
            await settled(self.write(offset, memoryview(ZERO_CHUNK)[: head_end - offset], fua=False))
        if tail_start < offset + length:
            await settled(self.write(tail_start, memoryview(ZERO_CHUNK)[: offset + length - tail_start], fua=False))
        if tail_start > head_end:
            if self.driver.caps.native_zero:
                token = await self._rmw.shared(head_end, tail_start) if self._rmw is not None else None
                try:
                    await self.driver.pwrite_zeroes(
                        head_end, tail_start - head_end, may_trim=may_trim, fast=fast, fua=False
                    )
                finally:
                    if token is not None:
                        self._rmw.unlock(token)
            else:
                pos = head_end
                while pos < tail_start:
                    n = min(len(ZERO_CHUNK), tail_start - pos, self.max_transfer)
                    await settled(self.write(pos, memoryview(ZERO_CHUNK)[:n], fua=False))
                    pos += n
        if fua:
            await self.flush()

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        """A hint: deallocate what the driver can, rounded inwards to whole sectors."""
        if self.driver.caps.native_trim:
            align = self.align
            start = -(-offset // align) * align
            end = (offset + length) & ~(align - 1)
            if end > start:
                await self.driver.pdiscard(start, end - start)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        if not self.readonly:
            await self.driver.flush()

    async def cache_hint(self, offset: int, length: int) -> None:
        await self.driver.cache_hint(offset, length)

    # -- block status -----------------------------------------------------------------------

    async def runs(self, offset: int, length: int, *, limit: int = 1 << 20) -> list[Run]:
        """Block-status runs covering ``[offset, offset+length)``, merged, at most ``limit``.

        Runs never extend past ``offset + length``; adjacent runs with equal flags and depth merge.
        """
        out: list[Run] = []
        await self._runs(offset, length, 1, out, limit)
        return out

    async def _runs(self, offset: int, length: int, depth: int, out: list[Run], limit: int) -> None:
        """Runs of ``[offset, offset+length)`` at ``depth``.  The driver is asked about whole
        sectors (the range widened to ``align``; ``size`` is a multiple of it) and must answer in
        whole sectors, so every question it gets is aligned; the answers are clipped back to the
        range."""
        end = offset + length
        align = self.align
        pos = offset & ~(align - 1)
        stop = min(-(-end // align) * align, self.size)
        drv = self.driver
        while pos < end and len(out) < limit:
            ext = await drv.block_status(pos, stop - pos)
            if not 0 < ext.length <= stop - pos or (ext.length & (align - 1) and pos + ext.length != stop):
                raise NbdError(errno.EIO, f"{self.path}: driver returned block-status run {pos}+{ext.length}")
            lo, hi = max(pos, offset), min(pos + ext.length, end)
            pos += ext.length
            n = hi - lo
            if n <= 0:
                continue
            state = ext.state
            if state & ALLOCATED:
                _append(out, Run(n, (0 if state & DATA else STATE_HOLE) | (STATE_ZERO if state & ZERO else 0), depth))
            elif self.backing is not None:
                inside = max(0, min(n, self.backing.size - lo))
                if inside:
                    await self.backing._runs(lo, inside, depth + 1, out, limit)
                if inside < n:
                    # past the end of a shorter backing file: zeroes, attributed to that file (as QEMU does)
                    _append(out, Run(n - inside, STATE_HOLE | STATE_ZERO, depth + 1))
            else:
                _append(out, Run(n, STATE_HOLE | STATE_ZERO, 0))

    async def dirty_bitmap(self, name: str) -> DirtyBitmapView:
        """Bitmap ``name`` of the first layer that has one (top first).  Raises ``ImageError``."""
        for img in self.chain():
            bm = await img.driver.dirty_bitmap(name)
            if bm is not None:
                return bm
        raise ImageError(self.path, f"bitmap {name!r} not found")

    # -- life cycle -------------------------------------------------------------------------

    def chain(self) -> list[Image]:
        img, out = self, []
        while img is not None:
            out.append(img)
            img = img.backing
        return out

    async def close(self) -> None:
        for img in self.chain():
            storage = img.driver.storage
            try:
                await img.driver.close()
            finally:
                img.forget_mappings()
                img.cache.memo_owners.discard(img)
                img.cache.discard_storage(storage)
                await storage.close()
        for path in self._cleanup:
            try:
                os.unlink(path)
            except OSError:
                pass


def _append(out: list[Run], run: Run) -> None:
    if out and out[-1].flags == run.flags and out[-1].depth == run.depth:
        out[-1] = Run(out[-1].length + run.length, run.flags, run.depth)
    else:
        out.append(run)


# -- opening --------------------------------------------------------------------------------


async def open_image(spec: ImageSpec, cache: ClusterCache) -> Image:
    """Open the image at ``spec``'s location and its backing chain (under a ``-s`` or
    ``--overlay`` overlay if asked).  Raises ``ImageError`` with a one-line reason."""
    where = spec.location or LocalLocation(spec.path)
    if isinstance(where, LocalLocation):
        top_dir = os.path.dirname(os.path.realpath(spec.path))
        allowed = tuple(os.path.realpath(d) for d in spec.backing.allowed_dirs) or (top_dir,)
    else:
        allowed = ()
    over = spec.snapshot_overlay or spec.overlay is not None
    image = await _open_layer(
        where,
        spec.format,
        spec.readonly or over,
        spec.options,
        cache,
        spec.backing,
        allowed,
        0,
        set(),
        raw_fallback=True,
        force_share=spec.force_share,
        direct=spec.direct,
    )
    if over:
        return await _open_overlay(where, image, cache, spec.overlay)
    return image


async def _open_overlay(where: Location, base: Image, cache: ClusterCache, keep: str | None) -> Image:
    """A qcow2 v3 overlay opened read-write on top of the already open ``base``, recording
    ``where`` (``backing_name``) and the base's format as its backing.

    ``keep`` None (``-s``): a new file in the temporary directory, removed at close.  ``keep`` a
    path (``--overlay``): created there if missing, else opened and reused when its recorded
    backing names ``where`` (``same_backing``; refused otherwise); never removed.  Closes
    ``base`` if anything fails."""
    overlay = created = None
    try:
        if any(layer.driver.encrypted for layer in base.chain()):
            what = "--overlay" if keep is not None else "-s"
            raise UnsupportedImage(where.name, f"{what} would write decrypted data to an unencrypted overlay; refused")
        if keep is None:
            fd, overlay = tempfile.mkstemp(prefix="nbdserve-overlay-", suffix=".qcow2")
            os.close(fd)
            os.unlink(overlay)  # re-created exclusively below
        else:
            overlay = keep
        if keep is None or not os.path.exists(overlay):
            create_qcow2(overlay, base.size, backing_file=backing_name(where), backing_format=base.format)
            created = overlay
        file = open_locked(overlay, readonly=False)
        try:
            driver = await Qcow2Driver.open(file, readonly=False, cache=cache, options=OpenOptions())
            recorded = driver.backing.name if driver.backing is not None else None
            if recorded is None or not same_backing(recorded, where):
                await driver.close()
                raise ImageError(
                    overlay,
                    f"this overlay's backing is {recorded or 'nothing'!r}, not {where.name}; "
                    "give the image it was made for, or another --overlay path",
                )
        except BaseException:
            cache.discard_storage(file)
            file.close_now()
            raise
        image = Image(driver, base, cache)
        if keep is None:
            image._cleanup.append(overlay)
        return image
    except BaseException:
        await base.close()
        if created is not None and os.path.exists(created):
            os.unlink(created)
        raise


async def _open_layer(
    where: Location,
    fmt: str | None,
    readonly: bool,
    options: OpenOptions,
    cache: ClusterCache,
    policy: BackingPolicy,
    allowed: tuple[str, ...],
    depth: int,
    seen: set[object],
    *,
    raw_fallback: bool,
    force_share: bool,
    direct: bool = False,
) -> Image:
    path = where.name
    local = isinstance(where, LocalLocation)
    if local:
        try:
            st = os.stat(path)
        except OSError as e:
            raise ImageError(path, f"cannot open: {e.strerror}") from None
        key: object = (st.st_dev, st.st_ino)
    else:
        key = path
    if key in seen:  # before opening: the chain's own lock on the file would hide the loop
        raise ImageError(path, "backing chain loops back to this file")
    seen.add(key)
    file = await open_storage(where, readonly=readonly, force_share=force_share, direct=direct)
    driver = None
    try:
        resolve = functools.partial(resolve_backing, allowed=allowed) if local else _no_files
        options = replace(options, resolve=resolve, force_share=force_share)
        if fmt is None:
            head = await read_at(file, 0, min(PROBE_SIZE, file.size))
            drv_cls = probe(bytes(head), file.size, path, raw_fallback=raw_fallback)
        else:
            drv_cls = driver_for(fmt, path)
        driver = await drv_cls.open(file, readonly=readonly, cache=cache, options=options)
        if driver.readonly and not file.readonly and isinstance(file, LocalFile):  # the driver chose read-only
            file.lock(*lock_perms(writable=False, force_share=force_share))
        if fmt is None and drv_cls.format_name == "raw":
            driver.head_guard = identify
        backing = None
        if driver.backing is not None:
            if not local:
                raise UnsupportedImage(
                    path, f"names a backing file ({driver.backing.name!r}); images in Ceph or S3 cannot have one"
                )
            if depth + 1 > policy.max_depth:
                raise ImageError(path, f"backing chain deeper than {policy.max_depth} images")
            bpath = resolve_backing(path, driver.backing.name, allowed)
            backing = await _open_layer(
                LocalLocation(bpath),
                driver.backing.format,
                True,
                OpenOptions(
                    vpc_size=options.vpc_size,
                    passphrase=options.backing_passphrase,
                    backing_passphrase=options.backing_passphrase,
                ),
                cache,
                policy,
                allowed,
                depth + 1,
                seen,
                raw_fallback=False,
                force_share=force_share,
                direct=direct,
            )
        return Image(driver, backing, cache)
    except BaseException:
        if driver is not None:  # opened, but its backing chain failed: release what it holds
            try:
                await driver.close()  # its own files (VMDK extents) and their locks too
            except Exception as e:
                log.warning("%s: closing after a failed open: %s", path, e)
        cache.discard_storage(file)
        await close_storage(file)
        raise


def _no_files(image_path: str, name: str, allowed: tuple[str, ...] = (), what: str = "backing file") -> str:
    """``resolve`` for images in Ceph or S3: they may not name other files."""
    raise UnsupportedImage(image_path, f"names a {what} ({name!r}); images in Ceph or S3 cannot refer to files")


def resolve_backing(image_path: str, name: str, allowed: tuple[str, ...], what: str = "backing file") -> str:
    """A file name an image records (its backing file; ``what`` says, e.g. a VMDK extent file)
    -> path: relative to the image's directory, inside ``allowed``."""
    if not name:
        raise ImageError(image_path, f"empty {what} name")
    if "\0" in name:
        raise ImageError(image_path, f"{what} name {name!r} contains a NUL byte")
    if name.startswith("json:") or "://" in name or (":" in name.split("/")[0] and not os.path.exists(name)):
        raise UnsupportedImage(image_path, f"{what} {name!r} is a protocol or json: name, not a file")
    base = os.path.dirname(os.path.realpath(image_path))
    candidate = os.path.realpath(os.path.join(base, name))
    if not any(os.path.commonpath([candidate, d]) == d for d in allowed):
        raise ImageError(image_path, f"{what} {name!r} resolves to {candidate}, outside the allowed directories")
    if not os.path.exists(candidate):
        raise ImageError(image_path, f"{what} {name!r} not found (looked for {candidate})")
    return candidate

"""The image layer: one open image (a chain of format drivers) as the server sees it.

Owns, between the protocol and the drivers:
  * alignment: read-modify-write for requests smaller than the driver's ``limits.align``
    (serialised against other writes by the image rwlock; aligned writes share it);
  * splitting to ``limits.max_transfer``;
  * emulation of what a driver lacks: WRITE_ZEROES -> writes of zero bytes (ENOTSUP when FAST_ZERO
    asks for speed), TRIM -> nothing (it is a hint), FUA -> flush;
  * backing chains: opening them (relative names, allowed directories, loop and depth limits,
    recorded formats honoured, never raw-by-guess), feeding each driver's ``read_backing``, and
    walking the chain for block status, which yields ``base:allocation`` flags and the
    ``qemu:allocation-depth`` value (0 unallocated, 1 this image, 2 its backing, ...);
  * persistent dirty bitmaps for ``-B``: the first layer of the chain that has one of the name
    (as qemu-nbd looks them up);
  * the ``-s`` snapshot overlay (a temporary qcow2 over the image, removed at close);
  * opening files: read-write exactly when asked (a file this process may not write is an error,
    not a silent read-only export), locked the way QEMU locks images (``lock_perms``;
    docs/image-locks.md) on the image and every backing file, and probed safely
    (``formats.probe``; a probed-raw image guards its first sector, see ``formats.raw``);
  * the mapping memo behind ``read_now``: granule -> host offset for granules of plain data,
    dropped whenever the driver says a mapping changed (see ``formats.base``), so a hot read
    costs one dict lookup and one pread.  All images' memos together hold at most the cache's
    ``memo_limit`` entries (a small share of ``--cache-size``); at the limit they start over.

The caller (the server) guarantees ``0 <= offset``, ``offset + length <= size`` and
``length > 0``; it also refuses writes to a read-only image.  Everything below is then trusted.

Lock order: image rwlock (only when align > 1) -> driver CoMutex -> cache.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from .cache import ClusterCache
from .errors import ImageError, NbdError, UnsupportedImage
from .formats import PROBE_SIZE, driver_for, identify, probe
from .formats.base import ALLOCATED, DATA, ZERO, DirtyBitmapView, FormatDriver, OpenOptions
from .locks import CoRwLock
from .storage.local import lock_perms, open_locked

log = logging.getLogger("nbdserve")

# NBD base:allocation flags
STATE_HOLE = 1
STATE_ZERO = 2

ZERO_CHUNK = bytes(1 << 20)


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
    path: str
    format: str | None = None  # None: probe
    readonly: bool = False
    snapshot_overlay: bool = False  # -s: writes go to a throw-away overlay
    force_share: bool = False  # -U: a read-only image (and its chain) may be open by a writer
    options: OpenOptions = field(default_factory=OpenOptions)
    backing: BackingPolicy = field(default_factory=BackingPolicy)


class Image:
    """One layer of an open chain; the top one is what an export serves."""

    def __init__(self, driver: FormatDriver, backing: Image | None, cache: ClusterCache) -> None:
        self.driver = driver
        self.backing = backing
        self.cache = cache
        self.path = driver.file.path
        self.format = driver.format_name
        self.size = driver.size
        self.readonly = driver.readonly
        self.align = driver.limits.align
        self.max_transfer = driver.limits.max_transfer
        caps = driver.caps
        self.can_trim = not self.readonly
        self.can_zero = not self.readonly
        self.can_fast_zero = not self.readonly and caps.fast_zero
        self._rmw = CoRwLock() if self.align > 1 else None
        self._cleanup: list[str] = []  # files to remove at close (snapshot overlays)
        if backing is not None:
            driver.read_backing = self._read_backing
        # Mapping memo (see formats.base): granule index -> host offset of plain data.
        self._memo: dict[int, int] = {}
        self._map_bits = driver.map_bits
        self._map_mask = (1 << driver.map_bits) - 1
        self._data_file = driver.map_file or driver.file
        self._data_fd = self._data_file.fd
        driver.mappings_changed = self.forget_mappings
        cache.memo_owners.add(self)

    # -- reads ------------------------------------------------------------------------------

    async def read(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the disk contents at ``offset``."""
        align = self.align
        if (offset | len(buf)) & (align - 1):
            start = offset & ~(align - 1)
            end = -(-(offset + len(buf)) // align) * align
            bounce = memoryview(bytearray(end - start))
            await self._read_aligned(start, bounce)
            buf[:] = bounce[offset - start : offset - start + len(buf)]
            return
        await self._read_aligned(offset, buf)

    def read_now(self, offset: int, buf: memoryview) -> bool:
        """Synchronous read when it needs no waiting (see FormatDriver.read_now): the hot path.

        Inside one granule of plain data the memo gives the host offset at the cost of one dict
        lookup; reads over several granules try the memo for each (``mapped_runs``); the rest
        ask the driver."""
        n = len(buf)
        if (offset | n) & (self.align - 1) or n > self.max_transfer:
            return False
        bits = self._map_bits
        if not bits:
            return self.driver.read_now(offset, buf)
        if (offset & self._map_mask) + n > 1 << bits:
            runs = self.mapped_runs(offset, n)
            if runs is None:
                return self.driver.read_now(offset, buf)
            self.read_runs(buf, runs)
            return True
        memo, g = self._memo, offset >> bits
        host = memo.get(g)
        if host is None:
            host = self.driver.map_now(offset)
            if host is None:
                return self.driver.read_now(offset, buf)
            self._remember(g, host)
        pos = host + (offset & self._map_mask)
        # os.preadv directly (this is the hottest line of the server); a short read means EOF,
        # which LocalFile.pread_into handles (zeroes past it).
        if os.preadv(self._data_fd, [buf], pos) != n:
            self._data_file.pread_into(buf, pos)
        return True

    def mapped_runs(self, offset: int, length: int) -> list[list[int]] | None:
        """If every granule of the range is plain data of this layer (known to the memo, or to
        the driver's cached metadata), its host runs ``[position in range, host offset,
        length]`` (host-contiguous granules merged) for ``read_runs``; else None.  Synchronous:
        valid until the caller's next await."""
        bits = self._map_bits
        if not bits or (offset | length) & (self.align - 1) or length > self.max_transfer:
            return None
        mask, memo, map_now = self._map_mask, self._memo, self.driver.map_now
        runs: list[list[int]] = []
        pos, end = offset, offset + length
        while pos < end:
            g = pos >> bits
            host = memo.get(g)
            if host is None:
                host = map_now(pos)
                if host is None:
                    return None
                self._remember(g, host)
            at = host + (pos & mask)
            seg = min(end, (g + 1) << bits) - pos
            if runs and runs[-1][1] + runs[-1][2] == at:
                runs[-1][2] += seg
            else:
                runs.append([pos - offset, at, seg])
            pos += seg
        return runs

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

    def read_runs(self, buf: memoryview, runs: list[list[int]]) -> None:
        """Fill ``buf`` from the host runs ``mapped_runs`` just gave for it."""
        for start, at, length in runs:
            self._data_file.pread_into(buf[start : start + length], at)

    async def _read_aligned(self, offset: int, buf: memoryview) -> None:
        step = self.max_transfer
        if len(buf) <= step:
            await self.driver.preadv(offset, buf)
            return
        for pos in range(0, len(buf), step):
            await self.driver.preadv(offset + pos, buf[pos : pos + step])

    async def _read_backing(self, offset: int, buf: memoryview) -> None:
        """Read from the backing image; the part past its end reads as zeroes."""
        backing = self.backing
        assert backing is not None
        n = max(0, min(len(buf), backing.size - offset))
        if n:
            await backing.read(offset, buf[:n])
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    # -- writes -----------------------------------------------------------------------------

    async def write(self, offset: int, data: memoryview, *, fua: bool) -> None:
        align = self.align
        if align == 1:
            await self._write_aligned(offset, data, fua)
            return
        if (offset | len(data)) & (align - 1):
            await self._rmw_write(offset, data, fua)
            return
        await self._rmw.rdlock()
        try:
            await self._write_aligned(offset, data, fua)
        finally:
            self._rmw.unlock()

    def write_now(self, offset: int, data: memoryview) -> bool:
        """Synchronous write (no FUA) when the driver can do it without waiting (see
        FormatDriver.write_now); needs whole sectors and, for sector formats, an uncontended
        image rwlock."""
        if (offset | len(data)) & (self.align - 1) or len(data) > self.max_transfer:
            return False
        if self._rmw is None:
            return self.driver.write_now(offset, data)
        if not self._rmw.try_rdlock():
            return False
        try:
            return self.driver.write_now(offset, data)
        finally:
            self._rmw.unlock()

    async def _write_aligned(self, offset: int, data: memoryview, fua: bool) -> None:
        step = self.max_transfer
        if len(data) <= step:
            await self.driver.pwritev(offset, data, fua=fua)
            return
        for pos in range(0, len(data), step):
            last = pos + step >= len(data)
            await self.driver.pwritev(offset + pos, data[pos : pos + step], fua=fua and last)

    async def _rmw_write(self, offset: int, data: memoryview, fua: bool) -> None:
        """Sub-alignment write: read the covering aligned range, patch it, write it back.

        Takes the image rwlock exclusively so no other write touches the covering sectors.
        """
        align = self.align
        start = offset & ~(align - 1)
        end = -(-(offset + len(data)) // align) * align
        await self._rmw.wrlock()
        try:
            bounce = memoryview(bytearray(end - start))
            await self._read_aligned(start, bounce)
            bounce[offset - start : offset - start + len(data)] = data
            await self._write_aligned(start, bounce, fua)
        finally:
            self._rmw.unlock()

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
            await self.write(offset, memoryview(ZERO_CHUNK)[: head_end - offset], fua=False)
        if tail_start < offset + length:
            await self.write(tail_start, memoryview(ZERO_CHUNK)[: offset + length - tail_start], fua=False)
        if tail_start > head_end:
            if self.driver.caps.native_zero:
                if self._rmw is None:
                    await self.driver.pwrite_zeroes(
                        head_end, tail_start - head_end, may_trim=may_trim, fast=fast, fua=False
                    )
                else:
                    await self._rmw.rdlock()
                    try:
                        await self.driver.pwrite_zeroes(
                            head_end, tail_start - head_end, may_trim=may_trim, fast=fast, fua=False
                        )
                    finally:
                        self._rmw.unlock()
            else:
                pos = head_end
                while pos < tail_start:
                    n = min(len(ZERO_CHUNK), tail_start - pos, self.max_transfer)
                    await self.write(pos, memoryview(ZERO_CHUNK)[:n], fua=False)
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
        end = offset + length
        drv = self.driver
        while offset < end and len(out) < limit:
            ext = await drv.block_status(offset, end - offset)
            n = ext.length
            if n <= 0:
                raise NbdError(errno.EIO, f"{self.path}: driver returned an empty block-status run")
            state = ext.state
            if state & ALLOCATED:
                _append(out, Run(n, (0 if state & DATA else STATE_HOLE) | (STATE_ZERO if state & ZERO else 0), depth))
            elif self.backing is not None:
                inside = max(0, min(n, self.backing.size - offset))
                if inside:
                    await self.backing._runs(offset, inside, depth + 1, out, limit)
                if inside < n:
                    # past the end of a shorter backing file: zeroes, attributed to that file (as QEMU does)
                    _append(out, Run(n - inside, STATE_HOLE | STATE_ZERO, depth + 1))
            else:
                _append(out, Run(n, STATE_HOLE | STATE_ZERO, 0))
            offset += n

    def dirty_bitmap(self, name: str) -> DirtyBitmapView:
        """Bitmap ``name`` of the first layer that has one (top first).  Raises ``ImageError``."""
        for img in self.chain():
            bm = img.driver.dirty_bitmap(name)
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
            try:
                await img.driver.close()
            finally:
                img.forget_mappings()
                img.cache.memo_owners.discard(img)
                img.cache.discard_storage(img.driver.file)
                img.driver.file.close_now()
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
    """Open ``spec.path`` and its backing chain.  Raises ``ImageError`` with a one-line reason."""
    if spec.snapshot_overlay:
        from .formats.overlay import open_with_overlay  # qcow2 overlay creation

        return await open_with_overlay(spec, cache)
    top_dir = os.path.dirname(os.path.realpath(spec.path))
    allowed = tuple(os.path.realpath(d) for d in spec.backing.allowed_dirs) or (top_dir,)
    return await _open_layer(
        spec.path,
        spec.format,
        spec.readonly,
        spec.options,
        cache,
        spec.backing,
        allowed,
        0,
        set(),
        raw_fallback=True,
        force_share=spec.force_share,
    )


async def _open_layer(
    path: str,
    fmt: str | None,
    readonly: bool,
    options: OpenOptions,
    cache: ClusterCache,
    policy: BackingPolicy,
    allowed: tuple[str, ...],
    depth: int,
    seen: set[tuple[int, int]],
    *,
    raw_fallback: bool,
    force_share: bool,
) -> Image:
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageError(path, f"cannot open: {e.strerror}") from None
    key = (st.st_dev, st.st_ino)
    if key in seen:  # before opening: the chain's own lock on the file would hide the loop
        raise ImageError(path, "backing chain loops back to this file")
    seen.add(key)
    file = open_locked(path, readonly=readonly, force_share=force_share)
    driver = None
    try:
        options = replace(options, resolve=functools.partial(resolve_backing, allowed=allowed), force_share=force_share)
        if fmt is None:
            head = file.pread(min(PROBE_SIZE, max(file.size, 0)), 0) if file.size else b""
            drv_cls = probe(bytes(head), file.size, path, raw_fallback=raw_fallback)
        else:
            drv_cls = driver_for(fmt, path)
        driver = await drv_cls.open(file, readonly=readonly, cache=cache, options=options)
        if driver.readonly and not file.readonly:  # the driver chose read-only: be a reader
            file.lock(*lock_perms(writable=False, force_share=force_share))
        if fmt is None and drv_cls.format_name == "raw":
            driver.head_guard = identify
        backing = None
        if driver.backing is not None:
            if depth + 1 > policy.max_depth:
                raise ImageError(path, f"backing chain deeper than {policy.max_depth} images")
            bpath = resolve_backing(path, driver.backing.name, allowed)
            backing = await _open_layer(
                bpath,
                driver.backing.format,
                True,
                OpenOptions(vpc_size=options.vpc_size),
                cache,
                policy,
                allowed,
                depth + 1,
                seen,
                raw_fallback=False,
                force_share=force_share,
            )
        return Image(driver, backing, cache)
    except BaseException:
        if driver is not None:  # opened, but its backing chain failed: release what it holds
            try:
                await driver.close()  # its own files (VMDK extents) and their locks too
            except Exception as e:
                log.warning("%s: closing after a failed open: %s", path, e)
        cache.discard_storage(file)
        file.close_now()
        raise


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

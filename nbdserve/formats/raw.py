"""The raw driver: the virtual disk is the storage, byte for byte.

Owns: reads and writes passed straight to the storage (``read``/``write`` return the storage's
own Pending: None on a local file), runs of sequential writes as one storage write
(``vectored``: a local file's one ``pwritev``), landings at the same offsets in the file
(``landing``, docs/landing.md), block status from the storage's ``extent`` (a
host hole is ALLOCATED|ZERO: it reads as zeroes and no backing image sits below raw), TRIM by
the storage's discard (punching holes), WRITE_ZEROES by its native zeroing (unmapping when
allowed), "fast" only when that works.

Known-data cache: SEEK_HOLE can cost time proportional to the distance to the next hole (tmpfs
scans page by page: milliseconds on a dense file), so ranges found to be data are remembered in
``DataRanges``.  Reporting a range as data is always a correct answer (only ZERO and HOLE claim
anything), so the cache needs no invalidation for writes; our own punches drop the ranges they touch
so trimmed space is reported as a hole again.

Probed raw (no ``-f raw``): the image layer sets ``head_guard`` (``formats.identify``), and a
write, zeroing or trim that would leave the first ``guard_size`` bytes looking like an image format
fails with EPERM (that request alone: a guarded image takes no runs of writes), as QEMU does for
a probed raw image: otherwise a client could write, say, a qcow2 header naming another file as
its backing file, and the next probe would serve that file.  The check sees the whole new first
sector (the old bytes patched with the request's), so unaligned writes are judged exactly; every
request that changes those bytes holds ``_head_lock`` from reading them to its write's
completion, so no other can change the sector in between.

No metadata, so no other lock: concurrent requests go straight to the storage.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
from collections.abc import AsyncIterator, Callable

from ..cache import ClusterCache
from ..errors import NbdError
from ..locks import CoMutex
from ..storage.base import Pending, Storage, read_at, settled, write_zero_bytes
from .base import ALLOCATED, DATA, ZERO, Caps, Extent, FormatDriver, Landing, Limits, OpenOptions


class DataRanges:
    """Disjoint ranges [start, end) known to hold data, at most ``limit`` of them."""

    def __init__(self, limit: int = 1024) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.limit = limit

    def end_of(self, offset: int) -> int:
        """End of the known data range containing ``offset``, or 0 if none does."""
        i = bisect.bisect_right(self.starts, offset) - 1
        if i >= 0 and offset < self.ends[i]:
            return self.ends[i]
        return 0

    def add(self, start: int, end: int) -> None:
        self.forget(start, end)
        if len(self.starts) >= self.limit:
            self.starts.clear()
            self.ends.clear()
        i = bisect.bisect_left(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, end)

    def forget(self, start: int, end: int) -> None:
        i = bisect.bisect_right(self.starts, start) - 1
        i = max(i, 0)
        while i < len(self.starts) and self.starts[i] < end:
            if self.ends[i] > start:
                del self.starts[i], self.ends[i]
            else:
                i += 1


class RawDriver(FormatDriver):
    format_name = "raw"
    # Set for a probed raw image: (head, file size) -> the format that head would be, or None.
    head_guard: Callable[[bytes, int], tuple[str, object] | None] | None = None
    guard_size = 512

    @property
    def vectored(self) -> bool:  # type: ignore[override]
        """Runs of writes, unless the head is guarded: the guard refuses one request's bytes,
        and a run fails as a whole, so the requests after the refused one would fail with it."""
        return self.head_guard is None

    def __init__(self, storage: Storage, readonly: bool) -> None:
        self.storage = storage
        self.readonly = readonly
        self.size = storage.size
        self.limits = Limits(align=1)
        self.caps = Caps(native_zero=not readonly, native_trim=not readonly, fast_zero=not readonly)
        self.known_data = DataRanges()
        self._head_lock = CoMutex(f"raw head {storage.name}")

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        return 1  # anything is raw, but only as a last resort chosen explicitly (see formats.probe)

    @classmethod
    async def open(cls, storage: Storage, *, readonly: bool, cache: ClusterCache, options: OpenOptions) -> RawDriver:
        return cls(storage, readonly or storage.readonly)

    def read(self, offset: int, buf: memoryview) -> Pending:
        return self.storage.read(offset, buf)

    def write(self, offset: int, data: memoryview | list[memoryview], *, fua: bool) -> Pending:
        if offset < self.guard_size and self.head_guard is not None:
            return self._write_guarded(offset, data, fua)
        pending = self.storage.write(offset, data)
        if fua:
            return self._flush_after(pending)
        return pending

    def landing(self, offset: int, length: int) -> Landing | None:
        """The identity: guest bytes are file bytes (not in the guarded head of a probed raw
        image, whose writes must be judged first); nothing to hold or release."""
        fd = self.storage.splice_fd
        if fd is None or self.readonly or (offset < self.guard_size and self.head_guard is not None):
            return None
        return Landing(fd, offset)

    async def _flush_after(self, pending: Pending) -> None:
        await settled(pending)
        await self.storage.flush()

    async def _write_guarded(self, offset: int, data: memoryview | list[memoryview], fua: bool) -> None:
        """A write into the guarded head of a probed-raw image (see the module docstring)."""
        first = b"".join(data) if type(data) is list else data
        length = len(first)
        async with self._head_lock:
            await self._guard(offset, first, length)
            await settled(self.storage.write(offset, data))
        if fua:
            await self.storage.flush()

    async def _guard(self, offset: int, data: bytes | memoryview | None, length: int) -> None:
        """Refuse (EPERM) a change of the first ``guard_size`` bytes that makes them an image
        format's magic; ``data`` None means zeroes.  Called with ``_head_lock`` held."""
        self._head_lock.assert_locked()
        end = self.guard_size
        head = await read_at(self.storage, 0, end)
        n = min(length, end - offset)
        head[offset : offset + n] = bytes(n) if data is None else data[:n]
        found = self.head_guard(bytes(head), max(self.storage.size, offset + length))
        if found is not None:
            raise NbdError(
                errno.EPERM,
                f"refusing a write that makes sector 0 of this probed-raw image a {found[0]} header "
                "(serve it with an explicit raw format to allow it)",
            )

    async def pwrite_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        async with self._zeroing_head(offset, length):
            if may_trim:
                self.known_data.forget(offset, offset + length)
            if not await self.storage.write_zeroes(offset, length, may_unmap=may_trim):
                if fast:
                    raise NbdError(errno.ENOTSUP, "zeroing is not faster than writing on this file")
                await write_zero_bytes(self.storage, offset, length)
        if fua:
            await self.storage.flush()

    async def pdiscard(self, offset: int, length: int) -> None:
        async with self._zeroing_head(offset, length):
            self.known_data.forget(offset, offset + length)
            await self.storage.discard(offset, length)

    @contextlib.asynccontextmanager
    async def _zeroing_head(self, offset: int, length: int) -> AsyncIterator[None]:
        """Around a zeroing or trim of ``[offset, offset+length)``: if it touches the guarded
        head of a probed-raw image, hold ``_head_lock`` and refuse (EPERM) zeroes that would make
        it an image format's magic (see the module docstring); else nothing."""
        if offset >= self.guard_size or self.head_guard is None:
            yield
            return
        async with self._head_lock:
            await self._guard(offset, None, length)
            yield

    async def flush(self) -> None:
        await self.storage.flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        end = offset + length
        known = self.known_data.end_of(offset)
        if known:
            return Extent(min(known, end) - offset, ALLOCATED | DATA)
        # ask about the rest of the disk: a data run is remembered whole
        run, is_data = await self.storage.extent(offset, self.size - offset)
        if is_data:
            self.known_data.add(offset, offset + run)
            return Extent(min(run, length), ALLOCATED | DATA)
        return Extent(min(run, length), ALLOCATED | ZERO)

    async def close(self) -> None:
        if not self.readonly:
            await self.storage.flush()

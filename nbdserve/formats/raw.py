"""The raw driver: the virtual disk is the host file, byte for byte.

Owns: reads/writes straight to the file, block status from SEEK_DATA/SEEK_HOLE (a host hole is
ALLOCATED|ZERO: it reads as zeroes and no backing image sits below raw), TRIM by punching holes,
WRITE_ZEROES by punching (may_trim) or FALLOC_FL_ZERO_RANGE (NO_HOLE), both "fast" only when the
filesystem supports them.

Known-data cache: SEEK_HOLE can cost time proportional to the distance to the next hole (tmpfs
scans page by page: milliseconds on a dense file), so ranges found to be data are remembered in
``DataRanges``.  Reporting a range as data is always a correct answer (only ZERO and HOLE claim
anything), so the cache needs no invalidation for writes; our own punches drop the ranges they touch
so trimmed space is reported as a hole again.

Probed raw (no ``-f raw``): the image layer sets ``head_guard`` (``formats.identify``), and a
write, zeroing or trim that would leave the first ``guard_size`` bytes looking like an image format
fails with EPERM, as QEMU does for a probed raw image: otherwise a client could write, say, a qcow2
header naming another file as its backing file, and the next probe would serve that file.  The
check sees the whole new first sector (the old bytes patched with the request's), so unaligned
writes are judged exactly; it and the write happen in one synchronous step, so no other request
can change the sector in between.

No metadata, so no lock: concurrent requests go straight to the file.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Callable

from ..cache import ClusterCache
from ..errors import NbdError
from ..storage.local import LocalFile
from .base import ALLOCATED, DATA, ZERO, Caps, Extent, FormatDriver, Limits, OpenOptions


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

    def __init__(self, file: LocalFile, readonly: bool) -> None:
        self.file = file
        self.readonly = readonly
        self.size = file.size
        self.limits = Limits(align=1)
        self.caps = Caps(native_zero=not readonly, native_trim=not readonly, fast_zero=not readonly)
        self.known_data = DataRanges()

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        return 1  # anything is raw, but only as a last resort chosen explicitly (see formats.probe)

    @classmethod
    async def open(cls, file: LocalFile, *, readonly: bool, cache: ClusterCache, options: OpenOptions) -> RawDriver:
        return cls(file, readonly or file.readonly)

    def read_now(self, offset: int, buf: memoryview) -> bool:
        self.file.pread_into(buf, offset)
        return True

    async def preadv(self, offset: int, buf: memoryview) -> None:
        self.file.pread_into(buf, offset)

    def _guard(self, offset: int, data: bytes | memoryview | None, length: int) -> None:
        """Refuse (EPERM) a change of the first ``guard_size`` bytes that makes them an image
        format's magic; ``data`` None means zeroes."""
        end = self.guard_size
        if self.head_guard is None or offset >= end:
            return
        head = self.file.pread(end, 0)
        n = min(length, end - offset)
        head[offset : offset + n] = bytes(n) if data is None else data[:n]
        found = self.head_guard(bytes(head), max(self.file.size, offset + length))
        if found is not None:
            raise NbdError(
                errno.EPERM,
                f"refusing a write that makes sector 0 of this probed-raw image a {found[0]} header "
                "(serve it with an explicit raw format to allow it)",
            )

    def write_now(self, offset: int, data: memoryview) -> bool:
        self._guard(offset, data, len(data))
        self.file.pwrite(data, offset)
        return True

    async def pwritev(self, offset: int, data: memoryview, *, fua: bool) -> None:
        self._guard(offset, data, len(data))
        self.file.pwrite(data, offset)
        if fua:
            await self.file.flush()

    async def pwrite_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        self._guard(offset, None, length)
        punched = may_trim and self.file.punch_hole(offset, length)
        if punched:
            self.known_data.forget(offset, offset + length)
        done = punched or self.file.zero_range(offset, length)
        if not done:
            if fast:
                raise NbdError(errno.ENOTSUP, "zeroing is not faster than writing on this file")
            self.file.fill_zeroes(offset, length)
        if fua:
            await self.file.flush()

    async def pdiscard(self, offset: int, length: int) -> None:
        self._guard(offset, None, length)
        if self.file.punch_hole(offset, length):
            self.known_data.forget(offset, offset + length)

    async def flush(self) -> None:
        await self.file.flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        end = offset + length
        known = self.known_data.end_of(offset)
        if known:
            return Extent(min(known, end) - offset, ALLOCATED | DATA)
        hole = self.file.next_hole(offset)
        if hole > offset:
            self.known_data.add(offset, hole)
            return Extent(min(hole, end) - offset, ALLOCATED | DATA)
        data = self.file.next_data(offset)
        return Extent(min(data, end) - offset, ALLOCATED | ZERO)

    async def close(self) -> None:
        if not self.readonly:
            await self.file.flush()

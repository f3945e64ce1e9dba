"""FLAT (and VMFS) extents: the guest bytes lie in a plain file from a fixed offset on.

Every byte is this layer's data, so the parent is never read; reads and writes go straight to
the storage.  Block status asks the storage (``extent``: SEEK_DATA/SEEK_HOLE): a host hole is
reported as data that reads as zeroes (ALLOCATED | DATA | ZERO), which is what QEMU reports for
flat extents.  Zeroes punch or zero-range the host file, TRIM punches holes.  No metadata, so no
lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...storage.base import Pending, Storage
from ..base import ALLOCATED, DATA, ZERO, zero_in_place
from ..raw import DataRanges
from .extent import Extent

if TYPE_CHECKING:
    from .driver import VmdkDriver


class FlatExtent(Extent):
    grain_bits = 0

    def __init__(self, owner: VmdkDriver, start: int, size: int, storage: Storage, offset: int) -> None:
        super().__init__(owner, start, size)
        self.storage = storage
        self.offset = offset  # byte offset of the extent's first byte inside ``storage``
        self.readonly = storage.readonly
        self.why_readonly = f"extent file {storage.name} is not writable"
        self.known_data = DataRanges()

    async def status(self, rel: int, end: int) -> tuple[int, int]:
        at, stop = self.offset + rel, self.offset + end
        known = self.known_data.end_of(at)
        if known:
            return ALLOCATED | DATA, min(known, stop) - self.offset
        # ask about the rest of the extent: a data run is remembered whole
        run, is_data = await self.storage.extent(at, self.offset + self.size - at)
        if is_data:
            self.known_data.add(at, at + run)
            return ALLOCATED | DATA, min(at + run, stop) - self.offset
        return ALLOCATED | DATA | ZERO, min(at + max(run, 1), stop) - self.offset

    def map_now(self, rel: int) -> int | None:
        return self.offset + rel

    def read(self, rel: int, buf: memoryview) -> Pending:
        return self.storage.read(self.offset + rel, buf)

    def write(self, rel: int, data: memoryview) -> Pending:
        return self.storage.write(self.offset + rel, data)

    async def zero(self, rel: int, length: int, may_trim: bool) -> None:
        at = self.offset + rel
        if may_trim:
            self.known_data.forget(at, at + length)
        await zero_in_place(self.storage, at, length, may_trim)

    async def trim(self, rel: int, length: int) -> None:
        at = self.offset + rel
        self.known_data.forget(at, at + length)
        await self.storage.discard(at, length)

    async def flush(self) -> None:
        await self.storage.flush()

"""The contract every VMDK extent kind (flat, zero, hosted sparse, seSparse) implements.

An extent serves the guest byte range ``[start, start + size)`` of the disk; every offset passed
to its methods is relative to ``start``, and the driver guarantees ``0 <= rel``,
``rel + length <= size`` and ``length > 0`` (the driver splits requests at extent boundaries).

Runs: ``status(rel, end)`` describes one run from ``rel`` (not past ``end``) as a state of
``formats.base`` (ALLOCATED / DATA / ZERO).  ``map_now(rel)`` answers the image layer's mapping
memo for a granule that lies wholly in this extent (see ``formats.base``): the host offset of
plain data in ``storage``, or None.

``read(rel, buf)`` and ``write(rel, data)`` follow the driver contract's one route (they return a
``Pending``: None when done at once).  Reads fill the caller's buffer; the parts this layer does
not hold come from ``owner.read_backing`` at absolute disk offsets (``start + rel``).  Writes,
zeroes and trims change this extent only; the driver has already refused them if the image is
read-only.

Locking: ``owner.lock`` (the driver's CoMutex) guards the metadata of every extent; each method
that needs it takes it or says it is called with it held.  Data I/O to allocated grains runs
without it.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ...errors import NbdError
from ...storage.base import Pending, Storage
from ..base import ALLOCATED, ZERO, read_zeroes

if TYPE_CHECKING:
    from .driver import VmdkDriver


class Extent:
    """Defaults: a read-only extent whose bytes all read as zeroes (the ZERO extent type)."""

    storage: Storage | None = None
    readonly = True
    grain_bits = 0  # log2 of the grain size; 0: no grains (map_now answers any aligned granule)
    why_readonly = "ZERO extents cannot be written"

    def __init__(self, owner: VmdkDriver, start: int, size: int) -> None:
        self.owner = owner
        self.start = start
        self.size = size

    async def status(self, rel: int, end: int) -> tuple[int, int]:
        return ALLOCATED | ZERO, end

    def map_now(self, rel: int) -> int | None:
        return None

    def read(self, rel: int, buf: memoryview) -> Pending:
        return read_zeroes(rel, buf)

    def write(self, rel: int, data: memoryview) -> Pending:
        raise NbdError(errno.EROFS, "this extent is read-only")

    async def zero(self, rel: int, length: int, may_trim: bool) -> None:
        raise NbdError(errno.EROFS, "this extent is read-only")

    async def trim(self, rel: int, length: int) -> None:
        """A hint: free what can be freed; the default frees nothing."""

    async def cache_hint(self, rel: int, length: int) -> None:
        """Warm the metadata of the range (at most a bounded amount of it)."""

    async def flush(self) -> None:
        """Write back dirty metadata and sync the extent's file."""

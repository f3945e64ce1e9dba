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

Grain-table extents (hosted sparse and seSparse, ``GrainTableExtent``) map the guest range in
runs of one grain kind (``UNALLOCATED``, ``ZEROED``, ``PLAIN``; hosted sparse adds compressed
grains) through grain tables that each cover ``span`` guest bytes, and share the read loop over
those runs.

Locking: ``owner.lock`` (the driver's CoMutex) guards the metadata of every extent; each method
that needs it takes it or says it is called with it held.  Data I/O to allocated grains runs
without it.
"""

from __future__ import annotations

import errno
from array import array
from typing import TYPE_CHECKING

from ...errors import NbdError
from ...storage.base import Pending, Storage
from ..base import ALLOCATED, ZERO, TableReads, read_zeroes

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


# Run kinds of the grain-table extents (hosted sparse adds its own for compressed grains).
UNALLOCATED, ZEROED, PLAIN = 0, 1, 2


class GrainTableExtent(TableReads, Extent):
    """The read loop of an extent mapped by grain tables.  A subclass provides ``span`` (guest
    bytes per grain table), ``no_table`` (the sentinel its ``_peek`` returns for a grain table
    that does not exist, compared by identity), ``_peek(gdi)`` (the cached grain table, or None
    when it is not cached), ``_run(table, pos, end) -> (kind, stop, host)`` and, for kinds beyond
    the three above, ``_place(kind, host, pos, stop, part)``."""

    span: int
    no_table: array

    def _peek(self, gdi: int) -> array | None:
        raise NotImplementedError

    def _run(self, table: array, pos: int, end: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def _place(self, kind: int, host: int, pos: int, stop: int, part: memoryview) -> bool:
        """Fill ``part`` (guest ``[pos, stop)``) for a run of a subclass's own kind from what is
        cached, returning False when that is not possible without waiting.  Synchronous."""
        raise NotImplementedError

    def _read_cached(self, rel: int, buf: memoryview, pos: int, pendings: list) -> int:
        """Start the reads of ``buf`` (at ``rel``) from ``pos`` on, run by run, while the grain
        tables are cached (and ``_place`` can fill other kinds at once); returns where it
        stopped.  Synchronous."""
        end = rel + len(buf)
        span = self.span
        while pos < end:
            gdi = pos // span
            seg_end = min(end, (gdi + 1) * span)
            table = self._peek(gdi)
            if table is None:
                return pos
            if table is self.no_table:
                kind, stop, host = UNALLOCATED, seg_end, 0
            else:
                kind, stop, host = self._run(table, pos, seg_end)
            part = buf[pos - rel : stop - rel]
            p = None
            if kind == PLAIN:
                p = self.storage.read(host, part)
            elif kind == ZEROED:
                part[:] = bytes(len(part))
            elif kind == UNALLOCATED:
                p = self.owner.read_backing(self.start + pos, part)
            elif not self._place(kind, host, pos, stop, part):
                return pos
            if p is not None:
                pendings.append(p)
            pos = stop
        return pos

"""The format-driver contract: what every driver (raw, qcow2, qed, vpc, vhdx, vmdk, vdi) implements.

A driver owns the bytes of one image (one layer of a chain), kept in ``self.storage`` (the
``storage.base`` contract: a local file, an RBD image, an S3 object; a driver never knows
which).  The image layer (``nbdserve.image``) sits above it and guarantees, for every call below:
  * ``0 <= offset``, ``offset + length <= self.size``, ``length > 0``;
  * ``offset`` and ``length`` are multiples of ``self.limits.align`` (it does read-modify-write
    for anything smaller) and ``length <= self.limits.max_transfer``;
  * the image is writable when a writing method is called (``readonly`` is False).
So drivers do not re-check ranges.  They do check everything read from the storage.

Reads and writes, one way in each (``Pending`` is ``storage.base.Pending``)::

    read(offset, buf) -> Pending              # fill buf in place
    write(offset, data, *, fua) -> Pending    # data: a buffer, or a list of buffers (``vectored``)

Each completes synchronously and returns None when it can (the fast case: metadata cached, the
data plain, no FUA; the storage read or write itself completing at once), and otherwise returns
an awaitable the caller must wait for (typically the coroutine of the driver's slow case, or the
storage's own Pending passed up).  Nothing is done twice: the fast case lives inside the one
method, and a slow case that starts over after an await looks the tables up again.  A write's
``data`` belongs to the caller again once it has completed.  Only a driver with ``vectored`` set
is given a list of buffers (one guest-contiguous run written as one ``storage.write``).

Landings: a large WRITE payload may go from the socket straight into the image file instead of
through ``write`` (docs/landing.md).  ``landing(offset, length)`` answers synchronously where the
range lies, byte for byte, in a file that takes bytes by splice (``Landing``), and then keeps it
there until ``Landing.release``, though many loop turns pass: raw (the identity), qcow2
(allocated COPIED clusters, registered in flight so that zeroing, trim and allocation wait), QED
(data clusters, which never move while the image is open) and VHDX (FULLY_PRESENT blocks, which
zeroing and trim wait for) answer; the others never do.

Block status: ``block_status(offset, length)`` describes ONE run starting at ``offset`` (length
``<= length``); the image layer loops, merges runs and walks the backing chain.  ``offset`` and
``length`` are multiples of ``limits.align`` like every other call (the image layer widens an
unaligned question and clips the answer), and so must the run's length be (a sector is all one
state; the image layer fails the request with EIO otherwise), which keeps the next question
aligned.  ``size`` is a multiple of ``limits.align``.  A run's ``state`` is a combination of
  * ``ALLOCATED``: this layer decides the content (clear: "ask the backing image"; with no
    backing image the range reads as zeroes);
  * ``DATA``: host storage holds the data (clear with ALLOCATED: a zero cluster / hole);
  * ``ZERO``: the range is known to read as zeroes.

For ranges that are not ALLOCATED the driver fills in data from ``self.read_backing(offset, buf)
-> Pending`` (which the image layer sets; it reads the backing chain, or zeroes); copy-on-write
uses the same function.  A driver never opens its backing file itself: it reports ``backing``
(file name and recorded format) from ``open`` and the image layer opens it.

Mapping memo: a driver whose data lives in fixed-size granules (clusters, blocks) may set
``map_bits`` and answer ``map_now(offset)`` with the host offset (in ``map_storage``, by default
``storage``) of a granule that is plain data in this layer; the image layer remembers the
answers and reads such granules straight from that storage without asking the driver again.
In return the driver calls ``mappings_changed()`` in the same synchronous step in which a granule
``map_now`` could have answered for stops being plain data at that host offset: when it is
freed, moved to other host bytes, or turned into a zero/unallocated entry.  Who calls it:
  * qcow2: copy-on-write of a shared cluster (the guest cluster moves), WRITE_ZEROES and TRIM
    (entries become zero or unallocated, clusters are freed and may be reused);
  * VHDX: every BAT change that leaves a FULLY_PRESENT block (zeroing, trimming);
  * VDI: TRIM/zeroing that removes a block (the last block is moved into its place);
  * VMDK: every grain table change that drops or moves a mapped grain (sparse extents' zero
    and trim);
  * never QED or VHD: both only ever map new granules (QED turns only unallocated clusters
    into zero clusters and zeroes allocated ones in place; VHD never frees a block, and
    ``map_now`` answers only for blocks with every sector present, a state a block never
    leaves), and zeroing in place leaves a mapping true (the host bytes read as zeroes);
  * raw and LUKS have no memo (``map_bits`` 0: the host bytes are the guest's, or ciphertext).
Mapping a granule that was not mapped needs no call: the memo never holds unmapped granules.

Persistent dirty bitmaps: ``dirty_bitmap(name)`` gives the layer's bitmap of that name (None if it
has none), an object with ``extents(offset, length, limit) -> [(length, 1 dirty / 0 clean)]``
that stays current while the driver writes; it raises ``ImageError`` when the bitmap exists but
cannot be used.  The image layer searches the chain, top first.

Errors: ``NbdError(errno)`` for a failed request, ``OSError`` passes through, ``CorruptImage``
when metadata turns out to be bad at run time (the request fails with EIO).  ``open`` raises
``ImageError`` subclasses with a one-line reason naming the field.  A ``read``/``write`` may raise
synchronously or through its Pending.

Locking: each driver documents, at every method that assumes it, which lock it holds.  Metadata
(tables, refcounts, headers, allocation cursors) changes only under the driver's CoMutex; data I/O
to allocated clusters happens outside it, its mapping looked up and its storage I/O started with
no await in between (a landing, which spans awaits, holds its range as said above).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Protocol

from ..cache import ClusterCache
from ..storage.base import Pending, Storage, joined, settled, write_zero_bytes

# Block-status state bits (driver level; the image layer maps them to NBD flags).
DATA = 1
ZERO = 2
ALLOCATED = 4


class Extent(NamedTuple):
    length: int
    state: int


def _nothing() -> None:
    pass


class Landing(NamedTuple):
    """Where a WRITE payload may land (``FormatDriver.landing``): file descriptor ``fd`` from
    byte ``offset`` on; ``release()`` once the payload is in or the attempt ended."""

    fd: int
    offset: int
    release: Callable[[], None] = _nothing


@dataclass(frozen=True)
class Limits:
    align: int = 1  # request alignment in bytes (a power of two)
    max_transfer: int = 32 << 20  # largest read/write the driver takes in one call


@dataclass(frozen=True)
class Caps:
    native_zero: bool = False  # pwrite_zeroes is cheaper than writing zero bytes
    native_trim: bool = False  # pdiscard frees space
    fast_zero: bool = False  # pwrite_zeroes(fast=True) is metadata-only


@dataclass(frozen=True)
class BackingRef:
    name: str  # as recorded in the image
    format: str | None  # as recorded, or None (then probed, never raw-by-guess)


@dataclass
class OpenOptions:
    """Per-export knobs a driver may read (unknown ones are ignored)."""

    snapshot: str | None = None  # qcow2 internal snapshot to serve (read-only)
    vpc_size: str = "auto"  # VHD virtual size rule: auto | chs | current
    repair: str = "off"  # qcow2 inconsistencies found at a read-write open: off | leaks | all
    force_share: bool = False  # -U: files a driver opens itself are locked sharing writes too
    passphrase: bytes | None = None  # key-secret of an encrypted image (LUKS, qcow2 encryption)
    backing_passphrase: bytes | None = None  # the same for every encrypted image below it in the chain
    extra: dict[str, str] = field(default_factory=dict)
    # Set by the image layer: ``resolve(image_path, name, what=...)`` turns a file name an image
    # records for itself (VMDK extents) into a path inside the allowed directories, or raises
    # ImageError naming ``what``.
    resolve: ResolvePath | None = None


ResolvePath = Callable[..., str]


class DirtyBitmapView(Protocol):
    """A persistent dirty bitmap as block status reports it (see "Persistent dirty bitmaps")."""

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]: ...


ReadBacking = Callable[[int, memoryview], Pending]
ZEROES = bytes(1 << 20)  # a source of zero bytes (never written to)


def read_zeroes(offset: int, buf: memoryview) -> Pending:
    """``read_backing`` for a layer without a backing image (completes at once)."""
    n = len(buf)
    if n <= len(ZEROES):
        buf[:] = ZEROES[:n]
    else:
        buf[:] = bytes(n)
    return None


async def zero_in_place(storage: Storage, at: int, n: int, may_trim: bool) -> None:
    """Make host bytes ``[at, at+n)`` read as zeroes: natively (unmapping if allowed), else by
    writing zero bytes."""
    if not await storage.write_zeroes(at, n, may_unmap=may_trim):
        await write_zero_bytes(storage, at, n)


class TableReads:
    """``read`` for a driver whose mapping lives in cached tables: the one shape every such
    driver's read has.  The fast case starts every piece the cached tables place
    (``_read_cached``) and completes synchronously if that covers ``buf``; otherwise the rest
    is a coroutine that loads what was missing (``_load_for_read``), walks on, and finally waits for
    every storage read started (also when a load fails, so none is left writing into ``buf``).

    The driver provides, with positions that are guest offsets (``guest_positions``) or
    offsets into ``buf``:
      * ``_read_cached(offset, buf, pos, pendings) -> pos``: synchronously start the reads from
        ``pos`` on (their Pendings appended to ``pendings``) while the tables are cached;
        return where it stopped;
      * ``async _load_for_read(offset, buf, pos, pendings) -> pos``: load what ``_read_cached`` stopped
        at (it may also serve a piece itself and return a later position).
    """

    guest_positions: ClassVar[bool] = True

    def read(self, offset: int, buf: memoryview) -> Pending:
        start = offset if self.guest_positions else 0
        pendings: list = []
        pos = self._read_cached(offset, buf, start, pendings)
        if pos == start + len(buf):
            return joined(pendings)
        return self._read_loading(offset, buf, pos, start + len(buf), pendings)

    async def _read_loading(self, offset: int, buf: memoryview, pos: int, end: int, pendings: list) -> None:
        try:
            while pos < end:
                pos = await self._load_for_read(offset, buf, pos, pendings)
                pos = self._read_cached(offset, buf, pos, pendings)
        finally:
            await settled(joined(pendings))

    def _read_cached(self, offset: int, buf: memoryview, pos: int, pendings: list) -> int:
        raise NotImplementedError

    async def _load_for_read(self, offset: int, buf: memoryview, pos: int, pendings: list) -> int:
        raise NotImplementedError


class InPlaceWrites:
    """``write`` for a driver whose writes to granules already allocated need no metadata change:
    the one shape QED's, VHD's (dynamic and differencing), VHDX's and VDI's ``write`` has.  The
    fast case (no FUA) starts every piece without the lock and completes synchronously if the
    cached tables place the whole range; otherwise, having written nothing, it returns the
    coroutine of the slow case.

    The driver provides:
      * ``_write_in_place(offset, data) -> list | None``: synchronously start the writes and
        return their Pendings (``start_writes``), or None having written nothing;
      * ``async _write_slow(offset, data, fua)``: everything else (it may try in place again).
    """

    def write(self, offset: int, data: memoryview, *, fua: bool) -> Pending:
        pendings = None if fua else self._write_in_place(offset, data)
        if pendings is None:
            return self._write_slow(offset, data, fua)
        return joined(pendings)

    def _write_in_place(self, offset: int, data: memoryview) -> list | None:
        raise NotImplementedError

    async def _write_slow(self, offset: int, data: memoryview, fua: bool) -> None:
        raise NotImplementedError


def start_writes(storage: Storage, data: memoryview, plan: list[tuple[int, int, int]]) -> list:
    """Start writing ``data[pos : pos + length]`` at host ``at`` for each ``(at, pos, length)`` of
    ``plan``; the Pendings of those that must wait (an in-place write's last step)."""
    pendings = []
    for at, pos, length in plan:
        p = storage.write(at, data[pos : pos + length])
        if p is not None:
            pendings.append(p)
    return pendings


class FormatDriver:
    """Base class with the contract above; the defaults emulate what a driver lacks."""

    format_name: ClassVar[str]

    size: int
    readonly: bool
    storage: Storage
    limits: Limits = Limits()
    caps: Caps = Caps()
    vectored: bool = False  # write takes a list of buffers (a guest-contiguous run)
    backing: BackingRef | None = None
    read_backing: ReadBacking = staticmethod(read_zeroes)
    map_bits: int = 0  # log2 of the mapping granule; 0: no map_now
    map_storage: Storage | None = None  # where map_now offsets point (None: ``storage``)
    encrypted: bool = False  # data is encrypted at rest (so e.g. a plaintext -s overlay is refused)

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        """0..100: how sure the driver is that ``head`` (first 512 bytes) is its format."""
        return 0

    @classmethod
    async def open(cls, storage: Storage, *, readonly: bool, cache: ClusterCache, options: OpenOptions) -> FormatDriver:
        raise NotImplementedError

    def read(self, offset: int, buf: memoryview) -> Pending:
        """Fill ``buf`` with the layer's contents at ``offset`` (see "Reads and writes")."""
        raise NotImplementedError

    def write(self, offset: int, data: memoryview, *, fua: bool) -> Pending:
        """Write ``data`` at ``offset``; with ``fua`` it is durable on completion."""
        raise NotImplementedError

    def map_now(self, offset: int) -> int | None:
        """Where the granule holding ``offset`` (``1 << map_bits`` bytes, aligned) starts in
        ``map_storage`` (or ``storage``), if all of it is plain data in this layer and the cached
        metadata says so; else None.  Synchronous, no side effects; the host range must lie
        inside that storage."""
        return None

    def landing(self, offset: int, length: int) -> Landing | None:
        """A ``Landing`` if guest bytes ``[offset, offset + length)`` of a plain WRITE (no FUA)
        may be put straight into a file, byte for byte, instead of going through ``write``;
        else None, having changed nothing.  Synchronous.  The session lands the payload over
        several loop turns (``server.landing``) and then calls ``release`` (also when the
        connection dies first); until then the driver must keep the range where it said
        (nothing may free, move or reallocate it) and must have done whatever its ``write``
        does before data reaches the file (dirty bitmaps)."""
        return None

    def mappings_changed(self) -> None:
        """See "Mapping memo" above; the image layer replaces this to drop its memo."""

    async def pwrite_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        """Only called when ``caps.native_zero``; raise NbdError(ENOTSUP) if ``fast`` cannot be honoured."""
        raise NotImplementedError

    async def pdiscard(self, offset: int, length: int) -> None:
        """Only called when ``caps.native_trim``.  A hint: the driver may do less."""
        raise NotImplementedError

    async def flush(self) -> None:
        raise NotImplementedError

    async def block_status(self, offset: int, length: int) -> Extent:
        return Extent(length, ALLOCATED | DATA)

    async def dirty_bitmap(self, name: str) -> DirtyBitmapView | None:
        """The persistent dirty bitmap ``name`` of this layer, or None (see above)."""
        return None

    async def cache_hint(self, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: warm metadata for the range.  Failure must not change semantics."""

    async def close(self) -> None:
        """Flush metadata, mark the image clean, release the file."""

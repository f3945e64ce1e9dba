"""The format-driver contract: what every driver (raw, qcow2, qed, vpc, vhdx) implements.

A driver owns the bytes of one image file (one layer of a chain).  The image layer
(``nbdserve.image``) sits above it and guarantees, for every call below:
  * ``0 <= offset``, ``offset + length <= self.size``, ``length > 0``;
  * ``offset`` and ``length`` are multiples of ``self.limits.align`` (it does read-modify-write
    for anything smaller) and ``length <= self.limits.max_transfer``;
  * the image is writable when a writing method is called (``readonly`` is False).
So drivers do not re-check ranges.  They do check everything read from the file.

Block status: ``block_status(offset, length)`` describes ONE run starting at ``offset`` (length
``<= length``); the image layer loops, merges runs and walks the backing chain.  A run's ``state``
is a combination of
  * ``ALLOCATED``: this layer decides the content (clear: "ask the backing image"; with no
    backing image the range reads as zeroes);
  * ``DATA``: host storage holds the data (clear with ALLOCATED: a zero cluster / hole);
  * ``ZERO``: the range is known to read as zeroes.

Reads fill caller buffers in place.  ``read_now`` is the synchronous twin of ``preadv`` for the
common case (cached metadata, plain data): the server answers such reads without a coroutine;
``write_now`` does the same for writes into allocated space.

Mapping memo: a driver whose data lives in fixed-size granules (clusters, blocks) may set
``map_bits`` and answer ``map_now(offset)`` with the host offset of a granule that is plain data in
this layer; the image layer remembers the answers and reads such granules straight from ``file``
without asking the driver again.  In return the driver calls ``mappings_changed()`` right after it
changes where, or whether, guest data lives (freeing, relocating or zeroing a data granule), in
the same synchronous step as the table change; creating a mapping where there was none needs no
call (the memo never holds unmapped granules).
For ranges that are not ALLOCATED the driver fills in data from ``self.read_backing`` (which
the image layer sets; it reads the backing chain or zeroes); copy-on-write uses the same
function.  A driver never opens its backing file itself: it reports ``backing`` (file name and
recorded format) from ``open`` and the image layer opens it.

Persistent dirty bitmaps: ``dirty_bitmap(name)`` gives the layer's bitmap of that name (None if it
has none), an object with ``extents(offset, length, limit) -> [(length, 1 dirty / 0 clean)]``
that stays current while the driver writes; it raises ``ImageError`` when the bitmap exists but
cannot be used.  The image layer searches the chain, top first.

Errors: ``NbdError(errno)`` for a failed request, ``OSError`` passes through, ``CorruptImage``
when metadata turns out to be bad at run time (the request fails with EIO).  ``open`` raises
``ImageError`` subclasses with a one-line reason naming the field.

Locking: each driver documents, at every method that assumes it, which lock it holds.  Metadata
(tables, refcounts, headers, allocation cursors) changes only under the driver's CoMutex; data I/O
to allocated clusters happens outside it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Protocol

from ..cache import ClusterCache
from ..storage.local import LocalFile

# Block-status state bits (driver level; the image layer maps them to NBD flags).
DATA = 1
ZERO = 2
ALLOCATED = 4


class Extent(NamedTuple):
    length: int
    state: int


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
    extra: dict[str, str] = field(default_factory=dict)
    # Set by the image layer: ``resolve(image_path, name, what=...)`` turns a file name an image
    # records for itself (VMDK extents) into a path inside the allowed directories, or raises
    # ImageError naming ``what``.
    resolve: ResolvePath | None = None


ResolvePath = Callable[..., str]


class DirtyBitmapView(Protocol):
    """A persistent dirty bitmap as block status reports it (see "Persistent dirty bitmaps")."""

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]: ...


ReadBacking = Callable[[int, memoryview], Awaitable[None]]


async def read_zeroes(offset: int, buf: memoryview) -> None:
    """``read_backing`` for a layer without a backing image."""
    buf[:] = bytes(len(buf))


def zero_in_place(file: LocalFile, at: int, n: int, may_trim: bool) -> None:
    """Make host bytes ``[at, at+n)`` read as zeroes: punch (if allowed), zero-range or write."""
    if not ((may_trim and file.punch_hole(at, n)) or file.zero_range(at, n)):
        file.fill_zeroes(at, n)


class FormatDriver:
    """Base class with the contract above; the defaults emulate what a driver lacks."""

    format_name: ClassVar[str]

    size: int
    readonly: bool
    file: LocalFile
    limits: Limits = Limits()
    caps: Caps = Caps()
    backing: BackingRef | None = None
    read_backing: ReadBacking = staticmethod(read_zeroes)
    map_bits: int = 0  # log2 of the mapping granule; 0: no map_now
    map_file: LocalFile | None = None  # the file map_now offsets refer to (None: ``file``)

    @classmethod
    def probe(cls, head: bytes, file_size: int) -> int:
        """0..100: how sure the driver is that ``head`` (first 512 bytes) is its format."""
        return 0

    @classmethod
    async def open(cls, file: LocalFile, *, readonly: bool, cache: ClusterCache, options: OpenOptions) -> FormatDriver:
        raise NotImplementedError

    async def preadv(self, offset: int, buf: memoryview) -> None:
        raise NotImplementedError

    def read_now(self, offset: int, buf: memoryview) -> bool:
        """The synchronous hot path: fill ``buf`` and return True if that needs no waiting (the
        metadata is cached, the data is plain); else return False without side effects and the
        caller uses ``preadv``.  Same guarantees as ``preadv``.  Default: never possible."""
        return False

    def map_now(self, offset: int) -> int | None:
        """Where the granule holding ``offset`` (``1 << map_bits`` bytes, aligned) starts in
        ``map_file`` (or ``file``), if all of it is plain data in this layer and the cached
        metadata says so; else None.  Synchronous, no side effects; the host range must lie
        inside that file."""
        return None

    def mappings_changed(self) -> None:
        """See "Mapping memo" above; the image layer replaces this to drop its memo."""

    async def pwritev(self, offset: int, data: memoryview, *, fua: bool) -> None:
        raise NotImplementedError

    def write_now(self, offset: int, data: memoryview) -> bool:
        """The synchronous twin of ``pwritev`` (without FUA) for writes that need no allocation
        and no waiting; False, without side effects, otherwise.  Default: never possible."""
        return False

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

    def dirty_bitmap(self, name: str) -> DirtyBitmapView | None:
        """The persistent dirty bitmap ``name`` of this layer, or None (see above)."""
        return None

    async def cache_hint(self, offset: int, length: int) -> None:
        """NBD_CMD_CACHE: warm metadata for the range.  Failure must not change semantics."""

    async def close(self) -> None:
        """Flush metadata, mark the image clean, release the file."""

"""What an export presents of its image: qemu-nbd's ``--cache``, ``--discard``, ``--detect-zeroes``
and ``-o/--offset`` rules, applied between the session and the image layer.

Owns ``IoPolicy`` (the four settings, validated) and ``View``, an object with the ``Image``
methods a session calls.  With the default policy no ``View`` is made at all (the session calls
the image directly); otherwise every call is adjusted here.  ``read`` and ``write`` keep the
image's contract (``storage.base.Pending``: None when done at once), so a View costs the hot path
one call at most.

Semantics (QEMU's, see qemu-nbd(8) and the QEMU block layer's cache options):
  * ``--cache``: ``writeback`` (the default): writes may sit in the host page cache until FLUSH
    or FUA; ``writethrough``: every write, zero-write and trim is made durable before its reply
    (FUA on all of them); ``none``: like writeback, but the image file is opened with O_DIRECT
    where the filesystem allows (see ``nbdserve.storage.local``); ``directsync``: O_DIRECT and
    writethrough; ``unsafe``: FLUSH and FUA do nothing (fast, and a host crash loses data).
  * ``--discard=ignore``: TRIM is accepted and does nothing, and WRITE_ZEROES never deallocates;
    ``unmap``: TRIM deallocates where the format can (nbdserve's default; qemu-nbd's is ignore).
  * ``--detect-zeroes``: a WRITE whose data is all zero bytes becomes WRITE_ZEROES (``on``),
    allowed to deallocate when discards are on (``unmap``, which needs ``--discard=unmap``).
  * ``--offset N``: the export starts N bytes into the (decoded) image and is that much shorter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..storage.base import Pending

CACHE_MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")
DISCARD_MODES = ("ignore", "unmap")
DETECT_ZEROES_MODES = ("off", "on", "unmap")


class PolicyError(ValueError):
    """Settings that contradict each other; the message is shown as is."""


@dataclass(frozen=True)
class IoPolicy:
    cache: str = "writeback"
    discard: str = "unmap"
    detect_zeroes: str = "off"
    offset: int = 0

    def check(self) -> None:
        if self.cache not in CACHE_MODES:
            raise PolicyError(f"cache mode {self.cache!r}: one of {', '.join(CACHE_MODES)}")
        if self.discard not in DISCARD_MODES:
            raise PolicyError(f"discard mode {self.discard!r}: ignore or unmap")
        if self.detect_zeroes not in DETECT_ZEROES_MODES:
            raise PolicyError(f"detect-zeroes mode {self.detect_zeroes!r}: off, on or unmap")
        if self.detect_zeroes == "unmap" and self.discard != "unmap":
            raise PolicyError("detect-zeroes=unmap needs discard=unmap (as in QEMU)")
        if self.offset < 0:
            raise PolicyError(f"offset {self.offset} is negative")

    @property
    def direct(self) -> bool:
        """Open the image file with O_DIRECT (bypassing the host page cache)."""
        return self.cache in ("none", "directsync")

    @property
    def writethrough(self) -> bool:
        return self.cache in ("writethrough", "directsync")

    @property
    def plain(self) -> bool:
        """The image is served as it is: no View needed."""
        return (
            self.cache in ("writeback", "none")
            and self.discard == "unmap"
            and self.detect_zeroes == "off"
            and (self.offset == 0)
        )


class View:
    """An image seen through an ``IoPolicy`` (see the module docstring)."""

    def __init__(self, image: Any, policy: IoPolicy) -> None:
        if policy.offset > image.size:
            raise PolicyError(f"offset {policy.offset} is beyond the end of the image ({image.size} bytes)")
        self.image = image
        self.policy = policy
        self.off = off = policy.offset
        self.size = image.size - off
        self.readonly = image.readonly
        self.path = image.path
        self.format = image.format
        self._fua_all = policy.writethrough
        self._fua_none = policy.cache == "unsafe"
        self._trim = policy.discard == "unmap"
        self._detect = policy.detect_zeroes != "off"
        self._detect_unmap = policy.detect_zeroes == "unmap"
        # A run of WRITE payloads is handed on whole only where no payload is looked at here.
        self.vectored = image.vectored and not self._detect
        if not off:
            self.read = image.read  # the hot path stays the image's own bound method

    def _fua(self, fua: bool) -> bool:
        return (fua or self._fua_all) and not self._fua_none

    def read(self, offset: int, buf: memoryview) -> Pending:
        return self.image.read(offset + self.off, buf)

    def write(self, offset: int, data: memoryview | list[memoryview], *, fua: bool) -> Pending:
        if self._detect and _all_zero(data):  # never a list: not ``vectored`` then
            return self.image.write_zeroes(
                offset + self.off, len(data), may_trim=self._detect_unmap, fast=False, fua=self._fua(fua)
            )
        return self.image.write(offset + self.off, data, fua=self._fua(fua))

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool, fast: bool, fua: bool) -> None:
        await self.image.write_zeroes(
            offset + self.off, length, may_trim=may_trim and self._trim, fast=fast, fua=self._fua(fua)
        )

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        if self._trim:
            await self.image.trim(offset + self.off, length, fua=self._fua(fua))
        elif self._fua(fua):
            await self.image.flush()

    async def flush(self) -> None:
        if not self._fua_none:
            await self.image.flush()

    async def cache_hint(self, offset: int, length: int) -> None:
        await self.image.cache_hint(offset + self.off, length)

    async def runs(self, offset: int, length: int, **kw: Any) -> list:
        return await self.image.runs(offset + self.off, length, **kw)

    async def close(self) -> None:
        await self.image.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.image, name)  # anything else the image offers, unchanged


_ZERO = bytes(1 << 20)


def _all_zero(data: memoryview) -> bool:
    """True if every byte is zero: the first and last bytes decide most writes at once, the rest
    is compared with a zero buffer in 1 MiB slices (a memcmp; comparing memoryviews is slow)."""
    view = memoryview(data).cast("B")
    n = len(view)
    if not n or view[0] or view[n - 1]:
        return not n
    for pos in range(0, n, len(_ZERO)):
        part = bytes(view[pos : pos + len(_ZERO)])
        if part != _ZERO[: len(part)]:
            return False
    return True

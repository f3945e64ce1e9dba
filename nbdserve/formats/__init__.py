"""The format drivers, listed once, and format probing.

``DRIVERS`` is the one explicit list of drivers.  ``UNDECODED`` is the one table of formats
nbdserve recognises by their magic but does not decode (Parallels, qcow version 1, ...).  ``identify`` names
the format the first bytes of a file belong to, from both; ``probe`` turns that into a driver.

Rules (docs/probing.md):
  * A file with the magic of an undecoded format is refused, naming the format: serving it as
    raw would expose (and let clients overwrite) its metadata.  ``-f raw`` serves it as raw.
  * A file with no recognised magic is raw only when the caller allows raw-by-default (the image
    given on the command line), never for a backing file with no recorded format.
  * A probed-raw image must never turn into a format by a client's write: ``identify`` is also the
    judge of what a write into its first sector would create (see ``formats.raw``).

A format that gains a driver is probed by the driver; its ``UNDECODED`` line is then ignored (and
can be deleted).
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import UnsupportedImage
from .base import FormatDriver
from .luks import LuksDriver
from .qcow2 import Qcow2Driver
from .qed import QedDriver
from .raw import RawDriver
from .vdi import VdiDriver
from .vhd import VhdDriver
from .vhdx import VhdxDriver
from .vmdk import VmdkDriver

DRIVERS: tuple[type[FormatDriver], ...] = (
    RawDriver,
    Qcow2Driver,
    QedDriver,
    VhdDriver,
    VhdxDriver,
    VmdkDriver,
    VdiDriver,
    LuksDriver,
)

BY_NAME: dict[str, type[FormatDriver]] = {d.format_name: d for d in DRIVERS}

PROBE_SIZE = 512  # bytes of the file's start that probing looks at (and a probed-raw image guards)


UNDECODED: dict[str, Callable[[bytes], bool]] = {
    "parallels": lambda h: h[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt"),
    "qcow": lambda h: h[:8] == b"QFI\xfb\x00\x00\x00\x01",  # qcow version 1 (qcow2 is 2 and 3)
    "bochs": lambda h: h.startswith(b"Bochs Virtual HD Image"),
    "cloop": lambda h: h.startswith(b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0"),
}


def driver_for(name: str, path: str) -> type[FormatDriver]:
    try:
        return BY_NAME[name]
    except KeyError:
        known = ", ".join(sorted(BY_NAME))
        raise UnsupportedImage(path, f"unknown format {name!r} (known: {known})") from None


def identify(head: bytes, file_size: int) -> tuple[str, type[FormatDriver] | None] | None:
    """The format whose magic ``head`` (the file's first ``PROBE_SIZE`` bytes) carries, other
    than raw: (name, its driver or None if nbdserve does not decode it); None if there is none."""
    for name, matches in UNDECODED.items():
        if name not in BY_NAME and matches(head):
            return name, None
    best, score = None, 1
    for drv in DRIVERS:
        s = drv.probe(head, file_size)
        if s > score:
            best, score = drv, s
    return (best.format_name, best) if best is not None else None


def probe(head: bytes, file_size: int, path: str, *, raw_fallback: bool) -> type[FormatDriver]:
    """The driver for an image whose first bytes are ``head``."""
    found = identify(head, file_size)
    if found is not None:
        name, drv = found
        if drv is not None:
            return drv
        hint = " (-f raw serves its bytes as they are)" if raw_fallback else ""
        raise UnsupportedImage(path, f"a {name} image, a format nbdserve does not decode{hint}")
    if raw_fallback:
        return RawDriver
    raise UnsupportedImage(path, "not a recognised image format and no format recorded; refusing to guess raw")

"""The format drivers, listed once, and format probing.

``DRIVERS`` is the one explicit list of drivers.  ``probe`` picks the driver whose magic matches
best; an image with no recognised magic is raw only when the caller allows raw-by-default (the
top image given on the command line), never for a backing file with no recorded format.
"""

from __future__ import annotations

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


def driver_for(name: str, path: str) -> type[FormatDriver]:
    try:
        return BY_NAME[name]
    except KeyError:
        known = ", ".join(sorted(BY_NAME))
        raise UnsupportedImage(path, f"unknown format {name!r} (known: {known})") from None


def probe(head: bytes, file_size: int, path: str, *, raw_fallback: bool) -> type[FormatDriver]:
    """The best-matching driver for an image whose first bytes are ``head``."""
    best, score = None, 1
    for drv in DRIVERS:
        s = drv.probe(head, file_size)
        if s > score:
            best, score = drv, s
    if best is not None:
        return best
    if raw_fallback:
        return RawDriver
    raise UnsupportedImage(path, "not a recognised image format and no format recorded; refusing to guess raw")

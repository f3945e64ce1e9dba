"""Error types shared by every layer, and the one errno -> NBD error table.

Owns:
  * ``NbdError``: a request failed with an errno; raised by drivers and the image layer and turned
    into an NBD error reply by the server.  Never ends the connection.
  * ``ImageError`` and its subclasses ``CorruptImage`` / ``UnsupportedImage``: an image cannot be
    opened (or, for ``CorruptImage`` found at run time, can no longer be trusted).  ``str()`` is a
    single line naming the file and the field, e.g. ``disk.qcow2: L1 table offset 0x… beyond end
    of file``.
  * ``nbd_errno``: the only place errnos become NBD error numbers.
  * ``for_client``: the text a client may see.  Messages name files by their full path for the
    server's log; what goes over the wire names them by their file name only, so no reply tells a
    client where the server keeps its images.

Invariants: the NBD error numbers sent on the wire are only those the spec defines; ENOTSUP is
sent only for FAST_ZERO, EOVERFLOW only for DF or oversize requests without payload.
"""

from __future__ import annotations

import errno as _errno
import re

# NBD error values (spec "Error values"); equal to the Linux errnos of the same name.
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108


class NbdError(Exception):
    """A request failed; ``errno`` says why, ``message`` is for humans (log, error chunk)."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno
        self.message = message


class ImageError(Exception):
    """An image cannot be served.  The message is one line: ``path: what is wrong``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class CorruptImage(ImageError):
    """The image's metadata contradicts itself or the file (offsets past EOF, overlaps, bad CRC)."""


class UnsupportedImage(ImageError):
    """A valid image using a feature nbdserve does not implement (or refuses to, e.g. encryption)."""


_TO_NBD = {
    _errno.EPERM: NBD_EPERM,
    _errno.EROFS: NBD_EPERM,
    _errno.EACCES: NBD_EPERM,
    _errno.EIO: NBD_EIO,
    _errno.EINVAL: NBD_EINVAL,
    _errno.ENOSPC: NBD_ENOSPC,
    _errno.EDQUOT: NBD_ENOSPC,
    _errno.EFBIG: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW,
    _errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_errno(err: int, *, fast_zero: bool = False) -> int:
    """Map an OS errno to the NBD error sent on the wire.

    ENOTSUP/EOPNOTSUPP become NBD_ENOTSUP only for a FAST_ZERO request (the one place the spec
    allows it) and EINVAL otherwise.  ENOMEM and anything unknown become EIO.
    """
    if err in (_errno.ENOTSUP, _errno.EOPNOTSUPP):
        return NBD_ENOTSUP if fast_zero else NBD_EINVAL
    return _TO_NBD.get(err, NBD_EIO)


def error_of(exc: BaseException) -> tuple[int, str]:
    """(errno, message) for an exception escaping a driver: NbdError, OSError or a bug (EIO)."""
    if isinstance(exc, NbdError):
        return exc.errno, exc.message or str(exc)
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno, exc.strerror or str(exc)
    if isinstance(exc, CorruptImage):
        return _errno.EIO, str(exc)
    return _errno.EIO, f"internal error: {type(exc).__name__}: {exc}"


# An absolute path not inside another word (or URI): kept are the last component
# and whatever follows it (a colon, quote or space).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^\s/'\":]+/)*([^\s/'\":]+)")


def for_client(message: str) -> str:
    """``message`` with every absolute path shortened to its file name (for error replies)."""
    return _ABSOLUTE_PATH.sub(r"\1", message)

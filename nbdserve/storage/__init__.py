"""Storage backends: where an image's bytes live (a local file, a Ceph RBD image, an S3 object).

The contract every backend implements is ``storage.base.Storage``; format drivers, the cluster
cache and the image layer use only that contract and never know which backend they run on.

``open_storage`` is the one way the image layer opens a location: a local file exactly as before
(``local.open_locked``: QEMU-compatible image locks, O_DIRECT on request), an RBD image (writers
take RBD's exclusive lock, read-only and snapshot opens take none), an S3 object (read-only).
The Ceph and S3 modules are imported only when such a location is opened, so local files never
pay for them.
"""

from __future__ import annotations

from .base import Storage
from .location import LocalLocation, Location, RbdLocation


async def open_storage(
    location: Location, *, readonly: bool, force_share: bool = False, direct: bool = False
) -> Storage:
    """Open ``location`` read-write exactly when ``readonly`` is False.  ``force_share`` and
    ``direct`` concern local files only (image locks, O_DIRECT).  Raises ``ImageError`` with a
    one-line reason."""
    if isinstance(location, LocalLocation):
        from .local import open_locked

        return open_locked(location.path, readonly=readonly, force_share=force_share, direct=direct)
    if isinstance(location, RbdLocation):
        from .rbd import RbdStorage

        return await RbdStorage.open(location, readonly=readonly)
    from .s3 import S3Storage

    if not readonly:
        from ..errors import ImageError

        raise ImageError(location.name, "S3 objects are served read-only (give an overlay for writes)")
    return await S3Storage.open(location)


async def close_storage(storage: Storage) -> None:
    """Close a store the image layer opened but could not use (a failed probe or open)."""
    close_now = getattr(storage, "close_now", None)
    if close_now is not None:  # a local file: at once, no loop turn
        close_now()
    else:
        await storage.close()

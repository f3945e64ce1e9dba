"""The ``-s/--snapshot`` mode: serve an image through a throw-away qcow2 overlay.

Owns ``open_with_overlay``: opens the image (and its chain) read-only, creates an empty qcow2 v3
overlay in the temporary directory whose backing file is the image (absolute path, with the
image's format recorded), opens the overlay read-write on top of the already-open image, and
registers the overlay file in ``Image._cleanup`` so closing the export deletes it.  The original
image is never written.
"""

from __future__ import annotations

import os
import tempfile

from ..cache import ClusterCache
from ..image import Image, ImageSpec, _open_layer
from ..storage.local import open_locked
from .base import OpenOptions
from .qcow2 import Qcow2Driver
from .qcow2.create import create_qcow2


async def open_with_overlay(spec: ImageSpec, cache: ClusterCache) -> Image:
    top_dir = os.path.dirname(os.path.realpath(spec.path))
    allowed = tuple(os.path.realpath(d) for d in spec.backing.allowed_dirs) or (top_dir,)
    base = await _open_layer(
        spec.path,
        spec.format,
        True,
        spec.options,
        cache,
        spec.backing,
        allowed,
        0,
        set(),
        raw_fallback=True,
        force_share=spec.force_share,
    )
    path = None
    try:
        fd, path = tempfile.mkstemp(prefix="nbdserve-overlay-", suffix=".qcow2")
        os.close(fd)
        os.unlink(path)  # re-created exclusively below
        create_qcow2(path, base.size, backing_file=os.path.realpath(spec.path), backing_format=base.format)
        file = open_locked(path, readonly=False)
        try:
            driver = await Qcow2Driver.open(file, readonly=False, cache=cache, options=OpenOptions())
        except BaseException:
            cache.discard_storage(file)
            file.close_now()
            raise
        image = Image(driver, base, cache)
        image._cleanup.append(path)
        return image
    except BaseException:
        await base.close()
        if path is not None and os.path.exists(path):
            os.unlink(path)
        raise

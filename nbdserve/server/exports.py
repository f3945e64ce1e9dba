"""The exports a server offers: each an open image shared by all of its connections.

Owns ``Export`` (name, description, the open ``Image`` or the one-line reason it failed to open,
the persistent dirty bitmaps it exports: ``-B``)
and ``ExportTable`` (lookup by name, in configuration order).  An image is opened once, at
start-up, and shared by every connection, which is what makes multi-conn true: all connections of
an export see one driver, one cache and one file.

An export that fails to open stays listed with ``image = None`` and its reason; clients asking for
it get that reason as an error, and every other export keeps serving.

``image`` is the open ``Image``, or a ``server.view.View`` over it when the export's I/O settings
(``--cache``, ``--discard``, ``--detect-zeroes``, ``--offset``) change what clients see.  A reload
(``server/listeners.py``) may replace the table's contents (``ExportTable.replace``: sessions
still negotiating see the new set at once) and retire an export: ``retired`` is then set, it is
no longer listed, and its image is closed once its last connection is gone.

Each export also carries its access settings (whether it needs TLS, its allow rules, its
connection limit) and the number of connections transmitting on it; ``server/options.py``
decides with them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..authz import AccessRules
from ..cache import ClusterCache
from ..config import ExportConfig, ServerConfig
from ..errors import ImageError, for_client
from ..formats.base import DirtyBitmapView, OpenOptions
from ..image import BackingPolicy, Image, ImageSpec, open_image
from .view import IoPolicy, PolicyError, View

log = logging.getLogger("nbdserve")


@dataclass
class Export:
    name: str
    description: str
    readonly: bool
    image: Image | None
    error: str = ""  # why it failed to open, as a client may see it (no server paths)
    connections: int = 0  # connections in transmission phase on this export
    tls_only: bool = False  # served only once TLS is up (SELECTIVETLS)
    access: AccessRules = field(default_factory=AccessRules)
    max_connections: int = 0  # 0: unlimited
    config: ExportConfig | None = None  # what it was opened from (a reload compares against it)
    retired: bool = False  # removed or replaced by a reload; closed when its last client leaves
    bitmaps: dict[str, DirtyBitmapView] = field(default_factory=dict)  # name -> bitmap, in -B order

    @property
    def size(self) -> int:
        return self.image.size if self.image is not None else 0


class ExportTable:
    def __init__(self, exports: list[Export]) -> None:
        self._by_name = {e.name: e for e in exports}

    def replace(self, exports: list[Export]) -> None:
        self._by_name = {e.name: e for e in exports}

    def get(self, name: str) -> Export | None:
        return self._by_name.get(name)

    def __iter__(self) -> Iterator[Export]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)


def image_spec(e: ExportConfig, cfg: ServerConfig) -> ImageSpec:
    return ImageSpec(
        path=e.path,
        location=e.location,
        overlay=e.overlay,
        format=e.format,
        readonly=e.readonly or e.load_snapshot is not None,
        snapshot_overlay=e.snapshot,
        force_share=e.force_share,
        direct=io_policy(e).direct,
        options=OpenOptions(
            snapshot=e.load_snapshot,
            vpc_size=e.vpc_size,
            repair=e.repair,
            passphrase=cfg.secrets[e.key_secret] if e.key_secret is not None else None,
            backing_passphrase=cfg.secrets[e.backing_key_secret] if e.backing_key_secret is not None else None,
        ),
        backing=BackingPolicy(allowed_dirs=cfg.backing_dirs),
    )


def settings(e: ExportConfig) -> dict:
    """The Export fields that follow from an export's access settings (changeable by a reload)."""
    return {
        "tls_only": e.tls == "required",
        "access": AccessRules.build(f"export {e.name!r}", e.allow, e.tls_authz),
        "max_connections": e.max_connections,
    }


def io_policy(e: ExportConfig) -> IoPolicy:
    return IoPolicy(e.cache, e.discard, e.detect_zeroes, e.offset)


def present(image: Image, e: ExportConfig) -> Image | View:
    """The image as the export shows it (a View when its I/O settings are not the defaults)."""
    policy = io_policy(e)
    if policy.plain:
        return image
    try:
        return View(image, policy)
    except PolicyError as err:
        raise ImageError(e.path, str(err)) from None


async def open_export(e: ExportConfig, cfg: ServerConfig, cache: ClusterCache) -> Export:
    """Open one export; raises ``ImageError`` (closing what it opened)."""
    image = await open_image(image_spec(e, cfg), cache)
    bitmaps = await _bitmaps(image, e)
    try:
        shown = present(image, e)
    except ImageError:
        await image.close()
        raise
    if image.readonly and not e.readonly and e.load_snapshot is None:
        log.warning("export %r: %s is read-only; serving it read-only", e.name, e.path)
    return Export(e.name, e.description, image.readonly, shown, config=e, bitmaps=bitmaps, **settings(e))


async def open_exports(cfg: ServerConfig, cache: ClusterCache) -> tuple[ExportTable, list[tuple[str, str]]]:
    """Open every configured export: (the table, (name, one-line reason) of each that failed).
    A failed export stays listed, unavailable, with its reason as a client may see it."""
    out, failed = [], []
    for e in cfg.exports:
        log.info("opening export %r: %s", e.name, e.path)
        try:
            out.append(await open_export(e, cfg, cache))
        except ImageError as err:
            failed.append((e.name, str(err)))
            out.append(Export(e.name, e.description, True, None, for_client(str(err)), config=e, **settings(e)))
    return ExportTable(out), failed


async def _bitmaps(image: Image, e: ExportConfig) -> dict[str, DirtyBitmapView]:
    """The export's ``-B`` bitmaps (the image is closed if one cannot be used)."""
    try:
        return {name: await image.dirty_bitmap(name) for name in e.bitmaps}
    except ImageError:
        await image.close()
        raise


async def close_exports(table: ExportTable) -> None:
    for e in table:
        if e.image is not None:
            try:
                await e.image.close()
            except Exception as err:
                log.error("export %r: error while closing: %s", e.name, err)
            e.image = None

"""Live reconfiguration: a new ``ServerConfig`` (the config file read again on SIGHUP or
``systemctl reload``) applied to a running ``Server``.

Owns ``apply(server, new)``, in two halves: ``prepare`` (check, load, open: nothing changes) and
``Prepared.commit`` or ``Prepared.abort``.  With worker processes the acceptor has every worker
prepare its part and commits only if all of them could (``workers.Supervisor.reload``).  The rules:
  * All or nothing.  The caller has already parsed and validated the new configuration; here the
    TLS credentials are loaded and every new image is opened *before* anything changes.  Any
    failure is logged in one line ("reload rejected: ...") and the running configuration stays,
    untouched (with workers: in every worker).
  * Settings only a restart can change (where and how the server listens, the cache size, the
    log destination, ...) are reported and keep their running values.
  * An export whose settings did not change is not touched: its clients see nothing.
  * Access and presentation settings (description, TLS requirement, allow lists, identities,
    connection limit, ``discard``, ``detect-zeroes``, ``offset``, ``aio``, and ``cache`` between
    modes of the same O_DIRECT-ness) change in place: new clients see the change, clients already
    in transmission keep the image and flags they negotiated.
  * Any other change (path, format, read-only, snapshot, repair, ...) needs the image reopened:
    the new image serves new clients and the old one is retired like a removed export.  When
    both name the same file (which cannot be opened for writing twice), the old one's clients are
    drained first and the export is reopened once they are gone.
  * A removed export is retired: no longer listed or offered; its clients go on for
    ``reload-grace`` seconds (or until they leave), then their in-flight requests finish and they
    are disconnected; its image is closed once the last one has gone.
  * An export that failed to open is tried again at every reload.
Reloads run one at a time (a second SIGHUP waits for the first).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import fields, replace
from typing import TYPE_CHECKING

from ..config import ConfigError, ExportConfig, ServerConfig
from ..errors import ImageError, for_client
from ..logsetup import NOTICE
from .exports import Export, open_export, present, settings
from .options import Policy
from .tls import TlsServer
from .view import View

if TYPE_CHECKING:
    from .listeners import Server

log = logging.getLogger("nbdserve")

# ServerConfig fields a reload cannot change (they shape sockets, processes or the cache).
RESTART_ONLY = (
    "bind",
    "port",
    "socket",
    "stdio",
    "fork",
    "pid_file",
    "cache_size",
    "metrics",
    "log",
    "log_format",
    "trace",
    "at_limit",
    "qemu_nbd",
    "run",
    "connect_device",
    "exit_with_parent",
    "print_uri",
    "backing_dirs",
    "workers",
)
# ExportConfig fields that change without reopening the image.
IN_PLACE = frozenset(
    {
        "description",
        "tls",
        "allow",
        "tls_authz",
        "max_connections",
        "discard",
        "detect_zeroes",
        "offset",
        "aio",
        "cache",
    }
)
_TLS_FIELDS = ("tls", "tls_creds", "tls_psk_file", "tls_verify_peer")


def _needs_reopen(old: ExportConfig, new: ExportConfig) -> bool:
    changed = {f.name for f in fields(ExportConfig) if getattr(old, f.name) != getattr(new, f.name)}
    direct = {"none", "directsync"}
    if "cache" in changed and (old.cache in direct) != (new.cache in direct):
        return True
    return bool(changed - IN_PLACE)


def _same_file(a: ExportConfig, b: ExportConfig) -> bool:
    try:
        return os.path.samefile(a.path, b.path)
    except OSError:
        return a.path == b.path


def _base_image(export: Export):
    return export.image.image if isinstance(export.image, View) else export.image


def tls_for(server: Server, old: ServerConfig, new: ServerConfig) -> TlsServer | None:
    if all(getattr(old, f) == getattr(new, f) for f in _TLS_FIELDS) and old.tls_mode == new.tls_mode:
        if server.tls is not None:
            server.tls.reload()  # the same files, perhaps rotated: a failed load keeps the old ones
        return server.tls
    return TlsServer(new) if new.tls_mode != "off" else None  # ConfigError: the reload is rejected


async def apply(server: Server, new: ServerConfig) -> bool:
    """Apply ``new``; True if it was applied (see the module docstring)."""
    async with reload_lock(server):
        try:
            prepared = await prepare(server, new)
        except (ConfigError, ImageError) as e:
            server.metrics.reload_failures += 1
            log.error("reload rejected: %s; still serving the previous configuration", e)
            return False
        await prepared.commit()
        return True


def reload_lock(server: Server) -> asyncio.Lock:
    """The lock that makes reloads run one at a time (held from ``prepare`` to the commit or
    abort)."""
    if server.reload_lock is None:
        server.reload_lock = asyncio.Lock()
    return server.reload_lock


def keep_restart_only(old: ServerConfig, new: ServerConfig) -> ServerConfig:
    """``new`` with the running values of the settings only a restart changes (reported)."""
    kept = [f for f in RESTART_ONLY if getattr(old, f) != getattr(new, f)]
    if kept:
        names = ", ".join(f.replace("_", "-") for f in kept)
        log.warning("reload: %s changed; that takes a restart (keeping the running values)", names)
        new = replace(new, **{f: getattr(old, f) for f in kept})
    return new


async def prepare(server: Server, new: ServerConfig) -> Prepared:
    """The first half of a reload: check ``new`` and open every image it needs, changing
    nothing.  Raises ``ConfigError``/``ImageError`` (having closed what it opened) if ``new``
    cannot be applied; else the returned ``Prepared`` is committed or aborted.  Called with
    ``reload_lock(server)`` held, which stays held until then."""
    old = server.cfg
    new = keep_restart_only(old, new)
    tls = tls_for(server, old, new)
    policy = Policy.from_config(new)
    current = {e.name: e for e in server.exports}
    p = Prepared(server, new, tls, policy, current)
    try:
        for ec in new.exports:
            cur = current.get(ec.name)
            if cur is not None and cur.config == ec and cur.image is not None:
                continue
            if cur is not None and cur.image is not None and not _needs_reopen(cur.config, ec):
                present(_base_image(cur), ec)  # ImageError (e.g. an offset past the end): rejected
                p.in_place.append((cur, ec))
            elif cur is not None and cur.image is not None and _same_file(cur.config, ec):
                p.reopen_later.append(ec)
            else:
                p.opened[ec.name] = await open_export(ec, new, server.cache)
    except (ConfigError, ImageError) as e:
        await p.abort()
        raise ImageError(f"export {ec.name!r}", str(e)) from None
    return p


class Prepared:
    """A reload checked and its new images opened (``prepare``), not yet visible to anyone:
    ``commit`` makes it the running configuration, ``abort`` closes what it opened.  Exactly
    one of them is called, with ``reload_lock(server)`` still held."""

    def __init__(self, server: Server, new: ServerConfig, tls: TlsServer | None, policy: Policy, current: dict) -> None:
        self.server, self.new, self.tls, self.policy = server, new, tls, policy
        self.current: dict[str, Export] = current
        self.opened: dict[str, Export] = {}
        self.in_place: list[tuple[Export, ExportConfig]] = []
        self.reopen_later: list[ExportConfig] = []

    async def abort(self) -> None:
        for x in self.opened.values():
            await x.image.close()
        self.opened.clear()

    async def commit(self) -> None:
        """Nothing here fails (an export reopened on the same file may stay unavailable)."""
        server, new, current, opened = self.server, self.new, self.current, self.opened
        server.cfg = new
        server.policy = self.policy
        server.tls = self.tls
        names = {ec.name for ec in new.exports}
        removed = [e for e in server.exports if e.name not in names]
        table = []
        for ec in new.exports:
            cur = current.get(ec.name)
            if ec.name in opened:
                if cur is not None and cur.image is not None:
                    server.retire(cur, new.reload_grace)
                table.append(opened[ec.name])
            elif cur is not None and any(c is cur for c, _ in self.in_place):
                cur.image = present(_base_image(cur), ec)
                cur.description = ec.description
                for k, v in settings(ec).items():
                    setattr(cur, k, v)
                cur.config = ec
                table.append(cur)
            elif ec in self.reopen_later:
                table.append(Export(ec.name, ec.description, True, None, "being reopened", config=ec, **settings(ec)))
            else:
                table.append(cur)
        server.exports.replace(table)
        for e in removed:
            server.retire(e, new.reload_grace)
        server.metrics.reloads += 1
        log.log(
            NOTICE,
            "reload: %d exports (added %s; removed %s; changed %s; reopened %s)",
            len(table),
            _names([n for n in opened if n not in current]),
            _names([e.name for e in removed]),
            _names([c.name for c, _ in self.in_place]),
            _names([n for n in opened if n in current] + [ec.name for ec in self.reopen_later]),
        )
        for ec in self.reopen_later:
            await _reopen_same_file(server, current[ec.name], ec)


async def _reopen_same_file(server: Server, cur: Export, ec: ExportConfig) -> None:
    """Drain and close ``cur``, then open ``ec`` in its place (or leave it unavailable)."""
    gone = server.retire(cur, 0.0)
    await gone
    try:
        export = await open_export(ec, server.cfg, server.cache)
    except ImageError as e:
        log.error("reload: export %r could not be reopened: %s (unavailable until the next reload)", ec.name, e)
        export = Export(ec.name, ec.description, True, None, for_client(str(e)), config=ec, **settings(ec))
    table = [export if e.name == ec.name else e for e in server.exports]
    server.exports.replace(table)


def _names(names: list[str]) -> str:
    return ", ".join(map(repr, names)) or "none"

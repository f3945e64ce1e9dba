"""Where connections come from, and how the server stops.

Owns ``Server``: the listening sockets (TCP, Unix, systemd socket activation via LISTEN_FDS, or a
single connection on stdin for ``--stdio``), the connection limit (``-e/--shared``), one-shot mode,
and graceful shutdown: stop listening, drop handshaking clients, let transmitting clients finish
their in-flight requests, then report closed so the caller can flush and close the images.

Sockets are created by ``bind_sockets`` before the event loop starts (so ``--fork`` can report a
bind error from the parent) and handed to the loop afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import stat

from ..config import ConfigError, ServerConfig
from .exports import ExportTable
from .options import Policy
from .session import Session
from .tls import TlsServer

log = logging.getLogger("nbdserve")

SD_LISTEN_FDS_START = 3


def systemd_sockets() -> list[socket.socket]:
    """Sockets passed by systemd-style socket activation (LISTEN_PID/LISTEN_FDS), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        socks.append(socket.socket(fileno=fd))
    return socks


def _unix_socket_live(path: str) -> bool:
    """True if something accepts connections on the Unix socket ``path`` (so it is not stale)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def bind_sockets(cfg: ServerConfig) -> list[socket.socket]:
    """The listening sockets for ``cfg`` (not for --stdio).  Raises ConfigError on failure."""
    activated = systemd_sockets()
    if activated:
        return activated
    if cfg.socket:
        path = cfg.socket
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                if _unix_socket_live(path):
                    raise ConfigError(f"cannot listen on {path}: another server is listening there")
                os.unlink(path)  # a stale socket from an earlier run
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(path)
            s.listen(128)
        except OSError as e:
            s.close()
            raise ConfigError(f"cannot listen on {path}: {e.strerror or e}") from None
        return [s]
    try:
        infos = socket.getaddrinfo(cfg.bind or None, cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve bind address {cfg.bind!r}: {e}") from None
    socks = []
    for family, type_, proto, _, addr in infos:
        s = socket.socket(family, type_, proto)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            s.bind(addr)
            s.listen(128)
        except OSError as e:
            s.close()
            for o in socks:
                o.close()
            raise ConfigError(f"cannot listen on {cfg.bind}:{cfg.port}: {e.strerror or e}") from None
        socks.append(s)
    return socks


def describe(socks: list[socket.socket], cfg: ServerConfig) -> list[str]:
    """nbd:// URIs a client can use, one per listening socket (nbds:// when TLS is required)."""
    out = []
    scheme = "nbds" if cfg.tls_mode == "require" else "nbd"
    for s in socks:
        addr = s.getsockname()
        if s.family == socket.AF_UNIX:
            out.append(f"{scheme}+unix:///?socket={addr}")
        else:
            host = addr[0] if addr[0] not in ("0.0.0.0", "::") else "localhost"
            host = f"[{host}]" if ":" in host else host
            out.append(f"{scheme}://{host}:{addr[1]}/" if addr[1] != 10809 else f"{scheme}://{host}/")
    return out


class _Refuse(asyncio.Protocol):
    """Closes a connection over the ``--shared`` limit at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class Server:
    def __init__(
        self, cfg: ServerConfig, exports: ExportTable, loop: asyncio.AbstractEventLoop, tls: TlsServer | None = None
    ) -> None:
        self.cfg = cfg
        self.exports = exports
        self.loop = loop
        self.policy = Policy.from_config(cfg)
        self.tls = tls  # credentials for STARTTLS (None: TLS off)
        self.sessions: set[Session] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._served_any = False
        self._stopping = False
        self.stopped = loop.create_future()

    def _protocol(self) -> asyncio.BaseProtocol:
        if self._stopping or (self.cfg.shared and len(self.sessions) >= self.cfg.shared):
            log.warning("refusing a connection: %d clients connected (limit %d)", len(self.sessions), self.cfg.shared)
            return _Refuse()
        self._served_any = True
        return Session(self)

    async def listen(self, socks: list[socket.socket]) -> None:
        for s in socks:
            s.setblocking(False)
            if s.family == socket.AF_UNIX:
                srv = await self.loop.create_unix_server(self._protocol, sock=s)
            else:
                srv = await self.loop.create_server(self._protocol, sock=s)
            self._servers.append(srv)

    async def serve_stdio(self) -> None:
        try:
            sock = socket.socket(fileno=os.dup(0))
        except OSError:
            raise ConfigError(
                "--stdio needs standard input to be a socket (as libnbd's connect_command gives)"
            ) from None
        if sock.type != socket.SOCK_STREAM:
            sock.close()
            raise ConfigError("--stdio needs standard input to be a stream socket")
        sock.setblocking(False)
        self.cfg = dataclasses.replace(self.cfg, oneshot=True)  # one connection: exit after it
        self._served_any = True
        await self.loop.connect_accepted_socket(lambda: Session(self), sock)

    def reload(self) -> None:
        """Re-read what can change without a restart (SIGHUP): the TLS credentials.  Established
        sessions keep going with what they negotiated."""
        if self.tls is not None:
            self.tls.reload()

    def session_ended(self) -> None:
        if self.cfg.oneshot and self._served_any and not self.sessions:
            self.shutdown()
        elif self._stopping and not self.sessions and not self.stopped.done():
            self.stopped.set_result(None)

    def shutdown(self) -> None:
        """Stop accepting; drain every session; ``stopped`` resolves when all are gone."""
        if self._stopping:
            return
        self._stopping = True
        for srv in self._servers:
            srv.close()
        for s in list(self.sessions):
            s.shutdown()
        if not self.sessions and not self.stopped.done():
            self.stopped.set_result(None)

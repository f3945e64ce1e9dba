"""Where connections come from, and how the server stops.

Owns ``Server``: the listening sockets (TCP, Unix, systemd socket activation via LISTEN_FDS, or a
single connection on stdin for ``--stdio``), the connection limit (``-e/--shared``), one-shot mode,
and graceful shutdown: stop listening, drop handshaking clients, let transmitting clients finish
their in-flight requests, then report closed so the caller can flush and close the images.

Life of a listening socket:
  * ``bind_sockets`` creates and binds the sockets before the event loop starts (so ``--fork``
    can report a bind error from the parent) but does not listen: until the images are open a
    client is refused at connect time instead of being accepted and then reset.
  * ``Server.listen`` starts listening with ``--backlog`` (sized for bursts: NBD's server speaks
    first, so a client whose connection overflowed the accept queue waits forever for the
    greeting instead of retrying) and accepting, once the exports are open.
  * ``Bound.remove_socket_file`` removes the Unix socket file at exit, only if it is still the
    one this process created (same inode): never another server's socket.

Connections over the limit get a clean refusal (``_Refuse``): the greeting, then an error reply
to their first option naming the limit, then the close; at most ``REFUSING_MAX`` of them at once,
beyond that a connection is closed at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import stat
from dataclasses import dataclass

from ..config import ConfigError, ServerConfig
from ..protocol import constants as C
from ..protocol import handshake as H
from .buffers import PayloadBuffers, ReceiveBuffers, ReplyBuffers
from .exports import ExportTable
from .options import Policy
from .session import SPARSE_READ_MIN, Session
from .tls import TlsServer

REFUSING_MAX = 256  # connections being refused (greeting sent, waiting for an option) at once

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


@dataclass
class Bound:
    """Sockets bound for a server (listening only once ``Server.listen`` runs), and the Unix
    socket file this process created, if any, as (path, (st_dev, st_ino))."""

    socks: list[socket.socket]
    unix_file: tuple[str, tuple[int, int]] | None = None

    def close(self) -> None:
        """Close the sockets (a forked parent does this; the file stays for the child)."""
        for s in self.socks:
            s.close()

    def remove_socket_file(self) -> None:
        """Remove the Unix socket file we created, unless it is gone or is no longer ours."""
        if self.unix_file is None:
            return
        path, ident = self.unix_file
        self.unix_file = None
        try:
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == ident:
                os.unlink(path)
        except OSError:
            pass


def bind_sockets(cfg: ServerConfig) -> Bound:
    """The bound, not yet listening, sockets for ``cfg`` (not for --stdio).  Raises ConfigError."""
    activated = systemd_sockets()
    if activated:
        return Bound(activated)
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
            st = os.lstat(path)
        except OSError as e:
            s.close()
            raise ConfigError(f"cannot listen on {path}: {e.strerror or e}") from None
        return Bound([s], (path, (st.st_dev, st.st_ino)))
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
        except OSError as e:
            s.close()
            for o in socks:
                o.close()
            raise ConfigError(f"cannot listen on {cfg.bind}:{cfg.port}: {e.strerror or e}") from None
        socks.append(s)
    return Bound(socks)


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
    """A connection over the limit: greet, answer the first option with an error naming the
    limit (EXPORT_NAME cannot carry one), close.  Dropped by the handshake timeout if silent."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.hs = H.ServerHandshake()
        self.transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.refusing += 1
        timeout = self.server.cfg.handshake_timeout
        if timeout > 0:
            self._deadline = self.server.loop.call_later(timeout, transport.abort)  # type: ignore[attr-defined]
        self.transport.write(self.hs.greeting())

    def data_received(self, data: bytes) -> None:
        self.hs.receive_data(data)
        try:
            while (ev := self.hs.next_event()) is not None:
                if isinstance(ev, H.ClientFlags):
                    continue
                if not isinstance(ev, H.ExportNameOption):
                    limit = self.server.cfg.shared
                    why = f"too many connections (this server takes {limit} at once); try again later"
                    self.transport.write(H.rep_error(ev.option, C.REP_ERR_POLICY, why))
                self.transport.close()
                return
        except H.ProtocolError:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.refusing -= 1
        if self._deadline is not None:
            self._deadline.cancel()


class _Drop(asyncio.Protocol):
    """Closes a connection at once (shutting down, or too many refusals already under way)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


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
        self.refusing = 0  # _Refuse connections open
        # Receive and reply buffers shared by every session (see Session: allocated on demand).
        self.handshake_buffer = memoryview(bytearray(64 << 10))
        self.receive_buffers = ReceiveBuffers(256 << 10)
        self.reply_buffers = ReplyBuffers(min_size=SPARSE_READ_MIN, per_size=32)
        self.payload_buffers = PayloadBuffers(per_size=32)
        self._servers: list[asyncio.AbstractServer] = []
        self._served_any = False
        self._stopping = False
        self.stopped = loop.create_future()

    def _protocol(self) -> asyncio.BaseProtocol:
        if self._stopping:
            return _Drop()
        if self.cfg.shared and len(self.sessions) >= self.cfg.shared:
            if self.refusing >= REFUSING_MAX:
                return _Drop()
            log.warning("refusing a connection: %d clients connected (limit %d)", len(self.sessions), self.cfg.shared)
            return _Refuse(self)
        self._served_any = True
        return Session(self)

    async def listen(self, socks: list[socket.socket]) -> None:
        """Start listening (with ``--backlog``) and accepting on the bound sockets."""
        for s in socks:
            s.setblocking(False)
            try:
                if s.family == socket.AF_UNIX:
                    srv = await self.loop.create_unix_server(self._protocol, sock=s, backlog=self.cfg.backlog)
                else:
                    srv = await self.loop.create_server(self._protocol, sock=s, backlog=self.cfg.backlog)
            except OSError as e:  # e.g. another server bound the port too and listened first
                raise ConfigError(f"cannot listen on {describe([s], self.cfg)[0]}: {e.strerror or e}") from None
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

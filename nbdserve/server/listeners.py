"""Where connections come from, and how the server stops.

Owns ``Server``: the listening sockets (TCP, Unix, systemd socket activation via LISTEN_FDS, or a
single connection on stdin for ``--stdio``), the connection limit (``-e/--shared``: a client over
it is refused, or with ``at_limit = "wait"`` left in the listen queue until a slot frees, as
qemu-nbd does), one-shot mode (the server stops once the last client that reached transmission
has left), and graceful shutdown: stop listening, drop handshaking clients, let transmitting
clients finish their in-flight requests, then report closed so the caller can flush and close the
images.  It also holds what a reload changes (the export table, the option policy, the TLS
credentials; ``server/reload.py`` decides) and the exports a reload retired while their clients
finish, and the metrics counters (``server/metrics.py``).

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
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from ..cache import ClusterCache
from ..config import DEFAULT_PORT, ConfigError, ServerConfig
from ..protocol import constants as C
from ..protocol import handshake as H
from .buffers import PayloadBuffers, ReceiveBuffers, ReplyBuffers
from .exports import Export, ExportTable
from .metrics import ExportStats, Metrics
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
    """Base URIs a client can use, one per listening socket, with the real address and port
    (``nbds`` when TLS is required; a wildcard address shows as this host's name)."""
    out = []
    scheme = "nbds" if cfg.tls_mode == "require" else "nbd"
    for s in socks:
        addr = s.getsockname()
        if s.family == socket.AF_UNIX:
            out.append(f"{scheme}+unix:///?socket={quote(addr, safe='/')}")
        else:
            host = addr[0] if addr[0] not in ("0.0.0.0", "::") else socket.gethostname()
            host = f"[{host}]" if ":" in host else host
            out.append(f"{scheme}://{host}:{addr[1]}/" if addr[1] != DEFAULT_PORT else f"{scheme}://{host}/")
    return out


def export_uri(base: str, name: str) -> str:
    """The URI of export ``name`` under a base URI from ``describe`` (the name percent-encoded)."""
    path, sep, query = base.partition("?")
    return path.removesuffix("/") + "/" + quote(name, safe="/") + sep + query


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
    """The listening side and the set of sessions.  Reload (``reload``) and metrics
    (``transmission_started``, ``metrics``) live here too; see the module docstring."""

    def __init__(
        self,
        cfg: ServerConfig,
        exports: ExportTable,
        loop: asyncio.AbstractEventLoop,
        tls: TlsServer | None = None,
        cache: ClusterCache | None = None,
    ) -> None:
        self.cfg = cfg
        self.exports = exports
        self.loop = loop
        self.policy = Policy.from_config(cfg)
        self.tls = tls  # credentials for STARTTLS (None: TLS off)
        self.cache = cache
        self.metrics = Metrics()
        self.sessions: set[Session] = set()
        self.refusing = 0  # _Refuse connections open
        # Receive and reply buffers shared by every session (see Session: allocated on demand).
        self.handshake_buffer = memoryview(bytearray(64 << 10))
        self.receive_buffers = ReceiveBuffers(256 << 10)
        self.reply_buffers = ReplyBuffers(min_size=SPARSE_READ_MIN, per_size=32)
        self.payload_buffers = PayloadBuffers(per_size=32)
        self.retired: list[Export] = []  # exports a reload took away, still with clients
        self._gone: dict[int, asyncio.Future] = {}  # id(retired export) -> resolved once closed
        self._servers: list[asyncio.AbstractServer] = []
        self._accepting: list[asyncio.Task] = []
        self._slot_free: asyncio.Future | None = None
        self._transmitted_any = False
        self._stopping = False
        self.reload_lock: asyncio.Lock | None = None  # one reload at a time (server/reload.py)
        self.notify: Callable[[str], None] = lambda _state: None  # sd_notify, set by server/app.py
        self.stopped = loop.create_future()
        # Worker processes (server/workers.py): gives a negotiated connection to its export's
        # worker; None: this process transmits.  ``handed``: connections given away, still open.
        self.handoff: Callable[..., None] | None = None
        self.handed = 0

    # -- connections ------------------------------------------------------------------------

    def _at_limit(self) -> bool:
        return bool(self.cfg.shared) and len(self.sessions) + self.handed >= self.cfg.shared

    def _protocol(self) -> asyncio.BaseProtocol:
        if self._stopping:
            return _Drop()
        if self._at_limit():
            if self.refusing >= REFUSING_MAX:
                return _Drop()
            log.warning("refusing a connection: %d clients connected (limit %d)", len(self.sessions), self.cfg.shared)
            return _Refuse(self)
        self.metrics.connections_accepted += 1
        return Session(self)

    async def listen(self, socks: list[socket.socket]) -> None:
        """Start listening (with ``--backlog``) and accepting on the bound sockets.  At the
        ``-e`` limit a new client is refused, or, with ``at_limit = "wait"`` (qemu-nbd's way),
        left in the listen queue until a slot frees."""
        for s in socks:
            s.setblocking(False)
            try:
                if self.cfg.at_limit == "wait":
                    s.listen(self.cfg.backlog)
                    self._accepting.append(self.loop.create_task(self._accept_loop(s)))
                elif s.family == socket.AF_UNIX:
                    srv = await self.loop.create_unix_server(self._protocol, sock=s, backlog=self.cfg.backlog)
                    self._servers.append(srv)
                else:
                    srv = await self.loop.create_server(self._protocol, sock=s, backlog=self.cfg.backlog)
                    self._servers.append(srv)
            except OSError as e:  # e.g. another server bound the port too and listened first
                raise ConfigError(f"cannot listen on {describe([s], self.cfg)[0]}: {e.strerror or e}") from None

    async def _accept_loop(self, sock: socket.socket) -> None:
        while not self._stopping:
            while self._at_limit():
                self._slot_free = self.loop.create_future()
                await self._slot_free
                if self._stopping:
                    return
            try:
                conn, _ = await self.loop.sock_accept(sock)
            except OSError as e:
                log.warning("accept failed: %s", e.strerror or e)
                continue
            if self._stopping:
                conn.close()
                return
            conn.setblocking(False)
            self.metrics.connections_accepted += 1
            await self.loop.connect_accepted_socket(lambda: Session(self), conn)

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
        self._transmitted_any = True  # even a client that never gets through ends the server
        await self.loop.connect_accepted_socket(lambda: Session(self), sock)

    def transmission_started(self, session: Session, export: Export) -> ExportStats:
        """A session entered transmission on ``export``: its counters (see server/metrics.py)."""
        self._transmitted_any = True
        stats = self.metrics.for_export(export.name)
        stats.connections_total += 1
        return stats

    def session_ended(self) -> None:
        if self._slot_free is not None and not self._slot_free.done() and not self._at_limit():
            self._slot_free.set_result(None)
        self._close_retired()
        if self.cfg.oneshot and self._transmitted_any and not self.sessions:
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
        for t in self._accepting:
            t.cancel()
        if self._slot_free is not None and not self._slot_free.done():
            self._slot_free.set_result(None)
        for s in list(self.sessions):
            s.shutdown()
        if not self.sessions and not self.stopped.done():
            self.stopped.set_result(None)

    # -- exports and reload ---------------------------------------------------------------------

    def all_exports(self) -> list[Export]:
        """The served exports, then the retired ones still in use."""
        return [*self.exports, *self.retired]

    def serving(self) -> list[Export]:
        return [e for e in self.exports if e.image is not None]

    def status(self) -> None:
        """Tell systemd how many exports serve (STATUS=)."""
        n, total = len(self.serving()), len(self.exports)
        self.notify(f"STATUS=serving {n} of {total} export{'s' if total != 1 else ''}")

    def _close_retired(self) -> None:
        for e in [e for e in self.retired if e.connections == 0]:
            self.retired.remove(e)
            image, e.image = e.image, None
            done = self._gone.pop(id(e))
            task = self.loop.create_task(_close_image(e.name, image))
            task.add_done_callback(lambda _t, done=done: done.done() or done.set_result(None))
        if not self.retired:
            self.metrics.forget(x.name for x in self.exports)

    def retire(self, e: Export, grace: float) -> asyncio.Future:
        """Take ``e`` out of service (a reload removed or replaced it): its clients keep it for
        ``grace`` seconds (or until they leave), then finish their requests and are disconnected.
        The future resolves once its image is closed."""
        e.retired = True
        self.retired.append(e)
        gone = self._gone[id(e)] = self.loop.create_future()
        if e.connections:
            log.warning("export %r: %d client(s) may go on for %gs", e.name, e.connections, grace)
            self.loop.call_later(grace, self._drain, e)
        self._close_retired()
        return gone

    def _drain(self, e: Export) -> None:
        for s in list(self.sessions):
            if s.export is e:
                s.shutdown()

    async def reload(self, new: ServerConfig) -> bool:
        """Apply a new configuration (SIGHUP); see ``server/reload.py``."""
        from .reload import apply

        return await apply(self, new)


async def _close_image(name: str, image: object) -> None:
    try:
        await image.close()  # type: ignore[attr-defined]
    except Exception as err:
        log.error("export %r: error while closing: %s", name, err)

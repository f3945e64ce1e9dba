"""One client connection: the handshake (with its TLS upgrade), then the transmission phase.

Owns ``Session``, an asyncio ``BufferedProtocol``.  The handshake side: the client's identity
for the access rules (``authz.Peer``: TCP address, or Unix peer credentials from ``SO_PEERCRED``),
the handshake deadline, and STARTTLS: once the option policy accepts it, the session stops
reading, sends the ACK and upgrades the transport with ``loop.start_tls`` (asyncio's and uvloop's
alike); the handshake then goes on over TLS with the client's certificate name (or PSK username)
known.  A TLS handshake that fails, stalls past the handshake deadline or is cut off ends only this
connection.

With worker processes (``server/workers.py``) a session lives in two processes: the acceptor's
ends once the export is chosen (``_hand_off``: reading stops, the handshake's last reply is
written out, and ``Server.handoff`` gives the connection, the negotiated state and any request
bytes already received to the worker owning the export); the worker's starts in the
transmission phase (``Session(server, handoff)``).  Nothing else in this class knows about
workers.

The transmission side: bytes are received straight into the codec's buffers.  READ and WRITE
each have one route, ``_read`` and ``_write``, the fast case inside it: plain requests at the
head of the receive buffer are decoded as a run (``RequestParser.next_plain``: no ``Request``
objects, the range checked inline) and each is answered at once when ``Image.read``/``write``
completes synchronously; otherwise the returned awaitable is driven by ``coro.start`` (no Task)
and the reply follows when it completes, out of order.  Other requests are decoded one by one,
validated by ``check_request`` and enter the same routes (READ, WRITE) or their coroutine
handler (FLUSH, TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS).

The call chains (see ``nbdserve.image`` for the layers below):
  * READ: ``_pump`` -> ``next_plain`` -> ``_serve_plain`` (or, decoded alone, ``next_event`` ->
    ``_dispatch``) -> ``_read``: a reply buffer with room for the header,
    ``Image.read`` into it -> ``_reply_read``: the header packed in front, appended to the batch
    (a large structured read whose data holds runs of zero granules goes out as data and hole
    chunks instead);
  * WRITE: ``_pump`` -> ``next_plain`` -> ``_serve_plain`` (or ``next_event`` -> ``_dispatch``:
    FUA, a large payload) -> ``_write``: ``Image.write`` of the payload where it was received (a
    view of the receive buffer, or a large payload's own buffer), and the reply.  On an image
    that takes runs (``Image.vectored``: raw), sequential in-range plain WRITEs of one receive go
    down as one write of their payloads (one ``pwritev``).  A write that must wait keeps its view
    of the receive buffer, so the parser is told to ``detach`` from that buffer.  A large payload
    still arriving when its header is parsed may land instead: ``_pump`` -> ``next_event`` (None:
    the payload is in progress) -> ``_land``: ``Image.landing`` says where the range lives in a
    local file, and the rest of the payload goes from the socket into it by splice
    (``server.landing``; docs/landing.md), the transport not reading meanwhile; the reply when
    all of it is in.

Invariants:
  * At most ``max_requests`` requests and ``max_inflight_bytes`` bytes are in flight per
    connection; beyond that the session stops parsing and pauses reading (back-pressure), and it
    pauses reading (and parsing) too while the transport's write buffer is full.
  * Each reply is written with one ``write``/``writelines`` call, so replies never interleave;
    replies produced while parsing one receive, and those of the completions resolved in one loop
    iteration, are collected and written together (a batch is written early once it holds
    ``_BATCH_LIMIT`` bytes, so write back-pressure is noticed).
  * DISC and server shutdown stop reading, let in-flight requests finish and reply, then close;
    a connection not closed ``drain_timeout`` seconds after that began is aborted.
  * A protocol violation ends only this connection (``transport.abort``); request errors are
    replies, never disconnections.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
import struct
from typing import TYPE_CHECKING

from .. import coro
from ..authz import Peer
from ..errors import ImageError, NbdError, error_of, for_client, nbd_errno
from ..protocol import constants as C
from ..protocol.handshake import ProtocolError, ServerHandshake
from ..protocol.transmission import ReplyEncoder, Request, RequestParser, check_request
from .landing import Splicer
from .metrics import now_ns
from .options import CLOSE, STARTTLS, TRANSMIT, Negotiation
from .tls import describe_session, identity

if TYPE_CHECKING:
    from ..formats.base import Landing
    from .exports import Export
    from .listeners import Server
    from .metrics import ExportStats
    from .workers import Handoff

log = logging.getLogger("nbdserve")

# _UPGRADING: STARTTLS accepted, the TLS handshake runs; decrypted bytes that arrive before the
# upgrade is finished are buffered, not parsed.
# _HANDING_OFF: the export is chosen and another process will transmit (see the module docstring).
_HANDSHAKE, _TRANSMISSION, _CLOSED, _UPGRADING, _HANDING_OFF = 0, 1, 2, 3, 4
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_connection_ids = itertools.count(1)  # names Unix-socket peers in the log
_MAX_EXTENTS = 1 << 16
# Replies collected in one _pump are written once they reach this size, so the transport can
# signal pause_writing and stop the parsing of more requests: a client that does not read its
# replies makes the server buffer about this plus one reply, not every reply it asked for.
_BATCH_LIMIT = 256 << 10
# Structured reads at least this long send runs of all-zero granules as OFFSET_HOLE chunks;
# shorter reads always send one data chunk (the zeroes they could save are not worth a chunk).
SPARSE_READ_MIN = 64 << 10
HOLE_GRANULE = 4096  # the unit of a hole in a sparse reply (relative to the request's offset)
_ZEROES = memoryview(bytes(C.DEFAULT_MAX_PAYLOAD))
# Bytes of replies a connection's transport may hold before reading pauses (back-pressure).
WRITE_BUFFER_HIGH = 4 << 20
# The kernel send buffer asked for on Unix sockets (see _size_send_buffer).
UNIX_SEND_BUFFER = 4 << 20
SO_SNDBUFFORCE = 32  # Linux; not exported by Python's socket module
# A WRITE payload lands in the image file by splice (see _land) when at least this much of it is
# still in the socket once its header is parsed.
LAND_MIN = 64 << 10


# The largest TLS record's payload: small replies are joined up to this before encryption.
_TLS_RECORD = 16 << 10


def _records(chunks: list) -> list:
    """``chunks`` (replies, in order) regrouped for a TLS transport: runs of small ones joined into
    buffers of at most one record's payload, large ones as they are.  The TLS layer makes at least
    one record per buffer it is given, and each record costs a fixed amount on both sides (the
    cipher's setup and tag, a BIO pass), so 4 KiB replies cost about 5% less CPU as quarter-records
    than one record each; the join copies only small replies."""
    out: list = []
    group: list = []
    n = 0
    for c in chunks:
        if n + len(c) > _TLS_RECORD and group:
            out.append(group[0] if len(group) == 1 else b"".join(group))
            group, n = [], 0
        group.append(c)
        n += len(c)
    if group:
        out.append(group[0] if len(group) == 1 else b"".join(group))
    return out


def _size_send_buffer(sock: socket.socket) -> None:
    """Let the kernel hold several large replies on a Unix socket.

    TCP sizes its send buffer itself (autotuning, up to ``tcp_wmem``); a Unix stream socket keeps
    the default ``wmem_default`` (208 KiB), less than one 1 MiB reply, so the loop went back to
    epoll several times per reply and the client's reads and ours did not overlap (1 MiB reads
    ran ~40% slower, nbdcopy ~30%).  ``SO_SNDBUFFORCE`` (with CAP_NET_ADMIN) sets it past
    ``net.core.wmem_max``; without the capability ``SO_SNDBUF`` gets as much as that allows.  The
    kernel charges the memory only while replies wait in it."""
    for option in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, UNIX_SEND_BUFFER)
            return
        except OSError:
            continue


def identify(transport: asyncio.BaseTransport) -> tuple[str, Peer]:
    """(log label, identity) of a new connection: the TCP address, or the Unix peer's credentials."""
    sock = transport.get_extra_info("socket")
    peername = transport.get_extra_info("peername")
    if isinstance(peername, tuple):
        host = peername[0]
        return f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}", Peer.from_address(host)
    label = f"local#{next(_connection_ids)}"
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            _pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError:
            return label, Peer()
        return f"{label} (uid {uid})", Peer(uid=uid, gid=gid)
    return label, Peer()


class Session(asyncio.BufferedProtocol):
    def __init__(self, server: Server, handoff: Handoff | None = None) -> None:
        """A new connection; with ``handoff``, one whose handshake another process did."""
        self.server = server
        self._handoff = handoff
        cfg = server.cfg
        self.cfg = cfg
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.phase = _HANDSHAKE
        self.hs = ServerHandshake(max_option_length=cfg.max_option_length, max_options=cfg.option_limit())
        self.neg = Negotiation(server.exports, server.policy)
        self._deadline: asyncio.TimerHandle | None = None  # the handshake's, then the drain's
        # transmission state
        self.export: Export | None = None
        self.image = None
        self.parser: RequestParser | None = None
        self.enc: ReplyEncoder | None = None
        self.export_flags = 0
        self.inflight = 0
        self.stats: ExportStats | None = None  # the export's counters (server/metrics.py)
        self.inflight_bytes = 0
        self._writable = False  # plain WRITEs may be decoded as a run (the export is writable)
        self._detach = False  # a write in flight refers to the receive buffer (see RequestParser.detach)
        self._pumping = False
        # An oversize WRITE is answered (EINVAL) only once its payload has been discarded: a
        # client still sending the payload is not ready for the reply (libnbd drops the link).
        self._held: Request | None = None
        self._buffers = server.reply_buffers  # for large READ replies, shared by all sessions
        self._small_reply = server.reply_buffers.min_size  # replies shorter than this are not pooled
        self._batch: list | None = None  # replies not written yet (see _send)
        self._batch_bytes = 0
        self._uncork_pending = False  # _uncork is scheduled: it writes the batch
        self._read_paused = False
        self._write_paused = False
        self._stopping = False  # DISC received or server shutting down: parse nothing more
        self._finished = False  # connection_lost ran (or its work, after a failed TLS upgrade)
        self._upgrade_task: asyncio.Task | None = None
        self._splicer: Splicer | None = None  # made by the first _land
        self._landing: Landing | None = None  # where a payload is being landed (the transport must not read)
        self.closed: asyncio.Future = server.loop.create_future()

    # -- connection life cycle --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        elif sock is not None and sock.family == socket.AF_UNIX:
            _size_send_buffer(sock)
        self.peer, self.neg.peer = identify(transport)
        # Let several large replies queue in the transport before it pushes back: with the
        # default 64 KiB high-water mark every 256 KiB reply paused the pipeline.
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_HIGH // 4)
        self.server.sessions.add(self)
        if self._handoff is not None:
            self._resume(self._handoff)
            return
        log.debug("%s: connected", self.peer)
        if self.cfg.handshake_timeout > 0:
            self._deadline = self.server.loop.call_later(self.cfg.handshake_timeout, self._handshake_timeout)
        self.transport.write(self.hs.greeting())

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc)

    def _finish(self, exc: BaseException | None) -> None:
        """The connection is gone.  Also called after a failed TLS upgrade, where the TLS layer
        owned the transport and does not report the loss to this protocol."""
        if self._finished:
            return
        self._finished = True
        if self.phase == _TRANSMISSION and self.export is not None:
            self.export.connections -= 1
        self.phase = _CLOSED
        if self._deadline is not None:
            self._deadline.cancel()
        if self._splicer is not None:
            self._splicer.close()
            self._splicer = None
        if self._landing is not None:  # cut off inside a landing: the driver may let go
            self._landing.release()
            self._landing = None
        self.server.sessions.discard(self)
        log.debug("%s: disconnected%s", self.peer, f" ({exc})" if exc else "")
        if not self.closed.done():
            self.closed.set_result(None)
        self.server.session_ended()

    def eof_received(self) -> bool:
        # The client closed its side: finish what is in flight, then close.  (A TLS transport
        # closes after EOF whatever this returns, and warns if it is True.)
        self._stop()
        return not self.neg.tls

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.phase == _HANDING_OFF:
            self._give_away()
            return
        if self.phase == _TRANSMISSION and not self._pumping:
            self._pump()  # requests parsed-ready in the buffer need no new bytes to proceed
        else:
            self._update_reading()

    def _handshake_timeout(self) -> None:
        if self.phase in (_HANDSHAKE, _UPGRADING):
            log.warning("%s: handshake not finished within %ss; disconnecting", self.peer, self.cfg.handshake_timeout)
            self.phase = _CLOSED
            self._abort()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def shutdown(self) -> None:
        """Server shutdown: drop a handshaking client, drain a transmitting one."""
        if self.phase in (_HANDSHAKE, _UPGRADING, _HANDING_OFF):
            self.phase = _CLOSED
            self._abort()
        else:
            self._stop()

    def _stop(self) -> None:
        """Parse nothing more; close once every request in flight has replied.  A connection
        still open ``drain_timeout`` seconds later (its client stopped reading the replies, or a
        request waits on storage) is cut off, so no client holds up a shutdown or a reload.  The
        handshake deadline, where it still runs, bounds a connection stopped during the
        handshake instead."""
        if not self._stopping and self._deadline is None and self.cfg.drain_timeout > 0:
            self._deadline = self.server.loop.call_later(self.cfg.drain_timeout, self._drain_timeout)
        self._stopping = True
        self._update_reading()
        self._maybe_close()

    def _drain_timeout(self) -> None:
        if not self._finished:
            log.warning(
                "%s: replies not sent within %ss of closing (%d requests in flight); disconnecting",
                self.peer,
                self.cfg.drain_timeout,
                self.inflight,
            )
            self._abort()

    def _maybe_close(self) -> None:
        if self._stopping and self.inflight == 0 and self.transport is not None and not self.transport.is_closing():
            self._flush_batch()
            self.transport.close()

    # -- receiving --------------------------------------------------------------------------

    # Buffers are the server's, lent only while needed (see server.buffers): during the handshake
    # every session receives into the one server-wide buffer (the codec copies the bytes out
    # before the next receive), and the parser hands its receive buffer back once idle.

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.phase == _TRANSMISSION:
            return self.parser.get_buffer()
        return self.server.handshake_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.phase == _TRANSMISSION:
            self.parser.buffer_updated(nbytes)
            self._pump()
            self.parser.release_idle()
        elif self.phase == _HANDSHAKE:
            self.hs.receive_data(self.server.handshake_buffer[:nbytes])
            self._negotiate()
        elif self.phase == _UPGRADING:
            self.hs.receive_data(self.server.handshake_buffer[:nbytes])  # parsed once the upgrade is finished

    def _negotiate(self) -> None:
        try:
            while self.phase == _HANDSHAKE:
                ev = self.hs.next_event()
                if ev is None:
                    return
                out = self.neg.answer(ev)
                if out.refusal:
                    log.warning("%s: %s", self.peer, out.refusal)
                if out.action == STARTTLS:
                    self.hs.starttls()  # ProtocolError if the client did not wait for the ACK
                if out.data:
                    self.transport.write(out.data)
                if out.action == CLOSE:
                    log.info("%s: closing during handshake: %s", self.peer, out.reason)
                    self.phase = _CLOSED
                    self.transport.close()
                    return
                if out.action == TRANSMIT:
                    if self.server.handoff is not None:
                        self._hand_off(out.export)
                    else:
                        self._start_transmission(out.export)
                elif out.action == STARTTLS:
                    self._begin_tls()
        except ProtocolError as e:
            log.warning("%s: protocol error during handshake: %s", self.peer, e)
            self.phase = _CLOSED
            self._abort()

    def _begin_tls(self) -> None:
        """The STARTTLS ACK is written: stop reading (the ClientHello waits in the kernel for the
        TLS layer) and upgrade in a task."""
        self.transport.pause_reading()
        self.phase = _UPGRADING
        self._upgrade_task = self.server.loop.create_task(self._upgrade())

    async def _upgrade(self) -> None:
        raw = self.transport
        psk_users: list[str] = []
        timeout = self.cfg.handshake_timeout if self.cfg.handshake_timeout > 0 else None
        try:
            ctx = self.server.tls.context(psk_users.append)
            tls = await self.server.loop.start_tls(raw, self, ctx, server_side=True, ssl_handshake_timeout=timeout)
        except Exception as e:  # ssl.SSLError, ConnectionError, TimeoutError: only this client is affected
            self._upgrade_failed(raw, str(e) or ("connection closed" if isinstance(e, ConnectionError) else repr(e)))
            return
        # The loop returns None when the connection was lost without an error (the deadline or a
        # shutdown aborted it, or the client closed it) during the handshake.
        if tls is None or tls.is_closing() or self.phase != _UPGRADING:
            if tls is not None:
                tls.abort()
            self._upgrade_failed(raw, "connection closed")
            return
        self.transport = tls
        tls.set_write_buffer_limits(high=WRITE_BUFFER_HIGH, low=WRITE_BUFFER_HIGH // 4)
        ssl_object = tls.get_extra_info("ssl_object")
        name, dn = identity(ssl_object)
        if psk_users:
            name = psk_users[-1]
        self.neg.tls_started(name, dn)
        self.phase = _HANDSHAKE
        log.info("%s: %s%s", self.peer, describe_session(ssl_object), f", client {name!r}" if name else "")
        self._negotiate()

    def _upgrade_failed(self, raw: asyncio.BaseTransport, reason: str) -> None:
        if self.phase == _UPGRADING:
            log.warning("%s: TLS handshake failed: %s", self.peer, reason)
        raw.abort()
        self.phase = _CLOSED
        self._finish(None)

    def _start_transmission(self, export: Export) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        neg = self.neg
        self.export = export
        export.connections += 1
        self.stats = self.server.transmission_started(self, export)
        self.image = export.image
        self.export_flags = neg.transmission_flags(export)
        self._writable = not self.export_flags & C.FLAG_READ_ONLY
        pool = self.server.receive_buffers
        self.parser = RequestParser(
            extended=neg.extended,
            max_payload=C.DEFAULT_MAX_PAYLOAD,
            buffer_size=pool.size,
            take_buffer=pool.take,
            give_buffer=pool.give,
            take_payload=self.server.payload_buffers.get,
        )
        self.enc = ReplyEncoder(structured=neg.structured, extended=neg.extended)
        self.phase = _TRANSMISSION
        log.info(
            "%s: serving export %r (%s%s)",
            self.peer,
            export.name,
            "extended headers" if neg.extended else "structured replies" if neg.structured else "simple replies",
            ", " + ", ".join(n for _, n in neg.contexts) if neg.contexts else "",
        )
        leftover = self.hs.take_buffered()
        if leftover:
            self.parser.receive_data(leftover)
            self._pump()

    # -- worker processes (see the module docstring) ---------------------------------------------

    def _hand_off(self, export: Export) -> None:
        """The acceptor's side: stop reading (later bytes stay in the kernel for the worker),
        and give the connection away once the last handshake reply has left."""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.export = export
        self.phase = _HANDING_OFF
        self.transport.pause_reading()
        if self.transport.get_write_buffer_size():
            self.transport.set_write_buffer_limits(high=0)  # resume_writing calls _give_away
        else:
            self._give_away()

    def _give_away(self) -> None:
        """The connection (and its transport) is the worker's now; this session is over."""
        transport, self.transport = self.transport, None
        self.phase = _CLOSED
        self.server.handoff(transport, self.export, self.neg, self.hs.take_buffered(), self.peer)
        self._finish(None)

    def _resume(self, h: Handoff) -> None:
        """The worker's side: start in the transmission phase with the acceptor's state."""
        self.peer = h.peer
        neg = self.neg
        neg.structured, neg.extended, neg.no_zeroes, neg.contexts = h.structured, h.extended, h.no_zeroes, h.contexts
        export = self.server.exports.get(h.export)
        if export is None or export.image is None:
            log.warning("%s: export %r is no longer served here; disconnecting", self.peer, h.export)
            self.phase = _CLOSED
            self._abort()
            return
        if neg.transmission_flags(export) != h.flags:  # e.g. reopened read-only since the handshake
            log.warning("%s: export %r changed since the handshake; disconnecting", self.peer, h.export)
            self.phase = _CLOSED
            self._abort()
            return
        self.hs.receive_data(h.pending)
        self._start_transmission(export)

    def _throttled(self) -> bool:
        return self.inflight >= self.cfg.max_requests or self.inflight_bytes >= self.cfg.max_inflight_bytes

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        want_pause = self._stopping or self._write_paused or self._throttled() or self._landing is not None
        if want_pause and not self._read_paused:
            t.pause_reading()
            self._read_paused = True
        elif not want_pause and self._read_paused:
            t.resume_reading()
            self._read_paused = False

    def _pump(self) -> None:
        """Parse and start requests until the buffer is empty or we are throttled."""
        if self._pumping:
            return
        self._pumping = True
        parser = self.parser
        try:
            while not (self._stopping or self._write_paused) and self.phase == _TRANSMISSION and not self._throttled():
                if self._held is None:
                    plain = parser.next_plain(
                        max_count=self.cfg.max_requests - self.inflight,
                        max_bytes=_BATCH_LIMIT - self._batch_bytes,
                        max_read=C.DEFAULT_MAX_PAYLOAD,
                        writes=self._writable,
                    )
                    if plain:
                        self._serve_plain(plain)
                        continue
                try:
                    req = parser.next_event()
                except ProtocolError as e:
                    log.warning("%s: protocol error: %s", self.peer, e)
                    self._abort()
                    return
                if req is None:
                    self._land()
                    break
                if self._held is not None:  # a request follows: the held payload is drained
                    self._dispatch(self._held)
                    self._held = None
                if req.oversize:
                    self._held = req
                    continue
                self._dispatch(req)
            if self._held is not None and parser.idle:
                self._dispatch(self._held)
                self._held = None
        finally:
            self._pumping = False
            if self._detach:  # before the parser can receive into the buffer again
                self._detach = False
                parser.detach()
            if not self._uncork_pending:
                self._flush_batch()
        self._update_reading()

    # -- requests ---------------------------------------------------------------------------

    def _serve_plain(self, plain: list[tuple[int, int, int, memoryview | None]]) -> None:
        """Start a run of plain READs and WRITEs (``RequestParser.next_plain``), checking each
        range inline; one out of range goes to ``_dispatch`` for its error reply.  Sequential
        in-range WRITEs are handed to a vectored image as one run, started before any other
        request of the batch (so a READ behind them sees them, as it would one by one).  Metrics:
        the requests answered at once are counted together at the end, each at the run's mean
        latency."""
        t0 = now_ns()
        size = self.image.size
        nreads = read_bytes = nwrites = write_bytes = 0  # answered at once
        run: list[memoryview] = []  # a run of sequential WRITEs not started yet
        replies: list[tuple[int, int]] = []
        run_start = run_end = 0
        vectored = self.image.vectored
        for cookie, offset, length, payload in plain:
            in_range = offset + length <= size
            if run:
                if (
                    payload is not None
                    and in_range
                    and vectored
                    and offset == run_end
                    and run_end - run_start + length <= C.DEFAULT_MAX_PAYLOAD
                ):
                    run.append(payload)
                    replies.append((cookie, offset))
                    run_end += length
                    continue
                if self._write(run_start, run if len(run) > 1 else run[0], replies, 0, True):
                    nwrites += len(replies)
                    write_bytes += run_end - run_start
                run, replies = [], []
            if not in_range:  # the error reply, as check_request words it
                if payload is None:
                    self._dispatch(Request(C.CMD_READ, 0, cookie, offset, length))
                else:
                    flags = C.CMD_FLAG_PAYLOAD_LEN if self.neg.extended else 0
                    self._dispatch(Request(C.CMD_WRITE, flags, cookie, offset, length))
            elif payload is None:
                if self._read(cookie, offset, length, 0):
                    nreads += 1
                    read_bytes += length
            else:
                run, replies = [payload], [(cookie, offset)]
                run_start, run_end = offset, offset + length
        if run and self._write(run_start, run if len(run) > 1 else run[0], replies, 0, True):
            nwrites += len(replies)
            write_bytes += run_end - run_start
        if nreads or nwrites:
            mean = (now_ns() - t0) // (nreads + nwrites)
            if nreads:
                self.stats.batch(C.CMD_READ, nreads, read_bytes, mean * nreads)
            if nwrites:
                self.stats.batch(C.CMD_WRITE, nwrites, write_bytes, mean * nwrites)

    def _dispatch(self, req: Request) -> None:
        """A request decoded on its own: checked by ``check_request``, then its route.  Counted
        in the metrics here when answered at once, else when ``_wait`` finishes it."""
        t = req.type
        if t == C.CMD_DISC:
            log.debug("%s: DISC", self.peer)
            self._stop()
            return
        t0 = now_ns()
        bad = self._check(req)
        if bad is not None:
            err, msg = bad
            log.debug("%s: rejected %r: %s", self.peer, req, msg)
            self.stats.error(err)
            self._send(self.enc.error(req.cookie, req.offset, nbd_errno(err), msg))
        elif t == C.CMD_READ:
            if not self._read(req.cookie, req.offset, req.length, req.flags):
                return
        elif t == C.CMD_WRITE:
            if not self._write(req.offset, req.payload, [(req.cookie, req.offset)], req.flags, req.inline):
                return
        else:
            self._wait(_HANDLERS[t](self, req), req, 0, None)
            return
        self.stats.request(t, req.length, now_ns() - t0)

    def _check(self, req: Request) -> tuple[int, str] | None:
        return check_request(
            req,
            size=self.image.size,
            export_flags=self.export_flags,
            extended=self.neg.extended,
            structured=self.enc.structured,
            max_payload=C.DEFAULT_MAX_PAYLOAD,
            have_contexts=bool(self.neg.contexts),
        )

    def _land(self) -> None:
        """The WRITE route's case for a large payload still arriving: if the request is valid,
        plain (no FUA), the connection is plaintext and the image puts the range byte for byte in
        a local file (``Image.landing``), the transport stops reading and the rest of the payload
        goes from the socket into the file by splice (``server.landing``), not into memory; the
        reply follows once all of it is in.  Otherwise nothing happens and the payload is received
        into its buffer as usual."""
        got = self.parser.payload_in_progress()
        if got is None or self._landing is not None or self.neg.tls:
            return
        req, received, left = got
        if left < LAND_MIN or req.flags & C.CMD_FLAG_FUA or self._check(req) is not None:
            return
        target = self.image.landing(req.offset, req.length)
        if target is None:
            return
        if self._splicer is None:
            sock = self.transport.get_extra_info("socket")
            try:
                if sock is None:
                    raise OSError(errno.ENOTSOCK, "the transport has no socket")
                self._splicer = Splicer(self.server.loop, sock.fileno())
            except OSError as e:  # out of descriptors, say: receive into memory
                log.debug("%s: cannot splice: %s", self.peer, e)
                target.release()
                return
        self._landing = target
        self._update_reading()
        self.inflight += 1
        self.inflight_bytes += req.length
        t0 = now_ns()

        def landed(exc: BaseException | None) -> None:
            self._landing = None
            target.release()
            self.inflight -= 1
            self.inflight_bytes -= req.length
            if isinstance(exc, ConnectionError):
                log.warning("%s: %s; disconnecting", self.peer, exc)
                self._abort()
                return
            if exc is not None:
                self._fail(req, exc)
            else:
                self._send(self.enc.done(req.cookie, req.offset))
                self.stats.spliced += req.length
            self.stats.request(C.CMD_WRITE, req.length, now_ns() - t0)
            self._update_reading()
            if self._stopping:
                self._maybe_close()
            elif not self._pumping:
                self._pump()

        self._splicer.start(target.fd, target.offset, received, left, landed, self.cfg.payload_timeout)
        self.parser.payload_taken()  # (``received`` was a view of the receive buffer: written now)

    def _wait(self, pending, req: Request, cost: int, reply, count: int = 1) -> None:
        """Drive ``pending`` (``coro.start``: no Task) with ``req`` counted in flight; then
        ``reply()`` (None: the handler replied itself), or the error reply.  The metrics count
        ``count`` requests of ``req.type`` (a run of WRITEs) and ``req.length`` bytes."""
        self.inflight += 1
        self.inflight_bytes += cost
        t0 = now_ns()

        def done(_result: object, exc: BaseException | None) -> None:
            self.inflight -= 1
            self.inflight_bytes -= cost
            if exc is not None:
                self._fail(req, exc)
            elif reply is not None:
                reply()
            self.stats.batch(req.type, count, req.length, (now_ns() - t0) * count)
            if self._stopping:
                self._maybe_close()
            elif not self._pumping:
                self._pump()

        coro.start(pending, done)

    def _read(self, cookie: int, offset: int, length: int, flags: int) -> bool:
        """The one READ route: a reply buffer with the data after its header, filled by
        ``Image.read``; the reply at once if that completed (True), else when it does (False:
        ``_wait`` counts it)."""
        enc = self.enc
        if not length:
            self._send(enc.none(cookie, offset) if enc.structured else enc.simple(cookie))
            return True
        hsize = enc.read_header_size
        out = bytearray(hsize + length) if hsize + length < self._small_reply else self._buffers.get(hsize + length)
        try:
            pending = self.image.read(offset, memoryview(out)[hsize:])
        except Exception as exc:  # becomes the request's error reply
            self._fail(Request(C.CMD_READ, flags, cookie, offset, length), exc)
            return True
        if pending is None:
            self._reply_read(out, cookie, offset, length, flags)
            return True
        req = Request(C.CMD_READ, flags, cookie, offset, length)
        self._wait(pending, req, length, lambda: self._reply_read(out, cookie, offset, length, flags))
        return False

    def _reply_read(self, out: bytearray, cookie: int, offset: int, length: int, flags: int) -> None:
        """Send a READ's reply: ``out`` holds the data after room for the header.  A structured
        read of at least ``SPARSE_READ_MIN`` bytes (without DF) whose data holds whole zero
        granules is sent as data and hole chunks."""
        enc = self.enc
        if length >= SPARSE_READ_MIN and enc.structured and not flags & C.CMD_FLAG_DF:
            holes = _zero_runs(out, enc.read_header_size, length)
            if holes:
                self._send_sparse(out, cookie, offset, length, holes)
                return
        enc.pack_read_header(out, cookie, offset, length)
        self._send(out)

    def _send_sparse(self, out: bytearray, cookie: int, offset: int, length: int, holes: list[tuple[int, int]]) -> None:
        """Data chunks (views of ``out``) and hole chunks, ``holes`` being [start, end) runs."""
        enc = self.enc
        hsize = enc.read_header_size
        data = memoryview(out)[hsize:]
        chunks: list = []
        pos = 0
        for i, (start, end) in enumerate(holes):
            if start > pos:
                chunks += [enc.data_header(cookie, offset, offset + pos, start - pos, done=False), data[pos:start]]
            chunks.append(
                enc.hole(cookie, offset, offset + start, end - start, done=end == length and i == len(holes) - 1)
            )
            pos = end
        if pos < length:
            chunks += [enc.data_header(cookie, offset, offset + pos, length - pos, done=True), data[pos:]]
        self._sendv(chunks)

    def _write(
        self,
        offset: int,
        data: memoryview | list[memoryview] | None,
        replies: list[tuple[int, int]],
        flags: int,
        inline: bool,
    ) -> bool:
        """The one WRITE route: ``Image.write`` of the payload (or of a run of sequential
        payloads) where it was received; a reply per ``(cookie, offset)`` of ``replies``, at once
        if the write completed (True), else when it does (False: ``_wait`` counts them).
        ``inline``: the payload is a view of the receive buffer, which a write that must wait
        keeps (the parser detaches from it)."""
        try:
            pending = self.image.write(offset, data, fua=bool(flags & C.CMD_FLAG_FUA)) if data else None
        except Exception as exc:  # becomes the error reply of every request of the run
            for cookie, off in replies:
                self._fail(Request(C.CMD_WRITE, flags, cookie, off, 0), exc)
            return True
        done = self.enc.done
        if pending is None:
            for cookie, off in replies:
                self._send(done(cookie, off))
            return True
        self._detach |= inline
        cost = sum(map(len, data)) if type(data) is list else len(data)
        cookie, off = replies[0]
        req = Request(C.CMD_WRITE, flags, cookie, off, cost)

        def reply() -> None:
            for cookie, off in replies:
                self._send(done(cookie, off))

        def fail(exc: BaseException) -> None:
            for cookie, off in replies[1:]:
                self._fail(Request(C.CMD_WRITE, flags, cookie, off, 0), exc)

        self._wait(_also_failing(pending, fail) if len(replies) > 1 else pending, req, cost, reply, len(replies))
        return False

    def _fail(self, req: Request, exc: BaseException) -> None:
        if not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt, SystemExit: not a request error
        err, msg = error_of(exc)
        self.stats.error(err)
        fast = req.type == C.CMD_WRITE_ZEROES and bool(req.flags & C.CMD_FLAG_FAST_ZERO)
        expected = isinstance(exc, NbdError) and err != errno.EIO
        bug = not isinstance(exc, (NbdError, OSError, ImageError))
        log.log(logging.DEBUG if expected else logging.WARNING, "%s: %r failed: %s", self.peer, req, msg, exc_info=bug)
        self._send(self.enc.error(req.cookie, req.offset, nbd_errno(err, fast_zero=fast), for_client(msg)))

    def _send(self, data: bytes | bytearray) -> None:
        """Send one reply.  Replies are collected in a batch and written with one
        ``writelines``: at the end of ``_pump`` for those it produced, and by one ``_uncork``
        callback for the replies of completions outside it (every completion resolved in one loop
        iteration shares one write, and one wake-up of the client).  A batch of
        ``_BATCH_LIMIT`` bytes is written at once, so write back-pressure is noticed."""
        batch = self._batch if self._batch is not None else self._new_batch()
        batch.append(data)
        self._batch_bytes += len(data)
        if self._batch_bytes >= _BATCH_LIMIT:
            self._flush_batch()  # may pause writing, which ends a _pump

    def _sendv(self, chunks: list) -> None:
        """Send the chunks of one reply together (batched as ``_send`` says)."""
        batch = self._batch if self._batch is not None else self._new_batch()
        batch.extend(chunks)
        self._batch_bytes += sum(map(len, chunks))
        if self._batch_bytes >= _BATCH_LIMIT:
            self._flush_batch()

    def _new_batch(self) -> list:
        self._batch = []
        if not (self._pumping or self._uncork_pending):
            self._uncork_pending = True
            self.server.loop.call_soon(self._uncork)
        return self._batch

    def _uncork(self) -> None:
        self._uncork_pending = False
        if not self._pumping:
            self._flush_batch()

    def _flush_batch(self) -> None:
        """Write the batch, if any (the one place replies reach the transport)."""
        batch, self._batch = self._batch, None
        self._batch_bytes = 0
        t = self.transport
        if batch and t is not None and not t.is_closing():
            t.writelines(_records(batch) if self.neg.tls else batch)

    # Coroutine handlers of the rarer requests: each replies on success; an exception becomes an
    # error reply (see _fail).

    async def _flush(self, req: Request) -> None:
        await self.image.flush()
        self._send(self.enc.done(req.cookie, req.offset))

    async def _trim(self, req: Request) -> None:
        if req.length:
            await self.image.trim(req.offset, req.length, fua=bool(req.flags & C.CMD_FLAG_FUA))
        self._send(self.enc.done(req.cookie, req.offset))

    async def _write_zeroes(self, req: Request) -> None:
        f = req.flags
        if req.length:
            await self.image.write_zeroes(
                req.offset,
                req.length,
                may_trim=not f & C.CMD_FLAG_NO_HOLE,
                fast=bool(f & C.CMD_FLAG_FAST_ZERO),
                fua=bool(f & C.CMD_FLAG_FUA),
            )
        self._send(self.enc.done(req.cookie, req.offset))

    async def _cache(self, req: Request) -> None:
        try:
            await self.image.cache_hint(req.offset, req.length)
        except Exception as e:
            log.debug("%s: cache hint failed: %s", self.peer, e)
        self._send(self.enc.done(req.cookie, req.offset))

    async def _block_status(self, req: Request) -> None:
        enc, off, n = self.enc, req.offset, req.length
        limit = 1 if req.flags & C.CMD_FLAG_REQ_ONE else _MAX_EXTENTS
        contexts = self.neg.contexts
        runs = None
        chunks = []
        for i, (cid, name) in enumerate(contexts):
            if name.startswith(C.CONTEXT_DIRTY_BITMAP):
                extents = self.export.bitmaps[name[len(C.CONTEXT_DIRTY_BITMAP) :]].extents(off, n, limit)
            else:
                if runs is None:
                    runs = await self.image.runs(off, n, limit=limit)
                allocation = name == C.CONTEXT_BASE_ALLOCATION  # else qemu:allocation-depth
                extents = []
                for r in runs:
                    value = r.flags if allocation else r.depth
                    if extents and extents[-1][1] == value:
                        extents[-1] = (extents[-1][0] + r.length, value)
                    else:
                        extents.append((r.length, value))
                extents = extents[:limit]
            chunks.append(enc.block_status(req.cookie, off, cid, extents, done=i == len(contexts) - 1))
        self._sendv(chunks)


async def _also_failing(pending, fail) -> None:
    """``pending``, calling ``fail(exc)`` before its error propagates (the other requests of a
    coalesced run of writes get the error reply too)."""
    try:
        await pending
    except Exception as exc:
        fail(exc)
        raise


def _zero_runs(out: bytearray, start: int, length: int) -> list[tuple[int, int]]:
    """[begin, end) runs (relative to ``start``) of whole ``HOLE_GRANULE``s of ``out[start:start+
    length]`` that hold only zero bytes; [] if there are none.  One byte of each granule is sampled
    first (a bytes copy of a strided view), so data with no zero granule costs a few microseconds
    per MiB; candidates are compared with ``startswith`` (memcmp), a run of them at once."""
    g = HOLE_GRANULE
    count = length // g
    if not count:
        return []
    sample = bytes(memoryview(out)[start + g - 1 : start + count * g : g])
    i = sample.find(0)
    runs: list[tuple[int, int]] = []
    while i >= 0:
        j = i + 1
        while j < count and not sample[j]:
            j += 1
        a, b = i * g, j * g
        if out.startswith(_ZEROES[: b - a], start + a):
            _add_run(runs, a, b)
        else:
            for k in range(i, j):
                if out.startswith(_ZEROES[:g], start + k * g):
                    _add_run(runs, k * g, (k + 1) * g)
        i = sample.find(0, j)
    return runs


def _add_run(runs: list[tuple[int, int]], a: int, b: int) -> None:
    if runs and runs[-1][1] == a:
        runs[-1] = (runs[-1][0], b)
    else:
        runs.append((a, b))


_HANDLERS = {
    C.CMD_FLUSH: Session._flush,
    C.CMD_TRIM: Session._trim,
    C.CMD_WRITE_ZEROES: Session._write_zeroes,
    C.CMD_CACHE: Session._cache,
    C.CMD_BLOCK_STATUS: Session._block_status,
}

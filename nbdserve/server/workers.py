"""Worker processes: the exports spread over cores (``--workers N``; docs/workers.md).

Owns the supervisor (``Supervisor``, in the process that listens: the *acceptor*), the worker
side (``worker_main``), the export-to-worker assignment (``assign``), the hand-off of a
negotiated connection (``Handoff``), the TLS relay (``_Relay``) and the control channel
(``Channel``) between them.

The acceptor does every handshake (options, TLS, access rules) and, when a client has chosen an
export (GO or EXPORT_NAME), gives the connection to the worker that owns the export: the socket
goes over the worker's control channel with ``SCM_RIGHTS``, with the negotiated state and any
request bytes the acceptor had already read.  A TLS connection cannot be given away (its keys
live in the acceptor's TLS library), so the acceptor keeps it and relays the plaintext over a
socketpair whose other end goes to the worker.

Invariants:
  * An export is opened by exactly one process, its owner: its cache and metadata stay coherent
    and its image lock is held once.  The acceptor opens no image.
  * One source of truth for what an export is: the owner reports each export's size, read-only
    flag, bitmaps or the reason it failed to open, after opening and after each reload; the
    acceptor answers INFO/GO/LIST from that report and from the configuration's access settings.
  * The acceptor counts the connections it gave away (per export and per worker); the worker
    reports each one's end.  When a worker dies its counts are dropped and it is started again;
    its exports stay listed with their last report, and connections chosen for them wait in the
    acceptor until the new worker reports (then they go to it, or are closed if the export no
    longer opens).
  * ``--workers 1`` runs none of this: one process, as before.

Only the event-loop thread of each process touches this state.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from .. import logsetup
from ..cache import ClusterCache
from ..config import ConfigError, ExportConfig, ServerConfig
from ..errors import ImageError
from ..logsetup import NOTICE
from ..loop import new_event_loop
from .exports import Export, ExportTable, close_exports, open_exports, settings
from .metrics import ExportStats, snapshot, statistics_lines
from .options import Negotiation, Policy

log = logging.getLogger("nbdserve")

# Messages larger than this travel in a memfd passed with the message (a SOCK_SEQPACKET message
# must fit the socket's send buffer).
_INLINE_MAX = 64 << 10
_RECV_MAX = _INLINE_MAX + 4096
_MAX_FDS = 4
_STATS_TIMEOUT = 2.0  # a worker that does not answer a metrics scrape in time is left out of it
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_ENTRY = "import sys; sys.path.insert(0, sys.argv[1]); from nbdserve.server.workers import worker_main; worker_main()"


@dataclass(frozen=True)
class Handoff:
    """What a worker needs to transmit on a connection whose handshake the acceptor did."""

    export: str
    structured: bool
    extended: bool
    no_zeroes: bool
    contexts: tuple[tuple[int, str], ...]
    flags: int  # the transmission flags the client was told
    peer: str  # the client, as the log names it
    pending: bytes  # request bytes the acceptor read after the handshake


def assign(exports: tuple[ExportConfig, ...], n: int, previous: dict[str, int] | None = None) -> dict[str, int]:
    """Export name -> worker index.  Kept from ``previous`` when it has one (a reload moves no
    export), else the export's pin, else the worker of an earlier export of the same file (so
    the image locks decide between them in one process, in configuration order, as without
    workers), else the worker with the fewest exports (lowest index on a tie), in configuration
    order: the same configuration always gives the same assignment."""
    previous = previous or {}
    owner: dict[str, int] = {}
    load = [0] * n
    for e in exports:
        i = previous.get(e.name, e.worker)
        if i is not None and i < n:
            owner[e.name] = i
            load[i] += 1
    by_file: dict[object, int] = {}
    for e in exports:
        key = _file_key(e.path) if e.location is None else e.location.name
        if e.name not in owner:
            i = by_file.get(key)
            if i is None:
                i = min(range(n), key=lambda k: (load[k], k))
            owner[e.name] = i
            load[i] += 1
        by_file.setdefault(key, owner[e.name])
    return owner


def _file_key(path: str) -> object:
    """What identifies an image file: (device, inode), or the resolved path if it cannot be
    looked at (it will fail to open anyway)."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


def worker_config(cfg: ServerConfig, owner: dict[str, int], index: int, n: int) -> ServerConfig:
    """``cfg`` with only the exports of worker ``index`` and its share of the cache budget
    (``--cache-size`` is the server's, whatever the number of processes)."""
    mine = tuple(e for e in cfg.exports if owner[e.name] == index)
    return replace(cfg, exports=mine, cache_size=cfg.cache_size // n)


# -- the control channel --------------------------------------------------------------------------


class Channel:
    """Pickled messages, each with optional file descriptors, over a SOCK_SEQPACKET socket.
    ``send`` queues (descriptors given to it are closed once sent or dropped); each received
    message goes to ``on_message(msg, fds)``; the peer's end to ``on_eof()``.  The peer is this
    program's other process and nothing else can reach the socket (a socketpair)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_message: Callable[[dict, list[int]], None],
        on_eof: Callable[[], None],
    ) -> None:
        self.loop, self.sock = loop, sock
        self.on_message, self.on_eof = on_message, on_eof
        self._queue: deque[tuple[bytes, list[int]]] = deque()
        self._writing = False
        self.closed = False
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._readable)

    def send(self, msg: dict, fds: list[int] | tuple[int, ...] = ()) -> None:
        fds = list(fds)
        if self.closed:
            for fd in fds:
                os.close(fd)
            return
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > _INLINE_MAX:
            mfd = os.memfd_create("nbdserve-message")
            os.write(mfd, data)  # a memfd takes the whole write
            os.lseek(mfd, 0, os.SEEK_SET)  # the receiver reads it from the start
            data = pickle.dumps({"t": "memfd"})
            fds.insert(0, mfd)
        self._queue.append((data, fds))
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        while self._queue:
            data, fds = self._queue[0]
            try:
                socket.send_fds(self.sock, [data], fds) if fds else self.sock.send(data)
            except BlockingIOError:
                if not self._writing:
                    self._writing = True
                    self.loop.add_writer(self.sock.fileno(), self._flush)
                return
            except OSError:
                self.close()  # the peer is gone: its end will be reported
                return
            self._queue.popleft()
            for fd in fds:
                os.close(fd)
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        while not self.closed:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, _RECV_MAX, _MAX_FDS)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self.close()
                self.on_eof()
                return
            try:
                msg = _decode(data, fds)
            except Exception as e:  # a bug on the other side: drop the message, keep the channel
                log.error("control channel: undecodable message (%s)", e)
                for fd in fds:
                    os.close(fd)
                continue
            if msg["t"] == "memfd":
                fds = fds[1:]
            self.on_message(msg["msg"] if msg["t"] == "memfd" else msg, fds)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
        for _data, fds in self._queue:
            for fd in fds:
                os.close(fd)
        self._queue.clear()
        self.sock.close()


def _decode(data: bytes, fds: list[int]) -> dict:
    """A received message; one sent in a memfd comes back as {"t": "memfd", "msg": ...} (the
    memfd, ``fds[0]``, is closed here)."""
    msg = pickle.loads(data)
    if msg.get("t") == "memfd":
        with open(fds[0], "rb") as f:  # closes the memfd
            msg = {"t": "memfd", "msg": pickle.loads(f.read())}
    return msg


# -- the acceptor's side --------------------------------------------------------------------------


@dataclass
class RemoteImage:
    """The acceptor's stand-in for an image a worker has open: what negotiation needs."""

    size: int

    async def close(self) -> None:
        pass  # the worker closes the image


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen | None = None
    channel: Channel | None = None
    pidfd: int = -1
    started: float = 0.0
    quick_deaths: int = 0  # deaths soon after a start, in a row (restarts back off)
    ready: bool = False  # its exports are open and reported
    report: dict[str, dict] = field(default_factory=dict)  # export name -> what it reported
    open: dict[str, int] = field(default_factory=dict)  # export name -> connections given to it
    waiting: list[tuple[str, Handoff, int]] = field(default_factory=list)  # (export, state, fd) until ready
    first_report: asyncio.Future | None = None
    exited: asyncio.Future | None = None


class Supervisor:
    """The acceptor's side: starts, supervises and stops the workers, gives them connections."""

    def __init__(self, cfg: ServerConfig, n: int, log_settings: logsetup.LogSettings) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.log_settings = log_settings
        self.owner = assign(cfg.exports, n)
        self.workers = [_Worker(i) for i in range(n)]
        self.by_name: dict[str, Export] = {}
        self.server: Any = None  # listeners.Server, once attached
        self.stopping = False
        self.restarts = 0
        self._replies: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._relays: set[_Relay] = set()

    # -- life cycle

    async def start(self) -> tuple[ExportTable, list[tuple[str, str]]]:
        """Start every worker and wait for their reports: (the export table, failed exports)."""
        for w in self.workers:
            self._spawn(w)
        # The interpreters start together; the images open one worker after the other, so when
        # two exports conflict (a file that is another's backing file, say) the same one wins
        # at every start.
        for w in self.workers:
            w.channel.send({"t": "open"})
            await w.first_report
        self._update_table()
        failed = [(e.name, self._reason(e.name)) for e in self.by_name.values() if e.image is None]
        return ExportTable([self.by_name[e.name] for e in self.cfg.exports]), failed

    def _reason(self, name: str) -> str:
        rep = self.workers[self.owner[name]].report.get(name)
        return rep["detail"] or rep["reason"] if rep else "its worker did not start"

    def attach(self, server: Any) -> None:
        self.server = server
        server.handoff = self.hand_off
        server.exports.replace([self.by_name[e.name] for e in self.cfg.exports])
        for w in self.workers:
            self._log_worker(w)

    def _spawn(self, w: _Worker) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        quiet = subprocess.DEVNULL if self.cfg.fork else None  # a forked server has let go of stderr
        try:
            w.proc = subprocess.Popen(
                [sys.executable, "-c", _ENTRY, _ROOT, str(child.fileno())],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=quiet,
            )
        finally:
            child.close()
        w.started = self.loop.time()
        w.ready = False
        w.first_report = w.first_report or self.loop.create_future()
        w.exited = self.loop.create_future()
        w.channel = Channel(self.loop, parent, lambda m, f, w=w: self._message(w, m, f), lambda: None)
        w.pidfd = os.pidfd_open(w.proc.pid)
        self.loop.add_reader(w.pidfd, self._died, w)
        w.channel.send(
            {
                "t": "start",
                "index": w.index,
                "cfg": worker_config(self.cfg, self.owner, w.index, len(self.workers)),
                "log": self.log_settings,
                "background": self.cfg.fork,
            }
        )
        if w.first_report.done():  # a restart: open at once (the others hold their images)
            w.channel.send({"t": "open"})
        if self.server is not None:  # a restart (the first start is logged once serving)
            self._log_worker(w)

    def _log_worker(self, w: _Worker) -> None:
        log.log(NOTICE, "worker %d: pid %d, exports %s", w.index, w.proc.pid, _names(self._mine(w.index)))

    def _mine(self, index: int) -> list[str]:
        return [e.name for e in self.cfg.exports if self.owner[e.name] == index]

    def _died(self, w: _Worker) -> None:
        self.loop.remove_reader(w.pidfd)
        os.close(w.pidfd)
        status = w.proc.wait()
        w.channel.close()
        w.ready = False
        self._forget_connections(w)
        w.exited.set_result(status)
        if self.stopping:
            return
        how = f"signal {-status}" if status < 0 else f"status {status}"
        log.error("worker %d (pid %d) exited (%s); starting it again", w.index, w.proc.pid, how)
        self.restarts += 1
        if self.server is not None:
            self.server.metrics.worker_restarts += 1
        quick = self.loop.time() - w.started < 1.0
        w.quick_deaths = w.quick_deaths + 1 if quick else 0
        delay = 0.0 if w.quick_deaths < 2 else min(0.25 * 2**w.quick_deaths, 30.0)
        if not w.first_report.done():  # it died before reporting: its exports failed to start
            w.first_report.set_result(None)
        self.loop.call_later(delay, lambda: self.stopping or self._spawn(w))

    def _forget_connections(self, w: _Worker) -> None:
        """The worker is gone, and with it every connection it had."""
        for name, n in w.open.items():
            e = self.by_name.get(name)
            if e is not None:
                e.connections -= n
            if self.server is not None:
                self.server.handed -= n
        w.open.clear()
        if self.server is not None:
            self.server.session_ended()  # a slot may be free (-e)

    async def stop(self) -> None:
        """SIGTERM: every worker drains (answers what is in flight, then exits); then the TLS
        relays, whose worker ends are closed by then, finish."""
        self.stopping = True
        for w in self.workers:
            if w.channel is not None and not w.exited.done():
                w.channel.send({"t": "stop"})
                for _name, _h, fd in w.waiting:
                    os.close(fd)
                w.waiting.clear()
        await asyncio.gather(*(w.exited for w in self.workers if w.exited is not None))
        while self._relays:
            await next(iter(self._relays)).done

    # -- messages from workers

    def _message(self, w: _Worker, msg: dict, fds: list[int]) -> None:
        for fd in fds:  # workers send none
            os.close(fd)
        t = msg["t"]
        if t == "exports":
            w.report = {r["name"]: r for r in msg["exports"]}
            if w.first_report.done():  # a restart (the first start's failures are the caller's to tell)
                for r in msg["exports"]:
                    if r["reason"]:
                        log.error("export %r not available: %s", r["name"], r["detail"] or r["reason"])
            w.ready = True
            w.quick_deaths = 0 if self.loop.time() - w.started >= 1.0 else w.quick_deaths
            self._update_table()
            if not w.first_report.done():
                w.first_report.set_result(None)
            waiting, w.waiting = w.waiting, []
            for name, h, fd in waiting:
                self._send_connection(w, name, h, fd)
        elif t == "closed":
            self._connection_closed(w, msg["export"])
        elif t in ("stats", "prepared", "reloaded"):
            fut = self._replies.pop(msg["id"], None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _update_table(self) -> None:
        """The acceptor's exports from the configuration and the owners' reports."""
        for ec in self.cfg.exports:
            e = self.by_name.get(ec.name)
            if e is None:
                e = self.by_name[ec.name] = Export(ec.name, ec.description, True, None, "starting", config=ec)
            e.description, e.config = ec.description, ec
            for k, v in settings(ec).items():
                setattr(e, k, v)
            rep = self.workers[self.owner[ec.name]].report.get(ec.name)
            if rep is None:
                continue  # not reported yet (or its worker is starting again): keep the last report
            if rep["reason"]:
                e.image, e.error, e.readonly, e.bitmaps = None, rep["reason"], True, {}
            else:
                e.image, e.error, e.readonly = RemoteImage(rep["size"]), "", rep["readonly"]
                e.bitmaps = dict.fromkeys(rep["bitmaps"])  # names only: negotiation offers them
        for name in [n for n in self.by_name if n not in self.owner]:
            del self.by_name[name]
        if self.server is not None:
            self.server.exports.replace([self.by_name[e.name] for e in self.cfg.exports])

    # -- connections

    def hand_off(
        self, transport: asyncio.Transport, export: Export, neg: Negotiation, pending: bytes, peer: str
    ) -> None:
        """Give a negotiated connection to the owner of ``export`` (``Session._give_away``)."""
        h = Handoff(
            export.name,
            neg.structured,
            neg.extended,
            neg.no_zeroes,
            neg.contexts,
            neg.transmission_flags(export),
            peer,
            b"" if neg.tls else pending,
        )
        if neg.tls:
            fd = _Relay(self, transport, pending).worker_end
        else:
            fd = os.dup(transport.get_extra_info("socket").fileno())
            transport.close()  # the acceptor's descriptor; the worker's keeps the connection
        w = self.workers[self.owner[export.name]]
        export.connections += 1
        self.server.handed += 1
        w.open[export.name] = w.open.get(export.name, 0) + 1
        if w.ready:
            self._send_connection(w, export.name, h, fd)
        else:
            w.waiting.append((export.name, h, fd))

    def _send_connection(self, w: _Worker, name: str, h: Handoff, fd: int) -> None:
        rep = w.report.get(name)
        if rep is None or rep["reason"]:  # gone or failed since the client chose it
            os.close(fd)
            self._connection_closed(w, name)
            return
        w.channel.send({"t": "conn", "h": h}, [fd])

    def _connection_closed(self, w: _Worker, name: str) -> None:
        if not w.open.get(name):
            return
        w.open[name] -= 1
        e = self.by_name.get(name)
        if e is not None:
            e.connections -= 1
        self.server.handed -= 1
        self.server.session_ended()

    # -- requests to workers

    async def _ask(self, w: _Worker, msg: dict, timeout: float | None) -> dict | None:
        rid = next(self._ids)
        fut = self._replies[rid] = self.loop.create_future()
        w.channel.send({**msg, "id": rid})
        exited = w.exited
        try:
            done, _ = await asyncio.wait([fut, exited], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._replies.pop(rid, None)
        return fut.result() if fut in done else None

    async def snapshots(self) -> list[dict]:
        """The metrics of every process: the acceptor's own counters, then each worker's."""
        asks = [self._ask(w, {"t": "stats"}, _STATS_TIMEOUT) for w in self.workers if w.ready]
        replies = await asyncio.gather(*asks)
        own = snapshot(self.server)
        own["cache"] = {}
        own["exports"] = {}
        reported = set()
        for r in replies:
            if r is not None:
                reported.update(r["snap"]["exports"])
        for e in self.server.exports:  # exports whose worker is down: listed, not up
            if e.name not in reported:
                stats = ExportStats(e.name).snapshot()
                stats.update(connections=e.connections, inflight=0, up=0, size=e.size)
                own["exports"][e.name] = stats
        return [own, *(r["snap"] for r in replies if r is not None)]

    def log_statistics(self) -> None:
        """SIGUSR1: each worker logs its exports' statistics."""
        for w in self.workers:
            if w.ready:
                w.channel.send({"t": "usr1"})

    async def reload(self, new: ServerConfig) -> bool:
        """SIGHUP: all workers apply the new configuration to their exports, or none does.

        Two phases (server/reload.py's ``prepare`` and ``commit``/``abort``, per worker): each
        worker prepares its part (checks it, opens its new images; nothing changes); only if
        every worker could are they all told to commit, else all that prepared abort, and one
        line says which worker refused and why.  Exports keep their worker, new ones are
        assigned as at start; the acceptor then takes the new access settings, TLS credentials
        and reports.  One reload at a time (the acceptor's reload lock)."""
        from .reload import keep_restart_only, reload_lock, tls_for

        server = self.server
        async with reload_lock(server):
            new = keep_restart_only(self.cfg, new)
            try:
                tls = tls_for(server, self.cfg, new)
            except ConfigError as e:
                server.metrics.reload_failures += 1
                log.error("reload rejected: %s; still serving the previous configuration", e)
                return False
            owner = assign(new.exports, len(self.workers), self.owner)
            for ec in new.exports:
                if ec.worker is not None and ec.worker != owner[ec.name]:
                    log.warning("reload: export %r stays on worker %d until a restart", ec.name, owner[ec.name])
            n = len(self.workers)
            prepares = [
                self._ask(w, {"t": "prepare", "cfg": worker_config(new, owner, w.index, n)}, None) for w in self.workers
            ]
            prepared = await asyncio.gather(*prepares)
            refusals = [
                f"worker {w.index}: " + (r["why"] if r is not None else "exited while preparing it")
                for w, r in zip(self.workers, prepared, strict=True)
                if r is None or not r["ok"]
            ]
            ok = not refusals
            decides = [
                self._ask(w, {"t": "decide", "for": r["id"], "commit": ok}, None)
                for w, r in zip(self.workers, prepared, strict=True)
                if r is not None and r["ok"]
            ]
            replies = await asyncio.gather(*decides)
            if ok:
                self.cfg, self.owner = new, owner
                server.cfg, server.policy, server.tls = new, Policy.from_config(new), tls
                server.metrics.reloads += 1
            else:
                server.metrics.reload_failures += 1
                log.error(
                    "reload rejected: %s; no worker applied it, all still serve the previous configuration",
                    "; ".join(refusals),
                )
            for r in replies:
                if r is not None:
                    self.workers[r["index"]].report = {x["name"]: x for x in r["exports"]}
            self._update_table()
            return ok


class _Relay:
    """A TLS connection the acceptor keeps: plaintext from the client goes to the worker over a
    socketpair, and the worker's replies come back the same way.  Each direction stops reading
    while the other side's write buffer is full; either side's end closes both."""

    def __init__(self, sup: Supervisor, tls: asyncio.Transport, pending: bytes) -> None:
        self.sup = sup
        self.outer = tls
        self.inner: asyncio.Transport | None = None
        self.done = sup.loop.create_future()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.worker_end = theirs.detach()
        sup._relays.add(self)
        tls.set_protocol(_Pipe(self, outer=True))
        sup.loop.create_task(self._connect(mine, pending))

    async def _connect(self, sock: socket.socket, pending: bytes) -> None:
        sock.setblocking(False)
        transport, _ = await self.sup.loop.connect_accepted_socket(lambda: _Pipe(self, outer=False), sock)
        self.inner = transport  # type: ignore[assignment]
        if self.done.done():
            transport.close()
            return
        if pending:
            transport.write(pending)
        self.outer.resume_reading()

    def other(self, outer: bool) -> asyncio.Transport | None:
        return self.inner if outer else self.outer

    def close(self) -> None:
        if self.done.done():
            return
        self.outer.close()  # after the buffered replies; then close_notify
        if self.inner is not None:
            self.inner.close()
        self.done.set_result(None)
        self.sup._relays.discard(self)


class _Pipe(asyncio.Protocol):
    """One side of a ``_Relay``."""

    def __init__(self, relay: _Relay, outer: bool) -> None:
        self.relay, self.outer = relay, outer

    def data_received(self, data: bytes) -> None:
        peer = self.relay.other(self.outer)
        if peer is not None and not peer.is_closing():
            peer.write(data)

    def eof_received(self) -> bool:
        self.relay.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.close()

    def pause_writing(self) -> None:
        peer = self.relay.other(self.outer)
        if peer is not None and not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.relay.other(self.outer)
        if peer is not None and not peer.is_closing():
            peer.resume_reading()


# -- the worker's side ----------------------------------------------------------------------------


def worker_main() -> None:
    """A worker process (started by ``Supervisor._spawn``): open the exports it was given, then
    transmit on the connections the acceptor hands over until told to stop (or until the
    acceptor is gone).  Signals other than SIGTERM are the acceptor's to route."""
    ctrl = socket.socket(fileno=int(sys.argv[2]))
    data, fds, _flags, _addr = socket.recv_fds(ctrl, _RECV_MAX, _MAX_FDS)
    msg = _decode(data, fds)
    msg = msg["msg"] if msg["t"] == "memfd" else msg
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    data, _fds, _flags, _addr = socket.recv_fds(ctrl, _RECV_MAX, _MAX_FDS)
    if not data or pickle.loads(data)["t"] != "open":  # told to stop before opening anything
        return
    logsetup.setup(msg["log"], background=msg["background"])
    loop = new_event_loop()
    try:
        loop.run_until_complete(_work(ctrl, msg["cfg"], msg["index"]))
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()


def _report(server: Any, details: dict[str, str]) -> list[dict]:
    """What the acceptor needs of each export (``reason``: as a client may see it; ``detail``:
    the full one-line error of the open, for the log)."""
    return [
        {
            "name": e.name,
            "size": e.size,
            "readonly": e.readonly,
            "bitmaps": list(e.bitmaps),
            "reason": e.error if e.image is None else "",
            "detail": details.get(e.name, "") if e.image is None else "",
        }
        for e in server.exports
    ]


async def _work(ctrl: socket.socket, cfg: ServerConfig, index: int) -> None:
    from .listeners import Server
    from .reload import prepare, reload_lock
    from .session import Session

    loop = asyncio.get_running_loop()
    cache = ClusterCache(cfg.cache_size)
    exports, failed = await open_exports(cfg, cache)
    details = dict(failed)
    server = Server(cfg, exports, loop, None, cache)
    tasks: set[asyncio.Task] = set()
    chan: Channel

    async def connect(h: Handoff, sock: socket.socket) -> None:
        session = Session(server, h)
        session.closed.add_done_callback(lambda _f: chan.send({"t": "closed", "export": h.export}))
        try:
            await loop.connect_accepted_socket(lambda: session, sock)
        except OSError as e:
            log.warning("%s: cannot take over the connection: %s", h.peer, e)
            sock.close()
            chan.send({"t": "closed", "export": h.export})

    decisions: dict[int, asyncio.Future] = {}  # prepared reloads waiting for "decide"

    async def reload(rid: int, new: ServerConfig) -> None:
        """Prepare this worker's part of a reload, answer "prepared", then commit or abort as
        the acceptor decides (the reload lock held throughout; see Supervisor.reload)."""
        async with reload_lock(server):
            try:
                prepared = await prepare(server, new)
            except (ConfigError, ImageError) as e:
                chan.send({"t": "prepared", "id": rid, "ok": False, "why": str(e)})
                return
            if server._stopping:  # no decision will come (see the end of _work)
                commit, did = False, None
            else:
                decision = decisions[rid] = loop.create_future()
                chan.send({"t": "prepared", "id": rid, "ok": True})
                commit, did = await decision
            if commit:
                await prepared.commit()
            else:
                await prepared.abort()
        if did is not None:
            chan.send({"t": "reloaded", "id": did, "index": index, "exports": _report(server, details)})

    def message(msg: dict, fds: list[int]) -> None:
        t = msg["t"]
        if t == "conn":
            h = msg["h"]
            sock = socket.socket(fileno=fds[0])
            if server._stopping:
                sock.close()
                chan.send({"t": "closed", "export": h.export})
                return
            sock.setblocking(False)
            task = loop.create_task(connect(h, sock))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif t == "stats":
            snap = snapshot(server)
            snap.pop("started")
            snap["reloads"] = snap["reload_failures"] = 0  # the acceptor counts reloads
            chan.send({"t": "stats", "id": msg["id"], "snap": snap})
        elif t == "usr1":
            for line in statistics_lines(server):
                log.log(NOTICE, "worker %d: %s", index, line)
        elif t == "prepare":
            task = loop.create_task(reload(msg["id"], msg["cfg"]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif t == "decide":
            fut = decisions.pop(msg["for"], None)
            if fut is not None and not fut.done():
                fut.set_result((msg["commit"], msg["id"]))
        elif t == "stop":
            server.shutdown()

    chan = Channel(loop, ctrl, message, server.shutdown)
    loop.add_signal_handler(signal.SIGTERM, server.shutdown)
    chan.send({"t": "exports", "exports": _report(server, details)})
    await server.stopped
    for fut in decisions.values():  # the acceptor is gone or stopping: close what was prepared
        if not fut.done():
            fut.set_result((False, None))
    await asyncio.gather(*tasks, return_exceptions=True)
    await close_exports(server.exports)
    for e in list(server.retired):
        if e.image is not None:
            await e.image.close()
    chan.close()


def _names(names: list[str]) -> str:
    return ", ".join(map(repr, names)) or "none"

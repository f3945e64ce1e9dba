"""Running the server: fork, pid file, readiness, signals, and the orderly end.

Owns ``run(cfg) -> exit status``.  Order of events:
  1. bind the sockets, not yet listening (errors are reported before anything else);
  2. with ``--fork``, fork; the parent waits on a pipe until the child reports "ready" (or an
     error, which the parent prints) and then exits, so "the command returned" means "serving";
  3. open every export (one-line errors), then listen and accept, write the pid file, notify
     systemd (READY=1): no client connects before the images are open;
  4. serve until SIGTERM/SIGINT (or, one-shot, the last client leaving); then stop listening,
     finish in-flight requests, flush and close every image, remove the pid file and the Unix
     socket file this process created (on every exit after binding, errors included).
SIGHUP calls ``Server.reload`` (TLS certificates and keys are read again; see ``server/tls.py``).

The open-file limit is raised to its hard limit at start (each connection is a descriptor).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import resource
import signal
import socket
import sys

from ..cache import ClusterCache
from ..config import ConfigError, ServerConfig
from ..errors import ImageError
from ..loop import new_event_loop
from .exports import close_exports, open_exports
from .listeners import Bound, Server, bind_sockets, describe
from .tls import TlsServer

log = logging.getLogger("nbdserve")

M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc malloc.h)
M_MMAP_THRESHOLD = -3


def tune_allocator() -> None:
    """Keep freed request/reply buffers in the heap instead of returning them to the kernel.

    glibc serves blocks above 128 KiB with mmap and trims the heap top eagerly, so every large
    reply buffer was faulted in afresh (131k page faults for one 1 GiB nbdcopy; 128 with this).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def raise_fd_limit(cfg: ServerConfig) -> None:
    """Raise the soft open-file limit to the hard one; warn if the connection limit needs more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    need = cfg.shared + 64  # connections, plus images, listeners and the loop's own
    if cfg.shared and soft != resource.RLIM_INFINITY and need > soft:
        log.warning("the open-file limit (%d) allows fewer clients than -e/--shared %d", soft, cfg.shared)


def run(cfg: ServerConfig) -> int:
    tune_allocator()
    raise_fd_limit(cfg)
    try:
        bound = Bound([]) if cfg.stdio else bind_sockets(cfg)
    except ConfigError as e:
        print(f"nbdserve: {e}", file=sys.stderr)
        return 1
    ready_w = None
    if cfg.fork:
        r, w = os.pipe()
        pid = os.fork()
        if pid:
            os.close(w)
            bound.close()  # the child serves them (and removes the socket file)
            return _parent_wait(r)
        os.close(r)
        os.setsid()
        ready_w = w
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.close(devnull)
    try:
        loop = new_event_loop()
        try:
            return loop.run_until_complete(_serve(cfg, bound, ready_w))
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
    finally:
        bound.remove_socket_file()


def _parent_wait(r: int) -> int:
    msg = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        msg += chunk
    if msg == b"ready":
        return 0
    print(msg.decode(errors="replace") or "nbdserve: server exited during start-up", file=sys.stderr)
    return 1


def _report(ready_w: int | None, text: str) -> None:
    if ready_w is None:
        if text != "ready":
            print(text, file=sys.stderr)
        return
    os.write(ready_w, text.encode())
    os.close(ready_w)


def _sd_notify(state: str) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("sd_notify failed: %s", e)


async def _serve(cfg: ServerConfig, bound: Bound, ready_w: int | None) -> int:
    loop = asyncio.get_running_loop()
    try:
        tls = TlsServer(cfg) if cfg.tls_mode != "off" else None
    except ConfigError as e:
        bound.remove_socket_file()  # before the parent hears of it: the file is gone on exit
        _report(ready_w, f"nbdserve: {e}")
        return 1
    cache = ClusterCache(cfg.cache_size)
    socks = bound.socks
    try:
        exports = await open_exports(cfg, cache)
    except ImageError as e:
        bound.remove_socket_file()
        _report(ready_w, f"nbdserve: {e}")
        return 1
    server = Server(cfg, exports, loop, tls)
    try:
        if cfg.stdio:
            await server.serve_stdio()
        else:
            await server.listen(socks)
    except (ConfigError, OSError) as e:
        await close_exports(exports)
        bound.remove_socket_file()
        _report(ready_w, f"nbdserve: {e}")
        return 1
    if cfg.pid_file:
        with open(cfg.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.shutdown)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    if not cfg.stdio and not cfg.quiet:
        for uri in describe(socks, cfg):
            names = [e.name for e in exports]
            shown = uri if names == [""] else ", ".join(uri.rstrip("/") + "/" + n.lstrip("/") for n in names)
            log.warning("serving %s", shown) if cfg.demo else log.info("serving %s", shown)
    _sd_notify("READY=1")
    _report(ready_w, "ready")
    await server.stopped
    _sd_notify("STOPPING=1")
    log.info("shutting down: flushing and closing images")
    await close_exports(exports)
    bound.remove_socket_file()
    if cfg.pid_file:
        try:
            os.unlink(cfg.pid_file)
        except OSError:
            pass
    log.debug("cache statistics: %s", cache.stats())
    return 0

"""Running the server: logging, fork, pid file, readiness, signals, the short-lived modes, and the
orderly end.

Owns ``run(cfg, reconfigure) -> exit status``.  Order of events:
  1. set up logging (stderr, or the ``--log`` destination); with ``--exit-with-parent`` ask the
     kernel for SIGTERM when the parent dies; with ``-k -`` make a private socket directory;
  2. bind the sockets, not yet listening (errors are reported before anything else); raise the
     open-file limit to its hard limit (each connection is a descriptor);
  3. with ``--fork`` (or ``-c`` without ``-v``), fork; the parent waits on a pipe until the child
     reports "ready" (then prints what the child sends for stdout, e.g. ``--print-uri``, and exits
     0) or an error (printed on stderr, exit 1), so "the command returned" means "serving";
  4. open every export (one-line errors; with several, the failed ones stay listed, unavailable:
     the start fails only if none opened, or, with ``require-exports = "all"``, if any failed);
     then listen and accept (no client connects before the images are open); start the
     ``--metrics`` endpoint; with ``-c``, attach the kernel device; write the pid
     file; log the URI of every export; notify systemd (READY=1, STATUS=) and feed its watchdog;
  5. a forked child then detaches: logging moves to the background destination and stdin,
     stdout and stderr become /dev/null, so ``out=$(nbdserve --fork ...)`` returns at once;
  6. serve until SIGTERM/SIGINT, the last client leaving (one-shot), the ``--run`` command
     exiting, or the kernel device being disconnected; then stop listening, finish in-flight
     requests, flush and close every image, remove the pid file, the Unix socket file this
     process created and the private socket directory (on every exit after binding).
Signals: SIGHUP reads the configuration again (``reconfigure``) and applies it
(``server/reload.py``); SIGUSR1 logs per-export statistics.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from .. import logsetup
from ..cache import ClusterCache
from ..client import Client, ClientError
from ..config import ConfigError, ServerConfig
from ..kernel import KernelError, attach, check_device, wait_connected
from ..logsetup import NOTICE
from ..loop import new_event_loop
from .exports import close_exports, open_exports
from .listeners import Bound, Server, bind_sockets, describe, export_uri
from .metrics import MetricsEndpoint, parse_address, snapshot, statistics_lines
from .tls import TlsServer
from .workers import Supervisor

log = logging.getLogger("nbdserve")

M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc malloc.h)
M_MMAP_THRESHOLD = -3
PR_SET_PDEATHSIG = 1


class StartError(Exception):
    """Serving could not start; the message is the one line the user sees."""


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


def log_settings(cfg: ServerConfig) -> logsetup.LogSettings:
    level = logsetup.level_for(cfg.verbose, cfg.quiet)
    if level == logging.WARNING and not cfg.qemu_nbd:
        level = NOTICE  # nbdserve prints its URIs at default verbosity; qemu-nbd prints nothing
    return logsetup.LogSettings(cfg.log, cfg.log_format, level, cfg.trace)


def exit_with_parent() -> None:
    """SIGTERM when the parent exits (prctl PR_SET_PDEATHSIG); at once if it already has."""
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise StartError(f"--exit-with-parent: prctl failed: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def run(cfg: ServerConfig, reconfigure: Callable[[], ServerConfig] | None = None) -> int:
    tune_allocator()
    settings = log_settings(cfg)
    try:
        logsetup.setup(settings)
    except OSError as e:
        print(f"nbdserve: cannot log to {cfg.log}: {e.strerror or e}", file=sys.stderr)
        return 1
    raise_fd_limit(cfg)
    private_dir = None
    try:
        if cfg.exit_with_parent:
            exit_with_parent()
        if cfg.socket == "-":
            private_dir = tempfile.mkdtemp(prefix="nbdserve-")
            cfg = replace(cfg, socket=os.path.join(private_dir, "nbd.sock"))
        if cfg.connect_device is not None:
            try:
                check_device(cfg.connect_device)
            except KernelError as e:
                raise StartError(str(e)) from None
        bound = Bound([]) if cfg.stdio else bind_sockets(cfg)
    except (ConfigError, StartError) as e:
        print(f"nbdserve: {e}", file=sys.stderr)
        if private_dir:
            shutil.rmtree(private_dir, ignore_errors=True)
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
            return loop.run_until_complete(_serve(cfg, bound, ready_w, reconfigure, settings))
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
    finally:
        bound.remove_socket_file()
        if private_dir:
            shutil.rmtree(private_dir, ignore_errors=True)


def _parent_wait(r: int) -> int:
    msg = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        msg += chunk
    status, _, rest = msg.partition(b"\n")
    if status == b"ready":
        sys.stdout.write(rest.decode(errors="replace"))
        return 0
    print(rest.decode(errors="replace") or "nbdserve: server exited during start-up", file=sys.stderr)
    return 1


def _fail(ready_w: int | None, text: str, bound: Bound) -> None:
    """A start-up error: the socket file goes first (it is gone when the launcher hears), then
    the one line goes to the launcher."""
    bound.remove_socket_file()
    if ready_w is None:
        print(text, file=sys.stderr)
        return
    os.write(ready_w, b"error\n" + text.encode())
    os.close(ready_w)


def _detach_and_report(ready_w: int | None, stdout_text: str, settings: logsetup.LogSettings) -> None:
    """Serving: tell the launcher (and give it what goes to stdout); a forked child then lets go
    of the launcher's stdout and stderr, so a shell's ``$(...)`` around it returns at once."""
    if ready_w is None:
        if stdout_text:
            sys.stdout.write(stdout_text)
            sys.stdout.flush()
        return
    try:
        logsetup.setup(settings, background=True)
    except OSError as e:
        log.error("cannot log to %s once detached: %s; logging stops", settings.dest, e.strerror or e)
        logsetup.setup(replace(settings, dest="null"), background=True)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    os.write(ready_w, b"ready\n" + stdout_text.encode())
    os.close(ready_w)


def sd_notify(state: str) -> None:
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


def _watchdog(loop: asyncio.AbstractEventLoop) -> None:
    """Feed systemd's watchdog (WATCHDOG_USEC) from the event loop, twice per period."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return
    pid = os.environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return
    period = usec / 2e6

    def ping() -> None:
        sd_notify("WATCHDOG=1")
        loop.call_later(period, ping)

    ping()


async def _serve(
    cfg: ServerConfig,
    bound: Bound,
    ready_w: int | None,
    reconfigure: Callable[[], ServerConfig] | None,
    settings: logsetup.LogSettings,
) -> int:
    loop = asyncio.get_running_loop()
    socks = bound.socks
    workers = cfg.worker_count()
    # With workers, this process (the acceptor) opens no image: see server/workers.py.
    supervisor = Supervisor(cfg, workers, settings) if workers > 1 else None
    cache = ClusterCache(cfg.cache_size) if supervisor is None else None
    exports = None

    async def close_all() -> None:
        if supervisor is not None:
            await supervisor.stop()
        if exports is not None:
            await close_exports(exports)

    try:
        tls = TlsServer(cfg) if cfg.tls_mode != "off" else None
        exports, failed = await (supervisor.start() if supervisor else open_exports(cfg, cache))
        if len(cfg.exports) == 1 and failed:
            raise StartError(failed[0][1])
        reasons = "; ".join(f"export {name!r}: {reason}" for name, reason in failed)
        if failed and len(failed) == len(cfg.exports):
            raise StartError(f"no export could be opened: {reasons}")
        if failed and cfg.require_exports == "all":
            n = f"{len(failed)} of {len(cfg.exports)}"
            raise StartError(f"{n} exports failed to open (require-exports = all): {reasons}")
        for name, reason in failed:
            log.error("export %r not available: %s", name, reason)
    except (ConfigError, StartError) as e:
        await close_all()
        _fail(ready_w, f"nbdserve: {e}", bound)
        return 1
    server = Server(cfg, exports, loop, tls, cache)
    server.notify = sd_notify
    if supervisor is not None:
        supervisor.attach(server)
    endpoint = None
    try:
        if cfg.stdio:
            await server.serve_stdio()
        else:
            await server.listen(socks)
        if cfg.metrics is not None:
            source = supervisor.snapshots if supervisor else lambda: [snapshot(server)]
            endpoint = MetricsEndpoint(source, lambda: bool(server.serving()))
            host, port = parse_address(cfg.metrics)
            try:
                where = await endpoint.start(host, port)
            except OSError as e:
                raise StartError(f"--metrics {cfg.metrics}: cannot listen: {e.strerror or e}") from None
            log.log(NOTICE, "metrics at http://%s/metrics", _hostport(where[0]))
        attached = await _attach_device(server, cfg, socks) if cfg.connect_device else None
    except (ConfigError, OSError, StartError) as e:
        server.shutdown()
        await close_all()
        _fail(ready_w, f"nbdserve: {e.strerror if isinstance(e, OSError) and e.strerror else e}", bound)
        return 1
    if cfg.pid_file:
        with open(cfg.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.shutdown)
    apply = supervisor.reload if supervisor else server.reload
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(_reload(server, apply, reconfigure)))
    if supervisor is not None:
        loop.add_signal_handler(signal.SIGUSR1, supervisor.log_statistics)
    else:
        loop.add_signal_handler(signal.SIGUSR1, lambda: [log.log(NOTICE, "%s", x) for x in statistics_lines(server)])
    uris = [] if cfg.stdio else [export_uri(b, e.name) for b in describe(socks, cfg) for e in server.serving()]
    if not cfg.qemu_nbd:
        for uri in uris:
            log.log(NOTICE, "serving %s", uri)
    sd_notify("READY=1")
    server.status()
    _watchdog(loop)
    _detach_and_report(ready_w, uris[0] + "\n" if cfg.print_uri and uris else "", settings)
    status = 0
    if cfg.run is not None:
        status = await _run_command(server, cfg, socks)
    await server.stopped
    sd_notify("STOPPING=1")
    log.info("shutting down: flushing and closing images")
    if endpoint is not None:
        endpoint.close()
    await close_all()
    for e in list(server.retired):
        if e.image is not None:
            await e.image.close()
    if attached is not None:
        await attached
    if cfg.pid_file:
        try:
            os.unlink(cfg.pid_file)
        except OSError:
            pass
    if cache is not None:
        log.debug("cache statistics: %s", cache.stats())
    return status


def _hostport(addr: tuple) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _reload(
    server: Server, apply: Callable[[ServerConfig], Awaitable[bool]], reconfigure: Callable[[], ServerConfig] | None
) -> None:
    """SIGHUP: read the configuration again and apply it.  systemd hears RELOADING=1 at the
    start and READY=1 at the end, whether the new configuration was applied or rejected."""
    log.log(NOTICE, "SIGHUP: reloading the configuration")
    sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        new = reconfigure() if reconfigure is not None else server.cfg
    except ConfigError as e:
        server.metrics.reload_failures += 1
        log.error("reload rejected: %s; still serving the previous configuration", e)
        sd_notify(f"READY=1\nSTATUS=reload rejected: {e}")
        return
    ok = await apply(new)
    sd_notify("READY=1" if ok else "READY=1\nSTATUS=reload rejected (see the log)")
    if ok:
        server.status()


def _command_env(server: Server, cfg: ServerConfig, socks: list[socket.socket]) -> dict[str, str]:
    """nbdkit's --run variables for the first export on the first socket."""
    name = server.serving()[0].name if server.serving() else ""
    base = describe(socks, cfg)[0]
    sock = socks[0]
    unix = sock.getsockname() if sock.family == socket.AF_UNIX else ""
    port = "" if unix else str(sock.getsockname()[1])
    uri = export_uri(base, name)
    tls = {"off": "0", "on": "1", "require": "2"}[cfg.tls_mode]
    return {"uri": uri, "nbd": uri, "port": port, "unixsocket": unix, "exportname": name, "tls": tls}


async def _run_command(server: Server, cfg: ServerConfig, socks: list[socket.socket]) -> int:
    """``--run``: the command's exit status (128 + N if signal N ended it); the server stops
    when it exits."""
    env = {**os.environ, **_command_env(server, cfg, socks)}
    try:
        proc = await asyncio.create_subprocess_shell(cfg.run, env=env)
    except OSError as e:
        log.error("--run: cannot start the command: %s", e.strerror or e)
        server.shutdown()
        return 1
    done = asyncio.ensure_future(proc.wait())
    await asyncio.wait([done, server.stopped], return_when=asyncio.FIRST_COMPLETED)
    if not done.done():
        return 0  # stopped by a signal while the command runs; the command is left alone
    server.shutdown()
    rc = done.result()
    return 128 - rc if rc < 0 else rc


async def _attach_device(server: Server, cfg: ServerConfig, socks: list[socket.socket]) -> asyncio.Future:
    """``-c DEVICE``: a client of our own socket hands its connection to the kernel; returns once
    the device is up.  The returned future resolves when the device has been disconnected."""
    loop = asyncio.get_running_loop()
    device, path = cfg.connect_device, socks[0].getsockname()
    name = cfg.exports[0].name
    failure: list[str] = []
    finished = loop.create_future()

    def worker() -> None:
        try:
            c = Client(unix=path)
            info = c.go(name)
            attach(device, c.sock, info.size, info.flags)
            c.close()
        except (ClientError, KernelError) as e:
            failure.append(str(e))
        finally:
            loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

    thread = threading.Thread(target=worker, name="nbd-device", daemon=True)
    thread.start()
    up = await loop.run_in_executor(None, wait_connected, device, 30.0, lambda: thread.is_alive())
    if not up:
        await finished
        raise StartError(failure[0] if failure else f"{device} did not come up")
    log.info("%s connected", device)
    return finished

"""Command line -> ``ServerConfig`` -> ``server.app.run``.  No serving logic lives here.

Two personalities share one parser:
  * ``nbdserve``: nbdserve's defaults.  Listens on 127.0.0.1, serves until stopped, prints the
    URI of every export at start, refuses a client over the ``-e`` limit with a reason.
  * ``qemu-nbd`` (the ``nbdserve-qemu-nbd`` command, or any program name ending in ``qemu-nbd``):
    qemu-nbd's defaults and exit behaviour for scripts written for it.  Listens on 0.0.0.0; ``-e``
    defaults to 1 and a client over the limit waits in the listen queue until a slot frees;
    without ``-t`` the server exits once the last client that completed a handshake leaves;
    ``--discard`` defaults to ``ignore``; nothing is printed at start; ``-c`` goes to the
    background unless ``-v``; usage errors exit with status 1.

``QEMU_NBD_OPTIONS`` is the table of every option qemu-nbd 7.2 lists in ``--help`` (and those
later versions added) and what nbdserve does with it; the tests run every row, and
docs/qemu-nbd.md shows the same table to readers (a test keeps the two equal).  Every other
option is nbdserve's own (from nbdkit where it has one: ``--run``, ``--exit-with-parent``,
``--print-uri``, ``-U -``).  Abbreviated long options are not accepted.

Exit status: 0 served and stopped cleanly (or ``-L``/``-d`` succeeded); 1 a start-up failure
(an image, a socket, credentials) or a qemu-nbd-style usage error; 2 an nbdserve usage or
configuration error; with ``--run``, the command's status (128 + N if signal N killed it).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any

from . import __version__
from .config import (
    DEFAULT_BACKLOG,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PORT,
    EXPORT_SCHEMA,
    FORMATS,
    REPAIR_MODES,
    ConfigError,
    ExportConfig,
    ServerConfig,
    load_toml,
    merge,
    parse_export_spec,
    parse_image_opts,
    parse_size,
    secrets_from,
    tls_settings,
    validate,
)
from .crypto.secret import SecretError
from .logsetup import DESTINATIONS
from .objects import ObjectError, ObjectTable, split_options
from .server.tls import PSK_PYTHON_TEXT
from .server.view import CACHE_MODES, DETECT_ZEROES_MODES, DISCARD_MODES
from .storage.location import LocationError, parse_location, storage_options

DEMO_SIZE = 1 << 30


@dataclass(frozen=True)
class QemuOption:
    """One qemu-nbd option: its spellings, ``implemented`` or ``refused``, and what it does here."""

    flags: tuple[str, ...]
    status: str
    meaning: str


QEMU_NBD_OPTIONS: tuple[QemuOption, ...] = (
    QemuOption(("-h", "--help"), "implemented", "print the options and exit"),
    QemuOption(("-V", "--version"), "implemented", "print the version and exit"),
    QemuOption(("-p", "--port"), "implemented", "TCP port to listen on (or, with -L, to connect to)"),
    QemuOption(("-b", "--bind"), "implemented", "address to listen on (or, with -L, to connect to)"),
    QemuOption(("-k", "--socket"), "implemented", "Unix socket path (- : a private one in a temporary directory)"),
    QemuOption(
        ("-e", "--shared"),
        "implemented",
        "at most NUM clients at once; the next one waits (qemu-nbd way) or is refused with a reason (nbdserve)",
    ),
    QemuOption(
        ("-t", "--persistent"),
        "implemented",
        "keep serving after the last client; without it the qemu-nbd way exits then (nbdserve never does)",
    ),
    QemuOption(("-v", "--verbose"), "implemented", "log more; with -c, stay in the foreground"),
    QemuOption(("-x", "--export-name"), "implemented", "export name"),
    QemuOption(("-D", "--description"), "implemented", "export description"),
    QemuOption(("-o", "--offset"), "implemented", "the export starts OFFSET bytes into the image"),
    QemuOption(("-A", "--allocation-depth"), "implemented", "qemu:allocation-depth (always offered)"),
    QemuOption(("-B", "--bitmap"), "implemented", "a qcow2 persistent dirty bitmap as qemu:dirty-bitmap:NAME"),
    QemuOption(("-L", "--list"), "implemented", "list the exports of an NBD server"),
    QemuOption(("--object",), "implemented", "secret, tls-creds-x509, tls-creds-psk, authz-simple objects"),
    QemuOption(("--tls-creds",), "implemented", "TLS credentials (an --object id, or a directory)"),
    QemuOption(("--tls-authz",), "implemented", "only this authz-simple identity may connect"),
    QemuOption(("--tls-hostname",), "implemented", "with -L: the name the server's certificate must carry"),
    QemuOption(
        ("-T", "--trace"),
        "implemented",
        "a log filter: messages matching the pattern are logged whatever their level (no QEMU trace events)",
    ),
    QemuOption(("--fork",), "implemented", "go to the background once serving; the parent exits 0"),
    QemuOption(("--pid-file",), "implemented", "write the server's pid"),
    QemuOption(
        ("--selinux-label",),
        "refused",
        "nbdserve does not set SELinux labels on its socket; label the directory with semanage fcontext",
    ),
    QemuOption(("-c", "--connect"), "implemented", "attach the image to a kernel NBD device (/dev/nbdX)"),
    QemuOption(("-d", "--disconnect"), "implemented", "detach a kernel NBD device"),
    QemuOption(("-f", "--format"), "implemented", f"image format ({', '.join(FORMATS)})"),
    QemuOption(("-r", "--read-only"), "implemented", "serve read-only"),
    QemuOption(("-s", "--snapshot"), "implemented", "writes go to a temporary overlay, discarded at exit"),
    QemuOption(("-l", "--load-snapshot"), "implemented", "serve an internal qcow2 snapshot, read-only"),
    QemuOption(("-n", "--nocache"), "implemented", "the same as --cache=none"),
    QemuOption(("--cache",), "implemented", "none, writeback, writethrough, directsync, unsafe (QEMU's semantics)"),
    QemuOption(("--aio",), "implemented", "threads, native (needs O_DIRECT, as in QEMU), io_uring: one I/O engine"),
    QemuOption(("--discard",), "implemented", "ignore or unmap: whether TRIM deallocates"),
    QemuOption(("--detect-zeroes",), "implemented", "off, on, unmap: all-zero writes become zero-writes"),
    QemuOption(("--image-opts",), "implemented", "IMAGE is driver=FMT,file.filename=PATH[,...]"),
    QemuOption(("--handshake-limit",), "implemented", "(QEMU 9.1) seconds a client has for its handshake"),
)
REFUSED = {f: o for o in QEMU_NBD_OPTIONS if o.status == "refused" for f in o.flags}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (and qemu-nbd's exit status 1 when invoked that way)."""

    def __init__(self, *a, qemu_nbd: bool = False, **kw) -> None:
        super().__init__(*a, allow_abbrev=False, **kw)
        self.qemu_nbd = qemu_nbd

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(1 if self.qemu_nbd else 2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def size_arg(text: str) -> int:
    """An argparse type for sizes ("64M"): a bad one is a usage error, not a traceback."""
    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _listening(p: ArgumentParser) -> None:
    """Where and how the server listens, and its process life."""
    g = p.add_argument_group("listening")
    g.add_argument("-p", "--port", type=int, help=f"TCP port (default {DEFAULT_PORT})")
    g.add_argument(
        "-b", "--bind", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all; qemu-nbd way: 0.0.0.0)"
    )
    g.add_argument(
        "-k",
        "--socket",
        "--unix",
        metavar="PATH",
        help="listen on a Unix socket instead of TCP; '-' (also '-U -'): a private socket in a temporary directory",
    )
    g.add_argument("--stdio", action="store_true", help="serve one connection on stdin/stdout (a socket)")
    g.add_argument(
        "-e",
        "--shared",
        type=int,
        metavar="N",
        help=f"at most N clients at once; more are refused (default {DEFAULT_MAX_CONNECTIONS}; 0: no limit; "
        "qemu-nbd way: 1, and the next one waits)",
    )
    g.add_argument(
        "--backlog", type=int, metavar="N", help=f"listen queue for connect bursts (default {DEFAULT_BACKLOG})"
    )
    g.add_argument(
        "-t",
        "--persistent",
        action="store_true",
        help="keep serving after the last client; without it the qemu-nbd way exits then (nbdserve never does)",
    )
    g.add_argument("--oneshot", action="store_true", help="exit once the last client has disconnected")
    g.add_argument("--fork", action="store_true", help="go to the background once serving")
    g.add_argument("--pid-file", metavar="PATH", help="write the server's pid here (removed at exit)")


def _short_lived(p: ArgumentParser) -> None:
    """nbdkit's short-lived server options."""
    g = p.add_argument_group("short-lived servers (as nbdkit has them)")
    g.add_argument(
        "--run",
        metavar="CMD",
        help="run the shell command CMD once serving ($uri, $nbd, $port, $unixsocket, $exportname, $tls set); "
        "stop when it exits, with its exit status",
    )
    g.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process exits")
    g.add_argument("--print-uri", action="store_true", help="print the URI of the (first) export on stdout")


def _the_image(p: ArgumentParser) -> None:
    """The single image given as IMAGE and how it is served."""
    g = p.add_argument_group("the image given as IMAGE")
    g.add_argument("-x", "--export-name", default="", metavar="NAME", help="export name (default '')")
    g.add_argument(
        "-f",
        "--format",
        choices=FORMATS,
        help="image format (default: probe; raw needs -f raw for images with another format's magic)",
    )
    g.add_argument(
        "--image-opts",
        action="store_true",
        help="IMAGE is qemu's option string: driver=FMT,file.filename=PATH[,read-only=on][,cache.direct=on]"
        "[,key-secret=ID (luks) | encrypt.key-secret=ID (qcow2)]...; the secret from --object secret,id=ID,...",
    )
    g.add_argument("-r", "--read-only", action="store_true", help="serve read-only")
    g.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="with -r: open the image even while another process (QEMU, qemu-nbd) writes it",
    )
    g.add_argument("-D", "--description", default="", help="export description shown to clients")
    g.add_argument("-s", "--snapshot", action="store_true", help="write to a temporary overlay, discarded at exit")
    g.add_argument(
        "--overlay",
        metavar="PATH",
        help="write to a persistent local qcow2 overlay at PATH over IMAGE (created if missing, reused if it "
        "records IMAGE as its backing)",
    )
    g.add_argument(
        "-l",
        "--load-snapshot",
        metavar="SNAPSHOT",
        help="serve a qcow2 internal snapshot (read-only): ID_OR_NAME or snapshot.id=ID / snapshot.name=NAME",
    )
    g.add_argument("-o", "--offset", type=size_arg, metavar="OFFSET", help="serve the image from this offset on")
    g.add_argument("--vpc-size", choices=("auto", "chs", "current"), default="auto", help="VHD virtual size rule")
    g.add_argument(
        "--repair",
        choices=REPAIR_MODES,
        default="off",
        help="a qcow2 opened read-write whose refcounts are wrong: off (default) serves it read-only "
        "(harmless leaks: read-write, with a warning); leaks also frees leaked clusters and sets missing "
        "COPIED flags; all also rebuilds wrong refcounts",
    )
    g.add_argument(
        "-B",
        "--bitmap",
        action="append",
        default=[],
        metavar="NAME",
        help="export the qcow2 persistent dirty bitmap NAME as the meta context qemu:dirty-bitmap:NAME "
        "(repeatable; a bitmap of a backing file too)",
    )
    g.add_argument(
        "-A", "--allocation-depth", action="store_true", help="accepted for qemu-nbd compatibility (always on)"
    )
    g.add_argument(
        "--cache",
        choices=CACHE_MODES,
        help="writeback (default): FLUSH/FUA make writes durable; writethrough: every write is; none, directsync: "
        "the same with O_DIRECT; unsafe: FLUSH and FUA do nothing",
    )
    g.add_argument("-n", "--nocache", action="store_true", help="the same as --cache=none")
    g.add_argument(
        "--aio", choices=("threads", "native", "io_uring"), help="accepted (native needs --cache=none or directsync)"
    )
    g.add_argument(
        "--discard", choices=DISCARD_MODES, help="unmap (default): TRIM deallocates; ignore: TRIM does nothing"
    )
    g.add_argument(
        "--detect-zeroes",
        choices=DETECT_ZEROES_MODES,
        help="all-zero writes become zero-writes (unmap: may deallocate)",
    )


def _many_exports(p: ArgumentParser) -> None:
    """Exports from --export and --config."""
    g = p.add_argument_group("many exports")
    g.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="NAME=PATH[,KEY=VALUE]...",
        help="add an export (repeatable; keys as in [[export]] of the config file, e.g. format=qcow2,readonly)",
    )
    g.add_argument(
        "--config", metavar="FILE.toml", help="read [server] settings and [[export]] tables (re-read on SIGHUP)"
    )


def _clients(p: ArgumentParser) -> None:
    """Acting as a client: the kernel's NBD device, listing another server."""
    g = p.add_argument_group("the kernel's NBD client, and other servers")
    g.add_argument("-c", "--connect", metavar="DEVICE", help="attach IMAGE to the kernel NBD device DEVICE (/dev/nbdX)")
    g.add_argument("-d", "--disconnect", action="store_true", help="detach the kernel NBD device given as DEVICE")
    g.add_argument("-L", "--list", action="store_true", help="list the exports of the server at -b/-p or -k")
    g.add_argument("--tls-hostname", metavar="NAME", help="with -L: the host name the server's certificate names")


def _tls_and_access(p: ArgumentParser) -> None:
    """TLS credentials, client authorisation and address allow lists."""
    g = p.add_argument_group(
        "TLS and access control",
        "Off by default. --tls-creds or --tls-psk turns TLS on, required for every option (FORCEDTLS) "
        'unless --tls=on makes it optional; an export with tls="required" in --config then needs it. '
        "qemu-nbd's spelling works too: --object tls-creds-x509,id=ID,endpoint=server,dir=DIR --tls-creds ID.",
    )
    g.add_argument(
        "--tls", choices=("off", "on", "require"), help="TLS mode (default: require once credentials are given)"
    )
    g.add_argument(
        "--tls-creds",
        metavar="DIR|ID",
        help="X.509 directory (ca-cert.pem, server-cert.pem, server-key.pem, optional ca-crl.pem), "
        "or the id of a tls-creds-x509 / tls-creds-psk --object",
    )
    g.add_argument(
        "--tls-verify-peer",
        action="store_const",
        const=True,
        help="require client certificates signed by ca-cert.pem (on by default for --object tls-creds-x509)",
    )
    g.add_argument(
        "--tls-psk",
        metavar="FILE",
        help=f"pre-shared keys, one 'username:hexkey' a line; needs Python >= {PSK_PYTHON_TEXT} "
        "(on older Pythons nbdserve refuses to start and says so)",
    )
    g.add_argument(
        "--tls-authz",
        action="append",
        default=[],
        metavar="ID",
        help="only the TLS identity of --object authz-simple,id=ID,identity=DN (or PSK username) may connect "
        "(repeatable)",
    )
    g.add_argument(
        "--object",
        action="append",
        default=[],
        metavar="TYPE,id=ID,...",
        help="define tls-creds-x509, tls-creds-psk, authz-simple or secret (an encrypted image's passphrase: "
        "data=TEXT or file=PATH, format=raw|base64) as qemu-nbd does (',,' is a literal comma)",
    )
    g.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="ADDR[/PREFIX]|uid:ID|gid:ID",
        help="only clients matching an entry may use any export (repeatable; Unix-socket clients match uid:/gid:)",
    )
    g.add_argument(
        "--refuse-as",
        choices=("policy", "unknown"),
        help="a client refused an export gets ERR_POLICY (default) or is told the export does not exist",
    )


def _tuning(p: ArgumentParser) -> None:
    """Limits and tuning."""
    g = p.add_argument_group("tuning and limits")
    g.add_argument("--cache-size", type=size_arg, metavar="SIZE", help="shared metadata cache budget (default 64M)")
    g.add_argument(
        "--backing-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="directory backing files may live in (repeatable; default: the image's own directory)",
    )
    g.add_argument(
        "--handshake-timeout",
        "--handshake-limit",
        type=float,
        metavar="SECONDS",
        help="drop clients that have not finished the handshake (default 10)",
    )
    g.add_argument(
        "--drain-timeout",
        type=float,
        metavar="SECONDS",
        help="cut off a closing connection (shutdown, DISC, a removed export) whose in-flight replies "
        "are not sent within SECONDS (default 30; 0: no limit)",
    )
    g.add_argument(
        "--payload-timeout",
        type=float,
        metavar="SECONDS",
        help="cut off a client that sends nothing for SECONDS inside a large WRITE payload the server "
        "is putting straight into the image file (that range is held meanwhile; default 30; 0: no limit)",
    )
    g.add_argument(
        "--max-options", type=int, metavar="N", help="options allowed per handshake (default 32 + 4 per export)"
    )
    g.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="worker processes serving the exports (default: one per core, at most one per export; "
        "1: everything in one process); an export may name its worker (worker = K in --config)",
    )
    g.add_argument("--max-option-length", type=size_arg, metavar="SIZE", help="largest option accepted (default 64K)")


def _logging(p: ArgumentParser) -> None:
    """Logs, traces and metrics."""
    g = p.add_argument_group("logging and monitoring")
    g.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for every request error)")
    g.add_argument("-q", "--quiet", action="store_true", help="log only errors")
    g.add_argument(
        "--log",
        metavar="DEST",
        help=f"where logs go: {', '.join(DESTINATIONS)} or a FILE path (default auto: stderr; once --fork "
        "has detached, the journal or syslog)",
    )
    g.add_argument("--log-format", choices=("text", "json"), help="text (default) or one JSON object a line")
    g.add_argument(
        "-T",
        "--trace",
        action="append",
        default=[],
        metavar="[enable=]PATTERN[,events=FILE][,file=FILE]",
        help="also log lower-level messages matching PATTERN (shell-style); events=FILE: patterns from FILE; "
        "file=FILE: log to FILE",
    )
    g.add_argument(
        "--metrics", metavar="ADDR:PORT", help="serve Prometheus metrics at http://ADDR:PORT/metrics (off by default)"
    )
    g.add_argument("--selinux-label", metavar="LABEL", help=argparse.SUPPRESS)


def build_parser(qemu_nbd: bool = False) -> ArgumentParser:
    prog = "qemu-nbd" if qemu_nbd else "nbdserve"
    p = ArgumentParser(
        prog=prog,
        qemu_nbd=qemu_nbd,
        description="Serve disk images (raw, qcow2, qed, vpc, vhdx, vmdk, vdi, luks) over the NBD protocol.",
        epilog="With no IMAGE, --export or --config, a sparse 1 GiB demo image is created and served. See nbdserve(8).",
    )
    p.add_argument(
        "image", nargs="?", metavar="IMAGE", help="image file to serve (export name: -x, default ''); with -d: DEVICE"
    )
    for add in (_listening, _short_lived, _the_image, _many_exports, _clients, _tls_and_access, _tuning, _logging):
        add(p)
    p.add_argument("-V", "--version", action="version", version=f"nbdserve {__version__}")
    return p


def demo_image() -> str:
    """A sparse 1 GiB raw image with a short greeting at offset 0 (created once, then reused)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "nbdserve", "demo.img")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as f:
            f.write(b"nbdserve demo image: write anything you like here.\n")
            f.truncate(DEMO_SIZE)
        os.replace(path + ".tmp", path)
    return path


def image_location(text: str) -> dict[str, Any]:
    """The positional IMAGE: a file, or an ``rbd:``/``s3://`` location with its own options
    (``rbd:pool/vm,conf=FILE``); the export's other settings are flags here."""
    if not storage_options(text):
        return {"path": text}
    try:
        location, rest = parse_location(text, EXPORT_SCHEMA)
    except LocationError as e:
        raise ConfigError(f"IMAGE: {e}") from None
    if rest:
        raise ConfigError(
            f"IMAGE: {rest[0][0]} is an export setting, not the location's: give it as a flag (-f, -r, ...) "
            "or use --export NAME=LOCATION,..."
        )
    return {"path": location.name, "location": location}


def _load_snapshot(text: str | None) -> str | None:
    """``-l``: ``ID_OR_NAME`` or qemu-nbd's ``snapshot.id=ID[,snapshot.name=NAME]``."""
    if text is None or not text.startswith("snapshot."):
        return text
    props = {}
    for item in split_options(text):
        key, eq, value = item.partition("=")
        if key not in ("snapshot.id", "snapshot.name") or not eq:
            raise ConfigError(f"-l {text!r}: expected snapshot.id=ID or snapshot.name=NAME")
        props[key] = value
    return props.get("snapshot.id") or props.get("snapshot.name")


def _trace(items: list[str]) -> tuple[tuple[str, ...], str | None]:
    """``-T`` values -> (patterns, log file or None)."""
    patterns: list[str] = []
    log_file = None
    for text in items:
        for item in split_options(text):
            key, eq, value = item.partition("=")
            if not eq:
                patterns.append(key)
            elif key == "enable":
                patterns.append(value)
            elif key == "events":
                try:
                    with open(value) as f:
                        patterns += [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
                except OSError as e:
                    raise ConfigError(f"-T events={value}: {e.strerror}") from None
            elif key == "file":
                log_file = value
            else:
                raise ConfigError(f"-T {text!r}: unknown key {key!r} (enable=, events=, file=)")
    return tuple(patterns), log_file


def _refuse(args: argparse.Namespace) -> None:
    """Options nbdserve knows but does not do: refused with the reason from the table."""
    if args.selinux_label is not None:
        raise ConfigError(f"--selinux-label: {REFUSED['--selinux-label'].meaning}")


def config_from_args(args: argparse.Namespace, qemu_nbd: bool = False) -> ServerConfig:
    _refuse(args)
    if args.tls_hostname is not None and not args.list:
        raise ConfigError("--tls-hostname applies to -L (listing another server's exports) only")
    base = ServerConfig(qemu_nbd=qemu_nbd)
    if qemu_nbd:
        base = merge(base, bind="0.0.0.0", shared=1, at_limit="wait", oneshot=not args.persistent)
    exports: list[ExportConfig] = []
    if args.config:
        server, file_exports = load_toml(args.config)
        base = merge(base, config_file=args.config, **server)
        exports += file_exports
    exports += [parse_export_spec(s) for s in args.export]
    demo = False
    if args.image is None and not exports:
        if qemu_nbd:
            raise ConfigError("Invalid number of arguments: give the image FILE")
        args.image, demo = demo_image(), True
    io = {
        "cache": "none" if args.nocache and args.cache is None else args.cache,
        "aio": args.aio,
        "discard": args.discard or ("ignore" if qemu_nbd else None),
        "detect_zeroes": args.detect_zeroes,
        "offset": args.offset,
    }
    if args.overlay is not None and args.image is None:
        raise ConfigError("--overlay applies to IMAGE (for --export and [[export]]: overlay=PATH)")
    if args.image is not None:
        opts = parse_image_opts(args.image) if args.image_opts else image_location(args.image)
        if args.image_opts and args.format:
            raise ConfigError("--image-opts names the format (driver=...); -f is not allowed with it")
        fields = {k: v for k, v in io.items() if v is not None}
        fields.update({k: v for k, v in opts.items() if k not in ("path", "format", "readonly")})
        exports.append(
            ExportConfig(
                name=args.export_name,
                path=opts["path"],
                format=opts.get("format", args.format),
                readonly=args.read_only or opts.get("readonly", False),
                description=args.description or ("nbdserve demo image" if demo else ""),
                snapshot=args.snapshot,
                load_snapshot=_load_snapshot(args.load_snapshot),
                vpc_size=args.vpc_size,
                force_share=args.force_share,
                repair=args.repair,
                overlay=args.overlay,
                **fields,
                bitmaps=tuple(args.bitmap),
            )
        )
    patterns, trace_file = _trace(args.trace)
    socket_path = args.socket
    cfg = merge(
        base,
        exports=tuple(exports),
        port=args.port,
        bind=args.bind,
        socket=socket_path,
        shared=args.shared,
        backlog=args.backlog,
        pid_file=args.pid_file,
        cache_size=args.cache_size,
        handshake_timeout=args.handshake_timeout,
        drain_timeout=args.drain_timeout,
        payload_timeout=args.payload_timeout,
        max_options=args.max_options,
        max_option_length=args.max_option_length,
        workers=args.workers,
        backing_dirs=tuple(args.backing_dir) or None,
        tls=args.tls,
        tls_psk_file=args.tls_psk,
        allow=tuple(args.allow) or None,
        refuse_as=args.refuse_as,
        run=args.run,
        exit_with_parent=args.exit_with_parent or None,
        print_uri=args.print_uri or None,
        connect_device=args.connect,
        metrics=args.metrics,
        log=trace_file or args.log,
        log_format=args.log_format,
        trace=patterns or None,
    )
    try:
        objects = ObjectTable(args.object)
    except ObjectError as e:
        raise ConfigError(str(e)) from None
    cfg = merge(cfg, **tls_settings(objects, args.tls_creds, args.tls_authz))
    cfg = merge(cfg, tls_verify_peer=args.tls_verify_peer)
    try:
        cfg = merge(cfg, secrets=cfg.secrets.merged(secrets_from(objects)))
    except SecretError as e:
        raise ConfigError(str(e)) from None
    if args.connect is not None:
        # qemu-nbd -c: a private socket, one client (the kernel), gone when it leaves; in the
        # background unless -v.
        cfg = merge(cfg, socket=cfg.socket or "-", shared=1, oneshot=True, fork=not args.verbose or args.fork)
    return validate(
        merge(
            cfg,
            stdio=args.stdio,
            fork=args.fork or None,
            oneshot=args.oneshot or None,
            verbose=args.verbose,
            quiet=args.quiet,
            demo=demo,
        )
    )


def _nbdkit_spelling(argv: list[str]) -> list[str]:
    """nbdkit's ``-U -`` (a private Unix socket) as ``--socket -`` (``-U`` alone is not an option)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "-U" and i + 1 < len(argv) and argv[i + 1] == "-":
            out += ["--socket", "-"]
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def is_qemu_nbd(prog: str) -> bool:
    return os.path.basename(prog).endswith("qemu-nbd")


def main(argv: list[str] | None = None, *, qemu_nbd: bool | None = None) -> int:
    if qemu_nbd is None:
        qemu_nbd = is_qemu_nbd(sys.argv[0])
    parser = build_parser(qemu_nbd)
    args = parser.parse_args(_nbdkit_spelling(sys.argv[1:] if argv is None else argv))
    bad = 1 if qemu_nbd else 2
    prog = parser.prog
    if args.list or args.disconnect:
        from .server.tools import disconnect_device, list_exports

        try:
            return list_exports(args) if args.list else disconnect_device(args)
        except ConfigError as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 1
    try:
        cfg = config_from_args(args, qemu_nbd)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return bad
    from .server.app import run

    return run(cfg, reconfigure=lambda: config_from_args(args, qemu_nbd))


def qemu_nbd_main() -> int:
    """The ``nbdserve-qemu-nbd`` command: nbdserve with qemu-nbd's defaults."""
    return main(qemu_nbd=True)

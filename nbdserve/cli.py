"""Command line -> ``ServerConfig`` -> ``server.app.run``.  No serving logic lives here.

Flags follow qemu-nbd where it has one (``-p -b -k -x -f -r -D -e -t -s -l -B --fork --pid-file``,
``--object``, ``--image-opts``, ``--tls-creds``, ``--tls-authz``); ``--export``, ``--config``, ``--stdio``,
``--cache-size``, ``--tls``, ``--tls-verify-peer``, ``--tls-psk``, ``--allow`` and ``--refuse-as``
are nbdserve's own.  With no image at
all, a sparse demo image is created and served.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .config import (
    DEFAULT_BACKLOG,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PORT,
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
from .objects import ObjectError, ObjectTable
from .server.tls import PSK_PYTHON_TEXT

DEMO_SIZE = 1 << 30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nbdserve",
        description="Serve disk images (raw, qcow2, qed, vpc, vhdx, vmdk, vdi, luks) over the NBD protocol.",
        epilog="With no IMAGE, --export or --config, a sparse 1 GiB demo image is created and served.",
    )
    p.add_argument("image", nargs="?", metavar="IMAGE", help="image file to serve (export name: -x, default '')")
    g = p.add_argument_group("listening")
    g.add_argument("-p", "--port", type=int, help=f"TCP port (default {DEFAULT_PORT})")
    g.add_argument("-b", "--bind", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    g.add_argument("-k", "--socket", metavar="PATH", help="listen on a Unix socket instead of TCP")
    g.add_argument("--stdio", action="store_true", help="serve one connection on stdin/stdout (a socket)")
    g.add_argument(
        "-e",
        "--shared",
        type=int,
        metavar="N",
        help=f"at most N clients at once; more are refused (default {DEFAULT_MAX_CONNECTIONS}; 0: no limit)",
    )
    g.add_argument(
        "--backlog", type=int, metavar="N", help=f"listen queue for connect bursts (default {DEFAULT_BACKLOG})"
    )
    g.add_argument("-t", "--persistent", action="store_true", help="keep serving after clients leave (the default)")
    g.add_argument("--oneshot", action="store_true", help="exit when the last client disconnects")
    g.add_argument("--fork", action="store_true", help="go to the background once listening")
    g.add_argument("--pid-file", metavar="PATH", help="write the server's pid here")
    g = p.add_argument_group("the image given as IMAGE")
    g.add_argument("-x", "--export-name", default="", metavar="NAME", help="export name (default '')")
    g.add_argument(
        "-f",
        "--format",
        choices=FORMATS,
        help="image format (default: probe; raw needs -f raw for images with another format's magic)",
    )
    g.add_argument("-r", "--read-only", action="store_true", help="serve read-only")
    g.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="with -r: open the image even while another process (QEMU, qemu-nbd) writes it",
    )
    g.add_argument(
        "--image-opts",
        action="store_true",
        help="IMAGE is qemu-nbd's option string: driver=FMT,file.filename=PATH[,key-secret=ID] "
        "(encrypted qcow2: encrypt.key-secret=ID; the secret from --object secret,id=ID,file=PATH)",
    )
    g.add_argument("-D", "--description", default="", help="export description shown to clients")
    g.add_argument("-s", "--snapshot", action="store_true", help="write to a temporary overlay, discarded at exit")
    g.add_argument("-l", "--load-snapshot", metavar="NAME", help="serve a qcow2 internal snapshot (read-only)")
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
    g = p.add_argument_group("many exports")
    g.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="NAME=PATH[,format=F][,readonly]",
        help="add an export (repeatable)",
    )
    g.add_argument("--config", metavar="FILE.toml", help="read [server] settings and [[export]] tables")
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
    g = p.add_argument_group("tuning and limits")
    g.add_argument("--cache-size", type=parse_size, metavar="SIZE", help="shared metadata cache budget (default 64M)")
    g.add_argument(
        "--backing-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="directory backing files may live in (repeatable; default: the image's own directory)",
    )
    g.add_argument(
        "--handshake-timeout",
        type=float,
        metavar="SECONDS",
        help="drop clients that have not finished the handshake (default 10)",
    )
    g.add_argument(
        "--max-options", type=int, metavar="N", help="options allowed per handshake (default 32 + 4 per export)"
    )
    g.add_argument("--max-option-length", type=parse_size, metavar="SIZE", help="largest option accepted (default 64K)")
    g.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for every request error)")
    g.add_argument("-q", "--quiet", action="store_true", help="log only errors")
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


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    base = ServerConfig()
    exports: list[ExportConfig] = []
    if args.config:
        server, file_exports = load_toml(args.config)
        base = merge(base, **server)
        exports += file_exports
    exports += [parse_export_spec(s) for s in args.export]
    demo = False
    if args.image is None and not exports:
        args.image, demo = demo_image(), True
    if args.image is not None:
        opts = parse_image_opts(args.image) if args.image_opts else {"path": args.image}
        if args.image_opts and args.format:
            raise ConfigError("--image-opts names the format (driver=...); -f is not allowed with it")
        exports.append(
            ExportConfig(
                name=args.export_name,
                path=opts["path"],
                format=opts.get("format", args.format),
                readonly=args.read_only or opts.get("readonly", False),
                key_secret=opts.get("key_secret"),
                backing_key_secret=opts.get("backing_key_secret"),
                description=args.description or ("nbdserve demo image" if demo else ""),
                snapshot=args.snapshot,
                load_snapshot=args.load_snapshot,
                vpc_size=args.vpc_size,
                force_share=args.force_share,
                repair=args.repair,
                bitmaps=tuple(args.bitmap),
            )
        )
    cfg = merge(
        base,
        exports=tuple(exports),
        port=args.port,
        bind=args.bind,
        socket=args.socket,
        shared=args.shared,
        backlog=args.backlog,
        pid_file=args.pid_file,
        cache_size=args.cache_size,
        handshake_timeout=args.handshake_timeout,
        max_options=args.max_options,
        max_option_length=args.max_option_length,
        backing_dirs=tuple(args.backing_dir) or None,
        tls=args.tls,
        tls_psk_file=args.tls_psk,
        allow=tuple(args.allow) or None,
        refuse_as=args.refuse_as,
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
    return validate(
        merge(
            cfg,
            stdio=args.stdio,
            fork=args.fork,
            oneshot=args.oneshot or None,
            verbose=args.verbose,
            quiet=args.quiet,
            demo=demo,
        )
    )


def setup_logging(cfg: ServerConfig) -> None:
    level = logging.ERROR if cfg.quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(cfg.verbose, 2)]
    logging.basicConfig(level=level, format="nbdserve: %(message)s", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as e:
        print(f"nbdserve: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg)
    from .server.app import run

    return run(cfg)

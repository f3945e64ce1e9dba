"""The client-side modes of the command line: ``-L/--list`` (another server's exports, as qemu-nbd
-L prints them) and ``-d/--disconnect DEVICE`` (detach a kernel NBD device).

Both run without an event loop and return an exit status; a failure is a one-line
``ConfigError`` (the caller prints it).
"""

from __future__ import annotations

import argparse
import sys

from ..client import Client, ClientError, format_listing, list_server
from ..config import DEFAULT_PORT, ConfigError
from ..kernel import KernelError, disconnect
from ..objects import ObjectError, ObjectTable


def _client_tls_dir(args: argparse.Namespace) -> str | None:
    """The client credential directory from ``--tls-creds`` (an --object id or a directory)."""
    if args.tls_creds is None:
        if args.tls_hostname is not None:
            raise ConfigError("--tls-hostname is not permitted without --tls-creds")
        return None
    try:
        objects = ObjectTable(args.object)
    except ObjectError as e:
        raise ConfigError(str(e)) from None
    obj = objects.get(args.tls_creds)
    if obj is None:
        return args.tls_creds
    if obj.qom_type != "tls-creds-x509":
        raise ConfigError(f"--tls-creds {obj.id}: -L speaks X.509 only (a tls-creds-x509 object)")
    if obj.get("endpoint", "client") != "client":
        raise ConfigError(f"--object tls-creds-x509,id={obj.id}: -L is a client: use endpoint=client")
    return obj.get("dir")


def list_exports(args: argparse.Namespace) -> int:
    if args.image is not None:
        raise ConfigError("-L takes no IMAGE (it lists the exports of the server at -b/-p or -k)")
    tls_dir = _client_tls_dir(args)
    try:
        c = Client(
            host=args.bind or "localhost",
            port=args.port or DEFAULT_PORT,
            unix=args.socket,
            tls_dir=tls_dir,
            tls_hostname=args.tls_hostname,
        )
        try:
            exports = list_server(c)
        finally:
            c.abort()
    except ClientError as e:
        raise ConfigError(str(e)) from None
    sys.stdout.write(format_listing(exports))
    return 0


def disconnect_device(args: argparse.Namespace) -> int:
    if args.image is None:
        raise ConfigError("-d needs the DEVICE to disconnect (e.g. -d /dev/nbd0)")
    try:
        disconnect(args.image)
    except KernelError as e:
        raise ConfigError(str(e)) from None
    print(f"{args.image} disconnected")
    return 0

"""Server and export configuration: frozen dataclasses, the TOML file, and their validation.

Owns the merge rule: command-line flags override ``[server]`` settings of ``--config FILE``;
exports are the union of the file's ``[[export]]`` tables, ``--export`` flags and the positional
image (in that order).  Export names must be unique.  Secrets (encryption passphrases) are the
union of the file's ``[[secret]]`` tables and ``--object secret`` definitions (ids unique); an
export's ``key-secret`` must name one.  Nothing here opens images or sockets (secret files are
read here, as QEMU reads them when the object is defined).

An export's ``path`` may be an ``rbd:`` or ``s3://`` location; its own options (``conf=``,
``endpoint=``, ...) are parsed by ``storage.location`` for ``--export``, the TOML table and the
positional image alike, and kept as ``ExportConfig.location`` (None for a local file).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, get_args, get_origin, get_type_hints

from .authz import AccessRules, RuleError
from .cache import DEFAULT_CACHE_SIZE
from .crypto.secret import SecretError, Secrets, load_secrets
from .objects import ObjectError, ObjectTable, split_options
from .protocol.constants import MAX_STRING
from .storage.location import (
    LocalLocation,
    Location,
    LocationError,
    S3Location,
    location_from_table,
    parse_location,
    storage_options,
)

DEFAULT_PORT = 10809
DEFAULT_BACKLOG = 4096  # the listen queue: a burst of this many connects is queued, not dropped
DEFAULT_MAX_CONNECTIONS = 4096  # -e/--shared default; each idle connection costs a few kB
FORMATS = ("raw", "qcow2", "qed", "vpc", "vhdx", "vmdk", "vdi", "luks")
REPAIR_MODES = ("off", "leaks", "all")
MAX_BITMAP_NAME = 1023  # QEMU's limit on persistent bitmap names


class ConfigError(Exception):
    """A configuration mistake; the message is shown to the user as is."""


@dataclass(frozen=True)
class ExportConfig:
    name: str
    path: str
    format: str | None = None  # None: probe by magic
    readonly: bool = False
    description: str = ""
    snapshot: bool = False  # -s: serve through a throw-away qcow2 overlay
    load_snapshot: str | None = None  # -l: internal snapshot name or id (read-only)
    vpc_size: str = "auto"  # VHD size rule: auto | chs | current
    force_share: bool = False  # -U: open read-only even while another process writes the image
    key_secret: str | None = None  # id of the secret holding an encrypted image's passphrase
    backing_key_secret: str | None = None  # ... and of its encrypted backing files' (one for all)
    repair: str = "off"  # qcow2 read-write open of an inconsistent image: off | leaks | all
    tls: str = "optional"  # "required": served only over TLS (SELECTIVETLS), hidden from others
    allow: tuple[str, ...] = ()  # allow-list entries (see nbdserve.authz); empty: everyone
    tls_authz: tuple[str, ...] = ()  # TLS identities allowed (DNs or PSK usernames); empty: any
    max_connections: int = 0  # simultaneous connections to this export, 0 = unlimited
    # How the export presents its image (qemu-nbd's options; see nbdserve.server.view)
    cache: str = "writeback"  # writeback | writethrough | none | directsync | unsafe
    aio: str = "threads"  # threads | native | io_uring: accepted; nbdserve has one I/O engine
    discard: str = "unmap"  # unmap: TRIM deallocates; ignore: TRIM does nothing
    detect_zeroes: str = "off"  # off | on | unmap: all-zero WRITEs become WRITE_ZEROES
    offset: int = 0  # -o: the export starts this many bytes into the image
    bitmaps: tuple[str, ...] = ()  # -B: persistent dirty bitmaps exported as qemu:dirty-bitmap:NAME
    worker: int | None = None  # the worker process (0 to workers - 1) serving it; None: balanced
    overlay: str | None = None  # --overlay: a persistent local qcow2 over the image takes the writes
    # Where the bytes live when not in a local file (rbd:, s3://; path is then its name).  Set from
    # path and the location's own options by the parsers, never a key of its own.
    location: Location | None = None

    def where(self) -> Location:
        """The export's storage location (a local file unless ``location`` says otherwise)."""
        return self.location if self.location is not None else LocalLocation(self.path)


@dataclass(frozen=True)
class ServerConfig:
    exports: tuple[ExportConfig, ...] = ()
    bind: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    socket: str | None = None  # Unix socket path; replaces TCP
    stdio: bool = False
    shared: int = DEFAULT_MAX_CONNECTIONS  # max simultaneous connections, 0 = unlimited
    backlog: int = DEFAULT_BACKLOG  # listen backlog (the kernel caps it at net.core.somaxconn)
    oneshot: bool = False  # exit when the last client disconnects
    fork: bool = False
    pid_file: str | None = None
    cache_size: int = DEFAULT_CACHE_SIZE
    backing_dirs: tuple[str, ...] = ()
    handshake_timeout: float = 10.0
    drain_timeout: float = 30.0  # seconds a closing connection may take to reply and send; 0: no limit
    payload_timeout: float = 30.0  # seconds a client may pause inside a landing WRITE payload; 0: no limit
    max_options: int = 0  # 0: 32 + 4 per export
    max_option_length: int = 64 << 10
    max_requests: int = 64  # requests in flight per connection
    max_inflight_bytes: int = 128 << 20
    workers: int = 0  # worker processes (see nbdserve.server.workers); 0: one per core, at most one per export
    verbose: int = 0
    quiet: bool = False
    demo: bool = False  # no image was given: a demo image was created
    # TLS and authorisation (see README "Serving on a network")
    tls: str | None = None  # off | on (SELECTIVETLS) | require (FORCEDTLS); None: require with credentials
    tls_creds: str | None = None  # X.509 directory: ca-cert.pem, server-cert.pem, server-key.pem[, ca-crl.pem]
    tls_psk_file: str | None = None  # "username:hexkey" lines
    tls_verify_peer: bool | None = None  # ask for client certificates; None: only if tls_authz is given
    tls_authz: tuple[str, ...] = ()  # TLS identities allowed to connect at all; empty: any
    allow: tuple[str, ...] = ()  # server-wide allow list (see nbdserve.authz); empty: everyone
    refuse_as: str = "policy"  # a refused export answers ERR_POLICY ("policy") or looks absent ("unknown")
    secrets: Secrets = field(default_factory=Secrets)  # --object secret / [[secret]] values by id (repr hides them)
    # Running it (see nbdserve.server.app)
    config_file: str | None = None  # --config: re-read on SIGHUP
    reload_grace: float = 30.0  # seconds the clients of a removed export keep it after a reload
    require_exports: str = "any"  # READY=1 once "any" export is open, or only once "all" are
    at_limit: str = "refuse"  # at the -e limit: "refuse" the next client, or let it "wait" (qemu-nbd)
    qemu_nbd: bool = False  # invoked the qemu-nbd way: its defaults and output (see nbdserve.cli)
    run: str | None = None  # --run CMD: serve while CMD runs, exit with its status
    exit_with_parent: bool = False
    print_uri: bool = False
    connect_device: str | None = None  # -c: attach the export to this kernel NBD device
    metrics: str | None = None  # --metrics ADDR:PORT: Prometheus endpoint
    log: str = "auto"  # stderr | syslog | journal | null | FILE (see nbdserve.logsetup)
    log_format: str = "text"  # text | json
    trace: tuple[str, ...] = ()  # -T patterns: lower-level messages that match are logged too

    def worker_count(self) -> int:
        """Worker processes to run: 1 means one process serves everything (no workers).  The
        default is one per core, at most one per export, and enough for the highest pin; the
        modes that serve one connection or one command's lifetime stay in one process."""
        pinned = max((e.worker for e in self.exports if e.worker is not None), default=-1) + 1
        if self.workers:
            return max(min(self.workers, len(self.exports)), pinned, 1)
        if self.stdio or self.connect_device is not None or self.run is not None or self.oneshot:
            return 1
        return max(min(os.cpu_count() or 1, len(self.exports)), pinned, 1)

    def option_limit(self) -> int:
        return self.max_options or 32 + 4 * len(self.exports)

    @property
    def tls_mode(self) -> str:
        """off, on or require, with the default applied (require once credentials are given)."""
        if self.tls is not None:
            return self.tls
        return "require" if self.tls_creds or self.tls_psk_file else "off"

    @property
    def verify_peer(self) -> bool:
        """Whether client certificates are asked for (and must verify): as set, else exactly when
        some rule checks TLS identities of X.509 clients."""
        if self.tls_verify_peer is not None:
            return self.tls_verify_peer
        return bool(self.tls_creds) and (bool(self.tls_authz) or any(e.tls_authz for e in self.exports))


_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")


def parse_size(text: str | int) -> int:
    """'64M' / '1GiB' / 4096 -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"not a size: {text!r}")
    return int(m.group(1)) << (10 * " kmgt".index((m.group(2) or " ").lower()))


_SPEC_ALIASES = {"ro": "readonly", "bitmap": "bitmaps"}  # --export spellings of [[export]] keys


def parse_export_spec(spec: str) -> ExportConfig:
    """``NAME=PATH[,KEY[=VALUE]]...``: every ``[[export]]`` key of the config file, checked by the
    same schema (``readonly``/``ro``, ``snapshot`` and other booleans may stand alone for true).
    An ``rbd:``/``s3://`` PATH takes its location's options too (``storage.location``)."""
    if "=" not in spec:
        raise ConfigError(f"--export {spec!r}: expected NAME=PATH[,format=F][,readonly]")
    name, rest = spec.split("=", 1)
    table: dict[str, Any] = {"name": name}
    if storage_options(rest):
        try:
            location, opts = parse_location(rest, _SPEC_KEYS)
        except LocationError as e:
            raise ConfigError(f"--export {spec!r}: {e}") from None
        table.update(path=location.name, location=location)
    else:
        path, *pieces = rest.split(",")
        table["path"] = path
        opts = [(k, v if eq else None) for k, eq, v in (p.partition("=") for p in pieces)]
    for key, value in opts:
        key = _SPEC_ALIASES.get(key, key)
        field_name = key.replace("-", "_")
        kind = EXPORT_SCHEMA.get(key)
        if kind is None or key in ("name", "path"):
            raise ConfigError(f"--export {spec!r}: unknown option {key!r}{_suggest(key, EXPORT_SCHEMA)}")
        if kind is bool:
            if value is not None and value.lower() not in ("on", "off", "true", "false", "yes", "no"):
                raise ConfigError(f"--export {spec!r}: {key}={value!r} is not on or off")
            table[field_name] = value is None or value.lower() in ("on", "true", "yes")
            continue
        value = value or ""
        if kind is _STRINGS:
            table[field_name] = (*table.get(field_name, ()), value)
        elif kind in (int, float):
            try:
                table[field_name] = kind(value)
            except ValueError:
                raise ConfigError(f"--export {spec!r}: {key}: not a number: {value!r}") from None
        elif kind is _SIZE_T:
            table[field_name] = parse_size(value)
        else:
            table[field_name] = value
    return ExportConfig(**table)


# -- the config file's schema ---------------------------------------------------------------------
# Each key's type comes from the dataclass field it sets; a few fields read differently from TOML:
# sizes take "64M" as well as a number, and string lists take a single string too.

_SIZE_T = "size"
_STRINGS = "strings"
_SIZE_FIELDS = frozenset({"cache_size", "max_option_length", "max_inflight_bytes", "offset"})
# [server] keys: ServerConfig fields a config file may set (the rest are command-line only).
_SERVER_FIELDS = (
    "bind",
    "port",
    "socket",
    "shared",
    "backlog",
    "oneshot",
    "pid_file",
    "cache_size",
    "backing_dirs",
    "handshake_timeout",
    "drain_timeout",
    "payload_timeout",
    "max_options",
    "max_option_length",
    "max_requests",
    "max_inflight_bytes",
    "workers",
    "tls",
    "tls_creds",
    "tls_psk_file",
    "tls_verify_peer",
    "tls_authz",
    "allow",
    "refuse_as",
    "reload_grace",
    "require_exports",
    "metrics",
    "log",
    "log_format",
)


def _kind(cls: type, name: str) -> Any:
    if name in _SIZE_FIELDS:
        return _SIZE_T
    hint = get_type_hints(cls)[name]
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) is tuple or (args and get_origin(args[0]) is tuple):
        return _STRINGS
    if args:  # X | None
        return args[0]
    return hint


def _schema(cls: type, names: list[str]) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    return {n.replace("_", "-"): _kind(cls, n) for n in names if n in known}


EXPORT_SCHEMA = _schema(ExportConfig, [f.name for f in fields(ExportConfig) if f.name != "location"])
_SPEC_KEYS = frozenset(EXPORT_SCHEMA) | frozenset(_SPEC_ALIASES)  # words an --export spec may use
SERVER_SCHEMA = _schema(ServerConfig, _SERVER_FIELDS)
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_TYPE_NAMES.update({_SIZE_T: 'a size (a number of bytes, or "64M")', _STRINGS: "a string or a list of strings"})


def _suggest(key: str, schema: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(schema), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _convert(value: Any, kind: Any) -> Any:
    """``value`` as ``kind`` or ConfigError; no coercion (``"false"`` is not a boolean)."""
    ok = False
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = isinstance(value, str)
    elif kind is _SIZE_T:
        if isinstance(value, str):
            return parse_size(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is _STRINGS:
        items = [value] if isinstance(value, str) else value
        ok = isinstance(items, list) and all(isinstance(v, str) for v in items)
        value = tuple(items) if ok else value
    if not ok:
        shown = f'"{value}"' if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else value
        raise ConfigError(f"expected {_TYPE_NAMES[kind]}, not {shown}")
    return value


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]")
_KEY = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_-]+)\s*=""")


def key_lines(text: str) -> dict[tuple[str, int, str], int]:
    """Where each key is: (table, index among tables of that name, key) -> line number (1-based).
    tomllib keeps no positions; this scans the lines (keys of inline tables are not found)."""
    out: dict[tuple[str, int, str], int] = {}
    counts: dict[str, int] = {}
    table, index = "", 0
    for n, line in enumerate(text.splitlines(), 1):
        m = _HEADER.match(line)
        if m:
            table = m.group(2)
            index = counts[table] = counts.get(table, -1) + 1 if m.group(1) == "[[" else 0
            out.setdefault((table, index, ""), n)
            continue
        m = _KEY.match(line)
        if m:
            out.setdefault((table, index, m.group(1).strip("\"'")), n)
    return out


def _table(
    t: Any, schema: dict[str, Any], where: str, at: Callable[[str], str], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check one TOML table against ``schema``: field name -> converted value."""
    if not isinstance(t, dict):
        raise ConfigError(f"{at('')}{where}: expected a table")
    out = {}
    for key, value in t.items():
        kind = schema.get(key)
        if kind is None:
            raise ConfigError(f"{at(key)}{where}: unknown key {key!r}{_suggest(key, schema)}")
        try:
            out[key.replace("-", "_")] = _convert(value, kind)
        except ConfigError as e:
            raise ConfigError(f"{at(key)}{where} {key}: {e}") from None
    for key in required:
        if key not in t:
            raise ConfigError(f"{at('')}{where}: {key} is missing")
    return out


def load_toml(path: str) -> tuple[dict[str, Any], list[ExportConfig]]:
    """Read ``--config FILE``: (server settings by field name, exports).  Every mistake is a
    ConfigError of one line naming the file, the line, the table and the key."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8")
        doc = tomllib.loads(text)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    lines = key_lines(text)

    def at(table: str, index: int) -> Callable[[str], str]:
        def where(key: str) -> str:
            n = lines.get((table, index, key)) or lines.get((table, index, ""))
            return f"{path}:{n}: " if n else f"{path}: "

        return where

    defs = []
    for i, t in enumerate(doc.get("secret", [])):
        if not isinstance(t, dict) or not all(isinstance(v, str) for v in t.values()):
            raise ConfigError(
                f"{at('secret', i)('')}[[secret]] #{i + 1}: expected string keys (id, data or file, format, ...)"
            )
        props = dict(t)
        defs.append((props.pop("id", ""), props))
    try:
        secrets = load_secrets(defs)
    except SecretError as e:
        raise ConfigError(f"{path}: {e}") from None
    unknown = sorted(set(doc) - {"server", "export", "secret"})
    if unknown:
        n = lines.get((unknown[0], 0, "")) or lines.get(("", 0, unknown[0]))
        raise ConfigError(
            f"{path}:{n or '?'}: unknown table or key {unknown[0]!r} (the file has [server], [[export]] and [[secret]])"
        )
    server = _table(doc.get("server", {}), SERVER_SCHEMA, "[server]", at("server", 0))
    server["secrets"] = secrets
    exports_raw = doc.get("export", [])
    if not isinstance(exports_raw, list):
        raise ConfigError(f"{path}: export must be written [[export]] (a list of tables)")
    exports = []
    for i, t in enumerate(exports_raw):
        location = None
        if isinstance(t, dict) and isinstance(t.get("path"), str) and storage_options(t["path"]):
            try:
                location, t = location_from_table(t)
            except LocationError as e:
                raise ConfigError(f"{at('export', i)('path')}[[export]] #{i + 1}: {e}") from None
            t = {**t, "path": location.name}
        kw = _table(t, EXPORT_SCHEMA, f"[[export]] #{i + 1}", at("export", i), required=("path",))
        kw["location"] = location
        kw.setdefault("name", "")
        exports.append(ExportConfig(**kw))
    return server, exports


def validate(cfg: ServerConfig) -> ServerConfig:
    names = [e.name for e in cfg.exports]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"export name(s) used twice: {', '.join(map(repr, sorted(dupes)))}")
    for e in cfg.exports:
        if len(e.name.encode()) > MAX_STRING:
            raise ConfigError(f"export name longer than {MAX_STRING} bytes: {e.name[:40]!r}...")
        if e.format is not None and e.format not in FORMATS:
            raise ConfigError(f"export {e.name!r}: unknown format {e.format!r} (one of {', '.join(FORMATS)})")
        if e.vpc_size not in ("auto", "chs", "current"):
            raise ConfigError(f"export {e.name!r}: vpc-size must be auto, chs or current")
        if e.force_share and not (e.readonly or e.snapshot or e.load_snapshot is not None):
            raise ConfigError(f"export {e.name!r}: -U/--force-share needs a read-only export (-r)")
        for what, sid in (("key-secret", e.key_secret), ("backing-key-secret", e.backing_key_secret)):
            if sid is not None and sid not in cfg.secrets:
                raise ConfigError(f"export {e.name!r}: {what} {sid!r}: no secret with that id")
        if e.repair not in REPAIR_MODES:
            raise ConfigError(f"export {e.name!r}: repair must be one of {', '.join(REPAIR_MODES)}")
        _validate_io(e)
        for b in e.bitmaps:
            if not b or len(b.encode()) > MAX_BITMAP_NAME:
                raise ConfigError(f"export {e.name!r}: bitmap name must be 1 to {MAX_BITMAP_NAME} bytes: {b[:40]!r}")
        if len(set(e.bitmaps)) != len(e.bitmaps):
            raise ConfigError(f"export {e.name!r}: a bitmap is named twice")
        if e.bitmaps and e.offset:
            raise ConfigError(f"export {e.name!r}: -o/--offset cannot be combined with -B/--bitmap")
        _validate_overlay(e)
    if not cfg.exports:
        raise ConfigError("nothing to serve: give an IMAGE, --export or --config")
    if cfg.stdio and (cfg.fork or cfg.socket):
        raise ConfigError("--stdio serves one connection on stdin/stdout; it excludes --fork and --socket")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"port out of range: {cfg.port}")
    if cfg.backlog < 1 or cfg.shared < 0:
        raise ConfigError("backlog must be >= 1 and shared (the connection limit) >= 0")
    if cfg.max_requests < 1 or cfg.max_inflight_bytes < (32 << 20):
        raise ConfigError("max-requests must be >= 1 and max-inflight-bytes >= 32M")
    _validate_running(cfg)
    _validate_access(cfg)
    _validate_workers(cfg)
    return cfg


def _validate_overlay(e: ExportConfig) -> None:
    """``--overlay`` takes the export's writes; an S3 object is never written, so an S3 export is
    read-only unless something above it takes the writes."""
    if e.overlay is not None:
        if not e.overlay:
            raise ConfigError(f"export {e.name!r}: overlay needs a file path")
        if e.snapshot:
            raise ConfigError(f"export {e.name!r}: --overlay and -s/--snapshot exclude each other")
        if e.load_snapshot is not None:
            raise ConfigError(f"export {e.name!r}: --overlay cannot be combined with -l/--load-snapshot")
        if e.readonly:
            raise ConfigError(f"export {e.name!r}: --overlay takes writes; a read-only export has none")
        if e.bitmaps:
            raise ConfigError(f"export {e.name!r}: --overlay cannot be combined with -B/--bitmap")
    if isinstance(e.location, S3Location) and not (e.readonly or e.snapshot or e.overlay is not None):
        raise ConfigError(
            f"export {e.name!r}: {e.path} is an S3 object, served read-only: add readonly, or --overlay PATH for writes"
        )


def _validate_workers(cfg: ServerConfig) -> None:
    if cfg.workers < 0:
        raise ConfigError(f"workers must be >= 0 (0: one per core), not {cfg.workers}")
    for e in cfg.exports:
        if e.worker is not None and e.worker < 0:
            raise ConfigError(f"export {e.name!r}: worker must be >= 0, not {e.worker}")
        if e.worker is not None and cfg.workers and e.worker >= cfg.workers:
            raise ConfigError(
                f"export {e.name!r}: worker = {e.worker}, but there are {cfg.workers} workers (0 to {cfg.workers - 1})"
            )
    if cfg.workers > 1 and (cfg.stdio or cfg.connect_device is not None or cfg.run is not None or cfg.oneshot):
        raise ConfigError(
            "--workers > 1 excludes --stdio, -c/--connect, --run and --oneshot (they serve in one process)"
        )


AIO_MODES = ("threads", "native", "io_uring")


def _validate_io(e: ExportConfig) -> None:
    """qemu-nbd's I/O options, with QEMU's rules for combining them."""
    from .server.view import IoPolicy, PolicyError

    if e.aio not in AIO_MODES:
        raise ConfigError(f"export {e.name!r}: invalid aio mode {e.aio!r} (threads, native or io_uring)")
    policy = IoPolicy(e.cache, e.discard, e.detect_zeroes, e.offset)
    try:
        policy.check()
    except PolicyError as err:
        raise ConfigError(f"export {e.name!r}: {err}") from None
    if e.aio == "native" and not policy.direct:
        raise ConfigError(f"export {e.name!r}: aio=native needs cache=none or directsync (O_DIRECT), as in QEMU")


def _validate_running(cfg: ServerConfig) -> None:
    from .logsetup import DESTINATIONS
    from .logsetup import FORMATS as LOG_FORMATS

    if cfg.require_exports not in ("any", "all"):
        raise ConfigError(f"require-exports must be any or all, not {cfg.require_exports!r}")
    if cfg.reload_grace < 0:
        raise ConfigError(f"reload-grace must be >= 0, not {cfg.reload_grace}")
    if cfg.drain_timeout < 0:
        raise ConfigError(f"drain-timeout must be >= 0, not {cfg.drain_timeout}")
    if cfg.payload_timeout < 0:
        raise ConfigError(f"payload-timeout must be >= 0, not {cfg.payload_timeout}")
    if cfg.log_format not in LOG_FORMATS:
        raise ConfigError(f"log-format must be text or json, not {cfg.log_format!r}")
    if cfg.log not in DESTINATIONS and "/" not in cfg.log:
        raise ConfigError(f"log must be {', '.join(DESTINATIONS)} or a file path (with a /), not {cfg.log!r}")
    if cfg.shared < 0:
        raise ConfigError(f"invalid shared (connection limit) {cfg.shared}: must be >= 0")
    if cfg.metrics is not None:
        from .server.metrics import parse_address

        try:
            parse_address(cfg.metrics)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.run is not None and (cfg.fork or cfg.stdio):
        raise ConfigError("--run serves in the foreground while the command runs: leave out --fork and --stdio")
    if cfg.exit_with_parent and cfg.fork:
        raise ConfigError("--exit-with-parent needs the server in the foreground: leave out --fork")
    if cfg.connect_device is not None:
        if len(cfg.exports) != 1:
            raise ConfigError("-c/--connect attaches one image: give exactly one IMAGE")
        if cfg.stdio or cfg.run is not None:
            raise ConfigError("-c/--connect excludes --stdio and --run")
        if cfg.tls_mode != "off":
            raise ConfigError("-c/--connect: the kernel's NBD client does not speak TLS")


def _validate_access(cfg: ServerConfig) -> None:
    """TLS settings, allow lists and identities: consistent and parseable."""
    if cfg.tls not in (None, "off", "on", "require"):
        raise ConfigError(f"--tls must be off, on or require, not {cfg.tls!r}")
    if cfg.refuse_as not in ("policy", "unknown"):
        raise ConfigError(f"refuse-as must be policy or unknown, not {cfg.refuse_as!r}")
    if cfg.tls_creds and cfg.tls_psk_file:
        raise ConfigError("give X.509 credentials (--tls-creds) or a PSK file (--tls-psk), not both")
    mode = cfg.tls_mode
    if mode != "off" and not (cfg.tls_creds or cfg.tls_psk_file):
        raise ConfigError(f"--tls={mode} needs credentials: --tls-creds DIR or --tls-psk FILE")
    tls_only = [e.name for e in cfg.exports if e.tls == "required"]
    uses_identities = bool(cfg.tls_authz) or any(e.tls_authz for e in cfg.exports)
    if mode == "off" and (tls_only or uses_identities or cfg.tls_verify_peer):
        raise ConfigError("TLS is off, but an export requires TLS or client identities are checked")
    if cfg.tls_psk_file and cfg.tls_verify_peer:
        raise ConfigError("client certificates (verify-peer) do not apply to PSK credentials")
    if cfg.tls_creds and uses_identities and not cfg.verify_peer:
        raise ConfigError("tls-authz checks client certificates: it needs verify-peer on")
    for e in cfg.exports:
        if e.tls not in ("optional", "required"):
            raise ConfigError(f"export {e.name!r}: tls must be optional or required, not {e.tls!r}")
        if e.max_connections < 0:
            raise ConfigError(f"export {e.name!r}: max-connections must be >= 0")
    try:
        AccessRules.build("[server]", cfg.allow, cfg.tls_authz)
        for e in cfg.exports:
            AccessRules.build(f"export {e.name!r}", e.allow, e.tls_authz)
    except RuleError as err:
        raise ConfigError(str(err)) from None


def tls_settings(objects: ObjectTable, creds: str | None, authz_ids: list[str]) -> dict[str, Any]:
    """ServerConfig fields from ``--tls-creds VALUE`` and ``--tls-authz ID...``.

    VALUE is the id of a ``tls-creds-x509`` or ``tls-creds-psk`` ``--object`` (qemu-nbd's
    spelling; ``verify-peer`` defaults to on there, as in QEMU) or else an X.509 directory.
    Each ``--tls-authz`` names an ``authz-simple`` object whose ``identity`` may connect.
    """
    out: dict[str, Any] = {}
    try:
        if creds is not None:
            obj = objects.get(creds)
            if obj is None:
                out["tls_creds"] = creds
            else:
                obj = objects.require(creds, "tls-creds-x509", "tls-creds-psk", what="--tls-creds")
                if obj.get("endpoint", "client") != "server":
                    raise ConfigError(f"--object {obj.qom_type},id={obj.id}: nbdserve is a server: use endpoint=server")
                if obj.qom_type == "tls-creds-x509":
                    out["tls_creds"] = obj.get("dir")
                    out["tls_verify_peer"] = obj.flag("verify-peer", True)
                else:
                    out["tls_psk_file"] = os.path.join(obj.get("dir") or ".", "keys.psk")
        ids = [objects.require(i, "authz-simple", what="--tls-authz").get("identity") for i in authz_ids]
    except ObjectError as e:
        raise ConfigError(str(e)) from None
    if ids:
        out["tls_authz"] = tuple(ids)
    return out


def secrets_from(objects: ObjectTable) -> Secrets:
    """The ``--object secret,...`` definitions, resolved in command-line order."""
    try:
        return load_secrets((o.id, o.props) for o in objects.of_type("secret"))
    except SecretError as e:
        raise ConfigError(f"--object secret: {e}") from None


# --image-opts keys (QEMU's spelling) -> ExportConfig fields and how to read the value.
_IMAGE_OPTS = {
    "driver": ("format", str),
    "file.filename": ("path", str),
    "file": ("path", str),
    "filename": ("path", str),
    "file.driver": (None, "file"),
    "read-only": ("readonly", bool),
    "cache.direct": ("cache_direct", bool),
    "cache.no-flush": ("cache_no_flush", bool),
    "discard": ("discard", str),
    "detect-zeroes": ("detect_zeroes", str),
    "file.aio": ("aio", str),
    "offset": ("offset", int),
    "key-secret": ("key_secret", str),  # driver=luks
    "encrypt.key-secret": ("key_secret", str),  # driver=qcow2
    "backing.key-secret": ("backing_key_secret", str),  # every encrypted image below (QEMU: per level)
    "backing.encrypt.key-secret": ("backing_key_secret", str),
    "encrypt.format": (None, "encrypt-format"),  # luks or aes: the image's header says which
}
_ON, _OFF = ("on", "yes", "true"), ("off", "no", "false")


def parse_image_opts(text: str) -> dict[str, Any]:
    """``--image-opts`` IMAGE: ``driver=FMT,file.filename=PATH[,read-only=on][,cache.direct=on]
    [,cache.no-flush=on][,discard=unmap][,detect-zeroes=on][,offset=N][,key-secret=ID|
    encrypt.key-secret=ID][,backing.encrypt.key-secret=ID][,encrypt.format=luks|aes]`` ->
    ExportConfig fields (``,,`` is a comma).  The backing key serves every encrypted image below
    the top.  An unknown key is refused in one line."""
    out: dict[str, Any] = {}
    for item in split_options(text):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--image-opts: {item!r} is not key=value")
        spec = _IMAGE_OPTS.get(key)
        if spec is None:
            raise ConfigError(f"--image-opts: option {key!r} is not supported (known: {', '.join(_IMAGE_OPTS)})")
        name, kind = spec
        if kind == "encrypt-format":
            if value not in ("luks", "aes"):
                raise ConfigError(f"--image-opts: encrypt.format must be luks or aes, not {value!r}")
            continue
        if kind == "file":
            if value not in ("file", "host_device"):
                raise ConfigError(f"--image-opts: file.driver={value!r}: only local files (file, host_device)")
            continue
        if kind is bool:
            if value.lower() not in _ON + _OFF:
                raise ConfigError(f"--image-opts: {key}={value!r} is not on or off")
            value = value.lower() in _ON
        elif kind is int:
            value = parse_size(value)
        if name in out:
            raise ConfigError(f"--image-opts: {key} given twice")
        out[name] = value
    if "path" not in out:
        raise ConfigError("--image-opts needs file.filename=PATH")
    if out.get("format") == "file":
        out["format"] = "raw"
    direct, no_flush = out.pop("cache_direct", False), out.pop("cache_no_flush", False)
    if direct or no_flush:
        out["cache"] = "unsafe" if no_flush else "none"
    return out


def merge(base: ServerConfig, **overrides: Any) -> ServerConfig:
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_PORT",
    "FORMATS",
    "REPAIR_MODES",
    "ConfigError",
    "ExportConfig",
    "ServerConfig",
    "load_toml",
    "merge",
    "parse_export_spec",
    "parse_image_opts",
    "parse_size",
    "secrets_from",
    "tls_settings",
    "validate",
]

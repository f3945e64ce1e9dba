"""Server and export configuration: frozen dataclasses, the TOML file, and their validation.

Owns the merge rule: command-line flags override ``[server]`` settings of ``--config FILE``;
exports are the union of the file's ``[[export]]`` tables, ``--export`` flags and the positional
image (in that order).  Export names must be unique.  Secrets (encryption passphrases) are the
union of the file's ``[[secret]]`` tables and ``--object secret`` definitions (ids unique); an
export's ``key-secret`` must name one.  Nothing here opens images or sockets (secret files are
read here, as QEMU reads them when the object is defined).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .authz import AccessRules, RuleError
from .cache import DEFAULT_CACHE_SIZE
from .crypto.secret import SecretError, Secrets, load_secrets
from .objects import ObjectError, ObjectTable, split_options
from .protocol.constants import MAX_STRING

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
    bitmaps: tuple[str, ...] = ()  # -B: persistent dirty bitmaps exported as qemu:dirty-bitmap:NAME


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
    max_options: int = 0  # 0: 32 + 4 per export
    max_option_length: int = 64 << 10
    max_requests: int = 64  # requests in flight per connection
    max_inflight_bytes: int = 128 << 20
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


def parse_export_spec(spec: str) -> ExportConfig:
    """``NAME=PATH[,format=F][,readonly][,description=TEXT][,snapshot][,force-share][,repair=MODE][,bitmap=B]...``."""
    if "=" not in spec:
        raise ConfigError(f"--export {spec!r}: expected NAME=PATH[,format=F][,readonly]")
    name, rest = spec.split("=", 1)
    path, *opts = rest.split(",")
    kw: dict[str, Any] = {}
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "format":
            kw["format"] = value
        elif key in ("readonly", "ro"):
            kw["readonly"] = True
        elif key == "description":
            kw["description"] = value
        elif key == "snapshot":
            kw["snapshot"] = True
        elif key == "load-snapshot":
            kw["load_snapshot"] = value
        elif key == "force-share":
            kw["force_share"] = True
        elif key == "key-secret":
            kw["key_secret"] = value
        elif key == "backing-key-secret":
            kw["backing_key_secret"] = value
        elif key == "repair":
            kw["repair"] = value
        elif key == "bitmap":
            kw["bitmaps"] = (*kw.get("bitmaps", ()), value)
        elif key == "tls":
            kw["tls"] = value
        elif key == "max-connections":
            kw["max_connections"] = _int(value, f"--export {spec!r}: max-connections")
        else:
            raise ConfigError(f"--export {spec!r}: unknown option {key!r}")
    return ExportConfig(name=name, path=path, **kw)


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{what}: not a number: {text!r}") from None


def _strings(value: Any) -> tuple[str, ...]:
    """A TOML string or list of strings as a tuple."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"expected a string or a list of strings, not {value!r}")
    return tuple(items)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, not {value!r}")
    return value


def _export_from_table(t: dict[str, Any], where: str) -> ExportConfig:
    known = {f.name.replace("_", "-"): f.name for f in fields(ExportConfig)}
    kw = {}
    for key, value in t.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown export key {key!r}")
        try:
            kw[known[key]] = _strings(value) if key in ("allow", "tls-authz", "bitmaps") else value
        except ConfigError as e:
            raise ConfigError(f"{where}: {key}: {e}") from None
    if "path" not in kw:
        raise ConfigError(f"{where}: export needs a path")
    kw.setdefault("name", "")
    return ExportConfig(**kw)


_SERVER_KEYS = {
    "bind": str,
    "port": int,
    "socket": str,
    "shared": int,
    "backlog": int,
    "oneshot": bool,
    "pid-file": str,
    "cache-size": parse_size,
    "backing-dirs": tuple,
    "handshake-timeout": float,
    "max-options": int,
    "max-option-length": parse_size,
    "max-requests": int,
    "max-inflight-bytes": parse_size,
    "tls": str,
    "tls-creds": str,
    "tls-psk-file": str,
    "tls-verify-peer": _bool,
    "tls-authz": _strings,
    "allow": _strings,
    "refuse-as": str,
}


def load_toml(path: str) -> tuple[dict[str, Any], list[ExportConfig]]:
    """Read ``--config FILE``: (server settings by field name, exports)."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    server: dict[str, Any] = {}
    for key, value in doc.get("server", {}).items():
        conv = _SERVER_KEYS.get(key)
        if conv is None:
            raise ConfigError(f"{path}: unknown [server] key {key!r}")
        try:
            server[key.replace("-", "_")] = conv(value)
        except ConfigError as e:
            raise ConfigError(f"{path}: [server] {key}: {e}") from None
    exports = [_export_from_table(t, f"{path}: [[export]] #{i + 1}") for i, t in enumerate(doc.get("export", []))]
    defs = []
    for i, t in enumerate(doc.get("secret", [])):
        if not isinstance(t, dict) or not all(isinstance(v, str) for v in t.values()):
            raise ConfigError(f"{path}: [[secret]] #{i + 1}: expected string keys (id, data or file, format, ...)")
        props = dict(t)
        defs.append((props.pop("id", ""), props))
    try:
        server["secrets"] = load_secrets(defs)
    except SecretError as e:
        raise ConfigError(f"{path}: {e}") from None
    unknown = set(doc) - {"server", "export", "secret"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
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
        for b in e.bitmaps:
            if not b or len(b.encode()) > MAX_BITMAP_NAME:
                raise ConfigError(f"export {e.name!r}: bitmap name must be 1 to {MAX_BITMAP_NAME} bytes: {b[:40]!r}")
        if len(set(e.bitmaps)) != len(e.bitmaps):
            raise ConfigError(f"export {e.name!r}: a bitmap is named twice")
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
    _validate_access(cfg)
    return cfg


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


# --image-opts keys nbdserve understands (qemu-nbd's spelling) -> ExportConfig fields.
_IMAGE_OPTS = {
    "driver": "format",
    "file.filename": "path",
    "file": "path",
    "key-secret": "key_secret",  # driver=luks
    "encrypt.key-secret": "key_secret",  # driver=qcow2
    "backing.key-secret": "backing_key_secret",  # every encrypted image below (QEMU: per level)
    "backing.encrypt.key-secret": "backing_key_secret",
    "read-only": "readonly",
}
_ON, _OFF = ("on", "yes", "true"), ("off", "no", "false")


def parse_image_opts(text: str) -> dict[str, Any]:
    """``--image-opts`` IMAGE: ``driver=FMT,file.filename=PATH[,key-secret=ID|encrypt.key-secret=ID]
    [,backing.encrypt.key-secret=ID][,encrypt.format=luks|aes][,read-only=on]`` -> ExportConfig
    fields (``,,`` is a comma).  The backing key serves every encrypted image below the top."""
    out: dict[str, Any] = {}
    for item in split_options(text):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--image-opts: {item!r} is not key=value")
        if key == "encrypt.format":
            if value not in ("luks", "aes"):
                raise ConfigError(f"--image-opts: encrypt.format must be luks or aes, not {value!r}")
            continue  # the image's header says which; nothing to choose
        name = _IMAGE_OPTS.get(key)
        if name is None:
            known = ", ".join([*_IMAGE_OPTS, "encrypt.format"])
            raise ConfigError(f"--image-opts: option {key!r} is not supported (known: {known})")
        if name in out:
            raise ConfigError(f"--image-opts: {name.replace('_', '-')} given twice")
        if name == "readonly":
            if value.lower() not in _ON + _OFF:
                raise ConfigError(f"--image-opts: read-only={value!r} is not on or off")
            value = value.lower() in _ON
        out[name] = value
    if "path" not in out:
        raise ConfigError("--image-opts needs file.filename=PATH")
    if out.get("format") == "file":
        out["format"] = "raw"
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

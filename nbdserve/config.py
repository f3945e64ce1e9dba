"""Server and export configuration: frozen dataclasses, the TOML file, and their validation.

Owns the merge rule: command-line flags override ``[server]`` settings of ``--config FILE``;
exports are the union of the file's ``[[export]]`` tables, ``--export`` flags and the positional
image (in that order).  Export names must be unique.  Nothing here opens files or sockets.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .cache import DEFAULT_CACHE_SIZE
from .crypto.secret import SecretError, Secrets, load_secrets
from .protocol.constants import MAX_STRING

DEFAULT_PORT = 10809
FORMATS = ("raw", "qcow2", "qed", "vpc", "vhdx", "luks")
REPAIR_MODES = ("off", "leaks", "all")


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
    key_secret: str | None = None  # id of the secret holding an encrypted image's passphrase
    repair: str = "off"  # qcow2 read-write open of an inconsistent image: off | leaks | all


@dataclass(frozen=True)
class ServerConfig:
    exports: tuple[ExportConfig, ...] = ()
    bind: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    socket: str | None = None  # Unix socket path; replaces TCP
    stdio: bool = False
    shared: int = 0  # max simultaneous connections, 0 = unlimited
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
    secrets: Secrets = field(default_factory=Secrets)  # --object secret / [[secret]] values by id (repr hides them)

    def option_limit(self) -> int:
        return self.max_options or 32 + 4 * len(self.exports)


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
    """``NAME=PATH[,format=F][,readonly][,description=TEXT][,snapshot][,repair=MODE]``."""
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
        elif key == "key-secret":
            kw["key_secret"] = value
        elif key == "repair":
            kw["repair"] = value
        else:
            raise ConfigError(f"--export {spec!r}: unknown option {key!r}")
    return ExportConfig(name=name, path=path, **kw)


def _export_from_table(t: dict[str, Any], where: str) -> ExportConfig:
    known = {f.name.replace("_", "-"): f.name for f in fields(ExportConfig)}
    kw = {}
    for key, value in t.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown export key {key!r}")
        kw[known[key]] = value
    if "path" not in kw:
        raise ConfigError(f"{where}: export needs a path")
    kw.setdefault("name", "")
    return ExportConfig(**kw)


_SERVER_KEYS = {
    "bind": str,
    "port": int,
    "socket": str,
    "shared": int,
    "oneshot": bool,
    "pid-file": str,
    "cache-size": parse_size,
    "backing-dirs": tuple,
    "handshake-timeout": float,
    "max-options": int,
    "max-option-length": parse_size,
    "max-requests": int,
    "max-inflight-bytes": parse_size,
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
        server[key.replace("-", "_")] = conv(value)
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
        if e.key_secret is not None and e.key_secret not in cfg.secrets:
            raise ConfigError(f"export {e.name!r}: key-secret {e.key_secret!r}: no secret with that id")
        if e.repair not in REPAIR_MODES:
            raise ConfigError(f"export {e.name!r}: repair must be one of {', '.join(REPAIR_MODES)}")
    if not cfg.exports:
        raise ConfigError("nothing to serve: give an IMAGE, --export or --config")
    if cfg.stdio and (cfg.fork or cfg.socket):
        raise ConfigError("--stdio serves one connection on stdin/stdout; it excludes --fork and --socket")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"port out of range: {cfg.port}")
    if cfg.max_requests < 1 or cfg.max_inflight_bytes < (32 << 20):
        raise ConfigError("max-requests must be >= 1 and max-inflight-bytes >= 32M")
    return cfg


def merge(base: ServerConfig, **overrides: Any) -> ServerConfig:
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


__all__ = [
    "DEFAULT_PORT",
    "FORMATS",
    "REPAIR_MODES",
    "ConfigError",
    "ExportConfig",
    "ServerConfig",
    "load_toml",
    "merge",
    "parse_export_spec",
    "parse_size",
    "validate",
]

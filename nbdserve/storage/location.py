"""Where an export's bytes live: parsing ``rbd:`` and ``s3://`` locations and their options.

Owns the one parser for storage locations, used by ``--export`` and by the TOML file alike:

    rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][,conf=FILE][,id=USER][,timeout=SECONDS][,on-outage=fail|wait]
        (QEMU's rbd:POOL/IMAGE[@SNAP][:conf=FILE][:id=USER] is taken too, for qemu-nbd command lines)
    s3://BUCKET/KEY[,endpoint=URL][,region=R][,profile=P][,chunk=SIZE][,read-cache=SIZE][,threads=N]
        [,timeout=SECONDS]

Anything else is a local path.  Options a location does not own (``format=``, ``readonly`` ...)
are handed back untouched, in order, for the export layer (which says which words it knows:
``export_keys``).  A comma belongs to the name unless it starts a ``key=`` or a bare ``key`` the
location or the export knows, so S3 keys may contain commas.  The TOML form uses the same words
as keys of the ``[[export]]`` table next to ``path = "rbd:pool/image"`` (see
``location_from_table``).  ``read-cache`` is the S3 backend's bounded read cache in memory, not
qemu-nbd's ``cache=`` mode (which an export also takes).

``backing_name`` is how an overlay records a location as its backing file: QEMU's own spelling
where QEMU has one (an absolute path, ``rbd:pool/image@snap:conf=FILE:id=USER``), so
``qemu-img`` can open an overlay's chain too; ``same_backing`` decides whether a recorded name
names a location (for RBD the image and snapshot, not how to reach the cluster).

Invariants: every value is checked here (sizes, timeouts, names), so the backends trust their
``Location``; errors are ``LocationError`` with a one-line message naming the location.
Credentials never appear in a location (S3 keys come from the AWS environment/config files).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*$")


class LocationError(ValueError):
    """A location or one of its options is malformed; the message is one line."""


@dataclass(frozen=True)
class LocalLocation:
    path: str

    @property
    def name(self) -> str:
        return self.path


@dataclass(frozen=True)
class RbdLocation:
    """An RBD image (or one of its snapshots).  ``timeout``: seconds a Ceph call may take before
    the request fails with EIO (``on_outage == "fail"``); with ``"wait"`` requests wait as long as
    the outage lasts.  Connecting and opening are always bounded by ``timeout``."""

    pool: str
    image: str
    namespace: str = ""
    snap: str | None = None
    conf: str | None = None  # None: librados' default search (CEPH_CONF, /etc/ceph/ceph.conf, ...)
    id: str | None = None  # cephx user without "client.", None: librados' default (admin)
    timeout: float = 30.0
    on_outage: str = "fail"

    @property
    def name(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        snap = f"@{self.snap}" if self.snap is not None else ""
        return f"rbd:{self.pool}/{ns}{self.image}{snap}"


@dataclass(frozen=True)
class S3Location:
    """An object in S3-compatible storage, read with ranged GETs of ``chunk`` bytes, at most
    ``threads`` at once, through an LRU cache of at most ``read_cache`` bytes."""

    bucket: str
    key: str
    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None
    chunk: int = 8 << 20
    read_cache: int = 256 << 20
    threads: int = 8
    timeout: float = 30.0

    @property
    def name(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


Location = LocalLocation | RbdLocation | S3Location


def _size(text: Any, what: str) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise LocationError(f"{what}: not a size: {text!r}")
    return int(m.group(1)) << (10 * " kmgt".index((m.group(2) or " ").lower()))


def _seconds(text: Any, what: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise LocationError(f"{what}: not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise LocationError(f"{what}: must be a positive number of seconds, not {text!r}")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in "\0\n"):
        raise LocationError(f"{what}: expected a non-empty string, got {value!r}")
    return value


def _split_escaped(text: str, sep: str) -> list[str]:
    """``text`` split at every ``sep`` not escaped by a backslash (QEMU's rule for rbd: file
    names); the escapes stay in the pieces (``_unescaped`` removes them)."""
    pieces, current, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if c == sep:
            pieces.append("".join(current))
            current = []
        else:
            current.append(c)
        i += 1
    pieces.append("".join(current))
    return pieces


def _unescaped(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def _rbd(path: str, opts: Mapping[str, Any]) -> RbdLocation:
    """``rbd:POOL[/NS]/IMAGE[@SNAP]`` with our options ``opts``; QEMU's spelling is taken too:
    ``:conf=FILE:id=USER`` after the name, ``\\`` escaping ``:``, ``/`` and ``@``."""
    name, *qemu_opts = _split_escaped(path[len("rbd:") :], ":")
    body, *snaps = _split_escaped(name, "@")
    if len(snaps) > 1:
        raise LocationError(f"{path}: more than one '@' (escape an '@' in a name as \\@)")
    snap = _unescaped(snaps[0]) if snaps else None
    if snap == "":
        raise LocationError(f"{path}: empty snapshot name after '@'")
    parts = [_unescaped(p) for p in _split_escaped(body, "/")]
    if len(parts) not in (2, 3) or not all(parts):
        raise LocationError(f"{path}: expected rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE")
    pool, image = parts[0], parts[-1]
    namespace = parts[1] if len(parts) == 3 else ""
    opts = dict(opts)
    for item in qemu_opts:
        key, eq, value = item.partition("=")
        if key not in ("conf", "id") or not eq:
            raise LocationError(
                f"{path}: QEMU's rbd option {item!r} is not taken (conf= and id= are; other Ceph settings "
                "belong in the config file)"
            )
        if key in opts:
            raise LocationError(f"{path}: option {key!r} given twice")
        opts[key] = _unescaped(value)
    kw: dict[str, Any] = {}
    for key, value in opts.items():
        what = f"{path}: {key}"
        if key == "conf":
            kw["conf"] = _text(value, what)
        elif key == "id":
            user = _text(value, what)
            kw["id"] = user.removeprefix("client.")
        elif key == "timeout":
            kw["timeout"] = _seconds(value, what)
        elif key == "on-outage":
            if value not in ("fail", "wait"):
                raise LocationError(f"{what}: must be fail or wait, not {value!r}")
            kw["on_outage"] = value
        else:
            raise LocationError(f"{path}: unknown rbd option {key!r}")
    return RbdLocation(pool=pool, image=image, namespace=namespace, snap=snap, **kw)


def _s3(path: str, opts: Mapping[str, Any]) -> S3Location:
    body = path[len("s3://") :]
    bucket, _, key = body.partition("/")
    if not bucket or not key:
        raise LocationError(f"{path}: expected s3://BUCKET/KEY")
    kw: dict[str, Any] = {}
    for name, value in opts.items():
        what = f"{path}: {name}"
        if name == "endpoint":
            url = _text(value, what)
            if not url.startswith(("http://", "https://")):
                raise LocationError(f"{what}: expected an http:// or https:// URL, not {url!r}")
            kw["endpoint"] = url
        elif name in ("region", "profile"):
            kw[name] = _text(value, what)
        elif name == "chunk":
            chunk = _size(value, what)
            if not (64 << 10) <= chunk <= (256 << 20) or chunk & (chunk - 1):
                raise LocationError(f"{what}: must be a power of two from 64K to 256M")
            kw["chunk"] = chunk
        elif name == "read-cache":
            kw["read_cache"] = _size(value, what)
        elif name == "threads":
            try:
                n = int(value)
            except (TypeError, ValueError):
                n = 0
            if not 1 <= n <= 64:
                raise LocationError(f"{what}: must be a whole number from 1 to 64")
            kw["threads"] = n
        elif name == "timeout":
            kw["timeout"] = _seconds(value, what)
        else:
            raise LocationError(f"{path}: unknown s3 option {name!r}")
    loc = S3Location(bucket=bucket, key=key, **kw)
    if loc.read_cache < 2 * loc.chunk:
        raise LocationError(f"{path}: read-cache must hold at least two chunks ({2 * loc.chunk} bytes)")
    return loc


_OWN = {
    "rbd:": frozenset({"conf", "id", "timeout", "on-outage"}),
    "s3://": frozenset({"endpoint", "region", "profile", "chunk", "read-cache", "threads", "timeout"}),
}


def storage_options(path: str) -> frozenset[str]:
    """The option names the location ``path`` owns (empty for a local path)."""
    for scheme, names in _OWN.items():
        if path.startswith(scheme):
            return names
    return frozenset()


def make_location(path: str, opts: Mapping[str, Any]) -> Location:
    """The location for ``path`` with its own options ``opts`` (names as in ``storage_options``)."""
    if path.startswith("rbd:"):
        return _rbd(path, opts)
    if path.startswith("s3://"):
        return _s3(path, opts)
    if opts:
        raise LocationError(f"{path}: option(s) {', '.join(opts)} only apply to rbd: and s3:// locations")
    return LocalLocation(path)


def _split(text: str, known: Iterable[str]) -> tuple[str, list[tuple[str, str | None]]]:
    """Split ``PATH,k=v,flag,...`` at commas that start a known option; other commas stay in the
    path (an S3 key or a file name may contain commas).  A bare ``flag`` has the value None."""
    known = frozenset(known)
    pieces = text.split(",")
    path = pieces[0]
    opts: list[tuple[str, str | None]] = []
    for piece in pieces[1:]:
        key, eq, value = piece.partition("=")
        if key in known:
            opts.append((key, value if eq else None))
        elif opts:
            # A comma inside an option value (a description, say): it belongs to that value.
            k, v = opts[-1]
            opts[-1] = (k, f"{v or ''},{piece}")
        else:
            path = f"{path},{piece}"
    return path, opts


STORAGE_KEYS = frozenset().union(*_OWN.values())  # every option some location owns


def parse_location(text: str, export_keys: Iterable[str]) -> tuple[Location, list[tuple[str, str | None]]]:
    """``--export`` form: the location, and the options that are not the storage's (words of
    ``export_keys``; a bare word has the value None), in order.

    ``parse_location("rbd:rbd/vm1@base,conf=/etc/ceph/c.conf,format=qcow2", {"format"})`` gives
    ``(RbdLocation(pool="rbd", image="vm1", snap="base", conf="/etc/ceph/c.conf"), [("format", "qcow2")])``.
    """
    export_keys = frozenset(export_keys)
    path, opts = _split(text, STORAGE_KEYS | export_keys)
    own = storage_options(path)
    mine: dict[str, str | None] = {}
    rest: list[tuple[str, str | None]] = []
    for key, value in opts:
        if key in own:
            if key in mine:
                raise LocationError(f"{path}: option {key!r} given twice")
            mine[key] = value
        elif key in export_keys and key not in STORAGE_KEYS:
            rest.append((key, value))
        else:
            raise LocationError(f"{path}: option {key!r} does not apply here")
    return make_location(path, mine), rest


def location_from_table(table: Mapping[str, Any]) -> tuple[Location, dict[str, Any]]:
    """TOML form: ``table`` is an ``[[export]]`` table with ``path``; returns the location and the
    table without ``path`` and the storage's keys."""
    path = table.get("path")
    if not isinstance(path, str) or not path:
        raise LocationError("export needs a path")
    own = storage_options(path)
    mine = {k: v for k, v in table.items() if k in own}
    rest = {k: v for k, v in table.items() if k not in own and k != "path"}
    return make_location(path, mine), rest


def _qemu_escaped(text: str, specials: str) -> str:
    """``text`` with QEMU's rbd: filename separators (and backslash) escaped by a backslash."""
    return "".join("\\" + c if c in specials or c == "\\" else c for c in text)


def _backing_identity(loc: RbdLocation) -> str:
    ns = f"{_qemu_escaped(loc.namespace, ':/@')}/" if loc.namespace else ""
    snap = f"@{_qemu_escaped(loc.snap, ':@')}" if loc.snap is not None else ""
    return f"rbd:{_qemu_escaped(loc.pool, ':/@')}/{ns}{_qemu_escaped(loc.image, ':/@')}{snap}"


def backing_name(loc: Location) -> str:
    """The backing-file name an overlay records for ``loc`` (see the module docstring): a local
    image's absolute path; ``rbd:POOL/[NS/]IMAGE[@SNAP][:conf=FILE][:id=USER]`` (QEMU's rbd:
    spelling, so ``qemu-img`` opens the chain too); an S3 object's ``s3://BUCKET/KEY``."""
    if isinstance(loc, LocalLocation):
        return os.path.realpath(loc.path)
    if isinstance(loc, RbdLocation):
        opts = ""
        if loc.conf:
            opts += f":conf={_qemu_escaped(loc.conf, ':')}"
        if loc.id:
            opts += f":id={_qemu_escaped(loc.id, ':')}"
        return _backing_identity(loc) + opts
    return loc.name


def same_backing(recorded: str, loc: Location) -> bool:
    """Whether an overlay's recorded backing name names ``loc``: the same file, the same RBD
    image and snapshot (however the cluster is reached), the same S3 object."""
    if isinstance(loc, LocalLocation):
        return os.path.realpath(recorded) == os.path.realpath(loc.path)
    if isinstance(loc, RbdLocation):
        if not recorded.startswith("rbd:"):
            return False
        try:
            rec = _rbd(recorded, {})
        except LocationError:
            return False
        return (rec.pool, rec.namespace, rec.image, rec.snap) == (loc.pool, loc.namespace, loc.image, loc.snap)
    return recorded == loc.name

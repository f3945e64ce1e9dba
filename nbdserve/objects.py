"""QEMU-style ``--object TYPE,id=ID,key=value,...`` definitions, so qemu-nbd command lines work.

Owns the option syntax (``split_options``: comma-separated ``key=value`` items, ``,,`` for a
literal comma in a value; QEMU's own rule) and the table of object types nbdserve understands
(``OBJECT_TYPES``: for each type its allowed and required keys).  Parsing checks the syntax, the
type and the keys; what an object *means* is decided by whoever looks it up by id
(``config.py``).  To add a type, add a row to ``OBJECT_TYPES`` and a consumer for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .crypto.secret import SECRET_KEYS


class ObjectError(ValueError):
    """A malformed or unsupported ``--object``; the message says which and why."""


@dataclass(frozen=True)
class ObjectType:
    keys: frozenset[str]  # allowed keys besides id (and qom-type)
    required: frozenset[str] = frozenset()


OBJECT_TYPES: dict[str, ObjectType] = {
    # X.509 credentials: DIR holds ca-cert.pem, server-cert.pem, server-key.pem, ca-crl.pem.
    "tls-creds-x509": ObjectType(
        frozenset({"endpoint", "dir", "verify-peer", "priority", "sanity-check", "loaded"}), frozenset({"dir"})
    ),
    # Pre-shared keys: DIR holds keys.psk ("username:hexkey" lines).
    "tls-creds-psk": ObjectType(frozenset({"endpoint", "dir", "username", "priority", "loaded"}), frozenset({"dir"})),
    # One authorised TLS identity (a certificate's distinguished name, or a PSK username).
    "authz-simple": ObjectType(frozenset({"identity", "loaded"}), frozenset({"identity"})),
    # A passphrase for encrypted images (what the keys mean: nbdserve.crypto.secret).
    "secret": ObjectType(SECRET_KEYS),
}

_TRUE, _FALSE = ("on", "yes", "true", "y"), ("off", "no", "false", "n")


@dataclass(frozen=True)
class QemuObject:
    qom_type: str
    id: str
    props: Mapping[str, str] = field(default_factory=dict)

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.props.get(key, default)

    def flag(self, key: str, default: bool) -> bool:
        """A boolean property (on/off, yes/no, true/false)."""
        v = self.props.get(key)
        if v is None:
            return default
        if v.lower() in _TRUE:
            return True
        if v.lower() in _FALSE:
            return False
        raise ObjectError(f"object {self.id!r}: {key}={v!r} is not on or off")


def split_options(text: str) -> list[str]:
    """Split at single commas; ``,,`` stands for one literal comma (``a=x,,y,b`` -> a='x,y', b)."""
    items, cur, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text.startswith(",,", i):
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return items


def parse_object(text: str) -> QemuObject:
    """``TYPE,id=ID,key=value,...`` (or ``qom-type=TYPE,...``) into a checked ``QemuObject``."""
    items = split_options(text)
    props: dict[str, str] = {}
    qom_type = None
    for n, item in enumerate(items):
        key, eq, value = item.partition("=")
        if n == 0 and not eq:
            qom_type = key
            continue
        if not eq or not key:
            raise ObjectError(f"--object {text!r}: {item!r} is not key=value")
        if key in props:
            raise ObjectError(f"--object {text!r}: {key} given twice")
        props[key] = value
    qom_type = qom_type or props.pop("qom-type", None)
    if not qom_type:
        raise ObjectError(f"--object {text!r}: no object type")
    spec = OBJECT_TYPES.get(qom_type)
    if spec is None:
        raise ObjectError(f"--object {qom_type}: unsupported object type (nbdserve knows {', '.join(OBJECT_TYPES)})")
    oid = props.pop("id", "")
    if not oid:
        raise ObjectError(f"--object {qom_type}: needs id=ID")
    unknown = sorted(set(props) - spec.keys)
    if unknown:
        raise ObjectError(f"--object {qom_type},id={oid}: unknown key(s) {', '.join(unknown)}")
    missing = sorted(spec.required - set(props))
    if missing:
        raise ObjectError(f"--object {qom_type},id={oid}: missing {', '.join(k + '=' for k in missing)}")
    return QemuObject(qom_type, oid, props)


class ObjectTable:
    """The ``--object`` definitions of one command line, by id (ids are unique)."""

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self._by_id: dict[str, QemuObject] = {}
        for t in texts:
            obj = parse_object(t)
            if obj.id in self._by_id:
                raise ObjectError(f"--object id {obj.id!r} is defined twice")
            self._by_id[obj.id] = obj

    def get(self, oid: str) -> QemuObject | None:
        return self._by_id.get(oid)

    def of_type(self, qom_type: str) -> list[QemuObject]:
        """The objects of one type, in command-line order."""
        return [o for o in self._by_id.values() if o.qom_type == qom_type]

    def require(self, oid: str, *types: str, what: str) -> QemuObject:
        """The object ``oid``, which must be one of ``types``; ``what`` names the flag asking."""
        obj = self._by_id.get(oid)
        if obj is None:
            raise ObjectError(f"{what} {oid}: no --object with id={oid}")
        if obj.qom_type not in types:
            raise ObjectError(f"{what} {oid}: object {oid!r} is a {obj.qom_type}, not a {' or '.join(types)}")
        return obj

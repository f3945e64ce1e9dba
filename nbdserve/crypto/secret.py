"""QEMU-compatible ``secret`` objects: where an encryption passphrase comes from.

A secret has an ``id`` and exactly one of ``data=TEXT`` or ``file=PATH`` (the file's bytes, all
of them, a trailing newline included, as QEMU reads it); ``format=raw`` (default) or
``format=base64`` says how the value is written; ``keyid=ID`` with ``iv=BASE64`` means the
decoded value is AES-256-CBC ciphertext (PKCS#7 padding) under the secret ``ID``, itself a
32-byte key defined earlier -- QEMU's scheme for passing secrets on command lines unexposed.

Owns ``SECRET_KEYS`` (the properties a definition may have), ``load_secrets`` (definitions in
order -> ``Secrets``) and ``Secrets``, a mapping id -> bytes whose repr never shows a value.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator, Mapping

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SECRET_KEYS = frozenset({"data", "file", "format", "keyid", "iv", "loaded"})
MAX_SECRET_FILE = 1 << 20


class SecretError(ValueError):
    """A bad secret definition; the message is one line and never holds the secret."""


class Secrets(Mapping[str, bytes]):
    """Secret values by id; printing it shows only the ids."""

    def __init__(self, values: Mapping[str, bytes] | None = None) -> None:
        self._values = dict(values or {})

    def __getitem__(self, key: str) -> bytes:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Secrets({sorted(self._values)})"

    def merged(self, other: Secrets) -> Secrets:
        both = set(self) & set(other)
        if both:
            raise SecretError(f"secret id(s) defined twice: {', '.join(sorted(both))}")
        return Secrets({**self._values, **other._values})


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(f"{what} is not valid base64") from None


def secret_value(sid: str, props: Mapping[str, str], known: Mapping[str, bytes]) -> bytes:
    """The value of one definition; ``known`` holds the secrets defined before it."""
    where = f"secret {sid!r}"
    unknown = sorted(set(props) - SECRET_KEYS)
    if unknown:
        raise SecretError(f"{where}: unknown key(s) {', '.join(unknown)}")
    if ("data" in props) == ("file" in props):
        raise SecretError(f"{where}: give exactly one of data= or file=")
    if "data" in props:
        raw = props["data"].encode()
    else:
        try:
            with open(props["file"], "rb") as f:
                raw = f.read(MAX_SECRET_FILE + 1)
        except OSError as e:
            raise SecretError(f"{where}: {props['file']}: {e.strerror}") from None
        if len(raw) > MAX_SECRET_FILE:
            raise SecretError(f"{where}: {props['file']} is larger than {MAX_SECRET_FILE} bytes")
    fmt = props.get("format", "raw")
    if fmt not in ("raw", "base64"):
        raise SecretError(f"{where}: format must be raw or base64")
    value = _b64(raw.decode("ascii", "replace"), f"{where}: data") if fmt == "base64" else raw
    if "keyid" in props or "iv" in props:
        if "keyid" not in props or "iv" not in props:
            raise SecretError(f"{where}: keyid= and iv= go together")
        key = known.get(props["keyid"])
        if key is None:
            raise SecretError(f"{where}: keyid {props['keyid']!r} is not a secret defined before it")
        if len(key) != 32:
            raise SecretError(f"{where}: key secret {props['keyid']!r} must be 32 bytes (AES-256)")
        iv = _b64(props["iv"], f"{where}: iv")
        if len(iv) != 16 or len(value) % 16 or not value:
            raise SecretError(f"{where}: iv must be 16 bytes and the data whole AES blocks")
        dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        unpad = padding.PKCS7(128).unpadder()
        try:
            value = unpad.update(dec.update(value) + dec.finalize()) + unpad.finalize()
        except ValueError:
            raise SecretError(f"{where}: cannot decrypt with keyid {props['keyid']!r} (bad padding)") from None
    return value


def load_secrets(defs: Iterable[tuple[str, Mapping[str, str]]]) -> Secrets:
    """Resolve ``(id, properties)`` definitions in order."""
    values: dict[str, bytes] = {}
    for sid, props in defs:
        if not sid:
            raise SecretError("a secret needs an id")
        if sid in values:
            raise SecretError(f"secret id {sid!r} is defined twice")
        values[sid] = secret_value(sid, props, values)
    return Secrets(values)

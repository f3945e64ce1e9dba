"""Secrets (``nbdserve.crypto.secret``) and their configuration: QEMU's secret object semantics.

* data= and file= (the file's bytes as they are, newline included), format=base64, keyid+iv
  (AES-256-CBC under an earlier 32-byte secret, PKCS#7) -- the keyid case checked against a
  ciphertext made here with ``cryptography`` directly;
* bad definitions: one-line errors that never contain the secret;
* the TOML ``[[secret]]`` tables and an export's ``key-secret`` reference, and that printing a
  configuration never shows a secret.
"""

from __future__ import annotations

import base64
import os

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from nbdserve.config import ConfigError, ServerConfig, load_toml, validate
from nbdserve.crypto.secret import SecretError, load_secrets


def test_data_file_and_base64(tmp_path):
    f = tmp_path / "pw"
    f.write_bytes(b"from a file\n")
    s = load_secrets(
        [
            ("a", {"data": "plain text"}),
            ("b", {"file": str(f)}),
            ("c", {"data": base64.b64encode(b"\x00\xffbin").decode(), "format": "base64"}),
        ]
    )
    assert s["a"] == b"plain text" and s["b"] == b"from a file\n" and s["c"] == b"\x00\xffbin"


def test_keyid_iv_decrypts_like_qemu():
    master, iv = os.urandom(32), os.urandom(16)
    padder = padding.PKCS7(128).padder()
    enc = Cipher(algorithms.AES(master), modes.CBC(iv)).encryptor()
    ct = enc.update(padder.update(b"the passphrase") + padder.finalize()) + enc.finalize()
    s = load_secrets(
        [
            ("master", {"data": base64.b64encode(master).decode(), "format": "base64"}),
            (
                "pw",
                {
                    "data": base64.b64encode(ct).decode(),
                    "format": "base64",
                    "keyid": "master",
                    "iv": base64.b64encode(iv).decode(),
                },
            ),
        ]
    )
    assert s["pw"] == b"the passphrase"


@pytest.mark.parametrize(
    ("defs", "needle"),
    [
        ([("a", {})], "exactly one of data= or file="),
        ([("a", {"data": "x", "file": "/y"})], "exactly one of data= or file="),
        ([("a", {"file": "/nonexistent/pw"})], "No such file"),
        ([("a", {"data": "!!", "format": "base64"})], "not valid base64"),
        ([("a", {"data": "x", "format": "hex"})], "format must be raw or base64"),
        ([("a", {"data": "x", "keyid": "k"})], "keyid= and iv= go together"),
        ([("a", {"data": "AAAA", "keyid": "later", "iv": "AAAA"})], "not a secret defined before it"),
        ([("k", {"data": "short"}), ("a", {"data": "AAAA", "keyid": "k", "iv": "AAAA"})], "must be 32 bytes"),
        ([("a", {"data": "s3cret"}), ("a", {"data": "s3cret"})], "defined twice"),
        ([("a", {"data": "s3cret", "colour": "red"})], "unknown key"),
    ],
)
def test_bad_definitions(defs, needle):
    with pytest.raises(SecretError) as e:
        load_secrets(defs)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and "s3cret" not in msg


def test_toml_secrets_and_key_secret(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[[secret]]\nid = "s"\ndata = "hunter2"\n\n[[export]]\nname = "e"\npath = "/x.luks"\nkey-secret = "s"\n'
    )
    server, exports = load_toml(str(cfg))
    full = validate(ServerConfig(exports=tuple(exports), **server))
    assert full.secrets["s"] == b"hunter2" and exports[0].key_secret == "s"
    assert "hunter2" not in repr(full)
    cfg.write_text('[[export]]\nname = "e"\npath = "/x.luks"\nkey-secret = "nope"\n')
    server, exports = load_toml(str(cfg))
    with pytest.raises(ConfigError, match="no secret with that id"):
        validate(ServerConfig(exports=tuple(exports), **server))
    cfg.write_text('[[secret]]\nid = "s"\n')
    with pytest.raises(ConfigError, match="exactly one of data= or file="):
        load_toml(str(cfg))


def test_deploy_config_encrypted_export_example(tmp_path):
    """The commented encrypted-export example in deploy/nbdserve.toml parses once uncommented."""
    from pathlib import Path

    from nbdserve.cli import build_parser, config_from_args

    text = (Path(__file__).resolve().parents[2] / "deploy" / "nbdserve.toml").read_text()
    at = text.index("# An encrypted image")
    lines = [ln[1:] if ln.startswith("#") and not ln.startswith("# ") else ln for ln in text[at:].splitlines()]
    pw = tmp_path / "vault.pass"
    pw.write_bytes(b"s3cret")
    cfg = tmp_path / "c.toml"
    cfg.write_text(text[:at] + "\n".join(lines).replace("/etc/nbdserve/vault.pass", str(pw)) + "\n")
    c = config_from_args(build_parser().parse_args(["--config", str(cfg)]))
    vault = [e for e in c.exports if e.name == "vault"]
    assert vault and vault[0].key_secret == "vault-key" and c.secrets["vault-key"] == b"s3cret"

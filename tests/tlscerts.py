"""A throw-away PKI for the TLS tests, made with GnuTLS's ``certtool`` and ``psktool`` exactly as
README.md ("Serving on a network") tells users to make theirs.

Directory layouts follow QEMU's and nbdkit's conventions, so the same directory serves nbdserve,
qemu-nbd and nbdkit (``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``, optional
``ca-crl.pem``) or libnbd and QEMU clients (``ca-cert.pem``, ``client-cert.pem``,
``client-key.pem``).  Nothing is committed: every test session makes its own.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tests.util import run

ORG = "nbdserve tests"
ALICE_DN = f"CN=alice,O={ORG}"  # authorised in the tests' tls-authz lists
MALLORY_DN = f"CN=mallory,O={ORG}"  # signed by the right CA, never authorised
EXPIRED = 'activation_date = "2020-01-01 00:00:00"\nexpiration_date = "2020-12-31 00:00:00"\n'


def _certtool(*args: str | Path) -> None:
    run("certtool", *args)


def _key(path: Path) -> Path:
    _certtool("--generate-privkey", "--key-type=ecdsa", "--outfile", path)
    return path


@dataclass
class Ca:
    dir: Path

    @property
    def cert(self) -> Path:
        return self.dir / "ca-cert.pem"

    @property
    def key(self) -> Path:
        return self.dir / "ca-key.pem"

    @classmethod
    def make(cls, d: Path, cn: str) -> Ca:
        d.mkdir(parents=True)
        (d / "ca.info").write_text(f'cn = "{cn}"\nca\ncert_signing_key\ncrl_signing_key\nexpiration_days = 3650\n')
        _certtool(
            "--generate-self-signed", "--load-privkey", _key(d / "ca-key.pem"), "--template", d / "ca.info",
            "--outfile", d / "ca-cert.pem",
        )  # fmt: skip
        return cls(d)

    def issue(self, d: Path, role: str, cn: str, *, expired: bool = False) -> Path:
        """``d/{role}-cert.pem`` and ``d/{role}-key.pem`` (role: server or client), with this CA's
        certificate as ``d/ca-cert.pem``; returns ``d``."""
        d.mkdir(parents=True, exist_ok=True)
        usage = 'dns_name = "localhost"\nip_address = "127.0.0.1"\ntls_www_server\n' if role == "server" else ""
        usage += "tls_www_client\n" if role == "client" else ""
        dates = EXPIRED if expired else "expiration_days = 365\n"
        info = d / f"{role}.info"
        info.write_text(f'organization = "{ORG}"\ncn = "{cn}"\n{usage}signing_key\n{dates}')
        _certtool(
            "--generate-certificate", "--load-privkey", _key(d / f"{role}-key.pem"),
            "--load-ca-certificate", self.cert, "--load-ca-privkey", self.key, "--template", info,
            "--outfile", d / f"{role}-cert.pem",
        )  # fmt: skip
        shutil.copy(self.cert, d / "ca-cert.pem")
        return d

    def revoke(self, cert: Path, out: Path) -> Path:
        """A CRL revoking ``cert``, written to ``out``."""
        info = self.dir / "crl.info"
        info.write_text("crl_next_update = 365\ncrl_number = 1\n")
        _certtool(
            "--generate-crl", "--load-ca-privkey", self.key, "--load-ca-certificate", self.cert,
            "--load-certificate", cert, "--template", info, "--outfile", out,
        )  # fmt: skip
        return out


@dataclass
class Pki:
    """Server and client credential directories (each a QEMU-style directory)."""

    root: Path
    ca: Ca
    server: Path  # nbdserve/qemu-nbd/nbdkit server credentials
    server_crl: Path  # the same plus ca-crl.pem revoking ``revoked``
    server_expired: Path  # an expired server certificate
    other_server: Path  # a server certificate from another CA (``wrong_ca`` clients trust it)
    alice: Path  # client certificate, DN ALICE_DN
    mallory: Path  # client certificate, DN MALLORY_DN
    expired: Path  # client certificate that expired in 2020 (DN CN=expired,...)
    revoked: Path  # client certificate listed in server_crl's CRL
    no_cert: Path  # only ca-cert.pem: a client without a certificate
    wrong_ca: Path  # a client that trusts another CA only (so it rejects our server)
    foreign: Path  # a client whose certificate another CA signed (so our server rejects it)

    @classmethod
    def make(cls, root: Path) -> Pki:
        ca = Ca.make(root / "ca", "nbdserve test CA")
        other = Ca.make(root / "other-ca", "some other CA")
        server = ca.issue(root / "server", "server", "localhost")
        revoked = ca.issue(root / "revoked", "client", "revoked")
        server_crl = ca.issue(root / "server-crl", "server", "localhost")
        ca.revoke(revoked / "client-cert.pem", server_crl / "ca-crl.pem")
        no_cert = root / "no-cert"
        no_cert.mkdir()
        shutil.copy(ca.cert, no_cert / "ca-cert.pem")
        wrong_ca = ca.issue(root / "wrong-ca", "client", "alice")
        shutil.copy(other.cert, wrong_ca / "ca-cert.pem")
        foreign = other.issue(root / "foreign", "client", "alice")
        shutil.copy(ca.cert, foreign / "ca-cert.pem")
        return cls(
            root=root,
            ca=ca,
            server=server,
            server_crl=server_crl,
            server_expired=ca.issue(root / "server-expired", "server", "localhost", expired=True),
            other_server=other.issue(root / "other-server", "server", "localhost"),
            alice=ca.issue(root / "alice", "client", "alice"),
            mallory=ca.issue(root / "mallory", "client", "mallory"),
            expired=ca.issue(root / "expired", "client", "expired", expired=True),
            revoked=revoked,
            no_cert=no_cert,
            wrong_ca=wrong_ca,
            foreign=foreign,
        )


def psk_file(path: Path, user: str = "alice") -> Path:
    """A ``username:hexkey`` file made by psktool (appends ``user`` if the file exists)."""
    run("psktool", "-u", user, "-p", path)
    return path

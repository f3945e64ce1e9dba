"""Refusals: every way a client can be turned away by TLS or by the access rules, each with a
real client (libnbd's nbdinfo, run as another uid where the rule is about uids) or, where the
exact option replies matter, the raw test client.  Each refusal must end only that client: a
witness connected before the test (a libnbd handle) must read and write correctly afterwards,
and the server log must name the client and the rule once, with no traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import struct
import sys
import tempfile
from pathlib import Path

import nbd
import pytest

from tests.interop import nbdclient as raw
from tests.interop.conftest import MiB, random_raw
from tests.tlscerts import ALICE_DN, MALLORY_DN, Pki
from tests.util import Served, run, serve

SIZE = 8 * MiB
OPTIONS = [  # (option, data): every option kind a plaintext client might try, known or not
    (raw.OPT_LIST, b""),
    (raw.OPT_INFO, struct.pack(">I4sH", 4, b"disk", 0)),
    (raw.OPT_GO, struct.pack(">I4sH", 4, b"disk", 0)),
    (raw.OPT_STRUCTURED_REPLY, b""),
    (raw.OPT_EXTENDED_HEADERS, b""),
    (raw.OPT_SET_META_CONTEXT, struct.pack(">I4sII15s", 4, b"disk", 1, 15, b"base:allocation")),
    (9, struct.pack(">I4sI", 4, b"disk", 0)),  # LIST_META_CONTEXT
    (4, b""),  # PEEK_EXPORT (withdrawn)
    (0x4242, b"xyz"),  # unknown
    (raw.OPT_INFO, b""),  # malformed
]


def nbd_handle(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.set_uri_allow_local_file(True)
    h.connect_uri(uri)
    return h


def check_witness(srv: Served, img: Path, h: nbd.NBD) -> None:
    assert srv.alive(), srv.log_text()
    pattern = os.urandom(4097)
    h.pwrite(pattern, 5 * MiB + 3)
    h.flush()
    assert h.pread(4097, 5 * MiB + 3) == pattern
    with open(img, "rb") as f:
        f.seek(5 * MiB + 3)
        assert f.read(4097) == pattern
    assert "Traceback" not in srv.log_text(), srv.log_text()


def refused(uri: str, *, user: int | None = None) -> str:
    """Run nbdinfo (as ``user`` if given); it must fail; returns its stderr."""
    cmd = ["nbdinfo", uri]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    p = run(*cmd, check=False)
    assert p.returncode != 0, f"{uri} was served:\n{p.stdout}"
    return p.stderr


def go_data(name: str) -> bytes:
    raw_name = name.encode()
    return struct.pack(">I", len(raw_name)) + raw_name + b"\0\0"


def go_reply(c: raw.RawClient, name: str) -> tuple[int, str]:
    """(reply type, message) of GO for ``name`` (libnbd reports every refusal as ENOTSUP, so the
    exact reply is read with the raw client)."""
    replies = c.option(raw.OPT_GO, go_data(name))
    rtype, data = replies[-1]
    return rtype, data.decode(errors="replace")


def client_context(certs: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
    if (certs / "client-cert.pem").exists():
        ctx.load_cert_chain(certs / "client-cert.pem", certs / "client-key.pem")
    return ctx


# -- FORCEDTLS with client certificates, a CRL and a DN allow list -----------------------------------


@pytest.fixture(scope="module")
def forced(tmp_path_factory: pytest.TempPathFactory, pki: Pki):
    d = tmp_path_factory.mktemp("forced")
    img = random_raw(d / "disk.img", SIZE)
    authz = "authz-simple,id=auth0,identity=" + ALICE_DN.replace(",", ",,")
    with serve(
        d, "--tls-creds", pki.server_crl, "--tls-verify-peer", "--object", authz, "--tls-authz", "auth0",
        "-x", "disk", "-f", "raw", img, tcp=True,
    ) as srv:  # fmt: skip
        srv.export = "disk"
        h = nbd_handle(srv.tls_uri(pki.alice))
        yield srv, img, h
        h.shutdown()


@pytest.fixture
def after_forced(forced):
    yield forced[0]
    check_witness(*forced)


def test_client_trusting_another_ca_rejects_the_server(after_forced: Served, pki: Pki) -> None:
    err = refused(after_forced.tls_uri(pki.wrong_ca))
    assert "certificate verification" in err


@pytest.mark.parametrize(
    ("who", "reason"),
    [
        ("foreign", "certificate verify failed"),  # signed by another CA
        ("expired", "certificate has expired"),
        ("revoked", "certificate revoked"),
        ("no_cert", "peer did not return a certificate"),
    ],
)
def test_client_certificate_refused(forced, pki: Pki, who: str, reason: str) -> None:
    srv, _, h = forced
    before = len(srv.log_lines("TLS handshake failed", reason))
    refused(srv.tls_uri(getattr(pki, who)))
    lines = srv.wait_logged(before + 1, "TLS handshake failed", reason, witness=lambda: h.pread(512, 0))
    assert len(lines) == before + 1, srv.log_text()
    check_witness(*forced)


def test_unauthorised_dn_gets_err_policy(after_forced: Served, pki: Pki) -> None:
    refused(after_forced.tls_uri(pki.mallory))
    with raw.RawClient(("127.0.0.1", after_forced.port)) as c:
        c.greet()
        c.starttls(client_context(pki.mallory))
        assert go_reply(c, "disk") == (raw.REP_ERR_POLICY, "access denied by the server's policy")
        assert c.option(raw.OPT_LIST)[0][0] == raw.REP_ERR_POLICY
    lines = after_forced.log_lines(f"TLS identity '{MALLORY_DN}'", f"[server] tls-authz = {ALICE_DN}")
    peers = {line.split("warning: ", 1)[1].split()[0] for line in lines}
    assert len(peers) == len(lines) == 2, after_forced.log_text()  # once per client
    assert all(peer.startswith("127.0.0.1:") for peer in peers)


def test_plaintext_client_gets_tls_reqd_for_every_option(after_forced: Served) -> None:
    with raw.RawClient(("127.0.0.1", after_forced.port)) as c:
        c.greet()
        for option, data in OPTIONS:
            replies = c.option(option, data)
            assert replies == [(raw.REP_ERR_TLS_REQD, replies[0][1])], (option, replies)
        assert c.option(raw.OPT_ABORT) == [(raw.REP_ACK, b"")]
    with raw.RawClient(("127.0.0.1", after_forced.port)) as c:  # EXPORT_NAME cannot be refused: closed, no data
        c.greet()
        c.send_option(raw.OPT_EXPORT_NAME, b"disk")
        assert c.sock.recv(1) == b""
    err = refused(after_forced.uri)  # libnbd without TLS
    assert "TLS" in err or "not supported" in err


def test_expired_server_certificate_rejected(pki: Pki, tmp_path: Path) -> None:
    img = random_raw(tmp_path / "e.img", MiB)
    with serve(tmp_path, "--tls-creds", pki.server_expired, "-f", "raw", img, tcp=True) as srv:
        err = refused(srv.tls_uri(pki.alice))
        assert "certificate" in err
        run("nbdinfo", f"nbds://127.0.0.1:{srv.port}/?tls-verify-peer=false")  # the server itself is fine


# -- SELECTIVETLS: a TLS-only export ------------------------------------------------------------------


@pytest.fixture(scope="module")
def selective(tmp_path_factory: pytest.TempPathFactory, pki: Pki):
    d = tmp_path_factory.mktemp("selective")
    img, secret = random_raw(d / "open.img", SIZE), random_raw(d / "secret.img", MiB, seed=5)
    conf = d / "c.toml"
    conf.write_text(
        f'[server]\ntls = "on"\ntls-creds = "{pki.server}"\n'
        f'[[export]]\nname = "disk"\npath = "{img}"\nformat = "raw"\n'
        f'[[export]]\nname = "secret"\npath = "{secret}"\nformat = "raw"\ntls = "required"\n'
    )
    with serve(d, "--config", conf, tcp=True) as srv:
        srv.export = "disk"
        h = nbd_handle(srv.uri)  # plaintext witness
        yield srv, img, h
        h.shutdown()


@pytest.fixture
def after_selective(selective):
    yield selective[0]
    check_witness(*selective)


def listed(uri: str) -> list[str]:
    out = json.loads(run("nbdinfo", "--list", "--json", uri).stdout)
    return sorted(e["export-name"] for e in out["exports"])


def test_selective_list_hides_tls_only_exports(after_selective: Served, pki: Pki) -> None:
    assert listed(after_selective.uri) == ["disk"]
    assert listed(after_selective.tls_uri(pki.alice)) == ["disk", "secret"]


def test_selective_tls_only_export_needs_tls(after_selective: Served, pki: Pki) -> None:
    srv = after_selective
    with raw.RawClient(("127.0.0.1", srv.port)) as c:
        c.greet()
        for name in (b"secret", b"no-such-export"):  # TLS-only and unknown look alike
            go = struct.pack(">I", len(name)) + name + b"\0\0"
            assert c.option(raw.OPT_GO, go)[0][0] == raw.REP_ERR_TLS_REQD
        assert c.option(raw.OPT_STRUCTURED_REPLY) == [(raw.REP_ACK, b"")]  # other options: no ERR_TLS_REQD
    refused(srv.uri_for("secret"))
    out = run("nbdinfo", "--size", srv.tls_uri(pki.alice, "secret")).stdout
    assert out.strip() == str(MiB)


# -- address allow lists (server-wide and per export), IPv4 and IPv6 ------------------------------------


@pytest.fixture(scope="module")
def addresses(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("addresses")
    img, lan = random_raw(d / "disk.img", SIZE), random_raw(d / "lan.img", MiB)
    conf = d / "c.toml"
    conf.write_text(
        '[server]\nallow = ["127.0.0.1", "::1/128"]\n'
        f'[[export]]\nname = "disk"\npath = "{img}"\nformat = "raw"\n'
        f'[[export]]\nname = "lan"\npath = "{lan}"\nformat = "raw"\nallow = ["10.0.0.0/8", "::1"]\n'
    )
    with serve(d, "--config", conf, tcp=True) as srv:
        srv.export = "disk"
        h = nbd_handle(srv.uri)
        yield srv, img, h
        h.shutdown()


@pytest.fixture
def after_addresses(addresses):
    yield addresses[0]
    check_witness(*addresses)


def test_address_outside_the_server_allow_list(after_addresses: Served) -> None:
    srv = after_addresses
    with raw.RawClient(("127.0.0.1", srv.port), source="127.0.0.2") as c:
        c.greet()
        for option, data in [*OPTIONS, (raw.OPT_STARTTLS, b"")]:
            replies = c.option(option, data)
            assert replies == [(raw.REP_ERR_POLICY, replies[0][1])], (option, replies)
        assert c.option(raw.OPT_ABORT) == [(raw.REP_ACK, b"")]
    lines = srv.log_lines("127.0.0.2", "does not pass [server] allow = 127.0.0.1, ::1/128")
    assert len(lines) == 1, srv.log_text()


def test_address_outside_an_export_allow_list(after_addresses: Served) -> None:
    srv = after_addresses
    assert listed(srv.uri) == ["disk"]  # 'lan' is not shown to 127.0.0.1
    refused(srv.uri_for("lan"))
    with raw.RawClient(("127.0.0.1", srv.port)) as c:
        c.greet()
        assert go_reply(c, "lan") == (raw.REP_ERR_POLICY, "access to export 'lan' denied")
    assert srv.log_lines("refused export 'lan': 127.0.0.1 does not pass export 'lan' allow = 10.0.0.0/8, ::1")


def test_ipv6_allow_lists(tmp_path: Path) -> None:
    img = random_raw(tmp_path / "v6.img", MiB)
    args = ["--allow", "::1", "--export", f"v6={img},format=raw"]
    with serve(tmp_path, *args, tcp=True, bind="::1") as srv:
        out = run("nbdinfo", "--size", f"nbd://[::1]:{srv.port}/v6").stdout
        assert out.strip() == str(MiB)
    with serve(tmp_path, "--allow", "fd00::/8", "--export", f"v6={img},format=raw", tcp=True, bind="::1") as srv:
        refused(f"nbd://[::1]:{srv.port}/v6")
        assert srv.log_lines("warning: [::1]:", "refused every export: ::1 does not pass [server] allow = fd00::/8")


# -- Unix peer credentials -------------------------------------------------------------------------

# The refused client runs as nobody (setpriv), which needs root.
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user (setpriv)")


@contextlib.contextmanager
def unix_served(*args: str):
    """A server on a Unix socket other users can reach (unlike tmp_path), with a witness."""
    d = Path(tempfile.mkdtemp(prefix="nbdserve-uid-"))
    d.chmod(0o755)
    img = random_raw(d / "disk.img", SIZE)
    with serve(d, *args, "-x", "disk", "-f", "raw", img) as srv:
        srv.sock.chmod(0o777)
        srv.export = "disk"
        h = nbd_handle(srv.uri)
        yield srv, img, h
        h.shutdown()


@pytest.fixture(scope="module")
def unix_uid():
    with unix_served("--allow", "uid:0") as served:
        yield served


RAW_GO_AS_OTHER_USER = """import sys
from tests.interop import nbdclient as raw
from tests.interop.test_tls_refusals import go_reply
with raw.RawClient(sys.argv[1]) as c:
    c.greet()
    print(go_reply(c, "disk")[0])
"""


@as_root
def test_unix_peer_uid_outside_the_list(unix_uid) -> None:
    srv, img, h = unix_uid
    refused(srv.uri, user=65534)
    setpriv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    out = run(*setpriv, sys.executable, "-c", RAW_GO_AS_OTHER_USER, srv.sock).stdout
    assert int(out) == raw.REP_ERR_POLICY
    assert len(srv.log_lines("(uid 65534)", "uid 65534 gid 65534 does not pass [server] allow = uid:0")) == 2
    run("nbdinfo", "--size", srv.uri)  # uid 0 is on the list
    check_witness(srv, img, h)


# -- a connection limit -------------------------------------------------------------------------------


@as_root
def test_unix_peer_gid_outside_an_export_list_sees_no_such_export() -> None:
    """A ``gid:`` entry on one export with ``refuse-as = "unknown"``: a client outside the group
    is not shown that export by LIST and is told it does not exist; the other export serves it;
    gid 0 is served both."""
    d = Path(tempfile.mkdtemp(prefix="nbdserve-gid-"))
    d.chmod(0o755)
    img, staff = random_raw(d / "disk.img", SIZE), random_raw(d / "staff.img", MiB)
    conf = d / "c.toml"
    conf.write_text(
        '[server]\nrefuse-as = "unknown"\n'
        f'[[export]]\nname = "disk"\npath = "{img}"\nformat = "raw"\n'
        f'[[export]]\nname = "staff"\npath = "{staff}"\nformat = "raw"\nallow = ["gid:0"]\n'
    )
    with serve(d, "--config", conf) as srv:
        srv.sock.chmod(0o777)
        srv.export = "disk"
        h = nbd_handle(srv.uri)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        out = run(*nobody, "nbdinfo", "--list", "--json", srv.uri).stdout
        assert [e["export-name"] for e in json.loads(out)["exports"]] == ["disk"]
        out = run(*nobody, sys.executable, "-c", RAW_GO_AS_OTHER_USER.replace('"disk"', '"staff"'), srv.sock).stdout
        assert int(out) == raw.REP_ERR_UNKNOWN
        assert run(*nobody, "nbdinfo", "--size", srv.uri).stdout.strip() == str(SIZE)
        assert srv.log_lines("refused export 'staff'", "gid 65534 does not pass export 'staff' allow = gid:0")
        assert run("nbdinfo", "--size", srv.uri_for("staff")).stdout.strip() == str(MiB)  # gid 0
        check_witness(srv, img, h)
        h.shutdown()


def test_export_connection_limit(tmp_path: Path) -> None:
    img = random_raw(tmp_path / "one.img", MiB)
    with serve(tmp_path, "--export", f"one={img},format=raw,max-connections=1", export="one") as srv:
        first = nbd_handle(srv.uri)
        refused(srv.uri)
        with raw.RawClient(srv.sock) as c:
            c.greet()
            assert go_reply(c, "one") == (raw.REP_ERR_POLICY, "export 'one': it has 1 connections (limit 1)")
            assert c.option(raw.OPT_INFO, go_data("one"))[-1][0] == raw.REP_ACK  # INFO is still answered
        assert first.pread(512, 0) == img.read_bytes()[:512]
        first.shutdown()
        # The server sees the first client leave before the next one's options (bounded retry:
        # the two connections' events are ordered by the kernel, not by us).
        for _ in range(20):
            if run("nbdinfo", "--size", srv.uri, check=False).returncode == 0:
                break
        else:
            raise AssertionError(srv.log_text())

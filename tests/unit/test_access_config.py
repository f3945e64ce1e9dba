"""Access rules (``nbdserve.authz``), ``--object`` parsing (``nbdserve.objects``) and the TLS and
access settings of the configuration (``nbdserve.config``, ``nbdserve.cli``).

Expected values are written by hand from RFC 4514 (distinguished names), QEMU's option syntax
(``,,`` is a literal comma) and the semantics in the modules' docstrings.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbdserve.authz import AccessRules, Peer, RuleError, dn_of_subject, format_dn, parse_allow, parse_dn
from nbdserve.cli import build_parser, config_from_args
from nbdserve.config import ConfigError, load_toml
from nbdserve.objects import ObjectError, ObjectTable, parse_object, split_options
from nbdserve.server.tls import HAVE_PSK, TlsServer, read_psk_file

# -- allow lists -------------------------------------------------------------------------------

MATCH = [
    # (entry, peer, matches)
    ("127.0.0.1", Peer.from_address("127.0.0.1"), True),
    ("127.0.0.1", Peer.from_address("127.0.0.2"), False),
    ("10.0.0.0/8", Peer.from_address("10.200.3.4"), True),
    ("10.0.0.0/8", Peer.from_address("11.0.0.1"), False),
    ("10.1.2.3/8", Peer.from_address("10.9.9.9"), True),  # host bits ignored
    ("::1", Peer.from_address("::1"), True),
    ("fd00::/8", Peer.from_address("fd12:3456::1"), True),
    ("fd00::/8", Peer.from_address("fe80::1"), False),
    ("fe80::/10", Peer.from_address("fe80::1%eth0"), True),  # zone index dropped
    ("192.168.0.0/16", Peer.from_address("::ffff:192.168.7.7"), True),  # IPv4-mapped IPv6 client
    ("::ffff:192.168.7.7", Peer.from_address("192.168.7.7"), True),  # IPv4-mapped entry
    ("10.0.0.0/8", Peer(uid=0, gid=0), False),  # a Unix client has no address
    ("uid:1000", Peer(uid=1000, gid=5), True),
    ("uid:1000", Peer(uid=1001, gid=1000), False),
    ("gid:5", Peer(uid=1000, gid=5), True),
    ("uid:root", Peer(uid=0, gid=0), True),
    ("gid:root", Peer(uid=7, gid=0), True),
    ("uid:0", Peer.from_address("127.0.0.1"), False),  # a TCP client has no uid
]


@pytest.mark.parametrize(("entry", "peer", "matches"), MATCH)
def test_allow_entry_matches(entry: str, peer: Peer, matches: bool) -> None:
    assert parse_allow(entry).matches(peer) is matches


@pytest.mark.parametrize(
    "bad", ["", "10.0.0.0/33", "host.example.com", "uid:", "uid:no-such-user-xyz", "gid:-1", "::g"]
)
def test_bad_allow_entries(bad: str) -> None:
    with pytest.raises(RuleError):
        parse_allow(bad)


def test_rules_semantics() -> None:
    rules = AccessRules.build("[server]", ["10.0.0.0/8", "uid:0"], [])
    assert rules.check(Peer.from_address("10.1.1.1"), tls=False) is None
    assert rules.check(Peer(uid=0, gid=0), tls=False) is None
    refused = rules.check(Peer.from_address("127.0.0.1"), tls=False)
    assert refused is not None and refused.rule == "[server] allow = 10.0.0.0/8, uid:0" and not refused.needs_tls
    assert AccessRules().check(Peer(), tls=False) is None  # no rules: everyone


def test_identity_rules() -> None:
    rules = AccessRules.build("export 'x'", [], ["CN=alice,O=Example", "bob"])
    alice = Peer(tls_identity="CN=alice,O=Example", tls_dn=parse_dn("cn = alice , o=Example"))
    assert rules.check(alice, tls=True) is None
    assert rules.check(Peer(tls_identity="bob"), tls=True) is None  # a PSK username
    refused = rules.check(Peer(), tls=False)
    assert refused is not None and refused.needs_tls  # no identity before TLS
    refused = rules.check(Peer(tls_identity="CN=eve", tls_dn=parse_dn("CN=eve")), tls=True)
    assert refused is not None and not refused.needs_tls
    assert rules.check(Peer(tls_identity="CN=bob", tls_dn=parse_dn("CN=bob")), tls=True) is not None


# -- distinguished names -------------------------------------------------------------------------

DNS = [
    ("CN=alice,O=Example Org,C=GB", (("CN", "alice"), ("O", "Example Org"), ("C", "GB"))),
    ("commonName=alice, organizationName=Example Org", (("CN", "alice"), ("O", "Example Org"))),
    ("cn=a\\,b,o=x\\+y", (("CN", "a,b"), ("O", "x+y"))),
    ("CN=\\#hash\\ ,O=\\22q\\22", (("CN", "#hash "), ("O", '"q"'))),
    ("CN=caf\\C3\\A9", (("CN", "caf\u00e9"),)),
    ("UID=x+CN=y,DC=example,DC=org", (("CN", "y"), ("UID", "x"), ("DC", "example"), ("DC", "org"))),
    ("emailAddress=a@b.c,CN=z", (("EMAIL", "a@b.c"), ("CN", "z"))),
]


@pytest.mark.parametrize(("text", "dn"), DNS)
def test_parse_dn(text: str, dn: tuple) -> None:
    assert parse_dn(text) == dn
    assert parse_dn(format_dn(dn)) == dn  # formatting escapes what parsing unescapes


@pytest.mark.parametrize("bad", ["", "CN", "CN=a,,O=b", "=x", "CN=a\\q", "CN=\\ff"])
def test_bad_dn(bad: str) -> None:
    with pytest.raises(RuleError):
        parse_dn(bad)


def test_dn_of_certificate_subject() -> None:
    """ssl's getpeercert() lists RDNs least specific first, with long attribute names."""
    subject = ((("countryName", "GB"),), (("organizationName", "Example, Ltd"),), (("commonName", "alice"),))
    dn = dn_of_subject(subject)
    assert dn == (("CN", "alice"), ("O", "Example, Ltd"), ("C", "GB"))
    assert format_dn(dn) == "CN=alice,O=Example\\, Ltd,C=GB"
    assert dn == parse_dn("CN=alice,O=Example\\, Ltd,C=GB")


# -- --object --------------------------------------------------------------------------------------


def test_split_options_comma_escape() -> None:
    assert split_options("a=1,b=x,,y,,,c") == ["a=1", "b=x,y,", "c"]
    assert split_options("identity=CN=a,,O=b") == ["identity=CN=a,O=b"]


def test_parse_object() -> None:
    obj = parse_object("tls-creds-x509,id=tls0,endpoint=server,dir=/etc/pki/x,,y,verify-peer=off")
    assert (obj.qom_type, obj.id, obj.get("dir"), obj.flag("verify-peer", True)) == (
        "tls-creds-x509",
        "tls0",
        "/etc/pki/x,y",
        False,
    )
    obj = parse_object("qom-type=authz-simple,id=a,identity=CN=laptop,,O=Example")
    assert (obj.qom_type, obj.get("identity")) == ("authz-simple", "CN=laptop,O=Example")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("iothread,id=io0", "unsupported object type"),  # (secret is supported: encrypted images)
        ("tls-creds-x509,dir=/x", "needs id="),
        ("tls-creds-x509,id=t", "missing dir="),
        ("tls-creds-x509,id=t,dir=/x,colour=red", "unknown key(s) colour"),
        ("tls-creds-x509,id=t,dir=/x,dir=/y", "dir given twice"),
        ("tls-creds-x509,id=t,dir", "is not key=value"),
        ("id=t,dir=/x", "no object type"),
    ],
)
def test_bad_objects(text: str, message: str) -> None:
    with pytest.raises(ObjectError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_object(text)


def test_object_ids_unique_and_typed() -> None:
    with pytest.raises(ObjectError, match="defined twice"):
        ObjectTable(["authz-simple,id=a,identity=x", "authz-simple,id=a,identity=y"])
    table = ObjectTable(["authz-simple,id=a,identity=x"])
    with pytest.raises(ObjectError, match="is a authz-simple, not a tls-creds-x509"):
        table.require("a", "tls-creds-x509", what="--tls-creds")
    with pytest.raises(ObjectError, match="no --object with id=b"):
        table.require("b", "authz-simple", what="--tls-authz")
    assert table.require("a", "authz-simple", what="--tls-authz").get("identity") == "x"


# -- the command line and the TOML file --------------------------------------------------------------


def cfg_of(*argv: str):
    return config_from_args(build_parser().parse_args([*argv, "/dev/null"]))


def test_cli_tls_defaults_and_forms(tmp_path: Path) -> None:
    assert cfg_of().tls_mode == "off"
    c = cfg_of("--tls-creds", str(tmp_path))
    assert (c.tls_mode, c.tls_creds, c.verify_peer) == ("require", str(tmp_path), False)
    c = cfg_of("--tls-creds", str(tmp_path), "--tls=on", "--tls-verify-peer")
    assert (c.tls_mode, c.verify_peer) == ("on", True)
    # qemu-nbd's spelling: verify-peer defaults to on, as in QEMU
    obj = f"tls-creds-x509,id=tls0,endpoint=server,dir={tmp_path}"
    c = cfg_of("--object", obj, "--tls-creds", "tls0")
    assert (c.tls_mode, c.tls_creds, c.verify_peer) == ("require", str(tmp_path), True)
    c = cfg_of("--object", obj + ",verify-peer=off", "--tls-creds", "tls0")
    assert c.verify_peer is False
    c = cfg_of(
        "--object", obj, "--tls-creds", "tls0", "--object", "authz-simple,id=a0,identity=CN=laptop,,O=Example",
        "--tls-authz", "a0",
    )  # fmt: skip
    assert c.tls_authz == ("CN=laptop,O=Example",)
    c = cfg_of("--object", f"tls-creds-psk,id=p,endpoint=server,dir={tmp_path}", "--tls-creds", "p")
    assert c.tls_psk_file == os.path.join(str(tmp_path), "keys.psk") and c.tls_creds is None
    c = cfg_of("--allow", "10.0.0.0/8", "--allow", "uid:0", "--refuse-as", "unknown")
    assert (c.allow, c.refuse_as) == (("10.0.0.0/8", "uid:0"), "unknown")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls=require"], "needs credentials"),
        (["--tls=on"], "needs credentials"),
        (["--tls-creds", "/x", "--tls-psk", "/y"], "not both"),
        (["--object", "tls-creds-x509,id=t,dir=/x", "--tls-creds", "t"], "endpoint=server"),
        (["--object", "tls-creds-x509,id=t,endpoint=client,dir=/x", "--tls-creds", "t"], "endpoint=server"),
        (["--tls-creds", "/x", "--tls-authz", "nope"], "no --object with id=nope"),
        (["--object", "authz-simple,id=a,identity=CN=x", "--tls-authz", "a"], "TLS is off"),
        (["--tls-creds", "/x", "--tls-verify-peer", "--tls=off"], "TLS is off"),
        (
            ["--tls-creds", "/x", "--object", "authz-simple,id=a,identity=CN=x", "--tls-authz", "a"],
            None,  # tls-authz implies verify-peer
        ),
        (["--allow", "10.0.0.0/40"], "allow entry"),
        (["--object", "nope,id=x"], "unsupported object type"),
        (["--tls-psk", "/y", "--tls-verify-peer"], "do not apply to PSK"),
    ],
)
def test_cli_tls_errors(argv: list[str], message: str | None) -> None:
    if message is None:
        assert cfg_of(*argv).verify_peer is True
        return
    with pytest.raises(ConfigError, match=message):
        cfg_of(*argv)


def test_toml_access_settings(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        '[server]\ntls = "on"\ntls-creds = "/etc/pki/nbdserve"\ntls-verify-peer = true\n'
        'tls-authz = ["CN=a,O=b"]\nallow = ["10.0.0.0/8", "uid:0"]\nrefuse-as = "unknown"\n'
        '[[export]]\nname = "secret"\npath = "/dev/null"\ntls = "required"\nallow = "192.168.0.0/16"\n'
        'tls-authz = ["CN=boss"]\nmax-connections = 2\n'
    )
    c = config_from_args(build_parser().parse_args(["--config", str(f)]))
    assert (c.tls_mode, c.tls_creds, c.verify_peer, c.tls_authz) == ("on", "/etc/pki/nbdserve", True, ("CN=a,O=b",))
    assert (c.allow, c.refuse_as) == (("10.0.0.0/8", "uid:0"), "unknown")
    (e,) = c.exports
    assert (e.tls, e.allow, e.tls_authz, e.max_connections) == ("required", ("192.168.0.0/16",), ("CN=boss",), 2)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[server]\ntls-verify-peer = "yes"\n', "expected true or false"),
        ("[server]\nallow = [1, 2]\n", "list of strings"),
        ('[[export]]\npath = "/dev/null"\ntls = "required"\n', "TLS is off"),
        ('[server]\ntls-creds = "/x"\n[[export]]\npath = "/dev/null"\ntls = "maybe"\n', "optional or required"),
        ('[server]\nrefuse-as = "silence"\n[[export]]\npath = "/dev/null"\n', "refuse-as"),
        ('[[export]]\npath = "/dev/null"\nallow = ["uid:nosuchuser-xyz"]\n', "no such user"),
    ],
)
def test_toml_access_errors(tmp_path: Path, toml: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        config_from_args(build_parser().parse_args(["--config", str(f)]))


def test_load_toml_names_the_file_and_key(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[server]\ntls-authz = 3\n")
    with pytest.raises(ConfigError, match=r"c\.toml: \[server\] tls-authz: expected a string"):
        load_toml(str(f))


# -- credentials ---------------------------------------------------------------------------------


def test_psk_file_format(tmp_path: Path) -> None:
    f = tmp_path / "keys.psk"
    f.write_text("alice:00ff\n\nbob:0A0b0c\n")
    assert read_psk_file(str(f)) == {"alice": b"\x00\xff", "bob": b"\x0a\x0b\x0c"}
    for bad in ("alice\n", "alice:zz\n", ":00\n", "alice:\n", ""):
        f.write_text(bad)
        with pytest.raises(ConfigError, match=r"keys\.psk"):
            read_psk_file(str(f))


@pytest.mark.skipif(HAVE_PSK, reason="this Python has TLS-PSK")
def test_psk_refused_with_a_reason_on_this_python(tmp_path: Path) -> None:
    f = tmp_path / "keys.psk"
    f.write_text("alice:00ff\n")
    with pytest.raises(ConfigError, match=r"TLS-PSK needs Python 3\.13 or later \(this is 3\.\d+"):
        TlsServer(cfg_of("--tls-psk", str(f)))


def test_missing_x509_files_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server-cert\.pem: no such file"):
        TlsServer(cfg_of("--tls-creds", str(tmp_path)))


# -- the documented configurations parse -------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_deploy_config_with_its_tls_settings_turned_on(tmp_path: Path) -> None:
    """deploy/nbdserve.toml as shipped, and with its commented TLS settings uncommented."""
    text = (REPO / "deploy" / "nbdserve.toml").read_text()
    uncommented = text
    for key in ("tls", "allow", "refuse"):
        uncommented = uncommented.replace(f"\n#{key}", f"\n{key}")
    for variant in (text, uncommented):
        f = tmp_path / "c.toml"
        f.write_text(variant)
        c = config_from_args(build_parser().parse_args(["--config", str(f)]))
        assert len(c.exports) == 3
    assert (c.tls_mode, c.verify_peer, c.tls_authz, c.allow) == (
        "require", True, ("CN=alice,O=Example",), ("10.0.0.0/8", "fd00::/8"),
    )  # fmt: skip


def test_readme_network_example_parses(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Serving on a network") :]
    block = section[section.index("```toml\n") + 8 :]
    f = tmp_path / "c.toml"
    f.write_text(block[: block.index("```")])
    c = config_from_args(build_parser().parse_args(["--config", str(f)]))
    assert c.tls_mode == "on" and [e.tls for e in c.exports] == ["optional", "required"]
    assert c.exports[1].max_connections == 2

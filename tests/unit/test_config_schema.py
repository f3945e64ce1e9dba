"""The config file's typed schema: every mistake is one line naming the file, the line, the table
and the key; values are never coerced (``readonly = "false"`` is an error, not a true string)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbdserve.cli import build_parser, config_from_args
from nbdserve.config import EXPORT_SCHEMA, SERVER_SCHEMA, ConfigError, key_lines, load_toml, parse_export_spec

EXPORT = '[[export]]\nname = "a"\npath = "/dev/null"\n'


def load(tmp_path: Path, text: str):
    f = tmp_path / "c.toml"
    f.write_text(text)
    return load_toml(str(f))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\nport = "abc"\n', 'c.toml:2: [server] port: expected an integer, not "abc"'),
        ("[server]\nport = 1.5\n", "c.toml:2: [server] port: expected an integer, not 1.5"),
        ("[server]\nport = true\n", "c.toml:2: [server] port: expected an integer, not true"),
        (EXPORT + 'readonly = "false"\n', 'c.toml:4: [[export]] #1 readonly: expected true or false, not "false"'),
        (EXPORT + "readonly = 0\n", "c.toml:4: [[export]] #1 readonly: expected true or false, not 0"),
        (EXPORT + "readonyl = true\n", "c.toml:4: [[export]] #1: unknown key 'readonyl' (did you mean 'readonly'?)"),
        ("[server]\nshard = 3\n", "c.toml:2: [server]: unknown key 'shard' (did you mean 'shared'?)"),
        (EXPORT + EXPORT.replace('"a"', '"b"') + "description = 7\n", "c.toml:7: [[export]] #2 description:"),
        ('[[export]]\nname = "x"\n', "c.toml:1: [[export]] #1: path is missing"),
        ('[server]\ncache-size = "lots"\n', "c.toml:2: [server] cache-size: not a size: 'lots'"),
        ("[server]\nallow = [1, 2]\n", "c.toml:2: [server] allow: expected a string or a list of strings, not [1, 2]"),
        ('[server]\nhandshake-timeout = "5"\n', 'c.toml:2: [server] handshake-timeout: expected a number, not "5"'),
        ("[sever]\nport = 1\n", "c.toml:1: unknown table or key 'sever'"),
        ("port = 1\n", "c.toml:1: unknown table or key 'port'"),
        ("[server\n", "c.toml: Expected ']'"),
        ('[server]\n"port" = "x"\n', "c.toml:2: [server] port:"),
        ('export = "x"\n', "export must be written [[export]]"),
        ("[server]\nbind = ['a']\n", "c.toml:2: [server] bind: expected a string, not ['a']"),
    ],
)
def test_one_line_errors_with_key_and_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    text = str(e.value)
    assert "\n" not in text
    assert message in text, text


def test_right_types_load(tmp_path: Path) -> None:
    server, exports = load(
        tmp_path,
        '[server]\nport = 10810\ncache-size = "128M"\nhandshake-timeout = 5\nallow = "10.0.0.0/8"\n'
        "reload-grace = 2.5\ndrain-timeout = 4\n"
        + EXPORT
        + 'readonly = true\noffset = "1M"\ncache = "unsafe"\nbitmaps = ["b"]\n',
    )
    assert server == {
        "port": 10810,
        "cache_size": 128 << 20,
        "handshake_timeout": 5.0,
        "allow": ("10.0.0.0/8",),
        "reload_grace": 2.5,
        "drain_timeout": 4.0,
        "secrets": server["secrets"],  # no [[secret]] tables: none
    }
    assert not list(server["secrets"])
    (e,) = exports
    assert e.readonly is True and e.offset == 1 << 20 and e.cache == "unsafe" and e.bitmaps == ("b",)


def test_every_dataclass_field_has_a_type_the_schema_knows() -> None:
    known = {bool, int, float, str, "size", "strings"}
    assert set(EXPORT_SCHEMA.values()) <= known and set(SERVER_SCHEMA.values()) <= known


def test_key_lines() -> None:
    text = '# c\n[server]\nport = 1\n\n[[export]]\nname = "a"\n[[export]]\n  "name" = "b"\n'
    lines = key_lines(text)
    assert lines[("server", 0, "port")] == 3
    assert lines[("export", 0, "name")] == 6 and lines[("export", 1, "name")] == 8
    assert lines[("export", 1, "")] == 7


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[server]\nrequire-exports = "some"\n' + EXPORT, "require-exports must be any or all"),
        (EXPORT + 'cache = "sometimes"\n', "cache mode 'sometimes'"),
        (EXPORT + 'detect-zeroes = "unmap"\ndiscard = "ignore"\n', "detect-zeroes=unmap needs discard=unmap"),
        (EXPORT + 'aio = "native"\n', "aio=native needs cache=none or directsync"),
        ('[server]\nlog = "syslogg"\n' + EXPORT, "log must be"),
        ("[server]\nreload-grace = -1\n" + EXPORT, "reload-grace must be >= 0"),
        ("[server]\ndrain-timeout = -1\n" + EXPORT, "drain-timeout must be >= 0"),
    ],
)
def test_values_checked_after_loading(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config_from_args(build_parser().parse_args(["--config", str(f)]))


def test_export_spec_uses_the_same_schema() -> None:
    e = parse_export_spec("a=/x,format=qcow2,ro,offset=4K,cache=none,bitmap=b1,bitmap=b2,max-connections=3")
    assert (e.readonly, e.offset, e.cache, e.bitmaps, e.max_connections) == (True, 4096, "none", ("b1", "b2"), 3)
    with pytest.raises(ConfigError, match=r"unknown option 'raedonly'.*did you mean 'readonly'"):
        parse_export_spec("a=/x,raedonly")
    with pytest.raises(ConfigError, match="readonly='maybe' is not on or off"):
        parse_export_spec("a=/x,readonly=maybe")
    with pytest.raises(ConfigError, match="max-connections: not a number"):
        parse_export_spec("a=/x,max-connections=lots")


def test_rbd_and_s3_locations_in_every_form(tmp_path: Path) -> None:
    """--export, [[export]] and the positional IMAGE parse rbd:/s3:// paths with one parser; the
    export keeps the location (its options) and the path is the location's name."""
    from nbdserve.storage.location import RbdLocation, S3Location

    e = parse_export_spec("vm=rbd:rbd/vm1@base,conf=/c.conf,id=client.nbd,format=qcow2,timeout=5,ro")
    assert (e.path, e.format, e.readonly) == ("rbd:rbd/vm1@base", "qcow2", True)
    assert e.location == RbdLocation(pool="rbd", image="vm1", snap="base", conf="/c.conf", id="nbd", timeout=5)
    e = parse_export_spec("g=s3://b/images/a,b.img,endpoint=http://h:1,read-cache=64M,overlay=/o.qcow2,cache=none")
    assert e.location == S3Location(bucket="b", key="images/a,b.img", endpoint="http://h:1", read_cache=64 << 20)
    assert (e.overlay, e.cache) == ("/o.qcow2", "none")  # cache= is the export's qemu-nbd mode
    with pytest.raises(ConfigError, match="does not apply here"):
        parse_export_spec("vm=rbd:rbd/vm1,endpoint=http://h")
    _, exports = load(tmp_path, '[[export]]\nname = "vm"\npath = "rbd:p/i"\nconf = "/c"\non-outage = "wait"\n')
    assert exports[0].location == RbdLocation(pool="p", image="i", conf="/c", on_outage="wait")
    with pytest.raises(ConfigError, match="must be fail or wait"):
        load(tmp_path, '[[export]]\npath = "rbd:p/i"\non-outage = "later"\n')
    with pytest.raises(ConfigError, match="unknown key 'conf'"):
        load(tmp_path, '[[export]]\npath = "/x.img"\nconf = "/c"\n')
    cfg = config_from_args(build_parser().parse_args(["rbd:p/i,conf=/c", "--overlay", "/o.qcow2"]))
    (e,) = cfg.exports
    assert (e.path, e.location, e.overlay) == ("rbd:p/i", RbdLocation(pool="p", image="i", conf="/c"), "/o.qcow2")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["s3://b/k"], "S3 object, served read-only"),
        (["/x.img", "--overlay", "/o", "-s"], "--overlay and -s/--snapshot exclude each other"),
        (["/x.img", "--overlay", "/o", "-r"], "a read-only export has none"),
        (["--export", "a=/x.img", "--overlay", "/o"], "--overlay applies to IMAGE"),
        (["rbd:p/i,format=qcow2"], "format is an export setting, not the location's"),
    ],
)
def test_overlay_and_s3_rules(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_args(build_parser().parse_args(argv))

"""Storage locations: the ``rbd:`` / ``s3://`` syntax of ``--export`` and its TOML form."""

from __future__ import annotations

import pytest

from nbdserve.storage.location import (
    LocalLocation,
    LocationError,
    RbdLocation,
    S3Location,
    backing_name,
    location_from_table,
    parse_location,
    same_backing,
)

EXPORT_KEYS = {"format", "readonly", "description"}


def parse(text):
    return parse_location(text, EXPORT_KEYS)


def test_rbd_with_every_option_and_export_options_passed_through():
    loc, rest = parse(
        "rbd:pool/ns/vm1@base,conf=/etc/ceph/c.conf,format=qcow2,id=client.nbd,timeout=2.5,on-outage=wait,readonly"
    )
    assert loc == RbdLocation(
        pool="pool",
        image="vm1",
        namespace="ns",
        snap="base",
        conf="/etc/ceph/c.conf",
        id="nbd",
        timeout=2.5,
        on_outage="wait",
    )
    assert loc.name == "rbd:pool/ns/vm1@base"
    assert rest == [("format", "qcow2"), ("readonly", None)]


def test_rbd_defaults():
    loc, rest = parse("rbd:rbd/disk")
    assert loc == RbdLocation(pool="rbd", image="disk")
    assert (loc.snap, loc.conf, loc.id, loc.timeout, loc.on_outage) == (None, None, None, 30.0, "fail")
    assert rest == []


def test_s3_key_may_contain_commas_and_slashes():
    loc, rest = parse(
        "s3://golden/images/debian,12.qcow2,endpoint=http://127.0.0.1:7480,chunk=4M,read-cache=64M,format=qcow2"
    )
    assert loc == S3Location(
        bucket="golden",
        key="images/debian,12.qcow2",
        endpoint="http://127.0.0.1:7480",
        chunk=4 << 20,
        read_cache=64 << 20,
    )
    assert loc.name == "s3://golden/images/debian,12.qcow2"
    assert rest == [("format", "qcow2")]


def test_local_paths_keep_their_commas():
    loc, rest = parse("/srv/a,b.img,format=raw,description=one, two")
    assert loc == LocalLocation("/srv/a,b.img")
    assert rest == [("format", "raw"), ("description", "one, two")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rbd:pool", "expected rbd:POOL/IMAGE"),
        ("rbd:/img", "expected rbd:POOL/IMAGE"),
        ("rbd:a/b/c/d", "expected rbd:POOL/IMAGE"),
        ("rbd:p/i@", "empty snapshot name"),
        ("rbd:p/i,timeout=0", "positive number of seconds"),
        ("rbd:p/i,timeout=nan", "positive number of seconds"),
        ("rbd:p/i,timeout=x", "not a number of seconds"),
        ("rbd:p/i,on-outage=retry", "must be fail or wait"),
        ("rbd:p/i,id=", "non-empty string"),
        ("rbd:p/i,conf=a,conf=b", "given twice"),
        ("rbd:p/i,endpoint=http://x", "does not apply here"),
        ("s3://bucket", "expected s3://BUCKET/KEY"),
        ("s3:///key", "expected s3://BUCKET/KEY"),
        ("s3://b/k,chunk=3M", "power of two"),
        ("s3://b/k,chunk=1G", "power of two"),
        ("s3://b/k,chunk=8M,read-cache=8M", "at least two chunks"),
        ("s3://b/k,read-cache=lots", "not a size"),
        ("s3://b/k,threads=0", "from 1 to 64"),
        ("s3://b/k,endpoint=ftp://x", "http:// or https://"),
        ("s3://b/k,conf=x", "does not apply here"),
        ("/img,timeout=3", "does not apply here"),
    ],
)
def test_bad_locations_give_one_line(text, message):
    with pytest.raises(LocationError) as e:
        parse(text)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_toml_table_uses_the_same_words():
    loc, rest = location_from_table(
        {"name": "vm", "path": "rbd:rbd/vm", "conf": "/c", "id": "nbd", "on-outage": "wait", "format": "qcow2"}
    )
    assert loc == RbdLocation(pool="rbd", image="vm", conf="/c", id="nbd", on_outage="wait")
    assert rest == {"name": "vm", "format": "qcow2"}
    loc, rest = location_from_table({"path": "s3://b/k", "region": "eu-west-1", "read-cache": "1G", "threads": 4})
    assert loc == S3Location(bucket="b", key="k", region="eu-west-1", read_cache=1 << 30, threads=4)
    loc, rest = location_from_table({"path": "/x.img", "readonly": True})
    assert loc == LocalLocation("/x.img") and rest == {"readonly": True}
    with pytest.raises(LocationError):
        location_from_table({"path": "rbd:rbd/vm", "timeout": -1})
    with pytest.raises(LocationError):
        location_from_table({"name": "x"})


def test_backing_names_are_qemus_and_match_by_identity(tmp_path):
    rbd = RbdLocation(pool="p", image="vm:1", snap="base", conf="/etc/ceph/c.conf", id="nbd")
    assert backing_name(rbd) == "rbd:p/vm\\:1@base:conf=/etc/ceph/c.conf:id=nbd"
    assert same_backing(backing_name(rbd), rbd)
    assert same_backing("rbd:p/vm\\:1@base", RbdLocation(pool="p", image="vm:1", snap="base"))
    assert not same_backing(backing_name(rbd), RbdLocation(pool="p", image="vm:1"))
    assert not same_backing("rbd:p/vm\\:1@base2", rbd)
    ns = RbdLocation(pool="p", namespace="n", image="i")
    assert backing_name(ns) == "rbd:p/n/i"
    s3 = S3Location(bucket="b", key="k/x,y.qcow2")
    assert backing_name(s3) == "s3://b/k/x,y.qcow2" and same_backing("s3://b/k/x,y.qcow2", s3)
    f = tmp_path / "a.img"
    f.write_bytes(b"")
    (tmp_path / "link.img").symlink_to(f)
    assert backing_name(LocalLocation(str(tmp_path / "link.img"))) == str(f)
    assert same_backing(str(f), LocalLocation(str(tmp_path / "link.img")))


def test_qemu_rbd_spelling_is_taken():
    """qemu-nbd command lines keep working: ``rbd:pool/image@snap:conf=FILE:id=USER`` with QEMU's
    backslash escapes, the same location as ours; its other options are refused in one line."""
    loc, rest = parse("rbd:pool/ns/vm\\:1@base:conf=/etc/ceph/c\\:x.conf:id=nbd,format=qcow2")
    assert loc == RbdLocation(
        pool="pool", namespace="ns", image="vm:1", snap="base", conf="/etc/ceph/c:x.conf", id="nbd"
    )
    assert rest == [("format", "qcow2")]
    assert parse("rbd:p/i:conf=/c,timeout=3")[0] == RbdLocation(pool="p", image="i", conf="/c", timeout=3)
    for text, message in (
        ("rbd:p/i:mon_host=1.2.3.4", "QEMU's rbd option 'mon_host=1.2.3.4' is not taken"),
        ("rbd:p/i:conf=/a,conf=/b", "given twice"),
        ("rbd:p/i@a@b", "more than one '@'"),
    ):
        with pytest.raises(LocationError, match=message):
            parse(text)
    # what an overlay records reads back as the same location
    for one in (loc, RbdLocation(pool="p", image="a@b", snap="s:1@2")):
        again, _ = parse(backing_name(one))
        assert (again.pool, again.namespace, again.image, again.snap, again.conf, again.id) == (
            one.pool, one.namespace, one.image, one.snap, one.conf, one.id,
        )  # fmt: skip

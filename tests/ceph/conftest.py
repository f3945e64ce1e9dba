"""Fixtures for the Ceph tests: fresh RBD images and S3 objects on the session's one real
single-node cluster (the ``ceph`` fixture of tests/conftest.py, shared with tests/e2e).

Every test module here sets ``pytestmark = pytest.mark.ceph`` (``--no-ceph`` skips them).  The cluster
starts on first use, so a run that selects no Ceph test starts nothing.  The test process talks
to the cluster through the same Python bindings as nbdserve (to create images and to read the
ground truth); servers under test are separate processes where a test needs two clients.
"""

from __future__ import annotations

import itertools
import os

import pytest

from nbdserve.storage.location import RbdLocation, S3Location
from tests.cephcluster import POOL, S3_ACCESS_KEY, S3_SECRET_KEY

MiB = 1 << 20
BUCKET = "nbdserve-tests"


@pytest.fixture(scope="session")
def admin(ceph):
    """(rados.Rados, rbd pool ioctx) of client.admin in the test process, for set-up and ground truth."""
    import rados

    cluster = rados.Rados(conffile=str(ceph.conf), rados_id="admin")
    cluster.connect(timeout=30)
    ioctx = cluster.open_ioctx(POOL)
    yield cluster, ioctx
    ioctx.close()
    cluster.shutdown()


_names = itertools.count()


@pytest.fixture
def new_image(ceph, admin):
    """``new_image(size) -> RbdLocation`` of a fresh, empty image (features from the cluster's
    defaults: layering, exclusive-lock, object-map, fast-diff, deep-flatten)."""
    import rbd

    def make(size: int = 64 * MiB, **loc) -> RbdLocation:
        name = f"img{next(_names)}"
        rbd.RBD().create(admin[1], name, size)
        return RbdLocation(pool=POOL, image=name, conf=str(ceph.conf), **loc)

    return make


def ground_truth_extents(admin, loc: RbdLocation) -> list[tuple[int, int]]:
    """The image's data extents as librbd reports them (object granularity), merged."""
    import rbd

    out: list[tuple[int, int]] = []
    with rbd.Image(admin[1], loc.image, snapshot=loc.snap, read_only=True) as img:

        def cb(off: int, n: int, exists: bool) -> int:
            if exists:
                if out and out[-1][0] + out[-1][1] == off:
                    out[-1] = (out[-1][0], out[-1][1] + n)
                else:
                    out.append((off, n))
            return 0

        img.diff_iterate(0, img.size(), None, cb, include_parent=True, whole_object=True)
    return out


@pytest.fixture
def s3_env(monkeypatch) -> dict[str, str]:
    """The cluster's S3 user in the AWS environment variables (for this test only); any AWS
    config files of the machine are hidden."""
    env = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probing
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture(scope="session")
def s3_client(ceph):
    """A botocore S3 client of the test user (to upload objects)."""
    import botocore.config
    import botocore.session

    client = botocore.session.Session().create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=ceph.s3_endpoint,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        config=botocore.config.Config(s3={"addressing_style": "path"}),
    )
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def new_object(ceph, s3_client, s3_env):
    """``new_object(data, **options) -> S3Location`` of a fresh object holding ``data``."""

    def make(data: bytes, **loc) -> S3Location:
        key = f"images/obj{next(_names)}.img"
        s3_client.put_object(Bucket=BUCKET, Key=key, Body=data)
        return S3Location(bucket=BUCKET, key=key, endpoint=ceph.s3_endpoint, **loc)

    return make

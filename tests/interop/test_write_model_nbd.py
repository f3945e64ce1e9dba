"""Every format, written through nbdserve by several libnbd connections at once, against a model.

Hypothesis draws, per connection, a sequence of WRITE / WRITE_ZEROES (with and without NO_HOLE) /
TRIM / FLUSH requests on its own stripe of the disk (connections interleave freely in time; only
the byte ranges are disjoint, so the model is well defined).  All requests are issued
asynchronously, several in flight per connection.  After each example:
  * every connection flushes, then each connection reads every other connection's stripe and sees
    exactly the model (multi-conn: a flush makes all writes visible on all connections);
  * the server is stopped (SIGTERM: flush, mark clean), QEMU checks the file where it has a
    checker, and ``qemu-img compare`` with the raw model is equal.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SLOW
from tests.imagetest import check_clean, compare_with_model, run_streams
from tests.util import qemu_img, serve

MiB = 1 << 20
SIZE = 24 * MiB
CONNS = 3
STRIPE = SIZE // CONNS

# (format, qemu-img create options, has a qemu-img checker)
FORMATS = {
    "raw": ([], False),
    "qcow2": (["-o", "cluster_size=4k"], True),
    "qed": (["-o", "cluster_size=4k,table_size=2"], True),
    "vpc": (["-o", "force_size=on"], False),
    "vhdx": (["-o", "block_size=1M"], True),
    "vmdk": (["-o", "zeroed_grain=on"], True),
    "vdi": ([], True),
}

op = st.tuples(
    st.sampled_from(["write", "write", "write", "zero", "zero_nohole", "trim", "flush"]),
    st.integers(0, STRIPE - 1),
    st.integers(1, 300_000),
)
streams = st.lists(st.lists(op, max_size=60), min_size=CONNS, max_size=CONNS)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_concurrent_connections_match_model(tmp_path_factory, fmt):
    opts, has_check = FORMATS[fmt]

    @settings(
        max_examples=25 if SLOW else 6,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(plan=streams, seed=st.integers(0, 2**32))
    def check(plan, seed):
        tmp = tmp_path_factory.mktemp(fmt)
        img = tmp / f"w.{fmt}"
        qemu_img("create", "-q", "-f", fmt, *opts, img, str(SIZE))
        model = bytearray(SIZE)
        with serve(tmp, "-f", fmt, img) as srv:
            run_streams(srv.uri, plan, model, seed, stripe=STRIPE)
        if has_check:
            check_clean(img, fmt)
        compare_with_model(img, model, tmp, fmt)

    check()

#!/usr/bin/env bash
# Install everything the test suite needs on a Debian 12 machine, then run the whole suite.
#   bash tests/run.sh            # everything, VM end-to-end tests included
#   bash tests/run.sh --no-vm    # skip the VM tests (any other pytest arguments pass through too)
#   bash tests/run.sh --no-ceph  # skip the tests that start a Ceph cluster
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
PKGS=(qemu-utils qemu-system-x86 libnbd-bin python3-libnbd nbdkit fio nbd-client busybox-static
      e2fsprogs cpio python3-venv python3-dev gcc python3-libvhdi python3-libqcow gnutls-bin
      iproute2 util-linux
      # Ceph tests (tests/ceph, skip with --no-ceph): a single-node cluster, its Python bindings,
      # QEMU's rbd: driver, and botocore from Debian (its version is what the S3 tests know).
      ceph-mon ceph-mgr ceph-osd ceph-common radosgw python3-rados python3-rbd qemu-block-extra
      python3-botocore
      # Encryption tests: LUKS2 images are made by cryptsetup (no device mapper needed).
      cryptsetup-bin
      # Operations tests: systemd-analyze checks the units (nothing is started), strace counts
      # the syscalls behind --cache and --detect-zeroes, man checks the manual page renders.
      systemd strace man-db)
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
# The VM tests fetch a Debian cloud kernel with apt-get download: they need fresh package lists.
if [ ${#missing[@]} -gt 0 ] || [ -z "$(ls /var/lib/apt/lists/*Packages* 2>/dev/null | head -1)" ]; then
  $SUDO apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Debian's python: its libnbd bindings (python3-libnbd) are visible through system site-packages.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

# TLS-PSK needs Python >= 3.13 (Debian 12 has 3.11).  Where one is on this machine (on PATH or
# under pyenv), the PSK client tests run a server on it from .venv-psk; else they are skipped.
if [ -z "${NBDSERVE_PSK_PYTHON:-}" ]; then
  for py in python3.14 python3.13 "$HOME"/.pyenv/versions/3.1[3-9]*/bin/python3; do
    if command -v "$py" >/dev/null 2>&1 && "$py" -c 'import ssl, sys; sys.exit(not hasattr(ssl.SSLContext, "set_psk_server_callback"))'; then
      [ -x .venv-psk/bin/python ] || "$py" -m venv .venv-psk
      .venv-psk/bin/python -m pip install -q --disable-pip-version-check -e .
      export NBDSERVE_PSK_PYTHON="$PWD/.venv-psk/bin/python"
      break
    fi
  done
fi

.venv/bin/ruff check nbdserve tests bench
.venv/bin/ruff format --check nbdserve tests bench
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Install nbdserve from this checkout into a virtual environment (default ~/.local/nbdserve) on
# Debian 12: installs Debian's python3-venv first (with sudo unless run as root, so it works on
# a stock image where sudo is not installed), then pip-installs nbdserve and its dependencies.
#   bash deploy/install.sh [VENV]      then run VENV/bin/nbdserve
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-$HOME/.local/nbdserve}
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q "ok installed"; then
  if [ -z "$(ls /var/lib/apt/lists/*Packages* 2>/dev/null | head -1)" ]; then
    $SUDO apt-get update -qq
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check .
echo "installed: $VENV/bin/nbdserve (man page: man -l man/nbdserve.8)"

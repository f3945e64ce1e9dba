"""deploy/ and the files around it: the systemd units pass ``systemd-analyze verify`` and the
service's sandbox scores at most 3.0 in ``systemd-analyze security``; the socket unit listens on
loopback only; the Dockerfile's HEALTHCHECK
works against a real server; the LICENSE matches pyproject.toml; the example config loads."""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from nbdserve.cli import build_parser, config_from_args
from tests.interop.conftest import write_sparse_raw
from tests.util import REPO, run, serve

DEPLOY = REPO / "deploy"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze missing (Debian package systemd)")


def unit_root(tmp: Path) -> Path:
    """A root directory for ``systemd-analyze --root``: systemd's own units, ours, and a stand-in
    for the installed ``/usr/local/bin/nbdserve`` (verify checks that ExecStart exists)."""
    root = tmp / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for unit in ("nbdserve.service", "nbdserve.socket"):
        shutil.copy(DEPLOY / unit, root / "etc/systemd/system" / unit)
    exe = root / "usr/local/bin/nbdserve"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (root / "bin").mkdir()
    shutil.copy(shutil.which("kill"), root / "bin/kill")
    return root


@needs_analyze
def test_units_verify(tmp_path: Path) -> None:
    root = unit_root(tmp_path)
    p = run(ANALYZE, "verify", "--man=no", f"--root={root}", "nbdserve.service", "nbdserve.socket", check=False)
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr


@needs_analyze
def test_units_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    root = unit_root(tmp_path)
    unit = root / "etc/systemd/system/nbdserve.service"
    unit.write_text(unit.read_text().replace("ExecStart=/usr/local/bin/nbdserve", "ExecStart=/usr/local/bin/nbdx"))
    assert run(ANALYZE, "verify", "--man=no", f"--root={root}", "nbdserve.service", check=False).returncode != 0


@needs_analyze
def test_service_sandbox_exposure_at_most_3(tmp_path: Path) -> None:
    p = run(ANALYZE, "security", "--offline=yes", DEPLOY / "nbdserve.service", check=False)
    m = re.search(r"Overall exposure level for nbdserve.service: ([\d.]+)", p.stdout)
    assert m, p.stdout + p.stderr
    assert float(m.group(1)) <= 3.0, p.stdout


def test_service_settings() -> None:
    text = (DEPLOY / "nbdserve.service").read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#")
    )
    assert settings["Type"] == "notify"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(settings["WatchdogSec"]) > 0
    exec_start = shlex.split(settings["ExecStart"])
    assert exec_start[:2] == ["/usr/local/bin/nbdserve", "--config"]


def listen_streams(text: str) -> list[str]:
    """The ListenStream= values of a socket unit's [Socket] section as systemd reads them:
    comments (``#``, ``;``) skipped, backslash continuations joined, an empty assignment
    clearing the list."""
    values: list[str] = []
    section = ""
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Socket" and "=" in line:
            key, value = (x.strip() for x in line.split("=", 1))
            if key == "ListenStream":
                values = [*values, value] if value else []
    return values


def non_loopback(listen: str) -> bool:
    """Whether a ListenStream= value accepts connections from other machines: a bare port or an
    address that is not a loopback one (a path or an abstract socket is local)."""
    if listen.startswith(("/", "@")):
        return False
    host, sep, _port = listen.rpartition(":")
    if not sep:
        return True  # a port alone: every interface
    try:
        return not ipaddress.ip_address(host.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return True  # a name, or anything systemd would resolve: not known to be local


def test_socket_unit_listens_on_loopback_only() -> None:
    """Plain NBD has no authentication: the shipped socket unit must listen on loopback only (the
    file as systemd parses it), and the check notices the commented all-interfaces line."""
    text = (DEPLOY / "nbdserve.socket").read_text()
    listens = listen_streams(text)
    assert listens == ["127.0.0.1:10809", "[::1]:10809"], listens
    assert not any(non_loopback(x) for x in listens)
    opened_up = text.replace("#ListenStream=10809", "ListenStream=10809")
    assert any(non_loopback(x) for x in listen_streams(opened_up))
    assert listen_streams(text + "[Socket]\nListenStream=\nListenStream=0.0.0.0:10809\n") == ["0.0.0.0:10809"]
    assert non_loopback("0.0.0.0:10809") and non_loopback("[::]:10809") and not non_loopback("/run/nbd.sock")


def test_example_config_loads() -> None:
    args = build_parser().parse_args(["--config", str(DEPLOY / "nbdserve.toml")])
    cfg = config_from_args(args)
    assert [e.name for e in cfg.exports] == ["debian", "scratch", "golden"]


def test_dockerfile_healthcheck_against_a_server(tmp_path: Path) -> None:
    text = (REPO / "Dockerfile").read_text()
    m = re.search(r"HEALTHCHECK [^\n]*\\\n\s*CMD (\[.*\])", text)
    assert m, "no HEALTHCHECK CMD in the Dockerfile"
    cmd = json.loads(m.group(1))
    img = write_sparse_raw(tmp_path / "h.img", size=1 << 20, runs=())
    with serve(tmp_path, "-f", "raw", img, tcp=True) as srv:
        env = {"NBD_HEALTH_PORT": str(srv.port), "PATH": "/usr/bin:/bin"}
        assert subprocess.run(cmd, env=env, capture_output=True, timeout=60).returncode == 0
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=60).returncode != 0  # nobody listening
    assert "COPY LICENSE" in text and "man/nbdserve.8" in text


def test_license_matches_pyproject() -> None:
    license_text = (REPO / "LICENSE").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    assert license_text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in license_text


def test_dashboard_is_valid_json() -> None:
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dash["panels"] and all(p["targets"] for p in dash["panels"])

"""The manual page nbdserve(8) is kept in step with the program: every option ``--help`` shows has
an entry in OPTIONS and every entry there is an option; every config-file key is described; the
page renders without warnings."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess

import pytest

from nbdserve.cli import QEMU_NBD_OPTIONS, build_parser
from nbdserve.config import EXPORT_SCHEMA, SERVER_SCHEMA
from tests.util import REPO

PAGE = REPO / "man" / "nbdserve.8"


def plain(roff: str) -> str:
    """The page's text with font changes and escaped hyphens undone."""
    return re.sub(r"\\f[BIRP]", "", roff).replace("\\-", "-").replace("\\e", "\\")


def sections(roff: str) -> dict[str, str]:
    out, name = {}, ""
    for line in roff.splitlines():
        if line.startswith(".SH "):
            name = line[4:].strip('"')
            out[name] = ""
        elif name:
            out[name] += line + "\n"
    return out


def help_options() -> set[str]:
    parser = build_parser()
    return {s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings}


def entry_options(options_section: str) -> set[str]:
    """The options named by the .TP entries (the line after each .TP)."""
    lines = options_section.splitlines()
    heads = [plain(lines[i + 1]) for i, line in enumerate(lines[:-1]) if line.startswith(".TP")]
    return {m for head in heads for m in re.findall(r"(?<![\w=-])(--?[A-Za-z][\w-]*)", head)}


def test_every_help_option_has_an_entry_and_back() -> None:
    roff = PAGE.read_text()
    documented = entry_options(sections(roff)["OPTIONS"])
    assert help_options() - documented == set()
    assert documented - help_options() == set()


def test_every_config_key_is_described() -> None:
    roff = sections(PAGE.read_text())["CONFIGURATION FILE"]
    text = plain(roff)
    for key in [*SERVER_SCHEMA, *EXPORT_SCHEMA]:
        assert re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", text), key


def test_qemu_nbd_refusals_are_documented() -> None:
    text = plain(sections(PAGE.read_text())["QEMU-NBD COMPATIBILITY"])
    for o in QEMU_NBD_OPTIONS:
        if o.status == "refused":
            assert o.flags[-1] in text


def test_signals_and_exit_status_sections() -> None:
    s = sections(PAGE.read_text())
    for part in ("SIGNALS", "EXIT STATUS", "EXAMPLES", "ENVIRONMENT", "SEE ALSO"):
        assert s.get(part, "").strip(), part
    for sig in ("SIGTERM", "SIGHUP", "SIGUSR1"):
        assert sig in s["SIGNALS"]


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff missing (Debian package groff-base)")
def test_page_renders_without_warnings() -> None:
    p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(PAGE)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr

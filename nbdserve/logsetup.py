"""Where log lines go and what they look like: the one place that configures ``logging``.

Owns the destinations (``--log``): ``stderr``, ``syslog`` (``/dev/log``, facility daemon),
``journal`` (systemd's native protocol on ``/run/systemd/journal/socket``), ``null``, or a file
path (opened for appending, and again when log rotation moves it away); ``auto`` (the default) is
stderr in the foreground and, once ``--fork`` has detached, the journal if it runs, else syslog if
``/dev/log`` exists, else nothing.  Formats (``--log-format``): ``text`` (UTC timestamp with
milliseconds, ``nbdserve[PID]``, level, message) or ``json`` (one object a line: time, level,
pid, message).  On stderr connected to the journal (``JOURNAL_STREAM`` names it), text lines
carry the ``<N>`` priority prefix instead of a timestamp, which the journal turns into levels.

``-T``/``--trace`` patterns (qemu-nbd's option, used as a filter): a record below the chosen level
is still logged if its message matches one of the shell-style patterns (case-insensitive).

Invariant: the ``nbdserve`` logger has exactly one handler, the one ``setup`` installed last.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import logging.handlers
import os
import socket
import sys
import time
from dataclasses import dataclass

LOGGER = "nbdserve"
DESTINATIONS = ("auto", "stderr", "syslog", "journal", "null")
FORMATS = ("text", "json")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_SOCKET = "/dev/log"
NOTICE = 25  # between INFO and WARNING: shown at nbdserve's default verbosity (URIs, statistics, reloads)
logging.addLevelName(NOTICE, "NOTICE")
# syslog(3) priorities of Python's levels (journal PRIORITY= and the sd-daemon "<N>" prefix).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, NOTICE: 5, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


@dataclass(frozen=True)
class LogSettings:
    dest: str = "auto"  # one of DESTINATIONS, or a file path
    fmt: str = "text"
    level: int = logging.WARNING
    patterns: tuple[str, ...] = ()  # -T: messages below ``level`` matching these are logged too


def level_for(verbose: int, quiet: bool) -> int:
    """-q: errors only; default: warnings and the start-up lines; -v: info; -vv: debug."""
    if quiet:
        return logging.ERROR
    return (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]


def _priority(levelno: int) -> int:
    for lv in sorted(_PRIORITY, reverse=True):
        if levelno >= lv:
            return _PRIORITY[lv]
    return 7


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class TextFormatter(logging.Formatter):
    def __init__(self, journal_prefix: bool = False) -> None:
        super().__init__()
        self.journal_prefix = journal_prefix

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if self.journal_prefix:
            return f"<{_priority(record.levelno)}>{msg}"
        return f"{_timestamp(record.created)} nbdserve[{record.process}] {record.levelname.lower()}: {msg}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class JournalHandler(logging.Handler):
    """systemd journal, native protocol: one datagram of KEY=VALUE fields per record."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.connect(path)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {
                "MESSAGE": self.format(record),
                "PRIORITY": str(_priority(record.levelno)),
                "SYSLOG_IDENTIFIER": "nbdserve",
            }
            buf = bytearray()
            for key, value in fields.items():
                data = value.encode("utf-8", "replace")
                if b"\n" in data:  # binary form: KEY\n, 64-bit little-endian length, value, \n
                    buf += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
                else:
                    buf += key.encode() + b"=" + data + b"\n"
            self.sock.send(buf)
        except OSError:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


class PatternFilter(logging.Filter):
    """Passes records at or above ``level``, and below it those matching a -T pattern."""

    def __init__(self, level: int, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.level = level
        self.patterns = tuple(p.lower() for p in patterns)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            return True
        msg = record.getMessage().lower()
        return any(fnmatch.fnmatchcase(msg, p) for p in self.patterns)


def _stderr_is_journal() -> bool:
    """True if stderr is the journal's stream (systemd sets JOURNAL_STREAM=DEV:INODE)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


class SyslogHandler(logging.handlers.SysLogHandler):
    """syslog on /dev/log with nbdserve's levels (Python's handler knows no NOTICE and would send
    the start-up lines as warnings)."""

    _NAMES = {v: k for k, v in logging.handlers.SysLogHandler.priority_names.items()}

    def mapPriority(self, levelName: str) -> str:
        return self._NAMES[_PRIORITY.get(logging.getLevelName(levelName), 4)]


def background_destination() -> str:
    """What ``auto`` means once detached: the journal, else syslog, else nothing."""
    if os.path.exists(JOURNAL_SOCKET):
        return "journal"
    if os.path.exists(SYSLOG_SOCKET):
        return "syslog"
    return "null"


def _handler(dest: str, fmt: str) -> logging.Handler:
    if dest == "stderr":
        h: logging.Handler = logging.StreamHandler(sys.stderr)
        if fmt == "text":
            h.setFormatter(TextFormatter(journal_prefix=_stderr_is_journal()))
            return h
    elif dest == "null":
        return logging.NullHandler()
    elif dest == "syslog":
        h = SyslogHandler(SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        if fmt == "text":
            h.setFormatter(logging.Formatter(f"nbdserve[{os.getpid()}]: %(message)s"))
            return h
    elif dest == "journal":
        h = JournalHandler()
        if fmt == "text":
            h.setFormatter(logging.Formatter("%(message)s"))
            return h
    else:
        h = logging.handlers.WatchedFileHandler(dest, encoding="utf-8")
        if fmt == "text":
            h.setFormatter(TextFormatter())
            return h
    h.setFormatter(JsonFormatter())
    return h


def setup(settings: LogSettings, *, background: bool = False) -> None:
    """Install the handler for ``settings``; ``background``: stderr is gone (after --fork).
    Raises OSError if the destination cannot be opened (the caller reports it)."""
    dest = settings.dest
    if dest == "auto":
        dest = background_destination() if background else "stderr"
    elif dest == "stderr" and background:
        dest = "null"
    handler = _handler(dest, settings.fmt)
    handler.addFilter(PatternFilter(settings.level, settings.patterns))
    logger = logging.getLogger(LOGGER)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if settings.patterns else settings.level)
    logger.propagate = False

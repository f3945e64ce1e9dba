"""Live reconfiguration with clients attached: exports added, removed, changed in place, reopened,
the same file reopened, and a rejected configuration; libnbd clients read and write verified data
the whole time, and the client of an export the reload did not touch never sees an error.

Readiness is never a sleep: the server reports READY=1 on our NOTIFY_SOCKET at start and at the
end of every reload (RELOADING=1 first), applied or rejected.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
from pathlib import Path

import nbd
import pytest

from tests.interop.conftest import SIZE, MiB, expected_bytes, write_sparse_raw
from tests.util import Served, run, serve

GRACE = 3.0  # reload-grace: seconds the clients of a removed export keep it


class Worker(threading.Thread):
    """A libnbd client writing random blocks to one export and reading them back, against a
    model of the export's content; stops at the first error (kept in ``error``)."""

    def __init__(self, uri: str, content: bytearray, seed: int) -> None:
        super().__init__(daemon=True)
        self.uri, self.model, self.rnd = uri, content, random.Random(seed)
        self.ops = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.ops_lock = threading.Condition()

    def step(self) -> None:
        n = self.rnd.choice((512, 4096, 65536 + 7))
        off = self.rnd.randrange(0, len(self.model) - n)
        data = self.rnd.randbytes(n)
        self.h.pwrite(data, off)
        self.model[off : off + n] = data
        check = self.rnd.randrange(0, len(self.model) - 131072)
        assert self.h.pread(131072, check) == self.model[check : check + 131072], "read back wrong data"

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step()
                with self.ops_lock:
                    self.ops += 1
                    self.ops_lock.notify_all()
        except BaseException as e:
            self.error = e
            with self.ops_lock:
                self.ops_lock.notify_all()

    def wait_ops(self, n: int, timeout: float = 60) -> None:
        """Wait until ``n`` more operations have succeeded (or the worker failed)."""
        with self.ops_lock:
            target = self.ops + n
            assert self.ops_lock.wait_for(lambda: self.ops >= target or self.error is not None, timeout)
        assert self.error is None, f"{self.uri}: {self.error!r}"

    def finish(self) -> None:
        self.stop.set()
        self.join(60)
        assert self.error is None, f"{self.uri}: {self.error!r}"
        self.h.flush()
        self.h.shutdown()


class Reloader:
    """The config file and the notify socket of one server."""

    def __init__(self, tmp: Path) -> None:
        self.cfg = tmp / "nbdserve.toml"
        self.notify_path = tmp / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(60)
        self.srv: Served | None = None

    def write(self, exports: list[dict], grace: float = GRACE) -> None:
        lines = ["[server]", f"reload-grace = {grace}"]
        for e in exports:
            lines.append("[[export]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in e.items()]
        self.cfg.write_text("\n".join(lines) + "\n")

    def ready(self) -> str:
        """The next READY=1 message (skipping RELOADING=1, STATUS=, watchdog)."""
        while True:
            msg = self.notify.recv(4096).decode()
            if "READY=1" in msg:
                return msg

    def reload(self) -> str:
        os.kill(self.srv.pid, signal.SIGHUP)
        return self.ready()

    def names(self) -> dict[str, dict]:
        listed = json.loads(run("nbdinfo", "--list", "--json", self.srv.uri).stdout)["exports"]
        return {e["export-name"]: e for e in listed}


@pytest.fixture
def reloader(tmp_path: Path):
    r = Reloader(tmp_path)
    yield r
    r.notify.close()


def raw_export(name: str, path: Path, **kw) -> dict:
    return {"name": name, "path": str(path), "format": "raw", **kw}


def test_reload_with_clients_attached(tmp_path: Path, reloader: Reloader) -> None:
    keep, gone, change = (write_sparse_raw(tmp_path / f"{n}.img") for n in ("keep", "gone", "change"))
    added = write_sparse_raw(tmp_path / "added.img", runs=((0, 4096, 0x61),))
    other = write_sparse_raw(tmp_path / "other.img", runs=((0, 4096, 0x6F),))
    v1 = [raw_export("keep", keep), raw_export("gone", gone), raw_export("change", change, description="v1")]
    reloader.write(v1)
    with serve(tmp_path, "--config", reloader.cfg, env={"NOTIFY_SOCKET": str(reloader.notify_path)}) as srv:
        reloader.srv = srv
        reloader.ready()
        workers = {n: Worker(srv.uri_for(n), expected_bytes(), i) for i, n in enumerate(("keep", "gone", "change"))}
        for w in workers.values():
            w.start()
            w.wait_ops(5)
        k = workers["keep"]

        # 1. Add "added", remove "gone", change "change" in place (description, a connection limit).
        v2 = [raw_export("keep", keep), raw_export("change", change, description="v2", **{"max-connections": 4})]
        reloader.write([*v2, raw_export("added", added)])
        assert "STATUS=reload rejected" not in reloader.reload()
        listed = reloader.names()
        assert set(listed) == {"keep", "change", "added"}
        assert listed["change"]["description"] == "v2"
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("added"))
        assert h.pread(4096, 0) == b"\x61" * 4096
        h.shutdown()
        workers["gone"].wait_ops(1)  # a removed export's client goes on during the grace ...
        workers["change"].wait_ops(3)  # ... and a changed one's is not touched
        workers["gone"].join(60)  # ... then its requests finish and it is disconnected
        assert isinstance(workers["gone"].error, nbd.Error), workers["gone"].error
        with pytest.raises(nbd.Error):
            nbd.NBD().connect_uri(srv.uri_for("gone"))
        k.wait_ops(3)

        # 2. "change" now names another file: new clients get it, the old client keeps the old
        #    image for the grace period, then is disconnected.
        reloader.write([raw_export("keep", keep), raw_export("change", other), raw_export("added", added)])
        assert "STATUS=reload rejected" not in reloader.reload()
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("change"))
        assert h.pread(4096, 0) == b"\x6f" * 4096
        h.shutdown()
        workers["change"].join(60)
        assert isinstance(workers["change"].error, nbd.Error)
        k.wait_ops(3)

        # 3. A configuration with mistakes is refused as a whole; everything keeps serving.
        good = reloader.cfg.read_text()
        for bad in (
            good + 'readonly = "false"\n',  # a string where a boolean belongs
            good.replace("[server]", '[server]\nport = "abc"'),
            good + '[[export]]\nname = "x"\npath = "/nonexistent/x.img"\n',  # cannot be opened
            good + "[[export]]\nbogus = 1\n",
        ):
            reloader.cfg.write_text(bad)
            assert "STATUS=reload rejected" in reloader.reload()
            assert set(reloader.names()) == {"keep", "change", "added"}
            k.wait_ops(2)
        reloader.cfg.write_text(good)

        # 4. The same file reopened read-only: its clients are drained, then it serves again.
        a = Worker(srv.uri_for("added"), bytearray(expected_bytes(runs=((0, 4096, 0x61),))), 9)
        a.start()
        a.wait_ops(2)
        reloader.write(
            [raw_export("keep", keep), raw_export("change", other), raw_export("added", added, readonly=True)]
        )
        reloader.reload()
        a.join(60)
        assert isinstance(a.error, nbd.Error)
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("added"))
        assert h.is_read_only() and h.pread(4096, 4096 * 4) == a.model[4096 * 4 : 4096 * 5]
        h.shutdown()

        k.wait_ops(3)
        k.finish()  # the client of the untouched export never saw an error
        log = srv.log_text()
        assert log.count("reload rejected") == 4 and "Traceback" not in log, log
    assert keep.read_bytes() == k.model  # and what it wrote is on disk
    assert change.read_bytes() == workers["change"].model


def test_reload_error_messages_name_the_key_and_line(tmp_path: Path, reloader: Reloader) -> None:
    img = write_sparse_raw(tmp_path / "a.img", size=MiB, runs=())
    reloader.write([raw_export("a", img)])
    with serve(tmp_path, "--config", reloader.cfg, env={"NOTIFY_SOCKET": str(reloader.notify_path)}) as srv:
        reloader.srv = srv
        reloader.ready()
        reloader.cfg.write_text(reloader.cfg.read_text() + 'readonly = "false"\n')
        assert "STATUS=reload rejected" in reloader.reload()
        line = next(x for x in srv.log_text().splitlines() if "reload rejected" in x)
        assert f'{reloader.cfg}:7: [[export]] #1 readonly: expected true or false, not "false"' in line, line
        assert int(run("nbdinfo", "--size", srv.uri_for("a")).stdout) == MiB


def test_sighup_without_a_config_file_keeps_serving(tmp_path: Path) -> None:
    img = write_sparse_raw(tmp_path / "n.img")
    with serve(tmp_path, "-f", "raw", img) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        os.kill(srv.pid, signal.SIGHUP)
        os.kill(srv.pid, signal.SIGUSR1)
        assert h.pread(4096, 0) == b"\x11" * 4096
        h.shutdown()
        assert srv.alive()
    assert int(SIZE) == len(img.read_bytes())

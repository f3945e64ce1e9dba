"""Worker processes (``--workers N``, docs/workers.md) with real clients: exports spread over
processes and pinned where the configuration says, data verified through libnbd, nbdcopy and
qemu-img; a worker killed with SIGKILL under load (its client sees the disconnect, the other
worker's client sees nothing, the export is served again and every flushed write is there);
SIGTERM draining requests in flight in a worker; TLS relayed to workers; SIGHUP adding an export;
a reload one worker cannot apply applied by none (the old configuration keeps serving everywhere).

Which process serves an export is observed from the outside: the acceptor logs ``worker N: pid
P`` for each worker it starts, and ``/proc/P/fd`` shows which image files each process holds.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import nbd
import pytest

from tests.interop import nbdclient as raw
from tests.interop.conftest import MiB, random_raw, write_sparse_raw
from tests.interop.test_launch_modes import assert_fua_writes_landed, foreground, fua_writes_across_sigterm
from tests.interop.test_reload import Reloader, raw_export, reloader  # noqa: F401 (a fixture)
from tests.tlscerts import Pki
from tests.util import Served, free_port, qemu_img, run, serve


def worker_pids(srv: Served) -> dict[int, int]:
    """Worker index -> pid of the worker running now (the log's latest line for each index)."""
    pids: dict[int, int] = {}
    for m in re.finditer(r"worker (\d+): pid (\d+)", srv.log_text()):
        pids[int(m.group(1))] = int(m.group(2))
    children = {int(p) for t in os.listdir(f"/proc/{srv.pid}/task") for p in _children(srv.pid, t)}
    assert set(pids.values()) <= children, (pids, children)
    return pids


def _children(pid: int, tid: str) -> list[str]:
    return Path(f"/proc/{pid}/task/{tid}/children").read_text().split()


def open_files(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile
    return out


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m, text
    return float(m.group(1))


def test_exports_spread_over_workers_and_pins_honoured(tmp_path: Path) -> None:
    imgs = {n: random_raw(tmp_path / f"{n}.img", 8 * MiB, seed=i) for i, n in enumerate("abcd")}
    config = tmp_path / "w.toml"
    config.write_text(
        "[server]\nworkers = 2\n"
        + "".join(
            f'[[export]]\nname = "{n}"\npath = "{p}"\nformat = "raw"\n' + ("worker = 1\n" if n == "a" else "")
            for n, p in imgs.items()
        )
    )
    with serve(tmp_path, "--config", config) as srv:
        pids = worker_pids(srv)
        assert sorted(pids) == [0, 1]
        held = {i: open_files(pid) for i, pid in pids.items()}
        owner = {n: [i for i in held if str(p) in held[i]] for n, p in imgs.items()}
        # the pin first (a -> 1), then balanced in configuration order: b -> 0, c -> 0, d -> 1
        assert owner == {"a": [1], "b": [0], "c": [0], "d": [1]}
        assert not any(str(p) in open_files(srv.pid) for p in imgs.values())  # the acceptor opens none
        listed = run("nbdinfo", "--list", "--json", srv.uri_for("")).stdout
        for n in imgs:
            assert f'"export-name": "{n}"' in listed

        # four clients at once, each on its own export, unaligned writes read back and on disk
        errors: list[BaseException] = []

        def client(name: str, seed: int) -> None:
            try:
                h = nbd.NBD()
                h.connect_uri(srv.uri_for(name))
                rnd = os.urandom
                for k in range(40):
                    off, data = (k * 131071 + seed) % (7 * MiB), rnd(3000 + k * 97)
                    h.pwrite(data, off)
                    assert h.pread(len(data), off) == data
                h.flush()
                h.shutdown()
            except BaseException as e:  # reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=client, args=(n, i * 513 + 1)) for i, n in enumerate(imgs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        # nbdcopy and qemu-img agree with the files, export by export
        for n, p in imgs.items():
            copy = tmp_path / f"{n}.copy"
            run("nbdcopy", srv.uri_for(n), copy)
            assert copy.read_bytes() == p.read_bytes()
            qemu_img("compare", "-f", "raw", "-F", "raw", p, srv.uri_for(n))


def test_kill9_of_a_worker_under_load(tmp_path: Path) -> None:
    a, b = (write_sparse_raw(tmp_path / f"{n}.img", size=64 * MiB, runs=()) for n in "ab")
    port = free_port()
    args = ["--workers", "2", "--export", f"a={a},format=raw,worker=0", "--export", f"b={b},format=raw,worker=1"]
    with serve(tmp_path, *args, "--metrics", f"127.0.0.1:{port}") as srv:
        before = worker_pids(srv)
        flushed: dict[str, dict[int, bytes]] = {"a": {}, "b": {}}
        failure: dict[str, BaseException | None] = {"a": None, "b": None}
        going = {"a": threading.Event(), "b": threading.Event()}
        killed = threading.Event()
        slots = 64 * MiB // 8192

        def client(name: str, rounds_after_kill: int) -> None:
            """Write a fresh slot, flush, read it back; again, until the connection fails or
            ``rounds_after_kill`` rounds after the kill (each write touches only its own slot,
            so a write cut off by the kill cannot change a flushed one)."""
            h = nbd.NBD()
            h.connect_uri(srv.uri_for(name))
            after = 0
            try:
                for i in range(slots):
                    off, data = i * 8192 + 17, os.urandom(4000 + i % 111)
                    h.pwrite(data, off)
                    h.flush()
                    flushed[name][off] = data
                    assert h.pread(len(data), off) == data
                    if i == 20:
                        going[name].set()
                    if killed.is_set():
                        after += 1
                        if after >= rounds_after_kill:
                            break
                h.shutdown()
            except BaseException as e:  # the main thread judges it
                failure[name] = e
            finally:
                going[name].set()

        threads = {
            "a": threading.Thread(target=client, args=("a", slots)),
            "b": threading.Thread(target=client, args=("b", 50)),
        }
        for t in threads.values():
            t.start()
        going["a"].wait()
        going["b"].wait()
        os.kill(before[0], signal.SIGKILL)
        t0 = time.monotonic()
        killed.set()
        for t in threads.values():
            t.join()
        assert isinstance(failure["a"], nbd.Error), failure["a"]  # the killed worker's client: a disconnect
        assert failure["b"] is None, failure["b"]  # the other worker's client: no error at all
        # Connecting again works (a connection for a restarting worker waits for it)...
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("a"))
        h.pread(1, 0)
        back = time.monotonic() - t0  # the first reply comes from the new worker
        # ...and every write that was flushed before the kill is there.
        for off, data in flushed["a"].items():
            assert h.pread(len(data), off) == data, off
        h.pwrite(b"after", 5)
        h.flush()
        h.shutdown()
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("b"))
        for off, data in flushed["b"].items():
            assert h.pread(len(data), off) == data, off
        h.shutdown()
        after = worker_pids(srv)
        assert after[1] == before[1] and after[0] != before[0]
        assert metric(port, "nbdserve_worker_restarts_total") == 1
        assert len(flushed["a"]) > 20 and len(flushed["b"]) > 20
        print(f"export 'a' served again {back * 1000:.0f} ms after the kill")  # a figure, not an assertion
    assert a.read_bytes()[5:10] == b"after"


def test_sigterm_drains_a_worker(tmp_path: Path) -> None:
    a = write_sparse_raw(tmp_path / "a.img", size=64 * MiB)
    b = write_sparse_raw(tmp_path / "b.img", size=64 * MiB)
    sock = tmp_path / "drain.sock"
    args = ["-k", sock, "--workers", "2", "--export", f"a={a},format=raw", "--export", f"b={b},format=raw"]
    with foreground(tmp_path, *args) as (proc, log):
        idle = raw.RawClient(sock)
        idle.greet()
        idle.go("a")
        c = raw.RawClient(sock)
        c.greet()
        c.go("b")
        late = fua_writes_across_sigterm(c, proc)
        assert c.wait_closed(30) and idle.wait_closed(30)
        assert proc.wait(timeout=60) == 0
        c.close()
        idle.close()
    text = log.read_text()
    assert "Traceback" not in text and "starting it again" not in text, text
    assert_fua_writes_landed(b.read_bytes())
    assert late, "every write finished before SIGTERM; the drain was not exercised"


def test_tls_exports_on_two_workers(tmp_path: Path, pki: Pki) -> None:
    imgs = {n: random_raw(tmp_path / f"{n}.img", 4 * MiB, seed=i + 3) for i, n in enumerate("xy")}
    args = ["--tls-creds", pki.server, "--workers", "2", *(f"--export={n}={p},format=raw" for n, p in imgs.items())]
    with serve(tmp_path, *args, tcp=True) as srv:
        pids = worker_pids(srv)
        assert len(pids) == 2
        for n, p in imgs.items():
            h = nbd.NBD()
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_certificates(str(pki.alice))
            h.set_export_name(n)
            h.connect_tcp("127.0.0.1", str(srv.port))
            assert h.get_tls_negotiated()
            data = os.urandom(300001)  # larger than the relay's buffers, unaligned
            h.pwrite(data, MiB + 511)
            h.flush()
            assert h.pread(len(data), MiB + 511) == data
            h.shutdown()
            assert p.read_bytes()[MiB + 511 : MiB + 511 + len(data)] == data
            copy = tmp_path / f"{n}.copy"
            run("nbdcopy", srv.tls_uri(pki.alice, n), copy)
            assert copy.read_bytes() == p.read_bytes()


def test_reload_adds_an_export_to_a_worker(tmp_path: Path, reloader: Reloader) -> None:  # noqa: F811
    imgs = {n: random_raw(tmp_path / f"{n}.img", MiB, seed=i) for i, n in enumerate("pqr")}
    reloader.write([raw_export(n, imgs[n]) for n in "pq"])
    env = {"NOTIFY_SOCKET": str(reloader.notify_path)}
    with serve(tmp_path, "--workers", "2", "--config", reloader.cfg, env=env) as srv:
        reloader.srv = srv
        reloader.ready()
        assert set(reloader.names()) == {"p", "q"}
        reloader.write([raw_export(n, imgs[n]) for n in "pqr"])
        assert "STATUS" not in reloader.reload()  # READY=1 alone: applied
        assert set(reloader.names()) == {"p", "q", "r"}
        out = tmp_path / "r.copy"
        run("nbdcopy", srv.uri_for("r"), out)
        assert out.read_bytes() == imgs["r"].read_bytes()
        held = {i: open_files(pid) for i, pid in worker_pids(srv).items()}
        assert [i for i in held if str(imgs["r"]) in held[i]] == [0]  # fewest exports (a tie: the lower index)
        reloader.write([raw_export(n, imgs[n]) for n in "pr"])
        reloader.reload()
        assert set(reloader.names()) == {"p", "r"}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[server]\nworkers = -1\n", "workers must be >= 0"),
        ("[server]\nworkers = 2\n[[export]]\npath = 'IMG'\nworker = 2\n", "worker = 2, but there are 2 workers"),
        ("[[export]]\npath = 'IMG'\nworker = '1'\n", "worker: expected an integer"),
    ],
)
def test_worker_settings_are_checked(tmp_path: Path, text: str, error: str) -> None:
    from tests.util import start_error

    img = random_raw(tmp_path / "i.img", MiB)
    config = tmp_path / "bad.toml"
    config.write_text(text.replace("IMG", str(img)) + ("" if "path" in text else f"[[export]]\npath = '{img}'\n"))
    assert error in start_error(tmp_path, "--config", config)


def test_reload_is_all_or_nothing_across_workers(tmp_path: Path, reloader: Reloader) -> None:  # noqa: F811
    """A new configuration that one worker cannot apply (an export pinned to worker 1 fails to
    open) is applied by none: worker 0 keeps serving the export the new configuration removes
    (a new client reads it), opens nothing new, and one line says why.  The corrected
    configuration is then applied by both."""
    imgs = {n: random_raw(tmp_path / f"{n}.img", MiB, seed=i) for i, n in enumerate("pqn")}
    old = [raw_export("p", imgs["p"], worker=0), raw_export("q", imgs["q"], worker=1)]
    reloader.write(old)
    env = {"NOTIFY_SOCKET": str(reloader.notify_path)}
    with serve(tmp_path, "--workers", "2", "--config", reloader.cfg, env=env) as srv:
        reloader.srv = srv
        reloader.ready()
        h = nbd.NBD()
        h.connect_uri(srv.uri_for("q"))  # a client of worker 1 across both reloads
        bad = [
            raw_export("q", imgs["q"], worker=1, description="v2"),
            raw_export("n", imgs["n"], worker=0),  # worker 0's part is fine ...
            raw_export("x", tmp_path / "missing.img", worker=1),  # ... worker 1's is not
        ]
        reloader.write(bad)
        assert "STATUS=reload rejected" in reloader.reload()
        assert set(reloader.names()) == {"p", "q"}
        assert reloader.names()["q"].get("description", "") == ""
        c = nbd.NBD()
        c.connect_uri(srv.uri_for("p"))  # removed by the rejected configuration: still served
        assert c.pread(4096, 0) == imgs["p"].read_bytes()[:4096]
        c.shutdown()
        held = {i: open_files(pid) for i, pid in worker_pids(srv).items()}
        assert str(imgs["p"]) in held[0] and str(imgs["n"]) not in held[0]
        lines = srv.log_lines("reload rejected")
        assert len(lines) == 1 and "missing.img" in lines[0] and "'x'" in lines[0], srv.log_text()
        assert h.pread(4096, 0) == imgs["q"].read_bytes()[:4096]

        reloader.write([b for b in bad if b["name"] != "x"])
        assert "STATUS" not in reloader.reload()
        listed = reloader.names()
        assert set(listed) == {"q", "n"} and listed["q"]["description"] == "v2"
        c = nbd.NBD()
        c.connect_uri(srv.uri_for("n"))
        assert c.pread(4096, MiB - 4096) == imgs["n"].read_bytes()[-4096:]
        c.shutdown()
        assert h.pread(4096, 0) == imgs["q"].read_bytes()[:4096]
        h.shutdown()
        assert len(srv.log_lines("reload rejected")) == 1 and "Traceback" not in srv.log_text()

"""A deliberately broken NBD path for the negative control: a TCP proxy that corrupts writes.

``CorruptingProxy(upstream_port)`` listens on 127.0.0.1 (port 0, so no race) and relays every
connection to the server.  Server-to-client bytes pass untouched.  Client-to-server bytes are
parsed just enough to find write payloads: the 4-byte client flags, then newstyle options
(``IHAVEOPT``, option, length, data) until ``NBD_OPT_EXPORT_NAME`` or ``NBD_OPT_GO`` (assumed to
succeed), then 28-byte requests, of which ``NBD_CMD_WRITE`` carries ``length`` payload bytes.
The first byte of every write payload is flipped, so the server stores data that differs from
what the client sent while every reply still says success.  Anything it cannot parse (TLS,
extended headers) ends the connection.

Test-only; one thread per direction per connection (daemon threads: they die with the sockets).
"""

from __future__ import annotations

import socket
import struct
import threading

IHAVEOPT = 0x49484156454F5054
OPT_EXPORT_NAME = 1
OPT_GO = 7
REQUEST_MAGIC = 0x25609513
CMD_WRITE = 1
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


class CorruptingProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.corrupted_writes = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]

    def __enter__(self) -> CorruptingProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()
        with self._lock:
            for s in self._socks:
                s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed by __exit__
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._socks += [client, server]
            threading.Thread(target=self._pump, args=(server, client, self._relay), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, server, self._corrupt), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, body) -> None:
        try:
            body(src, dst)
        except (EOFError, OSError, ValueError):
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def _relay(src: socket.socket, dst: socket.socket) -> None:
        while chunk := src.recv(1 << 20):
            dst.sendall(chunk)

    def _corrupt(self, src: socket.socket, dst: socket.socket) -> None:
        dst.sendall(_recv_exact(src, 4))  # client flags
        while True:
            head = _recv_exact(src, _OPTION.size)
            magic, option, length = _OPTION.unpack(head)
            if magic != IHAVEOPT:
                raise ValueError(f"not an option: {magic:#x}")
            dst.sendall(head + _recv_exact(src, length))
            if option in (OPT_EXPORT_NAME, OPT_GO):
                break
        while True:
            head = _recv_exact(src, _REQUEST.size)
            magic, _flags, kind, _cookie, _offset, length = _REQUEST.unpack(head)
            if magic != REQUEST_MAGIC:
                raise ValueError(f"not a request: {magic:#x}")
            dst.sendall(head)
            if kind == CMD_WRITE:
                payload = bytearray(_recv_exact(src, length))
                payload[0] ^= 0x5A
                with self._lock:
                    self.corrupted_writes += 1
                dst.sendall(payload)

"""A TCP proxy in front of a real HTTP server that records every request line.

Tests point diskvault (a subprocess, so a Python-level wrapper cannot see its calls)
at ``http://127.0.0.1:<proxy port>`` and then ask which objects were read or written.
The bytes pass through unchanged, so S3 signatures (which cover the ``Host`` header
the client sent to the proxy) still verify at the server.

Only the client→server direction is parsed, and only far enough to find where each
request ends (``Content-Length`` or chunked bodies); responses are piped blindly.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

_CHUNK = 1 << 20


class _Conn:
    """One client connection: parse its requests, forward everything both ways."""

    def __init__(self, proxy: CountingProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = socket.create_connection(proxy.upstream, timeout=None)
        self.buf = bytearray()

    def run(self) -> None:
        back = threading.Thread(target=self._pipe_back, daemon=True)
        back.start()
        try:
            while self._one_request():
                pass
        except OSError:
            pass
        finally:
            self._close()

    def _close(self) -> None:
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def _pipe_back(self) -> None:
        try:
            while data := self.upstream.recv(_CHUNK):
                self.client.sendall(data)
        except OSError:
            pass
        finally:
            self._close()

    def _fill(self) -> bool:
        data = self.client.recv(_CHUNK)
        if not data:
            return False
        self.buf += data
        return True

    def _line_block(self, end: bytes) -> bytes | None:
        while (i := self.buf.find(end)) < 0:
            if not self._fill():
                return None
        block = bytes(self.buf[: i + len(end)])
        del self.buf[: i + len(end)]
        self.upstream.sendall(block)
        return block

    def _forward(self, n: int) -> None:
        while n > 0:
            if not self.buf and not self._fill():
                raise OSError("client closed inside a body")
            take = min(n, len(self.buf))
            self.upstream.sendall(self.buf[:take])
            del self.buf[:take]
            n -= take

    def _one_request(self) -> bool:
        head = self._line_block(b"\r\n\r\n")
        if head is None:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, target = lines[0].split(" ")[:2]
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (ln.partition(":") for ln in lines[1:] if ln)}
        self.proxy._record(method, target, headers.get("range"))
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = self._line_block(b"\r\n")
                if size_line is None:
                    return False
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self._line_block(b"\r\n") not in (None, b"\r\n"):
                        pass  # trailers, up to the empty line
                    break
                self._forward(size + 2)
        else:
            self._forward(int(headers.get("content-length", "0")))
        return True


class CountingProxy:
    """``requests`` holds ``(METHOD, key)`` for each request, ``key`` being the object
    key below the bucket (query strings dropped, e.g. ``repo/packs/ab/ab12…``)."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.requests: list[tuple[str, str]] = []
        self.raw: list[tuple[str, str]] = []
        self.ranges: list[tuple[str, str | None]] = []  # GETs: (key, Range header or None)
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        self._conns: list[_Conn] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                conn = _Conn(self, client)
            except OSError:  # the server is down: the client sees a dropped connection
                client.close()
                continue
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=conn.run, daemon=True).start()

    def _record(self, method: str, target: str, range_: str | None = None) -> None:
        path = unquote(urlsplit(target).path)
        key = path.lstrip("/").partition("/")[2]
        with self._lock:
            self.raw.append((method, target))
            self.requests.append((method, key))
            if method == "GET":
                self.ranges.append((key, range_))

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.raw.clear()
            self.ranges.clear()

    def matching(self, method: str, pattern: str) -> list[str]:
        """Keys of ``method`` requests whose key matches the regular expression."""
        rx = re.compile(pattern)
        with self._lock:
            return [k for m, k in self.requests if m == method and rx.search(k)]

    def lists(self) -> list[str]:
        """The ``prefix=`` of every LIST request."""
        with self._lock:
            raw = list(self.raw)
        out = []
        for m, target in raw:
            q = urlsplit(target).query
            if m == "GET" and ("list-type=" in q or "prefix=" in q):
                prefix = re.search(r"(?:^|&)prefix=([^&]*)", q)
                out.append(unquote(prefix.group(1)) if prefix else "")
        return out

    def stop(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c._close()


@contextlib.contextmanager
def counting_proxy(host: str, port: int) -> Iterator[CountingProxy]:
    proxy = CountingProxy(host, port)
    try:
        yield proxy
    finally:
        proxy.stop()

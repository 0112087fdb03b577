"""A small blocking QMP (QEMU Machine Protocol) client: commands and events over a Unix
socket, JSON one object per line."""

from __future__ import annotations

import json
import select
import socket
import time
from typing import Any

from ..errors import VmError


class Qmp:
    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.path = path
        self.events: list[dict] = []
        self._id = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise VmError(f"cannot connect to the QMP socket {path}: {e.strerror}") from None
        self.buf = bytearray()
        try:
            greeting = self._read(timeout)
        except TimeoutError:
            greeting = {}
        if "QMP" not in greeting:
            self.close()
            raise VmError(f"{path} is not a QMP socket")
        self.execute("qmp_capabilities")

    def _read(self, timeout: float = 60.0) -> dict:
        """The next message; TimeoutError if none arrives within ``timeout``."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError
            try:
                data = self.sock.recv(1 << 16)
            except OSError as e:
                raise VmError(f"QMP {self.path}: {e}") from None
            if not data:
                raise VmError(f"QMP {self.path}: QEMU closed the connection (did the VM stop?)")
            self.buf += data
        n = self.buf.index(b"\n")
        line = bytes(self.buf[:n])
        del self.buf[: n + 1]
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            raise VmError(f"QMP {self.path}: malformed message {line[:80]!r}")
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run a command; return its result or raise VmError with QEMU's message."""
        self._id += 1
        req: dict = {"execute": command, "id": self._id}
        if arguments:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            try:
                msg = self._read(120.0)
            except TimeoutError:
                raise VmError(f"QEMU did not answer {command} within 120 s") from None
            if "event" in msg:
                self.events.append(msg)
            elif msg.get("id") == self._id:
                if "error" in msg:
                    desc = msg["error"].get("desc", msg["error"])
                    raise VmError(f"QEMU refused {command}: {desc}")
                return msg.get("return")

    def wait_event(self, names: set[str], timeout: float) -> dict | None:
        """The next event named in ``names`` (earlier ones first), or None at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") in names:
                    return self.events.pop(i)
            self.events.clear()  # nothing else is waited for
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                msg = self._read(left)
            except TimeoutError:
                return None
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self.sock.close()

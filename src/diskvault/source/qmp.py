"""A small client of the QEMU Machine Protocol (QMP) and the guest agent protocol.

Both are JSON over a Unix socket: QMP greets, wants ``qmp_capabilities``, then answers
each ``{"execute": ...}`` with ``{"return": ...}`` or ``{"error": ...}`` and sends
asynchronous ``{"event": ...}`` lines in between (kept in ``events``). The guest agent
(qemu-ga) sends no greeting and no events; a ``guest-sync`` with a random id skips
whatever a previous, interrupted client left in the channel.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from ..errors import VmError


class QmpError(VmError):
    """QEMU refused a command; the message names it and QEMU's reason."""


class QmpClient:
    def __init__(self, path: str, timeout: float = 60.0, agent: bool = False) -> None:
        self.path = path
        self.events: list[dict] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._timeout = timeout
        what = "guest agent" if agent else "QMP"
        try:
            self._sock.connect(path)
        except OSError as e:
            self._sock.close()
            raise VmError(f"{path}: cannot connect to the {what} socket: "
                              f"{e.strerror or e}") from None
        self._buf = b""
        self._closed = False  # QEMU closed the connection (it exited)
        try:
            if agent:
                token = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
                # 0xff resets the agent's parser (a half-sent command of an earlier
                # client); answers until the one carrying our token are stale
                self._sock.sendall(b"\xff" + json.dumps(
                    {"execute": "guest-sync-delimited", "arguments": {"id": token}}
                ).encode() + b"\n", socket.MSG_NOSIGNAL)
                while self._read().get("return") != token:
                    pass
            else:
                greeting = self._read()
                if "QMP" not in greeting:
                    raise VmError(f"{path}: not a QMP socket")
                self.execute("qmp_capabilities")
        except TimeoutError:
            self.close()
            raise VmError(f"{path}: the {what} did not answer") from None
        except BaseException:
            self.close()
            raise

    def _read(self, timeout: float | None = None) -> dict:
        """The next message. ``timeout``: raise TimeoutError when none arrives in time
        (otherwise the socket's own timeout applies and is an error)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[:nl], self._buf[nl + 1 :]
                line = line.lstrip(b"\xff")  # the agent's sync delimiter
                if not line.strip():
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    raise VmError(f"{self.path}: garbled answer from QEMU") from None
                if isinstance(msg, dict):
                    return msg
                continue
            if deadline is not None:
                self._sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                if deadline is not None:
                    raise
                raise VmError(f"{self.path}: QEMU did not answer in time") from None
            finally:
                if deadline is not None:
                    self._sock.settimeout(self._timeout)
            if not data:
                self._closed = True
                raise VmError(f"{self.path}: QEMU closed the connection")
            self._buf += data

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        try:  # MSG_NOSIGNAL: no SIGPIPE whatever its disposition in the embedding process
            self._sock.sendall(json.dumps(msg).encode() + b"\n", socket.MSG_NOSIGNAL)
        except OSError as e:
            self._closed = True
            raise VmError(f"{self.path}: QEMU went away: {e.strerror or e}") from None
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                desc = reply["error"].get("desc", "unknown error")
                raise QmpError(f"QEMU refused {command}: {desc}")
            if "return" in reply:
                return reply["return"]

    def wait_event(self, names: set[str], timeout: float) -> dict | None:
        """The next event named in ``names`` (earlier ones first), or None at the
        timeout; other events are dropped (nothing else waits for them)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("event") in names:
                    return self.events.pop(i)
            self.events.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                msg = self._read(left)
            except TimeoutError:
                return None
            if "event" in msg:
                self.events.append(msg)

    def alive(self) -> bool:
        """False once QEMU has closed the connection (it exited or was killed)."""
        return not self._closed

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

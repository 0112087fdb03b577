"""Freezing a guest's filesystems through the QEMU guest agent, for one instant.

``guest-fsfreeze-freeze`` makes the guest flush and block writes to its filesystems;
a backup's point in time taken while they are frozen is application-consistent (clean
filesystems, no journal to replay). A guest left frozen hangs every writer in it, so
the thaw is guaranteed three ways:

- ``GuestFreeze.__exit__`` thaws on every way out of the block (error, timeout,
  SIGTERM: diskvault turns it into an exception);
- a **watchdog process** (``python -m diskvault.source.guestfreeze SOCKET SECONDS``),
  started before the freeze in its own session, reads a pipe from us: when the pipe
  closes — we are done, or were SIGKILLed and the kernel closed it — or ``SECONDS``
  pass, it thaws (thawing an unfrozen guest is harmless) and exits;
- the freeze itself is held only around the QMP ``transaction``.

The agent's channel serves one client at a time, so every step opens it, does its one
command and closes it again.
"""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
import time
from collections.abc import Callable

from ..errors import VmError
from .qmp import QmpClient, QmpError

AGENT_NAME = "org.qemu.guest_agent.0"
FREEZE_LIMIT = 60.0  # seconds a guest may stay frozen if diskvault hangs


def find_agent_socket(q: QmpClient) -> str | None:
    """The host end of the VM's guest agent channel (a Unix socket chardev), or None."""
    chardevs = {c["label"]: c.get("filename", "") for c in q.execute("query-chardev")}
    for root in ("/machine/peripheral", "/machine/peripheral-anon"):
        try:
            devices = q.execute("qom-list", path=root)
        except QmpError:
            continue
        for dev in devices:
            if not dev.get("type", "").startswith("child<virtserialport"):
                continue
            path = f"{root}/{dev['name']}"
            with contextlib.suppress(QmpError):
                if q.execute("qom-get", path=path, property="name") != AGENT_NAME:
                    continue
                label = q.execute("qom-get", path=path, property="chardev")
                spec = chardevs.get(label, "")
                # "unix:/run/qga.sock,server=on" or "disconnected:unix:…"
                if "unix:" in spec:
                    return spec.split("unix:", 1)[1].split(",", 1)[0]
    return None


def _agent(path: str, timeout: float = 10.0) -> QmpClient:
    return QmpClient(path, timeout=timeout, agent=True)


def thaw(path: str, timeout: float = 30.0) -> int:
    """Thaw the guest's filesystems; the number thawed (0 if none were frozen)."""
    with _agent(path, timeout) as a:
        return int(a.execute("guest-fsfreeze-thaw"))


class GuestFreeze:
    """``with GuestFreeze(socket):`` — the guest's filesystems frozen inside the block.

    Subclasses reach the agent another way (libvirt: ``source/libvirt.py``) by
    overriding ``check``, ``_freeze``, ``_thaw`` and ``_watchdog_cmd``."""

    def __init__(self, path: str, limit: float = FREEZE_LIMIT) -> None:
        self.path, self.limit = path, limit
        self.frozen = 0
        self._guard: subprocess.Popen[bytes] | None = None

    def check(self) -> None:
        """Is the agent there and answering? (before anything is changed)"""
        try:
            with _agent(self.path) as a:
                a.execute("guest-ping")
        except VmError as e:
            raise VmError(f"guest agent: {e}") from None

    def _freeze(self) -> int:
        with _agent(self.path, self.limit) as a:
            return int(a.execute("guest-fsfreeze-freeze"))

    def _thaw(self) -> None:
        thaw(self.path)

    def _watchdog_cmd(self) -> list[str]:
        return [sys.executable, "-m", "diskvault.source.guestfreeze", self.path, str(self.limit)]

    def __enter__(self) -> GuestFreeze:
        self._guard = subprocess.Popen(
            self._watchdog_cmd(),
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # survives a SIGKILL of our process group
        try:
            self.frozen = self._freeze()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._release()

    def _release(self) -> None:
        try:
            self._thaw()
        finally:
            if self._guard is not None:
                assert self._guard.stdin is not None
                self._guard.stdin.close()  # the watchdog thaws once more and exits
                try:
                    self._guard.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self._guard.kill()
                self._guard = None


def watch(thaw_once: Callable[[], object], limit: float) -> int:
    """The watchdog's body: wait until stdin closes or ``limit`` seconds pass, then
    thaw (retrying a while: the agent channel may still be held by our parent for a
    moment)."""
    select.select([sys.stdin], [], [], limit)
    deadline = time.monotonic() + 120
    while True:
        try:
            thaw_once()
            return 0
        except VmError:
            if time.monotonic() > deadline:
                return 1
            time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(watch(lambda: thaw(sys.argv[1]), float(sys.argv[2])))

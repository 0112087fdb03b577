"""A watchdog process that undoes one action (thaw a filesystem, run a post command)
even when diskvault dies — by an error, SIGTERM or SIGKILL.

Why a process: after a SIGKILL no code of ours runs, yet a frozen filesystem must be
thawed (its writers sleep uninterruptibly until then) and a `virsh suspend` must be
followed by its `virsh resume`. The watchdog runs in its own session (a Ctrl-C or a
signal to diskvault's process group does not reach it) and reads a socket whose only
other end diskvault holds. It performs its action exactly once, on the
first of: a ``release`` line (the normal path: diskvault asks it to undo now and reads
the result), end of file (diskvault died: the kernel closed its socket), its deadline
(a freeze held too long), or SIGTERM/SIGHUP/SIGINT to the watchdog itself.

Everything the action needs (the mountpoint's file descriptor for FITHAW, the shell)
is opened or resolved before diskvault freezes anything, so the watchdog never touches
a frozen filesystem before thawing it.

Protocol (one JSON line each way): argv[1] is the action, ``{"thaw": MOUNTPOINT}`` or
``{"run": SHELL_COMMAND}``, argv[2] an absolute CLOCK_MONOTONIC deadline or ``-``.
The watchdog prints ``ready`` once armed, then, after acting, ``{"ok": bool, "why":
str, "detail": str}`` (why: release, parent-died, deadline, signal).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)


class _Signalled(Exception):
    pass


def _on_signal(signum: int, frame: object) -> None:
    raise _Signalled()


def _wait(deadline: float | None) -> str:
    """Block until release, EOF, the deadline or a signal; say which."""
    buf = b""
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if timeout == 0.0:
            return "deadline"
        try:
            ready, _, _ = select.select([0], [], [], timeout)
        except _Signalled:
            return "signal"
        if not ready:
            continue  # loop re-checks the deadline
        try:
            data = os.read(0, 64)
        except _Signalled:
            return "signal"
        if not data:
            return "parent-died"
        buf += data
        if b"release\n" in buf:
            return "release"


def thaw_fd(fd: int) -> tuple[bool, str]:
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as e:
        # EINVAL: not frozen (already thawed by someone else): the goal holds
        if e.errno == 22:
            return True, "was not frozen"
        return False, f"thaw failed: {e.strerror}"
    return True, "thawed"


class Watchdog:
    """diskvault's side: start a watchdog for ``action``, later ``release()`` it.

    Armed (its "ready" read) before the caller does what the action undoes, so there
    is no moment where the thing is done but nobody is there to undo it.
    """

    def __init__(self, action: dict, deadline: float | None = None,
                 start_timeout: float = 60.0) -> None:
        self.action = action
        self.released: tuple[bool, str] | None = None
        # a socket, not a pipe, towards the watchdog: a watchdog that already acted (its
        # deadline) has closed its end, and a send with MSG_NOSIGNAL then fails with EPIPE
        # instead of raising SIGPIPE (ignored by the CLI, but not by every embedder)
        self.sock, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "diskvault.source.watchdog", json.dumps(action),
                 "-" if deadline is None else repr(deadline)],
                stdin=theirs.fileno(), stdout=subprocess.PIPE, start_new_session=True,
                close_fds=True)
        except BaseException:
            self.sock.close()
            raise
        finally:
            theirs.close()
        assert self.proc.stdout is not None
        line = _read_line(self.proc.stdout.fileno(), start_timeout)
        if line != "ready":
            self.sock.close()
            self.proc.kill()
            self.proc.wait()
            raise OSError(f"the watchdog did not start ({line or 'no answer'})")

    def release(self, timeout: float = 600.0) -> tuple[bool, str]:
        """Have the watchdog act now; (ok, detail). Idempotent."""
        if self.released is not None:
            return self.released
        assert self.proc.stdout is not None
        try:
            self.sock.send(b"release\n", socket.MSG_NOSIGNAL)
        except OSError:
            pass  # it acted already (deadline) or died: its answer or our caller's fallback
        self.sock.close()
        line = _read_line(self.proc.stdout.fileno(), timeout)
        try:
            res = json.loads(line) if line else None
        except ValueError:
            res = None
        if res is None:
            self.proc.kill()
            self.released = (False, "the watchdog gave no answer")
        else:
            self.released = (bool(res["ok"]), str(res["detail"]))
        self.proc.stdout.close()
        self.proc.wait()
        return self.released


def _read_line(fd: int, timeout: float) -> str:
    """One line from ``fd`` within ``timeout`` seconds ("" on EOF or timeout)."""
    end = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = end - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return ""
        data = os.read(fd, 4096)
        if not data:
            return ""
        buf += data
    return buf.split(b"\n", 1)[0].decode(errors="replace")


def main(argv: list[str]) -> int:
    action = json.loads(argv[1])
    deadline = None if argv[2] == "-" else float(argv[2])
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, _on_signal)
    fd = None
    if "thaw" in action:
        fd = os.open(action["thaw"], os.O_RDONLY | os.O_DIRECTORY)
    out = os.fdopen(1, "w", buffering=1)
    try:
        out.write("ready\n")
    except OSError:
        pass
    why = _wait(deadline)
    # from here on, signals must not interrupt the undo itself
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    if fd is not None:
        ok, detail = thaw_fd(fd)
    else:
        # stdin of the command: not our socket (it must not read diskvault's protocol)
        r = subprocess.run(action["run"], shell=True, stdin=subprocess.DEVNULL,
                           stdout=sys.stderr, check=False)
        ok, detail = r.returncode == 0, f"exit code {r.returncode}"
    try:
        out.write(json.dumps({"ok": ok, "why": why, "detail": detail}) + "\n")
    except OSError:
        pass  # diskvault is gone: nobody to tell
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Who a process is, in terms that let another process judge later whether it is gone.

A pid means something only on its machine, during one boot, in one pid namespace: a
fleet has hosts of one name (cloned VMs, containers), and a record judged dead because
its pid is not running *here* would be removed under a live owner. So records written
for later judgement (repository locks, SFTP temporary files) carry the machine id, the
boot id and the pid namespace; a pid is judged only where all of them match, and with
its start time also a pid reused since is told apart from its first owner.
"""

from __future__ import annotations

import os


def read_id(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def node_identity() -> dict:
    """Where a pid means something: machine, boot and pid namespace ("" / 0: unknown)."""
    return {"machine": read_id("/etc/machine-id") or read_id("/var/lib/dbus/machine-id"),
            "boot": read_id("/proc/sys/kernel/random/boot_id"), "pidns": pid_namespace()}


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_start(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/PID/stat`` field 22);
    None if no such process runs (or /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces and ')'
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])  # field 22 counted from the state, field 3
    except (IndexError, ValueError):
        return None


def process_gone(pid: int, start: int | None) -> bool:
    """Whether the process ``pid`` that started at ``start`` (clock ticks since boot;
    None: not recorded) is provably gone: no such pid, or the pid now belongs to a
    process started at another time. A pid that /proc hides (``hidepid``) but that
    ``kill(pid, 0)`` finds is not gone: its start time cannot be compared."""
    if not pid_alive(pid):
        return True
    if start is None:
        return False
    now = process_start(pid)
    return now is not None and now != start

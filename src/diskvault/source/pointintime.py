"""One point in time for a backup of host files and images: pre/post commands, btrfs
snapshots, filesystem freezes — taken before the first byte is read, undone after.

Order (each undo in reverse, on every path out): ``--pre-command`` (e.g. ``virsh
suspend vm``), ``--snapshot btrfs`` (stale snapshots of dead runs removed first),
``--fsfreeze``; the backup reads; thaw, delete snapshots, ``--post-command``.

Guarantees: the post command runs whenever the pre command was started (also when it
failed: it may have done half its work) — on success, error, SIGTERM, and, through a
watchdog process armed before the pre command starts, after a SIGKILL of diskvault.
Freezes are thawed likewise (fsfreeze.py). A snapshot left by a SIGKILL is removed by
the next run on the same subvolume (btrfs_snap.py). SIGTERM/SIGHUP are turned into an
error while a point in time is held, so the ``finally`` clauses run.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType

from ..errors import DiskvaultError, HookError, SnapshotError, Warning_
from .btrfs_snap import Snapshots
from .fsfreeze import Freezes
from .paths import HARDLINK, Source, SourceOptions, archive_path, walk
from .watchdog import Watchdog


@dataclass
class PointInTimeOptions:
    snapshot: str | None = None  # "btrfs"
    fsfreeze: list[str] = field(default_factory=list)
    fsfreeze_timeout: float = 60.0
    pre_command: str | None = None
    post_command: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.snapshot or self.fsfreeze or self.pre_command or self.post_command)


class Terminated(DiskvaultError):
    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by {signal.Signals(signum).name}: nothing was stored")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


class PointInTime:
    """Context manager: ``with PointInTime(opts, paths, protect, warn) as pit: pit.path(p)``.

    ``warnings`` collects what went wrong while undoing (a failing post command, a
    snapshot that could not be deleted); ``finish()`` turns them into a Warning_ after a
    successful backup; after a failed one they go to ``warn`` (the CLI's log, so
    ``--log-json`` gets JSON lines) and the error stays.
    """

    def __init__(self, opts: PointInTimeOptions, paths: list[str],
                 protect: dict[str, str], warn: Callable[[str], None]) -> None:
        self.opts = opts
        self.warn = warn
        self.paths = paths
        self.protect = protect
        self.snaps = Snapshots()
        self.freezes = Freezes(opts.fsfreeze, opts.fsfreeze_timeout)
        self.post: Watchdog | None = None
        self.warnings: list[str] = []
        self.notes: list[str] = []
        self._old: dict[int, object] = {}

    # -- what the backup asks ------------------------------------------------

    def path(self, p: str) -> str:
        """Where to read ``p`` (its counterpart in a snapshot, or itself)."""
        return self.snaps.path_in(p) if self.snaps.taken else p

    def check(self) -> None:
        """Called before the archive is committed (CreateOptions.before_commit)."""
        self.freezes.check_deadline()

    # -- taking and undoing --------------------------------------------------

    def __enter__(self) -> PointInTime:
        # everything checked before anything is done: bad input changes nothing
        roots: list[str] = []
        if self.opts.snapshot is not None:
            if self.opts.snapshot != "btrfs":
                raise SnapshotError(f"--snapshot {self.opts.snapshot}: only btrfs is known")
            roots = self.snaps.check(self.paths)
        self.freezes.check(self.protect)
        if roots and self.freezes.mountpoints:
            from .fsfreeze import mount_of
            frozen = {mount_of(m)[1] for m in self.freezes.mountpoints}
            for r in roots:
                if mount_of(r)[1] in frozen:
                    raise SnapshotError(f"{r}: --snapshot btrfs and --fsfreeze of the same "
                                        "filesystem: a snapshot cannot be taken while "
                                        "frozen, and needs no freeze")
        for s in (signal.SIGTERM, signal.SIGHUP):
            self._old[s] = signal.signal(s, _terminate)
        try:
            self._take(roots)
        except BaseException:
            try:
                self._undo()
            finally:
                self._restore_signals()
            self._warn_all()  # a failed post command or snapshot removal is said too
            raise
        return self

    def _take(self, roots: list[str]) -> None:
        if self.opts.post_command:
            try:
                self.post = Watchdog({"run": self.opts.post_command})
            except OSError as e:
                raise HookError(f"cannot arm --post-command: {e}") from None
        if self.opts.pre_command:
            r = subprocess.run(self.opts.pre_command, shell=True, stdin=subprocess.DEVNULL,
                               stdout=sys.stderr, check=False)
            if r.returncode != 0:
                raise HookError(f"--pre-command failed with exit code {r.returncode}: "
                                "nothing was read")
        if roots:
            self.notes += [f"removed stale snapshot {s}" for s in self.snaps.clean_stale(roots)]
            self.snaps.take(roots)
        self.freezes.freeze()

    def _undo(self) -> None:
        self.warnings += [f"thaw failed: {e}" for e in self.freezes.thaw()]
        self.warnings += [f"snapshot not removed: {e}" for e in self.snaps.remove()]
        if self.post is not None:
            ok, detail = self.post.release()
            self.post = None
            if not ok:
                self.warnings.append(f"--post-command failed ({detail})")

    def _restore_signals(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._old.clear()

    def __exit__(self, exc_type, exc, tb) -> None:
        # a signal now would cut the undo short: the undo is what it would ask for anyway
        for s in self._old:
            signal.signal(s, signal.SIG_IGN)
        try:
            self._undo()
        finally:
            self._restore_signals()
        if exc is not None:
            self._warn_all()

    def _warn_all(self) -> None:
        """After an error: the undo's warnings now, as the error is what the user reads
        last (after a success finish() turns them into the command's warning)."""
        for w in self.warnings:
            self.warn(w)
        self.warnings.clear()

    def finish(self) -> None:
        """After a successful backup: warnings of the undo end it with exit code 1."""
        if self.warnings:
            raise Warning_("; ".join(self.warnings))


def walk_at(path: str, read_path: str, opts: SourceOptions) -> Iterator[Source]:
    """Walk ``read_path`` (a path's counterpart in a snapshot) but name the items as if
    ``path`` had been walked: archives keep the original paths."""
    shown, read = archive_path(path), archive_path(read_path)
    for src in walk([read_path], opts):
        src.item.path = _rebase(src.item.path, read, shown)
        if src.item.type == HARDLINK and src.item.target is not None:
            src.item.target = _rebase(src.item.target, read, shown)
        yield src


def _rebase(p: str, old: str, new: str) -> str:
    if p == old:
        return new
    if p.startswith(old + "/"):
        return new + p[len(old):]
    return p

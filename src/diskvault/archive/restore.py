"""Extracting an archive's items into a directory or to stdout (``extract``).

Content comes through ``extract.py`` (parallel fetch, sinks). Into a directory, every
path is *replaced, never followed*: whatever is there (a file, a symlink, a device
node — also one this extract just made) is unlinked and the file created anew with
O_EXCL, so an archive entry can never steer content into a device or out of the
target. Device nodes are created only when asked (``devices``); owners, then modes
(with setuid/setgid: chown first, as it clears them), then times are restored.
Writing a device's bytes onto a device is ``extract --stdout | dd`` or ``disk restore``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from ..errors import TargetError
from ..repository.repo import Repository
from ..source.paths import BLOCKDEV, CHARDEV, DIR, FIFO, FILE, HARDLINK, SYMLINK
from .extract import Damage, FileSink, StreamSink, create_file, iter_pieces
from .model import Item


def extract_stdout(repo: Repository, items: list[Item], fd: int, workers: int = 2,
                   progress: Callable[[int], None] | None = None,
                   damage: list[Damage] | None = None) -> int:
    """Write the items' contents, concatenated, to ``fd``; with a ``damage`` list,
    unreadable ranges become zeros and are recorded there instead of stopping."""
    sink = StreamSink(fd)
    done = 0
    for piece in iter_pieces(repo, items, workers, damage=damage):
        sink.write(piece)
        done += piece.length
        if progress:
            progress(done)
    return done


def _inside(root: str, full: str) -> bool:
    return full == root or full.startswith(root.rstrip("/") + "/")


def _safe_join(root: str, path: str) -> str:
    """The target path of an item, refusing any that would land outside ``root``.

    Checks the text and, since a directory on the way may be a symlink (in the target
    already, or from the archive), where the parent directory really is.
    """
    full = os.path.normpath(os.path.join(root, path))
    if full == root:  # "." (``create .``): the target directory itself
        return full
    if not _inside(root, full) or not _inside(os.path.realpath(root),
                                              os.path.realpath(os.path.dirname(full))):
        raise TargetError(f"refusing to extract {path!r} outside the target directory")
    return full


def _ensure_dir(root: str, rel: str) -> str:
    """Create ``root/rel`` directory by directory, never through a symlink."""
    path = root
    for part in os.path.normpath(rel).split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise TargetError(f"refusing to extract {rel!r} outside the target directory")
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            try:
                os.mkdir(path)
            except OSError as e:
                raise TargetError(f"{path}: cannot create directory: {e.strerror}") from None
            continue
        if stat.S_ISLNK(st.st_mode):
            # a link of the target's own (say /home → /data/home when restoring to /) is
            # followed only while it stays inside the target; archive links come last
            real = os.path.realpath(path)
            if os.path.isdir(real) and _inside(os.path.realpath(root), real):
                continue
            raise TargetError(f"{path}: is a symlink leading out of the target; "
                              "refusing to extract through it")
        if not stat.S_ISDIR(st.st_mode):
            raise TargetError(f"{path}: not a directory, but the archive has one there")
    return path


def extract_tree(repo: Repository, items: list[Item], root: str, sparse: bool = False,
                 workers: int = 2, numeric_ids: bool = False,
                 progress: Callable[[int], None] | None = None, devices: bool = False,
                 damage: list[Damage] | None = None) -> list[str]:
    """Restore ``items`` below ``root``; return the paths of device nodes not created
    (``devices`` is False). With a ``damage`` list, unreadable ranges become zeros."""
    root = os.path.abspath(root)
    skipped: list[str] = []
    dirs: list[tuple[str, Item]] = []
    done = 0
    content_items: list[tuple[Item, str]] = []
    links: list[tuple[str, Item]] = []
    symlinks: list[tuple[str, Item]] = []
    for item in items:
        if item.type == DIR:
            path = _safe_join(root, item.path)
            _ensure_dir(root, item.path)
            dirs.append((path, item))
            continue
        path = _safe_join(root, item.path)
        _ensure_dir(root, os.path.dirname(os.path.normpath(item.path)))
        if item.type == FILE:
            content_items.append((item, path))
        elif item.type == SYMLINK:
            # last of all: no later item may be written through a link from the archive
            symlinks.append((path, item))
        elif item.type == HARDLINK:
            links.append((path, item))  # after the content of their master file
        elif item.type in (BLOCKDEV, CHARDEV) and not devices:
            skipped.append(item.path)
        elif item.type in (BLOCKDEV, CHARDEV, FIFO):
            _replace(path)
            try:
                if item.type == FIFO:
                    os.mkfifo(path, stat.S_IMODE(item.mode))
                else:
                    os.mknod(path, item.mode, item.rdev or 0)
            except OSError as e:
                raise TargetError(f"{path}: cannot create {item.type}: {e.strerror}") from None
            _apply_meta(path, item, numeric_ids)
    # content: files in order, pieces streamed across files so fetching never stalls
    open_file: tuple[Item, int, FileSink, str] | None = None
    paths = {id(i): p for i, p in content_items}

    def close_current() -> None:
        nonlocal open_file
        if open_file is None:
            return
        item, fd, sink, path = open_file
        open_file = None
        try:
            sink.finish(item.size)
            # through the descriptor: the inode we created, whatever the path is now
            _apply_meta(fd, item, numeric_ids, what=path)
        finally:
            os.close(fd)

    def open_item(item: Item) -> None:
        nonlocal open_file
        path = paths[id(item)]
        _replace(path)
        fd, sink = create_file(path, sparse)
        open_file = (item, fd, sink, path)

    try:
        for piece in iter_pieces(repo, [i for i, _ in content_items], workers,
                                 damage=damage):
            if open_file is None or open_file[0] is not piece.item:
                close_current()
                open_item(piece.item)
            assert open_file is not None
            open_file[2].write(piece)
            done += piece.length
            if progress:
                progress(done)
        close_current()
        for item, _path in content_items:  # empty files have no pieces
            if not item.size:
                open_item(item)
                close_current()
    finally:
        if open_file is not None:
            os.close(open_file[1])
    for path, item in links:
        _replace(path)
        try:
            os.link(_safe_join(root, item.target or ""), path, follow_symlinks=False)
        except OSError as e:
            raise TargetError(f"{path}: cannot create hard link: {e.strerror}") from None
    for path, item in symlinks:
        _safe_join(root, item.path)  # its directory may have become a link meanwhile
        _replace(path)
        try:
            os.symlink(item.target or "", path)
        except OSError as e:
            raise TargetError(f"{path}: cannot create symlink: {e.strerror}") from None
        _apply_meta(path, item, numeric_ids, follow=False)
    for path, item in reversed(dirs):  # after their content, or mtimes would change again
        _apply_meta(path, item, numeric_ids)
    return skipped


def _replace(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise TargetError(f"{path}: a directory is in the way")
    os.unlink(path)


def _apply_meta(target: int | str, item: Item, numeric_ids: bool, follow: bool = True,
                what: str | None = None) -> None:
    """Owner, xattrs, mode, times of ``target`` (a path, or a descriptor of a file we
    created). The owner goes first: chown clears setuid/setgid, chmod then sets them."""
    kw: dict = {} if follow else {"follow_symlinks": False}
    try:
        if os.geteuid() == 0 and item.uid is not None:
            uid, gid = item.uid, item.gid if item.gid is not None else -1
            if not numeric_ids:
                import grp
                import pwd
                try:
                    uid = pwd.getpwnam(item.user).pw_uid if item.user else uid
                except KeyError:
                    pass
                try:
                    gid = grp.getgrnam(item.group).gr_gid if item.group else gid
                except KeyError:
                    pass
            os.chown(target, uid, gid, **kw)
        if item.xattrs:
            for k, v in item.xattrs.items():
                try:
                    os.setxattr(target, k, v, **kw)
                except OSError:
                    pass
        if follow:
            os.chmod(target, stat.S_IMODE(item.mode))
        if item.mtime is not None:
            os.utime(target, ns=(item.atime or item.mtime, item.mtime), **kw)
    except OSError as e:
        raise TargetError(f"{what or target}: cannot set metadata: {e.strerror}") from None

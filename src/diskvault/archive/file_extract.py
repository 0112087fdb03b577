"""One file (or directory) out of a filesystem inside an item, without mounting.

``extract REPO::A disk/part2.files/etc/fstab`` uses the path the mount shows
(``namespace``): the item's bytes come through the archive's item readers, the file
through The Sleuth Kit. Files land at that same path below the target directory, with
the owners, modes and times the filesystem keeps; ``--stdout`` writes their contents.
Every path is resolved before anything is written: a wrong one writes nothing.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Iterator

from ..errors import IntegrityError, TargetError, UsageError
from ..repository.repo import Repository
from .extract import _pwrite_all, _write_all
from .fstree import FsReadError
from .model import DIR, SYMLINK
from .namespace import FILES_SUFFIX, ArchiveTree, Node
from .reader import open_archive_readers
from .restore import _ensure_dir
from .view import ArchiveView

PIECE = 4 << 20
_GLOB = set("*?[")


def files_paths(item_paths: set[str], paths: list[str]) -> list[str]:
    """The ``paths`` that name something inside an ``ITEM.files`` tree (not real items)."""
    out = []
    for p in paths:
        comps = p.strip("/").split("/")
        for i, comp in enumerate(comps):
            if not comp.endswith(FILES_SUFFIX) or len(comp) == len(FILES_SUFFIX):
                continue
            here = "/".join(comps[: i + 1])
            if here in item_paths:
                continue  # a real item named X.files
            if here[: -len(FILES_SUFFIX)] in item_paths:
                out.append(p)
            break
    return out


def _expand(tree: ArchiveTree, pattern: str) -> list[str]:
    """Paths matching ``pattern``: shell globs per component (``*``, ``?``, ``[..]``)."""
    parts = pattern.strip("/").split("/")
    found = [""]
    for comp in parts:
        nxt = []
        for base in found:
            if not _GLOB & set(comp):
                nxt.append(f"{base}/{comp}".lstrip("/"))
                continue
            try:
                names = tree.listdir(base)
            except (FileNotFoundError, NotADirectoryError):
                continue
            nxt += [f"{base}/{n}".lstrip("/") for n in sorted(names)
                    if fnmatch.fnmatchcase(n, comp)]
        found = nxt
    return found


def _walk(tree: ArchiveTree, path: str, node: Node) -> Iterator[tuple[str, Node]]:
    yield path, node
    if node.is_dir:
        for name, child in sorted(tree.listdir(path).items()):
            if name in ("", ".", "..") or "/" in name:
                raise IntegrityError(f"{path}: the filesystem holds a bad name {name!r}")
            yield from _walk(tree, f"{path}/{name}", child)


def _resolve(tree: ArchiveTree, patterns: list[str], notes: list[str]
             ) -> list[tuple[str, Node]]:
    chosen: list[tuple[str, Node]] = []
    for pat in patterns:
        paths = _expand(tree, pat) if _GLOB & set(pat) else [pat.strip("/")]
        hits = []
        for p in paths:
            try:
                hits.append((p, tree.lookup(p)))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except FsReadError as e:
                raise IntegrityError(f"{p}: {e}") from None
        if not hits:
            why = [n for n in notes if pat.strip("/").startswith(n.split(": ", 1)[0])]
            raise UsageError(f"{pat}: no such file in the archive"
                             + (f" ({why[0]})" if why else ""))
        chosen += hits
    return chosen


def _chunks(node: Node, path: str) -> Iterator[bytes]:
    assert node.tree is not None and node.entry is not None
    off = 0
    while off < node.size:
        try:
            data = node.tree.read(node.entry, off, min(PIECE, node.size - off))
        except FsReadError as e:
            raise IntegrityError(f"{path}: cannot be read from the backup: {e}") from None
        yield data
        off += len(data)


def extract_files(repo: Repository, archive: str, patterns: list[str], root: str | None,
                  stdout_fd: int | None = None, numeric_ids: bool = True) -> int:
    """Extract files inside filesystems; returns the number of files written."""
    view = ArchiveView.open(repo, archive)
    with open_archive_readers(repo, archive) as readers:
        notes: list[str] = []  # why an item has no file tree (XFS: only the mount)
        tree = ArchiveTree(view.items, dict(readers.items), readers.disk, log=notes.append)
        try:
            todo = [w for p, n in _resolve(tree, patterns, notes) for w in _walk(tree, p, n)]
        except FsReadError as e:
            raise IntegrityError(str(e)) from None
        if stdout_fd is not None:
            n = 0
            for path, node in todo:
                if node.type != DIR and node.tree is not None:
                    for data in _chunks(node, path):
                        _write_all(stdout_fd, data, "stdout")
                    n += 1
            return n
        assert root is not None
        return _to_tree(todo, root)


def _to_tree(todo: list[tuple[str, Node]], root: str) -> int:
    links: dict[tuple[int, int], str] = {}  # (tree, inode) → first path: hard links
    dirs: list[tuple[str, Node]] = []
    n = 0
    for path, node in todo:
        if node.tree is None:  # the ITEM.files root of a partitioned image: a plain dir
            _ensure_dir(root, path)
            continue
        if node.is_dir:
            dirs.append((_ensure_dir(root, path), node))
            continue
        parent = _ensure_dir(root, os.path.dirname(path))
        full = os.path.join(parent, os.path.basename(path))
        if os.path.lexists(full) and not os.path.isdir(full):
            os.unlink(full)
        assert node.entry is not None
        key = (id(node.tree), node.entry.ino)
        if node.nlink > 1 and key in links:
            os.link(links[key], full)
            continue
        if node.type == SYMLINK:
            os.symlink(node.target or "", full)
        else:
            _write_file(full, node, path)
            n += 1
        links[key] = full
        _set_meta(full, node)
    for full, node in reversed(dirs):
        _set_meta(full, node)
    return n


def _write_file(full: str, node: Node, path: str) -> None:
    try:
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise TargetError(f"{full}: cannot create: {e.strerror}") from None
    try:
        off = 0
        for data in _chunks(node, path):
            _pwrite_all(fd, data, off, full)
            off += len(data)
    finally:
        os.close(fd)


def _set_meta(full: str, node: Node) -> None:
    follow = node.type != SYMLINK
    try:
        if os.geteuid() == 0:
            os.chown(full, node.uid, node.gid, follow_symlinks=follow)
        if follow:
            os.chmod(full, stat.S_IMODE(node.mode))
        os.utime(full, ns=(node.atime_ns or node.mtime_ns, node.mtime_ns),
                 follow_symlinks=follow)
    except OSError as e:
        raise TargetError(f"{full}: cannot set metadata: {e.strerror}") from None

"""One naming scheme for what an archive shows: mount, extract and NBD exports.

Inside one archive (``MOUNTPOINT/ARCHIVE/`` or ``MOUNTPOINT/`` with ``REPO::ARCHIVE``):

- every item at its path: directory trees as trees; content items (files, images,
  devices, partitions, streams) as regular files (``disk/part2``, ``vm.img``);
- ``disk.img``: the whole disk of a whole-disk archive (its items concatenated);
- ``ITEM.files/``: the files inside an item holding a filesystem
  (``disk/part2.files/etc/fstab``); an item with a partition table gets one tree per
  partition (``vm.img.files/part1/etc/fstab``). Read-only.

The same path works in ``extract`` (``extract REPO::A disk/part2.files/etc/fstab``) and
names NBD exports (``disk.img``, ``disk/part2``). A real item named ``X.files`` wins over
the tree of item ``X``.
"""

from __future__ import annotations

import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .fstree import ByteSource, FsEntry, FsTree
from .innerfs import KERNEL, PARTS, TSK, Inner, inspect
from .model import DIR, FILE, HARDLINK, SYMLINK, Item
from .reader import DISK_EXPORT

FILES_SUFFIX = ".files"
# regular files from directory trees are probed for a filesystem (which costs a chunk
# read each) when listed only if named like images; ITEM.files of any file still works
IMAGE_SUFFIXES = (".img", ".raw", ".dd", ".bin", ".iso", ".image", ".disk", ".part",
                  ".ext2", ".ext3", ".ext4", ".ntfs", ".vfat", ".fat", ".xfs", ".btrfs")
DISK_IMG = DISK_EXPORT
DIR_MODE = stat.S_IFDIR | 0o755
TREE_MODE = stat.S_IFDIR | 0o555  # file trees are read-only


def files_name(name: str) -> str:
    return name + FILES_SUFFIX


def has_files_part(path: str) -> bool:
    """Does a path name something inside an ``ITEM.files/`` tree (extract routes those)?"""
    return any(c.endswith(FILES_SUFFIX) and len(c) > len(FILES_SUFFIX)
               for c in path.strip("/").split("/"))


@dataclass
class Node:
    """One entry as a user sees it (stat fields, and where its bytes come from)."""

    type: str  # model.DIR, FILE, SYMLINK, or a special item type
    mode: int
    size: int = 0
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    nlink: int = 1
    target: str | None = None
    rdev: int = 0
    xattrs: dict[bytes, bytes] | None = None
    content: ByteSource | None = None  # a content item (or the whole disk)
    tree: FsTree | None = None  # a file or directory inside a filesystem ...
    entry: FsEntry | None = None  # ... and its TSK entry
    inner: Inner | None = None  # the root of an ITEM.files tree (or of one partition)
    fs_path: str = ""  # its path inside that filesystem
    kernel: tuple[str, Inner] | None = None  # (content item path, fs): kernel-mounted
    note: str | None = None

    @property
    def is_dir(self) -> bool:
        return self.type == DIR


def _item_node(item: Item, content: ByteSource | None) -> Node:
    mode = item.mode
    if content is not None:  # devices, partitions, streams: shown as regular files
        mode = stat.S_IFREG | (stat.S_IMODE(mode) or 0o600)
    mtime = item.mtime or 0
    size = content.size if content is not None else item.size
    if item.type == SYMLINK:
        size = len((item.target or "").encode("utf-8", "surrogateescape"))
    return Node(type=FILE if content is not None else item.type, mode=mode, size=size,
                uid=item.uid or 0, gid=item.gid or 0, atime_ns=item.atime or mtime,
                mtime_ns=mtime, ctime_ns=item.ctime or mtime, target=item.target,
                rdev=item.rdev or 0, xattrs=item.xattrs, content=content)


def _fs_node(tree: FsTree, e: FsEntry, fs_path: str) -> Node:
    return Node(type=e.type, mode=e.mode, size=e.size if e.type != DIR else 0, uid=e.uid,
                gid=e.gid, atime_ns=e.atime_ns, mtime_ns=e.mtime_ns, ctime_ns=e.ctime_ns,
                nlink=e.nlink, target=e.target, tree=tree, entry=e, fs_path=fs_path)


class ArchiveTree:
    """The namespace of one archive: lookups and listings by path ("" is the root).

    Items come from the archive metadata; ``readers`` serve content items by path and
    ``disk`` the whole disk. ``.files`` trees are probed when first looked at.
    """

    def __init__(self, items: list[Item], readers: dict[str, ByteSource],
                 disk: ByteSource | None = None, mtime_ns: int = 0,
                 log: Callable[[str], None] | None = None, kernel: bool = False) -> None:
        self.readers = readers
        self.kernel = kernel  # will the caller kernel-mount what TSK cannot read?
        self.log = log or (lambda msg: None)
        self.mtime_ns = mtime_ns
        self._lock = threading.Lock()
        self._nodes: dict[str, Node] = {}
        self._children: dict[str, dict[str, str]] = {"": {}}
        self._inner: dict[str, tuple[Inner | None, str | None]] = {}
        self._hardlinks: dict[str, int] = {}
        self._fs_hint: dict[str, str | None] = {}  # content items worth probing when listed
        for item in items:
            if item.type == HARDLINK and item.target:
                self._hardlinks[item.target] = self._hardlinks.get(item.target, 1) + 1
        # hard links last: their master is then known whatever the order in the archive
        for item in sorted(items, key=lambda i: i.type == HARDLINK):
            self._add(item)
        if disk is not None and DISK_IMG not in self._children[""]:
            self._children[""][DISK_IMG] = DISK_IMG
            self._nodes[DISK_IMG] = Node(FILE, stat.S_IFREG | 0o600, disk.size,
                                         mtime_ns=mtime_ns, atime_ns=mtime_ns,
                                         ctime_ns=mtime_ns, content=disk)

    # --- building -----------------------------------------------------------------

    def _add(self, item: Item) -> None:
        path = item.path.strip("/")
        if not path:
            return
        self._dir(path.rpartition("/")[0])
        if item.type == HARDLINK and item.target in self._nodes:
            master = self._nodes[item.target]
            node = master  # the same node: same content and metadata
        else:
            node = _item_node(item, self.readers.get(item.path))
            node.nlink = self._hardlinks.get(path, 1)
            if node.content is not None and (item.source != FILE or item.fs
                                             or path.lower().endswith(IMAGE_SUFFIXES)):
                self._fs_hint[path] = item.fs
        if path in self._nodes and self._nodes[path].is_dir and node.is_dir:
            self._nodes[path] = node  # a synthetic parent gets the real metadata
            return
        self._nodes[path] = node
        parent, _, name = path.rpartition("/")
        self._children[parent][name] = path
        if node.is_dir:
            self._children.setdefault(path, {})

    def _dir(self, path: str) -> None:
        if path in self._children:
            return
        self._dir(path.rpartition("/")[0])
        self._children[path] = {}
        self._nodes[path] = Node(DIR, DIR_MODE, mtime_ns=self.mtime_ns,
                                 atime_ns=self.mtime_ns, ctime_ns=self.mtime_ns)
        parent, _, name = path.rpartition("/")
        self._children[parent][name] = path

    def root(self) -> Node:
        return Node(DIR, DIR_MODE, mtime_ns=self.mtime_ns, atime_ns=self.mtime_ns,
                    ctime_ns=self.mtime_ns)

    # --- .files trees -------------------------------------------------------------

    def inner(self, item_path: str) -> tuple[Inner | None, str | None]:
        """What ``ITEM.files`` of a content item holds (probed once, then remembered)."""
        with self._lock:
            if item_path in self._inner:
                return self._inner[item_path]
        node = self._nodes.get(item_path)
        if node is None or node.content is None or item_path == DISK_IMG:
            # the whole disk's partitions are items of their own, with their own trees
            found: tuple[Inner | None, str | None] = (None, None)
        else:
            found = self._without_kernel(*inspect(node.content, self._fs_hint.get(item_path)))
            if found[1]:
                self.log(f"{item_path}{FILES_SUFFIX}: {found[1]}")
        with self._lock:
            return self._inner.setdefault(item_path, found)

    def _without_kernel(self, inner: Inner | None, note: str | None
                        ) -> tuple[Inner | None, str | None]:
        if self.kernel or inner is None:
            return inner, note
        why = "read-only kernel mount only when mounting one archive (REPO::ARCHIVE)"
        if inner.kind == KERNEL:
            return None, f"no file tree: {inner.fs_type}: {why}"
        if inner.kind == PARTS:
            kept = {k: v for k, v in inner.parts.items() if v.kind != KERNEL}
            if len(kept) != len(inner.parts):
                note = f"{note or ''}; some partitions have no file tree ({why})".lstrip("; ")
            if not kept:
                return None, note
            inner.parts = kept
        return inner, note

    def _inner_node(self, item_path: str, inner: Inner) -> Node:
        base = self._nodes[item_path]
        node = Node(DIR, TREE_MODE, mtime_ns=base.mtime_ns, atime_ns=base.mtime_ns,
                    ctime_ns=base.mtime_ns, nlink=2, inner=inner)
        if inner.kind == TSK and inner.tree is not None:
            root = inner.tree.root()
            node.mode = (root.mode & ~0o222) | stat.S_IFDIR
            node.uid, node.gid = root.uid, root.gid
            node.tree, node.entry = inner.tree, root
        elif inner.kind == KERNEL:
            node.kernel = (item_path, inner)
        return node

    def _files_node(self, item_path: str, rest: list[str]) -> Node:
        inner, _ = self.inner(item_path)
        if inner is None:
            raise FileNotFoundError(item_path + FILES_SUFFIX)
        if inner.kind == PARTS:
            if not rest:
                return self._inner_node(item_path, inner)
            part = inner.parts.get(rest[0])
            if part is None:
                raise FileNotFoundError(rest[0])
            inner, rest = part, rest[1:]
        if not rest:
            return self._inner_node(item_path, inner)
        if inner.kind != TSK or inner.tree is None:
            raise FileNotFoundError("/".join(rest))  # a kernel mount covers it
        rel = "/".join(rest)
        return _fs_node(inner.tree, inner.tree.lookup(rel), rel)

    # --- lookups ------------------------------------------------------------------

    def lookup(self, path: str) -> Node:
        """The node at ``path``; FileNotFoundError if there is none."""
        path = path.strip("/")
        if not path:
            return self.root()
        node = self._nodes.get(path)
        if node is not None:
            return node
        parts = path.split("/")
        for i, comp in enumerate(parts):
            if comp.endswith(FILES_SUFFIX) and len(comp) > len(FILES_SUFFIX):
                item_path = "/".join(parts[:i] + [comp[: -len(FILES_SUFFIX)]])
                if item_path in self._nodes and self._nodes[item_path].content is not None:
                    return self._files_node(item_path, parts[i + 1 :])
            if "/".join(parts[: i + 1]) not in self._nodes:
                break
        raise FileNotFoundError(path)

    def listdir(self, path: str) -> dict[str, Node]:
        """The entries of a directory by name; NotADirectoryError / FileNotFoundError."""
        path = path.strip("/")
        node = self.lookup(path)
        if not node.is_dir:
            raise NotADirectoryError(path)
        if node.inner is not None and node.inner.kind == PARTS:
            item_path = path[: -len(FILES_SUFFIX)]
            return {name: self._inner_node(item_path, part)
                    for name, part in node.inner.parts.items()}
        if node.tree is not None:
            tree, rel = node.tree, node.fs_path
            return {n: _fs_node(tree, e, f"{rel}/{n}".lstrip("/"))
                    for n, e in tree.listdir(rel).items()}
        if node.kernel is not None or node.inner is not None:
            return {}
        out: dict[str, Node] = {}
        for name, child in self._children.get(path, {}).items():
            out[name] = self._nodes[child]
        for name, child in list(self._children.get(path, {}).items()):
            fname = files_name(name)
            if child not in self._fs_hint or fname in out:
                continue
            inner, _ = self.inner(child)
            if inner is not None:
                out[fname] = self._inner_node(child, inner)
        return out

    def kernel_mounts(self) -> list[tuple[str, Inner, str]]:
        """(content item path, filesystem, path of its tree) for each kernel-mounted tree
        found so far (call after ``listdir`` of the directories wanted)."""
        out = []
        with self._lock:
            found = list(self._inner.items())
        for item_path, (inner, _) in found:
            if inner is None:
                continue
            if inner.kind == KERNEL:
                out.append((item_path, inner, files_name(item_path)))
            for name, part in inner.parts.items():
                if part.kind == KERNEL:
                    out.append((item_path, part, f"{files_name(item_path)}/{name}"))
        return out

    def probe_all(self) -> None:
        """Look at every item listings show a tree for (kernel mounts, notes up front)."""
        for path in list(self._fs_hint):
            self.inner(path)

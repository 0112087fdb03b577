"""extract never writes content through a node it did not create for that content.

The hostile archives are built with the project's own ArchiveBuilder and crafted items:
a block device entry and a file entry at the same path (the device node would be made,
then the file's bytes written into the host's device), and a plain file over a device
node that already sits in the target. The device is a real loop device whose content
is hashed before and after.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace

from support import dv, init_repo, loop_device, needs_loop, needs_root, sha256_file

from diskvault.archive.create import ArchiveBuilder, CreateOptions
from diskvault.archive.model import BLOCKDEV, CHARDEV, Item
from diskvault.repository.repo import Repository
from diskvault.source.paths import SourceOptions, walk
from diskvault.storage.local import LocalStore

MIB = 1 << 20


def _build(repo: str, name: str, entries: list[tuple[Item, str | None]]) -> None:
    """Commit an archive of ``entries``: (item, path of a file giving its content)."""
    with Repository.open(LocalStore(repo), lambda _c: "") as r:
        b = ArchiveBuilder(r, CreateOptions())
        try:
            for item, content_from in entries:
                if content_from is None:
                    b.add(item)
                    continue
                (src,) = list(walk([content_from], SourceOptions()))
                try:
                    b.add(replace(Item(**vars(src.item)), path=item.path, mode=item.mode),
                          src.content)
                finally:
                    if src.close:
                        src.close()
            b.commit(name)
        finally:
            b.close()


def _victim(tmp_path) -> str:
    img = tmp_path / "victim.img"
    img.write_bytes(os.urandom(4 * MIB))
    return str(img)


@needs_loop
def test_device_entry_then_file_entry_never_writes_into_the_device(tmp_path):
    repo = str(tmp_path / "repo")
    init_repo(repo, "none")
    payload = tmp_path / "payload"
    payload.write_bytes(b"attacker's bytes " * 4096)
    with loop_device(_victim(tmp_path)) as dev:
        before = sha256_file(dev)
        rdev = os.stat(dev).st_rdev
        node = Item(path="x/victim", type=BLOCKDEV, mode=stat.S_IFBLK | 0o600, rdev=rdev)
        _build(repo, "evil", [(node, None), (Item(path="x/victim"), str(payload))])
        for opts in ([], ["--devices"]):  # with --devices the node is made first
            dest = tmp_path / f"dest{len(opts)}"
            dest.mkdir()
            r = dv("extract", *opts, f"{repo}::evil", cwd=str(dest), check=False)
            assert r.returncode in (0, 1) and b"Traceback" not in r.stderr, r.stderr
            assert sha256_file(dev) == before, "the device was written to"
            out = dest / "x" / "victim"
            assert stat.S_ISREG(os.lstat(out).st_mode)
            assert out.read_bytes() == payload.read_bytes()


@needs_loop
def test_device_node_already_in_the_target_is_replaced_not_written(tmp_path):
    repo = str(tmp_path / "repo")
    env = init_repo(repo, "none")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(300000))
    dv("create", f"{repo}::a", "f", env=env, cwd=str(src))
    with loop_device(_victim(tmp_path)) as dev:
        before = sha256_file(dev)
        dest = tmp_path / "dest"
        dest.mkdir()
        os.mknod(dest / "f", stat.S_IFBLK | 0o600, os.stat(dev).st_rdev)
        dv("extract", f"{repo}::a", env=env, cwd=str(dest))
        assert sha256_file(dev) == before, "the device was written to"
        assert stat.S_ISREG(os.lstat(dest / "f").st_mode)
        assert sha256_file(str(dest / "f")) == sha256_file(str(src / "f"))


@needs_root
def test_device_nodes_only_with_devices_option(tmp_path):
    repo = str(tmp_path / "repo")
    env = init_repo(repo, "none")
    src = tmp_path / "src"
    src.mkdir()
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(src / "null", 0o666)  # past the umask
    (src / "plain").write_bytes(b"x")
    dv("create", f"{repo}::d", ".", env=env, cwd=str(src))
    dest = tmp_path / "without"
    dest.mkdir()
    r = dv("extract", f"{repo}::d", env=env, cwd=str(dest), check=False)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert err.count("\n") == 1 and "--devices" in err and "null" in err, err
    assert not os.path.lexists(dest / "null") and (dest / "plain").read_bytes() == b"x"
    dest = tmp_path / "with"
    dest.mkdir()
    dv("extract", "--devices", f"{repo}::d", env=env, cwd=str(dest))
    st = os.lstat(dest / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666
    # the archive item is a chardev: list says so
    assert CHARDEV in dv("list", "--format", "{type} {path}{NL}", f"{repo}::d",
                         env=env).stdout.decode()


@needs_root
def test_owner_then_setuid_restored_as_root(tmp_path):
    repo = str(tmp_path / "repo")
    env = init_repo(repo, "none")
    src = tmp_path / "src"
    src.mkdir()
    f = src / "tool"
    f.write_bytes(b"#!/bin/sh\n")
    os.chown(f, 4321, 4322)
    os.chmod(f, 0o6755)  # after chown: chown clears setuid/setgid
    dv("create", f"{repo}::s", "tool", env=env, cwd=str(src))
    for opts in ([], ["--numeric-ids"]):
        dest = tmp_path / f"d{len(opts)}"
        dest.mkdir()
        dv("extract", *opts, f"{repo}::s", env=env, cwd=str(dest))
        st = os.lstat(dest / "tool")
        assert (st.st_uid, st.st_gid) == (4321, 4322)
        assert stat.S_IMODE(st.st_mode) == 0o6755

"""Every command, run as a user would, against a repository on S3 (SeaweedFS) and SFTP.

Each restore is compared byte for byte with its source.
"""

from __future__ import annotations

import json
from pathlib import Path

from remote.conftest import file_sha, partitioned_image, random_file, restored_sha
from support import dv, init_repo, loop_device, make_vm_image, needs_loop


def archive_names(location: str) -> set[str]:
    return {a["name"] for a in json.loads(dv("list", "--json", location).stdout)["archives"]}


def test_every_command_end_to_end(remote_url: str, tmp_path: Path) -> None:
    init_repo(remote_url, "repokey", "--pack-size", "1MiB")
    img = tmp_path / "vm.img"
    make_vm_image(str(img), 24)
    stream = random_file(tmp_path / "stream.bin", 3 << 20, seed=1)
    disk = partitioned_image(tmp_path / "disk.img")

    st = json.loads(dv("create", "--json", "--upload-connections", "3",
                       f"{remote_url}::vm", str(img)).stdout)["archive"]["stats"]
    assert st["new_stored"] > 4 << 20  # many 1 MiB packs went up through 3 connections
    dv("create", "--stdin-name", "stream.bin", f"{remote_url}::stream", "-",
       input=stream.read_bytes())
    dv("disk", "backup", "--upload-connections", "2", f"{remote_url}::disk", str(disk))
    assert archive_names(remote_url) == {"vm", "stream", "disk"}

    assert restored_sha(f"{remote_url}::vm") == file_sha(img)
    assert restored_sha(f"{remote_url}::stream") == file_sha(stream)
    out = tmp_path / "tree"
    out.mkdir()
    dv("extract", f"{remote_url}::vm", cwd=str(out))
    assert file_sha(out / str(img).lstrip("/")) == file_sha(img)
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(disk.stat().st_size)
    dv("disk", "restore", f"{remote_url}::disk", str(target))
    assert file_sha(target) == file_sha(disk)

    assert str(img).lstrip("/") in dv("list", f"{remote_url}::vm").stdout.decode()
    assert "Archive name: vm" in dv("info", f"{remote_url}::vm").stdout.decode()
    dv("rename", f"{remote_url}::stream", "stream-renamed")
    assert archive_names(remote_url) == {"vm", "stream-renamed", "disk"}
    assert restored_sha(f"{remote_url}::stream-renamed") == file_sha(stream)
    dv("delete", f"{remote_url}::stream-renamed")
    dv("prune", "--keep-last", "1", remote_url)  # the newest, "disk", stays
    assert archive_names(remote_url) == {"disk"}
    freed = dv("compact", remote_url).stdout.decode()
    assert "freed" in freed and " 0 B " not in freed
    check = dv("check", "--verify-data", remote_url).stdout.decode()
    assert "no problems found" in check
    # what compact kept is whole, and the repository takes new backups
    target.unlink()
    with open(target, "wb") as f:
        f.truncate(disk.stat().st_size)
    dv("disk", "restore", f"{remote_url}::disk", str(target))
    assert file_sha(target) == file_sha(disk)
    dv("create", f"{remote_url}::vm-again", str(img))
    assert restored_sha(f"{remote_url}::vm-again") == file_sha(img)


@needs_loop
def test_block_devices_over_the_network(remote_url: str, tmp_path: Path) -> None:
    init_repo(remote_url, "repokey", "--pack-size", "1MiB")
    disk = partitioned_image(tmp_path / "disk.img")
    with loop_device(str(disk), read_only=True) as dev:
        dv("create", "--read-special", f"{remote_url}::raw", dev)
        dv("disk", "backup", f"{remote_url}::disk", dev)
    assert restored_sha(f"{remote_url}::raw") == file_sha(disk)
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(disk.stat().st_size)
    with loop_device(str(target)) as dev:
        dv("disk", "restore", f"{remote_url}::disk", dev)
    assert file_sha(target) == file_sha(disk)

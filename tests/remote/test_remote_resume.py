"""An interrupted backup over S3 resumes: what landed is not uploaded again.

The packs a killed ``create`` managed to store have no index segment; the next run
lists them and reads only their tables of contents (two ranged GETs each), so their
chunks count as stored. Requests are counted by a proxy between diskvault and
SeaweedFS, so the process under test is the real CLI.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import time
import uuid
from pathlib import Path

from remote.conftest import file_sha, random_file, restored_sha
from remote.proxy import counting_proxy
from support import DV, dv, init_repo

from diskvault.repository.pack import read_toc
from diskvault.repository.repo import Repository
from diskvault.storage.url import open_store

CHUNKER = "fastcdc,65536,262144,1048576"  # ~256 KiB chunks: 1 MiB packs hold ~4


def proxied_url(server, proxy, prefix: str) -> str:
    return f"s3:{server.access_key}:{server.secret_key}@{proxy.endpoint}/{server.bucket}/{prefix}"


def stored_packs(server, prefix: str) -> dict[str, int]:
    pages = server.client().get_paginator("list_objects_v2").paginate(
        Bucket=server.bucket, Prefix=f"{prefix}/packs/")
    return {o["Key"].rsplit("/", 1)[-1]: o["Size"] for p in pages for o in p.get("Contents", ())}


def wait_for_packs(server, prefix: str, at_least: int, timeout: float = 60) -> int:
    """Wait until ``at_least`` packs landed and no new one came for half a second."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = len(stored_packs(server, prefix))
        if n != last:
            last, since = n, time.monotonic()
        elif n >= at_least and time.monotonic() - since > 0.5:
            return n
        time.sleep(0.05)
    raise AssertionError(f"only {last} packs landed in {timeout} s")


def test_killed_create_resumes_without_uploading_landed_packs_again(s3_server, tmp_path: Path
                                                                      ) -> None:
    prefix = f"resume-{uuid.uuid4().hex[:10]}"
    data = random_file(tmp_path / "disk.raw", 20 << 20, seed=7).read_bytes()
    with counting_proxy("127.0.0.1", s3_server.ports["s3"]) as proxy:
        url = proxied_url(s3_server, proxy, prefix)
        init_repo(url, "repokey", "--pack-size", "1MiB")
        args = [*DV, "create", "--chunker-params", CHUNKER,
                "--stdin-name", "disk.raw", f"{url}::disk", "-"]
        first = subprocess.Popen(args, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        assert first.stdin is not None
        first.stdin.write(data[: 12 << 20])  # it reads on: the rest never comes
        first.stdin.flush()
        landed = wait_for_packs(s3_server, prefix, at_least=6)
        first.send_signal(signal.SIGKILL)  # a crash: no cleanup, no index segment
        first.wait()
        first.stdin.close()
        first.stderr.close()  # type: ignore[union-attr]
        before = stored_packs(s3_server, prefix)
        assert len(before) == landed
        proxy.clear()
        dv("create", "--chunker-params", CHUNKER, "--stdin-name", "disk.raw", f"{url}::disk",
           "-", input=data)
        puts = proxy.matching("PUT", r"/packs/")
        toc_reads = collections.Counter(k for k in proxy.matching("GET", r"/packs/"))
        after = stored_packs(s3_server, prefix)
    # every PUT made a new pack, none of the landed ones was sent again
    assert len(puts) == len(set(puts)) == len(after) - len(before)
    assert not {k.rsplit("/", 1)[-1] for k in puts} & before.keys()
    # the landed packs were only looked at: trailer + table of contents, 2 reads each
    assert set(toc_reads) == {f"{prefix}/packs/{p[:2]}/{p}" for p in before}
    assert set(toc_reads.values()) == {2}
    # and no chunk is stored twice: the second run knew every chunk that had landed
    with open_store(s3_server.url(prefix)) as store:
        repo = Repository.open(store, lambda _c: "secret", lock=None)
        ids = [e.id for p, size in after.items() for e in read_toc(store.load, p, size,
                                                                    repo.codec)]
    assert len(ids) == len(set(ids))
    assert len(puts) < len(after)  # something was really resumed
    print(f"resume: {len(before)} packs landed before the kill; the rerun uploaded "
          f"{len(puts)} and read {sum(toc_reads.values())} TOC ranges")
    assert restored_sha(f"{s3_server.url(prefix)}::disk") == file_sha(tmp_path / "disk.raw")
    locks = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{prefix}/locks")
    assert locks.get("KeyCount", 0) == 0  # the killed process's lock was cleared (pid gone)

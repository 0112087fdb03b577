"""The local cache on an S3 repository: what a warm cache saves, and that it is never
trusted over the repository (compact on one host, restore on another).

Requests are counted by a proxy between the CLI and SeaweedFS.
"""

from __future__ import annotations

import random
import uuid
from pathlib import Path

from remote.conftest import file_sha, restored_sha
from remote.proxy import counting_proxy
from remote.test_remote_resume import proxied_url, stored_packs
from support import dv, init_repo

BLOCK = 256 << 10


def test_list_and_info_with_a_warm_cache_download_no_index_or_metadata(
        s3_server, tmp_path: Path) -> None:
    prefix = f"cache-{uuid.uuid4().hex[:10]}"
    with counting_proxy("127.0.0.1", s3_server.ports["s3"]) as proxy:
        url = proxied_url(s3_server, proxy, prefix)
        init_repo(url, "repokey", "--pack-size", "1MiB")
        for n in range(3):
            f = tmp_path / f"data{n}"
            f.write_bytes(random.Random(n).randbytes(2 << 20))
            dv("create", f"{url}::a{n}", str(f))

        def run(*args: str) -> tuple[list[str], list[str]]:
            proxy.clear()
            dv(*args)
            return proxy.matching("GET", r"/index/"), proxy.matching("GET", r"/archives/")

        # cold: the metadata of each archive is fetched once — unless a `create` already
        # cached it while looking for its delta parent (a0, a1 here)
        _, cold_meta = run("list", url)
        assert 1 <= len(cold_meta) <= 3
        for args in (["list", url], ["info", url], ["info", f"{url}::a1"],
                     ["list", "--format", "{archive} {hostname}{NL}", url]):
            segments, meta = run(*args)
            assert segments == [] and meta == [], (args, segments, meta)
        # a new archive (another segment, another metadata object) is fetched, once
        dv("create", f"{url}::a3", str(tmp_path / "data0"))
        _, meta = run("list", url)
        assert len(meta) == 1
        # without the cache everything is fetched again
        proxy.clear()
        dv("info", url, env={"DISKVAULT_NO_CACHE": "1"})
        assert len(proxy.matching("GET", r"/index/")) == 4
        assert len(proxy.matching("GET", r"/archives/")) == 4


def test_compact_on_one_host_then_restore_on_another_with_a_warm_cache(
        s3_server, tmp_path: Path) -> None:
    prefix = f"cache-compact-{uuid.uuid4().hex[:10]}"
    url = s3_server.url(prefix)
    host_a = {"DISKVAULT_CACHE_DIR": str(tmp_path / "cache-a")}
    host_b = {"DISKVAULT_CACHE_DIR": str(tmp_path / "cache-b")}
    init_repo(url, "repokey", "--pack-size", "1MiB")
    rnd = random.Random(5)
    keep = [rnd.randbytes(BLOCK) for _ in range(16)]
    drop = [rnd.randbytes(BLOCK) for _ in range(16)]
    both = tmp_path / "both.img"  # kept and dropped blocks interleaved: every pack mixed
    both.write_bytes(b"".join(k + d for k, d in zip(keep, drop, strict=True)))
    kept = tmp_path / "kept.img"
    kept.write_bytes(b"".join(keep))
    chunker = ["--chunker-params", f"fixed,{BLOCK}"]
    dv("create", *chunker, f"{url}::both", str(both), env=host_a)
    mixed = set(stored_packs(s3_server, prefix))  # where every block of "kept" lies
    dv("create", *chunker, f"{url}::kept", str(kept), env=host_a)  # all deduplicated
    # host B warms its cache: index (every chunk's pack) and archive metadata
    assert restored_sha(f"{url}::kept", env=host_b) == file_sha(kept)
    dv("delete", f"{url}::both", env=host_a)
    dv("compact", f"{url}", env=host_a)
    packs_after = set(stored_packs(s3_server, prefix))
    # every pack B's cache points into was half garbage: repacked and deleted
    assert len(mixed) >= 8 and not mixed & packs_after
    assert restored_sha(f"{url}::kept", env=host_b) == file_sha(kept)
    assert "no problems found" in dv("check", url, env=host_b).stdout.decode()
    # B can also back up into the compacted repository: dedup against the new packs
    dv("create", *chunker, f"{url}::kept-again", str(kept), env=host_b)
    new = {p: s for p, s in stored_packs(s3_server, prefix).items() if p not in packs_after}
    assert sum(new.values()) < BLOCK // 4  # only the new archive's item list went up
    assert restored_sha(f"{url}::kept-again", env=host_a) == file_sha(kept)

"""Restores read single chunks out of packs with ranged GETs, never whole packs."""

from __future__ import annotations

import random
import re
import uuid
from pathlib import Path

from remote.conftest import file_sha, restored_sha
from remote.proxy import counting_proxy
from remote.test_remote_resume import proxied_url, stored_packs
from support import dv, init_repo


def test_one_small_file_is_read_by_ranges_of_its_chunks(s3_server, tmp_path: Path) -> None:
    prefix = f"ranges-{uuid.uuid4().hex[:10]}"
    big, small = tmp_path / "big.bin", tmp_path / "small.bin"
    big.write_bytes(random.Random(1).randbytes(6 << 20))
    small.write_bytes(random.Random(2).randbytes(300 << 10))
    with counting_proxy("127.0.0.1", s3_server.ports["s3"]) as proxy:
        url = proxied_url(s3_server, proxy, prefix)
        init_repo(url, "repokey", "--pack-size", "4MiB")
        dv("create", "--chunker-params", "fixed,262144", f"{url}::a", str(big), str(small))
        proxy.clear()
        assert restored_sha(f"{url}::a", str(small).lstrip("/")) == file_sha(small)
        pack_reads = [(k, r) for k, r in proxy.ranges if "/packs/" in k]
    packs = stored_packs(s3_server, prefix)
    assert len(packs) >= 2 and max(packs.values()) > 3 << 20
    # the item list and the file's two chunks: one ranged GET each, no whole pack
    assert pack_reads and all(r is not None for _, r in pack_reads), pack_reads
    fetched = 0
    for _, r in pack_reads:
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", r or "")
        assert m, r
        fetched += int(m.group(2)) - int(m.group(1)) + 1
    assert fetched < (300 << 10) + (64 << 10)  # the file's bytes, its item list, a little

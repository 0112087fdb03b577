"""The view and serve-nbd on remote repositories: single chunks are range-read from
packs (never a whole pack for a small read), zero ranges cost no request."""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path

from remote.proxy import counting_proxy
from remote.test_remote_resume import proxied_url
from serve.nbd_client import Client
from serve.test_nbd import needs_nbd_tools, serving
from support import dv, init_repo, make_vm_image

CHUNK = 256 << 10


def _archive(url: str, tmp: Path) -> bytes:
    img = str(tmp / "vm.img")
    make_vm_image(img, 16)
    dv("create", "--chunker-params", f"fixed,{CHUNK}", f"{url}::a", img)
    return dv("extract", "--stdout", f"{url}::a").stdout


@needs_nbd_tools
def test_export_of_a_remote_repository(remote_url: str, tmp_path: Path) -> None:
    init_repo(remote_url, "repokey", "--pack-size", "4MiB")
    want = _archive(remote_url, tmp_path)
    out = tmp_path / "out.img"
    with serving("--port", "0", f"{remote_url}::a", env={}) as (uri, _):
        subprocess.run(["nbdcopy", "--connections=2", uri, str(out)], check=True, timeout=600)
    assert out.read_bytes() == want


@needs_nbd_tools
def test_small_reads_are_ranged_gets_of_one_chunk(s3_server, tmp_path: Path) -> None:
    prefix = f"view-{uuid.uuid4().hex[:10]}"
    with counting_proxy("127.0.0.1", s3_server.ports["s3"]) as proxy:
        url = proxied_url(s3_server, proxy, prefix)
        init_repo(url, "repokey", "--pack-size", "8MiB")
        want = _archive(url, tmp_path)
        with serving("--port", "0", f"{url}::a", env={}) as (uri, _):
            c = Client(uri)
            off = (5 << 20) + 12288  # random data, inside one chunk, not at offset 0
            proxy.clear()
            assert c.pread(off, 4096) == want[off : off + 4096]
            gets = [r for k, r in proxy.ranges if "packs/" in k]
            assert len(gets) == 1 and gets[0] is not None, proxy.ranges
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", gets[0])
            assert m and int(m.group(2)) - int(m.group(1)) + 1 <= CHUNK + 1024  # one chunk
            proxy.clear()
            # the same chunk again (not where the last read ended: no read-ahead): cached
            assert c.pread(off + 8192, 4096) == want[off + 8192 : off + 12288]
            assert c.pread(2 << 20, 1 << 20) == bytes(1 << 20)  # zeros: no request
            assert not [k for k, _ in proxy.ranges if "packs/" in k]
            c.close()

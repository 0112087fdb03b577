"""Many hosts, one repository: concurrent backups share dedup and never corrupt each other.

The second "host" is a process in its own UTS namespace (``unshare -u``) with another
host name and its own cache dir, so its lock records and archive metadata say
``host-b`` — as a second machine's would.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from remote.conftest import restored_sha
from remote.test_remote_resume import stored_packs
from support import DV, dv, init_repo

from diskvault.errors import LockError
from diskvault.repository.lock import EXCLUSIVE, Lock, node_identity
from diskvault.storage.memory import MemoryStore

BLOCK = 256 << 10
CHUNKER = ["--chunker-params", f"fixed,{BLOCK}"]
MiB = 1 << 20


def _unshare_works() -> bool:
    try:
        r = subprocess.run(["unshare", "-u", "hostname", "probe-host"], capture_output=True,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def create_as(host: str | None, url: str, name: str, env: dict) -> subprocess.Popen:
    """``create`` from stdin, as another host (own host name, own cache) if ``host``."""
    argv = [*DV, "create", "--json", *CHUNKER,
            "--stdin-name", f"{name}.img", f"{url}::{name}", "-"]
    if host is not None:
        argv = ["unshare", "-u", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *argv]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **env})


def wait_for_locks(server, prefix: str, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = server.client().list_objects_v2(Bucket=server.bucket, Prefix=f"{prefix}/locks/")
        if r.get("KeyCount", 0) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} backups hold a lock after {timeout} s")


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -u (root, UTS namespaces)")
def test_two_hosts_back_up_into_one_s3_repository_at_once(s3_server, tmp_path: Path) -> None:
    prefix = f"fleet-{uuid.uuid4().hex[:10]}"
    url = s3_server.url(prefix)
    init_repo(url, "repokey", "--pack-size", "1MiB")
    rnd = random.Random(11)
    golden = rnd.randbytes(8 * MiB)  # the image both VMs were cloned from
    images = {"vm-a": golden[: 4 * MiB] + rnd.randbytes(2 * MiB) + golden[6 * MiB:],
              "vm-b": golden[: 2 * MiB] + rnd.randbytes(2 * MiB) + golden[4 * MiB:]}
    (tmp_path / "golden.img").write_bytes(golden)
    dv("create", *CHUNKER, f"{url}::golden", str(tmp_path / "golden.img"),
       env={"DISKVAULT_CACHE_DIR": str(tmp_path / "cache-a")})
    after_golden = sum(stored_packs(s3_server, prefix).values())

    hosts = {"vm-a": None, "vm-b": "host-b"}
    procs = {n: create_as(h, url, n, {"DISKVAULT_CACHE_DIR": str(tmp_path / f"cache-{n}")})
             for n, h in hosts.items()}
    for n, p in procs.items():  # both are reading, holding their locks, at the same time
        assert p.stdin is not None
        p.stdin.write(images[n][: 5 * MiB])
        p.stdin.flush()
    wait_for_locks(s3_server, prefix, 2)
    # and both finish, and commit, at about the same time
    results: dict[str, tuple[bytes, bytes]] = {}
    threads = [threading.Thread(target=lambda n=n, p=p: results.__setitem__(
        n, p.communicate(images[n][5 * MiB:], timeout=120))) for n, p in procs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n, p in procs.items():
        assert p.returncode == 0, (n, results[n][1].decode())
    stats = {n: json.loads(out)["archive"]["stats"] for n, (out, _) in results.items()}

    # both archives, each from its own host, each restored exactly
    rows = dv("list", "--format", "{archive} {hostname}{NL}", url).stdout.decode().split("\n")
    listed = dict(r.split() for r in rows if r)
    assert listed == {"golden": socket.gethostname(), "vm-a": socket.gethostname(),
                      "vm-b": "host-b"}
    for n, data in images.items():
        assert restored_sha(f"{url}::{n}") == hashlib.sha256(data).hexdigest()
    # dedup shared: each host stored only the 2 MiB it changed, not its 8 MiB image
    for n in images:
        assert stats[n]["new_plain"] == 2 * MiB, (n, stats[n])
        assert stats[n]["dedup"] == 6 * MiB
    total = sum(stored_packs(s3_server, prefix).values())
    grew = total - after_golden
    assert grew < 4 * MiB + (256 << 10), grew  # two hosts' changes plus their item lists
    print(f"fleet: golden image stored {after_golden / MiB:.2f} MiB; two hosts' 8 MiB "
          f"images at once added {grew / MiB:.2f} MiB (one host alone would add "
          f"{stats['vm-a']['new_stored'] / MiB:.2f} MiB)")
    assert "no problems found" in dv("check", url).stdout.decode()
    left = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{prefix}/locks")
    assert left.get("KeyCount", 0) == 0


# --- which locks may be taken for dead ----------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _planted(**fields: object) -> MemoryStore:
    store = MemoryStore()
    store.create()
    rec = {"kind": EXCLUSIVE, "host": socket.gethostname(), "pid": _dead_pid(),
           "time": time.time(), "id": "0-planted", **node_identity(), **fields}
    store.store("locks/0-planted", json.dumps(rec).encode())
    return store


@pytest.mark.parametrize("other", [{"machine": "another-machine-with-my-host-name"},
                                   {"pidns": 1}])  # a container beside us on this kernel
def test_a_lock_from_another_machine_of_the_same_name_is_never_taken_for_dead(other) -> None:
    store = _planted(**other)
    with pytest.raises(LockError, match="repository is locked"):
        Lock(store, EXCLUSIVE, lock_wait=0.2).acquire()
    assert "locks/0-planted" in store.data  # the live holder elsewhere keeps its lock


@pytest.mark.parametrize("fields", [{}, {"boot": "a-boot-before-the-last-reboot"}])
def test_a_lock_of_a_gone_process_of_this_machine_is_removed(fields) -> None:
    if fields and not node_identity()["machine"]:
        pytest.skip("no machine id here: another boot cannot be told from another machine")
    store = _planted(**fields)
    with Lock(store, EXCLUSIVE, lock_wait=0.2):
        assert "locks/0-planted" not in store.data

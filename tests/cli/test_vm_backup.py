"""`vm backup` against real QEMU: a paused VM written through QEMU's own block layer
(exact expectations, fast), and a booted Linux guest appending synced records.

The paused VM's disk has no partition table and random content, so every byte is
backed up and an archive must equal, byte for byte, the disk as we wrote it up to the
backup's point in time (we keep that image ourselves: every write we make through QEMU
is applied to `expected` too). Writes go through HMP `qemu-io` on the guest device's
block backend: the same path, and the same dirty bitmaps, as the guest's own writes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import vmkit
from support import DV, dv, init_repo, needs_tool
from vmkit import (
    MiB,
    build_initramfs,
    check_records,
    fleece_mounted,
    make_guest_disk,
    needs_guest,
    qmp_key,
    records_in,
    running_guest,
)

from diskvault.source.qmp import QmpClient

pytestmark = [needs_tool("qemu-system-x86_64", "qemu-img", "nbdinfo", "fusermount3")]
DEV = "/machine/peripheral/{}/virtio-backend"


def qio(q: QmpClient, dev: str, cmd: str) -> None:
    out = q.execute("human-monitor-command",
                    **{"command-line": f'qemu-io -d {DEV.format(dev)} "{cmd}"'})
    assert "error" not in out.lower(), out


class Disk(vmkit.Disk):
    def write(self, q: QmpClient, dev: str, off: int, n: int, byte: int) -> None:
        qio(q, dev, f"write -P {byte} {off} {n}")
        self.written(off, n, byte)


def vm_backup(repo: str, name: str, qmp: str, *args: str) -> dict:
    r = dv("vm", "backup", "--json", "--qmp", qmp, *args, f"{repo}::{name}")
    return json.loads(r.stdout)


def leftovers(qmp: str) -> dict:
    with QmpClient(qmp) as q:
        return {
            "jobs": q.execute("query-block-jobs"),
            "exports": q.execute("query-block-exports"),
            "nodes": [n["node-name"] for n in q.execute("query-named-block-nodes", flat=True)
                      if n["node-name"].startswith("diskvault-")],
        }


def our_bitmaps(qmp: str) -> dict[str, list[str]]:
    with QmpClient(qmp) as q:
        return {n["node-name"]: [b["name"] for b in n.get("dirty-bitmaps", [])
                                 if b.get("name", "").startswith("diskvault-")]
                for n in q.execute("query-named-block-nodes", flat=True)
                if not n["node-name"].startswith(("diskvault-", "file"))}


def assert_clean(qmp: str) -> None:
    assert leftovers(qmp) == {"jobs": [], "exports": [], "nodes": []}
    assert not fleece_mounted(qmp_key(qmp))


@pytest.fixture
def paused(tmp_path):
    """A paused VM (no guest code runs) with two 32 MiB qcow2 disks of random bytes."""
    disks = {"vda": Disk(str(tmp_path / "a.qcow2"), 32 * MiB, 1),
             "vdb": Disk(str(tmp_path / "b.qcow2"), 32 * MiB, 2)}
    with running_guest(str(tmp_path), {k: d.path for k, d in disks.items()},
                       paused=True) as g:
        yield g, disks


def test_full_then_incremental_reads_only_dirty_extents(paused, tmp_path):
    g, disks = paused
    repo = str(tmp_path / "repo")
    init_repo(repo)
    j = vm_backup(repo, "v1", g.qmp)
    assert [(a["name"], a["mode"]) for a in j["archives"]] == [("v1.vda", "full"),
                                                               ("v1.vdb", "full")]
    with QmpClient(g.qmp) as q:
        disks["vda"].write(q, "vda", 5 * MiB + 4096, 8192, 0x41)
        disks["vda"].write(q, "vda", 20 * MiB, MiB, 0x42)
    j = vm_backup(repo, "v2", g.qmp)
    a, b = j["archives"]
    assert (a["mode"], b["mode"]) == ("incremental", "incremental")
    # the bitmap's 64 KiB granularity: 8 KiB → 64 KiB, 1 MiB → 1 MiB
    assert a["dirty"] == 64 * 1024 + MiB and b["dirty"] == 0
    assert a["stats"]["read"] == a["dirty"] and b["stats"]["read"] == 0
    for name, d in (("v1.vdb", disks["vdb"]), ("v2.vda", disks["vda"]),
                    ("v2.vdb", disks["vdb"])):
        assert dv("extract", "--stdout", f"{repo}::{name}").stdout == bytes(d.expected), name
    assert_clean(g.qmp)
    assert sorted(len(v) for v in our_bitmaps(g.qmp).values()) == [1, 1]
    out_q, out_r = str(tmp_path / "r.qcow2"), str(tmp_path / "r.raw")
    dv("disk", "restore", f"{repo}::v2.vda", out_q)
    dv("disk", "restore", f"{repo}::v2.vda", out_r)
    with open(out_r, "rb") as f:
        assert f.read() == bytes(disks["vda"].expected)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", out_r, out_q],
                   check=True, capture_output=True)


def test_untrusted_bitmap_means_full_read_never_a_wrong_archive(paused, tmp_path):
    g, disks = paused
    repo = str(tmp_path / "repo")
    init_repo(repo)
    vm_backup(repo, "v1", g.qmp, "--drive", "vda")
    (bm,) = our_bitmaps(g.qmp)["disk0"]  # QMP serves one client at a time
    with QmpClient(g.qmp) as q:
        disks["vda"].write(q, "vda", MiB, 4096, 0x51)
        q.execute("block-dirty-bitmap-remove", node="disk0", name=bm)  # by hand
        disks["vda"].write(q, "vda", 9 * MiB, 4096, 0x52)  # recorded by no bitmap
    r = dv("vm", "backup", "--qmp", g.qmp, "--drive", "vda", f"{repo}::v2")
    assert b"full read" in r.stderr and b"bitmap is gone" in r.stderr, r.stderr
    assert dv("extract", "--stdout", f"{repo}::v2").stdout == bytes(disks["vda"].expected)
    # a deleted parent archive: its bitmap is trusted for nothing else
    with QmpClient(g.qmp) as q:
        disks["vda"].write(q, "vda", 3 * MiB, 4096, 0x53)
    dv("delete", f"{repo}::v2")
    j = vm_backup(repo, "v3", g.qmp, "--drive", "vda")
    assert j["archives"][0]["mode"] == "full"
    assert dv("extract", "--stdout", f"{repo}::v3").stdout == bytes(disks["vda"].expected)
    assert sorted(len(v) for v in our_bitmaps(g.qmp).values()) == [0, 1]


def test_two_repositories_alternately_both_stay_incremental(paused, tmp_path):
    g, disks = paused
    r1, r2 = str(tmp_path / "r1"), str(tmp_path / "r2")
    init_repo(r1)
    init_repo(r2, "repokey")
    env = {"DISKVAULT_PASSPHRASE": "secret"}
    for i in range(3):
        for repo in (r1, r2):
            r = dv("vm", "backup", "--json", "--qmp", g.qmp, "--drive", "vda",
                   f"{repo}::a{i}", env=env)
            mode = json.loads(r.stdout)["archives"][0]["mode"]
            assert mode == ("full" if i == 0 else "incremental")
            got = dv("extract", "--stdout", f"{repo}::a{i}", env=env).stdout
            assert got == bytes(disks["vda"].expected), (repo, i)
            with QmpClient(g.qmp) as q:
                disks["vda"].write(q, "vda", (i * 7 + (repo == r2)) * MiB, 4096, 0x60 + i)
    assert sorted(len(v) for v in our_bitmaps(g.qmp).values()) == [0, 2]


def test_hot_added_and_resized_disks_are_read_whole(paused, tmp_path):
    g, disks = paused
    repo = str(tmp_path / "repo")
    init_repo(repo)
    vm_backup(repo, "v1", g.qmp)
    new = Disk(str(tmp_path / "c.qcow2"), 16 * MiB, 3)
    with QmpClient(g.qmp) as q:
        q.execute("blockdev-add", driver="qcow2", **{"node-name": "disk9"},
                  file={"driver": "file", "filename": new.path})
        q.execute("device_add", driver="virtio-blk-pci", drive="disk9", id="vdc")
        q.execute("block_resize", **{"node-name": "disk1"}, size=48 * MiB)
        disks["vdb"].expected += bytes(16 * MiB)
    j = vm_backup(repo, "v2", g.qmp)
    modes = {a["drive"]: (a["mode"], a["reason"]) for a in j["archives"]}
    assert modes["vda"] == ("incremental", "")
    assert modes["vdb"] == ("full", "the disk was resized")
    assert modes["vdc"] == ("full", "first backup of this disk")
    assert dv("extract", "--stdout", f"{repo}::v2.vdb").stdout == bytes(disks["vdb"].expected)
    assert dv("extract", "--stdout", f"{repo}::v2.vdc").stdout == bytes(new.expected)


def test_bad_input(paused, tmp_path):
    g, _ = paused
    repo = str(tmp_path / "repo")
    init_repo(repo)
    for args, msg in ((["--qmp", str(tmp_path / "nope.sock")], b"cannot connect"),
                      (["--qmp", g.qmp, "--drive", "sdz"], b"no drive sdz")):
        r = dv("vm", "backup", *args, f"{repo}::x", check=False)
        assert r.returncode == 2 and r.stderr.count(b"\n") == 1 and msg in r.stderr, r.stderr
    assert dv("list", repo).stdout == b""
    assert_clean(g.qmp)


# --- a real, running guest -------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("live"))
    initrd = build_initramfs(os.path.join(d, "initrd.gz"))
    disk = make_guest_disk(os.path.join(d, "vm.qcow2"))
    with running_guest(d, {"vda": disk}, initrd) as g:
        g.wait_records(3, 600)
        yield g


@needs_guest
def test_running_guest_two_backups_hold_every_synced_record(live, tmp_path):
    repo = str(tmp_path / "repo")
    init_repo(repo, "repokey")
    env = {"DISKVAULT_PASSPHRASE": "secret"}
    before1 = live.records_announced()
    j1 = vm_backup_env(repo, "b1", live.qmp, env)
    live.wait_records(before1 + 10)
    before2 = live.records_announced()
    j2 = vm_backup_env(repo, "b2", live.qmp, env)
    a1, a2 = j1["archives"][0], j2["archives"][0]
    assert (a1["mode"], a2["mode"]) == ("full", "incremental")
    size = a2["size"]
    # the second backup reads only the bitmap's extents: a few MiB of a 64 MiB disk
    assert a2["stats"]["read"] <= a2["dirty"] < size // 4, a2
    sys.stderr.write(f"vm backup 2: read {a2['stats']['read']} B, dirty {a2['dirty']} B, "
                     f"disk {size} B (first: read {a1['stats']['read']} B)\n")
    k1 = check_records(records_in(repo, "b1", tmp_path, env), before1)
    k2 = check_records(records_in(repo, "b2", tmp_path, env), before2)
    assert k2 > k1
    assert live.alive() and live.wait_records(before2 + 5)
    assert_clean(live.qmp)


def vm_backup_env(repo: str, name: str, qmp: str, env: dict, *args: str) -> dict:
    r = dv("vm", "backup", "--json", "--qmp", qmp, *args, f"{repo}::{name}", env=env)
    return json.loads(r.stdout)


def _kill_sweep(live, tmp_path, kills: int, seed: int) -> None:
    """SIGKILL `vm backup` at seeded random moments; after each, the guest runs on,
    the next complete run cleans up, and its archive holds every synced record."""
    repo = str(tmp_path / "repo")
    init_repo(repo)
    rnd = random.Random(seed)
    vm_backup(repo, "base", live.qmp)
    fired = 0
    for i in range(kills):
        p = subprocess.Popen([*DV, "vm", "backup", "--qmp",
                              live.qmp, f"{repo}::k{i}"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        if i % 2 == 0:
            # mid-read, for sure: once the fleece export is up, stop it, check, kill
            live._wait(lambda p=p: fleece_mounted(qmp_key(live.qmp)) or p.poll() is not None,
                       300,
                       "the fleece export")
            p.send_signal(signal.SIGSTOP)
            assert fleece_mounted(qmp_key(live.qmp)) and p.poll() is None, \
                "the backup ended too early"
            p.send_signal(signal.SIGKILL)
            p.wait()
            fired += 1
        else:  # anywhere: a seeded moment, maybe before the transaction, maybe after
            try:
                p.wait(timeout=rnd.uniform(0.05, 3.0))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                fired += 1
        p.stderr.close()  # type: ignore[union-attr]
        assert live.alive()
        before = live.records_announced()
        j = vm_backup(repo, f"ok{i}", live.qmp)
        assert j["archives"][0]["mode"] in ("incremental", "full")
        check_records(records_in(repo, f"ok{i}", tmp_path), before)
        assert_clean(live.qmp)
        for names in our_bitmaps(live.qmp).values():  # one per repository, no more
            tags = [n.split("-")[1] for n in names]
            assert len(tags) == len(set(tags)), names
    assert fired >= (kills + 1) // 2
    dv("check", "--verify-data", repo)


@needs_guest
def test_sigkill_during_vm_backup(live, tmp_path):
    _kill_sweep(live, tmp_path, kills=3, seed=11)


@pytest.mark.slow
@needs_guest
def test_sigkill_sweep_20(live, tmp_path):
    _kill_sweep(live, tmp_path, kills=20, seed=12)


@needs_guest
def test_guest_fsfreeze_gives_clean_filesystems_and_always_thaws(live, tmp_path):
    repo = str(tmp_path / "repo")
    init_repo(repo)
    before = live.records_announced()
    j = vm_backup(repo, "f1", live.qmp, "--guest-fsfreeze")
    a = j["archives"][0]
    assert a["consistency"] == "application" and a["frozen"] >= 1, a
    # frozen: the filesystem is clean as it is, no journal to replay
    check_records(records_in(repo, "f1", tmp_path, frozen=True), before)
    live.wait_records(live.records_announced() + 5)  # thawed: the guest writes on
    # SIGKILL while frozen: the watchdog process thaws the guest
    qga = live.qga
    code = ("import os, signal\n"
            "from diskvault.source.guestfreeze import GuestFreeze\n"
            f"with GuestFreeze({qga!r}) as f:\n"
            "    assert f.frozen >= 1\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    live.wait_records(live.records_announced() + 5, 120)


def test_guest_fsfreeze_without_an_answering_agent_warns(paused, tmp_path):
    g, disks = paused  # paused: the agent's channel exists, nobody answers
    repo = str(tmp_path / "repo")
    init_repo(repo)
    r = dv("vm", "backup", "--guest-fsfreeze", "--qmp", g.qmp, "--drive", "vda",
           f"{repo}::w", check=False)
    assert r.returncode == 1, r.stderr
    assert b"crash-consistent only" in r.stderr
    assert dv("extract", "--stdout", f"{repo}::w").stdout == bytes(disks["vda"].expected)
    # with --log-json every line on stderr is JSON: the warning, the per-drive report
    r = dv("vm", "backup", "--log-json", "--guest-fsfreeze", "--qmp", g.qmp, "--drive", "vda",
           f"{repo}::w2", check=False)
    assert r.returncode == 1, r.stderr
    recs = [json.loads(line) for line in r.stderr.decode().splitlines()]
    assert {rec["type"] for rec in recs} == {"log_message"}, recs
    assert any(rec["levelname"] == "WARNING" and "crash-consistent only" in rec["message"]
               for rec in recs), recs
    assert any(rec["levelname"] == "INFO" and "vda → w2: incremental" in rec["message"]
               for rec in recs), recs


def test_vm_going_away_mid_backup_is_one_clear_error(tmp_path):
    disk = Disk(str(tmp_path / "big.qcow2"), 256 * MiB, 4)
    repo = str(tmp_path / "repo")
    init_repo(repo)
    with running_guest(str(tmp_path), {"vda": disk.path}, paused=True) as g:
        p = subprocess.Popen([*DV, "vm", "backup", "--qmp", g.qmp, f"{repo}::gone"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def exported() -> bool:
            return fleece_mounted(qmp_key(g.qmp)) or p.poll() is not None

        g._wait(exported, 120, "the fleece export")
        p.send_signal(signal.SIGSTOP)  # hold diskvault mid-backup, deterministically
        assert exported() and p.poll() is None
        g.stop()  # the VM dies while diskvault reads its disk
        p.send_signal(signal.SIGCONT)
        _, err = p.communicate(timeout=300)
    assert p.returncode == 2, err
    assert err.count(b"\n") == 1 and err.startswith(b"diskvault: error: "), err
    assert dv("list", repo).stdout == b""
    dv("check", repo)
    assert not fleece_mounted(qmp_key(g.qmp))

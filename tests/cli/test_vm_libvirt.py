"""`vm backup --libvirt` against a real libvirt daemon (virtqemud, started by the test)
and real QEMU: paused domains written through QEMU's own block layer, exact
expectations (every archive equals, byte for byte, the disk as we wrote it up to the
backup's point in time)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
from libvirtkit import Domain, Libvirt, libvirt, needs_libvirt  # noqa: F401 (fixture)
from support import DV, dv, init_repo
from vmkit import (
    Disk,
    Guest,
    MiB,
    build_initramfs,
    check_records,
    fleece_mounted,
    kernel,
    make_guest_disk,
    needs_guest,
    records_in,
)

from diskvault.repository.repo import Repository
from diskvault.storage.url import open_store

# a hung diskvault or libvirt fails the test instead of holding CI (the boot test: TCG)
pytestmark = [needs_libvirt, pytest.mark.timeout(900)]
PREFIX = "diskvault-"


class LvDisk(Disk):
    def write(self, dom: Domain, dev: str, off: int, n: int, byte: int) -> None:
        dom.qemu_io(dev, f"write -P {byte} {off} {n}")
        self.written(off, n, byte)


@pytest.fixture
def dom(libvirt: Libvirt, tmp_path):  # noqa: F811
    """A paused domain with two 32 MiB qcow2 disks of random bytes."""
    w = libvirt.workdir()
    disks = {"vda": LvDisk(os.path.join(w, "a.qcow2"), 32 * MiB, 1),
             "vdb": LvDisk(os.path.join(w, "b.qcow2"), 32 * MiB, 2)}
    d = Domain(libvirt, w, {k: v.path for k, v in disks.items()})
    try:
        yield d, disks
    finally:
        d.destroy()


def vm_backup(d: Domain, repo: str, name: str, *args: str, env: dict | None = None) -> dict:
    r = dv("vm", "backup", "--json", "--libvirt", d.name, "--connect", d.lv.uri, *args,
           f"{repo}::{name}", env=env)
    return json.loads(r.stdout)


def extract(repo: str, name: str, env: dict | None = None) -> bytes:
    return dv("extract", "--stdout", f"{repo}::{name}", env=env).stdout


def ours_per_repo(d: Domain) -> dict[str, list[str]]:
    tags: dict[str, list[str]] = {}
    for c in d.checkpoints():
        if c.startswith(PREFIX):
            tags.setdefault(c.split("-")[1], []).append(c)
    return tags


def assert_clean(d: Domain) -> None:
    assert not d.backup_job()
    assert not fleece_mounted(d.vm_key)
    assert all(len(v) == 1 for v in ours_per_repo(d).values()), d.checkpoints()


def test_full_then_incremental_reads_only_what_was_written(dom, tmp_path):
    d, disks = dom
    repo = str(tmp_path / "repo")
    init_repo(repo)
    j = vm_backup(d, repo, "v1")
    assert [(a["name"], a["mode"]) for a in j["archives"]] == [("v1.vda", "full"),
                                                               ("v1.vdb", "full")]
    at_v1 = {k: bytes(v.expected) for k, v in disks.items()}
    (ck1,) = d.checkpoints()
    # the key the tests' "no fleece export left" check looks under is diskvault's own
    with Repository.open(open_store(repo), lambda creating: "", lock=None) as r:
        meta = r.load_archive(r.manifest.archives["v1.vda"])
    assert meta["source_id"]["vm"] == d.vm_key
    disks["vda"].write(d, "vda", 5 * MiB + 4096, 8192, 0x41)
    disks["vda"].write(d, "vda", 20 * MiB, MiB, 0x42)
    j = vm_backup(d, repo, "v2")
    a, b = j["archives"]
    assert (a["mode"], b["mode"]) == ("incremental", "incremental")
    # the bitmap's 64 KiB granularity: 8 KiB → 64 KiB, 1 MiB → 1 MiB
    assert a["dirty"] == 64 * 1024 + MiB and b["dirty"] == 0, (a, b)
    assert a["stats"]["read"] == a["dirty"] and b["stats"]["read"] == 0
    for k in ("vda", "vdb"):
        assert extract(repo, f"v1.{k}") == at_v1[k], k
        assert extract(repo, f"v2.{k}") == bytes(disks[k].expected), k
    assert_clean(d)
    (ck2,) = d.checkpoints()  # the old checkpoint went once v2 was committed
    assert ck2 != ck1
    with Repository.open(open_store(repo), lambda creating: "", lock=None) as r:
        vm = r.load_archive(r.archive_ref("v2.vda"))["vm"]
    assert (vm["bitmap"], vm["hypervisor"], vm["mode"]) == (ck2, "libvirt", "incremental")


def test_untrusted_checkpoint_means_full_read_never_a_wrong_archive(dom, tmp_path):
    d, disks = dom
    repo = str(tmp_path / "repo")
    init_repo(repo)
    vm_backup(d, repo, "v1", "--drive", "vda")
    (ck,) = d.checkpoints()
    disks["vda"].write(d, "vda", MiB, 4096, 0x51)
    d.lv.virsh("checkpoint-delete", d.name, ck)  # by hand
    disks["vda"].write(d, "vda", 9 * MiB, 4096, 0x52)  # recorded by no checkpoint
    r = dv("vm", "backup", "--libvirt", d.name, "--connect", d.lv.uri, "--drive", "vda",
           f"{repo}::v2")
    assert b"full read" in r.stderr and b"checkpoint is gone" in r.stderr, r.stderr
    assert extract(repo, "v2") == bytes(disks["vda"].expected)
    # a bitmap QEMU lost (here: removed behind libvirt's back): libvirt refuses the
    # incremental, diskvault reads the disk whole
    (ck,) = d.checkpoints()
    nodes = json.loads(d.lv.virsh("qemu-monitor-command", d.name,
                                  '{"execute":"query-named-block-nodes"}').stdout)["return"]
    (node,) = [n["node-name"] for n in nodes
               if any(b["name"] == ck for b in n.get("dirty-bitmaps", []))]
    d.lv.virsh("qemu-monitor-command", d.name, json.dumps(
        {"execute": "block-dirty-bitmap-remove", "arguments": {"node": node, "name": ck}}))
    disks["vda"].write(d, "vda", 3 * MiB, 4096, 0x53)
    j = vm_backup(d, repo, "v3", "--drive", "vda")
    a = j["archives"][0]
    assert a["mode"] == "full" and "missing or broken" in a["reason"], a
    assert extract(repo, "v3") == bytes(disks["vda"].expected)
    # a deleted parent archive: its checkpoint is trusted for nothing else
    disks["vda"].write(d, "vda", 7 * MiB, 4096, 0x54)
    dv("delete", f"{repo}::v3")
    j = vm_backup(d, repo, "v4", "--drive", "vda")
    assert j["archives"][0]["mode"] == "full"
    assert extract(repo, "v4") == bytes(disks["vda"].expected)
    assert_clean(d)


def test_two_repositories_alternately_both_stay_incremental(dom, tmp_path):
    d, disks = dom
    r1, r2 = str(tmp_path / "r1"), str(tmp_path / "r2")
    init_repo(r1)
    init_repo(r2, "repokey")
    env = {"DISKVAULT_PASSPHRASE": "secret"}
    for i in range(3):
        for repo in (r1, r2):
            a = vm_backup(d, repo, f"a{i}", "--drive", "vda", env=env)["archives"][0]
            assert a["mode"] == ("full" if i == 0 else "incremental"), a
            if i:
                assert a["stats"]["read"] == a["dirty"] == 2 * 64 * 1024, a
            assert extract(repo, f"a{i}", env) == bytes(disks["vda"].expected), (repo, i)
            # two writes in two 64 KiB blocks: each repository's next backup sees both
            disks["vda"].write(d, "vda", (i * 7 + (repo == r2)) * MiB, 4096, 0x60 + i)
    assert_clean(d)
    assert len(ours_per_repo(d)) == 2


def child(pid: int, what: bytes) -> int | None:
    """A child process of ``pid`` whose command line holds ``what``."""
    for c in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{c}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{c}/cmdline", "rb") as f:
                if ppid == pid and what in f.read():
                    return int(c)
        except (OSError, ValueError, IndexError):
            continue
    return None


def wait_gone(pid: int) -> None:
    """Until ``pid`` has exited (reaped, or a zombie: it does nothing more)."""
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except OSError:
            return  # reaped
        os.sched_yield()


def kill_during_backup_begin(p: subprocess.Popen) -> None:
    """Deterministic: SIGKILL diskvault while its `virsh backup-begin` runs (that
    child finishes on its own: the job and the new checkpoint outlive us)."""
    while (v := child(p.pid, b"backup-begin")) is None:
        assert p.poll() is None, "the backup ended before backup-begin"
    p.send_signal(signal.SIGKILL)
    p.wait()
    wait_gone(v)


def kill_mid_read(p: subprocess.Popen) -> None:
    """Deterministic: stop diskvault's qemu-storage-daemon the moment it appears —
    diskvault cannot read the fleece through it, so cannot commit — and SIGKILL
    diskvault while it waits for it."""
    while (q := child(p.pid, b"qemu-storage-daemon")) is None:
        assert p.poll() is None, "the backup ended before the fleece export"
    os.kill(q, signal.SIGSTOP)
    assert p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.wait()
    os.kill(q, signal.SIGCONT)  # it takes its PR_SET_PDEATHSIG SIGTERM and exits
    wait_gone(q)


def test_sigkill_mid_backup_next_run_cleans_up_and_is_correct(libvirt, tmp_path):  # noqa: F811
    w = libvirt.workdir()
    big = LvDisk(os.path.join(w, "big.qcow2"), 96 * MiB, 5)
    d = Domain(libvirt, w, {"vda": big.path})
    try:
        repo = str(tmp_path / "repo")
        init_repo(repo)
        vm_backup(d, repo, "base")
        rnd = random.Random(21)
        for i, kill in enumerate([kill_during_backup_begin, kill_mid_read, None, None]):
            off = rnd.randrange(0, 90) * MiB
            big.write(d, "vda", off, 128 * 1024, 0x70 + i)
            p = subprocess.Popen([*DV, "vm", "backup", "--libvirt", d.name, "--connect",
                                  libvirt.uri, f"{repo}::k{i}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if kill is not None:
                kill(p)
                assert f"k{i}" not in dv("list", "--short", repo).stdout.decode().split()
            else:  # a seeded moment: maybe before backup-begin, maybe after the commit
                try:
                    p.wait(timeout=rnd.uniform(0.2, 2.0))
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
            r = dv("vm", "backup", "--json", "--libvirt", d.name, "--connect", libvirt.uri,
                   f"{repo}::ok{i}")
            if kill is not None:  # the job and its new checkpoint were left behind
                assert b"removed backup job" in r.stderr, (i, r.stderr)
                assert b"removed checkpoint" in r.stderr, (i, r.stderr)
            a = json.loads(r.stdout)["archives"][0]
            # the old checkpoint survived the kill: still incremental
            assert a["mode"] == "incremental", a
            assert extract(repo, f"ok{i}") == bytes(big.expected), i
            assert_clean(d)
        dv("check", "--verify-data", repo)
    finally:
        d.destroy()


def test_bad_input(dom, tmp_path):
    d, _ = dom
    repo = str(tmp_path / "repo")
    init_repo(repo)
    uri = ["--connect", d.lv.uri]
    for args, msg in (
            (["--libvirt", "no-such-domain", *uri], b"no-such-domain"),
            (["--libvirt", d.name, *uri, "--drive", "sdz"], b"no drive sdz"),
            (["--libvirt", d.name, "--qmp", "/nope"], b"not allowed with"),
            ([], b"one of the arguments --qmp --libvirt is required"),
            (["--qmp", "/nope", *uri], b"--connect goes with --libvirt"),
            (["--libvirt", d.name, "--connect", "qemu+unix:///system?socket=/nope"],
             b"libvirt: ")):
        r = dv("vm", "backup", *args, f"{repo}::x", check=False)
        assert r.returncode == 2 and r.stderr.count(b"\n") == 1 and msg in r.stderr, \
            (args, r.stderr)
    empty = tmp_path / "empty-path"
    empty.mkdir()
    env = {"PATH": str(empty)}  # no virsh (DV names python by its full path)
    r = dv("vm", "backup", "--libvirt", d.name, f"{repo}::x", check=False, env=env)
    assert r.returncode == 2 and b"needs virsh" in r.stderr, r.stderr
    assert dv("list", repo).stdout == b""
    assert not d.checkpoints()
    assert_clean(d)


# --- a real, running guest -------------------------------------------------------


class LiveGuest(Guest):
    """vmkit's record-keeping guest, run by libvirt (only its console log is read)."""

    def __init__(self, dom: Domain) -> None:  # libvirt runs QEMU: no Guest.__init__
        assert dom.console is not None
        self.dom, self.console = dom, dom.console

    def alive(self) -> bool:
        return self.dom.lv.virsh("domstate", self.dom.name).stdout.strip() == "running"


@needs_guest
def test_running_guest_frozen_full_then_incremental_and_always_thawed(libvirt,  # noqa: F811
                                                                       tmp_path):
    w = libvirt.workdir()
    initrd = build_initramfs(os.path.join(w, "initrd.gz"))
    kern = os.path.join(w, "vmlinuz")  # /boot's is root's alone; QEMU runs as nobody
    shutil.copy(kernel() or "", kern)
    disk = make_guest_disk(os.path.join(w, "vm.qcow2"))
    d = Domain(libvirt, w, {"vda": disk}, boot=(kern, initrd))
    g = LiveGuest(d)
    try:
        g.wait_records(3, 600)
        repo = str(tmp_path / "repo")
        init_repo(repo)
        runs = []
        for name in ("b1", "b2"):
            before = g.records_announced()
            a = vm_backup(d, repo, name, "--guest-fsfreeze")["archives"][0]
            assert a["consistency"] == "application" and a["frozen"] >= 1, a
            runs.append((name, before, a))
            g.wait_records(before + 10)  # thawed: the guest writes on
        (_, _, a1), (_, _, a2) = runs
        assert (a1["mode"], a2["mode"]) == ("full", "incremental")
        # the second backup reads only the checkpoint's extents: little of a 64 MiB disk
        assert a2["stats"]["read"] <= a2["dirty"] < a2["size"] // 4, a2
        sys.stderr.write(f"libvirt vm backup 2: read {a2['stats']['read']} B, dirty "
                         f"{a2['dirty']} B, disk {a2['size']} B (first: read "
                         f"{a1['stats']['read']} B)\n")
        for name, before, _ in runs:
            check_records(records_in(repo, name, tmp_path, frozen=True), before)
        assert_clean(d)
        # SIGKILL while frozen: the watchdog process thaws the guest through libvirt
        code = ("import os, signal\n"
                "from diskvault.source.libvirt import LibvirtFreeze, Virsh\n"
                f"with LibvirtFreeze(Virsh({libvirt.uri!r}), {d.name!r}) as f:\n"
                "    assert f.frozen >= 1\n"
                "    os.kill(os.getpid(), signal.SIGKILL)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True)
        assert r.returncode == -signal.SIGKILL, r.stderr
        g.wait_records(g.records_announced() + 5, 120)
    finally:
        d.destroy()

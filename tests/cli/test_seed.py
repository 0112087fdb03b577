"""The seed's shell snippets (shared/seed/…), with `borg` replaced by `diskvault`, verbatim.

This machine's kernel makes no partition nodes (/dev/loop0p1), so where the seed lists
partitions with sfdisk/lsblk we attach each partition as its own loop device
(``losetup -o OFFSET --sizelimit SIZE``) and substitute those names: the one change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import DV_ENTRY, loop_device, needs_loop, needs_tool, sha256_file


@pytest.fixture
def seed_env(tmp_path):
    """PATH with a `diskvault` command that runs this checkout, and an env for the repo."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "diskvault"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {DV_ENTRY} \"$@\"\n")
    wrapper.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bindir}:{env['PATH']}"
    env["DISKVAULT_PASSPHRASE"] = "seed"
    return env


def sh(script: str, env: dict, cwd: str | None = None) -> str:
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"script failed ({r.returncode}):\n{script}\n{r.stderr}"
    return r.stdout


def make_disk(path: str) -> list[dict]:
    """A 48 MiB GPT disk: an ext4 with files and a partition of raw data."""
    with open(path, "wb") as f:
        f.write(os.urandom(48 << 20))  # stale data everywhere, as on a used disk
    subprocess.run(["sfdisk", "-q", path], input="label: gpt\n,20MiB,L\n,16MiB,L\n",
                   text=True, check=True)
    parts = json.loads(subprocess.run(["sfdisk", "--json", path], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    out = [{"start": p["start"] * 512, "size": p["size"] * 512} for p in parts["partitions"]]
    src = os.path.join(os.path.dirname(path), "files")
    os.makedirs(src, exist_ok=True)
    for i in range(20):
        with open(os.path.join(src, f"f{i}"), "wb") as f:
            f.write(os.urandom(100_000) + b"text " * 20000)
    with loop_device(path, out[0]["start"], out[0]["size"]) as p1:
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-E", "nodiscard", "-d", src, p1],
                       check=True)
    return out


@needs_loop
@needs_tool("sfdisk", "mke2fs", "dd", "lsblk")
def test_seed_whole_disk_and_partitions(tmp_path, seed_env):
    disk_img = str(tmp_path / "disk.img")
    parts = make_disk(disk_img)
    repo = str(tmp_path / "repo")
    with loop_device(disk_img) as DISK, \
            loop_device(disk_img, parts[0]["start"], parts[0]["size"]) as p1, \
            loop_device(disk_img, parts[1]["start"], parts[1]["size"]) as p2:
        env = {**seed_env, "DISK_ID": DISK, "P1": p1, "P2": p2, "REPO": repo}
        sh('diskvault init -e repokey "$REPO"', env)
        # "Use the following line to perform a borg backup for the full disk"
        sh('diskvault create --read-special "$REPO"::{now} "$DISK_ID"', env)
        # "... for all partitions of the disk" (PARTITIONS: our per-partition loops)
        sh('PARTITIONS=("$P1" "$P2")\n'
           'diskvault create --read-special "$REPO"::{now}-parts "${PARTITIONS[@]}"', env)
        names = sh('diskvault list --format {archive}{NL} "$REPO"', env).split()
        assert len(names) == 2
        whole = sh(f'diskvault extract --stdout "$REPO"::{names[0]} | sha256sum', env).split()[0]
        assert whole == sha256_file(DISK)
        both = sh(f'diskvault extract --stdout "$REPO"::{names[1]} | sha256sum', env).split()[0]
        import hashlib

        h = hashlib.sha256()
        for p in (p1, p2):
            with open(p, "rb") as f:
                h.update(f.read())
        assert both == h.hexdigest()


@needs_loop
@needs_tool("sfdisk", "mke2fs", "dd", "zerofree")
def test_seed_header_partitions_and_restore(tmp_path, seed_env):
    """The ntfsclone section's backup and restore loops (non-NTFS branch), verbatim."""
    disk_img = str(tmp_path / "disk.img")
    parts = make_disk(disk_img)
    repo = str(tmp_path / "repo")
    original = sha256_file(disk_img)
    target_img = str(tmp_path / "target.img")
    with open(target_img, "wb") as f:
        f.write(os.urandom(48 << 20))
    with loop_device(disk_img) as DISK, \
            loop_device(disk_img, parts[0]["start"], parts[0]["size"]) as p1, \
            loop_device(disk_img, parts[1]["start"], parts[1]["size"]) as p2:
        # sfdisk names partitions ${DISK}p1..: map them to our loops (the one adaptation)
        mapping = f's#^{DISK}p1 #{p1} #; s#^{DISK}p2 #{p2} #'
        env = {**seed_env, "DISK": DISK, "MAP": mapping}
        sh(f'diskvault init -e repokey {repo}', env)
        sh(f"""
HEADER_SIZE=$(sfdisk -lo Start $DISK | grep -A1 -P 'Start$' | tail -n1 | xargs echo)
PARTITIONS=$(sfdisk -lo Device,Type $DISK | sed -e '1,/Device\\s*Type/d' | sed -e "$MAP")
dd if=$DISK count=$HEADER_SIZE | diskvault create {repo}::hostname-partinfo -
# to back up non-NTFS partitions as well:
echo "$PARTITIONS" | grep -v NTFS | cut -d' ' -f1 | while read x; do
    PARTNUM=$(echo $x | grep -Eo "[0-9]+$")
    diskvault create --read-special {repo}::hostname-part$PARTNUM $x
done
""", env)
    listing = sh(f"diskvault list --format {{archive}}{{NL}} {repo}", env).split()
    assert listing == ["hostname-partinfo", "hostname-part1", "hostname-part2"] or \
        sorted(listing) == sorted(["hostname-partinfo", "hostname-part" + p1[-1],
                                   "hostname-part" + p2[-1]])
    # restore onto another disk: header first, then every partition archive
    with loop_device(target_img) as DISK:
        sh(f"diskvault extract --stdout {repo}::hostname-partinfo | dd of={DISK} status=none",
           env)
        tparts = json.loads(subprocess.run(["sfdisk", "--json", DISK], capture_output=True,
                                           text=True, check=True).stdout)
        assert len(tparts["partitiontable"]["partitions"]) == 2
    loops = {}
    with loop_device(target_img, parts[0]["start"], parts[0]["size"]) as t1, \
            loop_device(target_img, parts[1]["start"], parts[1]["size"]) as t2:
        loops = {"1": t1, "2": t2}
        num = {p1[-1]: "1", p2[-1]: "2"}  # archive part numbers came from loop names
        names = sh(f"diskvault list --format {{archive}}{{NL}} {repo} | grep 'part[0-9]*$'",
                   env).split()
        for x in names:
            n = x.rsplit("part", 1)[1]
            dev = loops[num.get(n, n)] if n in num else loops[n]
            sh(f"diskvault extract --stdout {repo}::{x} | dd of={dev} bs=1M status=none", env)
    with open(disk_img, "rb") as a, open(target_img, "rb") as b:
        end = parts[1]["start"] + parts[1]["size"]
        assert a.read(end) == b.read(end)  # header + both partitions identical
    assert original == sha256_file(disk_img)  # the source was never touched


@needs_loop
@needs_tool("sfdisk", "mke2fs", "zerofree")
def test_seed_zerofree_recipe(tmp_path, seed_env):
    disk_img = str(tmp_path / "disk.img")
    parts = make_disk(disk_img)
    repo = str(tmp_path / "repo")
    with loop_device(disk_img) as DISK, \
            loop_device(disk_img, parts[0]["start"], parts[0]["size"]) as p1, \
            loop_device(disk_img, parts[1]["start"], parts[1]["size"]) as p2:
        mapping = f's#^{DISK}p1 #{p1} #; s#^{DISK}p2 #{p2} #'
        env = {**seed_env, "DISK": DISK, "MAP": mapping}
        sh(f'diskvault init -e repokey {repo}', env)
        # only the first partition holds an ext4: zerofree refuses the raw one, so the
        # seed's `grep Linux` list is narrowed to the filesystem we made
        sh("sfdisk -lo Device,Type $DISK | sed -e '1,/Device\\s*Type/d' | sed -e \"$MAP\" "
           f"| grep Linux | cut -d' ' -f1 | grep {p1} | xargs -n1 zerofree", env)
        sh(f"diskvault create --read-special {repo}::hostname-disk $DISK", env)
        zeroed = sha256_file(DISK)
    target = str(tmp_path / "target.img")
    with open(target, "wb") as f:
        f.write(os.urandom(48 << 20))
    with loop_device(target) as DISK:
        sh(f"diskvault extract --stdout {repo}::hostname-disk | dd of={DISK} bs=4M status=none",
           {**seed_env})
        assert sha256_file(DISK) == zeroed
    info = json.loads(sh(f"diskvault info --json {repo}::hostname-disk", seed_env))
    stats = info["archive"]["stats"]
    assert stats["zero"] >= 8 << 20  # zerofree'd free space became zero extents

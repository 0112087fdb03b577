#!/usr/bin/env bash
# A real backup and restore with the default local repository:
# build an ext4 image, back it up, change it, back it up again, restore, prove identical.
set -euo pipefail
work=$(mktemp -d /tmp/diskvault-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
export DISKVAULT_PASSPHRASE=demo-passphrase

echo "== building a 256 MiB ext4 image with files (mke2fs -d, no root needed)"
mkdir src
cp -r /usr/share/doc src/doc 2>/dev/null || true
head -c 20M /dev/urandom > src/random.bin
truncate -s 256M fs.img
mke2fs -q -F -t ext4 -d src fs.img

echo "== diskvault init + first backup"
diskvault init -e repokey repo
diskvault create --stats repo::v1 fs.img

echo "== changing the filesystem (one new 4 MiB file), second backup"
head -c 4M /dev/urandom > new.bin
debugfs -w -R "write new.bin new.bin" fs.img >/dev/null 2>&1
diskvault create --stats repo::v2 fs.img

echo "== restoring v2 (sparse) and comparing"
mkdir restore
(cd restore && diskvault extract --sparse ../repo::v2)
cmp fs.img restore/fs.img
sha256sum fs.img restore/fs.img
e2fsck -fn restore/fs.img >/dev/null && echo "e2fsck: clean"
diskvault list repo
diskvault info repo
echo "== OK: restored image is byte-identical"

"""Inventory of block devices from sysfs, without udev (no /dev/disk/by-id needed).

Pinning down the right disk matters most: ``find_by_serial`` refuses to guess when no
disk or several disks carry a serial. Loop devices have no serial; their backing file
is their identity. ``is_mounted`` answers "may I overwrite this?" for a device, a
partition or an image file, counting any mounted (or swap) device whose bytes overlap.

Tests point ``DISKVAULT_SYSFS_ROOT`` (or the ``sysfs_root`` argument) at a fake /sys tree
whose entries name real loop devices in their ``dev`` files.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import subprocess
from dataclasses import asdict, dataclass, field

from ..errors import DiskError, DiskvaultError, SourceError
from .partitions import read_table
from .reader import FileRangeReader

SYSFS_ENV = "DISKVAULT_SYSFS_ROOT"
_SECTOR = 512  # sysfs sizes and partition starts are always in 512-byte units
_RAM_MAJOR = 1  # brd ramdisks: lsblk hides them too


@dataclass
class DiskPartition:
    number: int
    path: str | None  # device node; None when the kernel made none (a loop without partscan)
    start: int  # bytes from the start of the disk
    size: int
    type_id: str = ""  # GPT type GUID or MBR id "0x83"
    type_name: str = ""
    kind: str = "primary"  # "primary", "extended" (an MBR container) or "logical"
    fs_type: str | None = None
    mountpoints: list[str] = field(default_factory=list)


@dataclass
class Disk:
    name: str  # kernel name: sda, nvme0n1, loop3
    path: str  # device node
    major: int
    minor: int
    size: int
    sector_size: int
    model: str | None = None
    serial: str | None = None
    wwid: str | None = None
    removable: bool = False
    rotational: bool = False
    read_only: bool = False
    backing_file: str | None = None  # loop devices
    loop_offset: int = 0
    loop_sizelimit: int = 0
    label: str | None = None  # partition table: "gpt", "dos" or None
    disk_id: str | None = None
    fs_type: str | None = None  # a filesystem on the whole disk (no table)
    mountpoints: list[str] = field(default_factory=list)  # mounts not inside a partition
    partitions: list[DiskPartition] = field(default_factory=list)
    table_notes: list[str] = field(default_factory=list)
    table_error: str | None = None

    @property
    def identity(self) -> str | None:
        """What pins this disk down: its serial, else its WWID, else a loop's backing file."""
        return self.serial or self.wwid or self.backing_file

    def to_dict(self) -> dict:
        d = asdict(self)
        d["identity"] = self.identity
        return d


# --- sysfs --------------------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").strip().strip("\0").strip() or None
    except OSError:
        return None


def _read_int(path: str, default: int = 0) -> int:
    v = _read(path)
    try:
        return int(v) if v is not None else default
    except ValueError:
        return default


def _vpd_serial(path: str) -> str | None:
    """Unit serial number from SCSI VPD page 0x80: 4 header bytes, then ASCII."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if len(raw) < 4 or raw[1] != 0x80:
        return None
    n = int.from_bytes(raw[2:4], "big")
    return raw[4 : 4 + n].decode("ascii", "replace").strip(" \0") or None


def _serial(sysdir: str) -> str | None:
    return (_read(f"{sysdir}/device/serial") or _read(f"{sysdir}/serial")
            or _vpd_serial(f"{sysdir}/device/vpd_pg80"))


def _wwid(sysdir: str) -> str | None:
    return _read(f"{sysdir}/wwid") or _read(f"{sysdir}/device/wwid")


def _dev_numbers(sysdir: str) -> tuple[int, int] | None:
    v = _read(f"{sysdir}/dev")
    m = re.fullmatch(r"(\d+):(\d+)", v or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


# --- mounts and overlap ---------------------------------------------------------------

# An extent is a byte range of something at the bottom of the device stack: a whole
# disk ("dev", major, minor) or a loop's backing file ("file", st_dev, st_ino). A device
# is described by every extent it maps to, so a loop on an image range, a partition and
# its disk are comparable.
_Extent = tuple[tuple, int, int]


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


class Inventory:
    """Reads sysfs (real or fake), /proc/self/mountinfo and /proc/swaps."""

    def __init__(self, sysfs_root: str | None = None, dev_root: str = "/dev",
                 mountinfo: str = "/proc/self/mountinfo", swaps: str = "/proc/swaps") -> None:
        self.sys = sysfs_root or os.environ.get(SYSFS_ENV) or "/sys"
        self.dev_root = dev_root
        self.mountinfo = mountinfo
        self.swaps = swaps
        self._nodes: dict[tuple[int, int], str] | None = None
        self._parts = self._scan_partitions()

    # device nodes -------------------------------------------------------------------

    def node_for(self, name: str, dev: tuple[int, int]) -> str | None:
        """The /dev node of a device: /dev/NAME if it is that device, else any node with it."""
        guess = os.path.join(self.dev_root, name)
        if self._rdev(guess) == dev:
            return guess
        if self._nodes is None:
            self._nodes = {}
            with contextlib.suppress(OSError):
                for entry in sorted(os.listdir(self.dev_root)):
                    p = os.path.join(self.dev_root, entry)
                    rdev = self._rdev(p)
                    if rdev is not None:
                        self._nodes.setdefault(rdev, p)
        return self._nodes.get(dev)

    @staticmethod
    def _rdev(path: str) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISBLK(st.st_mode):
            return None
        return os.major(st.st_rdev), os.minor(st.st_rdev)

    def _scan_partitions(self) -> dict[tuple[int, int], tuple[str, str, int, int, int]]:
        """dev → (disk name, own name, number, start byte, size byte) of sysfs partitions."""
        out = {}
        block = f"{self.sys}/block"
        for disk in self._block_names():
            with contextlib.suppress(OSError):
                for sub in os.listdir(f"{block}/{disk}"):
                    d = f"{block}/{disk}/{sub}"
                    dev = _dev_numbers(d)
                    if dev and os.path.exists(f"{d}/partition"):
                        out[dev] = (disk, sub, _read_int(f"{d}/partition"),
                                    _read_int(f"{d}/start") * _SECTOR,
                                    _read_int(f"{d}/size") * _SECTOR)
        return out

    def _block_names(self) -> list[str]:
        try:
            return sorted(os.listdir(f"{self.sys}/block"))
        except OSError:
            return []

    def _disk_by_dev(self, dev: tuple[int, int]) -> str | None:
        for name in self._block_names():
            if _dev_numbers(f"{self.sys}/block/{name}") == dev:
                return name
        return None

    # extents --------------------------------------------------------------------------

    def extents_of_dev(self, dev: tuple[int, int], depth: int = 0) -> list[_Extent]:
        """Every extent the block device ``dev`` maps to (itself, parent disk, loop file)."""
        if dev in self._parts:
            disk, _, _, start, size = self._parts[dev]
            ddev = _dev_numbers(f"{self.sys}/block/{disk}")
            own = [(("dev", *dev), 0, size)]
            return own + (self._shift(self.extents_of_dev(ddev, depth + 1), start, size)
                          if ddev and depth < 8 else [])
        name = self._disk_by_dev(dev)
        size = _read_int(f"{self.sys}/block/{name}/size") * _SECTOR if name else 1 << 62
        out: list[_Extent] = [(("dev", *dev), 0, size or 1 << 62)]
        backing = _read(f"{self.sys}/block/{name}/loop/backing_file") if name else None
        if backing and depth < 8:
            off = _read_int(f"{self.sys}/block/{name}/loop/offset")
            out += self._shift(self.extents_of_path(backing, depth + 1), off, size)
        return out

    def extents_of_path(self, path: str, depth: int = 0) -> list[_Extent]:
        """Extents of a block device node or a regular (image) file."""
        try:
            st = os.stat(path)
        except OSError:
            return [(("path", path), 0, 1 << 62)]  # a deleted backing file: match by name only
        if stat.S_ISBLK(st.st_mode):
            return self.extents_of_dev((os.major(st.st_rdev), os.minor(st.st_rdev)), depth)
        return [(("file", st.st_dev, st.st_ino), 0, st.st_size)]

    @staticmethod
    def _shift(extents: list[_Extent], start: int, size: int) -> list[_Extent]:
        return [(base, s + start, min(e, s + start + size)) for base, s, e in extents]

    def _slaves(self, dev: tuple[int, int]) -> list[tuple[int, int]]:
        """Devices under a device-mapper/md device: mounting it uses them."""
        try:
            names = os.listdir(f"{self.sys}/dev/block/{dev[0]}:{dev[1]}/slaves")
        except OSError:
            return []
        devs = []
        for n in names:
            d = _dev_numbers(f"{self.sys}/dev/block/{dev[0]}:{dev[1]}/slaves/{n}")
            if d:
                devs.append(d)
        return devs

    def in_use(self) -> list[tuple[str, list[_Extent]]]:
        """(mountpoint or "[SWAP]", extents) of every mounted or swapping block device."""
        out = []
        for mountpoint, devs in self._mounted_devices():
            ext: list[_Extent] = []
            todo, seen = list(devs), set()
            while todo:
                d = todo.pop()
                if d in seen:
                    continue
                seen.add(d)
                ext += self.extents_of_dev(d)
                todo += self._slaves(d)
            out.append((mountpoint, ext))
        return out

    def _mounted_devices(self) -> list[tuple[str, list[tuple[int, int]]]]:
        out = []
        with contextlib.suppress(OSError), open(self.mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rest = left.split(), right.split()
                if len(fields) < 5:
                    continue
                major, minor = (int(x) for x in fields[2].split(":"))
                devs = [(major, minor)] if major else []
                source = _unescape(rest[1]) if len(rest) > 1 else ""
                if source.startswith("/dev/") and (rdev := self._rdev(source)):
                    devs.append(rdev)  # btrfs reports an anonymous 0:N device
                if devs:
                    out.append((_unescape(fields[4]), devs))
        with contextlib.suppress(OSError), open(self.swaps) as f:
            for line in list(f)[1:]:
                name = _unescape(line.split()[0]) if line.strip() else ""
                if rdev := self._rdev(name):
                    out.append(("[SWAP]", [rdev]))
        return out

    def mounts_overlapping(self, extents: list[_Extent],
                           in_use: list[tuple[str, list[_Extent]]] | None = None) -> list[str]:
        found = []
        for mountpoint, used in self.in_use() if in_use is None else in_use:
            if _overlap(extents, used) and mountpoint not in found:
                found.append(mountpoint)
        return found

    # disks ----------------------------------------------------------------------------

    def disks(self, probe: bool = True) -> list[Disk]:
        """Every whole block device with a size (unattached loops and ramdisks left out)."""
        in_use = self.in_use() if probe else []
        out = []
        for name in self._block_names():
            disk = self._disk(name)
            if disk is None:
                continue
            if probe:
                self._fill_partitions(disk, in_use)
            out.append(disk)
        return out

    def _disk(self, name: str) -> Disk | None:
        d = f"{self.sys}/block/{name}"
        dev = _dev_numbers(d)
        size = _read_int(f"{d}/size") * _SECTOR
        if dev is None or size == 0 or dev[0] == _RAM_MAJOR or _read_int(f"{d}/hidden"):
            return None
        backing = _read(f"{d}/loop/backing_file")
        return Disk(
            name=name, path=self.node_for(name, dev) or os.path.join(self.dev_root, name),
            major=dev[0], minor=dev[1], size=size,
            sector_size=_read_int(f"{d}/queue/logical_block_size", _SECTOR),
            model=_read(f"{d}/device/model"), serial=_serial(d), wwid=_wwid(d),
            removable=bool(_read_int(f"{d}/removable")),
            rotational=bool(_read_int(f"{d}/queue/rotational")),
            read_only=bool(_read_int(f"{d}/ro")), backing_file=backing,
            loop_offset=_read_int(f"{d}/loop/offset") if backing else 0,
            loop_sizelimit=_read_int(f"{d}/loop/sizelimit") if backing else 0,
        )

    def _fill_partitions(self, disk: Disk, in_use: list[tuple[str, list[_Extent]]]) -> None:
        """Partitions from the table (types, numbers) joined with sysfs (device nodes)."""
        nodes = {num: (self.node_for(name, dev), start, size)
                 for dev, (parent, name, num, start, size) in self._parts.items()
                 if parent == disk.name}
        disk_ext = self.extents_of_dev((disk.major, disk.minor))
        parts: list[DiskPartition] = []
        try:
            table = read_table(disk.path, disk.sector_size)
        except DiskvaultError as e:
            disk.table_error = str(e)
            for num, (node, start, size) in sorted(nodes.items()):
                parts.append(DiskPartition(num, node, start, size))
        else:
            disk.label, disk.disk_id, disk.table_notes = table.label, table.disk_id, table.notes
            for p in table.partitions:
                known = nodes.get(p.number)
                path = known[0] if known and known[1] == p.start else None
                parts.append(DiskPartition(p.number, path, p.start, p.size, p.type_id,
                                           p.type_name, p.kind))
        shown: set[str] = set()
        for part in parts:
            if part.kind == "extended":
                continue  # a container: its logicals carry the filesystems
            part.fs_type = probe_fs(disk.path, part.start, part.size)
            ext = Inventory._shift(disk_ext, part.start, part.size)
            part.mountpoints = self.mounts_overlapping(ext, in_use)
            shown.update(part.mountpoints)
        disk.partitions = parts
        if not parts and disk.table_error is None:
            disk.fs_type = probe_fs(disk.path, 0, disk.size)
        disk.mountpoints = [m for m in self.mounts_overlapping(disk_ext, in_use) if m not in shown]

    def find_by_serial(self, serial: str) -> Disk:
        want = serial.strip()
        if not want:
            raise DiskError("an empty serial matches nothing")
        disks = self.disks(probe=False)
        hits = [d for d in disks if want in (d.serial, d.wwid) or (
            d.backing_file and _same_file(want, d.backing_file))]
        if len(hits) == 1:
            return hits[0]
        if hits:
            names = ", ".join(d.path for d in hits)
            raise DiskError(f"serial {want!r} matches {len(hits)} disks ({names}); refusing "
                            "to guess which one to use")
        near = [f"{d.path} ({d.serial})" for d in disks if d.serial and want in d.serial]
        hint = f"; partial matches, not used: {', '.join(near)}" if near else ""
        raise DiskError(f"no disk has serial {want!r}{hint} (see `diskvault disk list`)")

    def is_mounted(self, path: str) -> bool:
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            raise SourceError(f"{path}: {e.strerror}") from None
        if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
            raise SourceError(f"{path} is neither a block device nor an image file")
        return bool(self.mounts_overlapping(self.extents_of_path(path)))


def _overlap(a: list[_Extent], b: list[_Extent]) -> bool:
    return any(ba == bb and sa < eb and sb < ea for ba, sa, ea in a for bb, sb, eb in b)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a == b


def probe_fs(path: str, offset: int, size: int) -> str | None:
    """Filesystem type in a byte range of a disk: blockmap.probe if built, else blkid."""
    try:
        from ..blockmap.probe import detect_fs  # another layer's module, optional here
    except ImportError:
        return _blkid_type(path, offset, size)
    try:
        reader = FileRangeReader.open(path, offset, size)
    except OSError:
        return None
    try:
        return detect_fs(reader)
    except (OSError, DiskvaultError):
        return None
    finally:
        reader.close()


def _blkid_type(path: str, offset: int, size: int) -> str | None:
    cmd = ["blkid", "-p", "-O", str(offset), "-S", str(size), "-o", "export", path]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in r.stdout.splitlines():
        if line.startswith("TYPE="):
            return line[5:]
    return None


# --- module-level API (the real /sys unless DISKVAULT_SYSFS_ROOT says otherwise) -------


def list_disks(sysfs_root: str | None = None, probe: bool = True) -> list[Disk]:
    return Inventory(sysfs_root).disks(probe)


def find_by_serial(serial: str, sysfs_root: str | None = None) -> Disk:
    """The one disk whose serial (or WWID, or loop backing file) is ``serial``."""
    return Inventory(sysfs_root).find_by_serial(serial)


def is_mounted(path_or_dev: str, sysfs_root: str | None = None) -> bool:
    """True if any mounted or swap device shares bytes with this device or image file."""
    return Inventory(sysfs_root).is_mounted(path_or_dev)

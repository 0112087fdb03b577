"""Which filesystem is on a partition, and its block map — or "all used" and why.

Identification reads magic numbers directly (no blkid subprocess per partition) and, like
``blkid -p``, refuses to guess when two different signatures are present. Parsers live
in sibling modules with ``detect(reader)`` / ``build(reader)``; they are imported by name
so that a parser not written yet simply means "all used" instead of an import error.
Whatever goes wrong in a parser, the caller gets a map that reads everything, with a note.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from types import ModuleType

from diskvault.blockmap import btrfs, ext, fat, ntfs, swap, xfs
from diskvault.blockmap.base import BlockMap, RangeReader, packed_len
from diskvault.errors import BlockMapError

# fs type → parser module; a recognised type without one (LVM, exFAT) is read whole
PARSERS: dict[str, ModuleType] = {
    "ext2": ext, "ext3": ext, "ext4": ext, "jbd": ext,
    "ntfs": ntfs, "vfat": fat, "xfs": xfs, "btrfs": btrfs, "swap": swap,
}
_ENCRYPTED = {"crypto_LUKS"}


def _is_luks(r: RangeReader) -> bool:
    return r.pread(0, 6) == b"LUKS\xba\xbe"


def _is_xfs(r: RangeReader) -> bool:
    return r.pread(0, 4) == b"XFSB"


def _is_btrfs(r: RangeReader) -> bool:
    return r.pread(0x10040, 8) == b"_BHRfS_M"


def _is_ntfs(r: RangeReader) -> bool:
    return r.pread(3, 8) == b"NTFS    "


def _is_exfat(r: RangeReader) -> bool:
    return r.pread(3, 8) == b"EXFAT   "


def _is_lvm(r: RangeReader) -> bool:
    # the label may sit in any of the first four sectors
    return any(r.pread(512 * s, 8) == b"LABELONE" for s in range(4))


def _is_vfat(r: RangeReader) -> bool:
    """A FAT boot sector: 0x55AA, a "FATxx" type string and a sane BPB."""
    bs = r.pread(0, 512)
    if len(bs) < 512 or bs[510:512] != b"\x55\xaa":
        return False
    if not (bs[54:59] in (b"FAT12", b"FAT16") or bs[82:87] == b"FAT32"):
        return False
    sector, per_cluster, reserved, nfats = struct.unpack_from("<HBHB", bs, 11)
    return (
        sector in (512, 1024, 2048, 4096)
        and per_cluster in (1, 2, 4, 8, 16, 32, 64, 128)
        and reserved >= 1
        and nfats in (1, 2)
    )


def _ext_type(r: RangeReader) -> str | None:
    return ext.fs_type(r)


_SIGNATURES: tuple[tuple[str, Callable[[RangeReader], bool | str | None]], ...] = (
    ("crypto_LUKS", _is_luks),
    ("LVM2_member", _is_lvm),
    ("ext", _ext_type),
    ("xfs", _is_xfs),
    ("btrfs", _is_btrfs),
    ("ntfs", _is_ntfs),
    ("exfat", _is_exfat),
    ("vfat", _is_vfat),
    ("swap", swap.detect),
)


def _identify(reader: RangeReader) -> tuple[str | None, str]:
    """(type, "") or (None, why not)."""
    found: list[str] = []
    for name, probe in _SIGNATURES:
        try:
            hit = probe(reader)
        except Exception as e:  # unreadable or odd device: no guess is safe then
            return None, f"probing for {name} failed ({type(e).__name__}: {e}): all blocks read"
        if hit:
            found.append(hit if isinstance(hit, str) else name)
    if not found:
        return None, "unknown filesystem: all blocks read"
    if len(found) > 1:
        return None, f"ambiguous signatures ({', '.join(found)}): all blocks read"
    return found[0], ""


def detect_fs(reader: RangeReader) -> str | None:
    """The filesystem type name (blkid's names), or None if unknown or ambiguous."""
    return _identify(reader)[0]


def block_map_for(reader: RangeReader) -> BlockMap:
    """The used-block map of the filesystem on ``reader``; on any doubt, all used + note."""
    fs_type, why = _identify(reader)
    if fs_type is None:
        return BlockMap.all_used(reader.size, "unknown", note=why)
    if fs_type in _ENCRYPTED:
        return BlockMap.all_used(reader.size, fs_type, note="encrypted (LUKS): all blocks read")
    module = PARSERS.get(fs_type)
    try:
        if module is None:
            return BlockMap.all_used(
                reader.size, fs_type, note=f"no block map parser for {fs_type}: all blocks read"
            )
        if not module.detect(reader):
            raise BlockMapError(f"{fs_type} signature found but its parser rejects it")
        bmap = module.build(reader)
        _check_shape(bmap, reader)
    except BlockMapError as e:
        note = str(e) if str(e).endswith("all blocks read") else f"{e}: all blocks read"
        return BlockMap.all_used(reader.size, fs_type, note=note)
    except Exception as e:  # parser bug or hostile input: never fail the backup over it
        return BlockMap.all_used(
            reader.size, fs_type,
            note=f"{fs_type} parser failed ({type(e).__name__}: {e}): all blocks read",
        )
    bmap.fs_type = fs_type
    return bmap


def _check_shape(bmap: object, reader: RangeReader) -> None:
    """A map that does not cover exactly this device cannot be trusted."""
    if (
        not isinstance(bmap, BlockMap)
        or bmap.size != reader.size
        or bmap.block_size <= 0
        or bmap.bits.dtype.kind != "u"
        or bmap.bits.itemsize != 1
        or len(bmap.bits) != packed_len(bmap.size // bmap.block_size)
    ):
        raise BlockMapError("parser returned a map that does not fit the device")

"""The repository: config, keys, manifest, archives metadata, chunk index, packs.

Storage names::

    config              msgpack, not encrypted: format version, repo id, encryption mode
    keys/repokey        passphrase-wrapped key (repokey mode)
    manifest            sealed; archive list + serial (see manifest.py)
    archives/<hex>      sealed archive metadata (msgpack dict, opaque here)
    index/<hex>         sealed index segment: the chunks of the packs one session wrote
    packs/<hh>/<hex>    pack files (see pack.py)
    locks/<id>          lock objects (see lock.py)

Write order is packs → index segment → archive metadata → manifest, each durable
before the next is written, so a crash anywhere leaves every committed archive intact;
packs without an index segment are found by listing and read by their TOC.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import blake3
import msgpack

from ..crypto.aead import AesGcmCipher, Cipher, PlainCipher
from ..crypto.ids import IdHasher
from ..crypto.keys import (
    KeyMaterial,
    keyfile_text,
    parse_keyfile_text,
    unwrap_key,
    wrap_key,
)
from ..errors import (
    AppendOnlyError,
    ArchiveExists,
    ArchiveNotFound,
    IntegrityError,
    KeyFileMissing,
    ObjectMissing,
    RepositoryNotFound,
    UnsupportedVersion,
    UsageError,
)
from ..storage.base import Store
from . import security
from .compression import Compression
from .index import ChunkIndex
from .lock import EXCLUSIVE, SHARED, Lock
from .manifest import MANIFEST_AAD, ArchiveRef, Manifest
from .objects import ObjectCodec
from .pack import pack_key, read_toc

if TYPE_CHECKING:
    from .writer import ChunkWriter

FORMAT_VERSION = 1
ENCRYPTION_MODES = ("none", "repokey", "keyfile")
DEFAULT_PACK_SIZE = 32 << 20
PassphraseFn = Callable[[bool], str]  # argument: True when creating (confirm)


def keys_dir() -> str:
    return os.environ.get("DISKVAULT_KEYS_DIR") or os.path.expanduser("~/.config/diskvault/keys")


def keyfile_path(repo_id: bytes) -> str:
    return os.path.join(keys_dir(), repo_id.hex())


class Repository:
    def __init__(self, store: Store, config: dict, config_raw: bytes, km: KeyMaterial) -> None:
        self.store = store
        self.config = config
        self.config_hash = blake3.blake3(config_raw).digest()
        self.id: bytes = config["repo_id"]
        self.encryption: str = config["encryption"]
        self.append_only: bool = bool(config.get("append_only", False))
        self.pack_size: int = int(config.get("pack_size", DEFAULT_PACK_SIZE))
        cipher: Cipher = PlainCipher() if self.encryption == "none" else AesGcmCipher(km.enc_key)
        self.id_hash = IdHasher(km.id_key)
        self.codec = ObjectCodec(cipher, self.id_hash, Compression.parse("lz4"))
        self.key = km
        self._index: ChunkIndex | None = None
        self._lock: Lock | None = None
        self.manifest = Manifest()

    # --- creation and opening -------------------------------------------------

    @classmethod
    def init(cls, store: Store, encryption: str, passphrase_fn: PassphraseFn,
             append_only: bool = False, pack_size: int = DEFAULT_PACK_SIZE) -> Repository:
        if encryption not in ENCRYPTION_MODES:
            raise UsageError(f"unknown encryption mode {encryption!r}: use none, repokey, keyfile")
        store.create()
        repo_id = os.urandom(32)
        km = KeyMaterial.generate()
        config = {"version": FORMAT_VERSION, "repo_id": repo_id, "encryption": encryption,
                  "append_only": append_only, "pack_size": pack_size, "created": time.time()}
        if encryption == "none":
            config["id_key"] = km.id_key  # not secret without encryption; ids are checksums
        else:
            blob = wrap_key(km, repo_id, passphrase_fn(True))
            if encryption == "repokey":
                store.store("keys/repokey", blob)
            else:
                path = keyfile_path(repo_id)
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                with open(path, "w") as f:
                    os.fchmod(f.fileno(), 0o600)
                    f.write(keyfile_text(blob, repo_id))
        raw = msgpack.packb(config)
        store.store("config", raw)
        repo = cls(store, config, raw, km)
        repo.manifest = Manifest(config_hash=repo.config_hash)
        repo._write_manifest(repo.manifest)
        return repo

    @staticmethod
    def read_config(store: Store) -> tuple[dict, bytes]:
        try:
            raw = store.load("config")
        except ObjectMissing:
            raise RepositoryNotFound(store.location) from None
        try:
            config = msgpack.unpackb(raw)
            version = config["version"]
        except Exception:  # noqa: BLE001
            raise IntegrityError("repository config is damaged") from None
        if version != FORMAT_VERSION:
            raise UnsupportedVersion("repository", version, FORMAT_VERSION)
        if config.get("encryption") not in ENCRYPTION_MODES \
                or len(config.get("repo_id", b"")) != 32:
            raise IntegrityError("repository config is damaged")
        return config, raw

    @classmethod
    def open(cls, store: Store, passphrase_fn: PassphraseFn, lock: str | None = SHARED,
             lock_wait: float = 1.0) -> Repository:
        if not store.exists():
            raise RepositoryNotFound(store.location)
        config, raw = cls.read_config(store)
        km = cls._load_key(store, config, passphrase_fn)
        repo = cls(store, config, raw, km)
        if lock:
            repo._lock = Lock(store, lock, lock_wait).acquire()
        try:
            repo.manifest = repo.load_manifest()
        except BaseException:
            repo.close()
            raise
        return repo

    @staticmethod
    def _load_key(store: Store, config: dict, passphrase_fn: PassphraseFn) -> KeyMaterial:
        mode, repo_id = config["encryption"], config["repo_id"]
        if mode == "none":
            return KeyMaterial(enc_key=b"", id_key=config["id_key"])
        if mode == "repokey":
            try:
                blob = store.load("keys/repokey")
            except ObjectMissing:
                raise IntegrityError("repository key (keys/repokey) is missing") from None
        else:
            path = keyfile_path(repo_id)
            try:
                with open(path) as f:
                    file_id, blob = parse_keyfile_text(f.read())
            except FileNotFoundError:
                raise KeyFileMissing(path) from None
            if file_id != repo_id:
                raise IntegrityError(f"key file {path} belongs to another repository")
        return unwrap_key(blob, repo_id, passphrase_fn(False))

    def close(self) -> None:
        if self._lock:
            self._lock.release()
            self._lock = None
        self.store.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- manifest ---------------------------------------------------------------

    def load_manifest(self) -> Manifest:
        try:
            blob = self.store.load("manifest")
        except ObjectMissing:
            raise IntegrityError("manifest is missing (run 'check --repair')") from None
        m = Manifest.from_bytes(self.codec.open(MANIFEST_AAD, blob, "manifest"))
        if self.encryption != "none" and m.config_hash != self.config_hash:
            raise IntegrityError("repository config does not match the manifest (tampered?)")
        security.check_serial(self.id, m.serial, self.encryption != "none")
        security.remember_serial(self.id, m.serial)
        return m

    def _write_manifest(self, m: Manifest) -> None:
        m.config_hash = self.config_hash
        m.bump()
        self.store.store("manifest", self.codec.seal(MANIFEST_AAD, m.to_bytes()))
        security.remember_serial(self.id, m.serial)

    def update_manifest(self, change: Callable[[Manifest], None]) -> Manifest:
        """Read-modify-write the manifest under its own short exclusive lock.

        The lock serialises concurrent writers (also on object stores without an
        atomic rename); ``change`` is applied to the freshest manifest.
        """
        with Lock(self.store, EXCLUSIVE, lock_wait=120.0, namespace="locks-manifest"):
            m = self.load_manifest()
            change(m)
            self._write_manifest(m)
        self.manifest = m
        return m

    # --- archives ---------------------------------------------------------------

    def archive_ref(self, name: str) -> ArchiveRef:
        ref = self.manifest.archives.get(name)
        if ref is None:
            raise ArchiveNotFound(name)
        return ref

    def load_archive(self, ref: ArchiveRef) -> dict:
        try:
            blob = self.store.load(f"archives/{ref.id.hex()}")
        except ObjectMissing:
            raise IntegrityError(f"metadata of archive {ref.name!r} is missing") from None
        data = self.codec.open(ref.id, blob, f"archive {ref.name!r}")
        try:
            return msgpack.unpackb(data, strict_map_key=False)
        except Exception:  # noqa: BLE001
            raise IntegrityError(f"archive {ref.name!r}: metadata is malformed") from None

    def commit_archive(self, name: str, meta: dict, writer: ChunkWriter | None) -> ArchiveRef:
        """Make an archive durable and visible: packs → index → metadata → manifest."""
        if writer is not None:
            writer.commit()
        archive_id = os.urandom(32)
        self.store.store(f"archives/{archive_id.hex()}",
                         self.codec.seal(archive_id, msgpack.packb(meta)))
        ref = ArchiveRef(name, archive_id, float(meta.get("time", time.time())))

        def add(m: Manifest) -> None:
            if name in m.archives:
                raise ArchiveExists(name)
            m.archives[name] = ref

        self.update_manifest(add)
        return ref

    def delete_archives(self, names: list[str]) -> None:
        if self.append_only:
            raise AppendOnlyError("delete")

        def drop(m: Manifest) -> None:
            for n in names:
                if n not in m.archives:
                    raise ArchiveNotFound(n)
            for n in names:
                del m.archives[n]

        old = [self.archive_ref(n) for n in names]
        self.update_manifest(drop)
        for ref in old:  # metadata goes only after the manifest no longer names it
            try:
                self.store.delete(f"archives/{ref.id.hex()}")
            except ObjectMissing:
                pass

    def rename_archive(self, old: str, new: str) -> None:
        if self.append_only:
            raise AppendOnlyError("rename")

        def ren(m: Manifest) -> None:
            if old not in m.archives:
                raise ArchiveNotFound(old)
            if new in m.archives:
                raise ArchiveExists(new)
            ref = m.archives.pop(old)
            m.archives[new] = ArchiveRef(new, ref.id, ref.time)

        self.update_manifest(ren)

    # --- chunks -----------------------------------------------------------------

    @property
    def index(self) -> ChunkIndex:
        if self._index is None:
            self._index = self.load_index()
        return self._index

    def load_index(self) -> ChunkIndex:
        """Merge every index segment, then add the TOCs of packs no segment covers."""
        idx = ChunkIndex()
        for name, _ in list(self.store.list("index")):
            try:
                blob = self.store.load(name)
            except ObjectMissing:
                continue  # merged into a newer segment meanwhile
            aad = name.encode()
            idx.update(ChunkIndex.from_bytes(self.codec.open(aad, blob, name), name))
        known = idx.pack_names()
        for key, size in list(self.store.list("packs")):
            pack = key.rsplit("/", 1)[-1]
            if pack in known:
                continue
            try:
                for e in read_toc(self.store.load, pack, size, self.codec):
                    idx.add(e.id, pack, e.offset, e.length, e.plain_size)
            except (IntegrityError, ObjectMissing):
                continue  # an unreadable orphan pack is only garbage; check reports it
        return idx

    def get_chunk(self, chunk_id: bytes) -> bytes:
        loc = self.index.get(chunk_id)
        if loc is None:
            raise ObjectMissing(f"chunk {chunk_id.hex()[:16]}")
        blob = self.store.load(pack_key(loc.pack), loc.offset, loc.length)
        if len(blob) != loc.length:
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]}: pack {loc.pack[:16]} is truncated")
        return self.codec.open_chunk(chunk_id, blob)

    def writer(self, upload_threads: int | None = None) -> ChunkWriter:
        from .writer import ChunkWriter

        if upload_threads is None:
            upload_threads = getattr(self.store, "upload_concurrency", 2)
        return ChunkWriter(self, upload_threads)

    def write_index_segment(self, idx: ChunkIndex) -> str:
        name = f"index/{os.urandom(16).hex()}"
        self.store.store(name, self.codec.seal(name.encode(), idx.to_bytes()))
        return name


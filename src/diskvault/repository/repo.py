"""The repository: config, keys, manifest, archives metadata, chunk index, packs.

Storage names::

    config              msgpack, not encrypted: format version, repo id, encryption mode
    keys/repokey        passphrase-wrapped key (repokey mode)
    manifest            sealed; archive list + serial (see manifest.py)
    archives/<hex>      sealed archive metadata (msgpack dict, opaque here)
    index/<hex>         sealed index segment: the chunks of the packs one session wrote
    packs/<hh>/<hex>    pack files (see pack.py)
    locks/<id>          lock objects (see lock.py); locks-manifest/<id> for manifest updates
    quarantine/...      damaged objects ``check --repair`` took out of use (never read)

Write order is packs → index segment → archive metadata → manifest, each durable
before the next is written, so a crash anywhere leaves every committed archive intact;
packs without an index segment are found by listing and read by their TOC. Removal
runs the other way (manifest → archive metadata; index segments → packs), so no index
segment ever names a pack that is gone.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import blake3
import msgpack

from ..crypto.aead import AesGcmCipher, Cipher, PlainCipher
from ..crypto.ids import chunker_seed, id_hasher
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
    UnencryptedWithKeyfile,
    UnsupportedVersion,
    UsageError,
)
from ..storage.base import Store
from . import security
from .cache import RepoCache
from .compression import Compression
from .index import ChunkIndex
from .lock import EXCLUSIVE, SHARED, Lock
from .manifest import MANIFEST_AAD, ArchiveRef, Manifest
from .objects import ObjectCodec
from .pack import pack_key

if TYPE_CHECKING:
    from .writer import ChunkWriter

# Version 2: FastCDC keyed from the id key, `delta` extents. Version 3 (new repositories):
# chunk ids made from the 4 KiB block digests (crypto/ids.py). Older repositories stay
# readable and writable at their version (no keyed FastCDC or deltas in 1, plain keyed
# ids in 1 and 2), so an older diskvault that shares them keeps working; it refuses a
# repository of a version it does not know.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
ENCRYPTION_MODES = ("none", "repokey", "keyfile")
DEFAULT_PACK_SIZE = 32 << 20
PassphraseFn = Callable[[bool], str]  # argument: True when creating (confirm)
# Where the repository's random ids come from (repo id, keys, session ids, archive ids,
# index segment names). Always os.urandom, except in tests that replay a seeded case in
# process: session ids keep AES-GCM nonces unique, so nothing else may pass another.
RandomBytes = Callable[[int], bytes]


def _is_key(v: object) -> bool:
    return isinstance(v, bytes) and len(v) == 32


def keys_dir() -> str:
    return os.environ.get("DISKVAULT_KEYS_DIR") or os.path.expanduser("~/.config/diskvault/keys")


def keyfile_path(repo_id: bytes) -> str:
    return os.path.join(keys_dir(), repo_id.hex())


class Repository:
    def __init__(self, store: Store, config: dict, config_raw: bytes, km: KeyMaterial,
                 random_bytes: RandomBytes = os.urandom) -> None:
        self.store = store
        self.random_bytes = random_bytes
        self.config = config
        self.config_hash = blake3.blake3(config_raw).digest()
        self.id: bytes = config["repo_id"]
        # what the repository's data may use: 2 enables keyed FastCDC and delta extents,
        # 3 block-digest chunk ids
        self.format_version: int = int(config["version"])
        self.encryption: str = config["encryption"]
        self.append_only: bool = bool(config.get("append_only", False))
        self.pack_size: int = int(config.get("pack_size", DEFAULT_PACK_SIZE))
        # what load_manifest/load_index met (open(tolerate_damage=True) and check report it)
        self.manifest_problem: tuple[str, str] | None = None  # (kind, message)
        self.index_problems: list[str] = []
        self.toc_packs: set[str] = set()
        cipher: Cipher = (PlainCipher() if self.encryption == "none"
                          else AesGcmCipher(km.enc_key, session=random_bytes(16)))
        self.id_hash = id_hasher(km.id_key, self.format_version)
        # version 2 without encryption: chunks carry no tag, their id check suffices
        self.codec = ObjectCodec(cipher, self.id_hash, Compression.parse("lz4"),
                                 untagged_chunks=self.format_version >= 2)
        self.key = km
        # FastCDC seed: secret in version 2, the public table (0) in version 1, so old
        # archives keep deduplicating against new ones there
        self.chunker_seed: int = chunker_seed(km.id_key) if self.format_version >= 2 else 0
        # True when this client had never seen the repository before open() (security.py)
        self.first_contact = False
        self._index: ChunkIndex | None = None
        self._index_lock = threading.Lock()  # worker threads ask for the index at once
        # index and archive metadata, kept locally and validated on use (cache.py)
        self.cache = RepoCache(self.id, self.codec)
        self._lock: Lock | None = None
        self.manifest = Manifest()

    # --- creation and opening -------------------------------------------------

    @classmethod
    def init(cls, store: Store, encryption: str, passphrase_fn: PassphraseFn,
             append_only: bool = False, pack_size: int = DEFAULT_PACK_SIZE,
             random_bytes: RandomBytes = os.urandom) -> Repository:
        if encryption not in ENCRYPTION_MODES:
            raise UsageError(f"unknown encryption mode {encryption!r}: use none, repokey, keyfile")
        # the passphrase first: refusing it (empty, mismatch) must leave nothing behind
        passphrase = passphrase_fn(True) if encryption != "none" else ""
        store.create()
        repo_id = random_bytes(32)
        km = KeyMaterial.generate(random_bytes)
        blob = b""
        config = {"version": FORMAT_VERSION, "repo_id": repo_id, "encryption": encryption,
                  "append_only": append_only, "pack_size": pack_size, "created": time.time()}
        if encryption == "none":
            config["id_key"] = km.id_key  # not secret without encryption; ids are checksums
            km = KeyMaterial(enc_key=b"", id_key=km.id_key)  # as open() gives it
        else:
            blob = wrap_key(km, repo_id, passphrase)
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
        repo = cls(store, config, raw, km, random_bytes)
        security.remember(repo_id, mode=encryption, fingerprint=km.fingerprint(),
                          key_blob=blob,
                          location=store.location)
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
        if version not in READABLE_VERSIONS:
            raise UnsupportedVersion("repository", version, "1, 2 and 3")
        key_ok = config.get("encryption") != "none" or _is_key(config.get("id_key"))
        if config.get("encryption") not in ENCRYPTION_MODES or not _is_key(config.get("repo_id")) \
                or not key_ok or not isinstance(config.get("pack_size", 1), int):
            raise IntegrityError("repository config is damaged")
        return config, raw

    @classmethod
    def open(cls, store: Store, passphrase_fn: PassphraseFn, lock: str | None = SHARED,
             lock_wait: float = 1.0, tolerate_damage: bool = False,
             random_bytes: RandomBytes = os.urandom) -> Repository:
        """Open with a lock. ``tolerate_damage``: a missing, damaged or rolled-back
        manifest does not fail (``check`` reports it, ``check --repair`` rebuilds it);
        ``manifest_problem`` says what is wrong and ``manifest`` is then empty."""
        if not store.exists():
            raise RepositoryNotFound(store.location, missing=True)
        config, raw = cls.read_config(store)
        # judge the mode before reading anything through it: a repository downgraded to
        # "none" by whoever controls the storage is refused here (security.py)
        repo_id, mode = config["repo_id"], config["encryption"]
        known = security.load(repo_id)
        security.check_identity(repo_id, known, mode, None, store.location)
        if mode == "none" and os.path.exists(keyfile_path(repo_id)):
            raise UnencryptedWithKeyfile(store.location, keyfile_path(repo_id))
        if mode == "none":
            blob, km = b"", KeyMaterial(enc_key=b"", id_key=config["id_key"])
        else:
            blob = cls.key_blob(store, config)
            km = unwrap_key(blob, repo_id, passphrase_fn(False))
        security.check_identity(repo_id, known, mode, km.fingerprint(), store.location)
        repo = cls(store, config, raw, km, random_bytes)
        repo.first_contact = known is None
        # check and repair judge the repository itself, never a local copy of it
        repo.cache.enabled = repo.cache.enabled and not tolerate_damage
        if lock:
            repo._lock = Lock(store, lock, lock_wait).acquire()
        try:
            m, repo.manifest_problem = repo.read_manifest()
            if repo.manifest_problem and not tolerate_damage:
                raise IntegrityError(repo.manifest_problem[1])
            repo.manifest = m if m is not None and not repo.manifest_problem else Manifest()
            if not repo.manifest_problem:
                security.remember(repo_id, mode=mode, fingerprint=km.fingerprint(),
                                  key_blob=blob, location=store.location)
            repo.cache.prune_archives({r.id for r in repo.manifest.archives.values()})
        except BaseException:
            repo.close()
            raise
        return repo

    @staticmethod
    def key_blob(store: Store, config: dict) -> bytes:
        """The passphrase-wrapped key of an encrypted repository, from where its mode
        keeps it (``keys/repokey``, or this client's key file)."""
        repo_id = config["repo_id"]
        if config["encryption"] == "repokey":
            try:
                return store.load("keys/repokey")
            except ObjectMissing:
                raise IntegrityError("repository key (keys/repokey) is missing") from None
        path = keyfile_path(repo_id)
        try:
            with open(path) as f:
                file_id, blob = parse_keyfile_text(f.read())
        except FileNotFoundError:
            raise KeyFileMissing(path) from None
        if file_id != repo_id:
            raise IntegrityError(f"key file {path} belongs to another repository")
        return blob

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
        m, problem = self.read_manifest()
        if problem:
            raise IntegrityError(problem[1])
        assert m is not None
        return m

    def read_manifest(self) -> tuple[Manifest | None, tuple[str, str] | None]:
        """The manifest and what is wrong with it: ``(kind, message)`` or None.

        kind: ``missing``, ``damaged``, ``config`` (the config is not the one the
        manifest authenticates) or ``rollback`` (older than a manifest seen before).
        """
        try:
            blob = self.store.load("manifest")
        except ObjectMissing:
            return None, ("missing", "manifest is missing (run 'check --repair')")
        try:
            m = Manifest.from_bytes(self.codec.open(MANIFEST_AAD, blob, "manifest"))
        except IntegrityError as e:
            return None, ("damaged", f"{e} (run 'check --repair')")
        if self.encryption != "none" and self.config_hash not in (
                m.config_hash, m.pending_config_hash):
            return m, ("config", "repository config does not match the manifest (tampered?)")
        if self.encryption == "none":
            return m, None  # nothing authenticates it: its serial proves nothing
        try:
            security.check_serial(self.id, m.serial, self.store.location)
        except IntegrityError as e:
            return m, ("rollback", str(e))
        # remembered only now that the manifest authenticated: a forged one must not
        # raise the serial and lock this client out of the genuine repository
        security.remember(self.id, serial=m.serial)
        return m, None

    def _write_manifest(self, m: Manifest, keep_pending: bool = False) -> None:
        m.config_hash = self.config_hash
        if not keep_pending:
            m.pending_config_hash = b""
        m.bump()
        self.store.store("manifest", self.codec.seal(MANIFEST_AAD, m.to_bytes()))
        if self.encryption != "none":
            security.remember(self.id, serial=m.serial)

    def _manifest_lock(self) -> Lock:
        return Lock(self.store, EXCLUSIVE, lock_wait=120.0, namespace="locks-manifest")

    def update_manifest(self, change: Callable[[Manifest], None], keep_pending: bool = False,
                        allow_replace: bool = False) -> Manifest:
        """Read-modify-write the manifest under its own short exclusive lock.

        The lock serialises concurrent writers (also on object stores without an
        atomic rename); ``change`` is applied to the freshest manifest. In an
        append-only repository a change may only add archives (``allow_replace``:
        ``check --repair`` re-pointing an archive at its repaired metadata).
        """
        with self._manifest_lock():
            m = self.load_manifest()
            before = dict(m.archives)
            change(m)
            if self.append_only and not allow_replace and any(
                    m.archives.get(n) != ref for n, ref in before.items()):
                raise AppendOnlyError("removing or replacing archives")
            self._write_manifest(m, keep_pending)
        self.manifest = m
        return m

    def replace_manifest(self, m: Manifest) -> None:
        """Write ``m`` without reading the old manifest (which may be damaged): repair only.

        Its serial is raised above every serial this client saw and above the clock in
        milliseconds, so other clients, which may have seen a higher serial than this
        one, do not take the rebuilt manifest for a rollback.
        """
        with self._manifest_lock():
            m.serial = max(m.serial, security.last_serial(self.id), int(time.time() * 1000))
            self._write_manifest(m)
        self.manifest = m
        self.manifest_problem = None

    # --- config -------------------------------------------------------------------

    def set_config(self, key: str, value: object) -> None:
        """Change one config value, crash-safely (under the caller's exclusive lock).

        The manifest authenticates the config by its hash. First the manifest accepts
        the old and the new config (pending hash), then the config is replaced, then the
        manifest names only the new one: a crash between any two steps leaves a config
        that the manifest accepts.
        """
        config = {**self.config, key: value}
        raw = msgpack.packb(config)
        new_hash = blake3.blake3(raw).digest()

        def pend(m: Manifest) -> None:
            m.pending_config_hash = new_hash

        self.update_manifest(pend, keep_pending=True)
        self.store.store("config", raw)
        self.config, self.config_hash = config, new_hash
        self.append_only = bool(config.get("append_only", False))
        self.update_manifest(lambda m: None)

    # --- archives ---------------------------------------------------------------

    def archive_ref(self, name: str) -> ArchiveRef:
        ref = self.manifest.archives.get(name)
        if ref is None:
            raise ArchiveNotFound(name)
        return ref

    def load_archive(self, ref: ArchiveRef) -> dict:
        try:
            blob = self.cache.archive_blob(self.store, ref.id)
            try:
                data = self.codec.open(ref.id, blob, f"archive {ref.name!r}")
            except IntegrityError:
                if not self.cache.enabled:
                    raise
                self.cache.forget_archive(ref.id)  # a damaged local copy: ask the repository
                blob = self.store.load(f"archives/{ref.id.hex()}")
                data = self.codec.open(ref.id, blob, f"archive {ref.name!r}")
        except ObjectMissing:
            raise IntegrityError(f"metadata of archive {ref.name!r} is missing") from None
        try:
            meta = msgpack.unpackb(data, strict_map_key=False)
        except Exception:  # noqa: BLE001
            meta = None
        # the item-stream chunk list is used as ids everywhere: exact types only
        items = meta.get("items", []) if isinstance(meta, dict) else None
        if not isinstance(items, list) or not all(
                isinstance(c, bytes) and len(c) == 32 for c in items):
            raise IntegrityError(f"archive {ref.name!r}: metadata is malformed")
        return meta

    def commit_archive(self, name: str, meta: dict, writer: ChunkWriter | None) -> ArchiveRef:
        """Make an archive durable and visible: packs → index → metadata → manifest."""
        if writer is not None:
            writer.commit()
        archive_id = self.store_archive_meta(meta)
        ref = ArchiveRef(name, archive_id, float(meta.get("time", time.time())))

        def add(m: Manifest) -> None:
            if name in m.archives:
                raise ArchiveExists(name)
            m.archives[name] = ref

        self.update_manifest(add)
        return ref

    def store_archive_meta(self, meta: dict) -> bytes:
        """Store archive metadata under a new random id (its AAD); return the id."""
        archive_id = self.random_bytes(32)
        self.store.store(f"archives/{archive_id.hex()}",
                         self.codec.seal(archive_id, msgpack.packb(meta)))
        return archive_id

    def delete_archive_meta(self, archive_id: bytes) -> None:
        if self.append_only:
            return  # kept: 'check --repair --undelete-archives' can bring them back
        try:
            self.store.delete(f"archives/{archive_id.hex()}")
        except ObjectMissing:
            pass

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
            self.delete_archive_meta(ref.id)

    def rename_archive(self, old: str, new: str) -> None:
        """Rename, rewriting the metadata too: a manifest rebuilt from the archive
        metadata objects (``check --repair``) then finds the new name."""
        if self.append_only:
            raise AppendOnlyError("rename")
        ref = self.archive_ref(old)
        if new in self.manifest.archives:
            raise ArchiveExists(new)
        meta = self.load_archive(ref)
        meta["name"] = new
        new_id = self.store_archive_meta(meta)

        def ren(m: Manifest) -> None:
            cur = m.archives.get(old)
            if cur is None or cur.id != ref.id:
                raise ArchiveNotFound(old)  # deleted or changed meanwhile
            if new in m.archives:
                raise ArchiveExists(new)
            del m.archives[old]
            m.archives[new] = ArchiveRef(new, new_id, ref.time)

        try:
            self.update_manifest(ren)
        except BaseException:
            self.delete_archive_meta(new_id)
            raise
        self.delete_archive_meta(ref.id)

    # --- chunks -----------------------------------------------------------------

    @property
    def index(self) -> ChunkIndex:
        with self._index_lock:
            if self._index is None:
                self._index = self.load_index()
            return self._index

    def load_index(self) -> ChunkIndex:
        """Merge every index segment, then add the TOCs of packs no segment covers.

        Through the local cache (cache.py): only segments and orphan packs it has not
        merged yet are downloaded. A damaged segment is skipped: its packs are then
        read by their TOC like the orphans of an interrupted session. Entries naming a
        pack that is not listed are dropped, so neither a reader nor dedup is ever sent
        to data that is not there. ``index_problems`` keeps what was skipped (``check``
        reports it in detail).
        """
        self.index_problems = []
        idx = self.cache.load_index(self.store, self._load_segment, self.index_problems)
        self.toc_packs = set(self.cache.orphans)  # packs no segment names, read by their TOC
        return idx

    def _load_segment(self, name: str) -> ChunkIndex:
        blob = self.store.load(name)
        return ChunkIndex.from_bytes(self.codec.open(name.encode(), blob, name), name)

    def reload_index(self) -> ChunkIndex:
        self._index = None
        return self.index

    def get_chunk(self, chunk_id: bytes) -> bytes:
        loc = self.index.get(chunk_id)
        if loc is None:
            raise ObjectMissing(f"chunk {chunk_id.hex()[:16]}")
        blob = self.store.load(pack_key(loc.pack), loc.offset, loc.length)
        if len(blob) != loc.length:
            raise IntegrityError(f"chunk {chunk_id.hex()[:16]}: pack {loc.pack[:16]} is truncated")
        return self.codec.open_chunk(chunk_id, blob)

    def get_cached_chunk(self, chunk_id: bytes) -> bytes:
        """A chunk kept in the local cache (block fingerprints), else ``get_chunk``."""
        blob = self.cache.fp_blob(self.store, chunk_id)
        if blob is not None:
            try:
                return self.codec.open_chunk(chunk_id, blob)
            except IntegrityError:
                pass  # a damaged local copy: the repository's is the truth
        loc = self.index.get(chunk_id)
        if loc is None:
            raise ObjectMissing(f"chunk {chunk_id.hex()[:16]}")
        blob = self.store.load(pack_key(loc.pack), loc.offset, loc.length)
        data = self.codec.open_chunk(chunk_id, blob)
        self.cache.keep_fp_blob(self.store, chunk_id, blob)
        return data

    def writer(self, upload_threads: int | None = None) -> ChunkWriter:
        from .writer import ChunkWriter

        if upload_threads is None:
            upload_threads = getattr(self.store, "upload_concurrency", 2)
        return ChunkWriter(self, upload_threads)

    def write_index_segment(self, idx: ChunkIndex) -> str:
        name = f"index/{self.random_bytes(16).hex()}"
        self.store.store(name, self.codec.seal(name.encode(), idx.to_bytes()))
        return name


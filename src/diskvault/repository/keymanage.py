"""Key management: export (text or paper), import, change of passphrase.

The exported key is the passphrase-wrapped blob (crypto/keys.py), so an export is as
safe as the passphrase. Text export = the key file format. Paper export = the blob in
short hex lines, each with its own checksum, so a typo is found on the line it is in.
An import is checked before it is saved: it must belong to this repository, open with
its passphrase, and authenticate the repository's manifest.
"""

from __future__ import annotations

import os

import blake3

from ..crypto.keys import (
    KEYFILE_HEADER,
    blob_repo_id,
    keyfile_text,
    parse_keyfile_text,
    unwrap_key,
    wrap_key,
)
from ..errors import IntegrityError, UsageError
from ..storage.base import Store
from . import security
from .repo import PassphraseFn, Repository, keyfile_path

PAPER_HEADER = "DISKVAULT PAPER KEY"
PAPER_LINE = 18  # bytes per line: 36 hex digits in 9 groups


def _line_sum(n: int, chunk: bytes) -> str:
    return blake3.blake3(f"{n}:".encode() + chunk).hexdigest()[:4]


def load_key_blob(store: Store, config: dict) -> bytes:
    if config["encryption"] == "none":
        raise UsageError("this repository is not encrypted: it has no key")
    return Repository.key_blob(store, config)


def genuine_key_blob(store: Store, passphrase_fn: PassphraseFn) -> tuple[bytes, bytes]:
    """(repo id, wrapped key) for ``key export``, refused as the open path refuses it
    when it is not the key this client used before (security.py): a storage attacker's
    key must not be exported as if it were genuine. The wrapped key last seen to open
    the repository passes without a passphrase; any other (a new passphrase set by
    another client, a planted key) is unwrapped and its fingerprint compared."""
    config, _ = Repository.read_config(store)
    repo_id, mode = config["repo_id"], config["encryption"]
    known = security.load(repo_id)
    security.check_identity(repo_id, known, mode, None, store.location)
    blob = load_key_blob(store, config)
    if known is None or not known.fingerprint or known.key_blob == security.blob_digest(blob):
        return repo_id, blob  # first contact: nothing to compare with (as on open)
    km = unwrap_key(blob, repo_id, passphrase_fn(False))
    security.check_identity(repo_id, known, mode, km.fingerprint(), store.location)
    security.remember(repo_id, key_blob=blob)
    return repo_id, blob


def save_key_blob(store: Store, config: dict, blob: bytes) -> str:
    """Store the wrapped key where this repository's mode keeps it; return where."""
    if config["encryption"] == "repokey":
        store.store("keys/repokey", blob)
        return f"{store.location} (keys/repokey)"
    path = keyfile_path(config["repo_id"])
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(keyfile_text(blob, config["repo_id"]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # a crash leaves the old key file or the new one, never half
    return path


def export_text(blob: bytes, repo_id: bytes, paper: bool = False) -> str:
    if not paper:
        return keyfile_text(blob, repo_id)
    lines = [f"{PAPER_HEADER} {repo_id.hex()}"]
    for i in range(0, len(blob), PAPER_LINE):
        chunk, n = blob[i : i + PAPER_LINE], i // PAPER_LINE + 1
        hexed = chunk.hex()
        groups = " ".join(hexed[j : j + 4] for j in range(0, len(hexed), 4))
        lines.append(f"{n:3d}: {groups} - {_line_sum(n, chunk)}")
    lines.append(f"checksum: {blake3.blake3(blob).hexdigest()[:16]}")
    return "\n".join(lines) + "\n"


def parse_export(text: str) -> tuple[bytes, bytes]:
    """(repo id, blob) of a text or paper export; a damaged line is named."""
    stripped = text.strip()
    if stripped.startswith(KEYFILE_HEADER + " "):
        return parse_keyfile_text(stripped)
    lines = [ln.strip() for ln in stripped.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith(PAPER_HEADER + " "):
        raise IntegrityError("not a diskvault key export (text or paper)")
    try:
        repo_id = bytes.fromhex(lines[0].split()[-1])
    except ValueError:
        raise IntegrityError("paper key: damaged first line") from None
    blob = bytearray()
    total = None
    for ln in lines[1:]:
        if ln.startswith("checksum:"):
            total = ln.split(":", 1)[1].strip()
            break
        n_s, _, rest = ln.partition(":")
        data_s, _, check = rest.rpartition("-")
        try:
            n, chunk = int(n_s), bytes.fromhex(data_s.replace(" ", ""))
        except ValueError:
            raise IntegrityError(f"paper key: line {n_s.strip()!r} is not readable") from None
        if n != len(blob) // PAPER_LINE + 1 or _line_sum(n, chunk) != check.strip():
            raise IntegrityError(f"paper key: line {n} is wrong (typo?)")
        blob += chunk
    if total is None or blake3.blake3(bytes(blob)).hexdigest()[:16] != total:
        raise IntegrityError("paper key: incomplete, or the checksum line is wrong")
    return repo_id, bytes(blob)


def import_key(store: Store, text: str, passphrase_fn: PassphraseFn) -> str:
    """Check an exported key against the repository, then save it; return where."""
    config, raw = Repository.read_config(store)
    repo_id = config["repo_id"]
    if config["encryption"] == "none":
        raise UsageError("this repository is not encrypted: it has no key")
    file_id, blob = parse_export(text)
    if file_id != repo_id or blob_repo_id(blob) != repo_id:
        raise IntegrityError("this key belongs to another repository")
    km = unwrap_key(blob, repo_id, passphrase_fn(False))
    problem = Repository(store, config, raw, km).read_manifest()[1]
    if problem and problem[0] == "damaged":
        raise IntegrityError(f"this key does not open the repository's manifest: {problem[1]}")
    return save_key_blob(store, config, blob)


def change_passphrase(repo: Repository, new_passphrase: str) -> str:
    """Re-wrap the key with a new passphrase (fresh salt); return where it was saved."""
    blob = wrap_key(repo.key, repo.id, new_passphrase)
    where = save_key_blob(repo.store, repo.config, blob)
    security.remember(repo.id, key_blob=blob)  # the same key: export needs no passphrase
    return where

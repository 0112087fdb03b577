"""Corruption: flipped bits, truncation and deletion of packs, index segments, archive
metadata and the manifest — 100 seeded cases, in process on MemoryStore.

Reproducible: the repositories' keys, ids and session ids come from seeded generators
(``random_bytes``), so chunk ids, archive ids and index segment names are the same on
every run, and so are the packs of the unencrypted repository, byte for byte. Encrypted
packs differ in their nonce counters (worker threads seal concurrently), so packs are
chosen by the chunk ids they hold, not by name: every case damages the same object on
every run. ``-m slow`` runs the sweep over more seeds.

For every case: ``check --verify-data`` detects it and names what is affected (every
item that cannot be restored, with exactly the byte ranges that fail); no restore ever
returns wrong data as good; ``check --repair`` recovers everything still intact and
leaves a consistent repository; a new backup of the same data heals damaged items.
"""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest
from faults.faultkit import archive_items, backup, item_truth, make_files, new_repo, reopen, restore

from diskvault.archive.check import CheckOptions, run_check
from diskvault.archive.repair import repair
from diskvault.errors import IntegrityError
from diskvault.repository.lock import EXCLUSIVE
from diskvault.repository.pack import read_toc
from diskvault.storage.memory import MemoryStore

CASES = 100
TARGETS = ["packs", "packs", "index", "archives", "manifest"]
DAMAGE = ["flip", "truncate", "delete"]
# and then flips in the last bytes of a pack (TOC, trailer): every chunk survives, and
# repair rebuilds the pack byte for byte under its old name — a case the random flips
# above hit only in some layouts, and that once left the index naming a deleted pack
TAIL_CASES = 10
TAIL = 48


Base = tuple[dict[str, bytes], dict[str, dict[str, bytes]], dict[str, bytes]]


def _base(encryption: str, tmp_path, seed: int = 0) -> Base:
    """The repository's objects, the archives' files, and each pack's chunk ids."""
    os.environ["DISKVAULT_CACHE_DIR"] = str(tmp_path / f"cache-base-{encryption}-{seed}")
    # module scope runs outside conftest's per-test dirs; the seeded repository ids
    # must not meet the serials another run left in the shared default security dir
    os.environ["DISKVAULT_SECURITY_DIR"] = str(tmp_path / f"security-{encryption}-{seed}")
    rng = random.Random(encryption if seed == 0 else f"{encryption}-{seed}")
    store = MemoryStore()
    repo = new_repo(store, encryption, pack_size=48 << 10,
                    random_bytes=random.Random(f"keys-{encryption}-{seed}").randbytes)
    shared = rng.randbytes(40 << 10)
    archives = {}
    for n in range(4):
        files = make_files(rng, 3, 96 << 10, shared)
        backup(repo, f"a{n}", files)
        archives[f"a{n}"] = files
    packs = {k: b"".join(e.id for e in read_toc(store.load, k.rsplit("/", 1)[-1], len(v),
                                                    repo.codec))
             for k, v in store.data.items() if k.startswith("packs/")}
    repo.close()
    return dict(store.data), archives, packs


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    return {e: _base(e, d) for e in ("repokey", "none")}


def _damage(data: dict[str, bytes], rng: random.Random, target: str, how: str,
            packs: dict[str, bytes]) -> str:
    # packs in the order of the chunk ids they hold: the same on every run
    names = sorted((n for n in data if n == target or n.startswith(target + "/")),
                   key=lambda n: packs.get(n) or n.encode())
    name = rng.choice(names)
    v = data[name]
    if how == "delete":
        del data[name]
    elif how == "flip-tail":
        b = bytearray(v)
        b[len(b) - 1 - rng.randrange(TAIL)] ^= 1 << rng.randrange(8)
        data[name] = bytes(b)
    elif how == "truncate":
        data[name] = v[: rng.randrange(len(v))]
    else:
        b = bytearray(v)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        data[name] = bytes(b)
    return name


def _truth(repo, archives) -> dict:
    """(archive, path) → failing ranges, or archive → "unlistable"/"absent"."""
    out: dict = {}
    for name, files in archives.items():
        if name not in repo.manifest.archives:
            out[name] = "absent"
            continue
        try:
            items = archive_items(repo, name)
        except IntegrityError:
            out[name] = "unlistable"
            continue
        for it in items:
            if it.extents is None:
                continue
            bad = item_truth(repo, it, files[it.path])
            out[(name, it.path)] = bad
            try:
                assert restore(repo, it) == files[it.path]
                assert not bad
            except IntegrityError as e:  # extract names the first failing range
                assert bad and f"{it.path}: bytes {bad[0][0]}-{bad[0][1]}" in str(e), (e, bad)
    return out


def _reported(report) -> dict:
    got: dict = {}
    for p in report.problems:
        if p.kind == "item":
            got[(p.archive, p.path)] = [(r[0], r[1]) for r in p.ranges or []]
    return got


def _run_case(i: int, bases, tmp_path, tally: Counter, seed: int = 0) -> None:
    rng = random.Random(i if seed == 0 else f"{seed}-{i}")
    ids = random.Random(f"ids-{seed}-{i}").randbytes
    encryption = "repokey" if i % 2 else "none"
    base, archives, packs = bases[encryption]
    os.environ["DISKVAULT_CACHE_DIR"] = str(tmp_path / f"cache{seed}-{i}")
    if i < CASES:
        target, how = TARGETS[i % len(TARGETS)], DAMAGE[(i // len(TARGETS)) % len(DAMAGE)]
    else:
        target, how = "packs", "flip-tail"
    store = MemoryStore()
    store.create()
    store.data = dict(base)
    damaged = _damage(store.data, rng, target, how, packs)
    case = f"case {i} (seed {seed}): {how} {damaged} ({encryption})"

    repo = reopen(store, lock=None, random_bytes=ids)
    report = run_check(repo, CheckOptions(verify_data=True))
    truth = _truth(repo, archives)
    text = " | ".join(p.message for p in report.problems) + " | " + " | ".join(report.notes)
    if target == "index" and how == "delete":
        # indistinguishable from an interrupted session: nothing is lost, packs read by TOC
        rc = report.repo_check
        assert rc is not None and rc.uncovered and "in no index segment" in text, case
        tally["noted"] += 1
    else:
        assert not report.ok, case
        tally["detected"] += 1
    short = damaged.rsplit("/", 1)[-1][:16]
    if target in ("packs", "index") and not (target == "index" and how == "delete"):
        assert short in text, (case, text)
    if target == "manifest":
        assert any(p.kind == "manifest" for p in report.problems), case
    # every item that cannot be restored is named, with exactly the failing ranges
    expected = {k: v for k, v in truth.items() if isinstance(k, tuple) and v}
    assert _reported(report) == expected, (case, text)
    for name, state in truth.items():
        if state == "unlistable":
            assert f"{name!r}" in text, (case, text)
    repo.close()

    repo = reopen(store, lock=EXCLUSIVE, random_bytes=ids)
    log: list[str] = []
    after = repair(repo, CheckOptions(verify_data=True), log.append)
    # all chunks of a pack salvaged → the same bytes, the same name (see repair.py)
    tally["pack rebuilt under its name"] += sum("rebuilt intact" in m for m in log)
    after_truth = _truth(repo, archives)
    assert not [p for p in after.problems if p.kind in ("manifest", "index", "pack")], case
    for key, bad in truth.items():  # whatever was restorable before still is
        if isinstance(key, tuple) and bad == []:
            assert after_truth.get(key) == [], (case, key, after_truth.get(key))
    if target == "manifest":  # rebuilt from the archive metadata: every archive is back
        assert all(k in repo.manifest.archives for k in archives), case
        assert all(v == [] for k, v in after_truth.items() if isinstance(k, tuple)), case
    assert _reported(after) == {k: v for k, v in after_truth.items()
                                if isinstance(k, tuple) and v}, case
    marks = {(n, it.path): [(r[0], r[1]) for r in it.health["damaged"]]
             for n in repo.manifest.archives for it in archive_items(repo, n) if it.health}
    assert marks == {k: v for k, v in after_truth.items() if isinstance(k, tuple) and v}, case
    if marks:
        tally["items damaged"] += 1
        _heal(repo, archives, after_truth, case)
    tally["repaired"] += 1
    repo.close()


def _heal(repo, archives, after_truth, case) -> None:
    """A new backup of the same data stores the lost chunks again: the marked items heal."""
    for name, files in archives.items():
        if any(isinstance(k, tuple) and k[0] == name and v for k, v in after_truth.items()):
            backup(repo, f"heal-{name}", files)
    report = run_check(repo, CheckOptions())
    assert not [p for p in report.problems if p.kind == "item"], (case, report.problems)
    healed = _truth(repo, archives)
    assert all(v == [] for k, v in healed.items() if isinstance(k, tuple)), case
    repair(repo, CheckOptions(), lambda m: None)  # clears the marks of healed items
    assert not [it for n in repo.manifest.archives for it in archive_items(repo, n)
                if it.health], case


def test_corruption_cases(bases, tmp_path):
    tally: Counter = Counter()
    for i in range(CASES + TAIL_CASES):
        _run_case(i, bases, tmp_path, tally)
    print(f"\ncorruption: {CASES + TAIL_CASES} cases, {dict(tally)}")
    assert tally["detected"] + tally["noted"] == CASES + TAIL_CASES
    assert tally["repaired"] == CASES + TAIL_CASES
    # the case that once left an index naming a quarantined pack is in every run
    assert tally["pack rebuilt under its name"] > 0


SLOW_SEEDS = 8


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, SLOW_SEEDS + 1))
def test_corruption_more_seeds(seed, tmp_path, request):
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("880 more cases (~5 min): run with -m slow")
    bases = {e: _base(e, tmp_path, seed) for e in ("repokey", "none")}
    tally: Counter = Counter()
    for i in range(CASES + TAIL_CASES):
        _run_case(i, bases, tmp_path, tally, seed)
    print(f"\ncorruption, seed {seed}: {CASES + TAIL_CASES} cases, {dict(tally)}")
    assert tally["repaired"] == CASES + TAIL_CASES

"""Crash safety: SIGKILL ``create``, ``delete``, ``prune``, ``compact`` and ``check --repair``
at random moments, and after every kill prove:

- ``check --verify-data`` passes (the harness would fall back to ``--repair`` and count
  it, and then demand that nothing committed is lost);
- the archives are exactly the committed ones (an interrupted create/delete/prune either
  happened completely or not at all), and every one restores byte-identical;
- the next create works (and restores byte-identical).

Default: 30 kills. ``DISKVAULT_KILLS=200`` (or ``-m slow``, which runs 200) for more.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter

import pytest
from faults.faultkit import PASS, assert_restores, backup, reopen
from support import DV

from diskvault.archive.check import CheckOptions, run_check
from diskvault.archive.prune import plan_prune
from diskvault.archive.repair import repair
from diskvault.repository.lock import EXCLUSIVE
from diskvault.source.paths import archive_path
from diskvault.storage.local import LocalStore

DEFAULT_KILLS = int(os.environ.get("DISKVAULT_KILLS", "30"))
SLOW_KILLS = 200
OPS = {"create": 5, "delete": 2, "prune": 2, "compact": 3, "repair": 2}
FIRST_GUESS = 0.3  # seconds of work an operation takes, until one has been timed


class Harness:
    def __init__(self, root, seed: int) -> None:
        self.root = root
        self.repo = str(root / "repo")
        self.rng = random.Random(seed)
        self.env = {**os.environ, "DISKVAULT_PASSPHRASE": PASS}
        self.committed: dict[str, dict[str, bytes]] = {}  # archive → {item path: content}
        self.base = self.rng.randbytes(4 << 20)
        self.n = 0
        self.work: dict[str, float] = {}  # seconds from taking the lock to exit, per op
        self.stats: Counter = Counter()

    def dv(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([*DV, *args], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def setup(self) -> None:
        subprocess.run([*DV, "init", "-e", "repokey",
                        "--pack-size", "192KiB", self.repo], env=self.env, check=True)
        for _ in range(3):
            self.run_op("create", kill=False)

    def new_source(self) -> tuple[str, bytes]:
        """A variant of the base image: some blocks rewritten, a new tail (new chunks)."""
        data = bytearray(self.base)
        for _ in range(self.rng.randint(4, 16)):
            at = self.rng.randrange(0, len(data) - 65536)
            data[at : at + 65536] = self.rng.randbytes(65536)
        data += self.rng.randbytes(self.rng.randint(1, 1 << 20))
        path = str(self.root / f"src{self.n}.bin")
        with open(path, "wb") as f:
            f.write(data)
        return path, bytes(data)

    def command(self, op: str) -> tuple[list[str], dict]:
        names = sorted(self.committed)
        if op == "create":
            self.n += 1
            path, data = self.new_source()
            name = f"c{self.n}"
            return (["create", "--chunker-params", "fixed,65536", f"{self.repo}::{name}", path],
                    {"new": name, "files": {archive_path(path): data}})
        if op == "delete":
            victim = self.rng.choice(names)
            return ["delete", f"{self.repo}::{victim}"], {"doomed": {victim}}
        if op == "prune":
            keep = self.rng.randint(2, 4)
            repo = reopen(LocalStore(self.repo))
            doomed = {d.ref.name for d in plan_prune(repo.manifest.sorted_archives(),
                                                     {"secondly": keep}) if not d.keep}
            repo.close()
            return ["prune", "--keep-last", str(keep), self.repo], {"doomed": doomed}
        if op == "compact":
            return ["compact", "--threshold", "0", self.repo], {}
        extra = ["--verify-data"] if self.rng.random() < 0.5 else []
        return ["check", "--repair", "--yes", *extra, self.repo], {}

    def pick(self) -> str:
        ops = dict(OPS)
        if len(self.committed) > 6:
            ops["create"] = 1
        if len(self.committed) < 3:
            ops["delete"] = ops["prune"] = 0
        return self.rng.choices(list(ops), weights=list(ops.values()))[0]

    def listing(self) -> set[tuple[str, int]]:
        store = LocalStore(self.repo)
        return {(n, s) for n, s in store.list("") if not n.startswith("locks")}

    def locks(self) -> set[str]:
        try:
            return set(os.listdir(os.path.join(self.repo, "locks")))
        except FileNotFoundError:
            return set()

    def wait_for_lock(self, p: subprocess.Popen, old: set[str]) -> float | None:
        """When the process took its repository lock: its work begins there (before it is
        only interpreter start-up and imports, where a kill proves nothing)."""
        while p.poll() is None:
            if self.locks() - old:
                return time.monotonic()
            time.sleep(0.002)
        return None

    def run_op(self, op: str, kill: bool) -> bool:
        """Run one operation; if ``kill``, SIGKILL it at a random moment of its work.
        True if it was killed."""
        args, plan = self.command(op)
        before, old_locks = self.listing(), self.locks()
        p = self.dv(*args)
        began = self.wait_for_lock(p, old_locks)
        est = self.work.get(op, FIRST_GUESS)
        try:
            delay = self.rng.uniform(0, 1.1 * est) if kill and began is not None else None
            _, err = p.communicate(timeout=delay)
            assert p.returncode == 0, (args, err.decode())
            if began is not None:
                took = time.monotonic() - began
                self.work[op] = 0.5 * (self.work.get(op, took) + took)
            killed = False
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.communicate()
            killed = True
            self.stats[f"killed {op}"] += 1
            if self.listing() != before:
                self.stats["kills after the first write"] += 1
        self.verify(op, plan, killed)
        return killed

    def verify(self, op: str, plan: dict, killed: bool) -> None:
        store = LocalStore(self.repo)
        repo = reopen(store)  # tolerant: no local cache, the repository itself is judged
        assert repo.manifest_problem is None, repo.manifest_problem
        present = set(repo.manifest.archives)
        before = set(self.committed)
        if op == "create":
            assert present in ({*before, plan["new"]},) + ((before,) if killed else ()), op
            if plan["new"] in present:
                self.committed[plan["new"]] = plan["files"]
        elif "doomed" in plan:
            allowed = [before - plan["doomed"]] + ([before] if killed else [])
            assert present in allowed, (op, present, allowed)
            for name in before - present:
                del self.committed[name]
        else:
            assert present == before, op
        report = run_check(repo, CheckOptions(verify_data=True))
        if not report.ok:  # allowed, but counted: then repair must lose nothing
            self.stats["needed repair"] += 1
            repo.close()
            repo = reopen(store, lock=EXCLUSIVE)
            report = repair(repo, CheckOptions(verify_data=True), lambda m: None)
            assert report.ok, [p.message for p in report.problems]
            assert set(repo.manifest.archives) == set(self.committed)
        for name, files in self.committed.items():
            assert_restores(repo, name, files)
        self.n += 1
        probe = {"probe.bin": self.rng.randbytes(100_000) + self.base[:131072]}
        backup(repo, f"p{self.n}", probe)  # the next create works
        assert_restores(repo, f"p{self.n}", probe)
        self.committed[f"p{self.n}"] = probe
        repo.close()

    def run(self, kills: int) -> Counter:
        self.setup()
        while self.stats["kills"] < kills:
            op = self.pick()
            if self.run_op(op, kill=True):
                self.stats["kills"] += 1
            else:
                self.stats[f"completed {op}"] += 1
        return self.stats


def _report(stats: Counter) -> None:
    print(f"\ncrash harness: {stats['kills']} kills survived; " + ", ".join(
        f"{k}: {v}" for k, v in sorted(stats.items()) if k != "kills"))


def test_sigkill_at_random_moments(tmp_path):
    h = Harness(tmp_path, seed=20240521)
    stats = h.run(DEFAULT_KILLS)
    print(h.work)
    _report(stats)
    assert stats["kills"] >= DEFAULT_KILLS
    assert stats["kills after the first write"] > 0
    assert stats["needed repair"] == 0


@pytest.mark.slow
def test_sigkill_many(tmp_path, request):
    if "slow" not in (request.config.getoption("-m") or "") and \
            not os.environ.get("DISKVAULT_SLOW"):
        pytest.skip("200 kills: run with -m slow (or DISKVAULT_SLOW=1)")
    stats = Harness(tmp_path, seed=7).run(SLOW_KILLS)
    _report(stats)
    assert stats["kills"] >= SLOW_KILLS
    assert stats["needed repair"] == 0

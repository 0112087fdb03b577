"""The JSON of info, create, list and disk backup has the keys Borg prints.

borgmatic, Vorta and scripts parse Borg's JSON; a Borg user's script must find every
key it knows, at every level, with the same JSON type. Borg itself runs on the same data
here and its real output is the reference. Left out on purpose (Borg-internal, no
meaning for diskvault): ``BORG_ONLY``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest
from support import dv, needs_tool

pytestmark = needs_tool("borg")

# Borg's own paths and limits: a security dir, a cache dir, the archive size limit
BORG_ONLY = {"security_dir", "cache.path", "archive.limits", "archives[].limits"}


def borg(*args: str, env: dict, cwd: str | None = None) -> dict:
    r = subprocess.run(["borg", *args], capture_output=True, env=env, check=True, cwd=cwd)
    return json.loads(r.stdout)


def borg_lines(*args: str, env: dict) -> list[dict]:
    r = subprocess.run(["borg", *args], capture_output=True, env=env, check=True)
    return [json.loads(line) for line in r.stdout.splitlines()]


def missing_keys(ref, ours, where: str = "") -> list[str]:
    """Where ``ours`` lacks a key of ``ref`` or holds another JSON type (lists: each of
    our elements is compared with Borg's first element)."""
    if where in BORG_ONLY:
        return []
    if isinstance(ref, dict):
        if not isinstance(ours, dict):
            return [f"{where or '.'}: object expected, got {type(ours).__name__}"]
        out = []
        for k, v in ref.items():
            path = f"{where}.{k}" if where else k
            if path in BORG_ONLY:
                continue
            if k not in ours:
                out.append(f"{path}: missing")
            else:
                out += missing_keys(v, ours[k], path)
        return out
    if isinstance(ref, list):
        if not isinstance(ours, list):
            return [f"{where}: array expected, got {type(ours).__name__}"]
        if ref and not ours:
            return [f"{where}: empty array, Borg's has elements"]
        if ref and isinstance(ref[0], dict | list):
            return [m for o in ours for m in missing_keys(ref[0], o, where + "[]")]
        return []
    if isinstance(ref, bool) or isinstance(ours, bool):
        ok = isinstance(ref, bool) == isinstance(ours, bool)
    elif isinstance(ref, int | float):
        ok = isinstance(ours, int | float)  # JSON has one number type
    else:
        ok = type(ref) is type(ours)
    return [] if ok else [f"{where}: {type(ref).__name__} expected, got {type(ours).__name__}"]


@pytest.fixture(scope="module", params=["none", "repokey"])
def pair(request, tmp_path_factory):
    """Borg and diskvault repositories with the same two archives of the same data
    (module-scoped: Borg is slow to start; the environment is isolated by hand)."""
    mode = request.param
    tmp_path = tmp_path_factory.mktemp(f"borg-{mode}")
    home = tmp_path / "home"
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(8)
    (data / "a.bin").write_bytes(rng.randbytes(3 << 20))
    (data / "b.bin").write_bytes(rng.randbytes(1 << 20) * 2)
    (data / "sub").mkdir()
    (data / "sub" / "c.txt").write_text("hello\n")
    benv = {**os.environ, "BORG_PASSPHRASE": "pw", "BORG_BASE_DIR": str(tmp_path / "borg"),
            "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes"}
    brepo, drepo = str(tmp_path / "borg-repo"), str(tmp_path / "dv-repo")
    subprocess.run(["borg", "init", "-e", "repokey-blake2" if mode == "repokey" else "none",
                    brepo], env=benv, check=True, capture_output=True)
    env = {"HOME": str(home), "DISKVAULT_KEYS_DIR": str(home / "keys"),
           "DISKVAULT_CACHE_DIR": str(home / "cache"),
           "DISKVAULT_SECURITY_DIR": str(home / "security"),
           "DISKVAULT_PASSPHRASE": "pw"}
    dv("init", "-e", mode, drepo, env=env)
    out = {"benv": benv, "env": env, "brepo": brepo, "drepo": drepo, "data": str(data),
           "create": (borg("create", "--json", f"{brepo}::one", "data", env=benv,
                           cwd=str(tmp_path)),
                      json.loads(dv("create", "--json", f"{drepo}::one", "data", env=env,
                                    cwd=str(tmp_path)).stdout))}
    subprocess.run(["borg", "create", f"{brepo}::two", "data"], env=benv, check=True,
                   cwd=str(tmp_path))
    dv("create", f"{drepo}::two", "data", env=env, cwd=str(tmp_path))
    return out


def test_create_json_has_borgs_keys(pair):
    # Borg's create ran in the tmp dir too: cwd only changes the paths, not the keys
    ref, ours = pair["create"]
    assert missing_keys(ref, ours) == []
    s = ours["archive"]["stats"]
    assert s["original_size"] == s["original"] == (3 << 20) + (2 << 20) + 6
    assert s["nfiles"] == 5 and s["deduplicated_size"] > 0
    assert ours["archive"]["stats"]["compressed_size"] >= s["deduplicated_size"]
    assert ours["archive"]["id"] and ours["archive"]["duration"] >= 0


def test_info_and_list_json_have_borgs_keys(pair):
    b, d, benv, env = pair["brepo"], pair["drepo"], pair["benv"], pair["env"]
    for args in (["info", "--json"], ["list", "--json"]):
        for suffix in ("", "::one"):
            if args[0] == "list" and suffix:
                continue
            ref = borg(*args, b + suffix, env=benv)
            ours = json.loads(dv(*args, d + suffix, env=env).stdout)
            assert missing_keys(ref, ours) == [], (args, suffix)
    st = json.loads(dv("info", "--json", d, env=env).stdout)["cache"]["stats"]
    one = json.loads(dv("info", "--json", d + "::one", env=env).stdout)["archives"][0]
    # two archives of the same data: every data chunk referenced twice
    assert st["total_chunks"] == 2 * one["stats"]["chunks"] == 6
    assert st["total_size"] == 2 * one["stats"]["original_size"]
    assert st["total_csize"] == 2 * one["stats"]["compressed_size"]
    # unique: 5 MiB of data chunks, plus the archives' item metadata and (format version
    # 2) block fingerprints, 8 bytes per 4 KiB block (archive/delta.py)
    fps = (5 << 20) // 4096 * 8
    assert (5 << 20) < st["unique_size"] < (5 << 20) + 8192 + fps < st["total_size"]
    listed = json.loads(dv("list", "--json", d, env=env).stdout)["archives"]
    assert [a["name"] for a in listed] == ["one", "two"]
    assert listed[0]["time"][:4].isdigit() and "T" in listed[0]["time"]  # ISO 8601


def test_list_json_lines_has_borgs_item_keys(pair):
    ref = borg_lines("list", "--json-lines", pair["brepo"] + "::one", env=pair["benv"])
    out = dv("list", "--json-lines", pair["drepo"] + "::one", env=pair["env"]).stdout
    ours = [json.loads(line) for line in out.splitlines()]
    assert len(ours) == len(ref) == 5
    for r in ref:
        match = [o for o in ours if o["path"] == r["path"]]
        assert match, r["path"]
        assert missing_keys(r, match[0]) == []
        assert match[0]["size"] == r["size"]


@needs_tool("sfdisk")
def test_disk_backup_json_has_borgs_create_keys(pair, tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(random.Random(9).randbytes(8 << 20))
    subprocess.run(["sfdisk", "-q", str(img)], input=b"label: gpt\n,6MiB,L\n", check=True,
                   capture_output=True)
    repo = str(tmp_path / "repo")
    env = {**pair["env"], "HOME": str(tmp_path)}
    dv("init", "-e", "none", repo, env=env)
    ours = json.loads(dv("disk", "backup", "--json", f"{repo}::d", str(img), env=env).stdout)
    assert missing_keys(pair["create"][0], ours) == []
    assert ours["archive"]["stats"]["original_size"] == 8 << 20
    assert ours["archive"]["disk"]["label"] == "gpt" and ours["dry_run"] is False

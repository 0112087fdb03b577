"""--pre-command / --post-command: run in order around the read; the post command runs
whenever the pre command ran — after success, a failing pre command, an error during
the read, SIGTERM, and (through the watchdog) SIGKILL of diskvault."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from source.hostfs import DEADLINE, fifo_has_reader, wait_for
from support import DV, dv, init_repo


@pytest.fixture
def setup(tmp_path):
    repo = str(tmp_path / "repo")
    env = init_repo(repo)
    src = tmp_path / "vm.img"
    src.write_bytes(b"live-state")
    log = tmp_path / "hooks.log"
    # pre makes the source what a suspended VM leaves; post changes it again: the
    # archive shows which ran before and which after the read
    pre = f"echo pre >> {log} && printf suspended > {src}"
    post = f"echo post >> {log} && printf resumed > {src}"
    return repo, env, src, log, pre, post


def _lines(log) -> list[str]:
    return log.read_text().split() if log.exists() else []


def test_pre_before_the_read_post_after(setup):
    repo, env, src, log, pre, post = setup
    dv("create", "--pre-command", pre, "--post-command", post, f"{repo}::a", str(src),
       env=env)
    assert _lines(log) == ["pre", "post"]
    got = dv("extract", "--stdout", f"{repo}::a", env=env).stdout
    assert got == b"suspended"
    assert src.read_bytes() == b"resumed"


def test_failing_pre_command_reads_nothing_and_post_still_runs(setup):
    repo, env, src, log, _, post = setup
    r = dv("create", "--pre-command", f"echo pre >> {log}; exit 3", "--post-command", post,
           f"{repo}::a", str(src), env=env, check=False)
    assert r.returncode == 2
    assert r.stderr.decode().strip().splitlines() == [
        "diskvault: error: --pre-command failed with exit code 3: nothing was read"]
    assert _lines(log) == ["pre", "post"]
    assert dv("list", repo, env=env).stdout == b""


def test_undo_warnings_after_an_error_are_json_lines_with_log_json(setup):
    repo, env, src, log, _, _ = setup
    r = dv("create", "--log-json", "--pre-command", "exit 3", "--post-command", "exit 4",
           f"{repo}::a", str(src), env=env, check=False)
    assert r.returncode == 2
    recs = [json.loads(line) for line in r.stderr.decode().splitlines()]
    assert [(rec["type"], rec["levelname"]) for rec in recs] == [
        ("log_message", "WARNING"), ("log_message", "ERROR")], recs
    assert recs[0]["message"] == "--post-command failed (exit code 4)"


def test_failing_post_command_is_a_warning(setup):
    repo, env, src, log, pre, _ = setup
    r = dv("create", "--pre-command", pre, "--post-command", "exit 4", f"{repo}::a", str(src),
           env=env, check=False)
    assert r.returncode == 1
    assert r.stderr.decode().strip().splitlines() == [
        "diskvault: warning: --post-command failed (exit code 4)"]
    assert dv("extract", "--stdout", f"{repo}::a", env=env).stdout == b"suspended"


def test_post_runs_after_an_error_during_the_read(setup, tmp_path):
    repo, env, src, log, pre, post = setup
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = dv("create", "--pre-command", pre, "--post-command", post, "--read-special",
           "--read-special-timeout", "0.2", f"{repo}::a", str(src), str(fifo), env=env,
           check=False)
    assert r.returncode == 2
    assert "no writer connected to the FIFO" in r.stderr.decode()  # the fault fired
    assert _lines(log) == ["pre", "post"]
    assert src.read_bytes() == b"resumed"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_post_runs_when_diskvault_is_killed(setup, tmp_path, sig):
    repo, env, src, log, pre, post = setup
    fifo = str(tmp_path / "pipe")
    os.mkfifo(fifo)
    p = subprocess.Popen([*DV, "create", "--pre-command", pre, "--post-command", post,
                          "--read-special", f"{repo}::a", str(src), fifo],
                         env={**os.environ, **env}, stderr=subprocess.PIPE)
    w = wait_for(lambda: fifo_has_reader(fifo) or p.poll() is not None,
                 "diskvault reading the FIFO")
    try:
        assert p.poll() is None
        assert _lines(log) == ["pre"]
        p.send_signal(sig)
        _, err = p.communicate(timeout=DEADLINE)
        # after SIGKILL the watchdog runs it: wait for it to finish its work
        wait_for(lambda: src.read_bytes() == b"resumed", "the post command")
    finally:
        os.close(w)  # type: ignore[arg-type]
        if p.poll() is None:
            p.kill()
            p.wait()
    assert _lines(log) == ["pre", "post"]
    if sig == signal.SIGTERM:
        assert p.returncode == 2
        assert "terminated by SIGTERM" in err.decode()
    else:
        assert p.returncode == -signal.SIGKILL


@pytest.mark.parametrize("cmd", [["create"], ["disk", "backup"]])
def test_existing_archive_name_stops_before_the_pre_command(setup, cmd):
    repo, env, src, log, pre, post = setup
    dv("create", f"{repo}::a", str(src), env=env)
    args = [f"{repo}::a", str(src)]
    r = dv(*cmd, "--pre-command", pre, "--post-command", post, *args, env=env, check=False)
    assert r.returncode == 2
    assert r.stderr.decode().strip().splitlines() == [
        "diskvault: error: archive 'a' already exists"]
    assert _lines(log) == []
    assert src.read_bytes() == b"live-state"


def test_disk_backup_runs_pre_and_post_around_the_read(setup):
    repo, env, src, log, pre, post = setup
    with open(src, "wb") as f:
        f.truncate(1 << 20)
    pre = f"echo pre >> {log} && printf suspended | dd of={src} conv=notrunc status=none"
    r = dv("disk", "backup", "--pre-command", pre, "--post-command", post, f"{repo}::d",
           str(src), env=env)
    assert r.returncode == 0, r.stderr
    assert _lines(log) == ["pre", "post"]
    got = dv("extract", "--stdout", f"{repo}::d", env=env).stdout
    assert got[:9] == b"suspended" and len(got) == 1 << 20

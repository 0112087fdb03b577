"""--log-json: warnings, notes and errors as Borg's ``log_message`` JSON lines, so that
every line a frontend reads on stderr is JSON (progress lines: test_borg_habits.py)."""

from __future__ import annotations

import json
import logging
import os
import shutil

from support import dv, init_repo

from diskvault.cli import log


def _json_lines(stderr: bytes) -> list[dict]:
    lines = stderr.decode().splitlines()
    assert lines, "nothing on stderr"
    return [json.loads(line) for line in lines]  # every line is JSON, or this fails


def _is_log_message(rec: dict, levelname: str, needle: str) -> None:
    assert rec["type"] == "log_message" and rec["levelname"] == levelname, rec
    assert rec["name"] == "diskvault" and isinstance(rec["time"], float), rec
    assert needle in rec["message"] and "\n" not in rec["message"], rec


def test_bad_input_is_one_json_error_line(tmp_path):
    for args in (["list", "--log-json", "--no-such-option", str(tmp_path)],
                 ["--log-json", "frobnicate"]):
        r = dv(*args, check=False)
        assert r.returncode == 2 and r.stdout == b""
        (rec,) = _json_lines(r.stderr)
        _is_log_message(rec, "ERROR", "")
    missing = str(tmp_path / "no-repo")
    for args in (["list", "--log-json", missing], ["--log-json", "list", missing]):
        r = dv(*args, check=False)
        assert r.returncode == 2
        (rec,) = _json_lines(r.stderr)
        _is_log_message(rec, "ERROR", missing)
    # without the option: the same error as one text line
    r = dv("list", missing, check=False)
    assert r.stderr.decode().startswith("diskvault: error: ") and r.stderr.count(b"\n") == 1


def test_warnings_and_progress_are_all_json(tmp_path):
    repo = str(tmp_path / "plain")
    init_repo(repo, "none")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(300_000))
    shutil.rmtree(os.environ["DISKVAULT_SECURITY_DIR"])  # first contact, passphrase set
    r = dv("create", "-p", "--log-json", f"{repo}::a", str(data),
           env={"DISKVAULT_PASSPHRASE": "secret"})
    recs = _json_lines(r.stderr)
    assert {rec["type"] for rec in recs} == {"log_message", "progress_percent"}
    (warning,) = [rec for rec in recs if rec["type"] == "log_message"]
    _is_log_message(warning, "WARNING", "is not encrypted, but a passphrase is set")
    # a warning that ends the command (exit code 1) is a JSON line too
    item = dv("list", "--format", "{path}", f"{repo}::a").stdout.decode()
    r = dv("extract", "--log-json", "--stdout", f"{repo}::a", item, "no/such/path",
           check=False)
    assert r.returncode == 1 and r.stdout == data.read_bytes()
    (rec,) = _json_lines(r.stderr)
    _is_log_message(rec, "WARNING", "no/such/path")


def test_python_logging_records_take_the_same_path(capsys):
    """Storage retries and the FUSE view log through ``logging``: in JSON mode their
    records are log_message lines named by their logger; in text mode nothing changes."""
    try:
        log.configure(True)
        logging.getLogger("diskvault.storage.retry").warning("storage: %s; retrying", "EOF")
        log.note("a note")
        (retry, note) = _json_lines(capsys.readouterr().err.encode())
        assert retry["name"] == "diskvault.storage.retry" and retry["levelname"] == "WARNING"
        assert retry["message"] == "storage: EOF; retrying"
        _is_log_message(note, "INFO", "a note")
    finally:
        log.configure(False)
    log.note("a note")
    assert capsys.readouterr().err == "diskvault: note: a note\n"
    assert not any(isinstance(h, log._JsonHandler)
                   for h in logging.getLogger("diskvault").handlers)

"""Broken pipes: a reader of stdout that leaves ends the command quietly, as it ends `cat`;
a peer that leaves a socket diskvault writes to is an error, never the process's death.

The second was a real defect: the CLI set SIGPIPE to its default for `extract | head`,
so a backup server reset while paramiko sent killed diskvault silently (status -13,
no error line, no retry) — seen as a rare failure of the SFTP outage test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from support import DV, dv, init_repo

MiB = 1 << 20


def _reader_gone(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run the CLI with a stdout pipe whose read end is closed before it writes a byte
    (so the outcome does not depend on timing)."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([*DV, *args], stdout=w, stderr=subprocess.PIPE,
                           env={**os.environ, **env}, timeout=300)
    finally:
        os.close(w)
    return p


def test_extract_to_a_reader_that_left_ends_quietly_and_releases_the_repository(tmp_path):
    repo = str(tmp_path / "r")
    env = init_repo(repo, "repokey")
    dv("create", "--stdin-name", "d", f"{repo}::a", "-", input=os.urandom(8 * MiB), env=env)
    for args in (["extract", "--stdout", f"{repo}::a"], ["list", repo],
                 ["info", "--json", f"{repo}::a"]):
        p = _reader_gone(args, env)
        assert p.returncode == -signal.SIGPIPE, (args, p.returncode, p.stderr)
        assert p.stderr == b"", (args, p.stderr)
    # the locks were released before the process ended: an exclusive command runs at once
    dv("delete", f"{repo}::a", env=env)
    assert dv("list", repo, env=env).stdout == b""


_SEND_TO_A_GONE_PEER = """
import socket, sys
from argparse import Namespace
from diskvault.cli import main as cli

def run(args):
    mine, theirs = socket.socketpair()
    theirs.close()  # the server went away (a reset, as when sshd or S3 is killed)
    if sys.argv[1] == "raise":  # nobody catches it (a pipe to a helper program, say)
        mine.sendall(b"x" * 65536)
    try:
        mine.sendall(b"x" * 65536)  # what paramiko's or urllib3's socket send does
    except BrokenPipeError:
        print("EPIPE: an error the storage layer retries")
        return 0
    return 3

class Parser:
    def parse_args(self, argv):
        return Namespace(func=run, log_json=False)

cli.build_parser = lambda argv=None: Parser()
sys.exit(cli.main([]))
"""


def test_a_socket_whose_peer_left_is_an_error_not_death_by_sigpipe():
    p = subprocess.run([sys.executable, "-c", _SEND_TO_A_GONE_PEER, "catch"],
                       capture_output=True, timeout=60)
    assert p.returncode == 0, (p.returncode, p.stderr)
    assert p.stdout == b"EPIPE: an error the storage layer retries\n"


def test_a_broken_pipe_that_is_not_stdout_is_one_error_line():
    """A pipe towards a helper program (not stdout) that breaks: one clear line, exit 2."""
    p = subprocess.run([sys.executable, "-c", _SEND_TO_A_GONE_PEER, "raise"],
                       capture_output=True, timeout=60)
    err = p.stderr.decode()
    assert p.returncode == 2 and "Traceback" not in err, (p.returncode, err)
    assert err.startswith("diskvault: error: broken pipe") and len(err.splitlines()) == 1, err

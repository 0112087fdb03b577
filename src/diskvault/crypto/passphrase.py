"""Where a passphrase comes from: DISKVAULT_PASSPHRASE, DISKVAULT_PASSCOMMAND, or a prompt."""

from __future__ import annotations

import getpass
import os
import shlex
import subprocess
import sys

from ..errors import KeyError_, PassphraseMissing


def get_passphrase(prompt: str = "Enter passphrase: ", confirm: bool = False) -> str:
    env = os.environ.get("DISKVAULT_PASSPHRASE")
    if env is not None:
        return env
    cmd = os.environ.get("DISKVAULT_PASSCOMMAND")
    if cmd:
        try:
            r = subprocess.run(shlex.split(cmd), capture_output=True, text=True, check=False)
        except OSError as e:
            raise KeyError_(f"DISKVAULT_PASSCOMMAND failed: {e.strerror}") from None
        if r.returncode != 0:
            raise KeyError_(f"DISKVAULT_PASSCOMMAND exited with status {r.returncode}")
        return r.stdout.rstrip("\n")
    if not sys.stdin.isatty():
        raise PassphraseMissing()
    p = getpass.getpass(prompt)
    if confirm and getpass.getpass("Enter the same passphrase again: ") != p:
        raise KeyError_("passphrases do not match")
    return p

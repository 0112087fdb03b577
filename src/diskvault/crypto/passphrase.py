"""Where a passphrase comes from: DISKVAULT_PASSPHRASE, DISKVAULT_PASSCOMMAND, or a prompt.

A new passphrase (``init``) comes from the same places; a replacement (``key
change-passphrase``) only from DISKVAULT_NEW_PASSPHRASE or a prompt, never from the
variables that hold the current one. An empty new passphrase is mostly an unset shell
variable (``DISKVAULT_PASSPHRASE=$PW``): refused unless DISKVAULT_PASSPHRASE_EMPTY_OK=1.
"""

from __future__ import annotations

import getpass
import os
import shlex
import subprocess
import sys

from ..errors import KeyError_, PassphraseEmpty, PassphraseMissing, UsageError


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


def check_new_passphrase(p: str) -> str:
    """Refuse an empty new passphrase unless the user consented (see the module doc)."""
    if p == "" and os.environ.get("DISKVAULT_PASSPHRASE_EMPTY_OK") != "1":
        raise PassphraseEmpty()
    return p


def get_replacement_passphrase() -> str:
    """The new passphrase for ``key change-passphrase``: DISKVAULT_NEW_PASSPHRASE or a
    prompt with confirmation; DISKVAULT_PASSPHRASE (the current one) is never taken."""
    new = os.environ.get("DISKVAULT_NEW_PASSPHRASE")
    if new is None:
        if not sys.stdin.isatty():
            raise UsageError("the new passphrase is read from DISKVAULT_NEW_PASSPHRASE or a "
                             "terminal prompt: set it or run in a terminal")
        new = getpass.getpass("Enter new passphrase: ")
        if getpass.getpass("Enter the same passphrase again: ") != new:
            raise KeyError_("passphrases do not match")
    return check_new_passphrase(new)

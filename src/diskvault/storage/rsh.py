"""``--rsh`` / ``DISKVAULT_RSH``: the ssh options Borg users pass in ``BORG_RSH``.

Borg runs the ssh program; diskvault's SFTP backend is paramiko, which cannot run an
ssh command. So the command line is parsed and the options paramiko can honour are
applied as if they were lines of ``~/.ssh/config`` for the host (taking precedence over
it, as on OpenSSH's command line). Anything else is refused with a clear error rather
than silently ignored: a user who asked for ``-o ProxyJump=...`` must not get a direct
connection.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from ..errors import UsageError

RSH_ENV = "DISKVAULT_RSH"

# ssh_config keywords paramiko's connection code uses (lower case, as SSHConfig gives)
_KEYWORDS = {"identityfile", "port", "user", "stricthostkeychecking", "userknownhostsfile",
             "identitiesonly", "proxycommand", "hostname"}
_FLAGS = {"-i": "identityfile", "-p": "port", "-l": "user"}
SUPPORTED = ("-i KEYFILE, -p PORT, -l USER, -o IdentityFile=|Port=|User=|"
             "StrictHostKeyChecking=|UserKnownHostsFile=|IdentitiesOnly=|ProxyCommand=|HostName=")


def parse_rsh(text: str) -> dict[str, Any]:
    """``ssh -i KEY -p 2222 -o StrictHostKeyChecking=accept-new`` → ssh_config entries."""
    try:
        argv = shlex.split(text)
    except ValueError as e:
        raise UsageError(f"--rsh/{RSH_ENV}: cannot parse {text!r}: {e}") from None
    if not argv:
        return {}
    if os.path.basename(argv[0]) != "ssh":
        raise UsageError(f"--rsh/{RSH_ENV} must be an ssh command line (ssh OPTIONS...), "
                         f"not {argv[0]!r}: diskvault talks SFTP itself")
    out: dict[str, Any] = {}
    args = argv[1:]
    while args:
        opt = args.pop(0)
        flag, value = opt[:2], opt[2:]
        if flag in _FLAGS or flag == "-o":
            if not value:
                if not args:
                    raise UsageError(f"--rsh/{RSH_ENV}: {flag} needs a value")
                value = args.pop(0)
            if flag == "-o":
                key, sep, val = value.partition("=")
                if not sep:  # "-o Key Value" as one argument
                    key, _, val = value.partition(" ")
                _set(out, key.strip().lower(), val.strip(), opt)
            else:
                _set(out, _FLAGS[flag], value, opt)
        else:
            raise UsageError(f"--rsh/{RSH_ENV}: the ssh option {opt!r} cannot be honoured by "
                             f"the SFTP backend; supported: {SUPPORTED}")
    return out


def _set(out: dict[str, Any], key: str, value: str, opt: str) -> None:
    if key not in _KEYWORDS:
        raise UsageError(f"--rsh/{RSH_ENV}: the ssh option {opt!r} cannot be honoured by the "
                         f"SFTP backend; supported: {SUPPORTED}")
    if not value:
        raise UsageError(f"--rsh/{RSH_ENV}: {opt!r} needs a value")
    if key == "port" and not (value.isdigit() and 0 < int(value) < 65536):
        raise UsageError(f"--rsh/{RSH_ENV}: bad port {value!r}")
    if key == "identityfile":
        out.setdefault(key, []).append(os.path.expanduser(value))
    elif key in ("stricthostkeychecking", "identitiesonly"):
        out[key] = value.lower()
    else:
        out[key] = value


def rsh_options() -> dict[str, Any]:
    return parse_rsh(os.environ.get(RSH_ENV, ""))

"""Repository locations → a Store (nothing touches the network until the first call).

Accepted forms::

    /path/to/repo, relative/path, file:///path/to/repo
    sftp://[USER@]HOST[:PORT]/ABSOLUTE/PATH
    sftp://[USER@]HOST[:PORT]/~/PATH          (PATH relative to the login directory)
    ssh://[USER@]HOST[:PORT]/PATH, ssh://.../~/PATH, ssh://..././PATH  (Borg's spelling:
                                              the same SFTP repository; ./ = ~/)
    s3:[CRED@]http[s]://HOST[:PORT]/BUCKET[/PATH]   (S3-compatible endpoint, path-style)
    s3:[CRED@]/BUCKET[/PATH]                         (AWS S3)

``CRED`` is ``KEY:SECRET`` (percent-encode ``@``, ``:`` or ``/`` in them) or a profile
name from ``~/.aws/credentials``; without it boto3 reads ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE``. The secret never appears in
``Store.location`` (messages show ``KEY:***@``).

SFTP logins take ssh options from ``--rsh``/``DISKVAULT_RSH`` (see rsh.py), then use
``~/.ssh/config``, the SSH agent and ``~/.ssh/known_hosts`` like
OpenSSH; ``DISKVAULT_SFTP_ACCEPT_NEW_HOSTKEY=1`` trusts (and records) a host key never
seen before — meant for tests and first contact, never for a changed key.

Remote stores come wrapped in a RetryStore (pass ``retry=False`` for the bare backend)
that keeps retrying a failed operation for ``$DISKVAULT_RETRY_SECONDS`` (default 120).
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote

from ..errors import UsageError
from .base import Store
from .local import LocalStore
from .rsh import rsh_options

SYNTAX = (
    "expected PATH, file://PATH, sftp://[USER@]HOST[:PORT]/PATH (or ssh://...), "
    "s3:[KEY:SECRET@]http[s]://HOST[:PORT]/BUCKET[/PATH] or s3:[KEY:SECRET@]/BUCKET[/PATH]"
)

_SFTP_RE = re.compile(
    r"(?:sftp|ssh)://(?:(?P<user>[^@/]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^@/:\[\]]+)"
    r"(?::(?P<port>\d{1,5}))?(?P<path>/.*)"
)
_S3_RE = re.compile(
    r"s3:(?:(?P<cred>[^@]+?)@(?=https?://|/))?"
    r"(?:(?P<scheme>https?)://(?P<host>\[[0-9A-Fa-f:.]+\]|[^@/:\[\]]+)(?::(?P<port>\d{1,5}))?)?"
    r"/(?P<bucket>[^/]+)(?P<path>(?:/.*)?)"
)
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def mask(location: str) -> str:
    """The location with any secret replaced, fit for messages, logs and archive
    metadata. The one masking function: everything that prints or stores a location
    (or a command line argument that may be one) passes it through here."""
    # greedy up to the last '@': a secret with a stray '@' is masked whole, too
    location = re.sub(r"^(s3:[^:@/]+:).*@", r"\1***@", location)
    return re.sub(r"^((?:sftp|ssh)://[^:@/]+:)[^/]*@", r"\1***@", location)


def open_store(location: str, *, retry: bool = True) -> Store:
    """Return the backend for a repository location."""
    store: Store
    if location.startswith("s3:"):
        store = _open_s3(location)
    elif location.startswith(("sftp://", "ssh://")):
        store = _open_sftp(location)
    elif location.startswith("file://"):
        path = location[len("file://") :]
        if not path:
            raise UsageError(f"no path in {mask(location)!r}: {SYNTAX}")
        return LocalStore(unquote(path))
    elif (not location or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:(/|$)", location)
          or location.startswith(("sftp:", "ssh:", "file:"))):
        raise UsageError(f"cannot understand repository location {mask(location)!r}: {SYNTAX}")
    elif re.match(r"[^/@]+@[^/:]+:", location):
        # Borg 1's scp-like "user@host:path" would silently become a local directory
        raise UsageError(f"{mask(location)!r} looks like user@host:path; write "
                         f"sftp://user@host/path instead ({SYNTAX})")
    else:
        return LocalStore(location)
    if retry:
        from .retry import RetryStore

        return RetryStore(store, max_elapsed=_retry_seconds())
    return store


RETRY_ENV = "DISKVAULT_RETRY_SECONDS"


def _retry_seconds() -> float:
    """How long one remote operation keeps retrying (``$DISKVAULT_RETRY_SECONDS``)."""
    text = os.environ.get(RETRY_ENV, "").strip()
    if not text:
        return 120.0
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 86400:
        raise UsageError(f"{RETRY_ENV} must be a number of seconds (0 to 86400): {text!r}")
    return seconds


def _port(text: str | None, location: str) -> int | None:
    if text is None:
        return None
    port = int(text)
    if not 0 < port < 65536:
        raise UsageError(f"bad port {port} in {mask(location)!r}")
    return port


def _open_sftp(location: str) -> Store:
    m = _SFTP_RE.fullmatch(location)
    if not m or m["path"] in ("/", "/~", "/~/"):
        raise UsageError(f"cannot understand repository location {mask(location)!r}: {SYNTAX}")
    if m["user"] and ":" in m["user"]:
        raise UsageError(f"passwords in sftp locations are not supported (use SSH keys): "
                         f"{mask(location)!r}")
    path = unquote(m["path"])
    if path.startswith(("/~/", "/./")):
        # relative: the SFTP server starts in the login directory (Borg's ssh:// "./"
        # means the directory ssh starts in, which is the same)
        path = path[3:]
    if path in ("", "."):
        raise UsageError(f"cannot understand repository location {mask(location)!r}: {SYNTAX}")
    options = rsh_options()  # checked before paramiko is imported
    from .sftp import SftpStore  # paramiko is imported only for sftp repositories

    return SftpStore(
        m["host"].strip("[]"), path, user=unquote(m["user"]) if m["user"] else None,
        port=_port(m["port"], location), location=location, ssh_options=options,
    )


def _open_s3(location: str) -> Store:
    m = _S3_RE.fullmatch(location)
    if not m:
        raise UsageError(f"cannot understand repository location {mask(location)!r}: {SYNTAX}")
    if not _BUCKET_RE.fullmatch(m["bucket"]) or ".." in m["bucket"]:
        raise UsageError(f"invalid S3 bucket name {m['bucket']!r} in {mask(location)!r} "
                         "(3-63 of a-z, 0-9, '.', '-')")
    path = unquote(m["path"]).strip("/")
    if any(p in ("", ".", "..") for p in path.split("/")) and path:
        raise UsageError(f"invalid path {path!r} in {mask(location)!r}")
    key = secret = profile = None
    if m["cred"]:
        if ":" in m["cred"]:
            key, _, secret = m["cred"].partition(":")
            key, secret = unquote(key), unquote(secret)
            if not key or not secret:
                raise UsageError(f"S3 credentials must be KEY:SECRET in {mask(location)!r}")
        else:
            profile = unquote(m["cred"])
    endpoint = None
    if m["scheme"]:
        endpoint = f"{m['scheme']}://{m['host']}" + (f":{m['port']}" if m["port"] else "")
        _port(m["port"], location)
    from .s3 import S3Store  # boto3 is slow to import; only S3 repositories pay for it

    return S3Store(
        m["bucket"], path, endpoint_url=endpoint, access_key=key, secret_key=secret,
        profile=profile, location=mask(location),
    )

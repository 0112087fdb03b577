"""S3 backend for AWS and S3-compatible services (SeaweedFS, MinIO, Ceph RGW, …), on boto3.

Why boto3 directly rather than borgstore's s3 backend (both end up in the same boto3
calls, so speed is equal; the difference is fit):
- our ``list`` is recursive; borgstore's lists one directory level (``Delimiter='/'``), so
  walking ``packs/ab/`` would cost one request per directory instead of one per 1000 names;
- borgstore's ``create`` refuses a missing bucket, we create it; it leaks raw
  ``ClientError`` text for non-404 failures, we need one-line messages and a
  transient/permanent verdict for RetryStore;
- it builds its client with boto3 defaults: no path-style addressing, 10 pooled
  connections and botocore's own retry loop under ours.

Objects map 1:1 to keys ``<path>/<name>``. A ``store`` is one PUT, atomic by S3
semantics. A repository inside a bucket is marked by an empty ``<path>/`` key so that
``exists()`` is true right after ``create()``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.exceptions
import urllib3.exceptions
from botocore.config import Config

from ..errors import ObjectMissing, RepositoryExists, StorageFull
from .base import Store
from .retry import storage_error

_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_FULL_CODES = frozenset({"XMinioStorageFull", "InsufficientStorage", "QuotaExceeded"})
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
     "InternalError", "ServiceUnavailable", "OperationAborted"}
)
_NAME_RE = re.compile(r"[^/]+(/[^/]+)*")


def _drop_expect_header(request: Any, **_: Any) -> None:
    # botocore asks for ``100-continue`` on every PUT; SeaweedFS answers an empty PUT
    # with a stray 100 that the next request on that pooled connection misreads as its
    # response and then hangs. Skipping the handshake only costs a wasted upload when
    # the server would have refused the body anyway.
    request.headers.pop("Expect", None)


def check_name(name: str) -> None:
    """Refuse names that would escape the prefix or alias another name (as LocalStore)."""
    if not _NAME_RE.fullmatch(name) or any(p in (".", "..") for p in name.split("/")):
        raise storage_error(f"invalid object name {name!r}", transient=False)


class S3Store(Store):
    # uploads of whole packs at once: 4 keep a LAN or loopback server busy (one stream
    # carries ~120 MB/s there) and cost 4 packs of memory; far-away endpoints gain from
    # more (``--upload-connections``), as the pool grows to match
    upload_concurrency = 4

    def __init__(
        self,
        bucket: str,
        path: str = "",
        *,
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        profile: str | None = None,
        region: str | None = None,
        max_connections: int = 16,
        location: str | None = None,
    ) -> None:
        self.bucket = bucket
        path = path.strip("/")
        self._prefix = path + "/" if path else ""
        self.endpoint_url = endpoint_url
        self.location = location or f"s3:{endpoint_url or ''}/{bucket}/{path}".rstrip("/")
        self._credentials = (access_key, secret_key, profile, region)
        self._max_connections = max_connections
        self._client: Any = None
        self._client_lock = threading.Lock()

    # --- plumbing ------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The boto3 client, made on first use: open_store must not touch the network."""
        with self._client_lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        access_key, secret_key, profile, region = self._credentials
        try:
            session = boto3.Session(
                aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                profile_name=profile,
            )
        except botocore.exceptions.BotoCoreError as e:
            raise storage_error(f"{self.location}: {e}", transient=False) from None
        config = Config(
            # SeaweedFS/MinIO serve buckets under the path, not as virtual hosts
            s3={"addressing_style": "path" if self.endpoint_url else "virtual"},
            # one client is shared by all worker threads: one pooled connection each
            max_pool_connections=self._max_connections,
            # RetryStore owns the retry policy; two nested loops would multiply waits
            retries={"total_max_attempts": 1},
            connect_timeout=10,
            read_timeout=120,
        )
        client = session.client(
            "s3", endpoint_url=self.endpoint_url, config=config,
            region_name=region or session.region_name or "us-east-1",
        )
        client.meta.events.register("before-send.s3", _drop_expect_header)
        return client

    def reserve_connections(self, n: int) -> None:
        want = n + 4  # room for the readers and the lock heartbeat beside the uploads
        with self._client_lock:
            if want <= self._max_connections:
                return
            self._max_connections = want
            # the pool size is fixed per client: the next call makes a bigger one; the
            # old client is left to requests still running on it (never closed under them)
            self._client = None

    def _key(self, name: str) -> str:
        check_name(name)
        return self._prefix + name

    def _error(self, e: Exception, op: str, name: str = "") -> Exception:
        """Translate a boto3/urllib3 exception into ours (returned, for ``raise … from None``)."""
        what = f"S3 {op} {name or self.location}"
        if isinstance(e, botocore.exceptions.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if name and code in _MISSING_CODES:
                return ObjectMissing(name)
            if code in _FULL_CODES or status == 507:
                return StorageFull(self.location)
            if code == "NoSuchBucket":
                return storage_error(f"{what}: bucket {self.bucket} does not exist", False)
            transient = status >= 500 or code in _TRANSIENT_CODES
            return storage_error(f"{what}: {code} {err.get('Message', '')}", transient)
        if isinstance(e, botocore.exceptions.NoCredentialsError):
            return storage_error(
                f"{what}: no S3 credentials: put KEY:SECRET@ in the location or set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", transient=False,
            )
        if isinstance(e, botocore.exceptions.ParamValidationError | ValueError):
            return storage_error(f"{what}: {e}", transient=False)
        # connection refused/reset, timeouts, a body cut short: worth another try
        return storage_error(f"{what}: {type(e).__name__}: {e}", transient=True)

    # --- Store interface -----------------------------------------------------------------

    def exists(self) -> bool:
        try:
            if not self._prefix:
                self.client.head_bucket(Bucket=self.bucket)
                return True
            return self._head(self._prefix) is not None or self._has_values()
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise self._error(e, "exists") from None
        except _NETWORK_ERRORS as e:
            raise self._error(e, "exists") from None

    def create(self) -> None:
        try:
            self._ensure_bucket()
            # like LocalStore: an empty place (or our own empty marker) may be reused
            if self._has_values():
                raise RepositoryExists(self.location)
            if self._prefix:
                self.client.put_object(Bucket=self.bucket, Key=self._prefix, Body=b"")
        except (botocore.exceptions.ClientError, *_NETWORK_ERRORS) as e:
            raise self._error(e, "create") from None

    def _ensure_bucket(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise
        kw: dict[str, Any] = {}
        region = self.client.meta.region_name
        if self.endpoint_url is None and region != "us-east-1":
            kw["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(Bucket=self.bucket, **kw)
        except botocore.exceptions.ClientError as e:
            # a concurrent `init` made it first: fine, the prefix check decides
            if e.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise

    def _has_values(self) -> bool:
        r = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self._prefix, MaxKeys=2)
        return any(o["Key"] != self._prefix for o in r.get("Contents", ()))

    def _head(self, key: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") in _MISSING_CODES:
                return None
            raise

    def load(self, name: str, offset: int = 0, size: int | None = None) -> bytes:
        key = self._key(name)
        if size is not None and size <= 0:
            self.size(name)  # a missing name must still raise ObjectMissing
            return b""
        kw: dict[str, str] = {}
        if size is not None:
            kw["Range"] = f"bytes={offset}-{offset + size - 1}"
        elif offset:
            kw["Range"] = f"bytes={offset}-"
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=key, **kw)
            data = r["Body"].read()
        except botocore.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # offset at or past the end: like reading past EOF locally
            raise self._error(e, "load", name) from None
        except _NETWORK_ERRORS as e:
            raise self._error(e, "load", name) from None
        if kw and "ContentRange" not in r:
            # a server that ignores Range sends the whole object (HTTP 200): cut locally
            data = data[offset:] if size is None else data[offset : offset + size]
        return bytes(data)

    def store(self, name: str, value: bytes | bytearray | memoryview) -> None:
        key = self._key(name)
        body = value if isinstance(value, bytes | bytearray) else bytes(value)
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body)
        except (botocore.exceptions.ClientError, *_NETWORK_ERRORS) as e:
            raise self._error(e, "store", name) from None

    def delete(self, name: str) -> None:
        key = self._key(name)
        try:
            # S3 DELETE succeeds for missing keys; the contract wants ObjectMissing
            if self._head(key) is None:
                raise ObjectMissing(name)
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except (botocore.exceptions.ClientError, *_NETWORK_ERRORS) as e:
            raise self._error(e, "delete", name) from None

    def size(self, name: str) -> int:
        try:
            n = self._head(self._key(name))
        except (botocore.exceptions.ClientError, *_NETWORK_ERRORS) as e:
            raise self._error(e, "size", name) from None
        if n is None:
            raise ObjectMissing(name)
        return n

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        if prefix:
            check_name(prefix.rstrip("/"))
        full = self._prefix + (prefix.rstrip("/") + "/" if prefix else "")
        skip = len(self._prefix)
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full, PaginationConfig={"PageSize": 1000}
        )
        try:
            for page in pages:
                for o in page.get("Contents", ()):
                    if not o["Key"].endswith("/"):  # directory markers are not values
                        yield o["Key"][skip:], int(o["Size"])
        except (botocore.exceptions.ClientError, *_NETWORK_ERRORS) as e:
            raise self._error(e, "list", prefix or "/") from None

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None


# everything below ClientError that a network or a dying server can cause
_NETWORK_ERRORS: tuple[type[Exception], ...] = (
    botocore.exceptions.BotoCoreError,
    urllib3.exceptions.HTTPError,
    OSError,
)

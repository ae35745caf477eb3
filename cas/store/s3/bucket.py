"""One S3 bucket reached through boto3: the client, its thread pool, retries, and errors.

Shared by the stores of :mod:`cas.store.s3`. Endpoint, credentials and region come from the
standard AWS environment variables and config files (``AWS_ENDPOINT_URL`` for S3-compatible
servers); every botocore error becomes a :class:`~cas.errors.StoreError` naming what failed,
the endpoint and the bucket, never a credential.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

from ...errors import StoreError

try:  # boto3 is optional (the ``s3`` extra); S3Bucket says how to get it.
    import boto3
    import botocore.config
    import botocore.exceptions
    import botocore.session
    import urllib3.exceptions
except ImportError:  # pragma: no cover - exercised by a subprocess test without boto3
    boto3 = None

log = logging.getLogger(__name__)

#: Attempts per request (botocore's retries, and ours for interrupted response bodies),
#: unless AWS_MAX_ATTEMPTS or the AWS config file says otherwise.
DEFAULT_ATTEMPTS = 5


class S3AccessDeniedError(StoreError, PermissionError):
    """The bucket refused the credentials (wrong key or secret, or no permission)."""


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix/")`` (the prefix empty or ending in ``/``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an S3 URL (want s3://bucket/prefix): {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"an S3 store URL takes no query or fragment: {url!r}")
    return parts.netloc, _norm_prefix(parts.path)


def _norm_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def _require_boto3() -> None:
    if boto3 is None:
        raise ImportError("s3:// stores need boto3, which is not installed: pip install 'pathapi[s3]'")


@dataclass(frozen=True)
class _Listed:
    key: str
    etag: str
    size: int
    modified: float  # seconds since the epoch, by the server's clock


T = TypeVar("T")


class S3Bucket:
    """One bucket reached through one boto3 client and thread pool, shared by its stores.

    ``workers`` is both the thread pool's size and the client's ``max_pool_connections``:
    batch operations run that many requests at once and never wait for a connection.
    Requests are retried by botocore (``standard`` mode: throttling, 5xx and connection
    errors, exponential backoff) up to ``max_attempts`` times; interrupted response bodies
    are retried here as often. ``connect_timeout`` and ``read_timeout`` bound how long a
    dead or frozen server can hold a request. Every failure is raised as a
    :class:`~cas.errors.StoreError` that names the endpoint, bucket and key.

    Reference-counted: the creator holds one reference and each store built on it another;
    the client and threads are released when the last one is released.
    """

    def __init__(
        self,
        bucket: str,
        *,
        workers: int = 16,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        max_attempts: int | None = None,
        check: bool = True,
    ) -> None:
        _require_boto3()
        if not bucket:
            raise ValueError("an S3 store needs a bucket name")
        self.bucket = bucket
        core = botocore.session.Session()  # reads the AWS environment variables and config files
        session = boto3.session.Session(botocore_session=core)
        configured = core.get_config_variable("max_attempts")
        self.attempts = int(max_attempts or configured or DEFAULT_ATTEMPTS)
        mode = core.get_config_variable("retry_mode")
        config = botocore.config.Config(
            max_pool_connections=workers,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": self.attempts, "mode": mode if mode in ("standard", "adaptive") else "standard"},
            tcp_keepalive=True,
        )
        try:
            self.client = session.client("s3", config=config)
        except botocore.exceptions.BotoCoreError as e:
            raise StoreError(f"cannot set up an S3 client for bucket {bucket!r}: {e}", f"s3://{bucket}") from None
        self.endpoint: str = self.client.meta.endpoint_url
        self.location = f"s3://{bucket}"
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix=f"s3-{bucket}")
        self.workers = workers
        self._refs = 1
        self._lock = threading.Lock()
        self._conditional = True  # whether the server honours If-None-Match on PUT
        if check:
            try:
                self.check()
            except BaseException:
                self.release()
                raise

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> tuple[S3Bucket, str]:
        """A bucket connection and the normalized prefix of ``s3://bucket/prefix``."""
        _require_boto3()
        bucket, prefix = parse_url(url)
        return cls(bucket, **kwargs), prefix

    # -- lifetime ----------------------------------------------------------------------
    def retain(self) -> S3Bucket:
        with self._lock:
            if self._refs <= 0:
                raise StoreError(f"connection to {self.location} is closed", self.location)
            self._refs += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.client.close()

    # -- requests ----------------------------------------------------------------------
    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def check(self) -> None:
        """Raise StoreError unless the bucket exists and these credentials may use it."""
        self._call("HeadBucket", "", self.client.head_bucket, Bucket=self.bucket)

    def put(self, key: str, body: bytes, *, if_absent: bool = False) -> str | None:
        """Store ``body`` at ``key``; its ETag. With ``if_absent``, None if ``key`` exists
        (``If-None-Match: *``; on a server without conditional puts, a HEAD first)."""
        if if_absent and not self._conditional:
            if self.head(key):
                return None
            if_absent = False
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key, "Body": body}
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        try:
            r = self._call("PutObject", key, self.client.put_object, ok=("PreconditionFailed", "412", "NotImplemented", "501"), **kwargs)
        except _Expected as e:
            if e.code in ("NotImplemented", "501"):
                log.info("%s does not support conditional puts; checking with HEAD first", self.endpoint)
                self._conditional = False
                return self.put(key, body, if_absent=True)
            return None
        return _etag(r)

    def get(self, key: str, first: int | None = None, last: int | None = None) -> tuple[bytes, str] | None:
        """(bytes, ETag) of ``key`` (bytes ``first..last`` inclusive, if given); None if absent.

        A range past the object's end gives the bytes there are (possibly none): callers
        check lengths. Bodies cut off mid-transfer are fetched again, up to the attempt limit.
        """
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if first is not None:
            kwargs["Range"] = f"bytes={first}-{'' if last is None else last}"
        for attempt in range(1, self.attempts + 1):
            try:
                r = self._call("GetObject", key, self.client.get_object, ok=("NoSuchKey", "404", "InvalidRange", "416"), **kwargs)
            except _Expected as e:
                return None if e.code in ("NoSuchKey", "404") else (b"", "")
            try:
                return r["Body"].read(), _etag(r)
            except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError) as e:
                r["Body"].close()
                if attempt == self.attempts:
                    raise self._error(e, "GetObject", key) from None
                log.debug("GET %s interrupted (%s); attempt %d of %d", self.url(key), type(e).__name__, attempt, self.attempts)
                time.sleep(min(20.0, random.uniform(0, 2**attempt) * 0.1))
        raise AssertionError("unreachable")  # pragma: no cover

    def head(self, key: str) -> bool:
        try:
            self._call("HeadObject", key, self.client.head_object, ok=("NoSuchKey", "404"), Bucket=self.bucket, Key=key)
        except _Expected:
            return False
        return True

    def delete(self, keys: Iterable[str]) -> None:
        """Delete ``keys`` (absent ones are fine), 1000 per request."""
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            r = self._call("DeleteObjects", batch[0], self.client.delete_objects, Bucket=self.bucket,
                           Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            errors = [e for e in r.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                e = errors[0]
                raise StoreError(
                    f"cannot delete {self.url(e.get('Key', '?'))} at {self.endpoint}: {e.get('Code')}: {e.get('Message')}"
                    + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""),
                    self.location,
                )

    def objects(self, prefix: str) -> Iterator[_Listed]:
        """Every object whose key starts with ``prefix``, in key order."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            r = self._call("ListObjectsV2", prefix, self.client.list_objects_v2, **kwargs)
            for o in r.get("Contents", []):
                yield _Listed(o["Key"], o.get("ETag", "").strip('"'), int(o.get("Size", 0)), o["LastModified"].timestamp())
            if not r.get("IsTruncated"):
                return
            token = r.get("NextContinuationToken")

    def server_time(self) -> float:
        """The server's clock (from a response's Date header), for ages of objects it stamped."""
        r = self._call("ListObjectsV2", "", self.client.list_objects_v2, Bucket=self.bucket, MaxKeys=1)
        date = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        return email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()

    def map(self, fn: Callable[[T], Any], items: Iterable[T]) -> list[Any]:
        """``[fn(x) for x in items]``, run on the pool; the first error is raised after all finished."""
        futures = [self.pool.submit(fn, x) for x in items]
        wait(futures)
        return [f.result() for f in futures]

    # -- errors ------------------------------------------------------------------------
    def _call(self, op: str, key: str, method: Callable[..., Any], ok: tuple[str, ...] = (), **params: Any) -> Any:
        """``method(**params)`` (a client method), its errors translated; an error whose code
        is in ``ok`` is raised as ``_Expected`` for the caller to handle."""
        try:
            return method(**params)
        except botocore.exceptions.ClientError as e:
            code, _ = _code(e)
            if code in ok:  # by code only: a 404 "NoSuchBucket" is no missing key (HEAD answers carry the status as code)
                raise _Expected(code) from None
            raise self._error(e, op, key) from None
        except (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError) as e:
            raise self._error(e, op, key) from None

    def _error(self, e: BaseException, op: str, key: str) -> StoreError:
        """Our error for a botocore one: what failed, where, and what to check (never a secret)."""
        where = f"{op} {self.url(key)} at {self.endpoint}"
        if isinstance(e, botocore.exceptions.ClientError):
            code, status = _code(e)
            message = e.response.get("Error", {}).get("Message", "")
            if status == 403 or code in _DENIED:
                return S3AccessDeniedError(
                    f"access denied to bucket {self.bucket!r} at {self.endpoint} ({op}: {code or 'HTTP 403'}): check the "
                    "credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the bucket's policy",
                    self.location,
                )
            if code == "NoSuchBucket" or (op == "HeadBucket" and status == 404):
                return StoreError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint}: create it first "
                    f"(for example `aws s3 mb s3://{self.bucket}`)",
                    self.location,
                )
            return StoreError(f"{where} failed: {code or status}{': ' + message if message else ''}", self.location)
        if isinstance(e, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
            return S3AccessDeniedError(
                f"no AWS credentials for bucket {self.bucket!r} at {self.endpoint}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or a credentials file)",
                self.location,
            )
        if isinstance(e, _UNREACHABLE):
            return StoreError(
                f"cannot reach S3 endpoint {self.endpoint} for bucket {self.bucket!r} ({where}; gave up after "
                f"{self.attempts} attempts): {type(e).__name__}: {e}",
                self.location,
            )
        return StoreError(f"{where} failed: {type(e).__name__}: {e}", self.location)


_DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                     "InvalidClientTokenId", "AllAccessDisabled"})


_UNREACHABLE: tuple[type[BaseException], ...] = (
    (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError, botocore.exceptions.IncompleteReadError,
     urllib3.exceptions.HTTPError, OSError)
    if boto3 is not None
    else ()
)


class _Expected(Exception):
    """An S3 answer the caller asked to handle itself (404, 412...)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def _code(e: Any) -> tuple[str, int | None]:
    return str(e.response.get("Error", {}).get("Code", "")), e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _etag(response: dict[str, Any]) -> str:
    return str(response.get("ETag", "")).strip('"')

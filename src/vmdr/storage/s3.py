"""S3 backend (boto3), for AWS and S3-compatible servers (SeaweedFS, MinIO, Ceph…).

URL: ``s3://bucket[/prefix][?endpoint=URL&region=R&path_style=1&timeout=S]``.
The endpoint may also come from ``$VMDR_S3_ENDPOINT`` or ``$AWS_ENDPOINT_URL``;
credentials come from the standard AWS chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``~/.aws``). The region defaults to the
AWS configuration, else ``us-east-1``.

botocore does not retry (``RetryingBackend`` does). ``put`` is a single PutObject,
atomic by nature; ``put_if_absent`` uses ``If-None-Match: *`` where the server
supports it. S3 deletes are silent for missing keys, so ``delete`` checks first.
Objects whose name ends in ``.tmp`` are never listed, as with the other backends.
"""

from __future__ import annotations

import base64
import hashlib
import os
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from vmdr.errors import (
    AuthenticationFailed,
    ObjectNotFound,
    StorageError,
    TransientStorageError,
    UsageError,
)
from vmdr.storage.base import Backend, ObjectInfo, validate_name
from vmdr.storage.registry import redact, redact_text, register

T = TypeVar("T")
TMP_SUFFIX = ".tmp"
_AUTH_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden",
    "InvalidToken", "ExpiredToken", "TokenRefreshRequired", "InvalidClientTokenId",
}
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException",
    "RequestThrottled", "RequestLimitExceeded", "TooManyRequests", "RequestTimeout",
    "InternalError", "ServiceUnavailable", "OperationAborted",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}


def _one_line(text: object) -> str:
    """A library's message on one line, with any URL password (endpoint, proxy) hidden."""
    return redact_text(" ".join(str(text).split())) or "unknown error"


class S3Backend(Backend):
    """Objects as keys ``prefix/name`` in one bucket."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        path_style: bool = False,
        timeout: float = 60.0,
        display_url: str = "",
    ) -> None:
        import boto3.session
        import botocore.config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_name(self.prefix)
        self.endpoint = endpoint
        self.display_url = display_url or f"s3://{bucket}/{self.prefix}"
        self._bucket_checked = False
        try:
            config = botocore.config.Config(
                retries={"total_max_attempts": 1, "mode": "standard"},
                connect_timeout=min(timeout, 15.0),
                read_timeout=timeout,
                max_pool_connections=32,
                s3={"addressing_style": "path" if path_style else "auto"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            session = boto3.session.Session()
            self._s3: Any = session.client(
                "s3", endpoint_url=endpoint, config=config,
                region_name=region or session.region_name or "us-east-1",
            )
        except Exception as exc:  # bad profile, bad endpoint URL, too old a botocore…
            raise StorageError(f"s3: cannot set up client: {_one_line(exc)}") from None

    def _key(self, name: str) -> str:
        validate_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _where(self) -> str:
        return f"bucket {self.bucket!r}" + (f" at {redact(self.endpoint)}" if self.endpoint
                                            else "")

    def _translate(self, exc: Exception, what: str) -> Exception:
        import botocore.exceptions as be

        if isinstance(exc, be.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            detail = _one_line(f"{code} {err.get('Message', '')}".strip())
            if code == "NoSuchBucket":
                return StorageError(f"s3: {self._where()} does not exist")
            if code in _NOT_FOUND_CODES:
                return ObjectNotFound(f"no such object: {what}")
            if code in _AUTH_CODES or status in (401, 403):
                return AuthenticationFailed(
                    f"s3: {self._where()} refused access to {what}: {detail}"
                )
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return TransientStorageError(f"s3: {what}: {detail or status} (HTTP {status})")
            return StorageError(f"s3: {what}: {detail} (HTTP {status})")
        if isinstance(exc, be.NoCredentialsError | be.PartialCredentialsError):
            return AuthenticationFailed(
                "s3: no usable AWS credentials (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
            )
        if isinstance(exc, be.SSLError):
            return StorageError(f"s3: {what}: TLS error: {_one_line(exc)}")
        if isinstance(exc, be.ConnectTimeoutError | be.ReadTimeoutError):
            return TransientStorageError(f"s3: {what}: timed out talking to {self._where()}")
        if isinstance(
            exc,
            be.HTTPClientError | be.ConnectionError | be.ResponseStreamingError
            | be.IncompleteReadError | OSError,
        ):
            return TransientStorageError(f"s3: {what}: connection problem: {_one_line(exc)}")
        return StorageError(f"s3: {what}: {_one_line(exc)}")

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except StorageError:
            raise
        except Exception as exc:
            raise self._translate(exc, what) from None

    def _not_found(self, name: str) -> ObjectNotFound:
        """A HEAD 404 does not say whether the key or the bucket is missing: check once."""
        if not self._bucket_checked:
            try:
                self._call("bucket", lambda: self._s3.head_bucket(Bucket=self.bucket))
            except ObjectNotFound:
                raise StorageError(f"s3: {self._where()} does not exist") from None
            self._bucket_checked = True
        return ObjectNotFound(f"no such object: {name}")

    def create(self) -> None:
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            err = self._translate(exc, "bucket")
            if not isinstance(err, ObjectNotFound):
                raise err from None
            self._call("create bucket", self._create_bucket)
        self._bucket_checked = True

    def _create_bucket(self) -> None:
        import botocore.exceptions as be

        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self._s3.meta.region_name
        if region and region != "us-east-1" and not self.endpoint:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._s3.create_bucket(**kwargs)
        except be.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise

    def get(self, name: str) -> bytes:
        key = self._key(name)
        data: bytes = self._call(
            name, lambda: self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        )
        return data

    def get_range(self, name: str, offset: int, length: int) -> bytes:
        import botocore.exceptions as be

        key = self._key(name)
        if length <= 0:
            self.stat(name)
            return b""

        def op() -> bytes:
            try:
                resp = self._s3.get_object(
                    Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}"
                )
            except be.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""  # offset at or past the end (or an empty object)
                raise
            body: bytes = resp["Body"].read()
            return body[:length]

        return self._call(name, op)

    def put(self, name: str, data: bytes) -> None:
        key = self._key(name)
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        self._call(
            name,
            lambda: self._s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentMD5=md5),
        )

    def put_if_absent(self, name: str, data: bytes) -> bool:
        import botocore.exceptions as be

        key = self._key(name)

        def op() -> bool:
            try:
                self._s3.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
            except be.ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                if code in ("NotImplemented", "InvalidArgument"):
                    return super(S3Backend, self).put_if_absent(name, data)
                raise
            except be.ParamValidationError:  # a botocore without If-None-Match
                return super(S3Backend, self).put_if_absent(name, data)
            return True

        return self._call(name, op)

    def delete(self, name: str) -> None:
        key = self._key(name)
        self.stat(name)  # S3 DeleteObject succeeds for missing keys; the contract does not
        self._call(name, lambda: self._s3.delete_object(Bucket=self.bucket, Key=key))

    def stat(self, name: str) -> ObjectInfo:
        key = self._key(name)
        try:
            head = self._call(name, lambda: self._s3.head_object(Bucket=self.bucket, Key=key))
        except ObjectNotFound:
            raise self._not_found(name) from None
        return ObjectInfo(name, int(head["ContentLength"]), head["LastModified"].timestamp())

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        start = self._key(prefix) + "/"
        skip = len(self.prefix) + 1 if self.prefix else 0
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=start
        )
        it = iter(pages)
        while True:
            page = self._call(prefix, lambda: next(it, None))
            if page is None:
                return
            for obj in page.get("Contents", []):
                key: str = obj["Key"]
                if key.endswith(TMP_SUFFIX) or key.endswith("/"):
                    continue
                yield ObjectInfo(key[skip:], int(obj["Size"]), obj["LastModified"].timestamp())

    def close(self) -> None:
        self._s3.close()


def _factory(parts: urllib.parse.SplitResult) -> Backend:
    if not parts.hostname:
        raise UsageError("s3 URL needs a bucket: s3://bucket/prefix")
    if parts.password or parts.username:
        raise UsageError("put S3 credentials in the environment or ~/.aws, not in the URL")
    query = dict(urllib.parse.parse_qsl(parts.query))
    endpoint = (
        query.get("endpoint")
        or os.environ.get("VMDR_S3_ENDPOINT")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )
    if endpoint:
        try:
            ok = urllib.parse.urlsplit(endpoint).scheme in ("http", "https")
        except ValueError:
            ok = False
        if not ok:
            raise UsageError(f"invalid S3 endpoint {redact(endpoint)!r}: expected http://… "
                             "or https://…")
    try:
        timeout = float(query.get("timeout", 60))
    except ValueError:
        raise UsageError(f"invalid s3 timeout: {query.get('timeout')!r}") from None
    return S3Backend(
        parts.netloc,
        urllib.parse.unquote(parts.path),
        endpoint=endpoint,
        region=query.get("region") or None,
        path_style=query.get("path_style", "").lower() in ("1", "true", "yes"),
        timeout=timeout,
        display_url=redact(parts.geturl()),
    )


register("s3", _factory, "an S3 bucket: s3://bucket/prefix?endpoint=URL&region=R&path_style=1")

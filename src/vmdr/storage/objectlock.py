"""S3 Object Lock: server-enforced immutability for repositories in S3 buckets.

A repository created with ``vmdr repo init --object-lock-days N`` records
``"object_lock": {"mode": "GOVERNANCE"|"COMPLIANCE", "days": N}`` in its config
(docs/format.md §2). Every vmdr client that opens it wraps its S3 backend in
:class:`ObjectLockBackend`, which sends ``x-amz-object-lock-mode`` and
``x-amz-object-lock-retain-until-date`` (now + N days) with every PutObject, except for
lock files (``locks/``) and the prune token (``state/``). Until that date the server
refuses to delete or overwrite *that version* of the object, whoever asks.

Object Lock needs a versioned bucket created with Object Lock enabled. A plain DELETE in
such a bucket still "succeeds" by adding a delete marker (the object vanishes from
listings); the locked version stays and can be brought back. See docs/operations.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from vmdr.errors import ObjectNotFound, StorageError, UsageError
from vmdr.storage.base import Backend
from vmdr.storage.s3 import S3Backend
from vmdr.storage.wrappers import DelegatingBackend, RetryingBackend
from vmdr.timeutil import utcnow

MODES = ("GOVERNANCE", "COMPLIANCE")
UNLOCKED_PREFIXES = ("locks/", "state/")
CONFIG_NAME = "vmdr-repo"


@dataclass(frozen=True)
class Retention:
    mode: str
    days: int

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"object lock mode must be one of {', '.join(MODES)}")
        if not 1 <= self.days <= 36500:
            raise UsageError("object lock days must be from 1 to 36500")

    def to_doc(self) -> dict[str, Any]:
        return {"mode": self.mode, "days": self.days}

    @classmethod
    def from_doc(cls, doc: object) -> Retention:
        if not isinstance(doc, dict):
            raise StorageError("the repository config has a malformed object_lock entry")
        try:
            return cls(str(doc["mode"]).upper(), int(doc["days"]))
        except (KeyError, ValueError, TypeError, UsageError):
            raise StorageError("the repository config has a malformed object_lock entry") from None


def require_s3(backend: Backend, what: str) -> S3Backend:
    if not isinstance(backend, S3Backend):
        raise UsageError(f"{what} needs an S3 repository (s3://bucket/prefix), "
                         f"not {backend.display_url}")
    return backend


def bucket_lock_enabled(backend: Backend) -> bool | None:
    """Whether the bucket has Object Lock enabled; ``None`` if the bucket does not exist."""
    s3 = require_s3(backend, "Object Lock")
    import botocore.exceptions as be

    try:
        resp = s3._s3.get_object_lock_configuration(Bucket=s3.bucket)
    except be.ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return None
        if code == "ObjectLockConfigurationNotFoundError":
            return False
        raise s3._translate(exc, "object lock configuration") from None
    except Exception as exc:
        raise s3._translate(exc, "object lock configuration") from None
    return bool(resp.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled")


def prepare_bucket(backend: Backend) -> None:
    """Make sure the bucket exists with Object Lock enabled (creating it if absent)."""
    s3 = require_s3(backend, "Object Lock")
    state = bucket_lock_enabled(s3)
    if state is None:
        kwargs: dict[str, Any] = {"Bucket": s3.bucket, "ObjectLockEnabledForBucket": True}
        region = s3._s3.meta.region_name
        if region and region != "us-east-1" and not s3.endpoint:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        s3._call("create bucket", lambda: s3._s3.create_bucket(**kwargs))
        state = bucket_lock_enabled(s3)
    if not state:
        raise UsageError(
            f"bucket {s3.bucket!r} does not have S3 Object Lock enabled; create the bucket "
            "with it (aws s3api create-bucket --object-lock-enabled-for-bucket) or let "
            "'vmdr repo init --object-lock-days N' create it"
        )


def for_new_repository(backend: Backend, mode: str, days: int) -> tuple[Backend, dict[str, Any]]:
    """For ``repo init --object-lock-days``: prepare the bucket; return the locking backend
    and the ``object_lock`` config entry."""
    retention = Retention(mode.upper(), days)
    prepare_bucket(backend)
    return ObjectLockBackend(require_s3(backend, "Object Lock"), retention), retention.to_doc()


class ObjectLockBackend(DelegatingBackend):
    """An S3 backend whose puts carry an Object Lock retention of *retention*."""

    def __init__(self, inner: S3Backend, retention: Retention,
                 clock: Callable[[], datetime] = utcnow) -> None:
        super().__init__(inner)
        self.s3 = inner
        self.retention = retention
        self._clock = clock

    def _args(self, name: str, data: bytes) -> dict[str, Any]:
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        return {
            "Bucket": self.s3.bucket, "Key": self.s3._key(name), "Body": data,
            "ContentMD5": md5, "ObjectLockMode": self.retention.mode,
            "ObjectLockRetainUntilDate": self._clock() + timedelta(days=self.retention.days),
        }

    def put(self, name: str, data: bytes) -> None:
        if name.startswith(UNLOCKED_PREFIXES):
            self.inner.put(name, data)
            return
        args = self._args(name, data)
        self.s3._call(name, lambda: self.s3._s3.put_object(**args))

    def put_if_absent(self, name: str, data: bytes) -> bool:
        if self.exists(name):
            return False
        self.put(name, data)
        return True


def configured_retention(backend: Backend) -> Retention | None:
    """The ``object_lock`` setting of the repository config at *backend*, if any.

    Read before the repository is opened (so that every write is locked); the config's
    MAC, checked by ``Repository.open``, covers this field on encrypted repositories.
    """
    try:  # retried like every other read (RetryingBackend.close would close *backend*)
        doc = json.loads(RetryingBackend(backend).get(CONFIG_NAME))
    except (ObjectNotFound, ValueError):
        return None
    if not isinstance(doc, dict) or "object_lock" not in doc:
        return None
    return Retention.from_doc(doc["object_lock"])


def with_object_lock(backend: Backend) -> Backend:
    """Wrap *backend* in ``ObjectLockBackend`` if its repository asks for Object Lock."""
    retention = configured_retention(backend)
    if retention is None:
        return backend
    return ObjectLockBackend(require_s3(backend, "this repository's Object Lock"), retention)

"""The object store: where continuous backup, base images and snapshots live.

Two implementations behind one small interface: a local folder (the default, under the
Borealis home) and S3 through boto3 (bucket, prefix, endpoint URL; credentials from the
usual AWS sources).

Invariants:
- a write is atomic: an object is either absent or whole under its final key (local:
  written under a temporary name, fsynced, renamed; S3: a single PUT);
- every object carries the SHA-256 of its bytes, checked after the upload and again by
  ``verify``, so a damaged or truncated object is found, never restored from silently.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from borealis import settings
from borealis.fsync import fsync_dir, write_atomic

CHUNK = 1 << 20


class StoreError(Exception):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str  # hex
    mtime: float


class ObjectStore(Protocol):
    location: str

    def put_file(self, key: str, path: Path) -> ObjectInfo: ...
    def put_bytes(self, key: str, data: bytes) -> ObjectInfo: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def open_stream(self, key: str) -> VerifiedStream: ...
    def head(self, key: str) -> ObjectInfo | None: ...
    def list(self, prefix: str) -> list[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...
    def actual_sha256(self, key: str) -> str | None: ...


class VerifiedStream:
    """An object's bytes as a file to ``read`` from, in bounded memory, hashed as they go:
    reaching the end with a different SHA-256 (or size) raises, so a consumer that reads
    to the end never takes damaged bytes for good ones. Close it when done."""

    def __init__(self, body: Any, key: str, sha256: str, size: int) -> None:
        self.body, self.key, self.sha256, self.size = body, key, sha256, size
        self.digest = hashlib.sha256()
        self.seen = 0

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        data: bytes = self.body.read(n if n is not None and n >= 0 else CHUNK * 64)
        if data:
            self.digest.update(data)
            self.seen += len(data)
        elif self.digest.hexdigest() != self.sha256 or self.seen != self.size:
            raise StoreError(f"{self.key} is damaged in the object store (checksum mismatch)")
        return data

    def copy_to(self, path: Path) -> None:
        """The whole object into ``path``, atomically, verified."""
        tmp = path.with_name(path.name + ".part")
        try:
            with open(tmp, "wb") as out:
                while chunk := self.read(CHUNK):
                    out.write(chunk)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        self.body.close()

    def __enter__(self) -> VerifiedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StoreError(f"not a valid object key: {key!r}")
    return key


class LocalStore:
    """Objects as files under ``root/objects``; their checksums under ``root/sums``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = root.as_uri()

    def _data(self, key: str) -> Path:
        return self.root / "objects" / _check_key(key)

    def _sum(self, key: str) -> Path:
        return self.root / "sums" / (_check_key(key) + ".json")

    @contextlib.contextmanager
    def _locked(self, key: str, exclusive: bool) -> Iterator[None]:
        """An object's checksum and data change together: several storage nodes write
        the same key (``latest.json``), and without the lock one's checksum could end up
        beside another's data, which every reader would then call damaged."""
        path = self.root / "locks" / (_check_key(key) + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # and with it the lock

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        target = self._data(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            info = self._commit(key, Path(tmp), digest.hexdigest())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return info

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        target = self._data(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            return self._commit(key, Path(tmp), hashlib.sha256(data).hexdigest())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _commit(self, key: str, tmp: Path, sha: str) -> ObjectInfo:
        with self._locked(key, exclusive=True):
            # The checksum first: an object without one is never visible.
            meta = self._sum(key)
            meta.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(meta, json.dumps({"sha256": sha, "size": tmp.stat().st_size}),
                         durable=True)
            os.replace(tmp, self._data(key))
            fsync_dir(self._data(key).parent)
            if file_sha256(self._data(key)) != sha:  # verify what landed
                raise StoreError(f"upload of {key} did not verify")
            info = self._head(key)
        assert info is not None
        return info

    def get_file(self, key: str, path: Path) -> None:
        with self.open_stream(key) as stream:
            stream.copy_to(path)

    def open_stream(self, key: str) -> VerifiedStream:
        with self._locked(key, exclusive=False):  # the checksum of the file opened
            info = self._head(key)
            if info is None:
                raise StoreError(f"{key} is not in the object store {self.location}")
            body = open(self._data(key), "rb")  # noqa: SIM115 (the stream closes it)
        return VerifiedStream(body, key, info.sha256, info.size)

    def get_bytes(self, key: str) -> bytes:
        with self._locked(key, exclusive=False):
            info = self._head(key)
            if info is None:
                raise StoreError(f"{key} is not in the object store {self.location}")
            data = self._data(key).read_bytes()
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise StoreError(f"{key} is damaged in the object store (checksum mismatch)")
        return data

    def head(self, key: str) -> ObjectInfo | None:
        with self._locked(key, exclusive=False):
            return self._head(key)

    def _head(self, key: str) -> ObjectInfo | None:
        try:
            meta = json.loads(self._sum(key).read_text())
            st = self._data(key).stat()
        except (OSError, ValueError):
            return None
        return ObjectInfo(key, st.st_size, meta["sha256"], st.st_mtime)

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self.root / "sums"
        out = []
        for meta in sorted(base.rglob("*.json")) if base.exists() else []:
            key = str(meta.relative_to(base))[:-len(".json")]
            if key.startswith(prefix):
                info = self.head(key)
                if info is not None:
                    out.append(info)
                else:  # a checksum without its object: the object was lost
                    out.append(ObjectInfo(key, -1, json.loads(meta.read_text())["sha256"], 0))
        return out

    def delete(self, key: str) -> None:
        with self._locked(key, exclusive=True):
            self._data(key).unlink(missing_ok=True)
            self._sum(key).unlink(missing_ok=True)

    def actual_sha256(self, key: str) -> str | None:
        try:
            return file_sha256(self._data(key))
        except OSError:
            return None


class S3Store:
    """Objects in an S3 bucket under a prefix; the SHA-256 goes with each PUT (S3 checks
    it on arrival) and in the object's metadata (checked again on reads)."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 client: Any = None) -> None:
        import boto3
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}"
        self.s3 = client or boto3.client("s3", endpoint_url=endpoint_url)

    def _key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, key: str, path: Path) -> ObjectInfo:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        with open(path, "rb") as body:  # streamed: a base image need not fit in memory
            return self._put(key, body, digest, path.stat().st_size)

    def put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._put(key, data, hashlib.sha256(data), len(data))

    def _put(self, key: str, body: Any, digest: Any, size: int) -> ObjectInfo:
        # One PUT (atomic) with S3 checking the SHA-256 on arrival; then read back.
        self.s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=body,
                           ChecksumSHA256=base64.b64encode(digest.digest()).decode(),
                           Metadata={"sha256": digest.hexdigest()})
        info = self.head(key)
        if info is None or info.sha256 != digest.hexdigest() or info.size != size:
            raise StoreError(f"upload of {key} did not verify")
        return info

    def get_file(self, key: str, path: Path) -> None:
        with self.open_stream(key) as stream:
            stream.copy_to(path)

    def open_stream(self, key: str) -> VerifiedStream:
        from botocore.exceptions import ClientError
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            raise StoreError(f"{key}: {exc.response['Error']['Code']}") from None
        return VerifiedStream(obj["Body"], key, obj.get("Metadata", {}).get("sha256", ""),
                              int(obj["ContentLength"]))

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import ClientError
        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            raise StoreError(f"{key}: {exc.response['Error']['Code']}") from None
        data: bytes = obj["Body"].read()
        if hashlib.sha256(data).hexdigest() != obj.get("Metadata", {}).get("sha256"):
            raise StoreError(f"{key} is damaged in the object store (checksum mismatch)")
        return data

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError
        try:
            obj = self.s3.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError:
            return None
        return ObjectInfo(key, int(obj["ContentLength"]), obj.get("Metadata", {}).get(
            "sha256", ""), obj["LastModified"].timestamp())

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Keys and sizes from the listing; the checksum (``sha256`` empty here) costs a
        HEAD each, so ``head`` gives it when it is needed."""
        out = []
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                 Prefix=full)
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix) + 1:] if self.prefix else obj["Key"]
                out.append(ObjectInfo(key, int(obj["Size"]), "",
                                      obj["LastModified"].timestamp()))
        return out

    def delete(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self._key(key))

    def actual_sha256(self, key: str) -> str | None:
        from botocore.exceptions import ClientError
        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError:
            return None
        return hashlib.sha256(body).hexdigest()


def put_if_longer(store: ObjectStore, key: str, data: bytes) -> bool:
    """Write ``data`` under ``key`` unless an object at least as long is there; True when
    written. How an archived partial segment is written: it only ever grows (a shorter
    one of the same name is older, or cut by a backtrack's rewind below what the archive
    already holds of that timeline, whose commits restores to then still need)."""
    held = store.head(key)
    if held is not None and held.size >= len(data):
        return False
    store.put_bytes(key, data)
    return True


def open_store(location: str) -> ObjectStore:
    """``file:///path`` (or a plain path) or ``s3://bucket/prefix``; the S3 endpoint URL
    from ``BOREALIS_S3_ENDPOINT_URL`` (for S3-compatible servers)."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path,
                       settings.current().s3_endpoint_url or None)
    if parsed.scheme in ("", "file"):
        return LocalStore(Path(parsed.path if parsed.scheme else location))
    raise StoreError(f"unknown object store {location!r}: use file:///path or s3://bucket")


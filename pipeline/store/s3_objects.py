"""S3 requests pyarrow's filesystem does not offer: conditional writes and whole uploads.

* ``put_if_absent`` / ``put_if_match`` / ``delete_if_match``: S3's conditional requests
  (``If-None-Match: *``, ``If-Match: <ETag>``), which the OUT lease (pipeline/lock.py) is
  built on. They return None when the precondition fails, instead of raising.
* ``upload_whole``: a file-like object becomes one object that appears only complete
  (one PUT, or a multipart upload that is aborted on any error), never a partial one.
* ``get`` (one GET, no HEAD first) and ``delete_many`` (one request per 1,000 keys): how
  the store reads and deletes many small objects.

Requests go through botocore (installed with s3fs), with the same credential chain as
pyarrow's S3 filesystem (environment, profile, instance role) and short timeouts, so that
a store that stopped answering costs seconds here, not minutes.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import IO, Any

__all__ = [
    "bucket_key",
    "client",
    "delete_if_match",
    "delete_many",
    "get",
    "put_if_absent",
    "put_if_match",
    "upload_whole",
]

#: Objects up to this size are one PUT; larger ones a multipart upload of parts this size.
PART_BYTES = 64 * 1024 * 1024


def bucket_key(path: str) -> tuple[str, str]:
    """``bucket/key/of/object`` (a Location path on S3) as (bucket, key)."""
    bucket, _, key = path.partition("/")
    return bucket, key


@functools.lru_cache(maxsize=8)
def client(endpoint: str | None, *, quick: bool = False) -> Any:
    """A botocore S3 client for ``endpoint`` (None: AWS, or ``AWS_ENDPOINT_URL``).

    ``quick``: one attempt with 3 s timeouts, for requests that may be given up on.
    """
    import botocore.session
    from botocore.config import Config

    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    if endpoint and "://" not in endpoint:
        endpoint = f"http://{endpoint}"
    if quick:
        config = Config(connect_timeout=3, read_timeout=3, retries={"total_max_attempts": 1})
    else:
        config = Config(
            connect_timeout=3,
            read_timeout=10,
            retries={"total_max_attempts": 2},
            max_pool_connections=32,  # the store's read pool (store/pool.py) shares it
        )
    session = botocore.session.get_session()
    return session.create_client("s3", endpoint_url=endpoint, region_name=region, config=config)


def _precondition_failed(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    # 409 ConditionalRequestConflict: another conditional write to the key is in flight
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def _missing(exc: Exception) -> bool:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "404", "NotFound")


def put_if_absent(endpoint: str | None, path: str, body: bytes) -> str | None:
    """Create the object only if no object has that key; its ETag, or None if one had."""
    bucket, key = bucket_key(path)
    try:
        return client(endpoint).put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")[
            "ETag"
        ]
    except Exception as exc:
        if _precondition_failed(exc):
            return None
        raise


def put_if_match(endpoint: str | None, path: str, body: bytes, etag: str) -> str | None:
    """Replace the object only if its ETag is still ``etag``; the new ETag, or None."""
    bucket, key = bucket_key(path)
    try:
        return client(endpoint).put_object(Bucket=bucket, Key=key, Body=body, IfMatch=etag)["ETag"]
    except Exception as exc:
        if _precondition_failed(exc) or _missing(exc):
            return None
        raise


def delete_if_match(endpoint: str | None, path: str, etag: str, *, quick: bool = False) -> bool:
    """Delete the object only if its ETag is still ``etag``; whether it was deleted."""
    bucket, key = bucket_key(path)
    try:
        client(endpoint, quick=quick).delete_object(Bucket=bucket, Key=key, IfMatch=etag)
        return True
    except Exception as exc:
        if _precondition_failed(exc) or _missing(exc):
            return False
        raise


def get(endpoint: str | None, path: str) -> tuple[bytes, str] | None:
    """(body, ETag) of an object, or None when there is none."""
    bucket, key = bucket_key(path)
    try:
        response = client(endpoint).get_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if _missing(exc):
            return None
        raise
    return response["Body"].read(), response["ETag"]


def upload_whole(endpoint: str | None, path: str, data: IO[bytes]) -> None:
    """Upload ``data`` (read from its current position to its end) as one object.

    The object appears only once every byte is stored: a single PUT up to ``PART_BYTES``,
    else a multipart upload that is completed last and aborted if any part fails.
    """
    bucket, key = bucket_key(path)
    s3 = client(endpoint)
    first = data.read(PART_BYTES)
    rest = data.read(1)
    if not rest:
        s3.put_object(Bucket=bucket, Key=key, Body=first)
        return
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    try:
        parts, chunk, number = [], first + rest + data.read(PART_BYTES - 1), 1
        while chunk:
            etag = s3.upload_part(
                Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=chunk
            )["ETag"]
            parts.append({"PartNumber": number, "ETag": etag})
            chunk, number = data.read(PART_BYTES), number + 1
        s3.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
        )
    except BaseException:
        with contextlib.suppress(Exception):
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
        raise


def delete_many(endpoint: str | None, paths: list[str]) -> None:
    """Delete the objects ``paths`` (``bucket/key``), 1,000 per request; missing ones are
    no error. Raises ``OSError`` naming the first key S3 could not delete."""
    by_bucket: dict[str, list[str]] = {}
    for path in paths:
        bucket, key = bucket_key(path)
        by_bucket.setdefault(bucket, []).append(key)
    s3 = client(endpoint)
    for bucket, keys in by_bucket.items():
        for k in range(0, len(keys), 1000):
            objects = [{"Key": key} for key in keys[k : k + 1000]]
            response = s3.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
            errors = response.get("Errors") or []
            if errors:
                e = errors[0]
                raise OSError(
                    f"s3://{bucket}/{e.get('Key')} could not be deleted: {e.get('Message')}"
                )

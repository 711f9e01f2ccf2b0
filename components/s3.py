"""Folders to and from ``s3://bucket/prefix`` (boto3; credentials from the usual AWS_*
variables, ``endpoint_url`` for an S3-compatible server such as MinIO or moto)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from components.base import StageError


def split(uri: str) -> tuple[str, str]:
    """(bucket, prefix without slashes at its ends) of ``s3://bucket/prefix``."""
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise StageError(f"{uri!r} is not s3://bucket[/prefix]")
    bucket, _, prefix = uri[5:].partition("/")
    return bucket, prefix.strip("/")


def client(endpoint_url: str | None = None, attempts: int = 3, read_timeout_s: float = 120):
    """A boto3 S3 client with standard retries (``attempts`` in all) and bounded waits."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url or None, config=Config(
        retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=5, read_timeout=read_timeout_s))


def _fail(action: str, uri: str, exc: Exception) -> StageError:
    return StageError(f"{action} {uri}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def upload_tree(folder: Path, uri: str, endpoint_url: str | None = None) -> int:
    """Copy every file under ``folder`` to ``uri`` keeping relative paths; returns the count."""
    from boto3.exceptions import S3UploadFailedError  # what upload_file raises for a ClientError
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split(uri)
    s3, count = client(endpoint_url), 0
    try:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = "/".join(x for x in (prefix, path.relative_to(folder).as_posix()) if x)
            s3.upload_file(str(path), bucket, key)
            count += 1
    except (BotoCoreError, ClientError, S3UploadFailedError) as exc:
        raise _fail("cannot upload to", uri, exc) from None
    return count


def download_tree(uri: str, folder: Path, endpoint_url: str | None = None) -> int:
    """Replace ``folder`` with the files under ``uri`` (written beside it first, so a failed
    download leaves the old folder); returns the count. StageError when there are none."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split(uri)
    s3 = client(endpoint_url)
    partial = folder.with_name(folder.name + ".download")
    shutil.rmtree(partial, ignore_errors=True)
    count = 0
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else ""):
            for item in page.get("Contents", []):
                dest = partial / item["Key"][len(prefix) + 1 if prefix else 0:]
                dest.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, item["Key"], str(dest))
                count += 1
    except (BotoCoreError, ClientError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise _fail("cannot download", uri, exc) from None
    if not count:
        raise StageError(f"nothing under {uri}")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return count


def put_json(uri: str, value, endpoint_url: str | None = None) -> None:
    bucket, key = split(uri)
    client(endpoint_url).put_object(Bucket=bucket, Key=key, Body=json.dumps(value).encode())


def get_json(uri: str, endpoint_url: str | None = None):
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(uri)
    try:
        return json.loads(client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"].read())
    except (BotoCoreError, ClientError) as exc:
        raise _fail("cannot read", uri, exc) from None

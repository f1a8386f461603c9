"""S3 (and any S3-compatible store) as a transport: objects moved with boto3's managed transfers.

Credentials and endpoint come from boto3's standard chain: environment, shared config and profile,
web identity (IRSA, workload identity), instance metadata; ``AWS_ENDPOINT_URL_S3`` (or
``AWS_ENDPOINT_URL``) points it at MinIO, R2, SeaweedFS or a local test server. Rejected credentials
are a configuration error, found by the first request a command makes.

Transient failures (refused or dropped connections, timeouts, 5xx, throttling) are retried by
botocore, not by hand: ``standard`` mode, 10 attempts in all per request, each bounded by a 10 s
connect and a 60 s read timeout, with jittered exponential backoff between them. botocore's waits
start at 50 ms (1 s for throttling) and double up to 20 s, so a refused connection is retried for at
most 26 s (13 s on average): a store that restarts is ridden out, one that stays away fails the
request within half a minute. botocore's retry quota (a token bucket per process) caps the retries
of many requests failing at once. ``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE`` (or ``max_attempts``
and ``retry_mode`` in the AWS config file) change those bounds the standard way. Credentials from
instance metadata (a node's role) are asked for up to 5 times, 2 s each, not botocore's once for
1 s (``AWS_METADATA_SERVICE_NUM_ATTEMPTS``, ``AWS_METADATA_SERVICE_TIMEOUT`` change that).
What is left after the retries becomes a one-line error naming the URI.

This module is a plain transport: keys and files in, keys and files out. Committing a folder (files
first, the ``_COMPLETE`` manifest last) and verifying a download against it belong to ``manifest``.
Uploads carry an S3 checksum the server verifies.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kantai_batch.errors import InputDataError, JobConfigError, KantaiError, SourceUnavailableError, first_line

log = logging.getLogger(__name__)

_MAX_ATTEMPTS = 10  # in all, the first request included
_CONNECT_TIMEOUT_S = 10
_READ_TIMEOUT_S = 60
# Instance metadata lookups (AWS_METADATA_SERVICE_NUM_ATTEMPTS, AWS_METADATA_SERVICE_TIMEOUT).
_METADATA_SERVICE = {"metadata_service_num_attempts": 5, "metadata_service_timeout": 2}
_MISSING = ("NoSuchKey", "404", "NotFound")
# The keys themselves were refused, not a permission: no request with them can succeed.
_BAD_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch")
_DENIED = ("AccessDenied", "403", "AllAccessDisabled")


class KeyMissingError(SourceUnavailableError):
    """The bucket exists but the key does not (a retry may find it once a writer commits it)."""


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not uri.startswith("s3://"):
            raise JobConfigError(f"{uri} is not an s3:// URI")
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket:
            raise JobConfigError(f"{uri}: no bucket name")
        return cls(bucket, key.strip("/"))

    def child(self, name: str) -> S3Uri:
        return S3Uri(self.bucket, f"{self.key}/{name}".strip("/"))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@functools.cache
def client(within_s: float | None = None):
    """The S3 client; with ``within_s``, one whose every request gives up within about that many seconds
    (two attempts, short timeouts, whatever the environment sets): for a lease renewal, which must not
    outlast its slot."""
    import boto3
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import InvalidChecksumConfigError, InvalidConfigError, InvalidRetryConfigurationError

    try:
        # Our bounds apply only where the environment or the AWS config file sets none of its own.
        settings = botocore.session.get_session()
        retries: dict[str, Any] = {}
        timeout_s: tuple[float, float] = (_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S)
        if within_s is not None:
            retries = {"total_max_attempts": 2, "mode": "standard"}
            timeout_s = (within_s / 4, within_s / 4)
        if settings.get_config_variable("max_attempts") is None:
            retries.setdefault("total_max_attempts", _MAX_ATTEMPTS)
        if settings.get_config_variable("retry_mode") is None:
            retries.setdefault("mode", "standard")
        for name, value in _METADATA_SERVICE.items():
            # botocore asks instance metadata (a node's role) once, for 1 s: a node under load misses that
            # now and then, and "no credentials" fails the Job for good where a retry would have found them.
            if _unset(settings, name):
                settings.set_config_variable(name, value)
        config = Config(retries=retries, connect_timeout=timeout_s[0], read_timeout=timeout_s[1])
        # A session of its own: boto3's default one keeps the credentials it first found.
        made = boto3.session.Session(botocore_session=settings).client("s3", config=config)
        if within_s is not None:
            # botocore sends a write's body only after the store's "100 Continue", or after waiting 1 s
            # for it: a store that stops answering cost each attempt that second on top of its timeout
            # (a 1 s bound took 2.5 s). The bounded requests write a few bytes: nothing to hold back.
            made.meta.events.register_last("before-call.s3", _no_expect_continue)
        return made
    except ValueError as exc:
        # urllib's answer to an endpoint with an unclosed IPv6 bracket names neither the endpoint nor the setting.
        if any(word in str(exc).lower() for word in ("endpoint", "url")):
            raise JobConfigError(
                f"the S3 endpoint (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or the AWS config file) must be a URL "
                f"such as http://host:9000: {first_line(exc)}"
            ) from None
        if "region" in str(exc).lower():
            raise JobConfigError(
                f"the S3 region (AWS_REGION, AWS_DEFAULT_REGION or the AWS config file) is invalid: {first_line(exc)}"
            ) from None
        raise JobConfigError(
            f"S3 client settings (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE or the AWS config file) are invalid: "
            f"{first_line(exc)}"
        ) from None
    except InvalidChecksumConfigError as exc:  # not an InvalidConfigError: it read as the store unreachable (exit 4)
        raise JobConfigError(
            "S3 checksum settings (AWS_REQUEST_CHECKSUM_CALCULATION, AWS_RESPONSE_CHECKSUM_VALIDATION or the AWS "
            f"config file) are invalid: {first_line(exc)}"
        ) from None
    except (InvalidConfigError, InvalidRetryConfigurationError) as exc:
        raise JobConfigError(
            f"S3 client settings (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE or the AWS config file) are invalid: "
            f"{first_line(exc)}"
        ) from None


def _no_expect_continue(params: dict[str, Any], **_: Any) -> None:
    params["headers"].pop("Expect", None)


def _unset(settings, name: str) -> bool:
    """Whether neither the environment (``AWS_<NAME>``) nor the AWS config file's profile sets ``name``
    (botocore's own lookup answers its default for both)."""
    from botocore.exceptions import ProfileNotFound

    if f"AWS_{name.upper()}" in os.environ:
        return False
    try:
        return name not in settings.get_scoped_config()
    except ProfileNotFound:
        return False  # the first request names the missing profile


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    # Multipart above 64 MiB with parallel parts: model weights and optimizer states are large.
    return TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=8)


@contextlib.contextmanager
def translated(uri: S3Uri | str, action: str) -> Iterator[None]:
    """Turn boto errors into one-line errors that name the URI."""
    from boto3.exceptions import Boto3Error, S3UploadFailedError
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConfigNotFound,
        ConfigParseError,
        NoCredentialsError,
        ParamValidationError,
        PartialCredentialsError,
        ProfileNotFound,
    )

    uri = str(uri)
    try:
        yield
    except S3UploadFailedError as exc:
        # boto3's transfers wrap what the store answered: that answer is the error.
        cause = exc.__context__
        if isinstance(cause, ClientError):
            raise _client_error(cause, uri, action) from None
        raise SourceUnavailableError(f"{uri}: cannot {action}: {first_line(exc)}") from None
    except ClientError as exc:
        raise _client_error(exc, uri, action) from None
    except NoCredentialsError:
        raise JobConfigError(f"{uri}: no AWS credentials (environment, profile or web identity)") from None
    except ParamValidationError as exc:
        # A bucket name S3 cannot have: no retry helps, and the reason is below botocore's header line.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise JobConfigError(f"{uri}: {lines[-1] if lines else type(exc).__name__}") from None
    except (PartialCredentialsError, ProfileNotFound, ConfigNotFound, ConfigParseError) as exc:
        # The job's settings, not the store: a retry cannot help.
        raise JobConfigError(f"{uri}: the AWS credentials or profile are incomplete: {first_line(exc)}") from None
    except (BotoCoreError, Boto3Error) as exc:
        # Boto3Error: e.g. a download whose stream kept breaking past boto3's own retries.
        raise SourceUnavailableError(f"{uri}: cannot {action}: {first_line(exc)}") from None


def _client_error(exc, uri: str, action: str) -> KantaiError:
    """The one-line error for what the store answered (after botocore's retries)."""
    code = _code(exc)
    message = exc.response.get("Error", {}).get("Message") or code
    if code == "403":
        # A HEAD's answer has no body, so no reason: ask the bucket with a request that has one.
        code = _denial_code(S3Uri.parse(uri).bucket) or code
    if code == "NoSuchBucket":
        return InputDataError(f"{uri}: bucket does not exist")
    if code in _BAD_CREDENTIALS:
        return JobConfigError(
            f"{uri}: the S3 credentials were rejected ({code}): check AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or the profile)"
        )
    if code in _DENIED:
        return InputDataError(f"{uri}: access denied ({code}) while trying to {action}")
    if code in _MISSING:
        # A HEAD answers a bare 404 for a missing bucket too: ask about the bucket itself.
        if not _bucket_exists(S3Uri.parse(uri).bucket):
            return InputDataError(f"{uri}: bucket does not exist")
        return KeyMissingError(f"{uri} does not exist")
    return SourceUnavailableError(f"{uri}: cannot {action}: {code} {message}".strip())


def check_access(prefix: S3Uri) -> None:
    """One listing below ``prefix``: rejected keys, a missing bucket or an unreachable store fail here,
    before a command does any work."""
    with translated(prefix, "list"):
        client().list_objects_v2(Bucket=prefix.bucket, Prefix=prefix.key, MaxKeys=1)


def exists(uri: S3Uri) -> bool:
    """Whether the key exists; a missing bucket, denied access or an unreachable store is an error."""
    try:
        with translated(uri, "read"):
            client().head_object(Bucket=uri.bucket, Key=uri.key)
    except KeyMissingError:
        return False
    return True


def read_json_if_exists(uri: S3Uri) -> dict[str, Any] | None:
    """The JSON object at ``uri``, or None when there is no such key (one request, not two)."""
    try:
        with translated(uri, "read"):
            body = client().get_object(Bucket=uri.bucket, Key=uri.key)["Body"].read()
    except KeyMissingError:
        return None
    return json.loads(body)


def _code(exc) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _denial_code(bucket: str) -> str | None:
    """Why the store refuses this bucket, as a listing's error code says; None when it does not refuse."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client().list_objects_v2(Bucket=bucket, MaxKeys=1)
    except ClientError as exc:
        return _code(exc)
    except BotoCoreError:
        return None
    return None


def _bucket_exists(bucket: str) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client().head_bucket(Bucket=bucket)
        return True
    except ClientError as exc:
        return _code(exc) not in ("404", "NoSuchBucket", "NotFound")
    except BotoCoreError:
        return True  # unreachable: the original error says so


def download_file(uri: S3Uri, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with translated(uri, "download"):
        client().download_file(uri.bucket, uri.key, str(dest), Config=_transfer_config())
    return dest


def upload_file(path: Path, uri: S3Uri) -> None:
    with translated(uri, "upload"):
        client().upload_file(
            str(path), uri.bucket, uri.key, ExtraArgs={"ChecksumAlgorithm": "SHA256"}, Config=_transfer_config()
        )


def put_json(uri: S3Uri, data: Any) -> None:
    """Write ``data`` as the JSON object at ``uri`` in one request: readers see the old object or this one."""
    body = (json.dumps(data, indent=2) + "\n").encode("utf-8")
    with translated(uri, "upload"):
        client().put_object(Bucket=uri.bucket, Key=uri.key, Body=body, ChecksumAlgorithm="SHA256")


def copy(source: S3Uri, dest: S3Uri) -> None:
    """Copy an object within the store (server-side: no bytes pass through this process)."""
    with translated(source, f"copy to {dest}"):
        client().copy(
            {"Bucket": source.bucket, "Key": source.key},
            dest.bucket,
            dest.key,
            ExtraArgs={"ChecksumAlgorithm": "SHA256"},
            Config=_transfer_config(),
        )


def put_if(uri: S3Uri, body: bytes, *, match: str | None = None, within_s: float | None = None) -> str | None:
    """Write ``body`` to ``uri`` only if the object there still has ETag ``match`` (or, without ``match``,
    only if there is none); its new ETag, or None where the condition failed. Of writers racing from one
    state, exactly one wins. ``within_s`` bounds the time it may take (see ``client``)."""
    from botocore.exceptions import ClientError

    condition = {"IfMatch": match} if match else {"IfNoneMatch": "*"}
    with translated(uri, "write"):
        try:
            bounded = client() if within_s is None else client(within_s)  # one cached default client
            return bounded.put_object(Bucket=uri.bucket, Key=uri.key, Body=body, **condition)["ETag"]
        except ClientError as exc:
            # 412: another object is there (or one is, for IfNoneMatch); 409: a conditional write in flight;
            # 404: IfMatch on a key that is gone.
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"):
                return None
            raise


def read_with_etag(uri: S3Uri, *, within_s: float | None = None) -> tuple[bytes, str] | None:
    """The object at ``uri`` and its ETag, or None when there is no such key. ``within_s`` bounds the
    time it may take (see ``client``)."""
    try:
        with translated(uri, "read"):
            answer = (client() if within_s is None else client(within_s)).get_object(Bucket=uri.bucket, Key=uri.key)
            return answer["Body"].read(), answer["ETag"]
    except KeyMissingError:
        return None


def list_keys(prefix: S3Uri) -> list[str]:
    """Every key below ``prefix`` (as a folder), relative to it."""
    keys = []
    base = f"{prefix.key}/" if prefix.key else ""
    with translated(prefix, "list"):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=prefix.bucket, Prefix=base):
            keys += [item["Key"][len(base) :] for item in page.get("Contents", [])]
    return keys


def list_folders(prefix: S3Uri) -> list[str]:
    """The immediate sub-folder names below ``prefix``."""
    base = f"{prefix.key}/" if prefix.key else ""
    names = []
    with translated(prefix, "list"):
        pages = client().get_paginator("list_objects_v2").paginate(Bucket=prefix.bucket, Prefix=base, Delimiter="/")
        for page in pages:
            names += [item["Prefix"][len(base) :].rstrip("/") for item in page.get("CommonPrefixes", [])]
    return names


def delete_keys(prefix: S3Uri, names: list[str], *, within_s: float | None = None) -> None:
    """Delete ``names`` below ``prefix``; ``within_s`` bounds each request's time (see ``client``)."""
    for start in range(0, len(names), 1000):
        batch = [{"Key": prefix.child(name).key} for name in names[start : start + 1000]]
        if batch:
            with translated(prefix, "delete"):
                answer = (client() if within_s is None else client(within_s)).delete_objects(
                    Bucket=prefix.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            # A multi-delete answers 200 and lists the keys it refused: a marker that stays would
            # vouch for files about to change.
            for refused in answer.get("Errors", []):
                code = refused.get("Code", "")
                uri = f"s3://{prefix.bucket}/{refused.get('Key', '')}"
                if code in _DENIED or code in _BAD_CREDENTIALS:
                    raise InputDataError(f"{uri}: access denied ({code}) while trying to delete")
                raise SourceUnavailableError(f"{uri}: cannot delete: {code} {refused.get('Message', '')}".strip())

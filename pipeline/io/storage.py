"""Object storage through fsspec (local paths, s3://, any fsspec URL): opening and joining URLs,
the retry-with-backoff rule for transient errors, how storage failures are named, and input
fingerprints (size and ETag / mtime) that tell a changed input.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

logger = logging.getLogger(__name__)


# Shard-level error kinds (the text before the first ':' of a shard error message).
SHARD_NOT_FOUND = "shard not found"  # permanent: the shard completes with one error row
UNREADABLE_TAR = "unreadable tar"  # permanent: truncated/corrupt tar; keys read before the damage kept
STORAGE_UNAVAILABLE = "storage unavailable"  # transient errors outlasted the retries: shard not committed
ACCESS_DENIED = "access denied"  # credentials/permissions: shard not committed
STORAGE_ERROR = "storage error"  # any other storage failure: shard not committed

# Kinds that fail the shard without a marker, so that the next run tries it again.
UNCOMMITTED_SHARD_ERRORS = (STORAGE_UNAVAILABLE, ACCESS_DENIED, STORAGE_ERROR)
CREDENTIALS_HINT = (
    "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the instance role), io.storage.endpoint_url "
    "and the bucket policy"
)


T = TypeVar("T")


class ShardError(RuntimeError):
    """A whole shard (or the output prefix) cannot be listed, read or written."""


# Exception class names (anywhere in the cause chain) that mean "try again": connection refused or
# reset, timeouts, a server that went away mid-response. Matched by name so that botocore/aiohttp
# stay optional imports.
_TRANSIENT_S3_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "503",
        "500",
        "502",
        "504",
    }
)


_TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectorError",
        "ClientConnectionError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ClientPayloadError",
        "IncompleteRead",
        "IncompleteReadError",
        "ResponseStreamingError",
        "FSTimeoutError",
        "HTTPClientError",
        "ProtocolError",
    }
)


_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EBUSY,
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        getattr(errno, "EREMOTEIO", 121),
    }
)


def exception_chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 20:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying: connection errors, timeouts and HTTP 5xx /
    throttling are; 4xx (not found, access denied, bad request) and data errors are not."""
    chain = exception_chain(exc)
    for link in chain:  # an HTTP answer decides, whatever wraps it
        response = getattr(link, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = str(response["Error"].get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return code in _TRANSIENT_S3_CODES or int(status) >= 500 or int(status) == 429
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    for link in chain:
        if isinstance(link, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(link).__mro__):
            return True
        if isinstance(link, OSError) and link.errno in _TRANSIENT_ERRNOS:
            return True
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: delay_i = min(max_delay, base_delay · 2^i) · U(0.5, 1).

    The defaults wait about 35 s in all over 8 attempts, and each attempt of s3fs has its own
    few seconds of retries: a storage outage of up to about a minute is ridden out."""

    attempts: int = 8
    base_delay: float = 0.5  # seconds
    max_delay: float = 15.0  # seconds

    def delay(self, attempt: int) -> float:
        return min(self.max_delay, self.base_delay * 2**attempt) * random.uniform(0.5, 1.0)


DEFAULT_RETRY = RetryPolicy()


def with_retries(
    fn: Callable[[], T],
    what: str,
    policy: RetryPolicy = DEFAULT_RETRY,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call `fn()`; on a transient storage error (see `is_transient`) wait and call it again.

    Raises:
        Exception: the last error when it is not transient or the attempts are used up.
    """
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt == policy.attempts - 1:
                raise
            delay = policy.delay(attempt)
            logger.warning(
                "%s: transient storage error (%s: %s); retry %d/%d in %.1f s",
                what,
                type(exc).__name__,
                exc,
                attempt + 1,
                policy.attempts - 1,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def describe_storage_error(exc: BaseException, what: str) -> str:
    """A one-line '<kind>: <what>: <reason>' for a storage failure (never credentials: error
    messages of S3 servers do not echo secrets, and nothing here adds them)."""
    reason = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, FileNotFoundError):
        return f"{SHARD_NOT_FOUND}: {what}: {reason}"
    if isinstance(exc, PermissionError):
        return f"{ACCESS_DENIED}: {what}: {reason} ({CREDENTIALS_HINT})"
    if is_transient(exc):
        return f"{STORAGE_UNAVAILABLE}: {what}: {reason} (gave up after {DEFAULT_RETRY.attempts} attempts)"
    return f"{STORAGE_ERROR}: {what}: {reason}"


def listing(fn: Callable[[], T], url: str) -> T:
    """Run a listing of `url` with retries; FileNotFoundError passes through, every other storage
    failure becomes a ShardError naming the URL (access denied with the credentials hint).

    Raises:
        FileNotFoundError: nothing at `url`.
        ShardError: access denied, storage unavailable after the retries, other storage errors.
    """
    try:
        return with_retries(fn, f"list {url}")
    except FileNotFoundError:
        raise
    except PermissionError as exc:
        raise ShardError(f"{ACCESS_DENIED}: cannot list {url}: {exc} ({CREDENTIALS_HINT})") from exc
    except Exception as exc:
        if not (isinstance(exc, OSError) or is_transient(exc)):
            raise
        raise ShardError(describe_storage_error(exc, f"cannot list {url}")) from exc


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path) for a URL; storage options apply to s3:// only."""
    options = dict(storage_options or {}) if url.startswith(("s3://", "s3a://")) else {}
    return url_to_fs(url, **options)


def is_local(fs: Any) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def open_url(url: str, mode: str = "rb", storage_options: Mapping[str, Any] | None = None) -> Any:
    options = dict(storage_options or {}) if url.startswith("s3://") else {}
    return fsspec.open(url, mode, **options)


def input_fingerprint(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What identifies an input shard's bytes without reading them: {"url", "size" (bytes), and
    "etag" on S3 or "mtime" (s, float) elsewhere}; {"url"} alone when the shard cannot be looked at."""
    fs, path = filesystem(url, storage_options)
    try:
        info = with_retries(lambda: fs.info(path), f"info {url}")
    except Exception as exc:  # a missing shard completes with an error row; it has no fingerprint
        logger.debug("no fingerprint for %s: %s", url, exc)
        return {"url": url}
    return {"url": url, **fingerprint_of(info)}


def fingerprint_of(info: Mapping[str, Any]) -> dict[str, Any]:
    """{"size" (bytes), and "etag" on S3 or "mtime" elsewhere} from an fsspec info/listing entry."""
    found: dict[str, Any] = {"size": int(info.get("size") or 0)}
    etag = info.get("ETag") or info.get("etag")
    if etag:
        found["etag"] = str(etag).strip('"')
    elif info.get("mtime") is not None:
        found["mtime"] = float(info["mtime"])
    elif info.get("LastModified") is not None:
        found["mtime"] = str(info["LastModified"])
    return found


def fingerprint_changed(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """Why a shard's input differs from the one it was protected from ('' when it does not, or
    when the marker recorded nothing to compare: markers written before fingerprints)."""
    for field_name in ("size", "etag", "mtime"):
        if field_name in recorded and recorded[field_name] != current.get(field_name):
            return f"{field_name} {recorded[field_name]} -> {current.get(field_name)}"
    return ""

"""What the ingest service refuses, and how: the bearer token, the bind rule, upload limits and
the one JSON error shape `{"error": kind, "detail": ...}`. No Ray, no torch: tested in-process.

The token comes from the environment (`UNLEARNABLE_API_TOKEN`) and lives only in `BearerToken`,
whose repr, str and pickle never show it; it is compared with hmac.compare_digest."""

from __future__ import annotations

import asyncio
import hmac
import io
import ipaddress
import math
import os
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import soundfile as sf

from pipeline.config import ServiceConfig
from pipeline.io.audio import AudioDecodeError, DecodedAudio, decode

TOKEN_ENV = "UNLEARNABLE_API_TOKEN"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class BindRefused(RuntimeError):
    """The service may not listen on this host (no token configured and the host is not loopback)."""


@dataclass
class UploadRejected(Exception):
    """A request the service answers with a 4xx/5xx JSON error instead of protecting it."""

    status: int  # HTTP status
    kind: str  # short machine-readable name: empty, too_large, undecodable, non_finite, ...
    detail: str  # one human sentence (never contains the token or a path on the server)
    retry_after_s: int | None = None  # set for 429/503

    def __str__(self) -> str:
        return f"{self.status} {self.kind}: {self.detail}"

    def body(self) -> dict[str, str]:
        """The JSON body: {"error": kind, "detail": detail}."""
        return {"error": self.kind, "detail": self.detail}


class BearerToken:
    """The API token, or none. `check(authorization_header)` in constant time; never printed.

    Example::

        token = BearerToken.from_env()        # UNLEARNABLE_API_TOKEN, or None when unset/empty
        token.check("Bearer s3cr3t")          # True / False
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: str | None):
        self._secret = (secret or "").strip().encode() or None

    @classmethod
    def from_env(cls, name: str = TOKEN_ENV) -> BearerToken:
        return cls(os.environ.get(name, "").strip() or None)

    @property
    def configured(self) -> bool:
        return self._secret is not None

    def check(self, authorization: str | None) -> bool:
        """True when no token is configured, or `authorization` is `Bearer <the token>`."""
        if self._secret is None:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self._secret)

    def __repr__(self) -> str:
        return f"BearerToken(configured={self.configured})"

    __str__ = __repr__

    def __reduce__(self):  # pickling (Ray) never carries the secret: replicas read their own env
        return (BearerToken.from_env, ())


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and the usual localhost names."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: BearerToken) -> None:
    """Raise BindRefused unless a token is configured or `host` is loopback."""
    if not token.configured and not is_loopback(host):
        raise BindRefused(
            f"refusing to listen on {host!r} without a token: set {TOKEN_ENV} in the environment, "
            "or bind to 127.0.0.1 / ::1 / localhost"
        )


def check_declared_length(content_length: str | None, cfg: ServiceConfig) -> None:
    """413 before reading when the Content-Length header already exceeds the limit."""
    if content_length is None:
        return
    try:
        declared = int(content_length)
    except ValueError as exc:
        raise UploadRejected(400, "bad_request", "Content-Length is not an integer") from exc
    if declared > max_upload_bytes(cfg):
        raise too_large(declared, cfg)


def max_upload_bytes(cfg: ServiceConfig) -> int:
    return int(cfg.max_upload_mb * 1024 * 1024)


def too_large(size: int, cfg: ServiceConfig) -> UploadRejected:
    return UploadRejected(413, "too_large", f"upload of {size} bytes exceeds {cfg.max_upload_mb:g} MB")


def decode_upload(data: bytes, cfg: ServiceConfig) -> DecodedAudio:
    """Decode an upload or raise UploadRejected: 400 empty, 413 too large / too long, 415
    undecodable, 422 non-finite (NaN/Inf) or too short. The duration is checked from the header
    before the samples are read when libsndfile can read it (a tiny file never expands to hours)."""
    if not data:
        raise UploadRejected(400, "empty", "the request body is empty: send the audio file as the body")
    if len(data) > max_upload_bytes(cfg):
        raise too_large(len(data), cfg)
    try:
        info = sf.info(io.BytesIO(data))
        declared = info.frames / info.samplerate if info.samplerate > 0 else 0.0
    except Exception:  # not readable by libsndfile: decode() tries ffmpeg (AAC) and names the reason
        declared = 0.0
    if math.isfinite(declared) and declared > cfg.max_duration_s:
        raise too_long(declared, cfg)
    try:
        decoded = decode(data)
    except AudioDecodeError as exc:
        message = str(exc)
        if "non-finite" in message:
            raise UploadRejected(422, "non_finite", "the audio holds NaN or Inf samples") from exc
        if message.startswith("too short"):
            raise UploadRejected(422, "too_short", message) from exc
        if message.startswith("empty"):
            raise UploadRejected(400, "empty", "the request body is empty") from exc
        raise UploadRejected(415, "undecodable", message) from exc
    if decoded.duration_s > cfg.max_duration_s:
        raise too_long(decoded.duration_s, cfg)
    return decoded


def too_long(seconds: float, cfg: ServiceConfig) -> UploadRejected:
    return UploadRejected(413, "too_long", f"{seconds:.1f} s of audio exceeds {cfg.max_duration_s:g} s")


def busy(pending: int, cfg: ServiceConfig) -> UploadRejected:
    """429 for a replica that already holds `cfg.max_pending_uploads` uploads."""
    return UploadRejected(
        429, "busy", f"{pending} uploads already pending on this replica; retry later", cfg.retry_after_s
    )


T = TypeVar("T")


async def within_deadline(work: Awaitable[T], timeout_s: float) -> T:
    """`await work`, or a 504 UploadRejected after `timeout_s` seconds (the work is cancelled; a
    PGD call already running in the replica's thread finishes there and its result is dropped)."""
    try:
        return await asyncio.wait_for(work, timeout_s)
    except asyncio.TimeoutError:
        raise UploadRejected(504, "timeout", f"not done within {timeout_s:g} s") from None

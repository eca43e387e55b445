"""`unlearnable serve`: the ingest service as a Ray Serve application (docs/service.md).

One deployment, `ProtectService`, with a FastAPI ingress. Each replica loads the encoder once
(`UploadProtector`, built by pipeline.api.build_protector) and protects the uploads that arrive
within `service.batch_wait_s` of each other (up to `service.max_batch_uploads`) in ONE PGD call
through `@serve.batch`. Routes: POST /protect, GET /healthz, /readyz, /metrics.

Refusals are JSON `{"error": kind, "detail": ...}`: 401 (token), 413/415/422/400 (the upload),
429 + Retry-After (this replica holds `service.max_pending_uploads`), 503 + Retry-After (Serve's
own queue `service.max_queued_requests` is full), 504 (`service.request_timeout_s`). An exception
in one request is answered as a 500 and never reaches the replica: it keeps serving.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures (Request) at
# runtime through Serve's ingress wrapper, where string annotations are not resolved.
import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.config import BackpressureConfig

from pipeline.config import PipelineConfig, config_from_dict, load_config
from pipeline.service.limits import (
    BearerToken,
    UploadRejected,
    busy,
    check_bind,
    check_declared_length,
    decode_upload,
    max_upload_bytes,
    too_large,
    within_deadline,
)
from pipeline.service.metrics import CONTENT_TYPE, ServiceMetrics
from pipeline.service.uploads import Delivered, Upload, UploadProtector, figure_headers, json_figures, prepare_upload

logger = logging.getLogger(__name__)

APP_NAME = "unlearnable"
api = FastAPI(title="music-unlearnable ingest", docs_url=None, redoc_url=None, openapi_url=None)


def error_response(rejected: UploadRejected) -> JSONResponse:
    """The JSON error of a refusal, with Retry-After for 429/503 and WWW-Authenticate for 401."""
    headers = {}
    if rejected.retry_after_s is not None:
        headers["Retry-After"] = str(int(rejected.retry_after_s))
    if rejected.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="unlearnable"'
    return JSONResponse(rejected.body(), status_code=rejected.status, headers=headers)


async def read_body(request: Request, limit: int, cfg_service) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (never read whole)."""
    check_declared_length(request.headers.get("content-length"), cfg_service)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, cfg_service)
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name="ProtectService")
@serve.ingress(api)
class ProtectService:
    """One replica: the encoder, the batcher, the admission count and the metrics."""

    def __init__(self, config: dict[str, Any]):
        cfg = config_from_dict(config)
        self.cfg = cfg
        self.token = BearerToken.from_env()  # read in the replica's own environment, never passed
        torch.set_num_threads(max(1, int(cfg.service.num_cpus_per_replica)))
        self.protector = UploadProtector(cfg)
        self.metrics = ServiceMetrics(
            self.protector.encoder_id,
            self.protector.config_hash,
            self.protector.random_encoder,
            cfg.attack.target_delta_e,
        )
        self.pending = 0
        # one thread runs every PGD call: batches never overlap, and their tensors come from one
        # malloc arena (threads of the default pool would each grow their own)
        self.pgd_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgd")
        self.batch_protect.set_max_batch_size(cfg.service.max_batch_uploads)
        self.batch_protect.set_batch_wait_timeout_s(cfg.service.batch_wait_s)
        self.ready = True
        logger.info(
            "replica ready: encoder %s, config %s, token %s",
            self.protector.encoder_id,
            self.protector.config_hash,
            "configured" if self.token.configured else "NOT configured (loopback only)",
        )

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def batch_protect(self, uploads: list[Upload]) -> list[Delivered | UploadRejected]:
        """Uploads gathered by Serve's batcher -> one UploadProtector call in a worker thread (the
        event loop keeps answering /healthz and refusals meanwhile)."""
        self.metrics.batch.observe(len(uploads))
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pgd_thread, self.protector.protect, uploads)
        except Exception:  # a whole batch failed: every upload in it gets a 500, the replica lives
            logger.exception("a batch of %d upload(s) failed", len(uploads))
            return [UploadRejected(500, "internal", "protection failed on this batch") for _ in uploads]

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        self.metrics.request("/healthz", 200)
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        ready = bool(getattr(self, "ready", False))
        code = 200 if ready else 503
        self.metrics.request("/readyz", code)
        body = {
            "ready": ready,
            "encoder_id": self.protector.encoder_id,
            "random_encoder": self.protector.random_encoder,
        }
        return JSONResponse(body, status_code=code)

    @api.get("/metrics")
    async def metrics_route(self) -> Response:
        self.metrics.request("/metrics", 200)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    @api.post("/protect")
    async def protect(self, request: Request, format: str = "audio") -> Response:
        """The protected file (figures in X-* headers), or `?format=json` for figures + base64 audio."""
        started = time.perf_counter()
        try:
            response = await within_deadline(self._protect(request, format), self.cfg.service.request_timeout_s)
        except UploadRejected as rejected:  # a 4xx, 429 or the 504 of the deadline
            response = self._refuse(rejected)
        except Exception:  # never let one request take the replica down
            logger.exception("unexpected error on /protect")
            response = self._refuse(UploadRejected(500, "internal", "unexpected error; see the service log"))
        self.metrics.request("/protect", response.status_code, time.perf_counter() - started)
        return response

    def _refuse(self, rejected: UploadRejected) -> JSONResponse:
        self.metrics.refused(rejected.kind)
        return error_response(rejected)

    async def _protect(self, request: Request, fmt: str) -> Response:
        if fmt not in ("audio", "json"):
            raise UploadRejected(400, "bad_request", "format must be audio or json")
        if not self.token.check(request.headers.get("authorization")):
            raise UploadRejected(401, "unauthorized", "missing or wrong bearer token")
        if request.headers.get("content-type", "").startswith("multipart/"):
            raise UploadRejected(415, "multipart", "send the audio file as the raw body (curl --data-binary @file)")
        if self.pending >= self.cfg.service.max_pending_uploads:
            raise busy(self.pending, self.cfg.service)
        self.pending += 1
        self.metrics.pending.set(self.pending)
        try:
            return await self._admitted(request, fmt)
        finally:
            self.pending -= 1
            self.metrics.pending.set(self.pending)

    async def _admitted(self, request: Request, fmt: str) -> Response:
        cfg = self.cfg
        data = await read_body(request, max_upload_bytes(cfg.service), cfg.service)
        key = uuid.uuid4().hex[:16]
        decoded = await asyncio.to_thread(decode_upload, data, cfg.service)
        upload = await asyncio.to_thread(prepare_upload, key, data, decoded, cfg)
        del data
        result = await self.batch_protect(upload)
        if isinstance(result, UploadRejected):
            raise result
        self.metrics.delivered(result.figures)
        headers = figure_headers(result.figures)
        headers["X-Upload-Id"] = key  # Serve sets its own x-request-id
        if fmt == "json":
            import base64

            body = {
                "figures": json_figures(result.figures),
                "media_type": result.media_type,
                "extension": result.extension,
                "audio_base64": base64.b64encode(result.payload).decode(),
            }
            return JSONResponse(body, headers=headers)
        headers["Content-Disposition"] = f'attachment; filename="protected.{result.extension}"'
        return Response(result.payload, media_type=result.media_type, headers=headers)


def build_app(cfg: PipelineConfig):
    """The Serve application of `cfg` (replicas, resources, back-pressure from cfg.service)."""
    sv = cfg.service
    return ProtectService.options(
        num_replicas=sv.num_replicas,
        # room above the admission limit so /healthz, /readyz, /metrics and 429s still get in
        max_ongoing_requests=sv.max_pending_uploads + 8,
        max_queued_requests=sv.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=sv.retry_after_s),
        ray_actor_options={"num_cpus": sv.num_cpus_per_replica, "num_gpus": sv.num_gpus_per_replica},
    ).bind(cfg.to_dict())


def app_builder(args: dict[str, Any]):
    """Serve application builder for serveConfigV2 / `serve run` (KubeRay RayService):
    `import_path: pipeline.service.app:app_builder`, `args: {config: /etc/unlearnable/config.yaml,
    host: 0.0.0.0}`. Refuses a non-loopback host without UNLEARNABLE_API_TOKEN in the environment."""
    check_bind(str(args.get("host", "0.0.0.0")), BearerToken.from_env())
    return build_app(load_config(args.get("config")))


def start(cfg: PipelineConfig, host: str, port: int) -> str:
    """Start Ray (cfg.runtime.ray_address or a local one), Serve's HTTP proxy on host:port and the
    application; returns the base URL. Raises BindRefused before starting anything when no token
    is configured and `host` is not loopback. Stop with `stop()`."""
    import ray

    check_bind(host, BearerToken.from_env())
    if not ray.is_initialized():
        ray.init(address=cfg.runtime.ray_address, include_dashboard=False, log_to_driver=True)
    serve.start(
        http_options={"host": host, "port": port, "request_timeout_s": cfg.service.request_timeout_s + 30},
    )
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def stop() -> None:
    """Shut Serve and this process's Ray down (nothing left running)."""
    import ray

    serve.shutdown()
    if ray.is_initialized():
        ray.shutdown()

"""Prometheus metrics of one service replica (`GET /metrics`), from a private registry.

Where a figure means what it means in the batch job, the name is the batch job's
(pipeline/stages/metrics.py: unlearnable_items_total{status}, unlearnable_windows_total,
unlearnable_accelerator_seconds_total, unlearnable_audio_seconds_total, unlearnable_errors_total{kind},
unlearnable_delta_e histogram, unlearnable_delta_e_below_target_total, unlearnable_pgd_steps_total,
unlearnable_run_info). The service adds unlearnable_service_* for requests, latency, batch sizes
and pending uploads. Each replica counts its own requests: scrape every replica (docs/service.md)."""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pipeline.stages import metrics as job

SERVICE = job.PREFIX + "service_"
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServiceMetrics:
    """The replica's counters; `render()` is the /metrics body."""

    def __init__(self, encoder_id: str, config_hash: str, random_encoder: bool, target_delta_e: float):
        r = self.registry = CollectorRegistry()
        self.target = target_delta_e
        self.items = Counter(job.ITEMS, "Uploads processed, by outcome.", ["status"], registry=r)
        self.windows = Counter(job.WINDOWS, "Audio windows protected.", registry=r)
        self.pgd_steps = Counter(job.PGD_STEPS, "PGD steps run (sum over windows).", registry=r)
        self.accelerator_seconds = Counter(job.ACCELERATOR_SECONDS, "Accelerator seconds spent in PGD.", registry=r)
        self.audio_seconds = Counter(job.AUDIO_SECONDS, "Seconds of audio protected.", registry=r)
        self.errors = Counter(job.ERRORS, "Failed or refused uploads by error kind.", ["kind"], registry=r)
        self.below_target = Counter(
            job.DELTA_E_BELOW_TARGET, "Ok uploads whose Δe min is under the target.", registry=r
        )
        self.delta_e = Histogram(
            job.DELTA_E, "Per-upload Δe (mean over windows).", buckets=job.DELTA_E_BUCKETS, registry=r
        )
        info = Gauge(
            job.RUN_INFO, "Encoder and config of this replica.", ["encoder_id", "config_hash", "random"], registry=r
        )
        info.labels(encoder_id, config_hash, str(random_encoder).lower()).set(1)
        self.requests = Counter(
            SERVICE + "requests", "HTTP requests by route and status code.", ["route", "code"], registry=r
        )
        self.latency = Histogram(
            SERVICE + "request_seconds",
            "Seconds from request to response (/protect).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch = Histogram(SERVICE + "batch_uploads", "Uploads per PGD call.", buckets=BATCH_BUCKETS, registry=r)
        self.pending = Gauge(SERVICE + "pending_uploads", "Uploads admitted and not yet answered.", registry=r)

    def request(self, route: str, code: int, seconds: float | None = None) -> None:
        self.requests.labels(route, str(code)).inc()
        if seconds is not None:
            self.latency.observe(seconds)

    def refused(self, kind: str) -> None:
        self.errors.labels(kind).inc()
        self.items.labels("error").inc()

    def delivered(self, figures: dict[str, Any]) -> None:
        """Count one protected upload from its figures (protect_array's names)."""
        self.items.labels("ok").inc()
        windows = int(figures.get("n_windows") or 0)
        self.windows.inc(windows)
        steps = figures.get("steps_mean")
        if isinstance(steps, float) and math.isfinite(steps):
            self.pgd_steps.inc(steps * windows)
        self.accelerator_seconds.inc(max(0.0, float(figures.get("seconds") or 0.0)))
        self.audio_seconds.inc(max(0.0, float(figures.get("duration_s") or 0.0)))
        delta_e = figures.get("delta_e_mean")
        if isinstance(delta_e, float) and math.isfinite(delta_e):
            self.delta_e.observe(delta_e)
        low = figures.get("delta_e_min")
        if isinstance(low, float) and math.isfinite(low) and low < self.target:
            self.below_target.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

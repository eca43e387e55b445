"""Benchmark section `service`: the ingest service on loopback (docs/service.md, "Measured").

Starts the real Serve application (pipeline.service.app.start, random HTSAT-tiny unless the config
says otherwise, no token on 127.0.0.1), then for each client concurrency c sends `requests` uploads
of a `clip_seconds` clip from c threads over HTTP and measures requests/s and p50/p95 latency. The
reference is the batch job's protect path without HTTP or Serve: UploadProtector.protect on
`max_batch_uploads` tracks per call in this process, after the service has been stopped (items/s).

    python -m pipeline.bench.service --concurrency 1,4,8 --requests 16
    unlearnable bench --parts service
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import soundfile as sf

from pipeline.config import PipelineConfig, config_from_dict
from pipeline.demo import synthesize

DEFAULT_CONFIG = {
    "encoder": {"checkpoint": "random:HTSAT-tiny:0"},
    "attack": {"steps": 2},
    "quality": {"masking": False, "musicldm_view": False},
    "service": {"max_batch_uploads": 8, "batch_wait_s": 0.1, "max_pending_uploads": 64},
}


@dataclass
class LevelResult:
    """One concurrency level: `requests` uploads from `concurrency` client threads."""

    concurrency: int
    requests: int
    seconds: float  # wall, first request sent to last response read
    requests_per_s: float
    p50_s: float  # latency, seconds
    p95_s: float
    errors: int  # responses other than 200


@dataclass
class ServiceBench:
    """The section's result; `ratio_8_to_1` is requests/s at the highest level over the lowest."""

    config: dict[str, Any]
    clip_seconds: float
    levels: list[LevelResult] = field(default_factory=list)
    direct_items_per_s: float = float("nan")  # batch job's protect path, no HTTP (same machine)
    ratio_high_to_1: float = float("nan")
    note: str = ""

    def markdown(self) -> str:
        """The table of docs/service.md."""
        lines = [
            "| clients | uploads | wall (s) | requests/s | p50 (s) | p95 (s) | errors | vs direct |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.levels:
            vs = r.requests_per_s / self.direct_items_per_s if self.direct_items_per_s > 0 else float("nan")
            lines.append(
                f"| {r.concurrency} | {r.requests} | {r.seconds:.1f} | {r.requests_per_s:.3f} | {r.p50_s:.2f} | "
                f"{r.p95_s:.2f} | {r.errors} | {vs:.2f} |"
            )
        lines.append("")
        lines.append(
            f"Throughput ratio, highest to lowest concurrency: {self.ratio_high_to_1:.2f}×; direct "
            f"UploadProtector.protect (the batch job's protect path, no HTTP): {self.direct_items_per_s:.3f} items/s."
        )
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def _clip(seconds: float, seed: int) -> bytes:
    samples = synthesize(seconds, 16000, 1, tempo_bpm=120, root_hz=220.0, seed=seed)
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _post(port: int, data: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/protect", body=data, headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    finally:
        conn.close()


def _wait_ready(port: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"service on port {port} not ready within {timeout:.0f} s")


def run_level(port: int, concurrency: int, clips: list[bytes]) -> LevelResult:
    """Send every clip from `concurrency` threads; throughput and latency percentiles."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda data: _post(port, data), clips))
    wall = time.perf_counter() - started
    latencies = sorted(t for _, t in results)
    return LevelResult(
        concurrency=concurrency,
        requests=len(clips),
        seconds=wall,
        requests_per_s=len(clips) / wall,
        p50_s=statistics.median(latencies),
        p95_s=float(np.percentile(latencies, 95)),
        errors=sum(1 for status, _ in results if status != 200),
    )


def direct_items_per_s(cfg: PipelineConfig, clips: list[bytes]) -> float:
    """Items/s of UploadProtector.protect on `max_batch_uploads` tracks per call (one warm-up call)."""
    from pipeline.service.limits import decode_upload
    from pipeline.service.uploads import UploadProtector, prepare_upload

    protector = UploadProtector(cfg)
    uploads = [prepare_upload(f"d{i}", d, decode_upload(d, cfg.service), cfg) for i, d in enumerate(clips)]
    size = cfg.service.max_batch_uploads
    protector.protect(uploads[:size])
    started = time.perf_counter()
    for begin in range(0, len(uploads), size):
        protector.protect(uploads[begin : begin + size])
    return len(uploads) / (time.perf_counter() - started)


def bench_service(
    config: dict[str, Any] | None = None,
    concurrency: tuple[int, ...] = (1, 4, 8),
    requests: int = 16,
    clip_seconds: float = 2.0,
    direct: bool = True,
) -> ServiceBench:
    """Start the service, measure each concurrency level (after one warm-up batch), stop it, then
    measure the direct reference."""
    import torch

    from pipeline.service import app

    data = config or DEFAULT_CONFIG
    cfg = config_from_dict(data)
    result = ServiceBench(config=data, clip_seconds=clip_seconds)
    clips = [_clip(clip_seconds, seed=i) for i in range(requests)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.start(cfg, "127.0.0.1", port)
    try:
        _wait_ready(port)
        run_level(port, max(concurrency), clips[: max(concurrency)])  # warm-up: every batch size once
        for c in concurrency:
            result.levels.append(run_level(port, c, clips))
    finally:
        app.stop()
    low, high = result.levels[0], result.levels[-1]
    result.ratio_high_to_1 = high.requests_per_s / low.requests_per_s
    if direct:
        torch.set_num_threads(max(1, int(cfg.service.num_cpus_per_replica)))
        result.direct_items_per_s = direct_items_per_s(cfg, clips)
    if not torch.cuda.is_available():
        result.note = (
            "CPU: a PGD step's cost grows about linearly with the batch on CPU (HTSAT-tiny fp32 B=4 costs "
            "0.84× per item of B=1, ../shared/ENVIRONMENT.md), so batching uploads cannot reach 3× here; "
            "the GPU figure is unmeasured."
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.service", description=__doc__)
    parser.add_argument("--concurrency", default="1,4,8", help="client threads per level, comma-separated")
    parser.add_argument("--requests", type=int, default=16, help="uploads per level")
    parser.add_argument("--clip-seconds", type=float, default=2.0)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    parser.add_argument("--no-direct", action="store_true", help="skip the direct (no HTTP) reference")
    parser.add_argument("--json", help="write the result here as JSON")
    args = parser.parse_args(argv)
    config = config_from_dict(DEFAULT_CONFIG, list(args.set or [])).to_dict()
    levels = tuple(int(c) for c in args.concurrency.split(",") if c.strip())
    result = bench_service(config, levels, args.requests, args.clip_seconds, direct=not args.no_direct)
    print(result.markdown())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One benchmark run that measures, on the same machine and at the same PGD settings:

1. the bare engine (:func:`pipeline.core.engine.pgd` on in-memory 48 kHz mono windows), per batch size,
   precision (fp32 / bf16 autocast) and optionally with ``torch.compile``;
2. laion-clap's own audio path in a naive per-item fp32 loop (weights not frozen), the baseline;
3. the real Ray Data pipeline (:func:`pipeline.stages.pipeline.run`) from tar shards on disk to
   written shards and manifests, as an efficiency against an engine reference timed in the same
   section at the same steps (``--pipeline-steps``, default 50), batch, precision and torch threads,
   with the actor on dedicated cores (CPU stages on the rest) and, on CPU, sharing all cores;
4. peak RSS of a process that protects a short vs a long track with :class:`TrackProtector`;
5. on a CUDA device: HTSAT-base, 50 bf16 steps, windows/s, × realtime and achieved TFLOP/s against a
   measured bf16 matmul ceiling;
6. an encoder ensemble (1, 2, 3 random HTSAT-tiny encoders, TrackProtector's embed and mean distance):
   seconds per PGD step per window and the peak memory increase, each size in its own process.

Early stop is disabled (target_delta_e = inf) so every window runs exactly the stated steps. Times
are medians of ``--repeats`` runs after ``--warmup`` runs. Ratios (speedup, efficiency, memory) are
the result; absolute CPU times are context only.

Example::

    python -m pipeline.bench --quick                  # < 3 minutes on 2 cores, prints the tables
    python -m pipeline.bench --out docs/benchmarks.md # the full run (HTSAT-tiny and HTSAT-base)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WINDOW_SECONDS = 10.0  # one CLAP window of audio
CLAP_RATE = 48_000
CLAP_SAMPLES = 480_000
TRACK_RATE = 44_100  # pipeline and memory tracks: 44.1 kHz
# Attack settings of configs/demo.yaml (ε ≈ -50.5 dBFS); early stop off.
EPS, ALPHA, SIGMA = 0.003, 0.0006, 0.00075
# Physical cost of HTSAT-base on a 10 s window (see docs/benchmarks.md): forward ≈ 33 GFLOP,
# one PGD step (forward + backward w.r.t. the input) ≈ 99 GFLOP.
HTSAT_BASE_GFLOP_FORWARD = 33.0
HTSAT_BASE_GFLOP_STEP = 99.0
GPU_NOT_AVAILABLE = "GPU: not available on this machine (unmeasured)"
PARTS = ("engine", "baseline", "pipeline", "memory", "gpu", "ensemble")
# GPU section: eager, torch.compile, and torch.compile with CUDA graphs (mode="reduce-overhead").
GPU_MODES = ("eager", "compiled", "cudagraphs")

QUICK = {
    "amodels": ["HTSAT-tiny"],
    "steps": 2,
    "batch_sizes": [1, 2],
    "precisions": None,  # fp32, plus bf16 where the device runs it in hardware (default_precisions)
    "pipeline_tracks": 2,
    "memory_seconds": [60.0, 180.0],
    "repeats": 3,
    "warmup": 1,
    "gpu_batch_sizes": [1, 4],
    "gpu_steps": 5,
    "ensemble_batch": 1,
    "ensemble_steps": 2,
    "pipeline_steps": 2,
    "pipeline_precisions": None,  # bf16 where native, else fp32
    "pipeline_repeats": 1,
}
FULL = {
    "amodels": ["HTSAT-tiny", "HTSAT-base"],
    "steps": 5,
    "batch_sizes": [1, 2, 4],
    "precisions": None,
    "pipeline_tracks": 12,
    "memory_seconds": [60.0, 1800.0],
    "repeats": 3,
    "warmup": 1,
    "gpu_batch_sizes": [8, 16, 32, 64],
    "gpu_steps": 50,
    "ensemble_batch": 2,
    "ensemble_steps": 3,
    "pipeline_steps": 50,  # attack.steps' default: what a catalog run does per window
    "pipeline_precisions": None,  # bf16 where native, else fp32
    "pipeline_repeats": 1,
}
# Where the protect actor's compute runs relative to the CPU stages (decode, quality, encode, write):
#   dedicated: the accelerator is the actor's own. On CPU the actor takes all cores but one
#              (torch threads = runtime.num_cpus_per_actor = cores - 1), the CPU stages the rest;
#              on CUDA the actor has the GPU. The engine reference runs with the same threads.
#   shared:    CPU only: the actor's torch threads = all cores, so every CPU stage preempts them.
PLACEMENTS = ("dedicated", "shared")


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class EngineResult:
    """Bare engine: one `pgd` call on a batch of `batch` windows (clean forward + `steps` forward/
    backward steps + one scoring forward). `seconds` is the median per call."""

    amodel: str
    precision: str
    batch: int
    steps: int
    seconds: float
    compiled: bool = False
    repeats: int = 0
    threads: int = 0  # torch intra-op threads (0: the process default)

    @property
    def windows_per_s(self) -> float:
        return self.batch / self.seconds

    @property
    def steps_per_s(self) -> float:
        """PGD window-steps per second (a step on a batch of B counts B)."""
        return self.batch * self.steps / self.seconds

    @property
    def realtime(self) -> float:
        return self.windows_per_s * WINDOW_SECONDS


@dataclass
class ForwardResult:
    """fp32 no-grad forward of the encoder, per window at batch `batch` (the pipeline's extra
    measurement pass of the written audio)."""

    amodel: str
    batch: int
    seconds_per_window: float


@dataclass
class BaselineResult:
    """laion-clap's own CLAP audio path, one window at a time, fp32, weights not frozen."""

    amodel: str
    steps: int
    seconds_per_window: float
    repeats: int = 0

    @property
    def windows_per_s(self) -> float:
        return 1.0 / self.seconds_per_window


@dataclass
class PipelineResult:
    """The Ray Data pipeline from tar shards on disk to written shards and manifests."""

    amodel: str
    precision: str
    batch: int
    steps: int
    tracks: int
    shards: int
    windows: int
    ok: int
    wall_seconds: float  # run(cfg) after Ray is up: listing, actor start-up, all shards
    steady_seconds: float  # first shard's completion marker -> last shard's
    steady_windows: int  # windows of the shards committed after the first
    engine_windows_per_s: float = float("nan")  # same amodel/precision/batch/steps/threads
    extra_forward_seconds: float = float("nan")  # per window: one fp32 no-grad forward, same threads
    extra_forwards: int = 1  # fp32 measurement forwards per window beyond pgd (see measurement_forwards)
    placement: str = "shared"  # dedicated | shared (PLACEMENTS)
    actor_threads: int = 0  # torch threads of the protect actor (and of the engine reference)

    @property
    def windows_per_s_wall(self) -> float:
        return self.windows / self.wall_seconds

    @property
    def windows_per_s(self) -> float:
        """Steady-state throughput (start-up excluded); the wall figure when only one shard."""
        if self.steady_windows > 0 and self.steady_seconds > 0:
            return self.steady_windows / self.steady_seconds
        return self.windows_per_s_wall

    @property
    def efficiency(self) -> float:
        """Pipeline windows/s ÷ engine windows/s (same batch, precision, steps)."""
        return self.windows_per_s / self.engine_windows_per_s

    @property
    def efficiency_equivalent(self) -> float:
        """Efficiency crediting the pipeline's extra fp32 measurement forward(s) as engine work."""
        engine_seconds = 1.0 / self.engine_windows_per_s + self.extra_forwards * self.extra_forward_seconds
        return engine_seconds * self.windows_per_s


@dataclass
class MemoryResult:
    """Peak RSS of a fresh process that runs ProtectActor on the rows of one mono 44.1 kHz track."""

    track_seconds: float
    windows: int
    rss_before_mib: float  # after imports and the encoder; the track's rows are parked on disk
    peak_mib: float  # VmHWM of the whole process
    protect_seconds: float
    amodel: str = ""
    steps: int = 0
    batch: int = 0
    precision: str = "fp32"
    segments: int = 1  # rows the read stage made of the track (audio.segment_seconds)

    @property
    def protect_increase_mib(self) -> float:
        return self.peak_mib - self.rss_before_mib


@dataclass
class GpuResult:
    """HTSAT-base PGD on the GPU at one batch size."""

    batch: int
    steps: int
    precision: str
    seconds: float  # median per pgd call
    matmul_tflops: float  # measured bf16 matmul ceiling
    error: str = ""
    mode: str = "eager"  # eager | compiled (torch.compile) | cudagraphs (torch.compile reduce-overhead)
    compile_seconds: float = 0.0  # first call's extra time (compiling, graph capture); 0 for eager

    @property
    def windows_per_s(self) -> float:
        return self.batch / self.seconds if not self.error else float("nan")

    @property
    def realtime(self) -> float:
        return self.windows_per_s * WINDOW_SECONDS

    @property
    def tflops(self) -> float:
        """Achieved TFLOP/s with ≈99 GFLOP per step per window plus the clean and scoring forwards."""
        gflop = self.steps * HTSAT_BASE_GFLOP_STEP + 2 * HTSAT_BASE_GFLOP_FORWARD
        return self.windows_per_s * gflop / 1000.0


@dataclass
class EnsembleResult:
    """PGD against an ensemble of `encoders` frozen encoders (`random:<amodel>:0..k-1`) through
    TrackProtector's embed ([b, k, D]) and its mean distance, in a fresh process of its own.

    Each PGD step is timed on its own (from one gradient forward's start to the next forward's start:
    forward + backward through every encoder + the update), ÷ batch: `seconds_per_step_window` is
    the median over all steps of the timed calls, `min_seconds_per_step_window` the fastest. Memory
    is peak RSS (CPU) or torch.cuda.max_memory_allocated (CUDA) over the calls, minus the figure
    before them (encoders loaded, batch built)."""

    encoders: int
    amodel: str
    precision: str
    batch: int
    steps: int
    seconds: float  # median per pgd call (clean forward + steps + scoring forward)
    seconds_per_step_window: float  # median over the timed steps
    min_seconds_per_step_window: float
    loaded_mib: float  # RSS (CPU) / allocated (CUDA) once the encoders are loaded
    before_mib: float  # the same just before the timed calls
    peak_mib: float
    memory_kind: str = "RSS"  # RSS | CUDA allocated
    repeats: int = 0
    ratio_vs_one: float = float("nan")  # seconds_per_step_window ÷ that of one encoder
    peak_increase_mib: float = float("nan")  # peak − before
    increase_ratio_vs_one: float = float("nan")  # peak_increase_mib ÷ that of one encoder


@dataclass
class BenchSettings:
    amodels: list[str]
    steps: int
    batch_sizes: list[int]
    precisions: list[str]
    compile: bool = False
    quick: bool = False
    device: str = "auto"
    threads: int = 0
    repeats: int = 3
    warmup: int = 1
    pipeline_tracks: int = 12
    pipeline_batch: int = 0  # 0: the largest batch size that leaves at least two shards
    pipeline_steps: int = 50  # PGD steps in the pipeline section (and its engine reference)
    pipeline_precisions: list[str] = field(default_factory=lambda: ["bf16"])
    pipeline_placements: list[str] = field(default_factory=lambda: list(PLACEMENTS))
    pipeline_repeats: int = 1  # timed engine-reference calls per pipeline case (median)
    memory_seconds: list[float] = field(default_factory=lambda: [60.0, 1800.0])
    memory_amodel: str = "HTSAT-tiny"
    memory_steps: int = 1
    gpu_batch_sizes: list[int] = field(default_factory=lambda: [8, 16, 32, 64])
    gpu_steps: int = 50
    gpu_modes: list[str] = field(default_factory=lambda: list(GPU_MODES))
    ensemble_sizes: list[int] = field(default_factory=lambda: [1, 2, 3])
    ensemble_batch: int = 2
    ensemble_steps: int = 3
    ensemble_amodel: str = "HTSAT-tiny"
    ensemble_precision: str = "fp32"
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    wait_idle: float = 0.0  # seconds to wait for other work on the machine to finish first
    precision_note: str = ""  # why the default precisions leave bf16 out, when they do


@dataclass
class BenchReport:
    settings: BenchSettings
    machine: dict[str, str]
    command: str
    date: str
    engine: list[EngineResult] = field(default_factory=list)
    forward: list[ForwardResult] = field(default_factory=list)
    baseline: list[BaselineResult] = field(default_factory=list)
    pipeline: list[PipelineResult] = field(default_factory=list)
    pipeline_engine: list[EngineResult] = field(default_factory=list)  # references of the pipeline rows
    memory: list[MemoryResult] = field(default_factory=list)
    gpu: list[GpuResult] = field(default_factory=list)
    ensemble: list[EnsembleResult] = field(default_factory=list)
    gpu_note: str = GPU_NOT_AVAILABLE
    contention: list[Contention] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("engine", "pipeline_engine", "baseline", "pipeline", "memory", "gpu"):
            for item, obj in zip(out[name], getattr(self, name), strict=True):
                for prop in (
                    "windows_per_s",
                    "steps_per_s",
                    "realtime",
                    "efficiency",
                    "efficiency_equivalent",
                    "tflops",
                ):
                    if hasattr(type(obj), prop):
                        item[prop] = getattr(obj, prop)
        return out


# --------------------------------------------------------------------------------------------
# Helpers


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of `fn` over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _sync_for(device: Any) -> Callable[[], None] | None:
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def clip_48k(seed: int) -> Any:
    """A 10 s music-like mono clip at 48 kHz, float32 torch [480000]."""
    import torch

    from pipeline.demo import synthesize

    samples = synthesize(WINDOW_SECONDS, CLAP_RATE, 1, 90 + 10 * (seed % 7), 165.0 + 20 * (seed % 5), seed)
    return torch.from_numpy(samples[:CLAP_SAMPLES, 0].copy())


def attack_params(steps: int, precision: str) -> Any:
    from pipeline.core.engine import PGDParams

    return PGDParams(eps=EPS, alpha=ALPHA, steps=steps, sigma=SIGMA, target_delta_e=float("inf"), precision=precision)


def proc_status_kib(field_name: str) -> int:
    """A `VmRSS` / `VmHWM` line of /proc/self/status in KiB (0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    if field_name == "VmHWM":
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    return 0


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine from /proc/stat (0, 0 where unavailable)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _own_cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Contention:
    """CPU use of the whole machine during one section vs this process (and its waited children).

    `other_pct` is what processes outside the benchmark used, as a share of all cores: timings of a
    section with a large share are inflated by someone else's work. In the pipeline section Ray's
    worker processes are the benchmark's own but are not counted as `own`, so only `busy_pct` is
    meaningful there."""

    section: str
    wall_seconds: float
    busy_pct: float
    own_pct: float

    @property
    def other_pct(self) -> float:
        return max(0.0, self.busy_pct - self.own_pct)


@contextlib.contextmanager
def cpu_meter(section: str, sink: list[Contention]):
    busy0, total0 = _machine_jiffies()
    own0, wall0 = _own_cpu_seconds(), time.perf_counter()
    try:
        yield
    finally:
        busy1, total1 = _machine_jiffies()
        wall = time.perf_counter() - wall0
        cores = os.cpu_count() or 1
        busy = 100.0 * (busy1 - busy0) / (total1 - total0) if total1 > total0 else float("nan")
        own = 100.0 * (_own_cpu_seconds() - own0) / (wall * cores) if wall > 0 else float("nan")
        sink.append(Contention(section, wall, busy, min(own, 100.0)))


def wait_for_idle(max_seconds: float, threshold: float = 0.3, probe: float = 5.0) -> float:
    """Wait (up to `max_seconds`) until the machine is ≤ `threshold` busy over a `probe`-second
    window; returns the last busy fraction seen."""
    deadline = time.monotonic() + max_seconds
    while True:
        busy0, total0 = _machine_jiffies()
        time.sleep(probe)
        busy1, total1 = _machine_jiffies()
        busy = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        if busy <= threshold or time.monotonic() >= deadline:
            return busy
        log(f"machine {100 * busy:.0f} % busy with other work; waiting for it to go idle")


def machine_info(device: str = "cpu") -> dict[str, str]:
    import importlib.metadata as md

    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    flags = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        found = [f for f in ("avx512f", "amx_bf16", "avx512_bf16") if f" {f}" in text]
        flags = ", ".join(found)

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    info = {
        "CPU": cpu,
        "CPU flags": flags or "-",
        "cores (os.cpu_count)": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "memory": memory or "-",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": version("ray"),
        "laion-clap": version("laion-clap"),
        "numpy": version("numpy"),
        "device": device,
    }
    if torch.cuda.is_available():
        info["GPU"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------------------------
# 1. Engine


def bench_engine(
    amodel: str,
    steps: int,
    batch_sizes: Sequence[int],
    precisions: Sequence[str],
    *,
    device: str = "cpu",
    compile: bool = False,
    repeats: int = 3,
    warmup: int = 1,
    warmup_steps: int | None = None,
    encoder: Any = None,
) -> tuple[list[EngineResult], list[ForwardResult]]:
    """Time `pgd` on in-memory [B, 1, 480000] windows (48 kHz mono, ClapView(48000)).

    Returns one EngineResult per (batch, precision[, compiled]) and, per batch, the fp32 no-grad
    forward time per window. Warm-up calls run `warmup_steps` steps (default: `steps`), so a
    50-step measurement need not pay for a 50-step warm-up.
    """
    import torch

    from pipeline.core.engine import pgd
    from pipeline.encoders.base import ClapView
    from pipeline.encoders.load import load_encoder

    loaded = encoder if encoder is not None else load_encoder(f"random:{amodel}:0", device=device)
    dev = loaded.device
    sync = _sync_for(dev)
    view = ClapView(CLAP_RATE).to(dev)
    runners: list[tuple[bool, Any]] = [(False, loaded.model)]
    if compile:
        runners.append((True, torch.compile(loaded.model)))
    clips = [clip_48k(i) for i in range(max(batch_sizes))]
    results: list[EngineResult] = []
    forwards: list[ForwardResult] = []
    for batch in batch_sizes:
        x = torch.stack(clips[:batch])[:, None, :].to(dev)  # [B, 1, 480000]
        for compiled, model in runners:

            def embed(x_rows: torch.Tensor, _rows: torch.Tensor, model: Any = model) -> torch.Tensor:
                return model(view(x_rows))

            for precision in precisions:
                params = attack_params(steps, precision)

                def call(params: Any = params, embed: Any = embed, x_in: torch.Tensor = x) -> Any:
                    return pgd(embed, x_in, params, generator=torch.Generator().manual_seed(0))

                label = f"{amodel} B={batch} {precision}{' compiled' if compiled else ''}"
                if compiled:
                    started = time.perf_counter()
                    call()
                    log(f"engine {label}: first call (compile) {time.perf_counter() - started:.1f} s")
                if warmup_steps is not None:
                    short = attack_params(warmup_steps, precision)
                    for _ in range(warmup):
                        pgd(embed, x, short, generator=torch.Generator().manual_seed(0))
                    seconds = median_seconds(call, repeats, 0, sync)
                else:
                    seconds = median_seconds(call, repeats, warmup, sync)
                results.append(
                    EngineResult(
                        amodel, precision, batch, steps, seconds, compiled, repeats, threads=torch.get_num_threads()
                    )
                )
                log(f"engine {label}: {seconds:.2f} s/call, {batch / seconds:.3f} windows/s")

        def forward(x: torch.Tensor = x) -> Any:
            with torch.no_grad():
                return loaded.model(view(x))

        fwd = median_seconds(forward, repeats, warmup, sync)
        forwards.append(ForwardResult(amodel, batch, fwd / batch))
    return results, forwards


# --------------------------------------------------------------------------------------------
# 2. Baseline


def bench_baseline(
    amodel: str, steps: int, *, device: str = "cpu", repeats: int = 3, warmup: int = 1
) -> BaselineResult:
    """laion-clap's own `CLAP.get_audio_embedding`, one window at a time, fp32, weights trainable:
    e(x) once, then `steps` × (forward, ||e(x+δ) − e(x)||, backward, sign step), then a scoring
    forward — the same work per window as the engine's `pgd`, done the naive way."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # laion_clap's import fetches tokenizers otherwise
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from laion_clap.clap_module.factory import create_model

    from pipeline.encoders.load import pick_device

    dev = pick_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _ = create_model(amodel, "transformer", precision="fp32", device=dev)
    model.eval()  # no SpecAugment; parameters keep requires_grad=True (not frozen)
    sync = _sync_for(dev)
    clean_wave = clip_48k(0).to(dev)

    def one_window() -> None:
        with torch.no_grad():
            clean = model.get_audio_embedding([{"waveform": clean_wave}])
        delta = (torch.randn_like(clean_wave) * SIGMA).clamp(-EPS, EPS).requires_grad_(True)
        for _ in range(steps):
            adv = model.get_audio_embedding([{"waveform": clean_wave + delta}])
            loss = (adv - clean).norm()
            loss.backward()
            with torch.no_grad():
                delta += ALPHA * delta.grad.sign()
                delta.copy_(torch.maximum(torch.minimum(delta, 1 - clean_wave), -1 - clean_wave).clamp(-EPS, EPS))
            delta.grad = None
        with torch.no_grad():
            model.get_audio_embedding([{"waveform": clean_wave + delta}])

    seconds = median_seconds(one_window, repeats, warmup, sync)
    log(f"baseline {amodel}: {seconds:.2f} s/window")
    return BaselineResult(amodel, steps, seconds, repeats)


# --------------------------------------------------------------------------------------------
# 3. Pipeline


def write_catalog(folder: Path, tracks: int, per_shard: int, seed: int = 0) -> list[Path]:
    """`tracks` 10 s 44.1 kHz stereo FLAC tracks (one window each) in tars of `per_shard` tracks."""
    import soundfile as sf

    from pipeline.demo import synthesize, write_tar

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard in range(math.ceil(tracks / per_shard)):
        members = []
        for number in range(shard * per_shard, min(tracks, (shard + 1) * per_shard)):
            samples = synthesize(
                WINDOW_SECONDS,
                TRACK_RATE,
                2,
                80 + 7 * (number % 11),
                150.0 + 13 * (number % 9),
                seed + number,
            )
            buffer = io.BytesIO()
            sf.write(buffer, samples, TRACK_RATE, format="FLAC", subtype="PCM_16")
            key = f"bench-{number:05d}"
            members.append((f"{key}.flac", buffer.getvalue()))
            members.append((f"{key}.json", json.dumps({"title": key}).encode()))
        path = folder / f"shard-{shard:06d}.tar"
        write_tar(path, members)
        paths.append(path)
    return paths


def actor_threads(placement: str, device: str = "cpu") -> int:
    """Torch threads of the protect actor for a placement (PLACEMENTS): on CPU all cores but one
    when dedicated, all cores when shared; one on CUDA (the GPU does the work)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r} (known: {', '.join(PLACEMENTS)})")
    if device.startswith("cuda"):
        return 1
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if placement == "dedicated" else cores


def measurement_forwards(precision: str, musicldm_view: bool = True) -> int:
    """fp32 no-grad forwards per window the pipeline runs beyond `pgd` (TrackProtector._measure):
    the written audio (1), the clean audio again unless pgd's own e(x) was fp32 with the plain view
    (bf16: +1), and the MusicLDM view of both (+2)."""
    return 1 + (precision != "fp32") + (2 if musicldm_view else 0)


def pipeline_config(
    input_dir: Path,
    output_dir: Path,
    amodel: str,
    steps: int,
    precision: str,
    batch: int,
    device: str = "cpu",
    placement: str = "shared",
) -> Any:
    from pipeline.config import config_from_dict

    cuda = device.startswith("cuda")
    threads = actor_threads(placement, device)
    return config_from_dict(
        {
            "io": {"input": str(input_dir), "output": str(output_dir), "overwrite": True},
            "audio": {"window_seconds": WINDOW_SECONDS, "overlap_seconds": 1.0, "on_error": "passthrough"},
            "encoder": {"checkpoint": f"random:{amodel}:0", "device": device},
            "attack": {
                "eps": EPS,
                "alpha": ALPHA,
                "steps": steps,
                "sigma": SIGMA,
                "target_delta_e": float("inf"),
                "precision": precision,
                "seed": 0,
            },
            "runtime": {
                "num_actors": 1,
                "num_gpus_per_actor": 1.0 if cuda else 0.0,
                # dedicated: the actor reserves the cores its threads use, so Ray schedules the
                # CPU stages (io_cpus each) on the rest; shared: it reserves one and uses all.
                "num_cpus_per_actor": float(threads) if placement == "dedicated" and not cuda else 1.0,
                "torch_threads": threads,
                "tracks_per_call": batch,
                "batch_windows": batch,
                "io_cpus": 0.25,
                "progress": False,
            },
        }
    )


def bench_pipeline(
    amodel: str,
    steps: int,
    precision: str,
    batch: int,
    input_dir: Path,
    output_dir: Path,
    *,
    device: str = "cpu",
    placement: str = "shared",
) -> PipelineResult:
    """Run the real pipeline once over the catalog in `input_dir` (Ray must be up or is started)."""
    from pipeline.io.output import OutputFolder
    from pipeline.records import ShardStats
    from pipeline.stages.pipeline import init_ray, run

    cfg = pipeline_config(input_dir, output_dir, amodel, steps, precision, batch, device, placement)
    init_ray(cfg)
    result = run(cfg)
    stats = result.this_run
    if stats.ok != stats.items or stats.items == 0:
        raise RuntimeError(f"pipeline benchmark run failed: {stats.ok}/{stats.items} ok, errors {stats.errors}")
    # Commit times from the completion markers' mtimes (written by the shard writer as it commits;
    # the driver may receive the summaries later, and in bunches).
    folder = OutputFolder(str(output_dir))
    commits = []
    for marker in output_dir.glob("*" + folder.marker_name("")):
        windows = ShardStats.from_json(marker.read_text()).windows
        commits.append((marker.stat().st_mtime_ns / 1e9, windows))
    commits.sort()
    steady_seconds = commits[-1][0] - commits[0][0] if len(commits) > 1 else 0.0
    steady_windows = sum(w for _, w in commits[1:])
    out = PipelineResult(
        amodel=amodel,
        precision=precision,
        batch=batch,
        steps=steps,
        tracks=stats.items,
        shards=result.processed_shards,
        windows=stats.windows,
        ok=stats.ok,
        wall_seconds=result.wall_seconds,
        steady_seconds=steady_seconds,
        steady_windows=steady_windows,
        extra_forwards=measurement_forwards(precision, cfg.quality.musicldm_view),
        placement=placement,
        actor_threads=cfg.runtime.torch_threads or 1,
    )
    log(
        f"pipeline {amodel} B={batch} {precision} {placement} ({out.actor_threads} threads): "
        f"{out.windows} windows in {out.wall_seconds:.1f} s wall, "
        f"{out.windows_per_s:.3f} windows/s steady"
    )
    return out


# --------------------------------------------------------------------------------------------
# 4. Memory


def run_child(flag: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run `python -m pipeline.bench <flag> <spec>` in a fresh process (its own peak RSS) and
    return the JSON object it prints last."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.bench", flag, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{flag.strip('-')} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside a fresh process: what a protect actor holds for one mono 44.1 kHz track of
    spec['seconds']. The track goes through the read stage's own code (FLAC bytes -> decoded row
    -> segment rows of `audio.segment_seconds`); the rows' PCM is parked on disk (in a run it
    waits in Ray's object store, not in the actor); the peak-RSS mark is reset
    (/proc/self/clear_refs); then `ProtectActor` handles the rows in calls of
    `runtime.tracks_per_call`, as Ray hands them over. Peak RSS is then the actor's own."""
    import gc
    import tempfile

    import numpy as np

    from pipeline.config import config_from_dict
    from pipeline.demo import synthesize
    from pipeline.io.audio import OutputFormat, encode
    from pipeline.io.shards import Sample
    from pipeline.stages import rows as R
    from pipeline.stages.protect import ProtectActor
    from pipeline.stages.read import ReadSettings, sample_row
    from pipeline.stages.segments import track_rows

    threads = int(spec.get("threads") or os.cpu_count() or 1)
    cfg = config_from_dict(
        {
            "encoder": {"checkpoint": f"random:{spec['amodel']}:0", "device": spec.get("device", "cpu")},
            "attack": {
                "eps": EPS,
                "alpha": ALPHA,
                "sigma": SIGMA,
                "steps": int(spec["steps"]),
                "precision": spec["precision"],
                "target_delta_e": 1e9,  # early stop off
            },
            "audio": {"window_seconds": WINDOW_SECONDS, "overlap_seconds": 1.0},
            "runtime": {"batch_windows": int(spec["batch"]), "torch_threads": threads},
        }
    )
    n = round(float(spec["seconds"]) * TRACK_RATE)
    clip = synthesize(WINDOW_SECONDS, TRACK_RATE, 1, 120, 220.0, 0)[:, 0]
    track = np.resize(clip, n).astype(np.float32).reshape(n, 1)
    flac = encode(track, TRACK_RATE, OutputFormat("FLAC", "PCM_16", "flac"))
    del track
    settings = ReadSettings(extensions=("flac",), max_member_bytes=1 << 31, storage_options={})
    row = sample_row(Sample(key="memory", names=["memory.flac"], data=[flac]), settings)
    del flac, clip
    rows = track_rows(row, cfg.audio.segment_seconds, cfg.audio.overlap_seconds)
    del row
    parked = tempfile.TemporaryDirectory(prefix="bench-memory-")
    for i, r in enumerate(rows):
        path = Path(parked.name) / f"{i}.pcm"
        path.write_bytes(r[R.PCM])
        r[R.PCM] = str(path)
    gc.collect()
    _release_free_memory()
    actor = ProtectActor(cfg)
    rss_before = proc_status_kib("VmRSS")
    _reset_peak_rss()
    started = time.perf_counter()
    windows = 0
    per_call = cfg.runtime.tracks_per_call
    for begin in range(0, len(rows), per_call):
        call = [{**r, R.PCM: Path(r[R.PCM]).read_bytes()} for r in rows[begin : begin + per_call]]
        out = actor(R.rows_to_batch(call, list(call[0])))
        del call
        if any(status != "ok" for status in out[R.STATUS]):
            raise RuntimeError(f"memory benchmark: protect failed: {out[R.ERROR]}")
        windows += int(sum(out["n_windows"]))
        del out
    seconds = time.perf_counter() - started
    parked.cleanup()
    return {
        "track_seconds": float(spec["seconds"]),
        "windows": windows,
        "segments": len(rows),
        "rss_before_mib": rss_before / 1024,
        "peak_mib": proc_status_kib("VmHWM") / 1024,
        "protect_seconds": seconds,
        "amodel": spec["amodel"],
        "steps": int(spec["steps"]),
        "batch": int(spec["batch"]),
        "precision": spec["precision"],
    }


def _release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc), so that RSS reflects live data only."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: writing 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        log("memory: cannot reset the peak-RSS mark; peaks include the track's preparation")


def bench_memory(
    seconds: float,
    *,
    amodel: str,
    steps: int,
    batch: int,
    precision: str = "fp32",
    device: str = "cpu",
    threads: int = 0,
) -> MemoryResult:
    """Run :func:`memory_child` in a subprocess (its own peak RSS) and parse its JSON line."""
    spec = {
        "seconds": seconds,
        "amodel": amodel,
        "steps": steps,
        "batch": batch,
        "precision": precision,
        "device": device,
        "threads": threads,
    }
    result = MemoryResult(**run_child("--memory-child", spec))
    log(
        f"memory {seconds / 60:.0f} min: {result.windows} windows, peak {result.peak_mib:.0f} MiB "
        f"(before protect {result.rss_before_mib:.0f} MiB), {result.protect_seconds:.1f} s"
    )
    return result


# --------------------------------------------------------------------------------------------
# 5. GPU


def matmul_ceiling_tflops(n: int = 8192, repeats: int = 20) -> float:
    """Measured bf16 dense matmul TFLOP/s on the current CUDA device."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e12


def gpu_embed(model: Any, view: Any, mode: str) -> Callable[[Any, Any], Any]:
    """pgd's embed through `model` run eagerly, `torch.compile`d, or compiled with CUDA graphs
    (mode="reduce-overhead": one graph replay per forward and per backward instead of a launch per
    kernel). Graph outputs live in buffers the next replay overwrites, so that mode marks
    each call as a new step and hands pgd a copy ([b, 512], negligible)."""
    import torch

    if mode not in GPU_MODES:
        raise ValueError(f"unknown GPU mode {mode!r}; expected one of {', '.join(GPU_MODES)}")
    forward = model
    if mode == "compiled":
        forward = torch.compile(model)
    elif mode == "cudagraphs":
        forward = torch.compile(model, mode="reduce-overhead")

    def embed(x_rows: Any, _rows: Any) -> Any:
        if mode != "cudagraphs":
            return forward(view(x_rows))
        torch.compiler.cudagraph_mark_step_begin()
        return forward(view(x_rows)).clone()

    return embed


def bench_gpu(
    batch_sizes: Sequence[int],
    steps: int = 50,
    *,
    modes: Sequence[str] = GPU_MODES,
    repeats: int = 3,
    warmup: int = 1,
) -> list[GpuResult]:
    """HTSAT-base bf16 PGD on CUDA: an eager batch-size sweep (stops at the first out-of-memory),
    then the other `modes` at the eager sweep's fastest batch. A compiled mode's first call (2 PGD
    steps: compiling and capturing the no-grad and the gradient graphs) is timed on its own."""
    import torch

    from pipeline.core.engine import pgd
    from pipeline.encoders.base import ClapView
    from pipeline.encoders.load import load_encoder

    ceiling = matmul_ceiling_tflops()
    loaded = load_encoder("random:HTSAT-base:0", device="cuda")
    dev = loaded.device
    view = ClapView(CLAP_RATE).to(dev)
    sync = _sync_for(dev)
    params = attack_params(steps, "bf16")
    short = attack_params(min(steps, 2), "bf16")
    base = torch.stack([clip_48k(i) for i in range(8)])

    def run_case(batch: int, mode: str) -> GpuResult:
        x = base[torch.arange(batch) % base.shape[0]][:, None, :].to(dev)
        try:
            embed = gpu_embed(loaded.model, view, mode)
            compile_seconds = 0.0
            if mode != "eager":
                started = time.perf_counter()
                pgd(embed, x, short, generator=torch.Generator().manual_seed(0))
                if sync is not None:
                    sync()
                compile_seconds = time.perf_counter() - started
                log(f"gpu B={batch} {mode}: first call {compile_seconds:.1f} s")
            seconds = median_seconds(
                lambda: pgd(embed, x, params, generator=torch.Generator().manual_seed(0)), repeats, warmup, sync
            )
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            return GpuResult(batch, steps, "bf16", float("nan"), ceiling, f"out of memory: {exc}"[:80], mode)
        log(f"gpu B={batch} {mode}: {batch / seconds:.2f} windows/s")
        return GpuResult(batch, steps, "bf16", seconds, ceiling, mode=mode, compile_seconds=compile_seconds)

    results = []
    for batch in batch_sizes:
        results.append(run_case(batch, "eager"))
        if results[-1].error:
            break
    measured = [r for r in results if not r.error]
    if not measured:
        return results
    best = max(measured, key=lambda r: r.windows_per_s).batch
    for mode in modes:
        if mode != "eager":
            results.append(run_case(best, mode))
    return results


# --------------------------------------------------------------------------------------------
# 6. Ensemble


def ensemble_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside a fresh process: time `pgd` against spec['encoders'] encoders at once, as
    TrackProtector runs an ensemble (its `embed_fn` -> [b, k, D], its mean `distance`), on an
    in-memory batch of 10 s 48 kHz mono windows; report the median call time, the time of each PGD
    step and the memory the calls add on top of the loaded encoders."""
    import gc

    import torch

    from pipeline.core.engine import pgd
    from pipeline.core.protect import TrackProtector
    from pipeline.encoders.load import load_encoder

    torch.set_num_threads(int(spec.get("threads") or os.cpu_count() or 1))
    k, batch, steps = int(spec["encoders"]), int(spec["batch"]), int(spec["steps"])
    repeats, warmup = int(spec.get("repeats", 3)), int(spec.get("warmup", 1))
    device = spec.get("device", "cpu")
    encoders = [load_encoder(f"random:{spec['amodel']}:{i}", device=device) for i in range(k)]
    dev = encoders[0].device
    cuda = dev.type == "cuda"

    def mib() -> float:
        return torch.cuda.memory_allocated(dev) / (1 << 20) if cuda else proc_status_kib("VmRSS") / 1024

    loaded = mib()
    protector = TrackProtector(
        encoders,
        attack_params(steps, spec["precision"]),
        batch_windows=batch,
        ensemble="mean",
        measure_musicldm=False,
        measure_masking=False,
    )
    x = torch.stack([clip_48k(i) for i in range(batch)])[:, None, :].to(dev)  # [B, 1, 480000]
    lengths = torch.full((batch,), CLAP_SAMPLES, device=dev)
    ensemble_embed = protector.embed_fn(CLAP_RATE, lengths, ("clean48k",), random=True)
    sync = _sync_for(dev)
    marks: list[tuple[float, bool]] = []  # (time, a gradient step's forward?) per embed call

    def embed(x_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if sync:
            sync()
        marks.append((time.perf_counter(), x_rows.requires_grad))
        return ensemble_embed(x_rows, rows)

    params = attack_params(steps, spec["precision"])

    def call() -> Any:
        return pgd(embed, x, params, generator=torch.Generator().manual_seed(0), distance=protector.distance)

    gc.collect()
    _release_free_memory()
    before = mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        _reset_peak_rss()
    for _ in range(warmup):
        call()
    marks.clear()
    seconds = median_seconds(call, repeats, 0, sync)
    # A step runs from its forward's start to the next embed call's (the next step or the scoring forward).
    step_seconds = [marks[i + 1][0] - t for i, (t, grad) in enumerate(marks[:-1]) if grad]
    peak = torch.cuda.max_memory_allocated(dev) / (1 << 20) if cuda else proc_status_kib("VmHWM") / 1024
    return {
        "encoders": k,
        "amodel": spec["amodel"],
        "precision": spec["precision"],
        "batch": batch,
        "steps": steps,
        "seconds": seconds,
        "seconds_per_step_window": statistics.median(step_seconds) / batch,
        "min_seconds_per_step_window": min(step_seconds) / batch,
        "loaded_mib": loaded,
        "before_mib": before,
        "peak_mib": peak,
        "memory_kind": "CUDA allocated" if cuda else "RSS",
        "repeats": repeats,
        "peak_increase_mib": peak - before,
    }


def bench_ensemble(
    sizes: Sequence[int],
    *,
    amodel: str = "HTSAT-tiny",
    steps: int = 3,
    batch: int = 2,
    precision: str = "fp32",
    device: str = "cpu",
    threads: int = 0,
    repeats: int = 3,
    warmup: int = 1,
    meter: list[Contention] | None = None,
) -> list[EnsembleResult]:
    """Run :func:`ensemble_child` in a subprocess per ensemble size; ratios against the first size."""
    results: list[EnsembleResult] = []
    for k in sizes:
        spec = {
            "encoders": k,
            "amodel": amodel,
            "steps": steps,
            "batch": batch,
            "precision": precision,
            "device": device,
            "threads": threads,
            "repeats": repeats,
            "warmup": warmup,
        }
        with cpu_meter(f"ensemble k={k}", meter if meter is not None else []):
            result = EnsembleResult(**run_child("--ensemble-child", spec))
        first = results[0] if results else result
        if first.seconds_per_step_window > 0:
            result.ratio_vs_one = result.seconds_per_step_window / first.seconds_per_step_window
        if first.peak_increase_mib > 0:
            result.increase_ratio_vs_one = result.peak_increase_mib / first.peak_increase_mib
        results.append(result)
        log(
            f"ensemble k={k}: {result.seconds:.2f} s/call, {result.seconds_per_step_window:.3f} s per step per window "
            f"(×{result.ratio_vs_one:.2f}), peak +{result.peak_increase_mib:.0f} MiB {result.memory_kind}"
        )
    return results


# --------------------------------------------------------------------------------------------
# The run


def choose_pipeline_batch(settings: BenchSettings) -> int:
    """The batch the pipeline runs at: --pipeline-batch, else the largest benchmarked batch that
    still gives at least two shards (one shard per protect call; steady state needs two)."""
    if settings.pipeline_batch:
        return settings.pipeline_batch
    fitting = [b for b in settings.batch_sizes if 2 * b <= settings.pipeline_tracks]
    return max(fitting) if fitting else min(settings.batch_sizes)


def run_benchmark(settings: BenchSettings, command: str = "") -> BenchReport:
    import torch

    from pipeline.encoders.load import pick_device

    started = time.perf_counter()
    device = str(pick_device(settings.device))
    report = BenchReport(
        settings=settings,
        machine=machine_info(device),
        command=command,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    parts = set(settings.parts)
    meter = report.contention
    if settings.precision_note:
        report.notes.append(settings.precision_note)
    if settings.wait_idle > 0:
        busy = wait_for_idle(settings.wait_idle)
        report.notes.append(f"Machine {100 * busy:.0f} % busy (other work) when the run started.")
    for amodel in settings.amodels if "engine" in parts else []:
        with cpu_meter(f"engine {amodel}", meter):
            engine, forward = bench_engine(
                amodel,
                settings.steps,
                settings.batch_sizes,
                settings.precisions,
                device=device,
                compile=settings.compile,
                repeats=settings.repeats,
                warmup=settings.warmup,
            )
        report.engine += engine
        report.forward += forward
    for amodel in settings.amodels if "baseline" in parts else []:
        with cpu_meter(f"baseline {amodel}", meter):
            report.baseline.append(
                bench_baseline(amodel, settings.steps, device=device, repeats=settings.repeats, warmup=settings.warmup)
            )
    if "pipeline" in parts:
        report.pipeline = _run_pipelines(settings, report, device)
    threads = settings.threads or (os.cpu_count() or 1)
    for seconds in settings.memory_seconds if "memory" in parts else []:
        with cpu_meter(f"memory {_minutes(seconds)}", meter):
            report.memory.append(
                bench_memory(
                    seconds,
                    amodel=settings.memory_amodel,
                    steps=settings.memory_steps,
                    batch=max(settings.batch_sizes),
                    device=device,
                    threads=threads,
                )
            )
    if "ensemble" in parts:
        report.ensemble = bench_ensemble(
            settings.ensemble_sizes,
            amodel=settings.ensemble_amodel,
            steps=settings.ensemble_steps,
            batch=settings.ensemble_batch,
            precision=settings.ensemble_precision,
            device=device,
            threads=threads,
            repeats=settings.repeats,
            warmup=settings.warmup,
            meter=meter,
        )
    if "gpu" in parts:
        if torch.cuda.is_available():
            report.gpu = bench_gpu(
                settings.gpu_batch_sizes,
                settings.gpu_steps,
                modes=settings.gpu_modes,
                repeats=settings.repeats,
                warmup=settings.warmup,
            )
            report.gpu_note = f"GPU: {torch.cuda.get_device_name(0)}"
        else:
            report.gpu_note = GPU_NOT_AVAILABLE
    else:
        report.gpu_note = "GPU: not run (--parts)"
    report.seconds = time.perf_counter() - started
    return report


def _run_pipelines(settings: BenchSettings, report: BenchReport, device: str) -> list[PipelineResult]:
    """Per model, precision and placement: the engine reference (in this process, the actor's
    thread count, same batch/precision/steps), then the pipeline run it is compared with."""
    import ray
    import torch

    from pipeline.encoders.load import load_encoder

    batch = choose_pipeline_batch(settings)
    placements = ["dedicated"] if device.startswith("cuda") else settings.pipeline_placements
    started_ray = not ray.is_initialized()
    own_threads = torch.get_num_threads()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="unlearnable-bench-") as tmp:
            input_dir = Path(tmp) / "input"
            write_catalog(input_dir, settings.pipeline_tracks, batch)
            for amodel in settings.amodels:
                encoder = load_encoder(f"random:{amodel}:0", device=device)
                for precision in settings.pipeline_precisions:
                    for placement in placements:
                        case = (amodel, precision, batch, placement)
                        results.append(_pipeline_case(settings, report, case, encoder, input_dir, device))
                del encoder
    finally:
        torch.set_num_threads(own_threads)
        if started_ray and ray.is_initialized():
            ray.shutdown()
    return results


def _pipeline_case(
    settings: BenchSettings,
    report: BenchReport,
    case: tuple[str, str, int, str],
    encoder: Any,
    input_dir: Path,
    device: str,
) -> PipelineResult:
    """One pipeline row: its engine reference at the actor's threads, then the pipeline run."""
    import torch

    amodel, precision, batch, placement = case
    steps = settings.pipeline_steps
    torch.set_num_threads(actor_threads(placement, device))
    engine, forward = bench_engine(
        amodel,
        steps,
        [batch],
        [precision],
        device=device,
        repeats=settings.pipeline_repeats,
        warmup=1,
        warmup_steps=1,
        encoder=encoder,
    )
    report.pipeline_engine += engine
    log(f"engine reference {amodel} {precision} {placement}: {engine[0].windows_per_s:.3f} windows/s")
    output_dir = input_dir.parent / f"out-{amodel}-{precision}-{placement}"
    with cpu_meter(f"pipeline {amodel} {precision} {placement}", report.contention):
        result = bench_pipeline(
            amodel, steps, precision, batch, input_dir, output_dir, device=device, placement=placement
        )
    result.engine_windows_per_s = engine[0].windows_per_s
    result.extra_forward_seconds = forward[0].seconds_per_window
    shutil.rmtree(output_dir, ignore_errors=True)
    return result


def _find_engine(report: BenchReport, amodel: str, precision: str, batch: int) -> EngineResult | None:
    return next(
        (
            e
            for e in report.engine
            if e.amodel == amodel and e.precision == precision and e.batch == batch and not e.compiled
        ),
        None,
    )


# --------------------------------------------------------------------------------------------
# Markdown


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _f(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "–"
    return f"{value:.{digits}f}"


def render_tables(report: BenchReport) -> str:
    """The result tables (what the run prints)."""
    s = report.settings
    out: list[str] = []
    if report.engine:
        out.append(
            f"### Engine (`core.engine.pgd`, in-memory 48 kHz mono windows, {s.steps} PGD steps, early stop off)\n"
        )
        rows = []
        for e in report.engine:
            rows.append(
                [
                    e.amodel,
                    e.precision + (" + compile" if e.compiled else ""),
                    e.batch,
                    _f(e.seconds),
                    _f(e.windows_per_s, 3),
                    _f(e.steps_per_s, 2),
                    _f(e.realtime, 2),
                ]
            )
        out.append(
            _table(
                [
                    "model",
                    "precision",
                    "batch",
                    "s / call (median)",
                    "windows/s",
                    "PGD steps/s",
                    "× realtime",
                ],
                rows,
            )
        )
        out.append(
            "\nA call = clean forward + steps × (forward + backward w.r.t. δ) + scoring forward, "
            "on B windows. "
            "PGD steps/s counts window-steps (B per batched step). × realtime = windows/s × 10 s."
        )
    if report.baseline:
        out.append(
            f"\n### Baseline vs engine (laion-clap `CLAP.get_audio_embedding`, one window at a time, fp32, "
            f"weights not frozen, {s.steps} steps)\n"
        )
        rows = []
        for b in report.baseline:
            same = _find_engine(report, b.amodel, "fp32", 1)
            engines = [e for e in report.engine if e.amodel == b.amodel and not e.compiled]
            best = max(engines, key=lambda e: e.windows_per_s) if engines else None
            rows.append(
                [
                    b.amodel,
                    _f(b.seconds_per_window),
                    _f(b.windows_per_s, 3),
                    (_f(same.windows_per_s / b.windows_per_s) + "×") if same else "–",
                    f"{_f(best.windows_per_s / b.windows_per_s)}× ({best.precision}, B={best.batch})" if best else "–",
                    (("met" if best.windows_per_s / b.windows_per_s >= 2 else "NOT met") if best else "–"),
                ]
            )
        out.append(
            _table(
                [
                    "model",
                    "baseline s / window",
                    "baseline windows/s",
                    "speedup, engine fp32 B=1",
                    "speedup, best engine",
                    "target ≥ 2×",
                ],
                rows,
            )
        )
    if report.pipeline:
        p0 = report.pipeline[0]
        out.append(
            f"\n### Pipeline (Ray Data, tar shards on disk → written shards + manifests; "
            f"{p0.tracks} tracks × 10 s "
            f"44.1 kHz stereo FLAC, {p0.shards} shards of {p0.batch}, batch {p0.batch}, {p0.steps} steps)\n"
        )
        rows = []
        for p in report.pipeline:
            verdict = ("met" if p.efficiency >= 0.9 else "NOT met") if p.placement == "dedicated" else "(context)"
            rows.append(
                [
                    p.amodel,
                    p.precision,
                    p.placement,
                    p.actor_threads,
                    p.windows,
                    _f(p.wall_seconds, 1),
                    _f(p.windows_per_s, 3),
                    _f(p.engine_windows_per_s, 3),
                    f"**{_f(p.efficiency, 3)}** {verdict}",
                    f"{_f(p.efficiency_equivalent)} (+{p.extra_forwards} fwd)",
                ]
            )
        out.append(
            _table(
                [
                    "model",
                    "precision",
                    "placement",
                    "actor threads",
                    "windows",
                    "wall s",
                    "windows/s (steady)",
                    "engine windows/s (same threads)",
                    "efficiency (target ≥ 0.9)",
                    "efficiency, engine-equivalent",
                ],
                rows,
            )
        )
        out.append(
            "\nEach row has its own engine reference, timed in this section just before the pipeline "
            f"run: `pgd` on in-memory 48 kHz mono windows at the same steps, batch, precision and torch "
            f"threads ({s.pipeline_repeats} timed call(s) after a 1-step warm-up). "
            "*dedicated*: the actor's cores are its own (on CPU `runtime.num_cpus_per_actor` = torch "
            "threads = cores − 1, and Ray schedules the decode, quality, encode and write tasks on the "
            "remaining core; on a GPU node the accelerator is the GPU); this is the placement the ≥ 0.9 "
            "target is about. *shared* (CPU only): the actor's torch threads use every core, so each CPU "
            "stage preempts one of its OpenMP threads and the other waits at the next barrier; shown for "
            "context, it is the faster setting in absolute windows/s only when the engine scales well "
            "with cores. wall = `run(cfg)` with Ray already up (listing, actor start-up, encoder build "
            "included); steady = first → last committed shard; efficiency = steady ÷ engine. The pipeline "
            "also measures the audio as written with fp32 no-grad forwards the engine does not run "
            "(written audio; clean audio again in bf16; MusicLDM view of both): *engine-equivalent* "
            "credits them as work, (1/engine + n_fwd·t_fwd) × pipeline windows/s, t_fwd timed at the same "
            "threads."
        )
    if report.memory:
        m0 = report.memory[0]
        out.append(
            f"\n### Memory (peak RSS of a protect actor; `ProtectActor` on the read stage's rows, mono 44.1 kHz, "
            f"{m0.amodel}, "
            f"{m0.steps} step(s), batch {m0.batch}, {m0.precision})\n"
        )
        rows = []
        for m in report.memory:
            rows.append(
                [
                    _minutes(m.track_seconds),
                    m.segments,
                    m.windows,
                    f"{m.rss_before_mib:.0f}",
                    f"{m.peak_mib:.0f}",
                    f"{m.protect_increase_mib:.0f}",
                    f"{m.peak_mib / report.memory[0].peak_mib:.2f}",
                    _f(m.protect_seconds, 1),
                ]
            )
        out.append(
            _table(
                [
                    "track",
                    "rows (segments)",
                    "windows",
                    "RSS before protect (MiB)",
                    "peak RSS (MiB)",
                    "peak − before (MiB)",
                    "peak ratio vs shortest",
                    "protect s",
                ],
                rows,
            )
        )
        ratio = report.memory[-1].peak_mib / report.memory[0].peak_mib
        verdict = "met" if ratio <= 1.2 else "NOT met"
        out.append(
            f"\nPeak RSS {_minutes(report.memory[-1].track_seconds)} ÷ "
            f"{_minutes(report.memory[0].track_seconds)}: "
            f"**{ratio:.2f}** (target ≤ 1.20: {verdict})."
        )
        if ratio > 1.2:
            out.append(
                "The actor holds `runtime.tracks_per_call` rows of at most `audio.segment_seconds` each "
                "(their PCM, every window's δ until the blend, quantisation temporaries); check those "
                "settings against the tracks' lengths."
            )
    if report.ensemble:
        out.append(render_ensemble(report.ensemble))
    if report.contention:
        out.append("\n### CPU contention during each section\n")
        rows = [
            [c.section, _f(c.wall_seconds, 0), _f(c.busy_pct, 0), _f(c.own_pct, 0), _f(c.other_pct, 0)]
            for c in report.contention
        ]
        out.append(_table(["section", "wall s", "machine busy %", "this process %", "other processes %"], rows))
        noisy = [c.section for c in report.contention if "pipeline" not in c.section and c.other_pct > 10]
        out.append(
            "\nShares of all cores, from /proc/stat and getrusage (in the pipeline rows the Ray workers "
            "count as other processes). "
            + (
                f"**Other work used > 10 % of the machine during: {', '.join(noisy)}** — those timings are "
                "inflated; rerun on an idle machine (`--wait-idle 600`) before trusting their ratios."
                if noisy
                else "No other work above 10 % of the machine during the timed sections."
            )
        )
    out.append("\n### GPU\n")
    if report.gpu:
        rows = [
            [
                g.mode,
                g.batch,
                g.steps,
                g.precision,
                _f(g.compile_seconds, 1) if g.mode != "eager" else "–",
                _f(g.seconds, 3) if not g.error else g.error,
                _f(g.windows_per_s, 2),
                _f(g.realtime, 0),
                _f(g.tflops, 1),
                _f(g.matmul_tflops, 1),
                f"{100 * g.tflops / g.matmul_tflops:.0f} %" if not g.error else "–",
            ]
            for g in report.gpu
        ]
        out.append(report.gpu_note + ", HTSAT-base\n")
        out.append(
            _table(
                [
                    "mode",
                    "batch",
                    "steps",
                    "precision",
                    "first call s",
                    "s / call",
                    "windows/s",
                    "× realtime",
                    "achieved TFLOP/s",
                    "bf16 matmul TFLOP/s",
                    "of ceiling",
                ],
                rows,
            )
        )
        out.append(
            f"\nFLOP per window = steps × {HTSAT_BASE_GFLOP_STEP:.0f} GFLOP + "
            f"2 × {HTSAT_BASE_GFLOP_FORWARD:.0f} "
            "GFLOP (clean and scoring forwards); ceiling = measured 8192³ bf16 `torch.matmul`."
        )
    else:
        out.append(report.gpu_note)
    return "\n".join(out)


def render_ensemble(results: Sequence[EnsembleResult]) -> str:
    """The table "Ensemble: time per PGD step" (one row per ensemble size)."""
    e0 = results[0]
    out = [
        f"\n### Ensemble: time per PGD step ({e0.amodel} × k, random seeds 0..k−1, TrackProtector embed + mean "
        f"distance, in-memory 48 kHz mono windows, batch {e0.batch}, {e0.steps} steps, {e0.precision}, "
        f"{e0.repeats} repeats)\n"
    ]
    rows = [
        [
            e.encoders,
            _f(e.seconds),
            _f(e.seconds_per_step_window, 3),
            _f(e.min_seconds_per_step_window, 3),
            f"{_f(e.ratio_vs_one)}×",
            f"{e.loaded_mib:.0f}",
            f"{e.peak_increase_mib:.0f}",
            f"{_f(e.increase_ratio_vs_one)}×",
        ]
        for e in results
    ]
    out.append(
        _table(
            [
                "encoders",
                "s / call",
                "s per PGD step per window (median)",
                "(fastest step)",
                f"vs {e0.encoders}",
                f"{e0.memory_kind} with encoders loaded (MiB)",
                f"peak {e0.memory_kind} increase (MiB)",
                f"vs {e0.encoders}",
            ],
            rows,
        )
    )
    out.append(
        "\nA call = clean forward + steps × (forward + backward w.r.t. δ through every encoder) + scoring "
        "forward. Each step is timed on its own (its forward's start → the next forward's start) and "
        "divided by the batch; the median over all timed steps is compared with one encoder. Each size "
        "runs in its own process (`--ensemble-child`); the increase is the peak during the calls "
        "(warm-up included) minus the figure just before them (encoders and batch already in memory)."
    )
    return "\n".join(out)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} min"


def render_markdown(report: BenchReport) -> str:
    """The whole docs/benchmarks.md: context, command, machine, tables."""
    s = report.settings
    machine = "\n".join(f"| {k} | {v} |" for k, v in report.machine.items())
    parts = [
        "# Benchmarks",
        "",
        "Generated by `pipeline/bench.py` (`python -m pipeline.bench`, or `unlearnable bench`). Every figure "
        "below comes from **one run on one machine**, so the ratios (engine ÷ baseline speedup, pipeline "
        "efficiency, memory ratio) are like-for-like; absolute CPU times are context only. Encoders use "
        "random weights (`random:<amodel>:0`): speed does not depend on the weights. Early stop is off "
        "(`target_delta_e = inf`), so every window runs exactly the stated steps. Times are medians of "
        f"{s.repeats} runs after {s.warmup} warm-up run(s) (the pipeline section's engine references: "
        f"{s.pipeline_repeats} timed call(s) after a 1-step warm-up).",
        "",
        f"- Date: {report.date}",
        f"- Command: `{report.command}`",
        f"- Settings: models {', '.join(s.amodels)}; {s.steps} PGD steps; batch sizes "
        f"{', '.join(map(str, s.batch_sizes))}; precisions {', '.join(s.precisions)}; torch.compile "
        f"{'on' if s.compile else 'off'}; pipeline section: {s.pipeline_steps} steps, "
        f"{', '.join(s.pipeline_precisions)}, placements {', '.join(s.pipeline_placements)}; "
        f"ε {EPS}, α {ALPHA}, σ {SIGMA}; "
        f"run took {report.seconds / 60:.1f} min",
        "",
        "| machine | |",
        "|---|---|",
        machine,
        "",
        "## Results",
        "",
        render_tables(report),
    ]
    if report.notes:
        parts += ["", "## Notes", "", *[f"- {n}" for n in report.notes]]
    parts += [
        "",
        "## How to read and reproduce",
        "",
        "- `python -m pipeline.bench --quick` (< 3 min on 2 cores: HTSAT-tiny, 2 steps, batch 1–2, a 2-track "
        "pipeline, 1 vs 3 min memory case) prints these tables; `--out FILE` writes this page; `--json FILE` "
        "keeps the raw numbers. The full run is `python -m pipeline.bench --out docs/benchmarks.md`.",
        "- `--parts engine,baseline,pipeline,memory,gpu,ensemble` picks sections; `--compile` adds `torch.compile`d "
        "engine rows (on CPU it costs minutes to compile for ≤ 10 % speed).",
        "- Pipeline: `--pipeline-steps` (default 50), `--pipeline-precisions` (default bf16, fp32 where bf16 is "
        "emulated), `--pipeline-placements dedicated,shared`, `--pipeline-repeats`; the catalog is `--pipeline-tracks` "
        "10 s 44.1 kHz stereo FLAC tracks (default 12) in shards of the batch size.",
        "- Engine: `pgd` with the frozen laion-clap HTSAT audio tower (`load_encoder`) behind "
        "`ClapView(48000)`; bf16 is autocast over the transformer body with the STFT/log-mel front end kept "
        "in fp32.",
        "- Baseline: `laion_clap.clap_module.factory.create_model(amodel, 'transformer', precision='fp32')`, "
        "`eval()`, weights left trainable, `get_audio_embedding([{'waveform': w}])` per window, "
        "`loss = ‖e(x+δ) − e(x)‖`, `loss.backward()`, sign step, the same clean and scoring forwards as "
        "`pgd`.",
        "- Memory: each case runs in its own process (`--memory-child`). The track (a 10 s clip tiled) "
        "is encoded as FLAC and goes through the read stage's code into rows (segments of "
        "`audio.segment_seconds` for a long track); their PCM is parked on disk, the peak mark is "
        "reset (`/proc/self/clear_refs`), and `ProtectActor` takes the rows `runtime.tracks_per_call` "
        "at a time. Peak = `VmHWM` from `/proc/self/status`: the actor's own memory.",
        "- Ensemble: `pgd` with `TrackProtector([random:<amodel>:0, …, random:<amodel>:k−1], "
        "ensemble='mean')`'s embed and distance, k = `--ensemble-sizes` (default 1,2,3), batch "
        "`--ensemble-batch`, `--ensemble-steps` steps, each k in its own process (`--ensemble-child`).",
        "- GPU: HTSAT-base, bf16 autocast, `--gpu-steps` (default 50). `eager` sweeps `--gpu-batch-sizes` "
        "(default 8,16,32,64; stops at the first out-of-memory); `compiled` (`torch.compile`) and "
        "`cudagraphs` (`torch.compile(mode='reduce-overhead')`) run at eager's fastest batch, their first "
        "call (2 steps: compiling and graph capture) timed apart. `--gpu-modes eager` skips the compiles.",
        "",
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# CLI


def _csv(kind: type) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        return values

    return parse


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or "python -m pipeline.bench",
        description="Benchmark the PGD engine, the Ray Data pipeline and laion-clap's naive loop in one run.",
    )
    p.add_argument("--amodels", type=_csv(str), help="comma-separated HTSAT models (default HTSAT-tiny,HTSAT-base)")
    p.add_argument("--steps", type=int, help="PGD steps per window, early stop off (default 5; quick 2)")
    p.add_argument("--batch-sizes", type=_csv(int), help="engine batch sizes (default 1,2,4; quick 1,2)")
    p.add_argument("--precisions", type=_csv(str), help="fp32,bf16 (default both; fp32 alone where bf16 is emulated)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd encoders (minutes on CPU)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small run, < 3 minutes on 2 cores (prints; writes only with --out)",
    )
    p.add_argument("--out", help="write the Markdown report here (default docs/benchmarks.md for a full run)")
    p.add_argument("--json", help="also write the raw results as JSON")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--repeats", type=int, help="timed repeats per measurement (median; default 3)")
    p.add_argument("--warmup", type=int, help="untimed warm-up runs per measurement (default 1)")
    p.add_argument("--pipeline-tracks", type=int, help="10 s tracks in the pipeline catalog (default 12; quick 2)")
    p.add_argument("--pipeline-batch", type=int, default=0, help="pipeline batch (default: largest leaving ≥ 2 shards)")
    p.add_argument("--pipeline-steps", type=int, help="PGD steps in the pipeline section (default 50; quick 2)")
    p.add_argument(
        "--pipeline-precisions", type=_csv(str), help="pipeline precisions (default bf16; fp32 where bf16 is emulated)"
    )
    p.add_argument(
        "--pipeline-placements",
        type=_csv(str),
        default=list(PLACEMENTS),
        help="dedicated (actor on cores − 1, CPU stages on the rest) and/or shared (actor threads on all cores)",
    )
    p.add_argument("--pipeline-repeats", type=int, help="timed engine-reference calls per pipeline case (default 1)")
    p.add_argument("--memory-seconds", type=_csv(float), help="track lengths for the memory case (default 60,1800)")
    p.add_argument("--memory-amodel", default="HTSAT-tiny", help="encoder of the memory case (default HTSAT-tiny)")
    p.add_argument("--memory-steps", type=int, default=1, help="PGD steps in the memory case (default 1)")
    p.add_argument("--gpu-batch-sizes", type=_csv(int), help="GPU sweep (default 8,16,32,64)")
    p.add_argument("--gpu-steps", type=int, help="GPU PGD steps (default 50)")
    p.add_argument(
        "--gpu-modes",
        type=_csv(str),
        default=list(GPU_MODES),
        help="GPU modes: eager sweeps the batch sizes; compiled / cudagraphs run at its fastest batch "
        "(default eager,compiled,cudagraphs)",
    )
    p.add_argument("--ensemble-sizes", type=_csv(int), help="encoders per ensemble (default 1,2,3)")
    p.add_argument("--ensemble-batch", type=int, help="windows per batch in the ensemble part (default 2; quick 1)")
    p.add_argument("--ensemble-steps", type=int, help="PGD steps in the ensemble part (default 3; quick 2)")
    p.add_argument("--parts", type=_csv(str), default=list(PARTS), help="sections to run (default all)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="first wait up to this many seconds for other work on the machine to finish (default 0)",
    )
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--ensemble-child", help=argparse.SUPPRESS)
    return p


def default_precisions(device: str) -> tuple[list[str], list[str], str]:
    """(engine precisions, pipeline precisions, note) when none are given: fp32 and bf16 where the
    device runs bf16 in hardware, else fp32 alone (emulated bf16 measures the emulation, not the
    engine: ~15× slower than fp32 on an AVX2-only CPU)."""
    from pipeline.encoders.load import emulated_precision_note, pick_device

    slow = emulated_precision_note(pick_device(device), "bf16")
    if not slow:
        return ["fp32", "bf16"], ["bf16"], ""
    return ["fp32"], ["fp32"], f"bf16 left out: {slow}; pass --precisions fp32,bf16 to time the emulation anyway."


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    profile = QUICK if args.quick else FULL
    precision_note = ""
    if args.precisions is None or args.pipeline_precisions is None:
        engine_precisions, pipeline_precisions, precision_note = default_precisions(args.device)
        profile = {**profile, "precisions": engine_precisions, "pipeline_precisions": pipeline_precisions}

    def pick(name: str) -> Any:
        value = getattr(args, name)
        return profile[name] if value is None else value

    settings = BenchSettings(
        amodels=pick("amodels"),
        steps=pick("steps"),
        batch_sizes=sorted(set(pick("batch_sizes"))),
        precisions=pick("precisions"),
        compile=args.compile,
        quick=args.quick,
        device=args.device,
        threads=args.threads,
        repeats=pick("repeats"),
        warmup=pick("warmup"),
        pipeline_tracks=pick("pipeline_tracks"),
        pipeline_batch=args.pipeline_batch,
        pipeline_steps=pick("pipeline_steps"),
        pipeline_precisions=pick("pipeline_precisions"),
        pipeline_placements=args.pipeline_placements,
        pipeline_repeats=pick("pipeline_repeats"),
        memory_seconds=pick("memory_seconds"),
        memory_amodel=args.memory_amodel,
        memory_steps=args.memory_steps,
        gpu_batch_sizes=pick("gpu_batch_sizes"),
        gpu_steps=pick("gpu_steps"),
        gpu_modes=args.gpu_modes,
        ensemble_sizes=args.ensemble_sizes or [1, 2, 3],
        ensemble_batch=pick("ensemble_batch"),
        ensemble_steps=pick("ensemble_steps"),
        parts=args.parts,
        wait_idle=args.wait_idle,
        precision_note=precision_note if args.precisions is None else "",
    )
    bad = [p for p in (*settings.precisions, *settings.pipeline_precisions) if p not in ("fp32", "bf16", "fp16")]
    unknown = [p for p in settings.parts if p not in PARTS]
    unknown += [p for p in settings.pipeline_placements if p not in PLACEMENTS]
    unknown += [m for m in settings.gpu_modes if m not in GPU_MODES]
    if (
        bad
        or unknown
        or min(settings.steps, settings.pipeline_steps) < 0
        or min(settings.batch_sizes) < 1
        or settings.pipeline_tracks < 1
        or settings.pipeline_repeats < 1
    ):
        raise ValueError(
            f"invalid settings: precisions {bad or 'ok'}, parts/placements {unknown or 'ok'} "
            f"(known {', '.join(PARTS)}; {', '.join(PLACEMENTS)}; {', '.join(GPU_MODES)}), "
            "steps ≥ 0, batch sizes ≥ 1, pipeline tracks ≥ 1, pipeline repeats ≥ 1"
        )
    if min(settings.ensemble_sizes) < 1 or settings.ensemble_batch < 1 or settings.ensemble_steps < 1:
        raise ValueError("invalid settings: ensemble sizes, batch and steps must be ≥ 1")
    return settings


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m pipeline.bench` and `unlearnable bench`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return 0
    if args.ensemble_child:
        import logging

        logging.getLogger("pipeline.encoders.load").setLevel(logging.ERROR)
        print(json.dumps(ensemble_child(json.loads(args.ensemble_child))), flush=True)
        return 0
    import logging

    import torch

    logging.getLogger("pipeline.encoders.load").setLevel(logging.ERROR)  # the random-weights warning, per load
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(settings.threads or (os.cpu_count() or 1))
    out = args.out if args.out is not None else (None if settings.quick else "docs/benchmarks.md")
    command = "python -m pipeline.bench" + (" " + shlex.join(argv) if argv else "")
    report = run_benchmark(settings, command)
    print(render_tables(report), flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(render_markdown(report))
        log(f"wrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

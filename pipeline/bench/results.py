"""The benchmark's results: one dataclass per section's row, the settings of a run and the report
that collects them (its `to_dict` is the --json file)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pipeline.bench.common import GPU_MODES, GPU_NOT_AVAILABLE, PARTS, PLACEMENTS, WINDOW_SECONDS, Contention

# Physical cost of HTSAT-base on a 10 s window (see docs/benchmarks.md): forward ≈ 33 GFLOP,
# one PGD step (forward + backward w.r.t. the input) ≈ 99 GFLOP.
HTSAT_BASE_GFLOP_FORWARD = 33.0
HTSAT_BASE_GFLOP_STEP = 99.0


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
    layout: str = "shards"  # the input's layout (io.input_format): shards | files | parquet

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
    layouts: list[PipelineResult] = field(default_factory=list)  # the same audio as shards, files, Parquet
    memory: list[MemoryResult] = field(default_factory=list)
    gpu: list[GpuResult] = field(default_factory=list)
    ensemble: list[EnsembleResult] = field(default_factory=list)
    gpu_note: str = GPU_NOT_AVAILABLE
    contention: list[Contention] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name in ("engine", "pipeline_engine", "baseline", "pipeline", "layouts", "memory", "gpu"):
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

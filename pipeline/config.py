"""One typed configuration tree, loaded from YAML with dotted overrides and validated once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """The configuration file or an override is invalid; the message names the key."""


@dataclass(frozen=True)
class StorageConfig:
    """Object-storage client settings passed to fsspec/s3fs. Credentials come from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an instance role), never from this file."""

    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str | None = None  # "path" for MinIO/SeaweedFS, "virtual" for AWS
    anon: bool = False

    def storage_options(self) -> dict[str, Any]:
        """fsspec keyword arguments for s3:// URLs (empty values left out)."""
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        options: dict[str, Any] = {}
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        if self.addressing_style:
            options["config_kwargs"] = {"s3": {"addressing_style": self.addressing_style}}
        if self.anon:
            options["anon"] = True
        return options


@dataclass(frozen=True)
class IOConfig:
    """Where shards come from and go to."""

    input: str = ""  # local dir, s3://bucket/prefix/, glob or brace list of .tar URLs
    output: str = ""  # local dir or s3://bucket/prefix/ ; one output shard per input shard
    storage: StorageConfig = field(default_factory=StorageConfig)
    overwrite: bool = False  # redo shards that already have a completion marker
    # auto | shards | files | parquet: WebDataset .tar shards, a tree of audio files (mirrored under
    # the output), or Parquet files with an audio column (Hugging Face `datasets` layout). auto:
    # .tar URLs/globs and folders with .tar files at the top are shards, .parquet ones parquet.
    input_format: str = "auto"
    files_per_unit: int = 64  # files mode: files per unit of work (one manifest + marker each)
    unit_max_mb: float = 1024.0  # files mode: a unit holds at most this many MiB of input
    copy_other_files: bool = False  # files mode: copy non-audio files (cover art, PDFs) to the output too
    audio_column: str = "audio"  # parquet mode: the column of {bytes, path} structs


@dataclass(frozen=True)
class AudioConfig:
    """How tracks are decoded, windowed and written back."""

    window_seconds: float = 10.0  # CLAP's window (laion-clap: 480,000 samples at 48 kHz)
    overlap_seconds: float = 1.0  # crossfade between neighbouring windows
    extensions: tuple[str, ...] = ("flac", "wav", "mp3", "ogg", "opus", "oga", "aiff", "aif", "m4a", "aac")
    max_member_mb: float = 1024.0  # members larger than this are errors, never read into memory
    on_error: str = "passthrough"  # passthrough | drop: keep a failed item's original bytes or not
    # Lossy inputs (MP3, Ogg Vorbis, Opus, AAC) cannot be re-encoded in their codec without noise
    # larger than ε. flac: write FLAC (extension changed, mapping in the manifest); same: re-encode
    # in the input codec at its bitrate (the manifest's linf is measured after encoding, no ε claim).
    lossy_output: str = "flac"
    # Tracks longer than this travel as several segment rows (whole windows each, crossfaded back
    # together by the writer), so a protect actor's memory does not grow with track length.
    segment_seconds: float = 60.0


@dataclass(frozen=True)
class EncoderConfig:
    """Which frozen CLAP audio encoder to attack."""

    checkpoint: str = "random:HTSAT-tiny:0"  # see encoder.CheckpointSpec: random:..., a laion file, hf:folder
    ensemble: tuple[str, ...] = ()  # more encoder specs to optimise against together with `checkpoint`
    amodel: str = "HTSAT-base"  # architecture of a real checkpoint (ignored for random:)
    sha256: str | None = None  # pin for the checkpoint file
    cache_dir: str = "~/.cache/music-unlearnable/checkpoints"
    hub_offline: bool = True  # import laion-clap with HF_HUB_OFFLINE=1 (its import hangs offline otherwise)
    device: str = "auto"  # auto | cpu | cuda | cuda:N


STRENGTH_MARGIN_DB = {1: -9.0, 2: -6.0, 3: -3.0, 4: 0.0, 5: 3.0}
"""attack.strength -> δ's per-bin ceiling in dB relative to the music's masking threshold (spectral
mode). Measured MOS-LQO and Δe of every level: docs/quality.md."""


@dataclass(frozen=True)
class AttackConfig:
    """PGD hyper-parameters. Amplitudes are linear, full scale = 1.0 (ε 0.003 ≈ -50.5 dBFS)."""

    # L∞ bound on δ. spectral mode: a hard safety cap over the masking budget (0.05 ≈ -26 dBFS peak;
    # the manifest's capped_share says how much it cut). linf/masking modes: the whole budget, so
    # set it small there (0.0003-0.003; docs/quality.md measures what each costs in MOS-LQO).
    eps: float = 0.05
    alpha: float = 0.0006  # sign-step size
    steps: int = 50  # gradient steps per window (upper bound; early stop may use fewer)
    sigma: float = 0.00075  # std of δ₀ ~ N(0, σ²), clipped to ε
    target_delta_e: float = 0.5  # per-window early stop once Δe ≥ this (unit embeddings: cos < 0.875)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0
    perceptual: str = "spectral"  # spectral | linf | masking (legacy); see pipeline.core.protect.PERCEPTUAL_MODES
    strength: int = 3  # spectral mode: 1 (gentlest) .. 5 (strongest), δ's level against the masking threshold
    lr: float = 0.1  # spectral mode: Adam step size on δ's spectral weights
    eot_views: tuple[str, ...] = ("clean48k",)  # views optimised through (core/views.py), e.g. [clean48k, musicldm]
    ensemble: str = "mean"  # with encoder.ensemble: maximise the mean or the minimum of per-encoder Δe
    # δ only below this (Hz): what the conditioner sees (CLAP's mel stops at 14 kHz; MusicLDM keeps
    # 8 kHz). δ above it buys no Δe and costs quality. None: the whole band.
    passband_hz: float | None = 14000.0
    # Every step runs the whole batch (finished windows masked, not dropped): no host round trip per
    # step, so a CUDA graph / torch.compile can capture it. Same δ as the default (tests/core/test_engine.py).
    fixed_shape: bool = False


@dataclass(frozen=True)
class QualityConfig:
    """Per-item quality statistics in the manifest; costly ones can be switched off."""

    masking: bool = True  # share of δ's energy above the masking threshold, noise-to-mask ratio
    musicldm_view: bool = True  # delta_e_musicldm: Δe through MusicLDM's deterministic view
    pesq: bool = False  # wide-band PESQ at 16 kHz, mono down-mix (PyPI pesq; a speech metric)
    stoi: bool = False  # STOI at 16 kHz, mono down-mix (PyPI pystoi; a speech metric)
    segsnr: bool = True  # segmental SNR, 20 ms frames
    # ViSQOL v3 audio mode (MOS-LQO 1-4.73, 48 kHz mono, against the clean audio), in a CPU stage.
    # It costs ~0.2 s per audio second on one core (numba; 0.7 s without), so by default only a
    # sample of items is measured.
    visqol: str = "sample"  # off | sample | all
    visqol_share: float = 0.1  # sample mode: share of items measured (chosen by a hash of the key)
    visqol_excerpt_seconds: float = 10.0  # length of each measured excerpt (the whole item when shorter)
    visqol_excerpts: int = 1  # excerpts per measured item, evenly spread over the track


@dataclass(frozen=True)
class RuntimeConfig:
    """How the work is spread over Ray."""

    ray_address: str | None = None  # None: RAY_ADDRESS from the environment, else a local Ray
    num_actors: int = 1  # protect actors (one encoder each)
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    torch_threads: int | None = None  # default: num_cpus_per_actor (at least 1)
    tracks_per_call: int = 4  # tracks handed to an actor per call
    batch_windows: int = 8  # windows per PGD batch on the accelerator
    io_cpus: float = 0.25  # CPUs reserved by each read/encode/write task (fractional keeps streaming)
    progress: bool = True
    metrics_port: int | None = None  # driver's Prometheus /metrics port (k8s: 9500); None: no endpoint
    metrics_addr: str = "0.0.0.0"


@dataclass(frozen=True)
class ServiceConfig:
    """`unlearnable serve` (docs/service.md): upload limits, batching across uploads, back-pressure."""

    max_upload_mb: float = 64.0  # request bodies larger than this: 413, never read whole
    max_duration_s: float = 600.0  # decoded audio longer than this: 413
    max_batch_uploads: int = 8  # uploads whose windows share one PGD call on a replica
    batch_wait_s: float = 0.05  # how long a replica waits to fill a batch (seconds)
    max_pending_uploads: int = 32  # per replica: uploads admitted (queued or running); more: 429
    max_queued_requests: int = 64  # Serve's own queue in front of the replicas; more: 503
    request_timeout_s: float = 300.0  # one upload, from body read to response: 504 after this
    retry_after_s: int = 5  # Retry-After of 429/503 answers (seconds)
    num_replicas: int = 1  # replicas, one encoder each
    num_gpus_per_replica: float = 0.0
    num_cpus_per_replica: float = 1.0


@dataclass(frozen=True)
class PipelineConfig:
    """The whole job's configuration.

    Example::

        cfg = load_config("configs/demo.yaml", overrides=["attack.steps=2"])
        cfg.attack.eps  # 0.003
    """

    io: IOConfig = field(default_factory=IOConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def output_hash(self) -> str:
        """12 hex digits identifying every setting that changes the protected audio."""
        relevant = {k: self.to_dict()[k] for k in ("audio", "encoder", "attack")}
        relevant["encoder"] = {k: v for k, v in relevant["encoder"].items() if k not in ("cache_dir", "device")}
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return list(value)
    return value


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML value to the declared field type, or raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build_dataclass(annotation, value, f"{key}.")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], key) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from exc
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from exc
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def build_dataclass(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """A config dataclass `cls` (nested sections too) from a plain dict, values coerced to the
    field types; unknown keys raise ConfigError naming where (`prefix`, e.g. "attack.")."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown key(s) {unknown} at {where}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    for name in names - set(kwargs):
        kwargs[name] = _coerce_default(cls, name)
    return cls(**kwargs)


def _coerce_default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one `section.key=value` override (value parsed as YAML) to a plain config dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def config_from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Build and validate a PipelineConfig from a plain mapping plus `section.key=value` overrides."""
    tree = json.loads(json.dumps(data or {}))  # deep copy of plain data
    for override in overrides:
        apply_override(tree, override)
    cfg = build_dataclass(PipelineConfig, tree)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a YAML file (or only defaults when `path` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded or {}
    return config_from_dict(data, overrides)


def validate(cfg: PipelineConfig) -> None:
    """Check every cross-field rule once; raise ConfigError with the offending key."""
    a, au, rt, sv = cfg.attack, cfg.audio, cfg.runtime, cfg.service
    checks = [
        (a.eps > 0 and a.eps < 1, "attack.eps must be in (0, 1) (linear amplitude, full scale 1.0)"),
        (a.alpha > 0, "attack.alpha must be > 0"),
        (a.steps >= 0, "attack.steps must be >= 0"),
        (a.sigma >= 0, "attack.sigma must be >= 0"),
        (a.target_delta_e > 0, "attack.target_delta_e must be > 0"),
        (a.precision in ("auto", "fp32", "bf16", "fp16"), "attack.precision must be auto|fp32|bf16|fp16"),
        (a.perceptual in ("spectral", "linf", "masking"), "attack.perceptual must be spectral|linf|masking"),
        (a.strength in STRENGTH_MARGIN_DB, f"attack.strength must be one of {sorted(STRENGTH_MARGIN_DB)}"),
        (a.lr > 0, "attack.lr must be > 0"),
        (a.ensemble in ("mean", "min"), "attack.ensemble must be mean|min"),
        (a.passband_hz is None or a.passband_hz > 0, "attack.passband_hz must be > 0 or null"),
        (cfg.quality.visqol in ("off", "sample", "all"), "quality.visqol must be off|sample|all"),
        (0 < cfg.quality.visqol_share <= 1, "quality.visqol_share must be in (0, 1]"),
        (cfg.quality.visqol_excerpt_seconds >= 1, "quality.visqol_excerpt_seconds must be >= 1"),
        (cfg.quality.visqol_excerpts >= 1, "quality.visqol_excerpts must be >= 1"),
        (len(a.eot_views) > 0, "attack.eot_views must name at least one view (clean48k: none)"),
        (au.window_seconds > 0, "audio.window_seconds must be > 0"),
        (
            0 <= au.overlap_seconds < au.window_seconds / 2,
            "audio.overlap_seconds must be >= 0 and less than half of audio.window_seconds",
        ),
        (au.on_error in ("passthrough", "drop"), "audio.on_error must be passthrough|drop"),
        (
            cfg.io.input_format in ("auto", "shards", "files", "parquet"),
            "io.input_format must be auto|shards|files|parquet",
        ),
        (cfg.io.files_per_unit >= 1, "io.files_per_unit must be >= 1"),
        (cfg.io.unit_max_mb > 0, "io.unit_max_mb must be > 0"),
        (au.lossy_output in ("flac", "same"), "audio.lossy_output must be flac|same"),
        (au.segment_seconds >= 2 * au.window_seconds, "audio.segment_seconds must be ≥ 2 × audio.window_seconds"),
        (au.max_member_mb > 0, "audio.max_member_mb must be > 0"),
        (len(au.extensions) > 0, "audio.extensions must not be empty"),
        (rt.num_actors >= 1, "runtime.num_actors must be >= 1"),
        (rt.tracks_per_call >= 1, "runtime.tracks_per_call must be >= 1"),
        (rt.batch_windows >= 1, "runtime.batch_windows must be >= 1"),
        (rt.num_gpus_per_actor >= 0, "runtime.num_gpus_per_actor must be >= 0"),
        (rt.num_cpus_per_actor > 0, "runtime.num_cpus_per_actor must be > 0"),
        (0 < rt.io_cpus <= 16, "runtime.io_cpus must be in (0, 16]"),
        (rt.metrics_port is None or 0 <= rt.metrics_port <= 65535, "runtime.metrics_port must be 0..65535 or null"),
        (sv.max_upload_mb > 0, "service.max_upload_mb must be > 0"),
        (sv.max_duration_s > 0, "service.max_duration_s must be > 0"),
        (sv.max_batch_uploads >= 1, "service.max_batch_uploads must be >= 1"),
        (sv.batch_wait_s >= 0, "service.batch_wait_s must be >= 0"),
        (sv.max_pending_uploads >= 1, "service.max_pending_uploads must be >= 1"),
        (sv.max_queued_requests >= -1, "service.max_queued_requests must be >= 0 (-1: unbounded)"),
        (sv.request_timeout_s > 0, "service.request_timeout_s must be > 0"),
        (sv.retry_after_s >= 1, "service.retry_after_s must be >= 1"),
        (sv.num_replicas >= 1, "service.num_replicas must be >= 1"),
        (sv.num_gpus_per_replica >= 0, "service.num_gpus_per_replica must be >= 0"),
        (sv.num_cpus_per_replica > 0, "service.num_cpus_per_replica must be > 0"),
        (
            cfg.encoder.sha256 is None or len(cfg.encoder.sha256) == 64,
            "encoder.sha256 must be 64 hex digits",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)

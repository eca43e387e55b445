"""Build the frozen encoder a config names (either backend), the driver's pre-flight check of
front ends, device and precision choice. The one module that imports both backends."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.encoders.base import RANDOM_WARNING, CheckpointError, front_end_digest, set_hub_offline
from pipeline.encoders.checkpoints import CheckpointSpec, file_sha256, resolve_checkpoint
from pipeline.encoders.laion import ClapAudioEncoder, audio_state_dict, fusion_type_of, load_weights, read_audio_state

logger = logging.getLogger(__name__)


@dataclass
class LoadedEncoder:
    """An encoder ready for PGD, with the identity recorded in manifests."""

    model: nn.Module  # ClapAudioEncoder or hf_encoder.HFClapAudioEncoder: [B, 480000] -> [B, 512]
    # "random:HTSAT-tiny:0", "HTSAT-base@sha256:<12 hex>#fe=<8 hex>", "hf:<folder>#fe=<8 hex>":
    # `#fe=` digests the front-end settings (front_end_digest), so different processors never look alike.
    encoder_id: str
    is_random: bool
    device: torch.device


def load_configured_encoder(
    cfg: Any, storage_options: Mapping[str, Any] | None, spec: str | None = None
) -> LoadedEncoder:
    """`load_encoder` with the settings of an EncoderConfig; `spec` (default cfg.checkpoint) picks
    one of its encoders. The sha256 pin applies to cfg.checkpoint only."""
    spec = spec or cfg.checkpoint
    return load_encoder(
        spec,
        cfg.amodel,
        sha256=cfg.sha256 if spec == cfg.checkpoint else None,
        cache_dir=cfg.cache_dir,
        hub_offline=cfg.hub_offline,
        device=cfg.device,
        storage_options=storage_options,
    )


def check_configured_encoders(cfg: Any, storage_options: Mapping[str, Any] | None) -> None:
    """Refuse, before any shard is read, an encoder (cfg.checkpoint and cfg.ensemble: an
    EncoderConfig) whose front end the code cannot reproduce, without building a tower: hf folders'
    config.json + processor config; laion files' fusion kind from their parameter names (a
    memory-mapped weights_only load: the checkpoint is fetched into the cache, where the workers
    find it). Raises CheckpointError saying what and why."""
    for spec in (cfg.checkpoint, *getattr(cfg, "ensemble", ())):
        parsed = CheckpointSpec.parse(spec, cfg.amodel)
        if parsed.is_random:
            continue
        assert parsed.url is not None
        if parsed.backend == "hf":
            from pipeline.encoders.hf import check_hf_checkpoint

            if cfg.hub_offline:
                set_hub_offline()
            try:
                check_hf_checkpoint(parsed.url, cfg.cache_dir, dict(storage_options or {}))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot load transformers CLAP from {parsed.url}: {exc}") from exc
            continue
        sha256 = cfg.sha256 if spec == cfg.checkpoint else None
        path = resolve_checkpoint(parsed.url, cfg.cache_dir, sha256, storage_options)
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # not the zip format mmap needs (a legacy torch.save)
            if "mmap" not in str(exc):
                raise CheckpointError(f"cannot load {path} with weights_only=True: {exc}") from exc
            checkpoint = read_audio_state(path)
        except Exception as exc:
            raise CheckpointError(f"cannot load {path} with weights_only=True: {type(exc).__name__}: {exc}") from exc
        fusion_type_of(audio_state_dict(checkpoint))


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def native_low_precision(device: torch.device) -> bool:
    """Whether bf16/fp16 autocast runs in hardware on `device`. On a CPU without AVX-512 (an
    AVX2-only EPYC, say) oneDNN emulates bf16: an HTSAT step measured ~15× slower than fp32
    (docs/benchmarks.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True
    try:  # torch's own check (AVX-512 BW/VL/DQ or Arm bf16); private, hence the fallback
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def emulated_precision_note(device: torch.device, precision: str = "bf16") -> str:
    """Why `precision` (bf16/fp16) will be slow on `device`, or "" where it runs in hardware (and
    for fp32). Callers add their own advice (a config key, a CLI flag)."""
    if precision not in ("bf16", "fp16") or native_low_precision(device):
        return ""
    capability = torch.backends.cpu.get_cpu_capability() if device.type == "cpu" else device.type
    return (
        f"{precision} on {device} has no hardware support (CPU capability {capability}), so it is emulated "
        "and runs many times slower than fp32 (~15× measured on an AVX2 EPYC)"
    )


def load_encoder(
    spec: str,
    amodel: str = "HTSAT-base",
    *,
    sha256: str | None = None,
    cache_dir: str = "~/.cache/music-unlearnable/checkpoints",
    hub_offline: bool = True,
    device: str = "auto",
    storage_options: Mapping[str, Any] | None = None,
) -> LoadedEncoder:
    """Build the frozen audio encoder for a checkpoint spec (see CheckpointSpec) on `device`.

    Raises:
        CheckpointError: unknown model, unreachable/unpinned-mismatch/corrupt checkpoint, missing keys,
            a front end the code cannot reproduce (a processor setting, a fusion kind): all before
            any audio is touched.
    """
    parsed = CheckpointSpec.parse(spec, amodel)
    model: nn.Module
    if parsed.backend == "hf":
        from pipeline.encoders.hf import HFClapAudioEncoder, load_hf_encoder, random_hf_model

        if hub_offline:
            set_hub_offline()
        if parsed.is_random:
            model = HFClapAudioEncoder(random_hf_model(parsed.amodel, parsed.seed))
            encoder_id = str(parsed)
        else:
            assert parsed.url is not None
            try:
                model = load_hf_encoder(parsed.url, cache_dir, dict(storage_options or {}))
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot load transformers CLAP from {parsed.url}: {exc}") from exc
            encoder_id = f"{parsed}#fe={model.front_end.digest}"
    elif parsed.is_random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(parsed.seed)
            model = ClapAudioEncoder(parsed.amodel, hub_offline)
        encoder_id = str(parsed)
    else:
        assert parsed.url is not None
        path = resolve_checkpoint(parsed.url, cache_dir, sha256, storage_options)
        state = read_audio_state(path)
        laion = ClapAudioEncoder(parsed.amodel, hub_offline, fusion_type=fusion_type_of(state))
        load_weights(laion, path, state)
        model = laion
        digest = sha256.lower() if sha256 else file_sha256(path)
        encoder_id = f"{parsed.amodel}@sha256:{digest[:12]}#fe={front_end_digest(laion.front_end_settings())}"
    if parsed.is_random:
        logger.warning(RANDOM_WARNING.format(spec=parsed))
    target = pick_device(device)
    model = model.to(target).freeze()
    return LoadedEncoder(model=model, encoder_id=encoder_id, is_random=parsed.is_random, device=target)
